//! End to end: the real `keywall run` daemon on the edge veth of a namespace sandbox, real
//! clients (curl, a python keep-alive client) against a real HTTP server. Needs root.
//!
//! Every test has its own sandbox (namespaces, pin dir, state dir), so they run in parallel.
//! The `keywall` binary must be built first (`cargo build -p filter-user`).

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use tests::{
    api_bench::{KEEPALIVE_CLIENT_PY, kw, reason_packets},
    daemon::Daemon,
    netns::{Proc, Sandbox},
};

const PORT: u16 = 8080;
/// curl's `--max-time` for probes: a dropped request times out (exit 28) after this.
const PROBE_SECS: &str = "2";
const GOOD: &str = "goodkey1-5f2c9a7e-secret-part";
const LOCKED: &str = "lockkey1-0d9e8c7b-secret-part";
const UNKNOWN: &str = "nosuchk1-aaaaaaaa-secret-part";

// ---------------------------------------------------------------------------------------------
// helpers

fn kw_json(sb: &Sandbox, args: &[&str]) -> Value {
    let out = kw(sb, args);
    assert!(
        out.status.success(),
        "keywall {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keywall {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stats(sb: &Sandbox) -> Value {
    let pin = sb.pin_dir().display().to_string();
    kw_json(sb, &["stats", "--pin-dir", &pin, "--json"])
}

fn status(sb: &Sandbox) -> Value {
    let pin = sb.pin_dir().display().to_string();
    let state = sb.state_dir().display().to_string();
    kw_json(
        sb,
        &["status", "--pin-dir", &pin, "--state-dir", &state, "--json"],
    )
}

fn key_stats<'a>(stats: &'a Value, prefix: &str) -> &'a Value {
    stats["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("stats has no keys array: {stats}"))
        .iter()
        .find(|k| k["prefix"] == prefix)
        .unwrap_or_else(|| panic!("stats has no key {prefix}: {stats}"))
}

fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Replaces `path` atomically (temp file in the same directory, then rename).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = fs::File::create(&tmp).expect("create temp policy");
        f.write_all(text.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    fs::rename(&tmp, path).expect("rename policy into place");
}

/// The policy of these tests: `goodkey1` allowed from the client's primary v4 and v6 hosts,
/// `lockkey1` locked, unknown keys dropped, keyless requests passed.
fn policy(sb: &Sandbox, good_locked: bool) -> String {
    format!(
        r#"# keywall e2e policy
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = false

[[listener]]
port = {PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY", "OK-ACCESS-KEY"]

[[key]]
prefix = "goodkey1"
allow = ["{v4}/32", "{v6}/128"]
locked = {good_locked}

[[key]]
prefix = "lockkey1"
allow = ["{v4}/32", "{v6}/128"]
locked = true
"#,
        v4 = sb.client_v4(),
        v6 = sb.client_v6(),
    )
}

/// `keywall run` with `policy` (without one, on what the state dir holds), not waited for.
fn start<'a>(sb: &'a Sandbox, policy: Option<&Path>, n: u32) -> Daemon<'a> {
    let policy = policy.map(|p| p.display().to_string());
    let mut extra = vec!["--poll-ms", "200"];
    if let Some(p) = &policy {
        extra.extend(["--policy", p.as_str()]);
    }
    Daemon::spawn(sb, n, &extra).expect("starting keywall run")
}

