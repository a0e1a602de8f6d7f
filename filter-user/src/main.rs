//! `keywall`: the daemon and the operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use keywall::{daemon, dataplane, policy::Policy, stats, status};

#[derive(Parser)]
#[command(
    name = "keywall",
    version,
    about = "Per-API-key source allowlists and locks, enforced in XDP"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/keywall";
const DEFAULT_STATE_DIR: &str = "/var/lib/keywall";

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: restore, attach, and keep the kernel maps in step with the policy.
    Run {
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        #[arg(long, default_value = "auto", value_parser = ["auto", "native", "skb"])]
        xdp_mode: String,
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long, default_value = "unix:/run/keywall/api.sock")]
        api: String,
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:9478")]
        metrics: String,
        #[arg(long)]
        etcd: Option<String>,
        #[arg(long, default_value = "/keywall/")]
        etcd_prefix: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Count would-be drops as `observed`, pass everything.
        #[arg(long)]
        audit: bool,
        /// Capacity of the key map (and per-key counters).
        #[arg(long, default_value_t = filter_common::DEFAULT_MAX_KEYS)]
        max_keys: u32,
        /// Capacity of the allow-entry map (CIDRs, IPv6 hosts, IPv4 hosts beyond 4 per key).
        #[arg(long, default_value_t = filter_common::DEFAULT_MAX_ALLOW)]
        max_allow: u32,
        /// Capacity of the connection table (LRU).
        #[arg(long, default_value_t = filter_common::DEFAULT_MAX_FLOWS)]
        max_flows: u32,
        /// How often the policy file is checked for changes, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_ms: u64,
    },
    /// Interfaces, attach state, applied revision, mode and map fill.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Verdict counters from the pinned maps.
    Stats {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "reason", value_parser = ["reason", "key"])]
        by: String,
        #[arg(long)]
        top: Option<usize>,
        #[arg(long)]
        watch: Option<u64>,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Detach from one interface, or from all and remove every pin.
    Detach {
        #[arg(long, conflicts_with = "all")]
        iface: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file offline; every error names its place.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keywall: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Run {
            ifaces,
            xdp_mode,
            policy,
            api: _,
            token_file: _,
            metrics: _,
            etcd,
            etcd_prefix: _,
            state_dir,
            pin_dir,
            audit,
            max_keys,
            max_allow,
            max_flows,
            poll_ms,
        } => {
            if etcd.is_some() {
                anyhow::bail!("--etcd is not supported by this build yet");
            }
            daemon::run(daemon::RunOptions {
                ifaces,
                xdp_mode,
                policy,
                pin_dir,
                state_dir,
                audit,
                capacity: dataplane::Capacity {
                    keys: max_keys,
                    allow: max_allow,
                    sets: max_keys.max(1024),
                    flows: max_flows,
                    ..Default::default()
                },
                poll: Duration::from_millis(poll_ms.max(10)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            json,
            pin_dir,
            state_dir,
        } => {
            status::print(&pin_dir, &state_dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stats {
            json,
            by,
            top,
            watch,
            pin_dir,
        } => loop {
            stats::print_stats(&pin_dir, json, &by, top)?;
            match watch {
                Some(s) => {
                    std::thread::sleep(Duration::from_secs(s.max(1)));
                    println!();
                }
                None => return Ok(ExitCode::SUCCESS),
            }
        },
        Cmd::Policy {
            cmd: PolicyCmd::Check { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            match Policy::from_toml_str(&text).and_then(|p| p.compile().map(|c| (p, c))) {
                Ok((p, c)) => {
                    println!(
                        "{}: ok ({} keys, {} listeners, {} ipsets)",
                        file.display(),
                        p.key.len(),
                        c.listeners.len(),
                        c.ipsets.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errs) => {
                    for e in errs {
                        eprintln!("{}: {e}", file.display());
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Detach {
            iface,
            all,
            pin_dir,
        } => {
            if iface.is_none() && !all {
                anyhow::bail!("say --iface IF or --all");
            }
            let done = dataplane::detach(&pin_dir, iface.as_deref())?;
            if done.is_empty() {
                println!("nothing attached under {}", pin_dir.display());
            }
            for i in done {
                println!("detached {i}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
