//! `cargo xtask fresh`: the fresh-machine check.
//!
//! A Debian 12 root made by mmdebstrap (`minbase`, plus git and ca-certificates to clone, and
//! gcc and libc6-dev, the C linker every Rust install needs),
//! cached as a tarball under target/fresh, is unpacked afresh each run. It gets a clean clone
//! of this repository's HEAD, a copy of ~/.cargo (the cargo binaries and the registry cache)
//! and the host's ~/.rustup bind-mounted read-only, because rustup's own servers are not
//! reachable from every build host. Nothing else of the host: not its apt packages (protoc,
//! LLVM, bpftool, …), not its pip packages, not bpf-linker's library. Inside, in a mount
//! namespace of its own (so every mount goes away with it), `cargo xtask test` must install
//! what is missing and pass.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{Ctx, step};

const SUITE: &str = "bookworm";

/// Network settings passed into the root when the host has them (proxies, CA bundles).
const PASS_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
];
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

pub fn run(ctx: &Ctx, build_only: bool, keep: bool) -> Result<()> {
    if !super::is_root() {
        bail!("xtask fresh needs root (mmdebstrap, chroot, mounts)");
    }
    let t0 = Instant::now();
    let base = ctx.target_dir()?.join("fresh");
    std::fs::create_dir_all(&base)?;
    // What a Rust user's machine has before keywall: git to clone, and the C linker and libc
    // headers that rustup requires (`cargo xtask` itself cannot be compiled without them).
    let tarball = base.join(format!("{SUITE}-rustbase.tar"));
    make_tarball(
        ctx,
        &tarball,
        &["ca-certificates", "git", "gcc", "libc6-dev"],
    )?;
    // The package check (run by `cargo xtask test`) installs the .deb into a root that has
    // systemd, for `systemd-analyze verify`.
    let systemd_tarball = base.join(format!("{SUITE}-systemd.tar"));
    make_tarball(ctx, &systemd_tarball, &["systemd"])?;
    let root = base.join("root");
    remove_root(&root)?;
    std::fs::create_dir_all(&root)?;
    step("fresh: unpacking the root");
    let mut tar = ctx.command("tar");
    tar.arg("-C").arg(&root).arg("-xf").arg(&tarball);
    ctx.run(tar)?;

    step("fresh: a clean clone of HEAD, and the host's Rust toolchains");
    let mut clone = ctx.command("git");
    clone
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(&ctx.root)
        .arg(root.join("src/keywall"));
    ctx.run(clone)?;
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf")).ok();
    // The host's network, not its build dependencies: locally added CA certificates (a TLS
    // proxy in front of the registries) and pip's configuration. The root trusts them once
    // update-ca-certificates ran inside.
    if let Ok(dir) = std::fs::read_dir("/usr/local/share/ca-certificates") {
        let dst = root.join("usr/local/share/ca-certificates");
        std::fs::create_dir_all(&dst)?;
        for e in dir.flatten() {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    std::fs::copy("/etc/pip.conf", root.join("etc/pip.conf")).ok();
    let passed: String = PASS_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!(" {k}='{v}'")))
        .collect();
    // The package check inside unpacks the same bookworm root for its dpkg -i: hand it the
    // cached tarball rather than a second mmdebstrap.
    let inner_cache = root.join("src/keywall/target/fresh");
    std::fs::create_dir_all(&inner_cache)?;
    std::fs::copy(
        &systemd_tarball,
        inner_cache.join(systemd_tarball.file_name().unwrap()),
    )?;
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let (cargo_home, rustup_home) = (
        super::cargo_home(),
        std::env::var_os("RUSTUP_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&home).join(".rustup")),
    );
    let mut cp = ctx.command("cp");
    cp.arg("-a").arg(&cargo_home).arg(root.join("root/.cargo"));
    ctx.run(cp)?;
    std::fs::create_dir_all(root.join("root/.rustup"))?;

    let inner = if build_only {
        "cargo xtask setup && cargo build --workspace --exclude filter-ebpf \
         && cargo test --workspace --exclude filter-ebpf --lib --bins"
    } else {
        "cargo xtask test"
    };
    let script = format!(
        r#"set -e
R={root}
# The root must be a mount point: `ip -n NS` makes / a slave mount, which fails on a plain
# directory.
mount --bind "$R" "$R"
mount --rbind /dev "$R/dev" && mount --make-rslave "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys" && mount --make-rslave "$R/sys"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mount --bind {rustup} "$R/root/.rustup" && mount -o remount,bind,ro "$R/root/.rustup"
chroot "$R" update-ca-certificates >/dev/null
exec chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb{passed} \
  PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /bin/sh -c 'cd /src/keywall && {inner}'
"#,
        root = root.display(),
        rustup = rustup_home.display(),
    );
    step(&format!("fresh: inside the root: {inner}"));
    let t_in = Instant::now();
    let mut c = ctx.command("unshare");
    c.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(&script);
    let res = ctx.run(c);
    let inside = t_in.elapsed();
    if !keep {
        remove_root(&root)?;
    }
    res?;
    step(&format!(
        "fresh: passed: {inner} took {:.1} min inside the root ({:.1} min in all)",
        inside.as_secs_f64() / 60.0,
        t0.elapsed().as_secs_f64() / 60.0
    ));
    Ok(())
}

/// A `minbase` root with `include` added, cached as `tarball` (made only when missing).
pub(super) fn make_tarball(ctx: &Ctx, tarball: &Path, include: &[&str]) -> Result<()> {
    if tarball.exists() {
        println!("ok: cached {}", tarball.display());
        return Ok(());
    }
    if ctx.output("mmdebstrap", &["--version"]).is_none() {
        step("fresh: installing mmdebstrap");
        let mut c = super::privileged(ctx, "apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "--no-install-recommends",
            "mmdebstrap",
        ]);
        ctx.run(c)?;
    }
    step(&format!(
        "fresh: making a {SUITE} minbase root (cached in {})",
        tarball.display()
    ));
    let part = tarball.with_extension("tar.part");
    let mut c = ctx.command("mmdebstrap");
    c.args([
        "--variant=minbase",
        &format!("--include={}", include.join(",")),
        "--format=tar",
        SUITE,
    ])
    .arg(&part)
    .args(MIRRORS);
    ctx.run(c)?;
    std::fs::rename(&part, tarball)?;
    Ok(())
}

/// Removes a previous root, after making sure nothing is still mounted inside it (the mounts
/// live in a namespace that ends with the run, but a root kept with --keep and entered by
/// hand could still hold some).
pub(super) fn remove_root(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let prefix = root.to_string_lossy().into_owned();
    if let Some(m) = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|m| m.starts_with(&prefix))
    {
        bail!("{m} is still mounted: unmount it before {prefix} can be removed");
    }
    let st = Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(root)
        .status()?;
    if !st.success() {
        bail!("removing {}", root.display());
    }
    Ok(())
}
