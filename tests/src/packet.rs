//! Builds Ethernet frames for feeding the XDP program through `BPF_PROG_TEST_RUN`.
//!
//! Frames are well formed unless a test deliberately breaks them afterwards: lengths and
//! checksums are always filled in, so a verdict never depends on a builder mistake.
//!
//! ```text
//! let req = http_request("GET", "/api/v3/account", &[("X-MBX-APIKEY", "abc")]);
//! let pkt = Pkt::tcp4([10, 0, 0, 1], [10, 0, 0, 2], 40000, 443).vlan(0x8100, 7);
//! let req = pad_request_to(req, MAX_FRAME_LEN - pkt.payload_offset());
//! let frame = pkt.payload(&req).build(); // exactly 1514 bytes, key header at the end
//! ```
//!
//! Payloads for the other locators: [`ClientHello`] (TLS, with GREASE, padding, tickets, a
//! post-quantum key share past 1500 bytes, shuffled extensions), [`fix_logon`] and
//! [`fix_message`] (FIX with correct BodyLength and CheckSum), [`proxy_v1`] and [`proxy_v2`]
//! (PROXY headers). [`Pkt::segments`] cuts a payload into segments with consecutive
//! sequence numbers.

/// Default Ethernet addresses: locally administered, so they never collide with real NICs.
pub const ETH_SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ETH_DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A full-size frame on a 1500-byte MTU link, without VLAN tags or FCS.
pub const MAX_FRAME_LEN: usize = 1514;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;

const TTL: u8 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    fn proto(self) -> u8 {
        match self {
            Transport::Tcp => IPPROTO_TCP,
            Transport::Udp => IPPROTO_UDP,
        }
    }
}

#[derive(Clone, Debug)]
enum Ext {
    /// Any header in the common `next header, length, data` format (AH included).
    Generic {
        kind: u8,
        len: usize,
    },
    Fragment {
        more: bool,
        offset: u16,
        id: u32,
    },
}

impl Ext {
    fn kind(&self) -> u8 {
        match self {
            Ext::Generic { kind, .. } => *kind,
            Ext::Fragment { .. } => IPPROTO_FRAGMENT,
        }
    }
}

#[derive(Clone, Debug)]
enum Ip {
    V4 {
        src: [u8; 4],
        dst: [u8; 4],
        options: Vec<u8>,
        id: u16,
        dont_fragment: bool,
        more_fragments: bool,
        frag_offset: u16,
    },
    V6 {
        src: [u8; 16],
        dst: [u8; 16],
        ext: Vec<Ext>,
    },
}

impl Ip {
    /// A non-first fragment carries a slice of the datagram, not the L4 header.
    fn is_later_fragment(&self) -> bool {
        match self {
            Ip::V4 { frag_offset, .. } => *frag_offset != 0,
            Ip::V6 { ext, .. } => ext
                .iter()
                .any(|e| matches!(e, Ext::Fragment { offset, .. } if *offset != 0)),
        }
    }
}

/// Offsets of each layer within a built frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Start of the IP header (after Ethernet and VLAN tags).
    pub l3: usize,
    /// Start of the TCP/UDP header (after IPv4 options or the IPv6 extension chain).
    pub l4: usize,
    /// Start of the TCP/UDP payload; equals `l4` for a non-first fragment.
    pub payload: usize,
    /// End of the IP datagram; only a trailer (Ethernet padding) follows.
    pub ip_end: usize,
}

thread_local! {
    static NEXT_SEQ: std::cell::RefCell<std::collections::HashMap<String, u32>> =
        Default::default();
}

/// The sequence number for the next segment of `conn` (1000 for its first), moving the
/// position on by `used` (payload bytes, plus one for SYN and FIN).
fn next_seq(conn: String, used: u32) -> u32 {
    NEXT_SEQ.with(|m| {
        let mut m = m.borrow_mut();
        let s = m.entry(conn).or_insert(1000);
        let seq = *s;
        *s = s.wrapping_add(used);
        seq
    })
}

/// Forgets the sequence numbers of every connection built in this thread (a test that
/// reuses 5-tuples as new connections starts again at 1000).
pub fn reset_seqs() {
    NEXT_SEQ.with(|m| m.borrow_mut().clear());
}

/// A TCP or UDP packet over IPv4 or IPv6, built up by chained calls and rendered by
/// [`Pkt::build`].
#[derive(Clone, Debug)]
pub struct Pkt {
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    /// Tags in wire order, outermost first: `(tpid, vid)`.
    vlans: Vec<(u16, u16)>,
    ip: Ip,
    ttl: u8,
    transport: Transport,
    sport: u16,
    dport: u16,
    seq: u32,
    /// No `seq` was given: `build` numbers the segment like a sender would, after the
    /// previous segment built on this 5-tuple in this thread (see `next_seq`).
    auto_seq: bool,
    /// The acknowledgment number; `None`: 1 when ACK is set, else 0.
    ack: Option<u32>,
    /// `None` means "whatever a data-carrying peer would send", decided at build time.
    flags: Option<u8>,
    tcp_options: Vec<u8>,
    payload: Vec<u8>,
    trailer: Vec<u8>,
}

impl Pkt {
    fn new(ip: Ip, transport: Transport, sport: u16, dport: u16) -> Pkt {
        Pkt {
            eth_src: ETH_SRC,
            eth_dst: ETH_DST,
            vlans: Vec::new(),
            ip,
            ttl: TTL,
            transport,
            sport,
            dport,
            seq: 1000,
            auto_seq: true,
            ack: None,
            flags: None,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            trailer: Vec::new(),
        }
    }

    fn v4(src: [u8; 4], dst: [u8; 4], transport: Transport) -> Ip {
        Ip::V4 {
            src,
            dst,
            options: Vec::new(),
            id: 0x1c46,
            // What Linux sends for TCP (path MTU discovery); UDP usually goes without.
            dont_fragment: transport == Transport::Tcp,
            more_fragments: false,
            frag_offset: 0,
        }
    }

    pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Pkt {
        Pkt::new(
            Pkt::v4(src, dst, Transport::Tcp),
            Transport::Tcp,
            sport,
            dport,
        )
    }

    pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Pkt {
        Pkt::new(
            Pkt::v4(src, dst, Transport::Udp),
            Transport::Udp,
            sport,
            dport,
        )
    }

    pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Pkt {
        let ip = Ip::V6 {
            src,
            dst,
            ext: Vec::new(),
        };
        Pkt::new(ip, Transport::Tcp, sport, dport)
    }

    pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Pkt {
        let ip = Ip::V6 {
            src,
            dst,
            ext: Vec::new(),
        };
        Pkt::new(ip, Transport::Udp, sport, dport)
    }

