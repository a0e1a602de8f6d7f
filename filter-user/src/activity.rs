//! Per-key activity read from the pinned `KW_ACTIVITY` map (issue 13): one key for
//! `key show` and `GET /v1/keys/{prefix}`, and the listings of `keywall keys idle|shared|top`
//! (`GET /v1/activity`). The map reads are `dataplane/activity.rs`'s (batched, like
//! `stats --by key`); this is what they mean (idle, shared) and how they are answered.

use anyhow::{Result, bail};
use filter_common::{KeyActivity, KeyPrefix};
use serde_json::{Value, json};

use crate::dataplane::{self, PinnedView, counters::prefix_str};
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
    Ok(dataplane::activity::key_activity(view, prefix)?.map(|a| {
        (
            Activity::from_kernel(&a, c.mono_off, c.now_mono, window_s),
            idle_since(&a, c),
        )
    }))
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
    let mut rows = Vec::new();
    dataplane::activity::for_each_key_activity(view, |k, a| rows.push((prefix_str(k), a)))?;
    Ok(rows)
}

/// Every key of the live slot as (prefix, idle seconds, networks in the window): what the
/// daemon's risk loop decides on. Two batched map walks, nothing per key beyond a row.
pub fn scan(view: &PinnedView, window_s: u64, c: &Clocks) -> Result<Vec<(String, u64, u32)>> {
    let mut rows = Vec::new();
    dataplane::activity::for_each_key_activity(view, |k, a| {
        rows.push((
            prefix_str(k),
            (c.now_unix - idle_since(&a, c)).max(0) as u64,
            risk::networks_in_window(&a.nets, c.now_mono, window_s),
        ))
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
/// `head` is the applied policy's head (its settings: the shared-key rule, idle_lock_after);
/// `keys` looks up the policy's keys for the rows answered (at most `top`), so the cost is
/// the map walk and never the policy's size.
pub fn listing(
    view: &PinnedView,
    head: Option<&Policy>,
    keys: impl FnOnce(&[String]) -> Vec<Option<Key>>,
    q: &Query,
    c: &Clocks,
) -> Result<Value> {
    if view.activity.is_none() {
        bail!(
            "the pinned program has no activity map (KW_ACTIVITY): restart keywall run with this build"
        );
    }
    let (window_s, limit) = shared_rule(head);
    let mut q = q.clone();
    if q.idle_from_policy && q.idle_for.is_none() {
        q.idle_for = Some(
            head.and_then(|p| p.settings.idle_lock_after_s())
                .unwrap_or(14 * 86_400),
        );
    }
    let q = &q;
    let mut rows = Vec::new();
    let mut total = 0usize;
    dataplane::activity::for_each_key_activity(view, |k, a| {
        total += 1;
        let idle_s = (c.now_unix - idle_since(&a, c)).max(0);
        if q.idle_for.is_some_and(|d| (idle_s as u64) < d) {
            return;
        }
        let networks = risk::networks_in_window(&a.nets, c.now_mono, window_s);
        if q.shared && networks <= limit {
            return;
        }
        rows.push(Row {
            prefix: *k,
            act: a,
            networks,
            idle_s,
        });
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
    let prefixes: Vec<String> = rows.iter().map(|r| prefix_str(&r.prefix)).collect();
    let found = keys(&prefixes);
    let keys: Vec<Value> = rows
        .iter()
        .zip(prefixes)
        .zip(
            found
                .iter()
                .map(Option::as_ref)
                .chain(std::iter::repeat(None)),
        )
        .map(|((r, prefix), key)| {
            let a = Activity::from_kernel(&r.act, c.mono_off, c.now_mono, window_s);
            let mut v = a.to_json();
            v["prefix"] = prefix.into();
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
