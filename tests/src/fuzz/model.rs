//! The reference model: what a real server reads from a TCP connection.
//!
//! Pure Rust, no kernel. It takes the segments that reached the server (the filter passed
//! them and the server's stack did not throw them away) and answers which key prefixes the
//! server may read, and for which client address.
//!
//! It is deliberately more tolerant than the filter and than any one server: where servers
//! differ (how overlapping bytes are reassembled, whether the urgent byte stays in the
//! stream, how lenient the HTTP header syntax is) every variant is computed and the union of
//! what they read counts.

use super::{ACK, FIN, RST, SYN, Seg, URG};

/// The receive window the model's server advertises (no window scaling).
pub const WINDOW: i64 = 65535;

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct KeyRule {
    pub prefix: Vec<u8>,
    pub allow: Vec<[u8; 4]>,
    pub locked: bool,
}

/// The policy as the model judges it: a key prefix and a client address are refused when the
/// key is locked, does not allow the address, or is unknown (with `unknown_key = "drop"`).
#[derive(Clone, Debug)]
pub struct PolicyModel {
    pub plen: usize,
    pub keys: Vec<KeyRule>,
    pub unknown_drop: bool,
}

impl PolicyModel {
    /// Why `prefix` from `client` is refused, or None when the policy lets it through.
    pub fn refused(&self, prefix: &[u8], client: [u8; 4]) -> Option<&'static str> {
        match self.keys.iter().find(|k| k.prefix == prefix) {
            Some(k) if k.locked => Some("locked"),
            Some(k) if !k.allow.is_empty() && !k.allow.contains(&client) => Some("not allowed"),
            Some(_) => None,
            None if self.unknown_drop => Some("unknown"),
            None => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Listeners
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum Locator {
    /// Header names (any case; `-` and `_` alike).
    Http {
        headers: Vec<String>,
    },
    Tls {
        suffix: String,
        label_prefix: String,
    },
    Fix {
        tag: u32,
    },
}

#[derive(Clone, Debug)]
pub struct ListenerModel {
    pub locator: Locator,
    pub proxy_protocol: bool,
}

/// One key the server may read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// Which connection on the tuple (0 for the first SYN, 1 after a close and a new SYN...).
    pub conn: usize,
    pub prefix: Vec<u8>,
    pub client: [u8; 4],
    /// Which server variant read it (reassembly policy, urgent byte handling).
    pub view: String,
}

// ---------------------------------------------------------------------------------------------
// Reassembly
// ---------------------------------------------------------------------------------------------

/// How a server resolves overlapping, not yet delivered bytes. Bytes already delivered (before
/// `rcv_nxt`) never change in any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reasm {
    /// The first copy of every byte wins.
    First,
    /// The last copy of every not yet delivered byte wins.
    Last,
    /// Linux: an in-order segment is delivered at once (so it wins over out-of-order copies
    /// queued before it); in the out-of-order queue a segment starting at or before a queued
    /// one and covering it replaces it, a segment covered by a queued one is dropped, and in a
    /// partial overlap the lower sequence number wins.
    Linux,
}

pub const REASM: [Reasm; 3] = [Reasm::First, Reasm::Last, Reasm::Linux];

#[derive(Clone, Debug)]
struct Stream {
    policy: Reasm,
    /// First/Last: every byte received, by offset from ISN + 1.
    bytes: Vec<Option<u8>>,
    /// Linux: the delivered stream and the out-of-order queue (start, bytes), by start.
    delivered: Vec<u8>,
    ofo: Vec<(i64, Vec<u8>)>,
    nxt: i64,
}

impl Stream {
    fn new(policy: Reasm) -> Stream {
        Stream {
            policy,
            bytes: Vec::new(),
            delivered: Vec::new(),
            ofo: Vec::new(),
            nxt: 0,
        }
    }

    fn insert(&mut self, s: i64, data: &[u8]) {
        let e = s + data.len() as i64;
        if e <= self.nxt {
            return;
        }
        match self.policy {
            Reasm::First | Reasm::Last => {
                if self.bytes.len() < e as usize {
                    self.bytes.resize(e as usize, None);
                }
                for o in s.max(self.nxt)..e {
                    let b = &mut self.bytes[o as usize];
                    if b.is_none() || self.policy == Reasm::Last {
                        *b = Some(data[(o - s) as usize]);
                    }
                }
                while (self.nxt as usize) < self.bytes.len()
                    && self.bytes[self.nxt as usize].is_some()
                {
                    self.nxt += 1;
                }
            }
            Reasm::Linux => {
                if s <= self.nxt {
                    self.delivered
                        .extend_from_slice(&data[(self.nxt - s) as usize..]);
                    self.nxt = e;
                    self.drain();
                } else {
                    self.ofo_insert(s, data);
                }
            }
        }
    }

