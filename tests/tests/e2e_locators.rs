//! End to end for the issue-3 locators and actions: the real `keywall run` daemon on the edge
//! veth of a namespace sandbox, real clients in the client namespace. Needs root.
//!
//! - TLS-SNI: curl (and Python's ssl, which keeps the SNI's case) against a TLS server holding
//!   a `*.api.test` certificate; a ClientHello split over two segments with its SNI in the
//!   second.
//! - FIX: a simplefix client's Logon (tag 553, and tag 49 on a FIX.4.4 session) to a FIX
//!   acceptor.
//! - PROXY v2: Debian's haproxy ends TLS and forwards to the edge, where a second haproxy
//!   (`accept-proxy`) answers with the client address it was told; with the prefilter on, only
//!   the trusted proxy can connect; curl `--haproxy-protocol` from an untrusted source.
//! - `action = "reset"`: the client sees ECONNRESET within 100 ms.
//! - The SYN prefilter under a SYN flood from a source no key allows.
//!
//! Every test has its own sandbox (namespaces, pin dir, state dir), so they run in parallel.
//! The `keywall` binary must be built first (`cargo build -p filter-user`); simplefix must be
//! installed (`cargo xtask setup`).

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    api_bench::{kw, reason_packets},
    daemon::Daemon,
    netns::{Proc, Sandbox, ServerKind},
};

/// Seconds a client waits for an answer: a drop looks like silence until then.
const PROBE_SECS: &str = "2";
const GOOD: &str = "goodkey1";
const LOCKED: &str = "lockkey1";
const UNKNOWN: &str = "nosuchk1";

// ---------------------------------------------------------------------------------------------
// the daemon and its counters

fn kw_json(sb: &Sandbox, args: &[&str]) -> Option<Value> {
    let out = kw(sb, args);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn stats(sb: &Sandbox) -> Value {
    let pin = sb.pin_dir().display().to_string();
    kw_json(sb, &["stats", "--pin-dir", &pin, "--json"]).expect("keywall stats --json")
}

fn status(sb: &Sandbox) -> Option<Value> {
    let pin = sb.pin_dir().display().to_string();
    let state = sb.state_dir().display().to_string();
    kw_json(
        sb,
        &["status", "--pin-dir", &pin, "--state-dir", &state, "--json"],
    )
}

fn key_counter(stats: &Value, prefix: &str, field: &str) -> u64 {
    stats["keys"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["prefix"] == prefix))
        .and_then(|k| k[field].as_u64())
        .unwrap_or(0)
}

/// Asserts that each reason counted at least `min` packets more in `after` than in `before`.
fn assert_counted(before: &Value, after: &Value, wanted: &[(&str, u64)]) {
    let short: Vec<String> = wanted
        .iter()
        .filter_map(|&(r, min)| {
            let d = reason_packets(after, r) - reason_packets(before, r);
            (d < min).then(|| format!("{r}: +{d}, wanted at least +{min}"))
        })
        .collect();
    assert!(
        short.is_empty(),
        "counters short:\n  {}\nstats: {after}",
        short.join("\n  ")
    );
}

fn write_policy(sb: &Sandbox, text: &str) -> PathBuf {
    let path = sb.tmp_dir().join("policy.toml");
    let tmp = path.with_extension("toml.tmp");
    let mut f = fs::File::create(&tmp).expect("create policy");
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    fs::rename(&tmp, &path).expect("rename policy into place");
    let out = kw(sb, &["policy", "check", &path.display().to_string()]);
    assert!(
        out.status.success(),
        "policy check rejects the test's policy: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `keywall run` with `policy`, not waited for.
fn start<'a>(sb: &'a Sandbox, policy: &Path) -> Daemon<'a> {
    let policy = policy.display().to_string();
    Daemon::spawn(sb, 0, &["--policy", &policy, "--poll-ms", "200"]).expect("starting keywall run")
}

/// Waits (20 s at most) until the daemon runs, enforces `keys` keys with XDP on the edge
/// veth, and `probe` (a client whose outcome shows the policy is in force) says `Ok`.
fn wait_ready(d: &mut Daemon, keys: u64, mut probe: impl FnMut() -> Result<(), String>) {
    let sb = d.sb;
    let r = d.wait_for(Duration::from_secs(20), "keywall to enforce", || {
        let st = status(sb);
        let up = st.as_ref().is_some_and(|v| {
            v["daemon"]["running"] == true && v["mode"] == "enforce" && v["keys"] == keys
        }) && sb.xdp_attached().unwrap_or(false);
        if !up {
            return Err(format!("not attached yet; status: {st:?}"));
        }
        probe()
    });
    if let Err(e) = r {
        panic!("{e:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// outcomes

#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    /// The server answered (HTTP 200, a ServerHello, a FIX Logon).
    Pass,
    /// No answer within the time limit: what an XDP drop looks like.
    Blocked,
    /// Anything else, with what the client said.
    Odd(String),
}

/// A named client run with its expected outcome; the closure runs the client.
type Case<'a> = (String, Got, Box<dyn Fn() -> Got + Send + Sync + 'a>);

/// For [`wait_ready`]: `Ok` when a probe got what a policy in force gives.
fn expect<T: PartialEq + std::fmt::Debug>(got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("got {got:?}, wanted {want:?}"))
    }
}

