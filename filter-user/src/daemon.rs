//! `keywall run`: restore, attach, then keep the maps in step with the policy file.
//!
//! Order matters for "never a gap, never a wrong verdict": the last applied policy is written
//! into the maps before the program is attached (or before it takes over a pinned link), and a
//! new policy is validated completely before anything is written.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    dataplane::{Capacity, Dataplane, Mirror},
    policy::Policy,
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
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The daemon's policy engine: the applied policy, its mirror in the maps, and persistence.
pub struct Engine {
    pub dp: Dataplane,
    pub mirror: Mirror,
    pub applied: Option<Applied>,
    pub state_dir: PathBuf,
    pub audit: bool,
    pub key_cap: u32,
}

impl Engine {
    /// Validates, compiles and applies `p`; on any error nothing that is live changes.
    pub fn apply(&mut self, mut p: Policy, source: &str) -> Result<crate::dataplane::ApplyReport> {
        if self.audit {
            p.settings.enforce = false;
        }
        let compiled = p.compile().map_err(|errs| {
            anyhow::anyhow!(
                "policy rejected:\n{}",
                errs.iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
        let rep = self
            .mirror
            .apply(&mut self.dp.maps, &compiled, self.key_cap)?;
        let applied = Applied {
            revision: p.revision.unwrap_or(0),
            source: source.to_owned(),
            applied_unix: state::now_unix(),
            policy: p,
        };
        state::save_applied(&self.state_dir, &applied)?;
        self.applied = Some(applied);
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
    };

    // 1. Restore the last applied policy before anything is attached or taken over.
    match state::load_applied(&o.state_dir) {
        Ok(Some(a)) => {
            let rep = eng.apply(a.policy.clone(), &a.source)?;
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
        apply_file(&mut eng, p, &mut runtime);
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
        log::warn!("no policy yet: the filter passes everything until one is applied");
    }

    // 3. Attach, or take over the pinned links without a gap.
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

    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    log::info!("enforcing; policy generation {}", eng.mirror.generation());
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(o.poll);
        if let Some(p) = &o.policy {
            let stamp = file_stamp(p);
            if stamp.is_some() && stamp != last_stamp {
                last_stamp = stamp;
                apply_file(&mut eng, p, &mut runtime);
                state::save_runtime(&o.state_dir, &runtime)?;
            }
        }
    }
    // The links stay pinned: the program keeps enforcing after the daemon exits.
    log::info!("stopping; XDP stays attached and enforcing (keywall detach removes it)");
    Ok(())
}

fn apply_file(eng: &mut Engine, p: &Path, runtime: &mut Runtime) {
    let source = format!("file:{}", p.display());
    let res = load_policy_file(p).and_then(|pol| {
        if eng
            .applied
            .as_ref()
            .is_some_and(|a| a.policy == pol && a.source == source)
        {
            return Ok(None);
        }
        eng.apply(pol, &source).map(Some)
    });
    match res {
        Ok(Some(rep)) => {
            log::info!(
                "applied {} (generation {}, {} keys written, {:?})",
                p.display(),
                rep.generation,
                rep.keys_written,
                rep.elapsed
            );
            runtime.policy_error = None;
        }
        Ok(None) => runtime.policy_error = None,
        Err(e) => {
            log::error!("policy file rejected, the running policy stays: {e:#}");
            runtime.policy_error = Some(format!("{e:#}"));
        }
    }
}
