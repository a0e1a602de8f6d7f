//! The TLS-SNI and FIX locators, PROXY protocol headers and the reset action, through
//! BPF_PROG_TEST_RUN: allowed, disallowed, locked and unknown keys; ClientHellos across two
//! segments; every truncation and random mutations of the key-bearing segment never pass a
//! disallowed source; refused segments answered with a valid RST.

use std::net::IpAddr;

use filter_common::Reason::{self, *};
use tests::{
    harness::{Loaded, XDP_DROP, XDP_PASS, XDP_TX},
    packet::{
        ClientHello, PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_UNIQUE_ID, Pkt, ProxiedConn,
        TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, checksum, fix_logon, fix_message,
        http_request, proxy_v1, proxy_v2,
    },
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const ALLOWED4: [u8; 4] = [198, 51, 100, 7];
/// Far from ALLOWED4 in text and in bits, so a one- or two-byte mutation cannot turn one
/// into the other.
const OTHER4: [u8; 4] = [203, 0, 113, 45];
const PROXY4: [u8; 4] = [10, 9, 0, 5];
const EDGE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xee, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
const ALLOWED6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const OTHER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const PROXY6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5,
];

const SNI_PORT: u16 = 443;
const FIX_553: u16 = 9878;
const FIX_49: u16 = 9879;
const PROXY_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8090;

const POLICY: &str = r#"
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = false

[[listener]]
port = 443
locator = "tls-sni"
sni_suffix = ".api.example.com"
label_prefix = "k-"

[[listener]]
port = 9878
locator = "fix"
fix_tag = 553

[[listener]]
port = 9879
locator = "fix"
fix_tag = 49

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["10.9.0.0/16", "2001:db8:ffff::/48"]

[[listener]]
port = 8090
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7", "2001:db8::/48"]

[[key]]
prefix = "lockedk1"
allow = ["198.51.100.7", "2001:db8::/48"]
locked = true

[[key]]
prefix = "proxyloc"
allow = ["10.9.0.5"]
"#;

fn reset_policy() -> String {
    POLICY.replace("prefilter = false", "prefilter = false\naction = \"reset\"")
}

/// Reasons that let a source's traffic through on the strength of a key.
fn passes_on_a_key(r: Reason) -> bool {
    matches!(r, PassAllowed | PassUnbound | PassUnknownKey | PassFlow)
}

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason, what: &str) {
    let (action, got, audit) = l.run(frame);
    assert_eq!(got, reason, "{what}");
    assert!(!audit, "{what}");
    let want = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
    assert_eq!(action, want, "action for {what}");
}

/// Deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A client port no earlier run of this test binary used, so each probe is a new connection.
fn fresh_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    assert!(n < 20_000, "out of fresh client ports");
    45_000 + n as u16 % 20_000
}

/// Every prefix of `payload` (one fresh connection each) from a source the key does not
/// allow: never passed on a key; once `decided_at` bytes are there, dropped.
fn truncations_fail_closed(
    l: &mut Loaded,
    pkt: impl Fn(u16) -> Pkt,
    payload: &[u8],
    decided_at: usize,
    what: &str,
) {
    for len in 1..=payload.len() {
        let f = pkt(fresh_port()).payload(&payload[..len]).build();
        let (action, r, _) = l.run(&f);
        assert!(
            !passes_on_a_key(r),
            "{what}: {len} of {} bytes passed as {r:?}",
            payload.len()
        );
        if len >= decided_at {
            assert!(r.is_drop(), "{what}: {len} bytes (key complete) got {r:?}");
            assert_eq!(action, XDP_DROP, "{what}: {len} bytes");
        }
    }
}

