//! `cargo xtask package`: keywall_<version>_amd64.deb with dpkg-deb, and the check that
//! installs it into a throw-away Debian 12 root (`cargo xtask test` runs it).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::{Ctx, step};

pub const UNIT: &str = r#"[Unit]
Description=keywall: per-API-key source allowlists and locks, enforced in XDP
Documentation=man:keywall(8) man:keywall-run(8)
# Up before the network is configured, so API traffic is never unfiltered at boot. An
# interface that appears later (a bond, a VLAN) needs a drop-in with
# After=sys-subsystem-net-devices-IFNAME.device and BindsTo= the same; until then a start
# that finds no interface fails and is retried (Restart=).
Wants=network-pre.target
Before=network-pre.target

[Service]
Type=notify
NotifyAccess=main
# KEYWALL_OPTS: the interfaces and the policy source (see /etc/default/keywall).
Environment=KEYWALL_OPTS=
EnvironmentFile=-/etc/default/keywall
# The one privileged step ("+"): mount bpffs if the host has not, and give the pin dir to
# the keywall user. The daemon itself runs unprivileged.
ExecStartPre=+/usr/sbin/keywall prepare --pin-dir /sys/fs/bpf/keywall --owner keywall
ExecStart=/usr/sbin/keywall run --pin-dir /sys/fs/bpf/keywall --state-dir /var/lib/keywall --api unix:/run/keywall/api.sock $KEYWALL_OPTS
# SIGHUP reads the policy file again at once (it is also re-read when it changes).
ExecReload=/bin/sh -c "kill -HUP ${MAINPID}"
# Stopping leaves the XDP program attached and enforcing; the next start takes it over.
Restart=on-failure
RestartSec=2s
# Restoring a 1M-key policy before the attach takes a few seconds.
TimeoutStartSec=120s

User=keywall
Group=keywall
# CAP_BPF: load the program and its maps, pin them, read them back.
# CAP_NET_ADMIN: attach XDP to the interfaces.
# CAP_PERFMON: without it the verifier applies its rules for untrusted loaders and refuses
# the program ("pointer -= pointer prohibited": the packet walks subtract packet pointers).
AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON
NoNewPrivileges=yes
ProtectSystem=strict
StateDirectory=keywall
StateDirectoryMode=0700
RuntimeDirectory=keywall
RuntimeDirectoryMode=0700
ReadWritePaths=/var/lib/keywall /run/keywall /sys/fs/bpf/keywall
# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup).
LimitMEMLOCK=infinity
UMask=0077
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"#;

const DEFAULTS: &str = r#"# Options for `keywall run` under keywall.service (see keywall-run(8)).
# Name every interface to filter, and one policy source: the file below (the default here),
# the API (leave out --policy), or etcd (--etcd URL,... --etcd-prefix P).
KEYWALL_OPTS="--iface eth0 --policy /etc/keywall/policy.toml"
"#;

/// The example policy: valid, and safe on any host (audit mode drops nothing).
pub const EXAMPLE_POLICY: &str = r#"# keywall policy (see keywall(8) and the README's policy reference).
#
# This example is in AUDIT mode: `enforce = false` counts what would be dropped, as
# `observed`, and drops nothing. Put your listeners and keys here, run
# `keywall policy check /etc/keywall/policy.toml`, then watch `keywall stats --by reason`
# for a while before you set `enforce = true` and reload (`systemctl reload keywall`).

[settings]
enforce = false
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = false
action = "drop"

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY", "OK-ACCESS-KEY"]

[[key]]
prefix = "00000000"
allow = ["192.0.2.1"]
"#;

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd keywall >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/keywall --no-create-home \
            --shell /usr/sbin/nologin --comment "keywall XDP filter" keywall
    fi
    # The daemon reads its policy; only root writes it.
    chgrp keywall /etc/keywall /etc/keywall/policy.toml
    chmod 0750 /etc/keywall
    chmod 0640 /etc/keywall/policy.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade restarts a running daemon: the old one exits with the program still
        # attached and enforcing, the new one takes the pinned link over (no gap).
        if [ -n "$2" ]; then
            systemctl try-restart keywall.service || true
        fi
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop keywall.service || true
    fi
    # Removing the package removes the filter: nothing would be left to manage it.
    if [ -d /sys/fs/bpf/keywall ]; then
        /usr/sbin/keywall detach --all --pin-dir /sys/fs/bpf/keywall || true
    fi
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/lib/keywall
    # The keywall user stays (Debian does not reuse system uids of purged packages' files).
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
"#;

