//! Automatic locks on a single host (issue 13): `idle_lock_after` and `shared_key` with
//! `action = "lock"`. The daemon looks at `KW_ACTIVITY` every few seconds and locks keys
//! through the engine, like any write.
//!
//! The locks it made are kept in an overlay persisted in the state dir
//! (`auto-locks.json`), whatever the policy source:
//! - with the API as the source, the lock is an ordinary policy write (source `risk`); the
//!   overlay only remembers that the daemon made it, so that `keywall key unlock` is seen
//!   and the key gets a fresh idle period instead of being locked again at once;
//! - with a policy file as the source, the file stays the truth for everything it says: the
//!   overlay is laid over it on every load (a key the file leaves unlocked is locked with
//!   the overlay's reason), so reloading the file never undoes an automatic lock and an
//!   automatic lock never rewrites the file. `keywall key unlock` removes a key from the
//!   overlay (the one write the API takes under a file source);
//! - with etcd as the source, edges keep a read-only role: they lock nothing (fleet-wide
//!   decisions belong to the control plane).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::policy::{Key, PatchOp, Policy};

pub const FILE: &str = "auto-locks.json";

/// One automatic lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoLock {
    /// `idle` or `shared`.
    pub reason: String,
    /// When it was made (Unix seconds).
    pub at: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// Keys the daemon locked and that stay locked.
    #[serde(default)]
    pub locks: BTreeMap<String, AutoLock>,
    /// Keys an operator unlocked after an automatic lock, and when (Unix seconds): their
    /// idle time and shared window start again from then.
    #[serde(default)]
    pub cleared: BTreeMap<String, i64>,
}

impl Overlay {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    pub fn load(state_dir: &Path) -> Overlay {
        std::fs::read(Self::path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, state_dir: &Path) -> Result<()> {
        crate::state::write_atomic(&Self::path(state_dir), &serde_json::to_vec_pretty(self)?)
    }

    /// Lays the automatic locks over a policy the file source read: a key the policy leaves
    /// unlocked is locked with the overlay's reason. Keys the policy locks itself keep its
    /// lock (and reason).
    pub fn apply(&self, p: &mut Policy) {
        if self.locks.is_empty() {
            return;
        }
        for k in &mut p.key {
            if let Some(a) = self.locks.get(&k.prefix)
                && !k.locked
            {
                k.set_lock(true, Some(&a.reason), None);
            }
        }
    }

    /// The op that makes an automatic lock.
    pub fn lock_op(prefix: &str, reason: &str) -> PatchOp {
        PatchOp::Lock {
            prefix: prefix.to_owned(),
            lock_reason: Some(reason.to_owned()),
            locked_until: None,
        }
    }

    /// Brings the overlay in line with the applied policy: a key no longer in it is
    /// forgotten, and a key the overlay locked that is no longer locked was unlocked by an
    /// operator (`cleared` from `now`). Returns whether anything changed.
    pub fn reconcile(&mut self, key: impl Fn(&str) -> Option<Key>, now: i64) -> bool {
        let mut changed = false;
        let prefixes: Vec<String> = self.locks.keys().cloned().collect();
        for p in prefixes {
            match key(&p) {
                None => {
                    self.locks.remove(&p);
                    changed = true;
                }
                Some(k) if !k.locked => {
                    self.locks.remove(&p);
                    self.cleared.insert(p, now);
                    changed = true;
                }
                Some(_) => {}
            }
        }
        let gone: Vec<String> = self
            .cleared
            .keys()
            .filter(|p| key(p).is_none())
            .cloned()
            .collect();
        for p in gone {
            self.cleared.remove(&p);
            changed = true;
        }
        changed
    }

    /// An operator's unlock under a file source: the key leaves the overlay. Returns whether
    /// it was there.
    pub fn clear(&mut self, prefix: &str, now: i64) -> bool {
        if self.locks.remove(prefix).is_some() {
            self.cleared.insert(prefix.to_owned(), now);
            true
        } else {
            false
        }
    }
}

/// What the risk loop last saw, for `keywall status` (also with the daemon down).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskStatus {
    pub checked_unix: i64,
    /// Keys used from more networks than `shared_key.networks` in its window (at most 100).
    pub shared_suspects: Vec<String>,
    pub shared_suspect_count: u64,
}

pub const STATUS_FILE: &str = "risk-status.json";