fn case<'a>(name: String, want: Got, run: impl Fn() -> Got + Send + Sync + 'a) -> Case<'a> {
    (name, want, Box::new(run))
}

/// Runs all cases concurrently (blocked ones each take the full timeout) and asserts them.
fn check_cases(cases: &[Case<'_>]) {
    let results: Vec<(String, Got, Got)> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(name, want, run)| s.spawn(move || (name.clone(), want.clone(), run())))
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

/// curl's exit and `-w` output as an outcome: 0 with HTTP 200 passes, 28 (timeout) is blocked.
fn curl_outcome(out: &Output) -> Got {
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let http = text.lines().last().unwrap_or("").trim();
    match (code, http) {
        (0, "200") => Got::Pass,
        (28, _) => Got::Blocked,
        _ => Got::Odd(format!(
            "curl exit {code}, output {text:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A `clients.py` answer as an outcome: `pass_word` passes, `TIMEOUT` is blocked.
fn tool_outcome(line: &str, pass_word: &str) -> Got {
    match line.split_whitespace().next() {
        Some(w) if w == pass_word => Got::Pass,
        Some("TIMEOUT") => Got::Blocked,
        _ => Got::Odd(line.to_owned()),
    }
}

/// The edge address of `src`'s family.
fn edge_for(sb: &Sandbox, src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => sb.edge_v4().into(),
        IpAddr::V6(_) => sb.edge_v6().into(),
    }
}

fn bracket(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS-SNI

const TLS_PORT: u16 = 8443;

fn tls_policy(sb: &Sandbox) -> String {
    format!(
        r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "drop"
unbound_keys = "drop"
prefilter = false

[[listener]]
port = {TLS_PORT}
locator = "tls-sni"
sni_suffix = ".api.test"
label_prefix = "k-"

[[key]]
prefix = "{GOOD}"
allow = ["{v4}/32", "{v6}/128"]

[[key]]
prefix = "{LOCKED}"
allow = ["{v4}/32", "{v6}/128"]
locked = true
"#,
        v4 = sb.client_v4(),
        v6 = sb.client_v6(),
    )
}

/// curl over TLS to `https://HOST:8443/` resolved to the edge, from `src`, verifying the
/// server's `*.api.test` certificate (curl sends the SNI lowercased).
fn curl_sni(sb: &Sandbox, src: IpAddr, host: &str) -> Got {
    let (cert, _) = sb.tls_cert().unwrap();
    let edge = edge_for(sb, src);
    let out = sb
        .client_cmd("curl")
        .args(["-sS", "--max-time", PROBE_SECS, "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--interface", &src.to_string()])
        .arg("--cacert")
        .arg(&cert)
        .args(["--resolve", &format!("{host}:{TLS_PORT}:{}", bracket(edge))])
        .arg(format!("https://{host}:{TLS_PORT}/"))
        .stdin(Stdio::null())
        .output()
        .expect("running curl");
    curl_outcome(&out)
}

/// Python's ssl (the machine's OpenSSL) with the SNI exactly as given, case included.
fn py_sni(sb: &Sandbox, src: IpAddr, sni: &str) -> Got {
    let (cert, _) = sb.tls_cert().unwrap();
    let line = sb
        .client_tool([
            "tls",
            &src.to_string(),
            &edge_for(sb, src).to_string(),
            &TLS_PORT.to_string(),
            sni,
            PROBE_SECS,
            &cert.display().to_string(),
        ])
        .expect("clients.py tls");
    match line.as_str() {
        "HTTP 200" => Got::Pass,
        "TIMEOUT" => Got::Blocked,
        _ => Got::Odd(line),
    }
}

/// The hand-built post-quantum-sized ClientHello, split at `split_at` (0: one write).
fn split_hello(sb: &Sandbox, src: IpAddr, sni: &str, split_at: u32) -> Got {
    let line = sb
        .client_tool([
            "split-hello",
            &src.to_string(),
            &edge_for(sb, src).to_string(),
            &TLS_PORT.to_string(),
            sni,
            &split_at.to_string(),
            "50",
            PROBE_SECS,
        ])
        .expect("clients.py split-hello");
    tool_outcome(&line, "SERVERHELLO")
}

fn tls_setup(tag: &str) -> (Sandbox, Proc, IpAddr, IpAddr) {
    let sb = Sandbox::new(tag).expect("sandbox");
    let srv = sb
        .spawn_server_edge(TLS_PORT, ServerKind::Https)
        .expect("TLS server");
    let b4: IpAddr = sb.add_client_v4().unwrap().into();
    let b6: IpAddr = sb.add_client_v6().unwrap().into();
    // Without the filter, every client gets through.
    assert_eq!(
        curl_sni(&sb, b4, "k-goodkey1-x.api.test"),
        Got::Pass,
        "unfiltered"
    );
    assert_eq!(
        split_hello(&sb, b6, "k-goodkey1.api.test", 300),
        Got::Pass,
        "unfiltered split hello"
    );
    (sb, srv, b4, b6)
}

#[test]
fn tls_sni_allowed_blocked_locked_and_case() {
    let (sb, _srv, b4, b6) = tls_setup("sni");
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let policy = write_policy(&sb, &tls_policy(&sb));
    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 2, || {
        expect(curl_sni(&sb, a4, "k-goodkey1.api.test"), Got::Pass)
    });
    let before = stats(&sb);

    let sb = &sb;
    let curl = |name: &str, src: IpAddr, host: &'static str, want: Got| {
        case(format!("curl {host} from {name} {src}"), want, move || {
            curl_sni(sb, src, host)
        })
    };
    let py = |name: &str, src: IpAddr, sni: &'static str, want: Got| {
        case(
            format!("python ssl SNI {sni} from {name} {src}"),
            want,
            move || py_sni(sb, src, sni),
        )
    };
    use Got::*;
    let cases = vec![
        curl("allowed", a4, "k-goodkey1-7f3a.api.test", Pass),
        curl("allowed", a6, "k-goodkey1.api.test", Pass),
        curl("other", b4, "k-goodkey1-7f3a.api.test", Blocked),
        curl("other", b6, "k-goodkey1.api.test", Blocked),
        curl("allowed", a4, "k-lockkey1.api.test", Blocked),
        curl("allowed", a6, "k-nosuchk1.api.test", Blocked),
        // ASCII case-insensitive, in the label prefix, the key and the suffix.
        py("allowed", a4, "K-GOODKEY1-7F3A.API.TEST", Pass),
        py("allowed", a6, "k-GoodKey1.Api.Test", Pass),
        py("other", b4, "K-GOODKEY1.API.TEST", Blocked),
        py("allowed", a4, "K-LOCKKEY1.API.TEST", Blocked),
        // No SNI at all (curl sends none to an address): the no_key rule, which drops here.
        case(
            format!("curl -k https://edge:{TLS_PORT}/ (no SNI) from allowed {a4}"),
            Blocked,
            move || {
                let out = sb
                    .client_cmd("curl")
                    .args(["-sSk", "--max-time", PROBE_SECS, "-o", "/dev/null"])
                    .args(["-w", "%{http_code}", "--interface", &a4.to_string()])
                    .arg(format!("https://{}:{TLS_PORT}/", sb.edge_v4()))
                    .stdin(Stdio::null())
                    .output()
                    .expect("curl");
                curl_outcome(&out)
            },
        ),
    ];
    check_cases(&cases);
    d.assert_running();

    let after = stats(sb);
    assert_counted(
        &before,
        &after,
        &[
            ("pass_allowed", 4),
            ("drop_not_allowed", 3),
            ("drop_locked", 2),
            ("drop_unknown_key", 1),
            ("drop_no_key", 1),
        ],
    );
    assert!(key_counter(&after, GOOD, "passed") > 0, "{after}");
    assert!(key_counter(&after, GOOD, "dropped") > 0, "{after}");
    assert!(key_counter(&after, LOCKED, "dropped") > 0, "{after}");
}

#[test]
fn tls_sni_in_the_second_segment() {
    let (sb, _srv, b4, b6) = tls_setup("snisplit");
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let policy = write_policy(&sb, &tls_policy(&sb));
    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 2, || {
        expect(curl_sni(&sb, a4, "k-goodkey1.api.test"), Got::Pass)
    });
    let before = stats(&sb);

    let sb = &sb;
    let split = |name: &str, src: IpAddr, sni: &'static str, at: u32, want: Got| {
        let how = if at == 0 {
            "one write, cut by TCP at the MSS".to_owned()
        } else {
            format!("first {at} bytes, 50 ms, the rest")
        };
        case(format!("{sni} from {name} {src}: {how}"), want, move || {
            split_hello(sb, src, sni, at)
        })
    };
    use Got::*;
    let cases = vec![
        // 100 bytes: the record and handshake headers and part of the hello; 900: inside the
        // key share; 1,300: past it, before padding and server_name.
        split("allowed", a4, "k-goodkey1.api.test", 100, Pass),
        split("allowed", a4, "k-goodkey1.api.test", 900, Pass),
        split("allowed", a6, "K-GOODKEY1.API.TEST", 1300, Pass),
        split("allowed", a4, "k-goodkey1.api.test", 0, Pass),
        split("other", b4, "k-goodkey1.api.test", 900, Blocked),
        split("other", b6, "k-goodkey1.api.test", 1300, Blocked),
        split("other", b4, "k-goodkey1.api.test", 0, Blocked),
        split("allowed", a6, "k-lockkey1.api.test", 900, Blocked),
    ];
    check_cases(&cases);
    d.assert_running();

    let after = stats(sb);
    assert_counted(
        &before,
        &after,
        &[
            ("pass_allowed", 4),
            ("drop_not_allowed", 3),
            ("drop_locked", 1),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// FIX

const FIX_553_PORT: u16 = 9878;
const FIX_49_PORT: u16 = 9879;

fn fix_logon(sb: &Sandbox, src: IpAddr, port: u16, begin: &str, tag: u32, key: &str) -> Got {
    let line = sb
        .client_tool([
            "fix",
            &src.to_string(),
            &edge_for(sb, src).to_string(),
            &port.to_string(),
            begin,
            &tag.to_string(),
            key,
            PROBE_SECS,
        ])
        .expect("clients.py fix");
    tool_outcome(&line, "LOGON")
}

#[test]
fn fix_logon_allowed_and_refused() {
    let sb = Sandbox::new("fix").expect("sandbox");
    let _a553 = sb.spawn_fix_acceptor_edge(FIX_553_PORT).unwrap();
    let _a49 = sb.spawn_fix_acceptor_edge(FIX_49_PORT).unwrap();
    let b4: IpAddr = sb.add_client_v4().unwrap().into();
    let b6: IpAddr = sb.add_client_v6().unwrap().into();
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let user = "goodkey1-Zq81xT"; // 553 Username: the full API key; its first 8 bytes identify it
    let comp = "goodkey1DESK"; // 49 SenderCompID
    assert_eq!(
        fix_logon(&sb, b4, FIX_553_PORT, "FIX.4.4", 553, user),
        Got::Pass,
        "unfiltered"
    );
    assert_eq!(
        fix_logon(&sb, b6, FIX_49_PORT, "FIX.4.4", 49, comp),
        Got::Pass,
        "unfiltered"
    );

    let policy = write_policy(
        &sb,
        &format!(
            r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "drop"
prefilter = false

[[listener]]
port = {FIX_553_PORT}
locator = "fix"
fix_tag = 553

[[listener]]
port = {FIX_49_PORT}
locator = "fix"
fix_tag = 49

[[key]]
prefix = "{GOOD}"
allow = ["{a4}/32", "{a6}/128"]

[[key]]
prefix = "{LOCKED}"
allow = ["{a4}/32", "{a6}/128"]
locked = true
"#
        ),
    );
    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 2, || {
        expect(
            fix_logon(&sb, a4, FIX_553_PORT, "FIX.4.4", 553, user),
            Got::Pass,
        )
    });
    let before = stats(&sb);

    let sb = &sb;
    let logon = |name: &str,
                 src: IpAddr,
                 port: u16,
                 begin: &'static str,
                 tag: u32,
                 key: &'static str,
                 want: Got| {
        case(
            format!("{begin} Logon {tag}={key} to {port} from {name} {src}"),
            want,
            move || fix_logon(sb, src, port, begin, tag, key),
        )
    };
    use Got::*;
    let cases = vec![
        logon("allowed", a4, FIX_553_PORT, "FIX.4.4", 553, user, Pass),
        logon("allowed", a6, FIX_553_PORT, "FIXT.1.1", 553, user, Pass),
        logon("other", b4, FIX_553_PORT, "FIX.4.4", 553, user, Blocked),
        logon("other", b6, FIX_553_PORT, "FIXT.1.1", 553, user, Blocked),
        logon(
            "allowed",
            a4,
            FIX_553_PORT,
            "FIX.4.2",
            553,
            "lockkey1-x",
            Blocked,
        ),
        logon(
            "allowed",
            a6,
            FIX_553_PORT,
            "FIX.4.4",
            553,
            "nosuchk1-x",
            Blocked,
        ),
        logon("allowed", a4, FIX_49_PORT, "FIX.4.4", 49, comp, Pass),
        logon("allowed", a6, FIX_49_PORT, "FIX.4.4", 49, comp, Pass),
        logon("other", b4, FIX_49_PORT, "FIX.4.4", 49, comp, Blocked),
        logon(
            "allowed",
            a4,
            FIX_49_PORT,
            "FIX.4.4",
            49,
            "lockkey1",
            Blocked,
        ),
    ];
    check_cases(&cases);
    d.assert_running();

    let after = stats(sb);
    assert_counted(
        &before,
        &after,
        &[
            ("pass_allowed", 4),
            ("drop_not_allowed", 3),
            ("drop_locked", 2),
            ("drop_unknown_key", 1),
        ],
    );
    assert!(key_counter(&after, GOOD, "passed") >= 4, "{after}");
    assert!(key_counter(&after, GOOD, "dropped") >= 3, "{after}");
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

const PROXIED_PORT: u16 = 8080;
const HAPROXY_TLS_PORT: u16 = 8443;

/// The backend on the edge: haproxy taking PROXY v1/v2 (`accept-proxy`) and answering every
/// request with the client address the header gave it.
fn spawn_edge_backend(sb: &Sandbox) -> Proc {
    let cfg = format!(
        r#"global
    maxconn 200
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend api
    bind :::{PROXIED_PORT} v4v6 accept-proxy
    http-request return status 200 content-type text/plain lf-string "client=%[src]"
"#
    );
    sb.spawn_haproxy(sb.edge_ns(), "haproxy-edge", &cfg, &[PROXIED_PORT])
        .expect("haproxy backend in the edge namespace")
}

/// `prefilter`: whether the SYN prefilter is on (then only trusted proxies may connect).
fn proxy_policy(sb: &Sandbox, trusted: IpAddr, allowed: IpAddr, prefilter: bool) -> String {
    format!(
        r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "drop"
prefilter = {prefilter}

[[listener]]
port = {PROXIED_PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["{trusted}/32"]

[[key]]
prefix = "{GOOD}"
allow = ["{allowed}/32", "{v6}/128"]

[[key]]
prefix = "{LOCKED}"
allow = ["{allowed}/32"]
locked = true
"#,
        v6 = sb.client_v6(),
    )
}

/// A proxied request's outcome: passed with the client address the backend saw, or not.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Proxied {
    Ok(String),
    Refused(String),
}

/// curl from `src` over TLS to haproxy (`https://api.test:8443`, resolved to `haproxy`),
/// with `key` in X-MBX-APIKEY.
fn via_haproxy(sb: &Sandbox, src: IpAddr, haproxy: IpAddr, key: &str) -> Proxied {
    let (cert, _) = sb.tls_cert().unwrap();
    let out = sb
        .client_cmd("curl")
        .args(["-sS", "--max-time", PROBE_SECS, "-w", "\n%{http_code}"])
        .args(["--interface", &src.to_string(), "--cacert"])
        .arg(&cert)
        .args([
            "--resolve",
            &format!("api.test:{HAPROXY_TLS_PORT}:{haproxy}"),
        ])
        .args(["-H", &format!("X-MBX-APIKEY: {key}-rest-of-the-key")])
        .arg(format!(
            "https://api.test:{HAPROXY_TLS_PORT}/api/v3/account"
        ))
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    if out.status.success() && code == "200" {
        Proxied::Ok(body.trim().to_owned())
    } else {
        Proxied::Refused(format!(
            "curl exit {:?}, HTTP {code}, {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[test]
fn proxy_v2_from_haproxy_judges_the_real_client() {
    let sb = Sandbox::new("proxy").expect("sandbox");
    let haproxy: IpAddr = sb.add_client_v4().unwrap().into();
    let other: IpAddr = sb.add_client_v4().unwrap().into();
    let allowed: IpAddr = sb.client_v4().into();
    let _backend = spawn_edge_backend(&sb);
    // haproxy in the client namespace, on its own address: ends TLS, and connects to the edge
    // from that address with a PROXY v2 header naming the real client.
    let bundle = sb.tls_pem_bundle().unwrap();
    let cfg = format!(
        r#"global
    maxconn 200
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend tls_in
    bind {haproxy}:{HAPROXY_TLS_PORT} ssl crt {bundle}
    default_backend edge
backend edge
    http-reuse never
    server edge {edge}:{PROXIED_PORT} send-proxy-v2 source {haproxy}
"#,
        bundle = bundle.display(),
        edge = sb.edge_v4(),
    );
    let _front = sb
        .spawn_haproxy(sb.client_ns(), "haproxy-front", &cfg, &[HAPROXY_TLS_PORT])
        .expect("haproxy in the client namespace");
    // Unfiltered, the backend sees each real client, not haproxy.
    assert_eq!(
        via_haproxy(&sb, allowed, haproxy, GOOD),
        Proxied::Ok(format!("client={allowed}"))
    );
    assert_eq!(
        via_haproxy(&sb, other, haproxy, GOOD),
        Proxied::Ok(format!("client={other}"))
    );

    let policy = write_policy(&sb, &proxy_policy(&sb, haproxy, allowed, true));
    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 2, || {
        expect(
            via_haproxy(&sb, allowed, haproxy, GOOD),
            Proxied::Ok(format!("client={allowed}")),
        )
    });
    let before = stats(&sb);

    let (ok, refused, locked, unknown) = thread::scope(|s| {
        let ok = s.spawn(|| via_haproxy(&sb, allowed, haproxy, GOOD));
        let refused = s.spawn(|| via_haproxy(&sb, other, haproxy, GOOD));
        let locked = s.spawn(|| via_haproxy(&sb, allowed, haproxy, LOCKED));
        let unknown = s.spawn(|| via_haproxy(&sb, allowed, haproxy, UNKNOWN));
        (
            ok.join().unwrap(),
            refused.join().unwrap(),
            locked.join().unwrap(),
            unknown.join().unwrap(),
        )
    });
    assert_eq!(ok, Proxied::Ok(format!("client={allowed}")));
    assert!(
        matches!(refused, Proxied::Refused(_)),
        "a client the key does not allow got through haproxy: {refused:?}"
    );
    assert!(
        matches!(locked, Proxied::Refused(_)),
        "a locked key got through: {locked:?}"
    );
    assert!(
        matches!(unknown, Proxied::Refused(_)),
        "an unknown key got through: {unknown:?}"
    );
    // With the prefilter on, a PROXY listener takes handshakes from trusted proxies alone:
    // even the allowed client cannot connect around haproxy.
    let around = sb
        .client_cmd("curl")
        .args(["-sS", "--max-time", PROBE_SECS, "--haproxy-protocol"])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--interface", &allowed.to_string()])
        .args(["-H", &format!("X-MBX-APIKEY: {GOOD}-rest-of-the-key")])
        .arg(format!("http://{}:{PROXIED_PORT}/", sb.edge_v4()))
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    assert_eq!(
        curl_outcome(&around),
        Got::Blocked,
        "the allowed client connected to the PROXY listener around haproxy"
    );
    d.assert_running();

    let after = stats(&sb);
    assert_counted(
        &before,
        &after,
        &[
            ("pass_allowed", 1),
            ("drop_not_allowed", 1),
            ("drop_locked", 1),
            ("drop_unknown_key", 1),
            ("drop_prefilter", 1),
        ],
    );
    assert_eq!(
        reason_packets(&after, "drop_malformed"),
        reason_packets(&before, "drop_malformed"),
        "haproxy's trusted PROXY headers were counted as malformed: {after}"
    );
}

#[test]
fn proxy_header_from_untrusted_source_is_refused() {
    let sb = Sandbox::new("proxyun").expect("sandbox");
    let haproxy: IpAddr = sb.add_client_v4().unwrap().into();
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let _backend = spawn_edge_backend(&sb);

    // curl --haproxy-protocol: a PROXY v1 header naming curl's own address, then the request.
    let direct = |src: IpAddr, key: Option<&str>| -> (Got, String) {
        let mut cmd = sb.client_cmd("curl");
        cmd.args(["-sS", "--max-time", PROBE_SECS, "--haproxy-protocol"])
            .args(["-w", "\n%{http_code}", "--interface", &src.to_string()]);
        if let Some(k) = key {
            cmd.args(["-H", &format!("X-MBX-APIKEY: {k}-rest-of-the-key")]);
        }
        let out = cmd
            .arg(format!(
                "http://{}:{PROXIED_PORT}/api/v3/account",
                bracket(edge_for(&sb, src))
            ))
            .stdin(Stdio::null())
            .output()
            .expect("curl");
        (
            curl_outcome(&out),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (got, body) = direct(a4, Some(GOOD));
    assert_eq!(got, Got::Pass, "unfiltered: {body}");
    assert!(body.contains(&format!("client={a4}")), "{body}");

    let policy = write_policy(&sb, &proxy_policy(&sb, haproxy, a4, false));
    let mut d = start(&sb, &policy);
    // Ready once curl's own PROXY header is refused (before the policy it passes).
    wait_ready(&mut d, 2, || expect(direct(a4, None).0, Got::Blocked));
    let before = stats(&sb);

    // The key is allowed from a4 and a6, yet their headers come from untrusted senders.
    let results = thread::scope(|s| {
        let h: Vec<_> = [(a4, Some(GOOD)), (a6, Some(GOOD)), (a4, None), (a6, None)]
            .into_iter()
            .map(|(src, key)| s.spawn(move || (src, key, direct(src, key).0)))
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    for (src, key, got) in &results {
        assert_eq!(
            *got,
            Got::Blocked,
            "curl --haproxy-protocol from untrusted {src} with key {key:?}"
        );
    }
    d.assert_running();
    let after = stats(&sb);
    assert_counted(&before, &after, &[("drop_malformed", 4)]);
    assert_eq!(
        reason_packets(&after, "pass_allowed"),
        reason_packets(&before, "pass_allowed"),
        "{after}"
    );
}

// ---------------------------------------------------------------------------------------------
// action = "reset"

#[test]
fn reset_action_answers_within_100ms() {
    const PORT: u16 = 8080;
    let sb = Sandbox::new("reset").expect("sandbox");
    let _srv = sb.spawn_http_server_edge(PORT).unwrap();
    let b4: IpAddr = sb.add_client_v4().unwrap().into();
    let b6: IpAddr = sb.add_client_v6().unwrap().into();
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let policy = write_policy(
        &sb,
        &format!(
            r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "drop"
prefilter = false
action = "reset"

[[listener]]
port = {PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[key]]
prefix = "{GOOD}"
allow = ["{a4}/32", "{a6}/128"]

[[key]]
prefix = "{LOCKED}"
allow = ["{a4}/32", "{a6}/128"]
locked = true
"#
        ),
    );
    let python = |src: IpAddr, key: &str| -> String {
        sb.client_tool([
            "reset",
            &src.to_string(),
            &edge_for(&sb, src).to_string(),
            &PORT.to_string(),
            "X-MBX-APIKEY",
            &format!("{key}-rest-of-the-key"),
            PROBE_SECS,
        ])
        .expect("clients.py reset")
    };
    assert!(
        python(b4, GOOD).starts_with("HTTP 200"),
        "unfiltered request failed"
    );

    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 2, || {
        let line = python(b4, GOOD);
        expect(line.split(' ').next(), Some("RESET")).map_err(|e| format!("{e}: {line}"))
    });
    let before = stats(&sb);

    let cases = [
        (b4, GOOD, "drop_not_allowed"),
        (b6, GOOD, "drop_not_allowed"),
        (a4, LOCKED, "drop_locked"),
        (a6, UNKNOWN, "drop_unknown_key"),
    ];
    for (src, key, why) in cases {
        let line = python(src, key);
        let mut w = line.split_whitespace();
        let (what, ms) = (w.next(), w.next().and_then(|m| m.parse::<f64>().ok()));
        assert_eq!(
            what,
            Some("RESET"),
            "{key} from {src} ({why}): wanted ECONNRESET, got {line:?}"
        );
        let ms = ms.unwrap_or_else(|| panic!("no time in {line:?}"));
        assert!(
            ms < 100.0,
            "{key} from {src} ({why}): reset after {ms} ms, wanted < 100 ms"
        );
    }
    assert!(python(a4, GOOD).starts_with("HTTP 200"));
    assert!(python(a6, GOOD).starts_with("HTTP 200"));

    // curl too: "Connection reset by peer" (exit 56), well inside 100 ms.
    let out = sb
        .client_cmd("curl")
        .args(["-sS", "--max-time", PROBE_SECS, "-o", "/dev/null"])
        .args(["-w", "%{time_total}", "--interface", &b4.to_string()])
        .args(["-H", &format!("X-MBX-APIKEY: {GOOD}-rest-of-the-key")])
        .arg(format!("http://{}:{PORT}/api/v3/account", sb.edge_v4()))
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(56), "curl: {stderr}");
    assert!(stderr.contains("reset"), "curl: {stderr}");
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(secs < 0.1, "curl saw the reset after {secs} s");

    d.assert_running();
    let after = stats(&sb);
    assert_counted(
        &before,
        &after,
        &[
            ("drop_not_allowed", 3),
            ("drop_locked", 1),
            ("drop_unknown_key", 1),
            ("pass_allowed", 2),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// the SYN prefilter

#[test]
fn prefilter_counts_a_syn_flood_and_allowed_clients_still_connect() {
    const PORT: u16 = 8080;
    const FLOOD_SECS: &str = "3";
    const FLOOD_RATE: &str = "4000";
    let sb = Sandbox::new("prefilter").expect("sandbox");
    let _srv = sb.spawn_http_server_edge(PORT).unwrap();
    let b4: IpAddr = sb.add_client_v4().unwrap().into();
    let b6: IpAddr = sb.add_client_v6().unwrap().into();
    let (a4, a6): (IpAddr, IpAddr) = (sb.client_v4().into(), sb.client_v6().into());
    let policy = write_policy(
        &sb,
        &format!(
            r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "drop"
prefilter = true

[[listener]]
port = {PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[key]]
prefix = "{GOOD}"
allow = ["{a4}/32", "{a6}/128"]
"#
        ),
    );
    let curl = |src: IpAddr, key: Option<&str>| -> Got {
        let mut cmd = sb.client_cmd("curl");
        cmd.args(["-sS", "--max-time", PROBE_SECS, "-o", "/dev/null"])
            .args(["-w", "%{http_code}", "--interface", &src.to_string()]);
        if let Some(k) = key {
            cmd.args(["-H", &format!("X-MBX-APIKEY: {k}-rest-of-the-key")]);
        }
        let out = cmd
            .arg(format!(
                "http://{}:{PORT}/api/v3/account",
                bracket(edge_for(&sb, src))
            ))
            .stdin(Stdio::null())
            .output()
            .expect("curl");
        curl_outcome(&out)
    };
    // Unfiltered, a keyless stranger is answered (no_key = "pass" would pass it too).
    assert_eq!(curl(b4, None), Got::Pass);

    let mut d = start(&sb, &policy);
    wait_ready(&mut d, 1, || expect(curl(b4, None), Got::Blocked));
    let before = stats(&sb);

    // The flood from b4, and allowed clients connecting all through it.
    let flooding = AtomicBool::new(true);
    let (flood, allowed) = thread::scope(|s| {
        let flood = s.spawn(|| {
            let line = sb
                .client_tool([
                    "synflood",
                    &b4.to_string(),
                    &sb.edge_v4().to_string(),
                    &PORT.to_string(),
                    FLOOD_SECS,
                    FLOOD_RATE,
                ])
                .expect("clients.py synflood");
            flooding.store(false, Ordering::SeqCst);
            line
        });
        let allowed = s.spawn(|| {
            let mut got = Vec::new();
            thread::sleep(Duration::from_millis(300));
            while flooding.load(Ordering::SeqCst) {
                let t = Instant::now();
                let src = if got.len() % 2 == 0 { a4 } else { a6 };
                got.push((src, curl(src, Some(GOOD)), t.elapsed()));
                thread::sleep(Duration::from_millis(100));
            }
            got
        });
        (flood.join().unwrap(), allowed.join().unwrap())
    });
    let sent: u64 = flood
        .strip_prefix("SENT ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("synflood said {flood:?}"));
    assert!(sent >= 3000, "the flood sent only {sent} SYNs");
    assert!(
        allowed.len() >= 5,
        "only {} allowed requests ran during the flood",
        allowed.len()
    );
    let failed: Vec<_> = allowed.iter().filter(|(_, g, _)| *g != Got::Pass).collect();
    assert!(
        failed.is_empty(),
        "allowed clients failed during the flood: {failed:?}"
    );

    // Keyless strangers are refused at the handshake; keyless allowed sources are not.
    assert_eq!(curl(b6, None), Got::Blocked, "keyless stranger over IPv6");
    assert_eq!(
        curl(a6, None),
        Got::Pass,
        "keyless allowed source over IPv6"
    );
    d.assert_running();

    let after = stats(&sb);
    let dropped =
        reason_packets(&after, "drop_prefilter") - reason_packets(&before, "drop_prefilter");
    assert!(
        dropped >= sent,
        "drop_prefilter counted {dropped} for a flood of {sent} SYNs: {after}"
    );
    assert!(
        reason_packets(&after, "pass_allowed") - reason_packets(&before, "pass_allowed")
            >= allowed.len() as u64,
        "{after}"
    );
}

// ---------------------------------------------------------------------------------------------
// the helpers' own logic

#[test]
fn client_answers_map_to_outcomes() {
    assert_eq!(tool_outcome("LOGON KEYWALL-EDGE", "LOGON"), Got::Pass);
    assert_eq!(
        tool_outcome(
            "SERVERHELLO 1699-byte hello, SNI extension at 1665",
            "SERVERHELLO"
        ),
        Got::Pass
    );
    assert_eq!(tool_outcome("TIMEOUT", "LOGON"), Got::Blocked);
    assert_eq!(
        tool_outcome("ERROR connection closed", "LOGON"),
        Got::Odd("ERROR connection closed".into())
    );
    // The pass word must be the whole first word, not a prefix of it.
    assert_eq!(
        tool_outcome("LOGONX y", "LOGON"),
        Got::Odd("LOGONX y".into())
    );
    assert!(expect(Got::Pass, Got::Pass).is_ok());
    assert!(expect(Got::Blocked, Got::Pass).is_err());
}

#[test]
fn curl_results_map_to_outcomes() {
    use std::os::unix::process::ExitStatusExt as _;
    let out = |code: i32, stdout: &str| Output {
        status: std::process::ExitStatus::from_raw(code << 8),
        stdout: stdout.as_bytes().to_vec(),
        stderr: Vec::new(),
    };
    assert_eq!(curl_outcome(&out(0, "200")), Got::Pass);
    assert_eq!(curl_outcome(&out(0, "body\n200")), Got::Pass);
    assert_eq!(curl_outcome(&out(28, "000")), Got::Blocked);
    assert!(matches!(curl_outcome(&out(0, "504")), Got::Odd(_)));
    assert!(matches!(curl_outcome(&out(56, "000")), Got::Odd(_)));
}
