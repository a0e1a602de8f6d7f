//! The etcd reconciler (pure): judges each entry of the layout on its own against the good
//! state, and says what to submit.
//!
//! The good state is the engine's applied policy when it came from etcd (also after a
//! restart), and nothing otherwise: the reconciler keeps no copy of it (at 1M keys a parsed
//! copy was most of the daemon's memory). What it keeps is the entries whose latest value was
//! refused, with why, so they are reported and judged again with every batch.
//!
//! A batch's changes are judged in an [`Overlay`] over the good state: dependencies first
//! (settings, new ipsets, keys, deleted ipsets), each against the others as taken so far.
//! Key and ipset changes become the ops of just those entries; a settings change, a first
//! load or a large resync becomes a whole policy.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    engine::KeyStore,
    policy::{Compiled, Key, Listener, PatchOp, Policy, PolicyError, Settings, parse_json},
};

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

/// An entry of a snapshot, parsed as it is read (so a page's bytes are freed at once).
pub struct Parsed {
    e: Entry,
    /// Err: why it does not parse, and its bytes (kept to be judged again).
    v: Result<Value_, (String, Vec<u8>)>,
}

impl Parsed {
    pub fn new(name: &str, bytes: Vec<u8>) -> Parsed {
        let e = Entry::parse(name);
        let v = parse_value(&e, &bytes).map_err(|msg| (msg, bytes));
        Parsed { e, v }
    }
}

/// What a batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Entries whose new value was taken (and differs from the good one).
    pub accepted: usize,
    /// Entries whose new value was refused (each keeps its last good value).
    pub rejected: usize,
    /// Entries judged (the batch's, and those in error judged again with it).
    pub judged: usize,
}

/// What to submit to the engine.
#[derive(Debug)]
pub enum Plan {
    /// The good state already holds.
    Nothing,
    /// The ops of the entries that changed (keys, ipsets): the cost of the batch.
    Ops(Vec<PatchOp>),
    /// A whole policy, compiled: settings changed, a first load, or most keys changed.
    Whole(Box<Policy>, Box<Compiled>),
}

/// The good state: the engine's applied policy from etcd (settings, listeners and ipsets in
/// `head`, whose `key` list is empty; the keys in their store), or an empty one.
#[derive(Clone, Copy)]
pub struct Good<'a> {
    pub head: &'a Policy,
    pub keys: &'a KeyStore,
}

/// A resync that changes more keys than this (and a quarter of the policy) is applied whole.
const WHOLE_AT: usize = 50_000;

/// The entries whose latest value was refused, and why.
#[derive(Clone, Debug, Default)]
pub struct Reconciler {
    /// Their latest value from etcd (None: deleted), judged again when what they depend on
    /// may have come (see `apply`).
    pending: BTreeMap<Entry, Pending>,
    errors: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct Pending {
    raw: Option<Vec<u8>>,
    /// Refused with its batch (the batch's entries together, or the engine), not for its own
    /// value: judged again with every batch.
    with_batch: bool,
}

/// An entry to judge; `fresh` if its value is new in this batch (a retry of a pending one
/// is not counted again when refused again).
struct Item {
    e: Entry,
    v: Option<Value_>,
    fresh: bool,
}

impl Reconciler {
    /// Entry name → why its latest value was refused.
    pub fn errors(&self) -> &BTreeMap<String, String> {
        &self.errors
    }

    /// A whole snapshot (every entry under the prefix at one revision): entries it lacks are
    /// deleted, the others judged as puts. `owned`: `good` is the engine's etcd policy (else
    /// the plan is always a whole policy, to take over the maps).
    pub fn snapshot(&mut self, entries: Vec<Parsed>, good: Good, owned: bool) -> (Outcome, Plan) {
        let mut out = Outcome::default();
        // Every entry present is judged now: earlier refusals are void.
        self.pending.clear();
        self.errors.clear();
        let base_settings = settings_of(good.head);
        let mut settings_present = false;
        let mut ipsets_present = BTreeSet::new();
        let mut keys_present = HashSet::with_capacity(entries.len());
        let mut items = Vec::new();
        for Parsed { e, v } in entries {
            match &e {
                Entry::Settings => settings_present = true,
                Entry::Ipset(s) => {
                    ipsets_present.insert(s.clone());
                }
                Entry::Key(k) => {
                    keys_present.insert(k.clone());
                }
                Entry::Unknown(_) => {}
            }
            let v = match v {
                Ok(v) => v,
                Err((msg, raw)) => {
                    self.refuse(&mut out, e, true, Some(raw), msg);
                    continue;
                }
            };
            // What the engine already holds needs no judging (a resync costs the changes).
            let same = owned
                && match (&e, &v) {
                    (Entry::Settings, Value_::Settings(s)) => *s == base_settings,
                    (Entry::Ipset(n), Value_::Ipset(c)) => good.head.ipsets.get(n) == Some(c),
                    (Entry::Key(_), Value_::Key(k)) => good.keys.same(k) == Some(true),
                    _ => false,
                };
            if !same {
                items.push(Item {
                    e,
                    v: Some(v),
                    fresh: true,
                });
            }
        }
        let delete = |e| Item {
            e,
            v: None,
            fresh: true,
        };
        if !settings_present && base_settings != SettingsDoc::default() {
            items.push(delete(Entry::Settings));
        }
        for s in good.head.ipsets.keys() {
            if !ipsets_present.contains(s) {
                items.push(delete(Entry::Ipset(s.clone())));
            }
        }
        for p in good.keys.prefixes() {
            if !keys_present.contains(&p) {
                items.push(delete(Entry::Key(p)));
            }
        }
        drop(keys_present);
        let whole = !owned || items.len() > WHOLE_AT.max(good.keys.len() / 4);
        let plan = self.judge(items, good, whole, !owned, &mut out);
        (out, plan)
    }

