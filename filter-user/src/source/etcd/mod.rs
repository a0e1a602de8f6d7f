//! Fleet sync: the policy from etcd (docs/REFERENCE.md "etcd layout").
//!
//! Under the prefix, `settings` holds `{"settings": {…}, "listener": […]}`, `keys/<prefix>` one
//! key, `ipsets/<name>` a JSON array of CIDRs. Each entry is judged on its own: an invalid
//! value is rejected for that entry alone, which keeps its last good value (or stays absent),
//! while the rest keeps syncing. The [`Reconciler`] is that rule, pure and unit-tested; the
//! network side (snapshot at revision R, watch from R+1, resync after a compaction or a lost
//! watch, reconnect with backoff) is [`spawn`], and it writes the maps only through the
//! daemon's [`Engine`](crate::engine::Engine), like every other source.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    engine::{self, Refused, Rev, Submitted},
    policy::{Compiled, Key, Listener, PatchOp, Policy, PolicyError, Settings, parse_json},
    source::Shared,
};

/// Where the daemon finds the fleet's policy, and how it proves who it is.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Always ends with `/`.
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// From the command line: `URL[,URL…]` and the prefix (a missing final `/` is added, so
    /// `/keywall` does not also match `/keywall2/…`).
    pub fn new(urls: &str, prefix: &str) -> Result<EtcdConfig> {
        let endpoints: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            bail!("--etcd needs at least one URL");
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("--etcd {e}: use http://HOST:PORT or https://HOST:PORT");
            }
        }
        if prefix.is_empty() {
            bail!("--etcd-prefix must not be empty");
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdConfig {
            endpoints,
            prefix,
            ..Default::default()
        })
    }

    /// Checks the credential files now, so a typo fails at start rather than in a retry loop.
    pub fn check(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("--etcd-cert and --etcd-key go together");
        }
        for f in [&self.ca, &self.cert, &self.key, &self.password_file]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
        }
        if self.password_file.is_some() && self.user.is_none() {
            bail!("--etcd-password-file needs --etcd-user");
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            bail!("--etcd-ca/--etcd-cert are for https:// endpoints");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The reconciler (pure)
// ---------------------------------------------------------------------------------------------

/// One entry of the layout, by its name under the prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    Settings,
    Key(String),
    Ipset(String),
    /// Anything else under the prefix: reported, never applied (a typo such as `key/…`
    /// must not pass silently as "no such key").
    Unknown(String),
}

impl Entry {
    /// Classifies `name`, the etcd key with the prefix removed.
    pub fn parse(name: &str) -> Entry {
        if name == "settings" {
            return Entry::Settings;
        }
        if let Some(k) = name.strip_prefix("keys/")
            && !k.is_empty()
        {
            return Entry::Key(k.to_owned());
        }
        if let Some(s) = name.strip_prefix("ipsets/")
            && !s.is_empty()
        {
            return Entry::Ipset(s.to_owned());
        }
        Entry::Unknown(name.to_owned())
    }

    pub fn name(&self) -> String {
        match self {
            Entry::Settings => "settings".into(),
            Entry::Key(k) => format!("keys/{k}"),
            Entry::Ipset(s) => format!("ipsets/{s}"),
            Entry::Unknown(n) => n.clone(),
        }
    }

    /// The order entries of one batch are judged in, so that dependencies come first: an
    /// ipset before the keys that bind it, and the keys that drop a binding before the ipset
    /// they released is deleted.
    fn phase(&self, deleting: bool) -> u8 {
        match (self, deleting) {
            (Entry::Settings, _) => 0,
            (Entry::Ipset(_), false) => 1,
            (Entry::Key(_), _) => 2,
            (Entry::Ipset(_), true) => 3,
            (Entry::Unknown(_), _) => 4,
        }
    }
}

/// The `settings` entry: settings and listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsDoc {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub listener: Vec<Listener>,
}

/// A parsed value, before it is judged against the rest.
#[derive(Clone, Debug, PartialEq)]
enum Value_ {
    Settings(SettingsDoc),
    Key(Key),
    Ipset(Vec<String>),
}

/// One change read from etcd: a put (Some) or a delete (None) of the entry at `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

impl Change {
    pub fn put(name: &str, value: impl Into<Vec<u8>>) -> Change {
        Change {
            name: name.into(),
            value: Some(value.into()),
        }
    }
    pub fn delete(name: &str) -> Change {
        Change {
            name: name.into(),
            value: None,
        }
    }
}

/// What a batch did to the good state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Entries whose new value was taken.
    pub accepted: usize,
    /// Entries whose new value was refused (each keeps its last good value).
    pub rejected: usize,
    /// Keys whose good value changed (for an O(changed) apply).
    pub keys_changed: BTreeSet<String>,
    /// Settings, listeners or ipsets changed: every key must be examined.
    pub full: bool,
}

impl Outcome {
    pub fn changed(&self) -> bool {
        self.full || !self.keys_changed.is_empty()
    }
}

/// The last good value of every entry, and the error of every entry whose latest value was
/// refused.
#[derive(Clone, Debug, Default)]
pub struct Reconciler {
    settings: SettingsDoc,
    keys: BTreeMap<String, Key>,
    ipsets: BTreeMap<String, Vec<String>>,
    /// Entries in error: their latest value from etcd (None: deleted), retried whenever
    /// another entry changes, since what they depend on may have come.
    pending: BTreeMap<Entry, Option<Vec<u8>>>,
    errors: BTreeMap<String, String>,
}

/// Undo record of one accepted entry, for the rare batch the composed policy refuses.
enum Undo {
    Settings(SettingsDoc),
    Key(String, Option<Key>),
    Ipset(String, Option<Vec<String>>),
}

impl Reconciler {
    /// Starts from a policy applied earlier (the state dir's, after a restart), so entries
    /// that are invalid in etcd keep the value they had then.
    pub fn from_policy(p: &Policy) -> Reconciler {
        Reconciler {
            settings: SettingsDoc {
                settings: p.settings.clone(),
                listener: p.listener.clone(),
            },
            keys: p
                .key
                .iter()
                .map(|k| (k.prefix.clone(), k.clone()))
                .collect(),
            ipsets: p.ipsets.clone(),
            ..Default::default()
        }
    }

