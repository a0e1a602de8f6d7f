//! The `tls-sni` locator: the key prefix is the label just left of the listener's
//! `sni_suffix`, after its `label_prefix`, in the ClientHello's server_name (no decryption).
//!
//! The connection's records are followed by their lengths from the stream start on, so the
//! locator always knows where the next record header is (docs/DATAPATH.md):
//! - the stream must start with a handshake record holding exactly one ClientHello;
//! - a ClientHello can outgrow one segment (post-quantum key shares push it past 1,500
//!   bytes): the extension walk stops at the segment's end and goes on in the next one, its
//!   state in `KW_TLS_PENDING`;
//! - after it, every handshake record whose body starts with a ClientHello is judged again
//!   (a TLS 1.3 second ClientHello after HelloRetryRequest, or any attempt at one).
//! What the walk cannot follow exactly is "cannot judge" (malformed), never "no key".

use aya_ebpf::{
    bindings::xdp_md,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use filter_common::{CTX_HELLO, CTX_PEEK, CTX_START, Listener, TLS_CARRY};

use crate::{
    LISTENERS, SCRATCH, ScratchPtr,
    http::{SCAN_KEY, SCAN_MALFORMED, SCAN_NONE},
    ld64,
    swar::{HIGH, LOW7, ONES, low_bytes, lower},
};

/// A ClientHello goes on in the next segment, no key yet; the walk's state is in `TlsIo`.
pub const SCAN_PENDING: u64 = 3;
/// A whole ClientHello whose server_name names no key (or that has none): positively no key.
pub const SCAN_NOKEY: u64 = 4;
/// `keywall_tls_hello` left the server_name extension in scratch (`ext[..h_sni]`).
const SCAN_SNI: u64 = 5;

/// Extensions walked per segment; a ClientHello has a few dozen at most. More fail closed.
const MAX_EXTS: u32 = 64;
/// Longest server_name extension this locator reads (header included). Longer fails closed.
const MAX_EXT: u64 = 255;
pub const EXT_BUF: usize = 384;
/// Record headers walked per segment (real records are hundreds of bytes at least).
const MAX_RECORDS: u32 = 32;
/// Largest record body (TLS 1.2 ciphertext, 2^14 + 2048).
const MAX_RECORD: u64 = 18432;
/// A DNS label is at most 63 bytes.
const MAX_LABEL: u64 = 63;

/// In and out of `keywall_tls_scan` (per-CPU scratch).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsIo {
    pub start: u64,
    pub end: u64,
    pub listener: u64,
    pub plen: u64,
    /// TCP sequence number of the payload's first byte.
    pub seq: u64,
    /// The stream context at `start` (in) and at `end` (out): `CTX_*` flags, record body
    /// bytes left, and a record header cut by a segment end.
    pub ctx_flags: u64,
    pub rec_left: u64,
    pub hdr_len: u64,
    pub hdr: u64,
    /// With `CTX_HELLO`: where the ClientHello's extension walk goes on (in and out).
    pub tls_seq: u64,
    pub tls_left: u64,
    pub carry_len: u64,
    pub result: u64,
    pub prefix: [u64; 2],
    /// `keywall_tls_hello`'s own arguments and results.
    pub h_mode: u64,
    pub h_at: u64,
    pub h_result: u64,
    pub h_end: u64,
    pub h_sni: u64,
    pub carry: [u8; TLS_CARRY],
}

/// The extension walk's state (a `bpf_loop` step per extension).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TlsWalk {
    /// Offset (from the frame start) of the next extension; may pass `end`.
    pub o: u64,
    /// Extension bytes left from `o`.
    pub left: u64,
    pub end: u64,
    pub state: u64,
    pub ext_len: u64,
}

const WALKING: u64 = 0;
const AT_SNI: u64 = 1;
const CUT: u64 = 2;
const NO_SNI: u64 = 3;
const BAD: u64 = 4;

