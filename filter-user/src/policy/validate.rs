//! The checks a policy must pass, each error with its place. Validation and compilation are
//! one pass (`compile.rs` calls these as it goes), so what `policy check` accepts is exactly
//! what the loader can write.

use super::*;

impl Policy {
    /// Checks everything; returns every error, each with its place.
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        self.compile().map(|_| ())
    }
}

impl RateLimit {
    pub(super) fn check(self, at: &str, errs: &mut Vec<PolicyError>) {
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

pub(super) const KEY_PREFIX_LENS: std::ops::RangeInclusive<u8> = 4..=kernel::MAX_PREFIX_LEN as u8;
/// One set slot of the key record is kept for the key's own CIDRs and IPv6 hosts.
pub(super) const MAX_KEY_IPSETS: usize = kernel::MAX_SETS - 1;
pub(super) const MAX_HEADER_LEN: usize = kernel::MAX_HEADER_NAME - 1; // the colon takes one byte

/// The kernel probes each prefix length of a set in turn, up to `MAX_PLENS` per family.
pub(super) fn check_plens(set: &SetContent, at: &dyn fmt::Display, errs: &mut Vec<PolicyError>) {
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
pub(super) struct KeyAt(pub(super) usize);

impl fmt::Display for KeyAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key[{}]", self.0)
    }
}

/// RFC 9110 token characters.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(super) fn is_sni_suffix(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{errors, example};

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
            !serde_json::to_string(&example())
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
}
