//! Types shared by the XDP program (filter-ebpf) and the loader (filter-user).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel maps store these bytes as they are.
//! Policy is double-buffered: every policy record exists once per *slot* (0 or 1), and the
//! program reads only the slot named by [`Control::active_slot`]. The loader writes the
//! inactive slot, then flips one word, so no packet ever sees a half-applied policy.
#![no_std]

/// Bytes of an API key that identify it (settings.key_prefix_len is 4..=16).
pub const MAX_PREFIX_LEN: usize = 16;
/// IPv4 hosts a key record carries inline, so the common case needs no second lookup.
pub const INLINE_V4: usize = 4;
/// Address sets a key can reference: its own overflow set plus bound ipsets.
pub const MAX_SETS: usize = 4;
/// Header names per http-header listener.
pub const MAX_HEADERS: usize = 4;
/// Longest header name, colon included, that a listener can match.
pub const MAX_HEADER_NAME: usize = 24;
/// Distinct prefix lengths per address family in one set (kept small so the probe loop is short).
pub const MAX_PLENS: usize = 8;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Map names, shared so the loader and the program never disagree.
pub mod maps {
    pub const CONTROL: &str = "KW_CONTROL";
    pub const SETTINGS: &str = "KW_SETTINGS";
    pub const LISTENERS: &str = "KW_LISTENERS";
    pub const LISTENER_INDEX: &str = "KW_LISTENER_INDEX";
    pub const KEYS: &str = "KW_KEYS";
    pub const SETS: &str = "KW_SETS";
    pub const ALLOW: &str = "KW_ALLOW";
    pub const FLOWS: &str = "KW_FLOWS";
    pub const REASONS: &str = "KW_REASONS";
    pub const KEY_STATS: &str = "KW_KEY_STATS";
    pub const PREFILTER: &str = "KW_PREFILTER";
    pub const EVENTS: &str = "KW_EVENTS";
    pub const TLS_PENDING: &str = "KW_TLS_PENDING";
    pub const HELD: &str = "KW_HELD";
    /// One `u32`: the daemon's `KEYWALL_HELD_IDLE_SECS` (0 until a daemon wrote it).
    pub const HELD_IDLE: &str = "KW_HELD_IDLE";
    /// Per-key activity (issue 13), indexed like `KW_KEY_STATS`.
    pub const ACTIVITY: &str = "KW_ACTIVITY";
    /// Per-key rate limits and their state (issue 13), only for limited keys.
    pub const RATE: &str = "KW_RATE";
    pub const ALL: [&str; 16] = [
        CONTROL,
        SETTINGS,
        LISTENERS,
        LISTENER_INDEX,
        KEYS,
        SETS,
        ALLOW,
        FLOWS,
        REASONS,
        KEY_STATS,
        PREFILTER,
        EVENTS,
        TLS_PENDING,
        HELD,
        ACTIVITY,
        RATE,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "keywall";
/// A program in the same object that only returns XDP_PASS (the benchmark floor).
pub const BASELINE_PROGRAM: &str = "keywall_baseline_pass";

/// Default capacities (the loader may raise them with `map_max_entries`).
pub const DEFAULT_MAX_KEYS: u32 = 1 << 20;
pub const DEFAULT_MAX_ALLOW: u32 = 1 << 22;
pub const DEFAULT_MAX_SETS: u32 = 1 << 20;
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 18;
pub const MAX_LISTENERS: u32 = 256;
/// `KW_PREFILTER` words per slot by default (2^20 x 64 bits = 8 MiB a slot: about 16 bits per
/// source for 4M allow entries).
pub const DEFAULT_PREFILTER_WORDS_LOG2: u8 = 20;
/// `KW_EVENTS` ring buffer bytes.
pub const EVENTS_RING_BYTES: u32 = 1 << 18;

/// Why a packet got its verdict. Every packet gets exactly one.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    PassNotApi = 0,
    PassHandshake = 1,
    PassAllowed = 2,
    PassFlow = 3,
    PassUnbound = 4,
    PassNoKey = 5,
    PassUnknownKey = 6,
    DropNotAllowed = 7,
    DropLocked = 8,
    DropUnknownKey = 9,
    DropNoKey = 10,
    DropFlow = 11,
    DropPrefilter = 12,
    DropMalformed = 13,
    /// A key message over the key's `max_new_connections_per_s` or `max_requests_per_s`.
    DropRateLimited = 14,
}

pub const NUM_REASONS: usize = 15;
/// Counter slots: reasons in enforce mode at `reason`, drops seen in audit mode at
/// `AUDIT_OFFSET + reason` (action `observed`), then the event counters.
pub const AUDIT_OFFSET: u32 = 16;
pub const COUNTER_SLOTS: u32 = 40;

impl Reason {
    pub const ALL: [Reason; NUM_REASONS] = [
        Reason::PassNotApi,
        Reason::PassHandshake,
        Reason::PassAllowed,
        Reason::PassFlow,
        Reason::PassUnbound,
        Reason::PassNoKey,
        Reason::PassUnknownKey,
        Reason::DropNotAllowed,
        Reason::DropLocked,
        Reason::DropUnknownKey,
        Reason::DropNoKey,
        Reason::DropFlow,
        Reason::DropPrefilter,
        Reason::DropMalformed,
        Reason::DropRateLimited,
    ];

