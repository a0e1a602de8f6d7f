//! The SYN prefilter through BPF_PROG_TEST_RUN: handshakes to listeners from sources that no
//! key allows are dropped (`drop_prefilter`); every allowed source gets through.

use std::collections::BTreeSet;

use filter_common::Reason::{self, *};
use keywall::{
    policy::{Key, Policy, key_prefix},
    prefilter,
};
use tests::{
    harness::{Loaded, XDP_DROP, XDP_PASS},
    packet::{Pkt, TCP_ACK, TCP_SYN},
};

const EDGE4: [u8; 4] = [192, 0, 2, 1];
const EDGE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xee, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
];

const POLICY: &str = r#"
[settings]
key_prefix_len = 8
unbound_keys = "pass"
prefilter = true

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[listener]]
port = 443
locator = "tls-sni"
sni_suffix = ".api.example.com"
label_prefix = "k-"

[[listener]]
port = 8443
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["10.9.0.0/16", "2001:db8:ffff::/48"]

[ipsets]
broker-a = ["203.0.113.0/24", "2001:db8:aa::/48"]
unused = ["100.64.0.0/10"]

[[key]]
prefix = "37c541a1"
allow = ["198.51.100.7", "172.16.0.0/12", "2001:db8::9", "2001:db8:1::/48"]

[[key]]
prefix = "brokerk1"
ipsets = ["broker-a"]

[[key]]
prefix = "lockedk1"
allow = ["192.0.2.77", "2001:db8:77::/64"]
locked = true
"#;

fn syn4(src: [u8; 4], port: u16) -> Vec<u8> {
    Pkt::tcp4(src, EDGE4, 40000, port).syn().build()
}

fn syn6(src: [u8; 16], port: u16) -> Vec<u8> {
    Pkt::tcp6(src, EDGE6, 40000, port).syn().build()
}

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

fn v4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

fn expect(l: &mut Loaded, frame: &[u8], reason: Reason, what: &str) {
    let (action, got, audit) = l.run(frame);
    assert_eq!(got, reason, "{what}");
    assert!(!audit);
    let want = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
    assert_eq!(action, want, "action for {what}");
}

#[test]
fn syns_from_allowed_sources_pass_and_others_are_dropped() {
    let mut l = Loaded::new(POLICY).unwrap();
    for port in [8080, 443] {
        for s in [
            "198.51.100.7", // host
            "172.16.0.1",   // inside a CIDR
            "172.31.255.254",
            "203.0.113.200", // inside a bound ipset
            "192.0.2.77",    // a locked key's source: the union keeps it
        ] {
            expect(&mut l, &syn4(v4(s), port), PassHandshake, s);
        }
        for s in [
            "2001:db8::9",
            "2001:db8:1:ffff::1",
            "2001:db8:aa::5",
            "2001:db8:77::1",
        ] {
            expect(&mut l, &syn6(v6(s), port), PassHandshake, s);
        }
        for s in [
            "198.51.100.8",
            "172.32.0.1",
            "203.0.114.1",
            "100.64.0.1", // an ipset no key binds
            "10.9.0.5",   // a trusted proxy: not a client of this listener
        ] {
            expect(&mut l, &syn4(v4(s), port), DropPrefilter, s);
        }
        for s in ["2001:db8::8", "2001:db8:2::1", "2001:db8:ab::1", "fe80::1"] {
            expect(&mut l, &syn6(v6(s), port), DropPrefilter, s);
        }
    }
    // Only a bare SYN to a listener is prefiltered.
    let other = v4("198.51.100.8");
    expect(&mut l, &syn4(other, 22), PassNotApi, "SYN to another port");
    let synack = Pkt::tcp4(other, EDGE4, 40000, 8080)
        .tcp_flag_bits(TCP_SYN | TCP_ACK)
        .build();
    expect(&mut l, &synack, PassHandshake, "SYN-ACK");
    let ack = Pkt::tcp4(other, EDGE4, 40001, 8080).build();
    expect(&mut l, &ack, PassHandshake, "bare ACK");
    // VLAN-tagged SYNs are judged the same way.
    let tagged = Pkt::tcp4(other, EDGE4, 40000, 8080)
        .vlan(0x8100, 7)
        .syn()
        .build();
    expect(&mut l, &tagged, DropPrefilter, "VLAN-tagged SYN");
    let tagged = Pkt::tcp4(v4("198.51.100.7"), EDGE4, 40000, 8080)
        .vlan(0x88a8, 7)
        .vlan(0x8100, 8)
        .syn()
        .build();
    expect(
        &mut l,
        &tagged,
        PassHandshake,
        "QinQ SYN from an allowed source",
    );
}

