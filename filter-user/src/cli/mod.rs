//! The operator CLI: what each verb does once `main.rs` has parsed it. `client.rs` is the verbs
//! that talk to the daemon's API; `status.rs` and `stats.rs` render what the pinned maps and
//! the state dir say; the rest (`run`, `fleet`, `policy check`, `chain`, `detach`, `prepare`)
//! is here.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Result, bail};

use crate::{
    chain, daemon, dataplane, fleet,
    policy::Policy,
    source::{
        api::{self, ApiConfig, TlsFiles},
        etcd::EtcdConfig,
    },
};

pub mod client;
pub mod stats;
pub mod status;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/keywall";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/keywall";
pub const DEFAULT_API: &str = "unix:/run/keywall/api.sock";

// `keywall run`'s flags. (A doc comment here would become every flattening verb's about.)
#[derive(clap::Args)]
pub struct RunArgs {
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
}

/// `keywall run`: the flags made into the daemon's options, then the daemon.
pub fn run(a: RunArgs) -> Result<ExitCode> {
    let edge_id = match a.edge_id {
        Some(e) => e,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "edge".into()),
    };
    fleet::check_edge_id(&edge_id)?;
    let etcd = a
        .etcd
        .map(|urls| {
            EtcdConfig::new(&urls, &a.etcd_prefix).map(|c| EtcdConfig {
                ca: a.etcd_ca,
                cert: a.etcd_cert,
                key: a.etcd_key,
                user: a.etcd_user,
                password_file: a.etcd_password_file,
                ..c
            })
        })
        .transpose()?;
    let api = ApiConfig {
        addr: a.api.parse()?,
        token: a
            .token_file
            .as_deref()
            .map(api::read_token_file)
            .transpose()?,
        tls: a.api_tls_cert.map(|cert| TlsFiles {
            cert,
            key: a.api_tls_key.expect("clap requires it"),
            client_ca: a.api_client_ca,
        }),
        insecure: a.api_insecure,
        max_body: a.api_max_body,
    };
    daemon::run(daemon::RunOptions {
        ifaces: a.ifaces,
        xdp_mode: a.xdp_mode,
        policy: a.policy,
        pin_dir: a.pin_dir,
        state_dir: a.state_dir,
        audit: a.audit,
        capacity: dataplane::Capacity {
            keys: a.max_keys,
            allow: a.max_allow,
            sets: a.max_keys.max(1024),
            flows: a.max_flows,
            ..Default::default()
        },
        poll: Duration::from_millis(a.poll_ms.max(10)),
        api,
        metrics: (a.metrics != "off").then_some(a.metrics),
        etcd,
        replace_foreign: a.replace_foreign,
        edge_id,
        activity_every: Duration::from_secs(a.activity_every.max(1)),
    })?;
    Ok(ExitCode::SUCCESS)
}

// `keywall fleet`'s flags.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// etcd `URL[,URL…]`.
    #[arg(long)]
    etcd: String,
    /// etcd key prefix the policy is kept under.
    #[arg(long, default_value = "/keywall/")]
    etcd_prefix: String,
    /// CA (PEM) that etcd's server certificate must chain to.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd.
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (with --etcd-password-file).
    #[arg(long)]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Print what would be locked; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `keywall fleet`: lock idle and shared keys fleet-wide (fleet.rs).
pub fn fleet(a: FleetArgs) -> Result<ExitCode> {
    let cfg = EtcdConfig {
        ca: a.etcd_ca,
        cert: a.etcd_cert,
        key: a.etcd_key,
        user: a.etcd_user,
        password_file: a.etcd_password_file,
        ..EtcdConfig::new(&a.etcd, &a.etcd_prefix)?
    };
    cfg.check()?;
    Ok(ExitCode::from(fleet::run(cfg, a.dry_run, a.json)?))
}

/// `keywall stats`, once or every `watch` seconds.
pub fn stats(
    pin_dir: &Path,
    json: bool,
    by: &str,
    top: Option<usize>,
    watch: Option<u64>,
) -> Result<ExitCode> {
    loop {
        stats::print_stats(pin_dir, json, by, top)?;
        match watch {
            Some(s) => {
                std::thread::sleep(Duration::from_secs(s.max(1)));
                println!();
            }
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// `keywall policy check FILE`: 0 when valid, 1 with every error on stderr.
pub fn policy_check(file: &Path) -> Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    match Policy::from_file_text(file, &text).and_then(|p| p.compile().map(|c| (p, c))) {
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

/// `keywall chain`: fill or empty the chaining slot.
pub fn chain(
    pin_dir: &Path,
    prog: Option<&Path>,
    prog_id: Option<u32>,
    clear: bool,
) -> Result<ExitCode> {
    let target = match (prog, prog_id) {
        (Some(p), _) => Some(chain::Target::Pin(p)),
        (None, Some(id)) => Some(chain::Target::Id(id)),
        (None, None) => None,
    };
    match target {
        Some(t) => {
            let (name, id) = chain::set(pin_dir, t)?;
            println!("chained {name} (prog id {id}) after keywall");
        }
        None if clear => {
            chain::clear(pin_dir)?;
            println!("chaining slot empty: keywall's pass verdicts are final");
        }
        None => bail!("say --prog PINNED_PROGRAM, --prog-id ID or --clear"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `keywall prepare` (the unit's ExecStartPre): bpffs and the pin dir, owned by `owner`.
pub fn prepare(pin_dir: &Path, owner: Option<&str>) -> Result<ExitCode> {
    dataplane::ensure_bpffs(pin_dir)?;
    if let Some(user) = owner {
        crate::host::chown_to_user(pin_dir, user)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keywall detach`: one interface, or all of them and every pin.
pub fn detach(pin_dir: &Path, iface: Option<&str>, all: bool) -> Result<ExitCode> {
    if iface.is_none() && !all {
        bail!("say --iface IF or --all");
    }
    let done = dataplane::detach(pin_dir, iface)?;
    if done.is_empty() {
        println!("nothing attached under {}", pin_dir.display());
    }
    for i in done {
        println!("detached {i}");
    }
    Ok(ExitCode::SUCCESS)
}
