//! The SYN prefilter's content: a blocked Bloom filter over the union of every allow entry.
//!
//! A handshake to a listener passes the prefilter when its source, masked to one of the
//! slot's prefix lengths, hits a Bloom word with all its bits set (see
//! `filter_common::prefilter_probe`). Bits are only ever set for sources some key allows,
//! and a false positive merely sends a SYN on to the key check, so the filter can let too
//! much through but never blocks an allowed source.
//!
//! What goes in: every key's own entries (inline IPv4 hosts and its own set) and every ipset
//! some key binds, **locked keys included**. A locked key's sources stay in the union, so
//! locking and unlocking never change it and stay O(1); a locked key's traffic is still
//! dropped by the key check.
//!
//! The kernel probes at most `MAX_PLENS` prefix lengths per family. When the union holds more,
//! the rarest lengths are coarsened to the next shorter length present: that only widens what
//! passes, so it stays safe.
//!
//! Everything here is pure; `dataplane` writes the words into `KW_PREFILTER`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use filter_common::{FAMILY_V4, KEY_PRESENT, KeyRecord, MAX_PLENS, mask_addr, prefilter_probe};

use crate::policy::{Cidr, Compiled, SetContent};

/// The prefix lengths one half is probed at, per family, longest first (hosts are the common
/// case, so the first probe usually decides).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlenPlan {
    pub v4: Vec<u8>,
    pub v6: Vec<u8>,
}

impl PlenPlan {
    /// Chooses at most `MAX_PLENS` lengths per family for these entries: the rarest lengths
    /// are merged into the next shorter one present until the rest fit.
    pub fn for_entries(entries: impl IntoIterator<Item = Cidr>) -> PlenPlan {
        // Plain arrays: this runs over millions of entries on a full apply.
        let mut counts = [[0usize; 129]; 2];
        for (family, plen, _) in entries {
            counts[fam_idx(family)][(plen as usize).min(128)] += 1;
        }
        let [v4, v6] = counts.map(|c| {
            coarsen(
                c.iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(p, n)| (p as u8, *n))
                    .collect(),
            )
        });
        PlenPlan { v4, v6 }
    }

    pub fn list(&self, family: u8) -> &[u8] {
        if family == FAMILY_V4 {
            &self.v4
        } else {
            &self.v6
        }
    }

    fn list_mut(&mut self, family: u8) -> &mut Vec<u8> {
        if family == FAMILY_V4 {
            &mut self.v4
        } else {
            &mut self.v6
        }
    }

    /// The length an entry of length `plen` is stored at: the longest listed one not longer
    /// than it (masking to it only widens the entry). None if every listed one is longer.
    pub fn effective(&self, family: u8, plen: u8) -> Option<u8> {
        self.list(family)
            .iter()
            .copied()
            .filter(|&q| q <= plen)
            .max()
    }

    /// Like `effective`, but adds `plen` to the list when it is missing and there is room.
    fn place(&mut self, family: u8, plen: u8) -> Option<u8> {
        let list = self.list_mut(family);
        if list.contains(&plen) {
            return Some(plen);
        }
        if list.len() < MAX_PLENS {
            list.push(plen);
            list.sort_unstable_by(|a, b| b.cmp(a));
            return Some(plen);
        }
        self.effective(family, plen)
    }

    /// The lengths in the kernel's form: count and a zero-padded array.
    pub fn kernel_lists(&self) -> (u8, [u8; MAX_PLENS], u8, [u8; MAX_PLENS]) {
        let arr = |l: &[u8]| {
            let mut a = [0u8; MAX_PLENS];
            for (i, p) in l.iter().take(MAX_PLENS).enumerate() {
                a[i] = *p;
            }
            a
        };
        (
            self.v4.len().min(MAX_PLENS) as u8,
            arr(&self.v4),
            self.v6.len().min(MAX_PLENS) as u8,
            arr(&self.v6),
        )
    }
}

fn fam_idx(family: u8) -> usize {
    usize::from(family != FAMILY_V4)
}

