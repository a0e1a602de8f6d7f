//! Issue 10, end to end: evasion attempts against the real attached program (`keywall run`
//! loading a policy file) in a namespace sandbox, with real servers that log what they read,
//! and legitimate traffic that must not be dropped. Needs root.
//!
//! The attacker is a customer: its address (the sandbox client, 10.200.S.2) is allowed for its
//! own key A (`attacka1`), so the SYN prefilter lets its handshakes through, and it holds a
//! stolen key S (`stolens1`) that the policy allows only from [`VICTIM`]. Its segments are
//! built by hand (tests/scripts/evasion_attacks.py: raw sockets, the client kernel's RSTs
//! suppressed with nftables) and sent from the client namespace. The servers in the edge
//! namespace (tests/scripts/evasion_servers.py: a lenient HTTP/1.x + h2c server, OpenSSL
//! through Python's ssl with an SNI callback, a simplefix FIX acceptor) append to a log each
//! key they actually read after the kernel reassembled the stream.
//!
//! Every attack test first runs the attack with no filter and asserts that the server reads S
//! from the attacker (so the attack is live against this server, and the test can fail), then
//! attaches keywall and asserts that (1) the server never reads S from the attacker's address
//! and (2) the counters show the drop reason docs/DATAPATH.md gives for that class.
//! `crafted_machinery_control` shows that the same machinery delivers the allowed key A through
//! the filter. The legitimate-traffic tests assert that `keywall stats` counts no drop at all.
//!
//! Every test has its own sandbox (namespaces, pin dir, ports, logs), so they run in parallel.
//! A missing tool (python3, nft, openssl, curl, simplefix) fails the test, never skips it.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    api_bench::{kw, reason_packets},
    daemon::Daemon,
    netns::{Proc, Sandbox},
};

/// The attacker's own key: allowed from the attacker's address.
const A: &str = "attacka1";
/// The stolen key: allowed only from [`VICTIM`].
const S: &str = "stolens1";
const A_VALUE: &str = "attacka1-Zq81xT";
const S_VALUE: &str = "stolens1-Zq81xT";
const A_LABEL: &str = "k-attacka1";
const S_LABEL: &str = "k-stolens1";
/// Where S is allowed from (never an address in the sandbox: it only appears in policy and in
/// PROXY headers).
const VICTIM: &str = "10.77.0.9";

const SERVERS_PY: &str = include_str!("../scripts/evasion_servers.py");
const ATTACKS_PY: &str = include_str!("../scripts/evasion_attacks.py");
const CLIENTS_PY: &str = include_str!("../scripts/evasion_clients.py");

/// First source port of the attacker's crafted connections (the nftables rule that drops the
/// client kernel's RSTs covers 20000-29999; ordinary sockets use 32768 and up).
const ATTACK_PORT_BASE: u16 = 20000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Srv {
    /// `http-header` listener, X-MBX-APIKEY.
    Http,
    /// `http-header` listener with `proxy_protocol`; the sandbox client is the trusted proxy.
    Proxy,
    /// `tls-sni` listener: `k-<key>.api.test`.
    Tls,
    /// The same on another port, the server offering P-256 alone (curl gets a
    /// HelloRetryRequest).
    TlsHrr,
    /// `fix` listener, tag 553.
    Fix,
}

