//! Risk controls (issue 13) end to end: the real `keywall run` on the edge veth of a namespace
//! sandbox, real curl clients from several source networks, and the documented CLI and JSON
//! (`keywall key lock --reason --for`, `key show --json`, `keys idle|shared|top --json`).
//! Needs root; each test has its own sandbox, pin dir, state dir and socket.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tests::{
    api_bench::{keywall_bin, kw},
    daemon::Daemon,
    netns::{Proc, Sandbox},
};

const PORT: u16 = 8080;
const GOOD: &str = "goodkey1-5f2c9a7e-secret-part";
const IDLE: &str = "idlekey1-aa11bb22-secret-part";

fn api_arg(d: &Daemon) -> String {
    format!("unix:{}", d.sock.display())
}

fn setup(tag: &str) -> (Sandbox, Proc) {
    let sb = Sandbox::new(tag).expect("sandbox");
    let srv = sb.spawn_http_server_edge(PORT).expect("http server");
    (sb, srv)
}

/// `goodkey1` allowed from the client's primary address, `idlekey1` likewise (never used).
fn policy(sb: &Sandbox, settings: Value) -> Value {
    let mut s = json!({"key_prefix_len": 8, "unknown_key": "drop", "no_key": "pass",
                       "unbound_keys": "pass", "prefilter": false});
    if let (Value::Object(s), Value::Object(extra)) = (&mut s, settings) {
        s.extend(extra);
    }
    json!({
        "revision": 1,
        "settings": s,
        "listener": [{"port": PORT, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}],
        "key": [
            {"prefix": "goodkey1", "allow": [format!("{}/32", sb.client_v4())]},
            {"prefix": "idlekey1", "allow": [format!("{}/32", sb.client_v4())]},
        ],
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Pass,
    Blocked,
}

/// One curl request from `src` with the key in `X-MBX-APIKEY`.
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
        .args(["--interface", &src.to_string()])
        .args(["-H", &format!("X-MBX-APIKEY: {key}")])
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
            "curl from {src} key {key}: exit {c:?}, code {b:?}, {}",
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

/// A CLI verb's stdout parsed as JSON (it must succeed).
fn kw_json(sb: &Sandbox, args: &[&str]) -> Value {
    let out = kw(sb, args);
    assert!(
        out.status.success(),
        "keywall {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keywall {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn revision(d: &Daemon) -> u64 {
    let (st, v) = d.call("GET", "/v1/policy", None).unwrap();
    assert_eq!(st, 200);
    v["revision"].as_u64().unwrap()
}

#[test]
fn a_lock_with_for_ends_on_its_own() {
    let (sb, _srv) = setup("risklock");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    let api = api_arg(&d);
    let (st, v) = d
        .call("PUT", "/v1/policy", Some(&policy(&sb, json!({}))))
        .unwrap();
    assert_eq!(st, 200, "{v}");
    let me: IpAddr = sb.client_v4().into();
    wait_for("the key passes", 10, || {
        (probe(&sb, me, GOOD) == Got::Pass).then_some(())
    });

    let out = kw(
        &sb,
        &[
            "key",
            "lock",
            "goodkey1",
            "--reason",
            "leaked in a ticket",
            "--for",
            "6s",
            "--api",
            &api,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let locked_at = Instant::now();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("until "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rev = revision(&d);
    assert_eq!(probe(&sb, me, GOOD), Got::Blocked);

    let show = kw_json(&sb, &["key", "show", "goodkey1", "--json", "--api", &api]);
    assert_eq!(show["locked"], true, "{show}");
    assert_eq!(show["lock_reason"], "leaked in a ticket");
    let until = show["locked_until"]
        .as_str()
        .expect("locked_until")
        .to_owned();
    assert!(keywall::risk::parse_rfc3339(&until).is_ok(), "{until}");
    assert_eq!(show["policy"]["lock_reason"], "leaked in a ticket");
    // Status counts locks by reason.
    let (_, st) = d.call("GET", "/v1/status", None).unwrap();
    assert_eq!(
        st["lock_reasons"],
        json!([{"reason": "leaked in a ticket", "keys": 1}]),
        "{st}"
    );
    // The plain view names the reason and the expiry.
    let out = kw(&sb, &["key", "show", "goodkey1", "--api", &api]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("leaked in a ticket") && text.contains(&until),
        "{text}"
    );

    // Nothing writes from here on: the datapath ends the lock at its instant.
    wait_for("the lock to end", 20, || {
        (probe(&sb, me, GOOD) == Got::Pass).then_some(())
    });
    assert!(
        locked_at.elapsed() >= Duration::from_secs(5),
        "ended early: {:?}",
        locked_at.elapsed()
    );
    assert_eq!(revision(&d), rev, "no policy write ended the lock");
    let show = kw_json(&sb, &["key", "show", "goodkey1", "--json", "--api", &api]);
    assert_eq!(show["locked"], false, "{show}");
    assert_eq!(show["lock_expired"], true, "{show}");
    // The allowlist still holds after the lock ends.
    let other: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 7, 1));
    sb.add_client_addr(other).unwrap();
    assert_eq!(probe(&sb, other, GOOD), Got::Blocked);

    // --until takes an RFC 3339 instant; a bad one is refused before anything is sent.
    let out = kw(
        &sb,
        &[
            "key",
            "lock",
            "goodkey1",
            "--until",
            "next tuesday",
            "--api",
            &api,
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--until"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(revision(&d), rev);
}

#[test]
fn activity_shows_in_key_show_and_keys_listings() {
    let (sb, _srv) = setup("riskact");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    let api = api_arg(&d);
    let p = policy(
        &sb,
        json!({"shared_key": {"networks": 3, "window": "1h", "action": "alert"}}),
    );
    let (st, v) = d.call("PUT", "/v1/policy", Some(&p)).unwrap();
    assert_eq!(st, 200, "{v}");
    let me: IpAddr = sb.client_v4().into();
    wait_for("the key passes", 10, || {
        (probe(&sb, me, GOOD) == Got::Pass).then_some(())
    });
    for _ in 0..3 {
        assert_eq!(probe(&sb, me, GOOD), Got::Pass);
    }

    let show = kw_json(&sb, &["key", "show", "goodkey1", "--json", "--api", &api]);
    assert_eq!(show["locked"], false, "{show}");
    assert!(show["last_allowed"].is_string(), "{show}");
    assert_eq!(show["networks"], 1, "{show}");
    assert!(
        show["activity"]["requests"].as_u64().unwrap() >= 4,
        "{show}"
    );
    assert!(
        show["activity"]["connections"].as_u64().unwrap() >= 4,
        "{show}"
    );
    let unused = kw_json(&sb, &["key", "show", "idlekey1", "--json", "--api", &api]);
    assert_eq!(unused["last_allowed"], Value::Null, "{unused}");
    assert_eq!(unused["networks"], 0);

    // Three more source networks, each refused (not in the allowlist): four in the window.
    for i in 1..=3u8 {
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, i, 1));
        sb.add_client_addr(a).unwrap();
        assert_eq!(probe(&sb, a, GOOD), Got::Blocked);
    }
    let show = kw_json(&sb, &["key", "show", "goodkey1", "--json", "--api", &api]);
    assert_eq!(show["networks"], 4, "{show}");
    assert_eq!(
        show["activity"]["last_refused_reason"], "drop_not_allowed",
        "{show}"
    );

    let shared = kw_json(&sb, &["keys", "shared", "--json", "--api", &api]);
    let rows = shared["keys"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{shared}");
    assert_eq!(rows[0]["prefix"], "goodkey1");
    assert_eq!(rows[0]["networks"], 4);
    assert_eq!(shared["networks_limit"], 3);

    let top = kw_json(&sb, &["keys", "top", "5", "--json", "--api", &api]);
    assert_eq!(top["keys"][0]["prefix"], "goodkey1", "{top}");
    assert_eq!(top["total"], 2);

    // Idle for 1h: only the key never used (it got its slot just now, so ask for 0s too).
    let idle = kw_json(
        &sb,
        &["keys", "idle", "--for", "1h", "--json", "--api", &api],
    );
    assert_eq!(idle["keys"].as_array().unwrap().len(), 0, "{idle}");
    thread::sleep(Duration::from_secs(2));
    let idle = kw_json(
        &sb,
        &["keys", "idle", "--for", "2s", "--json", "--api", &api],
    );
    let names: Vec<&str> = idle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["prefix"].as_str())
        .collect();
    assert!(names.contains(&"idlekey1"), "{idle}");
    // Without --for: the policy's idle_lock_after (none here), else 14 days.
    let idle = kw_json(&sb, &["keys", "idle", "--json", "--api", &api]);
    assert_eq!(idle["idle_for"], "14d", "{idle}");
    assert_eq!(idle["keys"].as_array().unwrap().len(), 0, "{idle}");
    // The plain table names the keys.
    let out = kw(&sb, &["keys", "top", "--api", &api]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("goodkey1"));

    // The API answers the same query, and refuses a bad one with the parameter's name.
    let (st, v) = d
        .call("GET", "/v1/activity?shared=true&top=1", None)
        .unwrap();
    assert_eq!(
        (st, v["keys"][0]["prefix"].as_str()),
        (200, Some("goodkey1")),
        "{v}"
    );
    let (st, v) = d.call("GET", "/v1/activity?idle_for=soon", None).unwrap();
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().starts_with("idle_for"), "{v}");
    // An unused key in /v1/keys carries the same fields as key show.
    let (st, v) = d.call("GET", "/v1/keys/idlekey1", None).unwrap();
    assert_eq!(st, 200);
    for f in [
        "locked",
        "lock_reason",
        "locked_until",
        "last_allowed",
        "networks",
    ] {
        assert!(v.get(f).is_some(), "{f} missing: {v}");
    }
    let _ = IDLE;
}

/// `keywall events --json` running in the background, into a file.
fn events(sb: &Sandbox, d: &Daemon) -> (Proc, std::path::PathBuf) {
    let out_path = sb.tmp_dir().join("events.out");
    let child = sb
        .edge_cmd(keywall_bin().unwrap())
        .args(["events", "--json", "--api", &api_arg(d)])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    (Proc::new(child), out_path)
}

fn event(path: &Path, f: impl Fn(&Value) -> bool) -> Option<Value> {
    let file = fs::File::open(path).ok()?;
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .find(|v| f(v))
}

fn show(sb: &Sandbox, api: &str, prefix: &str) -> Value {
    kw_json(sb, &["key", "show", prefix, "--json", "--api", api])
}

#[test]
fn an_idle_key_is_locked_on_a_single_host_and_unlock_undoes_it() {
    let (sb, _srv) = setup("riskidle");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    let api = api_arg(&d);
    let (st, v) = d
        .call(
            "PUT",
            "/v1/policy",
            Some(&policy(&sb, json!({"idle_lock_after": "6s"}))),
        )
        .unwrap();
    assert_eq!(st, 200, "{v}");
    let (_ev, ev_path) = events(&sb, &d);
    let me: IpAddr = sb.client_v4().into();
    // goodkey1 is used every second; idlekey1 never.
    let t0 = Instant::now();
    wait_for("idlekey1 locked as idle", 30, || {
        assert_eq!(
            probe(&sb, me, GOOD),
            Got::Pass,
            "the key in use is never locked"
        );
        thread::sleep(Duration::from_millis(500));
        let s = show(&sb, &api, "idlekey1");
        (s["locked"] == true).then_some(s)
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "locked before it was idle: {:?}",
        t0.elapsed()
    );
    let s = show(&sb, &api, "idlekey1");
    assert_eq!(s["lock_reason"], "idle", "{s}");
    assert_eq!(s["locked_until"], Value::Null);
    assert_eq!(probe(&sb, me, IDLE), Got::Blocked);
    assert_eq!(show(&sb, &api, "goodkey1")["locked"], false);
    let ev = wait_for("an idle_lock event", 10, || {
        event(&ev_path, |v| {
            v["kind"] == "idle_lock" && v["prefix"] == "idlekey1"
        })
    });
    assert_eq!(ev["reason"], "idle", "{ev}");
    // A drop event of the locked key names its lock reason.
    assert_eq!(probe(&sb, me, IDLE), Got::Blocked);
    let drop = wait_for("a drop_locked event naming the reason", 10, || {
        event(&ev_path, |v| {
            v["reason"] == "drop_locked" && v["prefix"] == "idlekey1"
        })
    });
    assert_eq!(drop["lock_reason"], "idle", "{drop}");
    // Status lists the automatic lock.
    let st = kw_json(
        &sb,
        &[
            "status",
            "--json",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
            "--state-dir",
            &sb.state_dir().display().to_string(),
        ],
    );
    assert_eq!(st["auto_locks"]["count"], 1, "{st}");
    assert_eq!(st["auto_locks"]["keys"][0]["prefix"], "idlekey1");

    // The operator unlocks it: it passes, and gets a fresh idle period (not locked again
    // at the next look).
    let out = kw(&sb, &["key", "unlock", "idlekey1", "--api", &api]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(probe(&sb, me, IDLE), Got::Pass);
    for _ in 0..3 {
        // goodkey1 stays in use meanwhile (it would be idle too otherwise).
        assert_eq!(probe(&sb, me, GOOD), Got::Pass);
        thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(show(&sb, &api, "idlekey1")["locked"], false);
    let st = kw_json(
        &sb,
        &[
            "status",
            "--json",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
            "--state-dir",
            &sb.state_dir().display().to_string(),
        ],
    );
    assert_eq!(st["auto_locks"]["count"], 0, "{st}");
}

#[test]
fn under_a_policy_file_idle_locks_are_an_overlay_the_file_does_not_undo() {
    let (sb, _srv) = setup("riskfile");
    let file = sb.tmp_dir().join("policy.toml");
    let write = |extra_key: bool| {
        let mut p: keywall::policy::Policy =
            serde_json::from_value(policy(&sb, json!({"idle_lock_after": "5s"}))).unwrap();
        p.revision = None;
        if extra_key {
            p.key
                .push(serde_json::from_value(json!({"prefix": "newkey01"})).unwrap());
        }
        fs::write(&file, toml::to_string(&p).unwrap()).unwrap();
    };
    write(false);
    let d = Daemon::start(&sb, 1, &["--policy", &file.display().to_string()]).unwrap();
    let api = api_arg(&d);
    let me: IpAddr = sb.client_v4().into();
    wait_for("idlekey1 locked as idle", 30, || {
        assert_eq!(probe(&sb, me, GOOD), Got::Pass);
        thread::sleep(Duration::from_millis(500));
        (show(&sb, &api, "idlekey1")["lock_reason"] == "idle").then_some(())
    });
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("idle\""),
        "the file is never rewritten: {text}"
    );
    assert!(
        fs::read_to_string(sb.state_dir().join("auto-locks.json"))
            .unwrap()
            .contains("idlekey1"),
        "the overlay is in the state dir"
    );
    // An edit of the file (a key added) is applied with the overlay still over it.
    write(true);
    wait_for("the edited file applied", 15, || {
        let (_, v) = d.call("GET", "/v1/keys/newkey01", None).ok()?;
        v["policy"]["prefix"].as_str().map(|_| ())
    });
    assert_eq!(show(&sb, &api, "idlekey1")["locked"], true);
    assert_eq!(probe(&sb, me, IDLE), Got::Blocked);
    // The file owns the policy: other writes get 409, but an automatic lock can be undone.
    let out = kw(&sb, &["key", "lock", "goodkey1", "--api", &api]);
    assert!(!out.status.success());
    let out = kw(&sb, &["key", "unlock", "idlekey1", "--api", &api]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(probe(&sb, me, IDLE), Got::Pass);
    assert!(
        !fs::read_to_string(sb.state_dir().join("auto-locks.json"))
            .unwrap()
            .contains("\"locks\": {\n    \"idlekey1")
    );
}

#[test]
fn a_key_used_from_four_networks_is_flagged_then_locked() {
    let (sb, _srv) = setup("riskshare");
    let d = Daemon::start(&sb, 1, &["--metrics", "127.0.0.1:9478"]).unwrap();
    let api = api_arg(&d);
    let rule =
        |action: &str| json!({"shared_key": {"networks": 3, "window": "1h", "action": action}});
    let (st, v) = d
        .call("PUT", "/v1/policy", Some(&policy(&sb, rule("alert"))))
        .unwrap();
    assert_eq!(st, 200, "{v}");
    let (_ev, ev_path) = events(&sb, &d);
    let me: IpAddr = sb.client_v4().into();
    wait_for("the key passes", 10, || {
        (probe(&sb, me, GOOD) == Got::Pass).then_some(())
    });
    // Three more /24s try the key (refused: not in its allowlist): four networks.
    for i in 1..=3u8 {
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, i, 1));
        sb.add_client_addr(a).unwrap();
        assert_eq!(probe(&sb, a, GOOD), Got::Blocked);
    }
    let ev = wait_for("a shared_key event", 30, || {
        event(&ev_path, |v| {
            v["kind"] == "shared_key" && v["prefix"] == "goodkey1"
        })
    });
    assert_eq!(ev["networks"], 4, "{ev}");
    let metric = |sb: &Sandbox| -> Option<f64> {
        let out = sb
            .exec_edge(
                "curl",
                ["-sS", "--max-time", "5", "http://127.0.0.1:9478/metrics"],
            )
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.strip_prefix("keywall_keys_shared_suspect ")
                .map(|v| v.trim().parse().unwrap())
        })
    };
    assert_eq!(metric(&sb), Some(1.0));
    // alert: reported, not locked.
    assert_eq!(show(&sb, &api, "goodkey1")["locked"], false);
    assert_eq!(probe(&sb, me, GOOD), Got::Pass);
    let st = kw_json(
        &sb,
        &[
            "status",
            "--json",
            "--pin-dir",
            &sb.pin_dir().display().to_string(),
            "--state-dir",
            &sb.state_dir().display().to_string(),
        ],
    );
    assert_eq!(st["risk"]["shared_suspects"][0], "goodkey1", "{st}");

    // lock: the same suspect is locked with the reason `shared`.
    let mut p = policy(&sb, rule("lock"));
    p["revision"] = 2.into();
    let (st, v) = d.call("PUT", "/v1/policy", Some(&p)).unwrap();
    assert_eq!(st, 200, "{v}");
    wait_for("goodkey1 locked as shared", 30, || {
        (show(&sb, &api, "goodkey1")["lock_reason"] == "shared").then_some(())
    });
    assert_eq!(probe(&sb, me, GOOD), Got::Blocked);
    wait_for("a shared_lock event", 10, || {
        event(&ev_path, |v| {
            v["kind"] == "shared_lock" && v["prefix"] == "goodkey1"
        })
    });
    // The key never used stays as it was.
    assert_eq!(show(&sb, &api, "idlekey1")["locked"], false);
}

#[test]
fn a_curl_burst_over_max_requests_per_s_is_partly_dropped_and_a_slower_client_is_untouched() {
    let (sb, _srv) = setup("riskrate");
    let d = Daemon::start(&sb, 1, &[]).unwrap();
    let mut p = policy(&sb, json!({"max_requests_per_s": {"rate": 5, "burst": 5}}));
    p["key"][1]["prefix"] = "slowkey1".into();
    let (st, v) = d.call("PUT", "/v1/policy", Some(&p)).unwrap();
    assert_eq!(st, 200, "{v}");
    let me: IpAddr = sb.client_v4().into();
    wait_for("the key passes", 10, || {
        (probe(&sb, me, "slowkey1-x") == Got::Pass).then_some(())
    });
    thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let (burst, slow) = thread::scope(|s| {
        // 30 requests at once on goodkey1 (curl retries nothing; TCP retransmits a dropped
        // request, which is judged again once the key has room).
        let burst = s.spawn(|| {
            let hs: Vec<_> = (0..30)
                .map(|_| {
                    s.spawn(|| {
                        let t = Instant::now();
                        (probe(&sb, me, GOOD), t.elapsed())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        // The slower client: another key, 2 requests a second, under its own limit.
        let slow = s.spawn(|| {
            (0..6)
                .map(|_| {
                    let t = Instant::now();
                    let g = probe(&sb, me, "slowkey1-x");
                    let e = t.elapsed();
                    thread::sleep(Duration::from_millis(500).saturating_sub(e));
                    (g, e)
                })
                .collect::<Vec<_>>()
        });
        (burst.join().unwrap(), slow.join().unwrap())
    });
    let (st, stats) = d.call("GET", "/v1/stats", None).unwrap();
    assert_eq!(st, 200);
    let limited = stats["reasons"]["drop_rate_limited"]["packets"]
        .as_u64()
        .unwrap();
    assert!(limited > 0, "the burst went over 5/s: {stats}");
    let delayed_or_failed = burst
        .iter()
        .filter(|(g, e)| *g == Got::Blocked || *e > Duration::from_millis(150))
        .count();
    assert!(
        delayed_or_failed >= 10,
        "at most ~10 of 30 fit the first second: {burst:?}"
    );
    assert!(burst.iter().any(|(g, _)| *g == Got::Pass), "{burst:?}");
    // The slower client: every request passed (no retransmission wait: the machine's
    // load from 30 curls is the only delay), and its key was never limited.
    assert!(
        slow.iter()
            .all(|(g, e)| *g == Got::Pass && *e < Duration::from_millis(1000)),
        "{slow:?}"
    );
    let (_, k) = d.call("GET", "/v1/keys/slowkey1", None).unwrap();
    assert_eq!(k["counters"]["dropped"], 0, "{k}");
    let (_, k) = d.call("GET", "/v1/keys/goodkey1", None).unwrap();
    assert_eq!(
        k["activity"]["last_refused_reason"], "drop_rate_limited",
        "{k}"
    );
    eprintln!(
        "burst done in {:?}; {limited} segments rate limited",
        t0.elapsed()
    );
}
