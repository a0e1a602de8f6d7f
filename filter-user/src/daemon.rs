//! `keywall run`: restore, attach, then keep the maps in step with the policy source (the
//! policy file, or the API when there is no file).
//!
//! Order matters for "never a gap, never a wrong verdict": the last applied policy is written
//! into the maps before the program is attached (or before it takes over a pinned link), and a
//! new policy is validated completely before anything is written.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use filter_common::KeyPrefix;

use crate::{
    api::{self, ApiConfig, Shared, Source},
    dataplane::{Capacity, Dataplane, Mirror},
    metrics::Metrics,
    policy::{Compiled, Patch, Policy},
    state::{self, Applied, Runtime},
};

pub struct RunOptions {
    pub ifaces: Vec<String>,
    pub xdp_mode: String,
    pub policy: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub capacity: Capacity,
    pub poll: Duration,
    pub api: ApiConfig,
    /// None: `--metrics off`.
    pub metrics: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The daemon's policy engine: the applied policy, its mirror in the maps, and persistence.
/// One per daemon, behind a mutex: every writer (the file, the API) goes through it in turn.
pub struct Engine {
    pub dp: Dataplane,
    pub mirror: Mirror,
    pub applied: Option<Applied>,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub key_cap: u32,
    /// The last PATCH applied (revision and ops), so its retry is recognised as a no-op.
    pub last_patch: Option<Patch>,
}

impl Engine {
    /// The applied revision (0 before anything was applied).
    pub fn revision(&self) -> u64 {
        self.applied.as_ref().map_or(0, |a| a.revision)
    }

