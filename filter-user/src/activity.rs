//! Per-key activity read from the pinned `KW_ACTIVITY` map (issue 13): one key for
//! `key show` and `GET /v1/keys/{prefix}`, and the listings of `keywall keys idle|shared|top`
//! (`GET /v1/activity`). Whole-map reads go in batches, like `stats --by key`.

use anyhow::{Result, anyhow};
use aya::maps::IterableMap as _;
use filter_common::{KEY_PRESENT, KeyActivity, KeyEntry, KeyPrefix};
use serde_json::{Value, json};

use crate::dataplane::{PinnedView, batch};
use crate::policy::{Key, Policy};
use crate::risk::{self, Activity};

/// What a listing asks for (`GET /v1/activity?idle_for=&shared=&top=`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    /// Keys with no allowed traffic for at least this many seconds.
    pub idle_for: Option<u64>,
    /// `idle_for=` left empty: the policy's `idle_lock_after`, else 14 days.
    pub idle_from_policy: bool,
    /// Keys seen from more networks than the policy's `shared_key.networks` in its window.
    pub shared: bool,
    /// At most this many rows (100 when left out).
    pub top: Option<usize>,
}

pub const DEFAULT_TOP: usize = 100;

impl Query {
    /// From a URL query string; errors name the parameter.
    pub fn parse(q: &str) -> Result<Query, String> {
        let mut out = Query::default();
        for kv in q.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = crate::source::api::percent_decode(v);
            match k {
                "idle_for" if v.is_empty() => out.idle_from_policy = true,
                "idle_for" => {
                    out.idle_for =
                        Some(risk::parse_duration(&v).map_err(|e| format!("idle_for: {e}"))?)
                }
                "shared" => {
                    out.shared = match v.as_str() {
                        "" | "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(format!("shared: {v:?} is not true or false")),
                    }
                }
                "top" => {
                    out.top = Some(
                        v.parse()
                            .map_err(|_| format!("top: {v:?} is not a number"))?,
                    )
                }
                _ => return Err(format!("unknown parameter {k:?} (idle_for, shared, top)")),
            }
        }
        Ok(out)
    }
}

/// The window and limit shared-key detection uses under a policy.
pub fn shared_rule(p: Option<&Policy>) -> (u64, u32) {
    match p.and_then(|p| p.settings.shared_key.as_ref()) {
        Some(s) => (s.window_s(), s.networks),
        None => (
            risk::DEFAULT_NETWORK_WINDOW_S,
            crate::policy::DEFAULT_SHARED_NETWORKS,
        ),
    }
}

/// Clocks read once per answer.
pub struct Clocks {
    pub now_unix: i64,
    pub now_mono: u32,
    pub mono_off: i64,
}

impl Clocks {
    pub fn now() -> Clocks {
        Clocks {
            now_unix: crate::state::now_unix() as i64,
            now_mono: risk::mono_now_s(),
            mono_off: risk::mono_to_unix_offset(),
        }
    }
}

/// One key's activity, or None when the key is not in the live slot (or the pinned object
/// has no activity map).
pub fn key_activity(
    view: &PinnedView,
    prefix: &str,
    window_s: u64,
    c: &Clocks,
) -> Result<Option<(Activity, i64)>> {
    let Some(act) = &view.activity else {
        return Ok(None);
    };
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let Ok(e) = view.keys.get(&crate::policy::key_prefix(prefix), 0) else {
        return Ok(None);
    };
    let r = e.slot[slot];
    if r.flags & KEY_PRESENT == 0 {
        return Ok(None);
    }
    let a = act.get(&r.stat_idx, 0).unwrap_or_default();
    Ok(Some((
        Activity::from_kernel(&a, c.mono_off, c.now_mono, window_s),
        idle_since(&a, c),
    )))
}

/// When a key last passed, or (never passed) when this edge's maps got it: Unix seconds.
fn idle_since(a: &KeyActivity, c: &Clocks) -> i64 {
    let s = if a.last_allowed_s != 0 {
        a.last_allowed_s
    } else {
        a.since_s
    };
    s as i64 + c.mono_off
}