/// The record walk's state (a `bpf_loop` step per record header or body piece).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TlsRec {
    pub o: u64,
    pub end: u64,
    pub rec_left: u64,
    pub hdr_len: u64,
    pub hdr: u64,
    pub peek: u64,
    pub state: u64,
    /// With `R_HELLO`: the offset of the ClientHello's record header.
    pub at: u64,
}

const R_GO: u64 = 0;
const R_DONE: u64 = 1;
const R_HELLO: u64 = 2;
const R_BAD: u64 = 3;

#[repr(C)]
struct WalkLoop {
    ctx: *mut xdp_md,
    sc: ScratchPtr,
}

/// Copies `n` frame bytes from offset `off` to `dst` (a rare path: the helper is slow).
#[inline(always)]
fn load(x: &XdpContext, off: usize, dst: *mut u8, n: u32) -> bool {
    unsafe { bpf_xdp_load_bytes(x.ctx, off as u32, dst as *mut c_void, n) == 0 }
}

/// Big-endian u16 at frame offset `off`, if the frame has it.
#[inline(always)]
fn be16_at(data: usize, data_end: usize, off: usize) -> Option<u16> {
    let q = data + (off & 0x3fff);
    if q + 2 > data_end {
        return None;
    }
    let b = q as *const u8;
    Some(unsafe { u16::from_be_bytes([*b, *b.add(1)]) })
}

#[inline(always)]
fn byte_at(data: usize, data_end: usize, off: usize) -> Option<u8> {
    // Two bytes checked: a one-byte check turns into `p >= end`, which the verifier ignores.
    let q = data + (off & 0x3fff);
    if q + 2 > data_end {
        return None;
    }
    Some(unsafe { *(q as *const u8) })
}

/// High bit set in each byte of `x` equal to `b`, exactly.
#[inline(always)]
fn eq_mask(x: u64, b: u8) -> u64 {
    let t = x ^ (ONES * b as u64);
    !(((t & LOW7) + LOW7) | t | LOW7)
}

