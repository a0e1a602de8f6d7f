//! The policy model (docs/REFERENCE.md "Policy"), its parsing, validation, compilation to kernel records,
//! and the PATCH operations of the control-plane API.
//!
//! Everything here is pure: no maps, no I/O. The same model is read from TOML files, from
//! JSON API bodies and from etcd, so every error carries a place (`key[3].allow[1]`) that
//! means the same thing in all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use filter_common as kernel;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// A whole policy. Every section is optional, so an empty file is a valid, empty policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Optional in a file; the API and etcd carry their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub listener: Vec<Listener>,
    /// Named address sets that keys can bind to.
    #[serde(default)]
    pub ipsets: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub key: Vec<Key>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// false = audit: count what would be dropped, drop nothing.
    pub enforce: bool,
    /// Bytes of the API key that identify it (4..=16).
    pub key_prefix_len: u8,
    pub unknown_key: Verdict,
    pub no_key: Verdict,
    pub unbound_keys: Verdict,
    pub prefilter: bool,
    pub action: Action,
    /// Lock keys with no allowed traffic for this long (`14d`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_lock_after: Option<String>,
    /// Report (or lock) keys used from more source networks than allowed in a window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_key: Option<SharedKey>,
    /// Default per-key limit on new connections (a key's own setting overrides it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_connections_per_s: Option<RateLimit>,
    /// Default per-key limit on key messages (HTTP requests; the first message of a TLS or
    /// FIX connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_s: Option<RateLimit>,
}

/// A rate limit: `10` (10 a second, bursts of 10) or `{ rate = 10, burst = 50 }`. A rate of 0
/// is no limit (a key can turn a default off with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateLimit {
    Rate(u32),
    Burst(RateBurst),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateBurst {
    pub rate: u32,
    pub burst: u32,
}

/// The highest rate a limit may name (a message every microsecond).
pub const MAX_RATE: u32 = 1_000_000;

impl RateLimit {
    /// (rate, burst); a bare rate bursts up to itself (at least 1).
    pub fn parts(self) -> (u32, u32) {
        match self {
            RateLimit::Rate(r) => (r, r.max(1)),
            RateLimit::Burst(b) => (b.rate, b.burst),
        }
    }

    /// GCRA (emission interval, tolerance) in ns; None for no limit.
    pub fn gcra(self) -> Option<(u64, u64)> {
        let (rate, burst) = self.parts();
        if rate == 0 {
            return None;
        }
        let t = 1_000_000_000 / rate as u64;
        Some((t, t * (burst.max(1) as u64 - 1)))
    }

    fn check(self, at: &str, errs: &mut Vec<PolicyError>) {
        let (rate, burst) = self.parts();
        if rate > MAX_RATE {
            errs.push(PolicyError::new(
                at,
                format!("rate {rate} is above {MAX_RATE} a second"),
            ));
        } else if rate > 0 && !(1..=MAX_RATE).contains(&burst) {
            errs.push(PolicyError::new(
                at,
                format!("burst must be 1..={MAX_RATE}, got {burst}"),
            ));
        }
    }
}

/// `shared_key = { networks = 3, window = "1h", action = "alert" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedKey {
    /// A key seen from more distinct /24 (IPv4) or /48 (IPv6) networks than this within
    /// `window` is a suspect (1 to 4: the datapath remembers five networks per key).
    #[serde(default = "default_shared_networks")]
    pub networks: u32,
    #[serde(default = "default_shared_window")]
    pub window: String,
    #[serde(default)]
    pub action: SharedAction,
}

pub const DEFAULT_SHARED_NETWORKS: u32 = 3;
/// The longest shared-key window: the datapath stamps networks in minutes mod 65536.
pub const MAX_SHARED_WINDOW_S: u64 = 7 * 86_400;
/// The shortest `idle_lock_after`: the daemon looks every few seconds.
pub const MIN_IDLE_LOCK_AFTER_S: u64 = 5;

fn default_shared_networks() -> u32 {
    DEFAULT_SHARED_NETWORKS
}

fn default_shared_window() -> String {
    "1h".into()
}

impl SharedKey {
    /// The window in seconds (the default's when invalid; validation reports it).
    pub fn window_s(&self) -> u64 {
        crate::risk::parse_duration(&self.window).unwrap_or(crate::risk::DEFAULT_NETWORK_WINDOW_S)
    }
}

/// `alert` | `lock`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedAction {
    #[default]
    Alert,
    Lock,
}

impl Settings {
    /// `idle_lock_after` in seconds, when set and valid.
    pub fn idle_lock_after_s(&self) -> Option<u64> {
        self.idle_lock_after
            .as_deref()
            .and_then(|d| crate::risk::parse_duration(d).ok())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            enforce: true,
            key_prefix_len: 8,
            unknown_key: Verdict::Drop,
            no_key: Verdict::Pass,
            unbound_keys: Verdict::Pass,
            prefilter: true,
            action: Action::Drop,
            idle_lock_after: None,
            shared_key: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        }
    }
}

/// `drop` | `pass`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Drop,
    Pass,
}

/// `drop` | `reset`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Drop,
    Reset,
}

/// `http-header` | `tls-sni` | `fix`
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Locator {
    HttpHeader,
    TlsSni,
    Fix,
}

impl Locator {
    fn name(self) -> &'static str {
        match self {
            Locator::HttpHeader => "http-header",
            Locator::TlsSni => "tls-sni",
            Locator::Fix => "fix",
        }
    }
}

/// One TCP port the filter inspects. Locator-specific fields are left out of the
/// serialized form when unset, so `policy show` prints what the operator wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub port: u16,
    pub locator: Locator,
    /// http-header: header names, case-insensitive, first found wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// http-header: connections start with a PROXY v1/v2 header.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
    /// Sources allowed to send PROXY headers (required when proxy_protocol = true).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// tls-sni: the key is the label just left of this suffix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni_suffix: Option<String>,
    /// tls-sni: text before the key inside that label (may be empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_prefix: Option<String>,
    /// fix: the Logon tag that carries the key (553 Username, 49 SenderCompID, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix_tag: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One API key, identified by its prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Key {
    pub prefix: String,
    /// Hosts or CIDRs, IPv4 and IPv6; host bits must be zero.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Names of `[ipsets]` this key also accepts traffic from.
    #[serde(default)]
    pub ipsets: Vec<String>,
    #[serde(default)]
    pub locked: bool,
    /// Why it is locked (free text, one line, at most 200 bytes); only with `locked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_reason: Option<String>,
    /// RFC 3339 instant at which the lock stops holding on its own; only with `locked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
    /// This key's limits, overriding `settings` (0: none for this key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_connections_per_s: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_s: Option<RateLimit>,
}

impl Key {
    /// `locked_until` in Unix seconds (None: no expiry, or not a valid time).
    pub fn locked_until_unix(&self) -> Option<i64> {
        self.locked_until
            .as_deref()
            .and_then(|t| crate::risk::parse_rfc3339(t).ok())
    }

    /// Whether the lock holds at `now` (Unix seconds): locked, and not past `locked_until`.
    pub fn locked_at(&self, now: i64) -> bool {
        self.locked && crate::risk::lock_holds(self.locked_until_unix(), now)
    }

    /// Locked with no expiry: the key refuses until a write unlocks it.
    pub fn locked_for_good(&self) -> bool {
        self.locked && self.locked_until.is_none()
    }

    /// What a `lock` or `unlock` op does to the key (the one place that says it).
    pub fn set_lock(&mut self, lock: bool, reason: Option<&str>, until: Option<&str>) {
        self.locked = lock;
        self.lock_reason = if lock {
            reason.map(str::to_owned)
        } else {
            None
        };
        self.locked_until = if lock { until.map(str::to_owned) } else { None };
    }

    /// Whether `set_lock` with these arguments would change nothing.
    pub fn lock_is(&self, lock: bool, reason: Option<&str>, until: Option<&str>) -> bool {
        let mut k = self.clone();
        k.set_lock(lock, reason, until);
        k == *self
    }
}

