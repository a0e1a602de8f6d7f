//! Risk controls (issue 13) through BPF_PROG_TEST_RUN: locks that end on their own, and the
//! per-key activity the datapath records (once per judged key message, never per packet).

use filter_common::{
    KeyActivity,
    Reason::{self, *},
};
use keywall::{policy::key_prefix, risk};
use tests::{
    harness::{Loaded, XDP_DROP, XDP_PASS},
    packet::{Pkt, http_request},
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const ALLOWED4: [u8; 4] = [198, 51, 100, 7];
const OTHER4: [u8; 4] = [203, 0, 113, 8];

fn policy(keys: &str) -> String {
    format!(
        r#"
[settings]
prefilter = false

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]
{keys}"#
    )
}

fn req(key: &str) -> Vec<u8> {
    http_request(
        "GET",
        "/api/v3/account",
        &[("Host", "api.example"), ("X-MBX-APIKEY", key)],
    )
}

/// A new connection's first request (its own source port).
fn conn(src: [u8; 4], key: &str) -> Vec<u8> {
    thread_local!(static NEXT: std::cell::Cell<u16> = const { std::cell::Cell::new(41000) });
    let port = NEXT.with(|n| {
        let p = n.get();
        n.set(p + 1);
        p
    });
    Pkt::tcp4(src, EDGE4, port, 8080).payload(&req(key)).build()
}

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason) {
    let (action, got, _) = l.run(frame);
    assert_eq!(got, reason);
    assert_eq!(action, if reason.is_drop() { XDP_DROP } else { XDP_PASS });
}

fn at(unix: i64) -> String {
    risk::format_rfc3339(unix)
}

#[test]
fn a_lock_with_an_expiry_holds_until_then_and_ends_on_its_own() {
    // Loaded first: loading takes seconds on a busy machine, the expiries count from now.
    let mut l = Loaded::new(&policy("")).unwrap();
    let now = keywall::state::now_unix() as i64;
    l.apply(&policy(&format!(
        r#"
[[key]]
prefix = "forever1"
allow = ["198.51.100.7"]
locked = true
lock_reason = "no expiry"

[[key]]
prefix = "expired1"
allow = ["198.51.100.7"]
locked = true
locked_until = "{}"

[[key]]
prefix = "future01"
allow = ["198.51.100.7"]
locked = true
lock_reason = "investigation"
locked_until = "{}"

[[key]]
prefix = "soon0001"
allow = ["198.51.100.7"]
locked = true
locked_until = "{}"
"#,
        at(now - 1),
        at(now + 3600),
        at(now + 3),
    )))
    .unwrap();
    expect(&mut l, &conn(ALLOWED4, "forever1xxxx"), DropLocked);
    expect(&mut l, &conn(ALLOWED4, "expired1xxxx"), PassAllowed);
    // An expired lock leaves the allowlist in force.
    expect(&mut l, &conn(OTHER4, "expired1xxxx"), DropNotAllowed);
    expect(&mut l, &conn(ALLOWED4, "future01xxxx"), DropLocked);
    expect(&mut l, &conn(ALLOWED4, "soon0001xxxx"), DropLocked);
    // No write to the maps from here on: the lock ends on the clock alone.
    std::thread::sleep(std::time::Duration::from_millis(4200));
    expect(&mut l, &conn(ALLOWED4, "soon0001xxxx"), PassAllowed);
    expect(&mut l, &conn(OTHER4, "soon0001xxxx"), DropNotAllowed);
    expect(&mut l, &conn(ALLOWED4, "future01xxxx"), DropLocked);
    expect(&mut l, &conn(ALLOWED4, "forever1xxxx"), DropLocked);
}