    /// The policy the good values make (keys in prefix order, no revision).
    pub fn policy(&self) -> Policy {
        Policy {
            revision: None,
            settings: self.settings.settings.clone(),
            listener: self.settings.listener.clone(),
            ipsets: self.ipsets.clone(),
            key: self.keys.values().cloned().collect(),
        }
    }

    /// Entry name → why its latest value was refused.
    pub fn errors(&self) -> &BTreeMap<String, String> {
        &self.errors
    }

    /// A whole snapshot (every entry under the prefix at one revision): entries it lacks are
    /// deleted, the others judged as puts.
    pub fn snapshot(&mut self, kvs: Vec<(String, Vec<u8>)>) -> (Outcome, Result<Compiled, String>) {
        let present: BTreeSet<Entry> = kvs.iter().map(|(n, _)| Entry::parse(n)).collect();
        let mut changes: Vec<Change> = kvs
            .into_iter()
            .map(|(name, v)| Change {
                name,
                value: Some(v),
            })
            .collect();
        if self.settings != SettingsDoc::default() && !present.contains(&Entry::Settings) {
            changes.push(Change::delete("settings"));
        }
        for k in self.keys.keys() {
            if !present.contains(&Entry::Key(k.clone())) {
                changes.push(Change::delete(&format!("keys/{k}")));
            }
        }
        for s in self.ipsets.keys() {
            if !present.contains(&Entry::Ipset(s.clone())) {
                changes.push(Change::delete(&format!("ipsets/{s}")));
            }
        }
        // Errors of entries that are gone are gone with them.
        let gone: Vec<Entry> = self
            .pending
            .keys()
            .filter(|e| !present.contains(e))
            .cloned()
            .collect();
        for e in gone {
            self.pending.remove(&e);
            self.errors.remove(&e.name());
        }
        let (mut out, compiled) = self.apply(changes);
        out.full = true;
        (out, compiled)
    }

    /// True if `changes` name keys only, and no settings or ipset entry waits in error: then
    /// `apply_keys` judges them one by one, at the cost of the batch.
    pub fn keys_only(&self, changes: &[Change]) -> bool {
        changes
            .iter()
            .all(|c| matches!(Entry::parse(&c.name), Entry::Key(_)))
            && self.pending.keys().all(|e| matches!(e, Entry::Key(_)))
    }

    /// Judges a batch of key changes (`keys_only`) one by one, each against the settings
    /// and the ipsets it binds, without composing the whole policy: a key change costs that
    /// key, whatever the policy's size. Keys waiting in error are judged again.
    pub fn apply_keys(&mut self, changes: Vec<Change>) -> Outcome {
        let mut out = Outcome::default();
        let mut batch: BTreeMap<Entry, Option<Vec<u8>>> = BTreeMap::new();
        for c in changes {
            batch.insert(Entry::parse(&c.name), c.value);
        }
        let fresh: BTreeSet<Entry> = batch.keys().cloned().collect();
        for (e, v) in std::mem::take(&mut self.pending) {
            batch.entry(e).or_insert(v);
        }
        let mut undo = Vec::new();
        for (e, raw) in batch {
            let v = match raw.as_deref().map(|b| parse_value(&e, b)).transpose() {
                Ok(v) => v,
                Err(msg) => {
                    self.refuse(&mut out, &fresh, e, raw, msg);
                    continue;
                }
            };
            match self.check(&e, v.as_ref()) {
                Ok(()) => self.take(&mut out, &mut undo, &e, v),
                Err(msg) => self.refuse(&mut out, &fresh, e, raw, msg),
            }
        }
        out
    }

    /// The good value of a key.
    pub fn key(&self, prefix: &str) -> Option<&Key> {
        self.keys.get(prefix)
    }

    /// Judges a batch of changes (later ones win) and returns what changed, with the
    /// composed policy compiled (Err: nothing was taken, which per-entry checks make rare).
    pub fn apply(&mut self, changes: Vec<Change>) -> (Outcome, Result<Compiled, String>) {
        let mut out = Outcome::default();
        let mut batch: BTreeMap<Entry, Option<Vec<u8>>> = BTreeMap::new();
        for c in changes {
            batch.insert(Entry::parse(&c.name), c.value);
        }
        // Only new values count as rejected updates; retries of old ones do not.
        let fresh: BTreeSet<Entry> = batch.keys().cloned().collect();
        // Entries in error are judged again: what they lacked may have come.
        for (e, v) in std::mem::take(&mut self.pending) {
            batch.entry(e).or_insert(v);
        }

        // Parse every value; a value that does not parse is refused whatever the rest is.
        let mut parsed: Vec<(Entry, Option<Value_>)> = Vec::new();
        for (e, raw) in batch {
            match raw.as_deref().map(|b| parse_value(&e, b)).transpose() {
                Ok(v) => parsed.push((e, v)),
                Err(msg) => self.refuse(&mut out, &fresh, e, raw, msg),
            }
        }
        parsed.sort_by_key(|(e, v)| (e.phase(v.is_none()), e.clone()));

        // Fast path: everything together (also takes coordinated changes, such as a new
        // key_prefix_len with keys of that length).
        let before = self.clone();
        let mut undo = Vec::new();
        for (e, v) in &parsed {
            self.take(&mut out, &mut undo, e, v.clone());
        }
        let all = self.compose();
        if let Ok(c) = all {
            return (out, Ok(c));
        }
        // Slow path: one entry at a time, each against the good state of the others.
        *self = before;
        out = Outcome {
            rejected: out.rejected,
            ..Default::default()
        };
        undo.clear();
        let mut taken = Vec::new();
        for (e, v) in parsed {
            let raw = value_bytes(&v);
            match self.check(&e, v.as_ref()) {
                Ok(()) => {
                    self.take(&mut out, &mut undo, &e, v);
                    taken.push((e, raw));
                }
                Err(msg) => self.refuse(&mut out, &fresh, e, raw, msg),
            }
        }
        match self.compose() {
            Ok(c) => (out, Ok(c)),
            Err(msg) => {
                // The entries passed alone but not together: refuse the batch, keep all.
                for u in undo.into_iter().rev() {
                    match u {
                        Undo::Settings(s) => self.settings = s,
                        Undo::Key(k, Some(v)) => {
                            self.keys.insert(k, v);
                        }
                        Undo::Key(k, None) => {
                            self.keys.remove(&k);
                        }
                        Undo::Ipset(s, Some(v)) => {
                            self.ipsets.insert(s, v);
                        }
                        Undo::Ipset(s, None) => {
                            self.ipsets.remove(&s);
                        }
                    }
                }
                // Each keeps its last good value, reported, and is retried with the next batch.
                for (e, raw) in taken {
                    self.errors
                        .insert(e.name(), format!("refused with its batch: {msg}"));
                    self.pending.insert(e, raw);
                }
                (
                    Outcome {
                        rejected: out.rejected + out.accepted,
                        ..Default::default()
                    },
                    Err(msg),
                )
            }
        }
    }

