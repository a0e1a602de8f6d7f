//! The policy engine: the one write path under every source (the API, the policy file,
//! etcd). A source turns its input into a change (a whole policy, or named key and ipset
//! ops) and calls [`Engine::submit`]; the engine alone checks the revision, validates what
//! changed, writes through the dataplane, persists (snapshot or journal), publishes the
//! figures readers use (status, metrics) and records the outcome in metrics.
//! `Engine::settle` and the journal fold run after a write is answered.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use filter_common::KeyPrefix;

use crate::{
    dataplane::{ApplyReport, Dataplane, Mirror},
    metrics::Metrics,
    policy::{Compiled, Key, Patch, PatchOp, Policy, PolicyError, Verdict, key_prefix},
    state::{self, PolicyStatus},
};

pub mod store;
pub use store::KeyStore;

/// The applied policy, compact: everything but the keys as parsed, the keys in a
/// [`KeyStore`] (one copy of each key, as JSON; the kernel form lives in the mirror).
pub struct Live {
    pub revision: u64,
    /// `file:PATH`, `api` or `etcd`: the one source that owns the policy.
    pub source: String,
    pub applied_unix: u64,
    /// The policy without its keys (`key` is empty): settings, listeners, ipsets.
    pub head: Policy,
    pub keys: KeyStore,
}

impl Live {
    fn new(mut p: Policy, revision: u64, source: &str) -> Live {
        p.revision = Some(revision);
        let keys = KeyStore::from_keys(std::mem::take(&mut p.key));
        Live {
            revision,
            source: source.to_owned(),
            applied_unix: state::now_unix(),
            head: p,
            keys,
        }
    }

    /// The whole policy, materialised (a million keys parsed: for rare callers only).
    pub fn policy(&self) -> Policy {
        Policy {
            key: self.keys.iter().collect(),
            ..self.head.clone()
        }
    }

    /// The whole policy as JSON (what `GET /v1/policy` answers), from the stored keys'
    /// bytes: nothing is parsed or serialised per key.
    pub fn policy_json(&self) -> Vec<u8> {
        let head = serde_json::to_vec(&Policy {
            revision: Some(self.revision),
            key: Vec::new(),
            ..self.head.clone()
        })
        .expect("a policy serialises");
        // Splice the keys into the empty list (the last one: every string before it is
        // escaped, so `"key":[]` cannot occur inside one).
        const EMPTY: &[u8] = b"\"key\":[]";
        let at = head
            .windows(EMPTY.len())
            .rposition(|w| w == EMPTY)
            .expect("a policy has a key list")
            + EMPTY.len()
            - 2;
        let mut out = Vec::with_capacity(head.len() + self.keys.heap_bytes());
        out.extend_from_slice(&head[..at]);
        self.keys.write_json_array(&mut out);
        out.extend_from_slice(&head[at + 2..]);
        out
    }

    /// The state dir's snapshot: `state::Applied`'s serialisation, byte for byte.
    pub fn snapshot_json(&self) -> Vec<u8> {
        let mut out = format!(
            "{{\"revision\":{},\"source\":{},\"applied_unix\":{},\"policy\":",
            self.revision,
            serde_json::to_string(&self.source).expect("a string serialises"),
            self.applied_unix
        )
        .into_bytes();
        out.extend_from_slice(&self.policy_json());
        out.push(b'}');
        out
    }
}

/// The kernel settings' prefilter bit for `open` keys that pass from anywhere: while one
/// does under `unbound_keys = "pass"`, every source may be legitimate, so it stays off.
fn set_prefilter_flag(s: &mut filter_common::Settings, head: &Policy, open: usize) {
    let on = head.settings.prefilter && !(head.settings.unbound_keys == Verdict::Pass && open > 0);
    if on {
        s.flags |= filter_common::SETTING_PREFILTER;
    } else {
        s.flags &= !filter_common::SETTING_PREFILTER;
    }
}

/// The state dir's policy, read and made ready for [`Engine::restore`] off the engine (on a
/// thread of its own while the program loads and the pinned maps are read).
pub enum Restored {
    /// Likely already in the pinned maps: the compact store, built from the parsed keys.
    Live(Live),
    /// Not in the maps (no pins: a reboot; or another revision): parsed and compiled.
    Parsed(
        state::Applied,
        std::result::Result<Compiled, Vec<PolicyError>>,
    ),
}

