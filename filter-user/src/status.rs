//! `keywall status`: a short answer to "is it enforcing, and what?".

use std::path::Path;

use anyhow::Result;
use filter_common::{KEY_LOCKED, KEY_PRESENT, SETTING_ENFORCE, SETTING_LOADED};
use serde_json::{Value, json};

use crate::{
    dataplane::{PinnedView, pinned_ifaces},
    state,
};

/// A pinned map's capacity, from the kernel's own map info.
pub fn capacity(pin_dir: &Path, name: &str) -> Option<u32> {
    let d = aya::maps::MapData::from_pin(pin_dir.join(name)).ok()?;
    d.info().ok().map(|i| i.max_entries())
}

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

pub fn status_json(pin_dir: &Path, state_dir: &Path) -> Result<Value> {
    let view = PinnedView::open(pin_dir)?;
    let ctl = view.control.get(&0, 0)?;
    let slot = ctl.active_slot & 1;
    let s = view.settings.get(&slot, 0)?;
    let (mut keys, mut locked) = (0u64, 0u64);
    for kv in view.keys.iter() {
        let (_, e) = kv?;
        let r = e.slot[slot as usize];
        if r.flags & KEY_PRESENT != 0 {
            keys += 1;
            if r.flags & KEY_LOCKED != 0 {
                locked += 1;
            }
        }
    }
    let flows = view.flows.keys().count();
    let listeners = (1..=filter_common::MAX_LISTENERS as u16)
        .filter(|n| {
            view.listeners
                .get(&filter_common::listener_slot(slot, *n), 0)
                .is_ok_and(|l| l.locator != 0)
        })
        .count();
    let runtime = state::load_runtime(state_dir);
    let applied = state::load_applied(state_dir).ok().flatten();
    let daemon_alive = runtime.as_ref().is_some_and(|r| pid_is_keywall(r.pid));
    let attached = pinned_ifaces(pin_dir);
    let modes = runtime
        .as_ref()
        .map(|r| r.ifaces.clone())
        .unwrap_or_default();
    Ok(json!({
        "interfaces": attached.iter().map(|i| json!({
            "name": i, "attached": true, "xdp_mode": modes.get(i).cloned().unwrap_or_else(|| "unknown".into()),
        })).collect::<Vec<_>>(),
        "daemon": {"running": daemon_alive, "pid": runtime.as_ref().map(|r| r.pid)},
        "mode": if s.flags & SETTING_LOADED == 0 { "no-policy" } else if s.flags & SETTING_ENFORCE != 0 { "enforce" } else { "audit" },
        "revision": applied.as_ref().map(|a| a.revision),
        "source": applied.as_ref().map(|a| a.source.clone()),
        "generation": s.generation,
        "active_slot": slot,
        "keys": keys,
        "locked_keys": locked,
        "listeners": listeners,
        "flows": flows,
        "maps": {
            "keys": {"entries": view.keys.keys().count(), "capacity": capacity(pin_dir, filter_common::maps::KEYS)},
            "flows": {"entries": flows, "capacity": capacity(pin_dir, filter_common::maps::FLOWS)},
        },
        "policy_error": runtime.as_ref().and_then(|r| r.policy_error.clone()),
        "etcd": crate::etcd::status_value(state_dir),
    }))
}

pub fn print(pin_dir: &Path, state_dir: &Path, json: bool) -> Result<()> {
    let v = status_json(pin_dir, state_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let ifs: Vec<String> = v["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            format!(
                "{} ({})",
                i["name"].as_str().unwrap_or("?"),
                i["xdp_mode"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "attached:   {}",
        if ifs.is_empty() {
            "nothing".into()
        } else {
            ifs.join(", ")
        }
    );
    println!(
        "daemon:     {}",
        if v["daemon"]["running"].as_bool() == Some(true) {
            "running"
        } else {
            "not running (XDP keeps enforcing the last policy)"
        }
    );
    println!("mode:       {}", v["mode"].as_str().unwrap_or("?"));
    println!(
        "policy:     revision {} from {} (generation {})",
        v["revision"],
        v["source"].as_str().unwrap_or("-"),
        v["generation"]
    );
    println!(
        "keys:       {} ({} locked), {} listeners",
        v["keys"], v["locked_keys"], v["listeners"]
    );
    println!(
        "flows:      {} / {}",
        v["flows"], v["maps"]["flows"]["capacity"]
    );
    println!(
        "key map:    {} / {}",
        v["maps"]["keys"]["entries"], v["maps"]["keys"]["capacity"]
    );
    crate::etcd::print_status(&v["etcd"]);
    if let Some(e) = v["policy_error"].as_str() {
        println!("last error: {e}");
    }
    Ok(())
}
