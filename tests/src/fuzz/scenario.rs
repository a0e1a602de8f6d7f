//! Sequences to try: legitimate sessions (HTTP keep-alive, TLS ClientHellos of every size,
//! FIX Logons, PROXY v1/v2), each with a *real* stream (the attacker's stolen, locked or
//! unknown key somewhere) and a *decoy* of the same length (its own key in the same place),
//! cut into segments and then mutated: splits, overlaps with the decoy's bytes, reordering,
//! duplicates, URG, data on SYN, SYNs mid-stream, segments the server discards (bad checksum,
//! no ACK, out of window), RSTs off rcv_nxt, reused tuples and flow-table pressure.
//!
//! Everything is drawn from one [`Rng`], so `(seed, index)` names a sequence.

use std::net::{IpAddr, Ipv4Addr};

use super::{ACK, FIN, PSH, RST, Rng, SYN, Seg, Step, URG};
use crate::packet::{ClientHello, ProxiedConn, proxy_v1, proxy_v2};

pub const ATTACKER: [u8; 4] = [198, 51, 100, 7];
pub const VICTIM: [u8; 4] = [203, 0, 113, 9];
pub const PROXY: [u8; 4] = [10, 9, 0, 5];

/// The attacker's own key, allowed from ATTACKER.
pub const OWN: &str = "a7c0ffee1234abcd";
/// Somebody else's key, allowed from VICTIM only.
pub const STOLEN: &str = "57013e4a5566deaf";
/// Locked (allowed from ATTACKER, but locked).
pub const LOCKED: &str = "10cced00ba5eba11";
/// Not in the policy (unknown_key = drop).
pub const UNKNOWN: &str = "deadbeef00c0ffee";

pub const KEY_PREFIX_LEN: usize = 8;
pub const MSS: usize = 1448;

pub const POLICY: &str = r#"
[settings]
key_prefix_len = 8
unknown_key = "drop"
no_key = "pass"
unbound_keys = "pass"
prefilter = true

[[listener]]
port = 8090
locator = "http-header"
headers = ["X-MBX-APIKEY"]

[[listener]]
port = 8080
locator = "http-header"
headers = ["X-MBX-APIKEY"]
proxy_protocol = true
trusted_proxies = ["10.9.0.0/16"]

[[listener]]
port = 443
locator = "tls-sni"
sni_suffix = ".api.example.com"
label_prefix = "k-"

[[listener]]
port = 9878
locator = "fix"
fix_tag = 553

[[listener]]
port = 9879
locator = "fix"
fix_tag = 49

[[key]]
prefix = "a7c0ffee"
allow = ["198.51.100.7"]

[[key]]
prefix = "57013e4a"
allow = ["203.0.113.9"]

[[key]]
prefix = "10cced00"
allow = ["198.51.100.7"]
locked = true
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    HttpProxy,
    Tls,
    Fix553,
    Fix49,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Http,
        Kind::HttpProxy,
        Kind::Tls,
        Kind::Fix553,
        Kind::Fix49,
    ];
    pub fn port(self) -> u16 {
        match self {
            Kind::Http => 8090,
            Kind::HttpProxy => 8080,
            Kind::Tls => 443,
            Kind::Fix553 => 9878,
            Kind::Fix49 => 9879,
        }
    }
}

/// One sequence on one 5-tuple.
#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    /// The TCP source address (the attacker, or the trusted proxy).
    pub src: [u8; 4],
    pub steps: Vec<Step>,
    /// The session it started from.
    pub base: String,
    /// The mutations applied, in order.
    pub tags: Vec<&'static str>,
    /// A legitimate session: every segment must pass.
    pub legit: bool,
    /// Run against the tiny flow table.
    pub pressure: bool,
}

// ---------------------------------------------------------------------------------------------
// Message builders
// ---------------------------------------------------------------------------------------------

/// Header syntaxes real servers accept.
const HTTP_STYLES: usize = 10;

