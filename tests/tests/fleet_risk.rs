//! Fleet-wide risk controls (issue 13) end to end: a real etcd, three real `keywall run
//! --etcd` edges publishing activity digests, curl clients, and `keywall fleet` run as the
//! control plane would. Needs root; cleans up on failure too (see tests/src/etcd.rs).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    api_bench::kw,
    daemon::Daemon,
    etcd::{ETCD_URL, EtcdServer},
    netns::{Proc, Sandbox},
};

const PORT: u16 = 8080;
const GOOD: &str = "goodkey1-5f2c9a7e-secret-part";
const IDLE: &str = "idlekey1-aa11bb22-secret-part";

struct Fleet {
    _servers: Vec<Proc>,
    sbs: Vec<Sandbox>,
    etcd: EtcdServer,
    prefix: String,
}

impl Fleet {
    fn new(tag: &str, edges: usize) -> Fleet {
        let etcd = EtcdServer::start().expect("starting etcd");
        let sbs: Vec<Sandbox> = (0..edges)
            .map(|_| Sandbox::new(tag).expect("sandbox"))
            .collect();
        let mut servers = Vec::new();
        for sb in &sbs {
            etcd.connect(sb).expect("joining an edge to etcd");
            servers.push(sb.spawn_http_server_edge(PORT).expect("http server"));
        }
        Fleet {
            _servers: servers,
            sbs,
            etcd,
            prefix: format!("/fleet-{tag}/"),
        }
    }

    fn put(&self, entry: &str, value: &Value) {
        self.etcd
            .put(&format!("{}{entry}", self.prefix), &value.to_string())
            .expect("etcdctl put");
    }

    fn get(&self, entry: &str) -> Value {
        let out = self
            .etcd
            .ctl(&[
                "get",
                "--print-value-only",
                &format!("{}{entry}", self.prefix),
            ])
            .expect("etcdctl get");
        serde_json::from_str(out.trim()).unwrap_or(Value::Null)
    }