/// Waits (15 s at most) until this daemon has attached (or taken over) and says so in
/// `keywall status`, XDP shows on the edge veth, and an allowed request passes.
fn wait_enforcing(d: &mut Daemon) {
    let sb = d.sb;
    let pid = d.pid();
    let r = d.wait_for(Duration::from_secs(15), "keywall to enforce", || {
        let st = kw(
            sb,
            &[
                "status",
                "--pin-dir",
                &sb.pin_dir().display().to_string(),
                "--state-dir",
                &sb.state_dir().display().to_string(),
                "--json",
            ],
        );
        let ready = st.status.success()
            && serde_json::from_slice::<Value>(&st.stdout).is_ok_and(|v| {
                v["daemon"]["running"] == true
                    && v["daemon"]["pid"] == pid
                    && v["mode"] == "enforce"
                    && v["interfaces"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|i| i["name"] == sb.edge_if()))
            })
            && sb.xdp_attached().unwrap_or(false)
            && probe(sb, Some(sb.client_v4().into()), Some(GOOD), "2") == Got::Pass;
        if ready {
            Ok(())
        } else {
            Err(format!("status: {}", String::from_utf8_lossy(&st.stdout)))
        }
    });
    if let Err(e) = r {
        panic!("{e:#}");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    /// HTTP 200.
    Pass,
    /// No answer within the time limit (curl exit 28): what an XDP drop looks like.
    Blocked,
}

/// One HTTP request from the client namespace, from `src` (v4 or v6; the edge address of the
/// same family is the destination), with the API key in `X-MBX-APIKEY` (or none).
fn probe(sb: &Sandbox, src: Option<IpAddr>, key: Option<&str>, max_time: &str) -> Got {
    probe_hdr(sb, src, key.map(|k| ("X-MBX-APIKEY", k)), max_time)
}

