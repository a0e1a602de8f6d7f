//! The `reset` action: the refused segment is turned, in place, into a TCP RST back to the
//! client (XDP_TX), so a misconfigured client fails at once instead of timing out.
//!
//! Only plain headers are answered (IPv4 without options, IPv6 without extension headers;
//! VLAN tags are kept as they are); anything else is just dropped.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext};
use filter_common::{FAMILY_V4, Reason};

use crate::{
    ScratchPtr, forget_in, ld16,
    parse::{TCP_ACK, TCP_RST, TCP_SYN},
};

const TCP_FIN: u8 = 0x01;

/// Reasons a client hears about: its key or its connection was refused. Not the prefilter
/// (a SYN flood would turn the edge into a reflector) and not malformed traffic.
#[inline(always)]
pub fn applies(r: Reason) -> bool {
    matches!(
        r,
        Reason::DropNotAllowed
            | Reason::DropLocked
            | Reason::DropUnknownKey
            | Reason::DropNoKey
            | Reason::DropFlow
            | Reason::DropRateLimited
    )
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Ones' complement sum of `n` 16-bit words at `p` (native order, like the stored checksum).
#[inline(always)]
fn sum16(p: usize, n: usize) -> u64 {
    let mut s = 0u64;
    for i in 0..20 {
        if i >= n {
            break;
        }
        // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
        s += unsafe { ld16((p + 2 * i) as *const u16) } as u64;
    }
    s
}

#[inline(always)]
unsafe fn swap(a: *mut u8, b: *mut u8, n: usize) {
    for i in 0..16 {
        if i >= n {
            break;
        }
        unsafe {
            let t = *a.add(i);
            *a.add(i) = *b.add(i);
            *b.add(i) = t;
        }
    }
}

#[inline(never)]
pub fn rewrite(ctx: &XdpContext, sc: ScratchPtr) -> bool {
    let seg = unsafe { &(*sc).seg };
    if seg.tcp_flags & (TCP_SYN | TCP_RST) != 0 {
        return false;
    }
    // Only what the client is waiting on is answered: data, or its FIN. A bare ACK of a
    // refused connection is just dropped (it already had its RST).
    if seg.payload_off >= seg.payload_end && seg.tcp_flags & TCP_FIN == 0 {
        return false;
    }
    let v4 = seg.family == FAMILY_V4;
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let l3 = unsafe { forget_in(sc, 0, seg.l3_off) } & 0x3f;
    let l4 = if v4 { l3 + 20 } else { l3 + 40 };
    if seg.l4_off != l4 {
        return false;
    }
    let mut consumed = (seg.payload_end - seg.payload_off) as u32;
    if seg.tcp_flags & TCP_FIN != 0 {
        consumed += 1;
    }
    let (seq, ack, had_ack) = (seg.seq, seg.ack, seg.tcp_flags & TCP_ACK != 0);
    let len = ctx.data_end() - ctx.data();
    let want = l4 + 20;
    if len < want {
        return false;
    }
    if len > want {
        let delta = want as i32 - len as i32;
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return false;
        }
    }
    // The packet moved: every pointer is taken, and checked, again.
    let data = ctx.data();
    let end = ctx.data_end();
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let l3 = unsafe { forget_in(sc, 0, l3) } & 0x3f;
    let l4 = if v4 { l3 + 20 } else { l3 + 40 };
    // Two checks: the fixed one covers the Ethernet header (the smallest frame here is 54
    // bytes), the variable one the TCP header; LLVM would fold a 12-byte check into the latter.
    if data + 54 > end {
        return false;
    }
    if data + l4 + 20 > end {
        return false;
    }
    unsafe {
        swap(data as *mut u8, (data + 6) as *mut u8, 6);
        let ip = (data + l3) as *mut u8;
        let tcp = (data + l4) as *mut u8;
        let mut pseudo: u64;
        if v4 {
            swap(ip.add(12), ip.add(16), 4);
            *ip = 0x45;
            *ip.add(1) = 0;
            core::ptr::write_volatile(ip.add(2) as *mut u16, 40u16.to_be());
            core::ptr::write_volatile(ip.add(4) as *mut u16, 0);
            core::ptr::write_volatile(ip.add(6) as *mut u16, 0x4000u16.to_be());
            *ip.add(8) = 64;
            core::ptr::write_volatile(ip.add(10) as *mut u16, 0);
            let c = fold(sum16(ip as usize, 10));
            core::ptr::write_volatile(ip.add(10) as *mut u16, c);
            pseudo = sum16(ip.add(12) as usize, 4);
        } else {
            swap(ip.add(8), ip.add(24), 16);
            core::ptr::write_volatile(ip.add(4) as *mut u16, 20u16.to_be());
            *ip.add(7) = 64;
            pseudo = sum16(ip.add(8) as usize, 16);
        }
        pseudo += 6u16.to_be() as u64 + 20u16.to_be() as u64;
        swap(tcp, tcp.add(2), 2);
        let (rseq, rack) = if had_ack {
            (ack, seq.wrapping_add(consumed))
        } else {
            (0, seq.wrapping_add(consumed))
        };
        core::ptr::write_volatile(tcp.add(4) as *mut u32, rseq.to_be());
        core::ptr::write_volatile(tcp.add(8) as *mut u32, rack.to_be());
        *tcp.add(12) = 5 << 4;
        *tcp.add(13) = TCP_RST | TCP_ACK;
        core::ptr::write_volatile(tcp.add(14) as *mut u16, 0);
        core::ptr::write_volatile(tcp.add(16) as *mut u16, 0);
        core::ptr::write_volatile(tcp.add(18) as *mut u16, 0);
        let c = fold(pseudo + sum16(tcp as usize, 10));
        core::ptr::write_volatile(tcp.add(16) as *mut u16, c);
    }
    true
}
