//! Fleet propagation: from an etcd write of a lock to the drop on each of three edges.
//!
//! Three edge daemons (`keywall run --etcd`), each in its own sandbox, watch one real etcd.
//! A client in the test process puts `keys/bk000000` locked; the clock starts before the put
//! and stops, per edge, when that edge's pinned program drops the next packet of an
//! established connection of that key (BPF_PROG_TEST_RUN on the live program: its verdict
//! is the kernel's, on the maps the daemon wrote). The lock is then undone, untimed.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;
use etcd_client::Client;
use serde_json::json;

use crate::{
    api_bench::{ApiDaemon, bench_policy},
    etcd::{ETCD_URL, EtcdServer},
    harness::{XDP_DROP, XDP_PASS},
    netns::Sandbox,
    packet::{Pkt, http_request},
};

const EDGES: usize = 3;
const PORT: u16 = 8080;
const CLIENT: [u8; 4] = [10, 200, 0, 7];
const SERVER: [u8; 4] = [10, 200, 0, 1];
pub const PREFIX: &str = "/keywall-bench/";

/// Writes a policy (as the API JSON of [`bench_policy`]) into etcd's layout under `prefix`.
pub fn etcdctl_policy(etcd: &EtcdServer, prefix: &str, p: &serde_json::Value) -> Result<()> {
    etcd.put(
        &format!("{prefix}settings"),
        &json!({"settings": p["settings"], "listener": p["listener"]}).to_string(),
    )?;
    for k in p["key"].as_array().into_iter().flatten() {
        let name = k["prefix"].as_str().context("key prefix")?;
        etcd.put(&format!("{prefix}keys/{name}"), &k.to_string())?;
    }
    Ok(())
}

fn run_frame(prog: &Xdp, frame: &[u8]) -> Result<u32> {
    // Its connection's SYN first (the filter judges a stream only from a recorded start);
    // a repeat of the same SYN changes nothing.
    if let Some(syn) = crate::packet::syn_for(frame) {
        prog.test_run(TestRunOptions {
            data_in: Some(&syn),
            repeat: 1,
            ..Default::default()
        })?;
    }
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN on an edge's program")?;
    Ok(r.return_value)
}

/// Writes `p` (the API JSON of [`bench_policy`]) into etcd's layout under `prefix` with the
/// client API: the settings first, then the keys in transactions of 128 puts (etcd's default
/// `--max-txn-ops`), 8 transactions in flight. Returns the time it took.
pub fn put_policy_batched(
    etcd: &EtcdServer,
    prefix: &str,
    p: &serde_json::Value,
) -> Result<Duration> {
    use etcd_client::{Txn, TxnOp};
    let settings = json!({"settings": p["settings"], "listener": p["listener"]}).to_string();
    let mut ops: Vec<(String, String)> = Vec::new();
    for k in p["key"].as_array().into_iter().flatten() {
        let name = k["prefix"].as_str().context("key prefix")?;
        ops.push((format!("{prefix}keys/{name}"), k.to_string()));
    }
    let t0 = Instant::now();
    etcd.in_ns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c = Client::connect([ETCD_URL], None).await?;
            c.put(format!("{prefix}settings"), settings, None).await?;
            const WORKERS: usize = 8;
            let chunks: Vec<Vec<(String, String)>> = ops.chunks(128).map(|c| c.to_vec()).collect();
            let mut set = tokio::task::JoinSet::new();
            let chunks = std::sync::Arc::new(chunks);
            for w in 0..WORKERS {
                let mut kv = c.kv_client();
                let chunks = chunks.clone();
                set.spawn(async move {
                    for ch in chunks.iter().skip(w).step_by(WORKERS) {
                        let txn = Txn::new().and_then(
                            ch.iter()
                                .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                                .collect::<Vec<_>>(),
                        );
                        kv.txn(txn).await?;
                    }
                    anyhow::Ok(())
                });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            anyhow::Ok(())
        })
    })?;
    Ok(t0.elapsed())
}

/// `writes` locks, each timed to the drop on every edge: `out[i][e]` is write i on edge e.
/// A 100-key policy; see [`propagation_at`].
pub fn propagation(writes: usize) -> Result<Vec<Vec<Duration>>> {
    Ok(fleet_at(100, 0, writes)?.prop)
}

