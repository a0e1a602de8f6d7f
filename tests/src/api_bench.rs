//! The control-plane API from outside: a real `keywall run` in a sandbox, a small HTTP/1.1
//! client for its unix socket, and the control-plane benchmarks (lock to enforced, a 1M-key
//! PUT).

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use serde_json::{Value, json};

use crate::{
    harness::{XDP_DROP, XDP_PASS},
    netns::Sandbox,
    packet::{Pkt, http_request},
};

/// The `keywall` binary next to the running test or bench binary.
pub fn keywall_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe has a directory")?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let b = d.join("keywall");
        if b.is_file() {
            return Ok(b);
        }
    }
    bail!(
        "keywall binary not found next to {} — build it first: `cargo build -p filter-user`",
        exe.display()
    )
}

/// Runs a keywall operator verb in the edge namespace, as an operator on the host would.
pub fn kw(sb: &Sandbox, args: &[&str]) -> std::process::Output {
    sb.edge_cmd(keywall_bin().expect("the keywall binary"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running keywall")
}

/// Packets counted under `reason` in `keywall stats --json` output.
pub fn reason_packets(stats: &Value, reason: &str) -> u64 {
    stats["reasons"][reason]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no reasons.{reason}.packets: {stats}"))
}

/// A keep-alive HTTP client (`python3 - HOST PORT SRC KEY`): one request every 100 ms on one
/// connection, reconnecting after an error, one line per request:
/// `ok|err SENT DONE LOCAL_PORT STATUS|ERROR`.
pub const KEEPALIVE_CLIENT_PY: &str = r#"
import http.client, sys, time
host, port, src, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
conn = None
while True:
    t0 = time.time()
    lport = 0
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=1.0, source_address=(src, 0))
            conn.connect()
        lport = conn.sock.getsockname()[1]
        conn.request("GET", "/api/v3/account", headers={"X-MBX-APIKEY": key})
        r = conn.getresponse()
        r.read()
        print("ok %.3f %.3f %d %d" % (t0, time.time(), lport, r.status), flush=True)
    except Exception as e:
        print("err %.3f %.3f %d %s" % (t0, time.time(), lport, type(e).__name__), flush=True)
        try:
            conn.close()
        except Exception:
            pass
        conn = None
    time.sleep(0.1)
"#;

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client for the unix socket

/// One request on a fresh connection; returns the status and the body.
pub fn http_unix(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Result<(u16, Vec<u8>)> {
    let mut s =
        UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: keywall\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    // A large body waits for `100 Continue`, as curl does: a server that refuses it (413)
    // answers at once and closes, and a body still being written would reset the answer.
    let expect = body.is_some_and(|b| b.len() > 16 << 10);
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
        if expect {
            req.push_str("Expect: 100-continue\r\n");
        }
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    if let Some(b) = body {
        if expect {
            let mut buf = [0u8; 4096];
            while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                resp.extend_from_slice(&buf[..n]);
            }
            if resp.starts_with(b"HTTP/1.1 100") {
                resp.clear();
                s.write_all(b)?;
            }
        } else {
            s.write_all(b)?;
        }
    }
    s.read_to_end(&mut resp)?;
    parse_response(&resp)
}

/// Splits an HTTP/1.1 response into status and body (content-length or chunked).
pub fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>)> {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no header end in {:?}", String::from_utf8_lossy(resp)))?;
    let head = String::from_utf8_lossy(&resp[..end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    let mut body = resp[end + 4..].to_vec();
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest = &rest[i + 2 + n + 2..];
        }
        body = out;
    }
    Ok((status, body))
}

/// A request whose body is JSON (or empty); the answer's status and JSON (`null` if none).
pub fn call(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let b = body.map(|v| serde_json::to_vec(v).expect("json"));
    let (st, resp) = http_unix(sock, method, path, b.as_deref(), &[])?;
    Ok((st, serde_json::from_slice(&resp).unwrap_or(Value::Null)))
}

// ---------------------------------------------------------------------------------------------
// A daemon in a sandbox