    /// An ARP who-has request (10.0.0.1 asking for 10.0.0.2), broadcast.
    pub fn arp() -> Vec<u8> {
        let mut f = eth_header([0xff; 6], ETH_SRC, ETH_P_ARP);
        f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        f.extend_from_slice(&[6, 4]);
        f.extend_from_slice(&1u16.to_be_bytes()); // request
        f.extend_from_slice(&ETH_SRC);
        f.extend_from_slice(&[10, 0, 0, 1]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 2]);
        f
    }

    /// An NDP neighbour solicitation from `src` for `target`, sent as on the wire: to the
    /// target's solicited-node multicast group, hop limit 255, with a source link-layer
    /// address option.
    pub fn icmp6_ns(src: [u8; 16], target: [u8; 16]) -> Vec<u8> {
        let mut dst = [0u8; 16];
        dst[..2].copy_from_slice(&[0xff, 0x02]);
        dst[11..13].copy_from_slice(&[0x01, 0xff]);
        dst[13..].copy_from_slice(&target[13..]);
        let eth_dst = [0x33, 0x33, 0xff, target[13], target[14], target[15]];

        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0]; // type, code, checksum, reserved
        icmp.extend_from_slice(&target);
        icmp.extend_from_slice(&[1, 1]); // source link-layer address, 8 bytes
        icmp.extend_from_slice(&ETH_SRC);
        let sum = pseudo6_checksum(&src, &dst, IPPROTO_ICMPV6, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());

        let mut f = eth_header(eth_dst, ETH_SRC, ETH_P_IPV6);
        f.extend_from_slice(&ipv6_header(icmp.len(), IPPROTO_ICMPV6, 255, &src, &dst));
        f.extend_from_slice(&icmp);
        f
    }

    /// Overrides the Ethernet addresses.
    pub fn eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Pkt {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    /// Pushes a VLAN tag inside any already pushed: for QinQ call `.vlan(0x88a8, outer)`
    /// then `.vlan(0x8100, inner)`.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Pkt {
        assert!(vid < 4096, "VLAN id {vid} does not fit in 12 bits");
        self.vlans.push((tpid, vid));
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Pkt {
        self.ttl = ttl;
        self
    }

    /// Raw IPv4 options, zero (end-of-list) padded to a multiple of 4 bytes.
    pub fn ipv4_options(mut self, opts: &[u8]) -> Pkt {
        let Ip::V4 { options, .. } = &mut self.ip else {
            panic!("ipv4_options on an IPv6 packet");
        };
        options.clear();
        options.extend_from_slice(opts);
        options.resize(opts.len().next_multiple_of(4), 0);
        assert!(options.len() <= 40, "IPv4 options exceed 40 bytes");
        self
    }

    pub fn ipv4_id(mut self, new_id: u16) -> Pkt {
        let Ip::V4 { id, .. } = &mut self.ip else {
            panic!("ipv4_id on an IPv6 packet");
        };
        *id = new_id;
        self
    }

    /// Makes this an IPv4 fragment; `offset` is in 8-byte units. DF is cleared, since a
    /// fragment with DF set is contradictory. With a non-zero offset the frame carries the
    /// payload bytes directly after the IP header and no TCP/UDP header, as a real
    /// non-first fragment would.
    pub fn ipv4_frag(mut self, more: bool, offset: u16) -> Pkt {
        assert!(
            offset < 0x2000,
            "fragment offset {offset} does not fit in 13 bits"
        );
        let Ip::V4 {
            dont_fragment,
            more_fragments,
            frag_offset,
            ..
        } = &mut self.ip
        else {
            panic!("ipv4_frag on an IPv6 packet");
        };
        *dont_fragment = false;
        *more_fragments = more;
        *frag_offset = offset;
        self
    }

    /// Appends an IPv6 extension header of `len_bytes` total bytes (a multiple of 8) to the
    /// chain. Hop-by-hop (0) and destination options (60) are filled with skippable
    /// options, a routing header (43) has an experimental type and segments left 0, other types (e.g. AH, 51) are
    /// zero filled. Use [`Pkt::ipv6_frag`] for fragment headers.
    pub fn ipv6_ext(mut self, next_header_type: u8, len_bytes: usize) -> Pkt {
        assert!(
            next_header_type != IPPROTO_FRAGMENT,
            "use ipv6_frag for fragment headers"
        );
        assert!(
            len_bytes.is_multiple_of(8) && (8..=2048).contains(&len_bytes),
            "IPv6 extension header length {len_bytes} is not a multiple of 8 in 8..=2048"
        );
        let Ip::V6 { ext, .. } = &mut self.ip else {
            panic!("ipv6_ext on an IPv4 packet");
        };
        ext.push(Ext::Generic {
            kind: next_header_type,
            len: len_bytes,
        });
        self
    }

    /// Appends an IPv6 fragment header to the chain; `offset` is in 8-byte units. As with
    /// [`Pkt::ipv4_frag`], a non-zero offset drops the TCP/UDP header from the frame.
    pub fn ipv6_frag(mut self, more: bool, offset: u16, id: u32) -> Pkt {
        assert!(
            offset < 0x2000,
            "fragment offset {offset} does not fit in 13 bits"
        );
        let Ip::V6 { ext, .. } = &mut self.ip else {
            panic!("ipv6_frag on an IPv4 packet");
        };
        ext.push(Ext::Fragment { more, offset, id });
        self
    }

    fn tcp_only(&self, what: &str) {
        assert!(self.transport == Transport::Tcp, "{what} on a UDP packet");
    }

    pub fn flags(mut self, syn: bool, ack: bool, psh: bool, fin: bool, rst: bool) -> Pkt {
        self.tcp_only("flags");
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        self.flags = Some(
            bit(syn, TCP_SYN)
                | bit(ack, TCP_ACK)
                | bit(psh, TCP_PSH)
                | bit(fin, TCP_FIN)
                | bit(rst, TCP_RST),
        );
        self
    }

    /// A bare SYN, as opening a connection.
    pub fn syn(self) -> Pkt {
        self.flags(true, false, false, false, false)
    }

    pub fn seq(mut self, n: u32) -> Pkt {
        self.tcp_only("seq");
        self.seq = n;
        self.auto_seq = false;
        self
    }

    /// The acknowledgment number (sent as is, whatever the flags).
    pub fn ack(mut self, n: u32) -> Pkt {
        self.tcp_only("ack");
        self.ack = Some(n);
        self
    }

    /// Raw TCP flags (`TCP_SYN | TCP_ACK`, ...), for combinations `flags` does not name.
    pub fn tcp_flag_bits(mut self, bits: u8) -> Pkt {
        self.tcp_only("tcp_flag_bits");
        self.flags = Some(bits);
        self
    }

    pub fn seq_no(&self) -> u32 {
        self.seq
    }

    /// One frame per piece of `payload` cut at `cuts` (ascending offsets), each with the
    /// sequence number where its bytes sit in the stream: the next segment's seq is this
    /// one's plus its length, as a sender segmenting one write would send them.
    pub fn segments(&self, payload: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < payload.len()));
        bounds.push(payload.len());
        bounds
            .windows(2)
            .map(|w| {
                self.clone()
                    .seq(self.seq.wrapping_add(w[0] as u32))
                    .payload(&payload[w[0]..w[1]])
                    .build()
            })
            .collect()
    }

    /// Raw TCP options, padded with zero (end-of-options) to a multiple of 4 bytes.
    pub fn tcp_options(mut self, opts: &[u8]) -> Pkt {
        self.tcp_only("tcp_options");
        self.tcp_options = opts.to_vec();
        self.tcp_options.resize(opts.len().next_multiple_of(4), 0);
        assert!(self.tcp_options.len() <= 40, "TCP options exceed 40 bytes");
        self
    }

    pub fn payload(mut self, bytes: &[u8]) -> Pkt {
        self.payload = bytes.to_vec();
        self
    }

    /// Bytes after the IP datagram that its length does not cover, like the padding NICs
    /// leave on frames shorter than 60 bytes.
    pub fn trailer(mut self, bytes: &[u8]) -> Pkt {
        self.trailer = bytes.to_vec();
        self
    }

    fn tcp_flags(&self) -> u8 {
        self.flags.unwrap_or(if self.payload.is_empty() {
            TCP_ACK
        } else {
            TCP_ACK | TCP_PSH
        })
    }

    /// The L4 header and payload, checksum included.
    fn l4_bytes(&self) -> Vec<u8> {
        if self.ip.is_later_fragment() {
            return self.payload.clone();
        }
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let sum_at = match self.transport {
            Transport::Tcp => {
                let ack = self
                    .ack
                    .unwrap_or(u32::from(self.tcp_flags() & TCP_ACK != 0));
                let data_offset = (20 + self.tcp_options.len()) / 4;
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&ack.to_be_bytes());
                l4.push((data_offset as u8) << 4);
                l4.push(self.tcp_flags());
                l4.extend_from_slice(&u16::MAX.to_be_bytes()); // window
                l4.extend_from_slice(&[0; 4]); // checksum, urgent pointer
                l4.extend_from_slice(&self.tcp_options);
                16
            }
            Transport::Udp => {
                let len = u16::try_from(8 + self.payload.len()).expect("UDP datagram too long");
                l4.extend_from_slice(&len.to_be_bytes());
                l4.extend_from_slice(&[0; 2]);
                6
            }
        };
        l4.extend_from_slice(&self.payload);
        let proto = self.transport.proto();
        let mut sum = match &self.ip {
            Ip::V4 { src, dst, .. } => pseudo4_checksum(src, dst, proto, &l4),
            Ip::V6 { src, dst, .. } => pseudo6_checksum(src, dst, proto, &l4),
        };
        // In UDP a zero checksum means "none"; a computed zero is sent as all ones.
        if self.transport == Transport::Udp && sum == 0 {
            sum = 0xffff;
        }
        l4[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }

    /// The IP header, IPv4 options or IPv6 extension headers included.
    fn l3_bytes(&self, l4_len: usize) -> Vec<u8> {
        let proto = self.transport.proto();
        match &self.ip {
            Ip::V4 {
                src,
                dst,
                options,
                id,
                dont_fragment,
                more_fragments,
                frag_offset,
            } => {
                let hdr_len = 20 + options.len();
                let total = u16::try_from(hdr_len + l4_len).expect("IPv4 packet too long");
                let frag = u16::from(*dont_fragment) << 14
                    | u16::from(*more_fragments) << 13
                    | *frag_offset;
                let mut h = vec![0x40 | (hdr_len / 4) as u8, 0];
                h.extend_from_slice(&total.to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[self.ttl, proto, 0, 0]);
                h.extend_from_slice(src);
                h.extend_from_slice(dst);
                h.extend_from_slice(options);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h
            }
            Ip::V6 { src, dst, ext } => {
                let mut chain = Vec::new();
                for (i, e) in ext.iter().enumerate() {
                    let next = ext.get(i + 1).map_or(proto, Ext::kind);
                    chain.extend_from_slice(&ext_bytes(e, next));
                }
                let first = ext.first().map_or(proto, Ext::kind);
                let mut h = ipv6_header(chain.len() + l4_len, first, self.ttl, src, dst);
                h.extend_from_slice(&chain);
                h
            }
        }
    }

    fn assemble(&self) -> (Vec<u8>, Layout) {
        let l4 = self.l4_bytes();
        let l3 = self.l3_bytes(l4.len());
        let ethertype = match self.ip {
            Ip::V4 { .. } => ETH_P_IP,
            Ip::V6 { .. } => ETH_P_IPV6,
        };

        // Each tag's TPID sits where the ethertype would, so the outer TPID goes in the
        // Ethernet header and every tag carries the type of what follows it.
        let mut types = self.vlans.iter().map(|&(tpid, _)| tpid).chain([ethertype]);
        let mut f = eth_header(
            self.eth_dst,
            self.eth_src,
            types.next().unwrap_or(ethertype),
        );
        for (&(_, vid), inner) in self.vlans.iter().zip(types) {
            f.extend_from_slice(&vid.to_be_bytes());
            f.extend_from_slice(&inner.to_be_bytes());
        }

        let l3_off = f.len();
        let l4_off = l3_off + l3.len();
        let header_len = if self.ip.is_later_fragment() {
            0
        } else {
            l4.len() - self.payload.len()
        };
        let layout = Layout {
            l3: l3_off,
            l4: l4_off,
            payload: l4_off + header_len,
            ip_end: l4_off + l4.len(),
        };
        f.extend_from_slice(&l3);
        f.extend_from_slice(&l4);
        f.extend_from_slice(&self.trailer);
        (f, layout)
    }

    /// The complete Ethernet frame (no FCS). A TCP segment without an explicit `seq` gets
    /// the next sequence number of its 5-tuple (starting at 1000), so consecutive frames
    /// built for one connection sit one after the other in its byte stream, as the filter
    /// expects of a real sender. Building the same `Pkt` value twice numbers it twice; to
    /// resend a segment, run the same built frame again.
    pub fn build(&self) -> Vec<u8> {
        if self.auto_seq && self.transport == Transport::Tcp && !self.ip.is_later_fragment() {
            let mut p = self.clone();
            let flags = self.tcp_flags();
            let used = self.payload.len() as u32
                + u32::from(flags & TCP_SYN != 0)
                + u32::from(flags & TCP_FIN != 0);
            p.seq = next_seq(
                format!("{:?}/{}/{}", self.ip_pair(), self.sport, self.dport),
                used,
            );
            return p.assemble().0;
        }
        self.assemble().0
    }

    fn ip_pair(&self) -> String {
        match &self.ip {
            Ip::V4 { src, dst, .. } => format!("{src:?}>{dst:?}"),
            Ip::V6 { src, dst, .. } => format!("{src:?}>{dst:?}"),
        }
    }

    pub fn layout(&self) -> Layout {
        self.assemble().1
    }

    /// Offset of the TCP/UDP payload in the built frame. It does not depend on the
    /// payload, so it can be used to size one (see [`pad_request_to`]).
    pub fn payload_offset(&self) -> usize {
        self.layout().payload
    }

    pub fn l3_offset(&self) -> usize {
        self.layout().l3
    }

    pub fn l4_offset(&self) -> usize {
        self.layout().l4
    }
}

