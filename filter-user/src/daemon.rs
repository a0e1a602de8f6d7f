//! `keywall run`: restore, attach, then serve: the policy source (`source/`: the policy file,
//! etcd, or the API when there is neither) keeps the maps in step through the engine.
//!
//! Order matters for "never a gap, never a wrong verdict": the last applied policy is written
//! into the maps before the program is attached (or before it takes over a pinned link), and a
//! new policy is validated completely before anything is written.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    dataplane::{Capacity, Dataplane, Mirror},
    engine::{Engine, Restored},
    metrics::Metrics,
    source::{
        Shared, Source,
        api::{self, ApiConfig},
        file::{FileWatch, apply_file, apply_file_edit, parse_file},
    },
    state::{self, Runtime},
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
    /// `--etcd`: the policy source (exclusive with `policy`).
    pub etcd: Option<crate::source::etcd::EtcdConfig>,
    /// `--replace-foreign`: detach an XDP program that is not this keywall's instead of
    /// refusing to start.
    pub replace_foreign: bool,
    /// With `etcd`: this edge's name for its activity digest, and how often it is published.
    pub edge_id: String,
    pub activity_every: Duration,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGHUP: read the policy file again now (systemd's `ExecReload`).
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sighup(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

pub fn run(o: RunOptions) -> Result<()> {
    // Two malloc arenas, not one per thread that ever allocated: the API workers, the
    // settle and the apply's helper threads each churn the mirror's nodes, and free pages
    // scattered over 8+ arenas kept 100 MB more resident at 1M keys (trim_heap returns what
    // the arenas hold free).
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    if o.ifaces.is_empty() {
        bail!("keywall run needs at least one --iface");
    }
    o.api.check()?;
    if o.policy.is_some() && o.etcd.is_some() {
        bail!("--policy and --etcd are exclusive: a daemon has one policy source");
    }
    if let Some(e) = &o.etcd {
        e.check()?;
    } else {
        crate::source::etcd::forget(&o.state_dir);
    }
    // One line naming a missing capability beats a verifier or EPERM message later.
    crate::host::check_caps()?;
    // Another XDP program on an interface: refuse, or remove it with --replace-foreign,
    // before anything is loaded or applied.
    for ifn in &o.ifaces {
        check_foreign(ifn, &o.pin_dir, o.replace_foreign)?;
    }
    std::fs::create_dir_all(&o.state_dir)
        .with_context(|| format!("creating state dir {}", o.state_dir.display()))?;
    // The state dir is read (and its policy compiled, or stored compactly) on a thread of
    // its own while the program loads and the pinned maps are read: at 1M keys each takes
    // seconds.
    let restoring = {
        let state_dir = o.state_dir.clone();
        let pins = o.pin_dir.join(filter_common::maps::CONTROL).exists();
        std::thread::Builder::new()
            .name("keywall-restore".into())
            .spawn(move || -> Result<Option<Restored>> {
                // Before anything appends to the journal.
                if let Err(e) = state::repair_journal(&state_dir) {
                    log::error!("repairing the policy journal: {e:#}");
                }
                let t = Instant::now();
                let Some(a) = state::load_applied(&state_dir)? else {
                    return Ok(None);
                };
                log::info!("read the applied policy in {:?}", t.elapsed());
                let likely = pins
                    && state::load_policy_status(&state_dir).is_some_and(|st| {
                        st.revision == a.revision && st.keys == a.policy.key.len() as u64
                    });
                Ok(Some(Restored::prepare(a, likely)))
            })?
    };
    let t_load = Instant::now();
    let dp = Dataplane::load(&o.pin_dir, o.capacity)?;
    log::info!("loaded the program in {:?}", t_load.elapsed());
    let t_read = Instant::now();
    let mirror = Mirror::read(&dp.maps).context("reading the pinned maps")?;
    log::info!(
        "read the pinned maps in {:?} ({} keys)",
        t_read.elapsed(),
        mirror.fill().keys
    );
    let mut eng = Engine {
        dp,
        mirror,
        applied: None,
        state_dir: o.state_dir.clone(),
        audit: o.audit,
        key_cap: o.capacity.keys,
        last_patch: None,
        journal_len: 0,
        compiled: None,
        lock_reasons: Default::default(),
        unsettled: false,
        published: Arc::new(Mutex::new(None)),
        fold_busy: Arc::new(AtomicBool::new(false)),
        metrics: None,
    };
    let metrics = Arc::new(Metrics::new(o.pin_dir.clone(), eng.published.clone()));
    eng.metrics = Some(metrics.clone());

    // 1. Restore the last applied policy before anything is attached or taken over.
    let t_restore = Instant::now();
    match restoring.join().expect("the restore thread panicked") {
        Ok(Some(r)) => {
            let (revision, source) = (r.revision(), r.source().to_owned());
            let pb = crate::progress::spinner(format!(
                "restoring revision {revision} ({} keys)",
                r.keys()
            ));
            let rep = eng.restore(r);
            crate::progress::done(pb);
            let rep = rep?;
            log::info!(
                "restored revision {revision} ({source}) from {} ({:?} after the maps were read): generation {}",
                o.state_dir.display(),
                t_restore.elapsed(),
                rep.generation
            );
        }
        Ok(None) => log::info!("no applied policy in {}", o.state_dir.display()),
        Err(e) => log::error!("ignoring unreadable state: {e:#}"),
    }

    // 2. The policy file, if it differs; a bad file keeps what was restored.
    let mut watch = FileWatch::default();
    let mut runtime = Runtime {
        pid: std::process::id(),
        pin_dir: o.pin_dir.display().to_string(),
        audit_override: o.audit,
        ..Default::default()
    };
    if let Some(p) = &o.policy {
        let text = watch.changed_settled(p);
        let (parsed, kept) = match text {
            Some(text) => parse_file(p, &text),
            None => (Err(anyhow::anyhow!("cannot read {}", p.display())), None),
        };
        // The daemon's automatic locks lie over the file (autolock.rs).
        let overlay = crate::autolock::Overlay::load(&o.state_dir);
        let parsed = parsed.map(|mut pol| {
            overlay.apply(&mut pol);
            pol
        });
        let pb = crate::progress::spinner(format!("applying {}", p.display()));
        apply_file(&mut eng, p, parsed, &mut runtime, &metrics);
        crate::progress::done(pb);
        if runtime.policy_error.is_none() {
            watch.applied = kept;
        }
        if eng.applied.is_none() {
            // Nothing to enforce and nothing to fall back to: refuse rather than attach a
            // filter that passes everything.
            bail!(
                "no policy to enforce: {} was rejected and the state dir has none ({})",
                p.display(),
                runtime.policy_error.as_deref().unwrap_or("unreadable")
            );
        }
    } else if eng.applied.is_none() && o.etcd.is_some() {
        log::warn!("no policy yet: the filter passes everything until etcd's is applied");
    } else if eng.applied.is_none() {
        log::warn!("no policy yet: the filter passes everything until one is PUT over the API");
    }
    eng.publish_metrics(&metrics);

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
    let events_error = match crate::dataplane::events::open_ring(&o.pin_dir) {
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
    let source = match (&o.policy, &o.etcd) {
        (Some(p), _) => Source::File(p.clone()),
        (None, Some(e)) => Source::Etcd(e.prefix.clone()),
        (None, None) => Source::Api,
    };
    metrics.set_sync(
        source.kind(),
        source.kind() == "api" || runtime.policy_error.is_none(),
    );
    let shared = Arc::new(Shared {
        published: eng.published.clone(),
        engine: Mutex::new(eng),
        runtime: Mutex::new(runtime),
        source,
        pin_dir: o.pin_dir.clone(),
        state_dir: o.state_dir.clone(),
        metrics: metrics.clone(),
        events: events_tx,
        events_error,
        overlay: Mutex::new(crate::autolock::Overlay::load(&o.state_dir)),
        max_body: o.api.max_body,
    });
    // Settle the inactive slot with the API already up: reads go on meanwhile, and a write
    // that arrives waits for it (as after a PUT).
    {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("keywall-settle".into())
            .spawn(move || {
                if let Err(e) = sh.engine.lock().unwrap().settle() {
                    log::error!("settling the inactive slot: {e:#}");
                }
            })?;
    }
    log::info!("API on {}", o.api.addr);
    rt.spawn(api::serve(api_listener, shared.clone()));
    if let Some(e) = o.etcd.clone() {
        crate::source::etcd::spawn(e.clone(), shared.clone())?;
        // The edge's activity for `keywall fleet` (fleet.rs): its only write to etcd.
        crate::fleet::spawn_publisher(e, o.edge_id.clone(), o.activity_every, shared.clone())?;
    }
    if let Some(l) = metrics_listener {
        log::info!(
            "metrics on http://{}/metrics",
            o.metrics.as_deref().unwrap_or("")
        );
        rt.spawn(api::serve_metrics(l, metrics.clone()));
    }

    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_sighup as *const () as libc::sighandler_t);
    }
    log::info!(
        "enforcing; policy generation {}; policy source: {}",
        shared.engine.lock().unwrap().mirror.generation(),
        shared.source.describe()
    );
    // Connections that passed bytes and lost their flow entry stay refused until they have
    // been idle for longer than servers keep connections; then the tuple is free again.
    spawn_held_gc(o.pin_dir.clone());
    // Idle keys and shared keys (issue 13): looks only while the policy asks for it.
    {
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("keywall-risk".into())
            .spawn(move || crate::source::autolock::run(sh, &STOP))?;
    }
    // Attached, the policy applied, the API bound: ready for systemd (Type=notify).
    crate::host::notify(&format!(
        "READY=1\nSTATUS=enforcing on {}; policy source: {}",
        o.ifaces.join(", "),
        shared.source.describe()
    ));
    let mut next_poll = Instant::now() + o.poll;
    // The hash of a text that needs a whole apply, read once (see below).
    let mut whole_candidate: Option<u64> = None;
    while !STOP.load(Ordering::SeqCst) {
        // Short naps: a signal does not cut a sleep short, and SIGHUP/SIGTERM should not
        // wait for a long --poll-ms.
        std::thread::sleep(o.poll.min(Duration::from_millis(50)));
        let reload = RELOAD.swap(false, Ordering::SeqCst);
        if !reload && Instant::now() < next_poll {
            continue;
        }
        next_poll = Instant::now() + o.poll;
        if reload && o.policy.is_none() {
            log::info!(
                "SIGHUP: nothing to reload, the policy source is {}",
                shared.source.describe()
            );
        }
        if let Some(p) = &o.policy {
            if reload {
                // SIGHUP reads the file again even if it looks unchanged.
                log::info!("SIGHUP: reloading {}", p.display());
                crate::host::notify("RELOADING=1");
                watch = FileWatch::default();
            }
            // SIGHUP promises a read now: a file written just before it is read once it
            // holds still, not reported unreadable.
            let changed = if reload {
                watch.changed_settled(p)
            } else {
                watch.changed(p)
            };
            let read = changed.is_some();
            if watch.settling {
                // Looked at again after the next nap, not a whole poll period later.
                next_poll = Instant::now();
            }
            if reload && changed.is_none() {
                // Unreadable: the running policy stays; tell systemd the reload is over.
                crate::host::notify("READY=1");
            }
            // An edit of `[[key]]` tables only: those tables parsed, their keys submitted as
            // ops, without parsing the whole file (seconds at 1M keys).
            let mut applied_before = None;
            let changed = match changed {
                Some(text) => {
                    let mut applied = watch.applied.take();
                    let edit = applied.as_ref().and_then(|old| {
                        let edit = crate::source::file::edit::toml_key_edit(old, &text)
                            .filter(|_| p.extension().is_none_or(|e| e != "json"))?;
                        Some((edit, old.rev))
                    });
                    let done = match edit {
                        Some(((edit, step), rev)) => {
                            apply_file_edit(&shared, p, edit, rev, &metrics, &o.state_dir)?
                                .then_some(step)
                        }
                        None => None,
                    };
                    match done {
                        Some(step) => {
                            if let Some(a) = applied.as_mut() {
                                a.advance(step);
                            }
                            watch.applied = applied;
                            if reload {
                                crate::host::notify("READY=1");
                            }
                            None
                        }
                        // Not an edit of key tables: the whole file is parsed, once the
                        // same bytes were read at two polls in a row. A file rewritten in
                        // place can be read cut short, and cut at a line end it is a valid
                        // policy missing keys; a whole apply takes seconds anyway.
                        None if !reload && whole_candidate != watch.hash => {
                            whole_candidate = watch.hash;
                            watch.meta = None;
                            watch.hash = None;
                            watch.applied = applied;
                            None
                        }
                        None => {
                            whole_candidate = None;
                            applied_before = applied;
                            Some(text)
                        }
                    }
                }
                None => None,
            };
            if changed.is_none() && read {
                // The text was read into free heap chunks (a 68 MB file at 1M keys): give
                // them back now, not at the next write's trim.
                crate::engine::trim_heap();
            }
            if let Some(text) = changed {
                // Parsed before the engine is locked: readers and the API go on meanwhile.
                let (parsed, kept) = parse_file(p, &text);
                drop(text);
                // What is kept of the text the engine enforces, should this one be rejected.
                let before = applied_before.take();
                // The daemon's automatic locks lie over the file (autolock.rs).
                let parsed = parsed.map(|mut pol| {
                    shared.overlay.lock().unwrap().apply(&mut pol);
                    pol
                });
                let mut eng = shared.engine.lock().unwrap();
                let mut runtime = shared.runtime.lock().unwrap();
                apply_file(&mut eng, p, parsed, &mut runtime, &metrics);
                watch.applied = if runtime.policy_error.is_none() {
                    kept
                } else {
                    before
                };
                // Report the outcome as soon as the maps enforce it; settling the inactive
                // slot afterwards changes no verdict.
                metrics.set_sync("file", runtime.policy_error.is_none());
                state::save_runtime(&o.state_dir, &runtime)?;
                if let Err(e) = eng.settle() {
                    log::error!("settling the inactive slot: {e:#}");
                }
                if reload {
                    crate::host::notify("READY=1");
                }
            }
        }
    }
    crate::host::notify("STOPPING=1");
    rt.shutdown_background();
    api::remove_socket(&o.api);
    // The links stay pinned: the program keeps enforcing after the daemon exits.
    log::info!("stopping; XDP stays attached and enforcing (keywall detach removes it)");
    Ok(())
}

/// How long a connection that passed bytes must have had no flow entry before its tuple is
/// forgotten (`KEYWALL_HELD_IDLE_SECS` overrides it). Servers close idle connections far
/// sooner (HTTP keep-alive ~1 min, TLS handshakes ~1 min, FIX heartbeats): set it above
/// theirs.
const HELD_IDLE: Duration = Duration::from_secs(600);

fn spawn_held_gc(pin_dir: PathBuf) {
    let idle = std::env::var("KEYWALL_HELD_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(HELD_IDLE);
    std::thread::spawn(move || {
        let mut gc = match crate::dataplane::HeldGc::open(&pin_dir, idle) {
            Ok(gc) => gc,
            Err(e) => {
                log::error!("held-connection sweep disabled: {e:#}");
                return;
            }
        };
        loop {
            std::thread::sleep(Duration::from_secs(30).min(idle.max(Duration::from_secs(1))));
            match gc.sweep() {
                Ok(0) => {}
                Ok(n) => log::info!("forgot {n} connections idle without a flow for {idle:?}"),
                Err(e) => log::warn!("held-connection sweep: {e:#}"),
            }
        }
    });
}

/// Refuses to attach over an XDP program that is not this keywall's (not reached through a
/// link pinned under `pin_dir`), or detaches it when `replace` says so.
fn check_foreign(iface: &str, pin_dir: &Path, replace: bool) -> Result<()> {
    if crate::dataplane::link_pin_path(pin_dir, iface).exists() {
        // Ours: the pinned link is taken over without a gap.
        return Ok(());
    }
    let found = crate::host::attached_xdp(iface)?;
    for a in &found {
        if !replace {
            bail!(
                "{iface} already runs XDP program {a}, which is not this keywall's (no link \
                 under {}); refusing to replace it: remove it, or pass --replace-foreign",
                pin_dir.display()
            );
        }
        log::warn!("--replace-foreign: detaching XDP program {a} from {iface}");
        crate::host::detach_foreign(iface, a)
            .with_context(|| format!("detaching {a} from {iface}"))?;
    }
    Ok(())
}