/// The bench's daemons are the tests' (`crate::daemon`).
pub use crate::daemon::Daemon as ApiDaemon;

// ---------------------------------------------------------------------------------------------
// Benchmarks

const BENCH_PORT: u16 = 8080;
const CLIENT: [u8; 4] = [10, 200, 0, 7];
const SERVER: [u8; 4] = [10, 200, 0, 1];

/// A policy of `n` keys (`bk000000`..), each allowed from one host of 10.64.0.0/10 plus the
/// bench client; the first is the key the benchmark locks.
pub fn bench_policy(n: usize, revision: u64) -> Value {
    let keys: Vec<Value> = (0..n)
        .map(|i| {
            let host = format!("10.{}.{}.{}", 64 + (i >> 16) % 64, (i >> 8) & 255, i & 255);
            json!({"prefix": format!("bk{i:06}"), "allow": [host, "10.200.0.7"]})
        })
        .collect();
    json!({
        "revision": revision,
        "settings": {"key_prefix_len": 8, "unknown_key": "drop", "no_key": "pass", "prefilter": false},
        "listener": [{"port": BENCH_PORT, "locator": "http-header", "headers": ["X-MBX-APIKEY"]}],
        "key": keys,
    })
}

/// Runs one frame through the daemon's pinned program; returns the XDP action.
pub fn run_frame(prog: &Xdp, frame: &[u8]) -> Result<u32> {
    // Its connection's SYN first (the filter judges a stream only from a recorded start);
    // a repeat of the same SYN changes nothing.
    if let Some(syn) = crate::packet::syn_for(frame) {
        prog.test_run(TestRunOptions {
            data_in: Some(&syn),
            repeat: 1,
            ..Default::default()
        })?;
    }
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN on the daemon's program")?;
    Ok(r.return_value)
}

/// From an API lock to the next packet of an established connection being dropped, `n`
/// times (each lock is undone by an unlock that is not timed), with 1,000 keys loaded and the
/// state dir on the sandbox's disk. See [`lock_to_drop_with`].
pub fn lock_to_drop(n: usize) -> Result<Vec<Duration>> {
    lock_to_drop_with(n, 1000, false)
}

/// [`lock_to_drop`] with `keys` keys loaded, and the state dir on tmpfs (`/dev/shm`) when
/// `state_on_tmpfs`, which leaves the disk's fdatasync out of the figure.
///
/// The connection is one flow judged by the daemon's pinned program through
/// BPF_PROG_TEST_RUN: its first packet carried the key, later packets follow the flow's
/// verdict, which is checked against the live policy. Each sample is the PATCH round trip
/// (answered once the maps enforce it and the journal holds it) plus polling until the next
/// packet of the connection is dropped.
pub fn lock_to_drop_with(n: usize, keys: usize, state_on_tmpfs: bool) -> Result<Vec<Duration>> {
    let sb = Sandbox::new("apibl")?;
    let shm = PathBuf::from(format!("/dev/shm/kw-bench-state-{}", std::process::id()));
    let _ = fs::remove_dir_all(&shm);
    let shm_arg = shm.display().to_string();
    let cap = keys.max(1024).to_string();
    let mut extra = vec!["--max-keys", &cap];
    if state_on_tmpfs {
        extra.extend(["--state-dir", &shm_arg]);
    }
    let d = ApiDaemon::start(&sb, 1, &extra)?;
    let r = lock_loop(&sb, &d, n, keys);
    drop(d);
    let _ = fs::remove_dir_all(&shm);
    r
}

fn lock_loop(sb: &Sandbox, d: &ApiDaemon, n: usize, keys: usize) -> Result<Vec<Duration>> {
    let rev = 1u64;
    let (st, v) = d.call("PUT", "/v1/policy", Some(&bench_policy(keys, rev)))?;
    if st != 200 {
        bail!("PUT the bench policy: {st} {v}");
    }
    lock_loop_from(sb, d, n, rev)
}