/// The fields `key show --json` and `GET /v1/keys/{prefix}` carry at the top level.
pub fn key_fields(key: Option<&Key>, act: Option<&(Activity, i64)>, c: &Clocks) -> Value {
    let mut v = json!({
        "locked": key.is_some_and(|k| k.locked_at(c.now_unix)),
        "lock_reason": key.and_then(|k| k.lock_reason.clone()),
        "locked_until": key.and_then(|k| k.locked_until.clone()),
        "lock_expired": key.is_some_and(|k| k.locked && !k.locked_at(c.now_unix)),
        "last_allowed": Value::Null,
        "networks": Value::Null,
        "activity": Value::Null,
    });
    if let Some((a, since)) = act {
        v["last_allowed"] = a.last_allowed.map(risk::format_rfc3339).into();
        v["networks"] = a.networks.into();
        let mut j = a.to_json();
        j["idle_since"] = risk::format_rfc3339(*since).into();
        j["idle_s"] = (c.now_unix - since).max(0).into();
        v["activity"] = j;
    }
    v
}

/// Every key of the live slot with its raw activity entry (the edge's digest).
pub fn entries(view: &PinnedView) -> Result<Vec<(String, KeyActivity)>> {
    let Some(act_map) = &view.activity else {
        return Ok(Vec::new());
    };
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let mut acts: Vec<KeyActivity> = Vec::new();
    batch::for_each::<u32, KeyActivity>(act_map.map(), |idx, vals| {
        for (i, v) in idx.iter().zip(vals) {
            let i = *i as usize;
            if acts.len() <= i {
                acts.resize(i + 1, KeyActivity::default());
            }
            acts[i] = *v;
        }
    })?;
    let mut rows = Vec::new();
    batch::for_each::<KeyPrefix, KeyEntry>(view.keys.map(), |ks, es| {
        for (k, e) in ks.iter().zip(es) {
            let r = e.slot[slot];
            if r.flags & KEY_PRESENT == 0 {
                continue;
            }
            let a = acts.get(r.stat_idx as usize).copied().unwrap_or_default();
            rows.push((crate::dataplane::counters::prefix_str(k), a));
        }
    })?;
    Ok(rows)
}

/// Every key of the live slot as (prefix, idle seconds, networks in the window): what the
/// daemon's risk loop decides on. Two batched map walks, nothing per key beyond a row.
pub fn scan(view: &PinnedView, window_s: u64, c: &Clocks) -> Result<Vec<(String, u64, u32)>> {
    let Some(act_map) = &view.activity else {
        return Ok(Vec::new());
    };
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let mut acts: Vec<KeyActivity> = Vec::new();
    batch::for_each::<u32, KeyActivity>(act_map.map(), |idx, vals| {
        for (i, v) in idx.iter().zip(vals) {
            let i = *i as usize;
            if acts.len() <= i {
                acts.resize(i + 1, KeyActivity::default());
            }
            acts[i] = *v;
        }
    })?;
    let mut rows = Vec::new();
    batch::for_each::<KeyPrefix, KeyEntry>(view.keys.map(), |ks, es| {
        for (k, e) in ks.iter().zip(es) {
            let r = e.slot[slot];
            if r.flags & KEY_PRESENT == 0 {
                continue;
            }
            let a = acts.get(r.stat_idx as usize).copied().unwrap_or_default();
            rows.push((
                crate::dataplane::counters::prefix_str(k),
                (c.now_unix - idle_since(&a, c)).max(0) as u64,
                risk::networks_in_window(&a.nets, c.now_mono, window_s),
            ));
        }
    })?;
    Ok(rows)
}

/// One row of a listing.
struct Row {
    prefix: KeyPrefix,
    act: KeyActivity,
    networks: u32,
    idle_s: i64,
}

