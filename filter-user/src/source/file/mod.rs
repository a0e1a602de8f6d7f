//! The policy file as a source (`keywall run --policy FILE`): watched at the cost of one
//! `stat` per poll ([`FileWatch`]), parsed off the engine lock, and submitted as the ops of
//! the keys that changed ([`key_diff`]) when only keys did, else as a whole policy.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Result;

pub mod edit;

use crate::{
    engine::{self, Change, Engine, Refused, Rev, Submitted},
    metrics::Metrics,
    policy::{PatchOp, Policy},
    source::Shared,
    state::{self, Runtime},
};

/// Watches the policy file at the cost of one `stat` per poll: the file is read (and hashed)
/// only when its size, mtime, ctime or inode moved, and parsed only when its bytes changed.
#[derive(Default)]
pub struct FileWatch {
    pub(crate) meta: Option<(SystemTime, i64, i64, u64, u64)>,
    pub(crate) hash: Option<u64>,
    /// What is kept of the TOML text last applied (its tables' hashes and keys, and the
    /// revision its head says): the next edit is compared with it (edit.rs). None after a
    /// rejected text, a SIGHUP, or a text the split parse did not take.
    pub applied: Option<edit::Applied>,
    /// The last call found the file being written: look again soon.
    pub settling: bool,
}

/// A file modified less than this long ago may be between a writer's truncate and its
/// write (an empty file is a valid, empty policy): it is read once it holds still.
const FILE_SETTLE: Duration = Duration::from_millis(20);