    /// Judges a batch of changes (later ones win), with the entries waiting in error.
    /// `good` must be the engine's etcd policy.
    pub fn apply(&mut self, changes: Vec<Change>, good: Good) -> (Outcome, Plan) {
        let mut out = Outcome::default();
        let mut batch: BTreeMap<Entry, (Option<Vec<u8>>, bool)> = BTreeMap::new();
        for c in changes {
            batch.insert(Entry::parse(&c.name), (c.value, true));
        }
        // Entries in error are judged again when what they lacked may have come: a key needs
        // the settings and the ipsets it binds, so a batch of keys leaves refused keys alone
        // (a lock costs the lock even with many keys in error); ipsets and settings depend on
        // keys, and are few. An unknown entry only heals with a value of its own.
        let deps = batch
            .keys()
            .any(|e| matches!(e, Entry::Settings | Entry::Ipset(_)));
        let keys = batch.keys().any(|e| matches!(e, Entry::Key(_)));
        for (e, p) in std::mem::take(&mut self.pending) {
            let retry = p.with_batch
                || match &e {
                    Entry::Key(_) => deps,
                    Entry::Settings | Entry::Ipset(_) => keys || deps,
                    Entry::Unknown(_) => false,
                };
            if retry {
                batch.entry(e).or_insert((p.raw, false));
            } else if !batch.contains_key(&e) {
                self.pending.insert(e, p);
            }
        }
        out.judged = batch.len();
        let mut items = Vec::with_capacity(batch.len());
        for (e, (raw, fresh)) in batch {
            match raw.as_deref().map(|b| parse_value(&e, b)).transpose() {
                Ok(v) => items.push(Item { e, v, fresh }),
                Err(msg) => self.refuse(&mut out, e, fresh, raw, msg),
            }
        }
        let plan = self.judge(items, good, false, false, &mut out);
        (out, plan)
    }

    /// The engine refused the ops a batch became (their checks here passed one by one, so
    /// this is rare): each entry keeps its good value, reported, and is judged again later.
    pub fn refused_by_engine(&mut self, ops: &[PatchOp], msg: &str) {
        for op in ops {
            let (e, raw) = match op {
                PatchOp::Upsert { key } => {
                    (Entry::Key(key.prefix.clone()), serde_json::to_vec(key).ok())
                }
                PatchOp::Delete { prefix } => (Entry::Key(prefix.clone()), None),
                PatchOp::SetIpset { name, cidrs } => {
                    (Entry::Ipset(name.clone()), serde_json::to_vec(cidrs).ok())
                }
                PatchOp::DeleteIpset { name } => (Entry::Ipset(name.clone()), None),
                PatchOp::Lock { .. } | PatchOp::Unlock { .. } => continue,
            };
            self.hold(e, raw, format!("refused with its batch: {msg}"));
        }
    }

    /// Keeps an entry refused with its batch, to be judged again with the next one.
    fn hold(&mut self, e: Entry, raw: Option<Vec<u8>>, msg: String) {
        self.errors.insert(e.name(), msg);
        self.pending.insert(
            e,
            Pending {
                raw,
                with_batch: true,
            },
        );
    }