/// The locator over the payload `[start, end)`, from the context in `io`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_tls_scan(ctx: *mut xdp_md, io: *mut TlsIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.result = SCAN_MALFORMED;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let start = io.start & 0x3fff;
    let end = io.end & 0x3fff;
    if start >= end {
        return 0;
    }
    let flags = io.ctx_flags;
    let mut found = 0u64;
    let mut prefix = [0u64; 2];
    let mut nokey = false;
    let mut o = start;
    let mut rec_left = io.rec_left & 0xffff;
    let mut hdr_len = io.hdr_len & 7;
    let mut hdr = io.hdr;
    let mut peek = (flags & CTX_PEEK as u64 != 0) as u64;
    // 1. A ClientHello going on from the previous segment, or the one the stream starts with.
    if flags & (CTX_HELLO | CTX_START) as u64 != 0 {
        io.h_mode = (flags & CTX_HELLO as u64 != 0) as u64;
        io.h_at = start;
        hello(ctx, io);
        match io.h_result {
            SCAN_PENDING => {
                io.result = SCAN_PENDING;
                io.ctx_flags = CTX_HELLO as u64;
                io.rec_left = 0;
                io.hdr_len = 0;
                return 0;
            }
            SCAN_KEY => {
                found = 1;
                prefix = io.prefix;
            }
            SCAN_NOKEY => nokey = true,
            _ => return 0,
        }
        let he = io.h_end & 0xffff;
        (rec_left, hdr_len, hdr, peek) = (0, 0, 0, 0);
        if he > end {
            rec_left = he - end;
            o = end;
        } else {
            o = he;
        }
    }
    // 2. The records after it, walked by their lengths; at most one more ClientHello may
    // start in this segment (a client sends a second one only after the server's answer).
    let mut more = 0u64;
    for _ in 0..2 {
        if o >= end {
            break;
        }
        unsafe {
            let r = &mut (*sc).rec;
            r.o = o;
            r.end = end;
            r.rec_left = rec_left;
            r.hdr_len = hdr_len;
            r.hdr = hdr;
            r.peek = peek;
            r.state = R_GO;
            r.at = 0;
        }
        let mut lc = WalkLoop { ctx, sc };
        let r = unsafe {
            bpf_loop(
                MAX_RECORDS,
                rec_cb as *mut c_void,
                &mut lc as *mut WalkLoop as *mut c_void,
                0,
            )
        };
        let w = unsafe { &(*sc).rec };
        if r < 0 {
            return 0;
        }
        (rec_left, hdr_len, hdr, peek) = (w.rec_left & 0xffff, w.hdr_len & 7, w.hdr, w.peek);
        match w.state {
            R_DONE => {
                o = end;
                break;
            }
            R_HELLO if more == 0 => {
                more = 1;
                io.h_mode = 0;
                io.h_at = w.at & 0x3fff;
                hello(ctx, io);
                match io.h_result {
                    SCAN_PENDING => {
                        // The new ClientHello goes on in the next segment.
                        if nokey {
                            return 0;
                        }
                        io.result = if found != 0 { SCAN_KEY } else { SCAN_PENDING };
                        io.prefix = prefix;
                        io.ctx_flags = CTX_HELLO as u64;
                        io.rec_left = 0;
                        io.hdr_len = 0;
                        return 0;
                    }
                    SCAN_KEY => {
                        // Two ClientHellos in one segment must name the same key.
                        if nokey || (found != 0 && io.prefix != prefix) {
                            return 0;
                        }
                        found = 1;
                        prefix = io.prefix;
                    }
                    SCAN_NOKEY => {
                        if found != 0 {
                            return 0;
                        }
                        nokey = true;
                    }
                    _ => return 0,
                }
                let he = io.h_end & 0xffff;
                (rec_left, hdr_len, hdr, peek) = (0, 0, 0, 0);
                if he > end {
                    rec_left = he - end;
                    o = end;
                } else {
                    o = he;
                }
            }
            // A third ClientHello, a bad record header, or more records than the walk takes.
            _ => return 0,
        }
    }
    if o < end {
        return 0;
    }
    io.ctx_flags = if peek != 0 { CTX_PEEK as u64 } else { 0 };
    io.rec_left = rec_left;
    io.hdr_len = hdr_len;
    io.hdr = hdr;
    io.prefix = prefix;
    io.result = if found != 0 {
        SCAN_KEY
    } else if nokey {
        SCAN_NOKEY
    } else {
        SCAN_NONE
    };
    0
}

/// A ClientHello, then its server_name: two calls, so their frames never stack on each other.
#[inline(always)]
fn hello(ctx: *mut xdp_md, io: &mut TlsIo) {
    keywall_tls_hello(ctx, io);
    if io.h_result == SCAN_SNI {
        keywall_tls_sni(ctx, io);
    }
}

/// Judges the server_name extension `keywall_tls_hello` left in scratch.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_tls_sni(ctx: *mut xdp_md, io: *mut TlsIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.h_result = SCAN_MALFORMED;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(l) = LISTENERS.get((io.listener & 0x1ff) as u32) else {
        return 0;
    };
    let n = io.h_sni & 0x1ff;
    if n > MAX_EXT {
        return 0;
    }
    sni(io, l, sc, n);
    0
}

