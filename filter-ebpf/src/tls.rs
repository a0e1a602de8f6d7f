//! The `tls-sni` locator: the key prefix is the label just left of the listener's
//! `sni_suffix`, after its `label_prefix`, in the ClientHello's server_name (no decryption).
//!
//! A ClientHello can outgrow one segment (post-quantum key shares push it past 1,500 bytes),
//! so the extension walk can stop at a segment's end and go on in the next one: the flow entry
//! keeps the sequence number of the next extension, the extension bytes left, and, when an
//! extension header or the server_name itself was cut, its first bytes (`carry`).
//! A ClientHello whose server_name cannot be found follows the `no_key` rule.

use aya_ebpf::{
    bindings::xdp_md,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use filter_common::{Listener, TLS_CARRY};

use crate::{
    LISTENERS, SCRATCH, ScratchPtr,
    http::{SCAN_KEY, SCAN_NONE},
    ld64,
    swar::{low_bytes, lower},
};

/// The ClientHello goes on in the next segment; the state is in `TlsIo`.
pub const SCAN_PENDING: u64 = 3;

/// Extensions walked per segment; a ClientHello has a few dozen at most.
const MAX_EXTS: u32 = 48;
/// Longest server_name extension this locator reads (header included).
const MAX_EXT: u64 = 255;
pub const EXT_BUF: usize = 384;

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
    /// In: the flow is in the middle of a ClientHello. Out: it still is.
    pub pending: u64,
    pub tls_seq: u64,
    pub tls_left: u64,
    pub carry_len: u64,
    pub result: u64,
    pub prefix: [u64; 2],
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
    /// 0: walking, 1: server_name at `o`, 2: cut at `o` (go on next segment), 3: none.
    pub state: u64,
    pub ext_len: u64,
}

const WALKING: u64 = 0;
const AT_SNI: u64 = 1;
const CUT: u64 = 2;
const NO_SNI: u64 = 3;

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

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_tls_scan(ctx: *mut xdp_md, io: *mut TlsIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.result = SCAN_NONE;
    let pending = io.pending;
    io.pending = 0;
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
    if start >= end {
        return 0;
    }
    let seq = io.seq as u32;
    let o: usize;
    let left: u64;
    let first = byte_at(data, data_end, start);
    let hs = byte_at(data, data_end, start + 5);
    if first == Some(0x16) && hs == Some(0x01) {
        // TLS record header (5), handshake header (4), version (2), random (32).
        let Some(sid) = byte_at(data, data_end, start + 43) else {
            return 0;
        };
        let mut off = start + 44 + (sid as usize & 0x3f);
        let Some(cs) = be16_at(data, data_end, off) else {
            return 0;
        };
        off = (off + 2 + cs as usize) & 0x3fff;
        let Some(comp) = byte_at(data, data_end, off) else {
            return 0;
        };
        off = (off + 1 + comp as usize) & 0x3fff;
        let Some(total) = be16_at(data, data_end, off) else {
            return 0;
        };
        o = off + 2;
        left = total as u64;
    } else if pending != 0 {
        let t = io.tls_seq as u32;
        let c = io.carry_len & 0x7f;
        if c > 0 {
            if t.wrapping_add(c as u32) != seq {
                return 0;
            }
            carried(&x, sc, io, l, start, end, seq, c);
            return 0;
        }
        let d = t.wrapping_sub(seq) as u64;
        if d >= 1 << 31 {
            // We missed the bytes where the next extension starts.
            return 0;
        }
        o = start + (d & 0xffff) as usize;
        left = io.tls_left & 0xffff;
    } else {
        return 0;
    }
    walk(&x, sc, io, l, start, end, seq, o as u64, left);
    0
}

/// Walks the extensions from `o` and acts on where the walk stopped.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk(
    x: &XdpContext,
    sc: ScratchPtr,
    io: &mut TlsIo,
    l: &Listener,
    start: usize,
    end: usize,
    seq: u32,
    o: u64,
    left: u64,
) {
    unsafe {
        (*sc).walk = TlsWalk {
            o,
            left,
            end: end as u64,
            state: WALKING,
            ext_len: 0,
        };
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
    let w = unsafe { (*sc).walk };
    if r < 0 {
        return;
    }
    let o = (w.o & 0xffff) as usize;
    match w.state {
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
            sni(io, l, sc, n);
        }
        CUT => {
            io.tls_seq = seq.wrapping_add((o - start) as u32) as u64;
            io.tls_left = w.left;
            io.carry_len = 0;
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
            io.pending = 1;
            io.result = SCAN_PENDING;
        }
        _ => {}
    }
}

extern "C" fn walk_cb(_i: u64, lc: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(lc as *mut WalkLoop) };
    let w = unsafe { &mut (*lc.sc).walk };
    if w.left < 4 {
        w.state = NO_SNI;
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
        w.state = NO_SNI;
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
        w.state = NO_SNI;
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
        sni(io, l, sc, n);
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
    ld64(unsafe { ext.as_ptr().add((o & 0xff) as usize) } as *const u64)
}

/// Matches the server_name extension held in `ext[..n]` against the listener.
#[inline(always)]
fn sni(io: &mut TlsIo, l: &Listener, sc: ScratchPtr, n: u64) {
    let ext = unsafe { &(*sc).ext };
    // Header (4), list length (2), name type (1, host_name = 0), name length (2), name.
    if n < 9 || ext[6] != 0 {
        return;
    }
    let name_len = u16::from_be_bytes([ext[7], ext[8]]) as u64;
    if 9 + name_len > n {
        return;
    }
    let sl = (l.sni_suffix_len as u64) & 0x7f;
    if sl == 0 || name_len <= sl {
        return;
    }
    let name_end = 9 + name_len;
    let s = (name_end - sl) & 0xff;
    let mut diff = 0u64;
    for j in 0..8u64 {
        if 8 * j >= sl {
            break;
        }
        let want = ld64(unsafe { (l.sni_suffix.as_ptr() as *const u64).add(j as usize) });
        diff |= (lower(at(ext, s + 8 * j)) ^ want) & low_bytes(sl - 8 * j);
    }
    if diff != 0 {
        return;
    }
    // The label left of the suffix starts after the last dot before it (or at the name).
    let mut ls = 9u64;
    for k in 1..64u64 {
        if k > s - 9 {
            break;
        }
        if ext[((s - k) & 0xff) as usize] == b'.' {
            ls = s - k + 1;
            break;
        }
    }
    let lp = (l.label_prefix_len as u64) & 0x1f;
    if s < ls + lp {
        return;
    }
    if lp > 0 {
        let mut d = 0u64;
        for j in 0..2u64 {
            let want = ld64(unsafe { (l.label_prefix.as_ptr() as *const u64).add(j as usize) });
            d |= (lower(at(ext, ls + 8 * j)) ^ want) & low_bytes(lp.saturating_sub(8 * j));
        }
        if d != 0 {
            return;
        }
    }
    let k = ls + lp;
    let klen = s - k;
    let plen = io.plen & 0x1f;
    // A label shorter than the prefix stays short and matches no key.
    let take = if klen < plen { klen } else { plen };
    io.prefix = [
        lower(at(ext, k)) & low_bytes(take),
        lower(at(ext, k + 8)) & low_bytes(take.saturating_sub(8)),
    ];
    io.result = SCAN_KEY;
}
