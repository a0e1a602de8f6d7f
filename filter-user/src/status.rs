//! The status document (`keywall status --json`, `GET /v1/status`): a short answer to "is it
//! enforcing, and what?". `cli/status.rs` prints it for people.

use std::path::Path;

use anyhow::Result;
use filter_common::{SETTING_ENFORCE, SETTING_LOADED};
use serde_json::{Value, json};

use crate::{
    dataplane::{LiveSlot, PinnedView, pinned_ifaces},
    state::{self, PolicyStatus},
};

/// True if `pid` is a live (not zombie) keywall process, so a reused pid is not mistaken for it.
fn pid_is_keywall(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: pid (comm) state ...; comm may contain spaces, so split at the last ')'.
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let alive = !rest.trim_start().starts_with('Z');
    alive && head.contains("(keywall")
}

/// `auto_locks` in status: how many, and the first ones with their reason and time.
pub fn auto_locks_json(o: &crate::autolock::Overlay) -> Value {
    serde_json::json!({
        "count": o.locks.len(),
        "keys": o.locks.iter().take(20).map(|(p, a)| serde_json::json!({
            "prefix": p, "reason": a.reason, "at": crate::risk::format_rfc3339(a.at),
        })).collect::<Vec<_>>(),
    })
}

/// `status --json` (and `GET /v1/status`). Costs the same at 10 keys and at a million: the
/// policy's figures come from the engine (`live`, in the daemon) or from the status file it
/// keeps in the state dir, never from parsing the policy or walking the key map.
pub fn status_json(pin_dir: &Path, state_dir: &Path, live: Option<PolicyStatus>) -> Result<Value> {
    let view = PinnedView::open(pin_dir)?;
    let LiveSlot {
        slot,
        settings: s,
        listeners,
    } = view.live_slot()?;
    let flows = view.flow_count()?;
    let runtime = state::load_runtime(state_dir);
    let policy = live
        .or_else(|| state::load_policy_status(state_dir))
        .or_else(|| {
            // A state dir written before the status file existed: read the policy, once.
            state::load_applied(state_dir)
                .ok()
                .flatten()
                .map(|a| PolicyStatus {
                    keys: a.policy.key.len() as u64,
                    locked_keys: a.policy.key.iter().filter(|k| k.locked).count() as u64,
                    revision: a.revision,
                    source: a.source,
                    applied_unix: a.applied_unix,
                    ..Default::default()
                })
        });
    let daemon_alive = runtime.as_ref().is_some_and(|r| pid_is_keywall(r.pid));
    let attached = pinned_ifaces(pin_dir);
    let modes = runtime
        .as_ref()
        .map(|r| r.ifaces.clone())
        .unwrap_or_default();
    let loaded = s.flags & SETTING_LOADED != 0;
    let (keys, locked) = match (&policy, loaded) {
        (Some(p), true) => (p.keys, p.locked_keys),
        _ => (0, 0),
    };
    Ok(json!({
        "interfaces": attached.iter().map(|i| json!({
            "name": i, "attached": true, "xdp_mode": modes.get(i).cloned().unwrap_or_else(|| "unknown".into()),
        })).collect::<Vec<_>>(),
        "daemon": {"running": daemon_alive, "pid": runtime.as_ref().map(|r| r.pid)},
        "mode": if !loaded { "no-policy" } else if s.flags & SETTING_ENFORCE != 0 { "enforce" } else { "audit" },
        "revision": policy.as_ref().map(|a| a.revision),
        "source": policy.as_ref().map(|a| a.source.clone()),
        "generation": s.generation,
        "active_slot": slot,
        "keys": keys,
        "locked_keys": locked,
        "lock_reasons": policy.as_ref().map(|p| p.lock_reasons.iter().map(|(r, n)| json!({"reason": r, "keys": n})).collect::<Vec<_>>()),
        "listeners": listeners,
        "flows": flows,
        "maps": {
            "keys": {"entries": policy.as_ref().map(|p| p.fill.keys), "capacity": crate::dataplane::map_capacity(pin_dir, filter_common::maps::KEYS)},
            "flows": {"entries": flows, "capacity": crate::dataplane::map_capacity(pin_dir, filter_common::maps::FLOWS)},
        },
        "policy_error": runtime.as_ref().and_then(|r| r.policy_error.clone()),
        "etcd": crate::source::etcd::status_value(state_dir),
        "auto_locks": auto_locks_json(&crate::autolock::Overlay::load(state_dir)),
        "risk": std::fs::read(state_dir.join(crate::autolock::STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok()),
    }))
}
