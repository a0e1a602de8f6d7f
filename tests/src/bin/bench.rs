//! `keywall-bench`: keywall beside its floor, its ceiling and its peers, in one run.
//!
//! 1. Per-packet cost from `BPF_PROG_TEST_RUN` for every path (SYN prefilter, established
//!    flow, key-bearing first packets of each locator, disallowed and locked variants), with
//!    1k, 100k and 1M keys loaded, beside the trivial `XDP_PASS` program, an XDP drop-all and
//!    xdp-filter's own program with 1M exact addresses, all on the same frames.
//! 2. Flood on veth: a live-frames generator spreads 65,535 sources into the edge veth; Mpps
//!    dropped and CPU used by keywall, drop-all, xdp-filter, nftables netdev ingress and no
//!    filter.
//! 3. Control plane: lock to enforced, a 1M-key snapshot under traffic (zero wrong verdicts),
//!    kernel map memory per key and per allow entry.
//! 4. The issue's targets as ratios, met or missed.
//!
//! `cargo xtask bench` runs it and rewrites BENCHMARKS.md; `--quick` (1k keys, short windows)
//! only checks that every row is still produced. Needs root. Every pin directory and namespace
//! it creates is removed at the end, on errors and on Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use clap::Parser;
use filter_common::{BASELINE_PROGRAM, KEY_LOCKED, Reason, maps};
use keywall::{
    dataplane::{Capacity, EBPF_OBJECT, ensure_bpffs, read_reasons},
    policy::{Compiled, Key, Policy, key_prefix},
};
use tests::{
    bench::{
        flood::{self, Nft, Rig, Window},
        payloads,
        peers::{XdpFilter, in_netns},
        rawbpf::{self, RawProg},
    },
    harness::{Loaded, XDP_DROP, XDP_PASS},
    netns::Sandbox,
    packet::{Pkt, http_request},
};

#[derive(Parser)]
#[command(
    name = "keywall-bench",
    about = "keywall per-packet, flood and control-plane benchmarks beside baselines and peers"
)]
struct Args {
    /// Smoke run: 1k keys, small repeats, 1 s flood windows; asserts every row is produced,
    /// never how fast anything is. Prints the table but leaves BENCHMARKS.md alone.
    #[arg(long)]
    quick: bool,
    /// Where the full run writes its report [default: BENCHMARKS.md at the workspace root].
    #[arg(long)]
    doc: Option<PathBuf>,
    /// Do not rewrite the report (full run).
    #[arg(long)]
    no_doc: bool,
    /// Fail instead of printing "not supported by this build" for paths the XDP program
    /// does not implement yet (TLS SNI, FIX, PROXY v2, the SYN prefilter).
    #[arg(long)]
    require_all: bool,
    /// Skip the flood (per-packet and control plane only).
    #[arg(long)]
    no_flood: bool,
    /// BPF_PROG_TEST_RUN repeat per per-packet measurement (full run: 1000000); a smaller
    /// one makes a shorter, noisier run.
    #[arg(long)]
    repeat: Option<u32>,
    /// Run only the daemon's control plane ("Control-plane API": 10k, 100k and 1M keys, 1k
    /// with --quick): PUT, lock to enforced through the API, a policy-file edit and etcd,
    /// etcd to three edges, status and metrics latency, restart, RSS. A full run replaces
    /// that section of the report (BENCHMARKS.md) and leaves the rest as it is.
    #[arg(long, visible_alias = "only-control-plane")]
    control_plane: bool,
    /// With --control-plane: the policy sizes, e.g. `10k,100k,1M` (the default).
    #[arg(long, value_delimiter = ',', value_parser = parse_keys)]
    cp_sizes: Option<Vec<usize>>,
    /// With --control-plane and --no-doc: only these parts (`api`, `file`, `etcd`), printed
    /// as they are measured.
    #[arg(long, value_delimiter = ',', requires = "no_doc")]
    cp_parts: Option<Vec<String>>,
    /// Flood: run the edge's NAPI thread SCHED_FIFO (priority 1) so that other load on a
    /// shared machine does not take the edge core from it. Off by default: it starves other
    /// work on that core (to the kernel's 5% RT-throttling share) while the flood runs.
    #[arg(long)]
    rt_napi: bool,
}

struct Plan {
    quick: bool,
    reps: usize,
    repeat: u32,
    first_packets: usize,
    key_sets: Vec<usize>,
    /// Key set the flood runs against (also the nftables set and keywall's policy).
    flood_keys: usize,
    /// Keys in the extra sets that vary the allow entries per key (1, 4, 64).
    entry_keys: usize,
    flood_warmup: Duration,
    flood_window: Duration,
    flood_reps: usize,
    xdpfilt_v4: usize,
    xdpfilt_v6: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 3,
                repeat: 10_000,
                first_packets: 50,
                key_sets: vec![1_000],
                flood_keys: 1_000,
                entry_keys: 1_000,
                flood_warmup: Duration::from_millis(300),
                flood_window: Duration::from_secs(1),
                flood_reps: 1,
                xdpfilt_v4: 70_000,
                xdpfilt_v6: 1_000,
            }
        } else {
            Plan {
                quick,
                reps: 3,
                repeat: 1_000_000,
                first_packets: 1_000,
                key_sets: vec![1_000, 100_000, 1_000_000],
                flood_keys: 100_000,
                entry_keys: 10_000,
                flood_warmup: Duration::from_secs(1),
                flood_window: Duration::from_secs(10),
                flood_reps: 3,
                xdpfilt_v4: 1_000_000,
                xdpfilt_v6: 1_000_000,
            }
        }
    }
}

const LOCK_APPLIES: usize = 200;
const LARGE_LOCK_APPLIES: usize = 100;

const PORT_HTTP: u16 = 8080;
const PORT_PROXY: u16 = 8081;
const PORT_TLS: u16 = 8443;
const PORT_FIX: u16 = 9878;
const EDGE: [u8; 4] = [192, 0, 2, 1];
/// In no key's allowlist.
const STRANGER: [u8; 4] = [198, 18, 0, 1];
/// The disallowed source of the key-bearing frames: a host another key allows (key #501's
/// 4th, which no policy here ever gives key #500), so its SYN passes the prefilter and is
/// recorded, and its request is judged against key #500. A source no key allows never gets
/// that far: the prefilter drops its SYN, and its data then has no record (`drop_malformed`).
fn wrong_key_src() -> [u8; 4] {
    host_of(PROBE_KEY + 1, 3)
}
/// The balancer in front of the PROXY v2 listener (`trusted_proxies`).
const PROXY: [u8; 4] = [192, 0, 2, 200];
/// The key every allowed and disallowed key-bearing frame carries: index 500 holds 4 inline
/// hosts and a CIDR, so the disallowed request also probes the key's own address set.
const PROBE_KEY: usize = 500;
/// A locked key (also with a CIDR).
const LOCKED_KEY: usize = 700;
/// A key with a request rate limit far above what the bench sends: its first packets pay for
/// the token bucket (issue 13), never for a refusal.
const LIMITED_KEY: usize = 600;
const API_KEY_TAIL: &str = "9f8e7d6c5b4a39281706f5e4";
/// Flood sources: 10.77.0.0/16, one per frame, chosen by the generator.
const FLOOD_NET: [u8; 4] = [10, 77, 0, 0];

/// `10k`, `1M` or a plain number of keys.
fn parse_keys(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a number of keys: {s}"))
}

/// The report to write: `--doc`, else the workspace's BENCHMARKS.md.
fn doc_path(args: &Args) -> PathBuf {
    args.doc.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join("BENCHMARKS.md")
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let pid = std::process::id();
    if let Err(e) = ctrlc::set_handler(move || {
        remove_our_pins(pid);
        eprintln!(
            "keywall-bench: interrupted; pin directories removed (namespaces: run it again or `ip netns del`)"
        );
        std::process::exit(130);
    }) {
        eprintln!(
            "keywall-bench: warning: no Ctrl-C handler ({e}); an interrupt leaves pins behind"
        );
    }
    let r = run(&args);
    remove_our_pins(pid);
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywall-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes what this process pinned: the harness's `kw-t-<pid>-*` and our `kw-bench-<pid>-*`.
fn remove_our_pins(pid: u32) {
    let ours = [format!("kw-t-{pid}-"), format!("kw-bench-{pid}-")];
    let Ok(rd) = fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if ours.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn bench_pin_dir(what: &str) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/bpf/kw-bench-{}-{what}",
        std::process::id()
    ))
}

// ---------------------------------------------------------------------------------------------
// Policy and frames
// ---------------------------------------------------------------------------------------------

fn prefix_of(i: usize) -> String {
    format!("k{i:07x}")
}

/// The `j`th inline host of key `i`: 16.0.0.0 + 4i + j (4M distinct hosts for 1M keys).
fn host_of(i: usize, j: usize) -> [u8; 4] {
    (0x1000_0000u32 + (i * 4 + j) as u32).to_be_bytes()
}

/// Every tenth key (from `phase`) also holds its own /28, in 11.0.0.0/8 (phase 0) or
/// 12.0.0.0/8 (a CIDR goes to the key's own set; sets are shared by content, so another
/// phase must also mean other networks).
fn cidr_of(i: usize, phase: usize) -> Option<([u8; 4], u8)> {
    let base = if phase == 0 {
        0x0b00_0000u32
    } else {
        0x0c00_0000
    };
    (i % 10 == phase).then(|| ((base + (i as u32 / 10) * 16).to_be_bytes(), 28))
}

fn ip(a: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
}

fn base_policy_toml() -> String {
    format!(
        r#"
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = true

[[listener]]
port = {PORT_HTTP}
locator = "http-header"
headers = ["OK-ACCESS-KEY", "X-MBX-APIKEY"]

[[listener]]
port = {PORT_PROXY}
locator = "http-header"
headers = ["OK-ACCESS-KEY", "X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["{}"]

[[listener]]
port = {PORT_TLS}
locator = "tls-sni"
sni_suffix = ".api.test"
label_prefix = "k-"

[[listener]]
port = {PORT_FIX}
locator = "fix"
fix_tag = 553
"#,
        ip(PROXY)
    )
}

fn base_policy() -> Policy {
    Policy::from_toml_str(&base_policy_toml()).expect("the base policy parses")
}

/// `n` keys with 4 IPv4 host allow entries each (inline), 10% with an extra CIDR; key
/// `LOCKED_KEY` locked. `shift` moves every key's hosts by one and its CIDRs to other keys:
/// the same verdicts for the probes, but every key record and set is rewritten.
fn policy_with_keys(n: usize, shift: bool) -> Policy {
    let mut p = base_policy();
    let s = usize::from(shift);
    p.key = (0..n)
        .map(|i| {
            // Host 3 of every key stays (the allowed probes come from PROBE_KEY's host 3).
            let mut allow: Vec<String> = (0..4)
                .map(|j| ip(host_of(i, if j == 3 { 3 } else { j + s * 4 })))
                .collect();
            allow.extend(cidr_of(i, s * 5).map(|(a, l)| format!("{}/{l}", ip(a))));
            Key {
                prefix: prefix_of(i),
                allow,
                ipsets: Vec::new(),
                locked: i == LOCKED_KEY,
                lock_reason: None,
                locked_until: None,
                max_new_connections_per_s: None,
                max_requests_per_s: (i == LIMITED_KEY).then_some(
                    keywall::policy::RateLimit::Burst(keywall::policy::RateBurst {
                        rate: 1_000_000,
                        burst: 1_000_000,
                    }),
                ),
            }
        })
        .collect();
    p
}

/// Every allowed host and network of `policy_with_keys(n, false)`, for the peers.
/// IPv4 networks as (address, prefix length).
type Nets = Vec<([u8; 4], u8)>;

fn allowed_sources(n: usize) -> (Vec<[u8; 4]>, Nets) {
    let hosts = (0..n)
        .filter(|i| *i != LOCKED_KEY)
        .flat_map(|i| (0..4).map(move |j| host_of(i, j)))
        .collect();
    let nets = (0..n)
        .filter(|i| *i != LOCKED_KEY)
        .filter_map(|i| cidr_of(i, 0))
        .collect();
    (hosts, nets)
}

/// Allow entries per key in the scaling sets.
const ENTRY_VARIANTS: [usize; 3] = [1, 4, 64];

/// `n` keys with `entries` IPv4 host allow entries each and no CIDR, key `LOCKED_KEY` locked.
/// The allowed probe source (`host_of(PROBE_KEY, 3)`) is the key's only host (1), its last
/// inline host (4), or, with 64, in the key's own set: the first 60 hosts listed (other
/// addresses, in 1.0.0.0/8) take the 4 inline places and `host_of(i, 0..4)` go to the set.
fn policy_with_entries(n: usize, entries: usize) -> Policy {
    let mut p = base_policy();
    p.key = (0..n)
        .map(|i| {
            let allow: Vec<String> = match entries {
                1 => vec![ip(host_of(i, if i == LOCKED_KEY { 0 } else { 3 }))],
                _ => {
                    let extra = entries.saturating_sub(4);
                    (0..extra)
                        .map(|j| ip((0x0100_0000u32 + (i * 64 + j) as u32).to_be_bytes()))
                        .chain((0..4.min(entries)).map(|j| ip(host_of(i, j))))
                        .collect()
                }
            };
            Key {
                prefix: prefix_of(i),
                allow,
                ipsets: Vec::new(),
                locked: i == LOCKED_KEY,
                lock_reason: None,
                locked_until: None,
                max_new_connections_per_s: None,
                max_requests_per_s: None,
            }
        })
        .collect();
    p
}

/// The frames the scaling table follows across key counts and allow entries.
fn scaling_frame(f: &Frame) -> bool {
    [
        "SYN to the listener, unknown source",
        "established flow, bare ACK",
        "established flow, 64 B payload",
        "established flow, 1400 B payload",
        "HTTP header, allowed source",
        "HTTP header, disallowed source",
        "TLS SNI ClientHello, disallowed source",
    ]
    .iter()
    .any(|n| f.name.starts_with(n))
}

fn full_key(i: usize) -> String {
    format!("{}{API_KEY_TAIL}", prefix_of(i))
}

/// A realistic signed REST request, about 200 bytes, with the key in the middle of the headers.
fn api_request(key_index: usize) -> Vec<u8> {
    let key = full_key(key_index);
    http_request(
        "GET",
        "/api/v5/account/balance?ccy=BTC",
        &[
            ("Host", "www.okx.com"),
            ("User-Agent", "keywall-bench/1.0"),
            ("OK-ACCESS-KEY", &key),
            ("OK-ACCESS-TIMESTAMP", "2024-01-01T00:00:00.000Z"),
            ("Accept", "application/json"),
        ],
    )
}

/// Where `OK-ACCESS-KEY:` starts in the request (the scan cost grows with it).
fn key_header_offset() -> usize {
    api_request(PROBE_KEY)
        .windows(14)
        .position(|w| w == b"OK-ACCESS-KEY:")
        .expect("key header")
}

fn sni_of(key_index: usize) -> String {
    format!("k-{}.api.test", prefix_of(key_index))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Locator {
    None,
    Http,
    Tls,
    Fix,
    ProxyV2,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Allowed,
    Disallowed,
    Locked,
}

#[derive(Clone)]
struct Frame {
    name: String,
    /// Headline group this frame belongs to (`None`: not a headline).
    locator: Locator,
    variant: Option<Variant>,
    bytes: Vec<u8>,
    /// Reasons the frame may be counted under (the bench refuses to time anything else).
    expect: &'static [Reason],
    /// Run this once, with the same 5-tuple, before every measurement (opens the flow).
    prime: Option<Vec<u8>>,
    /// A path the XDP program may not implement yet: a mismatch is reported as "not
    /// supported by this build" (explicitly, in the table) instead of failing the bench.
    feature: Option<&'static str>,
    /// Also timed as the first packet of new connections (repeat 1).
    first_packet: bool,
    payload_len: usize,
}

fn expect_of(v: Variant) -> &'static [Reason] {
    match v {
        Variant::Allowed => &[Reason::PassAllowed],
        Variant::Disallowed => &[Reason::DropNotAllowed],
        Variant::Locked => &[Reason::DropLocked],
    }
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Allowed => "allowed source",
        Variant::Disallowed => "disallowed source",
        Variant::Locked => "locked key",
    }
}

/// Payload sizes the scan slope is fitted over (issue 11: 100 to 1,400 B).
const SLOPE_SIZES: [usize; 6] = [100, 200, 400, 700, 1000, 1400];

/// An HTTP data segment without a key of `n` bytes: the body of a batch-order POST, compact
/// JSON as API clients send it (no line breaks, so the scan finds no line start after the
/// first byte).
fn json_body(n: usize) -> Vec<u8> {
    let order = br#"{"instId":"BTC-USDT","tdMode":"cash","side":"buy","ordType":"limit","px":"43010.5","sz":"0.01"},"#;
    let mut b = b"[".to_vec();
    while b.len() < n {
        b.extend_from_slice(order);
    }
    b.truncate(n - 1);
    b.push(b']');
    b
}