#[test]
fn a_connection_refused_under_a_lock_stays_refused_after_it_expires() {
    // Loaded first: loading takes seconds on a busy machine, the expiries count from now.
    let mut l = Loaded::new(&policy("")).unwrap();
    let now = keywall::state::now_unix() as i64;
    l.apply(&policy(&format!(
        r#"
[[key]]
prefix = "soon0002"
allow = ["198.51.100.7"]
locked = true
locked_until = "{}"
"#,
        at(now + 2),
    )))
    .unwrap();
    let first = Pkt::tcp4(ALLOWED4, EDGE4, 42000, 8080)
        .payload(&req("soon0002xxxx"))
        .build();
    expect(&mut l, &first, DropLocked);
    std::thread::sleep(std::time::Duration::from_millis(3200));
    // The same connection's retransmission: its refusal is kept (expiry only ever opens new
    // connections, it never turns a refusal into a pass mid-stream).
    let (_, got, _) = l.run(&first);
    assert!(got.is_drop(), "{got:?}");
    expect(&mut l, &conn(ALLOWED4, "soon0002xxxx"), PassAllowed);
}

fn activity(l: &Loaded, prefix: &str) -> KeyActivity {
    let slot = l.dp.maps.control.get(&0, 0).unwrap().active_slot as usize & 1;
    let e = l.dp.maps.keys.get(&key_prefix(prefix), 0).unwrap();
    l.dp.maps.activity.get(&e.slot[slot].stat_idx, 0).unwrap()
}

#[test]
fn activity_is_recorded_once_per_key_message() {
    let mut l = Loaded::new(&policy(
        r#"
[[key]]
prefix = "active01"
allow = ["198.51.100.7"]

[[key]]
prefix = "unused01"
allow = ["198.51.100.7"]
"#,
    ))
    .unwrap();
    let fresh = activity(&l, "active01");
    assert_eq!((fresh.requests, fresh.connections), (0, 0));
    assert_eq!((fresh.last_allowed_s, fresh.last_refused_s), (0, 0));
    assert_ne!(
        fresh.since_s, 0,
        "the loader stamps when the key got its slot"
    );

    // A keep-alive connection: two requests, plus a bare ACK that carries no key.
    let p = Pkt::tcp4(ALLOWED4, EDGE4, 43000, 8080);
    expect(
        &mut l,
        &p.clone().payload(&req("active01xxxx")).build(),
        PassAllowed,
    );
    expect(
        &mut l,
        &p.clone().payload(&req("active01xxxx")).build(),
        PassAllowed,
    );
    expect(&mut l, &p.clone().build(), PassFlow);
    let a = activity(&l, "active01");
    assert_eq!((a.requests, a.connections), (2, 1), "{a:?}");
    let now = risk::mono_now_s();
    assert!(a.last_allowed_s.abs_diff(now) <= 2, "{a:?} now {now}");
    assert_eq!(a.last_refused_s, 0);

    // A refused attempt from another network: counted, with its reason, and its network.
    expect(&mut l, &conn(OTHER4, "active01xxxx"), DropNotAllowed);
    let a = activity(&l, "active01");
    assert_eq!((a.requests, a.connections), (3, 2));
    assert_eq!(a.last_refused_reason, DropNotAllowed as u8);
    assert!(a.last_refused_s.abs_diff(now) <= 2);
    assert_eq!(risk::networks_in_window(&a.nets, now, 3600), 2);

    // Four more networks (the same /24 twice): five distinct networks are remembered.
    for src in [[10, 1, 1, 1], [10, 1, 1, 2], [10, 1, 2, 1], [10, 1, 3, 1]] {
        expect(&mut l, &conn(src, "active01xxxx"), DropNotAllowed);
    }
    let a = activity(&l, "active01");
    assert_eq!(risk::networks_in_window(&a.nets, now, 3600), 5);
    // Later packets of a refused connection are not key messages: nothing moves.
    let refused = Pkt::tcp4(OTHER4, EDGE4, 44000, 8080);
    expect(
        &mut l,
        &refused.clone().payload(&req("active01xxxx")).build(),
        DropNotAllowed,
    );
    let before = activity(&l, "active01");
    expect(&mut l, &refused.clone().build(), DropFlow);
    assert_eq!(activity(&l, "active01"), before);

    // Unknown keys have no slot; other keys are untouched.
    expect(&mut l, &conn(ALLOWED4, "nosuch01xxxx"), DropUnknownKey);
    assert_eq!(activity(&l, "unused01").requests, 0);
}

