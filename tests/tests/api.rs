//! The control-plane API end to end: the real `keywall run` on the edge veth of a namespace
//! sandbox, driven over its unix socket (and TCP), with real clients (curl, a python
//! keep-alive client) against a real HTTP server. Needs root.
//!
//! Every test has its own sandbox (namespaces, pin dir, state dir, socket), so they run in
//! parallel. The `keywall` binary must be built first (`cargo build -p filter-user`).

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tests::{
    api_bench::{KEEPALIVE_CLIENT_PY, call, http_unix, keywall_bin, kw, reason_packets},
    daemon::Daemon,
    netns::{Proc, Sandbox},
};

const PORT: u16 = 8080;
const GOOD: &str = "goodkey1-5f2c9a7e-secret-part";
const LOCKED: &str = "lockkey1-0d9e8c7b-secret-part";

// ---------------------------------------------------------------------------------------------
// helpers

fn api_arg(d: &Daemon) -> String {
    format!("unix:{}", d.sock.display())
}

/// The policy of these tests as API JSON: `goodkey1` allowed from the client's primary v4
/// and v6 hosts and bound to an ipset, `lockkey1` locked.
fn policy(sb: &Sandbox, revision: u64) -> Value {
    json!({
        "revision": revision,
        "settings": {"key_prefix_len": 8, "unknown_key": "drop", "no_key": "pass",
                     "unbound_keys": "pass", "prefilter": false},
        "listener": [{"port": PORT, "locator": "http-header",
                      "headers": ["X-MBX-APIKEY", "OK-ACCESS-KEY"]}],
        "ipsets": {"broker-a": ["203.0.113.0/24", "2001:db8:aa::/48"]},
        "key": [
            {"prefix": "goodkey1", "allow": [format!("{}/32", sb.client_v4()),
                                              format!("{}/128", sb.client_v6())],
             "ipsets": ["broker-a"]},
            {"prefix": "lockkey1", "allow": [format!("{}/32", sb.client_v4())], "locked": true},
        ],
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Pass,
    Blocked,
}

/// One HTTP request from the client namespace with the key in `X-MBX-APIKEY`.
fn probe(sb: &Sandbox, src: IpAddr, key: Option<&str>) -> Got {
    let url = match src {
        IpAddr::V4(_) => format!("http://{}:{PORT}/api/v3/account", sb.edge_v4()),
        IpAddr::V6(_) => format!("http://[{}]:{PORT}/api/v3/account", sb.edge_v6()),
    };
    let mut cmd = sb.client_cmd("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .args(["--interface", &src.to_string()]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("X-MBX-APIKEY: {k}")]);
    }
    let out = cmd.arg(&url).stdin(Stdio::null()).output().expect("curl");
    match (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
    ) {
        (Some(0), "200") => Got::Pass,
        (Some(28), _) => Got::Blocked,
        (c, b) => panic!(
            "curl from {src} key {key:?}: exit {c:?}, code {b:?}, {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The verdicts these tests watch, run concurrently: (good v4, good v6, good from a second
/// v4, locked key).
fn verdicts(sb: &Sandbox, second: IpAddr) -> [Got; 4] {
    let v4: IpAddr = sb.client_v4().into();
    let v6: IpAddr = sb.client_v6().into();
    thread::scope(|s| {
        let a = s.spawn(|| probe(sb, v4, Some(GOOD)));
        let b = s.spawn(|| probe(sb, v6, Some(GOOD)));
        let c = s.spawn(|| probe(sb, second, Some(GOOD)));
        let d = s.spawn(|| probe(sb, v4, Some(LOCKED)));
        [a, b, c, d].map(|h| h.join().unwrap())
    })
}

fn setup(tag: &str) -> (Sandbox, Proc) {
    let sb = Sandbox::new(tag).expect("sandbox");
    let srv = sb.spawn_http_server_edge(PORT).expect("http server");
    (sb, srv)
}

fn put_ok(d: &Daemon, p: &Value) -> Value {
    let (st, v) = d.call("PUT", "/v1/policy", Some(p)).unwrap();
    assert_eq!(st, 200, "PUT: {v}");
    v
}

fn get_policy_raw(d: &Daemon) -> Vec<u8> {
    let (st, b) = http_unix(&d.sock, "GET", "/v1/policy", None, &[]).unwrap();
    assert_eq!(st, 200, "GET /v1/policy: {}", String::from_utf8_lossy(&b));
    b
}

fn stats(d: &Daemon) -> Value {
    let (st, v) = d.call("GET", "/v1/stats", None).unwrap();
    assert_eq!(st, 200, "{v}");
    v
}

fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
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
        thread::sleep(Duration::from_millis(100));
    }
}

/// (ok, sent, done, local port) per client line.
fn client_lines(path: &Path) -> Vec<(bool, f64, f64, u32)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5).then_some(())?;
            Some((
                f[0] == "ok" && f[4] == "200",
                f[1].parse().ok()?,
                f[2].parse().ok()?,
                f[3].parse().ok()?,
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn client_says_daemon_unreachable() {
    let sock = std::env::temp_dir().join(format!("kw-nodaemon-{}.sock", std::process::id()));
    let out = std::process::Command::new(keywall_bin().unwrap())
        .args(["key", "lock", "goodkey1", "--api"])
        .arg(format!("unix:{}", sock.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot reach the keywall daemon")
            && err.contains(&sock.display().to_string()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
}

#[test]
fn api_lock_cuts_keepalive_connection() {
    let (sb, _srv) = setup("apilock");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    let api = api_arg(&d);
    // The API is the source: a policy file pushed through the CLI (TOML, no revision).
    let toml_path = sb.tmp_dir().join("policy.toml");
    let p: keywall::policy::Policy = serde_json::from_value(policy(&sb, 1)).unwrap();
    let p = keywall::policy::Policy {
        revision: None,
        ..p
    };
    fs::write(&toml_path, toml::to_string(&p).unwrap()).unwrap();
    let out = kw(
        &sb,
        &[
            "policy",
            "apply",
            &toml_path.display().to_string(),
            "--api",
            &api,
        ],
    );
    assert!(
        out.status.success(),
        "policy apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revision 1"));
    wait_for("enforcing", 10, || {
        (probe(&sb, sb.client_v4().into(), Some(LOCKED)) == Got::Blocked).then_some(())
    });

    let script = sb.tmp_dir().join("client.py");
    fs::write(&script, KEEPALIVE_CLIENT_PY).unwrap();
    let out_path = sb.tmp_dir().join("client.out");
    let client = sb
        .client_cmd("python3")
        .arg(&script)
        .arg(sb.edge_v4().to_string())
        .arg(PORT.to_string())
        .arg(sb.client_v4().to_string())
        .arg(GOOD)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _client = Proc::new(client);
    let before = wait_for("5 answers on one keep-alive connection", 10, || {
        let l = client_lines(&out_path);
        (l.iter().filter(|l| l.0).count() >= 5).then_some(l)
    });
    let conn = before[0].3;
    assert!(
        before.iter().all(|l| l.0 && l.3 == conn),
        "not one healthy keep-alive connection: {before:?}"
    );
    let drops_before = {
        let s = stats(&d);
        reason_packets(&s, "drop_locked") + reason_packets(&s, "drop_flow")
    };

    // Lock over the API (the CLI's PATCH); it is answered once the maps enforce it.
    let t_lock = now_f64();
    let out = kw(&sb, &["key", "lock", "goodkey1", "--api", &api]);
    let t_answered = now_f64();
    assert!(
        out.status.success(),
        "key lock: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    thread::sleep(Duration::from_millis(2500));
    let lines = client_lines(&out_path);
    let late_ok: Vec<_> = lines.iter().filter(|l| l.0 && l.1 > t_answered).collect();
    assert!(
        late_ok.is_empty(),
        "answers to requests sent after the lock was answered: {late_ok:?}"
    );
    let first_err = lines
        .iter()
        .find(|l| !l.0)
        .unwrap_or_else(|| panic!("the client never failed after the lock: {lines:?}"));
    assert!(
        first_err.1 >= t_lock - 0.2,
        "failed before the lock? {lines:?}"
    );
    assert_eq!(
        first_err.3, conn,
        "the cut was not on the keep-alive connection: {lines:?}"
    );
    let s = stats(&d);
    assert!(
        reason_packets(&s, "drop_locked") + reason_packets(&s, "drop_flow") > drops_before,
        "no drop counted for the cut connection: {s}"
    );

    // The key as the API and the CLI show it.
    let (st, k) = d.call("GET", "/v1/keys/goodkey1", None).unwrap();
    assert_eq!(st, 200, "{k}");
    assert_eq!(k["policy"]["locked"], true, "{k}");
    assert!(k["counters"]["dropped"].as_u64().unwrap() > 0, "{k}");
    assert_eq!(k["revision"], 2, "{k}");
    let out = kw(&sb, &["key", "show", "goodkey1", "--api", &api]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("locked:   yes"));
    let (st, _) = d.call("GET", "/v1/keys/nosuchk1", None).unwrap();
    assert_eq!(st, 404);

    // Unlock: a new connection gets answers again.
    let n = client_lines(&out_path).len();
    let out = kw(&sb, &["key", "unlock", "goodkey1", "--api", &api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("answers after the unlock", 5, || {
        client_lines(&out_path)[n..]
            .iter()
            .any(|l| l.0)
            .then_some(())
    });
    let out = kw(&sb, &["policy", "show", "--json", "--api", &api]);
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["revision"], 3, "{shown}");
    assert_eq!(shown["key"][0]["locked"], false, "{shown}");
}

/// (name, method, body, status wanted, start of `at` wanted)
type BadCase<'a> = (&'a str, &'a str, Vec<u8>, u16, Option<&'a str>);

#[test]
fn bad_inputs_change_nothing() {
    let (sb, _srv) = setup("apibad");
    let second: IpAddr = sb.add_client_v4().unwrap().into();
    let d = Daemon::start(&sb, 1, &["--api-max-body", "65536"]).unwrap();
    put_ok(&d, &policy(&sb, 5));
    let want = [Got::Pass, Got::Pass, Got::Blocked, Got::Blocked];
    wait_for("the policy to enforce", 10, || {
        (verdicts(&sb, second) == want).then_some(())
    });
    let before = get_policy_raw(&d);
    let gen_before = d.call("GET", "/v1/status", None).unwrap().1["generation"].clone();

    let upsert = |key: Value| json!({"revision": 6, "ops": [{"op": "lock", "prefix": "lockkey1"}, {"op": "upsert", "key": key}]});
    let mut dup = policy(&sb, 6);
    dup["key"]
        .as_array_mut()
        .unwrap()
        .push(json!({"prefix": "goodkey1"}));
    let stale = {
        let mut p = policy(&sb, 4);
        p["key"][0]["locked"] = json!(true);
        p
    };
    let mut same_rev_other = policy(&sb, 5);
    same_rev_other["key"][1]["locked"] = json!(false);
    let cases: Vec<BadCase> = vec![
        (
            "malformed JSON",
            "PUT",
            b"{\"revision\": 6, \"key\": [".to_vec(),
            400,
            Some("line 1"),
        ),
        (
            "malformed PATCH",
            "PATCH",
            b"{\"revision\": 6, \"ops\": [{\"op\": \"smash\"}]}".to_vec(),
            400,
            Some("ops[0]"),
        ),
        (
            "bad CIDR",
            "PATCH",
            upsert(json!({"prefix": "newkey01", "allow": ["10.0.0.300/32"]}))
                .to_string()
                .into_bytes(),
            400,
            Some("ops[1].key.allow[0]"),
        ),
        (
            "host bits set",
            "PATCH",
            upsert(json!({"prefix": "newkey01", "allow": ["198.51.100.0/32", "10.0.0.1/8"]}))
                .to_string()
                .into_bytes(),
            400,
            Some("ops[1].key.allow[1]"),
        ),
        (
            "unknown ipset",
            "PATCH",
            upsert(json!({"prefix": "newkey01", "ipsets": ["nosuch"]}))
                .to_string()
                .into_bytes(),
            400,
            Some("ops[1].key.ipsets[0]"),
        ),
        (
            "duplicate key",
            "PUT",
            dup.to_string().into_bytes(),
            400,
            Some("key[2].prefix"),
        ),
        (
            "missing revision",
            "PUT",
            {
                let mut p = policy(&sb, 0);
                p.as_object_mut().unwrap().remove("revision");
                p.to_string().into_bytes()
            },
            400,
            Some("revision"),
        ),
        (
            "stale revision PUT",
            "PUT",
            stale.to_string().into_bytes(),
            409,
            None,
        ),
        (
            "same revision, other content",
            "PUT",
            same_rev_other.to_string().into_bytes(),
            409,
            None,
        ),
        (
            "stale revision PATCH",
            "PATCH",
            json!({"revision": 3, "ops": [{"op": "unlock", "prefix": "lockkey1"}]})
                .to_string()
                .into_bytes(),
            409,
            None,
        ),
        (
            "unknown key lock",
            "PATCH",
            json!({"revision": 6, "ops": [{"op": "lock", "prefix": "nosuchk1"}]})
                .to_string()
                .into_bytes(),
            400,
            Some("ops[0].prefix"),
        ),
        ("oversize body", "PUT", vec![b' '; 100_000], 413, None),
    ];
    let mut failures = Vec::new();
    for (name, method, body, want_st, want_at) in &cases {
        let (st, resp) = http_unix(&d.sock, method, "/v1/policy", Some(body), &[]).unwrap();
        let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        if st != *want_st {
            failures.push(format!("{name}: status {st}, wanted {want_st}: {v}"));
        }
        if let Some(at) = want_at
            && !v["at"].as_str().is_some_and(|a| a.starts_with(at))
        {
            failures.push(format!("{name}: at {:?}, wanted {at:?}: {v}", v["at"]));
        }
        if *want_st == 409 && v["revision"] != 5 {
            failures.push(format!("{name}: 409 without the applied revision 5: {v}"));
        }
        if get_policy_raw(&d) != before {
            failures.push(format!("{name}: GET /v1/policy changed"));
        }
    }
    assert!(
        failures.is_empty(),
        "bad inputs:\n  {}",
        failures.join("\n  ")
    );

    // A retry of what is applied succeeds and changes nothing.
    let (st, v) = d.call("PUT", "/v1/policy", Some(&policy(&sb, 5))).unwrap();
    assert_eq!(
        (st, v["revision"].clone(), v["changed"].clone()),
        (200, json!(5), json!(false)),
        "{v}"
    );
    assert_eq!(get_policy_raw(&d), before);
    let gen_after = d.call("GET", "/v1/status", None).unwrap().1["generation"].clone();
    assert_eq!(gen_before, gen_after, "a rejected write reached the maps");
    assert_eq!(
        verdicts(&sb, second),
        want,
        "verdicts changed after rejected writes"
    );

    // Unknown endpoints and methods.
    assert_eq!(d.call("GET", "/v1/nothing", None).unwrap().0, 404);
    assert_eq!(d.call("DELETE", "/v1/policy", None).unwrap().0, 405);
}

#[test]
fn tcp_token_and_file_source() {
    let (sb, _srv) = setup("apitcp");
    let token = sb.tmp_dir().join("token");
    fs::write(&token, "s3cret-0123456789\n").unwrap();
    let file = sb.tmp_dir().join("policy.toml");
    let p: keywall::policy::Policy = serde_json::from_value(policy(&sb, 1)).unwrap();
    fs::write(
        &file,
        toml::to_string(&keywall::policy::Policy {
            revision: None,
            ..p
        })
        .unwrap(),
    )
    .unwrap();
    let log = sb.tmp_dir().join("keywall-tcp.log");
    let child = sb
        .edge_cmd(keywall_bin().unwrap())
        .args([
            "run",
            "--iface",
            sb.edge_if(),
            "--xdp-mode",
            "native",
            "--metrics",
            "off",
        ])
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .arg("--state-dir")
        .arg(sb.state_dir())
        .arg("--policy")
        .arg(&file)
        .args(["--api", "tcp:127.0.0.1:9477", "--token-file"])
        .arg(&token)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(sb.tmp_dir().join("keywall-tcp.err")).unwrap())
        .spawn()
        .unwrap();
    let _d = Proc::new(child);
    let curl = |auth: Option<&str>, method: &str, body: Option<&str>| -> (String, Value) {
        let mut c = sb.edge_cmd("curl");
        c.args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ]);
        if let Some(a) = auth {
            c.args(["-H", &format!("Authorization: {a}")]);
        }
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = c.arg("http://127.0.0.1:9477/v1/policy").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.to_owned(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let good = "Bearer s3cret-0123456789";
    wait_for("the TCP API", 20, || {
        (curl(Some(good), "GET", None).0 == "200").then_some(())
    });
    let (_, before) = curl(Some(good), "GET", None);
    assert_eq!(
        before["revision"], 1,
        "a file without revision applies as revision 1: {before}"
    );

    assert_eq!(curl(None, "GET", None).0, "401");
    assert_eq!(curl(Some("Bearer s3cret-0123456788"), "GET", None).0, "401");
    assert_eq!(curl(Some("Bearer s3cret-012345678"), "GET", None).0, "401");
    assert_eq!(curl(Some("Basic czNjcmV0"), "GET", None).0, "401");
    let body = json!({"revision": 2, "ops": [{"op": "unlock", "prefix": "lockkey1"}]}).to_string();
    assert_eq!(curl(Some("Bearer wrong"), "PATCH", Some(&body)).0, "401");

    // With the right token: the file owns the policy, so writes are refused, with its path.
    let (code, v) = curl(Some(good), "PATCH", Some(&body));
    assert_eq!(code, "409", "{v}");
    assert_eq!(v["source"], "file", "{v}");
    assert_eq!(v["revision"], 1, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains(&file.display().to_string()),
        "{v}"
    );
    assert_eq!(
        curl(Some(good), "GET", None).1,
        before,
        "a refused write changed the policy"
    );
    assert_eq!(
        probe(&sb, sb.client_v4().into(), Some(LOCKED)),
        Got::Blocked
    );

    // A file change (no revision in it) applies as the next revision.
    let mut p2: keywall::policy::Policy = serde_json::from_value(policy(&sb, 1)).unwrap();
    p2.revision = None;
    p2.key[1].locked = false;
    fs::write(&file, toml::to_string(&p2).unwrap()).unwrap();
    wait_for("the file's change as revision 2", 10, || {
        (curl(Some(good), "GET", None).1["revision"] == 2).then_some(())
    });
    assert_eq!(probe(&sb, sb.client_v4().into(), Some(LOCKED)), Got::Pass);

    // Beyond loopback without TLS is refused up front, saying why.
    let out = kw(
        &sb,
        &[
            "run",
            "--iface",
            sb.edge_if(),
            "--api",
            &format!("tcp:{}:9479", sb.edge_v4()),
            "--token-file",
            &token.display().to_string(),
            "--pin-dir",
            "/sys/fs/bpf/kw-never",
            "--state-dir",
            &sb.tmp_dir().join("never").display().to_string(),
            "--metrics",
            "off",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("without TLS") && err.contains("clear text"),
        "{err}"
    );
}

#[test]
fn concurrent_writers_none_lost() {
    let (sb, _srv) = setup("apiconc");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    put_ok(&d, &policy(&sb, 1));
    const WRITERS: usize = 8;
    const EACH: usize = 100;
    let seen_by_reader = Arc::new(Mutex::new(Vec::<u64>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sock = d.sock.clone();
    let results: Vec<Vec<u64>> = thread::scope(|s| {
        let (seen, done2, sock2) = (seen_by_reader.clone(), done.clone(), sock.clone());
        s.spawn(move || {
            while !done2.load(std::sync::atomic::Ordering::SeqCst) {
                let (st, v) = call(&sock2, "GET", "/v1/policy", None).unwrap();
                assert_eq!(st, 200);
                seen.lock().unwrap().push(v["revision"].as_u64().unwrap());
            }
        });
        let hs: Vec<_> = (0..WRITERS)
            .map(|w| {
                let sock = sock.clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..EACH {
                        let prefix = format!("w{w}{i:03}kkk");
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            assert!(tries < 1000, "writer {w} starved");
                            let (_, cur) = call(&sock, "GET", "/v1/policy", None).unwrap();
                            let rev = cur["revision"].as_u64().unwrap() + 1;
                            let patch = json!({"revision": rev, "ops": [
                                {"op": "upsert", "key": {"prefix": prefix, "allow": ["192.0.2.0/24"]}}]});
                            let (st, v) = call(&sock, "PATCH", "/v1/policy", Some(&patch)).unwrap();
                            match st {
                                200 => {
                                    assert_eq!(v["revision"], rev, "{v}");
                                    mine.push(rev);
                                    break;
                                }
                                409 => assert!(v["revision"].as_u64().unwrap() >= rev, "{v}"),
                                _ => panic!("writer {w}: {st} {v}"),
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        let r = hs.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    });
    let all: Vec<u64> = results.iter().flatten().copied().collect();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), WRITERS * EACH);
    assert_eq!(
        distinct.len(),
        WRITERS * EACH,
        "two writes got the same revision"
    );
    for r in &results {
        assert!(
            r.windows(2).all(|w| w[0] < w[1]),
            "a writer's revisions went back: {r:?}"
        );
    }
    let seen = seen_by_reader.lock().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the applied revision went back"
    );
    let (_, fin) = d.call("GET", "/v1/policy", None).unwrap();
    assert_eq!(
        fin["revision"],
        1 + (WRITERS * EACH) as u64,
        "revisions skipped or lost"
    );
    let keys: BTreeSet<&str> = fin["key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["prefix"].as_str().unwrap())
        .collect();
    for w in 0..WRITERS {
        for i in 0..EACH {
            assert!(
                keys.contains(format!("w{w}{i:03}kkk").as_str()),
                "w{w}{i:03}kkk lost"
            );
        }
    }
    let (_, st) = d.call("GET", "/v1/status", None).unwrap();
    assert_eq!(
        st["keys"],
        2 + WRITERS * EACH,
        "the kernel does not hold every key: {st}"
    );
}

#[test]
fn applied_revision_survives_restart() {
    let (sb, _srv) = setup("apirest");
    let mut d = Daemon::start(&sb, 1, &[]).unwrap();
    put_ok(&d, &policy(&sb, 5));
    // More PATCHes of every kind (journalled, not snapshotted): the daemon's policy is what
    // applying them in order to the PUT policy gives.
    let mut want: keywall::policy::Policy = serde_json::from_value(policy(&sb, 5)).unwrap();
    let patches = [
        json!({"revision": 9, "ops": [{"op": "lock", "prefix": "goodkey1"}]}),
        json!({"revision": 10, "ops": [
            {"op": "upsert", "key": {"prefix": "newkey01", "allow": ["192.0.2.0/24"]}},
            {"op": "upsert", "key": {"prefix": "newkey02", "allow": ["2001:db8:1::/64"], "ipsets": ["broker-a"]}},
            {"op": "delete", "prefix": "lockkey1"}]}),
        json!({"revision": 11, "ops": [{"op": "set_ipset", "name": "broker-b", "cidrs": ["198.18.0.0/15"]},
            {"op": "upsert", "key": {"prefix": "newkey01", "ipsets": ["broker-b"]}}]}),
        json!({"revision": 12, "ops": [{"op": "lock", "prefix": "newkey02"}, {"op": "unlock", "prefix": "newkey02"},
            {"op": "delete", "prefix": "newkey01"}, {"op": "delete_ipset", "name": "broker-b"}]}),
    ];
    for p in &patches {
        let (st, v) = d.call("PATCH", "/v1/policy", Some(p)).unwrap();
        assert_eq!(st, 200, "{p}: {v}");
        let patch: keywall::policy::Patch = serde_json::from_value(p.clone()).unwrap();
        want = want.apply_patch(&patch).unwrap();
    }
    let (_, got) = d.call("GET", "/v1/policy", None).unwrap();
    assert_eq!(
        got,
        serde_json::to_value(&want).unwrap(),
        "PATCHes applied differently"
    );
    let (_, st) = d.call("GET", "/v1/status", None).unwrap();
    assert_eq!(st["keys"], 2, "{st}");
    // A retry of the last PATCH is a no-op.
    let (st, v) = d.call("PATCH", "/v1/policy", Some(&patches[3])).unwrap();
    assert_eq!((st, v["changed"].clone()), (200, json!(false)), "{v}");

    let before = get_policy_raw(&d);
    d.stop().unwrap();
    drop(d);
    // XDP keeps enforcing while no daemon runs.
    assert_eq!(probe(&sb, sb.client_v4().into(), Some(GOOD)), Got::Blocked);

    let d = Daemon::start(&sb, 2, &[]).unwrap();
    assert_eq!(
        get_policy_raw(&d),
        before,
        "the restarted daemon serves another policy"
    );
    let (_, st) = d.call("GET", "/v1/status", None).unwrap();
    assert_eq!(st["revision"], 12, "{st}");
    assert_eq!(st["source"], "api", "{st}");
    assert_eq!(probe(&sb, sb.client_v4().into(), Some(GOOD)), Got::Blocked);
    // The restored revision still orders writes.
    let (st, v) = d.call("PUT", "/v1/policy", Some(&policy(&sb, 12))).unwrap();
    assert_eq!((st, v["revision"].clone()), (409, json!(12)), "{v}");
    let (st, v) = d
        .call(
            "PATCH",
            "/v1/policy",
            Some(&json!({"revision": 13, "ops": [{"op": "unlock", "prefix": "goodkey1"}]})),
        )
        .unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(probe(&sb, sb.client_v4().into(), Some(GOOD)), Got::Pass);
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let (sb, _srv) = setup("apimet");
    let d = Daemon::start(&sb, 1, &["--metrics", "127.0.0.1:9478"]).unwrap();
    put_ok(&d, &policy(&sb, 3));
    // Some verdicts to count, and a rejected write.
    assert_eq!(probe(&sb, sb.client_v4().into(), Some(GOOD)), Got::Pass);
    assert_eq!(
        probe(&sb, sb.client_v4().into(), Some(LOCKED)),
        Got::Blocked
    );
    let (st, _) = d.call("PUT", "/v1/policy", Some(&policy(&sb, 2))).unwrap();
    assert_eq!(st, 409);
    let out = sb
        .exec_edge(
            "curl",
            ["-sS", "--max-time", "5", "http://127.0.0.1:9478/metrics"],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("parses");
    // Every sample line is a sample the parser understood (it skips what it cannot read).
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let buckets = text.lines().filter(|l| l.contains("_bucket{")).count();
    let histogram_samples = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, prometheus_parse::Value::Histogram(_)))
        .count();
    assert_eq!(
        scrape.samples.len() - histogram_samples + buckets,
        sample_lines,
        "unparsed lines in:\n{text}"
    );

    let find = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        }
    };
    for r in filter_common::Reason::ALL {
        let action = if r.is_drop() { "dropped" } else { "passed" };
        find(
            "keywall_packets_total",
            &[("reason", r.name()), ("action", action)],
        );
        find(
            "keywall_bytes_total",
            &[("reason", r.name()), ("action", action)],
        );
    }
    assert!(
        find(
            "keywall_packets_total",
            &[("reason", "drop_locked"), ("action", "dropped")]
        ) >= 1.0
    );
    assert!(
        find(
            "keywall_packets_total",
            &[("reason", "pass_allowed"), ("action", "passed")]
        ) >= 1.0
    );
    assert_eq!(find("keywall_policy_revision", &[]), 3.0);
    assert_eq!(find("keywall_policy_keys", &[]), 2.0);
    assert_eq!(find("keywall_policy_locked_keys", &[]), 1.0);
    assert_eq!(
        find(
            "keywall_policy_updates_total",
            &[("source", "api"), ("result", "applied")]
        ),
        1.0
    );
    assert_eq!(
        find(
            "keywall_policy_updates_total",
            &[("source", "api"), ("result", "conflict")]
        ),
        1.0
    );
    assert_eq!(find("keywall_sync_up", &[("source", "api")]), 1.0);
    assert_eq!(find("keywall_map_entries", &[("map", "KW_KEYS")]), 2.0);
    assert!(find("keywall_map_capacity", &[("map", "KW_KEYS")]) >= 2.0);
    assert!(find("keywall_map_capacity", &[("map", "KW_FLOWS")]) > 0.0);
    assert!(find("keywall_flows", &[]) >= 1.0);
    find("keywall_events_total", &[("result", "sent")]);
    find("keywall_events_total", &[("result", "suppressed")]);
    let h = scrape
        .samples
        .iter()
        .find(|s| s.metric == "keywall_policy_apply_seconds")
        .unwrap_or_else(|| panic!("no apply histogram in:\n{text}"));
    assert!(matches!(&h.value, prometheus_parse::Value::Histogram(b) if !b.is_empty()));
    assert!(
        !text.contains("goodkey1"),
        "per-key figures leaked into Prometheus"
    );
}

#[test]
fn events_show_a_provoked_drop() {
    let (sb, _srv) = setup("apievt");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    put_ok(&d, &policy(&sb, 1));
    let out_path = sb.tmp_dir().join("events.out");
    let err_path = sb.tmp_dir().join("events.err");
    let child = sb
        .edge_cmd(keywall_bin().unwrap())
        .args(["events", "--json", "--api", &api_arg(&d)])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut ev = Proc::new(child);
    thread::sleep(Duration::from_millis(500));
    if let Some(st) = ev.try_wait().unwrap() {
        panic!(
            "keywall events exited ({st}): {}",
            fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    let t0 = now_f64();
    assert_eq!(
        probe(&sb, sb.client_v4().into(), Some(LOCKED)),
        Got::Blocked
    );
    let src = sb.client_v4().to_string();
    let line = wait_for("a drop_locked event for lockkey1", 10, || {
        let f = fs::File::open(&out_path).ok()?;
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .find(|v| {
                v["reason"] == "drop_locked"
                    && v["prefix"] == "lockkey1"
                    && v["src"] == src.as_str()
            })
    });
    assert_eq!(line["port"], PORT, "{line}");
    assert!(line["sport"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["audit"], false, "{line}");
    let t = line["time_unix_ns"].as_u64().unwrap() as f64 / 1e9;
    assert!(
        (t - t0).abs() < 5.0,
        "event time {t} is not near the drop at {t0}: {line}"
    );
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    // The daemon logged it too.
    assert!(
        d.log_text().contains("drop event:"),
        "not in the daemon log"
    );
    ev.kill().ok();
}

/// A CA, a server certificate for `server_ip` and a client certificate, made with openssl.
fn make_pki(dir: &Path, server_ip: &str) -> [std::path::PathBuf; 6] {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &std::path::PathBuf| p.display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key) = (p("ca.pem"), p("ca.key"));
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "2",
                "-subj",
                "/CN=keywall-test-ca",
                "-keyout",
                &s(&ca_key),
                "-out",
                &s(&ca),
            ],
        ]
        .concat(),
    );
    let mut out = Vec::new();
    for (name, ext) in [
        (
            "server",
            format!("subjectAltName=IP:{server_ip}\nextendedKeyUsage=serverAuth\n"),
        ),
        ("client", "extendedKeyUsage=clientAuth\n".to_owned()),
    ] {
        let (key, csr, crt, extf) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.pem")),
            p(&format!("{name}.ext")),
        );
        fs::write(&extf, ext).unwrap();
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-subj",
                    &format!("/CN=keywall-{name}"),
                    "-keyout",
                    &s(&key),
                    "-out",
                    &s(&csr),
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&ca),
            "-CAkey",
            &s(&ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &s(&extf),
            "-out",
            &s(&crt),
        ]);
        out.push((crt, key));
    }
    let [(sc, sk), (cc, ck)] = [out.remove(0), out.remove(0)];
    [ca, ca_key, sc, sk, cc, ck]
}

#[test]
fn tls_with_client_certificates_beyond_loopback() {
    let (sb, _srv) = setup("apitls");
    let edge = sb.edge_v4().to_string();
    let [ca, _, srv_cert, srv_key, cli_cert, cli_key] = make_pki(sb.tmp_dir(), &edge);
    let token = sb.tmp_dir().join("token");
    fs::write(&token, "tls-token-42\n").unwrap();
    let s = |p: &std::path::PathBuf| p.display().to_string();
    let api = format!("tcp:{edge}:9443");
    let child = sb
        .edge_cmd(keywall_bin().unwrap())
        .args([
            "run",
            "--iface",
            sb.edge_if(),
            "--xdp-mode",
            "native",
            "--metrics",
            "off",
        ])
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .arg("--state-dir")
        .arg(sb.state_dir())
        .args(["--api", &api, "--token-file", &s(&token)])
        .args([
            "--api-tls-cert",
            &s(&srv_cert),
            "--api-tls-key",
            &s(&srv_key),
            "--api-client-ca",
            &s(&ca),
        ])
        .stdin(Stdio::null())
        .stdout(fs::File::create(sb.tmp_dir().join("keywall-tls.log")).unwrap())
        .stderr(fs::File::create(sb.tmp_dir().join("keywall-tls.err")).unwrap())
        .spawn()
        .unwrap();
    let _d = Proc::new(child);
    let url = format!("https://{edge}:9443/v1/status");
    // From the client namespace, across the veth: (curl exit code, HTTP code).
    let curl = |extra: &[&str]| -> (i32, String) {
        let out = sb
            .client_cmd("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &s(&ca),
            ])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let with_cert = ["--cert", &s(&cli_cert), "--key", &s(&cli_key)];
    let auth = ["-H", "Authorization: Bearer tls-token-42"];
    wait_for("the TLS API", 20, || {
        (curl(&[&with_cert[..], &auth].concat()) == (0, "200".into())).then_some(())
    });
    // Certificate without the token: 401.
    assert_eq!(curl(&with_cert), (0, "401".into()));
    // No client certificate: the handshake fails, nothing is answered.
    let (code, http) = curl(&auth);
    assert!(
        code != 0 && http != "200",
        "no client certificate got through: {code} {http}"
    );
    // Plain HTTP on the TLS port gets no API answer.
    let out = sb
        .client_cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(auth)
        .arg(format!("http://{edge}:9443/v1/status"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");
}
