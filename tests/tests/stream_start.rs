//! Where a connection's stream starts (BPF_PROG_TEST_RUN): the filter judges a stream from
//! its start only at ISN + 1 of a SYN it recorded on the 5-tuple (`KW_HELD`), because the
//! server trims bytes before that and reads the rest from wherever its window begins.

use filter_common::Reason::{self, *};
use tests::{
    harness::Loaded,
    packet::{Pkt, http_request},
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const ALLOWED4: [u8; 4] = [198, 51, 100, 7];
const PROXY4: [u8; 4] = [10, 9, 0, 5];

const POLICY: &str = r#"
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
prefilter = false

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[listener]]
port = 8081
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["10.9.0.5"]

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7"]

[[key]]
prefix = "a7c0ffee"
allow = ["203.0.113.9"]
"#;

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason, what: &str) {
    l.expect(frame, reason, what);
}

fn request(key: &str) -> Vec<u8> {
    http_request("GET", "/", &[("Host", "x"), ("X-MBX-APIKEY", key)])
}

fn loaded() -> Loaded {
    let mut l = Loaded::new(POLICY).unwrap();
    // Every SYN here is sent by the test itself.
    l.auto_syn = false;
    l
}

/// A SYN at `isn` on `c` (which passes), then a request with `key` at `isn + 1`, which must
/// get `reason`.
fn connection(l: &mut Loaded, c: &Pkt, isn: u32, key: &str, reason: Reason, what: &str) {
    expect(l, &c.clone().seq(isn).syn().build(), PassHandshake, what);
    let req = request(key);
    expect(
        l,
        &c.clone().seq(isn.wrapping_add(1)).payload(&req).build(),
        reason,
        what,
    );
}

#[test]
fn data_without_a_recorded_syn_is_not_judged_as_a_stream_start() {
    let mut l = loaded();
    let c = || Pkt::tcp4(ALLOWED4, EDGE4, 41000, 8080);
    // A connection older than the program (or one whose SYN found the table full): where
    // its stream starts is unknown, even for a request with an allowed key.
    expect(
        &mut l,
        &c().seq(1001).payload(&request("37c541a1aaaa")).build(),
        DropMalformed,
        "no SYN recorded",
    );
    expect(&mut l, &c().seq(1000).syn().build(), PassHandshake, "SYN");
    expect(
        &mut l,
        &c().seq(1001).payload(&request("37c541a1aaaa")).build(),
        PassAllowed,
        "at ISN + 1",
    );
}

#[test]
fn bytes_before_the_stream_start_are_refused() {
    let mut l = loaded();
    let c = || Pkt::tcp4(ALLOWED4, EDGE4, 41001, 8080);
    expect(&mut l, &c().seq(5000).syn().build(), PassHandshake, "SYN");
    // The server would trim the first bytes and read the rest from its window start: the
    // filter's parse from byte 0 would not be the server's.
    for seq in [4990u32, 5000, 4_000_000_000] {
        expect(
            &mut l,
            &c().seq(seq).payload(&request("37c541a1aaaa")).build(),
            DropMalformed,
            &format!("data at {seq}"),
        );
    }
    // Ahead of the start: a hole the server waits on, never a start.
    expect(
        &mut l,
        &c().seq(5010).payload(&request("37c541a1aaaa")).build(),
        DropMalformed,
        "data past ISN + 1",
    );
    expect(
        &mut l,
        &c().seq(5001).payload(&request("37c541a1aaaa")).build(),
        PassAllowed,
        "at ISN + 1",
    );
}

#[test]
fn a_proxy_header_before_the_stream_start_is_refused() {
    // The differential fuzzer's finding: a trusted proxy's segment beginning before ISN + 1.
    // The server trims the head of the PROXY header and reads the stream without it.
    let mut l = loaded();
    let c = || Pkt::tcp4(PROXY4, EDGE4, 41002, 8081);
    let mut hdr = b"PROXY TCP4 198.51.100.7 192.0.2.1 50000 8081\r\n".to_vec();
    hdr.extend_from_slice(&request("37c541a1aaaa"));
    expect(&mut l, &c().seq(7000).syn().build(), PassHandshake, "SYN");
    expect(
        &mut l,
        &c().seq(7000 - 10).payload(&hdr).build(),
        DropMalformed,
        "header starting 11 bytes early",
    );
    expect(
        &mut l,
        &c().seq(7001).payload(&hdr).build(),
        PassAllowed,
        "at ISN + 1",
    );
}