#[test]
fn a_deleted_key_s_slot_starts_clean_for_the_next_key() {
    let mut l = Loaded::new(&policy(
        r#"
[[key]]
prefix = "gone0001"
allow = ["198.51.100.7"]
"#,
    ))
    .unwrap();
    expect(&mut l, &conn(ALLOWED4, "gone0001xxxx"), PassAllowed);
    assert_eq!(activity(&l, "gone0001").requests, 1);
    l.apply(&policy("")).unwrap();
    l.apply(&policy(
        r#"
[[key]]
prefix = "new00001"
allow = ["198.51.100.7"]
"#,
    ))
    .unwrap();
    let a = activity(&l, "new00001");
    assert_eq!(
        (a.requests, a.last_allowed_s, a.nets),
        (0, 0, [0; 5]),
        "{a:?}"
    );
}

#[test]
fn rate_limits_drop_what_is_over_and_never_open_a_refusal() {
    let mut l = Loaded::new(&policy(
        r#"
[[key]]
prefix = "limreq01"
allow = ["198.51.100.7"]
max_requests_per_s = { rate = 1, burst = 2 }

[[key]]
prefix = "limcon01"
allow = ["198.51.100.7"]
max_new_connections_per_s = 1

[[key]]
prefix = "free0001"
allow = ["198.51.100.7"]
"#,
    ))
    .unwrap();
    // A burst of two, then the third is over.
    expect(&mut l, &conn(ALLOWED4, "limreq01xxxx"), PassAllowed);
    expect(&mut l, &conn(ALLOWED4, "limreq01xxxx"), PassAllowed);
    let over = conn(ALLOWED4, "limreq01xxxx");
    expect(&mut l, &over, DropRateLimited);
    let a = activity(&l, "limreq01");
    assert_eq!(a.last_refused_reason, DropRateLimited as u8);
    // A refusal stays a refusal, whatever the limit's state.
    expect(&mut l, &conn(OTHER4, "limreq01xxxx"), DropNotAllowed);
    // An unlimited key is never limited.
    for _ in 0..20 {
        expect(&mut l, &conn(ALLOWED4, "free0001xxxx"), PassAllowed);
    }
    // A second later the client's retransmission of the refused request is judged afresh.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    expect(&mut l, &over, PassAllowed);

    // Connections: one a second; a keep-alive connection's later requests are not new ones.
    let p = Pkt::tcp4(ALLOWED4, EDGE4, 45000, 8080);
    expect(
        &mut l,
        &p.clone().payload(&req("limcon01xxxx")).build(),
        PassAllowed,
    );
    expect(
        &mut l,
        &p.clone().payload(&req("limcon01xxxx")).build(),
        PassAllowed,
    );
    expect(&mut l, &conn(ALLOWED4, "limcon01xxxx"), DropRateLimited);
    // The refused connection's other segments do not pass meanwhile (nothing was judged).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    expect(&mut l, &conn(ALLOWED4, "limcon01xxxx"), PassAllowed);
}

#[test]
fn a_keepalive_request_over_the_limit_is_retried_in_place() {
    let mut l = Loaded::new(&policy("")).unwrap();
    // Defaults come from settings; a key turns them off with 0.
    l.apply(&format!(
        "{}\n{}",
        r#"
[settings]
prefilter = false
max_requests_per_s = { rate = 1, burst = 1 }

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]
"#,
        r#"
[[key]]
prefix = "deflim01"
allow = ["198.51.100.7"]

[[key]]
prefix = "nolimit1"
allow = ["198.51.100.7"]
max_requests_per_s = 0
"#
    ))
    .unwrap();
    let p = Pkt::tcp4(ALLOWED4, EDGE4, 46000, 8080);
    expect(
        &mut l,
        &p.clone().payload(&req("deflim01xxxx")).build(),
        PassAllowed,
    );
    let second = p.clone().payload(&req("deflim01xxxx")).build();
    expect(&mut l, &second, DropRateLimited);
    // Nothing after it is in position: a third request waits for the second.
    let (_, got, _) = l.run(&p.clone().payload(&req("deflim01xxxx")).build());
    assert!(got.is_drop(), "{got:?}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    expect(&mut l, &second, PassAllowed);
    for _ in 0..5 {
        expect(&mut l, &conn(ALLOWED4, "nolimit1xxxx"), PassAllowed);
    }
}