impl PatchOp {
    /// A lock or unlock op as `Key::set_lock` arguments: (lock, reason, until).
    pub fn lock_args(&self) -> Option<(&str, bool, Option<&str>, Option<&str>)> {
        match self {
            PatchOp::Lock {
                prefix,
                lock_reason,
                locked_until,
            } => Some((
                prefix,
                true,
                lock_reason.as_deref(),
                locked_until.as_deref(),
            )),
            PatchOp::Unlock { prefix } => Some((prefix, false, None, None)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem with a policy: where (`key[3].allow[1]`, or `line 12, column 5` for TOML
/// syntax) and what. Displays as `key[3].allow[1]: host bits set in 10.0.0.1/8`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// Empty when the error concerns the document as a whole.
    pub at: String,
    pub message: String,
}

impl PolicyError {
    pub fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError {
            at: at.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

impl std::error::Error for PolicyError {}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

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

    /// The key with this prefix, if any.
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

    pub fn find_key(&self, prefix: &str) -> Option<&Key> {
        self.key.iter().find(|k| k.prefix == prefix)
    }

    fn key_index(&self, prefix: &str) -> Option<usize> {
        self.key.iter().position(|k| k.prefix == prefix)
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

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// One network: family (`FAMILY_V4`/`FAMILY_V6`), prefix length, address in network byte
/// order (IPv4 in the first 4 bytes) with host bits zero.
pub type Cidr = (u8, u8, [u8; 16]);
/// The contents of one address set (a key's own entries, or one ipset).
pub type SetContent = BTreeSet<Cidr>;

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

fn host_bits_zero(addr: &[u8; 16], plen: u8) -> bool {
    addr.iter().enumerate().all(|(i, &b)| {
        let bits = (plen as usize).saturating_sub(i * 8).min(8);
        let host_mask = if bits == 8 { 0 } else { 0xffu8 >> bits };
        b & host_mask == 0
    })
}

/// Parses a list of entries, placing errors at `at[i]`. Duplicates collapse silently.
fn parse_entries(
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

/// The kernel probes each prefix length of a set in turn, up to `MAX_PLENS` per family.
fn check_plens(set: &SetContent, at: &dyn fmt::Display, errs: &mut Vec<PolicyError>) {
    for (family, name) in [(kernel::FAMILY_V4, "IPv4"), (kernel::FAMILY_V6, "IPv6")] {
        let plens: BTreeSet<u8> = set.iter().filter(|c| c.0 == family).map(|c| c.1).collect();
        if plens.len() > kernel::MAX_PLENS {
            let list: Vec<String> = plens.iter().map(|p| format!("/{p}")).collect();
            errs.push(PolicyError::new(
                at.to_string(),
                format!(
                    "{} distinct {name} prefix lengths ({}); at most {} per address set",
                    plens.len(),
                    list.join(" "),
                    kernel::MAX_PLENS
                ),
            ));
        }
    }
}

/// Splits a key's own entries: the first `INLINE_V4` IPv4 hosts ride in the key record
/// (no second lookup in the common case); everything else goes to the key's own set.
fn split_own(entries: &[Cidr]) -> (Vec<u32>, SetContent) {
    let mut inline = Vec::new();
    let mut rest = SetContent::new();
    for &c in entries {
        let (family, plen, addr) = c;
        if family == kernel::FAMILY_V4 && plen == 32 && inline.len() < kernel::INLINE_V4 {
            // The in-memory bytes stay in network order, as the program reads them.
            inline.push(u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]));
        } else {
            rest.insert(c);
        }
    }
    (inline, rest)
}

// ---------------------------------------------------------------------------------------------
// Validation and compilation
// ---------------------------------------------------------------------------------------------

/// One key as the loader writes it (set ids are the loader's business).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledKey {
    /// `KEY_PRESENT`, plus `KEY_LOCKED`, plus `KEY_BOUND` if it has any allow entry or ipset.
    pub flags: u8,
    /// Up to `INLINE_V4` IPv4 hosts, as `u32::from_ne_bytes(octets)`.
    pub inline_v4: Vec<u32>,
    /// The rest of the key's own entries; `None` if there are none.
    pub own_set: Option<SetContent>,
    /// Bound ipsets, in the policy's order.
    pub ipsets: Vec<String>,
    /// With `KEY_LOCKED`: when the lock ends on its own (Unix seconds); None: never.
    pub locked_until: Option<i64>,
    /// The key's limits as a `KW_RATE` entry (state zero); None: unlimited.
    pub rate: Option<kernel::RateEntry>,
}

/// A key's effective limits as a `KW_RATE` entry; None when neither limits anything.
pub fn rate_entry(conn: Option<RateLimit>, req: Option<RateLimit>) -> Option<kernel::RateEntry> {
    let c = conn.and_then(RateLimit::gcra);
    let r = req.and_then(RateLimit::gcra);
    if c.is_none() && r.is_none() {
        return None;
    }
    let (conn_t, conn_tau) = c.unwrap_or((0, 0));
    let (req_t, req_tau) = r.unwrap_or((0, 0));
    Some(kernel::RateEntry {
        conn_t,
        conn_tau,
        req_t,
        req_tau,
        ..Default::default()
    })
}

/// A validated policy in kernel form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// Generation 0: the loader sets it when it applies.
    pub settings: kernel::Settings,
    pub listeners: BTreeMap<u16, kernel::Listener>,
    /// `trusted_proxies` of each PROXY-protocol listener, by port. The loader stores each as
    /// an address set (shared when identical) and writes its id into `Listener::proxy_set`.
    pub proxy_sets: BTreeMap<u16, SetContent>,
    pub keys: BTreeMap<kernel::KeyPrefix, CompiledKey>,
    pub ipsets: BTreeMap<String, SetContent>,
}

const KEY_PREFIX_LENS: std::ops::RangeInclusive<u8> = 4..=kernel::MAX_PREFIX_LEN as u8;
/// One set slot of the key record is kept for the key's own CIDRs and IPv6 hosts.
const MAX_KEY_IPSETS: usize = kernel::MAX_SETS - 1;
const MAX_HEADER_LEN: usize = kernel::MAX_HEADER_NAME - 1; // the colon takes one byte

impl Policy {
    /// Checks everything; returns every error, each with its place.
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        self.compile().map(|_| ())
    }

    /// Validates and translates to kernel records. Validation and compilation are one pass,
    /// so what `policy check` accepts is exactly what the loader can write.
    pub fn compile(&self) -> Result<Compiled, Vec<PolicyError>> {
        let mut errs = Vec::new();
        let settings = self.compile_settings(&mut errs);
        let (listeners, proxy_sets) = compile_listeners(&self.listener, &mut errs);
        let ipsets = self.compile_ipsets(&mut errs);
        let keys = self.compile_keys(&mut errs);
        if errs.is_empty() {
            Ok(Compiled {
                settings,
                listeners,
                proxy_sets,
                keys,
                ipsets,
            })
        } else {
            Err(errs)
        }
    }

    fn compile_settings(&self, errs: &mut Vec<PolicyError>) -> kernel::Settings {
        let s = &self.settings;
        if !KEY_PREFIX_LENS.contains(&s.key_prefix_len) {
            errs.push(PolicyError::new(
                "settings.key_prefix_len",
                format!("must be 4..=16, got {}", s.key_prefix_len),
            ));
        }
        if let Some(d) = &s.idle_lock_after {
            match crate::risk::parse_duration(d) {
                Err(e) => errs.push(PolicyError::new("settings.idle_lock_after", e)),
                Ok(n) if n < MIN_IDLE_LOCK_AFTER_S => errs.push(PolicyError::new(
                    "settings.idle_lock_after",
                    format!("{d:?} is shorter than {MIN_IDLE_LOCK_AFTER_S}s"),
                )),
                Ok(_) => {}
            }
        }
        if let Some(l) = s.max_new_connections_per_s {
            l.check("settings.max_new_connections_per_s", errs);
        }
        if let Some(l) = s.max_requests_per_s {
            l.check("settings.max_requests_per_s", errs);
        }
        if let Some(sk) = &s.shared_key {
            let max = kernel::ACTIVITY_NETS as u32 - 1;
            if !(1..=max).contains(&sk.networks) {
                errs.push(PolicyError::new(
                    "settings.shared_key.networks",
                    format!(
                        "must be 1..={max}, got {} (the datapath remembers {} networks per key)",
                        sk.networks,
                        kernel::ACTIVITY_NETS
                    ),
                ));
            }
            match crate::risk::parse_duration(&sk.window) {
                Err(e) => errs.push(PolicyError::new("settings.shared_key.window", e)),
                Ok(n) if !(60..=MAX_SHARED_WINDOW_S).contains(&n) => errs.push(PolicyError::new(
                    "settings.shared_key.window",
                    format!("{:?} must be 1m to 7d", sk.window),
                )),
                Ok(_) => {}
            }
        }
        // The prefilter drops handshakes from sources no key allows; while some key passes
        // from anywhere, every source may be legitimate, so it must stay off (docs/REFERENCE.md "Policy").
        // A lock that ends on its own counts as open: the prefilter is not rewritten when it ends.
        let open_key = s.unbound_keys == Verdict::Pass
            && self
                .key
                .iter()
                .any(|k| !k.locked_for_good() && k.allow.is_empty() && k.ipsets.is_empty());
        let mut flags = kernel::SETTING_LOADED;
        for (on, bit) in [
            (s.enforce, kernel::SETTING_ENFORCE),
            (
                s.unknown_key == Verdict::Drop,
                kernel::SETTING_UNKNOWN_KEY_DROP,
            ),
            (s.no_key == Verdict::Drop, kernel::SETTING_NO_KEY_DROP),
            (
                s.unbound_keys == Verdict::Drop,
                kernel::SETTING_UNBOUND_DROP,
            ),
            (s.prefilter && !open_key, kernel::SETTING_PREFILTER),
            (s.action == Action::Reset, kernel::SETTING_ACTION_RESET),
        ] {
            if on {
                flags |= bit;
            }
        }
        kernel::Settings {
            generation: 0,
            flags,
            key_prefix_len: s.key_prefix_len,
            ..Default::default()
        }
    }

    fn compile_ipsets(&self, errs: &mut Vec<PolicyError>) -> BTreeMap<String, SetContent> {
        let mut out = BTreeMap::new();
        for (name, entries) in &self.ipsets {
            let at = format!("ipsets.{name}");
            let valid_name = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid_name {
                errs.push(PolicyError::new(
                    &at,
                    format!("invalid ipset name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ . -"),
                ));
            }
            let set: SetContent = parse_entries(entries, &at, errs).into_iter().collect();
            check_plens(&set, &at, errs);
            out.insert(name.clone(), set);
        }
        out
    }

    fn compile_keys(
        &self,
        errs: &mut Vec<PolicyError>,
    ) -> BTreeMap<kernel::KeyPrefix, CompiledKey> {
        let plen = self.settings.key_prefix_len;
        let plen_ok = KEY_PREFIX_LENS.contains(&plen);
        let mut seen: HashMap<
            &str,
            usize,
            std::hash::BuildHasherDefault<crate::prefilter::U32Hasher>,
        > = HashMap::with_capacity_and_hasher(self.key.len(), Default::default());
        let mut out = BTreeMap::new();
        // A tls-sni listener reads the key from a DNS name, which is case-insensitive: a
        // server may map `k-ABCD1234` to either case of a prefix, so prefixes must be lower
        // case (two that differ only in case would be one key to it).
        let sni_port = self
            .listener
            .iter()
            .find(|l| l.locator == Locator::TlsSni)
            .map(|l| l.port);
        for (j, key) in self.key.iter().enumerate() {
            // Formatted only when an error is placed (a million keys are mostly valid).
            let at = KeyAt(j);
            let bytes = key.prefix.as_bytes();
            let mut prefix_ok = true;
            if let Some(port) = sni_port
                && bytes.iter().any(u8::is_ascii_uppercase)
            {
                errs.push(PolicyError::new(
                    format!("{at}.prefix"),
                    format!(
                        "{:?} has upper-case letters: the tls-sni listener on port {port} reads \
                         keys from DNS names, which ignore case; use lower case",
                        key.prefix
                    ),
                ));
                prefix_ok = false;
            }
            // Without a valid key_prefix_len the length check would only add noise.
            if plen_ok && bytes.len() != plen as usize {
                errs.push(PolicyError::new(
                    format!("{at}.prefix"),
                    format!(
                        "must be exactly {plen} bytes (settings.key_prefix_len), got {} in {:?}",
                        bytes.len(),
                        key.prefix
                    ),
                ));
                prefix_ok = false;
            }
            if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
                errs.push(PolicyError::new(
                    format!("{at}.prefix"),
                    format!("{:?} must be printable ASCII without spaces", key.prefix),
                ));
                prefix_ok = false;
            }
            if let Some(first) = seen.insert(&key.prefix, j) {
                errs.push(PolicyError::new(
                    format!("{at}.prefix"),
                    format!("duplicate key prefix {:?} (also key[{first}])", key.prefix),
                ));
                seen.insert(&key.prefix, first);
            }

            let own = parse_entries(&key.allow, &format_args!("{at}.allow"), errs);
            let (inline_v4, own_set) = split_own(&own);
            check_plens(&own_set, &format_args!("{at}.allow"), errs);

            if key.ipsets.len() > MAX_KEY_IPSETS {
                errs.push(PolicyError::new(
                    format!("{at}.ipsets"),
                    format!(
                        "{} ipsets; at most {MAX_KEY_IPSETS} per key (the kernel key record has \
                         {} address-set slots, one kept for the key's own CIDRs and IPv6 hosts)",
                        key.ipsets.len(),
                        kernel::MAX_SETS
                    ),
                ));
            }
            for (k, name) in key.ipsets.iter().enumerate() {
                let at = format!("{at}.ipsets[{k}]");
                if !self.ipsets.contains_key(name) {
                    errs.push(PolicyError::new(&at, format!("unknown ipset {name:?}")));
                } else if let Some(first) = key.ipsets[..k].iter().position(|n| n == name) {
                    errs.push(PolicyError::new(
                        &at,
                        format!("duplicate ipset {name:?} (also ipsets[{first}])"),
                    ));
                }
            }

            let locked_until = check_lock_fields(key, &at.to_string(), errs);
            if let Some(l) = key.max_new_connections_per_s {
                l.check(&format!("{at}.max_new_connections_per_s"), errs);
            }
            if let Some(l) = key.max_requests_per_s {
                l.check(&format!("{at}.max_requests_per_s"), errs);
            }
            let rate = rate_entry(
                key.max_new_connections_per_s
                    .or(self.settings.max_new_connections_per_s),
                key.max_requests_per_s.or(self.settings.max_requests_per_s),
            );

            if prefix_ok && plen_ok {
                let mut flags = kernel::KEY_PRESENT;
                if key.locked {
                    flags |= kernel::KEY_LOCKED;
                }
                if !key.allow.is_empty() || !key.ipsets.is_empty() {
                    flags |= kernel::KEY_BOUND;
                }
                let compiled = CompiledKey {
                    flags,
                    locked_until,
                    rate,
                    inline_v4,
                    own_set: (!own_set.is_empty()).then_some(own_set),
                    ipsets: key.ipsets.clone(),
                };
                out.insert(key_prefix(&key.prefix), compiled);
            }
        }
        out
    }
}

/// Checks a key's `lock_reason` and `locked_until` (places under `at`: `key[3]`, or the
/// `ops[2]` that brought them), and returns `locked_until` in Unix seconds.
pub fn check_lock_fields(key: &Key, at: &str, errs: &mut Vec<PolicyError>) -> Option<i64> {
    if let Some(r) = &key.lock_reason {
        if let Err(e) = crate::risk::check_lock_reason(r) {
            errs.push(PolicyError::new(format!("{at}.lock_reason"), e));
        } else if !key.locked {
            errs.push(PolicyError::new(
                format!("{at}.lock_reason"),
                "only a locked key has a lock_reason (set locked = true)",
            ));
        }
    }
    let t = key.locked_until.as_ref()?;
    match crate::risk::check_locked_until(t) {
        Err(e) => {
            errs.push(PolicyError::new(format!("{at}.locked_until"), e));
            None
        }
        Ok(_) if !key.locked => {
            errs.push(PolicyError::new(
                format!("{at}.locked_until"),
                "only a locked key has a locked_until (set locked = true)",
            ));
            None
        }
        Ok(t) => Some(t),
    }
}

/// `key[j]`, the place of a policy's j-th key.
struct KeyAt(usize);

impl fmt::Display for KeyAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key[{}]", self.0)
    }
}

