//! The applied policy's keys, kept compact: each key's canonical JSON in one arena, in policy
//! order, with a prefix index. At 1M keys this is about 115 MB, where a `Vec<Key>` (a String
//! per prefix and per address) plus a `HashMap<String, usize>` index took about 450 MB.
//! The index is a table of order positions (4 bytes a bucket) found by the prefix's hash,
//! each position's prefix beside its slot: a `HashMap<KeyPrefix, u32>` held 20 bytes a
//! bucket, and at 1M keys it has 2M buckets.
//! It is generic over `Key`: whatever fields the model has are kept, because a key is only
//! ever turned into bytes and back by serde.
//!
//! The snapshot file and `GET /v1/policy` are the arena joined with commas, so neither
//! serialises a million keys again.

use std::hash::{Hash as _, Hasher};

use filter_common::{KeyPrefix, MAX_PREFIX_LEN};
use hashbrown::HashTable;

use crate::policy::{Key, key_prefix};

/// Where one key's JSON sits in the arena (`len == 0`: deleted).
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    off: u32,
    len: u32,
    flags: u8,
}

const LOCKED: u8 = 1;
/// Passes from anywhere: unlocked, no allow entry, no ipset.
const OPEN: u8 = 2;

fn flags_of(k: &Key) -> u8 {
    let mut f = 0;
    if k.locked {
        f |= LOCKED;
    }
    // A lock that expires on its own leaves the key open then: counted open now, so the
    // prefilter stays off for it (as the engine's `is_open`).
    if !k.locked_for_good() && k.allow.is_empty() && k.ipsets.is_empty() {
        f |= OPEN;
    }
    f
}

/// The index key of a prefix, if the prefix can be a stored one (stored prefixes are
/// validated: at most `MAX_PREFIX_LEN` printable bytes, so the zero-padded form is unique).
fn index_key(prefix: &str) -> Option<KeyPrefix> {
    (prefix.len() <= MAX_PREFIX_LEN && !prefix.as_bytes().contains(&0)).then(|| key_prefix(prefix))
}

/// Hashes a `KeyPrefix` (16 bytes) in two multiplies: SipHash took a tenth of a 1M-key PUT.
/// Prefixes come from the operator, not from packets, so flooding the table is not a concern.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(23) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
}

fn hash_of(p: &KeyPrefix) -> u64 {
    let mut h = PrefixHasher::default();
    p.hash(&mut h);
    h.finish()
}

#[derive(Default)]
pub struct KeyStore {
    arena: Vec<u8>,
    /// Policy order; deleted keys leave a hole (`len == 0`) until the next compaction.
    order: Vec<Slot>,
    /// The prefix of each position of `order` (a hole keeps its last one).
    prefixes: Vec<KeyPrefix>,
    /// The positions of the live keys, found by their prefix's hash.
    index: HashTable<u32>,
    dead_bytes: usize,
    locked: usize,
    open: usize,
}