    fn refuse(
        &mut self,
        out: &mut Outcome,
        fresh: &BTreeSet<Entry>,
        e: Entry,
        raw: Option<Vec<u8>>,
        msg: String,
    ) {
        if fresh.contains(&e) {
            out.rejected += 1;
        }
        self.errors.insert(e.name(), msg);
        self.pending.insert(e, raw);
    }

    /// Takes a judged value into the good state.
    fn take(&mut self, out: &mut Outcome, undo: &mut Vec<Undo>, e: &Entry, v: Option<Value_>) {
        self.errors.remove(&e.name());
        self.pending.remove(e);
        let changed = match (e, v) {
            (Entry::Settings, v) => {
                let new = match v {
                    Some(Value_::Settings(s)) => s,
                    _ => SettingsDoc::default(),
                };
                let old = std::mem::replace(&mut self.settings, new);
                let changed = old != self.settings;
                undo.push(Undo::Settings(old));
                out.full |= changed;
                changed
            }
            (Entry::Key(k), v) => {
                let old = match v {
                    Some(Value_::Key(key)) => self.keys.insert(k.clone(), key),
                    _ => self.keys.remove(k),
                };
                let changed = old.as_ref() != self.keys.get(k);
                undo.push(Undo::Key(k.clone(), old));
                if changed {
                    out.keys_changed.insert(k.clone());
                }
                changed
            }
            (Entry::Ipset(s), v) => {
                let old = match v {
                    Some(Value_::Ipset(cidrs)) => self.ipsets.insert(s.clone(), cidrs),
                    _ => self.ipsets.remove(s),
                };
                let changed = old.as_ref() != self.ipsets.get(s);
                undo.push(Undo::Ipset(s.clone(), old));
                out.full |= changed;
                changed
            }
            (Entry::Unknown(_), _) => false,
        };
        if changed {
            out.accepted += 1;
        }
    }

    /// Can `v` (None: a delete) replace `e`'s good value, given the good values of the rest?
    fn check(&self, e: &Entry, v: Option<&Value_>) -> Result<(), String> {
        match (e, v) {
            (Entry::Unknown(_), Some(_)) => Err(unknown_entry()),
            (Entry::Unknown(_), None) => Ok(()),
            (Entry::Settings, v) => {
                // Settings bear on every key (key_prefix_len): judged with all of them.
                let mut p = self.policy();
                let doc = match v {
                    Some(Value_::Settings(s)) => s.clone(),
                    _ => SettingsDoc::default(),
                };
                p.settings = doc.settings;
                p.listener = doc.listener;
                compile_msg(&p, |at| self.blame(at))
            }
            (Entry::Key(_), None) => Ok(()),
            (Entry::Key(_), Some(Value_::Key(k))) => {
                // A key alone, with the settings and the ipsets it binds.
                let p = Policy {
                    settings: self.settings.settings.clone(),
                    ipsets: k
                        .ipsets
                        .iter()
                        .filter_map(|n| self.ipsets.get_key_value(n))
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect(),
                    key: vec![k.clone()],
                    listener: self.settings.listener.clone(),
                    ..Default::default()
                };
                compile_msg(&p, |at| strip(at, "key[0]"))
            }
            (Entry::Ipset(s), Some(Value_::Ipset(cidrs))) => {
                let p = Policy {
                    ipsets: BTreeMap::from([(s.clone(), cidrs.clone())]),
                    ..Default::default()
                };
                compile_msg(&p, |at| strip(at, &format!("ipsets.{s}")))
            }
            (Entry::Ipset(s), None) => {
                let bound: Vec<&str> = self
                    .keys
                    .values()
                    .filter(|k| k.ipsets.contains(s))
                    .map(|k| k.prefix.as_str())
                    .take(5)
                    .collect();
                if bound.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "deleted while keys still bind it ({}); it stays until they do not",
                        bound.join(", ")
                    ))
                }
            }
            _ => Err("value does not fit the entry".into()),
        }
    }

    /// Names the entry an error of the whole policy belongs to (`key[3].allow[0]` →
    /// `keys/<prefix>: allow[0]`).
    fn blame(&self, at: &str) -> String {
        if let Some(rest) = at.strip_prefix("key[")
            && let Some((idx, tail)) = rest.split_once(']')
            && let Ok(i) = idx.parse::<usize>()
            && let Some(k) = self.keys.values().nth(i)
        {
            return format!("keys/{}{}", k.prefix, tail.replacen('.', ": ", 1));
        }
        at.to_owned()
    }

    /// Compiles the good state.
    fn compose(&self) -> Result<Compiled, String> {
        let p = self.policy();
        p.compile()
            .map_err(|errs| join_errors(&errs, |at| self.blame(at)))
    }
}

fn unknown_entry() -> String {
    "unknown entry: the layout is settings, keys/<prefix> and ipsets/<name>".into()
}

