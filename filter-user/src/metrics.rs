//! Prometheus metrics (docs/REFERENCE.md "Metrics"), with `prometheus-client`.
//!
//! Kernel counters (verdicts, map fill, events) are read from the pinned maps at each scrape,
//! so they never lag and cost nothing between scrapes. What the daemon itself does (policy
//! updates, apply times, revision, sync health) is recorded as it happens. Per-key figures
//! stay out: a million keys would make a million series.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use filter_common::{AUDIT_OFFSET, COUNTER_EVENTS_SENT, COUNTER_EVENTS_SUPPRESSED, Reason, maps};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use aya::maps::IterableMap as _;

use crate::{
    dataplane::{PinnedView, batch, read_reasons},
    state::PolicyStatus,
};

type Labels = Vec<(String, String)>;

/// What the daemon records as it works.
pub struct Metrics {
    pub registry: Registry,
    pub updates: Family<Labels, Counter>,
    pub apply_seconds: Histogram,
    pub revision: Gauge,
    pub keys: Gauge,
    pub locked_keys: Gauge,
    pub sync_up: Family<Labels, Gauge>,
    pub sync_errors: Family<Labels, Gauge>,
    /// Keys used from more networks than `shared_key.networks` in its window (issue 13).
    pub shared_suspect: Gauge,
}

impl Metrics {
    /// `published`: the engine's figures (map fill), read at each scrape without a map walk.
    pub fn new(pin_dir: PathBuf, published: Arc<Mutex<Option<PolicyStatus>>>) -> Metrics {
        let mut registry = Registry::with_prefix("keywall");
        let updates = Family::<Labels, Counter>::default();
        registry.register(
            "policy_updates",
            "Policy writes by source (file, api) and result (applied, unchanged, rejected, conflict, error)",
            updates.clone(),
        );
        // 100 us .. ~13 s: a one-key PATCH to a 1M-key snapshot.
        let apply_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "policy_apply_seconds",
            "Time to write a policy change into the kernel maps",
            apply_seconds.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "policy_revision",
            "Revision of the applied policy",
            revision.clone(),
        );
        let keys = Gauge::default();
        registry.register("policy_keys", "Keys in the applied policy", keys.clone());
        let locked_keys = Gauge::default();
        registry.register(
            "policy_locked_keys",
            "Locked keys in the applied policy",
            locked_keys.clone(),
        );
        let sync_up = Family::<Labels, Gauge>::default();
        registry.register(
            "sync_up",
            "1 when the policy source is healthy (the file parses and applies; the API listens)",
            sync_up.clone(),
        );
        let sync_errors = Family::<Labels, Gauge>::default();
        registry.register(
            "sync_entries_in_error",
            "Entries of the policy source whose latest value was refused (they keep their last good value)",
            sync_errors.clone(),
        );
        let shared_suspect = Gauge::default();
        registry.register(
            "keys_shared_suspect",
            "Keys used or tried from more source networks than shared_key.networks within its window",
            shared_suspect.clone(),
        );
        registry.register_collector(Box::new(KernelCollector { pin_dir, published }));
        Metrics {
            registry,
            updates,
            apply_seconds,
            revision,
            keys,
            locked_keys,
            sync_up,
            sync_errors,
            shared_suspect,
        }
    }

    pub fn update(&self, source: &str, result: &str) {
        self.updates
            .get_or_create(&vec![
                ("source".into(), source.into()),
                ("result".into(), result.into()),
            ])
            .inc();
    }

    pub fn set_sync(&self, source: &str, up: bool) {
        self.sync_up
            .get_or_create(&vec![("source".into(), source.into())])
            .set(i64::from(up));
    }

    pub fn set_sync_errors(&self, source: &str, n: usize) {
        self.sync_errors
            .get_or_create(&vec![("source".into(), source.into())])
            .set(n as i64);
    }

    /// Records the applied policy's figures (the engine calls it with every write).
    pub fn set_policy(&self, revision: u64, keys: usize, locked_keys: usize) {
        self.revision.set(revision as i64);
        self.keys.set(keys as i64);
        self.locked_keys.set(locked_keys as i64);
    }

    /// The text exposition (OpenMetrics).
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            log::error!("encoding metrics: {e}");
        }
        s
    }
}

/// Reads the pinned maps at each scrape.
#[derive(Debug)]
struct KernelCollector {
    pin_dir: PathBuf,
    published: Arc<Mutex<Option<PolicyStatus>>>,
}