    #[inline(always)]
    pub const fn is_drop(self) -> bool {
        self as u8 >= Reason::DropNotAllowed as u8
    }

    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotApi => "pass_not_api",
            Reason::PassHandshake => "pass_handshake",
            Reason::PassAllowed => "pass_allowed",
            Reason::PassFlow => "pass_flow",
            Reason::PassUnbound => "pass_unbound",
            Reason::PassNoKey => "pass_no_key",
            Reason::PassUnknownKey => "pass_unknown_key",
            Reason::DropNotAllowed => "drop_not_allowed",
            Reason::DropLocked => "drop_locked",
            Reason::DropUnknownKey => "drop_unknown_key",
            Reason::DropNoKey => "drop_no_key",
            Reason::DropFlow => "drop_flow",
            Reason::DropPrefilter => "drop_prefilter",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropRateLimited => "drop_rate_limited",
        }
    }

    pub fn from_u8(v: u8) -> Option<Reason> {
        Reason::ALL.get(v as usize).copied()
    }
}

/// `KW_CONTROL[0]`: which slot is live. One aligned word, flipped last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    pub active_slot: u32,
    pub _pad: u32,
}

pub const SETTING_ENFORCE: u8 = 1 << 0;
pub const SETTING_UNKNOWN_KEY_DROP: u8 = 1 << 1;
pub const SETTING_NO_KEY_DROP: u8 = 1 << 2;
pub const SETTING_UNBOUND_DROP: u8 = 1 << 3;
pub const SETTING_PREFILTER: u8 = 1 << 4;
pub const SETTING_ACTION_RESET: u8 = 1 << 5;
/// Set once a policy has been applied to the slot; an empty slot passes everything.
pub const SETTING_LOADED: u8 = 1 << 7;

/// `KW_SETTINGS[slot]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bumped on every apply; flows judged under another generation are judged again.
    pub generation: u32,
    pub flags: u8,
    pub key_prefix_len: u8,
    /// log2 of the prefilter words per slot (`KW_PREFILTER` holds both slots' halves).
    pub pf_words_log2: u8,
    pub _pad: u8,
    /// Distinct prefix lengths in the prefilter union, per family (probed in this order).
    pub pf_n_v4: u8,
    pub pf_n_v6: u8,
    pub _pad2: [u8; 2],
    pub pf_v4_plens: [u8; MAX_PLENS],
    pub pf_v6_plens: [u8; MAX_PLENS],
}

/// Listeners are found with two array reads, no hashing: `KW_LISTENER_INDEX[slot * 65536 + port]`
/// holds a listener number n (0: none), and `KW_LISTENERS[slot * MAX_LISTENERS + n - 1]` its
/// settings.
pub const PORTS: u32 = 65536;

#[inline(always)]
pub const fn listener_index_slot(slot: u32, port: u16) -> u32 {
    (slot & 1) * PORTS + port as u32
}