fn value_bytes(v: &Option<Value_>) -> Option<Vec<u8>> {
    v.as_ref().map(|v| {
        match v {
            Value_::Settings(s) => serde_json::to_vec(s),
            Value_::Key(k) => serde_json::to_vec(k),
            Value_::Ipset(c) => serde_json::to_vec(c),
        }
        .unwrap_or_default()
    })
}

fn strip(at: &str, head: &str) -> String {
    match at.strip_prefix(head) {
        Some(rest) => rest.trim_start_matches('.').to_owned(),
        None => at.to_owned(),
    }
}

fn join_errors(errs: &[PolicyError], place: impl Fn(&str) -> String) -> String {
    let mut parts: Vec<String> = errs
        .iter()
        .take(5)
        .map(|e| {
            let at = place(&e.at);
            if at.is_empty() {
                e.message.clone()
            } else {
                format!("{at}: {}", e.message)
            }
        })
        .collect();
    if errs.len() > 5 {
        parts.push(format!("and {} more", errs.len() - 5));
    }
    parts.join("; ")
}

fn compile_msg(p: &Policy, place: impl Fn(&str) -> String) -> Result<(), String> {
    p.compile().map(|_| ()).map_err(|e| join_errors(&e, place))
}

/// Parses an entry's value by the layout.
fn parse_value(e: &Entry, bytes: &[u8]) -> Result<Value_, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "value is not UTF-8".to_string())?;
    let errs = |e: Vec<PolicyError>| join_errors(&e, |at| at.to_owned());
    match e {
        Entry::Settings => parse_json::<SettingsDoc>(text)
            .map(Value_::Settings)
            .map_err(errs),
        Entry::Ipset(_) => parse_json::<Vec<String>>(text)
            .map(Value_::Ipset)
            .map_err(errs),
        Entry::Key(name) => {
            let mut v: Value =
                serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
            let Some(obj) = v.as_object_mut() else {
                return Err("must be a JSON object (one key of the policy)".into());
            };
            match obj.get("prefix") {
                None => {
                    obj.insert("prefix".into(), Value::String(name.clone()));
                }
                Some(Value::String(p)) if p == name => {}
                Some(other) => {
                    return Err(format!(
                        "prefix: {other} does not match the entry's name {name:?}"
                    ));
                }
            }
            parse_json::<Key>(&v.to_string())
                .map(Value_::Key)
                .map_err(errs)
        }
        Entry::Unknown(_) => Err(unknown_entry()),
    }
}

// ---------------------------------------------------------------------------------------------
// Status (the state dir's etcd-sync.json, read by `keywall status`)
// ---------------------------------------------------------------------------------------------

const STATUS_FILE: &str = "etcd-sync.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Connected, and the snapshot applied.
    pub up: bool,
    /// The etcd revision the daemon has read up to.
    pub synced_revision: u64,
    /// Why the last connection failed or ended.
    pub last_error: Option<String>,
    /// Entries whose latest value was refused: etcd key and why.
    pub errors: Vec<EntryError>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EntryError {
    pub key: String,
    pub error: String,
}

/// The etcd section of `status --json` (null when the daemon does not sync from etcd).
pub fn status_value(state_dir: &Path) -> Value {
    std::fs::read(state_dir.join(STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null)
}

/// A daemon that does not sync from etcd removes a stale etcd status.
pub fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(STATUS_FILE));
}

// ---------------------------------------------------------------------------------------------
// The network side
// ---------------------------------------------------------------------------------------------

/// Entries per page of the snapshot read (about 5 MB at 100 B an entry). etcd counts the
/// whole rest of the range for every page, so each page costs O(keys) on its side: at 1M
/// keys, pages of 5,000 made a snapshot 200 such counts (48 s on a loaded 2-core VM, and
/// three edges reading at once hit the 120 s snapshot timeout again and again).
const SNAPSHOT_PAGE: i64 = 50_000;
/// Largest gRPC message taken from etcd (a snapshot page, or a watch response carrying a big
/// transaction); tonic's default of 4 MiB is too small for either at scale.
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

/// The end of the key range with this prefix (the prefix with its last byte below 0xff
/// incremented, the rest cut).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// Backoff between reconnects: doubles from 100 ms up to 5 s.
pub fn next_backoff(cur: Duration) -> Duration {
    (cur * 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Starts the sync thread. It never returns: while etcd is unreachable it retries with
/// backoff, and enforcement stays as it was.
pub fn spawn(cfg: EtcdConfig, shared: Arc<Shared>) -> Result<()> {
    cfg.check()?;
    let seed = {
        let eng = shared.engine.lock().unwrap();
        match &eng.applied {
            Some(a) if a.source == "etcd" => Reconciler::from_policy(&a.policy()),
            _ => Reconciler::default(),
        }
    };
    shared.metrics.set_sync("etcd", false);
    shared.metrics.set_sync_errors("etcd", 0);
    let mut sync = Sync {
        status: SyncStatus {
            endpoints: cfg.endpoints.clone(),
            prefix: cfg.prefix.clone(),
            ..Default::default()
        },
        cfg,
        shared,
        rec: seed,
        written: None,
    };
    sync.publish();
    std::thread::Builder::new()
        .name("keywall-etcd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("etcd sync cannot start its runtime: {e}");
                    return;
                }
            };
            rt.block_on(sync.run());
        })?;
    Ok(())
}

struct Sync {
    cfg: EtcdConfig,
    shared: Arc<Shared>,
    rec: Reconciler,
    status: SyncStatus,
    /// The status as last written, so an unchanged one is not rewritten.
    written: Option<SyncStatus>,
}

