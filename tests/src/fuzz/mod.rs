//! The differential fuzzer (issue 10): a reference model of what a real server reads from a
//! TCP connection ([`model`]), a generator and mutator of segment sequences ([`gen`]), and a
//! runner that pushes each sequence through the compiled XDP program with
//! `BPF_PROG_TEST_RUN` and flags a bypass ([`run`]).
//!
//! A bypass: the model's server reads a key prefix that the policy refuses for the effective
//! client address, from bytes that all came in segments the program passed.

pub mod model;
pub mod run;
pub mod scenario;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;

/// One TCP segment from the client, as the attacker shapes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seg {
    pub seq: u32,
    pub flags: u8,
    /// The urgent pointer (meaningful with URG).
    pub urg: u16,
    pub payload: Vec<u8>,
    /// Sent with a broken TCP checksum: the filter sees it, the server's stack drops it.
    pub bad_csum: bool,
}

/// A step of a sequence: a segment on the case's tuple, or flow-table pressure (that many
/// other connections, each a new flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Seg(Seg),
    Evict(u16),
}

/// Deterministic generator (xorshift64*), so every sequence reproduces from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so neighbouring seeds start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// A printable rendering of payload bytes (escapes for anything not plain ASCII, long runs
/// elided).
pub fn show_bytes(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for (i, c) in b.iter().enumerate() {
        if i == max {
            s.push_str(&format!("...(+{} bytes)", b.len() - max));
            break;
        }
        match *c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(*c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s
}

pub fn show_flags(f: u8) -> String {
    let names = [
        (SYN, "SYN"),
        (ACK, "ACK"),
        (PSH, "PSH"),
        (FIN, "FIN"),
        (RST, "RST"),
        (URG, "URG"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("|")
}
