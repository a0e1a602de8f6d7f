//! The state directory: the last applied policy and what the daemon attached, written so a
//! crash at any moment leaves either the old or the new file, never a torn one.
//!
//! The applied policy is a snapshot (`applied-policy.json`, rewritten whole on PUT and file
//! changes) plus a journal of the PATCHes applied since (`applied-journal.ndjson`, one line
//! each, appended and fdatasync'ed before the write is answered). A lock therefore costs one
//! small append, not a rewrite of a million keys; the daemon folds the journal into a new
//! snapshot now and then. A torn last line (a crash mid-append) was never answered, and is
//! ignored.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{PatchOp, Policy};

const POLICY_FILE: &str = "applied-policy.json";
const JOURNAL_FILE: &str = "applied-journal.ndjson";
/// The journal being folded into a new snapshot (renamed out of the way so that PATCHes can
/// go on appending to a fresh journal meanwhile).
const FOLDING_FILE: &str = "applied-journal.folding.ndjson";
const RUNTIME_FILE: &str = "runtime.json";
const STATUS_FILE: &str = "policy-status.json";

/// The applied policy and where it came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    pub revision: u64,
    /// `file:PATH` or `api` (later `etcd`): the one source that owns the policy.
    pub source: String,
    pub applied_unix: u64,
    pub policy: Policy,
}

/// What the running daemon attached (for `status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Runtime {
    pub pid: u32,
    pub ifaces: BTreeMap<String, String>,
    pub pin_dir: String,
    pub audit_override: bool,
    pub policy_error: Option<String>,
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// One applied PATCH, as the journal keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JournalEntry {
    pub revision: u64,
    pub source: String,
    pub applied_unix: u64,
    pub ops: Vec<PatchOp>,
}

/// Writes the whole applied policy, then drops the journals it supersedes.
pub fn save_applied(state_dir: &Path, a: &Applied) -> Result<()> {
    // Compact: at 1M keys pretty printing costs more than the write.
    save_applied_bytes(state_dir, &serde_json::to_vec(a)?)
}

/// `save_applied` of an `Applied` already serialised (the engine builds the bytes from its
/// compact store: the same format).
pub fn save_applied_bytes(state_dir: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(&state_dir.join(POLICY_FILE), bytes)?;
    // A crash before this removal leaves entries at or below the snapshot's revision, which
    // loading skips.
    remove_if_present(&state_dir.join(FOLDING_FILE))?;
    remove_if_present(&state_dir.join(JOURNAL_FILE))
}

/// A snapshot written and synced under a temporary name, not yet the state dir's: a whole
/// apply stages it while the maps are written, and commits it once they enforce it (a crash
/// before the commit leaves the previous snapshot, which is what a restart must restore).
/// Dropped uncommitted, the temporary file is removed.
pub struct Staged {
    tmp: PathBuf,
    state_dir: PathBuf,
    committed: bool,
}