impl Sync {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let err = self.session(&mut backoff).await;
            let msg = format!("{err:#}");
            log::warn!(
                "etcd sync: {msg}; enforcing the last applied policy, retrying in {backoff:?}"
            );
            self.shared.metrics.set_sync("etcd", false);
            self.status.up = false;
            self.status.last_error = Some(msg);
            self.publish();
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff);
        }
    }

    async fn connect(&self) -> Result<etcd_client::Client> {
        connect(&self.cfg).await
    }

    /// One connection: snapshot, apply, watch until something breaks. Returns why it ended.
    async fn session(&mut self, backoff: &mut Duration) -> anyhow::Error {
        match self.session_inner(backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(&mut self, backoff: &mut Duration) -> Result<std::convert::Infallible> {
        use etcd_client::{EventType, WatchOptions};
        let client = self.connect().await?;
        let (rev, kvs) =
            tokio::time::timeout(Duration::from_secs(120), self.read_snapshot(&client))
                .await
                .map_err(|_| anyhow!("snapshot timed out"))?
                .context("reading the snapshot")?;
        let n = kvs.len();
        let t0 = Instant::now();
        let pb = crate::progress::spinner(format!(
            "etcd: applying the snapshot of {} ({n} entries)",
            self.cfg.prefix
        ));
        let (out, compiled) = self.rec.snapshot(kvs);
        let res = self.commit(out, compiled, rev, t0, true);
        crate::progress::done(pb);
        res?;
        log::info!(
            "etcd: snapshot of {} at revision {rev}: {n} entries, {} refused",
            self.cfg.prefix,
            self.rec.errors().len()
        );
        self.status.up = true;
        self.status.last_error = None;
        self.status.synced_revision = rev;
        self.shared.metrics.set_sync("etcd", true);
        self.publish();
        *backoff = Duration::from_millis(100);

        let mut stream = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(
                self.cfg.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev as i64 + 1),
                ),
            )
            .await
            .context("starting the watch")?;
        loop {
            let first = stream
                .message()
                .await
                .context("watch")?
                .ok_or_else(|| anyhow!("the watch stream ended"))?;
            // Drain what is already there: one apply for a burst of writes.
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(Ok(Some(m))) => batch.push(m),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(anyhow!(e).context("watch")),
                    Err(_) => break,
                }
            }
            let t0 = Instant::now();
            let mut changes = Vec::new();
            let mut last_rev = 0u64;
            for m in &batch {
                if m.canceled() {
                    if m.compact_revision() > 0 {
                        bail!(
                            "watch from revision {} was compacted (oldest is {}): resyncing",
                            rev + 1,
                            m.compact_revision()
                        );
                    }
                    bail!("watch canceled: {}", m.cancel_reason());
                }
                if let Some(h) = m.header() {
                    last_rev = last_rev.max(h.revision() as u64);
                }
                for ev in m.events() {
                    let Some(kv) = ev.kv() else { continue };
                    last_rev = last_rev.max(kv.mod_revision() as u64);
                    let Some(name) = self.entry_name(kv.key()) else {
                        continue;
                    };
                    changes.push(match ev.event_type() {
                        EventType::Put => Change {
                            name,
                            value: Some(kv.value().to_vec()),
                        },
                        EventType::Delete => Change::delete(&name),
                    });
                }
            }
            if changes.is_empty() {
                continue;
            }
            if self.rec.keys_only(&changes) {
                let out = self.rec.apply_keys(changes);
                self.commit_keys(out, last_rev, t0)?;
            } else {
                let (out, compiled) = self.rec.apply(changes);
                self.commit(out, compiled, last_rev, t0, false)?;
            }
            self.status.synced_revision = last_rev;
            self.publish();
        }
    }

    /// Every entry under the prefix at one revision, read in pages (a policy of a million
    /// keys is far beyond one gRPC message). Returns that revision and the entries.
    async fn read_snapshot(
        &self,
        client: &etcd_client::Client,
    ) -> Result<(u64, Vec<(String, Vec<u8>)>)> {
        use etcd_client::GetOptions;
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let prefix = self.cfg.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone();
        let mut rev: i64 = 0;
        let mut kvs = Vec::new();
        loop {
            let mut o = GetOptions::new()
                .with_range(end.clone())
                .with_limit(SNAPSHOT_PAGE);
            if rev > 0 {
                o = o.with_revision(rev); // every page at the first page's revision
            }
            let mut page = kv.get(from.clone(), Some(o)).await?;
            if rev == 0 {
                rev = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let items = page.take_kvs();
            let Some(last) = items.last() else { break };
            from = last.key().to_vec();
            from.push(0); // the next key after the last one read
            kvs.extend(
                items
                    .iter()
                    .filter_map(|kv| self.entry_name(kv.key()).map(|n| (n, kv.value().to_vec()))),
            );
            if !more {
                break;
            }
        }
        Ok((rev as u64, kvs))
    }

    /// The name under the prefix (None for keys that are not UTF-8, reported in the log).
    fn entry_name(&self, key: &[u8]) -> Option<String> {
        let Ok(k) = std::str::from_utf8(key) else {
            log::warn!("etcd: ignoring a key that is not UTF-8: {key:?}");
            return None;
        };
        let name = k.strip_prefix(self.cfg.prefix.as_str())?;
        // The edges' activity digests and `keywall fleet`'s own records share the prefix;
        // they are not policy (fleet.rs).
        if crate::fleet::not_policy(name) {
            return None;
        }
        Some(name.to_owned())
    }

    /// Records the reconciler's refusals (metrics, status, log).
    fn record_errors(&mut self, out: &Outcome) {
        let m = &self.shared.metrics;
        for _ in 0..out.rejected {
            m.update("etcd", "rejected");
        }
        self.status.errors = self
            .rec
            .errors()
            .iter()
            .map(|(k, e)| EntryError {
                key: format!("{}{k}", self.cfg.prefix),
                error: e.clone(),
            })
            .collect();
        m.set_sync_errors("etcd", self.status.errors.len());
        if out.rejected > 0 {
            for e in &self.status.errors {
                log::warn!(
                    "etcd: {} refused, keeps its last good value: {}",
                    e.key,
                    e.error
                );
            }
        }
    }

    /// Writes a batch of key changes through the engine as ops on those keys (the cost of
    /// the batch, not of the policy); the whole path when the engine has no etcd policy yet.
    fn commit_keys(&mut self, out: Outcome, rev: u64, t0: Instant) -> Result<()> {
        self.record_errors(&out);
        if out.keys_changed.is_empty() {
            self.shared.metrics.update("etcd", "unchanged");
            return Ok(());
        }
        let ops: Vec<PatchOp> = out
            .keys_changed
            .iter()
            .map(|k| match self.rec.key(k) {
                Some(key) => PatchOp::Upsert { key: key.clone() },
                None => PatchOp::Delete { prefix: k.clone() },
            })
            .collect();
        let n = ops.len();
        let shared = self.shared.clone();
        let result = tokio::task::block_in_place(|| {
            let mut eng = shared.engine.lock().unwrap();
            if eng.applied.as_ref().is_none_or(|a| a.source != "etcd") {
                return None;
            }
            let r = eng.submit(engine::Change::Ops(ops), Rev::Set(rev), "etcd");
            let fold = if eng.wants_compaction() {
                eng.begin_fold()
            } else {
                Ok(None)
            };
            drop(eng);
            if let Err(e) = fold.and_then(|f| f.map_or(Ok(()), |f| f.finish())) {
                log::error!("etcd: writing a policy snapshot: {e:#}");
            }
            Some(r)
        });
        match result {
            None => {
                // No etcd policy in the engine yet: compose and apply the whole.
                let compiled = self.rec.compose();
                // (Refusals were recorded above.)
                let full = Outcome {
                    full: true,
                    rejected: 0,
                    ..out
                };
                self.commit(full, compiled, rev, t0, false)
            }
            Some(Ok(Submitted::Applied { report, .. })) => {
                log::info!(
                    "etcd: applied revision {rev} ({n} keys changed, {:?})",
                    report.elapsed
                );
                Ok(())
            }
            Some(Ok(Submitted::Unchanged { .. })) => Ok(()),
            Some(Err(Refused::Invalid(errs))) => {
                // The reconciler judged each key alone as the engine does: not expected.
                log::error!(
                    "etcd: revision {rev} refused by the engine: {}",
                    errs.first().map(|e| e.to_string()).unwrap_or_default()
                );
                Ok(())
            }
            Some(Err(Refused::Conflict { why, .. })) => Err(anyhow!(why)),
            Some(Err(Refused::Failed(e))) => Err(e.context("applying the policy from etcd")),
        }
    }

    /// Writes what the reconciler accepted into the maps (through the engine, like every
    /// source), and records the outcome.
    fn commit(
        &mut self,
        out: Outcome,
        compiled: Result<Compiled, String>,
        rev: u64,
        _t0: Instant,
        snapshot: bool,
    ) -> Result<()> {
        self.record_errors(&out);
        let m = &self.shared.metrics;
        let compiled = match compiled {
            Ok(c) => c,
            Err(msg) => {
                log::error!("etcd: the composed policy is invalid, nothing applied: {msg}");
                return Ok(());
            }
        };
        let changed = out.changed();
        let rec = &self.rec;
        let result = tokio::task::block_in_place(|| {
            let mut eng = self.shared.engine.lock().unwrap();
            let ours = eng.applied.as_ref().is_some_and(|a| a.source == "etcd");
            if !snapshot && !changed && ours {
                return Ok(None);
            }
            let r = if !snapshot && !out.full && ours {
                // Key changes only: their ops (journalled like a PATCH, one line).
                let ops = out
                    .keys_changed
                    .iter()
                    .map(|k| match rec.key(k) {
                        Some(key) => PatchOp::Upsert { key: key.clone() },
                        None => PatchOp::Delete { prefix: k.clone() },
                    })
                    .collect();
                eng.submit(engine::Change::Ops(ops), Rev::Set(rev), "etcd")
            } else {
                // A snapshot, settings or ipsets: the whole policy (both slots of the double
                // buffer, so no packet sees a mix). An unchanged snapshot writes nothing.
                let policy = rec.policy();
                let same = ours
                    && eng.applied.as_ref().is_some_and(|a| {
                        Policy {
                            revision: None,
                            ..a.policy()
                        } == policy
                    });
                if same {
                    return Ok(None);
                }
                eng.submit(
                    engine::Change::Policy(Box::new(policy), Box::new(compiled)),
                    Rev::Set(rev),
                    "etcd",
                )
            };
            let fold = if eng.wants_compaction() {
                eng.begin_fold()
            } else {
                Ok(None)
            };
            // After a whole-policy apply, bring the other slot up to date now, so the next
            // watched lock writes its one key instead of every key that slot lags on.
            if let Err(e) = eng.settle() {
                log::error!("etcd: settling the inactive slot: {e:#}");
            }
            drop(eng);
            if let Err(e) = fold.and_then(|f| f.map_or(Ok(()), |f| f.finish())) {
                log::error!("etcd: writing a policy snapshot: {e:#}");
            }
            r.map(Some)
        });
        match result {
            Ok(Some(Submitted::Applied { report, .. })) => {
                log::info!(
                    "etcd: applied revision {rev} ({} keys written, {:?})",
                    report.keys_written,
                    report.elapsed
                );
                Ok(())
            }
            Ok(Some(Submitted::Unchanged { .. })) => Ok(()),
            Ok(None) => {
                m.update("etcd", "unchanged");
                Ok(())
            }
            Err(Refused::Invalid(errs)) => {
                log::error!(
                    "etcd: revision {rev} refused: {}",
                    errs.first().map(|e| e.to_string()).unwrap_or_default()
                );
                Ok(())
            }
            Err(Refused::Conflict { why, .. }) => Err(anyhow!(why)),
            // The maps keep the last applied policy; a fresh snapshot tries again.
            Err(Refused::Failed(e)) => Err(e.context("applying the policy from etcd")),
        }
    }

    /// Writes the status file when it changed.
    fn publish(&mut self) {
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        let dir = &self.shared.state_dir;
        // Renamed into place but not fsynced: it is a report (rewritten at every batch),
        // not state, and an fsync per batch would slow the next lock down.
        let tmp = dir.join(format!(".{STATUS_FILE}.tmp"));
        let res = serde_json::to_vec_pretty(&self.status)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(std::fs::write(&tmp, b)?))
            .and_then(|()| Ok(std::fs::rename(&tmp, dir.join(STATUS_FILE))?));
        if let Err(e) = res {
            log::warn!("etcd: writing the sync status: {e:#}");
        }
        self.written = Some(self.status.clone());
    }
}

