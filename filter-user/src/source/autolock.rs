//! The daemon's risk loop (issue 13): it looks at `KW_ACTIVITY` every few seconds and makes
//! the automatic locks `crate::autolock` decides, through the engine like any other writer.

use std::collections::BTreeMap;

use crate::autolock::{AutoLock, Decision, FILE, Overlay, RiskStatus, STATUS_FILE, decide};

/// How often the loop looks: `KEYWALL_RISK_SECS`, else half of `idle_lock_after` within 1 to
/// 10 seconds.
pub fn interval(idle_lock_after: Option<u64>) -> std::time::Duration {
    let secs = std::env::var("KEYWALL_RISK_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| idle_lock_after.map_or(10, |d| (d / 2).clamp(1, 10)));
    std::time::Duration::from_secs(secs.max(1))
}

/// The daemon's risk loop: runs until `stop`.
pub fn run(sh: std::sync::Arc<crate::source::Shared>, stop: &std::sync::atomic::AtomicBool) {
    use crate::source::Source;
    use std::sync::atomic::Ordering;
    let mut alerted: BTreeMap<String, i64> = BTreeMap::new();
    let mut view = None;
    while !stop.load(Ordering::Relaxed) {
        let settings = {
            let eng = sh.engine.lock().unwrap();
            eng.applied.as_ref().map(|a| a.head.settings.clone())
        };
        let idle = settings.as_ref().and_then(|s| s.idle_lock_after_s());
        let shared_rule = settings.as_ref().and_then(|s| s.shared_key.clone());
        std::thread::sleep(interval(idle));
        {
            let mut eng = sh.engine.lock().unwrap();
            let eng = &mut *eng;
            match eng.mirror.follow_tai_offset(&mut eng.dp.maps) {
                Ok(Some((old, new, n))) => log::warn!(
                    "the kernel's TAI offset moved from {old} s to {new} s: {n} lock expiries rewritten to stay on the wall clock"
                ),
                Ok(None) => {}
                Err(e) => log::error!("rewriting lock expiries for the TAI offset: {e:#}"),
            }
        }
        if idle.is_none() && shared_rule.is_none() {
            sh.metrics.shared_suspect.set(0);
            continue;
        }
        if view.is_none() {
            view = crate::dataplane::PinnedView::open(&sh.pin_dir).ok();
        }
        let Some(v) = &view else { continue };
        let window_s = shared_rule
            .as_ref()
            .map_or(crate::risk::DEFAULT_NETWORK_WINDOW_S, |s| s.window_s());
        let c = crate::activity::Clocks::now();
        let rows = match crate::activity::scan(v, window_s, &c) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("risk: reading activity: {e:#}");
                continue;
            }
        };
        let shared = shared_rule
            .as_ref()
            .map(|s| (s.networks, s.action == crate::policy::SharedAction::Lock));
        // Only keys some rule may act on are looked up under the engine lock (a million keys
        // must not hold writers up).
        let rows: Vec<(String, u64, u32)> = rows
            .into_iter()
            .filter(|(_, idle_s, n)| {
                idle.is_some_and(|d| *idle_s >= d) || shared.is_some_and(|(l, _)| *n > l)
            })
            .collect();
        // Edges under etcd lock nothing: `keywall fleet` decides for the fleet.
        let may_lock = !matches!(sh.source, Source::Etcd(_));
        let mut ops = Vec::new();
        let mut suspects = Vec::new();
        let mut new_alerts = Vec::new();
        let mut overlay = sh.overlay.lock().unwrap();
        let mut eng = sh.engine.lock().unwrap();
        let mut changed = overlay.reconcile(|p| eng.key(p), c.now_unix);
        for (prefix, idle_s, networks) in &rows {
            let Some(k) = eng.key(prefix) else { continue };
            let since_clear = overlay
                .cleared
                .get(prefix)
                .map(|t| (c.now_unix - t).max(0) as u64);
            let d = decide(
                idle,
                shared,
                *idle_s,
                *networks,
                since_clear,
                k.locked_at(c.now_unix),
            );
            if shared.is_some_and(|(limit, _)| *networks > limit) {
                suspects.push(prefix.clone());
                // One event per key per window.
                let last = alerted.get(prefix).copied().unwrap_or(i64::MIN);
                if c.now_unix.saturating_sub(last) >= window_s as i64 {
                    alerted.insert(prefix.clone(), c.now_unix);
                    new_alerts.push((prefix.clone(), *networks, d));
                }
            }
            if let Decision::Lock(reason) = d
                && may_lock
            {
                ops.push((prefix.clone(), reason));
            }
        }
        if !ops.is_empty() {
            let source = match &sh.source {
                Source::File(p) => format!("file:{}", p.display()),
                _ => "risk".to_owned(),
            };
            let change = crate::engine::Change::Ops(
                ops.iter().map(|(p, r)| Overlay::lock_op(p, r)).collect(),
            );
            match eng.submit(change, crate::engine::Rev::Next, &source) {
                Ok(r) => {
                    for (p, reason) in &ops {
                        log::warn!("risk: locked {p} ({reason})");
                        overlay.locks.insert(
                            p.clone(),
                            AutoLock {
                                reason: (*reason).to_owned(),
                                at: c.now_unix,
                            },
                        );
                        overlay.cleared.remove(p);
                        let _ = sh.events.send(crate::events::EventRecord::risk(
                            if *reason == "idle" {
                                "idle_lock"
                            } else {
                                "shared_lock"
                            },
                            p,
                            reason,
                            None,
                        ));
                    }
                    changed = true;
                    if let crate::engine::Submitted::Applied { revision, .. } = r {
                        log::info!("risk: {} automatic locks at revision {revision}", ops.len());
                    }
                }
                Err(e) => log::error!(
                    "risk: automatic locks refused: {}",
                    match e {
                        crate::engine::Refused::Conflict { why, .. } => why,
                        crate::engine::Refused::Invalid(errs) => errs
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                        crate::engine::Refused::Failed(e) => format!("{e:#}"),
                    }
                ),
            }
        }
        drop(eng);
        if changed && let Err(e) = overlay.save(&sh.state_dir) {
            log::error!("risk: saving {FILE}: {e:#}");
        }
        drop(overlay);
        if changed {
            sh.after_write();
        }
        for (p, n, d) in new_alerts {
            if d != Decision::Lock("shared") {
                log::warn!(
                    "risk: key {p} used from {n} networks within {}",
                    crate::risk::format_duration(window_s)
                );
                let _ = sh.events.send(crate::events::EventRecord::risk(
                    "shared_key",
                    &p,
                    "shared",
                    Some(n),
                ));
            }
        }
        alerted.retain(|p, _| suspects.contains(p));
        sh.metrics.shared_suspect.set(suspects.len() as i64);
        let st = RiskStatus {
            checked_unix: c.now_unix,
            shared_suspect_count: suspects.len() as u64,
            shared_suspects: suspects.into_iter().take(100).collect(),
        };
        if let Ok(b) = serde_json::to_vec(&st) {
            let _ = crate::state::write_atomic(&sh.state_dir.join(STATUS_FILE), &b);
        }
    }
}
