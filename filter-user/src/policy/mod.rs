//! The policy model (docs/REFERENCE.md "Policy"): the types here, and beside them
//! `parse.rs` (TOML and JSON, errors placed), `validate.rs` (the checks), `compile.rs` (kernel
//! records) and `patch.rs` (the PATCH operations of the control-plane API).
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

mod compile;
mod parse;
mod patch;
mod validate;

pub use compile::*;
pub use parse::*;
pub use patch::*;
pub use validate::*;

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

impl Policy {
    /// The key with this prefix, if any.
    pub fn find_key(&self, prefix: &str) -> Option<&Key> {
        self.key.iter().find(|k| k.prefix == prefix)
    }

    fn key_index(&self, prefix: &str) -> Option<usize> {
        self.key.iter().position(|k| k.prefix == prefix)
    }
}

/// One network: family (`FAMILY_V4`/`FAMILY_V6`), prefix length, address in network byte
/// order (IPv4 in the first 4 bytes) with host bits zero.
pub type Cidr = (u8, u8, [u8; 16]);
/// The contents of one address set (a key's own entries, or one ipset).
pub type SetContent = BTreeSet<Cidr>;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// docs/REFERENCE.md's example, verbatim.
    pub(crate) const REFERENCE_EXAMPLE: &str = r#"
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

    pub(crate) fn example() -> Policy {
        Policy::from_toml_str(REFERENCE_EXAMPLE).expect("REFERENCE.md's example parses")
    }

    /// Parses `toml` (which must parse) and returns its validation errors as strings.
    pub(crate) fn errors(toml: &str) -> Vec<String> {
        let p = Policy::from_toml_str(toml).expect("parses");
        match p.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    pub(crate) fn parse_errors(toml: &str) -> Vec<String> {
        Policy::from_toml_str(toml)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    pub(crate) fn key(prefix: &str, allow: &[&str], ipsets: &[&str]) -> Key {
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
    fn reference_example_parses_and_validates() {
        let p = example();
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
        p.validate().expect("REFERENCE.md's example validates");
    }
}
