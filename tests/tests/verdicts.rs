//! Exact verdicts of the compiled XDP program, through BPF_PROG_TEST_RUN, for every reason.

use filter_common::Reason::{self, *};
use tests::{
    harness::{Loaded, XDP_DROP, XDP_PASS},
    packet::{MAX_FRAME_LEN, Pkt, http_request, pad_request_to},
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const ALLOWED4: [u8; 4] = [198, 51, 100, 7];
const OTHER4: [u8; 4] = [198, 51, 100, 8];
const BROKER4: [u8; 4] = [203, 0, 113, 99];
const EDGE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xee, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];
const ALLOWED6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const OTHER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

pub const POLICY: &str = r#"
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = false

[[listener]]
port = 8080
locator = "http-header"
headers = ["OK-ACCESS-KEY", "X-MBX-APIKEY"]

[ipsets]
broker-a = ["203.0.113.0/24", "2001:db8:aa::/48"]

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7", "2001:db8::/48"]

[[key]]
prefix = "brokerk1"
ipsets = ["broker-a"]

[[key]]
prefix = "lockedk1"
allow = ["198.51.100.7"]
locked = true

[[key]]
prefix = "unboundk"
"#;

fn req(key_header: Option<(&str, &str)>) -> Vec<u8> {
    let mut h = vec![("Host", "api.example"), ("User-Agent", "test/1.0")];
    if let Some(k) = key_header {
        h.push(k);
    }
    h.push(("Accept", "*/*"));
    http_request("GET", "/api/v5/account/balance", &h)
}

fn v4(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
    Pkt::tcp4(src, EDGE4, 40000, 8080).payload(payload).build()
}

fn v6(src: [u8; 16], payload: &[u8]) -> Vec<u8> {
    Pkt::tcp6(src, EDGE6, 40000, 8080).payload(payload).build()
}

/// A source port no other frame of this test used: a connection of its own.
fn fresh_port() -> u16 {
    thread_local!(static NEXT: std::cell::Cell<u16> = const { std::cell::Cell::new(50000) });
    NEXT.with(|n| {
        let p = n.get();
        n.set(p + 1);
        p
    })
}

/// The payload as the first segment of a new connection.
fn n4(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
    Pkt::tcp4(src, EDGE4, fresh_port(), 8080)
        .payload(payload)
        .build()
}

fn n6(src: [u8; 16], payload: &[u8]) -> Vec<u8> {
    Pkt::tcp6(src, EDGE6, fresh_port(), 8080)
        .payload(payload)
        .build()
}

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason) {
    let (action, got, audit) = l.run(frame);
    assert_eq!(got, reason, "reason");
    assert!(!audit);
    let want = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
    assert_eq!(action, want, "action for {reason:?}");
}

#[test]
fn every_key_reason_over_ipv4_and_ipv6() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = |k: &'static str| req(Some(("OK-ACCESS-KEY", k)));
    expect(&mut l, &n4(ALLOWED4, &key("37c541a1deadbeef")), PassAllowed);
    expect(
        &mut l,
        &n4(OTHER4, &key("37c541a1deadbeef")),
        DropNotAllowed,
    );
    expect(&mut l, &n6(ALLOWED6, &key("37c541a1deadbeef")), PassAllowed);
    expect(
        &mut l,
        &n6(OTHER6, &key("37c541a1deadbeef")),
        DropNotAllowed,
    );
    expect(&mut l, &n4(BROKER4, &key("brokerk1xyz")), PassAllowed);
    expect(&mut l, &n4(ALLOWED4, &key("brokerk1xyz")), DropNotAllowed);
    expect(&mut l, &n4(ALLOWED4, &key("lockedk1zzzz")), DropLocked);
    expect(&mut l, &n6(ALLOWED6, &key("lockedk1zzzz")), DropLocked);
    expect(&mut l, &n4(OTHER4, &key("unboundkzzzz")), PassUnbound);
    expect(&mut l, &n4(ALLOWED4, &key("nosuchk1zzzz")), DropUnknownKey);
    expect(&mut l, &n6(ALLOWED6, &key("nosuchk1zzzz")), DropUnknownKey);
    // A new connection (other port) without a key.
    let f = Pkt::tcp4(OTHER4, EDGE4, 40001, 8080)
        .payload(&req(None))
        .build();
    expect(&mut l, &f, PassNoKey);
}

