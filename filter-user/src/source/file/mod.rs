//! The policy file as a source (`keywall run --policy FILE`): watched at the cost of one
//! `stat` per poll ([`FileWatch`]), parsed off the engine lock, and submitted as the ops of
//! the keys that changed ([`key_diff`]) when only keys did, else as a whole policy.

use std::{path::Path, time::SystemTime};

use anyhow::Result;

use crate::{
    engine::{self, Change, Engine, Refused, Rev, Submitted},
    metrics::Metrics,
    policy::{PatchOp, Policy},
    state::Runtime,
};

/// Watches the policy file at the cost of one `stat` per poll: the file is read (and hashed)
/// only when its size, mtime, ctime or inode moved, and parsed only when its bytes changed.
#[derive(Default)]
pub struct FileWatch {
    meta: Option<(SystemTime, i64, i64, u64, u64)>,
    hash: Option<u64>,
}

impl FileWatch {
    /// The file's text if it changed since the last call (None: unchanged or unreadable).
    pub fn changed(&mut self, p: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(p).ok()?;
        let meta = (
            m.modified().ok()?,
            m.ctime(),
            m.ctime_nsec(),
            m.ino(),
            m.len(),
        );
        if self.meta == Some(meta) {
            return None;
        }
        let bytes = std::fs::read(p).ok()?;
        self.meta = Some(meta);
        let hash = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        if self.hash == Some(hash) {
            return None; // touched, not changed
        }
        self.hash = Some(hash);
        match String::from_utf8(bytes) {
            Ok(t) => Some(t),
            // Not UTF-8: let the parser say so.
            Err(e) => Some(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }
}

pub fn parse_policy_file(p: &Path, text: &str) -> Result<Policy> {
    Policy::from_file_text(p, text).map_err(|errs| {
        anyhow::anyhow!(
            "{}: {}",
            p.display(),
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// The revision a file gets: its own `revision` if it says one, else one past the applied.
pub fn file_revision(file_rev: Option<u64>, applied: u64) -> u64 {
    file_rev.unwrap_or(applied + 1)
}

/// The ops that turn the applied policy into `pol`, when only keys differ (settings,
/// listeners and ipsets equal) and few enough of them do: None means a whole apply.
/// Costs one comparison per key, no compile.
pub fn key_diff(eng: &Engine, pol: &Policy) -> Option<Vec<PatchOp>> {
    let a = eng.applied.as_ref()?;
    eng.compiled.as_ref()?;
    if pol.settings != a.head.settings
        || pol.listener != a.head.listener
        || pol.ipsets != a.head.ipsets
    {
        return None;
    }
    let limit = 64 + pol.key.len() / 8;
    let mut seen = std::collections::HashSet::with_capacity(pol.key.len());
    let mut ops = Vec::new();
    for k in &pol.key {
        if !seen.insert(k.prefix.as_str()) {
            return None; // a duplicate: the whole path reports it with its place
        }
        // Bytes first (one key serialised), the parsed key only when they differ.
        let lock_only = match a.keys.same(k) {
            Some(true) => continue,
            Some(false) => a.keys.get(&k.prefix).is_some_and(|old| {
                crate::policy::Key {
                    locked: k.locked,
                    lock_reason: k.lock_reason.clone(),
                    locked_until: k.locked_until.clone(),
                    ..old
                } == *k
            }),
            None => false,
        };
        let prefix = k.prefix.clone();
        ops.push(match (lock_only, k.locked) {
            (true, true) => PatchOp::Lock {
                prefix,
                lock_reason: k.lock_reason.clone(),
                locked_until: k.locked_until.clone(),
            },
            (true, false) => PatchOp::Unlock { prefix },
            (false, _) => PatchOp::Upsert { key: k.clone() },
        });
        if ops.len() > limit {
            return None;
        }
    }
    if a.keys.len() + ops.len() > seen.len() {
        for prefix in a.keys.prefixes() {
            if !seen.contains(prefix.as_str()) {
                ops.push(PatchOp::Delete { prefix });
                if ops.len() > limit {
                    return None;
                }
            }
        }
    }
    Some(ops)
}

pub fn apply_file(
    eng: &mut Engine,
    p: &Path,
    parsed: Result<Policy>,
    runtime: &mut Runtime,
    metrics: &Metrics,
) {
    let source = format!("file:{}", p.display());
    let mut pol = match parsed {
        Ok(pol) => pol,
        Err(e) => {
            log::error!("policy file rejected, the running policy stays: {e:#}");
            runtime.policy_error = Some(format!("{e:#}"));
            metrics.update("file", "rejected");
            return;
        }
    };
    let rev = file_revision(pol.revision, eng.revision());
    // Only keys changed: submitted as their ops, at the cost of the keys that changed.
    let mut res = None;
    if let Some(ops) = key_diff(eng, &pol) {
        let same = pol.revision.is_none_or(|r| r == eng.revision())
            && eng.applied.as_ref().is_some_and(|a| a.source == source);
        if ops.is_empty() && same {
            runtime.policy_error = None;
            return;
        }
        match eng.submit(Change::Ops(ops), Rev::Set(rev), &source) {
            // Invalid: the whole path below reports every error with its file place.
            Err(Refused::Invalid(_)) => {}
            r => res = Some(r),
        }
    }
    let res = match res {
        Some(r) => r,
        None => match engine::compile_whole(&mut pol) {
            Ok(c) => eng.submit(
                Change::Policy(Box::new(pol), Box::new(c)),
                Rev::Set(rev),
                &source,
            ),
            Err(errs) => {
                metrics.update("file", "rejected");
                Err(Refused::Invalid(errs))
            }
        },
    };
    match res {
        Ok(Submitted::Applied { revision, report }) => {
            log::info!(
                "applied {} as revision {revision} (generation {}, {} keys written, {:?})",
                p.display(),
                report.generation,
                report.keys_written,
                report.elapsed
            );
            runtime.policy_error = None;
        }
        Ok(Submitted::Unchanged { .. }) => runtime.policy_error = None,
        Err(e) => {
            let msg = match e {
                Refused::Invalid(errs) => format!(
                    "policy rejected:\n{}",
                    errs.iter()
                        .map(|e| format!("  {e}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Refused::Conflict { why, .. } => why,
                Refused::Failed(e) => format!("{e:#}"),
            };
            log::error!("policy file rejected, the running policy stays: {msg}");
            runtime.policy_error = Some(msg);
        }
    }
}