fn http_req(key: &str, style: usize, path: &str) -> Vec<u8> {
    let (nl, line) = match style {
        0 => ("\r\n", format!("X-MBX-APIKEY: {key}")),
        1 => ("\r\n", format!("X-MBX-APIKEY : {key}")),
        2 => ("\r\n", format!("x-mbx-apikey:{key}")),
        3 => ("\r\n", format!("X_MBX_APIKEY: {key}")),
        4 => ("\r\n", format!("X-MBX-APIKEY:\r\n {key}")),
        5 => ("\r", format!("X-MBX-APIKEY: {key}")),
        6 => ("\n", format!("X-Mbx-ApiKey:\t{key}")),
        7 => (
            "\r\n",
            format!("X-MBX-APIKEY: {}\r\n\t{}", &key[..4], &key[4..]),
        ),
        8 => ("\r\n", format!("Accept: */*\rX-MBX-APIKEY: {key}")),
        _ => ("\r\n", format!("X-MBX-APIKEY \t: {key}")),
    };
    format!("GET {path} HTTP/1.1{nl}Host: api.example.com{nl}{line}{nl}User-Agent: fz/1{nl}{nl}")
        .into_bytes()
}

fn http_nokey(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: api.example.com\r\n\r\n").into_bytes()
}

fn sni_name(key: &str, style: usize) -> String {
    let n = format!("k-{key}.api.example.com");
    match style {
        1 => n.to_ascii_uppercase(),
        2 => format!("{n}."),
        3 => format!("K-{}.Api.Example.Com", key.to_ascii_uppercase()),
        _ => n,
    }
}

#[derive(Clone, Copy)]
struct HelloShape {
    chrome: bool,
    seed: u64,
    padding: Option<usize>,
    sni_last: bool,
    pq: bool,
}

impl HelloShape {
    fn draw(rng: &mut Rng) -> HelloShape {
        HelloShape {
            chrome: rng.chance(1, 3),
            seed: rng.next_u64(),
            padding: rng.chance(1, 3).then(|| rng.range(0, 2500)),
            sni_last: rng.chance(1, 4),
            pq: rng.chance(1, 3),
        }
    }
    fn hello(&self, sni: &str) -> ClientHello {
        let mut h = if self.chrome {
            ClientHello::chrome_like(sni, self.seed)
        } else {
            ClientHello::new(sni)
        };
        if self.padding.is_some() {
            h.padding = self.padding;
        }
        h.sni_last |= self.sni_last;
        h.pq_key_share |= self.pq;
        h
    }
}

fn record(ct: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![ct, 3, 3];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// The handshake message in records cut at `cuts` (offsets into the message).
fn records(hs: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut b = vec![0];
    b.extend(cuts.iter().copied().filter(|&c| c > 0 && c < hs.len()));
    b.push(hs.len());
    b.sort_unstable();
    b.dedup();
    b.windows(2)
        .flat_map(|w| {
            let mut r = vec![22, 3, 1];
            r.extend_from_slice(&((w[1] - w[0]) as u16).to_be_bytes());
            r.extend_from_slice(&hs[w[0]..w[1]]);
            r
        })
        .collect()
}

/// A FIX message with tags spelled as given (leading zeros allowed), BodyLength and
/// CheckSum filled in.
fn fix_msg(msg_type: &str, fields: &[(String, String)]) -> Vec<u8> {
    let mut body = format!("35={msg_type}\x01").into_bytes();
    for (t, v) in fields {
        body.extend_from_slice(format!("{t}={v}\x01").as_bytes());
    }
    let mut m = format!("8=FIX.4.4\x019={}\x01", body.len()).into_bytes();
    m.extend_from_slice(&body);
    let sum = m.iter().map(|&b| u32::from(b)).sum::<u32>() % 256;
    m.extend_from_slice(format!("10={sum:03}\x01").as_bytes());
    m
}

fn fix_logon(kind: Kind, key: &str, zeros: usize) -> Vec<u8> {
    let z = "0".repeat(zeros);
    let mut f = vec![];
    if kind == Kind::Fix49 {
        f.push((format!("{z}49"), key.to_owned()));
    } else {
        f.push(("49".to_owned(), "CLIENT01".to_owned()));
    }
    f.push(("56".into(), "EXCHANGE".into()));
    f.push(("34".into(), "1".into()));
    f.push(("98".into(), "0".into()));
    f.push(("108".into(), "30".into()));
    if kind == Kind::Fix553 {
        f.push((format!("{z}553"), key.to_owned()));
        f.push(("554".into(), "s3cr3t".into()));
    }
    fix_msg("A", &f)
}

fn fix_heartbeat(kind: Kind, key: &str) -> Vec<u8> {
    let sender = if kind == Kind::Fix49 { key } else { "CLIENT01" };
    fix_msg(
        "0",
        &[
            ("49".into(), sender.into()),
            ("56".into(), "EXCHANGE".into()),
        ],
    )
}

fn v2(client: [u8; 4]) -> Vec<u8> {
    proxy_v2(
        Some(ProxiedConn {
            src: IpAddr::V4(Ipv4Addr::from(client)),
            dst: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            sport: 40000,
            dport: 8080,
        }),
        &[],
    )
}

fn v1(client: [u8; 4]) -> Vec<u8> {
    proxy_v1(Some(ProxiedConn {
        src: IpAddr::V4(Ipv4Addr::from(client)),
        dst: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        sport: 40000,
        dport: 8080,
    }))
}

// ---------------------------------------------------------------------------------------------
// Plans: the connections on the tuple, each a real and a decoy stream
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    Open,
    Fin,
    Rst,
}

