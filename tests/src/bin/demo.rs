//! `keywall-demo`: keywall on a throw-away pair of network namespaces, with real clients and
//! real servers. `cargo xtask demo` builds and runs it.
//!
//! It attaches `keywall run` to the edge veth, sends allowed and blocked clients over three
//! listeners (HTTP header, TLS SNI, FIX Logon) from the client namespace, prints a table of what
//! passed and what was dropped and why, switches the policy to `action = "reset"` and shows a
//! refused client getting a reset at once, then prints `keywall stats`. Everything is removed
//! at the end, on errors and on Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use tests::{
    daemon::{Daemon, Launch},
    netns::{Sandbox, ServerKind},
};

#[derive(Parser)]
#[command(
    name = "keywall-demo",
    about = "keywall end to end, in network namespaces"
)]
struct Args {
    /// The `keywall` binary.
    #[arg(long)]
    keywall: PathBuf,
    /// The HTTP API port the filter guards (TLS-SNI is on 8443, FIX on 9878).
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

const TLS_PORT: u16 = 8443;
const FIX_PORT: u16 = 9878;

/// Full API keys: the filter looks at the first 8 bytes (`key_prefix_len`). Lower case, as
/// they also travel in DNS names (k-<key>.api.test), which are case-insensitive.
const DEMO_KEY: &str = "demokey1qz7vxw0ajt3rklmn";
const LOCK_KEY: &str = "lockkey1p9hc2fsyde5ubnva";
const OTHR_KEY: &str = "othrkey1t4gwq8zxce6lrpos";
const UNKNOWN_KEY: &str = "unkn0wnka1b2c3d4e5f6g7h8";

/// How long a blocked request waits before the client gives up (a drop is silent).
const DROP_WAIT_SECS: &str = "2";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Drop,
}

/// How a client carries its key.
#[derive(Clone, Copy)]
enum Via {
    /// curl, with the key in this HTTP header.
    Http(&'static str),
    /// curl over TLS to `k-<key>.api.test` (the key in the SNI).
    TlsSni,
    /// A simplefix Logon with the key in tag 553 (Username).
    Fix,
}

struct Case {
    client: &'static str,
    src: IpAddr,
    via: Via,
    key: Option<&'static str>,
    expect: Outcome,
    /// The reason keywall should count it under.
    reason: &'static str,
}

struct Got {
    outcome: Option<Outcome>,
    text: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\ndemo: FAILED: some requests did not get their expected outcome");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("\ndemo: FAILED: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Cleans the sandbox up when `run` returns or unwinds.
struct CleanupGuard(Arc<Sandbox>);

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        println!(
            "\n==> cleaning up (namespaces {} / {})",
            self.0.edge_ns(),
            self.0.client_ns()
        );
        self.0.cleanup();
    }
}

