//! `keywall`: the daemon and the operator CLI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use keywall::{api, client, daemon, dataplane, policy::Policy, stats, status};

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
const DEFAULT_API: &str = "unix:/run/keywall/api.sock";

/// How client verbs reach the daemon.
#[derive(clap::Args)]
struct ApiArgs {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    #[arg(long, default_value = DEFAULT_API)]
    api: String,
    /// Bearer token for TCP (else the KEYWALL_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    fn client(&self) -> Result<client::Client> {
        client::Client::new(&self.api, self.token_file.as_deref())
    }
}

// Parsed once per process: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: restore, attach, and keep the kernel maps in step with the policy.
    Run {
        /// Interface to attach to (repeatable).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// XDP mode: native (driver), skb (generic), or auto (native, else skb).
        #[arg(long, default_value = "auto", value_parser = ["auto", "native", "skb"])]
        xdp_mode: String,
        /// Policy file (TOML, or JSON), reloaded on change; without it the API owns the policy.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// `unix:PATH` (mode 0600) or `tcp:HOST:PORT` (needs --token-file).
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// File holding the bearer token TCP clients must present.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// TLS certificate chain (PEM) for a TCP API.
        #[arg(long, requires = "api_tls_key")]
        api_tls_cert: Option<PathBuf>,
        /// TLS private key (PEM) for a TCP API.
        #[arg(long, requires = "api_tls_cert")]
        api_tls_key: Option<PathBuf>,
        /// CA (PEM) that API clients' certificates must chain to; clients without one are refused.
        #[arg(long, requires = "api_tls_cert")]
        api_client_ca: Option<PathBuf>,
        /// Serve a TCP API beyond loopback without TLS (only on a network you trust).
        #[arg(long)]
        api_insecure: bool,
        /// Largest request body in bytes (a 1M-key PUT is about 100 MB).
        #[arg(long, default_value_t = api::DEFAULT_MAX_BODY)]
        api_max_body: usize,
        /// Prometheus endpoint HOST:PORT, or `off`.
        #[arg(long, default_value = "127.0.0.1:9478")]
        metrics: String,
        /// Sync the policy from etcd: `URL[,URL…]` (http:// or https://). Exclusive with --policy.
        #[arg(long, conflicts_with = "policy")]
        etcd: Option<String>,
        /// etcd key prefix the policy is read from.
        #[arg(long, default_value = "/keywall/")]
        etcd_prefix: String,
        /// CA (PEM) that etcd's server certificate must chain to.
        #[arg(long, requires = "etcd")]
        etcd_ca: Option<PathBuf>,
        /// Client certificate (PEM) presented to etcd.
        #[arg(long, requires_all = ["etcd", "etcd_key"])]
        etcd_cert: Option<PathBuf>,
        /// Client certificate's private key (PEM).
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        /// etcd user (with --etcd-password-file).
        #[arg(long, requires = "etcd")]
        etcd_user: Option<String>,
        /// File holding the etcd user's password.
        #[arg(long, requires = "etcd_user")]
        etcd_password_file: Option<PathBuf>,
        /// Where the applied policy is kept across restarts.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// bpffs directory for the program, its maps and links.
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
        /// Replace an XDP program already on an interface that is not this keywall's
        /// (without it, keywall refuses to start).
        #[arg(long)]
        replace_foreign: bool,
        /// With --etcd: this edge's name in `<prefix>activity/<edge-id>` (default: the host
        /// name).
        #[arg(long, requires = "etcd")]
        edge_id: Option<String>,
        /// With --etcd: seconds between activity digests (the lease lasts three periods).
        #[arg(long, default_value_t = 30)]
        activity_every: u64,
    },
    /// For the control plane: read every edge's activity digest from etcd and lock idle keys
    /// (idle_lock_after) and shared keys (shared_key with action = "lock") in `keys/<prefix>`.
    Fleet {
        /// etcd `URL[,URL…]`.
        #[arg(long)]
        etcd: String,
        #[arg(long, default_value = "/keywall/")]
        etcd_prefix: String,
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        #[arg(long, requires = "etcd_key")]
        etcd_cert: Option<PathBuf>,
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
        #[arg(long)]
        etcd_user: Option<String>,
        #[arg(long, requires = "etcd_user")]
        etcd_password_file: Option<PathBuf>,
        /// Print what would be locked; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
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
    /// Streams sampled drop events from the daemon.
    Events {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One key: show, lock, unlock (through the daemon's API).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Keys by activity: idle, shared (used from too many networks), top (most requests).
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Policy files, and the daemon's applied policy.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Run another XDP program after keywall on this interface's packets that keywall passes
    /// (the chaining slot), or empty the slot.
    Chain {
        /// A pinned XDP program (e.g. xdp-filter's, under /sys/fs/bpf/xdp-filter/programs/).
        #[arg(long, conflicts_with_all = ["prog_id", "clear"])]
        prog: Option<PathBuf>,
        /// A loaded XDP program's id (`bpftool prog`).
        #[arg(long, conflicts_with = "clear")]
        prog_id: Option<u32>,
        /// Empty the slot.
        #[arg(long)]
        clear: bool,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// For the service unit's privileged ExecStartPre: mount bpffs if it is missing and make
    /// the pin dir, owned by the daemon's user.
    #[command(hide = true)]
    Prepare {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The user the daemon runs as.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Writes shell completions (bash, zsh, fish) and man pages into DIR (packaging).
    #[command(hide = true)]
    Assets { dir: PathBuf },
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
    /// Validate a policy file (TOML, or JSON) offline; every error names its place.
    Check { file: PathBuf },
    /// Push a policy file (TOML or JSON) to the running daemon.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The daemon's applied policy (TOML, or JSON with --json).
    Show {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Keys with no allowed traffic for at least DURATION (default: the policy's
    /// idle_lock_after, else 14d), longest idle first.
    Idle {
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
        #[arg(long)]
        top: Option<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Keys seen from more source networks than shared_key.networks within its window.
    Shared {
        #[arg(long)]
        top: Option<usize>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The most active keys (key messages judged), most first.
    Top {
        #[arg(default_value_t = 20)]
        n: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Its policy and counters.
    Show {
        prefix: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Lock it: its connections are cut from the next packet on.
    Lock {
        prefix: String,
        /// Why (shown in `key show`, status and drop events; at most 200 bytes).
        #[arg(long)]
        reason: Option<String>,
        /// The lock ends on its own after this long (`30m`, `2h`, `14d`).
        #[arg(long = "for", value_name = "DURATION", conflicts_with = "until")]
        for_: Option<String>,
        /// The lock ends on its own at this instant (RFC 3339, `2026-12-01T08:00:00Z`).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Unlock it: its connections are judged by its allowlist again.
    Unlock {
        prefix: String,
        #[command(flatten)]
        api: ApiArgs,
    },
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
            api,
            token_file,
            api_tls_cert,
            api_tls_key,
            api_client_ca,
            api_insecure,
            api_max_body,
            metrics,
            etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            state_dir,
            pin_dir,
            audit,
            max_keys,
            max_allow,
            max_flows,
            poll_ms,
            replace_foreign,
            edge_id,
            activity_every,
        } => {
            let edge_id = match edge_id {
                Some(e) => e,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "edge".into()),
            };
            keywall::fleet::check_edge_id(&edge_id)?;
            let etcd = etcd
                .map(|urls| {
                    keywall::etcd::EtcdConfig::new(&urls, &etcd_prefix).map(|c| {
                        keywall::etcd::EtcdConfig {
                            ca: etcd_ca,
                            cert: etcd_cert,
                            key: etcd_key,
                            user: etcd_user,
                            password_file: etcd_password_file,
                            ..c
                        }
                    })
                })
                .transpose()?;
            let api = api::ApiConfig {
                addr: api.parse()?,
                token: token_file
                    .as_deref()
                    .map(api::read_token_file)
                    .transpose()?,
                tls: api_tls_cert.map(|cert| api::TlsFiles {
                    cert,
                    key: api_tls_key.expect("clap requires it"),
                    client_ca: api_client_ca,
                }),
                insecure: api_insecure,
                max_body: api_max_body,
            };
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
                api,
                metrics: (metrics != "off").then_some(metrics),
                etcd,
                replace_foreign,
                edge_id,
                activity_every: Duration::from_secs(activity_every.max(1)),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fleet {
            etcd,
            etcd_prefix,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_user,
            etcd_password_file,
            dry_run,
            json,
        } => {
            let cfg = keywall::etcd::EtcdConfig {
                ca: etcd_ca,
                cert: etcd_cert,
                key: etcd_key,
                user: etcd_user,
                password_file: etcd_password_file,
                ..keywall::etcd::EtcdConfig::new(&etcd, &etcd_prefix)?
            };
            cfg.check()?;
            Ok(ExitCode::from(keywall::fleet::run(cfg, dry_run, json)?))
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
            match Policy::from_file_text(&file, &text).and_then(|p| p.compile().map(|c| (p, c))) {
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
        Cmd::Policy {
            cmd: PolicyCmd::Apply { file, api },
        } => Ok(ExitCode::from(client::policy_apply(&api.client()?, &file)?)),
        Cmd::Policy {
            cmd: PolicyCmd::Show { json, api },
        } => Ok(ExitCode::from(client::policy_show(&api.client()?, json)?)),
        Cmd::Keys { cmd } => Ok(ExitCode::from(match cmd {
            KeysCmd::Idle {
                for_,
                top,
                json,
                api,
            } => client::keys_list(&api.client()?, client::Listing::Idle(for_), top, json)?,
            KeysCmd::Shared { top, json, api } => {
                client::keys_list(&api.client()?, client::Listing::Shared, top, json)?
            }
            KeysCmd::Top { n, json, api } => {
                client::keys_list(&api.client()?, client::Listing::Top, Some(n), json)?
            }
        })),
        Cmd::Key { cmd } => Ok(ExitCode::from(match cmd {
            KeyCmd::Show { prefix, json, api } => client::key_show(&api.client()?, &prefix, json)?,
            KeyCmd::Lock {
                prefix,
                reason,
                for_,
                until,
                api,
            } => {
                let until = client::lock_until(for_.as_deref(), until.as_deref())?;
                client::key_lock(
                    &api.client()?,
                    &prefix,
                    true,
                    reason.as_deref(),
                    until.as_deref(),
                )?
            }
            KeyCmd::Unlock { prefix, api } => {
                client::key_lock(&api.client()?, &prefix, false, None, None)?
            }
        })),
        Cmd::Events { json, api } => Ok(ExitCode::from(client::events(&api.client()?, json)?)),
        Cmd::Chain {
            prog,
            prog_id,
            clear,
            pin_dir,
        } => {
            use keywall::chain;
            let target = match (&prog, prog_id) {
                (Some(p), _) => Some(chain::Target::Pin(p)),
                (None, Some(id)) => Some(chain::Target::Id(id)),
                (None, None) => None,
            };
            match target {
                Some(t) => {
                    let (name, id) = chain::set(&pin_dir, t)?;
                    println!("chained {name} (prog id {id}) after keywall");
                }
                None if clear => {
                    chain::clear(&pin_dir)?;
                    println!("chaining slot empty: keywall's pass verdicts are final");
                }
                None => anyhow::bail!("say --prog PINNED_PROGRAM, --prog-id ID or --clear"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prepare { pin_dir, owner } => {
            dataplane::ensure_bpffs(&pin_dir)?;
            if let Some(user) = owner {
                keywall::host::chown_to_user(&pin_dir, &user)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Assets { dir } => {
            write_assets(&dir)?;
            Ok(ExitCode::SUCCESS)
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

/// Completions for bash, zsh and fish, and a man page for keywall and each verb, into `dir`
/// (`completions/`, `man/`).
fn write_assets(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory as _;
    let comp = dir.join("completions");
    let man = dir.join("man");
    std::fs::create_dir_all(&comp)?;
    std::fs::create_dir_all(&man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "keywall", &comp)?;
    }
    let cmd = Cli::command();
    let mut pages = vec![("keywall".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        let name = format!("keywall-{}", sub.get_name());
        // The page's title is the command's name: `keywall-run`, as man expects.
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(leaked)));
    }
    for (name, c) in pages {
        let mut out = Vec::new();
        clap_mangen::Man::new(c).section("8").render(&mut out)?;
        std::fs::write(man.join(format!("{name}.8")), out)?;
    }
    Ok(())
}