extern "C" fn rec_cb(_i: u64, lc: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(lc as *mut WalkLoop) };
    let r = unsafe { &mut (*lc.sc).rec };
    let x = XdpContext::new(lc.ctx);
    let (data, data_end) = (x.data(), x.data_end());
    let o = (r.o & 0x3fff) as usize;
    let end = (r.end & 0x3fff) as usize;
    if o >= end {
        r.state = R_DONE;
        return 1;
    }
    if r.rec_left > 0 {
        if r.peek != 0 {
            // The first body byte of a handshake record whose header an earlier segment had:
            // a ClientHello cannot be judged without it.
            let mut b = [0u8; 8];
            if !load(&x, o, b.as_mut_ptr(), 1) {
                r.state = R_BAD;
                return 1;
            }
            if b[0] == 1 {
                r.state = R_BAD;
                return 1;
            }
            r.peek = 0;
        }
        let avail = (end - o) as u64;
        let n = if r.rec_left < avail {
            r.rec_left
        } else {
            avail
        };
        r.o += n;
        r.rec_left -= n;
        return 0;
    }
    // A record header, perhaps begun in the previous segment.
    let have = (r.hdr_len & 7) as usize;
    if have > 4 {
        r.state = R_BAD;
        return 1;
    }
    let need = 5 - have;
    let avail = end - o;
    if avail < need {
        // Carry what this segment has of it (1..=4 bytes).
        let mut b = [0u8; 8];
        let n = ((avail.wrapping_sub(1)) & 3) + 1;
        if n != avail || !load(&x, o, b.as_mut_ptr(), n as u32) {
            r.state = R_BAD;
            return 1;
        }
        let got = u64::from_le_bytes(b) & low_bytes(n as u64);
        r.hdr |= got << (8 * have as u64);
        r.hdr_len = (have + n) as u64;
        r.o = end as u64;
        r.state = R_DONE;
        return 1;
    }
    let mut h = r.hdr & low_bytes(have as u64);
    {
        let mut b = [0u8; 8];
        let n = ((need - 1) & 7) + 1;
        if !load(&x, o, b.as_mut_ptr(), n as u32) {
            r.state = R_BAD;
            return 1;
        }
        h |= (u64::from_le_bytes(b) & low_bytes(n as u64)) << (8 * have as u64);
    }
    let ty = h & 0xff;
    let ver = (h >> 8) & 0xff;
    let len = ((h >> 24) & 0xff) << 8 | ((h >> 32) & 0xff);
    if !(20..=23).contains(&ty) || ver != 3 || len == 0 || len > MAX_RECORD {
        r.state = R_BAD;
        return 1;
    }
    let body = o + need;
    r.hdr = 0;
    r.hdr_len = 0;
    r.rec_left = len;
    r.o = body as u64;
    r.peek = 0;
    if ty == 22 {
        // A handshake record: does its body start a ClientHello? (A TLS 1.2 Finished is
        // encrypted in a handshake record too, so one byte alone does not decide.)
        if body >= end {
            r.peek = 1;
            return 0;
        }
        let b0 = byte_at(data, data_end, body);
        let q = data + (body & 0x3fff);
        if body + 6 <= end && q + 6 <= data_end {
            let p = q as *const u8;
            let (b0, b1, b4) = unsafe { (*p, *p.add(1), *p.add(4)) };
            if b0 == 1 && b1 == 0 && b4 == 3 {
                if have != 0 {
                    // Its record header was cut by the previous segment's end.
                    r.state = R_BAD;
                    return 1;
                }
                r.at = o as u64;
                r.state = R_HELLO;
                return 1;
            }
        } else if b0 != Some(0) {
            // Too few body bytes to tell (or none readable): fail closed unless it is
            // clearly not a ClientHello.
            let mut b = [0u8; 8];
            if !load(&x, body, b.as_mut_ptr(), 1) || b[0] == 1 {
                r.state = R_BAD;
                return 1;
            }
        }
    }
    0
}