#[test]
fn proxy_protocol_listeners_prefilter_against_trusted_proxies() {
    let mut l = Loaded::new(POLICY).unwrap();
    expect(
        &mut l,
        &syn4(v4("10.9.0.5"), 8443),
        PassHandshake,
        "trusted proxy",
    );
    expect(
        &mut l,
        &syn6(v6("2001:db8:ffff::5"), 8443),
        PassHandshake,
        "trusted proxy v6",
    );
    // Clients reach this listener only through a proxy.
    expect(
        &mut l,
        &syn4(v4("198.51.100.7"), 8443),
        DropPrefilter,
        "allowed client, not a proxy",
    );
    expect(
        &mut l,
        &syn4(v4("10.10.0.5"), 8443),
        DropPrefilter,
        "untrusted",
    );
    expect(
        &mut l,
        &syn6(v6("2001:db8::9"), 8443),
        DropPrefilter,
        "allowed client v6",
    );
}

#[test]
fn prefilter_is_off_while_a_key_passes_from_anywhere() {
    let other = v4("198.51.100.8");
    let open = format!("{POLICY}\n[[key]]\nprefix = \"unboundk\"\n");
    let mut l = Loaded::new(&open).unwrap();
    expect(
        &mut l,
        &syn4(other, 8080),
        PassHandshake,
        "unbound key passes",
    );
    // A locked unbound key passes nobody, and with unbound_keys = "drop" none does.
    l.apply(&open.replace(
        "prefix = \"unboundk\"",
        "prefix = \"unboundk\"\nlocked = true",
    ))
    .unwrap();
    expect(
        &mut l,
        &syn4(other, 8080),
        DropPrefilter,
        "locked unbound key",
    );
    l.apply(&open.replace("unbound_keys = \"pass\"", "unbound_keys = \"drop\""))
        .unwrap();
    expect(
        &mut l,
        &syn4(other, 8080),
        DropPrefilter,
        "unbound_keys = drop",
    );
    l.apply(&POLICY.replace("prefilter = true", "prefilter = false"))
        .unwrap();
    expect(
        &mut l,
        &syn4(other, 8080),
        PassHandshake,
        "prefilter = false",
    );
    // Audit mode counts what the prefilter would drop and passes it.
    l.apply(&POLICY.replace("[settings]", "[settings]\nenforce = false"))
        .unwrap();
    let (action, got, audit) = l.run(&syn4(other, 8080));
    assert_eq!((action, got, audit), (XDP_PASS, DropPrefilter, true));
}

