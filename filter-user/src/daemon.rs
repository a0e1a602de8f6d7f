//! `keywall run`: restore, attach, then keep the maps in step with the policy source (the
//! policy file, or the API when there is no file).
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
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::engine::{Change, Refused, Restored, Rev, Submitted};
pub use crate::engine::{Engine, Fold, JOURNAL_COMPACT, PatchFailure, Persist};
use crate::{
    api::{self, ApiConfig, Shared, Source},
    dataplane::{Capacity, Dataplane, Mirror},
    metrics::Metrics,
    policy::{PatchOp, Policy},
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
    pub etcd: Option<crate::etcd::EtcdConfig>,
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

/// Watches the policy file at the cost of one `stat` per poll: the file is read (and hashed)
/// only when its size, mtime, ctime or inode moved, and parsed only when its bytes changed.
#[derive(Default)]
struct FileWatch {
    meta: Option<(SystemTime, i64, i64, u64, u64)>,
    hash: Option<u64>,
    /// The text last applied and the revision its head says: the next edit is compared
    /// with it (file_edit.rs). None after a rejected text or a SIGHUP.
    applied: Option<(String, Option<u64>)>,
    /// The last call found the file being written: look again soon.
    settling: bool,
}

/// A file modified less than this long ago may be between a writer's truncate and its
/// write (an empty file is a valid, empty policy): it is read once it holds still.
const FILE_SETTLE: Duration = Duration::from_millis(20);

impl FileWatch {
    /// The file's text if it changed since the last call (None: unchanged or unreadable).
    fn changed(&mut self, p: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt as _;
        let stat = || {
            let m = std::fs::metadata(p).ok()?;
            Some((
                m.modified().ok()?,
                m.ctime(),
                m.ctime_nsec(),
                m.ino(),
                m.len(),
            ))
        };
        self.settling = false;
        let meta = stat()?;
        if self.meta == Some(meta) {
            return None;
        }
        // Rewritten in place (truncated, then written), the file can be read empty or half
        // written: read it once it holds still rather than apply part of it.
        if SystemTime::now()
            .duration_since(meta.0)
            .is_ok_and(|d| d < FILE_SETTLE)
        {
            self.settling = true;
            return None;
        }
        let bytes = std::fs::read(p).ok()?;
        if stat()? != meta {
            self.settling = true;
            return None;
        }
        self.meta = Some(meta);
        let hash = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        if self.hash == Some(hash) {
            return None; // touched, not changed
        }
        self.hash = Some(hash);
        match String::from_utf8(bytes) {
            Ok(t) => Some(t),
            // Not UTF-8: let the parser say so.
            Err(e) => Some(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }
    }
}

fn parse_policy_file(p: &Path, text: &str) -> Result<Policy> {
    Policy::from_file_text(p, text).map_err(|errs| {
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
        crate::etcd::forget(&o.state_dir);
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
        let mut text = watch.changed(p);
        for _ in 0..100 {
            if text.is_some() || !watch.settling {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            text = watch.changed(p);
        }
        let parsed = match &text {
            Some(text) => parse_policy_file(p, text),
            None => Err(anyhow::anyhow!("cannot read {}", p.display())),
        };
        let file_rev = parsed.as_ref().ok().map(|p| p.revision);
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
            watch.applied = text.zip(file_rev);
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
    metrics.set_policy(&eng);

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
        crate::etcd::spawn(e.clone(), shared.clone())?;
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
            .spawn(move || crate::autolock::run(sh, &STOP))?;
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
            let changed = watch.changed(p);
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
                    let applied = watch.applied.take();
                    let edit = applied.as_ref().and_then(|(old, rev)| {
                        let edit = crate::file_edit::toml_key_edit(old, &text)
                            .filter(|_| p.extension().is_none_or(|e| e != "json"))?;
                        Some((edit, *rev))
                    });
                    let done = match edit {
                        Some((edit, rev)) => {
                            apply_file_edit(&shared, p, edit, rev, &metrics, &o.state_dir)?
                                .then_some(rev)
                        }
                        None => None,
                    };
                    match done {
                        Some(rev) => {
                            watch.applied = Some((text, rev));
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
            if let Some(text) = changed {
                // Parsed before the engine is locked: readers and the API go on meanwhile.
                let parsed = parse_policy_file(p, &text);
                let file_rev = parsed.as_ref().ok().map(|p| p.revision);
                // The text the engine enforces, should this one be rejected.
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
                    Some(text).zip(file_rev)
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

/// The revision a file gets: its own `revision` if it says one, else one past the applied.
pub fn file_revision(file_rev: Option<u64>, applied: u64) -> u64 {
    file_rev.unwrap_or(applied + 1)
}

/// The ops that turn the applied policy into `pol`, when only keys differ (settings,
/// listeners and ipsets equal) and few enough of them do: None means a whole apply.
/// Costs one comparison per key, no compile.
fn key_diff(eng: &Engine, pol: &Policy) -> Option<Vec<PatchOp>> {
    let a = eng.applied.as_ref()?;
    eng.compiled.as_ref()?;
    if pol.settings != a.head.settings
        || pol.listener != a.head.listener
        || pol.ipsets != a.head.ipsets
    {
        return None;
    }
    let limit = 64 + pol.key.len() / 8;
    let mut seen = std::collections::HashSet::with_capacity(pol.key.len());
    let mut ops = Vec::new();
    for k in &pol.key {
        if !seen.insert(k.prefix.as_str()) {
            return None; // a duplicate: the whole path reports it with its place
        }
        if let Some(op) = key_op(&a.keys, k) {
            ops.push(op);
        }
        if ops.len() > limit {
            return None;
        }
    }
    if a.keys.len() + ops.len() > seen.len() {
        for prefix in a.keys.prefixes() {
            if !seen.contains(prefix.as_str()) {
                ops.push(PatchOp::Delete { prefix });
                if ops.len() > limit {
                    return None;
                }
            }
        }
    }
    Some(ops)
}

/// The op that makes the applied key `k.prefix` into `k` (None: they are the same).
fn key_op(keys: &crate::engine::store::KeyStore, k: &crate::policy::Key) -> Option<PatchOp> {
    // Bytes first (one key serialised), the parsed key only when they differ.
    let lock_only = match keys.same(k) {
        Some(true) => return None,
        Some(false) => keys.get(&k.prefix).is_some_and(|old| {
            crate::policy::Key {
                locked: k.locked,
                lock_reason: k.lock_reason.clone(),
                locked_until: k.locked_until.clone(),
                ..old
            } == *k
        }),
        None => false,
    };
    let prefix = k.prefix.clone();
    Some(match (lock_only, k.locked) {
        (true, true) => PatchOp::Lock {
            prefix,
            lock_reason: k.lock_reason.clone(),
            locked_until: k.locked_until.clone(),
        },
        (true, false) => PatchOp::Unlock { prefix },
        (false, _) => PatchOp::Upsert { key: k.clone() },
    })
}

/// The ops of a key-table edit (file_edit.rs): the new tables' keys against the applied
/// ones, and the old tables' keys that are gone. None (the whole path decides) for a key
/// named twice in the tables, or a new key that another table of the file already holds.
fn edit_ops(eng: &Engine, edit: &crate::file_edit::KeyEdit) -> Option<Vec<PatchOp>> {
    use std::collections::HashSet;
    let a = eng.applied.as_ref()?;
    eng.compiled.as_ref()?;
    let old: HashSet<&str> = edit.old.iter().map(|k| k.prefix.as_str()).collect();
    if old.len() != edit.old.len() {
        return None;
    }
    let mut seen = HashSet::with_capacity(edit.new.len());
    let mut ops = Vec::new();
    for k in &edit.new {
        if !seen.insert(k.prefix.as_str())
            || (!old.contains(k.prefix.as_str()) && a.keys.contains(&k.prefix))
        {
            return None;
        }
        ops.extend(key_op(&a.keys, k));
    }
    for prefix in old {
        if !seen.contains(prefix) && a.keys.contains(prefix) {
            ops.push(PatchOp::Delete {
                prefix: prefix.to_owned(),
            });
        }
    }
    Some(ops)
}

/// Applies a key-table edit of the policy file as ops, as `apply_file` would have after
/// parsing the whole file; `file_rev` is the revision the file's (unchanged) head says.
/// False: not applied, the caller parses the whole file (which reports any error in it).
fn apply_file_edit(
    shared: &Shared,
    p: &Path,
    mut edit: crate::file_edit::KeyEdit,
    file_rev: Option<u64>,
    metrics: &Metrics,
    state_dir: &Path,
) -> Result<bool> {
    // The daemon's automatic locks lie over the file (autolock.rs).
    {
        let mut pol = Policy {
            key: std::mem::take(&mut edit.new),
            ..Default::default()
        };
        shared.overlay.lock().unwrap().apply(&mut pol);
        edit.new = pol.key;
    }
    let mut eng = shared.engine.lock().unwrap();
    let Some(ops) = edit_ops(&eng, &edit) else {
        return Ok(false);
    };
    let source = format!("file:{}", p.display());
    let mut runtime = shared.runtime.lock().unwrap();
    let same = file_rev.is_none_or(|r| r == eng.revision())
        && eng.applied.as_ref().is_some_and(|a| a.source == source);
    if ops.is_empty() && same {
        runtime.policy_error = None;
        return Ok(true);
    }
    let rev = file_revision(file_rev, eng.revision());
    match eng.submit(Change::Ops(ops), Rev::Set(rev), &source) {
        Ok(Submitted::Applied { revision, report }) => log::info!(
            "applied an edit of {} key tables in {} as revision {revision} (generation {}, {} keys written, {:?})",
            edit.new.len().max(edit.old.len()),
            p.display(),
            report.generation,
            report.keys_written,
            report.elapsed
        ),
        Ok(Submitted::Unchanged { .. }) => {}
        // Invalid, or in conflict: the whole path reports it with its file place.
        Err(_) => return Ok(false),
    }
    runtime.policy_error = None;
    metrics.set_sync("file", true);
    state::save_runtime(state_dir, &runtime)?;
    if let Err(e) = eng.settle() {
        log::error!("settling the inactive slot: {e:#}");
    }
    Ok(true)
}

fn apply_file(
    eng: &mut Engine,
    p: &Path,
    parsed: Result<Policy>,
    runtime: &mut Runtime,
    metrics: &Metrics,
) {
    let source = format!("file:{}", p.display());
    let mut pol = match parsed {
        Ok(pol) => pol,
        Err(e) => {
            log::error!("policy file rejected, the running policy stays: {e:#}");
            runtime.policy_error = Some(format!("{e:#}"));
            metrics.update("file", "rejected");
            return;
        }
    };
    let rev = file_revision(pol.revision, eng.revision());
    // Only keys changed: submitted as their ops, at the cost of the keys that changed.
    let mut res = None;
    if let Some(ops) = key_diff(eng, &pol) {
        let same = pol.revision.is_none_or(|r| r == eng.revision())
            && eng.applied.as_ref().is_some_and(|a| a.source == source);
        if ops.is_empty() && same {
            runtime.policy_error = None;
            return;
        }
        match eng.submit(Change::Ops(ops), Rev::Set(rev), &source) {
            // Invalid: the whole path below reports every error with its file place.
            Err(Refused::Invalid(_)) => {}
            r => res = Some(r),
        }
    }
    let res = match res {
        Some(r) => r,
        None => match crate::engine::compile_whole(&mut pol) {
            Ok(c) => eng.submit(
                Change::Policy(Box::new(pol), Box::new(c)),
                Rev::Set(rev),
                &source,
            ),
            Err(errs) => {
                metrics.update("file", "rejected");
                Err(Refused::Invalid(errs))
            }
        },
    };
    match res {
        Ok(Submitted::Applied { revision, report }) => {
            log::info!(
                "applied {} as revision {revision} (generation {}, {} keys written, {:?})",
                p.display(),
                report.generation,
                report.keys_written,
                report.elapsed
            );
            runtime.policy_error = None;
        }
        Ok(Submitted::Unchanged { .. }) => runtime.policy_error = None,
        Err(e) => {
            let msg = match e {
                Refused::Invalid(errs) => format!(
                    "policy rejected:\n{}",
                    errs.iter()
                        .map(|e| format!("  {e}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                Refused::Conflict { why, .. } => why,
                Refused::Failed(e) => format!("{e:#}"),
            };
            log::error!("policy file rejected, the running policy stays: {msg}");
            runtime.policy_error = Some(msg);
        }
    }
}
