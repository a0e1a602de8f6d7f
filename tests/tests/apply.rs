//! Incremental applies (only the changed keys named) leave the maps exactly as a full apply
//! would, and enforce each change at once.

use std::collections::BTreeSet;

use filter_common::Reason;
use keywall::{
    dataplane::Mirror,
    policy::{Key, Policy, key_prefix},
};
use tests::{
    harness::Loaded,
    packet::{Pkt, http_request},
};

const EDGE: [u8; 4] = [192, 0, 2, 1];

fn policy(locked: &BTreeSet<usize>, n: usize) -> Policy {
    let mut p = Policy::from_toml_str(
        "[settings]\nkey_prefix_len = 8\n[[listener]]\nport = 8080\nlocator = \"http-header\"\nheaders = [\"X-MBX-APIKEY\"]\n[ipsets]\nb = [\"203.0.113.0/24\"]\n",
    )
    .unwrap();
    for i in 0..n {
        p.key.push(Key {
            prefix: format!("k{i:07}"),
            allow: vec![
                format!("198.51.{}.{}", i / 250, i % 250 + 1),
                "2001:db8::/64".into(),
            ],
            ipsets: if i % 3 == 0 { vec!["b".into()] } else { vec![] },
            locked: locked.contains(&i),
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        });
    }
    p
}

fn probe(l: &mut Loaded, i: usize, sport: u16) -> Reason {
    let src = [198, 51, (i / 250) as u8, (i % 250 + 1) as u8];
    let f = Pkt::tcp4(src, EDGE, sport, 8080)
        .payload(&http_request(
            "GET",
            "/",
            &[("X-MBX-APIKEY", &format!("k{i:07}-rest"))],
        ))
        .build();
    l.run(&f).1
}

#[test]
fn incremental_applies_match_full_applies() {
    let n = 300;
    let mut locked = BTreeSet::new();
    let mut l = Loaded::new("").unwrap();
    // Twice, so both slots hold the policy; after that one change touches one key.
    l.apply_policy(&policy(&locked, n)).unwrap();
    l.apply_policy(&policy(&locked, n)).unwrap();
    let cap = l.dp.maps.key_stats.len();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for step in 0..40u16 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let i = (seed % n as u64) as usize;
        if !locked.insert(i) {
            locked.remove(&i);
        }
        let c = policy(&locked, n).compile().unwrap();
        let changed: BTreeSet<_> = [key_prefix(&format!("k{i:07}"))].into();
        let rep = l
            .mirror
            .apply_changes(&mut l.dp.maps, &c, Some(&changed), cap)
            .unwrap();
        assert!(
            rep.keys_written <= 2,
            "step {step}: a one-key change wrote {} keys",
            rep.keys_written
        );
        let want = if locked.contains(&i) {
            Reason::DropLocked
        } else {
            Reason::PassAllowed
        };
        assert_eq!(
            probe(&mut l, i, 10_000 + step),
            want,
            "step {step}, key {i}"
        );
        if step % 10 == 9 {
            // A full apply of the same policy writes only what the inactive slot lags on
            // (the last change); a second one finds nothing left to write.
            let rep = l.mirror.apply(&mut l.dp.maps, &c, cap).unwrap();
            assert!(
                rep.keys_written <= 1,
                "step {step}: {} keys lagged",
                rep.keys_written
            );
            let rep = l.mirror.apply(&mut l.dp.maps, &c, cap).unwrap();
            assert_eq!(
                rep.keys_written, 0,
                "step {step}: the incremental state drifted"
            );
            // And a mirror read back from the kernel maps agrees.
            let mut fresh = Mirror::read(&l.dp.maps).unwrap();
            let rep = fresh.apply(&mut l.dp.maps, &c, cap).unwrap();
            assert_eq!(
                rep.keys_written, 0,
                "step {step}: the maps differ from the mirror"
            );
            l.mirror = fresh;
        }
    }
}