#[test]
fn more_than_eight_prefix_lengths_are_coarsened_safely() {
    // 14 IPv4 and 10 IPv6 prefix lengths over several keys (each key's own set stays within
    // 8): the union needs coarsening, and still every source inside an entry passes.
    let mut p = Policy::from_toml_str(POLICY).unwrap();
    let mut inside: Vec<(u8, [u8; 16])> = Vec::new();
    for (k, range) in [(0u8, 8..=14u8), (1, 15..=21), (2, 22..=28)].into_iter() {
        let mut allow = Vec::new();
        for plen in range {
            // 10.<plen>.0.0/<plen> style networks that do not overlap each other.
            let net = u32::from_be_bytes([11 + k, plen, 0, 0]) & (u32::MAX << (32 - plen));
            let a = net.to_be_bytes();
            allow.push(format!("{}.{}.{}.{}/{plen}", a[0], a[1], a[2], a[3]));
            let host = net | (!(u32::MAX << (32 - plen)) & 0x5a5a_5a5a);
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&host.to_be_bytes());
            inside.push((4, b));
        }
        for plen in [40 + k * 4, 41 + k * 4, 42 + k * 4] {
            let mut a = v6("2001:db8:c000::");
            a[4] = 0xc0 | (k + 1); // 2001:db8:c1../40 and longer: no host bits set
            allow.push(format!("{}/{plen}", std::net::Ipv6Addr::from(a)));
            let mut h = a;
            h[15] = 0x77;
            inside.push((6, h));
        }
        p.key.push(Key {
            prefix: format!("widekey{k}"),
            allow,
            ipsets: vec![],
            locked: false,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        });
    }
    let mut l = Loaded::new("").unwrap();
    l.apply_policy(&p).unwrap();
    let (_, plan) = l.mirror.prefilter_half();
    assert!(plan.v4.len() <= 8 && plan.v6.len() <= 8, "{plan:?}");
    let all_v4: BTreeSet<u8> = (8..=32).collect();
    assert!(plan.v4.iter().all(|p| all_v4.contains(p)));
    for (fam, a) in inside {
        let f = if fam == 4 {
            syn4(a[..4].try_into().unwrap(), 8080)
        } else {
            syn6(a, 8080)
        };
        expect(&mut l, &f, PassHandshake, &format!("{a:?}"));
    }
    expect(&mut l, &syn4(v4("9.9.9.9"), 8080), DropPrefilter, "outside");
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
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random network of `family` with `plen` bits, and a random address inside it.
fn random_entry(rng: &mut Rng, v6: bool) -> (String, Vec<u8>) {
    if v6 {
        let plen = [128u8, 128, 64, 56, 48, 32][rng.below(6) as usize];
        let a = ((rng.next() as u128) << 64 | rng.next() as u128) >> 3 | 1u128 << 125; // 2000::/3
        let hostmask = if plen == 128 { 0 } else { u128::MAX >> plen };
        let net = a & !hostmask;
        let host = net | (((rng.next() as u128) << 64 | rng.next() as u128) & hostmask);
        (
            format!("{}/{plen}", std::net::Ipv6Addr::from(net)),
            std::net::Ipv6Addr::from(host).octets().to_vec(),
        )
    } else {
        let plen = [32u8, 32, 32, 24, 20, 16, 28, 30][rng.below(8) as usize];
        let a = rng.next() as u32 | 0x0100_0000;
        let net = if plen == 32 {
            a
        } else {
            a & (u32::MAX << (32 - plen))
        };
        let host = if plen == 32 {
            net
        } else {
            net | (rng.next() as u32 & !(u32::MAX << (32 - plen)))
        };
        (
            format!("{}/{plen}", std::net::Ipv4Addr::from(net)),
            host.to_be_bytes().to_vec(),
        )
    }
}

#[test]
fn random_policies_never_drop_an_allowed_source() {
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let mut l = Loaded::new("").unwrap();
    for round in 0..6 {
        let mut p = Policy::from_toml_str(POLICY).unwrap();
        p.key.clear();
        p.ipsets.clear();
        let mut inside = Vec::new();
        let mut nets: Vec<(String, Vec<u8>)> = Vec::new();
        let n_ipsets = rng.below(3);
        let mut ipset_inside = Vec::new();
        for i in 0..n_ipsets {
            let entries: Vec<(String, Vec<u8>)> = (0..1 + rng.below(20))
                .map(|_| {
                    let v6 = rng.below(3) == 0;
                    random_entry(&mut rng, v6)
                })
                .collect();
            p.ipsets.insert(
                format!("set{i}"),
                entries.iter().map(|e| e.0.clone()).collect(),
            );
            nets.extend(entries.iter().cloned());
            ipset_inside.push(entries.into_iter().map(|e| e.1).collect::<Vec<_>>());
        }
        for k in 0..(5 + rng.below(60)) {
            let entries: Vec<(String, Vec<u8>)> = (0..1 + rng.below(6))
                .map(|_| {
                    let v6 = rng.below(3) == 0;
                    random_entry(&mut rng, v6)
                })
                .collect();
            let mut ipsets = Vec::new();
            if n_ipsets > 0 && rng.below(4) == 0 {
                ipsets.push(format!("set{}", rng.below(n_ipsets)));
            }
            nets.extend(entries.iter().cloned());
            inside.extend(entries.iter().map(|e| e.1.clone()));
            p.key.push(Key {
                prefix: format!("r{round}k{k:05}"),
                allow: entries.into_iter().map(|e| e.0).collect(),
                ipsets,
                locked: rng.below(5) == 0,
                lock_reason: None,
                locked_until: None,
                max_new_connections_per_s: None,
                max_requests_per_s: None,
            });
        }
        // Only ipsets some key binds are part of the union.
        let bound: BTreeSet<&String> = p.key.iter().flat_map(|k| &k.ipsets).collect();
        for (i, hosts) in ipset_inside.into_iter().enumerate() {
            if bound.contains(&format!("set{i}")) {
                inside.extend(hosts);
            }
        }
        p.validate()
            .unwrap_or_else(|e| panic!("round {round}: generated an invalid policy: {e:?}"));
        l.apply_policy(&p).unwrap();

        for a in &inside {
            let f = if a.len() == 4 {
                syn4(a[..].try_into().unwrap(), 8080)
            } else {
                syn6(a[..].try_into().unwrap(), 8080)
            };
            let (_, got, _) = l.run(&f);
            assert_eq!(got, PassHandshake, "round {round}: allowed {a:?} dropped");
        }
        // Random sources outside every entry: nearly all dropped.
        let covered = |a: &[u8]| {
            nets.iter().any(|(n, _)| {
                let (fam, plen, net) = keywall::policy::parse_cidr(n).unwrap();
                let len = if fam == 4 { 4 } else { 16 };
                a.len() == len
                    && (0..plen as usize).all(|b| (a[b / 8] ^ net[b / 8]) & (0x80 >> (b % 8)) == 0)
            })
        };
        let (mut tried, mut dropped) = (0, 0);
        while tried < 150 {
            let a: Vec<u8> = if rng.below(2) == 0 {
                (rng.next() as u32 | 0x0100_0000).to_be_bytes().to_vec()
            } else {
                let mut a = ((rng.next() as u128) << 64 | rng.next() as u128).to_be_bytes();
                a[0] = 0x20 | (a[0] & 0x1f);
                a.to_vec()
            };
            if covered(&a) {
                continue;
            }
            tried += 1;
            let f = if a.len() == 4 {
                syn4(a[..].try_into().unwrap(), 8080)
            } else {
                syn6(a[..].try_into().unwrap(), 8080)
            };
            if l.run(&f).1 == DropPrefilter {
                dropped += 1;
            }
        }
        // Coarsening and Bloom false positives let a few through; most must be dropped.
        assert!(
            dropped >= 135,
            "round {round}: only {dropped}/{tried} dropped"
        );
    }
}