#[test]
fn a_second_connection_on_a_tuple_starts_once_and_only_far_from_the_first() {
    let mut l = loaded();
    let c = Pkt::tcp4(ALLOWED4, EDGE4, 41003, 8080);
    connection(&mut l, &c, 100, "37c541a1aaaa", PassAllowed, "connection 1");
    // A second SYN far from the first connection's window: its data starts a stream of its
    // own (the server answers the SYN with a challenge ACK while connection 1 lives, and
    // then these bytes fall outside its window).
    let isn2 = 100u32.wrapping_add(1 << 31);
    let what = "connection 2 judged from its start";
    connection(&mut l, &c, isn2, "37c541a1bbbb", PassAllowed, what);
    // A third ISN could bounce back into connection 1's forgotten window: never a start.
    let isn3 = 100u32.wrapping_add(3 << 30);
    connection(
        &mut l,
        &c,
        isn3,
        "37c541a1aaaa",
        DropMalformed,
        "connection 3",
    );
}

/// Passes `bytes` of body in 1448-byte segments after `seq` on the connection `c` (one frame
/// whose sequence number is rewritten: the filter does not read the checksum); returns the
/// next sequence number.
fn pass_body(l: &mut Loaded, c: &Pkt, mut seq: u32, bytes: u32) -> u32 {
    use aya::programs::{TestRun as _, TestRunOptions};
    let mut frame = c.clone().seq(seq).payload(&[b'a'; 1448]).build();
    let seq_at = c.l4_offset() + 4;
    let prog = l.dp.program().expect("program");
    let end = seq.wrapping_add(bytes);
    while end.wrapping_sub(seq) < 1 << 31 && seq != end {
        frame[seq_at..seq_at + 4].copy_from_slice(&seq.to_be_bytes());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: 1,
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(r.return_value, tests::harness::XDP_PASS, "body at {seq}");
        seq = seq.wrapping_add(1448);
    }
    seq
}

const MIB: u32 = 1 << 20;

/// A connection on `sport` (SYN at 100) that passes a request and then 140 MiB of body: the
/// server may have taken only part of it (segments with a bad checksum, or sent into a
/// closed window, pass the filter and are dropped by the server), so it may wait anywhere
/// between the stream start and the last byte. Returns the connection and its next byte.
fn long_connection(l: &mut Loaded, sport: u16) -> (Pkt, u32) {
    let c = Pkt::tcp4(ALLOWED4, EDGE4, sport, 8080);
    connection(l, &c, 100, "37c541a1aaaa", PassAllowed, "connection 1");
    let len = request("37c541a1aaaa").len() as u32;
    let next = pass_body(l, &c, 101 + len, 140 * MIB);
    (c, next)
}

#[test]
fn a_second_start_where_the_server_may_still_be_waiting_is_refused() {
    let mut l = loaded();
    // A second ISN 70 MiB into connection 1's span: more than a window from the first ISN
    // and from the filter's positions, but a server that stopped at 70 MiB would splice its
    // data onto connection 1.
    let (c, _) = long_connection(&mut l, 41010);
    let inside = 101 + 70 * MIB;
    connection(
        &mut l,
        &c,
        inside,
        "37c541a1bbbb",
        DropMalformed,
        "a start inside the span",
    );
    // The same with the second ISN beyond every byte connection 1 sent: a start.
    let (c, next) = long_connection(&mut l, 41011);
    let beyond = next.wrapping_add(70 * MIB);
    connection(
        &mut l,
        &c,
        beyond,
        "37c541a1bbbb",
        PassAllowed,
        "a start beyond the span",
    );
}