#[test]
fn handshake_flow_and_not_api() {
    let mut l = Loaded::new(POLICY).unwrap();
    expect(
        &mut l,
        &Pkt::tcp4(OTHER4, EDGE4, 40000, 8080).syn().build(),
        PassHandshake,
    );
    expect(
        &mut l,
        &Pkt::tcp4(OTHER4, EDGE4, 40000, 8080).build(),
        PassHandshake,
    );
    expect(
        &mut l,
        &Pkt::tcp4(OTHER4, EDGE4, 40000, 22)
            .payload(b"SSH-2.0")
            .build(),
        PassNotApi,
    );
    expect(
        &mut l,
        &Pkt::udp4(OTHER4, EDGE4, 40000, 8080).payload(b"x").build(),
        PassNotApi,
    );
    expect(&mut l, &Pkt::arp(), PassNotApi);
    expect(&mut l, &Pkt::icmp6_ns(OTHER6, EDGE6), PassNotApi);
    // A refused connection: its later segments and ACKs follow the verdict.
    let key = req(Some(("X-MBX-APIKEY", "37c541a1deadbeef")));
    expect(&mut l, &v4(OTHER4, &key), DropNotAllowed);
    expect(&mut l, &v4(OTHER4, b"more body bytes"), DropFlow);
    expect(
        &mut l,
        &Pkt::tcp4(OTHER4, EDGE4, 40000, 8080).build(),
        DropFlow,
    );
    // An allowed one.
    expect(&mut l, &v4(ALLOWED4, &key), PassAllowed);
    expect(&mut l, &v4(ALLOWED4, b"{\"body\": 1}"), PassFlow);
    // Keep-alive request without the key follows the connection.
    expect(&mut l, &v4(ALLOWED4, &req(None)), PassFlow);
    // Keep-alive request with another, disallowed key is judged on that key.
    expect(
        &mut l,
        &v4(ALLOWED4, &req(Some(("OK-ACCESS-KEY", "brokerk1xyz")))),
        DropNotAllowed,
    );
    expect(&mut l, &v4(ALLOWED4, b"body"), DropFlow);
}

#[test]
fn policy_change_cuts_established_connections() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    expect(&mut l, &v4(ALLOWED4, &key), PassAllowed);
    expect(&mut l, &v4(ALLOWED4, b"next"), PassFlow);
    l.apply(&POLICY.replace(
        "allow = [\"198.51.100.7\", \"2001:db8::/48\"]",
        "allow = [\"198.51.100.7\", \"2001:db8::/48\"]\nlocked = true",
    ))
    .unwrap();
    let next = v4(ALLOWED4, b"next");
    expect(&mut l, &next, DropFlow);
    // The client's TCP sends the dropped segment again: after the unlock it passes.
    l.apply(POLICY).unwrap();
    expect(&mut l, &next, PassFlow);
    // Removing the address from the allowlist cuts it too.
    l.apply(&POLICY.replace(
        "allow = [\"198.51.100.7\", \"2001:db8::/48\"]",
        "allow = [\"2001:db8::/48\"]",
    ))
    .unwrap();
    expect(&mut l, &v4(ALLOWED4, b"next"), DropFlow);
}

