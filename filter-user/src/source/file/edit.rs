//! A policy-file edit that only touched `[[key]]` tables, found without parsing the file.
//!
//! Parsing a TOML file of a million keys takes seconds; an operator who locks one key by
//! editing it should not wait for that. A TOML policy is split at its `[[key]]` header lines
//! into a head (everything before the first) and key tables ([`parse_split`]: the head and
//! the tables are parsed in pieces, which gives the policy a whole parse gives at a fraction
//! of its memory). The file source keeps, of the text it applied, only a hash of the head and
//! of each table, and each table's key ([`Applied`]: 24 bytes a key, where the text took
//! about 68). [`toml_key_edit`] hashes the new text's tables the same way, finds the tables
//! that differ (common head and tail of the two lists) and parses only the new ones; the old
//! ones are known by their keys. Anything it cannot prove to be a key-table edit (the head
//! changed, a table of another kind, multi-line strings, a file that is not TOML, a text the
//! split parse did not take) returns None, and the caller parses the whole file as before.
//! A table edited into bytes with the same 64-bit hash would go unseen: as likely as the
//! file watch's own hash of the whole file missing an edit.

use std::ops::Range;

use filter_common::{KeyPrefix, MAX_PREFIX_LEN};
use serde::Deserialize;

use crate::policy::{Key, Policy, key_prefix};

/// The `[[key]]` tables that differ: the keys the applied text's tables held, and the new
/// text's tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyEdit {
    pub old: Vec<String>,
    pub new: Vec<Key>,
}

/// What the file source keeps of the TOML text it applied: enough to find the next edit's
/// tables (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The revision the text's head says.
    pub rev: Option<u64>,
    /// The head's hash, then each key table's.
    hashes: Vec<u64>,
    /// Each key table's key, in table order.
    prefixes: Vec<KeyPrefix>,
}

/// How an edit moves [`Applied`] to the new text: the new text's hashes, and the tables
/// `at..at + old_n` replaced by tables whose keys are `prefixes`.
#[derive(Debug)]
pub struct Step {
    hashes: Vec<u64>,
    at: usize,
    old_n: usize,
    prefixes: Vec<KeyPrefix>,
}

impl Applied {
    /// Takes the edited text as the applied one.
    pub fn advance(&mut self, s: Step) {
        let (at, old_n) = (s.at - 1, s.old_n);
        self.prefixes.splice(at..at + old_n, s.prefixes);
        self.hashes = s.hashes;
        debug_assert_eq!(self.hashes.len(), self.prefixes.len() + 1);
    }

    /// Heap bytes held (for logs).
    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * 8 + self.prefixes.capacity() * std::mem::size_of::<KeyPrefix>()
    }
}

/// At most this many bytes of new tables are parsed on this path (an edit of a few keys); a
/// larger change takes the whole-file path.
const MAX_REGION: usize = 1 << 20;
/// At most this many applied tables may be replaced on this path.
const MAX_OLD_TABLES: usize = MAX_REGION / 64;
/// The split parse reads key tables in batches of about this many bytes.
const BATCH: usize = 256 << 10;

const KEY_HEADER: &[u8] = b"[[key]]";

/// Whether the line starting at `i` is a `[[key]]` header (spaces or a comment may follow).
fn key_header_at(t: &[u8], i: usize) -> bool {
    (i == 0 || t[i - 1] == b'\n')
        && t[i..].starts_with(KEY_HEADER)
        && matches!(
            t.get(i + KEY_HEADER.len()),
            None | Some(b'\n' | b'\r' | b' ' | b'\t' | b'#')
        )
}

/// The start of every `[[key]]` header line, in order; None for a text this module does not
/// split: JSON, or multi-line strings (which could hold lines that look like headers).
fn key_starts(t: &str) -> Option<Vec<usize>> {
    use memchr::memmem;
    let b = t.as_bytes();
    if t.trim_start().starts_with('{')
        || memmem::find(b, b"\"\"\"").is_some()
        || memmem::find(b, b"'''").is_some()
    {
        return None;
    }
    let mut out = Vec::new();
    if key_header_at(b, 0) {
        out.push(0);
    }
    out.extend(
        memmem::find_iter(b, b"\n[[key]]")
            .map(|i| i + 1)
            .filter(|&i| key_header_at(b, i)),
    );
    Some(out)
}

