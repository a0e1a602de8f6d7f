//! Pushes sequences through the compiled program (`BPF_PROG_TEST_RUN`) and compares with the
//! model: a bypass is a refused key the model's server reads from segments the program
//! passed; a false drop is a segment of a legitimate session the program did not pass.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::programs::{TestRun as _, TestRunOptions};
use keywall::dataplane::Capacity;

use super::{
    Seg, Step, URG,
    model::{KeyRule, ListenerModel, Locator, PolicyModel, Read, server_reads},
    scenario::{self, ATTACKER, Case, KEY_PREFIX_LEN, Kind, POLICY, VICTIM},
    show_bytes, show_flags,
};
use crate::{
    harness::{Loaded, XDP_PASS, small_capacity},
    packet::{Pkt, checksum},
};

/// Flow table size of the pressure runs: a few hundred other connections evict everything.
pub const PRESSURE_FLOWS: u32 = 64;

pub fn policy_model() -> PolicyModel {
    let k = |p: &str, allow: [u8; 4], locked| KeyRule {
        prefix: p.as_bytes()[..KEY_PREFIX_LEN].to_vec(),
        allow: vec![allow],
        locked,
    };
    PolicyModel {
        plen: KEY_PREFIX_LEN,
        keys: vec![
            k(scenario::OWN, ATTACKER, false),
            k(scenario::STOLEN, VICTIM, false),
            k(scenario::LOCKED, ATTACKER, true),
        ],
        unknown_drop: true,
    }
}

pub fn listener_model(kind: Kind) -> ListenerModel {
    let http = || Locator::Http {
        headers: vec!["X-MBX-APIKEY".into()],
    };
    match kind {
        Kind::Http => ListenerModel {
            locator: http(),
            proxy_protocol: false,
        },
        Kind::HttpProxy => ListenerModel {
            locator: http(),
            proxy_protocol: true,
        },
        Kind::Tls => ListenerModel {
            locator: Locator::Tls {
                suffix: ".api.example.com".into(),
                label_prefix: "k-".into(),
            },
            proxy_protocol: false,
        },
        Kind::Fix553 => ListenerModel {
            locator: Locator::Fix { tag: 553 },
            proxy_protocol: false,
        },
        Kind::Fix49 => ListenerModel {
            locator: Locator::Fix { tag: 49 },
            proxy_protocol: false,
        },
    }
}

/// What one sequence did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Per step: whether the program passed it (pressure steps count as passed).
    pub passed: Vec<bool>,
    /// Reads the policy refuses, with why.
    pub bypasses: Vec<(Read, &'static str)>,
    /// Legitimate sessions: the steps that were not passed.
    pub false_drops: Vec<usize>,
    pub frames: u64,
}

impl Outcome {
    pub fn failed(&self) -> bool {
        !self.bypasses.is_empty() || !self.false_drops.is_empty()
    }
}

pub struct Runner {
    main: Loaded,
    pressure: Loaded,
    next_tuple: u64,
    policy: PolicyModel,
    pub frames: u64,
}

impl Runner {
    pub fn new() -> Result<Runner> {
        let mut cap = small_capacity();
        cap.flows = 65536;
        let main = Loaded::with_capacity(POLICY, cap)?;
        let pressure = Loaded::with_capacity(
            POLICY,
            Capacity {
                flows: PRESSURE_FLOWS,
                ..small_capacity()
            },
        )?;
        Ok(Runner {
            main,
            pressure,
            next_tuple: 0,
            policy: policy_model(),
            frames: 0,
        })
    }

    /// Forgets every finished sequence's connections, as the daemon's sweep forgets idle
    /// ones: each sequence has a 5-tuple of its own, and `KW_HELD` (which never evicts) would
    /// otherwise fill up over a long campaign and then refuse every new connection.
    pub fn forget_finished(&mut self) -> Result<()> {
        for l in [&self.main, &self.pressure] {
            keywall::dataplane::HeldGc::open(&l.pin_dir, std::time::Duration::ZERO)?.sweep()?;
        }
        Ok(())
    }