impl Srv {
    fn port(self) -> u16 {
        match self {
            Srv::Http => 8080,
            Srv::Proxy => 8081,
            Srv::Tls => 8443,
            Srv::TlsHrr => 8444,
            Srv::Fix => 9878,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Srv::Http => "http",
            Srv::Proxy => "proxy",
            Srv::Tls => "tls",
            Srv::TlsHrr => "tlshrr",
            Srv::Fix => "fix",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the lab: a sandbox, logging servers, the attacker's tools, the daemon

struct Lab {
    sb: Sandbox,
    attacker: Ipv4Addr,
    next_port: AtomicU16,
    _servers: Vec<Proc>,
}

impl Lab {
    /// A sandbox with the given servers running in the edge namespace (nothing attached yet).
    fn new(tag: &str, servers: &[Srv]) -> Lab {
        let sb = Sandbox::new(tag).expect("sandbox");
        let attacker = sb.client_v4();
        for (name, text) in [
            ("evasion_servers.py", SERVERS_PY),
            ("evasion_attacks.py", ATTACKS_PY),
            ("evasion_clients.py", CLIENTS_PY),
        ] {
            fs::write(sb.tmp_dir().join(name), text).expect("writing a script");
        }
        // The client kernel knows nothing of the crafted connections: without this it would
        // answer every SYN-ACK with a RST. Marked packets are the attacker's own RSTs.
        let rules = sb.tmp_dir().join("attacker.nft");
        fs::write(
            &rules,
            format!(
                "table inet kwattacker {{\n chain out {{\n  type filter hook output priority 0;\n  \
                 tcp sport {ATTACK_PORT_BASE}-29999 tcp flags & rst == rst meta mark != 0x4b57 drop\n }}\n}}\n"
            ),
        )
        .unwrap();
        sb.run_client("nft", ["-f", rules.to_str().unwrap()])
            .expect("nft in the client namespace (is nftables installed? `cargo xtask setup`)");
        // Data on SYN reaches a server that enables TCP Fast Open without cookies.
        sb.run_edge("sysctl", ["-q", "-w", "net.ipv4.tcp_fastopen=0x203"])
            .expect("enabling TCP Fast Open in the edge namespace");
        let mut lab = Lab {
            sb,
            attacker,
            next_port: AtomicU16::new(ATTACK_PORT_BASE),
            _servers: Vec::new(),
        };
        let procs: Vec<Proc> = servers.iter().map(|&s| lab.spawn_server(s)).collect();
        lab._servers = procs;
        lab
    }

    fn script(&self, name: &str) -> PathBuf {
        self.sb.tmp_dir().join(name)
    }

    fn log_path(&self, srv: Srv) -> PathBuf {
        self.sb
            .tmp_dir()
            .join(format!("evasion-{}.log", srv.name()))
    }

    fn spawn_server(&self, srv: Srv) -> Proc {
        let ready = self
            .sb
            .tmp_dir()
            .join(format!("evasion-{}.ready", srv.name()));
        let out_path = self
            .sb
            .tmp_dir()
            .join(format!("evasion-{}.out", srv.name()));
        let out = fs::File::create(&out_path).unwrap();
        let mut cmd = self.sb.edge_cmd("python3");
        cmd.arg(self.script("evasion_servers.py"));
        let mode = match srv {
            Srv::Http | Srv::Proxy => "http",
            Srv::Tls | Srv::TlsHrr => "tls",
            Srv::Fix => "fix",
        };
        cmd.arg(mode)
            .arg(srv.port().to_string())
            .arg(&ready)
            .arg(self.log_path(srv));
        match srv {
            Srv::Proxy => {
                cmd.arg("proxy");
            }
            Srv::Tls | Srv::TlsHrr => {
                let (cert, key) = self.sb.tls_cert().expect("a certificate (openssl)");
                cmd.arg(cert).arg(key);
                if srv == Srv::TlsHrr {
                    cmd.arg("hrr");
                }
            }
            _ => {}
        }
        let mut child = Proc::new(
            cmd.stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("starting python3"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "{} server exited ({st}): {}",
                    srv.name(),
                    fs::read_to_string(&out_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} server did not listen within 10 s",
                srv.name()
            );
            thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// The server's log lines so far.
    fn lines(&self, srv: Srv) -> Vec<String> {
        fs::read_to_string(self.log_path(srv))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Values of KEY/SNI lines from `peer` after the first `since` lines.
    fn read_from(&self, srv: Srv, peer: &str, since: usize) -> Vec<String> {
        self.lines(srv)
            .into_iter()
            .skip(since)
            .filter_map(|l| {
                let mut w = l.splitn(3, ' ');
                let (kind, who, value) = (w.next()?, w.next()?, w.next().unwrap_or(""));
                (matches!(kind, "KEY" | "SNI") && who == peer).then(|| value.to_owned())
            })
            .collect()
    }

    /// Runs a crafted attack from the attacker's address on a fresh source port.
    fn attack(&self, srv: Srv, scenario: &str, args: &[&str]) -> Value {
        let sport = self.next_port.fetch_add(1, Ordering::SeqCst);
        let out = self
            .sb
            .client_cmd("python3")
            .arg(self.script("evasion_attacks.py"))
            .arg(self.attacker.to_string())
            .arg(self.sb.edge_v4().to_string())
            .arg(srv.port().to_string())
            .arg(sport.to_string())
            .arg(scenario)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running evasion_attacks.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "evasion_attacks.py {scenario} {args:?} failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("evasion_attacks.py said {stdout:?}: {e}"))
    }

    /// Runs evasion_clients.py in the client namespace; its JSON answer.
    fn client(&self, args: &[&str]) -> Value {
        let out = self
            .sb
            .client_cmd("python3")
            .arg(self.script("evasion_clients.py"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running evasion_clients.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "evasion_clients.py {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| panic!("evasion_clients.py said {stdout:?}: {e}"))
    }

    fn policy_text(&self, extra_keys: &str) -> String {
        format!(
            r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "drop"
prefilter = true

[[listener]]
port = {http}
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[listener]]
port = {proxy}
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["{attacker}/32"]

[[listener]]
port = {tls}
locator = "tls-sni"
sni_suffix = ".api.test"
label_prefix = "k-"

[[listener]]
port = {tls_hrr}
locator = "tls-sni"
sni_suffix = ".api.test"
label_prefix = "k-"

[[listener]]
port = {fix}
locator = "fix"
fix_tag = 553

[[key]]
prefix = "{A}"
allow = ["{attacker}/32", "{v6}/128"]

[[key]]
prefix = "{S}"
allow = ["{VICTIM}/32"]
{extra_keys}"#,
            http = Srv::Http.port(),
            proxy = Srv::Proxy.port(),
            tls = Srv::Tls.port(),
            tls_hrr = Srv::TlsHrr.port(),
            fix = Srv::Fix.port(),
            attacker = self.attacker,
            v6 = self.sb.client_v6(),
        )
    }

    /// Writes the policy; Err with `keywall policy check`'s complaint if it refuses it.
    fn write_policy(&self, text: &str) -> Result<PathBuf, String> {
        let path = self.sb.tmp_dir().join("policy.toml");
        fs::write(&path, text).unwrap();
        let out = kw(&self.sb, &["policy", "check", path.to_str().unwrap()]);
        if out.status.success() {
            Ok(path)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `keywall run` on the edge veth with the standard policy; returns once it enforces.
    fn start_daemon(&self, extra: &[&str]) -> Daemon<'_> {
        let policy = self
            .write_policy(&self.policy_text(""))
            .unwrap_or_else(|e| panic!("policy check refuses the test policy: {e}"));
        self.start_daemon_with(&policy, 2, extra)
    }

    fn start_daemon_with(&self, policy: &std::path::Path, keys: u64, extra: &[&str]) -> Daemon<'_> {
        let mut args = vec!["--policy", policy.to_str().unwrap()];
        args.extend_from_slice(extra);
        let d = Daemon::start(&self.sb, 0, &args).expect("keywall run");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.status();
            let up = st.as_ref().is_some_and(|v| {
                v["daemon"]["running"] == true && v["mode"] == "enforce" && v["keys"] == keys
            }) && self.sb.xdp_attached().unwrap_or(false);
            if up {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "keywall did not enforce within 20 s: {st:?}\n{}",
                d.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn status(&self) -> Option<Value> {
        let pin = self.sb.pin_dir().display().to_string();
        let state = self.sb.state_dir().display().to_string();
        let out = kw(
            &self.sb,
            &["status", "--pin-dir", &pin, "--state-dir", &state, "--json"],
        );
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn stats(&self) -> Value {
        let pin = self.sb.pin_dir().display().to_string();
        let out = kw(&self.sb, &["stats", "--pin-dir", &pin, "--json"]);
        assert!(
            out.status.success(),
            "keywall stats: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats json")
    }
}

/// Every reason whose packet count changed, as `reason +n`.
fn deltas(before: &Value, after: &Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Some(reasons) = after["reasons"].as_object() {
        for r in reasons.keys() {
            let d = reason_packets(after, r).saturating_sub(reason_packets(before, r));
            if d > 0 {
                out.push((r.clone(), d));
            }
        }
    }
    out
}

fn drops(d: &[(String, u64)]) -> u64 {
    d.iter()
        .filter(|(r, _)| r.starts_with("drop_"))
        .map(|(_, n)| n)
        .sum()
}

fn is_stolen(value: &str) -> bool {
    value.to_ascii_lowercase().contains(S)
}

// ---------------------------------------------------------------------------------------------
// one attack: live without the filter, refused with it

/// An attack test: the scenario against `srv`, unfiltered (the server must read S from the
/// attacker), then through keywall (the server must not, and one of `reasons` must count).
fn attack_test(tag: &str, srv: Srv, scenario: &str, args: &[&str], reasons: &[&str]) {
    let lab = Lab::new(tag, &[srv]);
    attack_unfiltered(&lab, srv, scenario, args);
    let _d = lab.start_daemon(&[]);
    attack_refused(&lab, srv, scenario, args, reasons, true);
}

/// Without keywall: the attack makes the server read the stolen key from the attacker.
fn attack_unfiltered(lab: &Lab, srv: Srv, scenario: &str, args: &[&str]) -> Value {
    let since = lab.lines(srv).len();
    let res = lab.attack(srv, scenario, args);
    assert_eq!(
        res["synack"], true,
        "no handshake without the filter: {res}"
    );
    let read = lab.read_from(srv, &lab.attacker.to_string(), since);
    assert!(
        read.iter().any(|v| is_stolen(v)),
        "without keywall the {scenario} attack should deliver {S} to the server (a dead attack \
         proves nothing); the server read {read:?}; attack: {res}; log: {:#?}",
        &lab.lines(srv)[since..]
    );
    res
}

/// Through keywall: the server never reads S from the attacker, and a reason in `reasons`
/// counted the refusal. `handshake`: the attack's handshake must complete (every attack but
/// data on the SYN itself, which is refused with its SYN).
fn attack_refused(
    lab: &Lab,
    srv: Srv,
    scenario: &str,
    args: &[&str],
    reasons: &[&str],
    handshake: bool,
) -> Value {
    let before = lab.stats();
    let since = lab.lines(srv).len();
    let res = lab.attack(srv, scenario, args);
    thread::sleep(Duration::from_millis(200));
    let after = lab.stats();
    let read = lab.read_from(srv, &lab.attacker.to_string(), since);
    let d = deltas(&before, &after);
    let mut problems = Vec::new();
    if handshake && res["synack"] != true {
        problems.push(format!(
            "the attacker's handshake failed (its address is allowed for {A}: the SYN \
             prefilter must let it connect)"
        ));
    }
    if read.iter().any(|v| is_stolen(v)) {
        problems.push(format!(
            "BYPASS: the server read the stolen key from the attacker's address: {read:?}"
        ));
    }
    let counted: u64 = d
        .iter()
        .filter(|(r, _)| reasons.contains(&r.as_str()))
        .map(|(_, n)| n)
        .sum();
    if counted == 0 {
        problems.push(format!(
            "no packet counted under {reasons:?} (DATAPATH.md's reason for this class)"
        ));
    }
    assert!(
        problems.is_empty(),
        "{scenario} {args:?} through keywall:\n  {}\ncounter deltas: {d:?}\nattack: {res}\nserver \
         log since: {:#?}",
        problems.join("\n  "),
        &lab.lines(srv)[since..]
    );
    res
}

// ---------------------------------------------------------------------------------------------
// the control: the crafted machinery delivers what the policy allows

#[test]
fn crafted_machinery_control() {
    let lab = Lab::new("evctl", &[Srv::Http, Srv::Tls, Srv::Fix]);
    let _d = lab.start_daemon(&[]);
    let me = lab.attacker.to_string();
    let before = lab.stats();
    let marks: Vec<usize> = [Srv::Http, Srv::Tls, Srv::Fix]
        .iter()
        .map(|&s| lab.lines(s).len())
        .collect();
    for (srv, scenario, arg, want) in [
        (Srv::Http, "http-control", A_VALUE, A_VALUE.to_owned()),
        (
            Srv::Tls,
            "tls-control",
            A_LABEL,
            format!("{A_LABEL}.api.test"),
        ),
        (Srv::Fix, "fix-control", A_VALUE, A_VALUE.to_owned()),
    ] {
        let res = lab.attack(srv, scenario, &[arg]);
        assert_eq!(res["synack"], true, "{scenario}: {res}");
        let mark = marks[[Srv::Http, Srv::Tls, Srv::Fix]
            .iter()
            .position(|&s| s == srv)
            .unwrap()];
        let read = lab.read_from(srv, &me, mark);
        assert!(
            read.contains(&want),
            "{scenario}: the server did not read the allowed key {want} through keywall: \
             {read:?}; attack: {res}"
        );
    }
    // The same machinery with the stolen key, in order: refused, and counted as such.
    let since = lab.lines(Srv::Http).len();
    let res = lab.attack(Srv::Http, "http-control", &[S_VALUE]);
    assert_eq!(res["synack"], true, "{res}");
    let read = lab.read_from(Srv::Http, &me, since);
    assert!(!read.iter().any(|v| is_stolen(v)), "{read:?}");
    thread::sleep(Duration::from_millis(200));
    let d = deltas(&before, &lab.stats());
    let get = |r: &str| d.iter().find(|(x, _)| x == r).map_or(0, |(_, n)| *n);
    assert!(get("pass_allowed") >= 3, "{d:?}");
    assert!(get("drop_not_allowed") >= 1, "{d:?}");
}

// ---------------------------------------------------------------------------------------------
// HTTP: parser differentials

#[test]
fn http_space_before_colon() {
    attack_test(
        "evspcol",
        Srv::Http,
        "http-lenient",
        &["space-colon", S_VALUE],
        &["drop_malformed"],
    );
}

#[test]
fn http_obs_fold() {
    attack_test(
        "evfold",
        Srv::Http,
        "http-lenient",
        &["obs-fold", S_VALUE],
        &["drop_malformed"],
    );
}

#[test]
fn http_bare_cr_line_break() {
    attack_test(
        "evbarecr",
        Srv::Http,
        "http-lenient",
        &["bare-cr", S_VALUE],
        &["drop_not_allowed"],
    );
}

#[test]
fn http_underscore_for_dash() {
    attack_test(
        "evunder",
        Srv::Http,
        "http-lenient",
        &["underscore", S_VALUE],
        &["drop_not_allowed"],
    );
}

#[test]
fn http_h2c_prior_knowledge() {
    attack_test("evh2c", Srv::Http, "h2c", &[S_VALUE], &["drop_malformed"]);
}

// ---------------------------------------------------------------------------------------------
// stream position: overlap, order, URG, SYN data, discarded segments

#[test]
fn overlap_first_copy_wins_at_the_server() {
    attack_test(
        "evoverlap",
        Srv::Http,
        "http-overlap",
        &[S_VALUE],
        &["drop_malformed"],
    );
}

#[test]
fn out_of_order_segments() {
    attack_test(
        "evooo",
        Srv::Tls,
        "tls-ooo",
        &[S_LABEL],
        &["drop_malformed"],
    );
}

#[test]
fn urgent_pointer() {
    attack_test(
        "evurg",
        Srv::Http,
        "http-urg",
        &[S_VALUE],
        &["drop_malformed"],
    );
}

/// The request rides on the SYN (the server takes TCP Fast Open data without a cookie):
/// DATAPATH.md never judges data on a SYN, so the SYN itself is dropped (no handshake).
#[test]
fn data_on_syn() {
    let lab = Lab::new("evsyndata", &[Srv::Http]);
    attack_unfiltered(&lab, Srv::Http, "http-syn-data", &[S_VALUE]);
    let _d = lab.start_daemon(&[]);
    attack_refused(
        &lab,
        Srv::Http,
        "http-syn-data",
        &[S_VALUE],
        &["drop_malformed"],
        false,
    );
}

#[test]
fn bad_checksum_then_other_bytes_at_the_same_seq() {
    let lab = Lab::new("evcsum", &[Srv::Tls]);
    let me = lab.attacker.to_string();
    let args = [A_LABEL, S_LABEL];
    let since = lab.lines(Srv::Tls).len();
    attack_unfiltered(&lab, Srv::Tls, "tls-bad-csum", &args);
    let read = lab.read_from(Srv::Tls, &me, since);
    assert!(
        !read.iter().any(|v| v.contains(A)),
        "the server read the bad-checksum segment (it must discard it, or this test shows \
         nothing): {read:?}"
    );
    let _d = lab.start_daemon(&[]);
    // The retransmission rule judges the second hello whole, from the stream start.
    attack_refused(
        &lab,
        Srv::Tls,
        "tls-bad-csum",
        &args,
        &["drop_not_allowed"],
        true,
    );
}

// ---------------------------------------------------------------------------------------------
// TLS ClientHello shapes

#[test]
fn tls_hello_fragmented_over_records() {
    attack_test(
        "evtlsfrag",
        Srv::Tls,
        "tls-fragmented",
        &[S_LABEL],
        &["drop_malformed"],
    );
}

/// OpenSSL skips an empty handshake record before the ClientHello (it refuses a
/// ChangeCipherSpec or an empty application-data record there, so those cannot carry S).
#[test]
fn tls_record_before_the_hello() {
    attack_test(
        "evtlspre",
        Srv::Tls,
        "tls-record-before",
        &["empty-handshake", S_LABEL],
        &["drop_malformed"],
    );
}

#[test]
fn tls_first_segment_shorter_than_9_bytes() {
    attack_test(
        "evtlsshort",
        Srv::Tls,
        "tls-short-first",
        &[S_LABEL],
        &["drop_malformed"],
    );
}

#[test]
fn tls_too_many_extensions() {
    attack_test(
        "evtlsexts",
        Srv::Tls,
        "tls-many-exts",
        &[S_LABEL],
        &["drop_malformed"],
    );
}

#[test]
fn tls_sni_trailing_dot() {
    let name = format!("{S_LABEL}.api.test.");
    attack_test(
        "evtlsdot",
        Srv::Tls,
        "tls-name",
        &[&name],
        &["drop_not_allowed"],
    );
}

#[test]
fn tls_sni_upper_case() {
    let name = format!("{S_LABEL}.api.test").to_ascii_uppercase();
    attack_test(
        "evtlsupper",
        Srv::Tls,
        "tls-name",
        &[&name],
        &["drop_not_allowed"],
    );
}

/// Two keys that differ only in case (`casekey1` the attacker's, `CASEKEY1` allowed elsewhere):
/// a server that takes the SNI label as it is reads `CASEKEY1`. keywall must either refuse
/// such a policy for a tls-sni listener or drop the upper-case label; it must not judge it as
/// the attacker's `casekey1`.
#[test]
fn tls_sni_case_variants_of_two_keys() {
    let lab = Lab::new("evtlscase", &[Srv::Tls]);
    let me = lab.attacker.to_string();
    let extra = format!(
        "\n[[key]]\nprefix = \"casekey1\"\nallow = [\"{me}/32\"]\n\n[[key]]\nprefix = \
         \"CASEKEY1\"\nallow = [\"{VICTIM}/32\"]\n"
    );
    let name = "k-CASEKEY1.api.test";
    let since = lab.lines(Srv::Tls).len();
    lab.attack(Srv::Tls, "tls-name", &[name]);
    assert!(
        lab.read_from(Srv::Tls, &me, since)
            .iter()
            .any(|v| v.contains("CASEKEY1")),
        "unfiltered, the server should read the upper-case label"
    );
    let policy = match lab.write_policy(&lab.policy_text(&extra)) {
        Ok(p) => p,
        Err(why) => {
            // Refusing the ambiguous policy is one of the two correct answers.
            eprintln!("policy check refuses case-colliding tls-sni keys: {why}");
            return;
        }
    };
    let _d = lab.start_daemon_with(&policy, 4, &[]);
    let before = lab.stats();
    let since = lab.lines(Srv::Tls).len();
    let res = lab.attack(Srv::Tls, "tls-name", &[name]);
    thread::sleep(Duration::from_millis(200));
    let d = deltas(&before, &lab.stats());
    let read = lab.read_from(Srv::Tls, &me, since);
    assert!(
        !read.iter().any(|v| v.contains("CASEKEY1")) && drops(&d) > 0,
        "BYPASS: {name} from the attacker reached the server, judged as the attacker's own \
         casekey1: read {read:?}, counters {d:?}, attack {res}"
    );
}

// ---------------------------------------------------------------------------------------------
// a verdict never carries over

/// The first data segment starts before ISN + 1: the server trims its head and reads a
/// ClientHello hidden in the outer one's cipher-suite list (DATAPATH.md, "Stream starts").
#[test]
fn tls_segment_before_the_stream_start() {
    attack_test(
        "evtlsbefore",
        Srv::Tls,
        "tls-before-start",
        &[A_LABEL, S_LABEL],
        &["drop_malformed"],
    );
}

#[test]
fn tls_second_client_hello_on_a_judged_connection() {
    let lab = Lab::new("evtls2ch", &[Srv::Tls]);
    let args = [A_LABEL, S_LABEL];
    let res = attack_unfiltered(&lab, Srv::Tls, "tls-second-hello", &args);
    assert!(
        res["notes"].to_string().contains("first hello: True"),
        "the server did not answer the first hello with a HelloRetryRequest: {res}"
    );
    let _d = lab.start_daemon(&[]);
    attack_refused(
        &lab,
        Srv::Tls,
        "tls-second-hello",
        &args,
        &["drop_not_allowed"],
        true,
    );
}

#[test]
fn fix_second_logon_on_a_judged_connection() {
    attack_test(
        "evfix2",
        Srv::Fix,
        "fix-second-logon",
        &[A_VALUE, S_VALUE],
        &["drop_not_allowed"],
    );
}

#[test]
fn fix_tag_with_leading_zero() {
    attack_test(
        "evfix0553",
        Srv::Fix,
        "fix-leading-zero",
        &[S_VALUE],
        &["drop_malformed"],
    );
}

/// A SYN on the established tuple between the two parts of a ClientHello, with ISN = the
/// stream position - 1: the rest arrives exactly at ISN + 1. Whether keywall takes it as a
/// fresh stream (not a ClientHello start: drop_malformed) or in order (its server_name judged:
/// drop_not_allowed), it must not pass.
#[test]
fn syn_on_an_established_tuple_mid_hello() {
    attack_test(
        "evsyntls",
        Srv::Tls,
        "tls-syn-midhello",
        &[S_LABEL],
        &["drop_malformed", "drop_not_allowed"],
    );
}

/// Logon with A, a SYN on the tuple (ISN = position - 1), a Logon with S at ISN + 1.
#[test]
fn syn_on_an_established_tuple_after_the_key_was_judged() {
    attack_test(
        "evsynfix",
        Srv::Fix,
        "fix-syn",
        &[A_VALUE, S_VALUE],
        &["drop_not_allowed"],
    );
}

/// As the trusted proxy: a connection for VICTIM (S allowed there), reset, then a new
/// connection on the same 4-tuple whose PROXY header names the attacker.
#[test]
fn proxy_header_on_a_reused_tuple() {
    let lab = Lab::new("evproxy", &[Srv::Proxy]);
    let me = lab.attacker.to_string();
    let args = [VICTIM, S_VALUE, me.as_str(), S_VALUE];
    attack_unfiltered(&lab, Srv::Proxy, "proxy-reuse", &args);
    let _d = lab.start_daemon(&[]);
    let since = lab.lines(Srv::Proxy).len();
    // A new connection on the tuple is judged afresh (drop_not_allowed) when its random
    // ISN lies outside any receive window of the old stream; in the 3% of cases where it
    // does not, its data is out of position for the old one (drop_malformed).
    attack_refused(
        &lab,
        Srv::Proxy,
        "proxy-reuse",
        &args,
        &["drop_not_allowed", "drop_malformed"],
        true,
    );
    assert!(
        lab.read_from(Srv::Proxy, VICTIM, since)
            .iter()
            .any(|v| is_stolen(v)),
        "the first (legitimate, proxied for {VICTIM}) connection should pass: {:#?}",
        &lab.lines(Srv::Proxy)[since..]
    );
}

// ---------------------------------------------------------------------------------------------
// flow-table pressure and connections older than the program

const SMALL_FLOWS: &str = "64";
const FLOOD_TUPLES: &str = "3000";

/// A ClientHello cut in two; between the parts, thousands of other tuples fill a 64-entry flow
/// table. The rest of the hello, with no flow entry left, is not a message start:
/// drop_malformed (drop_not_allowed if its entry survived the flood and the walk went on).
#[test]
fn flow_table_pressure_mid_hello() {
    let lab = Lab::new("evevict", &[Srv::Tls]);
    let http = Srv::Http.port().to_string();
    let args = [S_LABEL, FLOOD_TUPLES, http.as_str()];
    attack_unfiltered(&lab, Srv::Tls, "tls-evict", &args);
    let _d = lab.start_daemon(&["--max-flows", SMALL_FLOWS]);
    attack_refused(
        &lab,
        Srv::Tls,
        "tls-evict",
        &args,
        &["drop_malformed", "drop_not_allowed"],
        true,
    );
}

/// A keep-alive connection whose flow entry was evicted by a flood fails closed: its next
/// request is dropped, never judged as a new connection's.
#[test]
fn flow_table_pressure_evicted_keepalive_fails_closed() {
    let lab = Lab::new("evevictok", &[Srv::Http]);
    let _d = lab.start_daemon(&["--max-flows", SMALL_FLOWS]);
    let before = lab.stats();
    let since = lab.lines(Srv::Http).len();
    let res = lab.attack(Srv::Http, "http-flood", &[A_VALUE, FLOOD_TUPLES]);
    thread::sleep(Duration::from_millis(200));
    let d = deltas(&before, &lab.stats());
    let read = lab.read_from(Srv::Http, &lab.attacker.to_string(), since);
    // The flood pushes the keep-alive connection's flow out of the 64-entry table, or not
    // (the kernel's LRU keeps free lists per CPU). If it did, the connection had passed bytes,
    // so it is remembered apart (KW_HELD): its second request cannot be placed in its stream
    // any more and fails closed, never judged as a new connection's (DATAPATH.md, "Eviction
    // and tuple reuse"). If it did not, the request is judged as usual.
    let malformed = d
        .iter()
        .find(|(r, _)| r == "drop_malformed")
        .map_or(0, |(_, n)| *n);
    let a = A_VALUE.to_owned();
    if read == vec![a.clone(), a.clone()] {
        assert_eq!(drops(&d), 0, "served, yet something was dropped: {d:?}");
    } else {
        assert_eq!(
            read,
            vec![a],
            "only the request before the flood may reach the server; counters {d:?}; attack {res}"
        );
        assert!(
            malformed > 0,
            "the evicted connection's request is not counted as drop_malformed: {d:?}"
        );
    }
}

/// Connections established before the program was attached (DATAPATH.md, "Stream starts"):
/// the filter recorded no SYN for them, so where their streams stand is unknown, and each is
/// cut on its next data segment (HTTP keep-alive, TLS and FIX alike; clients reconnect).
#[test]
fn connections_older_than_the_program() {
    let lab = Lab::new("evolder", &[Srv::Http, Srv::Tls, Srv::Fix]);
    let me = lab.attacker.to_string();
    let (cert, _) = lab.sb.tls_cert().unwrap();
    let go = lab.sb.tmp_dir().join("attached.go");
    let edge = lab.sb.edge_v4().to_string();
    let sni = format!("{A_LABEL}.api.test");
    let spawn = |kind: &str, port: u16, key: &str| -> Proc {
        let mut cmd = lab.sb.client_cmd("python3");
        cmd.arg(lab.script("evasion_clients.py"))
            .args(["hold", kind, &me, &edge, &port.to_string(), key])
            .arg(&go)
            .arg(&cert)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Proc::new(cmd.spawn().expect("python3"))
    };
    let held = vec![
        ("http A", spawn("http", Srv::Http.port(), A_VALUE)),
        ("http S", spawn("http", Srv::Http.port(), S_VALUE)),
        ("tls", spawn("tls", Srv::Tls.port(), &sni)),
        ("fix", spawn("fix", Srv::Fix.port(), A_VALUE)),
    ];
    // Let every first exchange finish before the program exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    let firsts_done = || {
        lab.read_from(Srv::Http, &me, 0).len() >= 2
            && lab.lines(Srv::Tls).iter().any(|l| l.starts_with("REQ "))
            && !lab.read_from(Srv::Fix, &me, 0).is_empty()
    };
    while !firsts_done() {
        assert!(
            Instant::now() < deadline,
            "the first exchanges did not happen: {:?} {:?} {:?}",
            lab.lines(Srv::Http),
            lab.lines(Srv::Tls),
            lab.lines(Srv::Fix)
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(300));
    let _d = lab.start_daemon(&[]);
    let before = lab.stats();
    let since = lab.lines(Srv::Http).len();
    fs::write(&go, b"").unwrap();
    let results: Vec<(&str, Value)> = held
        .into_iter()
        .map(|(name, p)| {
            let out = p.into_child().wait_with_output().expect("hold client");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
                panic!(
                    "hold {name}: {text:?} {e} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            (name, v)
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let d = deltas(&before, &lab.stats());
    let get = |r: &str| d.iter().find(|(x, _)| x == r).map_or(0, |(_, n)| *n);
    let second = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v["second"].clone())
            .unwrap()
    };
    let mut problems = Vec::new();
    for (name, v) in &results {
        if v["first"] != 200 && v["first"] != "A" {
            problems.push(format!(
                "{name}: the exchange before the attach failed: {v}"
            ));
        }
    }
    if second("http A") != "TIMEOUT" {
        problems.push(format!(
            "the older keep-alive connection was not cut: {}",
            second("http A")
        ));
    }
    if second("http S") == 200 {
        problems.push("the stolen key passed on a connection older than the program".into());
    }
    if lab
        .read_from(Srv::Http, &me, since)
        .iter()
        .any(|v| is_stolen(v))
    {
        problems.push("BYPASS: the server read S after the attach".into());
    }
    if second("tls") != "TIMEOUT" {
        problems.push(format!(
            "the older TLS connection was not cut: {}",
            second("tls")
        ));
    }
    if second("fix") != "TIMEOUT" {
        problems.push(format!(
            "the older FIX connection was not cut: {}",
            second("fix")
        ));
    }
    if get("drop_malformed") < 4 {
        problems.push("drop_malformed did not count the four cut connections".into());
    }
    assert!(
        problems.is_empty(),
        "{}\nresults: {results:?}\ncounters: {d:?}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// legitimate traffic: no false drops

fn assert_no_drops(what: &str, d: &[(String, u64)]) {
    assert_eq!(
        drops(d),
        0,
        "{what}: keywall dropped legitimate packets: {d:?}"
    );
}

#[test]
fn legit_curl_tls12_and_tls13() {
    let lab = Lab::new("evtlsver", &[Srv::Tls]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let (cert, _) = lab.sb.tls_cert().unwrap();
    let host = format!("{A_LABEL}.api.test");
    let before = lab.stats();
    for (flags, version) in [
        (&["--tlsv1.2", "--tls-max", "1.2"][..], "TLSv1.2"),
        (&["--tlsv1.3"][..], "TLSv1.3"),
    ] {
        let out = lab
            .sb
            .client_cmd("curl")
            .args([
                "-sS",
                "--max-time",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(["--interface", &me])
            .args(flags)
            .arg("--cacert")
            .arg(&cert)
            .args([
                "--resolve",
                &format!("{host}:{}:{}", Srv::Tls.port(), lab.sb.edge_v4()),
            ])
            .arg(format!("https://{host}:{}/", Srv::Tls.port()))
            .stdin(Stdio::null())
            .output()
            .expect("curl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "curl {flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            lab.lines(Srv::Tls)
                .contains(&format!("VERSION {me} {version}")),
            "the server did not negotiate {version}: {:?}",
            lab.lines(Srv::Tls)
        );
    }
    let d = deltas(&before, &lab.stats());
    assert_no_drops("curl over TLS 1.2 and 1.3", &d);
    assert!(
        d.iter().any(|(r, n)| r == "pass_allowed" && *n >= 2),
        "{d:?}"
    );
}

/// curl over TLS 1.3 to a server that offers P-256 alone: a HelloRetryRequest, then a second
/// ClientHello with the same name on the same connection (judged again, and allowed).
#[test]
fn legit_tls13_hello_retry_request() {
    let lab = Lab::new("evtlshrr", &[Srv::TlsHrr]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let (cert, _) = lab.sb.tls_cert().unwrap();
    let host = format!("{A_LABEL}.api.test");
    let port = Srv::TlsHrr.port();
    let before = lab.stats();
    let out = lab
        .sb
        .client_cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--interface", &me, "--tlsv1.3", "--curves", "X25519:P-256"])
        .arg("--cacert")
        .arg(&cert)
        .args(["--resolve", &format!("{host}:{port}:{}", lab.sb.edge_v4())])
        .arg(format!("https://{host}:{port}/"))
        .stdin(Stdio::null())
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snis = lab.read_from(Srv::TlsHrr, &me, 0);
    assert_eq!(
        snis,
        vec![host.clone(), host.clone()],
        "no HelloRetryRequest happened (the server saw one ClientHello): {:?}",
        lab.lines(Srv::TlsHrr)
    );
    assert_no_drops(
        "a TLS 1.3 handshake with a HelloRetryRequest",
        &deltas(&before, &lab.stats()),
    );
}

/// A post-quantum-sized ClientHello (1,216-byte key share, 1,700 bytes) in one write: TCP
/// cuts it at the MSS, before server_name.
#[test]
fn legit_post_quantum_sized_hello() {
    let lab = Lab::new("evtlspq", &[Srv::Tls]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let before = lab.stats();
    let host = format!("{A_LABEL}.api.test");
    let line = lab
        .sb
        .client_tool([
            "split-hello",
            &me,
            &lab.sb.edge_v4().to_string(),
            &Srv::Tls.port().to_string(),
            &host,
            "0",
            "50",
            "3",
        ])
        .expect("clients.py split-hello");
    assert!(line.starts_with("SERVERHELLO"), "{line}");
    assert_eq!(lab.read_from(Srv::Tls, &me, 0), vec![host]);
    assert_no_drops(
        "a ClientHello over two segments",
        &deltas(&before, &lab.stats()),
    );
}

#[test]
fn legit_http_keepalive_and_pipelined() {
    let lab = Lab::new("evpipe", &[Srv::Http]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let edge = lab.sb.edge_v4().to_string();
    let port = Srv::Http.port().to_string();
    let before = lab.stats();
    let since = lab.lines(Srv::Http).len();
    for mode in ["keepalive", "pipelined", "pipelined-segments"] {
        let v = lab.client(&["http", &me, &edge, &port, A_VALUE, mode]);
        assert_eq!(
            v["statuses"],
            serde_json::json!([200, 200, 200]),
            "{mode}: {v}"
        );
    }
    let read = lab.read_from(Srv::Http, &me, since);
    assert_eq!(read.len(), 9, "{read:?}");
    assert_no_drops(
        "keep-alive and pipelined requests",
        &deltas(&before, &lab.stats()),
    );
}

/// The server's packets to the client are dropped (on the edge, after keywall) while the
/// client sends its request: the client retransmits it, and the retransmission must pass.
#[test]
fn legit_retransmission_after_a_lost_ack() {
    let lab = Lab::new("evlostack", &[Srv::Http]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let before = lab.stats();
    let since = lab.lines(Srv::Http).len();
    let mut child = lab
        .sb
        .client_cmd("python3")
        .arg(lab.script("evasion_clients.py"))
        .args([
            "lost-ack",
            &me,
            &lab.sb.edge_v4().to_string(),
            &Srv::Http.port().to_string(),
            A_VALUE,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let lport: u16 = line
        .trim()
        .strip_prefix("CONNECTED ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("lost-ack client said {line:?}"));
    let rules = lab.sb.tmp_dir().join("lost-ack.nft");
    fs::write(
        &rules,
        format!(
            "table inet kwlostack {{\n chain out {{\n  type filter hook output priority 0;\n  \
             ip daddr {me} tcp sport {} tcp dport {lport} drop\n }}\n}}\n",
            Srv::Http.port()
        ),
    )
    .unwrap();
    lab.sb
        .run_edge("nft", ["-f", rules.to_str().unwrap()])
        .expect("nft in the edge namespace");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    stdin.flush().unwrap();
    // Initial RTO is at least 200 ms: by then the client has retransmitted more than once.
    thread::sleep(Duration::from_millis(1200));
    lab.sb
        .run_edge("nft", ["delete", "table", "inet", "kwlostack"])
        .expect("removing the nft table");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let _ = child.wait();
    let v: Value = serde_json::from_str(rest.trim())
        .unwrap_or_else(|e| panic!("lost-ack client said {rest:?}: {e}"));
    assert_eq!(v["status"], 200, "{v}");
    assert!(
        v["retrans"].as_u64().unwrap_or(0) >= 1,
        "the client never retransmitted: {v}"
    );
    thread::sleep(Duration::from_millis(200));
    let d = deltas(&before, &lab.stats());
    assert_no_drops("a retransmitted request", &d);
    assert!(
        d.iter().any(|(r, n)| r == "pass_allowed" && *n >= 2),
        "the retransmission did not pass through keywall as allowed: {d:?}"
    );
    assert!(!lab.read_from(Srv::Http, &me, since).is_empty());
}

#[test]
fn legit_simplefix_session() {
    let lab = Lab::new("evfixsess", &[Srv::Fix]);
    let me = lab.attacker.to_string();
    let _d = lab.start_daemon(&[]);
    let before = lab.stats();
    let v = lab.client(&[
        "fix-session",
        &me,
        &lab.sb.edge_v4().to_string(),
        &Srv::Fix.port().to_string(),
        A_VALUE,
    ]);
    assert_eq!(v["logon"], true, "{v}");
    assert_eq!(v["heartbeats"], 3, "{v}");
    assert_no_drops("a FIX session", &deltas(&before, &lab.stats()));
}

// ---------------------------------------------------------------------------------------------
// the helpers' own logic

#[test]
fn tools_are_present() {
    for (tool, arg) in [
        ("python3", "--version"),
        ("nft", "--version"),
        ("openssl", "version"),
        ("curl", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "{tool} is missing (`cargo xtask setup` installs it)");
    }
    let ok = Command::new("python3")
        .args(["-c", "import simplefix"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "simplefix is missing (`cargo xtask setup` installs it)");
}

#[test]
fn counter_deltas_and_stolen_values() {
    let mk = |m: u64, n: u64| {
        serde_json::json!({"reasons": {
            "pass_allowed": {"packets": m},
            "drop_malformed": {"packets": n},
        }})
    };
    let d = deltas(&mk(1, 2), &mk(4, 2));
    assert_eq!(d, vec![("pass_allowed".to_owned(), 3)]);
    assert_eq!(drops(&d), 0);
    assert_eq!(drops(&deltas(&mk(1, 2), &mk(1, 5))), 3);
    assert!(is_stolen("K-STOLENS1.API.TEST"));
    assert!(is_stolen("stolens1-Zq81xT"));
    assert!(!is_stolen("attacka1-Zq81xT"));
}
