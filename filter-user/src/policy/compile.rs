//! Compilation to kernel records (`filter_common`'s layouts): settings, listeners (header
//! names, SNI suffix, FIX tag, PROXY sources), ipsets and keys.

use super::*;

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

impl Policy {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{errors, example, key};

    #[test]
    fn compiles_settings() {
        let c = example().compile().unwrap();
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
        let mut p = example();
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
        let mut p = example();
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
        let c = example().compile().unwrap();
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

        let mut p = example();
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
        let mut p = example();
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
        let mut p = example();
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
        let mut p = example();
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
        let mut p = example();
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
}
