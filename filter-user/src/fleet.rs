//! Fleet-wide risk controls (issue 13): a key is idle only if no edge has seen it, and a key
//! shared across edges is seen from the union of their networks.
//!
//! - Each edge (`keywall run --etcd`) publishes a compact digest of its `KW_ACTIVITY` under
//!   `<prefix>activity/<edge-id>` (more parts at `activity/<edge-id>/<n>`), every
//!   `--activity-every` seconds, under a lease of three periods: an edge that stops
//!   publishing drops out on its own. Edges write nothing else: the policy stays read-only
//!   to them.
//! - `keywall fleet` (the control plane, e.g. a systemd timer) reads the settings, every key
//!   and every digest, and locks idle and (with `action = "lock"`) shared keys by writing
//!   `keys/<prefix>` (a transaction on the entry's revision, so a concurrent edit wins).
//!   Keys no edge ever reported are idle from when `keywall fleet` first saw them
//!   (`<prefix>fleet/first-seen`); keys an operator unlocked after an automatic lock start
//!   again from then (`<prefix>fleet/auto-locks`). `--dry-run` prints what it would lock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::policy::{Key, Settings, SharedAction};

pub const ACTIVITY_DIR: &str = "activity/";
pub const FIRST_SEEN: &str = "fleet/first-seen";
/// The locks `keywall fleet` made, and the keys an operator unlocked after one (the same
/// shape as a single host's `auto-locks.json`): an unlocked key gets a fresh idle period, and
/// a shared key an operator unlocked is reported, not locked again.
pub const AUTO_LOCKS: &str = "fleet/auto-locks";
/// Keys per digest value (a part stays far below etcd's 1.5 MiB request limit).
pub const PART_KEYS: usize = 5000;
/// Networks older than this are left out of digests (the longest `shared_key.window`).
const NET_HORIZON_MIN: i64 = crate::policy::MAX_SHARED_WINDOW_S as i64 / 60;

/// Entries under the prefix that are not policy: the edges' digests and `keywall fleet`'s
/// own records.
pub fn not_policy(name: &str) -> bool {
    name.starts_with(ACTIVITY_DIR) || name.starts_with("fleet/")
}

/// What one edge saw of one key. Times are Unix seconds (0: never); networks are
/// (fingerprint, Unix minute last seen), so edges' clocks meet on the wall clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDigest {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub a: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub r: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub n: Vec<(u16, i64)>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One digest value (`activity/<edge-id>[/<part>]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Format version (1).
    pub v: u32,
    pub edge: String,
    /// When it was made (Unix seconds).
    pub at: i64,
    pub part: u32,
    pub parts: u32,
    pub keys: BTreeMap<String, KeyDigest>,
}

impl KeyDigest {
    /// From a key's activity entry; None for a key this edge never judged.
    pub fn from_kernel(
        a: &filter_common::KeyActivity,
        c: &crate::activity::Clocks,
    ) -> Option<KeyDigest> {
        if a.requests == 0 {
            return None;
        }
        let wall = |s: u32| if s == 0 { 0 } else { s as i64 + c.mono_off };
        let now_min = (c.now_mono / 60) & 0xffff;
        let now_unix_min = c.now_unix / 60;
        let mut n: Vec<(u16, i64)> = Vec::new();
        for &v in &a.nets {
            if v == 0 {
                continue;
            }
            let age = (now_min.wrapping_sub(v & 0xffff) & 0xffff) as i64;
            if age <= NET_HORIZON_MIN {
                n.push(((v >> 16) as u16, now_unix_min - age));
            }
        }
        Some(KeyDigest {
            a: wall(a.last_allowed_s),
            r: wall(a.last_refused_s),
            n,
        })
    }
}

/// The digests of one edge, in parts of `PART_KEYS` keys (at least one, so an edge that saw
/// nothing still says it is alive).
pub fn digests(edge: &str, at: i64, keys: BTreeMap<String, KeyDigest>) -> Vec<Digest> {
    let all: Vec<(String, KeyDigest)> = keys.into_iter().collect();
    let chunks: Vec<&[(String, KeyDigest)]> = if all.is_empty() {
        vec![&[]]
    } else {
        all.chunks(PART_KEYS).collect()
    };
    let parts = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| Digest {
            v: 1,
            edge: edge.to_owned(),
            at,
            part: i as u32,
            parts,
            keys: c.iter().cloned().collect(),
        })
        .collect()
}

