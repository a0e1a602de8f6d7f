//! Fleet sync end to end: a real etcd (Debian's etcd-server) and real `keywall run --etcd`
//! daemons, each on its own sandbox (namespaces, veth, pin dir, state dir, API socket,
//! metrics port in its own namespace), with real curl clients against a real HTTP server.
//! Needs root. etcd runs in a namespace of its own; every edge namespace reaches it over a
//! second veth that the filter is not attached to (see tests/src/etcd.rs).
//!
//! Every test cleans up (etcd, its data dir, namespaces, pins) when it ends, also on failure.

use std::{
    net::IpAddr,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    api_bench::{http_unix, kw, reason_packets},
    daemon::Daemon,
    etcd::{ETCD_TLS_URL, ETCD_URL, EtcdServer},
    netns::{Proc, Sandbox},
};

const PORT: u16 = 8080;
const GOOD: &str = "goodkey1-5f2c9a7e-secret-part";
const LOCKED: &str = "lockkey1-0d9e8c7b-secret-part";
const METRICS: &str = "127.0.0.1:9478";

/// Sandboxes joined to one etcd, each with an HTTP server on its edge.
struct Fleet {
    // Dropped in order: servers, then sandboxes, then etcd.
    _servers: Vec<Proc>,
    sbs: Vec<Sandbox>,
    etcd: EtcdServer,
    prefix: String,
}

impl Fleet {
    fn new(tag: &str, edges: usize) -> Fleet {
        Fleet::with_etcd(tag, edges, EtcdServer::start().expect("starting etcd"))
    }