/// The lock loop on a daemon that enforces `bench_policy` at revision `rev`.
fn lock_loop_from(sb: &Sandbox, d: &ApiDaemon, n: usize, mut rev: u64) -> Result<Vec<Duration>> {
    let prog = Xdp::from_pin(sb.pin_dir().join("prog"), XdpAttachType::Interface)
        .context("opening the daemon's pinned program")?;
    let first = Pkt::tcp4(CLIENT, SERVER, 40000, BENCH_PORT)
        .payload(&http_request(
            "GET",
            "/api/v3/account",
            &[("Host", "x"), ("X-MBX-APIKEY", "bk000000-secret")],
        ))
        .build();
    // Right after `first` on the same connection; run again and again it is that
    // connection's last segment retransmitted, which follows the verdict.
    let later = Pkt::tcp4(CLIENT, SERVER, 40000, BENCH_PORT)
        .payload(b"{\"ping\":1}")
        .build();
    if run_frame(&prog, &first)? != XDP_PASS || run_frame(&prog, &later)? != XDP_PASS {
        bail!("the bench connection is not allowed before the lock");
    }
    // One untimed lock and unlock first: after a big PUT the daemon settles the inactive
    // slot (seconds at 1M keys) before it takes the next write; the figure is steady state.
    let mut out = Vec::with_capacity(n + 1);
    let first_timed = rev + 2;
    for _ in 0..=n {
        rev += 1;
        let lock = json!({"revision": rev, "ops": [{"op": "lock", "prefix": "bk000000"}]});
        let t0 = Instant::now();
        let (st, v) = d.call("PATCH", "/v1/policy", Some(&lock))?;
        if st != 200 {
            bail!("lock: {st} {v}");
        }
        loop {
            if run_frame(&prog, &later)? == XDP_DROP {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("the connection still passes 5 s after the lock was answered");
            }
        }
        if out.len() < n && rev > first_timed {
            out.push(t0.elapsed());
        }
        rev += 1;
        let unlock = json!({"revision": rev, "ops": [{"op": "unlock", "prefix": "bk000000"}]});
        let (st, v) = d.call("PATCH", "/v1/policy", Some(&unlock))?;
        if st != 200 {
            bail!("unlock: {st} {v}");
        }
        if run_frame(&prog, &later)? != XDP_PASS {
            bail!("the connection does not pass again after the unlock");
        }
    }
    Ok(out)
}

/// The control plane at one policy size.
#[derive(Clone, Copy, Debug)]
pub struct PutFigures {
    /// One PUT of a `keys`-key policy onto a daemon enforcing another of that size.
    pub put: Duration,
    /// `GET /v1/status`, p50 and p99.
    pub status: (Duration, Duration),
    /// `GET /metrics` (curl's own total time, in the daemon's namespace), p50 and p99.
    pub metrics: (Duration, Duration),
    /// The daemon's resident memory after the load, and after 3 more whole re-applies.
    pub rss_loaded_mib: f64,
    pub rss_reapplied_mib: f64,
}

/// 20 `GET /v1/status` (each checked to report `keys` keys) and 20 scrapes of `/metrics`
/// (on 127.0.0.1:9478), each timed.
fn read_latencies(
    sb: &Sandbox,
    d: &ApiDaemon,
    keys: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut status = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (st, v) = d.call("GET", "/v1/status", None)?;
        status.push(t.elapsed());
        if st != 200 || v["keys"].as_u64() != Some(keys as u64) {
            bail!("GET /v1/status: {st} {v}");
        }
    }
    let mut metrics = Vec::new();
    for _ in 0..20 {
        let out = sb.run_edge(
            "curl",
            [
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                "http://127.0.0.1:9478/metrics",
            ],
        )?;
        let secs: f64 = out.trim().parse().context("curl time_total")?;
        metrics.push(Duration::from_secs_f64(secs));
    }
    Ok((status, metrics))
}

fn rss_mib(pid: u32) -> Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