/// The etcd name of a part (under the prefix).
pub fn part_name(edge: &str, part: u32) -> String {
    if part == 0 {
        format!("{ACTIVITY_DIR}{edge}")
    } else {
        format!("{ACTIVITY_DIR}{edge}/{part}")
    }
}

/// An edge id: what `--edge-id` accepts (it names an etcd key).
pub fn check_edge_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        anyhow::bail!("--edge-id {id:?}: use 1 to 64 of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

/// What every edge saw of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub last_allowed: i64,
    pub last_refused: i64,
    /// fingerprint -> latest Unix minute, over every edge.
    pub nets: BTreeMap<u16, i64>,
    pub edges: BTreeSet<String>,
}

pub fn merge(ds: &[Digest]) -> BTreeMap<String, Merged> {
    let mut out: BTreeMap<String, Merged> = BTreeMap::new();
    for d in ds {
        for (k, kd) in &d.keys {
            let m = out.entry(k.clone()).or_default();
            m.last_allowed = m.last_allowed.max(kd.a);
            m.last_refused = m.last_refused.max(kd.r);
            for &(fp, min) in &kd.n {
                let e = m.nets.entry(fp).or_insert(min);
                *e = (*e).max(min);
            }
            m.edges.insert(d.edge.clone());
        }
    }
    out
}

/// One thing `keywall fleet` does or reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Action {
    pub prefix: String,
    /// `lock` or `suspect` (shared, reported only).
    pub action: &'static str,
    pub reason: &'static str,
    /// Seconds without allowed traffic on any edge (idle), or networks in the window (shared).
    pub idle_s: Option<i64>,
    pub networks: Option<u32>,
    pub edges: Vec<String>,
}

/// The plan: what to lock and what to report, and the first-seen records to keep (keys no
/// edge reported). `keys` are the unlocked keys of the policy; pure, so it is tested alone.
pub fn plan(
    settings: &Settings,
    keys: &BTreeMap<String, Key>,
    merged: &BTreeMap<String, Merged>,
    first_seen: &BTreeMap<String, i64>,
    cleared: &BTreeMap<String, i64>,
    now: i64,
) -> (Vec<Action>, BTreeMap<String, i64>) {
    let idle = settings.idle_lock_after_s().map(|d| d as i64);
    let shared = settings.shared_key.as_ref().map(|s| {
        (
            s.networks,
            s.window_s() as i64 / 60,
            s.action == SharedAction::Lock,
        )
    });
    let mut actions = Vec::new();
    let mut seen = BTreeMap::new();
    for (prefix, k) in keys {
        if k.locked_at(now) {
            continue;
        }
        let m = merged.get(prefix);
        let since = match m.map(|m| m.last_allowed).filter(|a| *a > 0) {
            Some(a) => a,
            None => {
                let t = first_seen.get(prefix).copied().unwrap_or(now);
                seen.insert(prefix.clone(), t);
                t
            }
        };
        // An operator's unlock starts the idle period again.
        let unlocked = cleared.get(prefix).copied();
        let since = unlocked.map_or(since, |c| since.max(c));
        let edges = m
            .map(|m| m.edges.iter().cloned().collect())
            .unwrap_or_default();
        if let Some(d) = idle
            && now - since >= d
        {
            actions.push(Action {
                prefix: prefix.clone(),
                action: "lock",
                reason: "idle",
                idle_s: Some(now - since),
                networks: None,
                edges,
            });
            continue;
        }
        if let (Some((limit, win_min, lock)), Some(m)) = (shared, m) {
            let n = m
                .nets
                .values()
                .filter(|min| now / 60 - **min <= win_min)
                .count() as u32;
            if n > limit {
                actions.push(Action {
                    prefix: prefix.clone(),
                    action: if lock && unlocked.is_none() {
                        "lock"
                    } else {
                        "suspect"
                    },
                    reason: "shared",
                    idle_s: None,
                    networks: Some(n),
                    edges,
                });
            }
        }
    }
    (actions, seen)
}