fn frames() -> Vec<Frame> {
    // Every call builds the same frames: each 5-tuple's sequence numbers start again at 1000
    // (the harness runs a tuple's SYN once per loaded program, from its first data segment).
    tests::packet::reset_seqs();
    let allowed_src = host_of(PROBE_KEY, 3); // the last inline host: the longest inline walk
    let locked_src = host_of(LOCKED_KEY, 0);
    let src_of = |v: Variant| match v {
        Variant::Allowed => allowed_src,
        Variant::Disallowed => wrong_key_src(),
        Variant::Locked => locked_src,
    };
    let key_of = |v: Variant| match v {
        Variant::Locked => LOCKED_KEY,
        _ => PROBE_KEY,
    };
    let allowed_http = Pkt::tcp4(allowed_src, EDGE, 40002, PORT_HTTP)
        .payload(&api_request(PROBE_KEY))
        .build();
    let body: Vec<u8> = {
        let mut b = br#"{"instId":"BTC-USDT","tdMode":"cash","side":"buy","sz":"0.01""#.to_vec();
        b.resize(63, b' ');
        b.push(b'}');
        b
    };
    let mut v = vec![
        Frame {
            name: "SYN to the listener, unknown source (prefilter on)".into(),
            locator: Locator::None,
            variant: None,
            bytes: Pkt::tcp4(STRANGER, EDGE, 40001, PORT_HTTP).syn().build(),
            expect: &[Reason::DropPrefilter],
            prime: None,
            feature: Some("SYN prefilter"),
            first_packet: false,
            payload_len: 0,
        },
        Frame {
            name: "SYN to the listener, allowed source (passes the prefilter)".into(),
            locator: Locator::None,
            variant: None,
            bytes: Pkt::tcp4(allowed_src, EDGE, 40011, PORT_HTTP).syn().build(),
            expect: &[Reason::PassHandshake],
            prime: None,
            feature: None,
            first_packet: false,
            payload_len: 0,
        },
        Frame {
            name: "TCP segment to a port with no listener".into(),
            locator: Locator::None,
            variant: None,
            bytes: Pkt::tcp4(STRANGER, EDGE, 40009, 22).payload(&body).build(),
            expect: &[Reason::PassNotApi],
            prime: None,
            feature: None,
            first_packet: false,
            payload_len: body.len(),
        },
        Frame {
            name: "established flow, bare ACK (no payload)".into(),
            locator: Locator::None,
            variant: None,
            bytes: Pkt::tcp4(allowed_src, EDGE, 40002, PORT_HTTP)
                .flags(false, true, false, false, false)
                .build(),
            expect: &[Reason::PassFlow],
            prime: Some(allowed_http.clone()),
            feature: None,
            first_packet: false,
            payload_len: 0,
        },
        Frame {
            name: "established flow, 64 B payload, no key".into(),
            locator: Locator::None,
            variant: None,
            bytes: Pkt::tcp4(allowed_src, EDGE, 40002, PORT_HTTP)
                .payload(&body)
                .build(),
            expect: &[Reason::PassFlow],
            prime: Some(allowed_http),
            feature: None,
            first_packet: false,
            payload_len: body.len(),
        },
    ];
    // The scan slope: established HTTP connections (each its own, opened by the allowed
    // request) carrying a key-less data segment of each size.
    for (n, size) in SLOPE_SIZES.into_iter().enumerate() {
        let sport = 40100 + n as u16;
        let pkt = || Pkt::tcp4(allowed_src, EDGE, sport, PORT_HTTP);
        let prime = pkt().payload(&api_request(PROBE_KEY)).build();
        let seg = json_body(size);
        v.push(Frame {
            name: format!("established flow, {size} B payload, no key (scan slope)"),
            locator: Locator::None,
            variant: None,
            bytes: pkt().payload(&seg).build(),
            expect: &[Reason::PassFlow],
            prime: Some(prime),
            feature: None,
            first_packet: false,
            payload_len: size,
        });
    }
    let variants = [Variant::Allowed, Variant::Disallowed, Variant::Locked];
    let mut sport = 41000u16;
    for (loc, label, feature) in [
        (Locator::Http, "HTTP header", None),
        (Locator::Tls, "TLS SNI ClientHello", Some("tls-sni locator")),
        (Locator::Fix, "FIX.4.4 Logon (553)", Some("fix locator")),
        (
            Locator::ProxyV2,
            "PROXY v2 + HTTP header",
            Some("PROXY protocol v2"),
        ),
    ] {
        for var in variants {
            sport += 1;
            let k = key_of(var);
            let (src, dport, payload) = match loc {
                Locator::Http => (src_of(var), PORT_HTTP, api_request(k)),
                Locator::Tls => (
                    src_of(var),
                    PORT_TLS,
                    payloads::tls_client_hello(&sni_of(k)),
                ),
                Locator::Fix => (src_of(var), PORT_FIX, payloads::fix_logon(&full_key(k))),
                Locator::ProxyV2 => (
                    PROXY,
                    PORT_PROXY,
                    payloads::proxy_v2(src_of(var), EDGE, 50000, PORT_HTTP, &api_request(k)),
                ),
                Locator::None => unreachable!(),
            };
            v.push(Frame {
                name: format!("{label}, {}", variant_name(var)),
                locator: loc,
                variant: Some(var),
                bytes: Pkt::tcp4(src, EDGE, sport, dport).payload(&payload).build(),
                expect: expect_of(var),
                prime: None,
                feature,
                first_packet: true,
                payload_len: payload.len(),
            });
        }
    }
    // The cost of a rate limit (issue 13): the allowed HTTP request of a key that has one.
    let limited = api_request(LIMITED_KEY);
    v.push(Frame {
        name: "HTTP header, allowed source, key with a request rate limit (under it)".into(),
        locator: Locator::Http,
        variant: None,
        bytes: Pkt::tcp4(host_of(LIMITED_KEY, 3), EDGE, 41900, PORT_HTTP)
            .payload(&limited)
            .build(),
        expect: &[Reason::PassAllowed],
        prime: None,
        feature: None,
        first_packet: true,
        payload_len: limited.len(),
    });
    v
}

/// The frame with another TCP source port (IPv4 without options: TCP starts at byte 34). XDP
/// does not check TCP checksums, so the stale checksum does not matter here.
/// The TCP payload length of an untagged IPv4 frame.
fn tcp4_payload_len(f: &[u8]) -> usize {
    let ihl = (f[14] & 0x0f) as usize * 4;
    let doff = (f[14 + ihl + 12] >> 4) as usize * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    total - ihl - doff
}

fn with_sport(frame: &[u8], sport: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f
}

// ---------------------------------------------------------------------------------------------
// Floor, ceiling and peer on the same frames
// ---------------------------------------------------------------------------------------------

/// `keywall_baseline_pass` from keywall's own object (the floor).
struct Baseline {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Baseline {
    fn load() -> Result<Baseline> {
        let pin_dir = bench_pin_dir("baseline");
        let _ = fs::remove_dir_all(&pin_dir);
        ensure_bpffs(&pin_dir)?;
        // The object's maps are created (and pinned) by any load; keep them tiny.
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(maps::KEYS, 16)
            .map_max_entries(maps::KEY_STATS, 16)
            .map_max_entries(maps::ALLOW, 16)
            .map_max_entries(maps::SETS, 16)
            .map_max_entries(maps::FLOWS, 16)
            .load(EBPF_OBJECT)
            .context("loading the object for the baseline")?;
        let prog: &mut Xdp = ebpf
            .program_mut(BASELINE_PROGRAM)
            .ok_or_else(|| anyhow!("program {BASELINE_PROGRAM} missing from the object"))?
            .try_into()?;
        prog.load().context("loading the baseline program")?;
        Ok(Baseline { ebpf, pin_dir })
    }

    fn time(&mut self, frame: &[u8], repeat: u32) -> Result<f64> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(BASELINE_PROGRAM)
            .expect("baseline program")
            .try_into()?;
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN (baseline)")?;
        ensure!(
            r.return_value == XDP_PASS,
            "baseline returned {}",
            r.return_value
        );
        Ok(r.duration.as_nanos() as f64)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

struct Peers {
    pass: Baseline,
    drop_all: RawProg,
    xdpfilt: XdpFilter,
}

impl Peers {
    fn time_drop_all(&self, frame: &[u8], repeat: u32) -> Result<f64> {
        let r = self.drop_all.test_run(frame, repeat)?;
        ensure!(
            r.retval == rawbpf::XDP_DROP,
            "drop-all returned {}",
            r.retval
        );
        Ok(r.per_run.as_nanos() as f64)
    }
}

/// xdp-filter's lists. `xdp-filter load -p deny` sets the policy for *unmatched* packets to
/// deny, so its entries are the allowed sources: the first `v4` allowed hosts of the key
/// policy (which hold every host the allowed and locked frames come from), and `v6` IPv6
/// hosts. The unknown source and the flood's 10.77.0.0/16 are not in it, so they drop.
fn xdpfilt_addresses(v4: usize, v6: usize) -> (Vec<[u8; 4]>, Vec<[u8; 16]>) {
    let a4: Vec<[u8; 4]> = (0..v4).map(|n| host_of(n / 4, n % 4)).collect();
    debug_assert!(a4.contains(&host_of(PROBE_KEY, 3)) && a4.contains(&host_of(LOCKED_KEY, 0)));
    let a6 = (0..v6 as u128)
        .map(|i| (0x2001_0db8_00ff_0000_0000_0000_0000_0000u128 + i).to_be_bytes())
        .collect();
    (a4, a6)
}

// ---------------------------------------------------------------------------------------------
// Per-packet measurement
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Spread {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Spread {
            min: s[0],
            median: s[s.len() / 2],
            max: s[s.len() - 1],
        }
    }
    fn show(&self) -> String {
        format!("{:.0} / {:.0} / {:.0}", self.min, self.median, self.max)
    }
    fn show2(&self) -> String {
        format!("{:.2} / {:.2} / {:.2}", self.min, self.median, self.max)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How a frame fared on one key set.
#[derive(Clone, Debug)]
enum Outcome {
    Timed(Reason),
    NotSupported {
        feature: &'static str,
        counted: Reason,
    },
}

struct PeerTimes {
    pass: Spread,
    drop_all: Spread,
    xdpfilt: Spread,
    xdpfilt_action: u32,
}

struct Row {
    frame: String,
    locator: Locator,
    variant: Option<Variant>,
    keys: usize,
    /// Allow entries per key in the policy (4 in the main key sets).
    entries: usize,
    /// The frame's TCP payload length.
    payload_len: usize,
    /// keywall's figure of each rep (the spread's samples).
    kw_samples: Vec<f64>,
    outcome: Outcome,
    keywall: Option<Spread>,
    /// What repeating the frame on one connection was counted as, when it differs from the
    /// first run (a judged connection following its verdict).
    repeated_as: Option<Reason>,
    peers: Option<std::rc::Rc<PeerTimes>>,
}

/// Runs the frame once and checks what it was counted as.
fn verdict(l: &mut Loaded, f: &Frame, require_all: bool) -> Result<Outcome> {
    if let Some(p) = &f.prime {
        l.run(p);
    }
    let (action, reason, audit) = l.run(&f.bytes);
    ensure!(!audit, "{}: counted in audit mode", f.name);
    if !f.expect.contains(&reason) {
        let want: Vec<_> = f.expect.iter().map(|r| r.name()).collect();
        match f.feature {
            Some(feature) if !require_all => {
                return Ok(Outcome::NotSupported {
                    feature,
                    counted: reason,
                });
            }
            _ => bail!(
                "{}: counted as {}, expected one of {want:?}",
                f.name,
                reason.name()
            ),
        }
    }
    let want = if reason.is_drop() { XDP_DROP } else { XDP_PASS };
    ensure!(
        action == want,
        "{}: action {action} for {}",
        f.name,
        reason.name()
    );
    Ok(Outcome::Timed(reason))
}

fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    match (a, b) {
        (Outcome::Timed(x), Outcome::Timed(y)) => x == y,
        (Outcome::NotSupported { counted: x, .. }, Outcome::NotSupported { counted: y, .. }) => {
            x == y
        }
        _ => false,
    }
}

/// Times every frame with repeat `plan.repeat` on every loaded key set and on the peers,
/// interleaved (rep, frame, key sets, then peers), so drift on a shared machine touches all
/// alike; then the key-bearing frames as first packets of new connections (repeat 1).
fn measure(
    sets: &mut [(usize, Loaded)],
    peers: &mut Peers,
    plan: &Plan,
    require_all: bool,
    entries: usize,
    only: &dyn Fn(&Frame) -> bool,
) -> Result<(Vec<Row>, Vec<Row>)> {
    let frames: Vec<Frame> = frames().into_iter().filter(|f| only(f)).collect();
    let mut outcomes = vec![Vec::new(); sets.len()];
    for (s, (_, l)) in sets.iter_mut().enumerate() {
        for f in &frames {
            outcomes[s].push(verdict(l, f, require_all)?);
        }
    }
    // A path is supported only if every variant of it is: a PROXY v2 request from a
    // disallowed client is counted as drop_not_allowed even by a build that ignores the
    // header (the proxy's own address is not allowed either).
    for o in outcomes.iter_mut() {
        for (i, f) in frames.iter().enumerate() {
            let Some(feature) = f.feature else { continue };
            let unsupported = frames.iter().zip(o.iter()).any(|(g, x)| {
                g.feature == Some(feature) && matches!(x, Outcome::NotSupported { .. })
            });
            if let (true, Outcome::Timed(counted)) = (unsupported, &o[i]) {
                o[i] = Outcome::NotSupported {
                    feature,
                    counted: *counted,
                };
            }
        }
    }
    let timed = |s: usize, i: usize| matches!(outcomes[s][i], Outcome::Timed(_));
    let nf = frames.len();
    let mut kw = vec![vec![Vec::new(); nf]; sets.len()];
    let (mut pass, mut dropall, mut xf) = (
        vec![Vec::new(); nf],
        vec![Vec::new(); nf],
        vec![Vec::new(); nf],
    );
    let mut xf_action = vec![0u32; nf];
    let warm = plan.repeat.min(10_000);
    for (i, f) in frames.iter().enumerate() {
        for (s, (_, l)) in sets.iter_mut().enumerate() {
            if timed(s, i) {
                if let Some(p) = &f.prime {
                    l.run(p);
                }
                l.time(&f.bytes, warm);
            }
        }
        peers.pass.time(&f.bytes, warm)?;
        peers.time_drop_all(&f.bytes, warm)?;
        xf_action[i] = peers.xdpfilt.time(&f.bytes, warm)?.1;
    }
    for _ in 0..plan.reps {
        for (i, f) in frames.iter().enumerate() {
            for (s, (_, l)) in sets.iter_mut().enumerate() {
                if !timed(s, i) {
                    continue;
                }
                if let Some(p) = &f.prime {
                    l.run(p);
                }
                kw[s][i].push(l.time(&f.bytes, plan.repeat));
            }
            pass[i].push(peers.pass.time(&f.bytes, plan.repeat)?);
            dropall[i].push(peers.time_drop_all(&f.bytes, plan.repeat)?);
            xf[i].push(peers.xdpfilt.time(&f.bytes, plan.repeat)?.0);
        }
    }
    // What the repeated runs were counted as (a judged TLS or FIX connection follows its
    // verdict without a rescan), and the first-packet verdicts still hold on a new connection.
    let mut repeated_as = vec![vec![None; nf]; sets.len()];
    for (s, (_, l)) in sets.iter_mut().enumerate() {
        for (i, f) in frames.iter().enumerate() {
            if timed(s, i) {
                if let Some(p) = &f.prime {
                    l.run(p);
                }
                repeated_as[s][i] = Some(l.run(&f.bytes).1);
            }
            let fresh = match f.prime {
                Some(_) => f.clone(),
                None => Frame {
                    bytes: with_sport(&f.bytes, 64000 + i as u16),
                    ..f.clone()
                },
            };
            let now = verdict(l, &fresh, require_all)?;
            let was = match &outcomes[s][i] {
                // A variant forced to "not supported" because a sibling is.
                Outcome::NotSupported { counted, .. } if matches!(now, Outcome::Timed(_)) => {
                    Outcome::Timed(*counted)
                }
                o => o.clone(),
            };
            ensure!(
                same_outcome(&now, &was),
                "{}: the first-packet verdict changed during the run ({:?} then {now:?})",
                f.name,
                outcomes[s][i]
            );
        }
    }
    let mut rows = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let p = std::rc::Rc::new(PeerTimes {
            pass: Spread::of(&pass[i]),
            drop_all: Spread::of(&dropall[i]),
            xdpfilt: Spread::of(&xf[i]),
            xdpfilt_action: xf_action[i],
        });
        for (s, (keys, _)) in sets.iter().enumerate() {
            rows.push(Row {
                frame: f.name.clone(),
                locator: f.locator,
                variant: f.variant,
                keys: *keys,
                entries,
                payload_len: f.payload_len,
                kw_samples: kw[s][i].clone(),
                outcome: outcomes[s][i].clone(),
                keywall: timed(s, i).then(|| Spread::of(&kw[s][i])),
                repeated_as: repeated_as[s][i],
                peers: Some(p.clone()),
            });
        }
    }