/// The ClientHello whose record header is at `io.h_at` (`h_mode` 0), or the one going on
/// from the previous segment (`h_mode` 1, state in `io`). Results in `h_result`, `prefix`,
/// `h_end` (the offset just past its record, maybe past the segment) and, when pending, the
/// walk's state.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_tls_hello(ctx: *mut xdp_md, io: *mut TlsIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.h_result = SCAN_MALFORMED;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(l) = LISTENERS.get((io.listener & 0x1ff) as u32) else {
        return 0;
    };
    let x = XdpContext::new(ctx);
    let (data, data_end) = (x.data(), x.data_end());
    let start = (io.start & 0x3fff) as usize;
    let end = (io.end & 0x3fff) as usize;
    let seq = io.seq as u32;
    if io.h_mode == 0 {
        let h = (io.h_at & 0x3fff) as usize;
        if h < start || h + 9 > end {
            // Fewer bytes than the record and handshake headers: cannot judge.
            return 0;
        }
        let Some(b0) = byte_at(data, data_end, h) else {
            return 0;
        };
        let Some(b1) = byte_at(data, data_end, h + 1) else {
            return 0;
        };
        let Some(rl) = be16_at(data, data_end, h + 3) else {
            return 0;
        };
        let Some(b5) = byte_at(data, data_end, h + 5) else {
            return 0;
        };
        let Some(b6) = byte_at(data, data_end, h + 6) else {
            return 0;
        };
        let Some(hl) = be16_at(data, data_end, h + 7) else {
            return 0;
        };
        let (rl, hl) = (rl as u64, hl as u64);
        // Exactly one ClientHello in exactly one record: a fragmented one is not judged.
        if b0 != 0x16 || b1 != 3 || b5 != 1 || b6 != 0 || hl + 4 != rl || rl > MAX_RECORD {
            return 0;
        }
        let rec_end = (h as u64 + 5 + rl) & 0xffff;
        // Version (2), random (32), then the session id.
        let Some(sid) = byte_at(data, data_end, h + 43) else {
            return 0;
        };
        if sid > 32 {
            return 0;
        }
        let mut off = h + 44 + sid as usize;
        let Some(cs) = be16_at(data, data_end, off) else {
            return 0;
        };
        off = (off + 2 + cs as usize) & 0x3fff;
        let Some(comp) = byte_at(data, data_end, off) else {
            return 0;
        };
        off = (off + 1 + comp as usize) & 0x3fff;
        if off as u64 == rec_end {
            // No extensions at all: positively no server_name.
            io.h_result = SCAN_NOKEY;
            io.h_end = rec_end;
            return 0;
        }
        let Some(total) = be16_at(data, data_end, off) else {
            return 0;
        };
        let o = off as u64 + 2;
        if o + total as u64 != rec_end {
            return 0;
        }
        io.h_end = rec_end;
        walk(&x, sc, io, l, start, end, seq, o, total as u64);
        return 0;
    }
    // Going on from the previous segment.
    let t = io.tls_seq as u32;
    let left = io.tls_left & 0xffff;
    let rec_end_seq = t.wrapping_add(left as u32);
    let d_end = rec_end_seq.wrapping_sub(seq) as u64;
    if d_end >= 1 << 16 {
        return 0;
    }
    io.h_end = start as u64 + d_end;
    let c = io.carry_len & 0x7f;
    if c > 0 {
        if t.wrapping_add(c as u32) != seq {
            return 0;
        }
        carried(&x, sc, io, l, start, end, seq, c);
        return 0;
    }
    let d = t.wrapping_sub(seq) as u64;
    if d >= 1 << 16 {
        // The next extension starts before this segment: not where the walk stopped.
        return 0;
    }
    walk(&x, sc, io, l, start, end, seq, start as u64 + d, left);
    0
}