/// The `KW_KEYS` key of a (valid) prefix: its bytes, zero padded.
pub fn key_prefix(prefix: &str) -> kernel::KeyPrefix {
    let mut bytes = [0u8; kernel::MAX_PREFIX_LEN];
    let n = prefix.len().min(bytes.len());
    bytes[..n].copy_from_slice(&prefix.as_bytes()[..n]);
    kernel::KeyPrefix { bytes }
}

fn compile_listeners(
    listeners: &[Listener],
    errs: &mut Vec<PolicyError>,
) -> (BTreeMap<u16, kernel::Listener>, BTreeMap<u16, SetContent>) {
    let mut out = BTreeMap::new();
    let mut proxy_sets = BTreeMap::new();
    let mut ports: HashMap<u16, usize> = HashMap::new();
    for (i, l) in listeners.iter().enumerate() {
        let at = |field: &str| format!("listener[{i}].{field}");
        let mut err = |field: &str, msg: String| errs.push(PolicyError::new(at(field), msg));
        if l.port == 0 {
            err("port", "must be 1..=65535, got 0".into());
        } else if let Some(first) = ports.insert(l.port, i) {
            err(
                "port",
                format!("duplicate port {} (also listener[{first}])", l.port),
            );
            ports.insert(l.port, first);
        }

        let mut k = kernel::Listener {
            locator: match l.locator {
                Locator::HttpHeader => kernel::LOCATOR_HTTP_HEADER,
                Locator::TlsSni => kernel::LOCATOR_TLS_SNI,
                Locator::Fix => kernel::LOCATOR_FIX,
            },
            ..Default::default()
        };
        let only_for = |what: Locator| {
            format!(
                "only for {} listeners (this one is {})",
                what.name(),
                l.locator.name()
            )
        };

        // http-header
        if l.locator == Locator::HttpHeader {
            if !(1..=kernel::MAX_HEADERS).contains(&l.headers.len()) {
                err(
                    "headers",
                    format!(
                        "an http-header listener needs 1 to {} header names, got {}",
                        kernel::MAX_HEADERS,
                        l.headers.len()
                    ),
                );
            }
            for (h, name) in l.headers.iter().enumerate() {
                let field = format!("headers[{h}]");
                if !(1..=MAX_HEADER_LEN).contains(&name.len()) || !name.bytes().all(is_tchar) {
                    err(
                        &field,
                        format!(
                            "{name:?} is not a header name of 1 to {MAX_HEADER_LEN} letters, \
                             digits or !#$%&'*+-.^_`|~"
                        ),
                    );
                } else if let Some(first) = l.headers[..h]
                    .iter()
                    .position(|o| o.eq_ignore_ascii_case(name))
                {
                    err(
                        &field,
                        format!("duplicate header {name:?} (also headers[{first}])"),
                    );
                } else if h < kernel::MAX_HEADERS {
                    // Matched at line starts as "name:" under a case-fold and a length mask.
                    let mut with_colon = name.as_bytes().to_vec();
                    with_colon.push(b':');
                    encode_name(&mut k, h, &with_colon);
                    k.n_headers += 1;
                }
            }
        } else if !l.headers.is_empty() {
            err("headers", only_for(Locator::HttpHeader));
        }

        // PROXY protocol: the client address comes from the header, so only trusted senders.
        if l.proxy_protocol {
            if l.locator != Locator::HttpHeader {
                err("proxy_protocol", only_for(Locator::HttpHeader));
            }
            if l.trusted_proxies.is_empty() {
                err(
                    "trusted_proxies",
                    "required when proxy_protocol = true".into(),
                );
            }
            k.flags |= kernel::LISTENER_PROXY_PROTOCOL;
        } else if !l.trusted_proxies.is_empty() {
            // Listed proxies would be trusted with nothing: say so rather than ignore them.
            err("trusted_proxies", "only with proxy_protocol = true".into());
        }
        let mut trusted = Vec::new();
        for (p, s) in l.trusted_proxies.iter().enumerate() {
            match parse_cidr(s) {
                Ok(c) => trusted.push(c),
                Err(msg) => err(&format!("trusted_proxies[{p}]"), msg),
            }
        }
        if l.proxy_protocol {
            // The kernel probes the trusted set like any address set: few prefix lengths.
            let set: SetContent = trusted.into_iter().collect();
            let mut found = Vec::new();
            check_plens(&set, &"", &mut found);
            for e in found {
                err("trusted_proxies", e.message);
            }
            proxy_sets.insert(l.port, set);
        }

        // tls-sni: the key is what follows label_prefix in the label just left of
        // sni_suffix (`k-37c541a1.api.example.com`). Both are stored lower-cased; the kernel
        // folds the server name's case before it compares.
        if l.locator == Locator::TlsSni {
            match l.sni_suffix.as_deref() {
                None | Some("") => err(
                    "sni_suffix",
                    "a tls-sni listener needs sni_suffix, e.g. \".api.example.com\"".into(),
                ),
                Some(s) if !is_sni_suffix(s) => err(
                    "sni_suffix",
                    format!(
                        "{s:?} must be a domain suffix starting with '.', e.g. \".api.example.com\""
                    ),
                ),
                Some(s) if s.len() > kernel::MAX_SNI_SUFFIX => err(
                    "sni_suffix",
                    format!(
                        "{s:?} is {} bytes; at most {}",
                        s.len(),
                        kernel::MAX_SNI_SUFFIX
                    ),
                ),
                Some(s) => {
                    let lower = s.to_ascii_lowercase();
                    k.sni_suffix[..lower.len()].copy_from_slice(lower.as_bytes());
                    k.sni_suffix_len = lower.len() as u8;
                }
            }
            let label_prefix = l.label_prefix.as_deref().unwrap_or("");
            if label_prefix.len() > kernel::MAX_LABEL_PREFIX
                || !label_prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                err(
                    "label_prefix",
                    format!(
                        "{label_prefix:?} must be at most {} letters, digits or '-'",
                        kernel::MAX_LABEL_PREFIX
                    ),
                );
            } else {
                let lower = label_prefix.to_ascii_lowercase();
                k.label_prefix[..lower.len()].copy_from_slice(lower.as_bytes());
                k.label_prefix_len = lower.len() as u8;
            }
        } else {
            if l.sni_suffix.is_some() {
                err("sni_suffix", only_for(Locator::TlsSni));
            }
            if l.label_prefix.is_some() {
                err("label_prefix", only_for(Locator::TlsSni));
            }
        }

        // fix: any tag number works (the kernel takes the value of `fix_tag=` wherever a
        // field starts); the usual ones are 553 Username (Kraken, Bitvavo) and 49
        // SenderCompID.
        match (l.locator, l.fix_tag) {
            (Locator::Fix, Some(tag @ 1..=9999)) => {
                // Matched like a header name at field starts (after SOH): "553=".
                k.fix_tag = tag;
                encode_name(&mut k, 0, format!("{tag}=").as_bytes());
                k.n_headers = 1;
            }
            (Locator::Fix, Some(tag)) => err("fix_tag", format!("must be 1..=9999, got {tag}")),
            (Locator::Fix, None) => err(
                "fix_tag",
                "a fix listener needs fix_tag (553 Username, 49 SenderCompID)".into(),
            ),
            (_, Some(_)) => err("fix_tag", only_for(Locator::Fix)),
            (_, None) => {}
        }

        out.insert(l.port, k);
    }
    (out, proxy_sets)
}