pub fn stage_applied_bytes(state_dir: &Path, bytes: &[u8]) -> Result<Staged> {
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    // Not write_atomic's temporary name: a fold may be writing that one meanwhile.
    let tmp = state_dir.join(format!(".{POLICY_FILE}.staged"));
    let st = Staged {
        tmp,
        state_dir: state_dir.to_owned(),
        committed: false,
    };
    let mut f =
        fs::File::create(&st.tmp).with_context(|| format!("creating {}", st.tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", st.tmp.display()))?;
    Ok(st)
}

impl Staged {
    /// Makes the staged snapshot the state dir's, then drops the journals it supersedes.
    pub fn commit(mut self) -> Result<()> {
        let path = self.state_dir.join(POLICY_FILE);
        fs::rename(&self.tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        self.committed = true;
        if let Ok(d) = fs::File::open(&self.state_dir) {
            let _ = d.sync_all();
        }
        remove_if_present(&self.state_dir.join(FOLDING_FILE))?;
        remove_if_present(&self.state_dir.join(JOURNAL_FILE))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

/// First half of a fold (under the engine lock, O(journal)): moves the journal aside, so
/// later PATCHes start a fresh one. A fold that never finished (a crash) left its journal
/// aside: this one is added to it.
pub fn rotate_journal(state_dir: &Path) -> Result<()> {
    let j = state_dir.join(JOURNAL_FILE);
    let f = state_dir.join(FOLDING_FILE);
    if !j.exists() {
        return Ok(());
    }
    if f.exists() {
        let lines = fs::read(&j).with_context(|| format!("reading {}", j.display()))?;
        let mut out = fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .with_context(|| format!("opening {}", f.display()))?;
        out.write_all(&lines).and_then(|_| out.sync_data())?;
        remove_if_present(&j)
    } else {
        fs::rename(&j, &f).with_context(|| format!("renaming {}", j.display()))?;
        if let Ok(d) = fs::File::open(state_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Second half of a fold (off the engine lock): writes the snapshot serialised at rotation
/// time, then drops the journal moved aside (every line of it is in the snapshot).
pub fn finish_fold(state_dir: &Path, snapshot: &[u8]) -> Result<()> {
    write_atomic(&state_dir.join(POLICY_FILE), snapshot)?;
    remove_if_present(&state_dir.join(FOLDING_FILE))
}

/// Appends one applied PATCH and makes it durable.
pub fn append_journal(state_dir: &Path, e: &JournalEntry) -> Result<()> {
    let p = state_dir.join(JOURNAL_FILE);
    let mut line = serde_json::to_vec(e)?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    f.write_all(&line)
        .and_then(|_| f.sync_data())
        .with_context(|| format!("appending to {}", p.display()))
}

/// The snapshot with the journal replayed over it.
pub fn load_applied(state_dir: &Path) -> Result<Option<Applied>> {
    let p = state_dir.join(POLICY_FILE);
    let snapshot: Option<Applied> = match fs::read(&p) {
        Ok(b) => {
            Some(serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    // The journal being folded (if a fold did not finish), then the current one.
    let mut journal = Vec::new();
    for name in [FOLDING_FILE, JOURNAL_FILE] {
        let j = state_dir.join(name);
        match fs::read(&j) {
            Ok(mut b) => {
                if !b.is_empty() && !b.ends_with(b"\n") {
                    b.push(b'\n'); // a torn line stays torn (it will not parse)
                }
                journal.extend_from_slice(&b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", j.display())),
        }
    }
    if journal.is_empty() {
        return Ok(snapshot);
    }
    Ok(replay_journal(snapshot, &journal))
}

/// Cuts a torn last line (a crash mid-append) off the journals, so that lines appended after
/// a restart are not glued to it. Called before the daemon appends anything.
pub fn repair_journal(state_dir: &Path) -> Result<()> {
    for name in [FOLDING_FILE, JOURNAL_FILE] {
        let p = state_dir.join(name);
        let Ok(b) = fs::read(&p) else { continue };
        let keep = b.iter().rposition(|c| *c == b'\n').map_or(0, |i| i + 1);
        if keep < b.len() {
            log::warn!("{}: dropping a torn last line", p.display());
            let f = fs::OpenOptions::new().write(true).open(&p)?;
            f.set_len(keep as u64)?;
            f.sync_all()?;
        }
    }
    Ok(())
}

/// Lines in the journals (PATCHes since the snapshot, or a little more).
pub fn journal_lines(state_dir: &Path) -> usize {
    [FOLDING_FILE, JOURNAL_FILE]
        .iter()
        .filter_map(|n| fs::read(state_dir.join(n)).ok())
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .sum()
}

/// Replays journal lines newer than the snapshot, in O(lines + keys): the prefix index is
/// built once, and deletes leave a hole that is closed at the end (instead of shifting every
/// later key). A line that does not parse (torn by a crash) or does not apply ends the replay:
/// nothing after it was acknowledged in order.
pub fn replay_journal(mut applied: Option<Applied>, journal: &[u8]) -> Option<Applied> {
    let mut replay: Option<Replay> = None;
    let mut last: Option<(u64, String, u64)> = None;
    for (n, line) in journal.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let Ok(e) = serde_json::from_slice::<JournalEntry>(line) else {
            log::warn!("policy journal line {} is torn; replay stops there", n + 1);
            break;
        };
        let base = last
            .as_ref()
            .map(|l| l.0)
            .or(applied.as_ref().map(|a| a.revision))
            .unwrap_or(0);
        if applied.is_some() && e.revision <= applied.as_ref().map_or(0, |a| a.revision) {
            continue; // already in the snapshot
        }
        let r = replay.get_or_insert_with(|| {
            Replay::new(
                applied
                    .as_mut()
                    .map(|a| std::mem::take(&mut a.policy))
                    .unwrap_or_default(),
            )
        });
        if let Err(msg) = r.apply(&e.ops) {
            log::error!(
                "policy journal line {} does not apply ({msg}); replay stops there",
                n + 1
            );
            // Keep what was replayed so far, at its own revision.
            last = Some((base, e.source, e.applied_unix));
            break;
        }
        last = Some((e.revision, e.source, e.applied_unix));
    }
    let (Some(r), Some((revision, source, applied_unix))) = (replay, last) else {
        return applied;
    };
    let mut policy = r.finish();
    policy.revision = Some(revision);
    Some(Applied {
        revision,
        source,
        applied_unix,
        policy,
    })
}

/// A policy being replayed: keys with holes where deletes were, and one prefix index.
struct Replay {
    policy: Policy,
    keys: Vec<Option<crate::policy::Key>>,
    index: std::collections::HashMap<String, usize>,
}

impl Replay {
    fn new(mut policy: Policy) -> Replay {
        let keys: Vec<_> = std::mem::take(&mut policy.key)
            .into_iter()
            .map(Some)
            .collect();
        let index = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_ref().expect("just wrapped").prefix.clone(), i))
            .collect();
        Replay {
            policy,
            keys,
            index,
        }
    }

    fn apply(&mut self, ops: &[PatchOp]) -> Result<(), String> {
        for op in ops {
            match op {
                PatchOp::Upsert { key } => match self.index.get(&key.prefix) {
                    Some(&i) => self.keys[i] = Some(key.clone()),
                    None => {
                        self.index.insert(key.prefix.clone(), self.keys.len());
                        self.keys.push(Some(key.clone()));
                    }
                },
                PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                    match self.index.get(prefix).and_then(|&i| self.keys[i].as_mut()) {
                        Some(k) => {
                            let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                            k.set_lock(lock, reason, until)
                        }
                        None => return Err(format!("no key {prefix:?}")),
                    }
                }
                PatchOp::Delete { prefix } => match self.index.remove(prefix) {
                    Some(i) => self.keys[i] = None,
                    None => return Err(format!("no key {prefix:?}")),
                },
                PatchOp::SetIpset { name, cidrs } => {
                    self.policy.ipsets.insert(name.clone(), cidrs.clone());
                }
                PatchOp::DeleteIpset { name } => {
                    if self.policy.ipsets.remove(name).is_none() {
                        return Err(format!("no ipset {name:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Policy {
        self.policy.key = self.keys.into_iter().flatten().collect();
        self.policy
    }
}

/// Applies already validated PATCH ops in place, without validating again (they were
/// validated when the daemon accepted them). Same meaning as `Policy::apply_patch`.
pub fn replay_ops(p: &mut Policy, ops: &[PatchOp]) -> Result<(), String> {
    let mut r = Replay::new(std::mem::take(p));
    let res = r.apply(ops);
    *p = r.finish();
    res
}

/// What `status` and `/metrics` say about the applied policy. The engine keeps it up to date
/// with every write, so reading it costs the same at 10 keys and at a million.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatus {
    pub revision: u64,
    pub source: String,
    pub applied_unix: u64,
    pub keys: u64,
    pub locked_keys: u64,
    /// Locked keys by `lock_reason` ("" for none), the most common first (at most 20).
    #[serde(default)]
    pub lock_reasons: Vec<(String, u64)>,
    /// Entries in the policy maps.
    pub fill: crate::dataplane::MapFill,
    /// The maps' generation when this was written, and whether `--audit` overrode the
    /// policy: a restart over maps still at this generation need not rewrite them.
    #[serde(default)]
    pub generation: u32,
    #[serde(default)]
    pub audit: bool,
}

/// Writes the policy status for readers while the daemon is down. Not synced: it is a cache
/// of what the snapshot and journal hold (see `load_policy_status`).
pub fn save_policy_status(state_dir: &Path, s: &PolicyStatus) -> Result<()> {
    let path = state_dir.join(STATUS_FILE);
    let tmp = state_dir.join(format!(".{STATUS_FILE}.tmp"));
    fs::write(&tmp, serde_json::to_vec(s)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// The applied policy's status without parsing the policy: the status file, with the revision
/// and source of the journal's last line if that is newer (a crash between the two writes).
/// None if the state dir holds no status file (then the caller falls back to the policy).
pub fn load_policy_status(state_dir: &Path) -> Option<PolicyStatus> {
    let mut s: PolicyStatus =
        serde_json::from_slice(&fs::read(state_dir.join(STATUS_FILE)).ok()?).ok()?;
    if let Some(e) = journal_tail(state_dir)
        && e.revision > s.revision
    {
        s.revision = e.revision;
        s.source = e.source;
        s.applied_unix = e.applied_unix;
    }
    Some(s)
}

/// The journal's last complete line, read from its end (O(1) in the journal's length).
fn journal_tail(state_dir: &Path) -> Option<JournalEntry> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = fs::File::open(state_dir.join(JOURNAL_FILE)).ok()?;
    let len = f.metadata().ok()?.len();
    let mut back = 4096u64;
    loop {
        let start = len.saturating_sub(back);
        f.seek(SeekFrom::Start(start)).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        // Complete lines only: a torn last line (no newline) was never acknowledged.
        let end = buf.iter().rposition(|b| *b == b'\n')?;
        let body = &buf[..end];
        match body.iter().rposition(|b| *b == b'\n') {
            Some(i) => return serde_json::from_slice(&body[i + 1..]).ok(),
            None if start == 0 => return serde_json::from_slice(body).ok(),
            None => back *= 4,
        }
    }
}

pub fn save_runtime(state_dir: &Path, r: &Runtime) -> Result<()> {
    write_atomic(
        &state_dir.join(RUNTIME_FILE),
        &serde_json::to_vec_pretty(r)?,
    )
}

pub fn load_runtime(state_dir: &Path) -> Option<Runtime> {
    serde_json::from_slice(&fs::read(state_dir.join(RUNTIME_FILE)).ok()?).ok()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Key, Patch};

    fn key(prefix: &str, allow: &[&str]) -> Key {
        Key {
            prefix: prefix.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ipsets: Vec::new(),
            locked: false,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        }
    }

    fn base() -> Policy {
        Policy {
            revision: Some(3),
            key: vec![
                key("aaaaaaaa", &["10.0.0.1"]),
                key("bbbbbbbb", &["10.0.0.2"]),
                key("cccccccc", &["10.0.0.3"]),
            ],
            ..Default::default()
        }
    }

    fn patch(revision: u64, json_ops: &str) -> Patch {
        Patch::from_json_str(&format!("{{\"revision\":{revision},\"ops\":{json_ops}}}")).unwrap()
    }

    #[test]
    fn replay_matches_apply_patch() {
        let patches = [
            patch(4, r#"[{"op":"lock","prefix":"bbbbbbbb"}]"#),
            patch(
                5,
                r#"[{"op":"delete","prefix":"aaaaaaaa"},{"op":"upsert","key":{"prefix":"dddddddd","allow":["10.0.0.4"]}},{"op":"unlock","prefix":"bbbbbbbb"},{"op":"lock","prefix":"cccccccc"}]"#,
            ),
            patch(
                6,
                r#"[{"op":"set_ipset","name":"b","cidrs":["192.0.2.0/24"]},{"op":"upsert","key":{"prefix":"cccccccc","ipsets":["b"]}},{"op":"delete","prefix":"dddddddd"}]"#,
            ),
            patch(
                7,
                r#"[{"op":"upsert","key":{"prefix":"cccccccc"}},{"op":"delete_ipset","name":"b"}]"#,
            ),
        ];
        let mut want = base();
        let mut got = base();
        for p in &patches {
            want = want.apply_patch(p).expect("valid patch");
            replay_ops(&mut got, &p.ops).unwrap();
            got.revision = Some(p.revision);
            assert_eq!(got, want, "after revision {}", p.revision);
        }
        assert!(
            replay_ops(
                &mut got,
                &patch(8, r#"[{"op":"lock","prefix":"zzzzzzzz"}]"#).ops
            )
            .is_err()
        );
    }

    #[test]
    fn journal_replays_over_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("kw-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let a = Applied {
            revision: 3,
            source: "api".into(),
            applied_unix: 1,
            policy: base(),
        };
        save_applied(&dir, &a).unwrap();
        for (rev, ops) in [
            (2, r#"[{"op":"delete","prefix":"aaaaaaaa"}]"#), // older than the snapshot: skipped
            (4, r#"[{"op":"lock","prefix":"bbbbbbbb"}]"#),
            (
                5,
                r#"[{"op":"unlock","prefix":"bbbbbbbb"},{"op":"lock","prefix":"aaaaaaaa"}]"#,
            ),
        ] {
            let p = patch(rev, ops);
            append_journal(
                &dir,
                &JournalEntry {
                    revision: rev,
                    source: "api".into(),
                    applied_unix: 2,
                    ops: p.ops,
                },
            )
            .unwrap();
        }
        // A torn line at the end (a crash mid-append) is ignored.
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap()
            .write_all(b"{\"revision\":6,\"sou")
            .unwrap();
        let got = load_applied(&dir).unwrap().unwrap();
        assert_eq!(got.revision, 5);
        assert_eq!(got.policy.revision, Some(5));
        assert_eq!(got.policy.key.len(), 3);
        assert!(got.policy.key[0].locked && !got.policy.key[1].locked);
        // A new snapshot supersedes the journal.
        save_applied(&dir, &got).unwrap();
        assert!(!dir.join(JOURNAL_FILE).exists());
        assert_eq!(load_applied(&dir).unwrap().unwrap(), got);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fold_rotates_and_a_crash_at_any_step_loses_nothing() {
        let dir = std::env::temp_dir().join(format!("kw-fold-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut a = Applied {
            revision: 3,
            source: "api".into(),
            applied_unix: 1,
            policy: base(),
        };
        save_applied(&dir, &a).unwrap();
        let lock = |rev: u64, prefix: &str| JournalEntry {
            revision: rev,
            source: "api".into(),
            applied_unix: 2,
            ops: vec![PatchOp::Lock {
                prefix: prefix.into(),
                lock_reason: None,
                locked_until: None,
            }],
        };
        append_journal(&dir, &lock(4, "aaaaaaaa")).unwrap();
        // The fold begins: the journal goes aside, the snapshot is serialised at revision 4.
        rotate_journal(&dir).unwrap();
        a = load_applied(&dir).unwrap().unwrap();
        assert_eq!(a.revision, 4);
        let snap = serde_json::to_vec(&a).unwrap();
        // A PATCH lands while the snapshot is written.
        append_journal(&dir, &lock(5, "bbbbbbbb")).unwrap();
        let got = load_applied(&dir).unwrap().unwrap();
        assert_eq!(
            got.revision, 5,
            "both journals are replayed before the fold ends"
        );
        // The fold never finished (a crash); the next one rotates again and keeps both.
        drop(snap);
        rotate_journal(&dir).unwrap();
        assert_eq!(load_applied(&dir).unwrap().unwrap(), got);
        let snap = serde_json::to_vec(&got).unwrap();
        append_journal(&dir, &lock(6, "cccccccc")).unwrap();
        finish_fold(&dir, &snap).unwrap();
        let done = load_applied(&dir).unwrap().unwrap();
        assert_eq!(done.revision, 6);
        assert!(done.policy.key.iter().all(|k| k.locked));
        assert_eq!(journal_lines(&dir), 1);
        // The status file, and the journal's tail when it is newer.
        save_policy_status(
            &dir,
            &PolicyStatus {
                revision: 5,
                source: "api".into(),
                keys: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let st = load_policy_status(&dir).unwrap();
        assert_eq!((st.revision, st.keys), (6, 3));
        // A torn line is cut before anything is appended after it.
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap()
            .write_all(b"{\"revision\":7,\"so")
            .unwrap();
        repair_journal(&dir).unwrap();
        append_journal(&dir, &lock(7, "aaaaaaaa")).unwrap();
        assert_eq!(load_applied(&dir).unwrap().unwrap().revision, 7);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("kw-state-{}", std::process::id()));
        let p = dir.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