    /// A 5-tuple no earlier sequence used: (destination address, source port).
    fn tuple(&mut self) -> ([u8; 4], u16) {
        let n = self.next_tuple;
        self.next_tuple += 1;
        let port = 1024 + (n % 64000) as u16;
        let h = n / 64000;
        (
            [10, 200 + (h >> 16) as u8 % 50, (h >> 8) as u8, h as u8],
            port,
        )
    }

    fn xdp(l: &mut Loaded, frame: &[u8]) -> u32 {
        let prog = l.dp.program().expect("program");
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN")
        .return_value
    }

    fn evict(&mut self, n: u16, pressure: bool) {
        for i in 0..n {
            let (dst, sport) = self.tuple();
            let f = if i % 2 == 0 {
                Pkt::tcp4(ATTACKER, dst, sport, Kind::Http.port())
                    .seq(7)
                    .payload(b"GET /f HTTP/1.1\r\nHost: f\r\n\r\n")
                    .build()
            } else {
                // Half a ClientHello: a TLS follow-up entry as well as a flow.
                let hello =
                    crate::packet::ClientHello::new("k-a7c0ffee1234abcd.api.example.com").record();
                Pkt::tcp4(ATTACKER, dst, sport, Kind::Tls.port())
                    .seq(7)
                    .payload(&hello[..60])
                    .build()
            };
            let l = if pressure {
                &mut self.pressure
            } else {
                &mut self.main
            };
            // Its SYN first: the filter judges a stream only from a recorded start.
            Self::xdp(
                l,
                &crate::packet::syn_for(&f).expect("a plain data segment"),
            );
            Self::xdp(l, &f);
            self.frames += 2;
        }
    }

    /// Runs `case` on a fresh tuple; with `reasons`, also the reason each step was counted
    /// under (slow: reads every counter twice per frame).
    pub fn run(&mut self, case: &Case, reasons: Option<&mut Vec<String>>) -> Outcome {
        let (dst, sport) = self.tuple();
        let mut out = Outcome::default();
        let mut why = Vec::new();
        for step in &case.steps {
            match step {
                Step::Evict(n) => {
                    self.evict(*n, case.pressure);
                    out.passed.push(true);
                    why.push(format!("{n} other connections"));
                }
                Step::Seg(s) => {
                    let f = frame(case.src, dst, sport, case.kind.port(), s);
                    let l = if case.pressure {
                        &mut self.pressure
                    } else {
                        &mut self.main
                    };
                    let action = if reasons.is_some() {
                        let (a, r, _) = l.run(&f);
                        why.push(format!("{r:?}"));
                        a
                    } else {
                        Self::xdp(l, &f)
                    };
                    self.frames += 1;
                    out.frames += 1;
                    out.passed.push(action == XDP_PASS);
                }
            }
        }
        if let Some(r) = reasons {
            *r = why;
        }
        let delivered: Vec<&Seg> = case
            .steps
            .iter()
            .zip(&out.passed)
            .filter_map(|(s, p)| match s {
                Step::Seg(s) if *p && !s.bad_csum => Some(s),
                _ => None,
            })
            .collect();
        let reads = server_reads(
            &listener_model(case.kind),
            self.policy.plen,
            case.src,
            &delivered,
        );
        for r in reads {
            if let Some(why) = self.policy.refused(&r.prefix, r.client) {
                out.bypasses.push((r, why));
            }
        }
        if case.legit {
            out.false_drops = case
                .steps
                .iter()
                .zip(&out.passed)
                .enumerate()
                .filter(|(_, (s, p))| matches!(s, Step::Seg(_)) && !**p)
                .map(|(i, _)| i)
                .collect();
        }
        out
    }