/// Writes one name into header slot `slot`: lower-cased bytes, a 0x20 fold bit where the
/// name has a letter (so `byte | fold == name` matches either case), a 0xff mask, and its
/// length. `-` and `_` are one character (CGI-style servers map both to `_`): the mask
/// there keeps only the bits the two share (0x8d), so either matches.
fn encode_name(l: &mut kernel::Listener, slot: usize, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(kernel::MAX_HEADER_NAME)];
    for (j, &b) in bytes.iter().enumerate() {
        let dash = b == b'-' || b == b'_';
        let mask = if dash { DASH_MASK } else { 0xff };
        l.header_names[slot][j] = b.to_ascii_lowercase() & mask;
        l.header_fold[slot][j] = if b.is_ascii_alphabetic() { 0x20 } else { 0 };
        l.header_mask[slot][j] = mask;
    }
    l.header_len[slot] = bytes.len() as u8;
}

/// The bits `-` (0x2d) and `_` (0x5f) have in common.
const DASH_MASK: u8 = !(b'-' ^ b'_');

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_sni_suffix(s: &str) -> bool {
    s.len() <= 253
        && s.strip_prefix('.').is_some_and(|rest| {
            rest.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        })
}

// ---------------------------------------------------------------------------------------------
// PATCH /v1/policy
// ---------------------------------------------------------------------------------------------

/// `{"revision": N, "ops": [...]}`, applied all-or-nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub revision: u64,
    pub ops: Vec<PatchOp>,
}

impl Patch {
    pub fn from_json_str(s: &str) -> Result<Patch, Vec<PolicyError>> {
        parse_json(s)
    }
}

/// A PATCH as the API receives it. `revision` may be left out: the write is then
/// unconditional and applied at the applied revision + 1 (ops that already hold answer
/// "unchanged"), so a client need not read the policy to learn the revision first.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default)]
    pub revision: Option<u64>,
    pub ops: Vec<PatchOp>,
}