/// Random 1 to 3 byte mutations of `payload` (one fresh connection each) from a source the
/// key does not allow: never passed on a key.
fn mutations_fail_closed(
    l: &mut Loaded,
    pkt: impl Fn(u16) -> Pkt,
    payload: &[u8],
    seed: u64,
    what: &str,
) {
    let mut rng = Rng(seed);
    for i in 0..400 {
        let mut m = payload.to_vec();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(m.len());
            m[at] = match rng.below(4) {
                0 => 0,
                1 => m[at] ^ (1 << rng.below(8)),
                2 => b"\x01\r\n.=:"[rng.below(6)],
                _ => rng.next() as u8,
            };
        }
        let f = pkt(fresh_port()).payload(&m).build();
        let (_, r, _) = l.run(&f);
        assert!(!passes_on_a_key(r), "{what}: mutation {i} passed as {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// TLS SNI
// ---------------------------------------------------------------------------------------------

fn tls4(src: [u8; 4], sport: u16) -> Pkt {
    Pkt::tcp4(src, EDGE4, sport, SNI_PORT)
}

fn tls6(src: [u8; 16], sport: u16) -> Pkt {
    Pkt::tcp6(src, EDGE6, sport, SNI_PORT)
}

#[test]
fn sni_allowed_disallowed_locked_unknown_and_none() {
    let mut l = Loaded::new(POLICY).unwrap();
    let hello = |host: &str| ClientHello::new(host).record();
    let cases: [(&str, [u8; 4], Reason); 8] = [
        ("k-37c541a1.api.example.com", ALLOWED4, PassAllowed),
        ("k-37c541a1.api.example.com", OTHER4, DropNotAllowed),
        ("k-37c541a1deadbeef.api.example.com", ALLOWED4, PassAllowed),
        ("k-lockedk1.api.example.com", ALLOWED4, DropLocked),
        ("k-nosuchk1.api.example.com", ALLOWED4, DropUnknownKey),
        // A label shorter than a key prefix, and a key-like name under another suffix:
        // not judged.
        ("k-abc.api.example.com", ALLOWED4, DropMalformed),
        ("www.example.com", OTHER4, PassNoKey),
        ("k-37c541a1.api.example.org", OTHER4, DropMalformed),
    ];
    for (i, (host, src, want)) in cases.into_iter().enumerate() {
        let f = tls4(src, 30_000 + i as u16).payload(&hello(host)).build();
        expect(&mut l, &f, want, host);
    }
    let f = tls6(ALLOWED6, 30_100)
        .payload(&hello("k-37c541a1.api.example.com"))
        .build();
    expect(&mut l, &f, PassAllowed, "IPv6");
    let f = tls6(OTHER6, 30_101)
        .payload(&hello("k-37c541a1.api.example.com"))
        .build();
    expect(&mut l, &f, DropNotAllowed, "IPv6 other");
    let no_sni = ClientHello {
        sni: None,
        ..ClientHello::new("x")
    };
    let f = tls4(OTHER4, 30_102).payload(&no_sni.record()).build();
    expect(&mut l, &f, PassNoKey, "no server_name extension");
    // A refused connection stays refused.
    let f = tls4(OTHER4, 30_001)
        .payload(b"\x17\x03\x03\x00\x05hello")
        .build();
    expect(
        &mut l,
        &f,
        DropFlow,
        "later segment of a refused connection",
    );
    // With no_key = "drop", a hello without a key is refused.
    l.apply(&POLICY.replace("no_key = \"pass\"", "no_key = \"drop\""))
        .unwrap();
    let f = tls4(OTHER4, 30_103).payload(&no_sni.record()).build();
    expect(&mut l, &f, DropNoKey, "no_key = drop");
}

#[test]
fn sni_is_case_insensitive_and_survives_what_browsers_send() {
    let mut l = Loaded::new(POLICY).unwrap();
    for (i, host) in [
        "K-37C541A1.API.EXAMPLE.COM",
        "k-37c541a1.Api.Example.Com",
        "K-37c541A1.api.example.com",
    ]
    .into_iter()
    .enumerate()
    {
        let f = tls4(ALLOWED4, 31_000 + i as u16)
            .payload(&ClientHello::new(host).record())
            .build();
        expect(&mut l, &f, PassAllowed, host);
        let f = tls4(OTHER4, 31_000 + i as u16)
            .payload(&ClientHello::new(host).record())
            .build();
        expect(&mut l, &f, DropNotAllowed, host);
    }
    // GREASE, padding, a session ticket, any extension order; small enough for one segment.
    for seed in 1..=12u64 {
        let h = ClientHello {
            grease: true,
            padding: Some(16 * seed as usize),
            session_ticket: Some(if seed % 2 == 0 { 0 } else { 208 }),
            shuffle: Some(seed),
            ..ClientHello::new("k-37c541a1.api.example.com")
        };
        let rec = h.record();
        assert!(rec.len() < 1400);
        let f = tls4(ALLOWED4, 31_100 + seed as u16).payload(&rec).build();
        expect(&mut l, &f, PassAllowed, &format!("seed {seed}"));
        let f = tls4(OTHER4, 31_100 + seed as u16).payload(&rec).build();
        expect(&mut l, &f, DropNotAllowed, &format!("seed {seed}"));
    }
}

/// Runs `frames` as one connection; returns each segment's reason.
fn run_all(l: &mut Loaded, frames: &[Vec<u8>]) -> Vec<Reason> {
    frames.iter().map(|f| l.run(f).1).collect()
}

#[test]
fn sni_in_the_second_segment() {
    let mut l = Loaded::new(POLICY).unwrap();
    for seed in 1..=6u64 {
        let h = ClientHello {
            sni_last: seed % 2 == 1,
            ..ClientHello::chrome_like("k-37c541a1.api.example.com", seed)
        };
        let rec = h.record();
        assert!(rec.len() > 1500, "{} bytes", rec.len());
        let sni_at = h.sni_offset().unwrap();
        let sni_end = sni_at + "k-37c541a1.api.example.com".len();
        // A 1448-byte MSS (what Linux uses over 1500-byte Ethernet with timestamps).
        let cut = 1448;
        for (src, sport, want) in [
            (ALLOWED4, 32_000 + seed as u16, PassAllowed),
            (OTHER4, 32_000 + seed as u16, DropNotAllowed),
        ] {
            let segs = tls4(src, sport).seq(0xfffff000).segments(&rec, &[cut]);
            let got = run_all(&mut l, &segs);
            let what = format!("seed {seed}, SNI at {sni_at}..{sni_end}, {src:?}: {got:?}");
            if sni_end > cut {
                assert!(!got[0].is_drop() && !passes_on_a_key(got[0]), "{what}");
                assert_eq!(got[1], want, "{what}");
            } else {
                assert_eq!(got[0], want, "{what}");
            }
        }
    }
    // Cut anywhere around the server name (inside the extension header, inside the name).
    let h = ClientHello {
        sni_last: true,
        ..ClientHello::chrome_like("k-37c541a1.api.example.com", 3)
    };
    let rec = h.record();
    let sni_at = h.sni_offset().unwrap();
    for cut in sni_at - 12..sni_at + 28 {
        for (src, want) in [(ALLOWED4, PassAllowed), (OTHER4, DropNotAllowed)] {
            let sport = 33_000 + (cut + 12 - sni_at) as u16;
            let segs = tls4(src, sport).segments(&rec, &[cut]);
            let got = run_all(&mut l, &segs);
            assert!(got.contains(&want), "cut {cut} (SNI at {sni_at}): {got:?}");
            if want == DropNotAllowed {
                assert!(
                    !got.iter().any(|r| passes_on_a_key(*r)),
                    "cut {cut}: {got:?}"
                );
            } else {
                assert!(!got.iter().any(|r| r.is_drop()), "cut {cut}: {got:?}");
            }
        }
    }
    // Three segments, the name in the last.
    let segs = tls6(OTHER6, 33_500).segments(&rec, &[700, 1400]);
    let got = run_all(&mut l, &segs);
    assert!(got.contains(&DropNotAllowed), "{got:?}");
}

#[test]
fn sni_truncations_and_mutations_never_pass_a_disallowed_source() {
    let mut l = Loaded::new(POLICY).unwrap();
    let h = ClientHello {
        grease: true,
        session_ticket: Some(64),
        shuffle: Some(9),
        ..ClientHello::new("k-37c541a1.api.example.com")
    };
    let rec = h.record();
    let decided = h.sni_offset().unwrap() + "k-37c541a1.api.example.com".len();
    truncations_fail_closed(&mut l, |sp| tls4(OTHER4, sp), &rec, decided, "SNI v4");
    mutations_fail_closed(&mut l, |sp| tls4(OTHER4, sp), &rec, 0x5111, "SNI v4");
    truncations_fail_closed(&mut l, |sp| tls6(OTHER6, sp), &rec, decided, "SNI v6");
}

// ---------------------------------------------------------------------------------------------
// FIX
// ---------------------------------------------------------------------------------------------

fn fix4(src: [u8; 4], sport: u16, port: u16) -> Pkt {
    Pkt::tcp4(src, EDGE4, sport, port)
}

#[test]
fn fix_logon_allowed_disallowed_locked_unknown() {
    let mut l = Loaded::new(POLICY).unwrap();
    let mut sport = 34_000;
    for begin in ["FIX.4.2", "FIX.4.4", "FIXT.1.1"] {
        for (user, src, want) in [
            ("37c541a1deadbeef", ALLOWED4, PassAllowed),
            ("37c541a1deadbeef", OTHER4, DropNotAllowed),
            ("lockedk1xyz", ALLOWED4, DropLocked),
            ("nosuchk1xyz", ALLOWED4, DropUnknownKey),
            // Shorter than a key prefix: not a key this filter can judge.
            ("abc", ALLOWED4, DropMalformed),
        ] {
            sport += 1;
            let m = fix_logon(begin, "SENDER1", Some(user));
            let f = fix4(src, sport, FIX_553).payload(&m).build();
            expect(&mut l, &f, want, &format!("{begin} 553={user}"));
        }
        // Tag 49 on the other listener.
        sport += 1;
        let m = fix_logon(begin, "37c541a1-desk", None);
        expect(
            &mut l,
            &fix4(ALLOWED4, sport, FIX_49).payload(&m).build(),
            PassAllowed,
            "49",
        );
        expect(
            &mut l,
            &fix4(OTHER4, sport, FIX_49).payload(&m).build(),
            DropNotAllowed,
            "49 other",
        );
        // No 553 in the Logon: the no_key rule.
        sport += 1;
        let m = fix_logon(begin, "SENDER1", None);
        expect(
            &mut l,
            &fix4(OTHER4, sport, FIX_553).payload(&m).build(),
            PassNoKey,
            "no 553",
        );
    }
    // IPv6.
    let m = fix_logon("FIX.4.4", "S", Some("37c541a1deadbeef"));
    let f = Pkt::tcp6(ALLOWED6, EDGE6, 34_500, FIX_553)
        .payload(&m)
        .build();
    expect(&mut l, &f, PassAllowed, "v6");
    let f = Pkt::tcp6(OTHER6, EDGE6, 34_501, FIX_553)
        .payload(&m)
        .build();
    expect(&mut l, &f, DropNotAllowed, "v6 other");
}

#[test]
fn fix_tag_only_counts_at_field_starts() {
    let mut l = Loaded::new(POLICY).unwrap();
    // "553=" inside another field's value, and tag 1553: neither is tag 553.
    let m = fix_message(
        "FIX.4.4",
        "A",
        &[
            (49, "S"),
            (58, "553=37c541a1"),
            (1553, "37c541a1"),
            (98, "0"),
        ],
    );
    let f = fix4(OTHER4, 35_000, FIX_553).payload(&m).build();
    expect(&mut l, &f, PassNoKey, "553= only inside values");
    // The tag as the very first field of a segment (a message continued from the one
    // before, which ended with SOH).
    let head = fix4(ALLOWED4, 35_001, FIX_553)
        .payload(b"8=FIX.4.4\x019=70\x0135=A\x0149=S\x01")
        .build();
    expect(&mut l, &head, PassNoKey, "message head");
    let f = fix4(ALLOWED4, 35_001, FIX_553)
        .payload(b"553=37c541a1deadbeef\x01554=pw\x01")
        .build();
    expect(&mut l, &f, PassAllowed, "at payload start");
    // In a later message of the connection (a second Logon after a heartbeat).
    let mut two = fix_message("FIX.4.4", "0", &[(49, "S")]);
    two.extend_from_slice(&fix_logon("FIX.4.4", "S", Some("37c541a1deadbeef")));
    let f = fix4(OTHER4, 35_002, FIX_553).payload(&two).build();
    expect(&mut l, &f, DropNotAllowed, "second message");
    // Cut by the segment end: the value, or the tag itself.
    for cut in [b"553=37c5".as_slice(), b"553=", b"553", b"55", b"5"] {
        let mut m = fix_message("FIX.4.4", "A", &[(49, "S")]);
        m.extend_from_slice(cut);
        let f = fix4(ALLOWED4, 35_010 + cut.len() as u16, FIX_553)
            .payload(&m)
            .build();
        expect(
            &mut l,
            &f,
            DropMalformed,
            &format!("cut {:?}", String::from_utf8_lossy(cut)),
        );
    }
}

#[test]
fn fix_truncations_and_mutations_never_pass_a_disallowed_source() {
    let mut l = Loaded::new(POLICY).unwrap();
    for (n, begin) in ["FIX.4.2", "FIXT.1.1"].into_iter().enumerate() {
        let m = fix_logon(begin, "SENDER1", Some("37c541a1deadbeef"));
        let at = m.windows(5).position(|w| w == b"\x01553=").unwrap();
        let end = at + 1 + m[at + 1..].iter().position(|&b| b == 1).unwrap() + 1;
        truncations_fail_closed(&mut l, |sp| fix4(OTHER4, sp, FIX_553), &m, at + 2, begin);
        // Everything after the key field is decided the same way.
        // A connection of its own: a judged FIX session is not scanned again.
        let f = fix4(OTHER4, 36_000 + n as u16, FIX_553)
            .payload(&m[..end])
            .build();
        expect(&mut l, &f, DropNotAllowed, "up to the key's SOH");
        mutations_fail_closed(&mut l, |sp| fix4(OTHER4, sp, FIX_553), &m, 0xf1f1, begin);
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------------

fn conn(client: IpAddr) -> ProxiedConn {
    let dst: IpAddr = if client.is_ipv4() {
        "192.0.2.1".parse().unwrap()
    } else {
        "2001:db8:ee::1".parse().unwrap()
    };
    ProxiedConn {
        src: client,
        dst,
        sport: 51_234,
        dport: 443,
    }
}

fn request(key: Option<&str>) -> Vec<u8> {
    let mut h = vec![("Host", "api.example")];
    if let Some(k) = key {
        h.push(("X-MBX-APIKEY", k));
    }
    h.push(("Accept", "*/*"));
    http_request("GET", "/api/v3/account", &h)
}

fn with(header: Vec<u8>, body: &[u8]) -> Vec<u8> {
    let mut v = header;
    v.extend_from_slice(body);
    v
}

fn tlvs() -> Vec<(u8, Vec<u8>)> {
    vec![
        (PP2_TYPE_ALPN, b"http/1.1".to_vec()),
        (PP2_TYPE_AUTHORITY, b"api.example".to_vec()),
        (PP2_TYPE_UNIQUE_ID, vec![0xab; 20]),
    ]
}

/// Every header kind carrying `client`.
fn headers(client: &str) -> Vec<(String, Vec<u8>)> {
    let c = conn(client.parse().unwrap());
    vec![
        (format!("v1 {client}"), proxy_v1(Some(c))),
        (format!("v2 {client}"), proxy_v2(Some(c), &[])),
        (format!("v2+TLVs {client}"), proxy_v2(Some(c), &tlvs())),
    ]
}

fn via4(proxy: [u8; 4], sport: u16) -> Pkt {
    Pkt::tcp4(proxy, EDGE4, sport, PROXY_PORT)
}

fn via6(proxy: [u8; 16], sport: u16) -> Pkt {
    Pkt::tcp6(proxy, EDGE6, sport, PROXY_PORT)
}

#[test]
fn proxy_headers_carry_the_client_that_is_judged() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = request(Some("37c541a1deadbeef"));
    let mut sport = 37_000;
    for (allowed, other) in [
        ("198.51.100.7", "203.0.113.45"),
        ("2001:db8::77", "2001:db9::77"),
    ] {
        for ((what, h_ok), (_, h_bad)) in headers(allowed).into_iter().zip(headers(other)) {
            // Through an IPv4 and an IPv6 proxy.
            for v6_proxy in [false, true] {
                let pkt = |sp: u16| {
                    if v6_proxy {
                        via6(PROXY6, sp)
                    } else {
                        via4(PROXY4, sp)
                    }
                };
                sport += 1;
                let f = pkt(sport).payload(&with(h_ok.clone(), &key)).build();
                expect(&mut l, &f, PassAllowed, &what);
                sport += 1;
                let f = pkt(sport).payload(&with(h_bad.clone(), &key)).build();
                expect(
                    &mut l,
                    &f,
                    DropNotAllowed,
                    &format!("{what} (other client)"),
                );
                sport += 1;
                let f = pkt(sport)
                    .payload(&with(h_ok.clone(), &request(Some("lockedk1xxxx"))))
                    .build();
                expect(&mut l, &f, DropLocked, &format!("{what} locked"));
                sport += 1;
                let f = pkt(sport)
                    .payload(&with(h_ok.clone(), &request(Some("nosuchk1xxxx"))))
                    .build();
                expect(&mut l, &f, DropUnknownKey, &format!("{what} unknown"));
                sport += 1;
                let f = pkt(sport)
                    .payload(&with(h_bad.clone(), &request(None)))
                    .build();
                expect(&mut l, &f, PassNoKey, &format!("{what} no key"));
            }
        }
    }
}

#[test]
fn proxy_local_and_unknown_judge_the_proxy_itself() {
    let mut l = Loaded::new(POLICY).unwrap();
    for (i, h) in [proxy_v2(None, &[]), proxy_v2(None, &tlvs()), proxy_v1(None)]
        .into_iter()
        .enumerate()
    {
        let sport = 38_000 + 10 * i as u16;
        let f = via4(PROXY4, sport)
            .payload(&with(h.clone(), &request(Some("proxyloc"))))
            .build();
        expect(
            &mut l,
            &f,
            PassAllowed,
            &format!("LOCAL {i}, the proxy's key"),
        );
        let f = via4(PROXY4, sport + 1)
            .payload(&with(h.clone(), &request(Some("37c541a1deadbeef"))))
            .build();
        expect(
            &mut l,
            &f,
            DropNotAllowed,
            &format!("LOCAL {i}, a client's key"),
        );
    }
}

#[test]
fn proxy_headers_only_from_trusted_proxies() {
    let mut l = Loaded::new(POLICY).unwrap();
    let c = conn("198.51.100.7".parse().unwrap());
    let key = request(Some("37c541a1deadbeef"));
    for (i, h) in [proxy_v1(Some(c)), proxy_v2(Some(c), &[])]
        .into_iter()
        .enumerate()
    {
        // The allowed client itself, and an address next to the proxies, are not proxies.
        let f = via4(ALLOWED4, 39_000 + i as u16)
            .payload(&with(h.clone(), &key))
            .build();
        expect(&mut l, &f, DropMalformed, "PROXY from an untrusted source");
        let f = via4([10, 10, 0, 5], 39_010 + i as u16)
            .payload(&with(h.clone(), &key))
            .build();
        expect(&mut l, &f, DropMalformed, "PROXY from 10.10.0.5");
        let f = via6(ALLOWED6, 39_020 + i as u16)
            .payload(&with(h.clone(), &key))
            .build();
        expect(
            &mut l,
            &f,
            DropMalformed,
            "PROXY from an untrusted IPv6 source",
        );
    }
    // Without a header the connection cannot be judged: from anyone.
    let f = via4(ALLOWED4, 39_100).payload(&key).build();
    expect(&mut l, &f, DropMalformed, "no header, untrusted source");
    let f = via4(PROXY4, 39_101).payload(&key).build();
    expect(&mut l, &f, DropMalformed, "no header, trusted proxy");
}

#[test]
fn proxy_header_alone_then_the_request() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = request(Some("37c541a1deadbeef"));
    let mut sport = 40_000;
    for (client, want) in [
        ("198.51.100.7", PassAllowed),
        ("203.0.113.45", DropNotAllowed),
    ] {
        for (what, h) in headers(client) {
            sport += 1;
            let all = with(h.clone(), &key);
            let segs = via4(PROXY4, sport).seq(7).segments(&all, &[h.len()]);
            let got = run_all(&mut l, &segs);
            assert_eq!(got, [PassHandshake, want], "{what}");
            // The connection keeps its client: the next request is judged the same way.
            let next = via4(PROXY4, sport)
                .seq(7 + all.len() as u32)
                .payload(&key)
                .build();
            let (_, r, _) = l.run(&next);
            let follow = if want == PassAllowed {
                [PassAllowed, PassFlow]
            } else {
                [DropNotAllowed, DropFlow]
            };
            assert!(follow.contains(&r), "{what}: next request got {r:?}");
        }
    }
}

#[test]
fn proxy_truncations_and_mutations_never_pass_a_disallowed_client() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = request(Some("37c541a1deadbeef"));
    for (what, h) in headers("203.0.113.45") {
        let all = with(h.clone(), &key);
        let key_line = all.windows(13).position(|w| w == b"X-MBX-APIKEY:").unwrap();
        let decided = all[key_line..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap()
            + key_line
            + 2;
        truncations_fail_closed(&mut l, |sp| via4(PROXY4, sp), &all, decided, &what);
        mutations_fail_closed(&mut l, |sp| via4(PROXY4, sp), &all, 0x9e0c, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// The reset action
// ---------------------------------------------------------------------------------------------

/// What a returned RST must look like, checked field by field against the refused segment.
struct Sent {
    vlans: Vec<(u16, u16)>,
    v6: bool,
    src: Vec<u8>,
    dst: Vec<u8>,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    /// Payload bytes, plus one for a FIN.
    consumed: u32,
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn be32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(f[at..at + 4].try_into().unwrap())
}

fn check_rst(out: &[u8], sent: &Sent, what: &str) {
    use tests::packet::{ETH_DST, ETH_SRC};
    assert_eq!(
        &out[..6],
        &ETH_SRC,
        "{what}: Ethernet destination is the sender"
    );
    assert_eq!(&out[6..12], &ETH_DST, "{what}: Ethernet source is the edge");
    let mut at = 12;
    for (tpid, vid) in &sent.vlans {
        assert_eq!(be16(out, at), *tpid, "{what}: VLAN TPID kept");
        assert_eq!(be16(out, at + 2) & 0x0fff, *vid, "{what}: VLAN id kept");
        at += 4;
    }
    let l3 = at + 2;
    let (l4, proto_ok) = if sent.v6 {
        assert_eq!(be16(out, at), 0x86dd, "{what}");
        assert_eq!(out[l3] >> 4, 6, "{what}");
        assert_eq!(be16(out, l3 + 4), 20, "{what}: IPv6 payload length");
        assert_eq!(
            &out[l3 + 8..l3 + 24],
            &sent.dst[..],
            "{what}: source is the edge"
        );
        assert_eq!(
            &out[l3 + 24..l3 + 40],
            &sent.src[..],
            "{what}: destination is the client"
        );
        (l3 + 40, out[l3 + 6] == 6)
    } else {
        assert_eq!(be16(out, at), 0x0800, "{what}");
        assert_eq!(out[l3], 0x45, "{what}: IPv4 without options");
        assert_eq!(be16(out, l3 + 2), 40, "{what}: IPv4 total length");
        assert_eq!(
            checksum(&out[l3..l3 + 20]),
            0,
            "{what}: IPv4 header checksum"
        );
        assert!(out[l3 + 8] > 0, "{what}: TTL");
        assert_eq!(
            &out[l3 + 12..l3 + 16],
            &sent.dst[..],
            "{what}: source is the edge"
        );
        assert_eq!(
            &out[l3 + 16..l3 + 20],
            &sent.src[..],
            "{what}: destination is the client"
        );
        (l3 + 20, out[l3 + 9] == 6)
    };
    assert!(proto_ok, "{what}: TCP");
    assert_eq!(out.len(), l4 + 20, "{what}: no options, no payload");
    assert_eq!(be16(out, l4), sent.dport, "{what}: source port");
    assert_eq!(be16(out, l4 + 2), sent.sport, "{what}: destination port");
    assert_eq!(
        be32(out, l4 + 4),
        sent.ack,
        "{what}: seq = the segment's ack"
    );
    assert_eq!(
        be32(out, l4 + 8),
        sent.seq.wrapping_add(sent.consumed),
        "{what}: ack = seq + length"
    );
    assert_eq!(out[l4 + 12] >> 4, 5, "{what}: data offset");
    let flags = out[l4 + 13];
    assert_ne!(flags & TCP_RST, 0, "{what}: RST");
    assert_eq!(
        flags & (TCP_SYN | TCP_FIN | TCP_PSH),
        0,
        "{what}: flags {flags:#x}"
    );
    // The TCP checksum over the pseudo-header comes out as zero.
    let mut pseudo = Vec::new();
    if sent.v6 {
        pseudo.extend_from_slice(&out[l3 + 8..l3 + 40]);
        pseudo.extend_from_slice(&20u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&out[l3 + 12..l3 + 20]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
    }
    pseudo.extend_from_slice(&out[l4..l4 + 20]);
    assert_eq!(checksum(&pseudo), 0, "{what}: TCP checksum");
}

/// A key-bearing segment to the plain HTTP listener, with TCP options (timestamps) that the
/// RST must not echo.
fn keyed(v6: bool, src_ok: bool, sport: u16, key: &str, vlans: &[(u16, u16)]) -> (Vec<u8>, Sent) {
    let payload = request(Some(key));
    let (seq, ack) = (0xfedc_b000u32, 0x1234_5678u32);
    let mut p = if v6 {
        Pkt::tcp6(
            if src_ok { ALLOWED6 } else { OTHER6 },
            EDGE6,
            sport,
            HTTP_PORT,
        )
    } else {
        Pkt::tcp4(
            if src_ok { ALLOWED4 } else { OTHER4 },
            EDGE4,
            sport,
            HTTP_PORT,
        )
    };
    for (tpid, vid) in vlans {
        p = p.vlan(*tpid, *vid);
    }
    let p = p
        .seq(seq)
        .ack(ack)
        .tcp_options(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
        .payload(&payload);
    let sent = Sent {
        vlans: vlans.to_vec(),
        v6,
        src: if v6 {
            (if src_ok { ALLOWED6 } else { OTHER6 }).to_vec()
        } else {
            (if src_ok { ALLOWED4 } else { OTHER4 }).to_vec()
        },
        dst: if v6 { EDGE6.to_vec() } else { EDGE4.to_vec() },
        sport,
        dport: HTTP_PORT,
        seq,
        ack,
        consumed: payload.len() as u32,
    };
    (p.build(), sent)
}

fn expect_rst(l: &mut Loaded, frame: &[u8], sent: &Sent, reason: Reason, what: &str) {
    let (action, got, audit, out) = l.run_out(frame);
    assert_eq!(got, reason, "{what}");
    assert!(!audit);
    assert_eq!(action, XDP_TX, "{what}: answered with XDP_TX");
    check_rst(&out, sent, what);
}

#[test]
fn reset_answers_refused_keys_with_a_valid_rst() {
    let mut l = Loaded::new(&reset_policy()).unwrap();
    let mut sport = 41_000;
    for v6 in [false, true] {
        for vlans in [
            vec![],
            vec![(0x8100, 7)],
            vec![(0x88a8, 100), (0x8100, 200)],
        ] {
            for (key, src_ok, reason) in [
                ("37c541a1deadbeef", false, DropNotAllowed),
                ("lockedk1xxxx", true, DropLocked),
                ("nosuchk1xxxx", true, DropUnknownKey),
            ] {
                sport += 1;
                let what = format!("v6={v6} vlans={vlans:?} {reason:?}");
                let (f, sent) = keyed(v6, src_ok, sport, key, &vlans);
                expect_rst(&mut l, &f, &sent, reason, &what);
                // The connection stays refused: its next data segment is reset too.
                let more = b"more body bytes";
                let mut p = if v6 {
                    Pkt::tcp6(
                        if src_ok { ALLOWED6 } else { OTHER6 },
                        EDGE6,
                        sport,
                        HTTP_PORT,
                    )
                } else {
                    Pkt::tcp4(
                        if src_ok { ALLOWED4 } else { OTHER4 },
                        EDGE4,
                        sport,
                        HTTP_PORT,
                    )
                };
                for (tpid, vid) in &vlans {
                    p = p.vlan(*tpid, *vid);
                }
                let next_seq = sent.seq.wrapping_add(sent.consumed);
                let f = p.seq(next_seq).ack(sent.ack).payload(more).build();
                let sent = Sent {
                    seq: next_seq,
                    consumed: more.len() as u32,
                    ..sent
                };
                expect_rst(
                    &mut l,
                    &f,
                    &sent,
                    DropFlow,
                    &format!("{what}, next segment"),
                );
            }
            // An allowed key passes untouched.
            sport += 1;
            let (f, _) = keyed(v6, true, sport, "37c541a1deadbeef", &vlans);
            let (action, r, _, out) = l.run_out(&f);
            assert_eq!((action, r), (XDP_PASS, PassAllowed));
            assert_eq!(out, f, "a passed frame is not changed");
        }
    }
}

#[test]
fn reset_acks_a_fin_and_leaves_other_drops_alone() {
    let mut l = Loaded::new(&reset_policy()).unwrap();
    // A FIN counts one sequence number.
    let payload = request(Some("37c541a1deadbeef"));
    let f = Pkt::tcp4(OTHER4, EDGE4, 42_000, HTTP_PORT)
        .seq(100)
        .ack(200)
        .tcp_flag_bits(TCP_ACK | TCP_PSH | TCP_FIN)
        .payload(&payload)
        .build();
    let sent = Sent {
        vlans: vec![],
        v6: false,
        src: OTHER4.to_vec(),
        dst: EDGE4.to_vec(),
        sport: 42_000,
        dport: HTTP_PORT,
        seq: 100,
        ack: 200,
        consumed: payload.len() as u32 + 1,
    };
    expect_rst(&mut l, &f, &sent, DropNotAllowed, "FIN");
    // Malformed segments are dropped, not answered.
    let cut = request(Some("37c5"));
    let cut = &cut[..cut.windows(4).position(|w| w == b"37c5").unwrap() + 4];
    let f = Pkt::tcp4(OTHER4, EDGE4, 42_001, HTTP_PORT)
        .payload(cut)
        .build();
    expect(&mut l, &f, DropMalformed, "malformed");
    // no_key = drop is answered too.
    l.apply(&reset_policy().replace("no_key = \"pass\"", "no_key = \"drop\""))
        .unwrap();
    let payload = request(None);
    let f = Pkt::tcp4(OTHER4, EDGE4, 42_002, HTTP_PORT)
        .seq(5)
        .ack(6)
        .payload(&payload)
        .build();
    let sent = Sent {
        seq: 5,
        ack: 6,
        sport: 42_002,
        consumed: payload.len() as u32,
        ..sent
    };
    expect_rst(&mut l, &f, &sent, DropNoKey, "no key");
    // Audit mode answers nothing.
    l.apply(&reset_policy().replace("[settings]", "[settings]\nenforce = false"))
        .unwrap();
    let (f, _) = keyed(false, false, 42_003, "37c541a1deadbeef", &[]);
    let (action, r, audit) = l.run(&f);
    assert_eq!((action, r, audit), (XDP_PASS, DropNotAllowed, true));
}

#[test]
fn reset_answers_every_locator() {
    let mut l = Loaded::new(&reset_policy()).unwrap();
    let m = fix_logon("FIX.4.4", "S", Some("37c541a1deadbeef"));
    let f = fix4(OTHER4, 42_004, FIX_553).payload(&m).build();
    let (action, r, _) = l.run(&f);
    assert_eq!((action, r), (XDP_TX, DropNotAllowed), "FIX");
    let h = proxy_v2(Some(conn("203.0.113.45".parse().unwrap())), &[]);
    let f = via4(PROXY4, 42_006)
        .payload(&with(h, &request(Some("37c541a1deadbeef"))))
        .build();
    let (action, r, _) = l.run(&f);
    assert_eq!((action, r), (XDP_TX, DropNotAllowed), "PROXY");
    let rec = ClientHello::new("k-37c541a1.api.example.com").record();
    let f = tls4(OTHER4, 42_005).payload(&rec).build();
    let (action, r, _) = l.run(&f);
    assert_eq!((action, r), (XDP_TX, DropNotAllowed), "TLS");
}

#[test]
fn reset_leaves_segments_without_payload_alone() {
    let mut l = Loaded::new(&reset_policy()).unwrap();
    let (f, _) = keyed(false, false, 43_000, "37c541a1deadbeef", &[]);
    assert_eq!(l.run(&f).0, XDP_TX);
    // A bare ACK of a refused connection carries nothing to answer: dropped.
    let f = Pkt::tcp4(OTHER4, EDGE4, 43_000, HTTP_PORT).build();
    expect(&mut l, &f, DropFlow, "bare ACK of a refused connection");
    // Nor is a SYN the prefilter drops answered (that would make the edge a reflector).
    l.apply(&reset_policy().replace("prefilter = false", "prefilter = true"))
        .unwrap();
    let f = Pkt::tcp4(OTHER4, EDGE4, 43_001, HTTP_PORT).syn().build();
    expect(&mut l, &f, DropPrefilter, "prefiltered SYN");
}

#[test]
fn split_hello_truncations_retransmissions_and_bad_sequence_numbers_fail_closed() {
    let mut l = Loaded::new(POLICY).unwrap();
    let host = "k-37c541a1.api.example.com";
    let h = ClientHello {
        sni_last: true,
        ..ClientHello::chrome_like(host, 5)
    };
    let rec = h.record();
    let cut = 1448;
    let sni_end = h.sni_offset().unwrap() + host.len();
    assert!(h.sni_offset().unwrap() > cut);
    let base = 0x7fff_fff0u32;

    // Every truncation of the second (key-bearing) segment.
    for len in 1..=rec.len() - cut {
        let sport = fresh_port();
        let first = tls4(OTHER4, sport).seq(base).payload(&rec[..cut]).build();
        let r1 = l.run(&first).1;
        assert!(
            !r1.is_drop() && !passes_on_a_key(r1),
            "first segment: {r1:?}"
        );
        let second = tls4(OTHER4, sport)
            .seq(base.wrapping_add(cut as u32))
            .payload(&rec[cut..cut + len])
            .build();
        let (action, r, _) = l.run(&second);
        assert!(!passes_on_a_key(r), "second segment cut at {len}: {r:?}");
        if cut + len >= sni_end {
            assert!(r.is_drop() && action == XDP_DROP, "cut at {len}: {r:?}");
        }
    }

    // Mutations of the second segment.
    let mut rng = Rng(0x2222);
    for i in 0..200 {
        let sport = fresh_port();
        let first = tls4(OTHER4, sport).seq(base).payload(&rec[..cut]).build();
        l.run(&first);
        let mut m = rec[cut..].to_vec();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(m.len());
            m[at] = rng.next() as u8;
        }
        let second = tls4(OTHER4, sport)
            .seq(base.wrapping_add(cut as u32))
            .payload(&m)
            .build();
        let r = l.run(&second).1;
        assert!(!passes_on_a_key(r), "mutation {i}: {r:?}");
    }

    for (src, want) in [(ALLOWED4, PassAllowed), (OTHER4, DropNotAllowed)] {
        // A retransmitted first segment changes nothing.
        let sport = fresh_port();
        let segs = tls4(src, sport).seq(base).segments(&rec, &[cut]);
        let got = run_all(&mut l, &[segs[0].clone(), segs[0].clone(), segs[1].clone()]);
        assert_eq!(got[2], want, "retransmitted first segment: {got:?}");
        assert!(
            !got[..2].iter().any(|r| r.is_drop() || passes_on_a_key(*r)),
            "{got:?}"
        );
    }
    // The second segment first (reordered), or at a sequence number that does not follow:
    // a disallowed source is never passed on its key.
    let sport = fresh_port();
    let segs = tls4(OTHER4, sport).seq(base).segments(&rec, &[cut]);
    let got = run_all(&mut l, &[segs[1].clone(), segs[0].clone()]);
    assert!(
        !got.iter().any(|r| passes_on_a_key(*r)),
        "reordered: {got:?}"
    );
    for shift in [-1i32, 1, 7, -300] {
        let sport = fresh_port();
        let first = tls4(OTHER4, sport).seq(base).payload(&rec[..cut]).build();
        l.run(&first);
        let second = tls4(OTHER4, sport)
            .seq(base.wrapping_add(cut as u32).wrapping_add(shift as u32))
            .payload(&rec[cut..])
            .build();
        let r = l.run(&second).1;
        assert!(
            !passes_on_a_key(r),
            "second segment shifted by {shift}: {r:?}"
        );
    }
}
