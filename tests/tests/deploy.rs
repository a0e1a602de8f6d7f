//! Deployment: `keywall run` as an unprivileged user holding only CAP_BPF, CAP_NET_ADMIN and
//! CAP_PERFMON (what keywall.service grants), its one-line refusal when one is missing, its
//! systemd notifications and SIGHUP reload, and how it treats another XDP program already on
//! the interface. Needs root (to hand out the capabilities). The package itself is checked by
//! `cargo xtask test` (xtask/src/package.rs: dpkg -i into a bookworm root).

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::Path,
    process::{Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use tests::{
    api_bench::{call, keywall_bin, reason_packets},
    daemon::{Daemon, Launch},
    netns::Sandbox,
};

/// nobody: an unprivileged user that exists on every Debian host.
const UID: u32 = 65534;
const PORT: u16 = 8080;

const ALL: &str = "bpf,net_admin,perfmon";

/// `setpriv` arguments that make the command run as nobody with exactly `caps` (a
/// comma-separated list like "bpf,net_admin"): inheritable, ambient and bounding set.
fn as_nobody(caps: &str) -> Vec<String> {
    let plus = |list: &str| {
        let mut s = String::from("-all");
        for c in list.split(',').filter(|c| !c.is_empty()) {
            s.push_str(&format!(",+{c}"));
        }
        s
    };
    vec![
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".into(),
        format!("--inh-caps={}", plus(caps)),
        format!("--ambient-caps={}", plus(caps)),
        format!("--bounding-set={}", plus(caps)),
    ]
}

fn chown_nobody(p: &Path) -> Result<()> {
    std::os::unix::fs::chown(p, Some(UID), Some(UID))
        .with_context(|| format!("chown {}", p.display()))
}

/// A policy where the only key is allowed from an address the client does not have, with
/// the SYN prefilter on: the client's handshakes to PORT are dropped as drop_prefilter.
fn policy(revision: u64) -> String {
    format!(
        r#"revision = {revision}
[settings]
enforce = true
key_prefix_len = 8
prefilter = true

[[listener]]
port = {PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[key]]
prefix = "deploy01"
allow = ["192.0.2.7"]
"#
    )
}

/// Prepares the sandbox's dirs for nobody (as the unit's ExecStartPre and StateDirectory=
/// do for the keywall user) and starts `keywall run` as nobody with `caps`.
fn start<'a>(
    sb: &'a Sandbox,
    caps: &str,
    extra: &[&str],
    notify: Option<&Path>,
) -> Result<Daemon<'a>> {
    for d in [sb.pin_dir(), sb.state_dir(), sb.tmp_dir()] {
        chown_nobody(d)?;
    }
    let mut wrapper = vec!["setpriv".to_owned()];
    wrapper.extend(as_nobody(caps));
    let how = Launch {
        wrapper,
        env: notify
            .map(|n| ("NOTIFY_SOCKET".to_owned(), n.display().to_string()))
            .into_iter()
            .collect(),
        ..Default::default()
    };
    Daemon::spawn_with(sb, 1, extra, &how)
}

/// A keywall operator verb run as nobody with the three capabilities.
fn kw_nobody(sb: &Sandbox, args: &[&str]) -> Output {
    sb.edge_cmd("setpriv")
        .args(as_nobody(ALL))
        .arg(keywall_bin().unwrap())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running keywall")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Receives notifications until one contains `want` (5 s at most).
fn expect_notify(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = m.lines().any(|l| l == want);
            got.push(m);
            if hit {
                return got;
            }
        }
    }
    panic!("no {want} from the daemon; got {got:?}");
}

