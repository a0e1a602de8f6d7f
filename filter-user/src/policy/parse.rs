//! Reading the model: TOML and JSON documents, with every error placed (`key[3].allow[1]`,
//! or `line L, column C` for syntax), and the addresses a policy names.

use super::*;

impl Policy {
    /// Parses a policy file. Syntax errors are placed at `line L, column C`; shape errors
    /// (wrong types, unknown fields, unknown words) at their path, every one of them.
    pub fn from_toml_str(s: &str) -> Result<Policy, Vec<PolicyError>> {
        let first = match toml::from_str::<Policy>(s) {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        let table: toml::Table = match toml::from_str(s) {
            Ok(t) => t,
            Err(e) => {
                let at = e.span().map(|r| line_col(s, r.start)).unwrap_or_default();
                return Err(vec![PolicyError::new(at, e.message().trim_end())]);
            }
        };
        // The document is valid TOML, so the problem is its shape. toml stops at the first
        // one; look at the document as plain data to find all of them, with their paths.
        let value =
            serde_json::to_value(&table).map_err(|e| vec![PolicyError::new("", e.to_string())])?;
        let mut errors = match from_value_located::<Policy>(&value) {
            Ok(p) => return Ok(p),
            Err(errors) => errors,
        };
        // Keep toml's line and column for the error it found, so editors can jump there.
        if let Some(span) = first.span()
            && let Some(e) = errors
                .iter_mut()
                .find(|e| e.message == first.message().trim_end())
        {
            e.message = format!("{}: {}", line_col(s, span.start), e.message);
        }
        Err(errors)
    }

    /// Parses a policy as the API and etcd carry it.
    pub fn from_json_str(s: &str) -> Result<Policy, Vec<PolicyError>> {
        parse_json(s)
    }

    /// A policy file's text: JSON when the path ends in `.json` or the text starts with `{`,
    /// else TOML.
    pub fn from_file_text(path: &std::path::Path, text: &str) -> Result<Policy, Vec<PolicyError>> {
        let json =
            path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
        if json {
            Policy::from_json_str(text)
        } else {
            Policy::from_toml_str(text)
        }
    }
}

/// Parses any part of the model (a policy, a patch, one key from etcd, ...) from JSON.
/// Syntax errors are placed at `line L, column C`; shape errors at their path.
pub fn parse_json<T: DeserializeOwned>(s: &str) -> Result<T, Vec<PolicyError>> {
    // The direct path is the fast one; the error path goes through a `Value` to find places.
    if let Ok(v) = serde_json::from_str(s) {
        return Ok(v);
    }
    let value: Value = serde_json::from_str(s).map_err(|e| {
        let at = format!("line {}, column {}", e.line(), e.column());
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        vec![PolicyError::new(at, message)]
    })?;
    from_value_located(&value)
}

/// `line L, column C` (1-based, columns in characters) of a byte offset.
fn line_col(s: &str, offset: usize) -> String {
    let before = &s.as_bytes()[..offset.min(s.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count UTF-8 sequence starts, so multi-byte characters are one column.
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xc0 != 0x80)
        .count()
        + 1;
    format!("line {line}, column {column}")
}

/// Deserializes `T`; on failure reports every offending place, not just the first.
fn from_value_located<T: DeserializeOwned>(root: &Value) -> Result<T, Vec<PolicyError>> {
    match T::deserialize(root) {
        Ok(v) => Ok(v),
        Err(e) => {
            let mut errors = Vec::new();
            locate::<T>(&|v| v, root, "", &mut errors);
            if errors.is_empty() {
                errors.push(PolicyError::new("", e.to_string()));
            }
            Err(errors)
        }
    }
}

fn deser_error<T: DeserializeOwned>(v: &Value) -> Option<String> {
    T::deserialize(v).err().map(|e| e.to_string())
}

/// The field named by serde's "missing field `f`".
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// `v` with every array emptied: keeps what surrounding objects require, drops their bulk
/// (and any errors in it), so narrowed-down documents stay small and quiet.
fn skeleton(v: &Value) -> Value {
    match v {
        Value::Array(_) => Value::Array(Vec::new()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), skeleton(v))).collect())
        }
        other => other.clone(),
    }
}