#[test]
fn a_further_stream_starts_once_the_one_before_the_flows_has_been_idle() {
    let mut l = loaded();
    // What the daemon does: the sweep writes the idle time after which servers have closed
    // a connection whose client sent nothing (1 s here).
    let _gc = keywall::dataplane::HeldGc::open(&l.pin_dir, std::time::Duration::from_secs(1))
        .expect("sweep");
    // Four ISNs a quarter of the sequence space apart: each far from the others.
    let isn = |i: u32| 100u32.wrapping_add(i << 30);
    // Connection 1 sent data a moment ago: a third stream could still meet it at the server.
    let a = Pkt::tcp4(ALLOWED4, EDGE4, 41020, 8080);
    connection(
        &mut l,
        &a,
        isn(0),
        "37c541a1aaaa",
        PassAllowed,
        "A: connection 1",
    );
    connection(
        &mut l,
        &a,
        isn(2),
        "37c541a1aaaa",
        PassAllowed,
        "A: connection 2",
    );
    connection(
        &mut l,
        &a,
        isn(1),
        "37c541a1aaaa",
        DropMalformed,
        "A: connection 3, too soon",
    );
    // Once connection 1 has been idle for that long, the server holds connection 2 at most.
    let b = Pkt::tcp4(ALLOWED4, EDGE4, 41021, 8080);
    connection(
        &mut l,
        &b,
        isn(0),
        "37c541a1aaaa",
        PassAllowed,
        "B: connection 1",
    );
    connection(
        &mut l,
        &b,
        isn(2),
        "37c541a1aaaa",
        PassAllowed,
        "B: connection 2",
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // Connection 2 goes on sending; connection 1 has been idle since the sleep.
    let req = request("37c541a1aaaa");
    let next = isn(2) + 1 + req.len() as u32;
    expect(
        &mut l,
        &b.clone().seq(next).payload(&req).build(),
        PassAllowed,
        "B: 2 again",
    );
    connection(
        &mut l,
        &b,
        isn(1),
        "37c541a1aaaa",
        PassAllowed,
        "B: connection 3, 1 idle",
    );
    // Connection 2 sent data just before it: a fourth must wait.
    connection(
        &mut l,
        &b,
        isn(3),
        "37c541a1aaaa",
        DropMalformed,
        "B: connection 4, too soon",
    );
}

#[test]
fn a_syn_near_the_recorded_one_loses_the_stream_start() {
    let mut l = loaded();
    let c = || Pkt::tcp4(ALLOWED4, EDGE4, 41004, 8080);
    expect(&mut l, &c().seq(9000).syn().build(), PassHandshake, "SYN");
    // Which of the two the server holds is not knowable, and their windows overlap.
    expect(
        &mut l,
        &c().seq(8990).syn().build(),
        PassHandshake,
        "SYN 10 earlier",
    );
    for seq in [9001u32, 8991] {
        expect(
            &mut l,
            &c().seq(seq).payload(&request("37c541a1aaaa")).build(),
            DropMalformed,
            &format!("data at {seq}"),
        );
    }
    // A retransmitted SYN (the same ISN) changes nothing.
    let mut l = loaded();
    expect(&mut l, &c().seq(9000).syn().build(), PassHandshake, "SYN");
    expect(
        &mut l,
        &c().seq(9000).syn().build(),
        PassHandshake,
        "SYN again",
    );
    expect(
        &mut l,
        &c().seq(9001).payload(&request("37c541a1aaaa")).build(),
        PassAllowed,
        "data after a retransmitted SYN",
    );
}

#[test]
fn an_evicted_refused_connection_stays_refused() {
    // A refused connection whose flow entry is evicted: the server still holds it, and a
    // new SYN near its window must not make the same bytes a fresh, misplaced stream.
    let mut l = loaded();
    let c = || Pkt::tcp4(ALLOWED4, EDGE4, 41005, 8080);
    expect(&mut l, &c().seq(300).syn().build(), PassHandshake, "SYN");
    expect(
        &mut l,
        &c().seq(301).payload(&request("a7c0ffee9999")).build(),
        DropNotAllowed,
        "refused",
    );
    let keys: Vec<_> = l.dp.maps.flows.keys().filter_map(|k| k.ok()).collect();
    assert_eq!(keys.len(), 1, "one flow");
    l.dp.maps.flows.remove(&keys[0]).unwrap();
    expect(
        &mut l,
        &c().seq(290).syn().build(),
        PassHandshake,
        "SYN near",
    );
    expect(
        &mut l,
        &c().seq(291).payload(&request("37c541a1aaaa")).build(),
        DropMalformed,
        "data at the near SYN's start",
    );
}

#[test]
fn a_refused_connection_stays_refused_without_a_scan_until_the_policy_changes() {
    let mut l = loaded();
    let c = || Pkt::tcp4(ALLOWED4, EDGE4, 41006, 8080);
    expect(&mut l, &c().seq(600).syn().build(), PassHandshake, "SYN");
    expect(
        &mut l,
        &c().seq(601).payload(&request("a7c0ffee9999")).build(),
        DropNotAllowed,
        "refused",
    );
    // Other bytes in the refused ones' place (a TCP sender only resends them): refused
    // whatever they say, before any scan.
    expect(
        &mut l,
        &c().seq(601).payload(&request("37c541a1aaaa")).build(),
        DropFlow,
        "an allowed key in the refused request's place",
    );
    // A policy change: the connection is judged again.
    l.apply(&POLICY.replace("allow = [\"203.0.113.9\"]", "allow = [\"198.51.100.7\"]"))
        .unwrap();
    expect(
        &mut l,
        &c().seq(601).payload(&request("a7c0ffee9999")).build(),
        PassAllowed,
        "after the policy allowed it",
    );
}