impl KeyStore {
    /// Builds the store from keys in policy order (consumed one by one, so the parsed keys
    /// and the store are never both whole in memory). A repeated prefix keeps its first
    /// position and the last content, as a PATCH upsert would (validated policies have none).
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> KeyStore {
        let it = keys.into_iter();
        let mut s = KeyStore {
            index: HashTable::with_capacity(it.size_hint().0),
            order: Vec::with_capacity(it.size_hint().0),
            prefixes: Vec::with_capacity(it.size_hint().0),
            ..Default::default()
        };
        for k in it {
            s.upsert(&k);
        }
        s.arena.shrink_to_fit();
        s
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn locked(&self) -> usize {
        self.locked
    }

    /// Keys that pass from anywhere (unlocked, no allow entry, no ipset).
    pub fn open(&self) -> usize {
        self.open
    }

    fn bytes(&self, s: Slot) -> &[u8] {
        &self.arena[s.off as usize..(s.off + s.len) as usize]
    }

    /// The position of the live key `p`.
    fn find(&self, p: &KeyPrefix) -> Option<u32> {
        self.index
            .find(hash_of(p), |&i| self.prefixes[i as usize] == *p)
            .copied()
    }

    /// The key's canonical JSON.
    pub fn raw(&self, prefix: &str) -> Option<&[u8]> {
        let i = self.find(&index_key(prefix)?)?;
        Some(self.bytes(self.order[i as usize]))
    }

    pub fn contains(&self, prefix: &str) -> bool {
        index_key(prefix).is_some_and(|p| self.find(&p).is_some())
    }

    pub fn get(&self, prefix: &str) -> Option<Key> {
        self.raw(prefix)
            .map(|b| serde_json::from_slice(b).expect("the store holds keys it serialised"))
    }

    /// `Some(true)` if the stored key equals `k`, `Some(false)` if it differs, None if absent.
    /// Compares bytes first (serde's output is canonical), then the parsed key.
    pub fn same(&self, k: &Key) -> Option<bool> {
        let raw = self.raw(&k.prefix)?;
        let mine = serde_json::to_vec(k).expect("a key serialises");
        Some(mine == raw || self.get(&k.prefix).as_ref() == Some(k))
    }

    /// Inserts or replaces the key with `k.prefix` (a new key goes last).
    pub fn upsert(&mut self, k: &Key) {
        let off = self.arena.len();
        serde_json::to_writer(&mut self.arena, k).expect("a key serialises");
        assert!(
            self.arena.len() <= u32::MAX as usize,
            "key store over 4 GiB"
        );
        let slot = Slot {
            off: off as u32,
            len: (self.arena.len() - off) as u32,
            flags: flags_of(k),
        };
        let p = key_prefix(&k.prefix);
        match self.find(&p) {
            Some(i) => {
                let old = std::mem::replace(&mut self.order[i as usize], slot);
                self.count(old.flags, -1);
                self.dead_bytes += old.len as usize;
            }
            None => {
                let prefixes = &self.prefixes;
                self.index
                    .insert_unique(hash_of(&p), self.order.len() as u32, |&i| {
                        hash_of(&prefixes[i as usize])
                    });
                self.order.push(slot);
                self.prefixes.push(p);
            }
        }
        self.count(slot.flags, 1);
        self.maybe_compact();
    }

    /// Removes a key; false if there was none.
    pub fn delete(&mut self, prefix: &str) -> bool {
        let Some(p) = index_key(prefix) else {
            return false;
        };
        let prefixes = &self.prefixes;
        let Ok(entry) = self
            .index
            .find_entry(hash_of(&p), |&i| prefixes[i as usize] == p)
        else {
            return false;
        };
        let (i, _) = entry.remove();
        let old = std::mem::take(&mut self.order[i as usize]);
        self.count(old.flags, -1);
        self.dead_bytes += old.len as usize;
        self.maybe_compact();
        true
    }

    fn count(&mut self, flags: u8, d: isize) {
        if flags & LOCKED != 0 {
            self.locked = (self.locked as isize + d) as usize;
        }
        if flags & OPEN != 0 {
            self.open = (self.open as isize + d) as usize;
        }
    }

    /// Rewrites the arena without dead bytes and the order without holes, once they are
    /// more than half (so a stream of PATCHes costs amortised O(1) each).
    fn maybe_compact(&mut self) {
        let holes = self.order.len() - self.index.len();
        if self.dead_bytes <= 4096.max(self.arena.len() / 2)
            && holes <= 1024.max(self.order.len() / 2)
        {
            return;
        }
        let mut arena = Vec::with_capacity(self.arena.len() - self.dead_bytes);
        let mut order = Vec::with_capacity(self.index.len());
        let mut prefixes = Vec::with_capacity(self.index.len());
        for (s, p) in self
            .order
            .iter()
            .zip(&self.prefixes)
            .filter(|(s, _)| s.len != 0)
        {
            let off = arena.len() as u32;
            arena.extend_from_slice(self.bytes(*s));
            order.push(Slot { off, ..*s });
            prefixes.push(*p);
        }
        // Positions moved: the index is made again.
        self.index.clear();
        for (i, p) in prefixes.iter().enumerate() {
            self.index
                .insert_unique(hash_of(p), i as u32, |&j| hash_of(&prefixes[j as usize]));
        }
        self.arena = arena;
        self.order = order;
        self.prefixes = prefixes;
        self.dead_bytes = 0;
    }

    /// Every key's JSON, in policy order.
    pub fn iter_raw(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.order
            .iter()
            .filter(|s| s.len != 0)
            .map(|s| self.bytes(*s))
    }

    /// Every key, in policy order (parsed one at a time).
    pub fn iter(&self) -> impl Iterator<Item = Key> + '_ {
        self.iter_raw()
            .map(|b| serde_json::from_slice(b).expect("the store holds keys it serialised"))
    }