fn run(args: &Args) -> Result<bool> {
    let keywall = fs::canonicalize(&args.keywall)
        .with_context(|| format!("keywall binary {}", args.keywall.display()))?;
    let port = args.port;

    println!("==> creating the sandbox");
    let sb = Arc::new(Sandbox::new("demo")?);
    let _guard = CleanupGuard(sb.clone());
    {
        let sb = sb.clone();
        ctrlc::set_handler(move || {
            eprintln!("\ninterrupted: cleaning up");
            sb.cleanup();
            std::process::exit(130);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let clients = Clients {
        v4: sb.client_v4().into(),
        v6: sb.client_v6().into(),
        second_v4: sb.add_client_v4()?.into(),
        second_v6: sb.add_client_v6()?.into(),
        stranger_v4: sb.add_client_v4()?.into(),
    };
    println!(
        "edge {} ({}, {}, XDP on {}) <-veth-> client {} ({}, {}; also {}, {}, {})",
        sb.edge_ns(),
        sb.edge_v4(),
        sb.edge_v6(),
        sb.edge_if(),
        sb.client_ns(),
        clients.v4,
        clients.v6,
        clients.second_v4,
        clients.second_v6,
        clients.stranger_v4
    );

    let policy_path = sb.tmp_dir().join("policy.toml");
    let policy = policy_toml(&clients, port, "drop");
    fs::write(&policy_path, &policy)?;
    println!(
        "\n==> policy ({})\n{}",
        policy_path.display(),
        policy.trim_end()
    );

    println!(
        "\n==> starting servers in the edge namespace: HTTP on {port}, HTTPS (*.api.test) on \
         {TLS_PORT}, a FIX acceptor on {FIX_PORT}"
    );
    let _http = sb.spawn_http_server_edge(port)?;
    let _https = sb.spawn_server_edge(TLS_PORT, ServerKind::Https)?;
    let _fix = sb.spawn_fix_acceptor_edge(FIX_PORT)?;

    println!("\n==> starting keywall run on {}", sb.edge_if());
    let policy_arg = policy_path.display().to_string();
    let mut daemon = Daemon::spawn_with(
        &sb,
        0,
        &["--policy", &policy_arg],
        &Launch {
            bin: Some(keywall.clone()),
            ..Default::default()
        },
    )?;
    println!("+ {}", daemon.cmdline);
    let result = wait_attached(&mut daemon).and_then(|()| {
        let mut ok = exercise(&sb, port, &clients)?;
        ok &= show_reset(&sb, &keywall, port, &clients, &policy_path)?;
        ok &= show_stats(&sb, &keywall, &clients)?;
        Ok(ok)
    });

    println!("\n==> stopping keywall");
    if let Err(e) = daemon.stop() {
        println!("stopping keywall: {e:#}");
    }
    if result.is_err() {
        println!(
            "--- keywall log (last lines) ---\n{}\n---",
            daemon.log_tail(40)
        );
    }
    result
}

/// The client namespace's source addresses.
struct Clients {
    v4: IpAddr,
    v6: IpAddr,
    second_v4: IpAddr,
    second_v6: IpAddr,
    /// An address no key allows: the prefilter drops its handshakes.
    stranger_v4: IpAddr,
}

fn policy_toml(c: &Clients, port: u16, action: &str) -> String {
    let mut p = String::new();
    let _ = write!(
        p,
        r#"# keywall demo policy
[settings]
enforce = true
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"        # keyless (public) requests pass, from sources some key allows
unbound_keys = "drop"
prefilter = true       # handshakes from sources that no key allows are dropped
action = "{action}"       # drop | reset (drop, and answer the client with a TCP RST)

[[listener]]
port = {port}
locator = "http-header"
headers = ["X-MBX-APIKEY", "OK-ACCESS-KEY"]

[[listener]]
port = {TLS_PORT}
locator = "tls-sni"    # the key is in the hostname: k-<key>.api.test
sni_suffix = ".api.test"
label_prefix = "k-"

[[listener]]
port = {FIX_PORT}
locator = "fix"        # the key is the Logon's Username (tag 553)
fix_tag = 553

[[key]]
prefix = "{demo}"
allow = ["{cv4}", "{cv6}"]

[[key]]
prefix = "{lock}"
allow = ["{cv4}", "{cv6}"]
locked = true

[[key]]
prefix = "{othr}"
allow = ["{sv4}", "{sv6}"]
"#,
        demo = &DEMO_KEY[..8],
        lock = &LOCK_KEY[..8],
        othr = &OTHR_KEY[..8],
        cv4 = c.v4,
        cv6 = c.v6,
        sv4 = c.second_v4,
        sv6 = c.second_v6,
    );
    p
}

/// Waits (10 s at most) until XDP is attached to the edge veth.
fn wait_attached(daemon: &mut Daemon) -> Result<()> {
    let sb = daemon.sb;
    daemon.wait_for(
        Duration::from_secs(10),
        "XDP on the edge veth",
        || match sb.xdp_attached() {
            Ok(true) => Ok(()),
            Ok(false) => Err("not attached".into()),
            Err(e) => Err(format!("{e:#}")),
        },
    )?;
    println!("XDP attached to {}", sb.edge_if());
    Ok(())
}

fn edge_for(sb: &Sandbox, src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => sb.edge_v4().into(),
        IpAddr::V6(_) => sb.edge_v6().into(),
    }
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn request(sb: &Sandbox, case: &Case, port: u16) -> Result<Got> {
    let edge = edge_for(sb, case.src);
    if let Via::Fix = case.via {
        let line = sb.client_tool([
            "fix".to_string(),
            case.src.to_string(),
            edge.to_string(),
            FIX_PORT.to_string(),
            "FIX.4.4".into(),
            "553".into(),
            case.key.unwrap_or("").into(),
            DROP_WAIT_SECS.into(),
        ])?;
        return Ok(match line.split_whitespace().next() {
            Some("LOGON") => Got {
                outcome: Some(Outcome::Pass),
                text: "passed (Logon answered)".into(),
            },
            Some("TIMEOUT") => Got {
                outcome: Some(Outcome::Drop),
                text: "dropped (no answer)".into(),
            },
            _ => Got {
                outcome: None,
                text: line,
            },
        });
    }
    let mut args = vec![
        "--max-time".to_string(),
        DROP_WAIT_SECS.into(),
        "--interface".into(),
        case.src.to_string(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
    ];
    match (case.via, case.key) {
        (Via::Http(header), key) => {
            if let Some(k) = key {
                args.push("-H".into());
                args.push(format!("{header}: {k}"));
            }
            args.push(format!("http://{}/api/v3/account", host_port(edge, port)));
        }
        (Via::TlsSni, Some(k)) => {
            // A verified TLS connection to k-<key>.api.test, resolved to the edge.
            let host = format!("k-{k}.api.test");
            let (cert, _) = sb.tls_cert()?;
            args.push("--cacert".into());
            args.push(cert.display().to_string());
            args.push("--resolve".into());
            args.push(host_port_resolve(&host, edge));
            args.push(format!("https://{host}:{TLS_PORT}/"));
        }
        (Via::TlsSni, None) => {
            // To the address: curl sends no SNI.
            args.push("-k".into());
            args.push(format!("https://{}/", host_port(edge, TLS_PORT)));
        }
        (Via::Fix, _) => unreachable!("handled above"),
    }
    let (rc, out) = sb.curl_from_client(&args)?;
    Ok(match (rc, out.trim()) {
        (0, "200") => Got {
            outcome: Some(Outcome::Pass),
            text: "passed (HTTP 200)".into(),
        },
        (28, _) => Got {
            outcome: Some(Outcome::Drop),
            text: "dropped (no answer)".into(),
        },
        (rc, code) => Got {
            outcome: None,
            text: format!("curl exit {rc}, HTTP {code}"),
        },
    })
}

/// `HOST:PORT:ADDR` for curl's `--resolve` (IPv6 addresses in brackets).
fn host_port_resolve(host: &str, edge: IpAddr) -> String {
    match edge {
        IpAddr::V4(a) => format!("{host}:{TLS_PORT}:{a}"),
        IpAddr::V6(a) => format!("{host}:{TLS_PORT}:[{a}]"),
    }
}

fn cases(c: &Clients) -> Vec<Case> {
    use Outcome::*;
    let case = |client, src, via, key, expect, reason| Case {
        client,
        src,
        via,
        key,
        expect,
        reason,
    };
    let x = Via::Http("X-MBX-APIKEY");
    let ok = Via::Http("OK-ACCESS-KEY");
    vec![
        // HTTP header
        case("client", c.v4, x, Some(DEMO_KEY), Pass, "pass_allowed"),
        case("client", c.v6, ok, Some(DEMO_KEY), Pass, "pass_allowed"),
        case(
            "second",
            c.second_v4,
            x,
            Some(DEMO_KEY),
            Drop,
            "drop_not_allowed",
        ),
        case(
            "second",
            c.second_v6,
            x,
            Some(DEMO_KEY),
            Drop,
            "drop_not_allowed",
        ),
        case(
            "second",
            c.second_v4,
            ok,
            Some(OTHR_KEY),
            Pass,
            "pass_allowed",
        ),
        case("client", c.v4, x, Some(LOCK_KEY), Drop, "drop_locked"),
        case(
            "client",
            c.v4,
            x,
            Some(UNKNOWN_KEY),
            Drop,
            "drop_unknown_key",
        ),
        case("client", c.v4, x, None, Pass, "pass_no_key"),
        case("stranger", c.stranger_v4, x, None, Drop, "drop_prefilter"),
        // TLS SNI
        case(
            "client",
            c.v4,
            Via::TlsSni,
            Some(DEMO_KEY),
            Pass,
            "pass_allowed",
        ),
        case(
            "client",
            c.v6,
            Via::TlsSni,
            Some(DEMO_KEY),
            Pass,
            "pass_allowed",
        ),
        case(
            "second",
            c.second_v4,
            Via::TlsSni,
            Some(DEMO_KEY),
            Drop,
            "drop_not_allowed",
        ),
        case(
            "second",
            c.second_v6,
            Via::TlsSni,
            Some(OTHR_KEY),
            Pass,
            "pass_allowed",
        ),
        case(
            "client",
            c.v6,
            Via::TlsSni,
            Some(LOCK_KEY),
            Drop,
            "drop_locked",
        ),
        case("client", c.v4, Via::TlsSni, None, Pass, "pass_no_key"),
        // FIX Logon
        case(
            "client",
            c.v4,
            Via::Fix,
            Some(DEMO_KEY),
            Pass,
            "pass_allowed",
        ),
        case(
            "second",
            c.second_v6,
            Via::Fix,
            Some(DEMO_KEY),
            Drop,
            "drop_not_allowed",
        ),
        case(
            "second",
            c.second_v4,
            Via::Fix,
            Some(OTHR_KEY),
            Pass,
            "pass_allowed",
        ),
        case(
            "client",
            c.v6,
            Via::Fix,
            Some(UNKNOWN_KEY),
            Drop,
            "drop_unknown_key",
        ),
    ]
}

fn exercise(sb: &Sandbox, port: u16, clients: &Clients) -> Result<bool> {
    let cases = cases(clients);

    // The daemon may attach a moment before the policy is in: wait for the first allowed pass.
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(sb, &cases[0], port)?.outcome != Some(Outcome::Pass) {
        if Instant::now() > deadline {
            bail!("the allowed request never passed within 10 s of attaching");
        }
        thread::sleep(Duration::from_millis(200));
    }

    println!("\n==> clients in the client namespace (blocked ones wait {DROP_WAIT_SECS} s)");
    let got: Vec<Result<Got>> = thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|c| s.spawn(move || request(sb, c, port)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread panicked"))
            .collect()
    });

    let mut ok = true;
    println!(
        "\n{:<14} {:<9} {:<26} {:<28} {:<26} {:<24}",
        "listener", "client", "source", "key (carried in)", "expected", "got"
    );
    for (c, g) in cases.iter().zip(got) {
        let g = g?;
        let good = g.outcome == Some(c.expect);
        ok &= good;
        let (listener, carrier) = match c.via {
            Via::Http(h) => (format!("http {port}"), h),
            Via::TlsSni => (format!("tls-sni {TLS_PORT}"), "SNI"),
            Via::Fix => (format!("fix {FIX_PORT}"), "tag 553"),
        };
        let key = match c.key {
            Some(k) => format!("{}… ({carrier})", &k[..8]),
            None => "(none)".into(),
        };
        let expected = match c.expect {
            Outcome::Pass => format!("pass ({})", c.reason),
            Outcome::Drop => format!("drop ({})", c.reason),
        };
        println!(
            "{:<14} {:<9} {:<26} {:<28} {:<26} {:<24} {}",
            listener,
            c.client,
            c.src.to_string(),
            key,
            expected,
            g.text,
            if good { "ok" } else { "UNEXPECTED" }
        );
    }
    Ok(ok)
}

/// `keywall status --json`'s policy generation (bumped by every applied policy).
fn generation(sb: &Sandbox, keywall: &Path) -> Option<u64> {
    let out = sb
        .edge_cmd(keywall)
        .arg("status")
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .arg("--state-dir")
        .arg(sb.state_dir())
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["generation"].as_u64()
}

/// Switches the policy to `action = "reset"` and shows a refused client getting a TCP RST.
fn show_reset(
    sb: &Sandbox,
    keywall: &Path,
    port: u16,
    clients: &Clients,
    policy_path: &Path,
) -> Result<bool> {
    println!("\n==> the same policy with action = \"reset\" (the daemon reloads the file)");
    let before = generation(sb, keywall).context("reading the policy generation")?;
    fs::write(policy_path, policy_toml(clients, port, "reset"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(sb, keywall).is_none_or(|g| g <= before) {
        if Instant::now() > deadline {
            bail!("keywall did not apply the reset policy within 10 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let src = clients.second_v4;
    let line = sb.client_tool([
        "reset".to_string(),
        src.to_string(),
        edge_for(sb, src).to_string(),
        port.to_string(),
        "X-MBX-APIKEY".into(),
        DEMO_KEY.into(),
        DROP_WAIT_SECS.into(),
    ])?;
    let mut words = line.split_whitespace();
    let (got, ok) = match (words.next(), words.next()) {
        (Some("RESET"), Some(ms)) => (format!("reset after {ms} ms"), true),
        _ => (line.clone(), false),
    };
    println!(
        "\n{:<14} {:<9} {:<26} {:<28} {:<26} {:<24}",
        "listener", "client", "source", "key (carried in)", "expected", "got"
    );
    println!(
        "{:<14} {:<9} {:<26} {:<28} {:<26} {:<24} {}",
        format!("http {port}"),
        "second",
        src.to_string(),
        format!("{}… (X-MBX-APIKEY)", &DEMO_KEY[..8]),
        "reset (drop_not_allowed)",
        got,
        if ok { "ok" } else { "UNEXPECTED" }
    );
    Ok(ok)
}

fn show_stats(sb: &Sandbox, keywall: &Path, clients: &Clients) -> Result<bool> {
    let mut ok = true;
    println!("\n==> keywall stats --pin-dir {}", sb.pin_dir().display());
    let out = std::process::Command::new(keywall)
        .arg("stats")
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .output()
        .context("running keywall stats")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        println!("keywall stats failed ({})", out.status);
        ok = false;
    }

    // Every reason the table promised must have been counted.
    let out = std::process::Command::new(keywall)
        .arg("stats")
        .arg("--json")
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .output()
        .context("running keywall stats --json")?;
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) => {
            let mut reasons: Vec<&str> = cases(clients).iter().map(|c| c.reason).collect();
            reasons.sort();
            reasons.dedup();
            for r in reasons {
                let n = v["reasons"][r]["packets"].as_u64().unwrap_or(0);
                if n == 0 {
                    println!(
                        "keywall stats --json: {r} counted nothing, but a client above expected it"
                    );
                    ok = false;
                }
            }
        }
        Err(e) => {
            println!("keywall stats --json: not JSON ({e})");
            ok = false;
        }
    }
    if ok {
        println!("\ndemo: every client got its expected outcome");
    }
    Ok(ok)
}
