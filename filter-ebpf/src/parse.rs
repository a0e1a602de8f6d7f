//! Layer 2 to 4: Ethernet (up to 3 VLAN tags), IPv4 with options, IPv6 with an
//! extension-header chain, TCP. Every read is bounds checked against the packet end; what
//! cannot be parsed safely is reported, never guessed.

use filter_common::{FAMILY_V4, FAMILY_V6};

use crate::{ScratchPtr, forget, ld16, ld64};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const MAX_VLAN_TAGS: usize = 3;
const MAX_IPV6_EXT: usize = 6;

#[allow(dead_code)]
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

/// A TCP segment as far as the filter cares.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Segment {
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// Offsets from the start of the frame; `payload_end` excludes Ethernet padding.
    pub payload_off: usize,
    pub payload_end: usize,
    /// Offsets of the L3 and TCP headers (for the reset action).
    pub l3_off: usize,
    pub l4_off: usize,
    /// Sequence and acknowledgement numbers (host order).
    pub seq: u32,
    pub ack: u32,
}

pub enum Parsed {
    /// Not TCP over IP (ARP, NDP, UDP, ...), or a non-first fragment, which the kernel
    /// cannot reassemble without the first one.
    NotTcp,
    /// The first fragment of a fragmented TCP packet: only the ports are known.
    TcpFragment { dport: Option<u16> },
    /// TCP whose headers cannot be parsed safely (truncated, bad lengths, too many headers).
    BadTcp { dport: Option<u16> },
    /// TCP, parsed into the scratch's `seg`.
    Tcp,
}

#[inline(always)]
fn be16(p: usize) -> u16 {
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    u16::from_be(unsafe { ld16(p as *const u16) })
}

#[inline(always)]
pub fn parse(sc: ScratchPtr, data: usize, end: usize) -> Parsed {
    // Ethernet and VLAN tags.
    if data + 14 > end {
        return Parsed::NotTcp;
    }
    let mut proto = be16(data + 12);
    let mut off: usize = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let p = data + off;
        if p + 4 > end {
            return Parsed::NotTcp;
        }
        proto = be16(p + 2);
        off += 4;
    }
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let off = unsafe { forget(sc, off) } & 0x3f;
    match proto {
        ETH_P_IP => parse_v4(sc, data, end, off),
        ETH_P_IPV6 => parse_v6(sc, data, end, off),
        // A fourth tag: we cannot see what it carries; the stack cannot deliver it to a
        // socket either, so treat it as unparseable TCP-bound traffic.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::BadTcp { dport: None },
        _ => Parsed::NotTcp,
    }
}

#[inline(always)]
fn ports_at(data: usize, end: usize, off: usize) -> Option<u16> {
    let p = data + off;
    if p + 4 > end {
        return None;
    }
    Some(be16(p + 2))
}

#[inline(always)]
fn parse_v4(sc: ScratchPtr, data: usize, end: usize, l3: usize) -> Parsed {
    let p = data + l3;
    if p + 20 > end {
        return Parsed::NotTcp;
    }
    let b = p as *const u8;
    let (vihl, proto) = unsafe { (*b, *b.add(9)) };
    if proto != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    let tot_len = be16(p + 2) as usize;
    let frag = be16(p + 6);
    if frag & 0x1fff != 0 {
        return Parsed::NotTcp;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::BadTcp { dport: None };
    }
    let l4 = l3 + ihl;
    if frag & 0x2000 != 0 {
        return Parsed::TcpFragment {
            dport: ports_at(data, end, l4),
        };
    }
    let seg = unsafe { &mut (*sc).seg };
    seg.family = FAMILY_V4;
    seg.l3_off = l3;
    seg.src = [0; 16];
    seg.dst = [0; 16];
    unsafe {
        seg.src[..4].copy_from_slice(&*(b.add(12) as *const [u8; 4]));
        seg.dst[..4].copy_from_slice(&*(b.add(16) as *const [u8; 4]));
    }
    // Trust the IP length over the frame length: short frames carry Ethernet padding.
    let ip_end = l3 + tot_len;
    parse_tcp(data, end, l4, ip_end, seg)
}

#[inline(always)]
fn parse_v6(sc: ScratchPtr, data: usize, end: usize, l3: usize) -> Parsed {
    let p = data + l3;
    if p + 40 > end {
        return Parsed::NotTcp;
    }
    let b = p as *const u8;
    let payload_len = be16(p + 4) as usize;
    let mut nh = unsafe { *b.add(6) };
    let seg = unsafe { &mut (*sc).seg };
    seg.family = FAMILY_V6;
    seg.l3_off = l3;
    unsafe {
        seg.src.copy_from_slice(&*(b.add(8) as *const [u8; 16]));
        seg.dst.copy_from_slice(&*(b.add(24) as *const [u8; 16]));
    }
    let mut off = l3 + 40;
    let mut fragmented = false;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT {
        let len = match nh {
            0 | 43 | 60 | 51 | 44 => {
                let h = data + off;
                if h + 8 > end {
                    return Parsed::BadTcp { dport: None };
                }
                // One read of the whole 8 bytes through the checked pointer.
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                let hdr = unsafe { ld64(h as *const u64) }.to_le_bytes();
                let (next, hlen) = (hdr[0], hdr[1] as usize);
                let len = match nh {
                    44 => {
                        let fo = u16::from_be_bytes([hdr[2], hdr[3]]);
                        if fo & 0xfff8 != 0 {
                            // A non-first fragment: harmless without its first.
                            return Parsed::NotTcp;
                        }
                        fragmented = true;
                        8
                    }
                    51 => (hlen + 2) * 4,
                    _ => (hlen + 1) * 8,
                };
                nh = next;
                len
            }
            _ => {
                done = true;
                0
            }
        };
        if done {
            break;
        }
        // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
        off = unsafe { forget(sc, off + len) } & 0xfff;
    }
    if !done {
        // Still inside the extension chain: whatever follows may be TCP.
        return Parsed::BadTcp { dport: None };
    }
    if nh != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    if fragmented {
        return Parsed::TcpFragment {
            dport: ports_at(data, end, off),
        };
    }
    if payload_len == 0 {
        // Jumbograms are not API traffic we can judge.
        return Parsed::BadTcp {
            dport: ports_at(data, end, off),
        };
    }
    let seg = unsafe { &mut (*sc).seg };
    parse_tcp(data, end, off, l3 + 40 + payload_len, seg)
}

#[inline(always)]
fn parse_tcp(data: usize, end: usize, l4: usize, ip_end: usize, seg: &mut Segment) -> Parsed {
    let p = data + l4;
    if p + 20 > end {
        return Parsed::BadTcp {
            dport: ports_at(data, end, l4),
        };
    }
    let b = p as *const u8;
    seg.sport = be16(p);
    seg.dport = be16(p + 2);
    seg.seq = u32::from_be(unsafe { core::ptr::read_volatile((p + 4) as *const u32) });
    seg.ack = u32::from_be(unsafe { core::ptr::read_volatile((p + 8) as *const u32) });
    seg.l4_off = l4;
    let (doff, flags) = unsafe { (((*b.add(12) >> 4) as usize) * 4, *b.add(13)) };
    seg.tcp_flags = flags;
    let frame_len = end - data;
    let payload_off = l4 + doff;
    if doff < 20 || payload_off > ip_end || ip_end > frame_len {
        return Parsed::BadTcp {
            dport: Some(seg.dport),
        };
    }
    seg.payload_off = payload_off;
    seg.payload_end = ip_end;
    Parsed::Tcp
}