#[inline(always)]
pub const fn listener_slot(slot: u32, n: u16) -> u32 {
    (slot & 1) * MAX_LISTENERS + ((n as u32).wrapping_sub(1) % MAX_LISTENERS)
}

pub const LOCATOR_HTTP_HEADER: u8 = 1;
pub const LOCATOR_TLS_SNI: u8 = 2;
pub const LOCATOR_FIX: u8 = 3;

pub const LISTENER_PROXY_PROTOCOL: u8 = 1 << 0;

/// Longest `sni_suffix` (dot included) and `label_prefix` a tls-sni listener can match.
pub const MAX_SNI_SUFFIX: usize = 64;
pub const MAX_LABEL_PREFIX: usize = 16;

/// `KW_LISTENERS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub locator: u8,
    pub flags: u8,
    pub n_headers: u8,
    pub _pad: u8,
    /// Bytes of each header name, colon included.
    pub header_len: [u8; MAX_HEADERS],
    pub fix_tag: u32,
    /// The TCP port (host order), so the loader can read the table back.
    pub port: u16,
    pub _pad2: u16,
    /// Header names with their colon, lower-cased where letters (`x-mbx-apikey:`), zero padded.
    pub header_names: [[u8; MAX_HEADER_NAME]; MAX_HEADERS],
    /// Per byte 0x20 where the name has a letter (case fold), 0 elsewhere.
    pub header_fold: [[u8; MAX_HEADER_NAME]; MAX_HEADERS],
    /// Per byte 0xff where the name (with colon) has a byte, 0 past its end.
    pub header_mask: [[u8; MAX_HEADER_NAME]; MAX_HEADERS],
    /// `KW_SETS` id holding `trusted_proxies` (0: none; PROXY headers are then refused).
    pub proxy_set: u32,
    pub sni_suffix_len: u8,
    pub label_prefix_len: u8,
    pub _pad3: [u8; 2],
    /// tls-sni: the suffix (`.api.example.com`) and label prefix (`k-`), lower-cased.
    pub sni_suffix: [u8; MAX_SNI_SUFFIX],
    pub label_prefix: [u8; MAX_LABEL_PREFIX],
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            locator: 0,
            flags: 0,
            n_headers: 0,
            _pad: 0,
            header_len: [0; MAX_HEADERS],
            fix_tag: 0,
            port: 0,
            _pad2: 0,
            header_names: [[0; MAX_HEADER_NAME]; MAX_HEADERS],
            header_fold: [[0; MAX_HEADER_NAME]; MAX_HEADERS],
            header_mask: [[0; MAX_HEADER_NAME]; MAX_HEADERS],
            proxy_set: 0,
            sni_suffix_len: 0,
            label_prefix_len: 0,
            _pad3: [0; 2],
            sni_suffix: [0; MAX_SNI_SUFFIX],
            label_prefix: [0; MAX_LABEL_PREFIX],
        }
    }
}

/// `KW_KEYS` key: the key prefix, zero padded to 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPrefix {
    pub bytes: [u8; MAX_PREFIX_LEN],
}

pub const KEY_PRESENT: u8 = 1 << 0;
pub const KEY_LOCKED: u8 = 1 << 1;
/// The key has allow entries or ipsets; without this flag `unbound_keys` decides.
pub const KEY_BOUND: u8 = 1 << 2;

/// One key as one slot sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyRecord {
    pub flags: u8,
    pub n_inline_v4: u8,
    pub n_sets: u8,
    pub _pad: u8,
    /// Index into `KW_KEY_STATS`.
    pub stat_idx: u32,
    /// IPv4 hosts in network byte order, as read from the packet.
    pub inline_v4: [u32; INLINE_V4],
    /// Address sets (`KW_SETS` ids): the key's own CIDRs and IPv6 hosts, then its ipsets.
    pub sets: [u32; MAX_SETS],
    /// With `KEY_LOCKED`: the lock holds while CLOCK_TAI (`bpf_ktime_get_tai_ns`) is below
    /// this many seconds; 0 holds forever. The policy's `locked_until` is a wall-clock
    /// instant, the same on every edge, so the lock ends on its own everywhere at once.
    pub locked_until: u32,
}