/// Walks the extensions from `o` and acts on where the walk stopped.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk(
    x: &XdpContext,
    sc: ScratchPtr,
    io: &mut TlsIo,
    _l: &Listener,
    start: usize,
    end: usize,
    seq: u32,
    o: u64,
    left: u64,
) {
    unsafe {
        let w = &mut (*sc).walk;
        w.o = o;
        w.left = left;
        w.end = end as u64;
        w.state = WALKING;
        w.ext_len = 0;
    }
    let mut lc = WalkLoop { ctx: x.ctx, sc };
    let r = unsafe {
        bpf_loop(
            MAX_EXTS,
            walk_cb as *mut c_void,
            &mut lc as *mut WalkLoop as *mut c_void,
            0,
        )
    };
    let w = unsafe { &(*sc).walk };
    if r < 0 {
        return;
    }
    let o = (w.o & 0xffff) as usize;
    match w.state {
        NO_SNI => io.h_result = SCAN_NOKEY,
        AT_SNI => {
            let n = (4 + w.ext_len) & 0x1ff;
            if n > MAX_EXT || o + n as usize > end {
                return;
            }
            let ext = unsafe { &mut (*sc).ext };
            let n = ((n - 1) & 0xff) + 1;
            if !load(x, o, ext.as_mut_ptr(), n as u32) {
                return;
            }
            io.h_sni = n;
            io.h_result = SCAN_SNI;
        }
        CUT => {
            io.tls_seq = seq.wrapping_add((o - start) as u32) as u64;
            io.tls_left = w.left;
            io.carry_len = 0;
            // Zeroed whole: a retransmission's walk is compared with this one byte for byte.
            for i in 0..TLS_CARRY / 8 {
                unsafe { *(io.carry.as_mut_ptr() as *mut u64).add(i) = 0 };
            }
            if o < end {
                // An extension header, or the server_name, runs past the segment: carry its
                // first bytes to the next one.
                let n = end - o;
                if n > TLS_CARRY {
                    return;
                }
                let n = ((n - 1) & 0x7f) + 1;
                if n > TLS_CARRY {
                    return;
                }
                if !load(x, o, io.carry.as_mut_ptr(), n as u32) {
                    return;
                }
                io.carry_len = n as u64;
            }
            io.h_result = SCAN_PENDING;
        }
        // Lengths that do not add up, or more extensions than the walk takes.
        _ => {}
    }
}

extern "C" fn walk_cb(_i: u64, lc: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(lc as *mut WalkLoop) };
    let w = unsafe { &mut (*lc.sc).walk };
    if w.left == 0 {
        w.state = NO_SNI;
        return 1;
    }
    if w.left < 4 {
        w.state = BAD;
        return 1;
    }
    let x = XdpContext::new(lc.ctx);
    let o = (w.o & 0xffff) as usize;
    let end = (w.end & 0x3fff) as usize;
    if o + 4 > end {
        w.state = CUT;
        return 1;
    }
    let q = x.data() + (o & 0x3fff);
    if q + 4 > x.data_end() {
        w.state = BAD;
        return 1;
    }
    let b = q as *const u8;
    let (ty, len) = unsafe {
        (
            u16::from_be_bytes([*b, *b.add(1)]),
            u16::from_be_bytes([*b.add(2), *b.add(3)]) as u64,
        )
    };
    if len + 4 > w.left {
        w.state = BAD;
        return 1;
    }
    if ty == 0 {
        w.ext_len = len;
        w.state = if o as u64 + 4 + len > end as u64 {
            CUT
        } else {
            AT_SNI
        };
        return 1;
    }
    w.o += 4 + len;
    w.left -= 4 + len;
    0
}

/// The cut extension of the previous segment: its first `c` bytes are in `io.carry`, the
/// rest starts this segment.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn carried(
    x: &XdpContext,
    sc: ScratchPtr,
    io: &mut TlsIo,
    l: &Listener,
    start: usize,
    end: usize,
    seq: u32,
    c: u64,
) {
    let ext = unsafe { &mut (*sc).ext };
    for i in 0..TLS_CARRY / 8 {
        unsafe {
            *(ext.as_mut_ptr() as *mut u64).add(i) = *(io.carry.as_ptr() as *const u64).add(i)
        };
    }
    let c = (c & 0x7f) as usize;
    if c > TLS_CARRY {
        return;
    }
    let have = end - start;
    let want = if have > 255 { 255 } else { have };
    let want = ((want.wrapping_sub(1)) & 0xff) + 1;
    if want > have {
        return;
    }
    if !load(x, start, unsafe { ext.as_mut_ptr().add(c) }, want as u32) {
        return;
    }
    let avail = (c + want) as u64;
    if avail < 4 {
        return;
    }
    let ty = u16::from_be_bytes([ext[0], ext[1]]);
    let len = u16::from_be_bytes([ext[2], ext[3]]) as u64;
    let left = io.tls_left & 0xffff;
    if len + 4 > left {
        return;
    }
    if ty == 0 {
        let n = 4 + len;
        if n > MAX_EXT || n > avail {
            return;
        }
        io.h_sni = n;
        io.h_result = SCAN_SNI;
        return;
    }
    // Skip it and walk on from its end, inside this segment (or past it).
    let skip = 4 + len - c as u64;
    walk(
        x,
        sc,
        io,
        l,
        start,
        end,
        seq,
        start as u64 + (skip & 0xffff),
        left - 4 - len,
    );
}