#[test]
fn vlan_tags_and_ip_options_and_extension_headers() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    for (i, src) in [ALLOWED4, OTHER4].into_iter().enumerate() {
        let want = if i == 0 { PassAllowed } else { DropNotAllowed };
        let base = || Pkt::tcp4(src, EDGE4, fresh_port(), 8080).payload(&key);
        expect(&mut l, &base().vlan(0x8100, 10).build(), want);
        expect(
            &mut l,
            &base().vlan(0x88a8, 100).vlan(0x8100, 10).build(),
            want,
        );
        expect(
            &mut l,
            &base()
                .ipv4_options(&[1, 1, 1, 0x07, 7, 4, 0, 0, 0, 0, 0])
                .build(),
            want,
        );
        expect(
            &mut l,
            &base()
                .vlan(0x88a8, 1)
                .vlan(0x8100, 2)
                .ipv4_options(&[1; 20])
                .build(),
            want,
        );
    }
    for (i, src) in [ALLOWED6, OTHER6].into_iter().enumerate() {
        let want = if i == 0 { PassAllowed } else { DropNotAllowed };
        let base = || Pkt::tcp6(src, EDGE6, fresh_port(), 8080).payload(&key);
        expect(&mut l, &base().ipv6_ext(0, 8).build(), want);
        expect(
            &mut l,
            &base()
                .ipv6_ext(0, 8)
                .ipv6_ext(60, 16)
                .ipv6_ext(43, 8)
                .build(),
            want,
        );
        expect(
            &mut l,
            &base().vlan(0x8100, 5).ipv6_ext(60, 24).build(),
            want,
        );
    }
}

#[test]
fn header_case_variants_and_position() {
    let mut l = Loaded::new(POLICY).unwrap();
    for (i, name) in [
        "OK-ACCESS-KEY",
        "ok-access-key",
        "Ok-Access-Key",
        "x-mbx-apikey",
        "X-MbX-ApIkEy",
    ]
    .iter()
    .enumerate()
    {
        let f = Pkt::tcp4(OTHER4, EDGE4, 43000 + i as u16, 8080)
            .payload(&req(Some((name, "37c541a1deadbeef"))))
            .build();
        expect(&mut l, &f, DropNotAllowed);
    }
    // Optional whitespace after the colon, and a tab.
    let f = Pkt::tcp4(OTHER4, EDGE4, 43100, 8080)
        .payload(b"GET / HTTP/1.1\r\nHost: a\r\nOK-ACCESS-KEY:\t  37c541a1xx\r\n\r\n")
        .build();
    expect(&mut l, &f, DropNotAllowed);
    // A look-alike header name is not the key header.
    let f = Pkt::tcp4(OTHER4, EDGE4, 43101, 8080)
        .payload(b"GET / HTTP/1.1\r\nX-OK-ACCESS-KEY: 37c541a1xx\r\n\r\n")
        .build();
    expect(&mut l, &f, PassNoKey);
    // The key header last in a full-size frame, over IPv4 and IPv6.
    for (i, allowed) in [true, false].into_iter().enumerate() {
        let base = Pkt::tcp4(
            if allowed { ALLOWED4 } else { OTHER4 },
            EDGE4,
            43200 + i as u16,
            8080,
        );
        let body = req(Some(("X-MBX-APIKEY", "37c541a1deadbeef")));
        let full = pad_request_to(body, MAX_FRAME_LEN - base.payload_offset());
        let f = base.payload(&full).build();
        assert_eq!(f.len(), MAX_FRAME_LEN);
        expect(
            &mut l,
            &f,
            if allowed { PassAllowed } else { DropNotAllowed },
        );
        let base = Pkt::tcp6(
            if allowed { ALLOWED6 } else { OTHER6 },
            EDGE6,
            43300 + i as u16,
            8080,
        );
        let mut raw = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        let tail = b"X-MBX-APIKEY: 37c541a1";
        let room = MAX_FRAME_LEN - base.payload_offset() - raw.len() - tail.len();
        raw.extend(std::iter::repeat_n(b'a', room));
        raw.extend_from_slice(b"\r\n");
        raw.truncate(raw.len() - 2);
        // Exactly the prefix at the very end of the frame, in a header line of its own.
        let mut p = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
        let pad = MAX_FRAME_LEN - base.payload_offset() - p.len() - 2 - tail.len();
        p.extend(std::iter::repeat_n(b'a', pad));
        p.extend_from_slice(b"\r\n");
        p.extend_from_slice(tail);
        let f = base.payload(&p).build();
        assert_eq!(f.len(), MAX_FRAME_LEN);
        expect(
            &mut l,
            &f,
            if allowed { PassAllowed } else { DropNotAllowed },
        );
    }
}