/// `KW_KEYS` value: the key in both slots. Readers look only at `slot[active]`, which a
/// writer never changes while that slot is active.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyEntry {
    pub slot: [KeyRecord; 2],
}

/// `KW_SETS` value: which prefix lengths a set holds, per family, so probes stay few.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetMeta {
    pub n_v4: u8,
    pub n_v6: u8,
    pub _pad: [u8; 2],
    pub v4_plens: [u8; MAX_PLENS],
    pub v6_plens: [u8; MAX_PLENS],
}

/// `KW_ALLOW` key: one CIDR of one set, host bits zero. Value: u8 (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    pub set_id: u32,
    pub family: u8,
    pub plen: u8,
    pub _pad: [u8; 2],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}

/// `KW_FLOWS` key: one TCP connection as the edge sees it (client to server).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

pub const FLOW_HAS_KEY: u8 = 1 << 0;
/// `client` came from a PROXY header (the connection's source is a trusted proxy).
pub const FLOW_PROXIED: u8 = 1 << 1;
/// The connection passed bytes to the server (`HELD_PASSED` is set in its `KW_HELD` record).
pub const FLOW_HELD: u8 = 1 << 3;
/// The stream has passed 2 GiB or more since `start_seq`: the server may be anywhere in the
/// sequence space, so no second stream is started on the tuple.
pub const FLOW_LONG: u8 = 1 << 4;

/// `KW_HELD` value: what the filter knows of every connection the server may hold on a
/// 5-tuple, recorded from its SYN on. The map never evicts (the daemon's sweep forgets
/// idle tuples), so losing a flow entry can only fail closed: a stream is judged from its
/// start only at `isn + 1` of a recorded SYN (docs/DATAPATH.md, "Stream starts").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The ISN of the latest SYN: a stream starts at `isn + 1`.
    pub isn: u32,
    /// `HELD_*`.
    pub flags: u32,
}

/// A connection on this tuple passed bytes.
pub const HELD_PASSED: u32 = 1 << 0;
/// A second SYN with another ISN (further than any window from the first) was seen: its
/// connection may start, once, on a tuple whose flow follows the first.
pub const HELD_SECOND: u32 = 1 << 1;
/// More SYNs with other ISNs than the record can tell apart: no stream on this tuple is
/// judged from its start again (until the daemon's sweep forgets the tuple).
pub const HELD_POISON: u32 = 1 << 2;

/// Capacity of `KW_HELD`: tuples with a recorded SYN. A full table refuses new SYNs.
pub const DEFAULT_MAX_HELD: u32 = 1 << 20;
/// Bytes of a split extension carried from one segment to the next.
pub const TLS_CARRY: usize = 96;

/// The stream starts here: an HTTP request line, `8=FIX`, or a TLS ClientHello record.
pub const CTX_START: u8 = 1 << 0;
/// A PROXY header is expected here (a `proxy_protocol` listener's stream start).
pub const CTX_PROXY: u8 = 1 << 1;
/// The previous byte was a line (field) separator: a true line start, not a segment cut.
pub const CTX_LINE: u8 = 1 << 2;
/// TLS: inside a ClientHello that goes on here (its walk is in `KW_TLS_PENDING`).
pub const CTX_HELLO: u8 = 1 << 3;
/// TLS: the first body byte of a handshake record comes here.
pub const CTX_PEEK: u8 = 1 << 4;

/// A locator's parse context at one position of a connection's byte stream: what the bytes
/// from there mean (see docs/DATAPATH.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCtx {
    pub flags: u8,
    /// TLS: bytes of a record header cut by the previous segment's end (in `hdr`).
    pub hdr_len: u8,
    /// TLS: record body bytes left before the next record header.
    pub rec_left: u16,
    pub hdr: [u8; 4],
}

