//! `cargo xtask <cmd>`: setup, build, test, demo and bench for keywall.
//!
//! Everything a fresh machine needs is installed by `setup`, which every other command runs
//! first. It checks before it installs, so on a ready machine it takes a fraction of a second.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod fresh;
mod package;

/// `cargo xtask test` (and therefore `.ci/run`) also runs `bench --quick` after the tests: a
/// smoke run of `keywall-bench` (tests/src/bin/bench.rs) that checks the bench works, never
/// how fast anything is, and leaves BENCHMARKS.md alone.
const RUN_QUICK_BENCH_AFTER_TESTS: bool = true;

/// Test threads for `cargo test`: every end-to-end test builds its own namespaces.
const TEST_THREADS: u32 = 4;

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "iproute2",
    "curl",
    "python3",
    "ethtool",
    "bpftool",
    "xdp-tools",
    // xdp-filter's compiled programs (xdpfilt_*.o), which the bench loads as its peer.
    "libxdp1",
    "nftables",
    "haproxy",
    "etcd-server",
    "etcd-client",
    // protoc: the etcd client crate compiles etcd's gRPC protocol at build time. Its well-known
    // includes (google/protobuf/*.proto) are in libprotobuf-dev, only a Recommends of
    // protobuf-compiler, and setup installs with --no-install-recommends.
    "protobuf-compiler",
    "libprotobuf-dev",
    "socat",
    "openssl",
    // systemd-analyze, for the package check's `systemd-analyze verify keywall.service`.
    "systemd",
    // sysctl (the evasion suite turns on TCP Fast Open in its namespaces); a minimal Debian
    // root has no procps, as `cargo xtask fresh` found.
    "procps",
];

