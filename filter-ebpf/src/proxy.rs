//! PROXY protocol v1 (text) and v2 (binary) headers at the start of a connection, from the
//! listener's trusted proxies: the client address they carry is what the allowlist judges.
//! Anything that is not a well-formed header fails closed.

use aya_ebpf::{bindings::xdp_md, cty::c_void, helpers::generated::bpf_loop, programs::XdpContext};
use filter_common::{FAMILY_V4, FAMILY_V6};

use crate::{SCRATCH, ScratchPtr, ld64};

pub const PROXY_MALFORMED: u64 = 0;
/// A header with a client address (in `addr`, family in `family`).
pub const PROXY_CLIENT: u64 = 1;
/// A LOCAL (v2) or UNKNOWN (v1) header: the connection's own source is the client.
pub const PROXY_LOCAL: u64 = 2;

/// In and out of `keywall_proxy` (per-CPU scratch).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ProxyIo {
    pub start: u64,
    pub end: u64,
    pub result: u64,
    /// Header bytes, to skip before the request.
    pub len: u64,
    pub family: u64,
    pub addr: [u8; 16],
}

/// The v1 parser's state, one byte per `bpf_loop` step.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct V1State {
    pub start: u64,
    pub end: u64,
    pub six: u64,
    /// 0: source address, 1: rest of the line, 2: done.
    pub phase: u64,
    pub bad: u64,
    pub len: u64,
    pub cur: u64,
    pub digits: u64,
    pub parts: u64,
    pub tail: u64,
    pub dc: u64,
    pub prev: u64,
    /// IPv4 octets, or IPv6 groups before (0..8) and after (8..16) a "::".
    pub groups: [u16; 16],
}

const V2_SIG: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// Longest v1 line, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;
/// The source address starts after "PROXY TCP4 ".
const V1_ADDR: u64 = 11;

/// Global BPF function (verified once, on its own): parses the header at `io.start`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_proxy(ctx: *mut xdp_md, io: *mut ProxyIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.result = PROXY_MALFORMED;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let xctx = XdpContext::new(ctx);
    let data = xctx.data();
    let data_end = xctx.data_end();
    let start = (io.start & 0x3fff) as usize;
    let end = (io.end & 0x3fff) as usize;
    let p = data + start;
    if p + 16 > data_end || start + 16 > end {
        return 0;
    }
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let w0 = unsafe { ld64(p as *const u64) }.to_le_bytes();
    if w0
        == [
            V2_SIG[0], V2_SIG[1], V2_SIG[2], V2_SIG[3], V2_SIG[4], V2_SIG[5], V2_SIG[6], V2_SIG[7],
        ]
    {
        v2(io, p, data_end, start, end);
    } else if &w0[..6] == b"PROXY " {
        v1(&xctx, sc, io, p, start, end);
    }
    0
}

#[inline(always)]
fn v2(io: &mut ProxyIo, p: usize, data_end: usize, start: usize, end: usize) {
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let h = unsafe { ld64((p + 8) as *const u64) }.to_le_bytes();
    if h[..4] != V2_SIG[8..12] {
        return;
    }
    let (ver_cmd, fam) = (h[4], h[5]);
    let len = u16::from_be_bytes([h[6], h[7]]) as usize;
    let total = 16 + len;
    if start + total > end {
        // The header must arrive whole in the first segment (proxies send it so).
        return;
    }
    io.len = total as u64;
    match ver_cmd {
        0x20 => io.result = PROXY_LOCAL,
        0x21 => match fam {
            // TCP over IPv4: source, destination, ports.
            0x11 if len >= 12 && p + 20 <= data_end => {
                io.family = FAMILY_V4 as u64;
                io.addr = [0; 16];
                let a = unsafe { core::ptr::read_volatile((p + 16) as *const [u8; 4]) };
                io.addr[..4].copy_from_slice(&a);
                io.result = PROXY_CLIENT;
            }
            0x21 if len >= 36 && p + 32 <= data_end => {
                io.family = FAMILY_V6 as u64;
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                let a = unsafe { ld64((p + 16) as *const u64) }.to_le_bytes();
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                let b = unsafe { ld64((p + 24) as *const u64) }.to_le_bytes();
                io.addr[..8].copy_from_slice(&a);
                io.addr[8..].copy_from_slice(&b);
                io.result = PROXY_CLIENT;
            }
            // UNSPEC (or UDP/unix): no TCP client address to judge.
            0x00 => io.result = PROXY_LOCAL,
            _ => {}
        },
        _ => {}
    }
}

#[repr(C)]
struct V1Loop {
    ctx: *mut xdp_md,
    sc: ScratchPtr,
}