/// Entries and capacity of the maps whose fill matters to operators.
const FILL_MAPS: [&str; 5] = [
    maps::KEYS,
    maps::ALLOW,
    maps::SETS,
    maps::FLOWS,
    maps::KEY_STATS,
];

/// Last flow count, for the `flows` gauge (also reported as `map_entries{map="KW_FLOWS"}`).
static LAST_FLOWS: AtomicI64 = AtomicI64::new(0);

impl Collector for KernelCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(view) = PinnedView::open(&self.pin_dir) else {
            return Ok(()); // nothing pinned yet: no kernel figures
        };
        if let Ok(raw) = read_reasons(&view.reasons) {
            for (name, help, bytes) in [
                ("packets", "Packets by verdict reason and action", false),
                ("bytes", "Bytes by verdict reason and action", true),
            ] {
                let c = ConstCounter::new(0u64);
                let mut m = enc.encode_descriptor(name, help, None, c.metric_type())?;
                for r in Reason::ALL {
                    let mut rows =
                        vec![(r as usize, if r.is_drop() { "dropped" } else { "passed" })];
                    if r.is_drop() {
                        rows.push(((AUDIT_OFFSET + r as u32) as usize, "observed"));
                    }
                    for (slot, action) in rows {
                        let v = if bytes {
                            raw[slot].bytes
                        } else {
                            raw[slot].packets
                        };
                        let labels = [("reason", r.name()), ("action", action)];
                        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            let c = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "events",
                "Drop events sent to the daemon, and suppressed by the per-CPU rate limit",
                None,
                c.metric_type(),
            )?;
            for (slot, result) in [
                (COUNTER_EVENTS_SENT, "sent"),
                (COUNTER_EVENTS_SUPPRESSED, "suppressed"),
            ] {
                ConstCounter::new(raw[slot as usize].packets)
                    .encode(m.encode_family(&[("result", result)])?)?;
            }
        }

        // The policy maps' fill is the engine's (it writes every entry); the flow table, which
        // the kernel fills, is counted in batches.
        let fill = self.published.lock().unwrap().as_ref().map(|p| p.fill);
        let counts: Vec<(&str, Option<u64>, Option<u32>)> = FILL_MAPS
            .iter()
            .map(|name| {
                let entries = match *name {
                    maps::FLOWS => batch::count::<filter_common::FlowKey, filter_common::Flow>(
                        view.flows.map(),
                    )
                    .ok()
                    .map(|n| n as u64),
                    maps::KEYS => fill.map(|f| f.keys),
                    maps::ALLOW => fill.map(|f| f.allow),
                    maps::SETS => fill.map(|f| f.sets),
                    maps::KEY_STATS => fill.map(|f| f.key_stats),
                    _ => None,
                };
                (
                    *name,
                    entries,
                    crate::dataplane::map_capacity(&self.pin_dir, name),
                )
            })
            .collect();
        let g = ConstGauge::new(0i64);
        let mut m = enc.encode_descriptor(
            "map_entries",
            "Entries in a kernel map (KW_KEY_STATS: slots handed out)",
            None,
            g.metric_type(),
        )?;
        for (name, entries, _) in &counts {
            if let Some(n) = entries {
                ConstGauge::new(*n as i64).encode(m.encode_family(&[("map", *name)])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "map_capacity",
            "Capacity (max entries) of a kernel map",
            None,
            g.metric_type(),
        )?;
        for (name, _, cap) in &counts {
            if let Some(c) = cap {
                ConstGauge::new(i64::from(*c)).encode(m.encode_family(&[("map", *name)])?)?;
            }
        }
        if let Some((_, Some(f), _)) = counts.iter().find(|(n, _, _)| *n == maps::FLOWS) {
            LAST_FLOWS.store(*f as i64, Ordering::Relaxed);
        }
        let m = enc.encode_descriptor(
            "flows",
            "Connections with a verdict in the flow table",
            None,
            g.metric_type(),
        )?;
        ConstGauge::new(LAST_FLOWS.load(Ordering::Relaxed)).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_metrics_render_with_spec_names() {
        let m = Metrics::new(
            PathBuf::from("/nonexistent/keywall-pins"),
            Arc::new(Mutex::new(None)),
        );
        m.update("api", "applied");
        m.update("api", "rejected");
        m.set_sync("api", true);
        m.apply_seconds.observe(0.002);
        m.revision.set(7);
        let text = m.render();
        for want in [
            "keywall_policy_updates_total{source=\"api\",result=\"applied\"} 1",
            "keywall_policy_revision 7",
            "keywall_policy_apply_seconds_count 1",
            "keywall_sync_up{source=\"api\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