    fn with_etcd(tag: &str, edges: usize, etcd: EtcdServer) -> Fleet {
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

    fn put(&self, entry: &str, value: &str) {
        self.etcd
            .put(&format!("{}{entry}", self.prefix), value)
            .expect("etcdctl put");
    }

    fn del(&self, entry: &str) {
        self.etcd
            .del(&format!("{}{entry}", self.prefix))
            .expect("etcdctl del");
    }

    /// The policy of these tests: `goodkey1` allowed from every edge's client, `lockkey1`
    /// locked.
    fn write_policy(&self) {
        self.put(
            "settings",
            &json!({
                "settings": {"key_prefix_len": 8, "unknown_key": "drop", "no_key": "pass",
                             "unbound_keys": "pass", "prefilter": false},
                "listener": [{"port": PORT, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}],
            })
            .to_string(),
        );
        self.put("keys/goodkey1", &self.good_key(false).to_string());
        self.put(
            "keys/lockkey1",
            &json!({"allow": self.clients(), "locked": true}).to_string(),
        );
    }

    fn clients(&self) -> Vec<String> {
        self.sbs
            .iter()
            .map(|sb| format!("{}/32", sb.client_v4()))
            .collect()
    }

    fn good_key(&self, locked: bool) -> Value {
        json!({"prefix": "goodkey1", "allow": self.clients(), "locked": locked})
    }

    fn daemon(&self, i: usize, n: u32) -> Daemon<'_> {
        Daemon::start(
            &self.sbs[i],
            n,
            &[
                "--etcd",
                ETCD_URL,
                "--etcd-prefix",
                &self.prefix,
                "--metrics",
                METRICS,
            ],
        )
        .expect("keywall run --etcd")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Pass,
    Blocked,
}

/// One HTTP request from the sandbox's client with `key` in `X-MBX-APIKEY`.
fn probe(sb: &Sandbox, key: &str) -> Got {
    let src: IpAddr = sb.client_v4().into();
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

/// (good key, locked key) on every edge, all at once.
fn verdicts(f: &Fleet) -> Vec<(Got, Got)> {
    thread::scope(|s| {
        let hs: Vec<_> = f
            .sbs
            .iter()
            .map(|sb| s.spawn(move || (probe(sb, GOOD), probe(sb, LOCKED))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn status_json(sb: &Sandbox) -> Value {
    let out = kw(
        sb,
        &[
            "status",
            "--json",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
            "--state-dir",
            &sb.state_dir().display().to_string(),
        ],
    );
    assert!(out.status.success(), "keywall status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn stats_json(sb: &Sandbox) -> Value {
    let out = kw(
        sb,
        &[
            "stats",
            "--json",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
        ],
    );
    assert!(out.status.success(), "keywall stats: {out:?}");
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

/// A sample of the edge's Prometheus endpoint (`name{labels}` exactly as exposed).
fn metric(sb: &Sandbox, series: &str) -> Option<f64> {
    let text = sb
        .run_edge(
            "curl",
            [
                "-sS",
                "--max-time",
                "3",
                &format!("http://{METRICS}/metrics"),
            ],
        )
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn policy_raw(d: &Daemon) -> Vec<u8> {
    let (st, b) = http_unix(&d.sock, "GET", "/v1/policy", None, &[]).unwrap();
    assert_eq!(st, 200, "GET /v1/policy: {}", String::from_utf8_lossy(&b));
    b
}

fn policy(d: &Daemon) -> Value {
    serde_json::from_slice(&policy_raw(d)).unwrap()
}

fn key_locked(d: &Daemon, prefix: &str) -> Option<bool> {
    let p = policy(d);
    p["key"]
        .as_array()?
        .iter()
        .find(|k| k["prefix"] == prefix)
        .map(|k| k["locked"].as_bool().unwrap_or(false))
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
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every daemon enforces the fleet policy (both keys present).
fn wait_synced(ds: &[Daemon]) {
    for d in ds {
        wait_for("the snapshot from etcd", 20, || {
            (key_locked(d, "lockkey1") == Some(true) && key_locked(d, "goodkey1").is_some())
                .then_some(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn a_lock_written_to_etcd_is_enforced_on_three_edges() {
    let f = Fleet::new("fleetlock", 3);
    f.write_policy();
    let ds: Vec<Daemon> = (0..3).map(|i| f.daemon(i, 1)).collect();
    wait_synced(&ds);
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Blocked); 3]);

    // The policy revision is the etcd revision, and the source is etcd.
    let rev = f.etcd.revision().unwrap();
    for (d, sb) in ds.iter().zip(&f.sbs) {
        let (st, v) = d.call("GET", "/v1/status", None).unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["source"], "etcd", "{v}");
        assert_eq!(v["policy_source"], "etcd", "{v}");
        assert_eq!(v["revision"], rev, "{v}");
        assert_eq!(v["etcd"]["up"], true, "{v}");
        assert_eq!(policy(d)["revision"], rev);
        assert_eq!(metric(sb, "keywall_sync_up{source=\"etcd\"}"), Some(1.0));
        assert_eq!(metric(sb, "keywall_policy_revision"), Some(rev as f64));
    }

    // API writes belong to etcd here.
    let (st, v) = ds[0]
        .call(
            "PATCH",
            "/v1/policy",
            Some(&json!({"revision": rev + 100, "ops": [{"op": "lock", "prefix": "goodkey1"}]})),
        )
        .unwrap();
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&format!("managed by etcd {}", f.prefix)),
        "{v}"
    );

    // The lock: one etcdctl put, timed to each edge enforcing it (the daemon answers reads
    // from what the maps enforce), then checked with real traffic.
    let before: Vec<u64> = f
        .sbs
        .iter()
        .map(|sb| reason_packets(&stats_json(sb), "drop_locked"))
        .collect();
    let t0 = Instant::now();
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    let took: Vec<Duration> = thread::scope(|s| {
        let hs: Vec<_> = ds
            .iter()
            .map(|d| {
                s.spawn(move || {
                    wait_for("the lock on an edge", 10, || {
                        (key_locked(d, "goodkey1") == Some(true)).then(|| t0.elapsed())
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("etcdctl put to enforced, per edge (includes etcdctl's own start): {took:?}");
    assert_eq!(verdicts(&f), vec![(Got::Blocked, Got::Blocked); 3]);
    for (sb, b) in f.sbs.iter().zip(&before) {
        let after = reason_packets(&stats_json(sb), "drop_locked");
        assert!(
            after >= b + 2,
            "drop_locked {b} -> {after} on {}",
            sb.edge_ns()
        );
    }

    // And the unlock.
    f.put("keys/goodkey1", &f.good_key(false).to_string());
    for d in &ds {
        wait_for("the unlock", 10, || {
            (key_locked(d, "goodkey1") == Some(false)).then_some(())
        });
    }
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Blocked); 3]);
    let st = status_json(&f.sbs[0]);
    assert_eq!(st["revision"], f.etcd.revision().unwrap(), "{st}");
}

#[test]
fn an_idle_watch_stays_up() {
    // etcd (grpc-go) closes a connection that pings more often than its
    // --grpc-keepalive-min-time (5 s by default) while nothing else flows: an idle edge must
    // keep its watch, not reconnect and re-read the whole prefix every few seconds.
    let f = Fleet::new("fleetidle", 1);
    f.write_policy();
    let d = f.daemon(0, 1);
    wait_synced(std::slice::from_ref(&d));
    thread::sleep(Duration::from_secs(25));
    let log = d.log_text();
    assert!(
        !log.contains("etcd sync:"),
        "the watch broke while idle:\n{log}"
    );
    assert_eq!(
        log.matches("etcd: snapshot of").count(),
        1,
        "read the snapshot again:\n{log}"
    );
    // And it still follows etcd.
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    wait_for("the lock after the idle time", 10, || {
        (key_locked(&d, "goodkey1") == Some(true)).then_some(())
    });
}

#[test]
fn etcd_down_changes_nothing_and_a_daemon_that_was_down_catches_up_past_a_compaction() {
    let f = Fleet::new("fleetdown", 2);
    f.write_policy();
    let mut ds: Vec<Daemon> = (0..2).map(|i| f.daemon(i, 1)).collect();
    wait_synced(&ds);
    let want = vec![(Got::Pass, Got::Blocked); 2];
    assert_eq!(verdicts(&f), want);
    let policies: Vec<Vec<u8>> = ds.iter().map(policy_raw).collect();

    // etcd down for 30 s: enforcement and the applied policy stay exactly as they were.
    f.etcd.stop().unwrap();
    let down = Instant::now();
    for sb in &f.sbs {
        wait_for("sync_up 0", 15, || {
            (metric(sb, "keywall_sync_up{source=\"etcd\"}") == Some(0.0)).then_some(())
        });
    }
    while down.elapsed() < Duration::from_secs(30) {
        assert_eq!(verdicts(&f), want);
        for (d, p) in ds.iter().zip(&policies) {
            assert_eq!(
                &policy_raw(d),
                p,
                "the applied policy changed while etcd was down"
            );
        }
        thread::sleep(Duration::from_secs(3));
    }
    let st = status_json(&f.sbs[0]);
    assert_eq!(st["etcd"]["up"], false, "{st}");
    assert!(st["etcd"]["last_error"].is_string(), "{st}");
    for sb in &f.sbs {
        assert_eq!(metric(sb, "keywall_sync_up{source=\"etcd\"}"), Some(0.0));
    }

    // etcd back: both reconnect (backoff is capped at 5 s).
    f.etcd.resume().unwrap();
    for sb in &f.sbs {
        wait_for("sync_up 1 after etcd came back", 20, || {
            (metric(sb, "keywall_sync_up{source=\"etcd\"}") == Some(1.0)).then_some(())
        });
    }

    // Changes while edge 1's daemon is down, then a compaction past its revision.
    // A key-only change first: it is journalled (one line, like a PATCH), and the restart
    // below restores it from the journal before it resyncs.
    f.put("keys/jkey0001", &json!({"allow": f.clients()}).to_string());
    wait_for("edge 1 to apply jkey0001", 10, || {
        key_locked(&ds[1], "jkey0001").map(|_| ())
    });
    let old_rev = policy(&ds[1])["revision"].as_u64().unwrap();
    ds[1].stop().unwrap();
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    f.del("keys/lockkey1");
    f.put("keys/newkey01", &json!({"allow": f.clients()}).to_string());
    let compacted = f.etcd.compact().unwrap();
    assert!(compacted > old_rev);
    wait_for("edge 0 to apply the changes", 10, || {
        (key_locked(&ds[0], "goodkey1") == Some(true) && key_locked(&ds[0], "lockkey1").is_none())
            .then_some(())
    });
    // The XDP program stays attached while its daemon is down: edge 1 still enforces the
    // old policy.
    assert_eq!(probe(&f.sbs[1], GOOD), Got::Pass);

    // Edge 1 comes back: it restores its old revision, then resyncs from a fresh snapshot.
    ds[1] = f.daemon(1, 2);
    wait_for("edge 1 to catch up", 20, || {
        (key_locked(&ds[1], "goodkey1") == Some(true)).then_some(())
    });
    let (p0, p1) = (policy(&ds[0]), policy(&ds[1]));
    assert_eq!(p0["key"], p1["key"]);
    assert!(p1["revision"].as_u64().unwrap() >= compacted, "{p1}");
    assert!(key_locked(&ds[1], "newkey01") == Some(false));
    // lockkey1 is gone: with unknown_key = "drop" it is dropped as unknown now.
    assert_eq!(verdicts(&f), vec![(Got::Blocked, Got::Blocked); 2]);
    assert_eq!(probe(&f.sbs[1], "newkey01-aaaaaaaa-secret"), Got::Pass);
    let log = ds[1].log_text();
    assert!(
        log.contains(&format!("restored revision {old_rev} ")),
        "{log}"
    );
}

#[test]
fn an_invalid_value_is_rejected_for_its_entry_and_the_rest_keeps_syncing() {
    let f = Fleet::new("fleetbad", 1);
    let sb = &f.sbs[0];

    // --policy and --etcd together are refused at start.
    let pol = sb.tmp_dir().join("p.toml");
    std::fs::write(&pol, "").unwrap();
    let out = kw(
        sb,
        &[
            "run",
            "--iface",
            sb.edge_if(),
            "--policy",
            &pol.display().to_string(),
            "--etcd",
            ETCD_URL,
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--policy") && err.contains("--etcd"), "{err}");

    f.write_policy();
    let d = f.daemon(0, 1);
    wait_synced(std::slice::from_ref(&d));
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Blocked)]);
    let rejected = "keywall_policy_updates_total{source=\"etcd\",result=\"rejected\"}";
    let in_error = "keywall_sync_entries_in_error{source=\"etcd\"}";
    assert_eq!(metric(sb, in_error), Some(0.0));

    // Invalid JSON for goodkey1, a name mismatch, an unknown ipset: each refused alone.
    f.put("keys/goodkey1", "{\"allow\": [\"10.0.0.0/8\"");
    f.put("keys/badname1", &json!({"prefix": "other123"}).to_string());
    f.put("keys/nosetkey", &json!({"ipsets": ["nope"]}).to_string());
    // ... while a valid change after them is applied.
    f.put(
        "keys/lockkey1",
        &json!({"allow": f.clients(), "locked": false}).to_string(),
    );
    wait_for("lockkey1 unlocked", 10, || {
        (key_locked(&d, "lockkey1") == Some(false)).then_some(())
    });
    wait_for("three entries in error", 10, || {
        (metric(sb, in_error) == Some(3.0)).then_some(())
    });
    assert!(metric(sb, rejected).unwrap() >= 3.0);
    let st = status_json(sb);
    let errors = st["etcd"]["errors"]
        .as_array()
        .expect("etcd.errors")
        .clone();
    let find = |k: &str| {
        errors
            .iter()
            .find(|e| e["key"] == format!("{}{k}", f.prefix))
            .unwrap_or_else(|| panic!("no error for {k} in {st}"))["error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(find("keys/goodkey1").contains("line 1"), "{st}");
    assert!(find("keys/badname1").contains("does not match"), "{st}");
    assert!(find("keys/nosetkey").contains("unknown ipset"), "{st}");
    // goodkey1 keeps its last good value; the others stay absent.
    assert_eq!(key_locked(&d, "goodkey1"), Some(false));
    assert_eq!(key_locked(&d, "badname1"), None);
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Pass)]);
    let text = kw(
        sb,
        &[
            "status",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
            "--state-dir",
            &sb.state_dir().display().to_string(),
        ],
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("rejected:   {}keys/goodkey1", f.prefix)),
        "{text}"
    );

    // What nosetkey lacked arrives: it is taken. The other two are fixed or deleted.
    f.put("ipsets/nope", "[\"192.0.2.0/24\"]");
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    f.del("keys/badname1");
    wait_for("no entry in error", 10, || {
        (metric(sb, in_error) == Some(0.0)).then_some(())
    });
    assert_eq!(key_locked(&d, "goodkey1"), Some(true));
    assert_eq!(key_locked(&d, "nosetkey"), Some(false));
    assert_eq!(verdicts(&f), vec![(Got::Blocked, Got::Pass)]);
    let st = status_json(sb);
    assert_eq!(st["etcd"]["errors"], json!([]), "{st}");
}

/// The propagation bench on a few writes (the bench runs 500): every write reaches every
/// edge's kernel verdict, well within a second.
#[test]
fn propagation_bench_measures_every_edge() {
    let writes = std::env::var("KEYWALL_FLEET_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rows = tests::fleet_bench::propagation(writes).expect("propagation bench");
    assert_eq!(rows.len(), writes);
    assert!(
        rows.iter()
            .all(|r| r.len() == 3 && r.iter().all(|d| !d.is_zero()))
    );
    let all: Vec<Duration> = rows.iter().flatten().copied().collect();
    let (p50, p99) = (
        tests::fleet_bench::percentile(&all, 50.0),
        tests::fleet_bench::percentile(&all, 99.0),
    );
    eprintln!("etcd put to drop on 3 edges, {writes} writes: p50 {p50:?}, p99 {p99:?}");
    for e in 0..3 {
        let col: Vec<Duration> = rows.iter().map(|r| r[e]).collect();
        eprintln!(
            "  edge {e}: p50 {:?}, p99 {:?}",
            tests::fleet_bench::percentile(&col, 50.0),
            tests::fleet_bench::percentile(&col, 99.0)
        );
    }
    assert!(p50 < Duration::from_millis(500), "p50 {p50:?}");
}

#[test]
fn tls_client_certificates_and_etcd_auth_are_passed_through() {
    let f = Fleet::with_etcd(
        "fleettls",
        1,
        EtcdServer::start_tls().expect("starting etcd with TLS"),
    );
    f.write_policy();
    f.etcd
        .enable_auth("keywall-edge", "edge-pw", &f.prefix)
        .unwrap();
    // The edge's user may read its prefix and nothing more.
    let edge = Some("keywall-edge:edge-pw");
    let key = format!("{}keys/goodkey1", f.prefix);
    assert!(f.etcd.ctl_as(edge, &["get", &key]).is_ok());
    assert!(f.etcd.ctl_as(edge, &["put", &key, "{}"]).is_err());

    let sb = &f.sbs[0];
    let t = f.etcd.tls.clone().unwrap();
    let pw = sb.tmp_dir().join("etcd-password");
    std::fs::write(&pw, "edge-pw\n").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let d = Daemon::start(
        sb,
        1,
        &[
            "--etcd",
            ETCD_TLS_URL,
            "--etcd-prefix",
            &f.prefix,
            "--etcd-ca",
            &path(&t.ca),
            "--etcd-cert",
            &path(&t.client_cert),
            "--etcd-key",
            &path(&t.client_key),
            "--etcd-user",
            "keywall-edge",
            "--etcd-password-file",
            &path(&pw),
            "--metrics",
            METRICS,
        ],
    )
    .expect("keywall run --etcd over TLS");
    wait_synced(std::slice::from_ref(&d));
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Blocked)]);
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    wait_for("the lock over TLS", 10, || {
        (key_locked(&d, "goodkey1") == Some(true)).then_some(())
    });
    assert_eq!(verdicts(&f), vec![(Got::Blocked, Got::Blocked)]);
    assert_eq!(metric(sb, "keywall_sync_up{source=\"etcd\"}"), Some(1.0));
}

/// Writes `keys` keys (`b0000000`.. from `start`) under the fleet's prefix, 128 to a
/// transaction (etcd's default limit of operations per transaction).
fn put_many(f: &Fleet, start: usize, keys: usize) {
    use etcd_client::{Client, Txn, TxnOp};
    let allow = f.clients();
    f.etcd
        .in_ns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut c = Client::connect([ETCD_URL], None).await?;
                let names: Vec<usize> = (start..start + keys).collect();
                for chunk in names.chunks(128) {
                    let ops: Vec<TxnOp> = chunk
                        .iter()
                        .map(|i| {
                            TxnOp::put(
                                format!("{}keys/b{i:07}", f.prefix),
                                json!({"allow": allow}).to_string(),
                                None,
                            )
                        })
                        .collect();
                    c.txn(Txn::new().and_then(ops)).await?;
                }
                Ok(())
            })
        })
        .expect("writing keys to etcd");
}

fn key_show(d: &Daemon, prefix: &str) -> Option<Value> {
    let (st, v) = d.call("GET", &format!("/v1/keys/{prefix}"), None).unwrap();
    (st == 200 && !v["policy"].is_null()).then(|| v["policy"].clone())
}

/// Issue 12: a policy larger than one gRPC message (100k keys, ~12 MB) is read in pages at one
/// revision; keys written while the daemon watches arrive as batches without breaking the
/// watch; a key change costs that key (a PATCH of it, not a recompile of the policy).
#[test]
fn a_large_policy_is_read_in_pages_and_a_key_change_costs_that_key() {
    const KEYS: usize = 100_000;
    let f = Fleet::new("fleetbig", 1);
    f.write_policy();
    put_many(&f, 0, KEYS);
    let d = Daemon::start(
        &f.sbs[0],
        1,
        &[
            "--etcd",
            ETCD_URL,
            "--etcd-prefix",
            &f.prefix,
            "--max-keys",
            "262144",
        ],
    )
    .expect("keywall run --etcd");
    let t0 = Instant::now();
    wait_for("the 100k-key snapshot", 120, || {
        let (_, st) = d.call("GET", "/v1/status", None).unwrap();
        (st["keys"].as_u64() == Some(KEYS as u64 + 2)).then_some(())
    });
    eprintln!(
        "snapshot of {} keys applied in {:?}",
        KEYS + 2,
        t0.elapsed()
    );
    assert_eq!(verdicts(&f), vec![(Got::Pass, Got::Blocked)]);

    // 20k more keys while the daemon watches: taken in batches, the watch stays up.
    put_many(&f, KEYS, 20_000);
    wait_for("the keys written during the watch", 120, || {
        let (_, st) = d.call("GET", "/v1/status", None).unwrap();
        (st["keys"].as_u64() == Some(KEYS as u64 + 20_002)).then_some(())
    });
    let (_, st) = d.call("GET", "/v1/status", None).unwrap();
    assert_eq!(st["etcd"]["up"], true, "{st}");
    assert!(
        st["etcd"]["errors"].as_array().is_none_or(|e| e.is_empty()),
        "{st}"
    );

    // One lock: applied as a change of that key, in well under a second.
    let t0 = Instant::now();
    f.put("keys/goodkey1", &f.good_key(true).to_string());
    wait_for("the lock", 10, || {
        key_show(&d, "goodkey1")
            .filter(|k| k["locked"] == true)
            .map(|_| ())
    });
    let took = t0.elapsed();
    eprintln!("lock from etcd to the API: {took:?}");
    assert!(took < Duration::from_secs(2), "lock took {took:?}");
    assert_eq!(verdicts(&f), vec![(Got::Blocked, Got::Blocked)]);
    let log = d.log_text();
    assert!(log.contains("(1 entries changed,"), "{log}");
    assert!(!log.contains("broken pipe"), "{log}");
}