impl FileWatch {
    /// `changed`, waiting (5 s at most) for a file still being written to hold still: for
    /// reads that must not be put off to the next poll (the start, SIGHUP).
    pub fn changed_settled(&mut self, p: &Path) -> Option<String> {
        let mut text = self.changed(p);
        for _ in 0..100 {
            if text.is_some() || !self.settling {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            text = self.changed(p);
        }
        text
    }

    /// The file's text if it changed since the last call (None: unchanged or unreadable).
    pub fn changed(&mut self, p: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let stat = || {
            let m = std::fs::metadata(p).ok()?;
            Some((
                m.modified().ok()?,
                m.ctime(),
                m.ctime_nsec(),
                m.ino(),
                m.len(),
            ))
        };
        self.settling = false;
        let meta = stat()?;
        if self.meta == Some(meta) {
            return None;
        }
        // Rewritten in place (truncated, then written), the file can be read empty or half
        // written: read it once it holds still rather than apply part of it.
        if SystemTime::now()
            .duration_since(meta.0)
            .is_ok_and(|d| d < FILE_SETTLE)
        {
            self.settling = true;
            return None;
        }
        let bytes = std::fs::read(p).ok()?;
        if stat()? != meta {
            self.settling = true;
            return None;
        }
        self.meta = Some(meta);
        let hash = edit::hash(&bytes);
        if self.hash == Some(hash) {
            // Touched, not changed. The bytes were read into free heap chunks: give them
            // back (the daemon's RSS must not keep a copy of the file after each touch).
            drop(bytes);
            engine::trim_heap();
            return None;
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

/// Parses the policy file: a TOML file in pieces when it splits into a head and `[[key]]`
/// tables (edit.rs `parse_split`: the same policy at a fraction of a whole parse's peak, and
/// what the edit path keeps), else whole (which places every error).
pub fn parse_file(p: &Path, text: &str) -> (Result<Policy>, Option<edit::Applied>) {
    if p.extension().is_none_or(|e| e != "json")
        && let Some((pol, applied)) = edit::parse_split(text)
    {
        return (Ok(pol), applied);
    }
    (parse_policy_file(p, text), None)
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
        if let Some(op) = key_op(&a.keys, k) {
            ops.push(op);
        }
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

/// The op that makes the applied key `k.prefix` into `k` (None: they are the same).
fn key_op(keys: &crate::engine::store::KeyStore, k: &crate::policy::Key) -> Option<PatchOp> {
    // Bytes first (one key serialised), the parsed key only when they differ.
    let lock_only = match keys.same(k) {
        Some(true) => return None,
        Some(false) => keys.get(&k.prefix).is_some_and(|old| {
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
    Some(match (lock_only, k.locked) {
        (true, true) => PatchOp::Lock {
            prefix,
            lock_reason: k.lock_reason.clone(),
            locked_until: k.locked_until.clone(),
        },
        (true, false) => PatchOp::Unlock { prefix },
        (false, _) => PatchOp::Upsert { key: k.clone() },
    })
}

/// The ops of a key-table edit (edit.rs): the new tables' keys against the applied
/// ones, and the old tables' keys that are gone. None (the whole path decides) for a key
/// named twice in the tables, or a new key that another table of the file already holds.
pub fn edit_ops(eng: &Engine, edit: &edit::KeyEdit) -> Option<Vec<PatchOp>> {
    use std::collections::HashSet;
    let a = eng.applied.as_ref()?;
    eng.compiled.as_ref()?;
    let old: HashSet<&str> = edit.old.iter().map(String::as_str).collect();
    if old.len() != edit.old.len() {
        return None;
    }
    let mut seen = HashSet::with_capacity(edit.new.len());
    let mut ops = Vec::new();
    for k in &edit.new {
        if !seen.insert(k.prefix.as_str())
            || (!old.contains(k.prefix.as_str()) && a.keys.contains(&k.prefix))
        {
            return None;
        }
        ops.extend(key_op(&a.keys, k));
    }
    for prefix in old {
        if !seen.contains(prefix) && a.keys.contains(prefix) {
            ops.push(PatchOp::Delete {
                prefix: prefix.to_owned(),
            });
        }
    }
    Some(ops)
}

/// Applies a key-table edit of the policy file as ops, as `apply_file` would have after
/// parsing the whole file; `file_rev` is the revision the file's (unchanged) head says.
/// False: not applied, the caller parses the whole file (which reports any error in it).
pub fn apply_file_edit(
    shared: &Shared,
    p: &Path,
    mut edit: edit::KeyEdit,
    file_rev: Option<u64>,
    metrics: &Metrics,
    state_dir: &Path,
) -> Result<bool> {
    // The daemon's automatic locks lie over the file (autolock.rs).
    {
        let mut pol = Policy {
            key: std::mem::take(&mut edit.new),
            ..Default::default()
        };
        shared.overlay.lock().unwrap().apply(&mut pol);
        edit.new = pol.key;
    }
    let mut eng = shared.engine.lock().unwrap();
    let Some(ops) = edit_ops(&eng, &edit) else {
        return Ok(false);
    };
    let source = format!("file:{}", p.display());
    let mut runtime = shared.runtime.lock().unwrap();
    let same = file_rev.is_none_or(|r| r == eng.revision())
        && eng.applied.as_ref().is_some_and(|a| a.source == source);
    if ops.is_empty() && same {
        runtime.policy_error = None;
        return Ok(true);
    }
    let rev = file_revision(file_rev, eng.revision());
    match eng.submit(Change::Ops(ops), Rev::Set(rev), &source) {
        Ok(Submitted::Applied { revision, report }) => log::info!(
            "applied an edit of {} key tables in {} as revision {revision} (generation {}, {} keys written, {:?})",
            edit.new.len().max(edit.old.len()),
            p.display(),
            report.generation,
            report.keys_written,
            report.elapsed
        ),
        Ok(Submitted::Unchanged { .. }) => {}
        // Invalid, or in conflict: the whole path reports it with its file place.
        Err(_) => return Ok(false),
    }
    runtime.policy_error = None;
    metrics.set_sync("file", true);
    state::save_runtime(state_dir, &runtime)?;
    if let Err(e) = eng.settle() {
        log::error!("settling the inactive slot: {e:#}");
    }
    Ok(true)
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