    // Repeating one frame times the keep-alive path once the first run has judged the
    // connection. The first packet of a connection needs a new 5-tuple per run, so it is timed
    // with repeat 1 over `first_packets` new connections per rep (the rep's figure is their
    // median), the peers likewise on the same frames.
    let n = plan.first_packets;
    let mut next_sport = vec![1024u16; sets.len()];
    let mut take_sport = |s: usize| {
        let p = next_sport[s];
        next_sport[s] = if p >= 65000 { 1024 } else { p + 1 };
        p
    };
    let mut first_rows = Vec::new();
    for (i, f) in frames.iter().enumerate().filter(|(_, f)| f.first_packet) {
        let mut kwm = vec![Vec::new(); sets.len()];
        let (mut pm, mut dm, mut xm) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..plan.reps {
            let (mut pv, mut dv, mut xv) = (Vec::new(), Vec::new(), Vec::new());
            for k in 0..n {
                let fr = with_sport(&f.bytes, 1024 + (rep * n + k) as u16 % 60000);
                pv.push(peers.pass.time(&fr, 1)?);
                dv.push(peers.time_drop_all(&fr, 1)?);
                xv.push(peers.xdpfilt.time(&fr, 1)?.0);
            }
            pm.push(median(&mut pv));
            dm.push(median(&mut dv));
            xm.push(median(&mut xv));
            for (s, (_, l)) in sets.iter_mut().enumerate() {
                if !timed(s, i) {
                    continue;
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let fr = with_sport(&f.bytes, take_sport(s));
                    v.push(l.time(&fr, 1));
                }
                kwm[s].push(median(&mut v));
            }
        }
        let p = std::rc::Rc::new(PeerTimes {
            pass: Spread::of(&pm),
            drop_all: Spread::of(&dm),
            xdpfilt: Spread::of(&xm),
            xdpfilt_action: xf_action[i],
        });
        for (s, (keys, _)) in sets.iter().enumerate() {
            first_rows.push(Row {
                frame: f.name.clone(),
                locator: f.locator,
                variant: f.variant,
                keys: *keys,
                entries,
                payload_len: f.payload_len,
                kw_samples: kwm[s].clone(),
                outcome: outcomes[s][i].clone(),
                keywall: timed(s, i).then(|| Spread::of(&kwm[s])),
                repeated_as: None,
                peers: Some(p.clone()),
            });
        }
    }
    Ok((rows, first_rows))
}

// ---------------------------------------------------------------------------------------------
// Flood on veth
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FloodFilter {
    KeywallPrefilter,
    KeywallKeyDisallowed,
    KeywallSynAllowed,
    KeywallKeyAllowedWrongKey,
    DropAll,
    XdpFilter,
    Nftables,
    NoFilter,
    NoFilterData,
}

/// What a flood row sends (every frame from one of 65,535 sources in 10.77.0.0/16).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FloodFrames {
    /// A SYN to the HTTP listener, source port 33333.
    Syn,
    /// The key-bearing HTTP request (key #500) as a data segment, with no SYN before it.
    Req,
    /// A SYN on one of 8 source ports per source (524,280 tuples), ISN from the tuple.
    PairSyn,
    /// The key-bearing request at ISN + 1 of `PairSyn`'s SYN on the same tuple.
    PairReq,
}

/// Source ports per source in the paired SYN / request flood (2^3).
const PAIR_PORT_BITS: u32 = 3;
const PAIR_PORT_BASE: u16 = 40000;
/// The sequence's high 16 bits in the paired templates (the generator subtracts the port
/// offset from them).
const PAIR_SEQ_HI: u32 = 0x0100;
/// The key the allowed-source rows' policy adds: the attacker's own, allowing the flood's
/// sources. The frames carry key #500, which does not allow them (a stolen key).
const ATTACKER_PREFIX: &str = "kattack0";

impl FloodFrames {
    fn describe(self) -> &'static str {
        match self {
            FloodFrames::Syn => "SYN",
            FloodFrames::Req => "HTTP request with key, no SYN before it",
            FloodFrames::PairSyn => "SYN, 8 source ports per source",
            FloodFrames::PairReq => "HTTP request with key at ISN + 1 of those SYNs",
        }
    }
    fn port_bits(self) -> u32 {
        match self {
            FloodFrames::PairSyn | FloodFrames::PairReq => PAIR_PORT_BITS,
            _ => 0,
        }
    }
}

impl FloodFilter {
    const ALL: [FloodFilter; 9] = [
        FloodFilter::KeywallPrefilter,
        FloodFilter::KeywallKeyDisallowed,
        FloodFilter::KeywallSynAllowed,
        FloodFilter::KeywallKeyAllowedWrongKey,
        FloodFilter::DropAll,
        FloodFilter::XdpFilter,
        FloodFilter::Nftables,
        FloodFilter::NoFilter,
        FloodFilter::NoFilterData,
    ];
    fn name(self) -> &'static str {
        match self {
            FloodFilter::KeywallPrefilter => "keywall: SYN prefilter, sources no key allows",
            FloodFilter::KeywallKeyDisallowed => {
                "keywall: key-bearing data segments, sources no key allows"
            }
            FloodFilter::KeywallSynAllowed => {
                "keywall: SYN from allowed sources (the attacker's own key allows them)"
            }
            FloodFilter::KeywallKeyAllowedWrongKey => {
                "keywall: key-bearing data segments from allowed sources, wrong key, each at ISN + 1 of a recorded SYN"
            }
            FloodFilter::DropAll => "XDP drop-all (ceiling)",
            FloodFilter::XdpFilter => {
                "xdp-filter (xdpfilt_dny_ip: allowed sources listed, the rest denied)"
            }
            FloodFilter::Nftables => "nftables netdev ingress, allowed-source sets",
            FloodFilter::NoFilter => "no filter (kernel stack)",
            FloodFilter::NoFilterData => "no filter (kernel stack), key-bearing data segments",
        }
    }
    /// Which frames it is flooded with.
    fn frames(self) -> FloodFrames {
        match self {
            FloodFilter::KeywallKeyDisallowed => FloodFrames::Req,
            FloodFilter::KeywallSynAllowed => FloodFrames::PairSyn,
            FloodFilter::KeywallKeyAllowedWrongKey | FloodFilter::NoFilterData => {
                FloodFrames::PairReq
            }
            _ => FloodFrames::Syn,
        }
    }
    fn is_keywall(self) -> bool {
        matches!(
            self,
            FloodFilter::KeywallPrefilter
                | FloodFilter::KeywallKeyDisallowed
                | FloodFilter::KeywallSynAllowed
                | FloodFilter::KeywallKeyAllowedWrongKey
        )
    }
    fn is_no_filter(self) -> bool {
        matches!(self, FloodFilter::NoFilter | FloodFilter::NoFilterData)
    }
    /// The no-filter row with the same kind of frames (SYNs or data segments).
    fn no_filter_peer(self) -> FloodFilter {
        match self.frames() {
            FloodFrames::Req | FloodFrames::PairReq => FloodFilter::NoFilterData,
            _ => FloodFilter::NoFilter,
        }
    }
}

struct FloodRow {
    filter: FloodFilter,
    windows: Vec<Window>,
    /// The figure the row is judged on: Mpps dropped; for the allowed SYN row, SYNs keywall
    /// counted (passed or dropped); for no filter, Mpps taken in by the stack.
    mpps: Option<Spread>,
    /// keywall rows: packets counted per reason over all windows (non-zero ones, most first).
    reasons: Vec<(Reason, u64)>,
    note: String,
}

