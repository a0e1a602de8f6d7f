//! A policy-file edit that only touched `[[key]]` tables, found without parsing the file.
//!
//! Parsing a TOML file of a million keys takes seconds (and gigabytes); an operator who locks
//! one key by editing it should not wait for that. The file source keeps the text it last
//! applied; [`toml_key_edit`] compares the new text with it (common head and tail, a memcmp
//! each), widens the changed bytes to whole `[[key]]` tables on both sides, and parses only
//! those tables. Anything it cannot prove to be a key-table edit (the settings, listeners or
//! ipsets changed, a table of another kind inside the changed bytes, multi-line strings, a
//! file that is not TOML) returns None, and the caller parses the whole file as before.

use serde::Deserialize;

use crate::policy::Key;

/// The `[[key]]` tables that differ: as the applied text had them, and as the new text has.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KeyEdit {
    pub old: Vec<Key>,
    pub new: Vec<Key>,
}

/// At most this many bytes of tables are parsed on this path (an edit of a few keys); a
/// larger change takes the whole-file path.
const MAX_REGION: usize = 1 << 20;

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

/// The start of the last `[[key]]` header line at or before `at` (None: none).
fn key_header_before(t: &[u8], at: usize) -> Option<usize> {
    let mut i = at.min(t.len());
    loop {
        if key_header_at(t, i) {
            return Some(i);
        }
        if i == 0 {
            return None;
        }
        // The start of the line before.
        i = t[..i - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |n| n + 1);
    }
}