fn eth_header(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(MAX_FRAME_LEN);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn ipv6_header(
    payload_len: usize,
    next: u8,
    hop_limit: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> Vec<u8> {
    let len = u16::try_from(payload_len).expect("IPv6 payload too long");
    let mut h = vec![0x60, 0, 0, 0]; // version 6, no traffic class or flow label
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[next, hop_limit]);
    h.extend_from_slice(src);
    h.extend_from_slice(dst);
    h
}

fn ext_bytes(ext: &Ext, next: u8) -> Vec<u8> {
    match *ext {
        Ext::Fragment { more, offset, id } => {
            let mut h = vec![next, 0];
            h.extend_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
            h.extend_from_slice(&id.to_be_bytes());
            h
        }
        Ext::Generic { kind, len } => {
            // AH counts 4-byte units minus 2, everything else 8-byte units minus 1.
            let len_field = if kind == IPPROTO_AH {
                len / 4 - 2
            } else {
                len / 8 - 1
            };
            let mut h = vec![0; len];
            h[0] = next;
            h[1] = len_field as u8;
            match kind {
                IPPROTO_HOPOPTS | IPPROTO_DSTOPTS => fill_options(&mut h[2..]),
                // Experimental routing type (RFC 4727): any length is valid, unlike type 0
                // which must hold addresses; segments left 0 so receivers step over it.
                IPPROTO_ROUTING => h[2] = 253,
                _ => {}
            }
            h
        }
    }
}

/// Fills a zeroed option area with options receivers skip. Linux drops more than 7 bytes
/// of consecutive padding, so long areas use the experimental, skippable type 0x1e
/// (RFC 4727) and only the remainder is Pad1/PadN.
fn fill_options(mut area: &mut [u8]) {
    while !area.is_empty() {
        let take = match area.len() {
            1 => 1, // Pad1 is a single zero byte
            n @ 2..=7 => {
                area[0] = 1; // PadN
                area[1] = (n - 2) as u8;
                n
            }
            n => {
                let take = n.min(2 + 255);
                area[0] = 0x1e;
                area[1] = (take - 2) as u8;
                take
            }
        };
        area = &mut area[take..];
    }
}

/// The Internet checksum (RFC 1071) of `data`: the ones' complement of the ones'
/// complement sum of its 16-bit big-endian words. Over data that includes a correct
/// checksum field it yields 0.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo4_checksum(src: &[u8; 4], dst: &[u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let len = u16::try_from(l4.len()).expect("segment too long");
    let mut buf = Vec::with_capacity(12 + l4.len());
    buf.extend_from_slice(src);
    buf.extend_from_slice(dst);
    buf.extend_from_slice(&[0, proto]);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(l4);
    checksum(&buf)
}

fn pseudo6_checksum(src: &[u8; 16], dst: &[u8; 16], proto: u8, l4: &[u8]) -> u16 {
    let len = u32::try_from(l4.len()).expect("segment too long");
    let mut buf = Vec::with_capacity(40 + l4.len());
    buf.extend_from_slice(src);
    buf.extend_from_slice(dst);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, proto]);
    buf.extend_from_slice(l4);
    checksum(&buf)
}

/// An HTTP/1.1 request with `headers` in the given order (include `Host` if wanted) and no
/// body.
pub fn http_request(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        s.push_str(name);
        s.push_str(": ");
        s.push_str(value);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// Grows `req` to exactly `total_len` bytes by inserting an `X-Pad: aaa...` header right
/// after the request line, so the headers the test cares about move towards the end.
/// Panics if `total_len` leaves no room for the 9 bytes of an empty `X-Pad` header.
pub fn pad_request_to(req: Vec<u8>, total_len: usize) -> Vec<u8> {
    const NAME: &[u8] = b"X-Pad: ";
    let line_end = req
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("request has no request line")
        + 2;
    let min = req.len() + NAME.len() + 2;
    assert!(
        total_len >= min,
        "cannot pad a {}-byte request to {total_len} bytes (minimum {min})",
        req.len()
    );
    let mut out = Vec::with_capacity(total_len);
    out.extend_from_slice(&req[..line_end]);
    out.extend_from_slice(NAME);
    out.resize(out.len() + total_len - min, b'a');
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&req[line_end..]);
    out
}