/// `GET /v1/activity`: the keys that match, as JSON rows with their policy's lock fields.
pub fn listing(view: &PinnedView, policy: Option<&Policy>, q: &Query, c: &Clocks) -> Result<Value> {
    let act_map = view
        .activity
        .as_ref()
        .ok_or_else(|| anyhow!("the pinned program has no activity map (KW_ACTIVITY): restart keywall run with this build"))?;
    let (window_s, limit) = shared_rule(policy);
    let mut q = q.clone();
    if q.idle_from_policy && q.idle_for.is_none() {
        q.idle_for = Some(
            policy
                .and_then(|p| p.settings.idle_lock_after_s())
                .unwrap_or(14 * 86_400),
        );
    }
    let q = &q;
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let mut acts: Vec<KeyActivity> = Vec::new();
    batch::for_each::<u32, KeyActivity>(act_map.map(), |idx, vals| {
        for (i, v) in idx.iter().zip(vals) {
            let i = *i as usize;
            if acts.len() <= i {
                acts.resize(i + 1, KeyActivity::default());
            }
            acts[i] = *v;
        }
    })?;
    let mut rows = Vec::new();
    let mut total = 0usize;
    batch::for_each::<KeyPrefix, KeyEntry>(view.keys.map(), |ks, es| {
        for (k, e) in ks.iter().zip(es) {
            let r = e.slot[slot];
            if r.flags & KEY_PRESENT == 0 {
                continue;
            }
            total += 1;
            let a = acts.get(r.stat_idx as usize).copied().unwrap_or_default();
            let idle_s = (c.now_unix - idle_since(&a, c)).max(0);
            if q.idle_for.is_some_and(|d| (idle_s as u64) < d) {
                continue;
            }
            let networks = risk::networks_in_window(&a.nets, c.now_mono, window_s);
            if q.shared && networks <= limit {
                continue;
            }
            rows.push(Row {
                prefix: *k,
                act: a,
                networks,
                idle_s,
            });
        }
    })?;
    // Idle: longest idle first; shared: most networks first; else most requests first.
    if q.idle_for.is_some() {
        rows.sort_by(|a, b| b.idle_s.cmp(&a.idle_s).then(a.prefix.cmp(&b.prefix)));
    } else if q.shared {
        rows.sort_by(|a, b| {
            b.networks
                .cmp(&a.networks)
                .then(b.act.requests.cmp(&a.act.requests))
                .then(a.prefix.cmp(&b.prefix))
        });
    } else {
        rows.sort_by(|a, b| {
            b.act
                .requests
                .cmp(&a.act.requests)
                .then(a.prefix.cmp(&b.prefix))
        });
    }
    let matched = rows.len();
    rows.truncate(q.top.unwrap_or(DEFAULT_TOP));
    let keys: Vec<Value> = rows
        .iter()
        .map(|r| {
            let prefix = crate::dataplane::counters::prefix_str(&r.prefix);
            let key = policy.and_then(|p| p.find_key(&prefix));
            let a = Activity::from_kernel(&r.act, c.mono_off, c.now_mono, window_s);
            let mut v = a.to_json();
            v["prefix"] = prefix.clone().into();
            v["idle_s"] = r.idle_s.into();
            v["locked"] = key.is_some_and(|k| k.locked_at(c.now_unix)).into();
            v["lock_reason"] = key.and_then(|k| k.lock_reason.clone()).into();
            v["locked_until"] = key.and_then(|k| k.locked_until.clone()).into();
            v
        })
        .collect();
    Ok(json!({
        "keys": keys,
        "matched": matched,
        "total": total,
        "window": risk::format_duration(window_s),
        "idle_for": q.idle_for.map(risk::format_duration),
        "networks_limit": limit,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(Query::parse(""), Ok(Query::default()));
        assert_eq!(
            Query::parse("idle_for=14d&top=5"),
            Ok(Query {
                idle_for: Some(14 * 86_400),
                top: Some(5),
                ..Default::default()
            })
        );
        assert!(Query::parse("shared").unwrap().shared);
        assert!(Query::parse("idle_for=").unwrap().idle_from_policy);
        assert!(Query::parse("shared=true").unwrap().shared);
        assert!(
            Query::parse("idle_for=soon")
                .unwrap_err()
                .starts_with("idle_for:")
        );
        assert!(Query::parse("top=-1").unwrap_err().starts_with("top:"));
        assert!(Query::parse("color=red").is_err());
    }
}