/// Merges the rarest lengths (never the shortest, which has nowhere shorter to go) into the
/// next shorter one until at most `MAX_PLENS` remain. Returns them longest first.
fn coarsen(mut counts: BTreeMap<u8, usize>) -> Vec<u8> {
    while counts.len() > MAX_PLENS {
        let plens: Vec<(u8, usize)> = counts.iter().map(|(p, c)| (*p, *c)).collect();
        // Candidates: every length but the shortest, with the one just shorter than it.
        // Fewest entries first; on a tie the smallest widening.
        let (i, _) = plens
            .iter()
            .enumerate()
            .skip(1)
            .min_by_key(|(i, (p, c))| (*c, p - plens[i - 1].0))
            .expect("more than MAX_PLENS lengths");
        let (from, n) = plens[i];
        let into = plens[i - 1].0;
        counts.remove(&from);
        *counts.get_mut(&into).expect("present") += n;
    }
    counts.keys().rev().copied().collect()
}

/// An address as the kernel hashes it: two big-endian words, IPv4 in the top of `hi`.
pub fn addr_words(addr: &[u8; 16]) -> (u64, u64) {
    let hi = u64::from_be_bytes(addr[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(addr[8..].try_into().expect("8 bytes"));
    (hi, lo)
}

/// The word and bits one entry sets when stored at `plen`.
pub fn entry_probe(family: u8, plen: u8, addr: &[u8; 16], words_log2: u8) -> (u32, u64) {
    let (hi, lo) = addr_words(addr);
    let (hi, lo) = mask_addr(hi, lo, plen);
    prefilter_probe(family, plen, hi, lo, words_log2)
}

/// Sets an entry's bits at the length the plan stores it at. False if the plan has none.
fn insert(words: &mut [u64], plan: &PlenPlan, c: &Cidr, words_log2: u8) -> bool {
    let (family, plen, addr) = c;
    let Some(q) = plan.effective(*family, *plen) else {
        return false;
    };
    let (w, bits) = entry_probe(*family, q, addr, words_log2);
    words[w as usize] |= bits;
    true
}

/// A whole half: the plan for the entries and the words with all of them set. The entries
/// are walked twice (lengths first), never collected: a million keys hold millions.
pub fn build<I: Iterator<Item = Cidr>>(
    entries: impl Fn() -> I,
    words_log2: u8,
) -> (PlenPlan, Vec<u64>) {
    let plan = PlenPlan::for_entries(entries());
    let mut words = vec![0u64; 1usize << words_log2];
    for c in entries() {
        let placed = insert(&mut words, &plan, &c, words_log2);
        debug_assert!(placed, "the plan keeps the shortest length of each family");
    }
    (plan, words)
}

/// What the kernel decides for a source (`addr` in network order, IPv4 in the first 4
/// bytes): true if some listed length hits a word with all its bits set.
pub fn passes(words: &[u64], plan: &PlenPlan, family: u8, addr: &[u8; 16], words_log2: u8) -> bool {
    plan.list(family).iter().any(|&q| {
        let (w, bits) = entry_probe(family, q, addr, words_log2);
        words[w as usize] & bits == bits
    })
}

/// How full a half is, and the chance that a source no key allows passes anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fill {
    pub words: usize,
    pub bits_set: u64,
    /// Bits set over all bits.
    pub fill: f64,
    /// Estimated false-positive rate of one SYN from a random IPv4 / IPv6 source outside the
    /// union (one probe per listed length).
    pub fp_v4: f64,
    pub fp_v6: f64,
}

pub fn fill(words: &[u64], plan: &PlenPlan) -> Fill {
    let bits_set: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
    // A probe hits a uniformly random word and needs its 3 bits set: per word about
    // (set/64)^3, averaged over words (blocked filters fill unevenly).
    let per_probe = if words.is_empty() {
        0.0
    } else {
        words
            .iter()
            .map(|w| (f64::from(w.count_ones()) / 64.0).powi(3))
            .sum::<f64>()
            / words.len() as f64
    };
    let fp = |n: usize| 1.0 - (1.0 - per_probe).powi(n as i32);
    Fill {
        words: words.len(),
        bits_set,
        fill: if words.is_empty() {
            0.0
        } else {
            bits_set as f64 / (words.len() as f64 * 64.0)
        },
        fp_v4: fp(plan.v4.len()),
        fp_v6: fp(plan.v6.len()),
    }
}

/// The union of a compiled policy: every key's inline hosts and own set, then every ipset some
/// key binds (once). Locked keys included (see the module docs).
pub fn compiled_entries(c: &Compiled) -> impl Iterator<Item = Cidr> + '_ {
    let bound: BTreeSet<&str> = c
        .keys
        .values()
        .flat_map(|k| k.ipsets.iter().map(String::as_str))
        .collect();
    let keys = c.keys.values().flat_map(|k| {
        k.inline_v4
            .iter()
            .map(|h| host_cidr(*h))
            .chain(k.own_set.iter().flat_map(|s| s.iter().copied()))
    });
    let ipsets = bound
        .into_iter()
        .filter_map(|n| c.ipsets.get(n))
        .flat_map(|s| s.iter().copied());
    keys.chain(ipsets)
}