fn probe_hdr(sb: &Sandbox, src: Option<IpAddr>, key: Option<(&str, &str)>, max_time: &str) -> Got {
    let src = src.unwrap_or(sb.client_v4().into());
    let url = match src {
        IpAddr::V4(_) => format!("http://{}:{PORT}/api/v3/account", sb.edge_v4()),
        IpAddr::V6(_) => format!("http://[{}]:{PORT}/api/v3/account", sb.edge_v6()),
    };
    let mut cmd = sb.client_cmd("curl");
    cmd.args([
        "-sS",
        "--max-time",
        max_time,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .args(["--interface", &src.to_string()]);
    if let Some((h, k)) = key {
        cmd.args(["-H", &format!("{h}: {k}")]);
    }
    cmd.arg(&url);
    let out = cmd.stdin(Stdio::null()).output().expect("running curl");
    let code = out.status.code().unwrap_or(-1);
    let body = String::from_utf8_lossy(&out.stdout);
    match (code, body.trim()) {
        (0, "200") => Got::Pass,
        (28, _) => Got::Blocked,
        _ => panic!(
            "curl from {src} key {key:?}: unexpected exit {code}, code {body:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// A request case: description, source, header and key, and the expected outcome.
type Case<'a> = (String, IpAddr, Option<(&'a str, &'a str)>, Got);

/// Runs all cases concurrently (blocked ones each take the full timeout) and asserts them.
fn check_cases(sb: &Sandbox, cases: &[Case<'_>]) {
    let results: Vec<(String, Got, Got)> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(name, src, key, want)| {
                s.spawn(move || {
                    (
                        name.clone(),
                        *want,
                        probe_hdr(sb, Some(*src), *key, PROBE_SECS),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let bad: Vec<String> = results
        .iter()
        .filter(|(_, want, got)| want != got)
        .map(|(n, want, got)| format!("{n}: wanted {want:?}, got {got:?}"))
        .collect();
    assert!(bad.is_empty(), "wrong verdicts:\n  {}", bad.join("\n  "));
}

fn setup(tag: &str) -> (Sandbox, Proc, PathBuf) {
    let sb = Sandbox::new(tag).expect("sandbox");
    let srv = sb.spawn_http_server_edge(PORT).expect("http server");
    let path = sb.tmp_dir().join("policy.toml");
    write_atomic(&path, &policy(&sb, false));
    // The unfiltered path works before anything is attached.
    assert_eq!(probe(&sb, None, Some(GOOD), "3"), Got::Pass);
    (sb, srv, path)
}

// ---------------------------------------------------------------------------------------------
// tests

#[test]
fn allowed_blocked_locked_unknown_nokey() {
    let (sb, _srv, path) = setup("e2everd");
    let v4b: IpAddr = sb.add_client_v4().unwrap().into();
    let v6b: IpAddr = sb.add_client_v6().unwrap().into();
    let (v4, v6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());

    // The file is valid offline too.
    let out = kw(&sb, &["policy", "check", &path.display().to_string()]);
    assert!(
        out.status.success(),
        "policy check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut d = start(&sb, Some(&path), 1);
    wait_enforcing(&mut d);
    let st = status(&sb);
    assert_eq!(st["interfaces"][0]["xdp_mode"], "native", "{st}");
    assert_eq!(st["keys"], 2, "{st}");
    assert_eq!(st["locked_keys"], 1, "{st}");

    let x = "X-MBX-APIKEY";
    let o = "OK-ACCESS-KEY";
    let cases: Vec<Case> = vec![
        (
            "goodkey1 from primary v4".into(),
            v4,
            Some((x, GOOD)),
            Got::Pass,
        ),
        (
            "goodkey1 from primary v6".into(),
            v6,
            Some((x, GOOD)),
            Got::Pass,
        ),
        (
            "goodkey1 (OK-ACCESS-KEY) from primary v6".into(),
            v6,
            Some((o, GOOD)),
            Got::Pass,
        ),
        (
            "goodkey1 from second v4".into(),
            v4b,
            Some((x, GOOD)),
            Got::Blocked,
        ),
        (
            "goodkey1 from second v6".into(),
            v6b,
            Some((x, GOOD)),
            Got::Blocked,
        ),
        (
            "goodkey1 (OK-ACCESS-KEY) from second v4".into(),
            v4b,
            Some((o, GOOD)),
            Got::Blocked,
        ),
        (
            "lockkey1 from primary v4".into(),
            v4,
            Some((x, LOCKED)),
            Got::Blocked,
        ),
        (
            "lockkey1 from primary v6".into(),
            v6,
            Some((o, LOCKED)),
            Got::Blocked,
        ),
        (
            "unknown key from primary v4".into(),
            v4,
            Some((x, UNKNOWN)),
            Got::Blocked,
        ),
        (
            "unknown key from primary v6".into(),
            v6,
            Some((x, UNKNOWN)),
            Got::Blocked,
        ),
        ("no key from primary v4".into(), v4, None, Got::Pass),
        ("no key from second v6".into(), v6b, None, Got::Pass),
    ];
    check_cases(&sb, &cases);
    d.assert_running();

    let s = stats(&sb);
    for r in [
        "drop_not_allowed",
        "drop_locked",
        "drop_unknown_key",
        "pass_allowed",
        "pass_no_key",
    ] {
        assert!(reason_packets(&s, r) > 0, "{r} counted nothing: {s}");
        assert!(
            s["reasons"][r]["bytes"].as_u64().unwrap() > 0,
            "{r} bytes: {s}"
        );
    }
    assert_eq!(s["reasons"]["drop_not_allowed"]["action"], "dropped", "{s}");
    assert_eq!(s["reasons"]["pass_allowed"]["action"], "passed", "{s}");
    // Nothing here is malformed, and no key-less request was dropped.
    assert_eq!(reason_packets(&s, "drop_malformed"), 0, "{s}");
    assert_eq!(reason_packets(&s, "drop_no_key"), 0, "{s}");
    let g = key_stats(&s, "goodkey1");
    assert!(g["passed"].as_u64().unwrap() > 0, "goodkey1: {g}");
    assert!(g["dropped"].as_u64().unwrap() > 0, "goodkey1: {g}");
    assert!(
        g["last_seen_unix"].as_u64().unwrap() > 1_600_000_000,
        "goodkey1: {g}"
    );
    let l = key_stats(&s, "lockkey1");
    assert_eq!(l["passed"], 0, "lockkey1: {l}");
    assert!(l["dropped"].as_u64().unwrap() > 0, "lockkey1: {l}");
    assert!(
        !s["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["prefix"] == "nosuchk1"),
        "an unknown key has per-key counters: {s}"
    );
}

#[derive(Debug, Clone)]
struct Line {
    ok: bool,
    start: f64,
    end: f64,
    port: u32,
    what: String,
}

fn client_lines(path: &Path) -> Vec<Line> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 {
                return None;
            }
            Some(Line {
                ok: f[0] == "ok",
                start: f[1].parse().ok()?,
                end: f[2].parse().ok()?,
                port: f[3].parse().ok()?,
                what: f[4].to_owned(),
            })
        })
        .collect()
}

/// The client's lines, one per row, with times relative to `t0`.
fn show(lines: &[Line], t0: f64) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "\n    {} sent {:+.3} s, done {:+.3} s, local port {}, {}",
                if l.ok { "ok " } else { "err" },
                l.start - t0,
                l.end - t0,
                l.port,
                l.what
            )
        })
        .collect()
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

#[test]
fn lock_in_policy_file_cuts_keepalive() {
    let (sb, _srv, path) = setup("e2elock");
    let mut d = start(&sb, Some(&path), 1);
    wait_enforcing(&mut d);

    let script = sb.tmp_dir().join("client.py");
    fs::write(&script, KEEPALIVE_CLIENT_PY).unwrap();
    let out_path = sb.tmp_dir().join("client.out");
    let out = fs::File::create(&out_path).unwrap();
    let client = sb
        .client_cmd("python3")
        .arg(&script)
        .arg(sb.edge_v4().to_string())
        .arg(PORT.to_string())
        .arg(sb.client_v4().to_string())
        .arg(GOOD)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(fs::File::create(sb.tmp_dir().join("client.err")).unwrap())
        .spawn()
        .expect("python client");
    let mut client = Proc::new(client);

    // A few answers on one persistent connection.
    let before = wait_for("5 answers on the keep-alive connection", 10, || {
        let l = client_lines(&out_path);
        (l.iter().filter(|l| l.ok).count() >= 5).then_some(l)
    });
    assert!(
        before.iter().all(|l| l.ok && l.what == "200"),
        "the allowed client failed before the lock:{}",
        show(&before, before[0].start)
    );
    let conn = before[0].port;
    assert!(
        before.iter().all(|l| l.port == conn),
        "the client did not keep one connection:{}",
        show(&before, before[0].start)
    );

    // Lock goodkey1 in the policy file.
    let t_lock = now_unix_f64();
    write_atomic(&path, &policy(&sb, true));
    thread::sleep(Duration::from_millis(3500));

    let lines = client_lines(&out_path);
    let late_ok: Vec<Line> = lines
        .iter()
        .filter(|l| l.ok && l.end > t_lock + 2.0)
        .cloned()
        .collect();
    assert!(
        late_ok.is_empty(),
        "{} answers more than 2 s after the lock; all (times from the lock):{}",
        late_ok.len(),
        show(&lines, t_lock)
    );
    let first_err = lines.iter().find(|l| !l.ok).unwrap_or_else(|| {
        panic!(
            "the client never failed after the lock:{}",
            show(&lines, t_lock)
        )
    });
    assert!(
        first_err.start >= t_lock && first_err.start <= t_lock + 2.0,
        "the first failed request was sent {:.3} s after the lock (want 0..2 s):{}",
        first_err.start - t_lock,
        show(&lines, t_lock)
    );
    assert_eq!(
        first_err.port,
        conn,
        "the cut was not on the established keep-alive connection:{}",
        show(&lines, t_lock)
    );
    // Every request of that connection before its cut was answered.
    assert!(
        lines
            .iter()
            .take_while(|l| l.ok)
            .all(|l| l.port == conn && l.what == "200"),
        "{}",
        show(&lines, t_lock)
    );
    // New connections with the key stay refused too.
    assert!(
        lines.iter().filter(|l| !l.ok).count() >= 2,
        "{}",
        show(&lines, t_lock)
    );

    let s = stats(&sb);
    assert!(reason_packets(&s, "drop_locked") > 0, "{s}");
    assert!(
        key_stats(&s, "goodkey1")["dropped"].as_u64().unwrap() > 0,
        "{s}"
    );
    let st = status(&sb);
    assert_eq!(st["locked_keys"], 2, "{st}");
    assert!(st["policy_error"].is_null(), "{st}");

    // A broken file: rejected offline, and the running policy (with the lock) stays.
    let bad = format!(
        "{}\n[[key]\nprefix = \"brokenk1\"\n",
        policy(&sb, false) // would unlock goodkey1 if it were applied
    );
    let bad_line = bad.lines().position(|l| l == "[[key]").unwrap() + 1;
    let bad_copy = sb.tmp_dir().join("bad.toml");
    fs::write(&bad_copy, &bad).unwrap();
    let chk = kw(&sb, &["policy", "check", &bad_copy.display().to_string()]);
    let chk_err = String::from_utf8_lossy(&chk.stderr);
    assert_eq!(
        chk.status.code(),
        Some(1),
        "policy check on a broken file: {chk_err}"
    );
    assert!(
        chk_err.contains(&format!("line {bad_line}")),
        "policy check does not name line {bad_line}: {chk_err}"
    );

    let n_before_bad = client_lines(&out_path).len();
    write_atomic(&path, &bad);
    let err = wait_for("status to report the policy error", 5, || {
        let st = status(&sb);
        st["policy_error"].as_str().map(str::to_owned)
    });
    assert!(
        err.contains(&format!("line {bad_line}")),
        "policy_error does not name line {bad_line}: {err}"
    );
    let st = status(&sb);
    assert_eq!(
        st["locked_keys"], 2,
        "the broken file changed the policy: {st}"
    );
    assert_eq!(st["mode"], "enforce", "{st}");
    thread::sleep(Duration::from_millis(1500));
    let after_bad = client_lines(&out_path);
    assert!(
        after_bad[n_before_bad..].iter().all(|l| !l.ok),
        "the lock stopped holding after a broken policy file:{}",
        show(&after_bad[n_before_bad..], t_lock)
    );
    assert_eq!(probe(&sb, None, Some(GOOD), PROBE_SECS), Got::Blocked);
    assert_eq!(probe(&sb, None, None, PROBE_SECS), Got::Pass);
    d.assert_running();

    // A good file again: unlocked, the client gets answers again, and the error clears.
    let n_before_fix = client_lines(&out_path).len();
    write_atomic(&path, &policy(&sb, false));
    wait_for("answers after unlocking", 5, || {
        client_lines(&out_path)[n_before_fix..]
            .iter()
            .any(|l| l.ok)
            .then_some(())
    });
    assert!(status(&sb)["policy_error"].is_null());

    // Touching the file (same bytes) applies nothing: the revision stays.
    let rev = status(&sb)["revision"].as_u64().unwrap();
    let t = fs::read(&path).unwrap();
    fs::write(&path, &t).unwrap();
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        status(&sb)["revision"].as_u64(),
        Some(rev),
        "a touch re-applied"
    );
    // The JSON form is a policy file too: `policy check`, and the daemon's --policy.
    let pol: Value = {
        let toml_policy = keywall::policy::Policy::from_toml_str(&policy(&sb, true)).unwrap();
        serde_json::to_value(&toml_policy).unwrap()
    };
    let json_path = sb.tmp_dir().join("policy.json");
    fs::write(&json_path, serde_json::to_vec_pretty(&pol).unwrap()).unwrap();
    let chk = kw(&sb, &["policy", "check", &json_path.display().to_string()]);
    assert_eq!(
        chk.status.code(),
        Some(0),
        "policy check on a JSON file: {}",
        String::from_utf8_lossy(&chk.stderr)
    );
    // The same policy with goodkey1 locked, written as JSON over the TOML path: applied as
    // a one-key change (the daemon detects the form by content).
    write_atomic(&path, &serde_json::to_string(&pol).unwrap());
    wait_for("the lock from the JSON file", 5, || {
        (status(&sb)["locked_keys"] == 2).then_some(())
    });
    assert_eq!(status(&sb)["revision"].as_u64(), Some(rev + 1));
    assert!(status(&sb)["policy_error"].is_null());

    client.kill().ok();
}

#[test]
fn kill9_keeps_enforcing_and_restart_takes_over() {
    let (sb, _srv, path) = setup("e2ekill");
    let v4b: IpAddr = sb.add_client_v4().unwrap().into();
    let v6b: IpAddr = sb.add_client_v6().unwrap().into();
    let (v4, v6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let x = "X-MBX-APIKEY";
    let cases: Vec<Case> = vec![
        (
            "goodkey1 from primary v4".into(),
            v4,
            Some((x, GOOD)),
            Got::Pass,
        ),
        (
            "goodkey1 from primary v6".into(),
            v6,
            Some((x, GOOD)),
            Got::Pass,
        ),
        (
            "goodkey1 from second v4".into(),
            v4b,
            Some((x, GOOD)),
            Got::Blocked,
        ),
        (
            "goodkey1 from second v6".into(),
            v6b,
            Some((x, GOOD)),
            Got::Blocked,
        ),
        (
            "lockkey1 from primary v4".into(),
            v4,
            Some((x, LOCKED)),
            Got::Blocked,
        ),
        (
            "unknown key from primary v6".into(),
            v6,
            Some((x, UNKNOWN)),
            Got::Blocked,
        ),
        ("no key from second v4".into(), v4b, None, Got::Pass),
    ];

    let mut d1 = start(&sb, Some(&path), 1);
    wait_enforcing(&mut d1);
    check_cases(&sb, &cases);

    // Background traffic through the kill and the restart: an allowed loop and a blocked loop.
    let stop = AtomicBool::new(false);
    let wrong = Mutex::new(Vec::<String>::new());
    let counts = Mutex::new((0u32, 0u32));
    thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                if probe(&sb, Some(v4), Some(GOOD), PROBE_SECS) != Got::Pass {
                    wrong
                        .lock()
                        .unwrap()
                        .push(format!("allowed request failed at {:.3}", now_unix_f64()));
                }
                counts.lock().unwrap().0 += 1;
                thread::sleep(Duration::from_millis(50));
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                if probe(&sb, Some(v4b), Some(GOOD), "1") != Got::Blocked {
                    wrong
                        .lock()
                        .unwrap()
                        .push(format!("blocked request passed at {:.3}", now_unix_f64()));
                }
                counts.lock().unwrap().1 += 1;
            }
        });

        thread::sleep(Duration::from_millis(500));
        let stats_before = stats(&sb);
        d1.kill9();
        assert!(sb.xdp_attached().unwrap(), "XDP went away with the daemon");
        thread::sleep(Duration::from_millis(500));

        // The daemon is down: the same verdicts, and the operator verbs still work.
        check_cases(&sb, &cases);
        assert!(
            sb.xdp_attached().unwrap(),
            "XDP went away after the daemon died"
        );
        let st = status(&sb);
        assert_eq!(st["daemon"]["running"], false, "{st}");
        assert_eq!(st["mode"], "enforce", "{st}");
        assert_eq!(st["interfaces"][0]["name"], sb.edge_if(), "{st}");
        let s = stats(&sb);
        assert!(
            reason_packets(&s, "pass_allowed") > reason_packets(&stats_before, "pass_allowed"),
            "no new pass_allowed counted with the daemon down: before {stats_before}, after {s}"
        );
        assert!(
            reason_packets(&s, "drop_not_allowed")
                > reason_packets(&stats_before, "drop_not_allowed"),
            "{s}"
        );

        // Restart over the same pins and state: it takes over.
        let mut d2 = start(&sb, Some(&path), 2);
        wait_enforcing(&mut d2);
        thread::sleep(Duration::from_millis(1000));
        d2.assert_running();
        check_cases(&sb, &cases);
        let st = status(&sb);
        assert_eq!(st["daemon"]["running"], true, "{st}");
        assert_eq!(st["daemon"]["pid"], d2.pid(), "{st}");
        assert_eq!(st["keys"], 2, "{st}");
        assert_eq!(st["locked_keys"], 1, "{st}");
        assert!(sb.xdp_attached().unwrap());
        // Counters survive the restart (the maps are the pinned ones).
        let s2 = stats(&sb);
        assert!(
            reason_packets(&s2, "pass_allowed") >= reason_packets(&s, "pass_allowed"),
            "counters went backwards over the restart: {s} then {s2}"
        );
        // Still one program attached (no second link stacked on the veth).
        let links = fs::read_dir(sb.pin_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
            .count();
        assert_eq!(links, 1, "pinned links after the takeover");
        d2.assert_running();

        stop.store(true, Ordering::SeqCst);
        drop(d2);
    });
    let wrong = wrong.into_inner().unwrap();
    let (allowed_n, blocked_n) = counts.into_inner().unwrap();
    assert!(
        allowed_n > 5 && blocked_n > 2,
        "background loops barely ran: {allowed_n} / {blocked_n}"
    );
    assert!(
        wrong.is_empty(),
        "wrong verdicts during kill/restart: {wrong:?}"
    );
}

#[test]
fn detach_removes_filter() {
    let (sb, _srv, path) = setup("e2edet");
    let v4b: IpAddr = sb.add_client_v4().unwrap().into();
    let mut d = start(&sb, Some(&path), 1);
    wait_enforcing(&mut d);
    assert_eq!(probe(&sb, Some(v4b), Some(GOOD), PROBE_SECS), Got::Blocked);
    assert_eq!(probe(&sb, None, Some(LOCKED), PROBE_SECS), Got::Blocked);

    let pin = sb.pin_dir().display().to_string();
    let out = kw(&sb, &["detach", "--all", "--pin-dir", &pin]);
    assert!(
        out.status.success(),
        "keywall detach --all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(sb.edge_if()),
        "detach did not name the interface: {said}"
    );

    assert!(
        !sb.xdp_attached().unwrap(),
        "XDP still attached after detach --all"
    );
    assert!(
        !sb.pin_dir().exists(),
        "pins left behind after detach --all"
    );
    assert_eq!(probe(&sb, Some(v4b), Some(GOOD), PROBE_SECS), Got::Pass);
    assert_eq!(probe(&sb, None, Some(LOCKED), PROBE_SECS), Got::Pass);
    assert_eq!(probe(&sb, None, Some(UNKNOWN), PROBE_SECS), Got::Pass);
    assert_eq!(probe(&sb, None, Some(GOOD), PROBE_SECS), Got::Pass);

    // Once the daemon is stopped, nothing comes back.
    drop(d);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !sb.xdp_attached().unwrap(),
        "XDP came back after the daemon stopped"
    );
    assert_eq!(probe(&sb, Some(v4b), Some(GOOD), PROBE_SECS), Got::Pass);
}

#[test]
fn restart_without_pins_restores_the_applied_policy() {
    let (sb, _srv, path) = setup("e2erst");
    let v4b: IpAddr = sb.add_client_v4().unwrap().into();
    let mut d = start(&sb, Some(&path), 1);
    wait_enforcing(&mut d);
    drop(d);
    // A reboot: the pins (maps, program, link) are gone, the state dir stays.
    let pin = sb.pin_dir().display().to_string();
    let out = kw(&sb, &["detach", "--all", "--pin-dir", &pin]);
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!sb.xdp_attached().unwrap(), "still attached after detach");
    assert_eq!(probe(&sb, Some(v4b), Some(GOOD), PROBE_SECS), Got::Pass);
    // No --policy: the daemon restores the last applied policy before it attaches.
    let mut d = start(&sb, None, 2);
    wait_enforcing(&mut d);
    assert!(
        d.log_text().contains("restored revision"),
        "no restore in the log:\n{}",
        d.log_text()
    );
    let st = status(&sb);
    assert_eq!(st["keys"], 2, "restored key count: {st}");
    assert_eq!(st["locked_keys"], 1, "restored lock count: {st}");
    assert_eq!(probe(&sb, Some(v4b), Some(GOOD), PROBE_SECS), Got::Blocked);
    assert_eq!(probe(&sb, None, Some(LOCKED), PROBE_SECS), Got::Blocked);
    assert_eq!(probe(&sb, None, Some(UNKNOWN), PROBE_SECS), Got::Blocked);
    assert_eq!(probe(&sb, None, Some(GOOD), PROBE_SECS), Got::Pass);
}