    /// Validates, compiles and applies `p` at `revision`; on any error nothing live changes.
    pub fn apply(
        &mut self,
        p: Policy,
        revision: u64,
        source: &str,
    ) -> Result<crate::dataplane::ApplyReport> {
        let compiled = p.compile().map_err(|errs| {
            anyhow::anyhow!(
                "policy rejected:\n{}",
                errs.iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        self.apply_compiled(p, compiled, None, revision, source)
    }

    /// Writes an already validated policy. `changed` (from a PATCH) names every key that may
    /// differ from the live policy, so only those are written; None examines every key.
    /// Returns once the kernel enforces it and the state dir holds it.
    pub fn apply_compiled(
        &mut self,
        mut p: Policy,
        mut compiled: Compiled,
        changed: Option<&BTreeSet<KeyPrefix>>,
        revision: u64,
        source: &str,
    ) -> Result<crate::dataplane::ApplyReport> {
        // --audit overrides what the policy says in the kernel only: the stored policy stays
        // as written, so reads and retries see what the writer sent.
        if self.audit {
            compiled.settings.flags &= !filter_common::SETTING_ENFORCE;
        }
        let rep = self
            .mirror
            .apply_changes(&mut self.dp.maps, &compiled, changed, self.key_cap)?;
        p.revision = Some(revision);
        let applied = Applied {
            revision,
            source: source.to_owned(),
            applied_unix: state::now_unix(),
            policy: p,
        };
        self.last_patch = None;
        let saved = state::save_applied(&self.state_dir, &applied);
        self.applied = Some(applied);
        saved.context("the maps enforce it, but saving it to the state dir failed")?;
        Ok(rep)
    }
}

fn file_stamp(p: &Path) -> Option<(SystemTime, u64, Vec<u8>)> {
    let m = std::fs::metadata(p).ok()?;
    let content = std::fs::read(p).ok()?;
    Some((m.modified().ok()?, m.len(), content))
}

fn load_policy_file(p: &Path) -> Result<Policy> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    Policy::from_toml_str(&text).map_err(|errs| {
        anyhow::anyhow!(
            "{}: {}",
            p.display(),
            errs.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

pub fn run(o: RunOptions) -> Result<()> {
    if o.ifaces.is_empty() {
        bail!("keywall run needs at least one --iface");
    }
    o.api.check()?;
    std::fs::create_dir_all(&o.state_dir)
        .with_context(|| format!("creating state dir {}", o.state_dir.display()))?;
    let dp = Dataplane::load(&o.pin_dir, o.capacity)?;
    let mirror = Mirror::read(&dp.maps).context("reading the pinned maps")?;
    let mut eng = Engine {
        dp,
        mirror,
        applied: None,
        state_dir: o.state_dir.clone(),
        audit: o.audit,
        key_cap: o.capacity.keys,
        last_patch: None,
    };
    let metrics = Arc::new(Metrics::new(o.pin_dir.clone()));

    // 1. Restore the last applied policy before anything is attached or taken over.
    match state::load_applied(&o.state_dir) {
        Ok(Some(a)) => {
            let rep = eng.apply(a.policy.clone(), a.revision, &a.source)?;
            log::info!(
                "restored revision {} ({}) from {}: generation {}",
                a.revision,
                a.source,
                o.state_dir.display(),
                rep.generation
            );
        }
        Ok(None) => log::info!("no applied policy in {}", o.state_dir.display()),
        Err(e) => log::error!("ignoring unreadable state: {e:#}"),
    }

    // 2. The policy file, if it differs; a bad file keeps what was restored.
    let mut last_stamp = None;
    let mut runtime = Runtime {
        pid: std::process::id(),
        pin_dir: o.pin_dir.display().to_string(),
        audit_override: o.audit,
        ..Default::default()
    };
    if let Some(p) = &o.policy {
        last_stamp = file_stamp(p);
        apply_file(&mut eng, p, &mut runtime, &metrics);
        if eng.applied.is_none() {
            // Nothing to enforce and nothing to fall back to: refuse rather than attach a
            // filter that passes everything.
            bail!(
                "no policy to enforce: {} was rejected and the state dir has none ({})",
                p.display(),
                runtime.policy_error.as_deref().unwrap_or("unreadable")
            );
        }
    } else if eng.applied.is_none() {
        log::warn!("no policy yet: the filter passes everything until one is PUT over the API");
    }
    if let Some(a) = &eng.applied {
        metrics.set_policy(&a.policy, a.revision);
    }

    // 3. The API and metrics listeners, bound before attaching so a bad address fails early.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("keywall-api")
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    let api_listener = rt.block_on(api::bind(&o.api))?;
    let metrics_listener = match &o.metrics {
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr.as_str()))
                .with_context(|| format!("binding --metrics {addr}"))?,
        ),
        None => None,
    };

    // 4. Attach, or take over the pinned links without a gap.
    let previous = state::load_runtime(&o.state_dir);
    for ifn in &o.ifaces {
        let mut mode = eng.dp.attach(ifn, &o.xdp_mode)?;
        if mode == "takeover" {
            // The link keeps the mode it was created with; the last daemon recorded it.
            mode = previous
                .as_ref()
                .and_then(|r| r.ifaces.get(ifn).cloned())
                .unwrap_or_else(|| "unknown".into());
            log::info!("took over the pinned link on {ifn} ({mode}) without a gap");
        } else {
            log::info!("attached to {ifn} ({mode})");
        }
        runtime.ifaces.insert(ifn.clone(), mode);
    }
    eng.dp.pin_program()?;
    state::save_runtime(&o.state_dir, &runtime)?;

    // 5. Serve: drop events, the API, metrics.
    let (events_tx, _) = tokio::sync::broadcast::channel(4096);
    let events_error = match crate::events::open_ring(&o.pin_dir) {
        Ok(ring) => {
            let tx = events_tx.clone();
            std::thread::Builder::new()
                .name("keywall-events".into())
                .spawn(move || {
                    if let Err(e) = crate::events::pump(ring, tx, &STOP) {
                        log::error!("drop events stopped: {e:#}");
                    }
                })?;
            None
        }
        Err(e) => {
            log::warn!("{e:#}");
            Some(format!("{e:#}"))
        }
    };
    let source = match &o.policy {
        Some(p) => Source::File(p.clone()),
        None => Source::Api,
    };
    metrics.set_sync(
        source.kind(),
        source.kind() == "api" || runtime.policy_error.is_none(),
    );
    let shared = Arc::new(Shared {
        engine: Mutex::new(eng),
        runtime: Mutex::new(runtime),
        source,
        pin_dir: o.pin_dir.clone(),
        state_dir: o.state_dir.clone(),
        metrics: metrics.clone(),
        events: events_tx,
        events_error,
        max_body: o.api.max_body,
    });
    log::info!("API on {}", o.api.addr);
    rt.spawn(api::serve(api_listener, shared.clone()));
    if let Some(l) = metrics_listener {
        log::info!(
            "metrics on http://{}/metrics",
            o.metrics.as_deref().unwrap_or("")
        );
        rt.spawn(api::serve_metrics(l, metrics.clone()));
    }

    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    log::info!(
        "enforcing; policy generation {}; policy source: {}",
        shared.engine.lock().unwrap().mirror.generation(),
        shared.source.describe()
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(o.poll);
        if let Some(p) = &o.policy {
            let stamp = file_stamp(p);
            if stamp.is_some() && stamp != last_stamp {
                last_stamp = stamp;
                let mut eng = shared.engine.lock().unwrap();
                let mut runtime = shared.runtime.lock().unwrap();
                apply_file(&mut eng, p, &mut runtime, &metrics);
                metrics.set_sync("file", runtime.policy_error.is_none());
                state::save_runtime(&o.state_dir, &runtime)?;
            }
        }
    }
    rt.shutdown_background();
    api::remove_socket(&o.api);
    // The links stay pinned: the program keeps enforcing after the daemon exits.
    log::info!("stopping; XDP stays attached and enforcing (keywall detach removes it)");
    Ok(())
}

/// The revision a file gets: its own `revision` if it says one, else one past the applied.
pub fn file_revision(file_rev: Option<u64>, applied: u64) -> u64 {
    file_rev.unwrap_or(applied + 1)
}

fn apply_file(eng: &mut Engine, p: &Path, runtime: &mut Runtime, metrics: &Metrics) {
    let source = format!("file:{}", p.display());
    let t0 = Instant::now();
    let res = load_policy_file(p).and_then(|pol| {
        // Unchanged: same file source and content (a file without `revision` keeps the one
        // it was applied at).
        if let Some(a) = &eng.applied
            && a.source == source
            && pol.revision.is_none_or(|r| r == a.revision)
            && (Policy {
                revision: a.policy.revision,
                ..pol.clone()
            }) == a.policy
        {
            return Ok(None);
        }
        let rev = file_revision(pol.revision, eng.revision());
        eng.apply(pol, rev, &source).map(|r| Some((r, rev)))
    });
    match res {
        Ok(Some((rep, rev))) => {
            log::info!(
                "applied {} as revision {rev} (generation {}, {} keys written, {:?})",
                p.display(),
                rep.generation,
                rep.keys_written,
                rep.elapsed
            );
            runtime.policy_error = None;
            metrics.update("file", "applied");
            metrics.apply_seconds.observe(t0.elapsed().as_secs_f64());
            if let Some(a) = &eng.applied {
                metrics.set_policy(&a.policy, a.revision);
            }
        }
        Ok(None) => runtime.policy_error = None,
        Err(e) => {
            log::error!("policy file rejected, the running policy stays: {e:#}");
            runtime.policy_error = Some(format!("{e:#}"));
            metrics.update("file", "rejected");
        }
    }
}
