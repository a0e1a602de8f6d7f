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
    pub const ALL: [&str; 10] = [
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
}

pub const NUM_REASONS: usize = 14;
/// Counter slots: reasons in enforce mode at `reason`, drops seen in audit mode at
/// `AUDIT_OFFSET + reason` (action `observed`).
pub const AUDIT_OFFSET: u32 = 16;
pub const COUNTER_SLOTS: u32 = 32;

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
    pub _pad: [u8; 2],
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

/// `KW_FLOWS` value: the connection's verdict and what it was judged on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Settings generation the verdict was made under.
    pub generation: u32,
    /// A `Reason` (the one of the judging packet).
    pub reason: u8,
    pub flags: u8,
    pub family: u8,
    pub _pad: u8,
    pub stat_idx: u32,
    pub _pad2: u32,
    pub prefix: KeyPrefix,
    /// The address the allowlist is checked against (the PROXY header's, when there was one).
    pub client: [u8; 16],
}

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

#[cfg(feature = "user")]
mod pod {
    use super::*;
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
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for KeyStats {}
}