#[test]
fn patches_add_sources_in_place_and_locks_leave_the_filter_alone() {
    let mut l = Loaded::new(POLICY).unwrap();
    l.apply(POLICY).unwrap(); // both slots built, so what follows is incremental
    let cap = l.dp.maps.key_stats.len();
    let mut p = Policy::from_toml_str(POLICY).unwrap();
    let newcomer = v4("198.18.0.9");
    expect(&mut l, &syn4(newcomer, 8080), DropPrefilter, "before");

    // Upsert a key allowing a new source: set in place, no rebuild.
    p.key.push(Key {
        prefix: "newkey01".into(),
        allow: vec!["198.18.0.9".into(), "2001:db8:99::/48".into()],
        ipsets: vec![],
        locked: false,
        lock_reason: None,
        locked_until: None,
        max_new_connections_per_s: None,
        max_requests_per_s: None,
    });
    let changed = BTreeSet::from([key_prefix("newkey01")]);
    let c = p.compile().unwrap();
    let rep = l
        .mirror
        .apply_changes(&mut l.dp.maps, &c, Some(&changed), cap)
        .unwrap();
    assert!(!rep.prefilter_rebuilt, "{rep:?}");
    assert!(rep.prefilter_words_written > 0, "{rep:?}");
    expect(&mut l, &syn4(newcomer, 8080), PassHandshake, "after upsert");
    expect(
        &mut l,
        &syn6(v6("2001:db8:99::1"), 8080),
        PassHandshake,
        "after upsert, v6",
    );

    // A lock (and an unlock) changes no prefilter word in the target slot beyond catching up
    // with the previous apply; the second time round it changes none at all.
    for locked in [true, false, true, false] {
        p.key.last_mut().unwrap().locked = locked;
        let c = p.compile().unwrap();
        let changed = BTreeSet::from([key_prefix("newkey01")]);
        let rep = l
            .mirror
            .apply_changes(&mut l.dp.maps, &c, Some(&changed), cap)
            .unwrap();
        assert!(!rep.prefilter_rebuilt);
        expect(
            &mut l,
            &syn4(newcomer, 8080),
            PassHandshake,
            "locked or not",
        );
        if locked {
            // Each slot has seen the key by now: nothing left to write.
            assert!(rep.keys_written <= 1);
        }
    }
    let rep = l
        .mirror
        .apply_changes(
            &mut l.dp.maps,
            &p.compile().unwrap(),
            Some(&BTreeSet::new()),
            cap,
        )
        .unwrap();
    assert_eq!(rep.prefilter_words_written, 0, "{rep:?}");

    // A full apply rebuilds: the removed key's sources are dropped again.
    p.key.pop();
    l.apply_policy(&p).unwrap();
    expect(
        &mut l,
        &syn4(newcomer, 8080),
        DropPrefilter,
        "after removal",
    );
    let fill = l.mirror.prefilter_fill().unwrap();
    assert!(fill.bits_set > 0 && fill.fp_v4 < 1e-6, "{fill:?}");
}