pub fn p50_p99(mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort();
    let at = |p: f64| xs[(((p / 100.0) * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    (at(50.0), at(99.0))
}

/// A `keys`-key policy whose every key moves to another host at each `revision`.
fn moved_policy(keys: usize, revision: u64) -> Result<Vec<u8>> {
    let mut p = bench_policy(keys, revision);
    for k in p["key"].as_array_mut().expect("keys") {
        k["allow"][1] = json!(format!("10.200.0.{}", 8 + revision % 2));
    }
    Ok(serde_json::to_vec(&p)?)
}

/// PUT time, status and metrics latency, and daemon memory, at `keys` keys (see
/// [`PutFigures`]).
pub fn put_snapshot(keys: usize) -> Result<PutFigures> {
    let sb = Sandbox::new("apibp")?;
    let d = ApiDaemon::start(
        &sb,
        1,
        &[
            "--max-keys",
            &keys.max(1024).to_string(),
            "--metrics",
            "127.0.0.1:9478",
        ],
    )?;
    let pid = d.proc.as_ref().map(|p| p.id()).context("daemon pid")?;
    let (st, v) = d.call("PUT", "/v1/policy", Some(&bench_policy(keys, 1)))?;
    if st != 200 {
        bail!("first PUT: {st} {v}");
    }
    // The second snapshot moves every key to another host.
    let body = moved_policy(keys, 2)?;
    let t0 = Instant::now();
    let (st, resp) = http_unix(&d.sock, "PUT", "/v1/policy", Some(&body), &[])?;
    let put = t0.elapsed();
    if st != 200 {
        bail!("snapshot PUT: {st} {}", String::from_utf8_lossy(&resp));
    }
    drop(body);
    // Reads while the daemon is idle (the inactive slot settled).
    thread::sleep(Duration::from_millis(500));
    let (status, metrics) = read_latencies(&sb, &d, keys)?;
    let rss_loaded_mib = rss_mib(pid)?;
    for rev in 3..6 {
        let body = moved_policy(keys, rev)?;
        let (st, resp) = http_unix(&d.sock, "PUT", "/v1/policy", Some(&body), &[])?;
        if st != 200 {
            bail!("re-apply PUT: {st} {}", String::from_utf8_lossy(&resp));
        }
    }
    thread::sleep(Duration::from_millis(500));
    let rss_reapplied_mib = rss_mib(pid)?;
    if std::env::var_os("KEYWALL_BENCH_LOG").is_some() {
        eprintln!("{}", d.log_text());
    }
    Ok(PutFigures {
        put,
        status: p50_p99(status),
        metrics: p50_p99(metrics),
        rss_loaded_mib,
        rss_reapplied_mib,
    })
}

/// The daemon's control plane at one policy size (one daemon, the state dir on the
/// sandbox's disk, fdatasync included).
#[derive(Clone, Copy, Debug)]
pub struct ControlPlane {
    pub keys: usize,
    /// PUT of `keys` keys onto a daemon enforcing another policy of that size (every key's
    /// allowlist changes), answered once the maps enforce it and the state dir holds it.
    pub put: Duration,
    /// PATCH lock of one key to the next packet of its connection dropped, p50 and p99.
    pub lock: (Duration, Duration),
    /// `GET /v1/status`, p50 and p99.
    pub status: (Duration, Duration),
    /// `GET /metrics` (curl's own total time, in the daemon's namespace), p50 and p99.
    pub metrics: (Duration, Duration),
    /// SIGTERM, then a new `keywall run` until `GET /v1/status` answers (the pinned maps
    /// still enforce the policy: it is verified, not rewritten).
    pub restart: Duration,
    /// Daemon RSS once the load settled, and after 3 more whole re-applies.
    pub rss_loaded_mib: f64,
    pub rss_reapplied_mib: f64,
}

/// CPU seconds the process has used.
fn cpu_secs(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Waits (60 s at most) until the daemon used no CPU for 500 ms: a whole apply is followed
/// by the settle of the inactive slot, after its answer.
fn wait_idle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = cpu_secs(pid);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        let now = cpu_secs(pid);
        if now - last < 0.02 {
            return;
        }
        last = now;
    }
}

/// PUT, lock latency, status latency, restart and RSS with `keys` keys (see
/// [`ControlPlane`]); `locks` PATCH locks are timed.
pub fn control_plane(keys: usize, locks: usize) -> Result<ControlPlane> {
    let sb = Sandbox::new("apicp")?;
    let cap = keys.max(1024).to_string();
    let extra = ["--max-keys", cap.as_str(), "--metrics", "127.0.0.1:9478"];
    let mut d = ApiDaemon::start(&sb, 1, &extra)?;
    let pid = d.proc.as_ref().map(|p| p.id()).context("daemon pid")?;
    let put = |d: &ApiDaemon, body: &[u8]| -> Result<Duration> {
        let t0 = Instant::now();
        let (st, resp) = http_unix(&d.sock, "PUT", "/v1/policy", Some(body), &[])?;
        if st != 200 {
            bail!("PUT: {st} {}", String::from_utf8_lossy(&resp));
        }
        Ok(t0.elapsed())
    };
    // A policy of this size first, then the timed one moves every key (back to the bench
    // client's host, which the lock loop needs).
    put(&d, &moved_policy(keys, 1)?)?;
    wait_idle(pid);
    let put_time = put(&d, &serde_json::to_vec(&bench_policy(keys, 2))?)?;
    wait_idle(pid);
    let rss_loaded_mib = rss_mib(pid)?;
    let lock = lock_loop_from(&sb, &d, locks, 2)?;
    let rev = 2 + 2 * (locks as u64 + 1);
    let (status, metrics) = read_latencies(&sb, &d, keys)?;
    for r in 1..=3 {
        put(&d, &moved_policy(keys, rev + r)?)?;
        wait_idle(pid);
    }
    let rss_reapplied_mib = rss_mib(pid)?;
    d.stop()?;
    let t0 = Instant::now();
    let d2 = ApiDaemon::start_waiting(&sb, 2, &extra, Duration::from_secs(120))?;
    let restart = t0.elapsed();
    let (st, v) = d2.call("GET", "/v1/status", None)?;
    if st != 200
        || v["revision"].as_u64() != Some(rev + 3)
        || v["keys"].as_u64() != Some(keys as u64)
    {
        bail!("after the restart: {st} {v}");
    }
    drop(d2);
    drop(d);
    Ok(ControlPlane {
        keys,
        put: put_time,
        lock: p50_p99(lock),
        status: p50_p99(status),
        metrics: p50_p99(metrics),
        restart,
        rss_loaded_mib,
        rss_reapplied_mib,
    })
}

// ---------------------------------------------------------------------------------------------
// Lock to enforced through a policy-file edit

/// How an edit reaches the policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileWrite {
    /// A temporary file beside it, then `rename(2)` over it (editors, config management).
    Rename,
    /// Truncated and rewritten in place (`>` in a shell): the daemon may read it half written.
    InPlace,
}

/// The policy file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Toml,
    Json,
}