#[derive(Clone, Debug)]
struct ConnPlan {
    isn: u32,
    real: Vec<u8>,
    decoy: Vec<u8>,
    close: Close,
    /// Offsets of interest in the stream (where key bytes start).
    hot: Vec<usize>,
    /// Offsets of bytes the sender marks urgent (inserted by `urg-insert`).
    urgent: Vec<usize>,
}

impl ConnPlan {
    fn new(rng: &mut Rng, real: Vec<u8>, decoy: Vec<u8>, bad: &str) -> ConnPlan {
        assert_eq!(real.len(), decoy.len(), "decoy of another length");
        let hot = find_all(&real, bad.as_bytes())
            .into_iter()
            .chain(find_all(&real, bad.to_ascii_uppercase().as_bytes()))
            .collect();
        ConnPlan {
            isn: rng.next_u64() as u32,
            real,
            decoy,
            close: Close::Open,
            hot,
            urgent: Vec::new(),
        }
    }
}

fn find_all(h: &[u8], n: &[u8]) -> Vec<usize> {
    if n.is_empty() || h.len() < n.len() {
        return Vec::new();
    }
    (0..=h.len() - n.len())
        .filter(|&i| h[i..i + n.len()] == *n)
        .collect()
}

struct Plan {
    src: [u8; 4],
    conns: Vec<ConnPlan>,
    base: String,
}

fn bad_key(rng: &mut Rng) -> &'static str {
    match rng.below(10) {
        0 => LOCKED,
        1 => UNKNOWN,
        _ => STOLEN,
    }
}

/// The real and decoy streams of one connection carrying `bad` (the decoy has OWN in its
/// place), and a name for it.
fn session(rng: &mut Rng, kind: Kind, bad: &str) -> (Vec<u8>, Vec<u8>, String) {
    let both = |f: &dyn Fn(&str) -> Vec<u8>| (f(bad), f(OWN));
    let (real, decoy, name) = match kind {
        Kind::Http | Kind::HttpProxy => {
            let style = rng.below(HTTP_STYLES);
            let own_style = rng.below(HTTP_STYLES);
            let (r, d) = match rng.below(3) {
                0 => both(&|k| http_req(k, style, "/api/v3/order")),
                1 => both(&|k| {
                    let mut v = http_req(OWN, own_style, "/api/v3/account");
                    v.extend(http_req(k, style, "/api/v3/order"));
                    v
                }),
                _ => both(&|k| {
                    let mut v = http_nokey("/ping");
                    v.extend(http_req(k, style, "/api/v3/order"));
                    v
                }),
            };
            (r, d, format!("http(style {style})"))
        }
        Kind::Tls => {
            let shape = HelloShape::draw(rng);
            let style = rng.below(4);
            let own_hello = shape.hello(&sni_name(OWN, 0)).record();
            let variant = rng.below(5);
            let cuts = [rng.range(1, 300), rng.range(1, 2000)];
            let appdata = rng.range(1, 300);
            let (r, d) = both(&|k| {
                let h = shape.hello(&sni_name(k, style));
                match variant {
                    0 => h.record(),
                    1 => {
                        // A second hello (after a HelloRetryRequest), behind a CCS.
                        let mut v = own_hello.clone();
                        v.extend(record(20, &[1]));
                        v.extend(h.record());
                        v
                    }
                    2 => {
                        let mut v = own_hello.clone();
                        v.extend(record(23, &vec![0x5a; appdata]));
                        v.extend(h.record());
                        v
                    }
                    3 => records(&h.handshake(), &cuts),
                    _ => {
                        let mut v = record(20, &[1]);
                        v.extend(h.record());
                        v
                    }
                }
            });
            (r, d, format!("tls(variant {variant}, sni style {style})"))
        }
        Kind::Fix553 | Kind::Fix49 => {
            let zeros = if rng.chance(1, 4) { rng.range(1, 2) } else { 0 };
            let variant = rng.below(2);
            let (r, d) = both(&|k| match variant {
                0 => fix_logon(kind, k, zeros),
                _ => {
                    let mut v = fix_logon(kind, OWN, 0);
                    v.extend(fix_heartbeat(kind, OWN));
                    v.extend(fix_logon(kind, k, zeros));
                    v
                }
            });
            (r, d, format!("fix(variant {variant}, zeros {zeros})"))
        }
    };
    (real, decoy, name)
}