#[test]
fn a_restarted_loader_reads_the_filter_back() {
    let mut l = Loaded::new(POLICY).unwrap();
    l.apply(POLICY).unwrap(); // both slots written
    let (words, plan) = l.mirror.prefilter_half();
    let (words, plan) = (words.to_vec(), plan.clone());
    let again = keywall::dataplane::Mirror::read(&l.dp.maps).unwrap();
    let (w2, p2) = again.prefilter_half();
    assert_eq!(p2, &plan);
    assert!(w2 == words.as_slice(), "words read back differ");
    // Operators read the same fill from the pins, with no loader around.
    let view = keywall::dataplane::PinnedView::open(&l.pin_dir).unwrap();
    let fill = view.prefilter_fill().unwrap().expect("written");
    assert_eq!(Some(fill), l.mirror.prefilter_fill());
    assert!(fill.bits_set >= 3 && fill.fp_v4 < 1e-6, "{fill:?}");
    drop(view);
    // The pure model agrees with the kernel words.
    let a = v6("2001:db8:aa::1");
    assert!(prefilter::passes(&words, &plan, 6, &a, 12));
    // And applying through the restored mirror keeps verdicts.
    l.mirror = again;
    l.apply(POLICY).unwrap();
    expect(
        &mut l,
        &syn4(v4("203.0.113.5"), 8080),
        PassHandshake,
        "after restart",
    );
    expect(
        &mut l,
        &syn4(v4("203.0.114.5"), 8080),
        DropPrefilter,
        "after restart",
    );
}

#[test]
fn trusted_proxy_sets_are_shared_between_listeners_and_freed_when_unused() {
    let two = format!(
        "{POLICY}\n[[listener]]\nport = 8444\nlocator = \"http-header\"\nheaders = [\"X-MBX-APIKEY\"]\n\
         proxy_protocol = true\ntrusted_proxies = [\"10.9.0.0/16\", \"2001:db8:ffff::/48\"]\n"
    );
    let mut l = Loaded::new(&two).unwrap();
    let proxy_sets = |l: &Loaded| -> Vec<(u16, u32)> {
        let slot = l.mirror.active_slot();
        (1..=filter_common::MAX_LISTENERS as u16)
            .map(|n| {
                l.dp.maps
                    .listeners
                    .get(&filter_common::listener_slot(slot, n), 0)
                    .unwrap()
            })
            .filter(|x| x.locator != 0 && x.proxy_set != 0)
            .map(|x| (x.port, x.proxy_set))
            .collect()
    };
    let sets = proxy_sets(&l);
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert_eq!(
        sets[0].1, sets[1].1,
        "identical trusted proxies share one set"
    );
    let id = sets[0].1;
    assert!(l.dp.maps.sets.get(&id, 0).is_ok());
    expect(
        &mut l,
        &syn4(v4("10.9.0.5"), 8444),
        PassHandshake,
        "trusted",
    );

    // Other proxies for one listener: a new set; the old one stays while 8443 uses it.
    l.apply(&two.replacen("10.9.0.0/16", "10.8.0.0/16", 2).replacen(
        "10.8.0.0/16",
        "10.9.0.0/16",
        1,
    ))
    .unwrap();
    let sets = proxy_sets(&l);
    assert_ne!(sets[0].1, sets[1].1, "{sets:?}");
    expect(
        &mut l,
        &syn4(v4("10.8.0.5"), 8444),
        PassHandshake,
        "new proxy",
    );
    expect(
        &mut l,
        &syn4(v4("10.9.0.5"), 8444),
        DropPrefilter,
        "old proxy",
    );
    expect(
        &mut l,
        &syn4(v4("10.9.0.5"), 8443),
        PassHandshake,
        "8443 kept its set",
    );
    // Once neither slot's listeners reference a set, it is gone.
    let no_proxies = POLICY.replace(
        "proxy_protocol = true\ntrusted_proxies = [\"10.9.0.0/16\", \"2001:db8:ffff::/48\"]\n",
        "",
    );
    l.apply(&no_proxies).unwrap();
    l.apply(&no_proxies).unwrap();
    assert!(proxy_sets(&l).is_empty());
    assert!(l.dp.maps.sets.get(&id, 0).is_err(), "set {id} freed");
}