    /// Judges `items` and plans the write. `whole`: plan a whole policy (also when a settings
    /// entry is among them); `must`: even if nothing changed.
    fn judge(
        &mut self,
        mut items: Vec<Item>,
        good: Good,
        whole: bool,
        must: bool,
        out: &mut Outcome,
    ) -> Plan {
        // A delete of an unknown entry is nothing to judge; it takes its error along.
        items.retain(|it| {
            let unknown_delete = matches!(it.e, Entry::Unknown(_)) && it.v.is_none();
            if unknown_delete {
                self.errors.remove(&it.e.name());
            }
            !unknown_delete
        });
        items.sort_by(|a, b| {
            (a.e.phase(a.v.is_none()), &a.e).cmp(&(b.e.phase(b.v.is_none()), &b.e))
        });
        if whole || items.iter().any(|it| it.e == Entry::Settings) {
            return self.judge_whole(items, good, must, out);
        }
        let mut ov = Overlay::new(good);
        for it in items {
            match check(&ov, &it.e, it.v.as_ref()) {
                Ok(()) => self.take(&mut ov, out, it),
                Err(msg) => {
                    let raw = value_bytes(&it.v);
                    self.refuse(out, it.e, it.fresh, raw, msg);
                }
            }
        }
        let ops = ov.ops();
        if ops.is_empty() {
            Plan::Nothing
        } else {
            Plan::Ops(ops)
        }
    }

    /// The whole-policy plan: everything together first (which also takes coordinated
    /// changes, such as a new key_prefix_len with keys of that length), else one entry at a
    /// time against the good state of the others.
    fn judge_whole(&mut self, items: Vec<Item>, good: Good, must: bool, out: &mut Outcome) -> Plan {
        let order: Vec<(Entry, bool)> = items.iter().map(|it| (it.e.clone(), it.fresh)).collect();
        let mut ov = Overlay::new(good);
        let mut accepted = 0;
        for it in items {
            accepted += usize::from(ov.put(&it.e, it.v));
        }
        if accepted == 0 && !must {
            for (e, _) in &order {
                self.clear(e);
            }
            return Plan::Nothing;
        }
        let (mut p, blamed) = ov.into_policy();
        if let Ok(c) = compile(&p, &blamed) {
            for (e, _) in &order {
                self.clear(e);
            }
            out.accepted += accepted;
            return Plan::Whole(Box::new(p), Box::new(c));
        }
        // Slow path: take the batch's values back out of the policy, and judge them one by one.
        let items = take_back(&mut p, order);
        drop(p);
        let mut ov = Overlay::new(good);
        let mut taken = Vec::new();
        let mut outcome = Outcome::default();
        for it in items {
            match check(&ov, &it.e, it.v.as_ref()) {
                Ok(()) => {
                    taken.push((it.e.clone(), it.fresh));
                    self.take(&mut ov, &mut outcome, it);
                }
                Err(msg) => {
                    let raw = value_bytes(&it.v);
                    self.refuse(&mut outcome, it.e, it.fresh, raw, msg);
                }
            }
        }
        let (mut p, blamed) = ov.into_policy();
        let compiled = compile(&p, &blamed);
        match compiled {
            Ok(c) if outcome.accepted > 0 || must => {
                out.accepted += outcome.accepted;
                out.rejected += outcome.rejected;
                Plan::Whole(Box::new(p), Box::new(c))
            }
            Ok(_) => {
                out.rejected += outcome.rejected;
                Plan::Nothing
            }
            Err(msg) => {
                // The entries passed alone but not together: refuse the batch, keep all (their
                // values, taken back out of the policy, wait to be judged again).
                for it in take_back(&mut p, taken) {
                    let raw = value_bytes(&it.v);
                    self.hold(it.e, raw, format!("refused with its batch: {msg}"));
                }
                out.rejected += outcome.rejected + outcome.accepted;
                Plan::Nothing
            }
        }
    }

    fn clear(&mut self, e: &Entry) {
        self.errors.remove(&e.name());
        self.pending.remove(e);
    }

    fn take(&mut self, ov: &mut Overlay, out: &mut Outcome, it: Item) {
        self.clear(&it.e);
        if ov.put(&it.e, it.v) {
            out.accepted += 1;
        }
    }

    fn refuse(
        &mut self,
        out: &mut Outcome,
        e: Entry,
        fresh: bool,
        raw: Option<Vec<u8>>,
        msg: String,
    ) {
        if fresh {
            out.rejected += 1;
        }
        self.errors.insert(e.name(), msg);
        self.pending.insert(
            e,
            Pending {
                raw,
                with_batch: false,
            },
        );
    }
}

fn settings_of(head: &Policy) -> SettingsDoc {
    SettingsDoc {
        settings: head.settings.clone(),
        listener: head.listener.clone(),
    }
}

/// A batch's taken values over the good state. Only values that differ from it are held.
struct Overlay<'a> {
    good: Good<'a>,
    settings: Option<SettingsDoc>,
    ipsets: BTreeMap<String, Option<Vec<String>>>,
    keys: BTreeMap<String, Option<Key>>,
}