/// What one look at the activity decides for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Report it (an event and the suspect gauge) without locking.
    SharedAlert,
    Lock(&'static str),
}

/// The rule, as a plain function: `idle_s` since the key last passed (or got its slot),
/// `networks` in the shared window, `since_clear_s` since an operator undid an automatic
/// lock (None: never), and the key's state.
pub fn decide(
    idle_lock_after: Option<u64>,
    shared: Option<(u32, bool)>,
    idle_s: u64,
    networks: u32,
    since_clear_s: Option<u64>,
    locked_now: bool,
) -> Decision {
    if locked_now {
        return Decision::Nothing;
    }
    // An unlock starts the idle period (and the sharing window) again.
    let idle_s = since_clear_s.map_or(idle_s, |c| idle_s.min(c));
    if idle_lock_after.is_some_and(|d| idle_s >= d) {
        return Decision::Lock("idle");
    }
    if let Some((limit, lock)) = shared
        && networks > limit
    {
        if lock && since_clear_s.is_none() {
            return Decision::Lock("shared");
        }
        return Decision::SharedAlert;
    }
    Decision::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, locked: bool) -> Key {
        Key {
            prefix: prefix.into(),
            allow: vec![],
            ipsets: vec![],
            locked,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        }
    }

    #[test]
    fn overlay_locks_what_the_file_leaves_unlocked() {
        let mut o = Overlay::default();
        o.locks.insert(
            "aaaaaaaa".into(),
            AutoLock {
                reason: "idle".into(),
                at: 1,
            },
        );
        o.locks.insert(
            "bbbbbbbb".into(),
            AutoLock {
                reason: "shared".into(),
                at: 1,
            },
        );
        let mut p = Policy {
            key: vec![
                key("aaaaaaaa", false),
                key("bbbbbbbb", true),
                key("cccccccc", false),
            ],
            ..Default::default()
        };
        p.key[1].lock_reason = Some("the file's".into());
        o.apply(&mut p);
        assert!(p.key[0].locked);
        assert_eq!(p.key[0].lock_reason.as_deref(), Some("idle"));
        assert_eq!(p.key[1].lock_reason.as_deref(), Some("the file's"));
        assert!(!p.key[2].locked);
        p.validate().unwrap();
    }

    #[test]
    fn reconcile_sees_unlocks_and_deletions() {
        let mut o = Overlay::default();
        for p in ["aaaaaaaa", "bbbbbbbb", "cccccccc"] {
            o.locks.insert(
                p.into(),
                AutoLock {
                    reason: "idle".into(),
                    at: 1,
                },
            );
        }
        let keys = |p: &str| match p {
            "aaaaaaaa" => Some(key(p, true)),
            "bbbbbbbb" => Some(key(p, false)),
            _ => None,
        };
        assert!(o.reconcile(keys, 50));
        assert_eq!(o.locks.keys().collect::<Vec<_>>(), ["aaaaaaaa"]);
        assert_eq!(o.cleared.get("bbbbbbbb"), Some(&50));
        assert!(!o.reconcile(keys, 60));
        assert!(o.clear("aaaaaaaa", 70));
        assert!(!o.clear("aaaaaaaa", 71));
    }

    #[test]
    fn decisions() {
        use Decision::*;
        let day = 86_400;
        assert_eq!(
            decide(Some(14 * day), None, 15 * day, 1, None, false),
            Lock("idle")
        );
        assert_eq!(
            decide(Some(14 * day), None, 13 * day, 1, None, false),
            Nothing
        );
        assert_eq!(
            decide(Some(14 * day), None, 15 * day, 1, None, true),
            Nothing
        );
        // Unlocked by an operator a day ago: idle again only 14 days after that.
        assert_eq!(
            decide(Some(14 * day), None, 30 * day, 1, Some(day), false),
            Nothing
        );
        assert_eq!(
            decide(None, Some((3, false)), 0, 4, None, false),
            SharedAlert
        );
        assert_eq!(
            decide(None, Some((3, true)), 0, 4, None, false),
            Lock("shared")
        );
        assert_eq!(decide(None, Some((3, true)), 0, 3, None, false), Nothing);
        // An operator who unlocked a shared key is told again, not overruled.
        assert_eq!(
            decide(None, Some((3, true)), 0, 4, Some(10), false),
            SharedAlert
        );
        assert_eq!(decide(None, None, 100 * day, 5, None, false), Nothing);
    }
}
