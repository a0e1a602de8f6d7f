//! Runs the compiled XDP program through `BPF_PROG_TEST_RUN` with a policy loaded, and reports
//! the action and the reason the program counted for each frame.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use filter_common::Reason;
use keywall::{
    dataplane::{Capacity, Dataplane, Mirror, read_reasons},
    policy::Policy,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A loaded program with its own pin directory (removed on drop).
pub struct Loaded {
    pub dp: Dataplane,
    pub mirror: Mirror,
    pub pin_dir: PathBuf,
    /// Runs a connection's SYN before its first data segment (see `connect`).
    pub auto_syn: bool,
    connected: std::collections::HashSet<Vec<u8>>,
}

impl Loaded {
    pub fn new(policy_toml: &str) -> Result<Loaded> {
        Self::with_capacity(policy_toml, small_capacity())
    }

    pub fn with_capacity(policy_toml: &str, cap: Capacity) -> Result<Loaded> {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/kw-t-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let dp = Dataplane::load(&pin_dir, cap)?;
        let mirror = Mirror::read(&dp.maps)?;
        let mut l = Loaded {
            dp,
            mirror,
            pin_dir,
            auto_syn: true,
            connected: Default::default(),
        };
        l.apply(policy_toml)?;
        Ok(l)
    }

    pub fn apply(&mut self, policy_toml: &str) -> Result<()> {
        let p = Policy::from_toml_str(policy_toml).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.apply_policy(&p)
    }

    pub fn apply_policy(&mut self, p: &Policy) -> Result<()> {
        let c = p.compile().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let cap = self.dp.maps.key_stats.len();
        self.mirror.apply(&mut self.dp.maps, &c, cap)?;
        Ok(())
    }

    fn counters(&self) -> Vec<u64> {
        read_reasons(&self.dp.maps.reasons)
            .expect("reading counters")
            .iter()
            .map(|c| c.packets)
            .collect()
    }

    /// Before the first segment of a connection that begins with data, runs the SYN that
    /// opened it (the filter judges a stream from the start a recorded SYN puts it at), as
    /// a real client's handshake would. Off (`auto_syn = false`) for tests of connections
    /// whose SYN the filter never saw.
    pub fn connect(&mut self, frame: &[u8]) {
        if !self.auto_syn {
            return;
        }
        let Some(t) = crate::packet::tcp_tuple(frame) else {
            return;
        };
        if !self.connected.insert(t) {
            return;
        }
        if let Some(syn) = crate::packet::syn_for(frame) {
            let prog = self.dp.program().expect("program");
            prog.test_run(TestRunOptions {
                data_in: Some(&syn),
                repeat: 1,
                ..Default::default()
            })
            .expect("test run (SYN)");
        }
    }

    /// Runs one frame and asserts its reason and the action that goes with it (`what` names
    /// the step in a failure).
    pub fn expect(&mut self, frame: &[u8], reason: Reason, what: &str) {
        let (action, got, _) = self.run(frame);
        assert_eq!(got, reason, "{what}");
        let want = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
        assert_eq!(action, want, "{what}: action");
    }

    /// Runs one frame; returns the XDP action and the single reason counted for it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Reason, bool) {
        let (action, reason, audit, _) = self.run_out(frame);
        (action, reason, audit)
    }

    /// Like `run`, and also returns the frame as the program left it (what XDP_TX sends).
    pub fn run_out(&mut self, frame: &[u8]) -> (u32, Reason, bool, Vec<u8>) {
        self.connect(frame);
        let before = self.counters();
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.program().expect("program");
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")
            .expect("test run");
        let after = self.counters();
        // Slots past the reasons count drop events, not verdicts.
        let changed: Vec<usize> = (0..after.len())
            .filter(|i| *i < filter_common::COUNTER_EVENTS_SENT as usize)
            .filter(|i| after[*i] != before[*i])
            .collect();
        assert_eq!(
            changed.len(),
            1,
            "exactly one reason must be counted per packet, got slots {changed:?}"
        );
        let slot = changed[0] as u32;
        let audit = slot >= filter_common::AUDIT_OFFSET;
        let reason =
            Reason::from_u8((slot % filter_common::AUDIT_OFFSET) as u8).expect("valid reason slot");
        assert_eq!(after[changed[0]] - before[changed[0]], 1, "counted once");
        out.truncate((r.data_size_out as usize).min(out.len()));
        (r.return_value, reason, audit, out)
    }

    /// Runs `frame` `repeat` times and returns the kernel's average ns per run.
    pub fn time(&mut self, frame: &[u8], repeat: u32) -> f64 {
        self.connect(frame);
        let prog = self.dp.program().expect("program");
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .expect("test run");
        r.duration.as_nanos() as f64
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Small maps so many tests can load in parallel.
pub fn small_capacity() -> Capacity {
    Capacity {
        keys: 4096,
        allow: 16384,
        sets: 4096,
        flows: 4096,
        prefilter_words_log2: 12,
    }
}