impl Restored {
    /// `likely_in_maps`: the pins exist and the status file recorded this revision with as
    /// many keys (the engine checks the maps' generation and key count before trusting it).
    pub fn prepare(a: state::Applied, likely_in_maps: bool) -> Restored {
        if likely_in_maps {
            let mut live = Live::new(a.policy, a.revision, &a.source);
            live.applied_unix = a.applied_unix;
            Restored::Live(live)
        } else {
            let c = a.policy.compile();
            Restored::Parsed(a, c)
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            Restored::Live(l) => l.revision,
            Restored::Parsed(a, _) => a.revision,
        }
    }

    pub fn source(&self) -> &str {
        match self {
            Restored::Live(l) => &l.source,
            Restored::Parsed(a, _) => &a.source,
        }
    }

    pub fn keys(&self) -> usize {
        match self {
            Restored::Live(l) => l.keys.len(),
            Restored::Parsed(a, _) => a.policy.key.len(),
        }
    }
}

/// `Policy::compile` for a whole policy, on two threads when it is big: each half of the keys
/// is compiled with the rest of the policy, and the halves are merged. The result is the
/// serial compile's; on any error (a duplicate across the halves included) the policy is
/// compiled again serially, so errors keep their places and order.
pub fn compile_whole(p: &mut Policy) -> std::result::Result<Compiled, Vec<PolicyError>> {
    compile_split(p, 1 << 16)
}

fn compile_split(
    p: &mut Policy,
    min_keys: usize,
) -> std::result::Result<Compiled, Vec<PolicyError>> {
    if p.key.len() < min_keys.max(2) {
        return p.compile();
    }
    let keys = std::mem::take(&mut p.key);
    let mut q = p.clone();
    p.key = keys;
    q.key = p.key.split_off(p.key.len() / 2);
    let (a, b) = std::thread::scope(|sc| {
        let second = sc.spawn(|| q.compile());
        let first = p.compile();
        (
            first,
            second.join().expect("compiling half a policy panicked"),
        )
    });
    p.key.append(&mut q.key);
    let (Ok(mut a), Ok(mut b)) = (a, b) else {
        return p.compile();
    };
    let (na, nb) = (a.keys.len(), b.keys.len());
    a.keys.append(&mut b.keys);
    if a.keys.len() != na + nb {
        return p.compile(); // a prefix in both halves: the serial compile places it
    }
    // Each half turned the prefilter off if one of its keys passes from anywhere.
    let pf = filter_common::SETTING_PREFILTER;
    a.settings.flags = (a.settings.flags & !pf) | (a.settings.flags & b.settings.flags & pf);
    Ok(a)
}

/// Returns freed heap to the kernel: after a million keys were parsed and compiled, glibc
/// keeps hundreds of MB of free chunks otherwise (the daemon's RSS must stay small).
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// The daemon's policy engine: the applied policy, its mirror in the maps, and persistence.
/// One per daemon, behind a mutex: every writer (the file, the API) goes through it in turn.
pub struct Engine {
    pub dp: Dataplane,
    pub mirror: Mirror,
    pub applied: Option<Live>,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub key_cap: u32,
    /// The last PATCH applied (revision and ops), so its retry is recognised as a no-op.
    pub last_patch: Option<Patch>,
    /// PATCHes in the state dir's journal since the last snapshot.
    pub journal_len: usize,
    /// The applied policy in kernel form *without its keys* (settings, listeners, ipsets):
    /// a PATCH compiles only the keys it names, and keys it leaves alone keep the records
    /// the mirror holds.
    pub compiled: Option<Compiled>,
    /// Locked keys by `lock_reason` (for status), kept with every write.
    pub lock_reasons: crate::risk::LockReasons,
    /// A whole-policy apply left the inactive slot behind on (possibly) every key.
    pub unsettled: bool,
    /// The applied policy's figures for readers (status, metrics), updated with every write
    /// so that reading them never takes the engine lock or walks the policy.
    pub published: Arc<Mutex<Option<PolicyStatus>>>,
    /// A fold's snapshot is being written (off the lock).
    pub fold_busy: Arc<AtomicBool>,
    /// Where each submit's outcome is counted (None in tests without a daemon).
    pub metrics: Option<Arc<Metrics>>,
}