/// Finds where `v`, which sits in the document as `wrap(v)`, makes `T` fail, and reports
/// each fault at its path.
///
/// Serde reports one error and no path, so this narrows down instead: a member or element
/// is at fault if the document still fails with it alone in place. Missing-field errors
/// need care, since cutting an object down makes its required fields go missing: such an
/// error is reported only by the object that really owns the field, which we learn from
/// `deny_unknown_fields` (adding the field elsewhere is an "unknown field" error).
fn locate<T: DeserializeOwned>(
    wrap: &dyn Fn(Value) -> Value,
    v: &Value,
    at: &str,
    out: &mut Vec<PolicyError>,
) {
    // A container is the right kind of thing here if an empty one is accepted.
    let accepts =
        |empty: Value| deser_error::<T>(&wrap(empty)).is_none_or(|m| missing_field(&m).is_some());
    match v {
        Value::Object(map) if accepts(Value::Object(Map::new())) => {
            locate_in_object::<T>(wrap, map, at, out)
        }
        Value::Array(items) if accepts(Value::Array(Vec::new())) => {
            locate_in_array::<T>(wrap, items, at, out)
        }
        _ => {
            if let Some(msg) = deser_error::<T>(&wrap(v.clone()))
                && missing_field(&msg).is_none()
            {
                out.push(PolicyError::new(at, msg));
            }
        }
    }
}

fn locate_in_object<T: DeserializeOwned>(
    wrap: &dyn Fn(Value) -> Value,
    map: &Map<String, Value>,
    at: &str,
    out: &mut Vec<PolicyError>,
) {
    // An internally tagged enum (a PATCH op) means nothing without its tag, so it stays in.
    let tag: Map<String, Value> = map
        .get("op")
        .map(|t| ("op".to_owned(), t.clone()))
        .into_iter()
        .collect();
    let alone = |k: &str, v: &Value| {
        let mut m = tag.clone();
        m.insert(k.to_owned(), v.clone());
        deser_error::<T>(&wrap(Value::Object(m)))
    };
    let owns = |f: &str| {
        alone(f, &Value::Null).is_none_or(|m| !m.starts_with(&format!("unknown field `{f}`")))
    };

    let bad_tag = map
        .get("op")
        .and_then(|t| alone("op", t))
        .is_some_and(|m| missing_field(&m).is_none());
    let mut blamed = Vec::new(); // wrong in themselves
    let mut suspects = Vec::new(); // lacking a field somewhere inside
    for (k, v) in map {
        if bad_tag && k != "op" {
            continue;
        }
        let Some(msg) = alone(k, v) else { continue };
        match missing_field(&msg) {
            None => blamed.push(k),
            Some(f) if (v.is_object() || v.is_array()) && !owns(f) => suspects.push(k),
            Some(_) => {}
        }
    }

    // Members are examined among their sound siblings, which any required fields need.
    let context: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !blamed.contains(k))
        .map(|(k, v)| (k.clone(), skeleton(v)))
        .collect();
    for &k in blamed.iter().chain(&suspects) {
        let narrow = |x: Value| {
            let mut m = context.clone();
            m.insert(k.clone(), x);
            wrap(Value::Object(m))
        };
        locate::<T>(&narrow, &map[k], &join_key(at, k), out);
    }

    // Whatever is left is a field missing from this very object.
    let rest: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !blamed.contains(k) && !suspects.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(msg) = deser_error::<T>(&wrap(Value::Object(rest))) {
        let report = match missing_field(&msg) {
            Some(f) => owns(f) && !map.contains_key(f),
            None => blamed.is_empty() && suspects.is_empty(),
        };
        if report {
            out.push(PolicyError::new(at, msg));
        }
    }
}

fn locate_in_array<T: DeserializeOwned>(
    wrap: &dyn Fn(Value) -> Value,
    items: &[Value],
    at: &str,
    out: &mut Vec<PolicyError>,
) {
    // One element at a time: the surrounding document is kept small (see `skeleton`), so
    // even a million keys cost one small deserialization each.
    let narrow = |x: Value| wrap(Value::Array(vec![x]));
    for (i, item) in items.iter().enumerate() {
        if deser_error::<T>(&narrow(item.clone())).is_some() {
            locate::<T>(&narrow, item, &format!("{at}[{i}]"), out);
        }
    }
}

fn join_key(at: &str, k: &str) -> String {
    if at.is_empty() {
        k.to_owned()
    } else {
        format!("{at}.{k}")
    }
}

/// Parses `198.51.100.7`, `2001:db8::/48`, ... A bare host is a /32 or /128.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, plen) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("not an IPv4 or IPv6 address or CIDR: {s:?}"))?;
    let (family, max, bytes) = match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (kernel::FAMILY_V4, 32u8, b)
        }
        IpAddr::V6(a) => (kernel::FAMILY_V6, 128u8, a.octets()),
    };
    let plen = match plen {
        None => max,
        Some(p) => {
            // Digits only: u8::from_str would also take "+8".
            if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("invalid prefix length in {s:?}"));
            }
            match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "prefix length /{p} out of range for IPv{family} (0..={max}) in {s}"
                    ));
                }
            }
        }
    };
    if !host_bits_zero(&bytes, plen) {
        return Err(format!("host bits set in {s}"));
    }
    Ok((family, plen, bytes))
}

