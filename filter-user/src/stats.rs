//! Verdict counters as operators read them: `keywall stats` and `keywall status`.

use std::path::Path;

use anyhow::Result;
use filter_common::{AUDIT_OFFSET, KEY_PRESENT, KeyStats, Reason, SETTING_ENFORCE};
use serde::Serialize;
use serde_json::{Value, json};

use crate::dataplane::{PinnedView, read_reasons};

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

/// Per-key counters of the keys in the live slot, most drops first.
pub fn key_counts(view: &PinnedView) -> Result<Vec<KeyCount>> {
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let now_mono = monotonic_ns();
    let now_unix = crate::state::now_unix();
    let mut out = Vec::new();
    for kv in view.keys.iter() {
        let (k, e) = kv?;
        let r = e.slot[slot];
        if r.flags & KEY_PRESENT == 0 {
            continue;
        }
        let s: KeyStats = view.key_stats.get(&r.stat_idx, 0).unwrap_or_default();
        let last_seen_unix = if s.last_seen_ns == 0 {
            0
        } else {
            now_unix.saturating_sub(now_mono.saturating_sub(s.last_seen_ns) / 1_000_000_000)
        };
        out.push(KeyCount {
            prefix: prefix_str(&k),
            passed: s.passed,
            dropped: s.dropped,
            last_seen_unix,
        });
    }
    out.sort_by(|a, b| {
        b.dropped
            .cmp(&a.dropped)
            .then(b.passed.cmp(&a.passed))
            .then(a.prefix.cmp(&b.prefix))
    });
    Ok(out)
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

/// SPEC's `stats --json`: every reason present, `keys` by drops, cut at `top`.
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
    let mut keys = key_counts(view)?;
    if let Some(n) = top {
        keys.truncate(n);
    }
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

pub fn print_stats(pin_dir: &Path, json: bool, by: &str, top: Option<usize>) -> Result<()> {
    let view = PinnedView::open(pin_dir)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&stats_json(&view, top)?)?
        );
        return Ok(());
    }
    if by == "key" {
        let mut keys = key_counts(&view)?;
        if let Some(n) = top {
            keys.truncate(n);
        }
        println!(
            "{:<18} {:>12} {:>12} {:>12}",
            "KEY", "PASSED", "DROPPED", "LAST SEEN"
        );
        for k in keys {
            let ago = if k.last_seen_unix == 0 {
                "never".to_owned()
            } else {
                format!(
                    "{}s ago",
                    crate::state::now_unix().saturating_sub(k.last_seen_unix)
                )
            };
            println!(
                "{:<18} {:>12} {:>12} {:>12}",
                k.prefix, k.passed, k.dropped, ago
            );
        }
        return Ok(());
    }
    println!(
        "{:<18} {:<9} {:>12} {:>14}",
        "REASON", "ACTION", "PACKETS", "BYTES"
    );
    for c in reason_counts(&view)? {
        if c.action == "observed" && c.packets == 0 {
            continue;
        }
        println!(
            "{:<18} {:<9} {:>12} {:>14}",
            c.reason, c.action, c.packets, c.bytes
        );
    }
    Ok(())
}