/// What a source submits.
pub enum Change {
    /// A whole policy, validated and compiled (by the caller, before taking the lock: at 1M
    /// keys validation is the expensive part).
    Policy(Box<Policy>, Box<Compiled>),
    /// Named changes: key upserts, deletes, locks and unlocks, ipset changes (PATCH ops).
    Ops(Vec<PatchOp>),
}

/// How a submitted change's revision is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rev {
    /// The writer's revision (the API): greater than the applied one applies; equal with the
    /// same content is a retry that changes nothing; anything else conflicts.
    Conditional(u64),
    /// Unconditional (an API PATCH without a revision): the applied revision + 1, unless the
    /// change already holds.
    Next,
    /// A source that owns its revisions (the file, etcd): taken as given.
    Set(u64),
}

/// A submit that was answered 200.
#[derive(Clone, Copy, Debug)]
pub enum Submitted {
    Applied { revision: u64, report: ApplyReport },
    Unchanged { revision: u64 },
}

/// A submit that changed nothing.
pub enum Refused {
    /// 409: the revision is not greater than the applied one.
    Conflict { applied: u64, why: String },
    /// 400: what the change brings is invalid, each error with its place.
    Invalid(Vec<PolicyError>),
    /// 500: the maps could not be written (the live policy is unchanged), or persisting failed.
    Failed(anyhow::Error),
}

/// What a write does under the revision rules (docs/REFERENCE.md "Control-plane API").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Apply,
    /// A retry of what is applied: 200, nothing changes.
    Unchanged,
    Conflict,
}

/// `incoming` greater than `applied` applies; equal with the same content is a no-op retry;
/// anything else conflicts.
pub fn decide(applied: u64, incoming: u64, same_content: impl FnOnce() -> bool) -> Decision {
    if incoming > applied {
        Decision::Apply
    } else if incoming == applied && same_content() {
        Decision::Unchanged
    } else {
        Decision::Conflict
    }
}

/// The keys a PATCH can change (the rest keep their records); None when it changes ipsets,
/// which every key bound to them follows.
pub fn patch_prefixes(p: &Patch) -> Option<BTreeSet<KeyPrefix>> {
    let mut out = BTreeSet::new();
    for op in &p.ops {
        match op {
            PatchOp::Upsert { key } => {
                out.insert(key_prefix(&key.prefix));
            }
            PatchOp::Delete { prefix }
            | PatchOp::Lock { prefix, .. }
            | PatchOp::Unlock { prefix } => {
                out.insert(key_prefix(prefix));
            }
            PatchOp::SetIpset { .. } | PatchOp::DeleteIpset { .. } => return None,
        }
    }
    Some(out)
}

/// Why a PATCH was not applied.
pub enum PatchFailure {
    /// 400: what the ops brought in is invalid, with places (`ops[2].key.allow[0]`).
    Invalid(Vec<PolicyError>),
    /// 500: the maps could not be written (the live policy is unchanged) or persisting failed.
    Apply(anyhow::Error),
}