impl<'a> Overlay<'a> {
    fn new(good: Good<'a>) -> Overlay<'a> {
        Overlay {
            good,
            settings: None,
            ipsets: BTreeMap::new(),
            keys: BTreeMap::new(),
        }
    }

    fn settings(&self) -> SettingsDoc {
        self.settings
            .clone()
            .unwrap_or_else(|| settings_of(self.good.head))
    }

    fn ipset(&self, name: &str) -> Option<&Vec<String>> {
        match self.ipsets.get(name) {
            Some(v) => v.as_ref(),
            None => self.good.head.ipsets.get(name),
        }
    }

    /// Takes `v` (None: a delete) for `e`; true if that changes its value.
    fn put(&mut self, e: &Entry, v: Option<Value_>) -> bool {
        match (e, v) {
            (Entry::Settings, v) => {
                let new = match v {
                    Some(Value_::Settings(s)) => s,
                    _ => SettingsDoc::default(),
                };
                let changed = new != self.settings();
                if changed {
                    self.settings = Some(new);
                }
                changed
            }
            (Entry::Ipset(s), v) => {
                let new = match v {
                    Some(Value_::Ipset(c)) => Some(c),
                    _ => None,
                };
                let changed = new.as_ref() != self.ipset(s);
                if changed {
                    self.ipsets.insert(s.clone(), new);
                }
                changed
            }
            (Entry::Key(k), v) => {
                let new = match v {
                    Some(Value_::Key(key)) => Some(key),
                    _ => None,
                };
                let changed = match (&new, self.keys.get(k)) {
                    (_, Some(old)) => new != *old,
                    (Some(key), None) => self.good.keys.same(key) != Some(true),
                    (None, None) => self.good.keys.contains(k),
                };
                if changed {
                    self.keys.insert(k.clone(), new);
                }
                changed
            }
            (Entry::Unknown(_), _) => false,
        }
    }

    /// Up to `limit` keys (good or taken) that bind ipset `name`.
    fn binding(&self, name: &str, limit: usize) -> Vec<String> {
        let mut found: Vec<String> = self
            .keys
            .values()
            .flatten()
            .filter(|k| k.ipsets.iter().any(|s| s == name))
            .map(|k| k.prefix.clone())
            .take(limit)
            .collect();
        // Only keys whose JSON names the set are parsed.
        let quoted = serde_json::to_vec(name).unwrap_or_default();
        for raw in self.good.keys.iter_raw() {
            if found.len() >= limit {
                break;
            }
            if memchr::memmem::find(raw, &quoted).is_none() {
                continue;
            }
            let k: Key = serde_json::from_slice(raw).expect("the store holds keys it serialised");
            if !self.keys.contains_key(&k.prefix) && k.ipsets.iter().any(|s| s == name) {
                found.push(k.prefix);
            }
        }
        found
    }

    /// The changes as ops (ipsets set first, so keys that bind them follow; deleted last).
    fn ops(self) -> Vec<PatchOp> {
        let mut ops = Vec::new();
        let mut deletes = Vec::new();
        for (name, v) in self.ipsets {
            match v {
                Some(cidrs) => ops.push(PatchOp::SetIpset { name, cidrs }),
                None => deletes.push(PatchOp::DeleteIpset { name }),
            }
        }
        for (prefix, v) in self.keys {
            ops.push(match v {
                Some(key) => PatchOp::Upsert { key },
                None => PatchOp::Delete { prefix },
            });
        }
        ops.extend(deletes);
        ops
    }

    /// The whole policy the good state and the batch make (the good keys in their order, the
    /// replaced ones in place, new ones after), and the batch's keys' positions in it, for
    /// naming errors.
    fn into_policy(self) -> (Policy, Vec<String>) {
        let mut keys = self.keys;
        let s = self.settings.unwrap_or_else(|| settings_of(self.good.head));
        let mut ipsets = self.good.head.ipsets.clone();
        for (n, v) in self.ipsets {
            match v {
                Some(c) => {
                    ipsets.insert(n, c);
                }
                None => {
                    ipsets.remove(&n);
                }
            }
        }
        let mut key = Vec::with_capacity(self.good.keys.len() + keys.len());
        for k in self.good.keys.iter() {
            match keys.remove(&k.prefix) {
                Some(Some(new)) => key.push(new),
                Some(None) => {}
                None => key.push(k),
            }
        }
        key.extend(keys.into_values().flatten());
        let blamed = key.iter().map(|k| k.prefix.clone()).collect();
        (
            Policy {
                revision: None,
                settings: s.settings,
                listener: s.listener,
                ipsets,
                key,
            },
            blamed,
        )
    }
}

/// The batch's entries, their values taken back out of the policy they were composed into.
fn take_back(p: &mut Policy, order: Vec<(Entry, bool)>) -> Vec<Item> {
    let mut by: std::collections::HashMap<String, Key> =
        p.key.drain(..).map(|k| (k.prefix.clone(), k)).collect();
    let mut items = Vec::with_capacity(order.len());
    for (e, fresh) in order {
        let v = match &e {
            Entry::Settings => Some(Value_::Settings(SettingsDoc {
                settings: p.settings.clone(),
                listener: p.listener.clone(),
            })),
            Entry::Ipset(s) => p.ipsets.get(s).cloned().map(Value_::Ipset),
            Entry::Key(k) => by.remove(k).map(Value_::Key),
            Entry::Unknown(_) => None,
        };
        // A settings entry the batch deleted composed the defaults: a delete again.
        let v = match (&e, v) {
            (Entry::Settings, Some(Value_::Settings(s))) if s == SettingsDoc::default() => None,
            (_, v) => v,
        };
        items.push(Item { e, v, fresh });
    }
    items
}

/// Can `v` (None: a delete) replace `e`'s value, given the others' in `ov`?
fn check(ov: &Overlay, e: &Entry, v: Option<&Value_>) -> Result<(), String> {
    match (e, v) {
        (Entry::Unknown(_), Some(_)) => Err(unknown_entry()),
        (Entry::Unknown(_), None) => Ok(()),
        (Entry::Settings, v) => {
            // Settings bear on every key (key_prefix_len): judged with all of them.
            let doc = match v {
                Some(Value_::Settings(s)) => s.clone(),
                _ => SettingsDoc::default(),
            };
            let mut with = Overlay::new(ov.good);
            with.settings = Some(doc);
            with.ipsets = ov.ipsets.clone();
            with.keys = ov.keys.clone();
            let (p, blamed) = with.into_policy();
            compile(&p, &blamed).map(|_| ())
        }
        (Entry::Key(_), None) => Ok(()),
        (Entry::Key(_), Some(Value_::Key(k))) => {
            // A key alone, with the settings and the ipsets it binds.
            let s = ov.settings();
            let p = Policy {
                settings: s.settings,
                ipsets: k
                    .ipsets
                    .iter()
                    .filter_map(|n| ov.ipset(n).map(|v| (n.clone(), v.clone())))
                    .collect(),
                key: vec![k.clone()],
                listener: s.listener,
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
            let bound = ov.binding(s, 5);
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

/// Compiles a composed policy; errors name their entry (`key[3].allow[0]` →
/// `keys/<prefix>: allow[0]`).
fn compile(p: &Policy, blamed: &[String]) -> Result<Compiled, String> {
    p.compile().map_err(|errs| {
        join_errors(&errs, |at| {
            if let Some(rest) = at.strip_prefix("key[")
                && let Some((idx, tail)) = rest.split_once(']')
                && let Ok(i) = idx.parse::<usize>()
                && let Some(k) = blamed.get(i)
            {
                return format!("keys/{k}{}", tail.replacen('.', ": ", 1));
            }
            at.to_owned()
        })
    })
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
            // The common case in one pass: a whole key, named as its entry.
            if let Ok(k) = serde_json::from_str::<Key>(text)
                && k.prefix == *name
            {
                return Ok(Value_::Key(k));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = r#"{"settings": {"key_prefix_len": 8, "unknown_key": "drop"},
        "listener": [{"port": 8080, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}]}"#;

    /// The engine as the reconciler sees it: the applied policy, taken over by a whole plan
    /// and changed by ops.
    #[derive(Default)]
    struct Fake {
        head: Policy,
        keys: KeyStore,
        owned: bool,
        rec: Reconciler,
    }

    impl Fake {
        fn with(kvs: &[(&str, &str)]) -> Fake {
            let mut f = Fake::default();
            let (out, plan) = f.snapshot(kvs);
            assert_eq!(plan, "whole");
            assert_eq!(out.rejected, 0, "{:?}", f.rec.errors());
            f
        }

        fn submit(&mut self, plan: Plan) -> &'static str {
            match plan {
                Plan::Nothing => "nothing",
                Plan::Whole(p, _) => {
                    let mut p = *p;
                    self.keys = KeyStore::from_keys(std::mem::take(&mut p.key));
                    self.head = p;
                    self.owned = true;
                    "whole"
                }
                Plan::Ops(ops) => {
                    for op in ops {
                        match op {
                            PatchOp::Upsert { key } => self.keys.upsert(&key),
                            PatchOp::Delete { prefix } => assert!(self.keys.delete(&prefix)),
                            PatchOp::SetIpset { name, cidrs } => {
                                self.head.ipsets.insert(name, cidrs);
                            }
                            PatchOp::DeleteIpset { name } => {
                                assert!(self.head.ipsets.remove(&name).is_some());
                            }
                            op => panic!("not an op of the reconciler: {op:?}"),
                        }
                    }
                    "ops"
                }
            }
        }

        fn snapshot(&mut self, kvs: &[(&str, &str)]) -> (Outcome, &'static str) {
            let entries = kvs
                .iter()
                .map(|(n, v)| Parsed::new(n, v.as_bytes().to_vec()))
                .collect();
            let good = Good {
                head: &self.head,
                keys: &self.keys,
            };
            let (out, plan) = self.rec.snapshot(entries, good, self.owned);
            (out, self.submit(plan))
        }

        fn apply(&mut self, changes: Vec<Change>) -> (Outcome, &'static str) {
            let good = Good {
                head: &self.head,
                keys: &self.keys,
            };
            let (out, plan) = self.rec.apply(changes, good);
            (out, self.submit(plan))
        }

        fn policy(&self) -> Policy {
            Policy {
                key: self.keys.iter().collect(),
                ..self.head.clone()
            }
        }

        fn errors(&self) -> &BTreeMap<String, String> {
            self.rec.errors()
        }
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
    fn snapshot_composes_a_policy() {
        let f = Fake::with(&[
            ("settings", SETTINGS),
            ("ipsets/broker-a", r#"["203.0.113.0/24"]"#),
            (
                "keys/bbbbbbbb",
                r#"{"allow": ["10.0.0.0/8"], "ipsets": ["broker-a"]}"#,
            ),
            ("keys/aaaaaaaa", r#"{"prefix": "aaaaaaaa", "locked": true}"#),
        ]);
        let p = f.policy();
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
    fn a_first_snapshot_takes_the_maps_over_even_when_empty() {
        let mut f = Fake::default();
        assert_eq!(f.snapshot(&[]).1, "whole");
        assert!(f.owned);
        // Owned, the same snapshot again is nothing to write.
        assert_eq!(f.snapshot(&[]).1, "nothing");
    }

    #[test]
    fn an_invalid_entry_keeps_its_last_good_value_and_the_rest_syncs() {
        let mut f = Fake::with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", r#"{"allow": ["10.0.0.0/8"]}"#),
        ]);
        let (out, plan) = f.apply(vec![
            Change::put("keys/aaaaaaaa", "{not json"),
            Change::put("keys/bbbbbbbb", r#"{"locked": true}"#),
        ]);
        assert_eq!((out.accepted, out.rejected, plan), (1, 1, "ops"));
        let p = f.policy();
        assert_eq!(p.find_key("aaaaaaaa").unwrap().allow, ["10.0.0.0/8"]);
        assert!(p.find_key("bbbbbbbb").unwrap().locked);
        assert_eq!(f.errors().len(), 1);
        assert!(
            f.errors()["keys/aaaaaaaa"].contains("line 1"),
            "{:?}",
            f.errors()
        );

        // A good value clears the error.
        let (out, _) = f.apply(vec![Change::put("keys/aaaaaaaa", r#"{"locked": true}"#)]);
        assert_eq!((out.accepted, out.rejected), (1, 0));
        assert!(f.errors().is_empty());
        assert!(f.policy().find_key("aaaaaaaa").unwrap().locked);
    }

    #[test]
    fn invalid_values_are_placed() {
        let mut f = Fake::with(&[("settings", SETTINGS)]);
        let (out, plan) = f.apply(vec![
            Change::put("keys/aaaaaaaa", r#"{"allow": ["10.0.0.1/8"]}"#),
            Change::put("keys/bbbbbbbb", r#"{"prefix": "cccccccc"}"#),
            Change::put("keys/dddddddd", r#"{"ipsets": ["nope"]}"#),
            Change::put("keys/short", r#"{}"#),
            Change::put("ipsets/x", r#"["300.0.0.0/8"]"#),
            Change::put("ipsets/y", r#"{"a": 1}"#),
            Change::put("kyes/typo", r#"{}"#),
        ]);
        assert_eq!((out.rejected, plan), (7, "nothing"), "{:?}", f.errors());
        assert!(f.policy().key.is_empty());
        let e = f.errors();
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
        // Retried with the next batch, they are not counted again.
        let (out, _) = f.apply(vec![Change::put("keys/eeeeeeee", "{}")]);
        assert_eq!((out.accepted, out.rejected), (1, 0));
        assert_eq!(f.errors().len(), 7);
        // A typo deleted takes its error along.
        f.apply(vec![Change::delete("kyes/typo")]);
        assert!(!f.errors().contains_key("kyes/typo"));
    }

    #[test]
    fn a_refused_entry_is_taken_when_what_it_lacked_comes() {
        let mut f = Fake::with(&[("settings", SETTINGS)]);
        let (out, _) = f.apply(vec![Change::put(
            "keys/aaaaaaaa",
            r#"{"ipsets": ["broker-a"]}"#,
        )]);
        assert_eq!(out.rejected, 1);
        let (out, plan) = f.apply(vec![Change::put("ipsets/broker-a", r#"["192.0.2.0/24"]"#)]);
        assert_eq!((out.rejected, plan), (0, "ops"), "{:?}", f.errors());
        assert!(f.errors().is_empty());
        assert_eq!(
            f.policy().find_key("aaaaaaaa").unwrap().ipsets,
            ["broker-a"]
        );
    }

    #[test]
    fn an_ipset_still_bound_is_not_deleted() {
        let mut f = Fake::with(&[
            ("settings", SETTINGS),
            ("ipsets/broker-a", r#"["192.0.2.0/24"]"#),
            ("keys/aaaaaaaa", r#"{"ipsets": ["broker-a"]}"#),
            ("keys/bbbbbbbb", r#"{"allow": ["10.0.0.1"]}"#),
        ]);
        let (out, plan) = f.apply(vec![Change::delete("ipsets/broker-a")]);
        assert_eq!((out.rejected, plan), (1, "nothing"));
        assert!(f.policy().ipsets.contains_key("broker-a"));
        assert!(f.errors()["ipsets/broker-a"].contains("aaaaaaaa"));
        // The key lets go of it: the pending delete goes through, in the same ops.
        let (out, plan) = f.apply(vec![Change::put("keys/aaaaaaaa", r#"{}"#)]);
        assert_eq!((out.rejected, plan), (0, "ops"), "{:?}", f.errors());
        assert!(!f.policy().ipsets.contains_key("broker-a"));
        assert!(f.errors().is_empty());
    }

    #[test]
    fn coordinated_changes_in_one_batch_are_taken_together() {
        let mut f = Fake::with(&[("settings", SETTINGS), ("keys/aaaaaaaa", "{}")]);
        let s10 = SETTINGS.replace("\"key_prefix_len\": 8", "\"key_prefix_len\": 10");
        let (out, plan) = f.apply(vec![
            Change::put("settings", s10.as_str()),
            Change::delete("keys/aaaaaaaa"),
            Change::put("keys/bbbbbbbbbb", "{}"),
        ]);
        assert_eq!((out.rejected, plan), (0, "whole"), "{:?}", f.errors());
        assert_eq!(f.policy().settings.key_prefix_len, 10);
        assert_eq!(f.policy().key.len(), 1);
        // Alone, the same settings change would break the key: refused, blamed on the key.
        let s12 = SETTINGS.replace("\"key_prefix_len\": 8", "\"key_prefix_len\": 12");
        let (out, plan) = f.apply(vec![Change::put("settings", s12.as_str())]);
        assert_eq!((out.rejected, plan), (1, "nothing"));
        assert_eq!(f.policy().settings.key_prefix_len, 10);
        assert!(
            f.errors()["settings"].contains("keys/bbbbbbbbbb"),
            "{:?}",
            f.errors()
        );
    }

    #[test]
    fn a_snapshot_deletes_what_is_gone_and_drops_their_errors() {
        let mut f = Fake::with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", "{}"),
            ("keys/bbbbbbbb", "{}"),
        ]);
        let _ = f.apply(vec![Change::put("keys/cccccccc", "nope")]);
        assert_eq!(f.errors().len(), 1);
        let (_, plan) = f.snapshot(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", r#"{"locked": true}"#),
        ]);
        assert_eq!(plan, "ops");
        let p = f.policy();
        assert_eq!(p.key.len(), 1);
        assert!(p.key[0].locked);
        assert!(f.errors().is_empty());
    }

    #[test]
    fn after_a_restart_an_invalid_entry_keeps_the_applied_value() {
        // The engine restored an etcd policy from its state dir; the reconciler starts empty.
        let mut f = Fake::with(&[
            ("settings", SETTINGS),
            ("keys/aaaaaaaa", r#"{"locked": true}"#),
        ]);
        f.rec = Reconciler::default();
        let (out, plan) = f.snapshot(&[("settings", SETTINGS), ("keys/aaaaaaaa", "{bad")]);
        assert_eq!((out.rejected, plan), (1, "nothing"));
        assert!(f.policy().find_key("aaaaaaaa").unwrap().locked);
    }

    #[test]
    fn key_batches_are_judged_key_by_key() {
        let mut f = Fake::with(&[("keys/aaaaaaaa", "{}")]);
        let good = Good {
            head: &f.head,
            keys: &f.keys,
        };
        let (out, plan) = f.rec.apply(
            vec![
                Change::put("keys/bbbbbbbb", r#"{"allow": ["10.0.0.1"]}"#),
                Change::put("keys/cccccccc", r#"{"allow": ["10.0.0.1/8"]}"#),
                Change::put("keys/aaaaaaaa", r#"{"locked": true}"#),
            ],
            good,
        );
        assert_eq!(out.rejected, 1);
        let Plan::Ops(ops) = &plan else {
            panic!("{plan:?}")
        };
        let named: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                PatchOp::Upsert { key } => key.prefix.as_str(),
                op => panic!("{op:?}"),
            })
            .collect();
        assert_eq!(named, ["aaaaaaaa", "bbbbbbbb"]);
        f.submit(plan);
        assert!(f.keys.get("aaaaaaaa").unwrap().locked);
        assert!(f.keys.get("cccccccc").is_none());
        assert!(f.errors().contains_key("keys/cccccccc"));
        // Fixed later: taken, and its error is gone.
        let (out, _) = f.apply(vec![Change::put(
            "keys/cccccccc",
            r#"{"allow": ["10.0.0.0/8"]}"#,
        )]);
        assert_eq!(out.accepted, 1);
        assert!(f.errors().is_empty());
        // A put of the value the engine holds changes nothing.
        let (out, plan) = f.apply(vec![Change::put("keys/aaaaaaaa", r#"{"locked": true}"#)]);
        assert_eq!((out.accepted, plan), (0, "nothing"));
    }

    #[test]
    fn a_lock_is_not_held_up_by_keys_in_error() {
        let mut f = Fake::with(&[("settings", SETTINGS), ("keys/aaaaaaaa", "{}")]);
        let bad: Vec<Change> = (0..500)
            .map(|i| Change::put(&format!("keys/b{i:07}"), r#"{"ipsets": ["later"]}"#))
            .collect();
        let (out, _) = f.apply(bad);
        assert_eq!(out.rejected, 500);
        // A lock judges the lock, not the 500 keys waiting for their ipset.
        let (out, plan) = f.apply(vec![Change::put("keys/aaaaaaaa", r#"{"locked": true}"#)]);
        assert_eq!((out.judged, out.accepted, plan), (1, 1, "ops"));
        assert_eq!(f.errors().len(), 500);
        // The ipset they lacked comes: they are judged again, and taken.
        let (out, plan) = f.apply(vec![Change::put("ipsets/later", r#"["192.0.2.0/24"]"#)]);
        assert_eq!((out.judged, out.accepted, plan), (501, 501, "ops"));
        assert!(f.errors().is_empty());
        assert_eq!(f.keys.len(), 501);
    }

    #[test]
    fn a_resync_costs_what_changed() {
        let names: Vec<String> = (0..2000).map(|i| format!("k{i:07}")).collect();
        let mut kvs: Vec<(String, String)> = names
            .iter()
            .map(|n| {
                (
                    format!("keys/{n}"),
                    r#"{"allow": ["10.0.0.1"]}"#.to_string(),
                )
            })
            .collect();
        kvs.push(("settings".into(), SETTINGS.into()));
        fn borrow(v: &[(String, String)]) -> Vec<(&str, &str)> {
            v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
        }
        let mut f = Fake::with(&borrow(&kvs));
        assert_eq!(f.keys.len(), 2000);
        // The same snapshot again: nothing.
        assert_eq!(f.snapshot(&borrow(&kvs)).1, "nothing");
        // One key locked, one gone, one new: three ops.
        kvs[5].1 = r#"{"allow": ["10.0.0.1"], "locked": true}"#.into();
        kvs.remove(7);
        kvs.push(("keys/knew0000".into(), "{}".into()));
        let good = Good {
            head: &f.head,
            keys: &f.keys,
        };
        let entries = kvs
            .iter()
            .map(|(n, v)| Parsed::new(n, v.as_bytes().to_vec()))
            .collect();
        let (out, plan) = f.rec.snapshot(entries, good, true);
        assert_eq!(out.accepted, 3);
        let Plan::Ops(ops) = &plan else {
            panic!("{plan:?}")
        };
        assert_eq!(ops.len(), 3, "{ops:?}");
        f.submit(plan);
        assert_eq!(f.keys.len(), 2000);
        assert!(f.keys.get(&names[5]).unwrap().locked);
        assert!(f.keys.get(&names[7]).is_none());
    }

    #[test]
    fn ops_the_engine_refuses_wait_in_error_with_their_values() {
        let mut f = Fake::with(&[("keys/aaaaaaaa", "{}")]);
        let key: Key = serde_json::from_str(r#"{"prefix": "bbbbbbbb", "locked": true}"#).unwrap();
        f.rec
            .refused_by_engine(&[PatchOp::Upsert { key }], "the key table is full");
        assert!(f.errors()["keys/bbbbbbbb"].contains("table is full"));
        // Judged again with the next batch, and taken.
        let (out, plan) = f.apply(vec![Change::put("keys/cccccccc", "{}")]);
        assert_eq!((out.accepted, plan), (2, "ops"));
        assert!(f.keys.get("bbbbbbbb").unwrap().locked);
        assert!(f.errors().is_empty());
    }
}