/// Files the package installs (besides completions and man pages).
pub const FILES: &[&str] = &[
    "usr/sbin/keywall",
    "lib/systemd/system/keywall.service",
    "etc/keywall/policy.toml",
    "etc/default/keywall",
    "usr/share/bash-completion/completions/keywall",
    "usr/share/zsh/vendor-completions/_keywall",
    "usr/share/fish/vendor_completions.d/keywall.fish",
    "usr/share/man/man8/keywall.8.gz",
    "usr/share/man/man8/keywall-run.8.gz",
];

/// Builds the release binary.
pub fn build(ctx: &Ctx) -> Result<()> {
    step("package: cargo build --release -p filter-user");
    ctx.cargo(&["build", "--release", "-p", "filter-user"])
}

/// Builds the .deb around `bin` (the test check packages the debug build it already has).
pub fn build_from(ctx: &Ctx, bin: &Path) -> Result<PathBuf> {
    let target = ctx.target_dir()?;
    let out = ctx
        .output(bin.to_str().context("utf-8 path")?, &["--version"])
        .context("keywall --version")?;
    let version = out
        .split_whitespace()
        .nth(1)
        .context("keywall --version prints no version")?
        .to_owned();
    let name = format!("keywall_{version}_amd64");
    let dir = target.join("debian");
    let stage = dir.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    step(&format!("package: staging {}", stage.display()));
    let put = |rel: &str, content: &[u8], mode: u32| -> Result<()> {
        let p = stage.join(rel);
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    put("usr/sbin/keywall", &fs::read(bin)?, 0o755)?;
    put("lib/systemd/system/keywall.service", UNIT.as_bytes(), 0o644)?;
    put("etc/keywall/policy.toml", EXAMPLE_POLICY.as_bytes(), 0o640)?;
    put("etc/default/keywall", DEFAULTS.as_bytes(), 0o644)?;

    // Completions and man pages, generated from clap by the binary itself.
    let assets = dir.join("assets");
    if assets.exists() {
        fs::remove_dir_all(&assets)?;
    }
    let mut c = ctx.command(bin);
    c.arg("assets").arg(&assets);
    ctx.run(c)?;
    let comp = assets.join("completions");
    put(
        "usr/share/bash-completion/completions/keywall",
        &fs::read(comp.join("keywall.bash"))?,
        0o644,
    )?;
    put(
        "usr/share/zsh/vendor-completions/_keywall",
        &fs::read(comp.join("_keywall"))?,
        0o644,
    )?;
    put(
        "usr/share/fish/vendor_completions.d/keywall.fish",
        &fs::read(comp.join("keywall.fish"))?,
        0o644,
    )?;
    let man8 = stage.join("usr/share/man/man8");
    fs::create_dir_all(&man8)?;
    for e in fs::read_dir(assets.join("man"))? {
        let e = e?;
        let dst = man8.join(e.file_name());
        fs::copy(e.path(), &dst)?;
        let mut gz = ctx.command("gzip");
        gz.args(["-9n"]).arg(&dst);
        ctx.run(gz)?;
    }
    put(
        "usr/share/doc/keywall/copyright",
        b"keywall\nLicense: MIT OR Apache-2.0\n",
        0o644,
    )?;

    let size_kb = dir_size(&stage)? / 1024;
    let control = format!(
        "Package: keywall\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: keywall developers <keywall@localhost>\n\
         Section: net\n\
         Priority: optional\n\
         Depends: libc6 (>= 2.36), libgcc-s1, passwd\n\
         Installed-Size: {size_kb}\n\
         Description: per-API-key source allowlists and locks, enforced in XDP\n \
         keywall drops exchange API traffic in XDP by API key and source address.\n \
         The daemon runs as the unprivileged user keywall with CAP_BPF,\n \
         CAP_NET_ADMIN and CAP_PERFMON (keywall.service).\n"
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    put(
        "DEBIAN/conffiles",
        b"/etc/keywall/policy.toml\n/etc/default/keywall\n",
        0o644,
    )?;
    put("DEBIAN/postinst", POSTINST.as_bytes(), 0o755)?;
    put("DEBIAN/prerm", PRERM.as_bytes(), 0o755)?;
    put("DEBIAN/postrm", POSTRM.as_bytes(), 0o755)?;

    let deb = dir.join(format!("{name}.deb"));
    // xz for what ships; a debug build (160 MB, packaged only to be checked) gets fast gzip.
    let compress: &[&str] = if bin.components().any(|c| c.as_os_str() == "debug") {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz"]
    };
    let mut c = ctx.command("dpkg-deb");
    c.arg("--root-owner-group")
        .args(compress)
        .arg("--build")
        .arg(&stage)
        .arg(&deb);
    ctx.run(c)?;
    Ok(deb)
}

fn dir_size(p: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}

/// The package check: builds the .deb around `bin`, installs it with dpkg into a throw-away
/// bookworm root with systemd (cached under target/fresh, as `xtask fresh` does), and checks the files, the conffiles, the
/// keywall user, the unit (`systemd-analyze verify`), that the installed binary runs, and
/// that a purge removes it.
pub fn check(ctx: &Ctx, bin: &Path) -> Result<()> {
    step("package check: build the .deb");
    let deb = build_from(ctx, bin)?;
    let base = ctx.target_dir()?.join("fresh");
    fs::create_dir_all(&base)?;
    let tarball = base.join("bookworm-systemd.tar");
    super::fresh::make_tarball(ctx, &tarball, &["systemd"])?;
    let root = ctx.target_dir()?.join("debian/check-root");
    super::fresh::remove_root(&root)?;
    fs::create_dir_all(&root)?;
    let mut tar = ctx.command("tar");
    tar.arg("-C").arg(&root).arg("-xf").arg(&tarball);
    ctx.run(tar)?;
    let res = check_in(ctx, &deb, &root);
    super::fresh::remove_root(&root)?;
    res?;
    step("package check: passed");
    Ok(())
}

fn check_in(ctx: &Ctx, deb: &Path, root: &Path) -> Result<()> {
    fs::copy(deb, root.join("tmp/keywall.deb"))?;
    let chroot = |args: &[&str]| -> Result<String> {
        let out = ctx
            .command("chroot")
            .arg(root)
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()?;
        if !out.status.success() {
            bail!(
                "`chroot {} {}` failed: {}{}",
                root.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    step("package check: dpkg -i into a bookworm root");
    print!("{}", chroot(&["dpkg", "-i", "/tmp/keywall.deb"])?);
    for f in FILES {
        if !root.join(f).is_file() {
            bail!("the package did not install /{f}");
        }
    }
    let listed = chroot(&["dpkg", "-L", "keywall"])?;
    for f in FILES {
        if !listed.lines().any(|l| l == format!("/{f}")) {
            bail!("dpkg -L keywall does not list /{f}");
        }
    }
    let conf = chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "keywall"])?;
    if !conf.contains("/etc/keywall/policy.toml") {
        bail!("/etc/keywall/policy.toml is not a conffile: {conf}");
    }
    let pw = chroot(&["getent", "passwd", "keywall"])?;
    let f: Vec<&str> = pw.trim().split(':').collect();
    let uid: u32 = f.get(2).and_then(|u| u.parse().ok()).unwrap_or(0);
    if uid == 0 || uid >= 1000 || f.get(6) != Some(&"/usr/sbin/nologin") {
        bail!("keywall is not a system user without a shell: {pw}");
    }
    let st = chroot(&["stat", "-c", "%G %a", "/etc/keywall/policy.toml"])?;
    if st.trim() != "keywall 640" {
        bail!("/etc/keywall/policy.toml should be root:keywall 0640, is {st}");
    }
    // The installed binary runs, and the example policy is valid.
    print!("{}", chroot(&["keywall", "--version"])?);
    print!(
        "{}",
        chroot(&["keywall", "policy", "check", "/etc/keywall/policy.toml"])?
    );
    let unit = fs::read_to_string(root.join("lib/systemd/system/keywall.service"))?;
    for want in [
        "Type=notify",
        "User=keywall",
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ExecReload=",
    ] {
        if !unit.lines().any(|l| l.starts_with(want)) {
            bail!("keywall.service lacks {want}");
        }
    }
    step("package check: systemd-analyze verify");
    let mut v = ctx.command("systemd-analyze");
    // --man=no: the throw-away root has no man-db; the pages are checked below.
    v.arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.display()))
        .arg("/lib/systemd/system/keywall.service");
    let out = v
        .output()
        .context("systemd-analyze (apt package systemd)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{text}");
    if !out.status.success() || text.contains("keywall.service:") {
        bail!("systemd-analyze verify keywall.service failed");
    }
    // The man pages: gzip'd roff with a title line (without needing man-db here).
    for (page, title) in [
        ("keywall.8.gz", ".TH keywall"),
        ("keywall-run.8.gz", ".TH keywall-run"),
    ] {
        let out = ctx
            .command("gzip")
            .arg("-dc")
            .arg(root.join("usr/share/man/man8").join(page))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.lines().any(|l| l.starts_with(title)) {
            bail!("{page} is not a man page titled {title:?}");
        }
    }
    step("package check: dpkg --purge");
    print!("{}", chroot(&["dpkg", "--purge", "keywall"])?);
    for f in FILES {
        if root.join(f).exists() {
            bail!("/{f} is still there after the purge");
        }
    }
    Ok(())
}