/// The 8 bytes of `ext` at `o` (little endian).
#[inline(always)]
fn at(ext: &[u8; EXT_BUF], o: u64) -> u64 {
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    unsafe { ld64(ext.as_ptr().add((o & 0xff) as usize) as *const u64) }
}

/// Judges the server_name extension held in `ext[..n]` against the listener.
#[inline(always)]
fn sni(io: &mut TlsIo, l: &Listener, sc: ScratchPtr, n: u64) {
    let ext = unsafe { &(*sc).ext };
    // Header (4), list length (2), name type (1, host_name = 0), name length (2), name: the
    // list must hold exactly one host_name.
    if n < 9 || ext[6] != 0 {
        return;
    }
    let list_len = u16::from_be_bytes([ext[4], ext[5]]) as u64;
    let name_len = u16::from_be_bytes([ext[7], ext[8]]) as u64;
    if list_len + 6 != n || name_len + 3 != list_len || name_len == 0 {
        return;
    }
    // A fully qualified name's trailing dot names the same host.
    let mut nl = name_len;
    if ext[((8 + nl) & 0xff) as usize] == b'.' {
        nl -= 1;
    }
    let sl = (l.sni_suffix_len as u64) & 0x7f;
    let lp = (l.label_prefix_len as u64) & 0x1f;
    let starts_with_label_prefix = || {
        if lp == 0 || nl < lp {
            return lp == 0;
        }
        let mut d = 0u64;
        for j in 0..2u64 {
            // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
            let want = unsafe { ld64((l.label_prefix.as_ptr() as *const u64).add(j as usize)) };
            d |= (lower(at(ext, 9 + 8 * j)) ^ want) & low_bytes(lp.saturating_sub(8 * j));
        }
        d == 0
    };
    let mut suffix_ok = sl > 0 && nl > sl;
    let s = (9 + nl).wrapping_sub(sl) & 0xff;
    if suffix_ok {
        let mut diff = 0u64;
        for j in 0..8u64 {
            if 8 * j >= sl {
                break;
            }
            // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
            let want = unsafe { ld64((l.sni_suffix.as_ptr() as *const u64).add(j as usize)) };
            diff |= (lower(at(ext, s + 8 * j)) ^ want) & low_bytes(sl - 8 * j);
        }
        suffix_ok = diff == 0;
    }
    let has_lp = starts_with_label_prefix();
    if !suffix_ok {
        // Another host name. One that looks like a key name but is not exactly one is
        // not judged; any other names no key.
        if lp > 0 && has_lp {
            return;
        }
        io.h_result = SCAN_NOKEY;
        return;
    }
    // `<label_prefix><key>` must be the whole name left of the suffix: one label.
    let ll = s - 9;
    if ll > MAX_LABEL || !has_lp || ll < lp {
        return;
    }
    let mut dots = 0u64;
    for j in 0..8u64 {
        if 8 * j >= ll {
            break;
        }
        dots |= eq_mask(at(ext, 9 + 8 * j), b'.') & low_bytes(ll - 8 * j) & HIGH;
    }
    if dots != 0 {
        return;
    }
    let k = 9 + lp;
    let klen = ll - lp;
    let plen = io.plen & 0x1f;
    if klen < plen {
        // Shorter than a key prefix: not judged.
        return;
    }
    io.prefix = [
        lower(at(ext, k)) & low_bytes(plen),
        lower(at(ext, k + 8)) & low_bytes(plen.saturating_sub(8)),
    ];
    io.h_result = SCAN_KEY;
}