    fn ofo_insert(&mut self, s: i64, data: &[u8]) {
        let e = s + data.len() as i64;
        let end = |q: &(i64, Vec<u8>)| q.0 + q.1.len() as i64;
        // The queued segment with the highest start at or before s.
        let at = self.ofo.iter().rposition(|q| q.0 <= s);
        let mut pos = at.map_or(0, |i| i + 1);
        if let Some(i) = at {
            let (ls, le) = (self.ofo[i].0, end(&self.ofo[i]));
            if s < le {
                if e <= le {
                    return; // every byte already queued
                }
                if s == ls {
                    self.ofo.remove(i);
                    pos = i;
                }
            }
        }
        self.ofo.insert(pos, (s, data.to_vec()));
        // Remove the following segments the new one covers.
        let j = pos + 1;
        while j < self.ofo.len() {
            let q = &self.ofo[j];
            if q.0 >= e {
                break;
            }
            if end(q) <= e {
                self.ofo.remove(j);
            } else {
                break;
            }
        }
    }

    fn drain(&mut self) {
        while let Some(q) = self.ofo.first() {
            if q.0 > self.nxt {
                break;
            }
            let (s, data) = self.ofo.remove(0);
            let e = s + data.len() as i64;
            if e <= self.nxt {
                continue;
            }
            self.delivered
                .extend_from_slice(&data[(self.nxt - s) as usize..]);
            self.nxt = e;
        }
    }

    fn read(&self) -> Vec<u8> {
        match self.policy {
            Reasm::First | Reasm::Last => self.bytes[..self.nxt as usize]
                .iter()
                .map(|b| b.expect("contiguous"))
                .collect(),
            Reasm::Linux => self.delivered.clone(),
        }
    }
}

/// One accepted connection on the tuple.
#[derive(Clone, Debug)]
struct Conn {
    isn: u32,
    streams: Vec<Stream>,
    /// Offsets of urgent bytes the server was told about.
    urgent: Vec<i64>,
    /// Offset of the FIN, once one arrived in the window.
    fin: Option<i64>,
    closed: bool,
}

impl Conn {
    fn new(isn: u32) -> Conn {
        Conn {
            isn,
            streams: REASM.iter().map(|&p| Stream::new(p)).collect(),
            urgent: Vec::new(),
            fin: None,
            closed: false,
        }
    }

    fn nxt(&self) -> i64 {
        self.streams[0].nxt
    }

    /// Offset of `seq` from the first data byte (ISN + 1), as a signed distance.
    fn rel(&self, seq: u32) -> i64 {
        i64::from(seq.wrapping_sub(self.isn.wrapping_add(1)) as i32)
    }

    fn segment(&mut self, seg: &Seg) {
        if seg.flags & RST != 0 {
            // Only an RST exactly at rcv_nxt resets; others get a challenge ACK.
            if self.rel(seg.seq) == self.nxt() {
                self.closed = true;
            }
            return;
        }
        if seg.flags & SYN != 0 {
            return; // challenge ACK, the connection stays
        }
        if seg.flags & ACK == 0 {
            return; // established: a segment without ACK is dropped
        }
        let s = self.rel(seg.seq);
        let len = seg.payload.len() as i64;
        let e = s + len;
        let nxt = self.nxt();
        let fin = seg.flags & FIN != 0;
        if len == 0 && !fin {
            return;
        }
        // Outside the window: a pure duplicate or too far ahead.
        if (len > 0 && e <= nxt) || s >= nxt + WINDOW || (len == 0 && s < nxt) {
            return;
        }
        if seg.flags & URG != 0 && seg.urg > 0 {
            let p = s + i64::from(seg.urg) - 1;
            if p >= nxt && !self.urgent.contains(&p) {
                self.urgent.push(p);
            }
        }
        let mut data = &seg.payload[..];
        if let Some(f) = self.fin {
            // Nothing after the FIN is data.
            let keep = (f - s).clamp(0, len) as usize;
            data = &data[..keep];
        }
        if !data.is_empty() {
            for st in &mut self.streams {
                st.insert(s, data);
            }
        }
        if fin && self.fin.is_none() {
            self.fin = Some(e);
        }
        if let Some(f) = self.fin
            && self.nxt() >= f
        {
            self.closed = true;
        }
    }

