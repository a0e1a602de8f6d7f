//! Flood on veth: a live-frames generator (`BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`) in the client namespace rewrites each frame's source address
//! (65,536 sources) and redirects it into the client veth; the edge veth's NAPI thread, pinned
//! to its own core, runs whatever filter is under test. Rates are read from the edge's own
//! counters over a fixed window.

use std::{
    collections::BTreeMap,
    fs,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use super::{
    peers::enter_netns,
    rawbpf::{self, RawProg},
};
use crate::netns::ns_command;

/// Frames per test-run call: each call sets up and tears down a page pool.
pub const FRAMES_PER_CALL: u32 = 1 << 20;

/// The generator: a thread in the client netns pinned to one CPU, sending until stopped.
pub struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Generator {
    pub fn start(
        client_ns: &str,
        client_if: &str,
        frame: Vec<u8>,
        port_bits: u32,
        cpu: usize,
    ) -> Result<Generator> {
        ensure!(
            rawbpf::gen_template_ok(&frame, port_bits),
            "the flood template must be IPv4/TCP without options, source low 16 bits 0, IP ID 0xffff, sequence low 16 bits 0xfffe or 0xffff (and room for the port spread)"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let (ns, ifname) = (client_ns.to_owned(), client_if.to_owned());
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let frame_t = frame.clone();
        let handle = std::thread::spawn(move || -> Result<()> {
            let setup = (|| -> Result<RawProg> {
                enter_netns(&ns)?;
                pin_self(cpu)?;
                let ifindex = rawbpf::ifindex(&ifname)?;
                rawbpf::generator(ifindex, &frame_t, port_bits)
            })();
            let prog = match setup {
                Ok(p) => {
                    let _ = tx.send(Ok(()));
                    p
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = tx.send(Err(e));
                    bail!("generator setup: {msg}");
                }
            };
            while !stop2.load(Ordering::Relaxed) {
                prog.send_live(&frame, FRAMES_PER_CALL)?;
                sent2.fetch_add(u64::from(FRAMES_PER_CALL), Ordering::Relaxed);
            }
            Ok(())
        });
        rx.recv()
            .map_err(|_| anyhow!("generator thread died during setup"))??;
        Ok(Generator {
            stop,
            sent,
            handle: Some(handle),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops after the call under way; returns how many frames were sent in all.
    pub fn stop(mut self) -> Result<u64> {
        self.finish()?;
        Ok(self.sent())
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("generator panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn pin_self(cpu: usize) -> Result<()> {
    pin_task(0, cpu)
}

/// Pins a task (0: the calling thread) to one CPU.
pub fn pin_task(pid: i32, cpu: usize) -> Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({pid}, cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Turns threaded NAPI on for `iface` in `ns` (sysfs must be the netns's own, hence
/// `ip netns exec`, which mounts it).
pub fn set_threaded(ns: &str, iface: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!("echo 1 > /sys/class/net/{iface}/threaded"))
        .output()
        .context("ip netns exec")?;
    ensure!(
        out.status.success(),
        "threaded NAPI on {iface}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The kernel threads `napi/<iface>-<id>`.
pub fn napi_threads(iface: &str) -> Vec<i32> {
    let want = format!("napi/{iface}-");
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = fs::read_to_string(format!("/proc/{pid}/comm"))
            && c.trim_end().starts_with(&want)
        {
            v.push(pid);
        }
    }
    v
}

/// utime + stime of a task, in clock ticks.
fn task_ticks(pid: i32) -> u64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// Busy and total ticks of one CPU from /proc/stat.
fn cpu_ticks(cpu: usize) -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let name = format!("cpu{cpu} ");
    for l in s.lines() {
        if let Some(r) = l.strip_prefix(&name) {
            let v: Vec<u64> = r
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            return (total - idle, total);
        }
    }
    (0, 0)
}

fn clk_tck() -> f64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `ethtool -S` of an interface in a netns, as name -> value.
pub fn ethtool_stats(ns: &str, iface: &str) -> Result<BTreeMap<String, u64>> {
    let out = ns_command(ns, "ethtool")
        .args(["-S", iface])
        .output()
        .context("ethtool -S")?;
    ensure!(out.status.success(), "ethtool -S {iface} failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// The interface's link counters (`ip -s -j link`): rx packets and rx dropped.
pub fn link_stats(ns: &str, iface: &str) -> Result<(u64, u64)> {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", iface])
        .output()
        .context("ip -s -j link")?;
    ensure!(out.status.success(), "ip -s link show {iface} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rx = &v[0]["stats64"]["rx"];
    Ok((
        rx["packets"].as_u64().unwrap_or(0),
        rx["dropped"].as_u64().unwrap_or(0),
    ))
}

/// One sample of everything the flood reads, taken at `at`.
pub struct Sample {
    pub at: Instant,
    pub edge: BTreeMap<String, u64>,
    pub client: BTreeMap<String, u64>,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub napi_ticks: u64,
    pub cpu_busy: u64,
    pub cpu_total: u64,
    /// The filter's own drop counter (keywall reason, nft rule counter), when it has one.
    pub filter_drops: u64,
}

pub struct Rig<'a> {
    pub edge_ns: &'a str,
    pub edge_if: &'a str,
    pub client_ns: &'a str,
    pub client_if: &'a str,
    pub gen_cpu: usize,
    pub edge_cpu: usize,
    /// Run the edge's NAPI thread SCHED_FIFO, so that other work on a shared machine cannot
    /// take the edge core from it (the kernel's RT throttling still leaves others 5%).
    pub rt_napi: bool,
}

impl Rig<'_> {
    /// Pins the edge's NAPI thread(s) to the edge CPU; returns them.
    pub fn pin_napi(&self) -> Vec<i32> {
        let t = napi_threads(self.edge_if);
        for pid in &t {
            let _ = pin_task(*pid, self.edge_cpu);
            if self.rt_napi {
                let p = libc::sched_param { sched_priority: 1 };
                unsafe { libc::sched_setscheduler(*pid, libc::SCHED_FIFO, &p) };
            }
        }
        t
    }

    pub fn sample(&self, napi: &[i32], filter_drops: u64) -> Result<Sample> {
        let (rx_packets, rx_dropped) = link_stats(self.edge_ns, self.edge_if)?;
        let (cpu_busy, cpu_total) = cpu_ticks(self.edge_cpu);
        Ok(Sample {
            at: Instant::now(),
            edge: ethtool_stats(self.edge_ns, self.edge_if)?,
            client: ethtool_stats(self.client_ns, self.client_if)?,
            rx_packets,
            rx_dropped,
            napi_ticks: napi.iter().map(|p| task_ticks(*p)).sum(),
            cpu_busy,
            cpu_total,
            filter_drops,
        })
    }
}

/// What one window measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    pub secs: f64,
    /// Frames the client veth put into the edge's ring (ndo_xdp_xmit accepted).
    pub offered_mpps: f64,
    /// Frames that did not fit the edge's ring (xmit errors) or that the edge dropped outside
    /// the filter (rx_dropped).
    pub ring_overflow_mpps: f64,
    pub rx_dropped_mpps: f64,
    /// Frames the edge's XDP program dropped.
    pub xdp_drop_mpps: f64,
    /// Frames that reached the edge's stack (rx_packets).
    pub stack_mpps: f64,
    /// The filter's own drop counter.
    pub filter_drop_mpps: f64,
    /// The edge NAPI thread's CPU time, in % of one core.
    pub napi_cpu_pct: f64,
    /// The edge CPU's busy time (all tasks and softirqs), in %.
    pub edge_cpu_pct: f64,
}

impl Window {
    /// The edge NAPI thread's CPU time per frame it took from the ring, in ns: the cost of
    /// the filter and the path behind it, whatever else competes for the core.
    pub fn napi_ns_per_frame(&self) -> f64 {
        if self.offered_mpps <= 0.0 {
            return 0.0;
        }
        self.napi_cpu_pct / 100.0 * 1e3 / self.offered_mpps
    }
}

fn delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, key: &str) -> u64 {
    b.get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(a.get(key).copied().unwrap_or(0))
}

pub fn window(a: &Sample, b: &Sample) -> Window {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let m = |n: u64| n as f64 / secs / 1e6;
    let pct_ticks = |t: u64| t as f64 / clk_tck() / secs * 100.0;
    let sum_q = |s: &BTreeMap<String, u64>, t: &BTreeMap<String, u64>, suffix: &str| -> u64 {
        t.keys()
            .filter(|k| {
                k.starts_with("rx_queue_") && k.ends_with(suffix)
                    || k.starts_with("tx_queue_") && k.ends_with(suffix)
            })
            .map(|k| delta(s, t, k))
            .sum()
    };
    let busy = b.cpu_busy.saturating_sub(a.cpu_busy) as f64;
    let total = b.cpu_total.saturating_sub(a.cpu_total).max(1) as f64;
    Window {
        secs,
        offered_mpps: m(sum_q(&a.client, &b.client, "_xdp_xmit")),
        ring_overflow_mpps: m(sum_q(&a.client, &b.client, "_xdp_xmit_errors")),
        rx_dropped_mpps: m(b.rx_dropped.saturating_sub(a.rx_dropped)),
        xdp_drop_mpps: m(sum_q(&a.edge, &b.edge, "_xdp_drops")),
        stack_mpps: m(b.rx_packets.saturating_sub(a.rx_packets)),
        filter_drop_mpps: m(b.filter_drops.saturating_sub(a.filter_drops)),
        napi_cpu_pct: pct_ticks(b.napi_ticks.saturating_sub(a.napi_ticks)),
        edge_cpu_pct: busy / total * 100.0,
    }
}

/// Runs the generator for `warmup + secs`, sampling over the last `secs`; `drops` reads the
/// filter's own drop counter. `port_bits`: the generator also spreads the source port over
/// 2^port_bits values (see `rawbpf::generator_insns`).
pub fn measure(
    rig: &Rig,
    frame: &[u8],
    port_bits: u32,
    warmup: Duration,
    secs: Duration,
    drops: &mut dyn FnMut() -> Result<u64>,
) -> Result<Window> {
    let napi = rig.pin_napi();
    let gen_ = Generator::start(
        rig.client_ns,
        rig.client_if,
        frame.to_vec(),
        port_bits,
        rig.gen_cpu,
    )?;
    std::thread::sleep(warmup);
    // NAPI threads may appear once traffic flows (veth adds its NAPI on demand).
    let napi = if napi.is_empty() {
        rig.pin_napi()
    } else {
        napi
    };
    let a = rig.sample(&napi, drops()?)?;
    std::thread::sleep(secs);
    let b = rig.sample(&napi, drops()?)?;
    let sent = gen_.stop()?;
    ensure!(sent > 0, "the generator sent nothing");
    Ok(window(&a, &b))
}

/// nftables in the edge netns: a netdev ingress chain on the edge veth that drops TCP to the
/// listener port from every source outside the allowed hosts and networks.
pub struct Nft {
    ns: String,
    table: String,
}

impl Nft {
    pub fn load(
        ns: &str,
        iface: &str,
        port: u16,
        hosts: &[[u8; 4]],
        nets: &[([u8; 4], u8)],
        dir: &std::path::Path,
    ) -> Result<Nft> {
        use std::fmt::Write as _;
        let table = "kwbench".to_owned();
        let ip = |a: &[u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
        let mut f = String::new();
        let _ = writeln!(f, "table netdev {table} {{");
        let _ = write!(
            f,
            "  set allowed_hosts {{ type ipv4_addr; size {}; elements = {{ ",
            hosts.len() + 1024
        );
        for (i, h) in hosts.iter().enumerate() {
            if i > 0 {
                f.push_str(", ");
            }
            f.push_str(&ip(h));
        }
        f.push_str(" }\n  }\n");
        let _ = write!(
            f,
            "  set allowed_nets {{ type ipv4_addr; flags interval; elements = {{ "
        );
        for (i, (a, p)) in nets.iter().enumerate() {
            if i > 0 {
                f.push_str(", ");
            }
            let _ = write!(f, "{}/{p}", ip(a));
        }
        f.push_str(" }\n  }\n");
        let _ = writeln!(
            f,
            "  chain ingress {{\n    type filter hook ingress device \"{iface}\" priority 0; policy accept;\n    tcp dport {port} ip saddr != @allowed_hosts ip saddr != @allowed_nets counter drop\n  }}\n}}"
        );
        let path = dir.join("kwbench.nft");
        fs::write(&path, f)?;
        let out = ns_command(ns, "nft")
            .arg("-f")
            .arg(&path)
            .output()
            .context("nft -f")?;
        let _ = fs::remove_file(&path);
        ensure!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Nft {
            ns: ns.to_owned(),
            table,
        })
    }

    /// Packets counted by the drop rule.
    pub fn drops(&self) -> Result<u64> {
        let out = ns_command(&self.ns, "nft")
            .args(["-j", "list", "chain", "netdev", &self.table, "ingress"])
            .output()
            .context("nft list chain")?;
        ensure!(out.status.success(), "nft list chain failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut n = 0;
        for item in v["nftables"].as_array().into_iter().flatten() {
            for e in item["rule"]["expr"].as_array().into_iter().flatten() {
                if let Some(p) = e["counter"]["packets"].as_u64() {
                    n += p;
                }
            }
        }
        Ok(n)
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = ns_command(&self.ns, "nft")
            .args(["delete", "table", "netdev", &self.table])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rates_come_from_counter_deltas() {
        let t0 = Instant::now();
        let mk = |at: Instant, xmit: u64, err: u64, drops: u64, rx: u64| Sample {
            at,
            edge: [("rx_queue_0_xdp_drops".to_owned(), drops)].into(),
            client: [
                ("tx_queue_0_xdp_xmit".to_owned(), xmit),
                ("tx_queue_0_xdp_xmit_errors".to_owned(), err),
            ]
            .into(),
            rx_packets: rx,
            rx_dropped: 0,
            napi_ticks: 0,
            cpu_busy: 0,
            cpu_total: 100,
            filter_drops: drops,
        };
        let a = mk(t0, 0, 0, 0, 0);
        let b = mk(
            t0 + Duration::from_secs(2),
            8_000_000,
            2_000_000,
            6_000_000,
            10,
        );
        let w = window(&a, &b);
        assert!((w.offered_mpps - 4.0).abs() < 1e-9);
        assert!((w.ring_overflow_mpps - 1.0).abs() < 1e-9);
        assert!((w.xdp_drop_mpps - 3.0).abs() < 1e-9);
        assert!((w.filter_drop_mpps - 3.0).abs() < 1e-9);
    }
}