    /// Every key's prefix, in policy order (from the prefixes kept beside the slots: no key
    /// is parsed).
    pub fn prefixes(&self) -> impl Iterator<Item = String> + '_ {
        self.order
            .iter()
            .zip(&self.prefixes)
            .filter(|(s, _)| s.len != 0)
            .map(|(_, p)| {
                // Stored prefixes are at most MAX_PREFIX_LEN bytes without a NUL: the kept
                // form is the prefix, zero-padded.
                let n = p
                    .bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(p.bytes.len());
                String::from_utf8_lossy(&p.bytes[..n]).into_owned()
            })
    }

    /// Appends the keys as a JSON array (`[k1,k2,...]`).
    pub fn write_json_array(&self, out: &mut Vec<u8>) {
        out.reserve(self.arena.len() - self.dead_bytes + self.len() + 2);
        out.push(b'[');
        for (i, b) in self.iter_raw().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b);
        }
        out.push(b']');
    }

    /// Heap bytes held (for logs and the bench).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.order.capacity() * std::mem::size_of::<Slot>()
            + self.prefixes.capacity() * std::mem::size_of::<KeyPrefix>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, allow: &[&str], locked: bool) -> Key {
        Key {
            prefix: prefix.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ipsets: Vec::new(),
            locked,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        }
    }

    #[test]
    fn keeps_order_content_and_counts_through_edits() {
        let mut s = KeyStore::from_keys(vec![
            key("aaaaaaaa", &["10.0.0.1"], false),
            key("bbbbbbbb", &[], false),
            key("cccccccc", &["10.0.0.3"], true),
        ]);
        assert_eq!((s.len(), s.locked(), s.open()), (3, 1, 1));
        assert_eq!(s.get("bbbbbbbb"), Some(key("bbbbbbbb", &[], false)));
        assert_eq!(s.same(&key("aaaaaaaa", &["10.0.0.1"], false)), Some(true));
        assert_eq!(s.same(&key("aaaaaaaa", &["10.0.0.2"], false)), Some(false));
        assert_eq!(s.same(&key("zzzzzzzz", &[], false)), None);
        // Replacing keeps the position; a new key goes last.
        s.upsert(&key("aaaaaaaa", &["10.0.0.9"], true));
        s.upsert(&key("dddddddd", &[], false));
        assert!(s.delete("bbbbbbbb"));
        assert!(!s.delete("bbbbbbbb"));
        let prefixes: Vec<String> = s.iter().map(|k| k.prefix).collect();
        assert_eq!(prefixes, ["aaaaaaaa", "cccccccc", "dddddddd"]);
        assert_eq!((s.len(), s.locked(), s.open()), (3, 2, 1));
        let mut out = Vec::new();
        s.write_json_array(&mut out);
        let back: Vec<Key> = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, s.iter().collect::<Vec<_>>());
        assert_eq!(back[0], key("aaaaaaaa", &["10.0.0.9"], true));
        // A prefix that cannot be stored is never found (no truncation to 16 bytes).
        assert!(s.get("aaaaaaaa\0").is_none());
        assert!(s.get("aaaaaaaaaaaaaaaaX").is_none());
    }

    #[test]
    fn a_deleted_key_stays_gone_until_added_again_last() {
        let n = 3000;
        let mut s =
            KeyStore::from_keys((0..n).map(|i| key(&format!("k{i:07}"), &["10.0.0.1"], false)));
        for i in 0..1700 {
            assert!(s.delete(&format!("k{i:07}")));
            assert!(!s.contains(&format!("k{i:07}")));
        }
        // Compacted meanwhile (more than half were holes); a hole's prefix finds nothing.
        assert!(s.order.len() < n);
        assert_eq!(s.order.len(), s.prefixes.len());
        assert!(s.get("k0000000").is_none());
        s.upsert(&key("k0000000", &["10.0.0.2"], true));
        assert_eq!(s.len(), n - 1700 + 1);
        assert_eq!(s.get("k0000000").unwrap().allow, ["10.0.0.2"]);
        let order: Vec<String> = s.prefixes().collect();
        // The kept prefixes are the stored keys' own.
        assert_eq!(order, s.iter().map(|k| k.prefix).collect::<Vec<_>>());
        assert_eq!(order.first().map(String::as_str), Some("k0001700"));
        assert_eq!(order.last().map(String::as_str), Some("k0000000"));
        assert!(s.heap_bytes() > 0);
    }

    #[test]
    fn compaction_keeps_every_live_key_findable() {
        let n = 5000;
        let mut s =
            KeyStore::from_keys((0..n).map(|i| key(&format!("k{i:07}"), &["10.0.0.1"], false)));
        // Many rewrites and deletes force several compactions.
        for round in 0..3 {
            for i in (0..n).filter(|i| i % 3 == round) {
                s.upsert(&key(&format!("k{i:07}"), &["10.0.0.2"], round == 1));
            }
        }
        for i in (0..n).filter(|i| i % 2 == 0) {
            assert!(s.delete(&format!("k{i:07}")));
        }
        assert_eq!(s.len(), n / 2);
        assert!(
            s.arena.len() < 2 * s.len() * 60,
            "arena not compacted: {}",
            s.arena.len()
        );
        for i in 0..n {
            let got = s.get(&format!("k{i:07}"));
            if i % 2 == 0 {
                assert!(got.is_none());
            } else {
                let k = got.expect("live key");
                assert_eq!(k.allow, ["10.0.0.2"]);
                assert_eq!(k.locked, i % 3 == 1);
            }
        }
        let order: Vec<String> = s.iter().map(|k| k.prefix).collect();
        let want: Vec<String> = (0..n)
            .filter(|i| i % 2 == 1)
            .map(|i| format!("k{i:07}"))
            .collect();
        assert_eq!(order, want);
        assert_eq!(
            s.locked(),
            (0..n).filter(|i| i % 2 == 1 && i % 3 == 1).count()
        );
    }
}