/// A client for `cfg` (TLS, client certificate and user as configured): the daemon's sync,
/// its activity publisher and `keywall fleet` connect the same way.
pub async fn connect(cfg: &EtcdConfig) -> Result<etcd_client::Client> {
    use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

    // Keep-alive pings notice a silent partition within seconds, not at the next write.
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(u) = &cfg.user {
        let pw = match &cfg.password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => String::new(),
        };
        o = o.with_user(u.clone(), pw);
    }
    if cfg.ca.is_some() || cfg.cert.is_some() {
        let mut t = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            t = t.ca_certificate(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        }
        if let (Some(c), Some(k)) = (&cfg.cert, &cfg.key) {
            t = t.identity(Identity::from_pem(
                std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
                std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
            ));
        }
        o = o.with_tls(t);
    }
    etcd_client::Client::connect(&cfg.endpoints, Some(o))
        .await
        .context("connecting")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = r#"{"settings": {"key_prefix_len": 8, "unknown_key": "drop"},
        "listener": [{"port": 8080, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}]}"#;

    fn rec_with(kvs: &[(&str, &str)]) -> Reconciler {
        let mut r = Reconciler::default();
        let (out, c) = r.snapshot(
            kvs.iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        );
        assert!(c.is_ok(), "{c:?}");
        assert_eq!(out.rejected, 0, "{:?}", r.errors());
        r
    }

    #[test]
    fn entries_by_name() {
        assert_eq!(Entry::parse("settings"), Entry::Settings);
        assert_eq!(Entry::parse("keys/abcd1234"), Entry::Key("abcd1234".into()));
        assert_eq!(
            Entry::parse("ipsets/broker-a"),
            Entry::Ipset("broker-a".into())
        );
        assert_eq!(Entry::parse("keys/"), Entry::Unknown("keys/".into()));
        assert_eq!(Entry::parse("key/abc"), Entry::Unknown("key/abc".into()));
    }

    #[test]
    fn prefix_gets_its_slash() {
        let c = EtcdConfig::new("http://a:2379, http://b:2379", "/kw").unwrap();
        assert_eq!(c.prefix, "/kw/");
        assert_eq!(c.endpoints, ["http://a:2379", "http://b:2379"]);
        assert!(EtcdConfig::new("a:2379", "/kw/").is_err());
        assert!(EtcdConfig::new("", "/kw/").is_err());
    }

    #[test]
    fn snapshot_composes_a_policy() {
        let r = rec_with(&[
            ("settings", SETTINGS),
            ("ipsets/broker-a", r#"["203.0.113.0/24"]"#),
            (
                "keys/bbbbbbbb",
                r#"{"allow": ["10.0.0.0/8"], "ipsets": ["broker-a"]}"#,
            ),
            ("keys/aaaaaaaa", r#"{"prefix": "aaaaaaaa", "locked": true}"#),
        ]);
        let p = r.policy();
        assert_eq!(p.settings.key_prefix_len, 8);
        assert_eq!(p.listener.len(), 1);
        assert_eq!(
            p.key.iter().map(|k| k.prefix.as_str()).collect::<Vec<_>>(),
            ["aaaaaaaa", "bbbbbbbb"]
        );
        assert!(p.key[0].locked);
        assert_eq!(p.ipsets["broker-a"], ["203.0.113.0/24"]);
    }

    #[test]
    fn an_invalid_entry_keeps_its_last_good_value_and_the_rest_syncs() {
        let mut r = rec_with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", r#"{"allow": ["10.0.0.0/8"]}"#),
        ]);
        let (out, c) = r.apply(vec![
            Change::put("keys/aaaaaaaa", "{not json"),
            Change::put("keys/bbbbbbbb", r#"{"locked": true}"#),
        ]);
        assert!(c.is_ok());
        assert_eq!((out.accepted, out.rejected), (1, 1));
        assert_eq!(out.keys_changed, BTreeSet::from(["bbbbbbbb".to_string()]));
        assert!(!out.full);
        let p = r.policy();
        assert_eq!(p.find_key("aaaaaaaa").unwrap().allow, ["10.0.0.0/8"]);
        assert!(p.find_key("bbbbbbbb").unwrap().locked);
        assert_eq!(r.errors().len(), 1);
        assert!(
            r.errors()["keys/aaaaaaaa"].contains("line 1"),
            "{:?}",
            r.errors()
        );

        // A good value clears the error.
        let (out, _) = r.apply(vec![Change::put("keys/aaaaaaaa", r#"{"locked": true}"#)]);
        assert_eq!((out.accepted, out.rejected), (1, 0));
        assert!(r.errors().is_empty());
        assert!(r.policy().find_key("aaaaaaaa").unwrap().locked);
    }

    #[test]
    fn invalid_values_are_placed() {
        let mut r = rec_with(&[("settings", SETTINGS)]);
        let (out, _) = r.apply(vec![
            Change::put("keys/aaaaaaaa", r#"{"allow": ["10.0.0.1/8"]}"#),
            Change::put("keys/bbbbbbbb", r#"{"prefix": "cccccccc"}"#),
            Change::put("keys/dddddddd", r#"{"ipsets": ["nope"]}"#),
            Change::put("keys/short", r#"{}"#),
            Change::put("ipsets/x", r#"["300.0.0.0/8"]"#),
            Change::put("ipsets/y", r#"{"a": 1}"#),
            Change::put("kyes/typo", r#"{}"#),
        ]);
        assert_eq!(out.rejected, 7, "{:?}", r.errors());
        assert!(r.policy().key.is_empty());
        let e = r.errors();
        assert!(e["keys/aaaaaaaa"].starts_with("allow[0]"), "{e:?}");
        assert!(e["keys/bbbbbbbb"].contains("does not match"), "{e:?}");
        assert!(e["keys/dddddddd"].contains("unknown ipset"), "{e:?}");
        assert!(e["keys/short"].contains("exactly 8 bytes"), "{e:?}");
        assert!(
            e["ipsets/x"].starts_with("[0]") || e["ipsets/x"].contains("300"),
            "{e:?}"
        );
        assert!(e.contains_key("ipsets/y"), "{e:?}");
        assert!(e["kyes/typo"].contains("unknown entry"), "{e:?}");
    }

    #[test]
    fn a_refused_entry_is_taken_when_what_it_lacked_comes() {
        let mut r = rec_with(&[("settings", SETTINGS)]);
        let (out, _) = r.apply(vec![Change::put(
            "keys/aaaaaaaa",
            r#"{"ipsets": ["broker-a"]}"#,
        )]);
        assert_eq!(out.rejected, 1);
        let (out, _) = r.apply(vec![Change::put("ipsets/broker-a", r#"["192.0.2.0/24"]"#)]);
        assert_eq!(out.rejected, 0, "{:?}", r.errors());
        assert!(r.errors().is_empty());
        assert_eq!(
            r.policy().find_key("aaaaaaaa").unwrap().ipsets,
            ["broker-a"]
        );
    }

    #[test]
    fn an_ipset_still_bound_is_not_deleted() {
        let mut r = rec_with(&[
            ("settings", SETTINGS),
            ("ipsets/broker-a", r#"["192.0.2.0/24"]"#),
            ("keys/aaaaaaaa", r#"{"ipsets": ["broker-a"]}"#),
        ]);
        let (out, c) = r.apply(vec![Change::delete("ipsets/broker-a")]);
        assert!(c.is_ok());
        assert_eq!(out.rejected, 1);
        assert!(r.policy().ipsets.contains_key("broker-a"));
        assert!(r.errors()["ipsets/broker-a"].contains("aaaaaaaa"));
        // The key lets go of it: the pending delete goes through.
        let (out, _) = r.apply(vec![Change::put("keys/aaaaaaaa", r#"{}"#)]);
        assert_eq!(out.rejected, 0, "{:?}", r.errors());
        assert!(!r.policy().ipsets.contains_key("broker-a"));
        assert!(out.full);
        assert!(r.errors().is_empty());
    }

    #[test]
    fn coordinated_changes_in_one_batch_are_taken_together() {
        let mut r = rec_with(&[("settings", SETTINGS), ("keys/aaaaaaaa", "{}")]);
        let s10 = SETTINGS.replace("\"key_prefix_len\": 8", "\"key_prefix_len\": 10");
        let (out, c) = r.apply(vec![
            Change::put("settings", s10.as_str()),
            Change::delete("keys/aaaaaaaa"),
            Change::put("keys/bbbbbbbbbb", "{}"),
        ]);
        assert!(c.is_ok());
        assert_eq!(out.rejected, 0, "{:?}", r.errors());
        assert_eq!(r.policy().settings.key_prefix_len, 10);
        // Alone, the same settings change would break the key: refused, blamed on the key.
        let s12 = SETTINGS.replace("\"key_prefix_len\": 8", "\"key_prefix_len\": 12");
        let (out, _) = r.apply(vec![Change::put("settings", s12.as_str())]);
        assert_eq!(out.rejected, 1);
        assert_eq!(r.policy().settings.key_prefix_len, 10);
        assert!(
            r.errors()["settings"].contains("keys/bbbbbbbbbb"),
            "{:?}",
            r.errors()
        );
    }

    #[test]
    fn a_snapshot_deletes_what_is_gone_and_drops_their_errors() {
        let mut r = rec_with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", "{}"),
            ("keys/bbbbbbbb", "{}"),
        ]);
        let _ = r.apply(vec![Change::put("keys/cccccccc", "nope")]);
        assert_eq!(r.errors().len(), 1);
        let (out, c) = r.snapshot(vec![
            ("settings".into(), SETTINGS.into()),
            ("keys/aaaaaaaa".into(), br#"{"locked": true}"#.to_vec()),
        ]);
        assert!(c.is_ok());
        assert!(out.full);
        let p = r.policy();
        assert_eq!(p.key.len(), 1);
        assert!(p.key[0].locked);
        assert!(r.errors().is_empty());
    }

    #[test]
    fn seeded_from_the_applied_policy_an_invalid_entry_keeps_it() {
        let seed = rec_with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", r#"{"locked": true}"#),
        ])
        .policy();
        let mut r = Reconciler::from_policy(&seed);
        let (out, _) = r.snapshot(vec![
            ("settings".into(), SETTINGS.into()),
            ("keys/aaaaaaaa".into(), b"{bad".to_vec()),
        ]);
        assert_eq!(out.rejected, 1);
        assert!(r.policy().find_key("aaaaaaaa").unwrap().locked);
    }

    #[test]
    fn key_batches_are_judged_key_by_key() {
        let mut r = rec_with(&[("keys/aaaaaaaa", "{}")]);
        let changes = vec![
            Change::put("keys/bbbbbbbb", r#"{"allow": ["10.0.0.1"]}"#),
            Change::put("keys/cccccccc", r#"{"allow": ["10.0.0.1/8"]}"#),
            Change::put("keys/aaaaaaaa", r#"{"locked": true}"#),
        ];
        assert!(r.keys_only(&changes));
        assert!(!r.keys_only(&[Change::put("ipsets/x", "[]")]));
        let out = r.apply_keys(changes);
        assert_eq!(out.rejected, 1);
        assert!(!out.full);
        assert_eq!(
            out.keys_changed
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["aaaaaaaa", "bbbbbbbb"]
        );
        assert!(r.key("aaaaaaaa").unwrap().locked);
        assert!(r.key("cccccccc").is_none());
        assert!(r.errors().contains_key("keys/cccccccc"));
        // Fixed later: taken, and its error is gone.
        let out = r.apply_keys(vec![Change::put(
            "keys/cccccccc",
            r#"{"allow": ["10.0.0.0/8"]}"#,
        )]);
        assert_eq!(out.keys_changed.len(), 1);
        assert!(r.errors().is_empty());
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Duration::from_millis(100);
        let mut seen = vec![];
        for _ in 0..10 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[0], Duration::from_millis(200));
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(5));
    }
}