#[test]
fn short_and_split_keys() {
    let mut l = Loaded::new(POLICY).unwrap();
    // A complete value shorter than the prefix length is not a key this filter can judge
    // (the rest may follow on an obs-fold line).
    let f = Pkt::tcp4(ALLOWED4, EDGE4, 44000, 8080)
        .payload(b"GET / HTTP/1.1\r\nOK-ACCESS-KEY: 37c5\r\n\r\n")
        .build();
    expect(&mut l, &f, DropMalformed);
    // A segment that ends inside the key value, or inside the name, fails closed.
    for (i, p) in [
        &b"GET / HTTP/1.1\r\nOK-ACCESS-KEY: 37c5"[..],
        b"GET / HTTP/1.1\r\nOK-ACC",
    ]
    .iter()
    .enumerate()
    {
        let f = Pkt::tcp4(ALLOWED4, EDGE4, 44100 + i as u16, 8080)
            .payload(p)
            .build();
        expect(&mut l, &f, DropMalformed);
    }
    // Two different keys in one segment (pipelining) fail closed.
    let mut two = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    two.extend(req(Some(("OK-ACCESS-KEY", "brokerk1xyz"))));
    expect(&mut l, &n4(ALLOWED4, &two), DropMalformed);
    // The same key twice is fine.
    let mut same = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    same.extend(req(Some(("X-MBX-APIKEY", "37c541a1deadbeef"))));
    expect(&mut l, &n4(ALLOWED4, &same), PassAllowed);
}

#[test]
fn truncated_at_every_offset_never_passes_a_disallowed_source() {
    let mut l = Loaded::new(POLICY).unwrap();
    let payload = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    for (fam, full, start) in [
        (
            "v4",
            v4(OTHER4, &payload),
            Pkt::tcp4(OTHER4, EDGE4, 1, 8080).payload_offset(),
        ),
        (
            "v6",
            v6(OTHER6, &payload),
            Pkt::tcp6(OTHER6, EDGE6, 1, 8080).payload_offset(),
        ),
    ] {
        for cut in 14..=full.len() {
            // Each cut is a fresh connection so no flow verdict carries over.
            let mut f = full[..cut].to_vec();
            let sport = 30000 + cut as u16;
            let l4 = start - 20;
            if cut >= l4 + 2 {
                f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
            }
            let (action, reason, _) = l.run(&f);
            let passed_key = matches!(reason, PassAllowed | PassUnbound | PassUnknownKey);
            assert!(
                !passed_key,
                "{fam} cut at {cut}: {reason:?} lets a disallowed source through"
            );
            if cut > start + payload.len() - 20 && cut < full.len() {
                // Inside or after the key line but short of the full frame: a key is seen
                // (drop) or the cut is judged malformed / no key; never allowed.
                assert!(
                    action == XDP_DROP
                        || reason == PassNoKey
                        || reason == PassNotApi
                        || reason == PassHandshake,
                    "{fam} cut {cut}: {reason:?}"
                );
            }
        }
    }
}

#[test]
fn fragments_never_carry_api_traffic_past() {
    let mut l = Loaded::new(POLICY).unwrap();
    let key = req(Some(("OK-ACCESS-KEY", "37c541a1deadbeef")));
    // First IPv4 fragment to a listener: dropped whatever it carries.
    let f = Pkt::tcp4(ALLOWED4, EDGE4, 45000, 8080)
        .payload(&key)
        .ipv4_frag(true, 0)
        .build();
    expect(&mut l, &f, DropMalformed);
    // Later fragments cannot be reassembled without the first one: they pass as non-API.
    let f = Pkt::tcp4(OTHER4, EDGE4, 45000, 8080)
        .payload(&key)
        .ipv4_frag(false, 3)
        .build();
    expect(&mut l, &f, PassNotApi);
    // First fragment to another port passes.
    let f = Pkt::tcp4(OTHER4, EDGE4, 45000, 22)
        .payload(b"x")
        .ipv4_frag(true, 0)
        .build();
    expect(&mut l, &f, PassNotApi);
    // IPv6 fragment header.
    let f = Pkt::tcp6(ALLOWED6, EDGE6, 45000, 8080)
        .payload(&key)
        .ipv6_frag(true, 0, 7)
        .build();
    expect(&mut l, &f, DropMalformed);
    // Too many extension headers to see the transport: fails closed.
    let mut p = Pkt::tcp6(ALLOWED6, EDGE6, 45001, 8080).payload(&key);
    for _ in 0..7 {
        p = p.ipv6_ext(60, 8);
    }
    expect(&mut l, &p.build(), DropMalformed);
}