/// A legitimate session with the attacker's own key.
fn legit_session(rng: &mut Rng, kind: Kind) -> (Vec<u8>, String) {
    match kind {
        Kind::Http | Kind::HttpProxy => {
            let n = rng.range(1, 3);
            let mut v = Vec::new();
            for _ in 0..n {
                v.extend(http_req(OWN, 0, "/api/v3/account"));
            }
            (v, format!("legit http x{n}"))
        }
        Kind::Tls => {
            let shape = HelloShape::draw(rng);
            let mut v = shape.hello(&sni_name(OWN, 0)).record();
            v.extend(record(20, &[1]));
            v.extend(record(23, &vec![0x33; rng.range(20, 400)]));
            let name = format!("legit tls ({} bytes)", v.len());
            (v, name)
        }
        Kind::Fix553 | Kind::Fix49 => {
            let mut v = fix_logon(kind, OWN, 0);
            v.extend(fix_heartbeat(kind, OWN));
            (v, "legit fix".into())
        }
    }
}

fn plan(rng: &mut Rng, kind: Kind) -> Plan {
    let bad = bad_key(rng);
    let (real, decoy, name) = session(rng, kind, bad);
    let mut base = name;
    let mut conns = Vec::new();
    let src = if kind == Kind::HttpProxy {
        PROXY
    } else {
        ATTACKER
    };
    if kind == Kind::HttpProxy {
        // The proxy's connection for the attacker; the decoy names the victim instead.
        let v1h = rng.chance(1, 4);
        let hdr = |a| if v1h { v1(a) } else { v2(a) };
        let (r, d) = if v1h {
            (
                [hdr(ATTACKER), real.clone()].concat(),
                [hdr(ATTACKER), decoy.clone()].concat(),
            )
        } else {
            (
                [hdr(ATTACKER), real.clone()].concat(),
                [hdr(VICTIM), real.clone()].concat(),
            )
        };
        if rng.chance(1, 2) {
            // PROXY reuse: the same tuple carried the victim's connection first.
            let first = [hdr(VICTIM), real.clone()].concat();
            let mut c = ConnPlan::new(rng, first.clone(), first, bad);
            c.close = if rng.chance(1, 2) {
                Close::Fin
            } else {
                Close::Rst
            };
            conns.push(c);
            base = format!("proxy reuse, {base}");
        }
        conns.push(ConnPlan::new(rng, r, d, bad));
        base = format!("proxy {}, {base}", if v1h { "v1" } else { "v2" });
    } else {
        if rng.chance(1, 4) {
            // A reused tuple: a legitimate connection first, closed.
            let (l, _) = legit_session(rng, kind);
            let mut c = ConnPlan::new(rng, l.clone(), l, bad);
            c.close = if rng.chance(1, 2) {
                Close::Fin
            } else {
                Close::Rst
            };
            conns.push(c);
            base = format!("reused tuple, {base}");
        }
        conns.push(ConnPlan::new(rng, real, decoy, bad));
    }
    Plan {
        src,
        conns,
        base: format!("{base}, key {}", &bad[..KEY_PREFIX_LEN]),
    }
}