/// The start of the first `[[key]]` header line at or after `at` (None: none).
fn key_header_after(t: &[u8], at: usize) -> Option<usize> {
    let mut i = at;
    if i > 0 && i <= t.len() && t[i - 1] != b'\n' {
        i = i + t[i..].iter().position(|&b| b == b'\n')? + 1;
    }
    while i < t.len() {
        if key_header_at(t, i) {
            return Some(i);
        }
        i = i + t[i..].iter().position(|&b| b == b'\n')? + 1;
    }
    None
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

fn parse_keys(region: &[u8]) -> Option<Vec<Key>> {
    let text = std::str::from_utf8(region).ok()?;
    toml::from_str::<Keys>(text).ok().map(|k| k.key)
}

/// The key tables that differ between `old` (the text last applied) and `new`, when nothing
/// else differs; None when the whole file must be parsed.
pub fn toml_key_edit(old: &str, new: &str) -> Option<KeyEdit> {
    let (o, n) = (old.as_bytes(), new.as_bytes());
    if new.trim_start().starts_with('{') || old.trim_start().starts_with('{') {
        return None; // JSON
    }
    // A multi-line string could hold lines that look like table headers.
    if [old, new]
        .iter()
        .any(|t| t.contains("\"\"\"") || t.contains("'''"))
    {
        return None;
    }
    let head = common_head(o, n);
    let max_tail = o.len().min(n.len()) - head;
    let tail = common_tail(&o[o.len() - max_tail..], &n[n.len() - max_tail..]);
    if head == o.len() && head == n.len() {
        return Some(KeyEdit::default());
    }
    // Widen to whole tables. A header that starts in the common head is the same in both
    // texts if its line (and the byte after `[[key]]`) lies in the head; backing off a few
    // bytes keeps to such a header, or an earlier one.
    let start = key_header_before(n, head.saturating_sub(KEY_HEADER.len() + 2))?;
    // Likewise at the end: a header whose preceding newline lies in the common tail.
    let (o_tail, n_tail) = (o.len() - tail, n.len() - tail);
    let n_end = match key_header_after(n, n_tail + 1) {
        Some(i) => i,
        None => n.len(),
    };
    let o_end = n_end - n_tail + o_tail;
    if o_end > o.len() || (o_end < o.len() && !key_header_at(o, o_end)) {
        return None;
    }
    let (o_reg, n_reg) = (&o[start..o_end], &n[start..n_end]);
    if o_reg.len() > MAX_REGION || n_reg.len() > MAX_REGION {
        return None;
    }
    if !only_key_tables(o_reg) || !only_key_tables(n_reg) {
        return None;
    }
    Some(KeyEdit {
        old: parse_keys(o_reg)?,
        new: parse_keys(n_reg)?,
    })
}

/// The length of the common start of `a` and `b` (memcmp by blocks, then bytes).
fn common_head(a: &[u8], b: &[u8]) -> usize {
    const B: usize = 4096;
    let len = a.len().min(b.len());
    let mut i = 0;
    while i + B <= len && a[i..i + B] == b[i..i + B] {
        i += B;
    }
    i + a[i..len]
        .iter()
        .zip(&b[i..len])
        .take_while(|(x, y)| x == y)
        .count()
}

/// The length of the common end of `a` and `b`.
fn common_tail(a: &[u8], b: &[u8]) -> usize {
    const B: usize = 4096;
    let len = a.len().min(b.len());
    let (a, b) = (&a[a.len() - len..], &b[b.len() - len..]);
    let mut n = 0;
    while n + B <= len && a[len - n - B..len - n] == b[len - n - B..len - n] {
        n += B;
    }
    n + a[..len - n]
        .iter()
        .rev()
        .zip(b[..len - n].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

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

    /// Applying the edit to the old text's keys gives the new text's keys.
    fn check(old: &str, new: &str) {
        let e = toml_key_edit(old, new).expect("a key edit");
        let mut keys = whole(old);
        for k in &e.old {
            let i = keys.iter().position(|x| x.prefix == k.prefix).unwrap();
            assert_eq!(&keys[i], k);
            keys.remove(i);
        }
        keys.extend(e.new.iter().cloned());
        let mut want = whole(new);
        keys.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        want.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        assert_eq!(keys, want);
    }

    #[test]
    fn lock_one_key_anywhere() {
        let names = ["aaaaaaaa", "bbbbbbbb", "cccccccc", "dddddddd"];
        let base: Vec<(&str, bool)> = names.iter().map(|n| (*n, false)).collect();
        for i in 0..names.len() {
            let mut edited = base.clone();
            edited[i].1 = true;
            let e = toml_key_edit(&file(&base), &file(&edited)).unwrap();
            assert_eq!(e.new.len(), 1, "{i}: {e:?}");
            assert_eq!(e.new[0].prefix, names[i]);
            assert!(e.new[0].locked);
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
        assert_eq!(toml_key_edit(&a, &a), Some(KeyEdit::default()));
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
            assert_eq!(toml_key_edit(&a, &a.replace(from, to)), None, "{to}");
        }
        // A table of another kind among the keys.
        let b = a.replace(
            "[[key]]\nprefix = \"bbbbbbbb\"",
            "[ipsets]\nx = [\"10.0.0.0/8\"]\n\n[[key]]\nprefix = \"bbbbbbbb\"",
        );
        assert_eq!(toml_key_edit(&a, &b), None);
        assert_eq!(toml_key_edit(&b, &a), None);
        // The first key's header itself, and multi-line strings.
        let c = a.replacen(
            "[[key]]\nprefix = \"aaaaaaaa\"",
            "[[key]]\nprefix = \"aaaaaaab\"",
            1,
        );
        check(&a, &c);
        let d = a.replace("allow = [\"10.0.0.1\"]\n\n[[key]]\nprefix = \"bbbbbbbb\"", "allow = [\"10.0.0.1\"]\nlock_reason = \"\"\"x\n[[key]]\"\"\"\n\n[[key]]\nprefix = \"bbbbbbbb\"");
        assert_eq!(toml_key_edit(&a, &d), None);
        // Not parseable: the whole path reports it.
        let e = a.replace("prefix = \"bbbbbbbb\"", "prefix = bbbbbbbb");
        assert_eq!(toml_key_edit(&a, &e), None);
        // JSON.
        assert_eq!(toml_key_edit("{\"key\": []}", "{\"key\": [ ]}"), None);
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
}
