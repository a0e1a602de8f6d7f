//! `keywall run`: restore, attach, then keep the maps in step with the policy source (the
//! policy file, or the API when there is no file).
//!
//! Order matters for "never a gap, never a wrong verdict": the last applied policy is written
//! into the maps before the program is attached (or before it takes over a pinned link), and a
//! new policy is validated completely before anything is written.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use filter_common::KeyPrefix;

use crate::{
    api::{self, ApiConfig, Shared, Source},
    dataplane::{Capacity, Dataplane, Mirror},
    metrics::Metrics,
    policy::{Compiled, CompiledKey, Key, Patch, PatchOp, Policy, PolicyError},
    state::{self, Applied, PolicyStatus, Runtime},
};

pub struct RunOptions {
    pub ifaces: Vec<String>,
    pub xdp_mode: String,
    pub policy: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub capacity: Capacity,
    pub poll: Duration,
    pub api: ApiConfig,
    /// None: `--metrics off`.
    pub metrics: Option<String>,
    /// `--etcd`: the policy source (exclusive with `policy`).
    pub etcd: Option<crate::etcd::EtcdConfig>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The daemon's policy engine: the applied policy, its mirror in the maps, and persistence.
/// One per daemon, behind a mutex: every writer (the file, the API) goes through it in turn.
pub struct Engine {
    pub dp: Dataplane,
    pub mirror: Mirror,
    pub applied: Option<Applied>,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub key_cap: u32,
    /// The last PATCH applied (revision and ops), so its retry is recognised as a no-op.
    pub last_patch: Option<Patch>,
    /// PATCHes in the state dir's journal since the last snapshot.
    pub journal_len: usize,
    /// The applied policy in kernel form, kept so a PATCH recompiles only the keys it names.
    pub compiled: Option<Compiled>,
    /// Position of each key in the applied policy's `key` list.
    pub index: HashMap<String, usize>,
    /// Keys that pass from anywhere (unlocked, no allow entry, no ipset): while there is one
    /// under `unbound_keys = "pass"`, the prefilter must stay off.
    pub open_keys: usize,
    /// Locked keys in the applied policy (for metrics, without a walk over every key).
    pub locked_keys: usize,
    /// A whole-policy apply left the inactive slot behind on (possibly) every key.
    pub unsettled: bool,
    /// The applied policy's figures for readers (status, metrics), updated with every write
    /// so that reading them never takes the engine lock or walks the policy.
    pub published: Arc<Mutex<Option<PolicyStatus>>>,
    /// A fold's snapshot is being written (off the lock).
    pub fold_busy: Arc<AtomicBool>,
}

/// Why a PATCH was not applied.
pub enum PatchFailure {
    /// 400: what the ops brought in is invalid, with places (`ops[2].key.allow[0]`).
    Invalid(Vec<PolicyError>),
    /// 500: the maps could not be written (the live policy is unchanged) or persisting failed.
    Apply(anyhow::Error),
}

fn is_open(k: &Key) -> bool {
    !k.locked && k.allow.is_empty() && k.ipsets.is_empty()
}

/// How a write is made durable: a whole snapshot, or one journal line for a PATCH.
pub enum Persist<'a> {
    Snapshot,
    /// Already in the state dir (a restore): nothing to write.
    Restored,
    Journal(&'a Patch),
}

/// Journal lines after which the daemon writes a fresh snapshot (after answering).
pub const JOURNAL_COMPACT: usize = 1024;

/// A fold begun under the engine lock (`Engine::begin_fold`), to be written without it.
pub struct Fold {
    bytes: Vec<u8>,
    lines: usize,
    state_dir: PathBuf,
    busy: Arc<AtomicBool>,
}

impl Fold {
    pub fn finish(self) -> Result<()> {
        let t0 = Instant::now();
        let r = state::finish_fold(&self.state_dir, &self.bytes);
        self.busy.store(false, Ordering::SeqCst);
        log::info!(
            "folded {} journalled PATCHes into a snapshot ({} bytes) in {:?}",
            self.lines,
            self.bytes.len(),
            t0.elapsed()
        );
        r
    }
}

impl Engine {
    /// Records the applied policy's figures for readers, in memory and in the state dir (for
    /// `keywall status` while the daemon is down).
    pub fn publish(&self) {
        let Some(a) = &self.applied else { return };
        let st = PolicyStatus {
            revision: a.revision,
            source: a.source.clone(),
            applied_unix: a.applied_unix,
            keys: self.index.len() as u64,
            locked_keys: self.locked_keys as u64,
            fill: self.mirror.fill(),
        };
        if let Err(e) = state::save_policy_status(&self.state_dir, &st) {
            log::warn!("writing the policy status: {e:#}");
        }
        *self.published.lock().unwrap() = Some(st);
    }