/// [`bench_policy`] as a policy file with no `revision` (each edit is one past the applied),
/// `bk000000` locked when `locked`. The two texts differ in that one key only.
pub fn bench_policy_file(n: usize, locked: bool, fmt: FileFormat) -> Vec<u8> {
    use std::fmt::Write as _;
    let host = |i: usize| format!("10.{}.{}.{}", 64 + (i >> 16) % 64, (i >> 8) & 255, i & 255);
    let mut s = String::with_capacity(n * 72 + 512);
    match fmt {
        FileFormat::Toml => {
            s.push_str("[settings]\nkey_prefix_len = 8\nunknown_key = \"drop\"\nno_key = \"pass\"\nprefilter = false\n\n");
            let _ = writeln!(
                s,
                "[[listener]]\nport = {BENCH_PORT}\nlocator = \"http-header\"\nheaders = [\"X-MBX-APIKEY\"]\n"
            );
            for i in 0..n {
                let _ = writeln!(
                    s,
                    "[[key]]\nprefix = \"bk{i:06}\"\nallow = [\"{}\", \"10.200.0.7\"]",
                    host(i)
                );
                if i == 0 && locked {
                    s.push_str("locked = true\n");
                }
                s.push('\n');
            }
        }
        FileFormat::Json => {
            let _ = write!(
                s,
                "{{\"settings\": {{\"key_prefix_len\": 8, \"unknown_key\": \"drop\", \"no_key\": \"pass\", \"prefilter\": false}},\n\"listener\": [{{\"port\": {BENCH_PORT}, \"locator\": \"http-header\", \"headers\": [\"X-MBX-APIKEY\"]}}],\n\"key\": [\n"
            );
            for i in 0..n {
                let _ = writeln!(
                    s,
                    "{{\"prefix\": \"bk{i:06}\", \"allow\": [\"{}\", \"10.200.0.7\"]{}}}{}",
                    host(i),
                    if i == 0 && locked {
                        ", \"locked\": true"
                    } else {
                        ""
                    },
                    if i + 1 < n { "," } else { "" }
                );
            }
            s.push_str("]}\n");
        }
    }
    s.into_bytes()
}

