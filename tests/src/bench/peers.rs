//! The peers the bench puts beside keywall: xdp-filter's own compiled program, loaded from the
//! object Debian ships (libxdp1, installed with xdp-tools), and helpers to run code inside a
//! network namespace.

use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuHashMap, PerCpuValues},
    programs::{TestRun as _, TestRunOptions, Xdp, XdpMode},
    util::nr_cpus,
};

/// What `xdp-filter load -p deny -f ipv4,ipv6` loads: deny policy, IP features only.
pub const XDPFILT_OBJECT: &str = "xdpfilt_dny_ip.o";
pub const XDPFILT_PROGRAM: &str = "xdpfilt_dny_ip";
/// xdp-filter's map value bit for "match as source" (`MAP_FLAG_SRC`).
const MAP_FLAG_SRC: u64 = 1;

/// Where Debian (and other distributions) put libxdp's BPF objects.
pub fn find_xdpfilt_object() -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/lib/bpf".into(), "/usr/local/lib/bpf".into()];
    if let Ok(rd) = fs::read_dir("/usr/lib") {
        for e in rd.flatten() {
            dirs.push(e.path().join("bpf"));
        }
    }
    dirs.into_iter()
        .map(|d| d.join(XDPFILT_OBJECT))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "{XDPFILT_OBJECT} not found under /usr/lib/*/bpf: install xdp-tools (libxdp1); `cargo xtask setup` does"
            )
        })
}

/// xdp-filter's program with its IPv4 and IPv6 deny maps raised from 10,000 entries (as
/// shipped) to hold the addresses given.
pub struct XdpFilter {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub v4_entries: usize,
    pub v6_entries: usize,
    link: Option<aya::programs::xdp::XdpLinkId>,
}

impl XdpFilter {
    pub fn load(pin_dir: &Path, v4: &[[u8; 4]], v6: &[[u8; 16]]) -> Result<XdpFilter> {
        let obj = find_xdpfilt_object()?;
        let bytes = fs::read(&obj).with_context(|| format!("reading {}", obj.display()))?;
        let _ = fs::remove_dir_all(pin_dir);
        fs::create_dir_all(pin_dir)?;
        // The object pins its maps by name; keep them in our own directory.
        let cap = |n: usize| (n as u32 + 1024).max(10_000);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries("filter_ipv4", cap(v4.len()))
            .map_max_entries("filter_ipv6", cap(v6.len()))
            .load(&bytes)
            .with_context(|| format!("loading {} with aya", obj.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(XDPFILT_PROGRAM)
            .ok_or_else(|| anyhow!("no program {XDPFILT_PROGRAM} in {}", obj.display()))?
            .try_into()?;
        prog.load().context("loading xdp-filter's program")?;
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        let src = || PerCpuValues::try_from(vec![MAP_FLAG_SRC; cpus]).expect("per-CPU values");
        {
            let mut m: PerCpuHashMap<&mut MapData, u32, u64> = PerCpuHashMap::try_from(
                ebpf.map_mut("filter_ipv4")
                    .ok_or_else(|| anyhow!("no filter_ipv4"))?,
            )?;
            for a in v4 {
                m.insert(u32::from_ne_bytes(*a), src(), 0)
                    .context("filling filter_ipv4")?;
            }
        }
        {
            let mut m: PerCpuHashMap<&mut MapData, [u8; 16], u64> = PerCpuHashMap::try_from(
                ebpf.map_mut("filter_ipv6")
                    .ok_or_else(|| anyhow!("no filter_ipv6"))?,
            )?;
            for a in v6 {
                m.insert(*a, src(), 0).context("filling filter_ipv6")?;
            }
        }
        Ok(XdpFilter {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            v4_entries: v4.len(),
            v6_entries: v6.len(),
            link: None,
        })
    }

    fn prog(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDPFILT_PROGRAM)
            .expect("xdp-filter program")
            .try_into()
            .expect("XDP")
    }

    /// The kernel's id of the loaded program.
    pub fn prog_id(&mut self) -> Option<u32> {
        self.prog().info().ok().map(|i| i.id())
    }

    /// Average ns per run and the action it returned.
    pub fn time(&mut self, frame: &[u8], repeat: u32) -> Result<(f64, u32)> {
        let r = self
            .prog()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (xdp-filter)")?;
        Ok((r.duration.as_nanos() as f64, r.return_value))
    }

    /// Attaches natively to `iface` (looked up in the calling thread's netns).
    pub fn attach(&mut self, iface: &str) -> Result<()> {
        ensure!(self.link.is_none(), "xdp-filter already attached");
        let id = self
            .prog()
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching xdp-filter's program to {iface}"))?;
        self.link = Some(id);
        Ok(())
    }

    pub fn detach(&mut self) -> Result<()> {
        if let Some(id) = self.link.take() {
            self.prog().detach(id).context("detaching xdp-filter")?;
        }
        Ok(())
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = self.detach();
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// Moves the calling thread into the named netns (`/run/netns/NAME`).
pub fn enter_netns(ns: &str) -> Result<()> {
    let f = fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({ns}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside netns `ns` (interface names and ifindexes resolve there).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread in netns {ns} panicked"))?
    })
}