impl FloodRow {
    fn spread(&self, f: impl Fn(&Window) -> f64) -> Spread {
        Spread::of(&self.windows.iter().map(f).collect::<Vec<_>>())
    }
    /// "drop_malformed 99.9%, drop_not_allowed 0.1%".
    fn reason_shares(&self) -> String {
        let total: u64 = self.reasons.iter().map(|(_, n)| n).sum();
        self.reasons
            .iter()
            .map(|(r, n)| {
                format!(
                    "{} {:.1}%",
                    r.name(),
                    *n as f64 * 100.0 / total.max(1) as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
    fn share_of(&self, r: Reason) -> f64 {
        let total: u64 = self.reasons.iter().map(|(_, n)| n).sum();
        let n = self
            .reasons
            .iter()
            .find(|(x, _)| *x == r)
            .map_or(0, |(_, n)| *n);
        n as f64 / total.max(1) as f64
    }
}

/// Flood frames to the edge: source 10.77.0.0 (the generator rewrites the low 16 bits), the
/// IP ID 0xffff and the sequence's low 16 bits 0xffff, or 0xfffe for the paired SYN so that
/// its request sits at ISN + 1 (see `rawbpf::gen_template_ok`).
fn flood_frame(edge_mac: [u8; 6], edge: [u8; 4], kind: FloodFrames) -> Vec<u8> {
    let (sport, seq) = match kind {
        FloodFrames::Syn | FloodFrames::Req => (33333, 0x0001_ffff),
        FloodFrames::PairSyn => (PAIR_PORT_BASE, PAIR_SEQ_HI << 16 | 0xfffe),
        FloodFrames::PairReq => (PAIR_PORT_BASE, PAIR_SEQ_HI << 16 | 0xffff),
    };
    let p = Pkt::tcp4(FLOOD_NET, edge, sport, PORT_HTTP)
        .eth([0x02, 0x6b, 0x77, 0, 0, 1], edge_mac)
        .ipv4_id(0xffff)
        .seq(seq);
    match kind {
        FloodFrames::Syn | FloodFrames::PairSyn => p.syn().build(),
        FloodFrames::Req | FloodFrames::PairReq => p.payload(&api_request(PROBE_KEY)).build(),
    }
}

/// The flood's policy, with the attacker's own key (allowing the flood's sources) or without.
fn flood_policy(keys: usize, attacker: bool) -> Policy {
    let mut p = policy_with_keys(keys, false);
    if attacker {
        p.key.push(Key {
            prefix: ATTACKER_PREFIX.into(),
            allow: vec![format!("{}/16", ip(FLOOD_NET))],
            ipsets: Vec::new(),
            locked: false,
            lock_reason: None,
            locked_until: None,
            max_new_connections_per_s: None,
            max_requests_per_s: None,
        });
    }
    p
}

fn edge_mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", iface])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = v[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("no MAC for {iface}"))?;
    let b: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    b.try_into().map_err(|_| anyhow!("bad MAC {s}"))
}

fn flood(
    args: &Args,
    plan: &Plan,
    l: &mut Loaded,
    xdpfilt: &mut XdpFilter,
    drop_all: &RawProg,
) -> Result<Vec<FloodRow>> {
    let sb = Sandbox::new("bench")?;
    let (edge_ns, client_ns) = (sb.edge_ns().to_owned(), sb.client_ns().to_owned());
    let (edge_if, client_if) = (sb.edge_if().to_owned(), sb.client_if().to_owned());
    let edge = sb.edge_v4().octets();
    let mac = edge_mac(&edge_ns, &edge_if)?;
    // Frames come back only as RSTs and SYN-ACKs to sources with no route; static neighbours
    // keep ARP out of the picture for the one peer address that is on link.
    let _ = std::process::Command::new("ip")
        .args([
            "-n",
            &edge_ns,
            "neigh",
            "replace",
            &sb.client_v4().to_string(),
            "lladdr",
            "02:6b:77:00:00:01",
            "dev",
            &edge_if,
            "nud",
            "permanent",
        ])
        .status();
    flood::set_threaded(&edge_ns, &edge_if)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rig = Rig {
        edge_ns: &edge_ns,
        edge_if: &edge_if,
        client_ns: &client_ns,
        client_if: &client_if,
        gen_cpu: 0,
        edge_cpu: if cpus > 1 { 1 } else { 0 },
        rt_napi: args.rt_napi,
    };
    let (hosts, nets) = allowed_sources(plan.flood_keys);
    let mut rows = Vec::new();
    for f in FloodFilter::ALL {
        println!("  flood: {}", f.name());
        let kind = f.frames();
        let frame = flood_frame(mac, edge, kind);
        let mut windows = Vec::new();
        let mut note = String::new();
        // keywall rows: which reasons the row's figure counts.
        let mut kw_counted: Option<fn(Reason) -> bool> = None;
        // Attach.
        let mut drop_link = None;
        let mut nft = None;
        if f == FloodFilter::KeywallSynAllowed {
            // The attacker's own key allows the flood's sources: its SYNs pass the prefilter
            // and are recorded; the requests that follow carry key #500 (not theirs).
            l.apply_policy(&flood_policy(plan.flood_keys, true))?;
        }
        match f {
            FloodFilter::KeywallPrefilter
            | FloodFilter::KeywallKeyDisallowed
            | FloodFilter::KeywallSynAllowed
            | FloodFilter::KeywallKeyAllowedWrongKey => {
                let iface = edge_if.clone();
                in_netns(&edge_ns, || l.dp.attach(&iface, "native"))?;
                let which: fn(Reason) -> bool = if f == FloodFilter::KeywallSynAllowed {
                    |_| true
                } else {
                    Reason::is_drop
                };
                kw_counted = Some(which);
            }
            FloodFilter::DropAll => {
                drop_link = Some(in_netns(&edge_ns, || {
                    drop_all.attach_native(rawbpf::ifindex(&edge_if)?)
                })?);
            }
            FloodFilter::XdpFilter => {
                let iface = edge_if.clone();
                in_netns(&edge_ns, || xdpfilt.attach(&iface))?;
            }
            FloodFilter::Nftables => {
                nft = Some(Nft::load(
                    &edge_ns,
                    &edge_if,
                    PORT_HTTP,
                    &hosts,
                    &nets,
                    sb.tmp_dir(),
                )?);
            }
            FloodFilter::NoFilter | FloodFilter::NoFilterData => {}
        }
        // keywall's reason counters at every sample (two per window).
        let mut snaps: Vec<Vec<u64>> = Vec::new();
        let result = (|| -> Result<()> {
            for _ in 0..plan.flood_reps {
                let mut drops = || -> Result<u64> {
                    match (kw_counted, &nft) {
                        (Some(which), _) => {
                            let v: Vec<u64> = read_reasons(&l.dp.maps.reasons)?
                                .iter()
                                .map(|c| c.packets)
                                .collect();
                            let n = Reason::ALL
                                .iter()
                                .filter(|r| which(**r))
                                .map(|r| v[*r as usize])
                                .sum();
                            snaps.push(v);
                            Ok(n)
                        }
                        (None, Some(n)) => n.drops(),
                        _ => Ok(0),
                    }
                };
                windows.push(flood::measure(
                    &rig,
                    &frame,
                    kind.port_bits(),
                    plan.flood_warmup,
                    plan.flood_window,
                    &mut drops,
                )?);
            }
            Ok(())
        })();
        // Detach whatever happened.
        if f.is_keywall() {
            keywall::dataplane::detach(&l.pin_dir, Some(&edge_if))?;
        }
        if f == FloodFilter::XdpFilter {
            xdpfilt.detach()?;
        }
        if f == FloodFilter::KeywallKeyAllowedWrongKey {
            l.apply_policy(&flood_policy(plan.flood_keys, false))?;
        }
        drop(drop_link);
        drop(nft);
        result?;
        let mut reasons: Vec<(Reason, u64)> = Reason::ALL
            .iter()
            .map(|r| {
                let n = snaps
                    .chunks(2)
                    .filter(|w| w.len() == 2)
                    .map(|w| w[1][*r as usize].saturating_sub(w[0][*r as usize]))
                    .sum::<u64>();
                (*r, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
        let med = |g: fn(&Window) -> f64| {
            let mut v: Vec<f64> = windows.iter().map(g).collect();
            median(&mut v)
        };
        let of =
            |g: fn(&Window) -> f64| Some(Spread::of(&windows.iter().map(g).collect::<Vec<_>>()));
        let mpps = match f {
            _ if f.is_keywall() => {
                if med(|w| w.filter_drop_mpps) < 0.001 {
                    note =
                        "not supported by this build: keywall counted none of these frames".into();
                    None
                } else {
                    of(|w| w.filter_drop_mpps)
                }
            }
            FloodFilter::DropAll | FloodFilter::XdpFilter => of(|w| w.xdp_drop_mpps),
            FloodFilter::Nftables => of(|w| w.filter_drop_mpps),
            _ => {
                note = "not dropped: Mpps taken in by the stack (rx_packets)".into();
                of(|w| w.stack_mpps)
            }
        };
        ensure!(
            med(|w| w.offered_mpps) > 0.0,
            "{}: the edge veth was offered no frames",
            f.name()
        );
        if !f.is_no_filter() && mpps.is_some_and(|m| m.median <= 0.0) {
            bail!("{}: dropped nothing", f.name());
        }
        rows.push(FloodRow {
            filter: f,
            windows,
            mpps,
            reasons,
            note,
        });
    }
    drop(sb);
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------------------------

struct LockLatency {
    keys: usize,
    applies: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cut: Reason,
}

/// One-lock applies with the large key set loaded, named like a PATCH names its keys.
struct LargeLock {
    keys: usize,
    applies: usize,
    resync: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn pct(t: &[Duration], q: f64) -> Duration {
    t[((q * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1]
}

/// Locks one more key per apply, editing the compiled policy in place (compiling 1M keys
/// takes seconds and is not part of the figure). The first apply brings the second slot up
/// to the full key set and is reported apart.
fn large_lock_latency(l: &mut Loaded, c: &mut Compiled, keys: usize) -> Result<LargeLock> {
    let cap = l.dp.maps.key_stats.len();
    let resync = l.mirror.apply(&mut l.dp.maps, c, cap)?.elapsed;
    let mut t = Vec::with_capacity(LARGE_LOCK_APPLIES);
    for i in 0..LARGE_LOCK_APPLIES {
        let kp = key_prefix(&prefix_of(keys - 1 - i));
        let k = c
            .keys
            .get_mut(&kp)
            .ok_or_else(|| anyhow!("key {i} missing from the compiled policy"))?;
        k.flags |= KEY_LOCKED;
        let changed: std::collections::BTreeSet<_> = [kp].into();
        let rep = l
            .mirror
            .apply_changes(&mut l.dp.maps, c, Some(&changed), cap)?;
        ensure!(
            (1..=2).contains(&rep.keys_written),
            "a one-lock change wrote {} key records",
            rep.keys_written
        );
        t.push(rep.elapsed);
    }
    t.sort();
    Ok(LargeLock {
        keys,
        applies: t.len(),
        resync,
        p50: pct(&t, 0.5),
        p99: pct(&t, 0.99),
        max: t[t.len() - 1],
    })
}

/// With `keys` keys loaded, applies a chain of policies in which each differs from the one
/// before by one more locked key, and times `Mirror::apply` (map writes, slot flip and
/// cleanup; no file polling, no parsing). Finally checks that a lock cuts an established flow
/// on its next packet.
fn lock_latency(l: &mut Loaded, keys: usize) -> Result<LockLatency> {
    ensure!(
        keys > LOCK_APPLIES + 1 && PROBE_KEY > LOCK_APPLIES,
        "too few keys for the lock chain"
    );
    let mut p = policy_with_keys(keys, false);
    let cap = l.dp.maps.key_stats.len();
    let compile = |p: &Policy| p.compile().map_err(|e| anyhow!("{e:?}"));
    let c_open = compile(&p)?;
    // Both slots hold the open policy first, so every timed apply is a small diff.
    l.mirror.apply(&mut l.dp.maps, &c_open, cap)?;
    l.mirror.apply(&mut l.dp.maps, &c_open, cap)?;
    let mut chain = Vec::with_capacity(LOCK_APPLIES);
    for i in 0..LOCK_APPLIES {
        p.key[i].locked = true;
        chain.push(compile(&p)?);
    }
    let mut t = Vec::with_capacity(LOCK_APPLIES);
    for c in &chain {
        let rep = l.mirror.apply(&mut l.dp.maps, c, cap)?;
        ensure!(
            (1..=2).contains(&rep.keys_written),
            "a one-lock change wrote {} key records",
            rep.keys_written
        );
        t.push(rep.elapsed);
    }
    drop(chain);
    t.sort();
    // The established flow from the allowed source, then the lock: its next packet drops.
    // On a connection of its own: the flood may have run on this key set before, and its
    // tuples push older connections out of the flow table (a connection that passed bytes and
    // lost its flow is refused, as it should be).
    let conn = || Pkt::tcp4(host_of(PROBE_KEY, 3), EDGE, 40200, PORT_HTTP);
    let opened = conn().payload(&api_request(PROBE_KEY)).build();
    let flow = &Frame {
        name: "established flow, 64 B payload, no key (lock check)".into(),
        locator: Locator::None,
        variant: None,
        bytes: conn().payload(&json_body(64)).build(),
        expect: &[Reason::PassFlow],
        prime: Some(opened),
        feature: None,
        first_packet: false,
        payload_len: 64,
    };
    verdict(l, flow, true)?;
    p.key[PROBE_KEY].locked = true;
    l.mirror.apply(&mut l.dp.maps, &compile(&p)?, cap)?;
    let (action, cut, _) = l.run(&flow.bytes);
    ensure!(
        cut == Reason::DropFlow && action == XDP_DROP,
        "after the lock the established flow was counted as {}",
        cut.name()
    );
    // Leave the set as it was for later users.
    p.key[PROBE_KEY].locked = false;
    for k in p.key.iter_mut().take(LOCK_APPLIES) {
        k.locked = false;
    }
    l.mirror.apply(&mut l.dp.maps, &compile(&p)?, cap)?;
    Ok(LockLatency {
        keys,
        applies: t.len(),
        p50: pct(&t, 0.5),
        p99: pct(&t, 0.99),
        max: t[t.len() - 1],
        cut,
    })
}

struct BigApply {
    keys: usize,
    compile: Duration,
    apply: Duration,
    keys_written: usize,
    sets_created: usize,
    /// Kernel memory per map (`memlock` from the map fd's fdinfo), with the policy loaded.
    memory: Vec<(&'static str, u64)>,
}

/// A whole-policy snapshot applied while probe traffic runs through the program on another
/// CPU, every probe's verdict checked.
struct Snapshot {
    keys: usize,
    compile: Duration,
    apply: Duration,
    keys_written: usize,
    sets_created: usize,
    probes: u64,
    wrong: u64,
    examples: Vec<String>,
}

/// What the kernel charges each pinned map, from `/proc/self/fdinfo` of a map fd (the same
/// figure `bpftool map show` prints as memlock).
fn map_memory(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut out = Vec::new();
    for name in filter_common::maps::ALL {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let md = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening pinned {name}"))?;
        let fd = md.fd().as_fd().as_raw_fd();
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let memlock = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no memlock in fdinfo of {name}"))?;
        out.push((name, memlock));
    }
    Ok(out)
}

fn capacity_for(keys: usize) -> Capacity {
    let k = keys as u32;
    // Sets and allow entries: room for two policies' worth during a snapshot swap.
    Capacity {
        keys: (k + 4096).next_power_of_two().max(4096),
        allow: (k / 5 + 4096).next_power_of_two(),
        sets: (k / 5 + 4096).next_power_of_two(),
        // Room for every probe connection of the snapshot stage: an evicted flow of a
        // connection that passed bytes is refused (fail closed), which is not what it times.
        flows: 1 << 18,
        ..Default::default()
    }
}

/// Loads the program with `entry_keys` keys of `entries` allow entries each (a scaling set).
fn load_with_entries(keys: usize, entries: usize) -> Result<Loaded> {
    let mut cap = capacity_for(keys);
    let outside = keys * entries.saturating_sub(4) + keys / 5 + 4096;
    cap.allow = cap.allow.max((outside as u32).next_power_of_two());
    // With more than 4 hosts every key has a set of its own.
    cap.sets = cap.sets.max(((keys + 4096) as u32).next_power_of_two());
    let mut l = Loaded::with_capacity(&base_policy_toml(), cap)?;
    l.apply_policy(&policy_with_entries(keys, entries))?;
    Ok(l)
}

/// Loads the program with room for `keys`, then applies the generated policy as one snapshot.
fn load_with_keys(keys: usize) -> Result<(Loaded, BigApply, Compiled)> {
    let mut l = Loaded::with_capacity(&base_policy_toml(), capacity_for(keys))?;
    let p = policy_with_keys(keys, false);
    let t0 = Instant::now();
    let c = p.compile().map_err(|e| anyhow!("{e:?}"))?;
    let compile = t0.elapsed();
    drop(p);
    let cap = l.dp.maps.key_stats.len();
    let rep = l.mirror.apply(&mut l.dp.maps, &c, cap)?;
    ensure!(
        rep.keys_written == keys,
        "applied {} keys, expected {keys}",
        rep.keys_written
    );
    let memory = map_memory(&l.pin_dir)?;
    Ok((
        l,
        BigApply {
            keys,
            compile,
            apply: rep.elapsed,
            keys_written: rep.keys_written,
            sets_created: rep.sets_created,
            memory,
        },
        c,
    ))
}

/// Swaps the loaded `keys`-key policy for the shifted one (every key record and every set
/// rewritten) while a probe thread runs allowed, disallowed and locked requests through the
/// program, each as the first packet of a new connection, and checks every verdict.
fn snapshot_under_traffic(l: &mut Loaded, keys: usize) -> Result<Snapshot> {
    let t0 = Instant::now();
    let c = policy_with_keys(keys, true)
        .compile()
        .map_err(|e| anyhow!("{e:?}"))?;
    let compile = t0.elapsed();
    l.dp.pin_program()?;
    let prog_pin = l.pin_dir.join("prog");
    // The earlier stages left connections in the flow table on the ports the probes reuse;
    // the filter places a segment in its connection's stream, so a probe on a stale
    // connection would be out of position. Start the probes on an empty table.
    let stale: Vec<_> = l.dp.maps.flows.keys().filter_map(|k| k.ok()).collect();
    for k in &stale {
        let _ = l.dp.maps.flows.remove(k);
    }
    // And the connections that passed bytes (KW_HELD): a tuple there without a flow would be
    // refused as a connection whose position was lost.
    {
        let md = aya::maps::MapData::from_pin(l.pin_dir.join(filter_common::maps::HELD))?;
        let mut held: aya::maps::HashMap<_, filter_common::FlowKey, filter_common::Held> =
            aya::maps::Map::from_map_data(md)?.try_into()?;
        let ks: Vec<_> = held.keys().filter_map(|k| k.ok()).collect();
        for k in &ks {
            let _ = held.remove(k);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probes_run = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicBool::new(false));
    let fr = frames();
    let probes: Vec<(Vec<u8>, u32, String)> = fr
        .iter()
        .filter(|f| f.locator == Locator::Http && f.variant.is_some())
        .map(|f| {
            let want = if f.variant == Some(Variant::Allowed) {
                XDP_PASS
            } else {
                XDP_DROP
            };
            (f.bytes.clone(), want, f.name.clone())
        })
        .collect();
    let worker = {
        let (stop, runs, started) = (stop.clone(), probes_run.clone(), started.clone());
        std::thread::spawn(move || -> Result<(u64, Vec<String>)> {
            let prog = Xdp::from_pin(&prog_pin, XdpAttachType::Interface)?;
            let mut wrong = 0u64;
            let mut examples = Vec::new();
            let mut sport = 2000u16;
            // Where each port's connection stands: ports wrap around, and the filter places
            // every segment in its connection's stream, so a reused port sends the next
            // segment where the last one that passed ended.
            let mut next_seq: std::collections::HashMap<([u8; 4], u16), u32> =
                std::collections::HashMap::new();
            while !stop.load(Ordering::Relaxed) {
                for (f, want, what) in &probes {
                    sport = if sport >= 60000 { 2000 } else { sport + 1 };
                    let mut fr = with_sport(f, sport);
                    let conn = ([fr[26], fr[27], fr[28], fr[29]], sport);
                    let seq = match next_seq.get(&conn) {
                        Some(&s) => {
                            fr[38..42].copy_from_slice(&s.to_be_bytes());
                            s
                        }
                        None => {
                            // A new connection: its SYN first, as a client's handshake.
                            if let Some(syn) = tests::packet::syn_for(&fr) {
                                prog.test_run(TestRunOptions {
                                    data_in: Some(&syn),
                                    repeat: 1,
                                    ..Default::default()
                                })?;
                            }
                            u32::from_be_bytes([fr[38], fr[39], fr[40], fr[41]])
                        }
                    };
                    let r = prog.test_run(TestRunOptions {
                        data_in: Some(&fr),
                        repeat: 1,
                        ..Default::default()
                    })?;
                    runs.fetch_add(1, Ordering::Relaxed);
                    started.store(true, Ordering::Relaxed);
                    let moved = if r.return_value == XDP_PASS {
                        tcp4_payload_len(&fr) as u32
                    } else {
                        0
                    };
                    next_seq.insert(conn, seq.wrapping_add(moved));
                    if r.return_value != *want {
                        wrong += 1;
                        if examples.len() < 5 {
                            examples.push(format!("{what}: action {} want {want}", r.return_value));
                        }
                    }
                }
            }
            Ok((wrong, examples))
        })
    };
    while !started.load(Ordering::Relaxed) && !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = probes_run.load(Ordering::Relaxed);
    let cap = l.dp.maps.key_stats.len();
    let rep = l.mirror.apply(&mut l.dp.maps, &c, cap);
    let during = probes_run.load(Ordering::Relaxed) - before;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (wrong, examples) = worker
        .join()
        .map_err(|_| anyhow!("probe thread panicked"))??;
    let rep = rep?;
    let _ = fs::remove_file(l.pin_dir.join("prog"));
    Ok(Snapshot {
        keys,
        compile,
        apply: rep.elapsed,
        keys_written: rep.keys_written,
        sets_created: rep.sets_created,
        probes: during,
        wrong,
        examples,
    })
}

/// The "Control-plane API" section: the daemon end to end. Locks over the API (1k keys),
/// then per policy size (tests/src/api_bench.rs, tests/src/fleet_bench.rs): PUT, lock to
/// enforced through the API, a policy-file edit and an etcd write, etcd to three edges,
/// status and metrics, restart, RSS. Each runs real daemons in namespace sandboxes.
fn control_plane_api_section(plan: &Plan, sizes: Option<&[usize]>) -> Result<Option<String>> {
    let locks = if plan.quick { 20 } else { 1_000 };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut out = String::new();
    println!("  API: {locks} locks, lock to the next packet dropped");
    let l = tests::api_bench::lock_to_drop(locks)?;
    let (p50, p99) = (
        tests::fleet_bench::percentile(&l, 50.0),
        tests::fleet_bench::percentile(&l, 99.0),
    );
    writeln!(
        out,
        "- **Lock over the API to the next packet dropped** ({locks} locks, 1k keys loaded; the PATCH round trip on the unix socket plus polling the connection's next packet through the daemon's pinned program): p50 {:.2} ms, p99 {:.2} ms (target p99 < 10 ms: {}).",
        ms(p50),
        ms(p99),
        if p99 < Duration::from_millis(10) {
            "met"
        } else {
            "missed"
        }
    )?;
    out.push_str(&control_plane_sizes(plan, sizes)?);
    Ok(Some(out))
}

/// Policy-file edits per size: (rename, in place).
fn file_edits(plan: &Plan, keys: usize) -> (usize, usize) {
    match (plan.quick, keys) {
        (true, _) => (5, 5),
        (false, k) if k >= 1_000_000 => (30, 10),
        (false, k) if k >= 100_000 => (100, 30),
        _ => (100, 50),
    }
}

/// Some parts of the control plane, printed only (`--cp-parts`).
fn control_plane_parts(plan: &Plan, sizes: Option<&[usize]>, parts: &[String]) -> Result<()> {
    use tests::api_bench::{FileFormat, FileWrite};
    let pct = |xs: &[Duration]| {
        (
            tests::fleet_bench::percentile(xs, 50.0),
            tests::fleet_bench::percentile(xs, 99.0),
        )
    };
    for &k in sizes.unwrap_or(&[10_000, 100_000, 1_000_000]) {
        for part in parts {
            println!("{} keys, {part}:", keys_label(k));
            match part.as_str() {
                "api" => println!("  {:?}", tests::api_bench::control_plane(k, 200)?),
                "file" => {
                    let (r, i) = file_edits(plan, k);
                    for (n, how) in [(r, FileWrite::Rename), (i, FileWrite::InPlace)] {
                        let f = tests::api_bench::file_lock_to_drop(k, n, FileFormat::Toml, how)?;
                        println!(
                            "  {how:?}: lock p50/p99 {:?}, write {:?}, {:.3} CPU s per edit, RSS {:.0} MiB",
                            pct(&f.lock),
                            f.write,
                            f.cpu_per_edit,
                            f.rss_mib
                        );
                    }
                }
                "etcd" => {
                    let f = tests::fleet_bench::propagation_at(k, 200, 200)?;
                    let all: Vec<Duration> = f
                        .prop
                        .iter()
                        .map(|r| r.iter().copied().max().unwrap_or_default())
                        .collect();
                    println!(
                        "  populate {:?}, load {:?} (2 more: {:?}), lock p50/p99 {:?}, to 3 edges p50/p99 {:?}, RSS {:?}",
                        f.populate,
                        f.load,
                        f.load_pair,
                        pct(&f.lock),
                        pct(&all),
                        f.rss_mib
                    );
                }
                other => bail!("unknown control-plane part {other} (api, file, etcd)"),
            }
        }
    }
    Ok(())
}

/// Everything measured at one policy size.
struct SizeFigures {
    api: tests::api_bench::ControlPlane,
    file: tests::api_bench::FileEdits,
    file_inplace: tests::api_bench::FileEdits,
    fleet: tests::fleet_bench::FleetFigures,
}

impl SizeFigures {
    /// etcd to three edges: per write, the last edge's drop.
    fn fleet_all(&self) -> Vec<Duration> {
        self.fleet
            .prop
            .iter()
            .map(|r| r.iter().copied().max().unwrap_or_default())
            .collect()
    }
}

/// The daemon end to end at each policy size: per size, one API daemon
/// (tests/src/api_bench.rs `control_plane`), one daemon on a policy file per way of writing
/// it (`file_lock_to_drop`), and one etcd with three edges (tests/src/fleet_bench.rs
/// `propagation_at`). Returns the markdown tables and the 1M targets; every figure must be
/// non-zero (the quick run's whole check).
fn control_plane_sizes(plan: &Plan, sizes: Option<&[usize]>) -> Result<String> {
    use tests::api_bench::{FileFormat, FileWrite};
    let (default_sizes, locks, etcd_locks, etcd_writes): (&[usize], usize, usize, usize) =
        if plan.quick {
            (&[1_000], 10, 10, 10)
        } else {
            (&[10_000, 100_000, 1_000_000], 200, 200, 200)
        };
    let sizes = sizes.unwrap_or(default_sizes);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |xs: &[Duration]| {
        (
            tests::fleet_bench::percentile(xs, 50.0),
            tests::fleet_bench::percentile(xs, 99.0),
        )
    };
    let mut figs = Vec::new();
    for &k in sizes {
        let label = keys_label(k);
        println!("  control plane at {label} keys: API");
        let api = tests::api_bench::control_plane(k, locks)?;
        println!("    {api:?}");
        let (n_rename, n_inplace) = file_edits(plan, k);
        println!("  control plane at {label} keys: {n_rename} policy-file edits (rename)");
        let file =
            tests::api_bench::file_lock_to_drop(k, n_rename, FileFormat::Toml, FileWrite::Rename)?;
        println!(
            "    lock p50/p99 {:?}, write {:?}, {:.3} CPU s per edit, RSS {:.0} MiB",
            pct(&file.lock),
            file.write,
            file.cpu_per_edit,
            file.rss_mib
        );
        println!("  control plane at {label} keys: {n_inplace} policy-file edits (in place)");
        let file_inplace = tests::api_bench::file_lock_to_drop(
            k,
            n_inplace,
            FileFormat::Toml,
            FileWrite::InPlace,
        )?;
        println!(
            "    lock p50/p99 {:?}, write {:?}, {:.3} CPU s per edit",
            pct(&file_inplace.lock),
            file_inplace.write,
            file_inplace.cpu_per_edit
        );
        println!(
            "  control plane at {label} keys: etcd, {etcd_locks} locks on one edge, {etcd_writes} to three"
        );
        // Three edges and etcd share two cores with a million keys each: a broken watch or a
        // slow snapshot is retried once (and said), a second failure ends the section.
        let fleet =
            tests::fleet_bench::propagation_at(k, etcd_locks, etcd_writes).or_else(|e| {
                println!("    etcd run failed ({e:#}); once more");
                tests::fleet_bench::propagation_at(k, etcd_locks, etcd_writes)
            })?;
        println!(
            "    populate {:?}, load {:?} (2 more: {:?}), lock p50/p99 {:?}, RSS {:?}",
            fleet.populate,
            fleet.load,
            fleet.load_pair,
            pct(&fleet.lock),
            fleet.rss_mib
        );
        let f = SizeFigures {
            api,
            file,
            file_inplace,
            fleet,
        };
        let c = &f.api;
        ensure!(
            c.put > Duration::ZERO
                && c.lock.0 > Duration::ZERO
                && c.status.0 > Duration::ZERO
                && c.metrics.0 > Duration::ZERO
                && c.restart > Duration::ZERO
                && c.rss_loaded_mib > 0.0
                && c.rss_reapplied_mib > 0.0
                && pct(&f.file.lock).0 > Duration::ZERO
                && pct(&f.file_inplace.lock).0 > Duration::ZERO
                && pct(&f.fleet.lock).0 > Duration::ZERO
                && pct(&f.fleet_all()).0 > Duration::ZERO
                && f.fleet.load > Duration::ZERO,
            "a zero control-plane figure at {k} keys: {c:?}"
        );
        figs.push((k, f));
    }

    let mut out = String::new();
    let (n_rename, n_inplace) = file_edits(plan, 1_000_000);
    let (s_rename, s_inplace) = file_edits(plan, 10_000);
    writeln!(
        out,
        "- **The control plane by policy size** (keys `bk000000`.. each allowed from two IPv4 hosts; every daemon a `keywall run` on a veth in a namespace, API on a unix socket, state dir on disk; release build). Every lock is timed to the next packet of the locked key's established connection dropped, polled through BPF_PROG_TEST_RUN on the daemon's pinned program, and undone (untimed) before the next.\n  - *PUT*: a whole policy of that size onto one of that size, every key's allowlist changed, timed to the answer (maps enforce it, snapshot synced).\n  - *API lock*: {locks} PATCH locks of one key, from the request.\n  - *file edit lock*: `keywall run --policy policy.toml` at its default 200 ms poll, detection included; the file is rewritten with one key's `locked = true` added, timed from the edit complete on disk to the drop. *rename*: a temporary file written and fsynced, then renamed over the policy file (editors, config management); *in place*: truncated, rewritten and fsynced (the daemon may read it half written, reject it and take the whole file at its next poll). The daemon parses only the `[[key]]` tables an edit touched (filter-user/src/source/file/edit.rs), the whole file for any other edit. {s_rename} and {s_inplace} edits at 10k keys, {n_rename} and {n_inplace} at 1M.\n  - *etcd lock*: `keywall run --etcd` alone on an etcd holding the policy in the layout of docs/REFERENCE.md (written with the client API in transactions of 128 puts); {etcd_locks} puts of the locked key, from the put.\n  - *etcd to 3 edges*: two more edges join that etcd; {etcd_writes} puts, each timed until the last of the three edges drops.\n  - *status* and *metrics*: 20 reads each, idle. *Restart*: SIGTERM, then a new daemon until `GET /v1/status` answers (the pinned maps still enforce the policy). *RSS*: `VmRSS` of the API daemon once idle after the load, and after 3 more whole re-applies.\n"
    )?;
    writeln!(
        out,
        "| keys | PUT | API lock p50 / p99 | file edit lock (rename) p50 / p99 | file edit lock (in place) p50 / p99 | etcd lock p50 / p99 | etcd to 3 edges p50 / p99 | status p50 / p99 | metrics p50 / p99 | restart to API | RSS after load | RSS after 3 re-applies |"
    )?;
    writeln!(
        out,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (k, f) in &figs {
        let c = &f.api;
        let (fr, fi, el, ea) = (
            pct(&f.file.lock),
            pct(&f.file_inplace.lock),
            pct(&f.fleet.lock),
            pct(&f.fleet_all()),
        );
        writeln!(
            out,
            "| {} | {:.2} s | {:.2} / {:.2} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} s | {:.0} MiB | {:.0} MiB |",
            keys_label(*k),
            c.put.as_secs_f64(),
            ms(c.lock.0),
            ms(c.lock.1),
            ms(fr.0),
            ms(fr.1),
            ms(fi.0),
            ms(fi.1),
            ms(el.0),
            ms(el.1),
            ms(ea.0),
            ms(ea.1),
            ms(c.status.0),
            ms(c.status.1),
            ms(c.metrics.0),
            ms(c.metrics.1),
            c.restart.as_secs_f64(),
            c.rss_loaded_mib,
            c.rss_reapplied_mib
        )?;
    }
    writeln!(
        out,
        "\nThe file and etcd sources beside it: the policy file's size and its write (median), the daemon's CPU per file edit (lock and unlock together, poll reads included), writing the policy into etcd, an etcd edge from `keywall run` to the snapshot enforced (every key in status, the bench connection passing), and the RSS of the file daemon and of the three etcd edges at the end.\n"
    )?;
    writeln!(
        out,
        "| keys | policy file | file write | daemon CPU per file edit | file daemon RSS | etcd written in | etcd snapshot to enforcing (edge 1 alone) | edges 2 and 3 together | etcd edges' RSS |"
    )?;
    writeln!(
        out,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (k, f) in &figs {
        let size = tests::api_bench::bench_policy_file(*k, false, FileFormat::Toml).len();
        writeln!(
            out,
            "| {} | {:.1} MB | {:.0} ms | {:.2} s | {:.0} MiB | {:.1} s | {:.2} s | {:.2} s | {} MiB |",
            keys_label(*k),
            size as f64 / 1e6,
            ms(f.file.write),
            f.file.cpu_per_edit,
            f.file.rss_mib,
            f.fleet.populate.as_secs_f64(),
            f.fleet.load.as_secs_f64(),
            f.fleet.load_pair.as_secs_f64(),
            f.fleet
                .rss_mib
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        )?;
    }
    if let Some((_, f)) = figs.iter().find(|(k, _)| *k == 1_000_000) {
        let c = &f.api;
        let met = |ok: bool| if ok { "met" } else { "missed" };
        let fr = pct(&f.file.lock).1;
        let fi = pct(&f.file_inplace.lock).1;
        let el = pct(&f.fleet.lock).1;
        let ea = pct(&f.fleet_all()).1;
        let file_rss = f.file.rss_mib.max(f.file_inplace.rss_mib);
        writeln!(
            out,
            "\nTargets at 1M keys: PUT < 5 s: {:.2} s, {}; API lock p99 < 10 ms: {:.2} ms, {}; file edit lock p99 < 500 ms: {:.0} ms (rename), {}, {:.0} ms (in place), {}; etcd lock p99 < 10 ms: {:.2} ms, {}; etcd to 3 edges p99 < 100 ms: {:.2} ms, {}; status p99 < 50 ms: {:.2} ms, {}; metrics p99 < 50 ms: {:.2} ms, {}; restart to API < 10 s: {:.2} s, {}; RSS ≤ 512 MiB for every source: API daemon {:.0} / {:.0} MiB (after load / after 3 re-applies), file daemon {:.0} MiB, etcd edges {} MiB, {}.",
            c.put.as_secs_f64(),
            met(c.put < Duration::from_secs(5)),
            ms(c.lock.1),
            met(c.lock.1 < Duration::from_millis(10)),
            ms(fr),
            met(fr < Duration::from_millis(500)),
            ms(fi),
            met(fi < Duration::from_millis(500)),
            ms(el),
            met(el < Duration::from_millis(10)),
            ms(ea),
            met(ea < Duration::from_millis(100)),
            ms(c.status.1),
            met(c.status.1 < Duration::from_millis(50)),
            ms(c.metrics.1),
            met(c.metrics.1 < Duration::from_millis(50)),
            c.restart.as_secs_f64(),
            met(c.restart < Duration::from_secs(10)),
            c.rss_loaded_mib,
            c.rss_reapplied_mib,
            file_rss,
            f.fleet
                .rss_mib
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            met(c.rss_loaded_mib <= 512.0
                && c.rss_reapplied_mib <= 512.0
                && file_rss <= 512.0
                && f.fleet.rss_mib.iter().all(|&r| r <= 512.0)),
        )?;
    }
    Ok(out)
}

/// `doc` with its "## Control-plane API" section (up to the next "## " heading) replaced by
/// `section`.
fn replace_api_section(doc: &str, section: &str) -> Result<String> {
    const HEAD: &str = "\n## Control-plane API\n";
    let start = doc
        .find(HEAD)
        .context("the report has no \"## Control-plane API\" section")?;
    let body = start + HEAD.len();
    let end = doc[body..].find("\n## ").map_or(doc.len(), |i| body + i);
    Ok(format!("{}{HEAD}\n{section}{}", &doc[..start], &doc[end..]))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn keys_label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn action_name(a: u32) -> &'static str {
    match a {
        0 => "aborted",
        1 => "drop",
        2 => "pass",
        3 => "tx",
        4 => "redirect",
        _ => "?",
    }
}

fn packet_table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| frame | keys | counted as | keywall ns | XDP_PASS ns | drop-all ns | xdp-filter ns (its action) | × xdp-filter | × XDP_PASS |\n");
    s.push_str("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        let p = r.peers.as_ref().expect("peer times");
        let peers = format!(
            "{} | {} | {} ({})",
            p.pass.show(),
            p.drop_all.show(),
            p.xdpfilt.show(),
            action_name(p.xdpfilt_action)
        );
        match (&r.outcome, &r.keywall) {
            (Outcome::Timed(reason), Some(k)) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {peers} | {:.2}× | {:.2}× |",
                    r.frame,
                    keys_label(r.keys),
                    match r.repeated_as {
                        Some(rr) if rr != *reason => {
                            format!(
                                "{} (first run), then {} (repeats)",
                                reason.name(),
                                rr.name()
                            )
                        }
                        _ => reason.name().to_owned(),
                    },
                    k.show(),
                    k.median / p.xdpfilt.median,
                    k.median / p.pass.median,
                );
            }
            (Outcome::NotSupported { feature, counted }, _) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | **not supported by this build** ({feature}: counted as {}) | — | {peers} | — | — |",
                    r.frame,
                    keys_label(r.keys),
                    counted.name(),
                );
            }
            _ => unreachable!("a timed outcome always has timings"),
        }
    }
    s
}

fn flood_table(rows: &[FloodRow]) -> String {
    let mut s = String::new();
    s.push_str("| filter | frames | Mpps (min / median / max) | × drop-all | × nftables | × no filter (same frames) | sent Mpps | ring overflow Mpps | rx_dropped Mpps | edge NAPI thread CPU % | NAPI CPU ns per frame | edge CPU busy % | counted as / note |\n");
    s.push_str(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    let med_of = |f: FloodFilter| {
        rows.iter()
            .find(|r| r.filter == f)
            .and_then(|r| r.mpps)
            .map(|m| m.median)
    };
    let ceiling = med_of(FloodFilter::DropAll);
    let nft = med_of(FloodFilter::Nftables);
    for r in rows {
        let ratio = |base: Option<f64>| match (r.mpps, base) {
            (Some(m), Some(b)) if b > 0.0 && !r.filter.is_no_filter() => {
                format!("{:.2}×", m.median / b)
            }
            _ => "—".into(),
        };
        let mut note = r.note.clone();
        if !r.reasons.is_empty() {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&r.reason_shares());
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.filter.name(),
            r.filter.frames().describe(),
            r.mpps.map_or("—".into(), |m| m.show2()),
            ratio(ceiling),
            ratio(nft),
            ratio(med_of(r.filter.no_filter_peer())),
            r.spread(|w| w.offered_mpps + w.ring_overflow_mpps).show2(),
            r.spread(|w| w.ring_overflow_mpps).show2(),
            r.spread(|w| w.rx_dropped_mpps).show2(),
            r.spread(|w| w.napi_cpu_pct).show(),
            r.spread(|w| w.napi_ns_per_frame()).show(),
            r.spread(|w| w.edge_cpu_pct).show(),
            note,
        );
    }
    s
}

/// Where keywall's time goes, as differences between paths that add one step each (medians,
/// largest key set): the profile the targets are explained with.
fn breakdown(r: &Results) -> String {
    let keys = r.rows.iter().map(|x| x.keys).max().unwrap_or(0);
    let kw = |rows: &[Row], name: &str| -> Option<(f64, f64, f64)> {
        let x = rows
            .iter()
            .find(|x| x.keys == keys && x.frame.starts_with(name))?;
        let p = x.peers.as_ref()?;
        Some((x.keywall?.median, p.pass.median, p.xdpfilt.median))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| step ({} keys, repeat {} unless noted) | ns |\n| --- | ---: |",
        keys_label(keys),
        r.repeat
    );
    let mut line = |what: &str, v: Option<f64>| {
        let _ = match v {
            Some(v) => writeln!(s, "| {what} | {v:.0} |"),
            None => writeln!(s, "| {what} | — |"),
        };
    };
    let other = kw(&r.rows, "TCP segment to a port");
    let ack = kw(&r.rows, "established flow, bare ACK");
    let est = kw(&r.rows, "established flow, 64 B");
    let http = kw(&r.rows, "HTTP header, allowed");
    let first = kw(&r.first_rows, "HTTP header, allowed");
    line("XDP_PASS floor (same frame)", other.map(|o| o.1));
    line(
        "xdp-filter above the floor (two hash lookups: destination, then source)",
        est.map(|e| e.2 - e.1),
    );
    line(
        "keywall: parse Ethernet/IP/TCP, listener tables (port with no listener) above the floor",
        other.map(|o| o.0 - o.1),
    );
    let syn_drop = kw(&r.rows, "SYN to the listener, unknown");
    let syn_pass = kw(&r.rows, "SYN to the listener, allowed");
    line(
        "SYN dropped by the prefilter (listener, Bloom probes, drop counted and sampled) above the no-listener segment",
        syn_drop.zip(other).map(|(a, o)| a.0 - o.0),
    );
    line(
        "SYN passing the prefilter (first probe hits; a stale flow on the 5-tuple is removed) above the no-listener segment",
        syn_pass.zip(other).map(|(a, o)| a.0 - o.0),
    );
    line(
        "+ listener found, flow lookup and verdict follow (bare ACK)",
        ack.zip(other).map(|(a, o)| a.0 - o.0),
    );
    line(
        "+ scanning a 64 B established segment for a later key",
        est.zip(ack).map(|(e, a)| e.0 - a.0),
    );
    line(
        "keep-alive request with the key (220 B scanned, same key and generation) above the bare ACK",
        http.zip(ack).map(|(h, a)| h.0 - a.0),
    );
    line(
        "first packet of a new connection above the keep-alive request (judging the key, inserting the flow; repeat 1, each above its own XDP_PASS)",
        first.zip(http).map(|(f, h)| (f.0 - f.1) - (h.0 - h.1)),
    );
    s
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.3} ms", d.as_secs_f64() * 1e3)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn memory_lines(b: &BigApply) -> String {
    let get = |n: &str| {
        b.memory
            .iter()
            .find(|(m, _)| *m == n)
            .map_or(0, |(_, v)| *v)
    };
    let total: u64 = b.memory.iter().map(|(_, m)| m).sum();
    let per_key =
        (get(maps::KEYS) + get(maps::KEY_STATS) + get(maps::ACTIVITY)) as f64 / b.keys as f64;
    let cidrs = b.keys.div_ceil(10);
    let per_allow = get(maps::ALLOW) as f64 / cidrs as f64;
    let per_set = get(maps::SETS) as f64 / b.sets_created.max(1) as f64;
    let parts: Vec<String> = b
        .memory
        .iter()
        .filter(|(_, m)| *m >= 1 << 20)
        .map(|(n, m)| format!("{n} {:.1} MiB", mib(*m)))
        .collect();
    format!(
        "- **kernel map memory with {} keys** (`memlock` of each map from its fdinfo, the figure `bpftool map show` prints): \
         {:.1} MiB in all ({}).\n\
         - per key: {per_key:.0} B (`KW_KEYS` element holding both slots' records with 4 inline IPv4 hosts, plus its `KW_KEY_STATS` and `KW_ACTIVITY` slots); \
         an inline host costs nothing beyond the key record.\n\
         - per allow entry outside the record (CIDRs, IPv6, a fifth host; here {cidrs} /28s): {per_allow:.0} B in `KW_ALLOW`, \
         plus {per_set:.0} B per address set in `KW_SETS` ({} sets).\n\
         - `KW_KEY_STATS`, `KW_ACTIVITY`, `KW_FLOWS` and the listener tables are preallocated at capacity; the key, set, allow and rate maps grow with the policy (plus their buckets).\n",
        keys_label(b.keys),
        mib(total),
        parts.join(", "),
        b.sets_created,
    )
}

struct Results {
    plan_quick: bool,
    repeat: u32,
    reps: usize,
    first_packets: usize,
    rows: Vec<Row>,
    first_rows: Vec<Row>,
    /// The scaling frames on the sets with 1, 4 and 64 allow entries per key.
    entry_rows: Vec<Row>,
    entry_first_rows: Vec<Row>,
    entry_keys: usize,
    flood: Vec<FloodRow>,
    flood_keys: usize,
    flood_window: Duration,
    xdpfilt_entries: (usize, usize),
    big: Option<BigApply>,
    lock: LockLatency,
    large_lock: Option<LargeLock>,
    snapshot: Option<Snapshot>,
    api: Option<String>,
    programs: Vec<ProgInfo>,
    rt_napi: bool,
}

/// ns per packet of the scaling frames across key counts (4 entries each) and across allow
/// entries per key (at `entry_keys` keys): medians, each beside its own run's xdp-filter.
fn scaling_table(r: &Results) -> String {
    let mut keys: Vec<usize> = r.rows.iter().map(|x| x.keys).collect();
    keys.sort();
    keys.dedup();
    let mut s = String::from("| frame |");
    for k in &keys {
        let _ = write!(s, " {} keys, 4 entries |", keys_label(*k));
    }
    for e in ENTRY_VARIANTS {
        let _ = write!(
            s,
            " {} keys, {e} {} |",
            keys_label(r.entry_keys),
            if e == 1 { "entry" } else { "entries" }
        );
    }
    s.push_str(" largest / smallest |\n| --- |");
    for _ in 0..keys.len() + ENTRY_VARIANTS.len() + 1 {
        s.push_str(" ---: |");
    }
    s.push('\n');
    let frames: Vec<Frame> = frames().into_iter().filter(scaling_frame).collect();
    for first in [false, true] {
        for f in &frames {
            if first && !f.first_packet {
                continue;
            }
            let (main, var) = if first {
                (&r.first_rows, &r.entry_first_rows)
            } else {
                (&r.rows, &r.entry_rows)
            };
            let cell = |x: Option<&Row>| -> (String, Option<f64>) {
                match x.and_then(|x| x.keywall.map(|k| (k, x))) {
                    Some((k, x)) => (
                        format!(
                            "{:.0} ({:.2}×)",
                            k.median,
                            k.median / x.peers.as_ref().expect("peers").xdpfilt.median
                        ),
                        Some(k.median),
                    ),
                    None => ("—".into(), None),
                }
            };
            let mut cells = Vec::new();
            for k in &keys {
                cells
                    .push(cell(main.iter().find(|x| {
                        x.frame == f.name && x.keys == *k && x.entries == 4
                    })));
            }
            for e in ENTRY_VARIANTS {
                cells.push(cell(
                    var.iter().find(|x| x.frame == f.name && x.entries == e),
                ));
            }
            let vals: Vec<f64> = cells.iter().filter_map(|c| c.1).collect();
            let spread = if vals.is_empty() {
                "—".into()
            } else {
                let (lo, hi) = vals
                    .iter()
                    .fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(*v), b.max(*v)));
                format!("{:.2}", hi / lo)
            };
            let _ = writeln!(
                s,
                "| {}{} | {} | {spread} |",
                if first {
                    "first packet (new connection): "
                } else {
                    ""
                },
                f.name,
                cells
                    .into_iter()
                    .map(|c| c.0)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
    }
    s
}

fn control_plane(r: &Results) -> String {
    let mut s = String::new();
    let l = &r.lock;
    let _ = writeln!(
        s,
        "- **lock to enforced, map level** ({} keys loaded, {} applies, each locking one more key): \
         p50 {}, p99 {}, max {} (`Mirror::apply`: the changed key records, the slot flip and cleanup). \
         The next packet of a locked key's established flow was counted as `{}`. This excludes the daemon's \
         policy-file polling or API handling.",
        keys_label(l.keys),
        l.applies,
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
        l.cut.name(),
    );
    if let Some(g) = &r.large_lock {
        let _ = writeln!(
            s,
            "- lock to enforced, map level, with {} keys loaded ({} incremental applies naming the changed key, as a PATCH does): \
             p50 {}, p99 {}, max {}. A full apply, which examines every key (the policy-file path), brought the second slot up \
             to the full key set first in {:.2} s.",
            keys_label(g.keys),
            g.applies,
            ms(g.p50),
            ms(g.p99),
            ms(g.max),
            g.resync.as_secs_f64(),
        );
    }
    match &r.big {
        Some(b) => {
            let _ = writeln!(
                s,
                "- **{}-key snapshot onto an empty policy**: {:.2} s (`Mirror::apply`: {} key records, {} address sets, \
                 then the slot flip and cleanup); compiling it took another {:.2} s.",
                keys_label(b.keys),
                b.apply.as_secs_f64(),
                b.keys_written,
                b.sets_created,
                b.compile.as_secs_f64(),
            );
            s.push_str(&memory_lines(b));
        }
        None => s.push_str("- 1M-key snapshot and memory: not run (--quick)\n"),
    }
    if let Some(n) = &r.snapshot {
        let _ = writeln!(
            s,
            "- **{}-key snapshot swap under traffic**: {:.2} s to apply a policy that moves 3 of every key's 4 hosts and every key's \
             CIDR to other keys and networks ({} key records written, {} address sets created), while a probe thread ran allowed, disallowed and locked requests through the \
             program, each the first packet of a new connection: {} probes during the swap, **{} wrong verdicts**{}. Compiling \
             the new policy took {:.2} s before it.",
            keys_label(n.keys),
            n.apply.as_secs_f64(),
            n.keys_written,
            n.sets_created,
            n.probes,
            n.wrong,
            if n.examples.is_empty() {
                String::new()
            } else {
                format!(" ({})", n.examples.join("; "))
            },
            n.compile.as_secs_f64(),
        );
    }
    s
}

/// A target from the issue, its figure and whether it is met.
struct Target {
    what: String,
    figure: String,
    met: Option<bool>,
}

fn find_row(rows: &[Row], pred: impl Fn(&Row) -> bool) -> Option<&Row> {
    // The largest key set wins.
    rows.iter().filter(|r| pred(r)).max_by_key(|r| r.keys)
}

/// keywall over xdp-filter on one row: (figure, ratio), or why there is none.
fn ratio_of(r: &Row) -> std::result::Result<(String, f64), String> {
    match (&r.outcome, &r.keywall) {
        (Outcome::Timed(_), Some(k)) => {
            let p = r.peers.as_ref().expect("peers");
            let ratio = k.median / p.xdpfilt.median;
            Ok((
                format!(
                    "{:.0} ns vs {:.0} ns = {ratio:.2}× ({} keys; XDP_PASS {:.0} ns)",
                    k.median,
                    p.xdpfilt.median,
                    keys_label(r.keys),
                    p.pass.median
                ),
                ratio,
            ))
        }
        (Outcome::NotSupported { feature, counted }, _) => Err(format!(
            "not measured: {feature} not supported by this build (counted as {})",
            counted.name()
        )),
        _ => Err("not timed".into()),
    }
}

/// One target over several rows (`label`, row): every row's ratio to xdp-filter, judged on
/// the worst.
fn ratio_target(what: &str, rows: &[(String, Option<&Row>)], limit: f64) -> Target {
    let what = format!("{what} | ≤ {limit}× xdp-filter");
    let mut parts = Vec::new();
    let mut worst: Option<f64> = Some(0.0);
    for (label, row) in rows {
        let (fig, ratio) = match row.map(ratio_of) {
            Some(Ok((f, r))) => (f, Some(r)),
            Some(Err(e)) => (e, None),
            None => ("no row".into(), None),
        };
        worst = worst.zip(ratio).map(|(w, r)| w.max(r));
        parts.push(if label.is_empty() {
            fig
        } else {
            format!("{label}: {fig}")
        });
    }
    if rows.len() > 1
        && let Some(w) = worst
    {
        parts.push(format!("worst {w:.2}×"));
    }
    Target {
        what,
        figure: parts.join("; "),
        met: worst.map(|w| w <= limit),
    }
}

/// A fitted slope for printing: no "-0.000" for a flat line.
fn nz(v: f64) -> f64 {
    if v.abs() < 0.0005 { 0.0 } else { v }
}

/// Least-squares line through (x, y): (slope, intercept).
fn fit(pts: &[(f64, f64)]) -> (f64, f64) {
    let n = pts.len() as f64;
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (slope, my - slope * mx)
}

/// The scan slope of one program on one key set: ns per payload byte and the intercept,
/// fitted over the slope segments' medians, and the spread of the per-rep fits.
struct Slope {
    who: String,
    slope: f64,
    intercept: f64,
    per_rep: Option<Spread>,
    points: usize,
}

fn slopes(r: &Results) -> Vec<Slope> {
    let slope_rows = |keys: usize| -> Vec<&Row> {
        r.rows
            .iter()
            .filter(|x| x.keys == keys && x.frame.ends_with("(scan slope)"))
            .collect()
    };
    let mut keys: Vec<usize> = r.rows.iter().map(|x| x.keys).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for &k in &keys {
        let rows = slope_rows(k);
        if rows.is_empty() || rows.iter().any(|x| x.keywall.is_none()) {
            continue;
        }
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .map(|x| (x.payload_len as f64, x.keywall.expect("timed").median))
            .collect();
        let (slope, intercept) = fit(&pts);
        let reps = rows.iter().map(|x| x.kw_samples.len()).min().unwrap_or(0);
        let per: Vec<f64> = (0..reps)
            .map(|i| {
                fit(&rows
                    .iter()
                    .map(|x| (x.payload_len as f64, x.kw_samples[i]))
                    .collect::<Vec<_>>())
                .0
            })
            .collect();
        out.push(Slope {
            who: format!("keywall, {} keys", keys_label(k)),
            slope,
            intercept,
            per_rep: (!per.is_empty()).then(|| Spread::of(&per)),
            points: pts.len(),
        });
    }
    // The peers ran the same frames (the same figures for every key set: take the largest).
    if let Some(&k) = keys.last() {
        let rows = slope_rows(k);
        type Pick = fn(&PeerTimes) -> f64;
        let peer: [(&str, Pick); 3] = [
            ("xdp-filter", |p| p.xdpfilt.median),
            ("XDP_PASS", |p| p.pass.median),
            ("XDP drop-all", |p| p.drop_all.median),
        ];
        for (who, g) in peer {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|x| Some((x.payload_len as f64, g(x.peers.as_ref()?))))
                .collect();
            if pts.len() < 2 {
                continue;
            }
            let (slope, intercept) = fit(&pts);
            out.push(Slope {
                who: who.into(),
                slope,
                intercept,
                per_rep: None,
                points: pts.len(),
            });
        }
    }
    out
}

fn slope_table(r: &Results) -> String {
    let mut s = String::from(
        "| program | ns per payload byte (fit of the medians) | per-rep fits (min / median / max) | intercept ns | sizes |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for x in slopes(r) {
        let _ = writeln!(
            s,
            "| {} | {:.3} | {} | {:.0} | {} |",
            x.who,
            nz(x.slope),
            x.per_rep.map_or("—".into(), |p| format!(
                "{:.3} / {:.3} / {:.3}",
                p.min, p.median, p.max
            )),
            x.intercept,
            x.points
        );
    }
    s
}

/// Issue 11's targets, in its order.
fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    fn row<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
        find_row(rows, |x| x.frame.starts_with(name) && x.entries == 4)
    }
    t.push(ratio_target(
        "established flow, bare ACK",
        &[(String::new(), row(&r.rows, "established flow, bare ACK"))],
        1.2,
    ));
    t.push(ratio_target(
        "established HTTP data segment, 64 B, no key",
        &[(
            String::new(),
            row(&r.rows, "established flow, 64 B payload"),
        )],
        2.0,
    ));
    // The scan slope, at the largest key set, with the peers' beside it.
    let sl = slopes(r);
    let kw = sl.iter().rfind(|x| x.who.starts_with("keywall"));
    let peers: Vec<String> = sl
        .iter()
        .filter(|x| !x.who.starts_with("keywall"))
        .map(|x| format!("{} {:.3}", x.who, nz(x.slope)))
        .collect();
    t.push(match kw {
        Some(k) => Target {
            what: "payload scan slope (ns per byte, fitted over 100 to 1,400 B segments) | ≤ 0.5 ns/byte".into(),
            figure: format!(
                "{:.3} ns/byte, intercept {:.0} ns ({}; {} sizes {}; per-rep fits {}); peers' slopes: {}",
                k.slope,
                k.intercept,
                k.who,
                k.points,
                SLOPE_SIZES.map(|n| n.to_string()).join("/"),
                k.per_rep.map_or("—".into(), |p| format!("{:.3} / {:.3} / {:.3}", p.min, p.median, p.max)),
                peers.join(", ")
            ),
            met: Some(k.slope <= 0.5),
        },
        None => Target {
            what: "payload scan slope (ns per byte, fitted over 100 to 1,400 B segments) | ≤ 0.5 ns/byte".into(),
            figure: "not measured (a slope segment was not timed)".into(),
            met: None,
        },
    });
    let first = |loc: Locator, var: Variant| {
        find_row(&r.first_rows, |x| {
            x.locator == loc && x.variant == Some(var) && x.entries == 4
        })
    };
    t.push(ratio_target(
        "first key-bearing packet, TLS SNI / FIX (new connection, repeat 1)",
        &[
            ("TLS allowed".into(), first(Locator::Tls, Variant::Allowed)),
            (
                "TLS disallowed".into(),
                first(Locator::Tls, Variant::Disallowed),
            ),
            ("FIX allowed".into(), first(Locator::Fix, Variant::Allowed)),
            (
                "FIX disallowed".into(),
                first(Locator::Fix, Variant::Disallowed),
            ),
        ],
        1.5,
    ));
    t.push(ratio_target(
        &format!(
            "first key-bearing packet, HTTP header at byte ~96 (key header at payload byte {}; new connection, repeat 1)",
            key_header_offset()
        ),
        &[
            ("allowed".into(), first(Locator::Http, Variant::Allowed)),
            ("disallowed".into(), first(Locator::Http, Variant::Disallowed)),
        ],
        2.5,
    ));
    t.push(ratio_target(
        "prefilter SYN",
        &[(String::new(), row(&r.rows, "SYN to the listener, unknown"))],
        1.0,
    ));

    // Floods.
    let fl = |f: FloodFilter| r.flood.iter().find(|x| x.filter == f);
    let mpps = |f: FloodFilter| fl(f).and_then(|x| x.mpps).map(|m| m.median);
    let ns = |f: FloodFilter| fl(f).map_or(0.0, |x| x.spread(|w| w.napi_ns_per_frame()).median);
    let not_run = |what: &str, f: FloodFilter| Target {
        what: what.into(),
        figure: match fl(f) {
            Some(x) if !x.note.is_empty() => format!("not measured: {}", x.note),
            _ => "flood not run".into(),
        },
        met: None,
    };
    let what = "flood, SYN prefilter (65k sources) | ≥ 0.8× drop-all, ≥ 3× nftables";
    t.push(
        match (
            mpps(FloodFilter::KeywallPrefilter),
            mpps(FloodFilter::DropAll),
            mpps(FloodFilter::Nftables),
        ) {
            (Some(m), Some(c), Some(n)) => Target {
                what: what.into(),
                figure: format!(
                    "{m:.2} Mpps dropped; drop-all {c:.2}, nftables {n:.2}: {:.2}× and {:.2}× (NAPI CPU per frame: {:.0} ns; drop-all {:.0}, nftables {:.0})",
                    m / c,
                    m / n,
                    ns(FloodFilter::KeywallPrefilter),
                    ns(FloodFilter::DropAll),
                    ns(FloodFilter::Nftables)
                ),
                met: Some(m / c >= 0.8 && m / n >= 3.0),
            },
            _ => not_run(what, FloodFilter::KeywallPrefilter),
        },
    );
    let what = "flood, key-bearing data segments from sources no key allows | ≥ 0.5× drop-all";
    t.push(
        match (
            fl(FloodFilter::KeywallKeyDisallowed),
            mpps(FloodFilter::KeywallKeyDisallowed),
            mpps(FloodFilter::DropAll),
        ) {
            (Some(x), Some(m), Some(c)) => Target {
                what: what.into(),
                figure: format!(
                    "{m:.2} Mpps dropped, counted as {}; drop-all {c:.2}: {:.2}× (NAPI CPU per frame: {:.0} ns; drop-all {:.0}). No SYN precedes them (a SYN from these sources is dropped by the prefilter, so none is ever recorded)",
                    x.reason_shares(),
                    m / c,
                    ns(FloodFilter::KeywallKeyDisallowed),
                    ns(FloodFilter::DropAll),
                ),
                met: Some(m / c >= 0.5),
            },
            _ => not_run(what, FloodFilter::KeywallKeyDisallowed),
        },
    );
    let what =
        "flood, key-bearing data segments from an allowed source, wrong key | ≥ 5× no-filter";
    t.push(
        match (
            fl(FloodFilter::KeywallKeyAllowedWrongKey),
            mpps(FloodFilter::KeywallKeyAllowedWrongKey),
            mpps(FloodFilter::NoFilterData),
        ) {
            (Some(x), Some(m), Some(n)) => Target {
                what: what.into(),
                figure: format!(
                    "{m:.2} Mpps dropped, counted as {} ({:.0}% judged from the stream start); no filter takes in {n:.2} Mpps of the same frames: {:.2}× (NAPI CPU per frame: {:.0} ns; no filter {:.0}). Each needs a recorded SYN: the SYN flood from the same sources ran at {} Mpps ({:.0} ns NAPI CPU per frame, counted as {}), and those SYNs go on to the stack; at that rate, SYNs on new tuples would fill `KW_HELD` ({} records, never evicted) in {}, after which every new connection to the listeners is refused until the sweep forgets idle tuples",
                    x.reason_shares(),
                    x.share_of(Reason::DropNotAllowed) * 100.0,
                    m / n,
                    ns(FloodFilter::KeywallKeyAllowedWrongKey),
                    ns(FloodFilter::NoFilterData),
                    mpps(FloodFilter::KeywallSynAllowed).map_or("—".into(), |v| format!("{v:.2}")),
                    ns(FloodFilter::KeywallSynAllowed),
                    fl(FloodFilter::KeywallSynAllowed).map_or("—".into(), |s| s.reason_shares()),
                    filter_common::DEFAULT_MAX_HELD,
                    mpps(FloodFilter::KeywallSynAllowed)
                        .filter(|v| *v > 0.0)
                        .map_or("—".into(), |v| format!(
                            "{:.1} s",
                            f64::from(filter_common::DEFAULT_MAX_HELD) / (v * 1e6)
                        )),
                ),
                met: Some(m / n >= 5.0),
            },
            _ => not_run(what, FloodFilter::KeywallKeyAllowedWrongKey),
        },
    );
    t
}

/// The control-plane targets of the earlier issues (kept so a run still checks them).
fn control_targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let p99 = r
        .large_lock
        .as_ref()
        .map_or(r.lock.p99, |g| g.p99.max(r.lock.p99));
    t.push(Target {
        what: "lock to enforced p99 (map level) | < 10 ms".into(),
        figure: format!(
            "{} with {} keys{}",
            ms(r.lock.p99),
            keys_label(r.lock.keys),
            r.large_lock.as_ref().map_or(String::new(), |g| format!(
                ", {} with {} keys",
                ms(g.p99),
                keys_label(g.keys)
            ))
        ),
        met: Some(p99 < Duration::from_millis(10)),
    });
    match &r.snapshot {
        Some(n) => t.push(Target {
            what: "1M-key snapshot | < 5 s, no wrong verdict during the swap".into(),
            figure: format!(
                "{:.2} s under traffic, {} wrong of {} probes",
                n.apply.as_secs_f64(),
                n.wrong,
                n.probes
            ),
            met: Some(n.apply < Duration::from_secs(5) && n.wrong == 0),
        }),
        None => t.push(Target {
            what: "1M-key snapshot | < 5 s".into(),
            figure: "not run (--quick)".into(),
            met: None,
        }),
    }
    match &r.big {
        Some(b) => {
            let total: u64 = b.memory.iter().map(|(_, m)| m).sum();
            t.push(Target {
                what: "kernel map memory, 1M keys × 4 host entries | ≤ 256 MiB".into(),
                figure: format!(
                    "{:.1} MiB with {} keys (10% with a CIDR too)",
                    mib(total),
                    keys_label(b.keys)
                ),
                met: Some(total <= 256 << 20),
            });
        }
        None => t.push(Target {
            what: "kernel map memory, 1M keys × 4 host entries | ≤ 256 MiB".into(),
            figure: "not run (--quick)".into(),
            met: None,
        }),
    }
    t
}

fn targets_table(t: &[Target]) -> String {
    let mut s = String::from("| path | target | this run | verdict |\n| --- | --- | --- | --- |\n");
    for x in t {
        let v = match x.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {v} |", x.what, x.figure);
    }
    s
}

/// A loaded program's size, from `bpftool prog show` (what the profile notes compare).
struct ProgInfo {
    name: String,
    xlated: u64,
    jited: u64,
    functions: Vec<(String, usize)>,
}

fn prog_info(label: &str, id: u32) -> Option<ProgInfo> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(ProgInfo {
        name: label.to_owned(),
        xlated: v["bytes_xlated"].as_u64()? / 8,
        jited: v["bytes_jited"].as_u64()?,
        functions: xlated_functions(id),
    })
}

/// Instructions per function of a loaded program, from `bpftool prog dump xlated` (function
/// headers are the lines that end with `:` and do not start with an instruction number).
fn xlated_functions(id: u32) -> Vec<(String, usize)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "dump", "xlated", "id", &id.to_string()])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v: Vec<(String, usize)> = Vec::new();
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with(';') || t.is_empty() {
            continue;
        }
        let is_insn = t
            .split_once(':')
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_insn {
            match v.last_mut() {
                Some((_, n)) => *n += 1,
                None => v.push(("(main)".into(), 1)),
            }
        } else if t.ends_with(':') {
            let name = t
                .trim_end_matches(':')
                .split('(')
                .next()
                .unwrap_or(t)
                .split_whitespace()
                .last()
                .unwrap_or(t)
                .to_owned();
            v.push((name, 0));
        }
    }
    v
}