/// `KW_FLOWS` value: the connection's verdict, what it was judged on, and where the filter
/// stands in its byte stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Settings generation the verdict was made under.
    pub generation: u32,
    /// A `Reason` (the one of the judging packet).
    pub reason: u8,
    pub flags: u8,
    pub family: u8,
    pub _pad: u8,
    pub stat_idx: u32,
    /// Sequence number just past the last byte passed.
    pub next_seq: u32,
    pub prefix: KeyPrefix,
    /// The address the allowlist is checked against (the PROXY header's, when there was one).
    pub client: [u8; 16],
    /// Where the last passed data segment began (a retransmission may start here).
    pub last_seq: u32,
    /// Where the followed stream began (its ISN + 1; 0: unknown). The server's `rcv_nxt`
    /// lies somewhere between it and `next_seq`: it may have dropped bytes the filter passed
    /// (a bad checksum, a closed window).
    pub start_seq: u32,
    /// The parse context at `next_seq` and at `last_seq`.
    pub ctx_next: StreamCtx,
    pub ctx_last: StreamCtx,
    /// When the client last sent data (coarse clock, seconds): the daemon forgets connections
    /// idle for longer than servers keep them.
    pub seen_s: u32,
    /// When the stream this flow replaced on its tuple last passed data (coarse seconds;
    /// 0: it replaced none). The server closes that one once it has been idle for the
    /// daemon's idle time, and then the tuple may start another stream.
    pub prev_seen_s: u32,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            generation: 0,
            reason: 0,
            flags: 0,
            family: 0,
            _pad: 0,
            stat_idx: 0,
            next_seq: 0,
            prefix: KeyPrefix { bytes: [0; 16] },
            client: [0; 16],
            last_seq: 0,
            start_seq: 0,
            ctx_next: StreamCtx {
                flags: 0,
                hdr_len: 0,
                rec_left: 0,
                hdr: [0; 4],
            },
            ctx_last: StreamCtx {
                flags: 0,
                hdr_len: 0,
                rec_left: 0,
                hdr: [0; 4],
            },
            seen_s: 0,
            prev_seen_s: 0,
        }
    }
}

// The kernel and the loader share these layouts byte for byte.
const _: () = assert!(core::mem::size_of::<StreamCtx>() == 8);
const _: () = assert!(core::mem::size_of::<Flow>() == 80);
const _: () = assert!(core::mem::size_of::<Held>() == 8);
// Every struct shared with the kernel has the size both sides were built for: a field added
// on one side only fails the build here instead of garbling map values at run time.
const _: () = assert!(core::mem::size_of::<Control>() == 8);
const _: () = assert!(core::mem::size_of::<Settings>() == 28);
const _: () = assert!(core::mem::size_of::<Listener>() == 392);
const _: () = assert!(core::mem::size_of::<KeyPrefix>() == 16);
const _: () = assert!(core::mem::size_of::<KeyRecord>() == 44);
const _: () = assert!(core::mem::size_of::<KeyEntry>() == 88);
const _: () = assert!(core::mem::size_of::<KeyActivity>() == 48);
const _: () = assert!(core::mem::size_of::<RateEntry>() == 48);
const _: () = assert!(core::mem::size_of::<SetMeta>() == 20);
const _: () = assert!(core::mem::size_of::<AllowKey>() == 24);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<TlsPending>() == 16 + TLS_CARRY);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<KeyStats>() == 24);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 48);

/// `KW_TLS_PENDING` value: where a ClientHello that outgrew its first segment goes on. Kept
/// apart from `Flow` so the common flow entry stays small.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsPending {
    /// TCP sequence number of the next extension (or of `carry[0]`), and extension bytes left
    /// from there.
    pub tls_seq: u32,
    pub tls_left: u32,
    pub carry_len: u8,
    pub _pad: [u8; 7],
    /// The start of an extension that the previous segment cut (header or server_name).
    pub carry: [u8; TLS_CARRY],
}

/// ClientHellos followed across segments at once (LRU: an abandoned one ages out).
pub const MAX_TLS_PENDING: u32 = 16384;

/// `KW_REASONS` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// `KW_KEY_STATS` value (shared array, atomically updated).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyStats {
    pub passed: u64,
    pub dropped: u64,
    /// `bpf_ktime_get_coarse_ns` of the last packet (CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
}

pub const ACT_RATE_LIMITED: u8 = 1 << 0;