/// PyPI packages the end-to-end tests and the demo run (the FIX client and acceptor), as
/// (import name, pip requirement).
const PIP_PACKAGES: &[(&str, &str)] = &[("simplefix", "simplefix==1.0.17")];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "keywall developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (apt packages, nightly rust-src, bpf-linker) and mount bpffs.
    Setup,
    /// Setup, build the workspace and run every test (unit, BPF_PROG_TEST_RUN, namespaces).
    Test {
        /// Also run `bench --quick` after the tests.
        #[arg(long)]
        quick_bench: bool,
        /// Extra arguments for `cargo test`; those after a second `--` go to the test binaries.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, and run the namespace demo against real clients and a real server.
    Demo,
    /// Setup, and run the benchmarks (per-packet beside XDP_PASS, drop-all and xdp-filter;
    /// flood on veth beside drop-all, xdp-filter, nftables and no filter; control plane).
    /// The full run rewrites BENCHMARKS.md.
    Bench {
        /// A short run (seconds, not minutes) that checks every row is produced.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for keywall-bench (`-- --help` lists them: --no-flood,
        /// --require-all, --no-doc, --doc FILE; `-- --control-plane` runs only the
        /// control-plane section and replaces it in BENCHMARKS.md, `--cp-sizes 1M` picks sizes).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, and build the release `keywall` binary.
    Build,
    /// Setup, and run the differential fuzzer's long campaign (release build, root): sequences of segments
    /// through the compiled program and a model of a real server; prints the sequences run
    /// and the bypasses found, with a minimized reproducer for the first of each class.
    Fuzz {
        /// Sequences to run (default 1,000,000; with --seconds, no count limit).
        #[arg(long)]
        sequences: Option<u64>,
        /// Campaign seed (decimal or 0x-hex): sequence i is a function of (seed, i).
        #[arg(long)]
        seed: Option<String>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// Replay one sequence of the campaign (minimized, each segment's reason shown).
        #[arg(long)]
        index: Option<u64>,
        /// Extra arguments for keywall-fuzz (`-- --help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build the release binary and package it: target/debian/keywall_<version>_amd64.deb.
    Package {
        /// Then install it into a throw-away bookworm root and check it (`cargo xtask test`
        /// runs this check on the debug build).
        #[arg(long)]
        check: bool,
        /// Package the debug build instead (quick; for checking the packaging itself).
        #[arg(long)]
        debug: bool,
    },
    /// Prove a fresh Debian 12 machine works: a clean clone in a throw-away bookworm root
    /// (mmdebstrap, cached under target/fresh) that has none of the build dependencies, only
    /// the host's rustup toolchains; inside it `cargo xtask test` (or, with --build-only,
    /// setup, the build and the unit tests).
    Fresh {
        /// setup + build + unit tests instead of the whole test command.
        #[arg(long)]
        build_only: bool,
        /// Keep the root (target/fresh/root) afterwards.
        #[arg(long)]
        keep: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("\nxtask: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut ctx = Ctx::new()?;
    match cli.cmd {
        Cmd::Setup => setup(&mut ctx),
        Cmd::Build => {
            setup(&mut ctx)?;
            step("build: cargo build --release -p filter-user");
            ctx.cargo(&["build", "--release", "-p", "filter-user"])?;
            let bin = ctx.target_dir()?.join("release/keywall");
            println!("built {}", bin.display());
            Ok(())
        }
        Cmd::Fuzz {
            sequences,
            seed,
            seconds,
            index,
            args,
        } => {
            let mut a: Vec<String> = Vec::new();
            let mut opt = |name: &str, v: Option<String>| {
                if let Some(v) = v {
                    a.push(format!("--{name}"));
                    a.push(v);
                }
            };
            opt("sequences", sequences.map(|n| n.to_string()));
            opt("seed", seed);
            opt("seconds", seconds.map(|n| n.to_string()));
            opt("index", index.map(|n| n.to_string()));
            a.extend(args);
            setup(&mut ctx)?;
            fuzz(&ctx, &a)
        }
        Cmd::Test { quick_bench, args } => {
            setup(&mut ctx)?;
            test(&ctx, &args)?;
            if args.is_empty() {
                // The .deb around the binary the tests just ran, installed into a
                // throw-away Debian root.
                package::check(&ctx, &ctx.target_dir()?.join("debug/keywall"))?;
            }
            if quick_bench || RUN_QUICK_BENCH_AFTER_TESTS {
                // Every locator's rows must be produced: a regression fails CI.
                bench(&ctx, true, &["--require-all".to_owned()])?;
            }
            step("test: all passed");
            Ok(())
        }
        Cmd::Demo => {
            setup(&mut ctx)?;
            demo(&ctx)
        }
        Cmd::Bench { quick, args } => {
            setup(&mut ctx)?;
            bench(&ctx, quick, &args)
        }
        Cmd::Package { check, debug } => {
            setup(&mut ctx)?;
            let bin = if debug {
                ctx.cargo(&["build", "-p", "filter-user"])?;
                ctx.target_dir()?.join("debug/keywall")
            } else {
                package::build(&ctx)?;
                ctx.target_dir()?.join("release/keywall")
            };
            if check {
                package::check(&ctx, &bin)?;
            } else {
                let deb = package::build_from(&ctx, &bin)?;
                println!("built {}", deb.display());
            }
            Ok(())
        }
        Cmd::Fresh { build_only, keep } => fresh::run(&ctx, build_only, keep),
    }
}

fn step(title: &str) {
    println!("\n==> {title}");
}

/// The workspace root, the cargo to use, and the environment every child process gets.
pub(crate) struct Ctx {
    pub(crate) root: PathBuf,
    pub(crate) cargo: OsString,
    env: BTreeMap<String, OsString>,
}

impl Ctx {
    fn new() -> Result<Ctx> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut env = BTreeMap::new();
        // bpf-linker and cargo-installed tools live in ~/.cargo/bin; children must find them.
        let cargo_bin = cargo_home().join("bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !dirs.iter().any(|d| d == &cargo_bin) {
            dirs.insert(0, cargo_bin);
        }
        env.insert("PATH".into(), std::env::join_paths(dirs)?);
        Ok(Ctx { root, cargo, env })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.current_dir(&self.root).envs(&self.env);
        c
    }

    /// Runs a command to completion; a non-zero exit is an error naming the command.
    fn run(&self, mut c: Command) -> Result<()> {
        let shown = show(&c);
        println!("+ {shown}");
        let status = c
            .status()
            .with_context(|| format!("cannot start `{shown}`"))?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    fn cargo(&self, args: &[&str]) -> Result<()> {
        let mut c = self.command(&self.cargo);
        c.args(args);
        self.run(c)
    }

    /// Runs a command and returns its stdout, or None when it cannot start or fails.
    fn output(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = self.command(program).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn target_dir(&self) -> Result<PathBuf> {
        let out = self
            .command(&self.cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .context("cargo metadata")?;
        if !out.status.success() {
            bail!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
        let dir = v["target_directory"]
            .as_str()
            .context("cargo metadata: no target_directory")?;
        Ok(PathBuf::from(dir))
    }
}

fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `sudo` in front of privileged commands when we are not root (and sudo exists).
fn privileged(ctx: &Ctx, program: &str) -> Command {
    if is_root() {
        ctx.command(program)
    } else {
        let mut c = ctx.command("sudo");
        c.arg(program);
        c
    }
}

// ---------------------------------------------------------------------------------------------
// setup

fn setup(ctx: &mut Ctx) -> Result<()> {
    step("setup: checking the machine");
    if !is_root() {
        println!(
            "warning: not root; keywall, its tests and the demo need root (CAP_BPF, CAP_NET_ADMIN)"
        );
    }
    setup_apt(ctx)?;
    setup_python(ctx)?;
    setup_rust(ctx)?;
    setup_bpf_linker(ctx)?;
    setup_bpffs(ctx)?;
    println!("setup: ready");
    Ok(())
}

fn setup_apt(ctx: &Ctx) -> Result<()> {
    let missing = missing_apt_packages(ctx, APT_PACKAGES)?;
    if missing.is_empty() {
        println!("ok: apt packages ({} present)", APT_PACKAGES.len());
        return Ok(());
    }
    step(&format!(
        "setup: installing apt packages: {}",
        missing.join(" ")
    ));
    let mut update = privileged(ctx, "apt-get");
    update
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update"]);
    ctx.run(update)?;
    let mut install = privileged(ctx, "apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing);
    ctx.run(install)?;
    let still = missing_apt_packages(ctx, APT_PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt packages still missing after install: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// Installs the PIP_PACKAGES that `python3` (the one on PATH, which the tests run) cannot
/// import. pip comes from apt if missing; a Debian python that refuses pip installs
/// (externally managed) gets `--break-system-packages`.
fn setup_python(ctx: &Ctx) -> Result<()> {
    let missing = |ctx: &Ctx| -> Vec<&'static str> {
        PIP_PACKAGES
            .iter()
            .filter(|(module, _)| {
                ctx.output("python3", &["-c", &format!("import {module}")])
                    .is_none()
            })
            .map(|(_, req)| *req)
            .collect()
    };
    let todo = missing(ctx);
    if todo.is_empty() {
        println!("ok: python packages ({} present)", PIP_PACKAGES.len());
        return Ok(());
    }
    if ctx.output("python3", &["-m", "pip", "--version"]).is_none() {
        let mut install = privileged(ctx, "apt-get");
        install
            .args(["install", "-y", "--no-install-recommends", "python3-pip"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        ctx.run(install)?;
    }
    println!("setup: installing python packages: {}", todo.join(" "));
    let mut pip = ctx.command("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--root-user-action=ignore",
    ])
    .args(&todo);
    if ctx.run(pip).is_err() {
        let mut pip = ctx.command("python3");
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
        ])
        .arg("--break-system-packages")
        .args(&todo);
        ctx.run(pip)?;
    }
    let still = missing(ctx);
    if !still.is_empty() {
        bail!(
            "python packages still missing after install: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn missing_apt_packages(ctx: &Ctx, pkgs: &[&str]) -> Result<Vec<String>> {
    // One dpkg-query for all; unknown packages only go to stderr (and make the exit non-zero).
    let out = ctx
        .command("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(pkgs)
        .output()
        .context("dpkg-query not found: this setup expects Debian (apt/dpkg)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(pkgs
        .iter()
        .filter(|p| {
            !text.lines().any(|l| {
                l.split_once(' ').is_some_and(|(name, status)| {
                    name.split(':').next() == Some(**p) && status == "install ok installed"
                })
            })
        })
        .map(|p| p.to_string())
        .collect())
}

fn setup_rust(ctx: &mut Ctx) -> Result<()> {
    if let Ok(tc) = std::env::var("KEYWALL_EBPF_TOOLCHAIN")
        && !tc.is_empty()
    {
        println!("ok: KEYWALL_EBPF_TOOLCHAIN={tc} set by the caller; ensuring rust-src on it");
        ensure_rust_src(ctx, Some(&tc))?;
        return Ok(());
    }
    match ensure_nightly(ctx) {
        Ok(()) => Ok(()),
        Err(e) => {
            println!(
                "warning: nightly unavailable ({e:#}); building eBPF with stable + RUSTC_BOOTSTRAP=1"
            );
            ensure_rust_src(ctx, None)?;
            ctx.env
                .insert("KEYWALL_EBPF_TOOLCHAIN".into(), "stable".into());
            ctx.env.insert("RUSTC_BOOTSTRAP".into(), "1".into());
            Ok(())
        }
    }
}

fn ensure_nightly(ctx: &Ctx) -> Result<()> {
    let list = ctx
        .output("rustup", &["toolchain", "list"])
        .context("rustup not found or failing")?;
    if !list.lines().any(|l| l.starts_with("nightly")) {
        step("setup: installing the nightly toolchain (for the eBPF build)");
        let mut c = ctx.command("rustup");
        c.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
        ctx.run(c)?;
    }
    ensure_rust_src(ctx, Some("nightly"))
}

fn ensure_rust_src(ctx: &Ctx, toolchain: Option<&str>) -> Result<()> {
    let mut args = vec!["component", "list", "--installed"];
    if let Some(tc) = toolchain {
        args.extend(["--toolchain", tc]);
    }
    let name = toolchain.unwrap_or("default");
    let installed = ctx
        .output("rustup", &args)
        .with_context(|| format!("rustup component list ({name})"))?;
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src-"))
    {
        println!("ok: rust-src on the {name} toolchain");
        return Ok(());
    }
    step(&format!(
        "setup: installing rust-src on the {name} toolchain"
    ));
    let mut c = ctx.command("rustup");
    c.args(["component", "add", "rust-src"]);
    if let Some(tc) = toolchain {
        c.args(["--toolchain", tc]);
    }
    ctx.run(c)
}

fn setup_bpf_linker(ctx: &Ctx) -> Result<()> {
    let have = ctx.output("bpf-linker", &["--version"]);
    if let Some(v) = &have
        && v.split_whitespace().any(|w| w == BPF_LINKER_VERSION)
    {
        println!("ok: {}", v.trim());
        return Ok(());
    }
    step(&format!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} (found: {}); this takes a few minutes",
        have.as_deref().map(str::trim).unwrap_or("none")
    ));
    let mut c = ctx.command(&ctx.cargo);
    c.env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    ctx.run(c)
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
    })
}

fn setup_bpffs(ctx: &Ctx) -> Result<()> {
    if bpffs_mounted() {
        println!("ok: bpffs on {BPFFS}");
        return Ok(());
    }
    step(&format!("setup: mounting bpffs on {BPFFS}"));
    let mut c = privileged(ctx, "mount");
    c.args(["-t", "bpf", "bpf", BPFFS]);
    ctx.run(c)
}

// ---------------------------------------------------------------------------------------------
// build, test, demo, bench

fn test(ctx: &Ctx, extra: &[String]) -> Result<()> {
    // Extra args: cargo test args, then (after `--`) test-binary args.
    let (cargo_args, bin_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    let picks_packages = cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || (a.starts_with("-p") && a.len() > 2));
    // filter-ebpf is a BPF-target crate: it never builds for the host. aya-build builds it from
    // filter-user/build.rs.
    let scope: &[&str] = if picks_packages {
        &[]
    } else {
        &["--workspace", "--exclude", "filter-ebpf"]
    };

    step("test: cargo build");
    let mut build = ctx.command(&ctx.cargo);
    build.arg("build").args(scope);
    ctx.run(build)?;

    step("test: cargo test");
    let mut t = ctx.command(&ctx.cargo);
    t.arg("test").args(scope).args(cargo_args).arg("--");
    if !bin_args.iter().any(|a| a.starts_with("--test-threads")) {
        t.arg(format!("--test-threads={TEST_THREADS}"));
    }
    t.args(bin_args);
    ctx.run(t)
}

fn fuzz(ctx: &Ctx, extra: &[String]) -> Result<()> {
    step("fuzz: cargo run --release -p tests --bin keywall-fuzz");
    let mut args = vec![
        "run",
        "--release",
        "-p",
        "tests",
        "--bin",
        "keywall-fuzz",
        "--",
    ];
    args.extend(extra.iter().map(String::as_str));
    ctx.cargo(&args)
}

fn demo(ctx: &Ctx) -> Result<()> {
    step("demo: cargo build --release -p filter-user -p tests");
    ctx.cargo(&["build", "--release", "-p", "filter-user", "-p", "tests"])?;
    let rel = ctx.target_dir()?.join("release");
    let keywall = rel.join("keywall");
    let demo = rel.join("keywall-demo");
    // The demo cleans up on Ctrl-C itself; xtask must outlive it rather than die first.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    step("demo: running");
    let mut c = ctx.command(&demo);
    c.arg("--keywall").arg(&keywall);
    ctx.run(c)
}

fn bench(ctx: &Ctx, quick: bool, extra: &[String]) -> Result<()> {
    step(&format!("bench{}", if quick { " --quick" } else { "" }));
    // The smoke run checks that the bench works, not how fast the host code is: it reuses the
    // test build instead of compiling everything again in release mode.
    // The control-plane rows run the `keywall` daemon, found next to the bench binary.
    let mut build = vec!["build", "-p", "filter-user", "--bin", "keywall"];
    if !quick {
        build.push("--release");
    }
    ctx.cargo(&build)?;
    let mut args = vec!["run"];
    if !quick {
        args.push("--release");
    }
    args.extend(["-p", "tests", "--bin", "keywall-bench", "--"]);
    if quick {
        args.push("--quick");
    }
    args.extend(extra.iter().map(String::as_str));
    ctx.cargo(&args)
}