/// The fleet at one policy size.
#[derive(Clone, Debug)]
pub struct FleetFigures {
    pub keys: usize,
    /// Writing the policy into etcd (transactions of 128 puts).
    pub populate: Duration,
    /// Edge 1, alone: from `keywall run --etcd` started to the snapshot enforced (status
    /// shows every key and the bench connection passes).
    pub load: Duration,
    /// Edges 2 and 3, started together once edge 1 enforces: the later of their loads.
    pub load_pair: Duration,
    /// Edge 1 alone: a lock written to etcd, to its next packet dropped.
    pub lock: Vec<Duration>,
    /// Three edges: `prop[i][e]` is write i to the drop on edge e.
    pub prop: Vec<Vec<Duration>>,
    /// Each edge's RSS at the end.
    pub rss_mib: Vec<f64>,
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One etcd holding [`bench_policy`] of `keys` keys (written with [`put_policy_batched`]).
/// Edge 1 starts alone: its snapshot load is timed, then `locks` lock writes each timed to
/// its next packet dropped. Edges 2 and 3 then start, and `writes` lock writes are each
/// timed to the drop on all three (the clock starts before the put; each edge's pinned
/// program is polled through BPF_PROG_TEST_RUN). Each lock is undone, untimed.
pub fn propagation_at(keys: usize, locks: usize, writes: usize) -> Result<FleetFigures> {
    fleet_at(keys, locks, writes)
}

fn fleet_at(keys: usize, locks: usize, writes: usize) -> Result<FleetFigures> {
    let etcd = EtcdServer::start()?;
    let sbs: Vec<Sandbox> = (0..EDGES)
        .map(|_| Sandbox::new("fleetb"))
        .collect::<Result<_>>()?;
    for sb in &sbs {
        etcd.connect(sb)?;
    }
    let policy = bench_policy(keys, 1);
    let populate = if keys <= 100 {
        let t0 = Instant::now();
        etcdctl_policy(&etcd, PREFIX, &policy)?;
        t0.elapsed()
    } else {
        put_policy_batched(&etcd, PREFIX, &policy)?
    };
    let key = format!("{PREFIX}keys/bk000000");
    let base = policy["key"][0].clone();
    drop(policy);
    let mut locked = base.clone();
    locked["locked"] = json!(true);
    let (locked, base) = (locked.to_string(), base.to_string());
    let cap = keys.max(1024).to_string();
    let args = [
        "--etcd",
        ETCD_URL,
        "--etcd-prefix",
        PREFIX,
        "--max-keys",
        cap.as_str(),
    ];
    let first = Pkt::tcp4(CLIENT, SERVER, 40000, PORT)
        .payload(&http_request(
            "GET",
            "/api/v3/account",
            &[("Host", "x"), ("X-MBX-APIKEY", "bk000000-secret")],
        ))
        .build();
    // Numbered right after `first`, on the same connection; run again and again it is the
    // connection's last segment retransmitted, which follows the verdict.
    let later = Pkt::tcp4(CLIENT, SERVER, 40000, PORT)
        .payload(b"{\"ping\":1}")
        .build();
    let open_prog = |sb: &Sandbox| {
        Xdp::from_pin(sb.pin_dir().join("prog"), XdpAttachType::Interface)
            .context("opening an edge's pinned program")
    };
    // Waits until an edge enforces the whole snapshot (before it a daemon has no policy, and
    // the connection would be opened on a filter that passes everything), then for the
    // connection to pass on it.
    let wait_enforcing = |d: &ApiDaemon, p: &Xdp, t0: Instant| -> Result<Duration> {
        let limit = Duration::from_secs(60 + keys as u64 / 2_000);
        loop {
            let v = d.call("GET", "/v1/status", None)?.1;
            if v["revision"].as_u64().unwrap_or(0) != 0 && v["keys"].as_u64() == Some(keys as u64) {
                break;
            }
            if t0.elapsed() > limit {
                bail!(
                    "an edge has not applied the {keys}-key snapshot from etcd after {limit:?}: {v}; log:\n{}",
                    d.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        while run_frame(p, &first)? != XDP_PASS || run_frame(p, &later)? != XDP_PASS {
            if t0.elapsed() > limit {
                bail!("an edge does not pass the bench connection after the snapshot");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t0.elapsed())
    };
    let start_wait = Duration::from_secs(120);
    let t0 = Instant::now();
    let d1 = ApiDaemon::start_waiting(&sbs[0], 1, &args, start_wait)?;
    let p1 = open_prog(&sbs[0])?;
    let load = wait_enforcing(&d1, &p1, t0)?;
    let mut daemons = vec![d1];
    let mut progs = vec![p1];
    let lock = if locks > 0 {
        lock_rounds(&etcd, &progs, &later, &key, &locked, &base, locks, &daemons)?
            .into_iter()
            .map(|r| r[0])
            .collect()
    } else {
        Vec::new()
    };
    let t0 = Instant::now();
    for (i, sb) in sbs.iter().enumerate().skip(1) {
        daemons.push(ApiDaemon::start_waiting(
            sb,
            1 + i as u32,
            &args,
            start_wait,
        )?);
    }
    let mut load_pair = Duration::ZERO;
    for (i, sb) in sbs.iter().enumerate().skip(1) {
        let p = open_prog(sb)?;
        load_pair = load_pair.max(wait_enforcing(&daemons[i], &p, t0)?);
        progs.push(p);
    }
    let prop = lock_rounds(
        &etcd, &progs, &later, &key, &locked, &base, writes, &daemons,
    )?;
    let rss_mib = daemons
        .iter()
        .map(|d| d.proc.as_ref().map_or(0.0, |p| rss_mib(p.id())))
        .collect();
    // A lost watch is answered with a fresh snapshot: correct, but worth seeing.
    for (i, d) in daemons.iter().enumerate() {
        for l in d.log_text().lines().filter(|l| l.contains("etcd sync:")) {
            println!("    edge {}: {l}", i + 1);
        }
    }
    drop(daemons);
    Ok(FleetFigures {
        keys,
        populate,
        load,
        load_pair,
        lock,
        prop,
        rss_mib,
    })
}

/// `writes` rounds: put `locked` at `key`, time each edge's next packet of `later` dropped,
/// then put `base` and wait (untimed) until every edge passes it again.
#[allow(clippy::too_many_arguments)]
fn lock_rounds(
    etcd: &EtcdServer,
    progs: &[Xdp],
    later: &[u8],
    key: &str,
    locked: &str,
    base: &str,
    writes: usize,
    daemons: &[ApiDaemon],
) -> Result<Vec<Vec<Duration>>> {
    let edges = progs.len();
    let out = etcd.in_ns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c = Client::connect([ETCD_URL], None).await?;
            let mut out = Vec::with_capacity(writes);
            for _ in 0..writes {
                let t0 = Instant::now();
                c.put(key, locked, None).await?;
                let mut row = vec![Duration::ZERO; edges];
                let mut left = edges;
                while left > 0 {
                    for (e, p) in progs.iter().enumerate() {
                        if row[e].is_zero() && run_frame(p, later)? == XDP_DROP {
                            row[e] = t0.elapsed();
                            left -= 1;
                        }
                    }
                    // A short pause between rounds leaves the CPU to etcd and the daemons.
                    std::thread::sleep(Duration::from_micros(50));
                    if t0.elapsed() > Duration::from_secs(5) {
                        bail!("an edge still passes 5 s after the lock was written: {row:?}");
                    }
                }
                out.push(row);
                c.put(key, base, None).await?;
                let t1 = Instant::now();
                for p in progs {
                    while run_frame(p, later)? != XDP_PASS {
                        if t1.elapsed() > Duration::from_secs(5) {
                            bail!("an edge still drops 5 s after the unlock was written");
                        }
                    }
                }
            }
            Ok(out)
        })
    });
    out.map_err(|e| {
        // The daemons' side of the story, for whoever reads the failure.
        let logs: Vec<String> = daemons
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let log = d.log_text();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- edge {i} ---\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect();
        e.context(logs.join("\n"))
    })
}

/// p-th percentile (0..=100) of `xs`, nearest rank.
pub fn percentile(xs: &[Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let mut v = xs.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let xs: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&xs, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&xs, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