    fn names(&self) -> Vec<String> {
        self.etcd
            .ctl(&["get", "--prefix", "--keys-only", &self.prefix])
            .expect("etcdctl get")
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| l[self.prefix.len()..].to_owned())
            .collect()
    }

    fn daemon(&self, i: usize) -> Daemon<'_> {
        Daemon::start(
            &self.sbs[i],
            1,
            &[
                "--etcd",
                ETCD_URL,
                "--etcd-prefix",
                &self.prefix,
                "--edge-id",
                &format!("edge-{i}"),
                "--activity-every",
                "1",
            ],
        )
        .expect("keywall run --etcd")
    }

    /// `keywall fleet` from edge 0's namespace (it reaches etcd over the second veth).
    fn fleet(&self, dry_run: bool) -> Value {
        let mut args = vec![
            "fleet",
            "--etcd",
            ETCD_URL,
            "--etcd-prefix",
            &self.prefix,
            "--json",
        ];
        if dry_run {
            args.push("--dry-run");
        }
        let out = kw(&self.sbs[0], &args);
        assert!(
            out.status.success(),
            "keywall fleet: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("fleet JSON")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Pass,
    Blocked,
}

fn probe(sb: &Sandbox, src: IpAddr, key: &str) -> Got {
    let out = sb
        .client_cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "--interface",
            &src.to_string(),
            "-H",
            &format!("X-MBX-APIKEY: {key}"),
        ])
        .arg(format!("http://{}:{PORT}/api/v3/account", sb.edge_v4()))
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    match (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
    ) {
        (Some(0), "200") => Got::Pass,
        (Some(28), _) => Got::Blocked,
        (c, b) => panic!(
            "curl key {key}: exit {c:?}, code {b:?}, {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn actions(v: &Value) -> Vec<(String, String, String)> {
    v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["prefix"].as_str().unwrap().to_owned(),
                a["reason"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn activity_digests_from_three_edges_drive_keywall_fleet() {
    let f = Fleet::new("fleetrisk", 3);
    let clients: Vec<String> = f
        .sbs
        .iter()
        .map(|sb| format!("{}/32", sb.client_v4()))
        .collect();
    f.put(
        "settings",
        &json!({
            "settings": {"key_prefix_len": 8, "prefilter": false, "idle_lock_after": "10s",
                         "shared_key": {"networks": 3, "window": "1h", "action": "alert"}},
            "listener": [{"port": PORT, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}],
        }),
    );
    f.put("keys/goodkey1", &json!({"allow": clients}));
    f.put("keys/idlekey1", &json!({"allow": clients, "ipsets": []}));
    let daemons: Vec<Daemon> = (0..3).map(|i| f.daemon(i)).collect();
    let me = |i: usize| -> IpAddr { f.sbs[i].client_v4().into() };
    for i in 0..3 {
        wait_for("every edge enforces", 20, || {
            (probe(&f.sbs[i], me(i), GOOD) == Got::Pass).then_some(())
        });
    }
    // Every edge publishes its digest, under its own name, and writes nothing else.
    wait_for("three digests", 15, || {
        let n = f.names();
        (0..3)
            .all(|i| n.contains(&format!("activity/edge-{i}")))
            .then_some(())
    });
    let d = wait_for("edge 0's digest to name goodkey1", 10, || {
        let d = f.get("activity/edge-0");
        d["keys"]["goodkey1"]["a"].as_i64().map(|_| d)
    });
    assert_eq!(d["edge"], "edge-0", "{d}");
    assert!(d["keys"]["goodkey1"]["a"].as_i64().unwrap() > 0, "{d}");
    assert!(
        d["keys"]["idlekey1"].is_null(),
        "never used: not in the digest: {d}"
    );

    // The first run records when it first saw the key no edge reported.
    let first = f.fleet(false);
    assert_eq!(actions(&first), vec![], "{first}");
    assert_eq!(first["edges"].as_array().unwrap().len(), 3, "{first}");
    assert!(f.get("fleet/first-seen")["idlekey1"].is_i64());

    // goodkey1 is used on edges 0 and 1 only (edge 2 never sees it), idlekey1 nowhere.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(12) {
        for i in 0..2 {
            assert_eq!(probe(&f.sbs[i], me(i), GOOD), Got::Pass);
        }
        thread::sleep(Duration::from_millis(700));
    }
    let dry = f.fleet(true);
    assert_eq!(
        actions(&dry),
        vec![(
            "idlekey1".to_owned(),
            "idle".to_owned(),
            "would lock".to_owned()
        )],
        "{dry}"
    );
    assert_eq!(
        probe(&f.sbs[2], me(2), IDLE),
        Got::Pass,
        "a dry run writes nothing"
    );
    let done = f.fleet(false);
    assert_eq!(
        actions(&done),
        vec![(
            "idlekey1".to_owned(),
            "idle".to_owned(),
            "locked".to_owned()
        )],
        "{done}"
    );
    let entry = f.get("keys/idlekey1");
    assert_eq!(
        (entry["locked"].clone(), entry["lock_reason"].clone()),
        (json!(true), json!("idle")),
        "{entry}"
    );
    assert_eq!(
        entry["ipsets"],
        json!([]),
        "the rest of the entry is kept as written"
    );
    for i in 0..3 {
        wait_for("every edge refuses the idle key", 15, || {
            (probe(&f.sbs[i], me(i), IDLE) == Got::Blocked).then_some(())
        });
    }
    assert_eq!(
        probe(&f.sbs[2], me(2), GOOD),
        Got::Pass,
        "alive on other edges: not idle"
    );
    // An operator unlocks it in etcd: the next run leaves it alone (a fresh idle period).
    f.put("keys/idlekey1", &json!({"allow": clients, "ipsets": []}));
    wait_for("edge 2 lets the unlocked key through", 15, || {
        (probe(&f.sbs[2], me(2), IDLE) == Got::Pass).then_some(())
    });
    let again = f.fleet(false);
    assert!(
        !actions(&again).iter().any(|a| a.0 == "idlekey1"),
        "{again}"
    );
    assert!(f.get("fleet/auto-locks")["cleared"]["idlekey1"].is_i64());

    // Shared across edges: the three clients (one /24 per edge) used it, so the fleet has seen
    // three networks, not more than allowed. Two more try it on edge 1, one more on edge 2:
    // no edge sees more than three; the fleet sees six.
    let extra = [
        (1usize, [198, 18, 1, 1]),
        (1, [198, 18, 2, 1]),
        (2, [198, 18, 3, 1]),
    ];
    for (i, a) in extra {
        let a = IpAddr::V4(Ipv4Addr::from(a));
        f.sbs[i].add_client_addr(a).unwrap();
        assert_eq!(probe(&f.sbs[i], a, GOOD), Got::Blocked);
    }
    for i in 0..2 {
        assert_eq!(probe(&f.sbs[i], me(i), GOOD), Got::Pass);
    }
    // Each edge's client sits in a /24 of its own: three, plus the three that tried (the
    // digests follow within a period).
    let a = wait_for("goodkey1 flagged as shared, with six networks", 15, || {
        let v = f.fleet(false);
        v["actions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["prefix"] == "goodkey1" && a["reason"] == "shared" && a["networks"] == 6)
            .cloned()
    });
    assert_eq!(a["outcome"], "reported", "alert: reported, not locked");
    assert_eq!(a["edges"].as_array().unwrap().len(), 3, "{a}");
    // On its own, no edge saw more than three networks.
    for (i, d) in daemons.iter().enumerate() {
        let (_, k) = d.call("GET", "/v1/keys/goodkey1", None).unwrap();
        assert!(k["networks"].as_u64().unwrap() <= 3, "edge {i}: {k}");
    }
    assert_eq!(f.get("keys/goodkey1")["locked"], Value::Null);
}
