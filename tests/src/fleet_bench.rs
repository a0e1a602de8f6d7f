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

/// `writes` locks, each timed to the drop on every edge: `out[i][e]` is write i on edge e.
pub fn propagation(writes: usize) -> Result<Vec<Vec<Duration>>> {
    let etcd = EtcdServer::start()?;
    let sbs: Vec<Sandbox> = (0..EDGES)
        .map(|_| Sandbox::new("fleetb"))
        .collect::<Result<_>>()?;
    for sb in &sbs {
        etcd.connect(sb)?;
    }
    // A small policy: the timing is about propagation, not the size of the snapshot.
    let policy = bench_policy(100, 1);
    etcdctl_policy(&etcd, PREFIX, &policy)?;
    let daemons: Vec<ApiDaemon> = sbs
        .iter()
        .map(|sb| ApiDaemon::start(sb, 1, &["--etcd", ETCD_URL, "--etcd-prefix", PREFIX]))
        .collect::<Result<_>>()?;
    let progs: Vec<Xdp> = sbs
        .iter()
        .map(|sb| {
            Xdp::from_pin(sb.pin_dir().join("prog"), XdpAttachType::Interface)
                .context("opening an edge's pinned program")
        })
        .collect::<Result<_>>()?;
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
    // Wait for every edge to enforce the snapshot (before it a daemon has no policy, and the
    // connection would be opened on a filter that passes everything), then for the
    // connection to pass on each.
    let deadline = Instant::now() + Duration::from_secs(20);
    for d in &daemons {
        while d.call("GET", "/v1/status", None)?.1["revision"]
            .as_u64()
            .unwrap_or(0)
            == 0
        {
            if Instant::now() > deadline {
                bail!("an edge has not applied the snapshot from etcd after 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for p in &progs {
        while run_frame(p, &first)? != XDP_PASS || run_frame(p, &later)? != XDP_PASS {
            if Instant::now() > deadline {
                bail!("an edge does not pass the bench connection 20 s after the snapshot");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let key = format!("{PREFIX}keys/bk000000");
    let base = policy["key"][0].clone();
    let mut locked = base.clone();
    locked["locked"] = json!(true);
    let (locked, base) = (locked.to_string(), base.to_string());

    let out = etcd.in_ns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c = Client::connect([ETCD_URL], None).await?;
            let mut out = Vec::with_capacity(writes);
            for _ in 0..writes {
                let t0 = Instant::now();
                c.put(key.as_str(), locked.as_str(), None).await?;
                let mut row = vec![Duration::ZERO; EDGES];
                let mut left = EDGES;
                while left > 0 {
                    for (e, p) in progs.iter().enumerate() {
                        if row[e].is_zero() && run_frame(p, &later)? == XDP_DROP {
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
                c.put(key.as_str(), base.as_str(), None).await?;
                let t1 = Instant::now();
                for p in &progs {
                    while run_frame(p, &later)? != XDP_PASS {
                        if t1.elapsed() > Duration::from_secs(5) {
                            bail!("an edge still drops 5 s after the unlock was written");
                        }
                    }
                }
            }
            Ok(out)
        })
    });
    let out = out.map_err(|e| {
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
    })?;
    drop(daemons);
    Ok(out)
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