    /// The applied revision (0 before anything was applied).
    pub fn revision(&self) -> u64 {
        self.applied.as_ref().map_or(0, |a| a.revision)
    }

    /// Validates, compiles and applies `p` at `revision`; on any error nothing live changes.
    pub fn apply(
        &mut self,
        p: Policy,
        revision: u64,
        source: &str,
    ) -> Result<crate::dataplane::ApplyReport> {
        let compiled = p.compile().map_err(|errs| {
            anyhow::anyhow!(
                "policy rejected:\n{}",
                errs.iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        self.apply_compiled(p, compiled, None, revision, source, Persist::Snapshot)
    }

    /// Writes the policy restored from the state dir (which already holds it).
    pub fn restore(
        &mut self,
        p: Policy,
        revision: u64,
        source: &str,
    ) -> Result<crate::dataplane::ApplyReport> {
        let compiled = p
            .compile()
            .map_err(|errs| anyhow::anyhow!("the restored policy is invalid: {}", errs[0]))?;
        self.apply_compiled(p, compiled, None, revision, source, Persist::Restored)
    }

    /// True if `patch` touches keys only and the engine can apply it key by key.
    pub fn can_patch_keys(&self, patch: &Patch) -> bool {
        self.applied.is_some()
            && self.compiled.is_some()
            && patch.ops.iter().all(|op| {
                matches!(
                    op,
                    PatchOp::Upsert { .. }
                        | PatchOp::Delete { .. }
                        | PatchOp::Lock { .. }
                        | PatchOp::Unlock { .. }
                )
            })
    }

    /// The key with this prefix in the applied policy.
    pub fn key(&self, prefix: &str) -> Option<&Key> {
        let a = self.applied.as_ref()?;
        self.index.get(prefix).map(|&i| &a.policy.key[i])
    }

    /// True if every op is already true of the applied policy (a retried PATCH).
    pub fn ops_hold(&self, ops: &[PatchOp]) -> bool {
        let Some(a) = &self.applied else { return false };
        ops.iter().all(|op| match op {
            PatchOp::Upsert { key } => self.key(&key.prefix) == Some(key),
            PatchOp::Delete { prefix } => self.key(prefix).is_none(),
            PatchOp::Lock { prefix } => self.key(prefix).is_some_and(|k| k.locked),
            PatchOp::Unlock { prefix } => self.key(prefix).is_some_and(|k| !k.locked),
            PatchOp::SetIpset { name, cidrs } => a.policy.ipsets.get(name) == Some(cidrs),
            PatchOp::DeleteIpset { name } => !a.policy.ipsets.contains_key(name),
        })
    }

    /// Applies a keys-only PATCH (`can_patch_keys`) at the cost of the keys it names: each
    /// upserted key is validated on its own (against the settings and the ipsets it binds),
    /// only those keys are recompiled and written, and the applied policy is changed in
    /// place once the maps enforce it. Same result as `Policy::apply_patch` + a full apply.
    pub fn patch_keys(
        &mut self,
        patch: &Patch,
        source: &str,
    ) -> std::result::Result<crate::dataplane::ApplyReport, PatchFailure> {
        let a = self.applied.as_ref().expect("can_patch_keys");
        let base = &a.policy;
        // What each named key becomes (None: deleted), following the ops in order.
        let mut after: HashMap<&str, Option<(Key, Option<CompiledKey>)>> = HashMap::new();
        let mut errs = Vec::new();
        for (n, op) in patch.ops.iter().enumerate() {
            let current =
                |after: &HashMap<&str, Option<(Key, Option<CompiledKey>)>>, p: &str| match after
                    .get(p)
                {
                    Some(v) => v.as_ref().map(|(k, _)| k.clone()),
                    None => self.index.get(p).map(|&i| base.key[i].clone()),
                };
            let missing = |prefix: &str| {
                PolicyError::new(
                    format!("ops[{n}].prefix"),
                    format!("no key with prefix {prefix:?}"),
                )
            };
            match op {
                PatchOp::Upsert { key } => {
                    let mini = Policy {
                        settings: base.settings.clone(),
                        ipsets: key
                            .ipsets
                            .iter()
                            .filter_map(|n| base.ipsets.get_key_value(n))
                            .map(|(n, c)| (n.clone(), c.clone()))
                            .collect(),
                        key: vec![key.clone()],
                        // Listeners decide some key rules (lower-case prefixes for tls-sni).
                        listener: base.listener.clone(),
                        ..Default::default()
                    };
                    match mini.compile() {
                        Ok(mut c) => {
                            let ck = c.keys.pop_first().map(|(_, ck)| ck);
                            after.insert(&key.prefix, Some((key.clone(), ck)));
                        }
                        Err(found) => errs.extend(found.into_iter().map(|e| PolicyError {
                            at: match e.at.strip_prefix("key[0]") {
                                Some(tail) => format!("ops[{n}].key{tail}"),
                                None => e.at,
                            },
                            message: e.message,
                        })),
                    }
                }
                PatchOp::Delete { prefix } => match current(&after, prefix) {
                    Some(_) => {
                        after.insert(prefix, None);
                    }
                    None => errs.push(missing(prefix)),
                },
                PatchOp::Lock { prefix } | PatchOp::Unlock { prefix } => {
                    match current(&after, prefix) {
                        Some(mut k) => {
                            k.locked = matches!(op, PatchOp::Lock { .. });
                            // Recompiled below from the record it had (only the flag moves).
                            after.insert(prefix, Some((k, None)));
                        }
                        None => errs.push(missing(prefix)),
                    }
                }
                PatchOp::SetIpset { .. } | PatchOp::DeleteIpset { .. } => {
                    unreachable!("can_patch_keys")
                }
            }
        }
        if !errs.is_empty() {
            return Err(PatchFailure::Invalid(errs));
        }

        // Kernel form of the result: the cached compile with the named keys replaced.
        let compiled = self.compiled.as_mut().expect("can_patch_keys");
        let mut undo: Vec<(KeyPrefix, Option<CompiledKey>)> = Vec::new();
        let mut changed = BTreeSet::new();
        let mut open_delta: isize = 0;
        for (prefix, new) in &after {
            let kp = crate::policy::key_prefix(prefix);
            changed.insert(kp);
            if let Some(&i) = self.index.get(*prefix) {
                open_delta -= is_open(&base.key[i]) as isize;
            }
            let old = match new {
                None => compiled.keys.remove(&kp),
                Some((k, ck)) => {
                    open_delta += is_open(k) as isize;
                    let ck = match ck {
                        Some(ck) => ck.clone(),
                        None => {
                            // A lock or unlock of a key that was valid: its record with the
                            // lock flag set or cleared.
                            let mut ck = compiled
                                .keys
                                .get(&kp)
                                .cloned()
                                .expect("a present key is compiled");
                            if k.locked {
                                ck.flags |= filter_common::KEY_LOCKED;
                            } else {
                                ck.flags &= !filter_common::KEY_LOCKED;
                            }
                            ck
                        }
                    };
                    compiled.keys.insert(kp, ck)
                }
            };
            undo.push((kp, old));
        }
        let open_after = (self.open_keys as isize + open_delta) as usize;
        let mut locked_delta: isize = 0;
        for (prefix, new) in &after {
            if let Some(&i) = self.index.get(*prefix) {
                locked_delta -= base.key[i].locked as isize;
            }
            if let Some((k, _)) = new {
                locked_delta += k.locked as isize;
            }
        }
        let old_flags = compiled.settings.flags;
        let prefilter = base.settings.prefilter
            && !(base.settings.unbound_keys == crate::policy::Verdict::Pass && open_after > 0);
        if prefilter {
            compiled.settings.flags |= filter_common::SETTING_PREFILTER;
        } else {
            compiled.settings.flags &= !filter_common::SETTING_PREFILTER;
        }
        let rep = match self.mirror.apply_changes(
            &mut self.dp.maps,
            compiled,
            Some(&changed),
            self.key_cap,
        ) {
            Ok(rep) => rep,
            Err(e) => {
                // The live slot is untouched; put the cached compile back as it was.
                compiled.settings.flags = old_flags;
                for (kp, old) in undo {
                    match old {
                        Some(ck) => compiled.keys.insert(kp, ck),
                        None => compiled.keys.remove(&kp),
                    };
                }
                return Err(PatchFailure::Apply(e));
            }
        };

        // The maps enforce it: change the applied policy in place, as apply_patch would.
        let a = self.applied.as_mut().expect("checked");
        state::replay_ops_indexed(&mut a.policy, &mut self.index, &patch.ops).map_err(|m| {
            PatchFailure::Apply(anyhow::anyhow!("replaying a validated patch: {m}"))
        })?;
        self.open_keys = open_after;
        self.locked_keys = (self.locked_keys as isize + locked_delta) as usize;
        a.revision = patch.revision;
        a.policy.revision = Some(patch.revision);
        a.source = source.to_owned();
        a.applied_unix = state::now_unix();
        let t_save = Instant::now();
        self.journal_len += 1;
        let saved = state::append_journal(
            &self.state_dir,
            &state::JournalEntry {
                revision: patch.revision,
                source: source.to_owned(),
                applied_unix: a.applied_unix,
                ops: patch.ops.clone(),
            },
        );
        log::debug!(
            "revision {} (keys only): maps {:?}, journal {:?}",
            patch.revision,
            rep.elapsed,
            t_save.elapsed()
        );
        self.last_patch = Some(patch.clone());
        self.publish();
        saved
            .context("the maps enforce it, but saving it to the state dir failed")
            .map_err(PatchFailure::Apply)?;
        Ok(rep)
    }

    /// Brings the inactive slot up to the live policy after a whole-policy apply (same
    /// content, one more flip). Without it the next PATCH would pay for every key the
    /// inactive slot lags on (seconds at 1M keys); with it a lock costs its one key.
    pub fn settle(&mut self) -> Result<()> {
        if !self.unsettled {
            return Ok(());
        }
        let Some(c) = &self.compiled else {
            return Ok(());
        };
        let rep = self.mirror.apply_changes(
            &mut self.dp.maps,
            c,
            Some(&BTreeSet::new()),
            self.key_cap,
        )?;
        self.unsettled = false;
        log::debug!(
            "settled the inactive slot: {} keys written in {:?}",
            rep.keys_written,
            rep.elapsed
        );
        Ok(())
    }

    /// True when the journal is long enough to fold into a snapshot.
    pub fn wants_compaction(&self) -> bool {
        self.journal_len >= JOURNAL_COMPACT
    }

    /// Folds the journal into a fresh snapshot of the applied policy, all at once.
    pub fn compact(&mut self) -> Result<()> {
        match self.begin_fold()? {
            Some(f) => f.finish(),
            None => Ok(()),
        }
    }

    /// Starts a fold under the engine lock: moves the journal aside and serialises the
    /// applied policy (the only part that grows with the policy). `Fold::finish` writes it
    /// without the lock, so writers wait for the serialisation only, not for the disk.
    pub fn begin_fold(&mut self) -> Result<Option<Fold>> {
        if self.journal_len == 0 || self.fold_busy.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(a) = &self.applied else {
            return Ok(None);
        };
        let t0 = Instant::now();
        state::rotate_journal(&self.state_dir)?;
        let bytes = serde_json::to_vec(a)?;
        let lines = std::mem::take(&mut self.journal_len);
        self.fold_busy.store(true, Ordering::SeqCst);
        log::debug!(
            "fold of {lines} journal lines: serialised in {:?}",
            t0.elapsed()
        );
        Ok(Some(Fold {
            bytes,
            lines,
            state_dir: self.state_dir.clone(),
            busy: self.fold_busy.clone(),
        }))
    }

    /// Waits for a fold being written (a whole snapshot must not be overtaken by an older one).
    fn wait_fold(&self) {
        while self.fold_busy.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Writes an already validated policy. `changed` (from a PATCH) names every key that may
    /// differ from the live policy, so only those are written; None examines every key.
    /// Returns once the kernel enforces it and the state dir holds it.
    pub fn apply_compiled(
        &mut self,
        mut p: Policy,
        mut compiled: Compiled,
        changed: Option<&BTreeSet<KeyPrefix>>,
        revision: u64,
        source: &str,
        persist: Persist<'_>,
    ) -> Result<crate::dataplane::ApplyReport> {
        // --audit overrides what the policy says in the kernel only: the stored policy stays
        // as written, so reads and retries see what the writer sent.
        if self.audit {
            compiled.settings.flags &= !filter_common::SETTING_ENFORCE;
        }
        let rep = self
            .mirror
            .apply_changes(&mut self.dp.maps, &compiled, changed, self.key_cap)?;
        p.revision = Some(revision);
        let applied = Applied {
            revision,
            source: source.to_owned(),
            applied_unix: state::now_unix(),
            policy: p,
        };
        self.last_patch = None;
        self.index = applied
            .policy
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| (k.prefix.clone(), i))
            .collect();
        self.open_keys = applied.policy.key.iter().filter(|k| is_open(k)).count();
        self.locked_keys = applied.policy.key.iter().filter(|k| k.locked).count();
        self.compiled = Some(compiled);
        self.unsettled = changed.is_none();
        let t_save = Instant::now();
        let saved = match persist {
            Persist::Snapshot => {
                self.journal_len = 0;
                self.wait_fold();
                state::save_applied(&self.state_dir, &applied)
            }
            Persist::Restored => {
                self.journal_len = state::journal_lines(&self.state_dir);
                Ok(())
            }
            Persist::Journal(patch) => {
                self.journal_len += 1;
                state::append_journal(
                    &self.state_dir,
                    &state::JournalEntry {
                        revision,
                        source: source.to_owned(),
                        applied_unix: applied.applied_unix,
                        ops: patch.ops.clone(),
                    },
                )
            }
        };
        log::debug!(
            "revision {revision}: maps {:?}, state dir {:?}",
            rep.elapsed,
            t_save.elapsed()
        );
        self.applied = Some(applied);
        self.publish();
        saved.context("the maps enforce it, but saving it to the state dir failed")?;
        Ok(rep)
    }
}

/// Watches the policy file at the cost of one `stat` per poll: the file is read (and hashed)
/// only when its size, mtime, ctime or inode moved, and parsed only when its bytes changed.
#[derive(Default)]
struct FileWatch {
    meta: Option<(SystemTime, i64, i64, u64, u64)>,
    hash: Option<u64>,
}

impl FileWatch {
    /// The file's text if it changed since the last call (None: unchanged or unreadable).
    fn changed(&mut self, p: &Path) -> Option<String> {
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

fn parse_policy_file(p: &Path, text: &str) -> Result<Policy> {
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

pub fn run(o: RunOptions) -> Result<()> {
    if o.ifaces.is_empty() {
        bail!("keywall run needs at least one --iface");
    }
    o.api.check()?;
    if o.policy.is_some() && o.etcd.is_some() {
        bail!("--policy and --etcd are exclusive: a daemon has one policy source");
    }
    if let Some(e) = &o.etcd {
        e.check()?;
    } else {
        crate::etcd::forget(&o.state_dir);
    }
    std::fs::create_dir_all(&o.state_dir)
        .with_context(|| format!("creating state dir {}", o.state_dir.display()))?;
    let dp = Dataplane::load(&o.pin_dir, o.capacity)?;
    let mirror = Mirror::read(&dp.maps).context("reading the pinned maps")?;
    let mut eng = Engine {
        dp,
        mirror,
        applied: None,
        state_dir: o.state_dir.clone(),
        audit: o.audit,
        key_cap: o.capacity.keys,
        last_patch: None,
        journal_len: 0,
        compiled: None,
        index: HashMap::new(),
        open_keys: 0,
        locked_keys: 0,
        unsettled: false,
        published: Arc::new(Mutex::new(None)),
        fold_busy: Arc::new(AtomicBool::new(false)),
    };
    let metrics = Arc::new(Metrics::new(o.pin_dir.clone(), eng.published.clone()));

    // 1. Restore the last applied policy before anything is attached or taken over.
    if let Err(e) = state::repair_journal(&o.state_dir) {
        log::error!("repairing the policy journal: {e:#}");
    }
    let t_restore = Instant::now();
    match state::load_applied(&o.state_dir) {
        Ok(Some(a)) => {
            let (revision, source) = (a.revision, a.source.clone());
            log::info!("read the applied policy in {:?}", t_restore.elapsed());
            let rep = eng.restore(a.policy, revision, &source)?;
            log::info!(
                "restored revision {revision} ({source}) from {} in {:?}: generation {}",
                o.state_dir.display(),
                t_restore.elapsed(),
                rep.generation
            );
        }
        Ok(None) => log::info!("no applied policy in {}", o.state_dir.display()),
        Err(e) => log::error!("ignoring unreadable state: {e:#}"),
    }

    // 2. The policy file, if it differs; a bad file keeps what was restored.
    let mut watch = FileWatch::default();
    let mut runtime = Runtime {
        pid: std::process::id(),
        pin_dir: o.pin_dir.display().to_string(),
        audit_override: o.audit,
        ..Default::default()
    };
    if let Some(p) = &o.policy {
        let parsed = match watch.changed(p) {
            Some(text) => parse_policy_file(p, &text),
            None => Err(anyhow::anyhow!("cannot read {}", p.display())),
        };
        apply_file(&mut eng, p, parsed, &mut runtime, &metrics);
        if eng.applied.is_none() {
            // Nothing to enforce and nothing to fall back to: refuse rather than attach a
            // filter that passes everything.
            bail!(
                "no policy to enforce: {} was rejected and the state dir has none ({})",
                p.display(),
                runtime.policy_error.as_deref().unwrap_or("unreadable")
            );
        }
    } else if eng.applied.is_none() && o.etcd.is_some() {
        log::warn!("no policy yet: the filter passes everything until etcd's is applied");
    } else if eng.applied.is_none() {
        log::warn!("no policy yet: the filter passes everything until one is PUT over the API");
    }
    metrics.set_policy(&eng);
    if let Err(e) = eng.settle() {
        log::error!("settling the inactive slot: {e:#}");
    }

    // 3. The API and metrics listeners, bound before attaching so a bad address fails early.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keywall-api")
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    let api_listener = rt.block_on(api::bind(&o.api))?;
    let metrics_listener = match &o.metrics {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr.as_str()))
                .with_context(|| format!("binding --metrics {addr}"))?,
        ),
        None => None,
    };

    // 4. Attach, or take over the pinned links without a gap.
    let previous = state::load_runtime(&o.state_dir);
    for ifn in &o.ifaces {
        let mut mode = eng.dp.attach(ifn, &o.xdp_mode)?;
        if mode == "takeover" {
            // The link keeps the mode it was created with; the last daemon recorded it.
            mode = previous
                .as_ref()
                .and_then(|r| r.ifaces.get(ifn).cloned())
                .unwrap_or_else(|| "unknown".into());
            log::info!("took over the pinned link on {ifn} ({mode}) without a gap");
        } else {
            log::info!("attached to {ifn} ({mode})");
        }
        runtime.ifaces.insert(ifn.clone(), mode);
    }
    eng.dp.pin_program()?;
    state::save_runtime(&o.state_dir, &runtime)?;

    // 5. Serve: drop events, the API, metrics.
    let (events_tx, _) = tokio::sync::broadcast::channel(4096);
    let events_error = match crate::events::open_ring(&o.pin_dir) {
        Ok(ring) => {
            let tx = events_tx.clone();
            std::thread::Builder::new()
                .name("keywall-events".into())
                .spawn(move || {
                    if let Err(e) = crate::events::pump(ring, tx, &STOP) {
                        log::error!("drop events stopped: {e:#}");
                    }
                })?;
            None
        }
        Err(e) => {
            log::warn!("{e:#}");
            Some(format!("{e:#}"))
        }
    };
    let source = match (&o.policy, &o.etcd) {
        (Some(p), _) => Source::File(p.clone()),
        (None, Some(e)) => Source::Etcd(e.prefix.clone()),
        (None, None) => Source::Api,
    };
    metrics.set_sync(
        source.kind(),
        source.kind() == "api" || runtime.policy_error.is_none(),
    );
    let shared = Arc::new(Shared {
        published: eng.published.clone(),
        engine: Mutex::new(eng),
        runtime: Mutex::new(runtime),
        source,
        pin_dir: o.pin_dir.clone(),
        state_dir: o.state_dir.clone(),
        metrics: metrics.clone(),
        events: events_tx,
        events_error,
        max_body: o.api.max_body,
    });
    log::info!("API on {}", o.api.addr);
    rt.spawn(api::serve(api_listener, shared.clone()));
    if let Some(e) = o.etcd.clone() {
        crate::etcd::spawn(e, shared.clone())?;
    }
    if let Some(l) = metrics_listener {
        log::info!(
            "metrics on http://{}/metrics",
            o.metrics.as_deref().unwrap_or("")
        );
        rt.spawn(api::serve_metrics(l, metrics.clone()));
    }

    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    log::info!(
        "enforcing; policy generation {}; policy source: {}",
        shared.engine.lock().unwrap().mirror.generation(),
        shared.source.describe()
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(o.poll);
        if let Some(p) = &o.policy {
            if let Some(text) = watch.changed(p) {
                // Parsed before the engine is locked: readers and the API go on meanwhile.
                let parsed = parse_policy_file(p, &text);
                drop(text);
                let mut eng = shared.engine.lock().unwrap();
                let mut runtime = shared.runtime.lock().unwrap();
                apply_file(&mut eng, p, parsed, &mut runtime, &metrics);
                // Report the outcome as soon as the maps enforce it; settling the inactive
                // slot afterwards changes no verdict.
                metrics.set_sync("file", runtime.policy_error.is_none());
                state::save_runtime(&o.state_dir, &runtime)?;
                if let Err(e) = eng.settle() {
                    log::error!("settling the inactive slot: {e:#}");
                }
            }
        }
    }
    rt.shutdown_background();
    api::remove_socket(&o.api);
    // The links stay pinned: the program keeps enforcing after the daemon exits.
    log::info!("stopping; XDP stays attached and enforcing (keywall detach removes it)");
    Ok(())
}

/// The revision a file gets: its own `revision` if it says one, else one past the applied.
pub fn file_revision(file_rev: Option<u64>, applied: u64) -> u64 {
    file_rev.unwrap_or(applied + 1)
}

/// The ops that turn the applied policy into `pol`, when only keys differ (settings,
/// listeners and ipsets equal) and few enough of them do: None means a whole apply.
/// Costs one comparison per key, no compile.
fn key_diff(eng: &Engine, pol: &Policy) -> Option<Vec<PatchOp>> {
    let a = eng.applied.as_ref()?;
    eng.compiled.as_ref()?;
    if pol.settings != a.policy.settings
        || pol.listener != a.policy.listener
        || pol.ipsets != a.policy.ipsets
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
        match eng.key(&k.prefix) {
            Some(old) if old == k => {}
            Some(old)
                if Key {
                    locked: k.locked,
                    ..old.clone()
                } == *k =>
            {
                ops.push(if k.locked {
                    PatchOp::Lock {
                        prefix: k.prefix.clone(),
                    }
                } else {
                    PatchOp::Unlock {
                        prefix: k.prefix.clone(),
                    }
                })
            }
            _ => ops.push(PatchOp::Upsert { key: k.clone() }),
        }
        if ops.len() > limit {
            return None;
        }
    }
    if eng.index.len() + ops.len() > seen.len() {
        for k in &a.policy.key {
            if !seen.contains(k.prefix.as_str()) {
                ops.push(PatchOp::Delete {
                    prefix: k.prefix.clone(),
                });
                if ops.len() > limit {
                    return None;
                }
            }
        }
    }
    Some(ops)
}

fn apply_file(
    eng: &mut Engine,
    p: &Path,
    parsed: Result<Policy>,
    runtime: &mut Runtime,
    metrics: &Metrics,
) {
    let source = format!("file:{}", p.display());
    let t0 = Instant::now();
    let res = parsed.and_then(|pol| {
        let rev = file_revision(pol.revision, eng.revision());
        // Only keys changed: apply them as a PATCH, at the cost of the keys that changed.
        if let Some(ops) = key_diff(eng, &pol) {
            let same = pol.revision.is_none_or(|r| r == eng.revision())
                && eng.applied.as_ref().is_some_and(|a| a.source == source);
            if ops.is_empty() && same {
                return Ok(None);
            }
            let patch = Patch { revision: rev, ops };
            match eng.patch_keys(&patch, &source) {
                Ok(rep) => return Ok(Some((rep, rev))),
                // Invalid: the whole path below reports every error with its place.
                Err(PatchFailure::Invalid(_)) => {}
                Err(PatchFailure::Apply(e)) => return Err(e),
            }
        }
        eng.apply(pol, rev, &source).map(|r| Some((r, rev)))
    });
    match res {
        Ok(Some((rep, rev))) => {
            log::info!(
                "applied {} as revision {rev} (generation {}, {} keys written, {:?})",
                p.display(),
                rep.generation,
                rep.keys_written,
                rep.elapsed
            );
            runtime.policy_error = None;
            metrics.update("file", "applied");
            metrics.apply_seconds.observe(t0.elapsed().as_secs_f64());
            metrics.set_policy(eng);
        }
        Ok(None) => runtime.policy_error = None,
        Err(e) => {
            log::error!("policy file rejected, the running policy stays: {e:#}");
            runtime.policy_error = Some(format!("{e:#}"));
            metrics.update("file", "rejected");
        }
    }
}