fn write_policy_file(path: &Path, text: &[u8], how: FileWrite) -> Result<()> {
    match how {
        FileWrite::Rename => {
            let tmp = path.with_extension("tmp");
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text)?;
            f.sync_data()?;
            drop(f);
            fs::rename(&tmp, path)?;
        }
        FileWrite::InPlace => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)?;
            f.write_all(text)?;
            f.sync_data()?;
        }
    }
    Ok(())
}

/// A policy-file edit at one policy size.
#[derive(Clone, Debug)]
pub struct FileEdits {
    pub keys: usize,
    pub format: FileFormat,
    pub how: FileWrite,
    /// From the edit complete on disk (rename done, or the rewrite written and synced) to the
    /// next packet of the key's established connection dropped.
    pub lock: Vec<Duration>,
    /// Writing the edit (the file of `keys` keys, fsync included), median.
    pub write: Duration,
    /// Daemon CPU used per edit (lock and unlock together), mean.
    pub cpu_per_edit: f64,
    /// Daemon RSS after the edits.
    pub rss_mib: f64,
}

/// `keywall run --policy FILE` (the daemon's default 200 ms poll) enforcing [`bench_policy`]
/// of `keys` keys; `edits` times: lock `bk000000` by writing the file `how`, timed from the
/// edit complete on disk to the next packet of that key's established connection dropped
/// (BPF_PROG_TEST_RUN on the daemon's pinned program, polled every 0.2 ms), then unlock it
/// the same way, untimed, until the connection passes again. Each lock is written after a
/// pause spread over one poll period, so the edits fall at every phase of the poll. The
/// first lock is untimed.
pub fn file_lock_to_drop(
    keys: usize,
    edits: usize,
    fmt: FileFormat,
    how: FileWrite,
) -> Result<FileEdits> {
    let sb = Sandbox::new("apibf")?;
    let path = sb.tmp_dir().join(match fmt {
        FileFormat::Toml => "policy.toml",
        FileFormat::Json => "policy.json",
    });
    let open = bench_policy_file(keys, false, fmt);
    let locked = bench_policy_file(keys, true, fmt);
    fs::write(&path, &open)?;
    let cap = keys.max(1024).to_string();
    let path_arg = path.display().to_string();
    let d = ApiDaemon::start_waiting(
        &sb,
        1,
        &[
            "--max-keys",
            &cap,
            "--policy",
            &path_arg,
            "--poll-ms",
            "200",
        ],
        Duration::from_secs(600),
    )?;
    let pid = d.proc.as_ref().map(|p| p.id()).context("daemon pid")?;
    wait_idle(pid);
    let prog = Xdp::from_pin(sb.pin_dir().join("prog"), XdpAttachType::Interface)
        .context("opening the daemon's pinned program")?;
    // Each edit on a connection of its own, opened once the key passes again: a connection
    // kept for minutes of edits was forgotten by the daemon's held-connection sweep.
    let conn = |i: usize| {
        let port = 40000 + (i % 20000) as u16;
        let first = Pkt::tcp4(CLIENT, SERVER, port, BENCH_PORT)
            .payload(&http_request(
                "GET",
                "/api/v3/account",
                &[("Host", "x"), ("X-MBX-APIKEY", "bk000000-secret")],
            ))
            .build();
        let later = Pkt::tcp4(CLIENT, SERVER, port, BENCH_PORT)
            .payload(b"{\"ping\":1}")
            .build();
        (first, later)
    };
    let wait_for = |frame: &[u8], want: u32, t0: Instant, what: &str| -> Result<Duration> {
        loop {
            if run_frame(&prog, frame)? == want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "{what}: the connection's verdict did not change 120 s after the edit; log:\n{}",
                    d.log_text()
                );
            }
            // Leaves the CPU to the daemon (2 cores here): 0.2 ms resolution.
            thread::sleep(Duration::from_micros(200));
        }
    };
    let mut lock = Vec::with_capacity(edits);
    let mut writes = Vec::with_capacity(edits);
    let cpu0 = cpu_secs(pid);
    let mut unlocked = Instant::now();
    for i in 0..=edits {
        // A new connection of the key (its first packet judged by the live policy: it passes
        // once the last unlock is enforced), then its next packet.
        let (first, later) = conn(i);
        wait_for(&first, XDP_PASS, unlocked, "unlock")?;
        if run_frame(&prog, &later)? != XDP_PASS {
            bail!("the bench connection does not pass before the lock");
        }
        // The unlock was just seen, so the daemon has just polled: without a pause every
        // edit would land right after a poll and wait a whole period. A pause spread over
        // one poll period (golden-ratio steps) samples every phase, as an operator's edits
        // do.
        let phase = (i as f64 * 0.618_033_988_75).fract();
        thread::sleep(Duration::from_secs_f64(0.2 * phase));
        let tw = Instant::now();
        write_policy_file(&path, &locked, how)?;
        let t0 = Instant::now();
        let took = wait_for(&later, XDP_DROP, t0, "lock")?;
        if i > 0 {
            lock.push(took);
            writes.push(t0 - tw);
        }
        write_policy_file(&path, &open, how)?;
        unlocked = Instant::now();
    }
    wait_for(&conn(edits + 1).0, XDP_PASS, unlocked, "unlock")?;
    // The last unlock's settle.
    wait_idle(pid);
    let cpu_per_edit = (cpu_secs(pid) - cpu0) / (edits + 1) as f64;
    let rss_mib = rss_mib(pid)?;
    if std::env::var_os("KEYWALL_BENCH_LOG").is_some() {
        eprintln!("{}", d.log_text());
    }
    drop(d);
    Ok(FileEdits {
        keys,
        format: fmt,
        how,
        lock,
        write: p50_p99(writes).0,
        cpu_per_edit,
        rss_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (st, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((st, b.as_slice()), (200, &b"{}"[..]));
        let (st, b) = parse_response(
            b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((st, b.as_slice()), (409, &b"abcde"[..]));
    }

    #[test]
    fn bench_policy_is_valid() {
        let p = keywall::policy::Policy::from_json_str(&bench_policy(300, 1).to_string())
            .expect("parses");
        p.validate().expect("valid");
        assert_eq!(p.key.len(), 300);
    }

    #[test]
    fn bench_policy_files_parse() {
        for (fmt, name) in [(FileFormat::Toml, "p.toml"), (FileFormat::Json, "p.json")] {
            for locked in [false, true] {
                let text = String::from_utf8(bench_policy_file(300, locked, fmt)).unwrap();
                let p = keywall::policy::Policy::from_file_text(Path::new(name), &text)
                    .unwrap_or_else(|e| panic!("{fmt:?}: {e:?}"));
                p.validate().expect("valid");
                assert_eq!(p.key.len(), 300);
                assert_eq!(p.key[0].locked, locked);
                assert!(!p.key[1].locked);
                assert_eq!(p.revision, None);
            }
        }
    }
}