/// One slot's half of `KW_PREFILTER` as the loader maintains it: what changed since the map
/// got its words, and the words.
///
/// Changes come as record pairs (old, new) of one key. What the new record adds is set in
/// place; what the old one loses stays set (stale: it only lets a few more SYNs reach the key
/// check) until a rebuild. Address sets are reference counted, so a shared ipset is added
/// once and goes stale only when its last key lets go; inline hosts are compared per record,
/// which keeps a million keys' hosts out of any map.
#[derive(Clone, Debug, Default)]
pub struct Half {
    /// Address sets the slot's records reference, with counts.
    sets: HashMap<u32, u32, BuildHasherDefault<U32Hasher>>,
    /// Entries the contributions add up to (overlaps counted twice; only a size estimate).
    size: usize,
    /// Entries whose last contribution went away since the last rebuild; their bits linger.
    stale: usize,
    /// Entries that became present and still need their bits set.
    pending: Vec<Cidr>,
    /// A rebuild is coming (a full apply): new sources need not be listed in `pending`.
    rebuild_next: bool,
    /// False until the words match the plan (a fresh map, or another words_log2).
    valid: bool,
    /// Words changed since the map last got them (`dirty_all`: every word may have).
    dirty: Vec<u32>,
    dirty_all: bool,
    pub plan: PlenPlan,
    pub words: Vec<u64>,
}

/// Rebuild once this share of the union is stale.
const STALE_REBUILD_PERCENT: usize = 10;

fn record_hosts(r: &KeyRecord) -> &[u32] {
    if r.flags & KEY_PRESENT == 0 {
        return &[];
    }
    &r.inline_v4[..(r.n_inline_v4 as usize).min(r.inline_v4.len())]
}

fn record_sets(r: &KeyRecord) -> &[u32] {
    if r.flags & KEY_PRESENT == 0 {
        return &[];
    }
    &r.sets[..(r.n_sets as usize).min(r.sets.len())]
}

/// Every entry some records contribute (an entry two contributions share comes twice).
pub fn record_entries<'a>(
    records: impl Iterator<Item = &'a KeyRecord> + Clone + 'a,
    sets: &'a HashMap<u32, SetContent>,
) -> impl Iterator<Item = Cidr> + 'a {
    let ids: BTreeSet<u32> = records
        .clone()
        .flat_map(|r| record_sets(r).iter().copied())
        .collect();
    records
        .flat_map(|r| record_hosts(r).iter().map(|h| host_cidr(*h)))
        .chain(
            ids.into_iter()
                .filter_map(|id| sets.get(&id))
                .flat_map(|c| c.iter().copied()),
        )
}

impl Half {
    /// After the slot's records were counted (`record_changed` from empty records): takes
    /// the words read back from the map (after a restart) and the lengths they were built
    /// for, instead of setting every source's bits again. `valid` false makes the next
    /// update rebuild.
    pub fn restore(&mut self, words: Vec<u64>, plan: PlenPlan, valid: bool) {
        self.words = words;
        self.plan = plan;
        self.valid = valid;
        self.pending.clear();
        self.stale = 0;
        self.dirty.clear();
        self.dirty_all = false;
        self.rebuild_next = false;
    }

    /// The other slot's half, for a slot whose key records all equal that slot's (a settle):
    /// the same counts and words, every word to be written. Saves rebuilding from the union.
    pub fn copy_of(other: &Half) -> Half {
        let mut h = other.clone();
        h.pending.clear();
        h.rebuild_next = false;
        h.dirty.clear();
        h.dirty_all = true;
        h
    }