    /// Every byte stream a server may read from this connection, with the variant's name.
    fn views(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        for st in &self.streams {
            let mut s = st.read();
            if let Some(f) = self.fin {
                s.truncate(f.max(0) as usize);
            }
            let urgent: Vec<i64> = self
                .urgent
                .iter()
                .copied()
                .filter(|&p| (p as usize) < s.len())
                .collect();
            let mut push = |name: String, v: Vec<u8>| {
                if !out.iter().any(|(_, o)| *o == v) {
                    out.push((name, v));
                }
            };
            push(format!("{:?}", st.policy), s.clone());
            if !urgent.is_empty() {
                let all: Vec<u8> = s
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !urgent.contains(&(*i as i64)))
                    .map(|(_, b)| *b)
                    .collect();
                push(format!("{:?}+urgent removed", st.policy), all);
                let last = *urgent.iter().max().expect("non-empty");
                let mut one = s.clone();
                one.remove(last as usize);
                push(format!("{:?}+last urgent removed", st.policy), one);
            }
        }
        out
    }
}

/// Every key the server may read from `segs` (the segments that reached it, in arrival
/// order) on one 5-tuple whose source address is `src`.
pub fn server_reads(l: &ListenerModel, plen: usize, src: [u8; 4], segs: &[&Seg]) -> Vec<Read> {
    let mut conns: Vec<Conn> = Vec::new();
    for seg in segs {
        let open = conns.last().is_some_and(|c| !c.closed);
        if !open {
            // Only a SYN (without ACK) opens a connection; data on it is discarded.
            if seg.flags & (SYN | ACK | RST) == SYN {
                conns.push(Conn::new(seg.seq));
            }
            continue;
        }
        conns.last_mut().expect("open").segment(seg);
    }
    let mut reads = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        for (view, bytes) in c.views() {
            for (client, prefix) in stream_keys(l, plen, src, &bytes) {
                let r = Read {
                    conn: i,
                    prefix,
                    client,
                    view: view.clone(),
                };
                if !reads.iter().any(|o: &Read| {
                    o.conn == r.conn && o.prefix == r.prefix && o.client == r.client
                }) {
                    reads.push(r);
                }
            }
        }
    }
    reads
}

/// The keys (client address, prefix) a lenient server reads from one connection's bytes.
pub fn stream_keys(
    l: &ListenerModel,
    plen: usize,
    src: [u8; 4],
    bytes: &[u8],
) -> Vec<([u8; 4], Vec<u8>)> {
    let (client, body) = if l.proxy_protocol {
        match proxy_header(bytes) {
            ProxyHdr::Incomplete => return Vec::new(),
            ProxyHdr::None => (src, bytes),
            ProxyHdr::Local(n) => (src, &bytes[n..]),
            ProxyHdr::Client(a, n) => (a, &bytes[n..]),
        }
    } else {
        (src, bytes)
    };
    let keys = match &l.locator {
        Locator::Http { headers } => http_keys(body, headers, plen),
        Locator::Tls {
            suffix,
            label_prefix,
        } => tls_keys(body, suffix, label_prefix, plen),
        Locator::Fix { tag } => fix_keys(body, *tag, plen),
    };
    keys.into_iter().map(|k| (client, k)).collect()
}

fn key_prefix(v: &[u8], plen: usize) -> Option<Vec<u8>> {
    let v = &v[v.iter().position(|b| *b != b' ' && *b != b'\t')?..];
    (v.len() >= plen && v[..plen].iter().all(|b| (0x21..=0x7e).contains(b)))
        .then(|| v[..plen].to_vec())
}