impl PatchRequest {
    pub fn from_json_str(s: &str) -> Result<PatchRequest, Vec<PolicyError>> {
        parse_json(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PatchOp {
    /// Replaces the key with the same prefix, or appends it.
    Upsert {
        key: Key,
    },
    Delete {
        prefix: String,
    },
    /// Locks the key; `lock_reason` and `locked_until` replace the key's (absent: none).
    Lock {
        prefix: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock_reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        locked_until: Option<String>,
    },
    Unlock {
        prefix: String,
    },
    /// Creates or replaces an ipset.
    SetIpset {
        name: String,
        cidrs: Vec<String>,
    },
    DeleteIpset {
        name: String,
    },
}

impl Policy {
    /// Applies `patch` to a copy of this policy and validates the result; `self` is never
    /// changed. The result carries `patch.revision`. Errors in what an op brought in are
    /// placed at that op (`ops[2].key.allow[0]`), the rest as in a policy file.
    pub fn apply_patch(&self, patch: &Patch) -> Result<Policy, Vec<PolicyError>> {
        let mut next = self.clone();
        next.revision = Some(patch.revision);
        let mut errs = Vec::new();
        // Which op last wrote each key (parallel to next.key) and each ipset.
        let mut key_origin: Vec<Option<usize>> = vec![None; next.key.len()];
        let mut ipset_origin: BTreeMap<String, usize> = BTreeMap::new();
        let mut deleted_ipsets: Vec<(usize, &str)> = Vec::new();

        for (n, op) in patch.ops.iter().enumerate() {
            let missing_key = |prefix: &str| {
                PolicyError::new(
                    format!("ops[{n}].prefix"),
                    format!("no key with prefix {prefix:?}"),
                )
            };
            match op {
                PatchOp::Upsert { key } => match next.key_index(&key.prefix) {
                    Some(j) => {
                        next.key[j] = key.clone();
                        key_origin[j] = Some(n);
                    }
                    None => {
                        next.key.push(key.clone());
                        key_origin.push(Some(n));
                    }
                },
                PatchOp::Delete { prefix } => match next.key_index(prefix) {
                    Some(j) => {
                        next.key.remove(j);
                        key_origin.remove(j);
                    }
                    None => errs.push(missing_key(prefix)),
                },
                PatchOp::Lock { prefix, .. } | PatchOp::Unlock { prefix } => {
                    match next.key_index(prefix) {
                        Some(j) => {
                            let (_, lock, reason, until) = op.lock_args().expect("a lock op");
                            let mut k = next.key[j].clone();
                            k.set_lock(lock, reason, until);
                            // Errors in what the op brought are placed at the op; the key
                            // then stays as it was, so they are not reported twice.
                            let n0 = errs.len();
                            check_lock_fields(&k, &format!("ops[{n}]"), &mut errs);
                            if errs.len() == n0 {
                                next.key[j] = k;
                            }
                        }
                        None => errs.push(missing_key(prefix)),
                    }
                }
                PatchOp::SetIpset { name, cidrs } => {
                    next.ipsets.insert(name.clone(), cidrs.clone());
                    ipset_origin.insert(name.clone(), n);
                }
                PatchOp::DeleteIpset { name } => {
                    if next.ipsets.remove(name).is_some() {
                        ipset_origin.remove(name);
                        deleted_ipsets.push((n, name));
                    } else {
                        errs.push(PolicyError::new(
                            format!("ops[{n}].name"),
                            format!("no ipset {name:?}"),
                        ));
                    }
                }
            }
        }

        // Deleting an ipset that keys still use is the delete's fault, not the keys'. Stand
        // an empty set in for it so validation does not report the same thing again.
        let mut checked = None;
        for &(n, name) in &deleted_ipsets {
            if next.ipsets.contains_key(name) {
                continue; // set again by a later op
            }
            let users: Vec<&str> = next
                .key
                .iter()
                .filter(|k| k.ipsets.iter().any(|s| s == name))
                .map(|k| k.prefix.as_str())
                .collect();
            if users.is_empty() {
                continue;
            }
            let mut list = users
                .iter()
                .take(3)
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            if users.len() > 3 {
                list.push_str(&format!(" and {} more", users.len() - 3));
            }
            errs.push(PolicyError::new(
                format!("ops[{n}].name"),
                format!("ipset {name:?} is still used by key {list}"),
            ));
            checked
                .get_or_insert_with(|| next.clone())
                .ipsets
                .insert(name.to_owned(), Vec::new());
        }

        if let Err(found) = checked.as_ref().unwrap_or(&next).validate() {
            errs.extend(found.into_iter().map(|e| PolicyError {
                at: op_place(&e.at, &key_origin, &ipset_origin),
                message: e.message,
            }));
        }
        if errs.is_empty() { Ok(next) } else { Err(errs) }
    }
}

/// Moves a policy place into the op that wrote it: `key[5].allow[0]` to `ops[2].key.allow[0]`,
/// `ipsets.x[1]` to `ops[3].cidrs[1]`. Places in what no op touched stay as they are.
fn op_place(
    at: &str,
    key_origin: &[Option<usize>],
    ipset_origin: &BTreeMap<String, usize>,
) -> String {
    if let Some(rest) = at.strip_prefix("key[")
        && let Some((idx, tail)) = rest.split_once(']')
        && let Ok(j) = idx.parse::<usize>()
        && let Some(Some(n)) = key_origin.get(j)
    {
        return format!("ops[{n}].key{tail}");
    }
    if let Some(rest) = at.strip_prefix("ipsets.") {
        for (name, n) in ipset_origin {
            if rest == name {
                return format!("ops[{n}]");
            }
            if let Some(tail) = rest.strip_prefix(name.as_str())
                && tail.starts_with('[')
            {
                return format!("ops[{n}].cidrs{tail}");
            }
        }
    }
    at.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC.md's example, verbatim.
    const SPEC_EXAMPLE: &str = r#"
revision = 7                      # optional in a file; the API and etcd carry their own

[settings]
enforce = true                    # false = audit: count what would be dropped, drop nothing
key_prefix_len = 8                # bytes of the API key that identify it (4..=16)
unknown_key = "drop"              # a key was found that the policy does not know: drop | pass
no_key = "pass"                   # API traffic on a listener where no key was found: drop | pass
unbound_keys = "pass"             # keys with no allow entries: pass (any source) | drop
prefilter = true                  # drop TCP handshakes to listeners from sources no key allows (only when no key is unbound-and-passing)
action = "drop"                   # drop | reset (drop, and answer the client with a TCP RST)

[[listener]]
port = 443                        # TCP
locator = "tls-sni"               # key prefix = the SNI label just left of sni_suffix, after label_prefix; ASCII case-insensitive
sni_suffix = ".api.example.com"
label_prefix = "k-"               # e.g. k-37c541a1.api.example.com

[[listener]]
port = 8080
locator = "http-header"           # first key_prefix_len bytes of the first header found, names case-insensitive
headers = ["OK-ACCESS-KEY", "X-MBX-APIKEY", "CB-ACCESS-KEY", "API-Key"]
proxy_protocol = false            # true: connections start with a PROXY v1/v2 header; the client address comes from it
trusted_proxies = []              # sources allowed to send PROXY headers (required when proxy_protocol = true)

[[listener]]
port = 9878
locator = "fix"                   # Logon (35=A) tag value
fix_tag = 553

[ipsets]                          # named third-party ranges (brokers, trading tools) that keys can bind to
broker-a = ["203.0.113.0/24", "2001:db8:aa::/48"]

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7", "2001:db8::/48"]   # hosts or CIDRs, IPv4 and IPv6; host bits must be zero
ipsets = ["broker-a"]
locked = false
"#;

    fn spec() -> Policy {
        Policy::from_toml_str(SPEC_EXAMPLE).expect("SPEC example parses")
    }

    /// Parses `toml` (which must parse) and returns its validation errors as strings.
    fn errors(toml: &str) -> Vec<String> {
        let p = Policy::from_toml_str(toml).expect("parses");
        match p.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    fn parse_errors(toml: &str) -> Vec<String> {
        Policy::from_toml_str(toml)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn key(prefix: &str, allow: &[&str], ipsets: &[&str]) -> Key {
        Key {
            prefix: prefix.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ipsets: ipsets.iter().map(|s| s.to_string()).collect(),
            locked: false,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        }
    }

    #[test]
    fn spec_example_parses_and_validates() {
        let p = spec();
        assert_eq!(p.revision, Some(7));
        assert_eq!(p.settings, Settings::default());
        assert_eq!(p.listener.len(), 3);
        assert_eq!(p.listener[0].locator, Locator::TlsSni);
        assert_eq!(p.listener[0].label_prefix.as_deref(), Some("k-"));
        assert_eq!(p.listener[1].headers[3], "API-Key");
        assert_eq!(p.listener[2].fix_tag, Some(553));
        assert_eq!(p.ipsets["broker-a"].len(), 2);
        assert_eq!(
            p.key[0],
            key(
                "37c541a1",
                &["198.51.100.7", "2001:db8::/48"],
                &["broker-a"]
            )
        );
        p.validate().expect("SPEC example validates");
    }

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
        let p = spec();
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
    fn settings_errors() {
        assert_eq!(
            errors("[settings]\nkey_prefix_len = 3\n"),
            ["settings.key_prefix_len: must be 4..=16, got 3"]
        );
        assert!(errors("[settings]\nkey_prefix_len = 16\n").is_empty());
    }

    #[test]
    fn key_prefix_errors() {
        let e = errors(
            r#"
[[key]]
prefix = "37c541a"
[[key]]
prefix = "37c5 1a1"
[[key]]
prefix = "37c541a1"
[[key]]
prefix = "abcdefgh"
[[key]]
prefix = "37c541a1"
"#,
        );
        assert_eq!(
            e,
            [
                r#"key[0].prefix: must be exactly 8 bytes (settings.key_prefix_len), got 7 in "37c541a""#,
                r#"key[1].prefix: "37c5 1a1" must be printable ASCII without spaces"#,
                r#"key[4].prefix: duplicate key prefix "37c541a1" (also key[2])"#,
            ]
        );
    }

    #[test]
    fn address_errors() {
        let e = errors(
            r#"
[ipsets]
broker-a = ["203.0.113.0/24", "203.0.113.1/24", "2001:db8::/129"]
[[key]]
prefix = "37c541a1"
allow = ["10.0.0.0/8", "10.0.0.1/8", "10.0.0.300", "10.0.0.0/+8", "::1", "2001:db8::1/48", "1.2.3.4/33"]
"#,
        );
        assert_eq!(
            e,
            [
                "ipsets.broker-a[1]: host bits set in 203.0.113.1/24",
                "ipsets.broker-a[2]: prefix length /129 out of range for IPv6 (0..=128) in 2001:db8::/129",
                "key[0].allow[1]: host bits set in 10.0.0.1/8",
                r#"key[0].allow[2]: not an IPv4 or IPv6 address or CIDR: "10.0.0.300""#,
                r#"key[0].allow[3]: invalid prefix length in "10.0.0.0/+8""#,
                "key[0].allow[5]: host bits set in 2001:db8::1/48",
                "key[0].allow[6]: prefix length /33 out of range for IPv4 (0..=32) in 1.2.3.4/33",
            ]
        );
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), (4, 0, [0; 16]));
        assert!(parse_cidr("10.128.0.0/9").is_ok());
        assert!(parse_cidr("10.192.0.0/9").is_err());
    }

    #[test]
    fn ipset_reference_errors() {
        let e = errors(
            r#"
[ipsets]
a = []
b = []
c = []
d = []
"bad name" = []
[[key]]
prefix = "37c541a1"
ipsets = ["a", "x", "a"]
[[key]]
prefix = "37c541a2"
ipsets = ["a", "b", "c", "d"]
"#,
        );
        assert_eq!(
            e,
            [
                r#"ipsets.bad name: invalid ipset name "bad name": use 1 to 64 of A-Z a-z 0-9 _ . -"#,
                r#"key[0].ipsets[1]: unknown ipset "x""#,
                r#"key[0].ipsets[2]: duplicate ipset "a" (also ipsets[0])"#,
                "key[1].ipsets: 4 ipsets; at most 3 per key (the kernel key record has 4 \
                 address-set slots, one kept for the key's own CIDRs and IPv6 hosts)",
            ]
        );
    }

    #[test]
    fn prefix_length_limits() {
        let v4: Vec<String> = (16..=24).map(|p| format!("\"10.0.0.0/{p}\"")).collect();
        let v6: Vec<String> = (40..=48).map(|p| format!("\"2001:db8::/{p}\"")).collect();
        let e = errors(&format!(
            "[ipsets]\nwide = [{}]\n[[key]]\nprefix = \"37c541a1\"\nallow = [{}]\n",
            v4.join(", "),
            v6.join(", ")
        ));
        assert_eq!(
            e,
            [
                "ipsets.wide: 9 distinct IPv4 prefix lengths (/16 /17 /18 /19 /20 /21 /22 /23 /24); at most 8 per address set",
                "key[0].allow: 9 distinct IPv6 prefix lengths (/40 /41 /42 /43 /44 /45 /46 /47 /48); at most 8 per address set",
            ]
        );
        // Hosts that ride inline are not in the key's own set, so /32 does not count there...
        let mut own: Vec<String> = (17..=24).map(|p| format!("\"10.0.0.0/{p}\"")).collect();
        own.extend((1..=4).map(|i| format!("\"192.0.2.{i}\"")));
        let toml = format!(
            "[[key]]\nprefix = \"37c541a1\"\nallow = [{}]\n",
            own.join(", ")
        );
        assert!(errors(&toml).is_empty());
        // ...until a fifth host spills into it.
        own.push("\"192.0.2.5\"".into());
        let toml = format!(
            "[[key]]\nprefix = \"37c541a1\"\nallow = [{}]\n",
            own.join(", ")
        );
        assert_eq!(errors(&toml).len(), 1);
    }

    #[test]
    fn listener_errors() {
        let e = errors(
            r#"
[[listener]]
port = 0
locator = "fix"
fix_tag = 0
[[listener]]
port = 8080
locator = "http-header"
headers = ["X-Key", "x-key", "Bad Name", "", "A-Very-Long-Header-Name-X"]
proxy_protocol = true
[[listener]]
port = 8080
locator = "http-header"
proxy_protocol = true
trusted_proxies = ["10.0.0.0/8", "10.0.0.1/8"]
fix_tag = 553
[[listener]]
port = 443
locator = "tls-sni"
sni_suffix = "api.example.com"
label_prefix = "much-too-long-prefix"
[[listener]]
port = 444
locator = "tls-sni"
headers = ["X-Key"]
[[listener]]
port = 9878
locator = "fix"
proxy_protocol = true
trusted_proxies = ["10.0.0.0/8"]
sni_suffix = ".x.com"
"#,
        );
        assert_eq!(
            e,
            [
                "listener[0].port: must be 1..=65535, got 0",
                "listener[0].fix_tag: must be 1..=9999, got 0",
                "listener[1].headers: an http-header listener needs 1 to 4 header names, got 5",
                r#"listener[1].headers[1]: duplicate header "x-key" (also headers[0])"#,
                r#"listener[1].headers[2]: "Bad Name" is not a header name of 1 to 23 letters, digits or !#$%&'*+-.^_`|~"#,
                r#"listener[1].headers[3]: "" is not a header name of 1 to 23 letters, digits or !#$%&'*+-.^_`|~"#,
                r#"listener[1].headers[4]: "A-Very-Long-Header-Name-X" is not a header name of 1 to 23 letters, digits or !#$%&'*+-.^_`|~"#,
                "listener[1].trusted_proxies: required when proxy_protocol = true",
                "listener[2].port: duplicate port 8080 (also listener[1])",
                "listener[2].headers: an http-header listener needs 1 to 4 header names, got 0",
                "listener[2].trusted_proxies[1]: host bits set in 10.0.0.1/8",
                "listener[2].fix_tag: only for fix listeners (this one is http-header)",
                r#"listener[3].sni_suffix: "api.example.com" must be a domain suffix starting with '.', e.g. ".api.example.com""#,
                r#"listener[3].label_prefix: "much-too-long-prefix" must be at most 16 letters, digits or '-'"#,
                "listener[4].headers: only for http-header listeners (this one is tls-sni)",
                r#"listener[4].sni_suffix: a tls-sni listener needs sni_suffix, e.g. ".api.example.com""#,
                "listener[5].proxy_protocol: only for http-header listeners (this one is fix)",
                "listener[5].sni_suffix: only for tls-sni listeners (this one is fix)",
                "listener[5].fix_tag: a fix listener needs fix_tag (553 Username, 49 SenderCompID)",
            ]
        );
    }

    #[test]
    fn compiles_settings() {
        let c = spec().compile().unwrap();
        assert_eq!(
            c.settings,
            kernel::Settings {
                generation: 0,
                flags: kernel::SETTING_LOADED
                    | kernel::SETTING_ENFORCE
                    | kernel::SETTING_UNKNOWN_KEY_DROP
                    | kernel::SETTING_PREFILTER,
                key_prefix_len: 8,
                ..Default::default()
            }
        );
        let mut p = spec();
        p.settings = Settings {
            enforce: false,
            key_prefix_len: 6,
            unknown_key: Verdict::Pass,
            no_key: Verdict::Drop,
            unbound_keys: Verdict::Drop,
            prefilter: false,
            action: Action::Reset,
            idle_lock_after: None,
            shared_key: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        };
        p.key.clear();
        let s = p.compile().unwrap().settings;
        assert_eq!(
            s.flags,
            kernel::SETTING_LOADED
                | kernel::SETTING_NO_KEY_DROP
                | kernel::SETTING_UNBOUND_DROP
                | kernel::SETTING_ACTION_RESET
        );
        assert_eq!(s.key_prefix_len, 6);
    }

    #[test]
    fn prefilter_stays_off_while_a_key_passes_from_anywhere() {
        let mut p = spec();
        p.key.push(key("00000000", &[], &[]));
        let flags = |p: &Policy| p.compile().unwrap().settings.flags;
        assert_eq!(flags(&p) & kernel::SETTING_PREFILTER, 0);
        p.key[1].locked = true;
        assert_ne!(flags(&p) & kernel::SETTING_PREFILTER, 0);
        // A lock that ends on its own ends without a write: the key is open already.
        p.key[1].locked_until = Some("2030-01-01T00:00:00Z".into());
        assert_eq!(flags(&p) & kernel::SETTING_PREFILTER, 0);
        p.key[1].locked_until = None;
        p.key[1].locked = false;
        p.settings.unbound_keys = Verdict::Drop;
        assert_ne!(flags(&p) & kernel::SETTING_PREFILTER, 0);
    }

    #[test]
    fn compiles_listeners() {
        let c = spec().compile().unwrap();
        let http = &c.listeners[&8080];
        assert_eq!(http.locator, kernel::LOCATOR_HTTP_HEADER);
        assert_eq!(http.n_headers, 4);
        assert_eq!(http.flags, 0);
        let name = b"x\x0dmbx\x0dapikey:";
        assert_eq!(&http.header_names[1][..name.len()], name);
        assert!(http.header_names[1][name.len()..].iter().all(|&b| b == 0));
        let mut fold = [0u8; kernel::MAX_HEADER_NAME];
        fold[..12].copy_from_slice(&[
            0x20, 0, 0x20, 0x20, 0x20, 0, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
        ]);
        assert_eq!(http.header_fold[1], fold);
        let mut mask = [0u8; kernel::MAX_HEADER_NAME];
        mask[..13].fill(0xff);
        mask[1] = DASH_MASK;
        mask[5] = DASH_MASK;
        assert_eq!(http.header_mask[1], mask);
        assert_eq!(&http.header_names[3][..8], b"api\x0dkey:");
        assert_eq!(http.header_len, [14, 13, 14, 8]);

        let sni = &c.listeners[&443];
        assert_eq!((sni.locator, sni.n_headers), (kernel::LOCATOR_TLS_SNI, 0));
        assert_eq!(
            sni.header_len,
            [0; kernel::MAX_HEADERS],
            "no header slots used"
        );
        assert_eq!(sni.sni_suffix_len, 16);
        assert_eq!(&sni.sni_suffix[..17], b".api.example.com\0");
        assert_eq!(sni.label_prefix_len, 2);
        assert_eq!(&sni.label_prefix[..3], b"k-\0");
        assert_eq!(sni.proxy_set, 0, "the loader fills in set ids");
        assert!(c.proxy_sets.is_empty());

        let fix = &c.listeners[&9878];
        assert_eq!((fix.locator, fix.fix_tag), (kernel::LOCATOR_FIX, 553));

        let mut p = spec();
        p.listener[1].proxy_protocol = true;
        p.listener[1].trusted_proxies = vec!["10.0.0.0/8".into()];
        let c = p.compile().unwrap();
        assert_eq!(c.listeners[&8080].flags, kernel::LISTENER_PROXY_PROTOCOL);
        let mut ten = [0u8; 16];
        ten[0] = 10;
        assert_eq!(
            c.proxy_sets,
            BTreeMap::from([(8080, SetContent::from([(kernel::FAMILY_V4, 8, ten)]))])
        );
    }

    #[test]
    fn sni_names_are_lower_cased_and_bounded() {
        let mut p = spec();
        p.listener[0].sni_suffix = Some(".API.Example.COM".into());
        p.listener[0].label_prefix = Some("Key-".into());
        let c = p.compile().unwrap();
        let l = &c.listeners[&443];
        assert_eq!(
            &l.sni_suffix[..l.sni_suffix_len as usize],
            b".api.example.com"
        );
        assert_eq!(&l.label_prefix[..l.label_prefix_len as usize], b"key-");

        // An empty label prefix is fine: the whole label is the key.
        p.listener[0].label_prefix = None;
        assert_eq!(p.compile().unwrap().listeners[&443].label_prefix_len, 0);
        p.listener[0].label_prefix = Some(String::new());
        assert!(p.validate().is_ok());

        // 64 bytes fit, 65 do not.
        let long = |n: usize| format!(".{}.com", "a".repeat(n - 5));
        p.listener[0].sni_suffix = Some(long(64));
        assert_eq!(p.compile().unwrap().listeners[&443].sni_suffix_len, 64);
        p.listener[0].sni_suffix = Some(long(65));
        let e = p.validate().unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].at, "listener[0].sni_suffix");
        assert!(
            e[0].message.ends_with("is 65 bytes; at most 64"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn trusted_proxies_need_proxy_protocol_and_few_prefix_lengths() {
        let mut p = spec();
        p.listener[1].trusted_proxies = vec!["10.0.0.0/8".into()];
        let e: Vec<String> = p
            .validate()
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            e,
            ["listener[1].trusted_proxies: only with proxy_protocol = true"]
        );
        p.listener[1].proxy_protocol = true;
        p.listener[1].trusted_proxies = (16..=24).map(|l| format!("10.0.0.0/{l}")).collect();
        let e = p.validate().unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].at, "listener[1].trusted_proxies");
        // Two listeners with the same proxies compile to equal sets (the loader shares them).
        p.listener[1].trusted_proxies = vec!["10.0.0.0/8".into(), "2001:db8:1::/64".into()];
        p.listener.push(Listener {
            port: 8081,
            ..p.listener[1].clone()
        });
        let c = p.compile().unwrap();
        assert_eq!(c.proxy_sets[&8080], c.proxy_sets[&8081]);
        assert_eq!(c.proxy_sets[&8080].len(), 2);
    }

    #[test]
    fn compiles_keys() {
        let mut p = spec();
        p.key.push(key(
            "0123abcd",
            &[
                "192.0.2.1",
                "192.0.2.0/24",
                "192.0.2.2/32",
                "192.0.2.1",
                "192.0.2.3",
                "192.0.2.4",
                "192.0.2.5",
                "::1",
            ],
            &[],
        ));
        p.key.push(key("unbound1", &[], &[]));
        p.key.push(Key {
            locked: true,
            ..key("locked01", &["192.0.2.9"], &[])
        });
        let c = p.compile().unwrap();

        let spec_key = &c.keys[&key_prefix("37c541a1")];
        assert_eq!(spec_key.flags, kernel::KEY_PRESENT | kernel::KEY_BOUND);
        assert_eq!(spec_key.inline_v4, [u32::from_ne_bytes([198, 51, 100, 7])]);
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(
            spec_key.own_set,
            Some(SetContent::from([(kernel::FAMILY_V6, 48, v6)]))
        );
        assert_eq!(spec_key.ipsets, ["broker-a"]);

        // First four distinct IPv4 hosts inline; the fifth, the CIDR and IPv6 go to the set.
        let k = &c.keys[&key_prefix("0123abcd")];
        let host = |d: u8| u32::from_ne_bytes([192, 0, 2, d]);
        assert_eq!(k.inline_v4, [host(1), host(2), host(3), host(4)]);
        let v4 = |d: u8, plen: u8| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[192, 0, 2, d]);
            (kernel::FAMILY_V4, plen, a)
        };
        let mut lo = [0u8; 16];
        lo[15] = 1;
        assert_eq!(
            k.own_set,
            Some(SetContent::from([
                v4(0, 24),
                v4(5, 32),
                (kernel::FAMILY_V6, 128, lo)
            ]))
        );