fn programs_table(p: &[ProgInfo]) -> String {
    let mut s = String::from(
        "| program | xlated instructions | JIT bytes | instructions per function (`bpftool prog dump xlated`) |\n| --- | ---: | ---: | --- |\n",
    );
    for x in p {
        let f: Vec<String> = x
            .functions
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            x.name,
            x.xlated,
            x.jited,
            f.join(", ")
        );
    }
    s
}

fn not_supported(r: &Results) -> Vec<String> {
    let mut v: Vec<String> = r
        .rows
        .iter()
        .chain(&r.first_rows)
        .filter_map(|x| match &x.outcome {
            Outcome::NotSupported { feature, .. } => Some(feature.to_string()),
            _ => None,
        })
        .chain(
            r.flood
                .iter()
                .filter(|x| x.mpps.is_none())
                .map(|x| format!("flood: {}", x.filter.name())),
        )
        .collect();
    v.sort();
    v.dedup();
    v
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpus} CPUs ({model}), kernel {}", sh("uname", &["-r"]))
}

fn report(r: &Results, for_doc: bool) -> String {
    let mut d = String::new();
    if for_doc {
        d.push_str("# keywall benchmarks\n\n");
        d.push_str(
            "Written by `cargo xtask bench` (`keywall-bench`, tests/src/bin/bench.rs); rerun it rather than editing by hand. ",
        );
        d.push_str("Absolute figures drift on a shared VM: read each one beside its baseline and peer from the same run.\n\n");
        let _ = writeln!(d, "- **Machine:** {}", machine());
        let _ = writeln!(
            d,
            "- **Date:** {}",
            sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        );
        let _ = writeln!(
            d,
            "- **Commit:** {}\n",
            sh(
                "git",
                &[
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "describe",
                    "--always",
                    "--dirty"
                ]
            )
        );
        d.push_str("## Targets (issue 11)\n\nRatios from this run, at the largest key set; where a target covers several frames, it is judged on the worst.\n\n");
        d.push_str(&targets_table(&targets(r)));
        d.push_str("\nControl-plane targets of the earlier issues, still checked:\n\n");
        d.push_str(&targets_table(&control_targets(r)));
        let ns = not_supported(r);
        if !ns.is_empty() {
            let _ = writeln!(
                d,
                "\nNot supported by this build, so not measured (the rows say so): {}.",
                ns.join(", ")
            );
        }
        d.push('\n');
        d.push_str(&method(r));
    }
    let _ = writeln!(
        d,
        "## Per-packet cost, repeat {} on one frame\n\nns/packet, min / median / max over {} reps. Ratios are median over median; × xdp-filter is the target's measure.\n",
        r.repeat, r.reps
    );
    d.push_str(&packet_table(&r.rows));
    let _ = writeln!(
        d,
        "\n## Key-bearing first packet of a new connection (repeat 1)\n\nEach rep is the median over {} new connections (a new source port per run); min / median / max over {} reps. The peers run the same frames the same way.\n",
        r.first_packets, r.reps
    );
    d.push_str(&packet_table(&r.first_rows));
    let _ = writeln!(
        d,
        "\n## Payload scan slope\n\nEstablished HTTP connections carrying a data segment without a key (compact JSON, no line break) of {} B, repeat {} each; a least-squares line of ns against payload bytes. The per-size figures are the \"(scan slope)\" rows of the per-packet table.\n",
        SLOPE_SIZES.map(|n| n.to_string()).join(", "),
        r.repeat
    );
    d.push_str(&slope_table(r));
    let _ = writeln!(
        d,
        "\n## Scaling with the policy\n\nkeywall ns per packet (median; × xdp-filter on the same frames in the same run) with 1k / 100k / 1M keys of 4 allow entries (4 hosts, 10% with a /28 too), and with {} keys of 1, 4 or 64 host entries each (no CIDR; with 64, key #{PROBE_KEY}'s allowed source is in the key's own set, behind 4 inline hosts). The 64-entry set is {} keys, not 1M: 64 entries for 1M keys would be 60M map elements outside the key records. Repeat {} for the repeated frames; first packets as in the first-packet table.\n",
        keys_label(r.entry_keys),
        keys_label(r.entry_keys),
        r.repeat
    );
    d.push_str(&scaling_table(r));
    d.push_str("\n## Where the time goes\n\nDifferences between paths that each add one step (medians from the tables above).\n\n");
    d.push_str(&breakdown(r));
    let _ = writeln!(
        d,
        "\n## Flood on veth, frames from 65,535 sources\n\nkeywall with {} keys; {:.0} s windows; min / median / max over the reps; edge NAPI thread {}.\n",
        keys_label(r.flood_keys),
        r.flood_window.as_secs_f64(),
        if r.rt_napi {
            "SCHED_FIFO (--rt-napi)"
        } else {
            "at normal priority (other load on this machine competes for its core: see the CPU columns)"
        }
    );
    if r.flood.is_empty() {
        d.push_str("Not run (--no-flood).\n");
    } else {
        d.push_str(&flood_table(&r.flood));
    }
    d.push_str("\n## Control plane\n\n");
    d.push_str(&control_plane(r));
    d.push_str("\n## Control-plane API\n\n");
    match &r.api {
        Some(a) => d.push_str(a),
        None => {
            d.push_str("- Not measured by this bench yet (hook: `control_plane_api_section`).\n")
        }
    }
    if !r.programs.is_empty() {
        d.push_str("\n## Program sizes (bpftool prog show)\n\n");
        d.push_str(&programs_table(&r.programs));
    }
    if !for_doc {
        d.push_str("\n## Targets (issue 11)\n\n");
        d.push_str(&targets_table(&targets(r)));
        d.push_str("\nControl-plane targets of the earlier issues:\n\n");
        d.push_str(&targets_table(&control_targets(r)));
        let ns = not_supported(r);
        if !ns.is_empty() {
            let _ = writeln!(d, "\nNot supported by this build: {}.", ns.join(", "));
        }
    } else {
        d.push('\n');
        d.push_str(tests::bench::profile::ISSUE11);
        d.push_str(PROFILE_NOTES);
    }
    d
}