#[test]
fn audit_mode_counts_observed_and_passes() {
    let mut l =
        Loaded::new(&POLICY.replace("key_prefix_len = 8", "key_prefix_len = 8\nenforce = false"))
            .unwrap();
    let key = req(Some(("OK-ACCESS-KEY", "lockedk1zzzz")));
    let (action, reason, audit) = l.run(&v4(ALLOWED4, &key));
    assert_eq!((action, reason, audit), (XDP_PASS, DropLocked, true));
    let (action, reason, audit) = l.run(&v4(ALLOWED4, &key));
    assert_eq!((action, reason, audit), (XDP_PASS, DropLocked, true));
    let (action, reason, audit) = l.run(&v4(ALLOWED4, b"later"));
    assert_eq!((action, reason, audit), (XDP_PASS, DropFlow, true));
}

#[test]
fn no_key_drop_and_unbound_drop_settings() {
    let p = POLICY
        .replace("no_key = \"pass\"", "no_key = \"drop\"")
        .replace("unbound_keys = \"pass\"", "unbound_keys = \"drop\"");
    let mut l = Loaded::new(&p).unwrap();
    expect(&mut l, &v4(ALLOWED4, &req(None)), DropNoKey);
    let f = Pkt::tcp4(ALLOWED4, EDGE4, 46000, 8080)
        .payload(&req(Some(("OK-ACCESS-KEY", "unboundkzzzz"))))
        .build();
    expect(&mut l, &f, DropNotAllowed);
}

#[test]
fn unknown_key_pass_setting() {
    let p = POLICY.replace("unknown_key = \"drop\"", "unknown_key = \"pass\"");
    let mut l = Loaded::new(&p).unwrap();
    let f = v6(OTHER6, &req(Some(("OK-ACCESS-KEY", "nosuchk1zzzz"))));
    expect(&mut l, &f, PassUnknownKey);
    // Locks still hold with tags in front.
    let f = Pkt::tcp6(ALLOWED6, EDGE6, 47000, 8080)
        .vlan(0x88a8, 7)
        .vlan(0x8100, 8)
        .ipv6_ext(0, 8)
        .payload(&req(Some(("X-MBX-APIKEY", "lockedk1zzzz"))))
        .build();
    expect(&mut l, &f, DropLocked);
}

#[test]
fn spaces_before_a_key_header_name_fail_closed() {
    let mut l = Loaded::new(POLICY).unwrap();
    // Lenient servers read a header after leading spaces, or fold the line into the one
    // before: a key header there cannot be judged.
    for lead in [" ", "   ", "         ", "                     "] {
        let p =
            format!("GET / HTTP/1.1\r\nHost: a\r\n{lead}X-MBX-APIKEY: 37c541a1deadbeef\r\n\r\n");
        expect(&mut l, &n4(OTHER4, p.as_bytes()), DropMalformed);
    }
    // Too many to read past: fails closed too.
    let p = format!("GET / HTTP/1.1\r\nHost: a\r\n{}x\r\n\r\n", " ".repeat(30));
    expect(&mut l, &n4(ALLOWED4, p.as_bytes()), DropMalformed);
    // Indented lines that name no key header are fine (a pretty-printed body).
    let p = "POST / HTTP/1.1\r\nHost: a\r\nX-MBX-APIKEY: 37c541a1deadbeef\r\n\r\n{\r\n    \"a\": 1,\r\n        \"b\": [2]\r\n}";
    expect(&mut l, &n4(ALLOWED4, p.as_bytes()), PassAllowed);
}
