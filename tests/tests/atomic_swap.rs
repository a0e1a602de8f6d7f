//! No packet ever sees a half-applied policy: packets run through the program on other CPUs
//! while whole policies are swapped, and every verdict must match one of the two policies.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use keywall::policy::{Key, Policy};
use tests::{
    harness::{Loaded, XDP_DROP, XDP_PASS},
    packet::{Pkt, http_request},
};

const EDGE: [u8; 4] = [192, 0, 2, 1];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const BROKER: [u8; 4] = [203, 0, 113, 77];

fn base() -> Policy {
    Policy::from_toml_str(
        r#"
[settings]
key_prefix_len = 8
[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]
[ipsets]
broker = ["203.0.113.0/24"]
"#,
    )
    .unwrap()
}

fn key(prefix: &str, allow: &[&str], ipsets: &[&str], locked: bool) -> Key {
    Key {
        prefix: prefix.into(),
        allow: allow.iter().map(|s| s.to_string()).collect(),
        ipsets: ipsets.iter().map(|s| s.to_string()).collect(),
        locked,
        lock_reason: None,
        locked_until: None,
        max_new_connections_per_s: None,
        max_requests_per_s: None,
    }
}

/// Two very different policies that agree on the probed verdicts: "alwaysok" is allowed from
/// CLIENT (inline host in one, CIDR set in the other) and from BROKER through the ipset;
/// "neverok1" is locked in one and bound elsewhere in the other. Thousands of filler keys
/// come and go between them, so every swap rewrites sets, keys and the slot.
fn policies() -> (Policy, Policy) {
    let mut a = base();
    let mut b = base();
    a.key
        .push(key("alwaysok", &["198.51.100.7"], &["broker"], false));
    b.key.push(key(
        "alwaysok",
        &["198.51.100.0/29", "2001:db8::1"],
        &["broker"],
        false,
    ));
    a.key.push(key("neverok1", &["198.51.100.7"], &[], true));
    b.key.push(key("neverok1", &["10.9.9.9"], &[], false));
    for i in 0..3000 {
        a.key.push(key(
            &format!("fa{i:06}"),
            &["198.51.100.9", "2001:db8::/64"],
            &[],
            false,
        ));
        b.key.push(key(
            &format!("fb{i:06}"),
            &["10.0.0.0/8"],
            &["broker"],
            i % 2 == 0,
        ));
    }
    (a, b)
}

#[test]
fn whole_policy_swaps_are_atomic_under_traffic() {
    let (a, b) = policies();
    let cap = keywall::dataplane::Capacity {
        keys: 16384,
        allow: 65536,
        sets: 16384,
        flows: 4096,
        prefilter_words_log2: 12,
    };
    let mut l = Loaded::with_capacity("", cap).unwrap();
    l.apply_policy(&a).unwrap();
    l.dp.pin_program().unwrap();
    let prog_pin = l.pin_dir.join("prog");

    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let probes: Vec<(Vec<u8>, u32, &str)> = vec![
        (
            frame(CLIENT, 1, "alwaysok"),
            XDP_PASS,
            "allowed key from its host",
        ),
        (
            frame(BROKER, 2, "alwaysok"),
            XDP_PASS,
            "allowed key from its ipset",
        ),
        (
            frame(CLIENT, 3, "neverok1"),
            XDP_DROP,
            "locked or unbound-elsewhere key",
        ),
        (
            frame([198, 51, 100, 200], 4, "alwaysok"),
            XDP_DROP,
            "allowed key from elsewhere",
        ),
    ];
    for (f, ..) in &probes {
        l.connect(f);
    }
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            let runs = runs.clone();
            let probes = probes.clone();
            let pin = prog_pin.clone();
            thread::spawn(move || {
                let prog = Xdp::from_pin(&pin, XdpAttachType::Interface).unwrap();
                let mut bad = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for (f, want, what) in &probes {
                        let r = prog
                            .test_run(TestRunOptions {
                                data_in: Some(f),
                                repeat: 1,
                                ..Default::default()
                            })
                            .unwrap();
                        runs.fetch_add(1, Ordering::Relaxed);
                        if r.return_value != *want {
                            bad.push(format!("{what}: got {} want {want}", r.return_value));
                        }
                    }
                }
                bad
            })
        })
        .collect();

    let t0 = Instant::now();
    let mut swaps = 0;
    while t0.elapsed() < Duration::from_secs(6) || swaps < 10 {
        l.apply_policy(if swaps % 2 == 0 { &b } else { &a })
            .unwrap();
        swaps += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let bad: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let n = runs.load(Ordering::Relaxed);
    assert!(swaps >= 10, "only {swaps} swaps");
    assert!(n > 10_000, "only {n} packets ran during the swaps");
    assert!(
        bad.is_empty(),
        "{} wrong verdicts of {n} during {swaps} swaps: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

fn frame(src: [u8; 4], n: u16, key: &str) -> Vec<u8> {
    // Every run is the key-bearing first packet of its connection, so it is judged afresh.
    Pkt::tcp4(src, EDGE, 50000 + n, 8080)
        .payload(&http_request(
            "GET",
            "/",
            &[("X-MBX-APIKEY", &format!("{key}rest"))],
        ))
        .build()
}
