//! The verdict counters decoded from the pinned maps (`KW_REASONS`, `KW_KEYS`, `KW_KEY_STATS`):
//! what `keywall stats`, `GET /v1/stats`, `key show` and the metrics read.

use anyhow::Result;
use aya::maps::IterableMap as _;
use filter_common::{
    AUDIT_OFFSET, KEY_PRESENT, KeyEntry, KeyPrefix, KeyStats, Reason, SETTING_ENFORCE,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::dataplane::{PinnedView, batch, read_reasons};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReasonCount {
    pub reason: &'static str,
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KeyCount {
    pub prefix: String,
    pub passed: u64,
    pub dropped: u64,
    pub last_seen_unix: u64,
}

/// Counters split by action: passes, enforced drops, and drops observed in audit mode.
pub fn reason_counts(view: &PinnedView) -> Result<Vec<ReasonCount>> {
    let raw = read_reasons(&view.reasons)?;
    let mut out = Vec::new();
    for r in Reason::ALL {
        let c = raw[r as usize];
        let action = if r.is_drop() { "dropped" } else { "passed" };
        out.push(ReasonCount {
            reason: r.name(),
            action,
            packets: c.packets,
            bytes: c.bytes,
        });
        if r.is_drop() {
            let a = raw[(AUDIT_OFFSET + r as u32) as usize];
            out.push(ReasonCount {
                reason: r.name(),
                action: "observed",
                packets: a.packets,
                bytes: a.bytes,
            });
        }
    }
    Ok(out)
}

/// Seconds since boot on CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn prefix_str(p: &filter_common::KeyPrefix) -> String {
    let end = p
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(p.bytes.len());
    String::from_utf8_lossy(&p.bytes[..end]).into_owned()
}

/// Per-key counters of the keys in the live slot, most drops first, cut at `top`. The key
/// map and the counters are read in batches (a few syscalls for a million keys), and only the
/// `top` rows are sorted and named.
pub fn key_counts(view: &PinnedView, top: Option<usize>) -> Result<Vec<KeyCount>> {
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let order = |a: &Row, b: &Row| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.3.cmp(&b.3));
    if let (Some(n), Some(sk)) = (top, &view.stat_keys)
        && let Some(rows) = top_by_index(view, sk, slot, n, order)?
    {
        return Ok(rows.into_iter().map(key_count_row).collect());
    }
    let mut stats: Vec<KeyStats> = Vec::new();
    batch::for_each::<u32, KeyStats>(view.key_stats.map(), |idx, vals| {
        for (i, v) in idx.iter().zip(vals) {
            let i = *i as usize;
            if stats.len() <= i {
                stats.resize(i + 1, KeyStats::default());
            }
            stats[i] = *v;
        }
    })?;
    // (dropped, passed, last_seen_ns, prefix): named and converted only for the rows kept.
    let mut rows: Vec<(u64, u64, u64, KeyPrefix)> = Vec::new();
    batch::for_each::<KeyPrefix, KeyEntry>(view.keys.map(), |ks, es| {
        for (k, e) in ks.iter().zip(es) {
            let r = e.slot[slot];
            if r.flags & KEY_PRESENT == 0 {
                continue;
            }
            let s = stats.get(r.stat_idx as usize).copied().unwrap_or_default();
            rows.push((s.dropped, s.passed, s.last_seen_ns, *k));
        }
    })?;
    if let Some(n) = top
        && n < rows.len()
    {
        if n == 0 {
            rows.clear();
        } else {
            rows.select_nth_unstable_by(n - 1, order);
            rows.truncate(n);
        }
    }
    rows.sort_unstable_by(order);
    Ok(rows.into_iter().map(key_count_row).collect())
}

fn key_count_row((dropped, passed, last_seen_ns, k): (u64, u64, u64, KeyPrefix)) -> KeyCount {
    KeyCount {
        prefix: prefix_str(&k),
        passed,
        dropped,
        last_seen_unix: last_seen_unix(last_seen_ns),
    }
}

type Row = (u64, u64, u64, KeyPrefix);