// ---------------------------------------------------------------------------------------------
// TLS ClientHello
// ---------------------------------------------------------------------------------------------

pub const EXT_SERVER_NAME: u16 = 0;
pub const EXT_SUPPORTED_GROUPS: u16 = 10;
pub const EXT_EC_POINT_FORMATS: u16 = 11;
pub const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
pub const EXT_ALPN: u16 = 16;
pub const EXT_PADDING: u16 = 21;
pub const EXT_SESSION_TICKET: u16 = 35;
pub const EXT_SUPPORTED_VERSIONS: u16 = 43;
pub const EXT_PSK_KEY_EXCHANGE_MODES: u16 = 45;
pub const EXT_KEY_SHARE: u16 = 51;
/// The hybrid post-quantum group Chrome and Firefox send by default.
pub const GROUP_X25519MLKEM768: u16 = 0x11ec;
pub const GROUP_X25519: u16 = 0x001d;
/// Bytes of an X25519MLKEM768 client share (ML-KEM-768 key, then the X25519 key).
pub const X25519MLKEM768_SHARE_LEN: usize = 1216;

/// A GREASE value (RFC 8701): 0x0a0a, 0x1a1a, ... 0xfafa.
pub const fn grease(i: u8) -> u16 {
    let b = ((i & 0x0f) << 4) | 0x0a;
    u16::from_be_bytes([b, b])
}

/// A TLS 1.3 ClientHello as browsers send it, with the parts that move the SNI around made
/// optional. `record()` renders the whole TLS record (what the first TCP payload carries).
#[derive(Clone, Debug)]
pub struct ClientHello {
    /// The server_name host; None leaves the extension out.
    pub sni: Option<String>,
    /// GREASE cipher suite, groups, versions and two GREASE extensions (first and last).
    pub grease: bool,
    /// A padding extension (type 21) of this many zero bytes.
    pub padding: Option<usize>,
    /// A session_ticket extension carrying a ticket of this many bytes.
    pub session_ticket: Option<usize>,
    /// An X25519MLKEM768 key share (1216 bytes) before the X25519 one: the hello passes 1500
    /// bytes, so the SNI may land in the second segment.
    pub pq_key_share: bool,
    /// None: the builder's order (server_name first). Some(seed): a shuffle, as Chrome does.
    pub shuffle: Option<u64>,
    /// Puts server_name last (after the key share), so it lands in a second segment.
    pub sni_last: bool,
    /// Extensions appended as given (type, data).
    pub extra: Vec<(u16, Vec<u8>)>,
}

impl ClientHello {
    pub fn new(sni: &str) -> ClientHello {
        ClientHello {
            sni: Some(sni.to_owned()),
            grease: false,
            padding: None,
            session_ticket: None,
            pq_key_share: false,
            shuffle: None,
            sni_last: false,
            extra: Vec::new(),
        }
    }

    /// What a current Chrome sends: GREASE, a post-quantum key share, a session ticket,
    /// padding and a shuffled extension order.
    pub fn chrome_like(sni: &str, seed: u64) -> ClientHello {
        ClientHello {
            grease: true,
            padding: Some(200),
            session_ticket: Some(192),
            pq_key_share: true,
            shuffle: Some(seed),
            ..ClientHello::new(sni)
        }
    }

    /// The extensions in the order they are sent.
    pub fn extensions(&self) -> Vec<(u16, Vec<u8>)> {
        let mut exts: Vec<(u16, Vec<u8>)> = Vec::new();
        if let Some(host) = &self.sni {
            exts.push((EXT_SERVER_NAME, server_name_ext(host)));
        }
        let mut groups = Vec::new();
        if self.grease {
            groups.push(grease(2));
        }
        if self.pq_key_share {
            groups.push(GROUP_X25519MLKEM768);
        }
        groups.extend([GROUP_X25519, 0x0017, 0x0018]);
        exts.push((EXT_SUPPORTED_GROUPS, u16_list(&groups, 2)));
        exts.push((EXT_EC_POINT_FORMATS, vec![1, 0]));
        exts.push((
            EXT_SIGNATURE_ALGORITHMS,
            u16_list(
                &[
                    0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
                ],
                2,
            ),
        ));
        exts.push((EXT_ALPN, {
            let mut protos = Vec::new();
            for p in [&b"h2"[..], b"http/1.1"] {
                protos.push(p.len() as u8);
                protos.extend_from_slice(p);
            }
            with_len(&protos, 2)
        }));
        if let Some(n) = self.session_ticket {
            exts.push((
                EXT_SESSION_TICKET,
                (0..n).map(|i| (i * 7 + 3) as u8).collect(),
            ));
        }
        let mut versions = Vec::new();
        if self.grease {
            versions.push(grease(5));
        }
        versions.extend([0x0304, 0x0303]);
        exts.push((EXT_SUPPORTED_VERSIONS, u16_list(&versions, 1)));
        exts.push((EXT_PSK_KEY_EXCHANGE_MODES, vec![1, 1]));
        exts.push((EXT_KEY_SHARE, {
            let mut shares = Vec::new();
            if self.grease {
                shares.extend_from_slice(&grease(2).to_be_bytes());
                shares.extend_from_slice(&[0, 1, 0]);
            }
            if self.pq_key_share {
                shares.extend_from_slice(&GROUP_X25519MLKEM768.to_be_bytes());
                shares.extend_from_slice(&(X25519MLKEM768_SHARE_LEN as u16).to_be_bytes());
                shares.extend((0..X25519MLKEM768_SHARE_LEN).map(|i| (i * 31 + 11) as u8));
            }
            shares.extend_from_slice(&GROUP_X25519.to_be_bytes());
            shares.extend_from_slice(&32u16.to_be_bytes());
            shares.extend((0..32).map(|i| (i * 13 + 5) as u8));
            with_len(&shares, 2)
        }));
        exts.extend(self.extra.iter().cloned());
        if let Some(seed) = self.shuffle {
            // Fisher-Yates with a small deterministic generator, so a seed reproduces.
            let mut x = seed | 1;
            for i in (1..exts.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                exts.swap(i, (x % (i as u64 + 1)) as usize);
            }
        }
        if self.sni_last
            && let Some(i) = exts.iter().position(|e| e.0 == EXT_SERVER_NAME)
        {
            let sn = exts.remove(i);
            exts.push(sn);
        }
        if self.grease {
            exts.insert(0, (grease(10), Vec::new()));
            exts.push((grease(13), vec![0]));
        }
        // Padding goes last, as RFC 7685 clients place it.
        if let Some(n) = self.padding {
            exts.push((EXT_PADDING, vec![0; n]));
        }
        exts
    }

    /// The handshake message (type 1, 24-bit length, body).
    pub fn handshake(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&0x0303u16.to_be_bytes()); // legacy_version
        body.extend((0..32).map(|i| (i * 17 + 1) as u8)); // random
        body.push(32); // legacy_session_id
        body.extend((0..32).map(|i| (i * 3 + 9) as u8));
        let mut suites = Vec::new();
        if self.grease {
            suites.push(grease(7));
        }
        suites.extend([
            0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9,
        ]);
        body.extend_from_slice(&u16_list(&suites, 2));
        body.extend_from_slice(&[1, 0]); // compression: null
        let mut exts = Vec::new();
        for (t, data) in self.extensions() {
            exts.extend_from_slice(&t.to_be_bytes());
            exts.extend_from_slice(&with_len(&data, 2));
        }
        body.extend_from_slice(&with_len(&exts, 2));
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        hs
    }

    /// The TLS record (content type 22, record version TLS 1.0 as clients send it).
    pub fn record(&self) -> Vec<u8> {
        let hs = self.handshake();
        let mut r = vec![22, 3, 1];
        r.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        r.extend_from_slice(&hs);
        r
    }

    /// Offset of the server name's first byte within `record()`.
    pub fn sni_offset(&self) -> Option<usize> {
        let host = self.sni.as_ref()?;
        let rec = self.record();
        let ext = server_name_ext(host);
        // The extension header is type (0, 0) then its length, then the data.
        let mut needle = vec![0, 0];
        needle.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        needle.extend_from_slice(&ext);
        let at = rec
            .windows(needle.len())
            .position(|w| w == needle.as_slice())?;
        Some(at + 4 + 5)
    }
}

fn server_name_ext(host: &str) -> Vec<u8> {
    let mut entry = vec![0]; // host_name
    entry.extend_from_slice(&with_len(host.as_bytes(), 2));
    with_len(&entry, 2)
}