    /// The smallest sub-sequence (by removing steps one at a time) that still fails, then
    /// each segment made plainer where that keeps it failing (URG cleared, checksum fixed,
    /// ACK set, data off the SYN, pressure steps shorter).
    pub fn minimize(&mut self, case: &Case) -> Case {
        use super::{ACK, RST, SYN};
        let mut best = case.clone();
        let mut budget = 400;
        let mut changed = true;
        while changed && budget > 0 {
            changed = false;
            let mut i = best.steps.len();
            while i > 0 && budget > 0 {
                i -= 1;
                let mut c = best.clone();
                c.steps.remove(i);
                budget -= 1;
                if self.run(&c, None).failed() {
                    best = c;
                    changed = true;
                }
            }
        }
        for i in 0..best.steps.len() {
            for simplify in 0..5 {
                if budget == 0 {
                    break;
                }
                let mut c = best.clone();
                let ok = match &mut c.steps[i] {
                    Step::Seg(g) => match simplify {
                        0 if g.flags & URG != 0 => {
                            g.flags &= !URG;
                            g.urg = 0;
                            true
                        }
                        1 if g.bad_csum => {
                            g.bad_csum = false;
                            true
                        }
                        2 if g.flags & (ACK | SYN | RST) == 0 => {
                            g.flags |= ACK;
                            true
                        }
                        3 if g.flags & SYN != 0 && !g.payload.is_empty() => {
                            g.payload.clear();
                            true
                        }
                        _ => false,
                    },
                    Step::Evict(n) if simplify == 4 && *n > 1 => {
                        *n /= 2;
                        true
                    }
                    _ => false,
                };
                if !ok {
                    continue;
                }
                budget -= 1;
                if self.run(&c, None).failed() {
                    best = c;
                }
            }
        }
        best
    }

    /// A reproducer: the case, each step with its verdict, and what the server read.
    pub fn describe(&mut self, case: &Case, seed: u64, index: u64) -> String {
        let mut reasons = Vec::new();
        let o = self.run(case, Some(&mut reasons));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} seed={seed:#x} index={index} listener={:?} (port {}) src={}{}",
            if case.legit { "FALSE DROP" } else { "BYPASS" },
            case.kind,
            case.kind.port(),
            std::net::Ipv4Addr::from(case.src),
            if case.pressure {
                format!(" flows={PRESSURE_FLOWS}")
            } else {
                String::new()
            },
        );
        let _ = writeln!(s, "  session: {}", case.base);
        let _ = writeln!(s, "  mutations: {:?}", case.tags);
        let isn = case.steps.iter().find_map(|st| match st {
            Step::Seg(g) if g.flags & super::SYN != 0 => Some(g.seq),
            _ => None,
        });
        for (i, st) in case.steps.iter().enumerate() {
            let verdict = if o.passed[i] { "PASS" } else { "DROP" };
            match st {
                Step::Evict(n) => {
                    let _ = writeln!(s, "  #{i:<2} [{n} other connections fill the flow table]");
                }
                Step::Seg(g) => {
                    let rel = isn.map_or(String::new(), |n| {
                        format!(" (isn{:+})", g.seq.wrapping_sub(n) as i32)
                    });
                    let _ = writeln!(
                        s,
                        "  #{i:<2} {verdict} {:<22} seq={:#010x}{rel} {}{}{} len={} \"{}\"",
                        reasons.get(i).map_or("", String::as_str),
                        g.seq,
                        show_flags(g.flags),
                        if g.flags & URG != 0 {
                            format!(" urg={}", g.urg)
                        } else {
                            String::new()
                        },
                        if g.bad_csum { " BAD-CHECKSUM" } else { "" },
                        g.payload.len(),
                        show_bytes(&g.payload, 160),
                    );
                }
            }
        }
        for (r, why) in &o.bypasses {
            let _ = writeln!(
                s,
                "  server reads key {:?} ({why}) for client {} on connection {} [{}]",
                String::from_utf8_lossy(&r.prefix),
                std::net::Ipv4Addr::from(r.client),
                r.conn,
                r.view
            );
        }
        if !o.false_drops.is_empty() {
            let _ = writeln!(s, "  legitimate steps dropped: {:?}", o.false_drops);
        }
        s
    }
}

