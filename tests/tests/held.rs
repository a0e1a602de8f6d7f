//! A connection that passed bytes and then lost its flow entry (an LRU eviction) is never
//! judged again as a new connection: the server may still hold what passed. The daemon's
//! sweep forgets it once it has been idle for long enough.

use std::time::Duration;

use filter_common::Reason::{self, *};
use keywall::dataplane::HeldGc;
use tests::{
    harness::Loaded,
    packet::{Pkt, http_request},
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const ALLOWED4: [u8; 4] = [198, 51, 100, 7];

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

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7"]
"#;

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason, what: &str) {
    l.expect(frame, reason, what);
}

fn request() -> Vec<u8> {
    http_request(
        "GET",
        "/",
        &[("Host", "x"), ("X-MBX-APIKEY", "37c541a1deadbeef")],
    )
}

#[test]
fn an_evicted_connection_is_refused_until_the_sweep_forgets_it() {
    let mut l = Loaded::new(POLICY).unwrap();
    let conn = || Pkt::tcp4(ALLOWED4, EDGE4, 45000, 8080);
    expect(
        &mut l,
        &conn().payload(&request()).build(),
        PassAllowed,
        "first request",
    );
    // The flow entry goes (as an LRU eviction would take it); the connection lives on at the
    // server, so its next segment cannot be placed.
    let keys: Vec<_> = l.dp.maps.flows.keys().filter_map(|k| k.ok()).collect();
    assert_eq!(keys.len(), 1, "one flow");
    l.dp.maps.flows.remove(&keys[0]).unwrap();
    let next = conn().payload(&request()).build();
    expect(&mut l, &next, DropMalformed, "after the eviction");
    // A sweep with a long idle time keeps refusing it; one past the idle time forgets it.
    let mut gc = HeldGc::open(&l.pin_dir, Duration::from_secs(3600)).unwrap();
    assert_eq!(gc.sweep().unwrap(), 0);
    expect(&mut l, &next, DropMalformed, "before the idle time");
    gc.idle = Duration::ZERO;
    assert_eq!(gc.sweep().unwrap(), 1);
    // Forgotten: the segment alone is now a stream whose start no SYN recorded; a new
    // connection on the tuple (its SYN, then data at ISN + 1) is judged afresh.
    expect(&mut l, &next, DropMalformed, "forgotten, no SYN");
    expect(
        &mut l,
        &conn().seq(5000).syn().build(),
        PassHandshake,
        "a new connection's SYN",
    );
    expect(
        &mut l,
        &conn().seq(5001).payload(&request()).build(),
        PassAllowed,
        "forgotten: a new connection",
    );
}

#[test]
fn an_idle_connection_is_forgotten_whole() {
    let mut l = Loaded::new(POLICY).unwrap();
    let conn = || Pkt::tcp4(ALLOWED4, EDGE4, 45001, 8080);
    expect(
        &mut l,
        &conn().payload(&request()).build(),
        PassAllowed,
        "request",
    );
    let mut gc = HeldGc::open(&l.pin_dir, Duration::from_secs(3600)).unwrap();
    assert_eq!(gc.sweep().unwrap(), 0, "active: kept");
    assert_eq!(l.dp.maps.flows.keys().count(), 1);
    gc.idle = Duration::ZERO;
    assert_eq!(gc.sweep().unwrap(), 1, "idle: forgotten");
    assert_eq!(l.dp.maps.flows.keys().count(), 0);
    // Its tuple is free for a new connection.
    expect(
        &mut l,
        &conn().seq(76).syn().build(),
        PassHandshake,
        "a new connection's SYN",
    );
    expect(
        &mut l,
        &conn().seq(77).payload(&request()).build(),
        PassAllowed,
        "new connection on the tuple",
    );
}