/// The top `n` rows from the counters alone, named through `KW_STAT_KEYS`: the counters are
/// streamed in batches through a bounded heap of the best candidates (each named by the
/// index), which are then checked against `KW_KEYS` in rank order (present in the live
/// slot, owning this counter slot) until `n` pass. Only those few keys are looked up, not
/// the whole key map, and nothing the size of the policy is held. None when stale index
/// entries crowd the candidates out (then the caller joins the maps).
fn top_by_index(
    view: &PinnedView,
    sk: &crate::dataplane::statkeys::StatKeys,
    slot: usize,
    n: usize,
    order: impl Fn(&Row, &Row) -> std::cmp::Ordering + Copy,
) -> Result<Option<Vec<Row>>> {
    const ZERO: KeyPrefix = KeyPrefix { bytes: [0; 16] };
    /// Ordered so that the heap's top is the worst candidate kept.
    struct Cand<F>(Row, u32, F);
    impl<F: Fn(&Row, &Row) -> std::cmp::Ordering> PartialEq for Cand<F> {
        fn eq(&self, o: &Self) -> bool {
            (self.2)(&self.0, &o.0).is_eq()
        }
    }
    impl<F: Fn(&Row, &Row) -> std::cmp::Ordering> Eq for Cand<F> {}
    impl<F: Fn(&Row, &Row) -> std::cmp::Ordering> PartialOrd for Cand<F> {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl<F: Fn(&Row, &Row) -> std::cmp::Ordering> Ord for Cand<F> {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            (self.2)(&self.0, &o.0)
        }
    }
    // A window a little wider than n, for entries that fail the check.
    let window = n * 2 + 64;
    let mut heap = std::collections::BinaryHeap::with_capacity(window + 1);
    let mut named = 0usize;
    batch::for_each::<u32, KeyStats>(view.key_stats.map(), |idx, vals| {
        for (i, s) in idx.iter().zip(vals) {
            let Some(p) = sk.get(*i).filter(|p| *p != ZERO) else {
                continue;
            };
            named += 1;
            let c = Cand((s.dropped, s.passed, s.last_seen_ns, p), *i, order);
            if heap.len() < window {
                heap.push(c);
            } else if heap.peek().is_some_and(|w| c < *w) {
                heap.pop();
                heap.push(c);
            }
        }
    })?;
    let mut out = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    for Cand(row, idx, _) in heap.into_sorted_vec() {
        if out.len() == n {
            break;
        }
        let live = view.keys.get(&row.3, 0).ok().is_some_and(|e| {
            let r = e.slot[slot];
            r.flags & KEY_PRESENT != 0 && r.stat_idx == idx
        });
        if live && seen.insert(row.3) {
            out.push(row);
        }
    }
    // Fewer than asked while candidates were cut: stale entries crowded the window; join
    // instead. (A window that held every named slot is exact.)
    if out.len() < n && named > window {
        return Ok(None);
    }
    Ok(Some(out))
}

/// One key's counters in the live slot, looked up directly (no walk over every key).
pub fn key_count(view: &PinnedView, prefix: &str) -> Result<Option<KeyCount>> {
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let Ok(e) = view.keys.get(&crate::policy::key_prefix(prefix), 0) else {
        return Ok(None);
    };
    let r = e.slot[slot];
    if r.flags & KEY_PRESENT == 0 {
        return Ok(None);
    }
    let s: KeyStats = view.key_stats.get(&r.stat_idx, 0).unwrap_or_default();
    Ok(Some(KeyCount {
        prefix: prefix.to_owned(),
        passed: s.passed,
        dropped: s.dropped,
        last_seen_unix: last_seen_unix(s.last_seen_ns),
    }))
}

fn last_seen_unix(last_seen_ns: u64) -> u64 {
    if last_seen_ns == 0 {
        return 0;
    }
    crate::state::now_unix()
        .saturating_sub(monotonic_ns().saturating_sub(last_seen_ns) / 1_000_000_000)
}

/// `stats --json` (docs/REFERENCE.md): every reason present, `keys` by drops, cut at `top`.
pub fn stats_json(view: &PinnedView, top: Option<usize>) -> Result<Value> {
    let settings_enforce = live_enforce(view);
    let counts = reason_counts(view)?;
    let mut reasons = serde_json::Map::new();
    for r in Reason::ALL {
        let get = |action: &str| {
            counts
                .iter()
                .find(|c| c.reason == r.name() && c.action == action)
                .cloned()
        };
        let main =
            get(if r.is_drop() { "dropped" } else { "passed" }).expect("every reason counted");
        let mut o = json!({"packets": main.packets, "bytes": main.bytes,
            "action": if !r.is_drop() { "passed" } else if settings_enforce { "dropped" } else { "observed" }});
        if r.is_drop() {
            let a = get("observed").expect("drop reasons have an observed slot");
            o["observed_packets"] = a.packets.into();
            o["observed_bytes"] = a.bytes.into();
        }
        reasons.insert(r.name().to_owned(), o);
    }
    let keys = key_counts(view, top)?;
    Ok(json!({"reasons": reasons, "keys": keys}))
}

fn live_enforce(view: &PinnedView) -> bool {
    let Ok(c) = view.control.get(&0, 0) else {
        return true;
    };
    view.settings
        .get(&(c.active_slot & 1), 0)
        .map(|s| s.flags & SETTING_ENFORCE != 0)
        .unwrap_or(true)
}