/// `KW_RATE` value (hash by `stat_idx`, only limited keys): two GCRA limits. For each, `t`
/// is the emission interval (1e9 / rate, ns; 0: no limit), `tau` the tolerance
/// (`t * (burst - 1)`) and `tat` the theoretical arrival time (`bpf_ktime_get_ns`). A message
/// at `now` conforms when `max(tat, now) - now <= tau`, and then moves `tat` to
/// `max(tat, now) + t`. One bucket per key shared by every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateEntry {
    pub conn_t: u64,
    pub conn_tau: u64,
    pub conn_tat: u64,
    pub req_t: u64,
    pub req_tau: u64,
    pub req_tat: u64,
}

/// Whether a message at `now` conforms to a limit (`t`, `tau`, `tat`); the new `tat` if so.
#[inline(always)]
pub const fn gcra(t: u64, tau: u64, tat: u64, now: u64) -> Option<u64> {
    let start = if tat > now { tat } else { now };
    if start - now > tau {
        None
    } else {
        Some(start + t)
    }
}

/// Source networks a key's activity remembers (see `KeyActivity::nets`).
pub const ACTIVITY_NETS: usize = 5;

/// `KW_ACTIVITY` value (shared array indexed by the key's `stat_idx`): what the key did,
/// written once per judged key message (a new connection or a request), never per packet.
/// Races between CPUs can lose an update; nothing here decides a verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyActivity {
    /// Key messages judged (HTTP requests, TLS ClientHellos, FIX Logons), passed or refused.
    pub requests: u64,
    /// Connections whose first key message named this key.
    pub connections: u32,
    /// `bpf_ktime_get_coarse_ns` in seconds (CLOCK_MONOTONIC) of the last allowed message, 0
    /// if none.
    pub last_allowed_s: u32,
    /// The same for the last refused one, and its `Reason`.
    pub last_refused_s: u32,
    pub last_refused_reason: u8,
    /// `ACT_RATE_LIMITED`: the key has an entry in `KW_RATE` (written by the loader; the
    /// datapath only reads it, so unlimited keys never look there).
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The source networks (/24 IPv4, /48 IPv6) seen most recently, one per slot:
    /// `fingerprint << 16 | minute`, where the fingerprint is a 16-bit hash of the network
    /// (never 0) and the minute is CLOCK_MONOTONIC minutes mod 65536. 0: an empty slot. A
    /// new network replaces the oldest slot, so a window holds up to `ACTIVITY_NETS`
    /// distinct networks exactly (two networks can share a fingerprint: an undercount of
    /// about 1 in 6,500 for five).
    pub nets: [u32; ACTIVITY_NETS],
    /// When the loader gave this slot to the key (the activity clock): a key never used is
    /// idle since then.
    pub since_s: u32,
}

/// The fingerprint of a source network: the /24 of an IPv4 address or the /48 of an IPv6 one
/// (`addr` as read from the packet, IPv4 in the first 4 bytes). Never 0.
#[inline(always)]
pub const fn net_fingerprint(family: u8, addr: &[u8; 16]) -> u32 {
    let mut x: u64 = if family == FAMILY_V4 {
        (addr[0] as u64) << 16 | (addr[1] as u64) << 8 | addr[2] as u64 | 4 << 56
    } else {
        (addr[0] as u64) << 40
            | (addr[1] as u64) << 32
            | (addr[2] as u64) << 24
            | (addr[3] as u64) << 16
            | (addr[4] as u64) << 8
            | addr[5] as u64
            | 6 << 56
    };
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    let fp = (x & 0xffff) as u32;
    if fp == 0 { 1 } else { fp }
}