fn method(r: &Results) -> String {
    let mut d = String::from("## Method\n\n");
    let _ = writeln!(
        d,
        "- **Per-packet:** ns/packet is the kernel's own average from `BPF_PROG_TEST_RUN` on the release build of the XDP object, repeat {} per measurement, {} reps; min / median / max. Every key set and every peer runs each frame in turn within a rep, after a warm-up, so drift touches all alike.",
        r.repeat, r.reps
    );
    d.push_str("- **Beside keywall, on the same frames:** `keywall_baseline_pass` from keywall's own object (`XDP_PASS`, the floor); an XDP drop-all (two raw instructions loaded with `bpf()`: aya 0.14 loads programs only from objects); and xdp-filter's own program, `xdpfilt_dny_ip.o` from Debian's libxdp1 (what `xdp-filter load -p deny -f ipv4,ipv6` loads), loaded with aya with its maps raised from 10,000 entries");
    let _ = writeln!(
        d,
        " to hold {} IPv4 and {} IPv6 exact addresses. `-p deny` is the policy for unmatched packets, so these are allowed sources: the keys' hosts (the allowed, disallowed (another key's host) and locked frames' sources among them); the unknown source and every flood source are denied. Its action on each frame is shown.",
        r.xdpfilt_entries.0, r.xdpfilt_entries.1
    );
    d.push_str("- Before and after timing, every frame is run once on every key set and its counted reason checked, so the table times the path it names. A path this build does not implement is shown as **not supported by this build** with what it was counted as (never silently left out); `--require-all` turns that into a failure.\n");
    d.push_str("- **Keys:** 1k, 100k or 1M, prefix length 8, each with 4 IPv4 host allow entries (inline in the key record) and every tenth key with an extra /28 (in the key's own address set); one key locked. Listeners: HTTP header on 8080, HTTP header behind PROXY v2 on 8081 (one trusted proxy), TLS SNI on 8443 (`k-<prefix>.api.test`), FIX on 9878 (tag 553).\n");
    let _ = writeln!(
        d,
        "- The key-bearing frames carry key #{PROBE_KEY}, one with a CIDR: the allowed source is its 4th inline host; the disallowed source is key #{}'s 4th host (another key's: it passes the prefilter, its SYN is recorded, and its request walks key #{PROBE_KEY}'s inline hosts and then probes the key's set; a source no key allows never reaches the key check, see the flood rows). The locked variant carries key #{LOCKED_KEY} from its own host. The HTTP key header starts at payload byte {}; the ClientHello is padded to 512 bytes like Chrome's, with GREASE and the SNI after six other extensions; the FIX Logon has 553 after ten fields; PROXY v2 puts 28 bytes before the same HTTP request.",
        PROBE_KEY + 1,
        key_header_offset()
    );
    d.push_str("- **Connections open with a SYN:** the filter judges a data segment without a flow entry only at ISN + 1 of a SYN it recorded (`KW_HELD`, docs/DATAPATH.md \"Stream starts\"), so the harness runs each 5-tuple's SYN (untimed) before its first data segment, as a client's handshake would. A first packet is timed without its SYN.\n");
    d.push_str("- Repeating one frame keeps its key's and its flow's map entries in cache, and after the first run a key-bearing frame takes the keep-alive path (same key, same policy generation); a repeated data segment is a retransmission of the last one, judged whole again. The first-packet table times new connections instead. The established-flow segments (64 B, and each scan-slope size on a connection of its own) follow the allowed HTTP request on their connection, which is run once before each measurement.\n");
    let _ = writeln!(
        d,
        "- **Scan slope:** established HTTP connections carrying a key-less data segment of {} B (compact JSON order bodies, no line break: the scan's per-byte walk without header-name checks), each timed like every other frame; the slope and intercept are the least-squares line through the medians of ns against payload bytes (and through each rep's figures, for the spread). The peers' slopes, fitted the same way on the same frames, show what a frame's length costs the kernel's test run without any scan.",
        SLOPE_SIZES.map(|n| n.to_string()).join(", ")
    );
    let _ = writeln!(
        d,
        "- **Scaling:** the key-count columns are the main key sets' rows; the allow-entry columns load one extra set at a time ({} keys with 1, 4 or 64 IPv4 hosts per key, no CIDR) after the main measurement and time only the scaling frames, with the peers again beside them.",
        keys_label(r.entry_keys)
    );
    d.push_str("- **Flood:** a live-frames generator (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`, 2^20 frames per call; a raw XDP program that sets each frame's source low 16 bits from `bpf_get_prandom_u32` in 10.77.0.0/16 (0 to 0xfffe), compensating the IP ID and TCP sequence so both checksums stay valid, for the paired rows also the source port (compensated in the sequence's high half), then `bpf_redirect`s into the client veth) runs pinned to CPU 0. The edge veth uses threaded NAPI, its thread pinned to CPU 1, with GRO on so that redirected frames are accepted without an XDP program. Rates come from the edge's own counters over a fixed window after a warm-up: `ethtool -S` (`xdp_drops`), the keywall reason counter or the nftables rule counter, and `rx_packets` for no filter. Ring overflow (the sender's `xdp_xmit_errors`) and `rx_dropped` are reported apart. CPU: the NAPI thread's utime+stime, also per frame taken from the ring (a cost that holds whatever else competes for the core), and CPU 1's busy share from /proc/stat (other agents share this machine). `--rt-napi` runs the NAPI thread SCHED_FIFO.\n");
    let _ = writeln!(
        d,
        "- **What each flood row sends** (keywall with the {}-key policy; every row from 65,535 sources in 10.77.0.0/16, which no key of that policy allows; keywall's counted reasons are read over each window and shown in the last column):\n  - *SYN prefilter*: SYNs to the HTTP listener, source port 33333. Dropped by the prefilter (`drop_prefilter`). The drop-all, xdp-filter, nftables and no-filter rows send these same SYNs.\n  - *key-bearing data segments, sources no key allows*: the HTTP request with key #500 as a data segment, with no SYN before it. No SYN from these sources can be recorded (the prefilter drops it), so sending SYNs first would change nothing: each segment has no flow and no `KW_HELD` record and is dropped at that lookup (`drop_malformed`) before any payload scan. That is the path an attacker from these sources gets.\n  - *SYN from allowed sources*: for this row and the next, the policy gains the attacker's own key `{ATTACKER_PREFIX}`, allowing 10.77.0.0/16. SYNs on 8 source ports per source ({PAIR_PORT_BASE}..{}, 524,280 tuples), the ISN derived from the tuple. They pass the prefilter, are recorded in `KW_HELD` (the first time a tuple is seen; a repeated ISN changes nothing) and go on to the stack, which answers them from a closed port; the figure is SYNs keywall counted per second, passed or dropped.\n  - *key-bearing data segments from allowed sources, wrong key*: right after that row, on the same tuples, the HTTP request with key #500 (which does not allow these sources) at ISN + 1 of each tuple's recorded SYN: the shape of an attacker's SYN + request pairs, with the SYNs sent in the row before rather than interleaved (the records persist; `KW_HELD` never evicts). Every request there is judged from the stream start and dropped (`drop_not_allowed`): the first on a tuple because its SYN is recorded, and a repeat because a refused connection's position does not move, so the same request is in order again (or, once the attacker's other tuples have pushed the refused flow out of the LRU flow table, fresh again at ISN + 1). A request on a tuple whose SYN the row before never got through (ring overflow) has no record and is dropped at that lookup (`drop_malformed`). The split is in the last column; the target compares the rate with no filter taking in the same frames.\n  - *no filter*: the same SYNs, and the same paired requests, up the stack to a closed port.\n- Peers in the flood: xdp-filter's program as above (attached natively; its list holds allowed hosts only, so every flood source is denied); nftables `netdev` ingress on the edge veth, `tcp dport 8080 ip saddr != @allowed_hosts ip saddr != @allowed_nets drop` with the same policy's {} hosts and /28s.",
        keys_label(r.flood_keys),
        PAIR_PORT_BASE + (1 << PAIR_PORT_BITS) - 1,
        keys_label(r.flood_keys * 4)
    );
    d.push_str("- **Control plane:** map-level figures from `Mirror::apply` (what the daemon runs after parsing); the snapshot under traffic checks every probe's action as it runs.\n\n");
    d
}