/// Part `j` of a text split at `starts`: 0 is the head, `j` the `j`-th key table.
fn part(starts: &[usize], len: usize, j: usize) -> Range<usize> {
    let end = starts.get(j).copied().unwrap_or(len);
    if j == 0 { 0..end } else { starts[j - 1]..end }
}

/// A 64-bit hash of a text or a table (foldhash, fixed seed: several times faster than
/// SipHash, and a million tables are hashed at every edit). It only has to tell an edit from
/// the same bytes: nobody gains by forging an edit of their own file the daemon misses.
pub(crate) fn hash(b: &[u8]) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::quality::FixedState::with_seed(0).hash_one(b)
}

/// The head's hash, then each table's.
fn hashes(t: &str, starts: &[usize]) -> Vec<u64> {
    (0..=starts.len())
        .map(|j| hash(&t.as_bytes()[part(starts, t.len(), j)]))
        .collect()
}

/// Whether `region` holds only `[[key]]` tables (and their `[key.…]` sub-tables): every
/// line that opens a table opens one of those, and it starts with one.
fn only_key_tables(region: &[u8]) -> bool {
    if !region.is_empty() && !key_header_at(region, 0) {
        return false;
    }
    region.split(|&b| b == b'\n').all(|line| {
        let l = line.trim_ascii_start();
        !l.starts_with(b"[") || l.starts_with(KEY_HEADER) || l.starts_with(b"[key.")
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    #[serde(default)]
    key: Vec<Key>,
}

/// The keys of `tables` key tables, one each (None: not only key tables, not parseable, or
/// not one key a table).
fn parse_keys(region: &[u8], tables: usize) -> Option<Vec<Key>> {
    if !only_key_tables(region) {
        return None;
    }
    let text = std::str::from_utf8(region).ok()?;
    let keys = toml::from_str::<Keys>(text).ok()?.key;
    (keys.len() == tables).then_some(keys)
}

/// The form a key is kept in (None: one no applied policy can hold, more than
/// `MAX_PREFIX_LEN` bytes or with a NUL).
fn stored_prefix(k: &Key) -> Option<KeyPrefix> {
    (k.prefix.len() <= MAX_PREFIX_LEN && !k.prefix.as_bytes().contains(&0))
        .then(|| key_prefix(&k.prefix))
}

/// Parses a TOML policy in pieces: the head alone, then the key tables in batches. The head
/// must not name `key` itself, and every table after it must be a `[[key]]` table (with its
/// `[key.…]` sub-tables), so the pieces hold what the whole text holds and the policy is the
/// one a whole parse gives; a whole parse of a million keys peaks at gigabytes, this at a few
/// MB over the policy. Returns the policy and what the edit path keeps of the text (None if a
/// key cannot be kept). None: the caller parses the whole text (which reports any error).
pub fn parse_split(text: &str) -> Option<(Policy, Option<Applied>)> {
    let starts = key_starts(text)?;
    if starts.is_empty() {
        return None;
    }
    let head = &text[part(&starts, text.len(), 0)];
    if toml::from_str::<toml::Table>(head)
        .ok()?
        .contains_key("key")
    {
        return None;
    }
    let mut pol: Policy = toml::from_str(head).ok()?;
    pol.key = Vec::with_capacity(starts.len());
    let mut j = 0;
    while j < starts.len() {
        let from = starts[j];
        let mut k = j + 1;
        while k < starts.len() && starts[k] - from < BATCH {
            k += 1;
        }
        let to = starts.get(k).copied().unwrap_or(text.len());
        pol.key
            .extend(parse_keys(&text.as_bytes()[from..to], k - j)?);
        j = k;
    }
    let prefixes: Option<Vec<KeyPrefix>> = pol.key.iter().map(stored_prefix).collect();
    let applied = prefixes.map(|prefixes| Applied {
        rev: pol.revision,
        hashes: hashes(text, &starts),
        prefixes,
    });
    Some((pol, applied))
}

/// The key tables that differ between the text `old` describes (the one last applied) and
/// `new`, when nothing else differs, with the step that makes `old` describe `new`; None when
/// the whole file must be parsed.
pub fn toml_key_edit(old: &Applied, new: &str) -> Option<(KeyEdit, Step)> {
    let starts = key_starts(new)?;
    if starts.is_empty() {
        return None;
    }
    let n = hashes(new, &starts);
    let o = &old.hashes;
    if n[0] != o[0] {
        return None; // the head
    }
    let head = o.iter().zip(&n).take_while(|(a, b)| a == b).count();
    let max_tail = o.len().min(n.len()) - head;
    let tail = o
        .iter()
        .rev()
        .zip(n.iter().rev())
        .take(max_tail)
        .take_while(|(a, b)| a == b)
        .count();
    let (old_n, new_n) = (o.len() - head - tail, n.len() - head - tail);
    if old_n > MAX_OLD_TABLES {
        return None;
    }
    let new_keys = if new_n == 0 {
        Vec::new()
    } else {
        let from = starts[head - 1];
        let to = starts.get(head - 1 + new_n).copied().unwrap_or(new.len());
        if to - from > MAX_REGION {
            return None;
        }
        parse_keys(&new.as_bytes()[from..to], new_n)?
    };
    let prefixes: Vec<KeyPrefix> = new_keys.iter().map(stored_prefix).collect::<Option<_>>()?;
    let gone = old.prefixes[head - 1..head - 1 + old_n]
        .iter()
        .map(|p| {
            let end = p
                .bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(p.bytes.len());
            String::from_utf8(p.bytes[..end].to_vec()).ok()
        })
        .collect::<Option<Vec<String>>>()?;
    Some((
        KeyEdit {
            old: gone,
            new: new_keys,
        },
        Step {
            hashes: n,
            at: head,
            old_n,
            prefixes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(keys: &[(&str, bool)]) -> String {
        let mut s = String::from(
            "revision = 3\n\n[settings]\nkey_prefix_len = 8\n\n[[listener]]\nport = 8080\nlocator = \"http-header\"\nheaders = [\"X-K\"]\n\n",
        );
        for (p, locked) in keys {
            s.push_str(&format!(
                "[[key]]\nprefix = \"{p}\"\nallow = [\"10.0.0.1\"]\n"
            ));
            if *locked {
                s.push_str("locked = true\n");
            }
            s.push('\n');
        }
        s
    }

    fn whole(t: &str) -> Vec<Key> {
        Policy::from_toml_str(t).unwrap().key
    }

    /// What the file source keeps of `t` once applied (the split parse must take it, and
    /// give what a whole parse gives).
    fn applied(t: &str) -> Applied {
        let (pol, a) = parse_split(t).expect("split parse");
        assert_eq!(pol, Policy::from_toml_str(t).unwrap());
        a.expect("kept")
    }

    fn edit(old: &str, new: &str) -> Option<KeyEdit> {
        toml_key_edit(&applied(old), new).map(|(e, _)| e)
    }

    /// Applying the edit to the old text's keys gives the new text's keys, and the step
    /// leaves what a fresh parse of the new text keeps.
    fn check(old: &str, new: &str) {
        let mut a = applied(old);
        let (e, step) = toml_key_edit(&a, new).expect("a key edit");
        let mut keys = whole(old);
        for p in &e.old {
            let i = keys.iter().position(|x| &x.prefix == p).unwrap();
            keys.remove(i);
        }
        keys.extend(e.new.iter().cloned());
        let mut want = whole(new);
        keys.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        want.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        assert_eq!(keys, want);
        a.advance(step);
        assert_eq!(a, applied(new));
    }

    #[test]
    fn lock_one_key_anywhere() {
        let names = ["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"];
        let base: Vec<(&str, bool)> = names.iter().map(|n| (*n, false)).collect();
        for i in 0..names.len() {
            let mut edited = base.clone();
            edited[i].1 = true;
            let e = edit(&file(&base), &file(&edited)).unwrap();
            assert_eq!(e.new.len(), 1, "{i}: {e:?}");
            assert_eq!(e.new[0].prefix, names[i]);
            assert!(e.new[0].locked);
            assert_eq!(e.old, [names[i]]);
            check(&file(&base), &file(&edited));
            check(&file(&edited), &file(&base));
        }
    }

    #[test]
    fn add_and_remove_keys() {
        let a = file(&[("aaaaaaaa", false), ("bbbbbbbb", false)]);
        let b = file(&[("aaaaaaaa", false), ("bbbbbbbb", false), ("cccccccc", true)]);
        let c = file(&[("bbbbbbbb", false)]);
        let d = file(&[
            ("aaaaaaaa", false),
            ("cccccccc", false),
            ("bbbbbbbb", false),
        ]);
        for (x, y) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&a, &d), (&d, &b)] {
            check(x, y);
        }
        assert_eq!(edit(&a, &a), Some(KeyEdit::default()));
    }

    #[test]
    fn anything_else_is_a_whole_parse() {
        let a = file(&[("aaaaaaaa", false), ("bbbbbbbb", false)]);
        // The settings, the revision, a listener.
        for (from, to) in [
            ("key_prefix_len = 8", "key_prefix_len = 9"),
            ("revision = 3", "revision = 4"),
            ("port = 8080", "port = 8081"),
        ] {
            assert_eq!(edit(&a, &a.replace(from, to)), None, "{to}");
        }
        // A table of another kind among the keys: neither parsed in pieces nor an edit.
        let b = a.replace(
            "[[key]]\nprefix = \"bbbbbbbb\"",
            "[ipsets]\nx = [\"10.0.0.0/8\"]\n\n[[key]]\nprefix = \"bbbbbbbb\"",
        );
        assert_eq!(edit(&a, &b), None);
        assert!(parse_split(&b).is_none());
        let b2 = format!(
            "{a}[[listener]]\nport = 8081\nlocator = \"http-header\"\nheaders = [\"X-K\"]\n"
        );
        assert_eq!(edit(&a, &b2), None);
        assert!(parse_split(&b2).is_none());
        // The first key's header itself, and multi-line strings.
        let c = a.replacen(
            "[[key]]\nprefix = \"aaaaaaaa\"",
            "[[key]]\nprefix = \"aaaaaaab\"",
            1,
        );
        check(&a, &c);
        let d = a.replace("allow = [\"10.0.0.1\"]\n\n[[key]]\nprefix = \"bbbbbbbb\"", "allow = [\"10.0.0.1\"]\nlock_reason = \"\"\"x\n[[key]]\"\"\"\n\n[[key]]\nprefix = \"bbbbbbbb\"");
        assert_eq!(edit(&a, &d), None);
        assert!(parse_split(&d).is_none());
        // Not parseable: the whole path reports it.
        let e = a.replace("prefix = \"bbbbbbbb\"", "prefix = bbbbbbbb");
        assert_eq!(edit(&a, &e), None);
        assert!(parse_split(&e).is_none());
        // Two keys in one table's place, a key a table cannot hold.
        let f = a.replace(
            "[[key]]\nprefix = \"bbbbbbbb\"",
            "[[key]]\nprefix = \"bbbbbbbb\"\n [[key]]\nprefix = \"b2\"",
        );
        assert_eq!(edit(&a, &f), None);
        let g = a.replace(
            "prefix = \"bbbbbbbb\"",
            "prefix = \"bbbbbbbbbbbbbbbbbbbbb\"",
        );
        assert_eq!(edit(&a, &g), None);
        assert_eq!(parse_split(&g).map(|(_, a)| a.is_none()), Some(true));
        // The head naming keys another way.
        for h in ["key = []\n", "[key]\n", "[key.x]\n"] {
            let t = format!("{h}{}", &a[a.find("[[key]]").unwrap()..]);
            assert!(parse_split(&t).is_none(), "{h}");
        }
        // JSON.
        assert!(parse_split("{\"key\": []}").is_none());
        assert_eq!(
            toml_key_edit(&applied(&a), "{\"key\": [ ]}").map(|(e, _)| e),
            None
        );
    }

    #[test]
    fn an_edit_of_the_last_key_and_of_trailing_bytes() {
        let a = file(&[("aaaaaaaa", false), ("bbbbbbbb", false)]);
        check(&a, &format!("{a}# a comment\n"));
        check(&a, a.trim_end());
        let b = file(&[("aaaaaaaa", false), ("bbbbbbbb", true)]);
        check(&a, &b);
        check(&b, &a);
    }

    #[test]
    fn parsed_in_batches_as_a_whole() {
        // More tables than one batch holds, sub-tables and comments between them.
        let mut t = String::from("# keys\n[settings]\nkey_prefix_len = 8\n\n");
        for i in 0..9000 {
            t.push_str(&format!(
                "[[key]] # {i}\nprefix = \"k{i:07}\"\nallow = [\"10.0.{}.{}\"]\n\n",
                i / 256 % 256,
                i % 256
            ));
        }
        assert!(t.len() > 2 * BATCH);
        let a = applied(&t);
        assert_eq!(a.prefixes.len(), 9000);
        let u = t.replace(
            "prefix = \"k0004321\"",
            "prefix = \"k0004321\"\nlocked = true",
        );
        check(&t, &u);
    }
}