/// The frame for one segment: IPv4, no options; URG and the urgent pointer patched in, and the
/// checksum broken on request.
pub fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, s: &Seg) -> Vec<u8> {
    let mut f = Pkt::tcp4(src, dst, sport, dport)
        .seq(s.seq)
        .tcp_flag_bits(s.flags & !URG)
        .payload(&s.payload)
        .build();
    const L4: usize = 14 + 20;
    if s.flags & URG != 0 || s.bad_csum {
        f[L4 + 13] |= s.flags & URG;
        f[L4 + 18..L4 + 20].copy_from_slice(&s.urg.to_be_bytes());
        f[L4 + 16..L4 + 18].copy_from_slice(&[0, 0]);
        let l4 = &f[L4..];
        let mut pseudo = Vec::with_capacity(12 + l4.len());
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(l4);
        let mut sum = checksum(&pseudo);
        if s.bad_csum {
            sum ^= 0x5a5a;
        }
        f[L4 + 16..L4 + 18].copy_from_slice(&sum.to_be_bytes());
    }
    f
}

/// One class of failure: the session kind and the mutations, with the first example.
#[derive(Clone, Debug)]
pub struct Class {
    pub count: u64,
    pub seed: u64,
    pub index: u64,
    pub example: String,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub sequences: u64,
    pub frames: u64,
    pub bypasses: u64,
    pub false_drops: u64,
    pub elapsed: Duration,
    pub classes: BTreeMap<String, Class>,
}

impl Report {
    pub fn rate(&self) -> f64 {
        self.sequences as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn summary(&self) -> String {
        let mut s = format!(
            "fuzz: {} sequences ({} frames) in {:.1}s, {:.0} sequences/s; {} bypasses, {} false drops, {} classes\n",
            self.sequences,
            self.frames,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.bypasses,
            self.false_drops,
            self.classes.len()
        );
        let mut v: Vec<(&String, &Class)> = self.classes.iter().collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        for (name, c) in v {
            let _ = writeln!(
                s,
                "  {:>7}x {name}  (first: --seed {:#x} --index {})",
                c.count, c.seed, c.index
            );
        }
        s
    }
}

/// What a (minimized) failing sequence uses, judged from its segments alone.
fn features(case: &Case, o: &Outcome) -> Vec<&'static str> {
    use super::{ACK, RST, SYN};
    let mut f = Vec::new();
    let segs: Vec<&Seg> = case
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::Seg(g) => Some(g),
            _ => None,
        })
        .collect();
    let syns = segs.iter().filter(|g| g.flags & SYN != 0).count();
    let mut add = |c: bool, n: &'static str| {
        if c {
            f.push(n);
        }
    };
    add(
        case.steps.iter().any(|s| matches!(s, Step::Evict(_))),
        "flow-table pressure",
    );
    add(syns >= 2, "second SYN on the tuple");
    add(
        segs.iter()
            .any(|g| g.flags & SYN != 0 && !g.payload.is_empty()),
        "data on SYN",
    );
    add(segs.iter().any(|g| g.flags & URG != 0), "URG");
    add(segs.iter().any(|g| g.bad_csum), "bad checksum");
    add(
        segs.iter()
            .any(|g| g.flags & (SYN | ACK | RST) == 0 && !g.payload.is_empty()),
        "data without ACK",
    );
    add(segs.iter().any(|g| g.flags & RST != 0), "RST");
    // Order: a gap (ahead of what was sent so far) or an overlap (behind it).
    let (mut gap, mut overlap) = (false, false);
    let mut next: Option<u32> = None;
    for g in &segs {
        if g.flags & SYN != 0 {
            next = Some(g.seq.wrapping_add(1));
            continue;
        }
        if g.payload.is_empty() || g.bad_csum || g.flags & ACK == 0 {
            continue;
        }
        if let Some(n) = next {
            let d = g.seq.wrapping_sub(n) as i32;
            if d > 0 {
                gap = true;
            } else if d < 0 {
                overlap = true;
            }
            let e = g.seq.wrapping_add(g.payload.len() as u32);
            if (e.wrapping_sub(n) as i32) > 0 {
                next = Some(e);
            }
        }
    }
    add(gap, "out of order");
    add(overlap, "overlap/retransmission");
    // The key's prefix whole inside one passed segment, or split over several.
    let whole = o.bypasses.iter().all(|(r, _)| {
        segs.iter()
            .zip(
                case.steps
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| matches!(s, Step::Seg(_)).then_some(o.passed[i])),
            )
            .any(|(g, p)| {
                p && g
                    .payload
                    .to_ascii_lowercase()
                    .windows(r.prefix.len())
                    .any(|w| w == r.prefix.to_ascii_lowercase())
            })
    });
    add(!whole, "key split over segments");
    add(
        o.bypasses.iter().any(|(r, _)| r.view.contains("urgent")),
        "urgent byte removed",
    );
    f
}