/// What profiling found and what was changed for it; kept here so a rerun keeps the record.
const PROFILE_NOTES: &str =
    "## Profile notes from issue 6 (kept for the record; measured against that issue's targets)

How this was profiled: `bpftool prog profile` needs hardware counters, and this VM exposes no
PMU (`/sys/bus/event_source/devices` has no `cpu`), so there are no cycles per function here.
Instead: instruction counts per function from `bpftool prog dump xlated` (the program sizes
table), and path differences timed by BPF_PROG_TEST_RUN on the same frames in the same run
(\"Where the time goes\": each row adds one step). Figures quoted below are approximate, from
runs on 2026-11-24 with 1M keys; reruns move them by 10-20%.

- **The floor under every keywall path is already xdp-filter's whole cost.** Parsing
  Ethernet/IP/TCP (VLAN and IPv6 extension walks included) and the two listener array reads
  cost about 45 ns above `XDP_PASS`, as much as xdp-filter's two 4-byte hash lookups (about
  55 ns). Any path that then touches a map, let alone the payload, is above 1.1× xdp-filter.
- **Established flow (about 3.5-3.8×):** a bare ACK adds about 100 ns for the 5-tuple lookup in the
  shared `KW_FLOWS` LRU hash (a 40-byte key hashed with jhash, one cache line of value) and the
  generation check. An HTTP connection's data segment is then scanned again, because a
  keep-alive connection can carry a later request with another key: about 120 ns for 64 B
  (about 2 ns per byte with the SWAR newline walk). TLS and FIX connections already follow
  their verdict without a rescan (their repeated rows cost what a bare ACK costs).
  What could close most of the gap: (1) a per-CPU flow table (RSS keeps a connection on one
  CPU: `BPF_F_NO_COMMON_LRU`, or an LRU per-CPU hash) with an IPv4-only 12-byte key, so the
  lookup hashes 12 bytes instead of 40; (2) skip the rescan of an HTTP segment whose first
  bytes cannot start a request line or continue a header line that was cut, which is the
  fail-closed trade-off for the lead to weigh.