// ---------------------------------------------------------------------------------------------
// The edge's publisher

/// Publishes this edge's digest every `every`, under a lease of three periods. Runs on a
/// thread of its own; errors are logged and retried at the next period.
pub fn spawn_publisher(
    cfg: crate::source::etcd::EtcdConfig,
    edge: String,
    every: Duration,
    shared: std::sync::Arc<crate::source::Shared>,
) -> Result<()> {
    let pin_dir = shared.pin_dir.clone();
    std::thread::Builder::new()
        .name("keywall-activity".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("activity digests cannot start their runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let mut client = None;
                let mut lease: Option<i64> = None;
                loop {
                    // Only while the fleet's settings ask for risk controls: otherwise the
                    // edges write nothing at all to etcd.
                    let wanted = shared
                        .engine
                        .lock()
                        .unwrap()
                        .applied
                        .as_ref()
                        .is_some_and(|a| {
                            a.head.settings.idle_lock_after.is_some()
                                || a.head.settings.shared_key.is_some()
                        });
                    if !wanted {
                        tokio::time::sleep(every).await;
                        continue;
                    }
                    match publish(&cfg, &edge, every, &pin_dir, &mut client, &mut lease).await {
                        Ok(n) => log::debug!("activity digest of {n} keys published"),
                        Err(e) => {
                            log::warn!("activity digest: {e:#}");
                            client = None;
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            });
        })?;
    Ok(())
}

async fn publish(
    cfg: &crate::source::etcd::EtcdConfig,
    edge: &str,
    every: Duration,
    pin_dir: &std::path::Path,
    client: &mut Option<etcd_client::Client>,
    lease: &mut Option<i64>,
) -> Result<usize> {
    use etcd_client::PutOptions;
    let view = crate::dataplane::PinnedView::open(pin_dir)?;
    let c = crate::activity::Clocks::now();
    let keys: BTreeMap<String, KeyDigest> = crate::activity::entries(&view)?
        .into_iter()
        .filter_map(|(p, a)| KeyDigest::from_kernel(&a, &c).map(|d| (p, d)))
        .collect();
    let n = keys.len();
    let parts = digests(edge, c.now_unix, keys);
    if client.is_none() {
        *client = Some(
            tokio::time::timeout(Duration::from_secs(10), crate::source::etcd::connect(cfg))
                .await
                .map_err(|_| anyhow!("connecting timed out"))??,
        );
    }
    let cl = client.as_mut().expect("connected");
    let ttl = (every.as_secs() * 3).max(10) as i64;
    let granted = cl
        .lease_grant(ttl, None)
        .await
        .context("granting a lease")?;
    let id = granted.id();
    for d in &parts {
        let name = format!("{}{}", cfg.prefix, part_name(edge, d.part));
        cl.put(
            name,
            serde_json::to_vec(d)?,
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .context("writing the digest")?;
    }
    // The previous lease takes the previous parts with it (also those past today's count).
    if let Some(old) = lease.replace(id) {
        let _ = cl.lease_revoke(old).await;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// `keywall fleet`

/// `keywall fleet [--dry-run] [--json]`: returns the exit code.
pub fn run(cfg: crate::source::etcd::EtcdConfig, dry_run: bool, as_json: bool) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cfg, dry_run, as_json))
}

async fn get_prefix(
    cl: &mut etcd_client::Client,
    from: &str,
) -> Result<Vec<(String, Vec<u8>, i64)>> {
    use etcd_client::GetOptions;
    let mut kv = cl
        .kv_client()
        .max_decoding_message_size(crate::source::etcd::MAX_MESSAGE);
    let end = crate::source::etcd::prefix_end(from.as_bytes());
    let mut start = from.as_bytes().to_vec();
    let mut rev = 0i64;
    let mut out = Vec::new();
    loop {
        let mut o = GetOptions::new().with_range(end.clone()).with_limit(5000);
        if rev > 0 {
            o = o.with_revision(rev);
        }
        let mut page = kv.get(start.clone(), Some(o)).await?;
        if rev == 0 {
            rev = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let items = page.take_kvs();
        let Some(last) = items.last() else { break };
        start = last.key().to_vec();
        start.push(0);
        for kv in &items {
            if let Ok(k) = std::str::from_utf8(kv.key()) {
                out.push((k.to_owned(), kv.value().to_vec(), kv.mod_revision()));
            }
        }
        if !more {
            break;
        }
    }
    Ok(out)
}

async fn run_async(
    cfg: crate::source::etcd::EtcdConfig,
    dry_run: bool,
    as_json: bool,
) -> Result<u8> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let mut cl = tokio::time::timeout(Duration::from_secs(10), crate::source::etcd::connect(&cfg))
        .await
        .map_err(|_| anyhow!("connecting to etcd timed out"))??;
    let p = &cfg.prefix;
    let settings = match get_prefix(&mut cl, &format!("{p}settings"))
        .await?
        .into_iter()
        .find(|(k, _, _)| *k == format!("{p}settings"))
    {
        Some((_, v, _)) => {
            serde_json::from_slice::<crate::source::etcd::SettingsDoc>(&v)
                .map_err(|e| anyhow!("{p}settings: {e}"))?
                .settings
        }
        None => Settings::default(),
    };
    if settings.idle_lock_after.is_none() && settings.shared_key.is_none() {
        eprintln!(
            "keywall fleet: nothing to do: {p}settings sets neither idle_lock_after nor shared_key"
        );
        return Ok(0);
    }
    let mut keys = BTreeMap::new();
    let mut revs = BTreeMap::new();
    let mut raw = BTreeMap::new();
    for (k, v, rev) in get_prefix(&mut cl, &format!("{p}keys/")).await? {
        let name = k[p.len() + "keys/".len()..].to_owned();
        // An entry that does not parse is the daemons' business (they refuse it): skip it.
        let Ok(mut key) = serde_json::from_slice::<Key>(&v).or_else(|_| {
            let mut o: serde_json::Map<String, Value> = serde_json::from_slice(&v)?;
            o.insert("prefix".into(), name.clone().into());
            serde_json::from_value::<Key>(Value::Object(o))
        }) else {
            continue;
        };
        key.prefix = name.clone();
        revs.insert(name.clone(), rev);
        raw.insert(name.clone(), v);
        keys.insert(name, key);
    }
    let mut ds = Vec::new();
    for (k, v, _) in get_prefix(&mut cl, &format!("{p}{ACTIVITY_DIR}")).await? {
        match serde_json::from_slice::<Digest>(&v) {
            Ok(d) => ds.push(d),
            Err(e) => eprintln!("keywall fleet: ignoring {k}: {e}"),
        }
    }
    let edges: BTreeSet<String> = ds.iter().map(|d| d.edge.clone()).collect();
    let first_seen: BTreeMap<String, i64> = match get_prefix(&mut cl, &format!("{p}{FIRST_SEEN}"))
        .await?
        .into_iter()
        .next()
    {
        Some((_, v, _)) => serde_json::from_slice(&v).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let now = crate::state::now_unix() as i64;
    let mut auto: crate::autolock::Overlay = match get_prefix(&mut cl, &format!("{p}{AUTO_LOCKS}"))
        .await?
        .into_iter()
        .next()
    {
        Some((_, v, _)) => serde_json::from_slice(&v).unwrap_or_default(),
        None => Default::default(),
    };
    let auto_before = auto.clone();
    // A key this command locked that is unlocked now was unlocked by an operator.
    auto.reconcile(|k| keys.get(k).cloned(), now);
    let merged = merge(&ds);
    let (actions, seen) = plan(&settings, &keys, &merged, &first_seen, &auto.cleared, now);
    let mut results = Vec::new();
    for a in &actions {
        let mut outcome = if a.action != "lock" {
            "reported"
        } else if dry_run {
            "would lock"
        } else {
            "locked"
        };
        if a.action == "lock" && !dry_run {
            // Only the lock fields change; the rest of the entry is kept as written.
            let mut o: serde_json::Map<String, Value> =
                serde_json::from_slice(&raw[&a.prefix]).unwrap_or_default();
            o.insert("locked".into(), true.into());
            o.insert("lock_reason".into(), a.reason.into());
            o.remove("locked_until");
            let name = format!("{p}keys/{}", a.prefix);
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    name.clone(),
                    CompareOp::Equal,
                    revs[&a.prefix],
                )])
                .and_then(vec![TxnOp::put(name, serde_json::to_vec(&o)?, None)]);
            if cl.txn(txn).await?.succeeded() {
                auto.locks.insert(
                    a.prefix.clone(),
                    crate::autolock::AutoLock {
                        reason: a.reason.to_owned(),
                        at: now,
                    },
                );
                auto.cleared.remove(&a.prefix);
            } else {
                outcome = "changed meanwhile: skipped";
            }
        }
        results.push((a, outcome));
    }
    if !dry_run && auto != auto_before {
        cl.put(format!("{p}{AUTO_LOCKS}"), serde_json::to_vec(&auto)?, None)
            .await
            .context("writing fleet/auto-locks")?;
    }
    if !dry_run && seen != first_seen {
        cl.put(format!("{p}{FIRST_SEEN}"), serde_json::to_vec(&seen)?, None)
            .await
            .context("writing fleet/first-seen")?;
    }
    if as_json {
        let v = json!({
            "dry_run": dry_run,
            "edges": edges,
            "keys": keys.len(),
            "actions": results.iter().map(|(a, o)| {
                let mut v = serde_json::to_value(a).unwrap_or_default();
                v["outcome"] = (*o).into();
                v
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} keys, digests from {} edges ({}){}",
            keys.len(),
            edges.len(),
            edges.iter().cloned().collect::<Vec<_>>().join(", "),
            if dry_run {
                "; dry run: nothing written"
            } else {
                ""
            }
        );
        for (a, o) in &results {
            let why = match (a.idle_s, a.networks) {
                (Some(s), _) => format!(
                    "no allowed traffic on any edge for {}",
                    crate::risk::format_duration(s.max(0) as u64)
                ),
                (_, Some(n)) => format!("used from {n} networks across {}", a.edges.join(", ")),
                _ => String::new(),
            };
            println!("{o:<12} {:<16} {:<7} {why}", a.prefix, a.reason);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str) -> Key {
        serde_json::from_value(json!({"prefix": prefix})).unwrap()
    }

    #[test]
    fn digest_wire_format_round_trips_and_splits() {
        let mut keys = BTreeMap::new();
        keys.insert(
            "aaaaaaaa".to_owned(),
            KeyDigest {
                a: 1_796_000_000,
                r: 0,
                n: vec![(0x1234, 29_933_333)],
            },
        );
        let d = digests("edge-1", 1_796_000_100, keys.clone());
        assert_eq!(d.len(), 1);
        let j = serde_json::to_string(&d[0]).unwrap();
        assert_eq!(
            j,
            r#"{"v":1,"edge":"edge-1","at":1796000100,"part":0,"parts":1,"keys":{"aaaaaaaa":{"a":1796000000,"n":[[4660,29933333]]}}}"#
        );
        assert_eq!(serde_json::from_str::<Digest>(&j).unwrap(), d[0]);
        let many: BTreeMap<String, KeyDigest> = (0..PART_KEYS + 1)
            .map(|i| (format!("k{i:07}"), KeyDigest::default()))
            .collect();
        let d = digests("e", 0, many);
        assert_eq!(
            (d.len(), d[1].part, d[1].parts, d[1].keys.len()),
            (2, 1, 2, 1)
        );
        assert_eq!(
            digests("e", 0, BTreeMap::new()).len(),
            1,
            "an empty edge still reports"
        );
        assert_eq!(part_name("e", 0), "activity/e");
        assert_eq!(part_name("e", 2), "activity/e/2");
        assert!(not_policy("activity/e/2") && not_policy("fleet/first-seen"));
        assert!(!not_policy("keys/activity"));
        assert!(check_edge_id("edge-1.dc2").is_ok());
        assert!(check_edge_id("a/b").is_err());
    }

    #[test]
    fn kernel_activity_becomes_wall_time() {
        let c = crate::activity::Clocks {
            now_unix: 1_796_000_000,
            now_mono: 6000,
            mono_off: 1_795_994_000,
        };
        let mut a = filter_common::KeyActivity::default();
        assert_eq!(
            KeyDigest::from_kernel(&a, &c),
            None,
            "never judged: not reported"
        );
        a.requests = 3;
        a.last_allowed_s = 5990;
        a.nets[0] = 0xabcd << 16 | 98; // two minutes ago (now is minute 100)
        let d = KeyDigest::from_kernel(&a, &c).unwrap();
        assert_eq!(d.a, 1_795_999_990);
        assert_eq!(d.r, 0);
        assert_eq!(d.n, vec![(0xabcd, 1_796_000_000 / 60 - 2)]);
    }

    #[test]
    fn the_fleet_plan() {
        let now = 1_796_000_000;
        let day = 86_400;
        let settings: Settings = serde_json::from_value(json!({
            "idle_lock_after": "14d",
            "shared_key": {"networks": 3, "window": "1h", "action": "alert"}
        }))
        .unwrap();
        let mut keys = BTreeMap::new();
        for p in ["active01", "idle0001", "never001", "shared01", "locked01"] {
            keys.insert(p.to_owned(), key(p));
        }
        keys.get_mut("locked01").unwrap().locked = true;
        let d = |edge: &str, k: &str, a: i64, n: Vec<(u16, i64)>| Digest {
            v: 1,
            edge: edge.into(),
            at: now,
            part: 0,
            parts: 1,
            keys: [(k.to_owned(), KeyDigest { a, r: 0, n })].into(),
        };
        let m = now / 60;
        let ds = vec![
            // Idle on edge 1, used an hour ago on edge 2: alive.
            d("e1", "active01", now - 30 * day, vec![]),
            d("e2", "active01", now - 3600, vec![]),
            d("e1", "idle0001", now - 15 * day, vec![]),
            // Two networks on each of two edges, plus one stale: four in the window.
            d("e1", "shared01", now, vec![(1, m), (2, m - 10)]),
            d(
                "e2",
                "shared01",
                now,
                vec![(3, m), (4, m - 59), (5, m - 600)],
            ),
            d("e1", "locked01", now - 30 * day, vec![]),
        ];
        let merged = merge(&ds);
        assert_eq!(merged["active01"].edges.len(), 2);
        let mut first = BTreeMap::new();
        first.insert("never001".to_owned(), now - 20 * day);
        let (acts, seen) = plan(&settings, &keys, &merged, &first, &BTreeMap::new(), now);
        let got: Vec<(&str, &str, &str)> = acts
            .iter()
            .map(|a| (a.prefix.as_str(), a.action, a.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("idle0001", "lock", "idle"),
                ("never001", "lock", "idle"),
                ("shared01", "suspect", "shared"),
            ]
        );
        assert_eq!(acts[2].networks, Some(4));
        assert_eq!(seen.get("never001"), Some(&(now - 20 * day)));
        // A key no edge reported and no run saw before starts its idle time now.
        let (acts, seen) = plan(
            &settings,
            &keys,
            &merged,
            &BTreeMap::new(),
            &BTreeMap::new(),
            now,
        );
        assert!(!acts.iter().any(|a| a.prefix == "never001"));
        assert_eq!(seen.get("never001"), Some(&now));
        // Unlocked by an operator an hour ago: idle again only 14 days after that.
        let cleared: BTreeMap<String, i64> = [("idle0001".to_owned(), now - 3600)].into();
        let (acts, _) = plan(&settings, &keys, &merged, &first, &cleared, now);
        assert!(!acts.iter().any(|a| a.prefix == "idle0001"), "{acts:?}");
        // A shared key an operator unlocked is reported, not locked again.
        let mut locking = settings.clone();
        locking.shared_key.as_mut().unwrap().action = SharedAction::Lock;
        let (acts, _) = plan(&locking, &keys, &merged, &first, &BTreeMap::new(), now);
        assert_eq!(
            acts.iter().find(|a| a.prefix == "shared01").unwrap().action,
            "lock"
        );
        let cleared: BTreeMap<String, i64> = [("shared01".to_owned(), now - 60)].into();
        let (acts, _) = plan(&locking, &keys, &merged, &first, &cleared, now);
        assert_eq!(
            acts.iter().find(|a| a.prefix == "shared01").unwrap().action,
            "suspect"
        );
    }
}
