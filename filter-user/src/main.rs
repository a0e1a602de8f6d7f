//! `keywall`: the daemon and the operator CLI. The verbs' flags and their dispatch; what each
//! verb does is in the library (`cli/`, `daemon.rs`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use keywall::cli::{self, DEFAULT_API, DEFAULT_PIN_DIR, DEFAULT_STATE_DIR, client};

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

// How client verbs reach the daemon. (Not a doc comment: clap would make it the about text of
// every verb that flattens these flags.)
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
    Run(cli::RunArgs),
    /// For the control plane: read every edge's activity digest from etcd and lock idle keys
    /// (idle_lock_after) and shared keys (shared_key with action = "lock") in `keys/<prefix>`.
    Fleet(cli::FleetArgs),
    /// Interfaces, attach state, applied revision, mode and map fill.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// bpffs directory of the program, its maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The daemon's state dir (read when the daemon is down).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Verdict counters from the pinned maps.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Count by verdict reason, or by key.
        #[arg(long, default_value = "reason", value_parser = ["reason", "key"])]
        by: String,
        /// At most this many rows.
        #[arg(long)]
        top: Option<usize>,
        /// Print again every N seconds.
        #[arg(long)]
        watch: Option<u64>,
        /// bpffs directory of the program, its maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Streams sampled drop events from the daemon.
    Events {
        /// Print JSON.
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
        /// bpffs directory of the program, its maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// For the service unit's privileged ExecStartPre: mount bpffs if it is missing and make
    /// the pin dir, owned by the daemon's user.
    #[command(hide = true)]
    Prepare {
        /// bpffs directory of the program, its maps and links.
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
        /// Detach from this interface only.
        #[arg(long, conflicts_with = "all")]
        iface: Option<String>,
        /// Detach from every interface and remove every pin.
        #[arg(long)]
        all: bool,
        /// bpffs directory of the program, its maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file (TOML, or JSON) offline; every error names its place.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Push a policy file (TOML or JSON) to the running daemon.
    Apply {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The daemon's applied policy (TOML, or JSON with --json).
    Show {
        /// Print JSON.
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
        /// Idle for at least this long (`14d`, `12h`); default: the policy's idle_lock_after.
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
        /// At most this many rows.
        #[arg(long)]
        top: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Keys seen from more source networks than shared_key.networks within its window.
    Shared {
        /// At most this many rows.
        #[arg(long)]
        top: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The most active keys (key messages judged), most first.
    Top {
        /// How many keys.
        #[arg(default_value_t = 20)]
        n: usize,
        /// Print JSON.
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
        /// The key\'s prefix (settings.key_prefix_len bytes).
        prefix: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Lock it: its connections are cut from the next packet on.
    Lock {
        /// The key\'s prefix (settings.key_prefix_len bytes).
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
        /// The key\'s prefix (settings.key_prefix_len bytes).
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
        Cmd::Run(a) => cli::run(a),
        Cmd::Fleet(a) => cli::fleet(a),
        Cmd::Status {
            json,
            pin_dir,
            state_dir,
        } => {
            cli::status::print(&pin_dir, &state_dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Stats {
            json,
            by,
            top,
            watch,
            pin_dir,
        } => cli::stats(&pin_dir, json, &by, top, watch),
        Cmd::Policy { cmd } => match cmd {
            PolicyCmd::Check { file } => cli::policy_check(&file),
            PolicyCmd::Apply { file, api } => code(client::policy_apply(&api.client()?, &file)),
            PolicyCmd::Show { json, api } => code(client::policy_show(&api.client()?, json)),
        },
        Cmd::Keys { cmd } => code(match cmd {
            KeysCmd::Idle {
                for_,
                top,
                json,
                api,
            } => client::keys_list(&api.client()?, client::Listing::Idle(for_), top, json),
            KeysCmd::Shared { top, json, api } => {
                client::keys_list(&api.client()?, client::Listing::Shared, top, json)
            }
            KeysCmd::Top { n, json, api } => {
                client::keys_list(&api.client()?, client::Listing::Top, Some(n), json)
            }
        }),
        Cmd::Key { cmd } => code(match cmd {
            KeyCmd::Show { prefix, json, api } => client::key_show(&api.client()?, &prefix, json),
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
                )
            }
            KeyCmd::Unlock { prefix, api } => {
                client::key_lock(&api.client()?, &prefix, false, None, None)
            }
        }),
        Cmd::Events { json, api } => code(client::events(&api.client()?, json)),
        Cmd::Chain {
            prog,
            prog_id,
            clear,
            pin_dir,
        } => cli::chain(&pin_dir, prog.as_deref(), prog_id, clear),
        Cmd::Prepare { pin_dir, owner } => cli::prepare(&pin_dir, owner.as_deref()),
        Cmd::Assets { dir } => {
            write_assets(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Detach {
            iface,
            all,
            pin_dir,
        } => cli::detach(&pin_dir, iface.as_deref(), all),
    }
}

/// A client verb's exit code.
fn code(r: Result<u8>) -> Result<ExitCode> {
    r.map(ExitCode::from)
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