/// `data` behind its length in `width` bytes (1 or 2).
fn with_len(data: &[u8], width: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(width + data.len());
    match width {
        1 => v.push(u8::try_from(data.len()).expect("fits a byte")),
        _ => v.extend_from_slice(
            &u16::try_from(data.len())
                .expect("fits 16 bits")
                .to_be_bytes(),
        ),
    }
    v.extend_from_slice(data);
    v
}

fn u16_list(items: &[u16], len_width: usize) -> Vec<u8> {
    let bytes: Vec<u8> = items.iter().flat_map(|i| i.to_be_bytes()).collect();
    with_len(&bytes, len_width)
}

// ---------------------------------------------------------------------------------------------
// FIX
// ---------------------------------------------------------------------------------------------

pub const SOH: u8 = 0x01;

/// A FIX message: `8=begin|9=len|35=type|fields...|10=sum|` with SOH delimiters, BodyLength
/// counting from after its own field to the checksum field, and CheckSum the byte sum mod 256
/// of everything before it.
pub fn fix_message(begin: &str, msg_type: &str, fields: &[(u32, &str)]) -> Vec<u8> {
    let mut body = format!("35={msg_type}\x01").into_bytes();
    for (tag, value) in fields {
        body.extend_from_slice(format!("{tag}={value}\x01").as_bytes());
    }
    let mut m = format!("8={begin}\x019={}\x01", body.len()).into_bytes();
    m.extend_from_slice(&body);
    let sum = m.iter().map(|&b| u32::from(b)).sum::<u32>() % 256;
    m.extend_from_slice(format!("10={sum:03}\x01").as_bytes());
    m
}

/// A Logon (35=A) from `sender` with `username` (553) and a password (554), as an exchange
/// gateway expects it. `begin` is `FIX.4.2`, `FIX.4.4` or `FIXT.1.1` (which adds
/// DefaultApplVerID 1137=9).
pub fn fix_logon(begin: &str, sender: &str, username: Option<&str>) -> Vec<u8> {
    let mut fields: Vec<(u32, &str)> = vec![
        (49, sender),
        (56, "EXCHANGE"),
        (34, "1"),
        (52, "20261123-23:59:59.123"),
        (98, "0"),
        (108, "30"),
        (141, "Y"),
    ];
    if let Some(u) = username {
        fields.push((553, u));
        fields.push((554, "s3cr3t-passw0rd"));
    }
    if begin == "FIXT.1.1" {
        fields.push((1137, "9"));
    }
    fix_message(begin, "A", &fields)
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol
// ---------------------------------------------------------------------------------------------

/// The 12-byte signature that starts a PROXY v2 header.
pub const PROXY_V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// One connection's addresses as a proxy reports them (client first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxiedConn {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// `PROXY TCP4 a b sp dp\r\n` (TCP6 for IPv6); `None`: `PROXY UNKNOWN\r\n`.
pub fn proxy_v1(conn: Option<ProxiedConn>) -> Vec<u8> {
    match conn {
        None => b"PROXY UNKNOWN\r\n".to_vec(),
        Some(c) => {
            let fam = if c.src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                c.src, c.dst, c.sport, c.dport
            )
            .into_bytes()
        }
    }
}