fn is_open(k: &Key) -> bool {
    !k.locked_for_good() && k.allow.is_empty() && k.ipsets.is_empty()
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
    /// Writes the snapshot on a thread of its own, for a writer that must not wait for it
    /// (etcd's watch: at 1M keys the write and its fsync take about a second).
    pub fn finish_later(self) {
        let spawned = std::thread::Builder::new()
            .name("keywall-fold".into())
            .spawn(move || {
                if let Err(e) = self.finish() {
                    log::error!("writing a policy snapshot: {e:#}");
                }
            });
        if let Err(e) = spawned {
            log::error!("starting the snapshot writer: {e}");
        }
    }

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
    /// The one write path. Judges the revision, validates what changed (the named keys only
    /// for key ops), writes the maps, persists, publishes, and counts the outcome in
    /// `policy_updates_total{source, result}` and `policy_apply_seconds`. `source` is `api`,
    /// `file:PATH` or `etcd`. On any refusal nothing live changes.
    pub fn submit(
        &mut self,
        change: Change,
        rev: Rev,
        source: &str,
    ) -> std::result::Result<Submitted, Refused> {
        let t0 = Instant::now();
        let r = match change {
            Change::Policy(p, c) => self.submit_policy(*p, *c, rev, source),
            Change::Ops(ops) => self.submit_ops(ops, rev, source),
        };
        if let Some(m) = &self.metrics {
            let kind = source.split(':').next().unwrap_or(source);
            let result = match &r {
                Ok(Submitted::Applied { .. }) => "applied",
                Ok(Submitted::Unchanged { .. }) => "unchanged",
                Err(Refused::Conflict { .. }) => "conflict",
                Err(Refused::Invalid(_)) => "rejected",
                Err(Refused::Failed(_)) => "error",
            };
            m.update(kind, result);
            if result == "applied" {
                m.apply_seconds.observe(t0.elapsed().as_secs_f64());
                self.publish_metrics(m);
            }
        }
        r
    }

    fn conflict(&self, incoming: u64) -> Refused {
        let applied = self.revision();
        Refused::Conflict {
            applied,
            why: format!("revision {incoming} is not greater than the applied revision {applied}"),
        }
    }

    fn submit_policy(
        &mut self,
        p: Policy,
        compiled: Compiled,
        rev: Rev,
        source: &str,
    ) -> std::result::Result<Submitted, Refused> {
        let applied = self.revision();
        // The same content, whatever the revision (field by field, keys in order, against
        // the stored bytes: no copy of the policy).
        let same = |eng: &Engine| {
            eng.applied.as_ref().is_some_and(|a| {
                let q = &a.head;
                q.settings == p.settings
                    && q.listener == p.listener
                    && q.ipsets == p.ipsets
                    && a.keys.len() == p.key.len()
                    && a.keys.iter_raw().zip(&p.key).all(|(raw, k)| {
                        serde_json::to_vec(k).is_ok_and(|b| b == raw)
                            || serde_json::from_slice::<Key>(raw).is_ok_and(|q| q == *k)
                    })
            })
        };
        let revision = match rev {
            Rev::Conditional(r) => match decide(applied, r, || same(self)) {
                Decision::Apply => r,
                Decision::Unchanged => return Ok(Submitted::Unchanged { revision: applied }),
                Decision::Conflict => return Err(self.conflict(r)),
            },
            Rev::Next if same(self) => return Ok(Submitted::Unchanged { revision: applied }),
            Rev::Next => applied + 1,
            Rev::Set(r) => r,
        };
        self.apply_compiled(p, compiled, None, revision, source, Persist::Snapshot)
            .map(|report| Submitted::Applied { revision, report })
            .map_err(Refused::Failed)
    }

    fn submit_ops(
        &mut self,
        ops: Vec<PatchOp>,
        rev: Rev,
        source: &str,
    ) -> std::result::Result<Submitted, Refused> {
        let applied = self.revision();
        let revision = match rev {
            Rev::Conditional(r) => {
                let d = decide(applied, r, || {
                    // A retry: the very patch applied last, or ops that already hold.
                    self.last_patch.as_ref().is_some_and(|p| p.ops == ops) || self.ops_hold(&ops)
                });
                match d {
                    Decision::Apply => r,
                    Decision::Unchanged => return Ok(Submitted::Unchanged { revision: applied }),
                    Decision::Conflict => return Err(self.conflict(r)),
                }
            }
            Rev::Next if self.ops_hold(&ops) => {
                return Ok(Submitted::Unchanged { revision: applied });
            }
            Rev::Next => applied + 1,
            Rev::Set(r) => r,
        };
        let patch = Patch { revision, ops };
        // Locks, unlocks and key upserts cost the keys they name; ipset changes (which every
        // key bound to the set follows) and the very first policy take the whole path.
        if self.can_patch_keys(&patch) {
            return match self.patch_keys(&patch, source) {
                Ok(report) => Ok(Submitted::Applied { revision, report }),
                Err(PatchFailure::Invalid(errs)) => Err(Refused::Invalid(errs)),
                Err(PatchFailure::Apply(e)) => Err(Refused::Failed(e)),
            };
        }
        // Ipset changes reach every key bound to the set: the whole policy is materialised,
        // patched, validated and applied (rare next to key changes).
        let base = self
            .applied
            .as_ref()
            .map(|a| a.policy())
            .unwrap_or_default();
        let next = base.apply_patch(&patch).map_err(Refused::Invalid)?;
        let compiled = next.compile().map_err(Refused::Invalid)?;
        let changed = patch_prefixes(&patch);
        let report = self
            .apply_compiled(
                next,
                compiled,
                changed.as_ref(),
                revision,
                source,
                Persist::Journal(&patch),
            )
            .map_err(Refused::Failed)?;
        self.last_patch = Some(patch);
        Ok(Submitted::Applied { revision, report })
    }

    /// Records the applied policy's figures for readers, in memory and in the state dir (for
    /// `keywall status` while the daemon is down).
    pub fn publish(&self) {
        let Some(a) = &self.applied else { return };
        let st = PolicyStatus {
            revision: a.revision,
            source: a.source.clone(),
            applied_unix: a.applied_unix,
            keys: a.keys.len() as u64,
            locked_keys: a.keys.locked() as u64,
            lock_reasons: self.lock_reasons.top(20),
            fill: self.mirror.fill(),
            generation: self.mirror.generation(),
            audit: self.audit,
        };
        if let Err(e) = state::save_policy_status(&self.state_dir, &st) {
            log::warn!("writing the policy status: {e:#}");
        }
        *self.published.lock().unwrap() = Some(st);
    }

    /// Records the applied policy's figures in `m` (revision, keys, locked keys).
    pub fn publish_metrics(&self, m: &Metrics) {
        let a = self.applied.as_ref();
        m.set_policy(
            self.revision(),
            a.map_or(0, |a| a.keys.len()),
            a.map_or(0, |a| a.keys.locked()),
        );
    }

    /// The applied revision (0 before anything was applied).
    pub fn revision(&self) -> u64 {
        self.applied.as_ref().map_or(0, |a| a.revision)
    }

    /// Writes the policy restored from the state dir (which already holds it).
    /// When the pinned maps are still at the generation the state dir recorded with this
    /// revision (a daemon restart over its own pins) and hold as many keys as the policy,
    /// they already enforce it: nothing is compiled or rewritten beyond the policy's head
    /// (settings, listeners, ipsets), and the inactive slot is settled later, off the
    /// restart's path. The expensive part ([`Restored::prepare`]) runs on another thread
    /// while the program loads and the maps are read.
    pub fn restore(&mut self, r: Restored) -> Result<ApplyReport> {
        let invalid =
            |errs: Vec<PolicyError>| anyhow::anyhow!("the restored policy is invalid: {}", errs[0]);
        let live = match r {
            Restored::Parsed(a, compiled) => {
                let compiled = compiled.map_err(invalid)?;
                return self.apply_inner(
                    a.policy,
                    compiled,
                    None,
                    a.revision,
                    &a.source,
                    Persist::Restored,
                    true,
                );
            }
            Restored::Live(live) => live,
        };
        let generation = self.mirror.generation();
        let in_maps = state::load_policy_status(&self.state_dir).is_some_and(|st| {
            st.revision == live.revision
                && st.generation != 0
                && st.generation == generation
                && st.audit == self.audit
                && st.keys == live.keys.len() as u64
        }) && self.mirror.key_count() == live.keys.len();
        if !in_maps {
            let p = live.policy();
            let compiled = p.compile().map_err(invalid)?;
            return self.apply_inner(
                p,
                compiled,
                None,
                live.revision,
                &live.source,
                Persist::Restored,
                true,
            );
        }
        log::info!(
            "the pinned maps already enforce revision {} (generation {generation})",
            live.revision
        );
        let mut compiled = live.head.compile().map_err(invalid)?;
        // So that the settle and the next PATCH examine only the keys that lag.
        self.mirror.adopt_ipsets(&compiled.ipsets);
        set_prefilter_flag(&mut compiled.settings, &live.head, live.keys.open());
        if self.audit {
            compiled.settings.flags &= !filter_common::SETTING_ENFORCE;
        }
        self.compiled = Some(compiled);
        self.last_patch = None;
        // The inactive slot may lag (a crash between a write and its settle).
        self.unsettled = true;
        self.journal_len = state::journal_lines(&self.state_dir);
        self.applied = Some(live);
        self.publish();
        trim_heap();
        Ok(ApplyReport {
            generation,
            slot: self.mirror.active_slot(),
            ..Default::default()
        })
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
    pub fn key(&self, prefix: &str) -> Option<Key> {
        self.applied.as_ref()?.keys.get(prefix)
    }

    /// True if every op is already true of the applied policy (a retried PATCH).
    pub fn ops_hold(&self, ops: &[PatchOp]) -> bool {
        let Some(a) = &self.applied else { return false };
        ops.iter().all(|op| match op {
            PatchOp::Upsert { key } => a.keys.same(key) == Some(true),
            PatchOp::Delete { prefix } => !a.keys.contains(prefix),
            PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                self.key(prefix)
                    .is_some_and(|k| k.lock_is(lock, reason, until))
            }
            PatchOp::SetIpset { name, cidrs } => a.head.ipsets.get(name) == Some(cidrs),
            PatchOp::DeleteIpset { name } => !a.head.ipsets.contains_key(name),
        })
    }

    /// Applies a keys-only PATCH (`can_patch_keys`) at the cost of the keys it names: each
    /// key it leaves present is validated and compiled on its own (against the settings,
    /// listeners and the ipsets it binds), only those are written, and the stored policy is
    /// changed once the maps enforce it. Same result as `Policy::apply_patch` + a full apply.
    pub fn patch_keys(
        &mut self,
        patch: &Patch,
        source: &str,
    ) -> std::result::Result<ApplyReport, PatchFailure> {
        let a = self.applied.as_ref().expect("can_patch_keys");
        let head = &a.head;
        // What each named key becomes (None: deleted), following the ops in order, and the
        // op that last wrote it (where its errors are placed).
        let mut after: HashMap<&str, (Option<Key>, usize)> = HashMap::new();
        let mut errs = Vec::new();
        for (n, op) in patch.ops.iter().enumerate() {
            let current = |after: &HashMap<&str, (Option<Key>, usize)>, p: &str| match after.get(p)
            {
                Some((v, _)) => v.clone(),
                None => a.keys.get(p),
            };
            let missing = |prefix: &str| {
                PolicyError::new(
                    format!("ops[{n}].prefix"),
                    format!("no key with prefix {prefix:?}"),
                )
            };
            match op {
                PatchOp::Upsert { key } => {
                    after.insert(&key.prefix, (Some(key.clone()), n));
                }
                PatchOp::Delete { prefix } => match current(&after, prefix) {
                    Some(_) => {
                        after.insert(prefix, (None, n));
                    }
                    None => errs.push(missing(prefix)),
                },
                PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                    match current(&after, prefix) {
                        Some(mut k) => {
                            let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                            k.set_lock(lock, reason, until);
                            let at = after.get(prefix.as_str()).map_or(n, |(_, at)| *at);
                            after.insert(prefix, (Some(k), at));
                        }
                        None => errs.push(missing(prefix)),
                    }
                }
                PatchOp::SetIpset { .. } | PatchOp::DeleteIpset { .. } => {
                    unreachable!("can_patch_keys")
                }
            }
        }
        // Each key that stays: validated and compiled alone, errors placed at its op.
        let mut keys = std::collections::BTreeMap::new();
        let mut changed = BTreeSet::new();
        let mut open_after = a.keys.open() as isize;
        for (prefix, (new, n)) in &after {
            let kp = key_prefix(prefix);
            changed.insert(kp);
            if let Some(old) = a.keys.get(prefix) {
                open_after -= is_open(&old) as isize;
            }
            let Some(k) = new else { continue };
            open_after += is_open(k) as isize;
            let mini = Policy {
                settings: head.settings.clone(),
                ipsets: k
                    .ipsets
                    .iter()
                    .filter_map(|n| head.ipsets.get_key_value(n))
                    .map(|(n, c)| (n.clone(), c.clone()))
                    .collect(),
                key: vec![k.clone()],
                // Listeners decide some key rules (lower-case prefixes for tls-sni).
                listener: head.listener.clone(),
                ..Default::default()
            };
            match mini.compile() {
                Ok(mut c) => {
                    if let Some((_, ck)) = c.keys.pop_first() {
                        keys.insert(kp, ck);
                    }
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
        if !errs.is_empty() {
            return Err(PatchFailure::Invalid(errs));
        }

        // Kernel form: the cached head with the named keys; every other key keeps its record.
        let compiled = self.compiled.as_mut().expect("can_patch_keys");
        // Applied to the engine's figures only once the maps enforce the patch.
        let mut reasons_after = self.lock_reasons.clone();
        for (prefix, (new, _)) in &after {
            if let Some(old) = self.applied.as_ref().and_then(|a| a.keys.get(prefix)) {
                reasons_after.add(&old, -1);
            }
            if let Some(k) = new {
                reasons_after.add(k, 1);
            }
        }
        let old_flags = compiled.settings.flags;
        set_prefilter_flag(&mut compiled.settings, head, open_after.max(0) as usize);
        compiled.keys = keys;
        let applied =
            self.mirror
                .apply_changes(&mut self.dp.maps, compiled, Some(&changed), self.key_cap);
        compiled.keys.clear();
        let rep = match applied {
            Ok(rep) => rep,
            Err(e) => {
                // The live slot is untouched; the cached head stays as it was.
                compiled.settings.flags = old_flags;
                return Err(PatchFailure::Apply(e));
            }
        };

        // The maps enforce it: change the stored policy as apply_patch would, op by op.
        let a = self.applied.as_mut().expect("checked");
        for op in &patch.ops {
            match op {
                PatchOp::Upsert { key } => a.keys.upsert(key),
                PatchOp::Delete { prefix } => {
                    a.keys.delete(prefix);
                }
                PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                    if let Some(mut k) = a.keys.get(prefix) {
                        let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                        k.set_lock(lock, reason, until);
                        a.keys.upsert(&k);
                    }
                }
                PatchOp::SetIpset { .. } | PatchOp::DeleteIpset { .. } => {}
            }
        }
        self.lock_reasons = reasons_after;
        a.revision = patch.revision;
        a.head.revision = Some(patch.revision);
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
        // The generation moved: keep the recorded one current (a restart compares it).
        self.publish();
        trim_heap();
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
        let bytes = a.snapshot_json();
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
        p: Policy,
        compiled: Compiled,
        changed: Option<&BTreeSet<KeyPrefix>>,
        revision: u64,
        source: &str,
        persist: Persist<'_>,
    ) -> Result<ApplyReport> {
        self.apply_inner(p, compiled, changed, revision, source, persist, true)
    }

    /// `apply_compiled`; `write: false` records a policy the maps already enforce.
    #[allow(clippy::too_many_arguments)]
    fn apply_inner(
        &mut self,
        p: Policy,
        mut compiled: Compiled,
        changed: Option<&BTreeSet<KeyPrefix>>,
        revision: u64,
        source: &str,
        persist: Persist<'_>,
        write: bool,
    ) -> Result<ApplyReport> {
        // --audit overrides what the policy says in the kernel only: the stored policy stays
        // as written, so reads and retries see what the writer sent.
        if self.audit {
            compiled.settings.flags &= !filter_common::SETTING_ENFORCE;
        }
        let lock_reasons = crate::risk::LockReasons::of(&p.key);
        // The keys go into the compact store (the parsed list freed as it goes), and a new
        // snapshot is staged from it, on another thread while the maps are written: at 1M
        // keys each of the three takes about a second. The snapshot is committed only once
        // the maps enforce the policy.
        let stage = matches!(persist, Persist::Snapshot);
        let state_dir = self.state_dir.clone();
        let (applied, t_store, rep) = std::thread::scope(|sc| {
            let store = sc.spawn(move || {
                let t0 = Instant::now();
                let live = Live::new(p, revision, source);
                let staged =
                    stage.then(|| state::stage_applied_bytes(&state_dir, &live.snapshot_json()));
                ((live, staged), t0.elapsed())
            });
            let rep = if write {
                self.mirror
                    .apply_changes(&mut self.dp.maps, &compiled, changed, self.key_cap)
            } else {
                Ok(ApplyReport {
                    generation: self.mirror.generation(),
                    slot: self.mirror.active_slot(),
                    ..Default::default()
                })
            };
            let (live, t) = store.join().expect("building the key store panicked");
            (live, t, rep)
        });
        let (applied, staged) = applied;
        let rep = rep?;
        // A whole compile already has it right; a head compiled alone (a restore) learns
        // from the keys whether the prefilter may be on.
        set_prefilter_flag(&mut compiled.settings, &applied.head, applied.keys.open());
        // Only the head is kept: the mirror holds every key's record.
        compiled.keys.clear();
        self.last_patch = None;
        self.lock_reasons = lock_reasons;
        self.compiled = Some(compiled);
        self.unsettled = changed.is_none();
        let t_save = Instant::now();
        let saved = match persist {
            Persist::Snapshot => {
                // After any fold being written: a fold's older snapshot must not win.
                self.wait_fold();
                self.journal_len = 0;
                match staged {
                    Some(Ok(st)) => st.commit(),
                    Some(Err(e)) => Err(e),
                    None => unreachable!("staged for a snapshot"),
                }
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
            "revision {revision}: store {t_store:?}, maps {:?}, state dir {:?}",
            rep.elapsed,
            t_save.elapsed()
        );
        // The previous policy is freed here, before the heap is trimmed.
        self.applied = Some(applied);
        self.publish();
        trim_heap();
        saved.context("the maps enforce it, but saving it to the state dir failed")?;
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(n: usize, open_at: Option<usize>) -> Policy {
        let mut p = Policy::from_json_str(
            r#"{"settings":{"key_prefix_len":8},"listener":[{"port":80,"locator":"http-header","headers":["X-Key"]}],"ipsets":{"office":["192.0.2.0/24"]}}"#,
        )
        .unwrap();
        p.key = (0..n)
            .map(|i| Key {
                prefix: format!("k{i:07}"),
                allow: if Some(i) == open_at {
                    Vec::new()
                } else {
                    vec![format!("10.0.{}.{}", i / 256 % 256, i % 256)]
                },
                ipsets: if i % 7 == 0 {
                    vec!["office".into()]
                } else {
                    Vec::new()
                },
                locked: i % 5 == 0,
                lock_reason: None,
                locked_until: None,
                max_new_connections_per_s: None,
                max_requests_per_s: None,
            })
            .collect();
        p
    }

    #[test]
    fn split_compile_equals_the_serial_one() {
        for open_at in [None, Some(3), Some(991)] {
            let mut p = policy(1000, open_at);
            let want = p.compile().unwrap();
            let before = p.clone();
            let got = compile_split(&mut p, 10).unwrap();
            assert_eq!(got, want, "open key at {open_at:?}");
            assert_eq!(p, before, "the policy is given back as it was");
        }
        // The prefilter bit follows an open key in either half.
        let mut p = policy(1000, Some(991));
        assert_eq!(
            compile_split(&mut p, 10).unwrap().settings.flags & filter_common::SETTING_PREFILTER,
            0
        );
    }

    #[test]
    fn snapshot_and_policy_bytes_are_serde_s() {
        // The state dir's format is `state::Applied` as serde writes it: an old daemon's
        // snapshot loads in a new one and the other way round.
        let mut p = policy(50, Some(3));
        p.listener[0].headers.push("X-\"odd\" key".into());
        let live = Live::new(p.clone(), 7, "file:/etc/keywall/policy \"x\".toml");
        p.revision = Some(7);
        let want = state::Applied {
            revision: 7,
            source: live.source.clone(),
            applied_unix: live.applied_unix,
            policy: p.clone(),
        };
        assert_eq!(live.snapshot_json(), serde_json::to_vec(&want).unwrap());
        assert_eq!(live.policy_json(), serde_json::to_vec(&p).unwrap());
        assert_eq!(live.policy(), p);
        assert_eq!((live.keys.len(), live.keys.open()), (50, 1));
        assert_eq!(live.keys.locked(), 10);
        // And an empty policy.
        let empty = Live::new(Policy::default(), 1, "api");
        let back: Policy = serde_json::from_slice(&empty.policy_json()).unwrap();
        assert_eq!(
            back,
            Policy {
                revision: Some(1),
                ..Default::default()
            }
        );
    }

    #[test]
    fn split_compile_errors_are_the_serial_ones() {
        // A duplicate across the halves, and an invalid entry in the second half.
        let mut p = policy(1000, None);
        p.key[900].prefix = p.key[10].prefix.clone();
        p.key[950].allow = vec!["10.0.0.1/8".into()];
        let want = p.compile().unwrap_err();
        let got = compile_split(&mut p, 10).unwrap_err();
        assert_eq!(got, want);
        assert!(got.iter().any(|e| e.at == "key[900].prefix"), "{got:?}");
        assert!(got.iter().any(|e| e.at == "key[950].allow[0]"), "{got:?}");
    }
}