#[test]
fn runs_as_unprivileged_user_with_three_capabilities() -> Result<()> {
    let sb = Sandbox::new("cap")?;
    let file = sb.tmp_dir().join("policy.toml");
    fs::write(&file, policy(5))?;
    let notify_path = sb.tmp_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(200)))?;
    fs::set_permissions(&notify_path, fs::Permissions::from_mode(0o777))?;
    // A long poll: only SIGHUP makes the daemon see the file change below in time.
    let mut d = start(
        &sb,
        ALL,
        &["--policy", file.to_str().unwrap(), "--poll-ms", "600000"],
        Some(&notify_path),
    )?;
    d.wait_api()?;
    // Ready once attached and the policy applied.
    expect_notify(&notify, "READY=1");

    // The daemon is nobody's, and holds exactly the three capabilities.
    let status = fs::read_to_string(format!("/proc/{}/status", d.pid()))?;
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| l[k.len()..].trim().to_owned())
            .unwrap()
    };
    assert!(field("Uid:").starts_with(&UID.to_string()), "{status}");
    assert_eq!(
        field("CapEff:"),
        "000000c000001000",
        "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN only"
    );

    // It attached, applied the policy, and the operator reads work for the same user.
    let st = json_of(&kw_nobody(
        &sb,
        &[
            "status",
            "--json",
            "--pin-dir",
            sb.pin_dir().to_str().unwrap(),
            "--state-dir",
            sb.state_dir().to_str().unwrap(),
        ],
    ));
    assert_eq!(st["revision"].as_u64(), Some(5), "{st}");
    let text = st.to_string();
    assert!(
        text.contains(sb.edge_if()) && text.contains("native"),
        "{st}"
    );

    // Enforcing: the client's handshakes to the listener are dropped by the prefilter.
    let curl = sb
        .client_cmd("curl")
        .args(["-sS", "--max-time", "1", "-o", "/dev/null"])
        .arg(format!("http://{}:{PORT}/", sb.edge_v4()))
        .output()?;
    assert!(
        !curl.status.success(),
        "the handshake should have been dropped"
    );
    let stats = json_of(&kw_nobody(
        &sb,
        &[
            "stats",
            "--json",
            "--pin-dir",
            sb.pin_dir().to_str().unwrap(),
        ],
    ));
    assert!(reason_packets(&stats, "drop_prefilter") > 0, "{stats}");

    // The API answers the same user.
    let show = kw_nobody(
        &sb,
        &[
            "policy",
            "show",
            "--json",
            "--api",
            &format!("unix:{}", d.sock.display()),
        ],
    );
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("deploy01"),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );

    // SIGHUP re-reads the file at once (the poll would take ten minutes).
    fs::write(&file, policy(6))?;
    // (libc, not kill(1): a minimal Debian root has no procps.)
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    let got = expect_notify(&notify, "READY=1");
    assert!(got.iter().any(|m| m.contains("RELOADING=1")), "{got:?}");
    let (code, st) = call(&d.sock, "GET", "/v1/status", None)?;
    assert_eq!(code, 200);
    assert_eq!(st["revision"].as_u64(), Some(6), "{st}");
    Ok(())
}

#[test]
fn a_missing_capability_is_named_in_one_line() -> Result<()> {
    let sb = Sandbox::new("nocap")?;
    for (caps, missing) in [
        ("net_admin,perfmon", "CAP_BPF"),
        ("bpf,perfmon", "CAP_NET_ADMIN"),
        ("bpf,net_admin", "CAP_PERFMON"),
    ] {
        let mut d = start(&sb, caps, &[], None)?;
        let st = d.proc.take().unwrap().into_child().wait()?;
        assert_eq!(st.code(), Some(2), "without {missing}");
        let log = fs::read_to_string(&d.log)?;
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "one line without {missing}: {log}");
        assert!(
            lines[0].starts_with(&format!("keywall: missing capability {missing}:")),
            "{log}"
        );
    }
    // Nothing was attached.
    let ip = sb.exec_edge("ip", ["-d", "link", "show", "dev", sb.edge_if()])?;
    assert!(!String::from_utf8_lossy(&ip.stdout).contains("prog/xdp"));
    Ok(())
}