/// A PROXY v2 header. `conn: None` makes a LOCAL command (health checks: the connection's
/// own addresses count); otherwise PROXY over TCP with the addresses, then the TLVs
/// (type, value).
pub fn proxy_v2(conn: Option<ProxiedConn>, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut h = PROXY_V2_SIG.to_vec();
    let mut body = Vec::new();
    match conn {
        None => {
            h.push(0x20); // version 2, LOCAL
            h.push(0x00); // AF_UNSPEC
        }
        Some(c) => {
            h.push(0x21); // version 2, PROXY
            match (c.src, c.dst) {
                (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                    h.push(0x11); // AF_INET, STREAM
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                }
                (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                    h.push(0x21); // AF_INET6, STREAM
                    body.extend_from_slice(&s.octets());
                    body.extend_from_slice(&d.octets());
                }
                _ => panic!("PROXY v2 addresses of mixed families"),
            }
            body.extend_from_slice(&c.sport.to_be_bytes());
            body.extend_from_slice(&c.dport.to_be_bytes());
        }
    }
    for (t, v) in tlvs {
        body.push(*t);
        body.extend_from_slice(&(v.len() as u16).to_be_bytes());
        body.extend_from_slice(v);
    }
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

/// PROXY v2 TLV types haproxy sends.
pub const PP2_TYPE_ALPN: u8 = 0x01;
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
pub const PP2_TYPE_SSL: u8 = 0x20;

/// Offsets, 5-tuple, sequence number and flags of a TCP segment, when the frame is plain
/// enough: Ethernet, up to two VLAN tags, IPv4 (not a fragment) or IPv6 with TCP right after
/// its header.
#[allow(clippy::type_complexity)]
fn tcp_segment(frame: &[u8]) -> Option<(usize, usize, usize, Vec<u8>, u32, u8)> {
    let mut off = 12;
    let mut et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    while et == 0x8100 || et == 0x88a8 {
        off += 4;
        et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
    }
    let l3 = off + 2;
    let (l4, tuple) = match et {
        0x0800 => {
            let ihl = (*frame.get(l3)? as usize & 0xf) * 4;
            let frag = u16::from_be_bytes(frame.get(l3 + 6..l3 + 8)?.try_into().ok()?);
            if *frame.get(l3 + 9)? != 6 || frag & 0x3fff != 0 {
                return None;
            }
            (l3 + ihl, frame.get(l3 + 12..l3 + 20)?.to_vec())
        }
        0x86dd => {
            // Hop-by-hop, routing and destination options may come first; a fragment not.
            let (mut nh, mut at) = (*frame.get(l3 + 6)?, l3 + 40);
            while matches!(nh, 0 | 43 | 60) {
                nh = *frame.get(at)?;
                at += (*frame.get(at + 1)? as usize + 1) * 8;
            }
            if nh != 6 {
                return None;
            }
            (at, frame.get(l3 + 8..l3 + 40)?.to_vec())
        }
        _ => return None,
    };
    let doff = (*frame.get(l4 + 12)? as usize >> 4) * 4;
    let flags = *frame.get(l4 + 13)?;
    let mut t = tuple;
    t.extend_from_slice(frame.get(l4..l4 + 4)?);
    let seq = u32::from_be_bytes(frame.get(l4 + 4..l4 + 8)?.try_into().ok()?);
    Some((l3, l4, doff, t, seq, flags))
}

/// The 5-tuple (addresses and ports) of a TCP segment, for frames [`syn_for`] can read.
pub fn tcp_tuple(frame: &[u8]) -> Option<Vec<u8>> {
    tcp_segment(frame).map(|d| d.3)
}

/// The SYN that opened the connection of a TCP data segment, as a client sends it: the same
/// headers, no payload, ISN = the segment's sequence number - 1. `None` for frames it cannot
/// rebuild (fragments, no ACK, a SYN or RST, no payload).
pub fn syn_for(frame: &[u8]) -> Option<Vec<u8>> {
    let (l3, l4, doff, _, seq, flags) = tcp_segment(frame)?;
    if flags & (TCP_SYN | TCP_RST) != 0 || flags & TCP_ACK == 0 || frame.len() <= l4 + doff {
        return None;
    }
    let mut f = frame[..l4 + doff].to_vec();
    f[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_sub(1).to_be_bytes());
    f[l4 + 8..l4 + 12].copy_from_slice(&[0; 4]);
    f[l4 + 13] = TCP_SYN;
    f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    if f[l3] >> 4 == 4 {
        let total = (f.len() - l3) as u16;
        f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let ihl = (f[l3] as usize & 0xf) * 4;
        let c = checksum(&f[l3..l3 + ihl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        let (src, dst): ([u8; 4], [u8; 4]) = (
            f[l3 + 12..l3 + 16].try_into().unwrap(),
            f[l3 + 16..l3 + 20].try_into().unwrap(),
        );
        let c = pseudo4_checksum(&src, &dst, 6, &f[l4..]);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    } else {
        let plen = (f.len() - l3 - 40) as u16;
        f[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        let (src, dst): ([u8; 16], [u8; 16]) = (
            f[l3 + 8..l3 + 24].try_into().unwrap(),
            f[l3 + 24..l3 + 40].try_into().unwrap(),
        );
        let c = pseudo6_checksum(&src, &dst, 6, &f[l4..]);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A4: [u8; 4] = [192, 0, 2, 1];
    const B4: [u8; 4] = [198, 51, 100, 7];
    const A6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
    ];
    const B6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
    ];

    fn be16(f: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([f[at], f[at + 1]])
    }

    /// Recomputes the L4 checksum from the frame alone: the sum over pseudo-header and
    /// segment must come out as zero.
    fn l4_checksum_ok(f: &[u8], lay: Layout, proto: u8) -> bool {
        let seg = &f[lay.l4..lay.ip_end];
        let mut pseudo = Vec::new();
        match f[lay.l3] >> 4 {
            4 => {
                pseudo.extend_from_slice(&f[lay.l3 + 12..lay.l3 + 20]);
                pseudo.extend_from_slice(&[0, proto]);
                pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            }
            6 => {
                pseudo.extend_from_slice(&f[lay.l3 + 8..lay.l3 + 40]);
                pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, proto]);
            }
            v => panic!("IP version {v}"),
        }
        pseudo.extend_from_slice(seg);
        checksum(&pseudo) == 0
    }

    #[test]
    fn checksum_matches_reference() {
        // The worked example from the Wikipedia article on the IPv4 header checksum.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
        // An odd trailing byte is padded with zero.
        assert_eq!(checksum(&[0x01]), !0x0100);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn tcp4_defaults() {
        let p = Pkt::tcp4(A4, B4, 40000, 443).payload(b"hello");
        let f = p.build();
        assert_eq!(f.len(), 14 + 20 + 20 + 5);
        assert_eq!(&f[..6], &ETH_DST);
        assert_eq!(&f[6..12], &ETH_SRC);
        assert_eq!(be16(&f, 12), ETH_P_IP);
        assert_eq!(f[14], 0x45);
        assert_eq!(be16(&f, 16) as usize, f.len() - 14);
        assert_eq!(be16(&f, 20), 0x4000, "DF set, no fragment");
        assert_eq!(f[22], 64);
        assert_eq!(f[23], IPPROTO_TCP);
        assert_eq!(&f[26..30], &A4);
        assert_eq!(&f[30..34], &B4);
        assert_eq!(be16(&f, 34), 40000);
        assert_eq!(be16(&f, 36), 443);
        assert_eq!(f[46] >> 4, 5);
        assert_eq!(f[47], TCP_ACK | TCP_PSH);
        assert_eq!(p.payload_offset(), 54);
        assert_eq!(&f[54..], b"hello");
        assert_eq!(
            p.layout(),
            Layout {
                l3: 14,
                l4: 34,
                payload: 54,
                ip_end: 59
            }
        );
    }

    #[test]
    fn tcp_flags_and_seq() {
        let f = Pkt::tcp4(A4, B4, 1, 2).build();
        assert_eq!(f[47], TCP_ACK, "no payload: bare ACK");
        let f = Pkt::tcp4(A4, B4, 1, 2).syn().seq(0xdead_beef).build();
        assert_eq!(f[47], TCP_SYN);
        assert_eq!(&f[38..42], &0xdead_beefu32.to_be_bytes());
        assert_eq!(&f[42..46], &[0; 4], "no ACK flag, no ack number");
        let f = Pkt::tcp4(A4, B4, 1, 2)
            .flags(false, true, false, true, true)
            .build();
        assert_eq!(f[47], TCP_ACK | TCP_FIN | TCP_RST);
        // Explicit flags win over the payload-based default.
        let f = Pkt::tcp4(A4, B4, 1, 2)
            .flags(false, true, false, false, false)
            .payload(b"x")
            .build();
        assert_eq!(f[47], TCP_ACK);
    }

    #[test]
    fn qinq_tags_in_order() {
        let p = Pkt::tcp4(A4, B4, 1, 443)
            .vlan(0x88a8, 100)
            .vlan(0x8100, 200)
            .payload(b"x");
        let f = p.build();
        assert_eq!(be16(&f, 12), 0x88a8);
        assert_eq!(be16(&f, 14), 100);
        assert_eq!(be16(&f, 16), 0x8100);
        assert_eq!(be16(&f, 18), 200);
        assert_eq!(be16(&f, 20), ETH_P_IP);
        assert_eq!(
            p.layout(),
            Layout {
                l3: 22,
                l4: 42,
                payload: 62,
                ip_end: 63
            }
        );
        assert_eq!(f.len(), 63);
        assert_eq!(be16(&f, 22 + 2), 41, "IP length excludes the tags");
    }

    #[test]
    fn single_vlan_v6() {
        let p = Pkt::tcp6(A6, B6, 1, 443).vlan(0x8100, 4095);
        let f = p.build();
        assert_eq!(be16(&f, 12), 0x8100);
        assert_eq!(be16(&f, 14), 4095);
        assert_eq!(be16(&f, 16), ETH_P_IPV6);
        assert_eq!(p.payload_offset(), 18 + 40 + 20);
    }

    #[test]
    fn ipv4_options_padded() {
        let p = Pkt::tcp4(A4, B4, 1, 443)
            .ipv4_options(&[0x94, 0x04, 0, 0, 0x01])
            .payload(b"abc");
        let f = p.build();
        assert_eq!(f[14] & 0x0f, 7, "5 option bytes pad to 8");
        assert_eq!(&f[34..42], &[0x94, 0x04, 0, 0, 0x01, 0, 0, 0]);
        assert_eq!(
            p.layout(),
            Layout {
                l3: 14,
                l4: 42,
                payload: 62,
                ip_end: 65
            }
        );
        assert_eq!(be16(&f, 16), 28 + 20 + 3);
        assert_eq!(checksum(&f[14..42]), 0);
        assert!(l4_checksum_ok(&f, p.layout(), IPPROTO_TCP));

        let full = Pkt::tcp4(A4, B4, 1, 443).ipv4_options(&[1; 40]).build();
        assert_eq!(full[14] & 0x0f, 15);
    }

    #[test]
    #[should_panic(expected = "exceed 40")]
    fn ipv4_options_too_long() {
        let _ = Pkt::tcp4(A4, B4, 1, 443).ipv4_options(&[1; 41]);
    }

    #[test]
    fn ipv4_header_checksum() {
        for p in [
            Pkt::tcp4(A4, B4, 1, 443),
            Pkt::tcp4([255; 4], [255; 4], 1, 443)
                .ttl(255)
                .payload(&[0xff; 999]),
            Pkt::udp4(A4, B4, 53, 53).ipv4_id(0xffff),
        ] {
            let f = p.build();
            assert_ne!(be16(&f, 24), 0);
            assert_eq!(checksum(&f[14..34]), 0);
        }
    }

    #[test]
    fn tcp_checksums_v4_and_v6() {
        // Odd and even payload lengths, options, and an extension chain all in the sum.
        let req = http_request("GET", "/", &[("Host", "example.com")]);
        let odd = [req.as_slice(), b"!"].concat();
        let pkts = [
            Pkt::tcp4(A4, B4, 40000, 443).payload(&req),
            Pkt::tcp4(A4, B4, 40000, 443)
                .payload(&odd)
                .tcp_options(&[2, 4, 5, 0xb4, 1, 3, 3, 7]),
            Pkt::tcp4(A4, B4, 40000, 443).syn(),
            Pkt::tcp6(A6, B6, 40000, 443).payload(&req),
            Pkt::tcp6(A6, B6, 40000, 443)
                .payload(&odd)
                .ipv6_ext(0, 8)
                .ipv6_ext(60, 16),
            Pkt::tcp6([0xff; 16], [0xff; 16], 65535, 65535).payload(&[0xff; 1001]),
        ];
        for p in pkts {
            let f = p.build();
            let lay = p.layout();
            assert_eq!(lay.ip_end, f.len());
            assert!(l4_checksum_ok(&f, lay, IPPROTO_TCP), "{p:?}");
            assert!(be16(&f, lay.l4 + 16) != 0);
        }
    }

    #[test]
    fn udp_lengths_and_checksums() {
        let p = Pkt::udp4(A4, B4, 5353, 53).payload(b"query");
        let f = p.build();
        assert_eq!(f[23], IPPROTO_UDP);
        assert_eq!(be16(&f, 20), 0, "no DF for UDP");
        assert_eq!(be16(&f, 38), 13);
        assert_eq!(p.payload_offset(), 42);
        assert!(l4_checksum_ok(&f, p.layout(), IPPROTO_UDP));

        let p = Pkt::udp6(A6, B6, 5353, 53).payload(b"query?");
        let f = p.build();
        assert_eq!(f[20], IPPROTO_UDP);
        assert_eq!(p.payload_offset(), 62);
        assert!(l4_checksum_ok(&f, p.layout(), IPPROTO_UDP));
    }

    #[test]
    fn tcp_options_set_data_offset() {
        let p = Pkt::tcp6(A6, B6, 1, 443)
            .tcp_options(&[2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1])
            .payload(b"x");
        let f = p.build();
        let l4 = p.l4_offset();
        assert_eq!(f[l4 + 12] >> 4, 10, "17 option bytes pad to 20");
        assert_eq!(p.payload_offset(), l4 + 40);
        assert_eq!(&f[p.payload_offset()..], b"x");
    }

    #[test]
    fn ipv6_extension_chain() {
        let p = Pkt::tcp6(A6, B6, 1, 443)
            .ipv6_ext(0, 8)
            .ipv6_ext(60, 24)
            .ipv6_ext(43, 16)
            .ipv6_ext(51, 24)
            .payload(b"GET");
        let f = p.build();
        let l3 = 14;
        assert_eq!(f[l3] >> 4, 6);
        assert_eq!(f[l3 + 6], 0, "first header: hop-by-hop");
        assert_eq!(f[l3 + 7], 64);
        let mut at = l3 + 40;
        for (next, len_field, len) in [(60, 0, 8), (43, 2, 24), (51, 1, 16), (IPPROTO_TCP, 4, 24)] {
            assert_eq!((f[at], f[at + 1]), (next, len_field), "header at {at}");
            at += len;
        }
        let rh = l3 + 40 + 8 + 24;
        assert_eq!(
            (f[rh + 2], f[rh + 3]),
            (253, 0),
            "routing: experimental type, segments left 0"
        );
        assert_eq!(p.l4_offset(), at);
        assert_eq!(p.payload_offset(), at + 20);
        assert_eq!(be16(&f, l3 + 4) as usize, f.len() - l3 - 40);
        assert!(l4_checksum_ok(&f, p.layout(), IPPROTO_TCP));
    }

    /// Walks a hop-by-hop/destination options area as a receiver would.
    fn options_valid(area: &[u8]) -> bool {
        let mut i = 0;
        while i < area.len() {
            match area[i] {
                0 => i += 1,
                t => {
                    let Some(&len) = area.get(i + 1) else {
                        return false;
                    };
                    let padn_ok = t != 1 || len <= 5;
                    if !padn_ok || t & 0xc0 != 0 {
                        return false; // over-long padding or an option that is not skipped
                    }
                    i += 2 + len as usize;
                }
            }
        }
        i == area.len()
    }

    #[test]
    fn ipv6_option_headers_are_well_formed() {
        for len in (8..=2048).step_by(8) {
            let p = Pkt::tcp6(A6, B6, 1, 443).ipv6_ext(60, len);
            let f = p.build();
            assert_eq!(p.l4_offset(), 14 + 40 + len);
            assert_eq!((f[55] as usize + 1) * 8, len);
            assert!(options_valid(&f[56..54 + len]), "len {len}");
        }
    }

    #[test]
    #[should_panic(expected = "multiple of 8")]
    fn ipv6_ext_bad_length() {
        let _ = Pkt::tcp6(A6, B6, 1, 443).ipv6_ext(0, 12);
    }

    #[test]
    fn ipv4_fragments() {
        // First fragment: TCP header present, MF set, DF cleared.
        let p = Pkt::tcp4(A4, B4, 40000, 443)
            .ipv4_frag(true, 0)
            .payload(b"GET / HT");
        let f = p.build();
        assert_eq!(be16(&f, 20), 0x2000);
        assert_eq!(be16(&f, 36), 443);
        assert_eq!(p.payload_offset(), 54);

        // Later fragment: the payload follows the IP header directly.
        let p = Pkt::tcp4(A4, B4, 40000, 443)
            .ipv4_frag(false, 185)
            .payload(b"TP/1.1\r\n");
        let f = p.build();
        assert_eq!(be16(&f, 20), 185);
        assert_eq!(
            p.layout(),
            Layout {
                l3: 14,
                l4: 34,
                payload: 34,
                ip_end: 42
            }
        );
        assert_eq!(&f[34..], b"TP/1.1\r\n");
        assert_eq!(be16(&f, 16), 28);
        assert_eq!(checksum(&f[14..34]), 0);
    }

    #[test]
    fn ipv6_fragments() {
        let p = Pkt::tcp6(A6, B6, 40000, 443)
            .ipv6_ext(0, 8)
            .ipv6_frag(true, 0, 0xabcd_ef01)
            .payload(b"x");
        let f = p.build();
        let fh = 14 + 40 + 8;
        assert_eq!(
            f[14 + 40],
            IPPROTO_FRAGMENT,
            "hop-by-hop points at the fragment header"
        );
        assert_eq!(f[fh], IPPROTO_TCP);
        assert_eq!(be16(&f, fh + 2), 1, "offset 0, M set");
        assert_eq!(&f[fh + 4..fh + 8], &0xabcd_ef01u32.to_be_bytes());
        assert_eq!(p.l4_offset(), fh + 8);
        assert_eq!(be16(&f, fh + 8 + 2), 443);

        let p = Pkt::tcp6(A6, B6, 40000, 443)
            .ipv6_frag(false, 3, 7)
            .payload(b"rest");
        let f = p.build();
        assert_eq!(f[20], IPPROTO_FRAGMENT);
        assert_eq!(be16(&f, 54 + 2), 3 << 3);
        assert_eq!(
            p.layout(),
            Layout {
                l3: 14,
                l4: 62,
                payload: 62,
                ip_end: 66
            }
        );
        assert_eq!(be16(&f, 18), 12);
    }

    #[test]
    fn trailer_is_outside_the_datagram() {
        let p = Pkt::tcp4(A4, B4, 1, 443).trailer(&[0; 6]);
        let f = p.build();
        assert_eq!(f.len(), 60);
        assert_eq!(p.layout().ip_end, 54);
        assert_eq!(be16(&f, 16), 40);
        assert!(l4_checksum_ok(&f, p.layout(), IPPROTO_TCP));
    }

    #[test]
    fn arp_and_ndp() {
        let a = Pkt::arp();
        assert_eq!(a.len(), 42);
        assert_eq!(be16(&a, 12), ETH_P_ARP);
        assert_eq!(&a[..6], &[0xff; 6]);

        let target = B6;
        let ns = Pkt::icmp6_ns(A6, target);
        assert_eq!(ns.len(), 14 + 40 + 32);
        assert_eq!(&ns[..6], &[0x33, 0x33, 0xff, 0, 0x12, 0x34]);
        assert_eq!(be16(&ns, 12), ETH_P_IPV6);
        assert_eq!((ns[20], ns[21]), (IPPROTO_ICMPV6, 255));
        assert_eq!(
            &ns[38..54],
            &[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0x12, 0x34]
        );
        assert_eq!(ns[54], 135);
        assert_eq!(&ns[62..78], &target);
        let lay = Layout {
            l3: 14,
            l4: 54,
            payload: 54,
            ip_end: ns.len(),
        };
        assert!(l4_checksum_ok(&ns, lay, IPPROTO_ICMPV6));
    }

    #[test]
    fn http_request_format() {
        let r = http_request(
            "POST",
            "/api/v3/order",
            &[("Host", "api.example.com"), ("X-MBX-APIKEY", "k")],
        );
        assert_eq!(
            r,
            b"POST /api/v3/order HTTP/1.1\r\nHost: api.example.com\r\nX-MBX-APIKEY: k\r\n\r\n"
        );
        assert_eq!(http_request("GET", "/", &[]), b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn pad_request_exact_length() {
        let req = http_request("GET", "/x", &[("Host", "h"), ("X-MBX-APIKEY", "key")]);
        let min = req.len() + 9;
        for total in [min, min + 1, min + 100, 1460] {
            let padded = pad_request_to(req.clone(), total);
            assert_eq!(padded.len(), total);
            assert!(padded.starts_with(b"GET /x HTTP/1.1\r\nX-Pad: "));
            assert!(padded.ends_with(b"\r\nHost: h\r\nX-MBX-APIKEY: key\r\n\r\n"));
        }
        assert!(pad_request_to(req, min).starts_with(b"GET /x HTTP/1.1\r\nX-Pad: \r\nHost"));
    }

    #[test]
    #[should_panic(expected = "cannot pad")]
    fn pad_request_too_short() {
        let req = http_request("GET", "/", &[]);
        let len = req.len();
        let _ = pad_request_to(req, len + 8);
    }

    #[test]
    fn full_size_frames() {
        let req = http_request("GET", "/", &[("X-MBX-APIKEY", "key")]);
        for pkt in [
            Pkt::tcp4(A4, B4, 40000, 443),
            Pkt::tcp4(A4, B4, 40000, 443)
                .vlan(0x88a8, 1)
                .vlan(0x8100, 2)
                .ipv4_options(&[1; 12]),
            Pkt::tcp6(A6, B6, 40000, 443)
                .ipv6_ext(0, 8)
                .tcp_options(&[1; 12]),
        ] {
            let body = pad_request_to(req.clone(), MAX_FRAME_LEN - pkt.payload_offset());
            let f = pkt.payload(&body).build();
            assert_eq!(f.len(), MAX_FRAME_LEN);
            assert!(f.ends_with(b"X-MBX-APIKEY: key\r\n\r\n"));
        }
    }

    /// Walks a ClientHello record the way a server does and returns the server name and
    /// the extension types in order.
    fn parse_hello(r: &[u8]) -> (Option<String>, Vec<u16>) {
        assert_eq!(&r[..3], &[22, 3, 1]);
        assert_eq!(be16(r, 3) as usize, r.len() - 5, "record length");
        let hs = &r[5..];
        assert_eq!(hs[0], 1);
        let hs_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
        assert_eq!(hs_len, hs.len() - 4, "handshake length");
        let b = &hs[4..];
        let mut at = 2 + 32;
        at += 1 + b[at] as usize; // session id
        at += 2 + be16(b, at) as usize; // cipher suites
        at += 1 + b[at] as usize; // compression
        let ext_len = be16(b, at) as usize;
        at += 2;
        assert_eq!(at + ext_len, b.len(), "extensions length");
        let (mut sni, mut types) = (None, Vec::new());
        while at < b.len() {
            let (t, len) = (be16(b, at), be16(b, at + 2) as usize);
            let data = &b[at + 4..at + 4 + len];
            if t == EXT_SERVER_NAME {
                assert_eq!(be16(data, 0) as usize, len - 2);
                assert_eq!(data[2], 0);
                let n = be16(data, 3) as usize;
                sni = Some(String::from_utf8(data[5..5 + n].to_vec()).unwrap());
            }
            types.push(t);
            at += 4 + len;
        }
        (sni, types)
    }

    #[test]
    fn client_hello_is_well_formed() {
        let h = ClientHello::new("k-37c541a1.api.example.com");
        let (sni, types) = parse_hello(&h.record());
        assert_eq!(sni.as_deref(), Some("k-37c541a1.api.example.com"));
        assert_eq!(types[0], EXT_SERVER_NAME);
        let off = h.sni_offset().unwrap();
        assert_eq!(&h.record()[off..off + 10], b"k-37c541a1");

        let c = ClientHello::chrome_like("k-37c541a1.api.example.com", 7);
        let rec = c.record();
        assert!(rec.len() > 1500, "{} bytes", rec.len());
        let (sni, types) = parse_hello(&rec);
        assert_eq!(sni.as_deref(), Some("k-37c541a1.api.example.com"));
        assert_eq!(types[0], grease(10));
        assert_eq!(*types.last().unwrap(), EXT_PADDING);
        assert!(types.contains(&EXT_SESSION_TICKET) && types.contains(&EXT_KEY_SHARE));
        // Other seeds give other orders.
        let orders: std::collections::BTreeSet<Vec<u16>> = (1..6)
            .map(|s| parse_hello(&ClientHello::chrome_like("a.b", s).record()).1)
            .collect();
        assert!(orders.len() > 1);
        // sni_last puts the name past the big key share, beyond the first full segment.
        let late = ClientHello {
            sni_last: true,
            ..c
        };
        assert!(late.sni_offset().unwrap() > 1460);
        assert_eq!(
            parse_hello(&late.record()).0.as_deref(),
            Some("k-37c541a1.api.example.com")
        );
        assert_eq!(
            ClientHello {
                sni: None,
                ..ClientHello::new("x")
            }
            .sni_offset(),
            None
        );
    }

    #[test]
    fn segments_carry_consecutive_sequence_numbers() {
        let p = Pkt::tcp4(A4, B4, 40000, 443).seq(0xffff_fff0);
        let data: Vec<u8> = (0..100u8).collect();
        let segs = p.segments(&data, &[30, 70]);
        assert_eq!(segs.len(), 3);
        let lay = p.layout();
        let seq = |f: &[u8]| u32::from_be_bytes(f[lay.l4 + 4..lay.l4 + 8].try_into().unwrap());
        assert_eq!(seq(&segs[0]), 0xffff_fff0);
        assert_eq!(seq(&segs[1]), 0xffff_fff0u32.wrapping_add(30));
        assert_eq!(seq(&segs[2]), 0xffff_fff0u32.wrapping_add(70));
        assert_eq!(&segs[1][lay.payload..], &data[30..70]);
        for f in &segs {
            let lay = Layout {
                ip_end: f.len(),
                ..lay
            };
            assert!(l4_checksum_ok(f, lay, IPPROTO_TCP));
        }
        let f = Pkt::tcp4(A4, B4, 1, 2).ack(0x1234_5678).build();
        assert_eq!(&f[42..46], &0x1234_5678u32.to_be_bytes());
    }

    #[test]
    fn fix_messages_have_correct_length_and_checksum() {
        for begin in ["FIX.4.2", "FIX.4.4", "FIXT.1.1"] {
            let m = fix_logon(begin, "SENDER1", Some("37c541a1deadbeef"));
            let s = String::from_utf8(m.clone()).unwrap();
            let fields: Vec<&str> = s.trim_end_matches('\x01').split('\x01').collect();
            assert_eq!(fields[0], format!("8={begin}"));
            assert_eq!(fields[2], "35=A");
            assert!(fields.contains(&"553=37c541a1deadbeef"));
            assert_eq!(fields.contains(&"1137=9"), begin == "FIXT.1.1");
            // BodyLength: from after the 9= field up to the 10= field.
            let body_start = fields[0].len() + fields[1].len() + 2;
            let sum_at = s.rfind("10=").unwrap();
            let len: usize = fields[1][2..].parse().unwrap();
            assert_eq!(len, sum_at - body_start);
            let sum: u32 = m[..sum_at].iter().map(|&b| u32::from(b)).sum::<u32>() % 256;
            assert_eq!(fields.last().unwrap(), &format!("10={sum:03}"));
        }
        // A known message: the bytes of "8=FIX.4.2|9=5|35=0|" sum to 929, and 929 % 256 = 161.
        assert_eq!(
            fix_message("FIX.4.2", "0", &[]),
            b"8=FIX.4.2\x019=5\x0135=0\x0110=161\x01"
        );
    }

    #[test]
    fn proxy_headers() {
        let c = ProxiedConn {
            src: "198.51.100.7".parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            sport: 40000,
            dport: 8080,
        };
        assert_eq!(
            proxy_v1(Some(c)),
            b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 8080\r\n"
        );
        let c6 = ProxiedConn {
            src: "2001:db8::9".parse().unwrap(),
            dst: "2001:db8::1".parse().unwrap(),
            ..c
        };
        assert_eq!(
            proxy_v1(Some(c6)),
            b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 8080\r\n"
        );
        let v2 = proxy_v2(Some(c), &[(PP2_TYPE_AUTHORITY, b"api.example".to_vec())]);
        assert_eq!(&v2[..12], &PROXY_V2_SIG);
        assert_eq!((v2[12], v2[13]), (0x21, 0x11));
        assert_eq!(be16(&v2, 14) as usize, v2.len() - 16);
        assert_eq!(&v2[16..20], &[198, 51, 100, 7]);
        assert_eq!(be16(&v2, 24), 40000);
        assert_eq!(&v2[28..], b"\x02\x00\x0bapi.example");
        let v2 = proxy_v2(Some(c6), &[]);
        assert_eq!((v2[13], be16(&v2, 14)), (0x21, 36));
        let local = proxy_v2(None, &[]);
        assert_eq!(&local[12..], &[0x20, 0, 0, 0]);
    }
}