    /// The words to write to the map since the last call: None means all of them. Keeps a
    /// PATCH (a lock above all) from comparing the whole half.
    pub fn take_dirty(&mut self) -> Option<Vec<u32>> {
        if std::mem::take(&mut self.dirty_all) {
            self.dirty.clear();
            None
        } else {
            Some(std::mem::take(&mut self.dirty))
        }
    }

    /// Announces a full apply: the next `update` rebuilds, so what records add need not be
    /// remembered one by one.
    pub fn expect_rebuild(&mut self) {
        self.rebuild_next = true;
        self.pending = Vec::new();
    }

    /// Notes that one key's record in this slot goes from `old` to `new`. A record that keeps
    /// its sources (a lock) changes nothing here.
    pub fn record_changed(
        &mut self,
        old: &KeyRecord,
        new: &KeyRecord,
        sets: &HashMap<u32, SetContent>,
    ) {
        let (oh, nh) = (record_hosts(old), record_hosts(new));
        for h in nh.iter().filter(|h| !oh.contains(h)) {
            self.size += 1;
            if !self.rebuild_next {
                self.pending.push(host_cidr(*h));
            }
        }
        for _ in oh.iter().filter(|h| !nh.contains(h)) {
            self.size = self.size.saturating_sub(1);
            self.stale += 1;
        }
        let (os, ns) = (record_sets(old), record_sets(new));
        for id in ns.iter().filter(|id| !os.contains(id)) {
            let n = self.sets.entry(*id).or_default();
            *n += 1;
            if *n == 1 {
                let content = sets.get(id).map_or(0, |c| {
                    if !self.rebuild_next {
                        self.pending.extend(c.iter().copied());
                    }
                    c.len()
                });
                self.size += content;
            }
        }
        for id in os.iter().filter(|id| !ns.contains(id)) {
            if let Some(n) = self.sets.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.sets.remove(id);
                    let len = sets.get(id).map_or(0, SetContent::len);
                    self.size = self.size.saturating_sub(len);
                    self.stale += len;
                }
            }
        }
    }

    /// Brings the words up to date. `built`: a whole new half, made from the full policy
    /// (a full apply). Otherwise sets the bits of what became present, or rebuilds from
    /// `entries` when the words are not valid, a new entry needs a prefix length the plan
    /// cannot take, or too much is stale. Returns whether it rebuilt.
    pub fn update<I: Iterator<Item = Cidr>>(
        &mut self,
        built: Option<(PlenPlan, Vec<u64>)>,
        entries: impl Fn() -> I,
        words_log2: u8,
    ) -> bool {
        let len = 1usize << words_log2;
        let mut rebuild = std::mem::take(&mut self.rebuild_next)
            || !self.valid
            || self.words.len() != len
            || self.stale * 100 > self.size * STALE_REBUILD_PERCENT;
        if built.is_none() && !rebuild {
            for c in std::mem::take(&mut self.pending) {
                let (family, plen, addr) = c;
                match self.plan.place(family, plen) {
                    Some(q) => {
                        let (w, bits) = entry_probe(family, q, &addr, words_log2);
                        if self.words[w as usize] & bits != bits {
                            self.words[w as usize] |= bits;
                            self.dirty.push(w);
                        }
                    }
                    None => {
                        rebuild = true;
                        break;
                    }
                }
            }
        }
        let fresh = match built {
            Some(b) => Some(b),
            None if rebuild => Some(build(entries, words_log2)),
            None => None,
        };
        let rebuilt = fresh.is_some();
        if let Some((plan, words)) = fresh {
            self.plan = plan;
            self.words = words;
            self.stale = 0;
            self.valid = true;
            self.dirty_all = true;
        }
        self.pending.clear();
        self.rebuild_next = false;
        rebuilt
    }

    pub fn stale(&self) -> usize {
        self.stale
    }

    /// Union size estimate (entries counted once per contribution).
    pub fn size(&self) -> usize {
        self.size
    }
}

/// Hashes the u32 ids `Half` counts: one multiply instead of SipHash.
#[derive(Clone, Copy, Debug, Default)]
pub struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 ^= self.0 >> 29;
    }
}

