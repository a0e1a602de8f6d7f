//! Per-CPU scratch memory: what does not fit the 512-byte BPF stack, which all frames of a
//! call chain share.

use filter_common::{DropEvent, Flow, FlowKey, KeyPrefix, TlsPending};

use crate::{
    Located,
    parse::Segment,
    proxy::{ProxyIo, V1State},
    tls::{EXT_BUF, TlsIo, TlsRec, TlsWalk},
};

/// Words in the HTTP locator's line window: the 64 bytes it may fill plus room for offsets the
/// verifier cannot bound tighter than 512 bytes.
pub const WINDOW_WORDS: usize = 80;

/// In and out of the program's locator function (`keywall_http_scan`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ScanIo {
    pub start: u64,
    pub end: u64,
    pub plen: u64,
    /// Index of the listener in `KW_LISTENERS`.
    pub listener: u64,
    /// The line separator, after OR-ing `sep_fold` into each byte: 0x0f with 0x07 for HTTP
    /// (LF and CR alike), SOH (1) with 0 for FIX fields.
    pub sep: u64,
    pub sep_fold: u64,
    /// 1 for FIX (fields, `8=FIX` at the stream start), 0 for HTTP.
    pub fix: u64,
    /// In: the stream starts here (a request line, or `8=FIX`, must come first).
    pub first: u64,
    /// In: the segment starts a true line (field); out: the segment ends with a separator.
    pub at_line: u64,
    /// Out (FIX): a Logon's `35=A` field was seen at a field start.
    pub logon: u64,
    pub result: u64,
    pub prefix: [u64; 2],
}

/// The HTTP locator's per-segment state while it checks line starts.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct LineState {
    pub start: u64,
    pub end: u64,
    pub plen: u64,
    pub n: u64,
    pub found: u64,
    pub malformed: u64,
    pub prefix: [u64; 2],
    pub fix: u64,
    pub at_line: u64,
    pub logon: u64,
}

/// Per-CPU scratch of the program (more than the 512-byte BPF stack holds).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scratch {
    pub io: ScanIo,
    pub line: LineState,
    /// The flow key and a new flow entry, built here rather than on the stack.
    pub flow_key: FlowKey,
    pub flow: Flow,
    /// The parsed TCP segment.
    pub seg: Segment,
    /// A word the program writes and reads back so the verifier forgets a value's history
    /// (see filter-ebpf `forget`).
    pub tmp: [u64; 4],
    /// Which of `seg`/`ev_*` describe the current packet (`SEEN_*`).
    pub seen: u8,
    pub _pad: [u8; 3],
    /// `seen_s` of the flow a second stream replaces (0: none), from `position` to `settle`.
    pub prev_seen: u32,
    /// Key and client of a key-bearing drop, for its event.
    pub ev_prefix: KeyPrefix,
    pub ev_client: [u8; 16],
    /// The event token bucket (nanoseconds of budget, and when it was last topped up).
    pub ev_budget: u64,
    pub ev_last: u64,
    pub ev_skip: u64,
    pub event: DropEvent,
    pub proxy: ProxyIo,
    pub v1: V1State,
    pub tls: TlsIo,
    pub walk: TlsWalk,
    pub rec: TlsRec,
    /// What the locator made of each range of a segment (a retransmission has two).
    pub loc: [Located; 2],
    pub pending: TlsPending,
    /// A server_name extension, assembled from the packet (and a previous segment's carry).
    pub ext: [u8; EXT_BUF],
    pub lines: [u16; 128],
    pub window: [u64; WINDOW_WORDS],
}