fn push_unique(out: &mut Vec<Vec<u8>>, k: Option<Vec<u8>>) {
    if let Some(k) = k
        && !out.contains(&k)
    {
        out.push(k);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.x
// ---------------------------------------------------------------------------------------------

fn norm_name(n: &[u8]) -> Vec<u8> {
    n.iter()
        .map(|b| match b.to_ascii_lowercase() {
            b'_' => b'-',
            c => c,
        })
        .collect()
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Lines ended by CRLF, LF or a bare CR (a line cut by the end of the bytes counts too).
fn lines(b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => {
                out.push(&b[start..i]);
                start = i + 1;
            }
            b'\r' => {
                out.push(&b[start..i]);
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&b[start..]);
    out
}

/// Every value of a key header a lenient HTTP/1.x server may take, as key prefixes. Any line
/// counts (request line position, body, pipelined requests): over-detecting is safe.
pub fn http_keys(b: &[u8], headers: &[String], plen: usize) -> Vec<Vec<u8>> {
    let names: Vec<Vec<u8>> = headers.iter().map(|h| norm_name(h.as_bytes())).collect();
    let ls = lines(b);
    let mut out = Vec::new();
    for (i, line) in ls.iter().enumerate() {
        let Some(t0) = line.iter().position(|c| !is_blank(*c)) else {
            continue;
        };
        let t = &line[t0..];
        let Some(colon) = t.iter().position(|c| *c == b':') else {
            continue;
        };
        let mut name = &t[..colon];
        while name.last().is_some_and(|c| is_blank(*c)) {
            name = &name[..name.len() - 1];
        }
        if !names.contains(&norm_name(name)) {
            continue;
        }
        let value = trim_blanks(&t[colon + 1..]);
        push_unique(&mut out, key_prefix(value, plen));
        // obs-fold: continuation lines (starting with a blank) join the value, with a space
        // (RFC 9112) or without.
        let mut spaced = value.to_vec();
        let mut joined = value.to_vec();
        for cont in ls[i + 1..].iter().take(3) {
            if !cont.first().is_some_and(|c| is_blank(*c)) {
                break;
            }
            let c = trim_blanks(cont);
            if !spaced.is_empty() {
                spaced.push(b' ');
            }
            spaced.extend_from_slice(c);
            joined.extend_from_slice(c);
            push_unique(&mut out, key_prefix(&spaced, plen));
            push_unique(&mut out, key_prefix(&joined, plen));
        }
    }
    out
}

fn trim_blanks(v: &[u8]) -> &[u8] {
    let s = v.iter().position(|c| !is_blank(*c)).unwrap_or(v.len());
    &v[s..]
}

// ---------------------------------------------------------------------------------------------
// TLS ClientHello
// ---------------------------------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(b[at]) << 8 | usize::from(b[at + 1])
}

/// The server_name keys of every ClientHello in the handshake records of `b` (records of
/// other types skipped, handshake messages reassembled across records, a last record or
/// message cut short parsed as far as it goes).
pub fn tls_keys(b: &[u8], suffix: &str, label_prefix: &str, plen: usize) -> Vec<Vec<u8>> {
    let mut hs = Vec::new();
    let mut i = 0;
    while i + 5 <= b.len() {
        let len = be16(b, i + 3);
        let body = &b[i + 5..(i + 5 + len).min(b.len())];
        if b[i] == 22 {
            hs.extend_from_slice(body);
        }
        i += 5 + len;
    }
    let mut out = Vec::new();
    let mut j = 0;
    while j + 4 <= hs.len() {
        let len = usize::from(hs[j + 1]) << 16 | be16(&hs, j + 2);
        let body = &hs[j + 4..(j + 4 + len).min(hs.len())];
        if hs[j] == 1 {
            for name in hello_names(body) {
                for k in sni_keys(&name, suffix, label_prefix, plen) {
                    push_unique(&mut out, Some(k));
                }
            }
        }
        j += 4 + len;
    }
    out
}

/// Every host_name in every server_name extension of a ClientHello body.
fn hello_names(b: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut p = 2 + 32;
    let skip = |p: &mut usize, w: usize| -> Option<()> {
        let n = if w == 1 {
            usize::from(*b.get(*p)?)
        } else {
            (*p + 2 <= b.len()).then(|| be16(b, *p))?
        };
        *p += w + n;
        Some(())
    };
    if skip(&mut p, 1).is_none() || skip(&mut p, 2).is_none() || skip(&mut p, 1).is_none() {
        return names;
    }
    p += 2; // extensions length: walk to the end of what is there
    while p + 4 <= b.len() {
        let ty = be16(b, p);
        let len = be16(b, p + 2);
        let data = &b[p + 4..(p + 4 + len).min(b.len())];
        if ty == 0 && data.len() >= 2 {
            let mut q = 2;
            while q + 3 <= data.len() {
                let n = be16(data, q + 1);
                if data[q] == 0 && q + 3 + n <= data.len() {
                    names.push(data[q + 3..q + 3 + n].to_vec());
                }
                q += 3 + n;
            }
        }
        p += 4 + len;
    }
    names
}

/// The key a server reads from a host name: lower-cased, one trailing dot removed, the label
/// left of the suffix after the label prefix (the leftmost label, and the whole rest when
/// it has dots).
pub fn sni_keys(name: &[u8], suffix: &str, label_prefix: &str, plen: usize) -> Vec<Vec<u8>> {
    let mut n: Vec<u8> = name.to_ascii_lowercase();
    if n.last() == Some(&b'.') {
        n.pop();
    }
    let suffix = suffix.to_ascii_lowercase();
    let lp = label_prefix.to_ascii_lowercase();
    let mut out = Vec::new();
    if !n.ends_with(suffix.as_bytes()) {
        return out;
    }
    let rest = &n[..n.len() - suffix.len()];
    let first = rest.split(|c| *c == b'.').next().unwrap_or(rest);
    for label in [first, rest] {
        if let Some(k) = label.strip_prefix(lp.as_bytes()) {
            push_unique(&mut out, key_prefix(k, plen));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// FIX
// ---------------------------------------------------------------------------------------------

/// Every value of `tag` at a field start (the start, after any SOH), tag numbers with leading
/// zeros included, in every message.
pub fn fix_keys(b: &[u8], tag: u32, plen: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for field in b.split(|c| *c == 0x01) {
        let Some(eq) = field.iter().position(|c| *c == b'=') else {
            continue;
        };
        let t = &field[..eq];
        if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
            continue;
        }
        let digits = &t[t.iter().position(|c| *c != b'0').unwrap_or(t.len())..];
        if digits.len() > 9 {
            continue;
        }
        let n: u32 = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if n == tag {
            push_unique(&mut out, key_prefix(&field[eq + 1..], plen));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyHdr {
    /// Not (the start of) a PROXY header: a lenient server reads the bytes as they are.
    None,
    /// A header still being received: the server reads nothing yet.
    Incomplete,
    /// LOCAL / UNKNOWN: the connection's own address counts; the header's length.
    Local(usize),
    /// The client address the header names; the header's length.
    Client([u8; 4], usize),
}

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

pub fn proxy_header(b: &[u8]) -> ProxyHdr {
    if b.len() < 12 && (V2_SIG.starts_with(b) || b"PROXY ".starts_with(&b[..b.len().min(6)])) {
        return ProxyHdr::Incomplete;
    }
    if b.starts_with(V2_SIG) {
        if b.len() < 16 {
            return ProxyHdr::Incomplete;
        }
        let n = 16 + be16(b, 14);
        if b.len() < n {
            return ProxyHdr::Incomplete;
        }
        return match (b[12] & 0x0f, b[13] >> 4) {
            (1, 1) if n >= 16 + 12 => ProxyHdr::Client([b[16], b[17], b[18], b[19]], n),
            _ => ProxyHdr::Local(n),
        };
    }
    if b.starts_with(b"PROXY ") {
        let Some(end) = b.windows(2).take(107).position(|w| w == b"\r\n") else {
            return if b.len() < 107 {
                ProxyHdr::Incomplete
            } else {
                ProxyHdr::None
            };
        };
        let line = String::from_utf8_lossy(&b[6..end]).to_string();
        let mut parts = line.split(' ');
        if parts.next() == Some("TCP4")
            && let Some(Ok(a)) = parts.next().map(|s| s.parse::<std::net::Ipv4Addr>())
        {
            return ProxyHdr::Client(a.octets(), end + 2);
        }
        return ProxyHdr::Local(end + 2);
    }
    ProxyHdr::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::PSH;

    fn seg(seq: u32, flags: u8, p: &[u8]) -> Seg {
        Seg {
            seq,
            flags,
            urg: 0,
            payload: p.to_vec(),
            bad_csum: false,
        }
    }

    fn http() -> ListenerModel {
        ListenerModel {
            locator: Locator::Http {
                headers: vec!["X-MBX-APIKEY".into()],
            },
            proxy_protocol: false,
        }
    }

    fn reads(l: &ListenerModel, segs: &[Seg]) -> Vec<String> {
        let refs: Vec<&Seg> = segs.iter().collect();
        server_reads(l, 8, [1, 2, 3, 4], &refs)
            .into_iter()
            .map(|r| String::from_utf8(r.prefix).unwrap())
            .collect()
    }

    const D: u8 = ACK | PSH;

    #[test]
    fn in_order_http() {
        let r = reads(
            &http(),
            &[
                seg(100, SYN, b""),
                seg(
                    101,
                    D,
                    b"GET / HTTP/1.1\r\nX-MBX-APIKEY: abcdefgh123\r\n\r\n",
                ),
            ],
        );
        assert_eq!(r, vec!["abcdefgh"]);
    }

    #[test]
    fn first_copy_and_last_copy_both_count() {
        // Out of order: bytes 20.. arrive first with one key, then an overlapping copy with
        // another, then the head: First reads the first copy, Last and Linux the second.
        let head = b"GET / HTTP/1.1\r\nX-M"; // 19 bytes
        let a = b"BX-APIKEY: aaaaaaaa\r\n";
        let b = b"BX-APIKEY: bbbbbbbb\r\n";
        let mut r = reads(
            &http(),
            &[
                seg(0, SYN, b""),
                seg(1 + 19, D, a),
                seg(1 + 19, D, b),
                seg(1, D, head),
            ],
        );
        r.sort();
        assert_eq!(r, vec!["aaaaaaaa", "bbbbbbbb"]);
        // Delivered bytes never change: a retransmission with other bytes is ignored.
        let r = reads(
            &http(),
            &[
                seg(0, SYN, b""),
                seg(1, D, b"GET / HTTP/1.1\r\nX-MBX-APIKEY: aaaaaaaa\r\n"),
                seg(1, D, b"GET / HTTP/1.1\r\nX-MBX-APIKEY: bbbbbbbb\r\n"),
            ],
        );
        assert_eq!(r, vec!["aaaaaaaa"]);
    }

    #[test]
    fn linux_partial_overlap_lower_seq_wins() {
        let mut s = Stream::new(Reasm::Linux);
        s.insert(10, b"XXXXXXXXXX"); // 10..20
        s.insert(5, b"yyyyyyyyyy"); // 5..15: starts before, does not cover: both queued
        s.insert(0, b"zzzzz"); // 0..5 in order
        assert_eq!(s.read(), b"zzzzzyyyyyyyyyyXXXXX");
        let mut s = Stream::new(Reasm::Linux);
        s.insert(10, b"XXXXX");
        s.insert(10, b"yyyyyyy"); // same start, covers: replaces
        s.insert(0, b"0123456789");
        assert_eq!(s.read(), b"0123456789yyyyyyy");
        let mut s = Stream::new(Reasm::Linux);
        s.insert(10, b"XXXXXXX");
        s.insert(11, b"yy"); // covered: dropped
        s.insert(0, b"0123456789");
        assert_eq!(s.read(), b"0123456789XXXXXXX");
    }

    #[test]
    fn window_syn_rst_ack_and_checks() {
        let req = b"GET / HTTP/1.1\r\nX-MBX-APIKEY: abcdefgh\r\n";
        // Nothing before the SYN; data on the SYN is discarded.
        assert!(reads(&http(), &[seg(5, D, req)]).is_empty());
        assert!(reads(&http(), &[seg(0, SYN, req)]).is_empty());
        // Out of window, no ACK: discarded.
        assert!(reads(&http(), &[seg(0, SYN, b""), seg(1 + 70000, D, req)]).is_empty());
        assert!(reads(&http(), &[seg(0, SYN, b""), seg(1, PSH, req)]).is_empty());
        // A SYN mid-stream is ignored: data at its ISN + 1 is not a new stream.
        assert!(
            reads(
                &http(),
                &[seg(0, SYN, b""), seg(5000, SYN, b""), seg(5001, D, req)]
            )
            .is_empty()
        );
        // An RST off rcv_nxt is ignored; at rcv_nxt it closes, and a new SYN reopens.
        let r = reads(
            &http(),
            &[
                seg(0, SYN, b""),
                seg(7, RST, b""),
                seg(1, D, b"GET / HTTP/1.1\r\n"),
                seg(17, RST, b""),
                seg(5000, SYN, b""),
                seg(5001, D, req),
            ],
        );
        assert_eq!(r, vec!["abcdefgh"]);
        // Data after a FIN is not read.
        assert!(
            reads(
                &http(),
                &[
                    seg(0, SYN, b""),
                    seg(1, D | FIN, b"GET / HTTP/1.1\r\n"),
                    seg(17, D, &req[16..]),
                ]
            )
            .is_empty()
        );
    }

    #[test]
    fn urgent_byte() {
        let l = http();
        let mut s = seg(1, D | URG, b"GET / HTTP/1.1\r\nX-MBX-APIKEY: abcdZefgh\r\n");
        s.urg = 35; // the byte at seq + 34: 'Z'
        let mut r = reads(&l, &[seg(0, SYN, b""), s]);
        r.sort();
        assert_eq!(r, vec!["abcdZefg", "abcdefgh"]);
    }

    #[test]
    fn lenient_http() {
        let h = vec!["X-MBX-APIKEY".to_owned()];
        let k = |b: &[u8]| {
            http_keys(b, &h, 8)
                .into_iter()
                .map(|v| String::from_utf8(v).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            k(b"GET / HTTP/1.1\r\nx_mbx_apikey : abcdefgh\r\n"),
            ["abcdefgh"]
        );
        assert_eq!(k(b"GET / HTTP/1.1\rX-Mbx-ApiKey:abcdefgh\r"), ["abcdefgh"]);
        assert_eq!(
            k(b"GET / HTTP/1.1\r\nX-MBX-APIKEY:\r\n abcdefgh\r\n"),
            ["abcdefgh"]
        );
        assert_eq!(
            k(b"GET / HTTP/1.1\r\nX-MBX-APIKEY: abcd\r\n\tefgh\r\n"),
            ["abcdefgh"]
        );
        assert_eq!(
            k(b"GET / HTTP/1.1\r\nX-MBX-APIKEY: abc\r\n"),
            Vec::<String>::new()
        );
        assert_eq!(
            k(b"GET / HTTP/1.1\r\nX-MBX-APIKEY: aaaaaaaa\r\n\r\nGET / HTTP/1.1\nX-MBX-APIKEY: bbbbbbbb\n"),
            ["aaaaaaaa", "bbbbbbbb"]
        );
    }

    #[test]
    fn tls_and_fix_and_proxy() {
        use crate::packet::{ClientHello, ProxiedConn, fix_logon, proxy_v1, proxy_v2};
        let ch = ClientHello::chrome_like("K-ABCDEFGH123.Api.Example.com.", 7).record();
        assert_eq!(
            tls_keys(&ch, ".api.example.com", "k-", 8),
            vec![b"abcdefgh".to_vec()]
        );
        // The handshake message split over two records, then a second hello.
        let hs = ClientHello::new("k-zzzzzzzz.api.example.com").handshake();
        let mut two = Vec::new();
        for part in [&hs[..50], &hs[50..]] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        let mut both = ch.clone();
        both.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        both.extend_from_slice(&two);
        assert_eq!(
            tls_keys(&both, ".api.example.com", "k-", 8),
            vec![b"abcdefgh".to_vec(), b"zzzzzzzz".to_vec()]
        );
        let fix = fix_logon("FIX.4.4", "SENDER01", Some("abcdefgh99"));
        assert_eq!(fix_keys(&fix, 553, 8), vec![b"abcdefgh".to_vec()]);
        assert_eq!(fix_keys(&fix, 49, 8), vec![b"SENDER01".to_vec()]);
        assert_eq!(fix_keys(b"8=FIX.4.4\x010553=abcdefgh\x01", 553, 8).len(), 1);
        let c = ProxiedConn {
            src: "198.51.100.7".parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            sport: 1,
            dport: 2,
        };
        let v2 = proxy_v2(Some(c), &[]);
        assert_eq!(
            proxy_header(&v2),
            ProxyHdr::Client([198, 51, 100, 7], v2.len())
        );
        assert_eq!(proxy_header(&v2[..20]), ProxyHdr::Incomplete);
        let v1 = proxy_v1(Some(c));
        assert_eq!(
            proxy_header(&v1),
            ProxyHdr::Client([198, 51, 100, 7], v1.len())
        );
        assert_eq!(proxy_header(b"GET / HTTP/1.1\r\n"), ProxyHdr::None);
    }
}