/// The class a failing case falls in: the listener, why the key is refused, and what the
/// minimized sequence uses (or, in order and whole, the session it came from).
fn class_of(case: &Case, o: &Outcome) -> String {
    if case.legit {
        return format!("false drop: {:?}: {}", case.kind, case.base);
    }
    let mut why: Vec<&str> = o.bypasses.iter().map(|(_, w)| *w).collect();
    why.sort_unstable();
    why.dedup();
    let f = features(case, o);
    let what = if f.is_empty() {
        // In order, the key whole in one segment: the parse or the flow logic differs.
        let base = case
            .base
            .rsplit_once(", key")
            .map_or(&case.base[..], |b| b.0);
        format!("in order, key whole: {base}")
    } else {
        f.join(", ")
    };
    format!("bypass: {:?} key {}: {what}", case.kind, why.join("/"))
}

pub struct Campaign {
    pub seed: u64,
    /// Stop after this many sequences...
    pub sequences: Option<u64>,
    /// ...or after this long, whichever comes first.
    pub duration: Option<Duration>,
    /// Reproducers printed (minimized) per new class, at most this many in all.
    pub print: usize,
    /// Only this sequence (replay).
    pub index: Option<u64>,
    /// At most this many failures are minimized to classify them (the first of each
    /// listener and mutation set).
    pub minimize: usize,
}

pub fn campaign(cfg: &Campaign) -> Result<Report> {
    let mut runner = Runner::new()?;
    let mut rep = Report::default();
    let start = Instant::now();
    let mut printed = 0;
    let mut minimized = 0;
    let mut buckets: std::collections::HashMap<String, String> = Default::default();
    let mut index = cfg.index.unwrap_or(0);
    let mut swept_at = 0;
    loop {
        if cfg.index.is_some() && rep.sequences == 1 {
            break;
        }
        if cfg.sequences.is_some_and(|n| rep.sequences >= n)
            || cfg.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        // Every frame may record one tuple in KW_HELD (1M entries, never evicted): sweep
        // well before it fills.
        if runner.frames >= swept_at + 400_000 {
            swept_at = runner.frames;
            runner
                .forget_finished()
                .expect("sweeping finished connections");
        }
        let case = scenario::generate(cfg.seed, index);
        let o = runner.run(&case, None);
        rep.sequences += 1;
        if o.failed() {
            if case.legit {
                rep.false_drops += 1;
            } else {
                rep.bypasses += 1;
            }
            // Minimizing costs hundreds of runs: done for the first failure of each coarse
            // bucket (listener, mutations), and the class found is reused for the bucket.
            let mut tags = case.tags.clone();
            tags.sort_unstable();
            tags.dedup();
            let bucket = format!(
                "{:?} {} {:?} {}",
                case.kind,
                case.legit,
                tags,
                o.bypasses.len()
            );
            let (class, small) = match buckets.get(&bucket) {
                Some(c) => (c.clone(), None),
                None if minimized < cfg.minimize => {
                    minimized += 1;
                    let small = runner.minimize(&case);
                    let so = runner.run(&small, None);
                    let c = if so.failed() {
                        class_of(&small, &so)
                    } else {
                        class_of(&case, &o)
                    };
                    buckets.insert(bucket, c.clone());
                    (c, Some(small))
                }
                None => (class_of(&case, &o), None),
            };
            let new = !rep.classes.contains_key(&class);
            let e = rep.classes.entry(class).or_insert(Class {
                count: 0,
                seed: cfg.seed,
                index,
                example: String::new(),
            });
            e.count += 1;
            if new && (printed < cfg.print || cfg.index.is_some()) {
                printed += 1;
                let small = small.unwrap_or_else(|| runner.minimize(&case));
                e.example = runner.describe(&small, cfg.seed, index);
                println!("{}", e.example);
            }
        }
        index += 1;
    }
    rep.frames = runner.frames;
    rep.elapsed = start.elapsed();
    Ok(rep)
}
