//! `keywall stats` rendered for a terminal.

use std::path::Path;

use anyhow::Result;

use crate::dataplane::{
    PinnedView,
    counters::{key_counts, reason_counts, stats_json},
};

/// `keywall stats [--by reason|key] [--top N] [--json]`.
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
        let keys = key_counts(&view, top)?;
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