// ---------------------------------------------------------------------------------------------
// Abstract segments, mutated before they get sequence numbers and bytes
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Real,
    Decoy,
    Junk(u8),
}

#[derive(Clone, Debug)]
enum A {
    Syn {
        conn: usize,
        /// Added to the connection's ISN.
        delta: u32,
        data: Option<(usize, Src)>,
    },
    Data {
        conn: usize,
        off: i64,
        len: usize,
        src: Src,
        flags: u8,
        urg: Option<u16>,
        bad: bool,
    },
    /// Arbitrary bytes at ISN + delta.
    Raw {
        conn: usize,
        delta: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    Fin {
        conn: usize,
        off: i64,
    },
    Rst {
        conn: usize,
        off: i64,
    },
    Evict(u16),
}

fn data(conn: usize, off: i64, len: usize, src: Src) -> A {
    A::Data {
        conn,
        off,
        len,
        src,
        flags: ACK | PSH,
        urg: None,
        bad: false,
    }
}

fn cut_points(rng: &mut Rng, len: usize, hot: &[usize], legit: bool) -> Vec<usize> {
    let mut cuts: Vec<usize> = (1..len.div_ceil(MSS)).map(|i| i * MSS).collect();
    if !legit {
        for _ in 0..rng.below(4) {
            cuts.push(rng.range(1, len.max(2) - 1));
        }
        if !hot.is_empty() && rng.chance(2, 3) {
            // A cut at (or near) a key's bytes: over the campaign every offset around a key.
            let h = *rng.pick(hot) as i64 + rng.range(0, 48) as i64 - 24;
            cuts.push(h.clamp(1, len.max(2) as i64 - 1) as usize);
        }
    }
    cuts.retain(|&c| c > 0 && c < len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn segment(rng: &mut Rng, p: &Plan, legit: bool) -> Vec<A> {
    let mut v = Vec::new();
    for (ci, c) in p.conns.iter().enumerate() {
        v.push(A::Syn {
            conn: ci,
            delta: 0,
            data: None,
        });
        let cuts = cut_points(rng, c.real.len(), &c.hot, legit);
        let mut at = 0;
        for &e in cuts.iter().chain([c.real.len()].iter()) {
            v.push(data(ci, at as i64, e - at, Src::Real));
            at = e;
        }
        let end = c.real.len() as i64;
        match c.close {
            Close::Open => {}
            Close::Fin => v.push(A::Fin { conn: ci, off: end }),
            Close::Rst => v.push(A::Rst { conn: ci, off: end }),
        }
    }
    v
}

fn data_indices(v: &[A], real_only: bool) -> Vec<usize> {
    v.iter()
        .enumerate()
        .filter(|(_, a)| match a {
            A::Data { src, .. } => !real_only || *src == Src::Real,
            _ => false,
        })
        .map(|(i, _)| i)
        .collect()
}

/// One mutation; returns its tag, or None when it did not apply.
fn mutate(rng: &mut Rng, p: &mut Plan, v: &mut Vec<A>, allow_evict: bool) -> Option<&'static str> {
    let reals = data_indices(v, true);
    let last = p.conns.len() - 1;
    let pick_real = |rng: &mut Rng| -> Option<(usize, usize, i64, usize)> {
        let i = *rng.pick(&reals);
        match v[i] {
            A::Data { conn, off, len, .. } => Some((i, conn, off, len)),
            _ => None,
        }
    };
    if reals.is_empty() {
        return None;
    }
    let m = rng.below(if allow_evict { 19 } else { 18 });
    match m {
        0 => {
            // Split a segment at random offsets.
            let (i, conn, off, len) = pick_real(rng)?;
            if len < 2 {
                return None;
            }
            let c = rng.range(1, len - 1);
            let A::Data { src, flags, .. } = v[i].clone() else {
                return None;
            };
            v[i] = A::Data {
                conn,
                off,
                len: c,
                src,
                flags,
                urg: None,
                bad: false,
            };
            v.insert(i + 1, data(conn, off + c as i64, len - c, src));
            Some("split")
        }
        1 | 2 => {
            // Overlap with the decoy's bytes, before (1) or after (2) the real copy.
            let (i, conn, off, len) = pick_real(rng)?;
            let s = (off - rng.range(0, 24) as i64 + rng.range(0, len) as i64).max(0);
            let e = (s + rng.range(1, len + 24) as i64).min(p.conns[conn].real.len() as i64);
            if e <= s {
                return None;
            }
            let seg = data(conn, s, (e - s) as usize, Src::Decoy);
            if m == 1 {
                v.insert(i, seg);
                Some("overlap decoy first")
            } else {
                let at = rng.range(i + 1, v.len());
                v.insert(at, seg);
                Some("overlap decoy after")
            }
        }
        3 => {
            // The filter gets the decoy, then the real bytes as a retransmission.
            let (i, conn, off, len) = pick_real(rng)?;
            v[i] = data(conn, off, len, Src::Decoy);
            let at = rng.range(i + 1, v.len());
            v.insert(at, data(conn, off, len, Src::Real));
            Some("decoy then real retransmission")
        }
        4 => {
            // Reorder: move a segment later.
            let (i, ..) = pick_real(rng)?;
            let a = v.remove(i);
            let at = rng.range(i, v.len());
            v.insert(at, a);
            Some("reorder")
        }
        5 => {
            // An identical duplicate later.
            let (i, ..) = pick_real(rng)?;
            let a = v[i].clone();
            let at = rng.range(i + 1, v.len());
            v.insert(at, a);
            Some("duplicate")
        }
        6 => {
            // A retransmission from a segment's start extending past it (real or decoy).
            let (i, conn, off, _) = pick_real(rng)?;
            let clen = p.conns[conn].real.len() as i64;
            let e = (off + rng.range(1, 600) as i64).min(clen);
            let src = if rng.chance(1, 2) {
                Src::Real
            } else {
                Src::Decoy
            };
            let at = rng.range(i + 1, v.len());
            v.insert(at, data(conn, off, (e - off) as usize, src));
            Some("extended retransmission")
        }
        7 => {
            // URG on a segment, pointer anywhere near it.
            let (i, ..) = pick_real(rng)?;
            if let A::Data { flags, urg, .. } = &mut v[i] {
                *flags |= URG;
                *urg = Some(rng.range(0, 80) as u16);
            }
            Some("urg flag")
        }
        8 => {
            // Insert a byte the server removes as urgent (before segmenting again).
            let c = &mut p.conns[last];
            let at = match c.hot.first() {
                Some(&h) if rng.chance(3, 4) => {
                    (h + rng.below(KEY_PREFIX_LEN + 4)).saturating_sub(2)
                }
                _ => rng.below(c.real.len()),
            }
            .min(c.real.len());
            let junk = *rng.pick(b"Z \r\n:-_.\x01");
            c.real.insert(at, junk);
            c.decoy.insert(at, junk);
            c.urgent.push(at);
            for h in &mut c.hot {
                if *h >= at {
                    *h += 1;
                }
            }
            // The stream changed: cut it again.
            *v = segment(rng, p, false);
            Some("urgent byte inserted")
        }
        9 => {
            // Data on the SYN.
            let conn = rng.below(p.conns.len());
            let n = rng.range(1, p.conns[conn].real.len());
            let src = *rng.pick(&[Src::Real, Src::Decoy]);
            for a in v.iter_mut() {
                if let A::Syn { conn: c, data, .. } = a
                    && *c == conn
                {
                    *data = Some((n, src));
                    return Some("data on SYN");
                }
            }
            None
        }
        10 => {
            // A SYN on the established tuple, maybe followed by data at its ISN + 1.
            let (i, conn, ..) = pick_real(rng)?;
            let delta = match rng.below(3) {
                0 => 0,
                1 => rng.range(1, 4000) as u32,
                _ => rng.next_u64() as u32,
            };
            let at = rng.range(i, v.len());
            v.insert(
                at,
                A::Syn {
                    conn,
                    delta,
                    data: None,
                },
            );
            if rng.chance(2, 3) {
                let c = &p.conns[conn];
                let src = if rng.chance(1, 2) { &c.real } else { &c.decoy };
                let n = rng.range(1, src.len().min(MSS));
                v.insert(
                    at + 1,
                    A::Raw {
                        conn,
                        delta: delta.wrapping_add(1),
                        flags: ACK | PSH,
                        payload: src[..n].to_vec(),
                    },
                );
            }
            Some("SYN mid-stream")
        }
        11 | 12 => {
            // The decoy in a segment the server discards (bad checksum / no ACK), then the
            // real bytes.
            let (i, conn, off, len) = pick_real(rng)?;
            let seg = if m == 11 {
                A::Data {
                    conn,
                    off,
                    len,
                    src: Src::Decoy,
                    flags: ACK | PSH,
                    urg: None,
                    bad: true,
                }
            } else {
                A::Data {
                    conn,
                    off,
                    len,
                    src: Src::Decoy,
                    flags: PSH,
                    urg: None,
                    bad: false,
                }
            };
            v.insert(i, seg);
            Some(if m == 11 {
                "decoy with bad checksum"
            } else {
                "decoy without ACK"
            })
        }
        13 => {
            // The decoy out of the window (the server drops it).
            let (i, conn, _, len) = pick_real(rng)?;
            let c = &p.conns[conn];
            let n = len.min(c.decoy.len());
            let delta = match rng.below(3) {
                0 => 70_000u32,
                1 => 0u32.wrapping_sub(70_000),
                _ => 0x8000_0000,
            };
            v.insert(
                i,
                A::Raw {
                    conn,
                    delta: delta.wrapping_add(1),
                    flags: ACK | PSH,
                    payload: c.decoy[..n].to_vec(),
                },
            );
            Some("decoy out of window")
        }
        14 => {
            // An RST the server ignores (not at rcv_nxt).
            let (i, conn, off, _) = pick_real(rng)?;
            let at = rng.range(i, v.len());
            v.insert(
                at,
                A::Rst {
                    conn,
                    off: off + rng.range(1, 3000) as i64,
                },
            );
            Some("RST off rcv_nxt")
        }
        15 => {
            // Junk overlapping anywhere.
            let (i, conn, off, len) = pick_real(rng)?;
            let at = rng.range(i, v.len());
            v.insert(
                at,
                data(
                    conn,
                    off + rng.below(len) as i64,
                    rng.range(1, 64),
                    Src::Junk(rng.next_u64() as u8),
                ),
            );
            Some("junk overlap")
        }
        16 => {
            // The whole decoy stream first, in order, then the real one.
            let conn = last;
            let mut ds: Vec<A> = v
                .iter()
                .filter_map(|a| match a {
                    A::Data {
                        conn: c,
                        off,
                        len,
                        src: Src::Real,
                        ..
                    } if *c == conn => Some(data(conn, *off, *len, Src::Decoy)),
                    _ => None,
                })
                .collect();
            let first = v
                .iter()
                .position(|a| matches!(a, A::Data { conn: c, .. } if *c == conn))?;
            if rng.chance(1, 2) {
                ds.iter_mut().for_each(|a| {
                    if let A::Data { bad, .. } = a {
                        *bad = true;
                    }
                });
            }
            for (k, a) in ds.into_iter().enumerate() {
                v.insert(first + k, a);
            }
            Some("decoy stream before the real one")
        }
        17 => {
            // Drop a segment (the attacker never sends it).
            let (i, ..) = pick_real(rng)?;
            v.remove(i);
            Some("segment left out")
        }
        _ => {
            let at = rng.range(1, v.len());
            v.insert(at, A::Evict(rng.range(80, 200) as u16));
            Some("flow-table pressure")
        }
    }
}

fn materialize(p: &Plan, v: &[A]) -> Vec<Step> {
    let bytes = |conn: usize, off: i64, len: usize, src: Src| -> Vec<u8> {
        let c = &p.conns[conn];
        (off..off + len as i64)
            .map(|o| {
                let s = match src {
                    Src::Real => &c.real,
                    Src::Decoy => &c.decoy,
                    Src::Junk(j) => return j.wrapping_add(o as u8) | 0x40,
                };
                usize::try_from(o)
                    .ok()
                    .and_then(|o| s.get(o))
                    .copied()
                    .unwrap_or(b'x')
            })
            .collect()
    };
    let seq = |conn: usize, off: i64| p.conns[conn].isn.wrapping_add(1).wrapping_add(off as u32);
    v.iter()
        .map(|a| match a {
            A::Syn { conn, delta, data } => Step::Seg(Seg {
                seq: p.conns[*conn].isn.wrapping_add(*delta),
                flags: SYN,
                urg: 0,
                payload: data.map_or(Vec::new(), |(n, src)| bytes(*conn, 0, n, src)),
                bad_csum: false,
            }),
            A::Data {
                conn,
                off,
                len,
                src,
                flags,
                urg,
                bad,
            } => {
                let mut flags = *flags;
                let mut u = urg.unwrap_or(0);
                if urg.is_none() && !matches!(src, Src::Junk(_)) {
                    // The sender marks urgent bytes in whatever segment carries them.
                    for &at in &p.conns[*conn].urgent {
                        let at = at as i64;
                        if at >= *off && at < off + *len as i64 {
                            flags |= URG;
                            u = (at - off + 1) as u16;
                        }
                    }
                }
                Step::Seg(Seg {
                    seq: seq(*conn, *off),
                    flags,
                    urg: u,
                    payload: bytes(*conn, *off, *len, *src),
                    bad_csum: *bad,
                })
            }
            A::Raw {
                conn,
                delta,
                flags,
                payload,
            } => Step::Seg(Seg {
                seq: p.conns[*conn].isn.wrapping_add(*delta),
                flags: *flags,
                urg: 0,
                payload: payload.clone(),
                bad_csum: false,
            }),
            A::Fin { conn, off } => Step::Seg(Seg {
                seq: seq(*conn, *off),
                flags: FIN | ACK,
                urg: 0,
                payload: Vec::new(),
                bad_csum: false,
            }),
            A::Rst { conn, off } => Step::Seg(Seg {
                seq: seq(*conn, *off),
                flags: RST | ACK,
                urg: 0,
                payload: Vec::new(),
                bad_csum: false,
            }),
            A::Evict(n) => Step::Evict(*n),
        })
        .collect()
}

/// The sequence `index` of the campaign seeded with `seed`.
pub fn generate(seed: u64, index: u64) -> Case {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let kind = *rng.pick(&Kind::ALL);
    if rng.chance(1, 10) {
        return legit(&mut rng, kind);
    }
    let mut p = plan(&mut rng, kind);
    let mut v = segment(&mut rng, &p, false);
    let pressure = rng.chance(1, 10);
    let n = rng.range(if pressure { 0 } else { 1 }, 4);
    let mut tags = Vec::new();
    if pressure {
        let at = rng.range(1, v.len());
        v.insert(at, A::Evict(rng.range(80, 200) as u16));
        tags.push("flow-table pressure");
    }
    for _ in 0..n {
        if let Some(t) = mutate(&mut rng, &mut p, &mut v, pressure) {
            tags.push(t);
        }
    }
    Case {
        kind,
        src: p.src,
        steps: materialize(&p, &v),
        base: p.base.clone(),
        tags,
        legit: false,
        pressure,
    }
}

/// A legitimate session (the attacker's own key, or a proxied client that the key allows),
/// segmented at the MSS, sometimes with the last data segment retransmitted.
fn legit(rng: &mut Rng, kind: Kind) -> Case {
    let (mut stream, base) = legit_session(rng, kind);
    let src = if kind == Kind::HttpProxy {
        stream = [
            if rng.chance(1, 2) {
                v2(ATTACKER)
            } else {
                v1(ATTACKER)
            },
            stream,
        ]
        .concat();
        PROXY
    } else {
        ATTACKER
    };
    let c = ConnPlan::new(rng, stream.clone(), stream, OWN);
    let p = Plan {
        src,
        conns: vec![c],
        base: base.clone(),
    };
    let mut v = segment(rng, &p, true);
    let mut tags = Vec::new();
    if rng.chance(1, 2)
        && let Some(&i) = data_indices(&v, true).last()
    {
        let a = v[i].clone();
        v.insert(i + 1, a);
        tags.push("retransmission of the last segment");
    }
    if rng.chance(1, 2) {
        let end = p.conns[0].real.len() as i64;
        v.push(A::Fin { conn: 0, off: end });
    }
    Case {
        kind,
        src,
        steps: materialize(&p, &v),
        base,
        tags,
        legit: true,
        pressure: false,
    }
}