        let unbound = &c.keys[&key_prefix("unbound1")];
        assert_eq!(
            (unbound.flags, unbound.own_set.is_none()),
            (kernel::KEY_PRESENT, true)
        );
        let locked = &c.keys[&key_prefix("locked01")];
        assert_eq!(
            locked.flags,
            kernel::KEY_PRESENT | kernel::KEY_LOCKED | kernel::KEY_BOUND
        );
        assert_eq!(locked.own_set, None);

        assert_eq!(&key_prefix("37c541a1").bytes[..9], b"37c541a1\0");
        let mut a = [0u8; 16];
        a[..3].copy_from_slice(&[203, 0, 113]);
        assert!(c.ipsets["broker-a"].contains(&(kernel::FAMILY_V4, 24, a)));
    }

    #[test]
    fn compile_refuses_invalid_policies() {
        let mut p = spec();
        p.key[0].allow.push("10.0.0.1/8".into());
        let e = p.compile().unwrap_err();
        assert_eq!(
            e,
            [PolicyError::new(
                "key[0].allow[2]",
                "host bits set in 10.0.0.1/8"
            )]
        );
    }

    #[test]
    fn patch_parses_from_json() {
        let patch = Patch::from_json_str(
            r#"{"revision": 8, "ops": [
                {"op": "upsert", "key": {"prefix": "0123abcd", "allow": ["192.0.2.1"]}},
                {"op": "delete", "prefix": "37c541a1"},
                {"op": "lock", "prefix": "x"},
                {"op": "unlock", "prefix": "x"},
                {"op": "set_ipset", "name": "b", "cidrs": ["192.0.2.0/24"]},
                {"op": "delete_ipset", "name": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(patch.revision, 8);
        assert_eq!(
            patch.ops[1],
            PatchOp::Delete {
                prefix: "37c541a1".into()
            }
        );
        assert_eq!(
            patch.ops[4],
            PatchOp::SetIpset {
                name: "b".into(),
                cidrs: vec!["192.0.2.0/24".into()]
            }
        );
        let json = serde_json::to_string(&patch).unwrap();
        assert_eq!(Patch::from_json_str(&json).unwrap(), patch);

        let e = Patch::from_json_str(
            r#"{"revision": 8, "ops": [
                {"op": "lock", "prefix": "x"},
                {"op": "upsert", "key": {"prefix": "0123abcd", "allow": [1]}},
                {"op": "frobnicate"},
                {"op": "delete"},
                {"op": "delete", "prefix": "x", "extra": 1}]}"#,
        )
        .unwrap_err();
        let at: Vec<&str> = e.iter().map(|e| e.at.as_str()).collect();
        assert_eq!(
            at,
            ["ops[1].key.allow[0]", "ops[2].op", "ops[3]", "ops[4].extra"],
            "{e:?}"
        );
        assert_eq!(e[2].message, "missing field `prefix`");

        // Missing fields are reported by the object that lacks them, at every depth.
        let e = Patch::from_json_str(
            r#"{"ops": [{"op": "upsert", "key": {"allow": []}}, {"op": "set_ipset", "name": "a"}]}"#,
        )
        .unwrap_err();
        let shown: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "ops[0].key: missing field `prefix`",
                "ops[1]: missing field `cidrs`",
                "missing field `revision`",
            ]
        );
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

    #[test]
    fn patch_applies_ops_in_order() {
        let p = spec();
        let patch = Patch {
            revision: 8,
            ops: vec![
                PatchOp::Upsert {
                    key: key("0123abcd", &["192.0.2.1"], &[]),
                },
                PatchOp::Lock {
                    prefix: "0123abcd".into(),
                    lock_reason: None,
                    locked_until: None,
                },
                PatchOp::Upsert {
                    key: key("37c541a1", &["198.51.100.8"], &["tools"]),
                },
                PatchOp::SetIpset {
                    name: "tools".into(),
                    cidrs: vec!["192.0.2.128/25".into()],
                },
                PatchOp::Unlock {
                    prefix: "37c541a1".into(),
                },
                PatchOp::DeleteIpset {
                    name: "broker-a".into(),
                },
            ],
        };
        let next = p.apply_patch(&patch).unwrap();
        assert_eq!(next.revision, Some(8));
        assert_eq!(next.key.len(), 2);
        assert_eq!(next.key[0], key("37c541a1", &["198.51.100.8"], &["tools"]));
        assert!(next.key[1].locked);
        assert_eq!(next.ipsets.keys().collect::<Vec<_>>(), ["tools"]);
        // The original is untouched.
        assert_eq!(p, spec());

        let next = next
            .apply_patch(&Patch {
                revision: 9,
                ops: vec![PatchOp::Delete {
                    prefix: "0123abcd".into(),
                }],
            })
            .unwrap();
        assert_eq!(next.key.len(), 1);
    }

    #[test]
    fn lock_fields_validate_compile_and_round_trip() {
        let toml = r#"
[settings]
idle_lock_after = "14d"
shared_key = { networks = 3, window = "1h", action = "lock" }

[[key]]
prefix = "aaaaaaaa"
locked = true
lock_reason = "leaked on a forum"
locked_until = "2026-12-01T09:00:00+01:00"
"#;
        let p = Policy::from_toml_str(toml).expect("parses");
        let c = p.compile().expect("valid");
        let k = &c.keys[&key_prefix("aaaaaaaa")];
        assert_eq!(k.locked_until, Some(1_796_112_000));
        assert_ne!(k.flags & kernel::KEY_LOCKED, 0);
        assert_eq!(p.settings.idle_lock_after_s(), Some(14 * 86_400));
        assert_eq!(
            p.settings.shared_key.as_ref().unwrap().action,
            SharedAction::Lock
        );
        // JSON (API, etcd) and TOML carry the same names.
        let j = serde_json::to_string(&p).unwrap();
        assert!(j.contains(r#""lock_reason":"leaked on a forum""#), "{j}");
        assert!(j.contains(r#""idle_lock_after":"14d""#), "{j}");
        assert_eq!(Policy::from_json_str(&j).unwrap(), p);
        // A lock that ends on its own still counts as one, until then.
        let key = p.find_key("aaaaaaaa").unwrap();
        assert!(key.locked_at(1_796_111_999));
        assert!(!key.locked_at(1_796_112_000));
        assert!(!key.locked_for_good());
        // Unlocked keys and settings without the fields serialize as before.
        assert!(
            !serde_json::to_string(&spec())
                .unwrap()
                .contains("lock_reason")
        );
    }

    #[test]
    fn risk_errors_name_their_place() {
        let got = errors(
            r#"
[settings]
idle_lock_after = "2w"
shared_key = { networks = 9, window = "30d" }

[[key]]
prefix = "aaaaaaaa"
lock_reason = "no lock"

[[key]]
prefix = "bbbbbbbb"
locked = true
locked_until = "tomorrow"

[[key]]
prefix = "cccccccc"
locked = true
lock_reason = "two\nlines"
"#,
        );
        let places: Vec<&str> = got.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(
            places,
            [
                "settings.idle_lock_after",
                "settings.shared_key.networks",
                "settings.shared_key.window",
                "key[0].lock_reason",
                "key[1].locked_until",
                "key[2].lock_reason",
            ],
            "{got:#?}"
        );
        assert!(errors("[settings]\nidle_lock_after = \"1s\"\n")[0].contains("shorter than 5s"));
    }

    #[test]
    fn rate_limits_parse_default_and_override() {
        let p = Policy::from_toml_str(
            r#"
[settings]
max_requests_per_s = 10
max_new_connections_per_s = { rate = 2, burst = 5 }

[[key]]
prefix = "aaaaaaaa"

[[key]]
prefix = "bbbbbbbb"
max_requests_per_s = { rate = 100, burst = 200 }
max_new_connections_per_s = 0
"#,
        )
        .unwrap();
        let c = p.compile().unwrap();
        let a = c.keys[&key_prefix("aaaaaaaa")].rate.unwrap();
        assert_eq!((a.req_t, a.req_tau), (100_000_000, 900_000_000));
        assert_eq!((a.conn_t, a.conn_tau), (500_000_000, 2_000_000_000));
        let b = c.keys[&key_prefix("bbbbbbbb")].rate.unwrap();
        assert_eq!((b.req_t, b.req_tau), (10_000_000, 1_990_000_000));
        assert_eq!(b.conn_t, 0, "0 turns the default off for this key");
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(Policy::from_json_str(&j).unwrap(), p);
        let got = errors(
            "[settings]\nmax_requests_per_s = 2000000\n[[key]]\nprefix = \"cccccccc\"\nmax_new_connections_per_s = { rate = 5, burst = 0 }\n",
        );
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("settings.max_requests_per_s: rate 2000000"),
            "{got:?}"
        );
        assert!(
            got[1].starts_with("key[0].max_new_connections_per_s: burst"),
            "{got:?}"
        );
        // GCRA: a burst, then one per interval.
        let (t, tau) = RateLimit::Burst(RateBurst { rate: 2, burst: 3 })
            .gcra()
            .unwrap();
        let mut tat = 0;
        let mut passed = 0;
        for _ in 0..10 {
            if let Some(n) = kernel::gcra(t, tau, tat, 1_000) {
                tat = n;
                passed += 1;
            }
        }
        assert_eq!(passed, 3);
        assert!(kernel::gcra(t, tau, tat, 1_000 + t).is_some());
    }

    #[test]
    fn lock_ops_carry_reason_and_expiry() {
        let p = spec();
        let req = PatchRequest::from_json_str(
            r#"{"ops":[{"op":"lock","prefix":"37c541a1","lock_reason":"shared","locked_until":"2026-12-01T08:00:00Z"}]}"#,
        )
        .unwrap();
        let next = p
            .apply_patch(&Patch {
                revision: 8,
                ops: req.ops.clone(),
            })
            .unwrap();
        let k = next.find_key("37c541a1").unwrap();
        assert!(k.locked);
        assert_eq!(k.lock_reason.as_deref(), Some("shared"));
        assert_eq!(k.locked_until.as_deref(), Some("2026-12-01T08:00:00Z"));
        assert!(k.lock_is(true, Some("shared"), Some("2026-12-01T08:00:00Z")));
        // A plain lock replaces both; an unlock clears them.
        let mut k2 = k.clone();
        k2.set_lock(true, None, None);
        assert_eq!((k2.lock_reason, k2.locked_until), (None, None));
        let unlocked = next
            .apply_patch(&Patch {
                revision: 9,
                ops: vec![PatchOp::Unlock {
                    prefix: "37c541a1".into(),
                }],
            })
            .unwrap();
        let k = unlocked.find_key("37c541a1").unwrap();
        assert!(!k.locked && k.lock_reason.is_none() && k.locked_until.is_none());
        // Bad fields are the op's, at the op.
        let errs = p
            .apply_patch(&Patch {
                revision: 8,
                ops: vec![PatchOp::Lock {
                    prefix: "37c541a1".into(),
                    lock_reason: None,
                    locked_until: Some("2026-02-30T00:00:00Z".into()),
                }],
            })
            .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].at, "ops[0].locked_until");
    }

    #[test]
    fn patch_is_all_or_nothing_and_places_errors_at_ops() {
        let p = spec();
        let patch = Patch {
            revision: 8,
            ops: vec![
                PatchOp::Upsert {
                    key: key("0123abcd", &["192.0.2.1"], &[]),
                },
                PatchOp::Delete {
                    prefix: "nope0000".into(),
                },
                PatchOp::Upsert {
                    key: key("37c541a1", &["10.0.0.1/8"], &["ghost"]),
                },
                PatchOp::Lock {
                    prefix: "nope0001".into(),
                    lock_reason: None,
                    locked_until: None,
                },
                PatchOp::SetIpset {
                    name: "tools".into(),
                    cidrs: vec!["1.2.3.4".into(), "1.2.3.4/16".into()],
                },
                PatchOp::DeleteIpset {
                    name: "nope".into(),
                },
                PatchOp::Upsert {
                    key: key("short", &[], &[]),
                },
            ],
        };
        let e: Vec<String> = p
            .apply_patch(&patch)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            e,
            [
                r#"ops[1].prefix: no key with prefix "nope0000""#,
                r#"ops[3].prefix: no key with prefix "nope0001""#,
                r#"ops[5].name: no ipset "nope""#,
                "ops[4].cidrs[1]: host bits set in 1.2.3.4/16",
                "ops[2].key.allow[0]: host bits set in 10.0.0.1/8",
                r#"ops[2].key.ipsets[0]: unknown ipset "ghost""#,
                r#"ops[6].key.prefix: must be exactly 8 bytes (settings.key_prefix_len), got 5 in "short""#,
            ]
        );
        assert_eq!(p, spec());
    }

    #[test]
    fn patch_refuses_to_delete_an_ipset_in_use() {
        let p = spec();
        let delete = PatchOp::DeleteIpset {
            name: "broker-a".into(),
        };
        let e = p
            .apply_patch(&Patch {
                revision: 8,
                ops: vec![delete.clone()],
            })
            .unwrap_err();
        assert_eq!(
            e,
            [PolicyError::new(
                "ops[0].name",
                r#"ipset "broker-a" is still used by key "37c541a1""#
            )]
        );
        // Fine once the key lets go of it, or when the set comes back later in the same patch.
        let release = PatchOp::Upsert {
            key: key("37c541a1", &["198.51.100.7"], &[]),
        };
        assert!(
            p.apply_patch(&Patch {
                revision: 8,
                ops: vec![delete.clone(), release]
            })
            .is_ok()
        );
        let again = PatchOp::SetIpset {
            name: "broker-a".into(),
            cidrs: vec![],
        };
        assert!(
            p.apply_patch(&Patch {
                revision: 8,
                ops: vec![delete, again]
            })
            .is_ok()
        );
    }
}