/// The slot a network seen at `minute` takes in `nets`: its own slot if present (and
/// whether that slot must be rewritten: only when the minute moved), else an empty one, else
/// the oldest. Returns (slot, write).
#[inline(always)]
pub fn net_slot(nets: &[u32; ACTIVITY_NETS], fp: u32, minute: u32) -> (usize, bool) {
    let minute = minute & 0xffff;
    let mut oldest = 0usize;
    let mut oldest_age = 0u32;
    let mut i = 0;
    while i < ACTIVITY_NETS {
        let v = nets[i];
        if v >> 16 == fp {
            return (i, v & 0xffff != minute);
        }
        // An empty slot is older than any (ages are below 65536).
        let age = if v == 0 {
            0x1_0000
        } else {
            minute.wrapping_sub(v & 0xffff) & 0xffff
        };
        if age > oldest_age {
            oldest_age = age;
            oldest = i;
        }
        i += 1;
    }
    (oldest, true)
}

/// `KW_EVENTS` record: one sampled drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC, jiffy resolution).
    pub time_ns: u64,
    /// Where the allowlist looked (the PROXY header's address when there was one).
    pub src: [u8; 16],
    pub prefix: KeyPrefix,
    pub family: u8,
    pub reason: u8,
    pub flags: u8,
    pub _pad: u8,
    /// The listener's TCP port, and the client's.
    pub port: u16,
    pub sport: u16,
}

pub const EVENT_HAS_KEY: u8 = 1 << 0;
/// Audit mode: the packet was counted as `observed` and passed.
pub const EVENT_AUDIT: u8 = 1 << 1;

/// Drop events are sampled with a per-CPU token bucket: this many a second, in bursts up to
/// `EVENT_BURST`. A flood costs the daemon at most that many records a second per CPU.
pub const EVENT_RATE_PER_CPU: u64 = 200;
pub const EVENT_BURST: u64 = 50;
/// `KW_REASONS` slots past the reasons: events sent, and events the bucket suppressed.
pub const COUNTER_EVENTS_SENT: u32 = 38;
pub const COUNTER_EVENTS_SUPPRESSED: u32 = 39;
const _: () = assert!(AUDIT_OFFSET as usize + NUM_REASONS <= COUNTER_EVENTS_SENT as usize);

/// The prefilter: a blocked Bloom filter per slot over the union of every allow entry
/// (masked to a prefix length the slot lists). One 64-bit word per probe, three bits in it.
/// False positives only let a SYN through to the key check; there are no false negatives, so
/// it never blocks a source some key allows.
///
/// `hi`/`lo` are the address in network order as two big-endian words (IPv4 in the top 32
/// bits of `hi`), already masked to `plen`. Returns (word index within a slot, bit mask).
#[inline(always)]
pub const fn prefilter_probe(family: u8, plen: u8, hi: u64, lo: u64, words_log2: u8) -> (u32, u64) {
    let mut h = hi
        ^ lo.rotate_left(31)
        ^ ((family as u64) << 8 | plen as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    let word = (h >> 32) as u32 & ((1u32 << (words_log2 & 31)) - 1);
    let bits = (1u64 << (h & 63)) | (1u64 << ((h >> 6) & 63)) | (1u64 << ((h >> 12) & 63));
    (word, bits)
}

/// `hi`/`lo` masked to the first `plen` bits (network order).
#[inline(always)]
pub const fn mask_addr(hi: u64, lo: u64, plen: u8) -> (u64, u64) {
    let p = plen as u32;
    if p == 0 {
        (0, 0)
    } else if p < 64 {
        (hi & (u64::MAX << (64 - p)), 0)
    } else if p == 64 {
        (hi, 0)
    } else if p < 128 {
        (hi, lo & (u64::MAX << (128 - p)))
    } else {
        (hi, lo)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, and made of integers and arrays of integers only
    // (no pointers, no references, no enums), so any bytes the kernel hands back are a valid
    // value. Their sizes, which the kernel's map definitions must match, are pinned by the
    // compile-time asserts next to the types.
    unsafe impl aya::Pod for Control {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Listener {}
    unsafe impl aya::Pod for KeyPrefix {}
    unsafe impl aya::Pod for KeyRecord {}
    unsafe impl aya::Pod for KeyEntry {}
    unsafe impl aya::Pod for SetMeta {}
    unsafe impl aya::Pod for AllowKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for Held {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for KeyStats {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for TlsPending {}
    unsafe impl aya::Pod for KeyActivity {}
    unsafe impl aya::Pod for RateEntry {}
}