fn xdp_prog_names(sb: &Sandbox) -> String {
    let out = sb
        .exec_edge("ip", ["-d", "link", "show", "dev", sb.edge_if()])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_foreign_xdp_program_is_refused_unless_replace_foreign() -> Result<()> {
    let sb = Sandbox::new("fgn")?;
    // Somebody else's program on the edge interface, attached through netlink as ip(8) does.
    let pass = sb.tmp_dir().join("other.o");
    fs::write(&pass, keywall::dataplane::PASS_OBJECT)?;
    let out = sb.exec_edge(
        "ip",
        [
            "link",
            "set",
            "dev",
            sb.edge_if(),
            "xdpgeneric",
            "obj",
            pass.to_str().unwrap(),
            "sec",
            "xdp",
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut d = start(&sb, ALL, &[], None)?;
    let st = d.proc.take().unwrap().into_child().wait()?;
    assert_eq!(st.code(), Some(2));
    let log = fs::read_to_string(&d.log)?;
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.contains("already runs XDP program")
            && log.contains("skb mode")
            && log.contains("attached through netlink")
            && log.contains("--replace-foreign"),
        "{log}"
    );
    assert!(xdp_prog_names(&sb).contains("xdpgeneric"), "left alone");
    drop(d);

    let mut d = start(&sb, ALL, &["--replace-foreign"], None)?;
    d.wait_api()?;
    let links = xdp_prog_names(&sb);
    assert!(
        links.contains("name keywall ") && !links.contains("xdpgeneric"),
        "{links}"
    );
    drop(d);

    // A second keywall (another pin dir) over this one's link is foreign too.
    // (bpffs refuses dots in names.)
    let other_pins = sb.pin_dir().with_file_name(format!(
        "{}-second",
        sb.pin_dir().file_name().unwrap().to_string_lossy()
    ));
    fs::create_dir_all(&other_pins)?;
    let out = sb
        .edge_cmd(keywall_bin()?)
        .args(["run", "--iface", sb.edge_if(), "--metrics", "off"])
        .arg("--pin-dir")
        .arg(&other_pins)
        .arg("--state-dir")
        .arg(sb.tmp_dir().join("state-second"))
        .arg("--api")
        .arg(format!(
            "unix:{}",
            sb.tmp_dir().join("second.sock").display()
        ))
        .output()?;
    fs::remove_dir_all(&other_pins).ok();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bpf_link") && err.contains("not this keywall's"),
        "{err}"
    );
    Ok(())
}

/// Why keywall cannot simply take the other XDP mode beside another program: the kernel
/// refuses a native program while a generic one is attached (and the reverse). This test
/// checks that fact on the running kernel; README "Beside other XDP programs" relies on it.
#[test]
fn native_and_generic_xdp_cannot_share_an_interface() -> Result<()> {
    let sb = Sandbox::new("mode")?;
    let pass = sb.tmp_dir().join("other.o");
    fs::write(&pass, keywall::dataplane::PASS_OBJECT)?;
    let attach = |mode: &str| {
        sb.exec_edge(
            "ip",
            [
                "link",
                "set",
                "dev",
                sb.edge_if(),
                mode,
                "obj",
                pass.to_str().unwrap(),
                "sec",
                "xdp",
            ],
        )
        .unwrap()
    };
    assert!(attach("xdpgeneric").status.success());
    let second = attach("xdpdrv");
    assert!(
        !second.status.success(),
        "the kernel now allows native beside generic"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("can't be active at the same time"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    Ok(())
}

/// One HTTP GET from the client namespace: Some(status) or None when it got no answer.
fn get(sb: &Sandbox, port: u16, key: Option<&str>) -> Option<u16> {
    let mut c = sb.client_cmd("curl");
    c.args([
        "-sS",
        "--max-time",
        "2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ]);
    if let Some(k) = key {
        c.args(["-H", &format!("X-MBX-APIKEY: {k}")]);
    }
    let out = c
        .arg(format!("http://{}:{port}/", sb.edge_v4()))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|&s| s != 0)
}

/// keywall and xdp-filter (xdp-tools) on one interface: keywall is attached, xdp-filter's
/// program sits in keywall's chaining slot and judges what keywall passes. Each one's
/// verdicts take effect: keywall drops the unknown key, xdp-filter the port it denies.
#[test]
fn keywall_and_xdp_filter_share_an_interface_through_the_chaining_slot() -> Result<()> {
    let sb = Sandbox::new("chain")?;
    let file = sb.tmp_dir().join("policy.toml");
    fs::write(
        &file,
        format!(
            r#"[settings]
key_prefix_len = 8
unknown_key = "drop"
prefilter = false

[[listener]]
port = {PORT}
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[key]]
prefix = "goodkey1"
allow = ["{}/32"]
"#,
            sb.client_v4()
        ),
    )?;
    let _d = Daemon::start(&sb, 0, &["--policy", file.to_str().unwrap()])?;
    let _web = sb.spawn_http_server_edge(PORT)?;
    let _other = sb.spawn_http_server_edge(7777)?;
    thread::sleep(Duration::from_millis(300));
    let pins = sb.pin_dir().to_str().unwrap().to_owned();
    let kwc = |args: &[&str]| {
        let out = sb
            .edge_cmd(keywall_bin().unwrap())
            .arg("chain")
            .args(args)
            .args(["--pin-dir", &pins])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keywall chain {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // xdp-filter, loaded by its own tool onto a spare device (its program and maps pinned
    // under /sys/fs/bpf/xdp-filter), denying TCP port 7777.
    let dummy = format!(
        "kwd{}",
        &sb.edge_if()[sb.edge_if().len().saturating_sub(8)..]
    );
    let sh = |args: &[&str]| {
        let out = sb.exec_edge(args[0], &args[1..]).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // (This kernel has no dummy driver: a veth pair inside the edge namespace does.)
    let peer = format!("kwp{}", &dummy[3..]);
    sh(&[
        "ip", "link", "add", &dummy, "type", "veth", "peer", "name", &peer,
    ]);
    sh(&["xdp-filter", "load", "-m", "skb", &dummy]);
    let result = (|| -> Result<()> {
        sh(&["xdp-filter", "port", "-p", "tcp", "7777"]);
        let progs = Path::new("/sys/fs/bpf/xdp-filter/programs").join(&dummy);
        let prog = fs::read_dir(&progs)?
            .next()
            .context("xdp-filter pinned no program")??
            .path();

        // Before chaining, only keywall judges: 7777 answers.
        assert_eq!(get(&sb, 7777, None), Some(200));
        let said = kwc(&["--prog", prog.to_str().unwrap()]);
        assert!(said.contains("chained xdpfilt_"), "{said}");

        // Both take effect.
        assert_eq!(
            get(&sb, PORT, Some("goodkey1-secret")),
            Some(200),
            "both pass it"
        );
        assert_eq!(
            get(&sb, PORT, Some("unknown1-secret")),
            None,
            "keywall drops it"
        );
        assert_eq!(get(&sb, 7777, None), None, "xdp-filter drops it");
        let stats = tests::api_bench::kw(&sb, &["stats", "--json", "--pin-dir", &pins]);
        let stats: Value = serde_json::from_slice(&stats.stdout)?;
        assert!(reason_packets(&stats, "drop_unknown_key") > 0, "{stats}");

        // Emptied, keywall's pass is final again.
        kwc(&["--clear"]);
        assert_eq!(get(&sb, 7777, None), Some(200));
        Ok(())
    })();
    let _ = sb.exec_edge("xdp-filter", ["unload", dummy.as_str()]);
    result
}

/// Moving a host from a daemon run as root to the unit: the unit's `keywall prepare` gives
/// the root-owned pins to the daemon's user, and the unprivileged daemon takes the pinned link
/// over without a gap.
#[test]
fn the_unprivileged_daemon_takes_over_from_a_root_run_one() -> Result<()> {
    let sb = Sandbox::new("upg")?;
    let mut root_run = Daemon::start(&sb, 0, &[])?;
    root_run.stop()?;
    let out = sb
        .edge_cmd(keywall_bin()?)
        .arg("prepare")
        .arg("--pin-dir")
        .arg(sb.pin_dir())
        .args(["--owner", "nobody"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_file(sb.tmp_dir().join("api-0.sock")).ok();
    let mut d = start(&sb, ALL, &[], None)?;
    d.wait_api()?;
    let log = fs::read_to_string(&d.log)?;
    assert!(log.contains("took over the pinned link"), "{log}");
    Ok(())
}