fn host_cidr(h: u32) -> Cidr {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&h.to_ne_bytes());
    (FAMILY_V4, 32, a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_cidr;
    use filter_common::FAMILY_V6;

    const LOG2: u8 = 12;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    fn addr(s: &str) -> (u8, [u8; 16]) {
        let (f, _, a) = parse_cidr(s).unwrap();
        (f, a)
    }

    /// A deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn plan_keeps_up_to_eight_lengths_longest_first() {
        let p = PlenPlan::for_entries(cidrs(&[
            "192.0.2.1",
            "10.0.0.0/8",
            "198.51.100.0/24",
            "2001:db8::/48",
            "2001:db8::1",
        ]));
        assert_eq!(p.v4, [32, 24, 8]);
        assert_eq!(p.v6, [128, 48]);
        assert_eq!(p.effective(FAMILY_V4, 30), Some(24));
        assert_eq!(p.effective(FAMILY_V4, 7), None);
    }

    #[test]
    fn plan_coarsens_the_rarest_lengths_into_shorter_ones() {
        // 12 lengths: /32 hosts are many, /8 is the shortest; /20../29 one entry each.
        let mut list: Vec<String> = (1..=50).map(|i| format!("192.0.2.{i}")).collect();
        list.push("10.0.0.0/8".into());
        for p in 20..=29 {
            list.push(format!("172.16.0.0/{p}"));
        }
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        let entries = cidrs(&refs);
        let p = PlenPlan::for_entries(entries.iter().copied());
        assert_eq!(p.v4.len(), MAX_PLENS);
        assert!(
            p.v4.contains(&32),
            "the common length stays exact: {:?}",
            p.v4
        );
        assert!(p.v4.contains(&8), "the shortest always stays: {:?}", p.v4);
        // Every entry has a length to go to, never a longer one.
        for (f, plen, _) in &entries {
            let q = p.effective(*f, *plen).unwrap();
            assert!(q <= *plen);
        }
    }

    #[test]
    fn every_entry_passes_and_others_mostly_do_not() {
        let entries = cidrs(&[
            "198.51.100.7",
            "203.0.113.0/24",
            "10.0.0.0/8",
            "2001:db8::/48",
            "2001:db8:aa::1",
        ]);
        let (plan, words) = build(|| entries.iter().copied(), LOG2);
        for s in [
            "198.51.100.7",
            "203.0.113.99",
            "10.255.1.2",
            "2001:db8:0:ffff::9",
            "2001:db8:aa::1",
        ] {
            let (f, a) = addr(s);
            assert!(passes(&words, &plan, f, &a, LOG2), "{s} must pass");
        }
        for s in [
            "198.51.100.8",
            "203.0.114.1",
            "11.0.0.1",
            "2001:db9::1",
            "2001:db8:aa::2",
        ] {
            let (f, a) = addr(s);
            assert!(!passes(&words, &plan, f, &a, LOG2), "{s} must not pass");
        }
        let fl = fill(&words, &plan);
        assert_eq!(fl.words, 1 << LOG2);
        // 5 entries, 3 bits each, some shared.
        assert!((5..=15).contains(&fl.bits_set), "{fl:?}");
        assert!(fl.fp_v4 > 0.0 && fl.fp_v4 < 1e-6, "{fl:?}");
    }

    #[test]
    fn random_unions_never_block_an_allowed_source() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for round in 0..10 {
            let n = 1 + rng.below(400) as usize;
            let mut entries = Vec::new();
            for _ in 0..n {
                let v6 = rng.below(3) == 0;
                let (family, max) = if v6 {
                    (FAMILY_V6, 128)
                } else {
                    (FAMILY_V4, 32)
                };
                // Many lengths, so coarsening happens in most rounds.
                let plen = if rng.below(2) == 0 {
                    max
                } else {
                    (rng.below(max as u64 - 7) + 8) as u8
                };
                let mut a = [0u8; 16];
                let bytes = if v6 { 16 } else { 4 };
                for b in a.iter_mut().take(bytes) {
                    *b = rng.next() as u8;
                }
                let (hi, lo) = addr_words(&a);
                let (hi, lo) = mask_addr(hi, lo, plen);
                a[..8].copy_from_slice(&hi.to_be_bytes());
                a[8..].copy_from_slice(&lo.to_be_bytes());
                entries.push((family, plen, a));
            }
            let (plan, words) = build(|| entries.iter().copied(), LOG2);
            assert!(plan.v4.len() <= MAX_PLENS && plan.v6.len() <= MAX_PLENS);
            // Every entry, and a random address inside it, passes.
            for (family, plen, a) in &entries {
                let mut inside = *a;
                let bytes = if *family == FAMILY_V4 { 4 } else { 16 };
                for bit in *plen as usize..bytes * 8 {
                    if rng.below(2) == 1 {
                        inside[bit / 8] |= 0x80 >> (bit % 8);
                    }
                }
                assert!(
                    passes(&words, &plan, *family, a, LOG2),
                    "round {round}: {a:?}/{plen}"
                );
                assert!(
                    passes(&words, &plan, *family, &inside, LOG2),
                    "round {round}"
                );
            }
            // Random sources outside every entry (as widened by the plan) mostly fail.
            let fl = fill(&words, &plan);
            let covered = |family: u8, a: &[u8; 16]| {
                entries.iter().any(|(f, p, e)| {
                    let q = plan.effective(*f, *p).unwrap();
                    let (ah, al) = addr_words(a);
                    let (eh, el) = addr_words(e);
                    *f == family && mask_addr(ah, al, q) == mask_addr(eh, el, q)
                })
            };
            let (mut tried, mut passed) = (0, 0);
            for i in 0..2000 {
                let family = if i % 2 == 0 { FAMILY_V4 } else { FAMILY_V6 };
                let mut a = [0u8; 16];
                let bytes = if family == FAMILY_V4 { 4 } else { 16 };
                for b in a.iter_mut().take(bytes) {
                    *b = rng.next() as u8;
                }
                if covered(family, &a) {
                    continue;
                }
                tried += 1;
                if passes(&words, &plan, family, &a, LOG2) {
                    passed += 1;
                }
            }
            assert!(tried > 100, "round {round}: only {tried} uncovered sources");
            assert!(
                passed * 20 < tried,
                "round {round}: {passed}/{tried} uncovered sources passed, {fl:?}"
            );
        }
    }

    fn record(hosts: &[u32], sets: &[u32]) -> KeyRecord {
        let mut r = KeyRecord {
            flags: KEY_PRESENT,
            n_inline_v4: hosts.len() as u8,
            n_sets: sets.len() as u8,
            ..Default::default()
        };
        r.inline_v4[..hosts.len()].copy_from_slice(hosts);
        r.sets[..sets.len()].copy_from_slice(sets);
        r
    }

    #[test]
    fn half_counts_shared_sets_once_and_lock_changes_nothing() {
        let mut sets = HashMap::new();
        sets.insert(
            7,
            SetContent::from_iter(cidrs(&["203.0.113.0/24", "2001:db8::/48"])),
        );
        let host = u32::from_ne_bytes([198, 51, 100, 7]);
        let none = KeyRecord::default();
        let a = record(&[host], &[7]);
        let b = record(&[], &[7]);
        let mut h = Half::default();
        h.record_changed(&none, &a, &sets);
        h.record_changed(&none, &b, &sets);
        assert_eq!(h.size(), 3);
        let mut records = vec![a, b];
        let entries = |r: &Vec<KeyRecord>| record_entries(r.iter(), &sets).collect::<Vec<_>>();
        let now = entries(&records);
        assert!(
            h.update(None, || now.iter().copied(), LOG2),
            "first update builds"
        );
        assert_eq!(h.take_dirty(), None);
        let built = h.words.clone();

        // A lock: the record changes flags only.
        let locked = KeyRecord {
            flags: a.flags | filter_common::KEY_LOCKED,
            ..a
        };
        h.record_changed(&a, &locked, &sets);
        records[0] = locked;
        assert_eq!((h.size(), h.stale()), (3, 0));
        let now = entries(&records);
        assert!(!h.update(None, || now.iter().copied(), LOG2));
        assert_eq!(h.words, built);
        assert_eq!(h.take_dirty(), Some(vec![]));

        // Dropping one user of the shared set keeps it; dropping the last makes it stale.
        h.record_changed(&b, &none, &sets);
        records.pop();
        assert_eq!(h.stale(), 0);
        let c = record(&[u32::from_ne_bytes([192, 0, 2, 9])], &[]);
        h.record_changed(&none, &c, &sets);
        records.push(c);
        let now = entries(&records);
        assert!(
            !h.update(None, || now.iter().copied(), LOG2),
            "one new host is set in place"
        );
        let (f, x) = addr("192.0.2.9");
        assert!(passes(&h.words, &h.plan, f, &x, LOG2));
        h.record_changed(&locked, &none, &sets);
        records.remove(0);
        assert_eq!(h.stale(), 3);
        let now = entries(&records);
        assert_eq!(now.len(), 1);
        assert!(
            h.update(None, || now.iter().copied(), LOG2),
            "3 stale of 1 is over 10%: rebuilt"
        );
        let (f, x) = addr("203.0.113.5");
        assert!(!passes(&h.words, &h.plan, f, &x, LOG2));
    }

    #[test]
    fn half_adds_new_lengths_in_place_until_the_plan_is_full() {
        let none = KeyRecord::default();
        let sets = HashMap::new();
        let mut h = Half::default();
        let first = record(&[u32::from_ne_bytes([192, 0, 2, 1])], &[]);
        h.record_changed(&none, &first, &sets);
        let all = record_entries([first].iter(), &sets).collect::<Vec<_>>();
        h.update(None, || all.iter().copied(), LOG2);
        assert_eq!(h.take_dirty(), None, "a rebuild writes every word");
        assert_eq!(h.take_dirty(), Some(vec![]));
        let mut sets = HashMap::new();
        sets.insert(1, SetContent::from_iter(cidrs(&["10.0.0.0/8"])));
        h.record_changed(&none, &record(&[], &[1]), &sets);
        let no_rebuild = || -> std::iter::Empty<Cidr> { panic!("no rebuild expected") };
        assert!(!h.update(None, no_rebuild, LOG2));
        assert_eq!(h.plan.v4, [32, 8]);
        let (f, x) = addr("10.0.0.0");
        let (w, _) = entry_probe(f, 8, &x, LOG2);
        assert_eq!(h.take_dirty(), Some(vec![w]), "only the new entry's word");
        let (f, x) = addr("10.9.9.9");
        assert!(passes(&h.words, &h.plan, f, &x, LOG2));
        // A /4 when the plan has room takes a new length; its bits are set in place.
        sets.insert(2, SetContent::from_iter(cidrs(&["240.0.0.0/4"])));
        h.record_changed(&none, &record(&[], &[2]), &sets);
        assert!(!h.update(None, no_rebuild, LOG2));
        let (f, x) = addr("241.1.1.1");
        assert!(passes(&h.words, &h.plan, f, &x, LOG2));
        // A full apply hands over a whole new half.
        let fresh = build(|| cidrs(&["198.51.100.0/24"]).into_iter(), LOG2);
        h.expect_rebuild();
        assert!(h.update(Some(fresh), no_rebuild, LOG2));
        assert!(!passes(&h.words, &h.plan, f, &x, LOG2));
        assert_eq!(h.take_dirty(), None);
    }

    #[test]
    fn compiled_entries_are_the_union_of_keys_and_bound_ipsets() {
        let p = crate::policy::Policy::from_toml_str(
            r#"
[ipsets]
used = ["203.0.113.0/24"]
unused = ["100.64.0.0/10"]
[[key]]
prefix = "aaaaaaaa"
allow = ["198.51.100.7", "2001:db8::/48"]
ipsets = ["used"]
[[key]]
prefix = "bbbbbbbb"
allow = ["192.0.2.0/24"]
ipsets = ["used"]
locked = true
"#,
        )
        .unwrap();
        let c = p.compile().unwrap();
        let got: BTreeSet<Cidr> = compiled_entries(&c).collect();
        let want: BTreeSet<Cidr> = cidrs(&[
            "198.51.100.7",
            "2001:db8::/48",
            "192.0.2.0/24",
            "203.0.113.0/24",
        ])
        .into_iter()
        .collect();
        assert_eq!(got, want);
        assert_eq!(compiled_entries(&c).count(), 4, "a shared ipset comes once");
    }
}