pub(super) fn host_bits_zero(addr: &[u8; 16], plen: u8) -> bool {
    addr.iter().enumerate().all(|(i, &b)| {
        let bits = (plen as usize).saturating_sub(i * 8).min(8);
        let host_mask = if bits == 8 { 0 } else { 0xffu8 >> bits };
        b & host_mask == 0
    })
}

/// Parses a list of entries, placing errors at `at[i]`. Duplicates collapse silently.
pub(super) fn parse_entries(
    entries: &[String],
    at: &dyn fmt::Display,
    errs: &mut Vec<PolicyError>,
) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::with_capacity(entries.len());
    for (i, s) in entries.iter().enumerate() {
        match parse_cidr(s) {
            Ok(c) if !out.contains(&c) => out.push(c),
            Ok(_) => {}
            Err(msg) => errs.push(PolicyError::new(format!("{at}[{i}]"), msg)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{example, parse_errors};

    #[test]
    fn empty_document_is_an_empty_policy() {
        let p = Policy::from_toml_str("").unwrap();
        assert_eq!(p, Policy::default());
        p.validate().unwrap();
        assert_eq!(Policy::from_json_str("{}").unwrap(), Policy::default());
        let c = p.compile().unwrap();
        assert!(c.keys.is_empty() && c.listeners.is_empty() && c.ipsets.is_empty());
    }

    #[test]
    fn round_trips_through_json_and_toml() {
        let p = example();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(Policy::from_json_str(&json).unwrap(), p);
        let toml = toml::to_string(&p).unwrap();
        assert_eq!(Policy::from_toml_str(&toml).unwrap(), p);
        // Unset locator-specific fields stay out of the API's view.
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["listener"][2],
            serde_json::json!({"port": 9878, "locator": "fix", "fix_tag": 553})
        );
        assert_eq!(v["settings"]["unknown_key"], "drop");
    }

    #[test]
    fn toml_syntax_error_names_line_and_column() {
        let e = Policy::from_toml_str("[settings]\nenforce = true\nkey_prefix_len = = 8\n")
            .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].at, "line 3, column 18");
        assert!(
            e[0].to_string().starts_with("line 3, column 18: "),
            "{}",
            e[0]
        );
    }

    #[test]
    fn shape_errors_name_their_place_and_line() {
        let e = parse_errors("[settings]\nenforce = true\nunknown_key = \"dorp\"\n");
        assert_eq!(
            e,
            [
                "settings.unknown_key: line 3, column 15: unknown variant `dorp`, expected `drop` or `pass`"
            ]
        );
        let e = parse_errors("[settings]\nenforc = true\n");
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("settings.enforc: line 2, column 1: unknown field `enforc`"),
            "{e:?}"
        );
        // Every shape error, not just the first.
        let e = parse_errors(
            "[settings]\naction = \"rst\"\n[[listener]]\nport = 70000\nlocator = \"fix\"\n\
             [[listener]]\nport = 1\nlocator = \"smtp\"\n[[key]]\nprefix = \"37c541a1\"\nallow = [5]\n\
             [[key]]\nallow = []\n",
        );
        let at: Vec<&str> = e.iter().map(|s| s.split(": ").next().unwrap()).collect();
        assert_eq!(
            at,
            [
                "key[0].allow[0]",
                "key[1]",
                "listener[0].port",
                "listener[1].locator",
                "settings.action"
            ]
        );
        assert!(e[1].ends_with("missing field `prefix`"), "{e:?}");
    }

    #[test]
    fn json_errors_name_their_place() {
        let e =
            Policy::from_json_str(r#"{"key": [{"prefix": "37c541a1", "allow": ["1.2.3.4", 5]}]}"#)
                .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].to_string(),
            "key[0].allow[1]: invalid type: integer `5`, expected a string"
        );
        let e = Policy::from_json_str(r#"{"ipsets": {"a": "1.2.3.0/24"}}"#).unwrap_err();
        assert_eq!(e[0].at, "ipsets.a");
        let e = Policy::from_json_str("{\n \"key\": [}").unwrap_err();
        assert_eq!(e[0].at, "line 2, column 10");
        assert!(!e[0].message.contains(" at line "), "{}", e[0].message);
    }

    #[test]
    fn shape_errors_in_a_long_list_are_found_quickly() {
        let mut keys: Vec<Value> = (0..20_000)
            .map(|i| serde_json::json!({"prefix": format!("{i:08}"), "allow": ["192.0.2.1"]}))
            .collect();
        keys[4_242]["allow"][0] = Value::from(1);
        keys[17_777].as_object_mut().unwrap().remove("prefix");
        let doc = serde_json::json!({"key": keys, "listener": [{"port": 1, "locator": "fix", "fix_tag": 553}]});
        let e = Policy::from_json_str(&doc.to_string()).unwrap_err();
        let at: Vec<&str> = e.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(at, ["key[4242].allow[0]", "key[17777]"]);
    }
}