- **Key-bearing first packet (about 4.5-9×):** 1.5× xdp-filter's repeat-1 figure leaves about 120 ns
  above the floor, less than scanning a 220-byte request at the current 2 ns per byte
  (about 450 ns for the keep-alive request above a bare ACK). The first packet adds about
  390 ns more: the `KW_KEYS` lookup (16-byte key in a 1M-element hash), the inline host walk,
  the set probe for disallowed sources, and the LRU flow insert. No locator that reads the
  payload can meet this target; the cuts available are the LRU insert (per-CPU free lists)
  and the scan's per-byte cost. The TLS scan (`keywall_tls_scan`, 1,848 instructions plus its
  bpf_loop callback) is the cheapest first packet because the ClientHello walk jumps from
  extension to extension instead of reading every byte.
- **Prefilter SYN (about 1.5× in the latest run):** above the no-listener segment a dropped
  SYN costs about 40 ns: the listener found, one blocked-Bloom word per prefix length in the
  union (here two, /32 and /28, in an 8 MiB-per-slot array), and the drop counter and event
  budget (`on_drop`). The rest is the parse-and-listener floor above. With repeat on one frame
  the Bloom words stay in cache; in the flood, with 65,536 sources, they do not: the NAPI CPU
  per frame column puts keywall's prefilter at about 3× the drop-all's cost per frame, but
  already below xdp-filter's, whose 1M-entry per-CPU hash misses cache on every spread
  source. A smaller filter (fewer bits per source, fitting L2) or a single probe when the
  union has one prefix length would cut the rest.
- **Flood:** in the run above (helpers idle, the edge NAPI thread at 86-90% of its core) the
  prefilter drops 4.6 Mpps: 0.62× the drop-all, 7.4× nftables, and 1.35× xdp-filter, whose
  1M-entry hash misses cache on every spread source (264 ns of NAPI CPU per frame against
  keywall's 189 ns and the drop-all's 97 ns). The gap to the drop-all is the parse, the
  listener reads and the Bloom probes above (about 90 ns a frame); the 0.9× target would need
  the floor itself to shrink. The key-bearing flood makes every frame a new connection (a
  first packet, flow insert included), which is why it costs about 12× the drop-all per
  frame. On a loaded machine the NAPI thread gets 10-40% of its core and Mpps measure
  scheduling: compare the NAPI CPU per frame then; `--rt-napi` runs it SCHED_FIFO.
- **Control plane (lock p99, 1M snapshot):** both were met in earlier runs on a quieter
  machine (lock p99 0.6 ms, 1M-key snapshot 4.5 s onto an empty policy); in this run the
  machine's load (load average 7-8 on 2 vCPUs) stretched every map-writing syscall. The
  snapshot under traffic also shares the two CPUs with the probe thread.

## Earlier profile rounds, and what changed

- This session (measured with BPF_PROG_TEST_RUN on the changed paths, before and after):
  a passing SYN deleted the 5-tuple's flow entry on every listener (about 60-80 ns, a hash
  delete); it now does so only on TLS/FIX listeners, whose judged connections are not
  rescanned (SYN pass 172 ns to 75 ns). A prefiltered SYN built the 40-byte flow key it never
  used; it no longer does. Every drop read the clock for the event bucket (about 20 ns);
  once the bucket is dry, the next 31 drops skip the clock (prefilter drop 118 ns to 95 ns
  in that run). The ClientHello follow-up state (108 bytes) moved out of the flow entry into
  its own small LRU map, so `KW_FLOWS` elements stay 72 bytes. Judged TLS and FIX
  connections follow their verdict without calling their locator. Tried and dropped: a
  direct call instead of `bpf_loop` for a one-line segment (no measurable change).
- `read_unaligned` on packet words and header names compiled into eight byte loads plus
  shifts (LLVM's BPF backend assumes aligned access only). One volatile 8-byte load instead
  took the JIT image from 20 KB to 13 KB and the scan from about 2 ns to about 1.1 ns per
  payload byte.
- The listener lookup was a hash lookup (about 50 ns); it is now two array reads
  (`KW_LISTENER_INDEX[slot][port]` then `KW_LISTENERS[n]`).
- Every line start was given the full 48-byte window; now its first 8 bytes are compared
  with the header names first, and only a match builds the window (about 10 ns per line).
- The payload's last 1..7 bytes, and line starts within 8 bytes of its end, went through
  `bpf_xdp_load_bytes`, which cost over 100 ns a call; they are now read directly.
- A key-bearing request on an already judged connection re-judged the key and replaced the
  LRU element; the same key under the same policy generation now follows the connection's
  verdict, and a re-judged connection is updated in place.

";

// ---------------------------------------------------------------------------------------------

fn prog_id(p: &Xdp) -> Option<u32> {
    p.info().ok().map(|i| i.id())
}

fn run(args: &Args) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the bench loads XDP programs into the kernel");
    }
    let mut plan = Plan::new(args.quick);
    if let Some(n) = args.repeat {
        ensure!(n > 0, "--repeat must be positive");
        plan.repeat = n;
    }
    let t_start = Instant::now();
    if let Some(parts) = &args.cp_parts {
        ensure!(args.control_plane, "--cp-parts goes with --control-plane");
        return control_plane_parts(&plan, args.cp_sizes.as_deref(), parts);
    }
    if args.control_plane {
        println!("keywall-bench: control plane only; {}", machine());
        let section =
            control_plane_api_section(&plan, args.cp_sizes.as_deref())?.unwrap_or_default();
        println!("\n{section}");
        if !plan.quick && !args.no_doc {
            let doc = doc_path(args);
            let old =
                fs::read_to_string(&doc).with_context(|| format!("reading {}", doc.display()))?;
            fs::write(&doc, replace_api_section(&old, &section)?)
                .with_context(|| format!("writing {}", doc.display()))?;
            println!(
                "\nreplaced the \"Control-plane API\" section of {}",
                doc.display()
            );
        }
        println!("done in {:.1} s", t_start.elapsed().as_secs_f64());
        return Ok(());
    }
    println!(
        "keywall-bench{}: {}; BPF_PROG_TEST_RUN repeat {}, {} reps",
        if args.quick { " --quick" } else { "" },
        machine(),
        plan.repeat,
        plan.reps
    );
    for f in frames() {
        println!(
            "  frame: {}: {} B, payload {} B",
            f.name,
            f.bytes.len(),
            f.payload_len
        );
    }

    println!(
        "\n[1/5] peers: XDP_PASS, drop-all, xdp-filter with {} + {} addresses",
        plan.xdpfilt_v4, plan.xdpfilt_v6
    );
    let (a4, a6) = xdpfilt_addresses(plan.xdpfilt_v4, plan.xdpfilt_v6);
    let t = Instant::now();
    let mut peers = Peers {
        pass: Baseline::load()?,
        drop_all: rawbpf::drop_all()?,
        xdpfilt: XdpFilter::load(&bench_pin_dir("xdpfilt"), &a4, &a6)?,
    };
    let xdpfilt_entries = (a4.len(), a6.len());
    drop((a4, a6));
    println!("  loaded in {:.1} s", t.elapsed().as_secs_f64());

    println!(
        "[2/5] key sets: {:?}",
        plan.key_sets
            .iter()
            .map(|k| keys_label(*k))
            .collect::<Vec<_>>()
    );
    let mut sets = Vec::new();
    let mut big = None;
    // On a terminal only: a bar over the key sets, and the set being loaded.
    let pb = keywall::progress::bar(plan.key_sets.len() as u64, "key sets loaded");
    for &k in &plan.key_sets {
        if let Some(pb) = &pb {
            pb.set_message(format!("loading {} keys", keys_label(k)));
        }
        let (l, b, c) = load_with_keys(k)?;
        if let Some(pb) = &pb {
            pb.inc(1);
        }
        let line = format!(
            "  {}: compile {:.2} s, apply {:.2} s",
            keys_label(k),
            b.compile.as_secs_f64(),
            b.apply.as_secs_f64()
        );
        match &pb {
            Some(pb) => pb.println(line),
            None => println!("{line}"),
        }
        if k >= 1_000_000 {
            big = Some((b, c));
        }
        sets.push((k, l));
    }
    keywall::progress::done(pb);

    println!(
        "[3/5] per-packet cost, {} reps of repeat {}",
        plan.reps, plan.repeat
    );
    let pb = keywall::progress::spinner("measuring per-packet cost");
    let measured = measure(&mut sets, &mut peers, &plan, args.require_all, 4, &|_| true);
    keywall::progress::done(pb);
    let (rows, first_rows) = measured?;

    // Allow entries per key: one extra set at a time, the scaling frames only.
    println!(
        "[3/5] scaling: {} keys with {:?} allow entries per key",
        keys_label(plan.entry_keys),
        ENTRY_VARIANTS
    );
    let (mut entry_rows, mut entry_first_rows) = (Vec::new(), Vec::new());
    for e in ENTRY_VARIANTS {
        let t = Instant::now();
        let l = load_with_entries(plan.entry_keys, e)?;
        println!(
            "  {} keys x {e} entries loaded in {:.2} s",
            keys_label(plan.entry_keys),
            t.elapsed().as_secs_f64()
        );
        let mut one = vec![(plan.entry_keys, l)];
        let (r, f) = measure(
            &mut one,
            &mut peers,
            &plan,
            args.require_all,
            e,
            &scaling_frame,
        )?;
        entry_rows.extend(r);
        entry_first_rows.extend(f);
    }

    let mut programs = Vec::new();
    if let Some((_, l)) = sets.last_mut()
        && let Some(id) = prog_id(l.dp.program()?)
    {
        programs.extend(prog_info("keywall", id));
    }
    let pass_prog: &mut Xdp = peers
        .pass
        .ebpf
        .program_mut(BASELINE_PROGRAM)
        .expect("baseline")
        .try_into()?;
    if let Some(id) = prog_id(pass_prog) {
        programs.extend(prog_info("keywall_baseline_pass", id));
    }
    if let Some(id) = peers.xdpfilt.prog_id() {
        programs.extend(prog_info("xdp-filter (xdpfilt_dny_ip)", id));
    }

    let mut flood_rows = Vec::new();
    if args.no_flood {
        println!("[4/5] flood: skipped (--no-flood)");
    } else {
        println!(
            "[4/5] flood on veth, {} keys, {} x {:.0} s per filter",
            keys_label(plan.flood_keys),
            plan.flood_reps,
            plan.flood_window.as_secs_f64()
        );
        let idx = sets
            .iter()
            .position(|(k, _)| *k == plan.flood_keys)
            .ok_or_else(|| anyhow!("no {}-key set loaded", plan.flood_keys))?;
        flood_rows = flood(
            args,
            &plan,
            &mut sets[idx].1,
            &mut peers.xdpfilt,
            &peers.drop_all,
        )?;
    }
    drop(peers);

    println!("[5/5] control plane");
    let small_keys = sets[0].0;
    let lock = lock_latency(&mut sets[0].1, small_keys)?;
    let mut large_lock = None;
    let mut snapshot = None;
    if let Some((_, c)) = big.as_mut() {
        let (keys, l) = sets.last_mut().expect("1M set");
        large_lock = Some(large_lock_latency(l, c, *keys)?);
        println!("  snapshot swap under traffic ({} keys)", keys_label(*keys));
        snapshot = Some(snapshot_under_traffic(l, *keys)?);
    }
    let big = big.map(|(b, _)| b);
    // A failed control-plane step (real daemons, etcd, a million keys) must not cost the run
    // its other figures: the report says what failed, and the bench still fails at the end.
    let (api, api_failed) = match control_plane_api_section(&plan, None) {
        Ok(s) => (s, None),
        Err(e) => {
            println!("  control plane FAILED: {e:#}");
            (
                Some(format!(
                    "- **Not measured in this run:** the control-plane section failed: {e:#}\n"
                )),
                Some(e),
            )
        }
    };
    let t = Instant::now();
    drop(sets);
    println!("  unload: {:.2} s", t.elapsed().as_secs_f64());

    let results = Results {
        plan_quick: plan.quick,
        repeat: plan.repeat,
        reps: plan.reps,
        first_packets: plan.first_packets,
        rows,
        first_rows,
        entry_rows,
        entry_first_rows,
        entry_keys: plan.entry_keys,
        flood: flood_rows,
        flood_keys: plan.flood_keys,
        flood_window: plan.flood_window,
        xdpfilt_entries,
        big,
        lock,
        large_lock,
        snapshot,
        api,
        programs,
        rt_napi: args.rt_napi,
    };
    println!("\n{}", report(&results, false));

    // Every row produced, with non-zero figures (the quick run's whole assertion).
    for r in results
        .rows
        .iter()
        .chain(&results.first_rows)
        .chain(&results.entry_rows)
        .chain(&results.entry_first_rows)
    {
        let p = r.peers.as_ref().expect("peers");
        ensure!(
            p.pass.min > 0.0 && p.drop_all.min > 0.0 && p.xdpfilt.min > 0.0,
            "{} ({} keys): a zero peer timing",
            r.frame,
            r.keys
        );
        if let Some(k) = r.keywall {
            ensure!(k.min > 0.0, "{} ({} keys): a zero timing", r.frame, r.keys);
        }
    }
    let want_rows = frames().len() * plan.key_sets.len();
    ensure!(
        results.rows.len() == want_rows,
        "{} per-packet rows, expected {want_rows}",
        results.rows.len()
    );
    let want_entry_rows =
        frames().iter().filter(|f| scaling_frame(f)).count() * ENTRY_VARIANTS.len();
    ensure!(
        results.entry_rows.len() == want_entry_rows,
        "{} scaling rows, expected {want_entry_rows}",
        results.entry_rows.len()
    );
    // Issue 11's targets: every row produced with a figure (met or missed, never "not
    // measured"), unless the flood was skipped on purpose.
    for t in targets(&results) {
        ensure!(
            t.met.is_some() || (args.no_flood && t.what.starts_with("flood")),
            "target without a figure: {} ({})",
            t.what,
            t.figure
        );
    }
    ensure!(
        slopes(&results)
            .iter()
            .any(|x| x.who.starts_with("keywall") && x.points == SLOPE_SIZES.len()),
        "no scan slope fitted"
    );
    if !args.no_flood {
        ensure!(
            results.flood.len() == FloodFilter::ALL.len(),
            "flood rows missing"
        );
    }
    ensure!(results.lock.p50 > Duration::ZERO, "zero lock latency");
    if let Some(n) = &results.snapshot {
        ensure!(
            n.wrong == 0,
            "{} wrong verdicts during the snapshot swap: {:?}",
            n.wrong,
            n.examples
        );
        ensure!(n.probes > 0, "no probe ran during the snapshot swap");
    }
    if args.require_all {
        let ns = not_supported(&results);
        ensure!(
            ns.is_empty(),
            "not supported by this build: {}",
            ns.join(", ")
        );
    }

    if !results.plan_quick && !args.no_doc {
        let doc = doc_path(args);
        fs::write(&doc, report(&results, true))
            .with_context(|| format!("writing {}", doc.display()))?;
        println!("\nwrote {}", doc.display());
    }
    println!("done in {:.1} s", t_start.elapsed().as_secs_f64());
    match api_failed {
        Some(e) => Err(e.context("the control-plane section failed (the report says so)")),
        None => Ok(()),
    }
}