#[inline(always)]
fn v1(ctx: &XdpContext, sc: ScratchPtr, io: &mut ProxyIo, p: usize, start: usize, end: usize) {
    // "PROXY " is checked; the next 8 bytes say which protocol.
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let w = unsafe { ld64((p + 6) as *const u64) }.to_le_bytes();
    let six = if &w[..5] == b"TCP4 " {
        0
    } else if &w[..5] == b"TCP6 " {
        1
    } else if &w[..7] == b"UNKNOWN" {
        2
    } else {
        return;
    };
    let st = unsafe { &mut (*sc).v1 };
    *st = V1State {
        start: start as u64,
        end: end as u64,
        six,
        phase: if six == 2 { 1 } else { 0 },
        ..Default::default()
    };
    let mut lc = V1Loop { ctx: ctx.ctx, sc };
    let r = unsafe {
        bpf_loop(
            (V1_MAX as u32) - V1_ADDR as u32,
            v1_cb as *mut c_void,
            &mut lc as *mut V1Loop as *mut c_void,
            0,
        )
    };
    let st = unsafe { &(*sc).v1 };
    if r < 0 || st.bad != 0 || st.phase != 2 {
        return;
    }
    io.len = st.len;
    if six == 2 {
        io.result = PROXY_LOCAL;
        return;
    }
    io.addr = [0; 16];
    if six == 0 {
        if st.parts != 4 {
            return;
        }
        for i in 0..4 {
            io.addr[i] = st.groups[i] as u8;
        }
        io.family = FAMILY_V4 as u64;
    } else {
        let (head, tail) = (st.parts & 15, st.tail & 15);
        let ok = if st.dc != 0 {
            head + tail <= 7
        } else {
            head == 8 && tail == 0
        };
        if !ok {
            return;
        }
        for k in 0..8u64 {
            let g = if k < head {
                st.groups[(k & 7) as usize]
            } else if k + tail >= 8 {
                st.groups[(8 + ((k + tail - 8) & 7)) as usize]
            } else {
                0
            };
            io.addr[(2 * k) as usize] = (g >> 8) as u8;
            io.addr[(2 * k + 1) as usize] = g as u8;
        }
        io.family = FAMILY_V6 as u64;
    }
    io.result = PROXY_CLIENT;
}

#[inline(always)]
fn hex(c: u8) -> Option<u64> {
    match c {
        b'0'..=b'9' => Some((c - b'0') as u64),
        b'a'..=b'f' => Some((c - b'a' + 10) as u64),
        b'A'..=b'F' => Some((c - b'A' + 10) as u64),
        _ => None,
    }
}

/// One byte of the v1 line, from the source address on.
extern "C" fn v1_cb(i: u64, lc: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(lc as *mut V1Loop) };
    let st = unsafe { &mut (*lc.sc).v1 };
    let ctx = XdpContext::new(lc.ctx);
    let off = ((st.start & 0x3fff) + V1_ADDR + (i & 0x7f)) as usize;
    if off >= (st.end & 0x3fff) as usize || off < 8 {
        // The line must end inside the segment.
        st.bad = 1;
        return 1;
    }
    // The byte as the top of the 8 bytes ending with it: a one-byte bounds check becomes
    // `p >= end` in LLVM's hands, which the verifier does not take as a range.
    let q = ctx.data() + ((off - 7) & 0x3fff);
    if q + 8 > ctx.data_end() {
        st.bad = 1;
        return 1;
    }
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let c = (unsafe { ld64(q as *const u64) } >> 56) as u8;
    if st.phase == 1 {
        if c == b'\n' {
            if st.prev != b'\r' as u64 {
                st.bad = 1;
            }
            st.len = V1_ADDR + i + 1;
            st.phase = 2;
            return 1;
        }
        st.prev = c as u64;
        return 0;
    }
    // Phase 0: the source address, up to the space before the destination.
    if c == b' ' {
        if st.six == 0 {
            if st.digits == 0 || st.parts != 3 {
                st.bad = 1;
                return 1;
            }
            st.groups[3] = st.cur as u16;
            st.parts = 4;
        } else if st.digits > 0 {
            push6(st);
        } else if !(st.dc != 0 && st.prev == b':' as u64) {
            // Ends in a single colon.
            st.bad = 1;
            return 1;
        }
        st.phase = 1;
        st.prev = c as u64;
        return 0;
    }
    if st.six == 0 {
        if c == b'.' {
            if st.digits == 0 || st.parts >= 3 {
                st.bad = 1;
                return 1;
            }
            st.groups[(st.parts & 3) as usize] = st.cur as u16;
            st.parts += 1;
            st.cur = 0;
            st.digits = 0;
        } else if c.is_ascii_digit() {
            st.cur = st.cur * 10 + (c - b'0') as u64;
            st.digits += 1;
            if st.cur > 255 || st.digits > 3 {
                st.bad = 1;
                return 1;
            }
        } else {
            st.bad = 1;
            return 1;
        }
    } else if c == b':' {
        if st.prev == b':' as u64 {
            if st.dc != 0 {
                st.bad = 1;
                return 1;
            }
            st.dc = 1;
        } else if st.digits > 0 {
            push6(st);
        } else if i != 0 {
            st.bad = 1;
            return 1;
        }
    } else if let Some(v) = hex(c) {
        st.cur = (st.cur << 4) | v;
        st.digits += 1;
        if st.digits > 4 {
            st.bad = 1;
            return 1;
        }
    } else {
        st.bad = 1;
        return 1;
    }
    st.prev = c as u64;
    0
}

#[inline(always)]
fn push6(st: &mut V1State) {
    if st.dc != 0 {
        if st.tail >= 7 {
            st.bad = 1;
            return;
        }
        st.groups[(8 + (st.tail & 7)) as usize] = st.cur as u16;
        st.tail += 1;
    } else {
        if st.parts >= 8 {
            st.bad = 1;
            return;
        }
        st.groups[(st.parts & 7) as usize] = st.cur as u16;
        st.parts += 1;
    }
    st.cur = 0;
    st.digits = 0;
}
