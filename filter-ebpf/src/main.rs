//! keywall's XDP program: finds the API-key prefix in traffic to API listeners, judges it
//! against the key's lock and source allowlist, and keeps the verdict per connection.
//!
//! Parse once (parse.rs), locate the key (http.rs), decide in one place (`decide`), and count
//! every verdict with its reason (`finish`). No logging on the per-packet path.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod events;
mod http;
mod parse;
mod policy;
mod prefilter;
mod proxy;
mod reset;
mod risk;
mod scratch;
mod swar;
mod tls;

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_NOEXIST, xdp_action},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::XdpContext,
};
use filter_common::{
    AUDIT_OFFSET, AllowKey, COUNTER_SLOTS, CTX_HELLO, CTX_LINE, CTX_PROXY, CTX_START, Control,
    Counter, DEFAULT_MAX_ALLOW, DEFAULT_MAX_FLOWS, DEFAULT_MAX_KEYS, DEFAULT_MAX_SETS,
    DEFAULT_PREFILTER_WORDS_LOG2, EVENTS_RING_BYTES, FLOW_HAS_KEY, FLOW_HELD, FLOW_LONG,
    FLOW_PROXIED, Flow, FlowKey, HELD_PASSED, HELD_POISON, HELD_SECOND, Held, KeyEntry, KeyPrefix,
    KeyStats, LISTENER_PROXY_PROTOCOL, LOCATOR_FIX, LOCATOR_HTTP_HEADER, LOCATOR_TLS_SNI, Listener,
    MAX_LISTENERS, Reason, SETTING_ACTION_RESET, SETTING_ENFORCE, SETTING_LOADED,
    SETTING_NO_KEY_DROP, SETTING_PREFILTER, SetMeta, Settings, StreamCtx, TLS_CARRY, TlsPending,
};

use crate::{
    parse::{Parsed, Segment, TCP_ACK, TCP_RST, TCP_SYN, TCP_URG},
    scratch::Scratch,
};

// Maps are pinned by name under the loader's pin directory, so they outlive the daemon.
#[map(name = "KW_CONTROL")]
static CONTROL: Array<Control> = Array::pinned(1, 0);
#[map(name = "KW_SETTINGS")]
static SETTINGS: Array<Settings> = Array::pinned(2, 0);
#[map(name = "KW_LISTENER_INDEX")]
static LISTENER_INDEX: Array<u16> = Array::pinned(2 * filter_common::PORTS, 0);
#[map(name = "KW_LISTENERS")]
static LISTENERS: Array<Listener> = Array::pinned(2 * MAX_LISTENERS, 0);
// No prealloc: updates swap whole elements under RCU, so a reader never sees a value being
// rewritten, and memory follows the key count.
#[map(name = "KW_KEYS")]
static KEYS: HashMap<KeyPrefix, KeyEntry> = HashMap::pinned(DEFAULT_MAX_KEYS, BPF_F_NO_PREALLOC);
#[map(name = "KW_SETS")]
static SETS: HashMap<u32, SetMeta> = HashMap::pinned(DEFAULT_MAX_SETS, BPF_F_NO_PREALLOC);
#[map(name = "KW_ALLOW")]
static ALLOW: HashMap<AllowKey, u8> = HashMap::pinned(DEFAULT_MAX_ALLOW, BPF_F_NO_PREALLOC);
#[map(name = "KW_FLOWS")]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);
#[map(name = "KW_REASONS")]
static REASONS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
#[map(name = "KW_KEY_STATS")]
static KEY_STATS: Array<KeyStats> = Array::pinned(DEFAULT_MAX_KEYS, 0);
/// The prefilter's Bloom words, both slots' halves; the loader writes them through mmap.
#[map(name = "KW_PREFILTER")]
static PREFILTER: Array<u64> = Array::pinned(2 << DEFAULT_PREFILTER_WORDS_LOG2, BPF_F_MMAPABLE);
/// Every 5-tuple the server may hold a connection on, from its SYN (the ISNs seen, whether it
/// passed bytes), kept apart from the evicting flow table: a stream is judged from its start
/// only where a recorded SYN puts it, so losing a flow entry fails closed. The daemon removes
/// entries whose flow has been gone for longer than any server keeps an idle connection.
#[map(name = "KW_HELD")]
static HELD: HashMap<FlowKey, Held> =
    HashMap::pinned(filter_common::DEFAULT_MAX_HELD, BPF_F_NO_PREALLOC);
/// The daemon's idle time (`KEYWALL_HELD_IDLE_SECS`; 0: none written): the time after which
/// a server has closed a connection whose client sent no data.
#[map(name = "KW_HELD_IDLE")]
static HELD_IDLE: Array<u32> = Array::pinned(1, 0);
/// ClientHellos followed into a next segment.
#[map(name = "KW_TLS_PENDING")]
static TLS_PENDING: LruHashMap<FlowKey, TlsPending> =
    LruHashMap::pinned(filter_common::MAX_TLS_PENDING, 0);
/// Sampled drop events for the daemon (`keywall events`).
#[map(name = "KW_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
/// Per-CPU scratch for the HTTP scan's line starts (too big for the 512-byte stack).
#[map(name = "KW_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const NO_STAT: u32 = u32::MAX;

/// One 8-byte load at `p`, whatever its alignment.
///
/// `read_unaligned` would be split into eight byte loads: LLVM's BPF backend assumes aligned
/// access only. The x86-64 JIT and the verifier (with efficient unaligned access) are fine with
/// a single unaligned load, and a volatile read keeps LLVM from splitting it.
///
/// # Safety
/// `p..p + 8` must be readable: bounds checked against the packet end, or inside a map value
/// or scratch.
#[inline(always)]
pub unsafe fn ld64(p: *const u64) -> u64 {
    // SAFETY: the caller's bounds check (see above).
    unsafe { core::ptr::read_volatile(p) }
}

/// One 2-byte load at `p`, whatever its alignment (see `ld64`).
///
/// # Safety
/// `p..p + 2` must be readable (see `ld64`).
#[inline(always)]
pub unsafe fn ld16(p: *const u16) -> u16 {
    // SAFETY: the caller's bounds check (see above).
    unsafe { core::ptr::read_volatile(p) }
}

/// Per-CPU scratch, looked up once per packet.
pub type ScratchPtr = *mut Scratch;

/// Returns `x`, laundered through map memory so the verifier sees an unknown scalar.
///
/// Paths that reach the same point with different offsets (VLAN tags, IP options, extension
/// headers) then look alike and are verified once, instead of once per combination. Every
/// use is bounds checked after this, so nothing is trusted that was not checked.
///
/// # Safety
/// `sc` must be this CPU's scratch, from the `SCRATCH` lookup.
#[inline(always)]
pub unsafe fn forget(sc: ScratchPtr, x: usize) -> usize {
    // SAFETY: passed on from the caller.
    unsafe { forget_in(sc, 0, x) }
}

/// `forget` through word `i` of the scratch, for several values at once.
///
/// # Safety
/// `sc` must be this CPU's scratch (see `forget`).
#[inline(always)]
pub unsafe fn forget_in(sc: ScratchPtr, i: usize, x: usize) -> usize {
    // SAFETY: `sc` is valid (the caller's contract); `i & 3` stays inside `tmp`.
    unsafe {
        let p = core::ptr::addr_of_mut!((*sc).tmp[i & 3]);
        core::ptr::write_volatile(p, x as u64);
        core::ptr::read_volatile(p) as usize
    }
}

/// The outcome of one packet: its reason, and the key's counter slot when a key is known.
pub struct Verdict {
    pub reason: Reason,
    pub stat_idx: u32,
}

impl Verdict {
    #[inline(always)]
    const fn of(reason: Reason) -> Self {
        Verdict {
            reason,
            stat_idx: NO_STAT,
        }
    }
}

/// What a drop needs beyond the verdict: whether `scratch.seg` describes this packet (for
/// events and the reset action), and whether `scratch.ev_*` hold its key and client.
pub const SEEN_SEG: u8 = 1 << 0;
pub const SEEN_KEY: u8 = 1 << 1;

#[xdp]
pub fn keywall(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (verdict, flags) = decide(&ctx);
    let enforce = flags & SETTING_ENFORCE != 0;
    let action = finish(&verdict, enforce, bytes);
    let action = if verdict.reason.is_drop() {
        on_drop(&ctx, &verdict, flags, action)
    } else {
        action
    };
    if action == xdp_action::XDP_PASS {
        chain(&ctx);
    }
    action
}

// ---- The chaining slot (deploy branch; README "Beside other XDP programs") ----------------
// Slot 0 of KW_NEXT holds another XDP program that an operator chained after keywall
// (`keywall chain`). A packet keywall passes is handed to it with a tail call, and its verdict
// is final. While the slot is empty the tail call falls through and keywall's pass stands.
#[map(name = "KW_NEXT")]
static NEXT: ProgramArray = ProgramArray::pinned(1, 0);

#[inline(always)]
fn chain(ctx: &XdpContext) {
    // Returns only when the slot is empty (or the tail-call limit is reached).
    unsafe { NEXT.tail_call(ctx, 0) };
}
// ---- end of the chaining slot -------------------------------------------------------------

/// Drops are rare next to passes: the event and the reset live off the pass path.
#[inline(never)]
fn on_drop(ctx: &XdpContext, v: &Verdict, flags: u8, action: u32) -> u32 {
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return action;
    };
    let seen = unsafe { (*sc).seen };
    events::sample(sc, v, flags & SETTING_ENFORCE == 0, seen);
    if action == xdp_action::XDP_DROP
        && flags & SETTING_ACTION_RESET != 0
        && seen & SEEN_SEG != 0
        && reset::applies(v.reason)
        && reset::rewrite(ctx, sc)
    {
        return xdp_action::XDP_TX;
    }
    action
}

/// The floor for benchmarks: the same object's cheapest possible program.
#[xdp]
pub fn keywall_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The live slot's settings, or None before any policy was applied.
#[inline(always)]
fn live_settings() -> Option<(u32, &'static Settings)> {
    let slot = CONTROL.get(0)?.active_slot & 1;
    let s = SETTINGS.get(slot)?;
    if s.flags & SETTING_LOADED == 0 {
        return None;
    }
    Some((slot, s))
}

/// The verdict, and the live settings' flags (0 when no policy is loaded).
#[inline(always)]
fn decide(ctx: &XdpContext) -> (Verdict, u8) {
    let Some((slot, settings)) = live_settings() else {
        return (Verdict::of(Reason::PassNotApi), 0);
    };
    let flags = settings.flags;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return (Verdict::of(Reason::PassNotApi), 0);
    };
    unsafe { (*sc).seen = 0 };
    let data = ctx.data();
    let end = ctx.data_end();
    let v = match parse::parse(sc, data, end) {
        Parsed::NotTcp => Verdict::of(Reason::PassNotApi),
        Parsed::TcpFragment { dport } | Parsed::BadTcp { dport } => match dport {
            // Unparseable TCP that might be API-bound fails closed; a known non-listener passes.
            Some(port) if listener(slot, port).is_none() => Verdict::of(Reason::PassNotApi),
            _ => Verdict::of(Reason::DropMalformed),
        },
        Parsed::Tcp => {
            let seg = unsafe { &(*sc).seg };
            unsafe { (*sc).seen = SEEN_SEG };
            match listener(slot, seg.dport) {
                None => Verdict::of(Reason::PassNotApi),
                Some((l, idx)) => judge_segment(ctx, sc, slot, settings, l, idx, seg),
            }
        }
    };
    (v, flags)
}

/// The listener on `port` in `slot`, and its index in `KW_LISTENERS`.
#[inline(always)]
fn listener(slot: u32, port: u16) -> Option<(&'static Listener, u32)> {
    let n = *LISTENER_INDEX.get(filter_common::listener_index_slot(slot, port))?;
    if n == 0 {
        return None;
    }
    let idx = filter_common::listener_slot(slot, n);
    Some((LISTENERS.get(idx)?, idx))
}

#[inline(always)]
fn flow_key(seg: &Segment) -> FlowKey {
    FlowKey {
        src: seg.src,
        dst: seg.dst,
        sport: seg.sport,
        dport: seg.dport,
        family: seg.family,
        _pad: [0; 3],
    }
}

/// The segment's flow key, built in scratch.
#[inline(always)]
fn flow_key_in(sc: ScratchPtr, seg: &Segment) -> &'static FlowKey {
    let fk = unsafe { &mut (*sc).flow_key };
    *fk = flow_key(seg);
    fk
}

/// Where a data segment sits in its connection's byte stream (docs/DATAPATH.md).
const AT_FRESH: u8 = 0;
const AT_NEXT: u8 = 1;
const AT_RETRANS: u8 = 2;
/// Out of position on a connection that was refused, or on one that was not.
const AT_REFUSED: u8 = 3;
const AT_UNKNOWN: u8 = 4;

/// Where the data segment in scratch sits in the stream of `f` (null: no flow): `AT_*` in
/// the low byte, the bytes to judge from the first context in bits 8..24, and that context
/// in `tmp[2]`.
#[inline(never)]
fn position(sc: ScratchPtr, f: *mut Flow, args: u64) -> u64 {
    let proxied = args & 1;
    let enforce = args & 2 != 0;
    let generation = (args >> 32) as u32;
    let seg = unsafe { &(*sc).seg };
    let len = (seg.payload_end - seg.payload_off) as u32 & 0xffff;
    let seq = seg.seq;
    let fresh = StreamCtx {
        flags: CTX_START | CTX_LINE | if proxied != 0 { CTX_PROXY } else { 0 },
        hdr_len: 0,
        rec_left: 0,
        hdr: [0; 4],
    };
    let (at, k, c) = if f.is_null() {
        // Judged from its start only where a recorded SYN puts the stream start (the server
        // trims bytes before it). No record: the SYN came before the program, or the table
        // was full. Passed bytes: the flow was evicted (or removed) after the server got
        // bytes this segment cannot be placed against.
        match unsafe { HELD.get(flow_key_ref(sc)) } {
            Some(r)
                if r.flags & (HELD_PASSED | HELD_POISON) == 0 && seq == r.isn.wrapping_add(1) =>
            {
                unsafe { (*sc).prev_seen = 0 };
                (AT_FRESH, len, fresh)
            }
            _ => (AT_UNKNOWN, 0, fresh),
        }
    } else {
        let f = unsafe { &*f };
        let refused = match Reason::from_u8(f.reason) {
            Some(r) => r.is_drop(),
            None => true,
        };
        if refused
            && enforce
            && f.generation == generation
            && (seq == f.next_seq || seq == f.last_seq)
        {
            // A connection the live policy refused: the server got none of its judged bytes,
            // and whatever comes in their place is refused too (a TCP sender can only resend
            // them), without a scan. After a policy change it is judged again; in audit mode
            // (where the bytes did pass) every message is judged for the counters.
            (AT_REFUSED, 0, fresh)
        } else if seq == f.next_seq {
            (AT_NEXT, len, f.ctx_next)
        } else if seq == f.last_seq && seq.wrapping_add(len).wrapping_sub(f.next_seq) < 1 << 31 {
            // A retransmission of the last segment (maybe longer): its first `k` bytes are
            // judged from where that segment began, the rest from where it ended.
            (AT_RETRANS, f.next_seq.wrapping_sub(seq), f.ctx_last)
        } else if outside_stream(seq, f) && second_start(sc, seq) {
            // A second connection on this 5-tuple, judged from its stream start: the server
            // may still hold the old one (it answers a SYN on a live connection with a
            // challenge ACK), but these bytes lie outside any window of it, wherever in its
            // stream the server stands, and of the first SYN's. Only once: the flow now
            // follows the new stream, and a third ISN could bounce back into the forgotten
            // one's window, unless that one has been idle for as long as servers keep
            // connections (`renewable`).
            unsafe { (*sc).prev_seen = f.seen_s.max(1) };
            (AT_FRESH, len, fresh)
        } else {
            // Ahead of what was judged, behind it, or overlapping part of it: where the
            // server puts these bytes is not knowable here.
            (if refused { AT_REFUSED } else { AT_UNKNOWN }, 0, fresh)
        }
    };
    unsafe { core::ptr::write_volatile(&mut (*sc).tmp[2], ctx_to_u64(c)) };
    at as u64 | (k as u64 & 0xffff) << 8
}

/// What the locator made of a range of the payload (in scratch: the stack is small).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Located {
    pub result: u64,
    pub prefix: [u64; 2],
    pub ctx: StreamCtx,
    /// Set when this range began with a PROXY header: the client address it named.
    pub proxied: u8,
    pub family: u8,
    pub _pad: [u8; 6],
    pub client: [u8; 16],
}

#[inline(always)]
fn judge_segment(
    ctx: &XdpContext,
    sc: ScratchPtr,
    slot: u32,
    settings: &Settings,
    l: &Listener,
    l_idx: u32,
    seg: &Segment,
) -> Verdict {
    let tcp = seg.tcp_flags;
    if tcp & TCP_URG != 0 {
        // The server would take the urgent byte out of the stream (and an urgent pointer on
        // a bare ACK points into data still to come): nothing here can be judged as sent.
        return Verdict::of(Reason::DropMalformed);
    }
    let fk = flow_key_in(sc, seg);
    if seg.payload_off >= seg.payload_end || tcp & TCP_RST != 0 {
        // No payload (a RST's payload never reaches the application): handshakes and bare
        // ACKs carry no key. RSTs always pass so a server can tear down; other packets of a
        // known connection follow its verdict.
        if tcp & (TCP_SYN | TCP_RST) != 0 {
            if tcp & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
                && settings.flags & SETTING_PREFILTER != 0
                && !prefilter::source_may_connect(slot, settings, l, seg)
            {
                return Verdict::of(Reason::DropPrefilter);
            }
            if tcp & (TCP_SYN | TCP_ACK) == TCP_SYN && !note_syn(fk, seg.seq) {
                // A connection whose start cannot be recorded could never be judged.
                return Verdict::of(Reason::DropMalformed);
            }
            return Verdict::of(Reason::PassHandshake);
        }
        return match FLOWS.get_ptr_mut(fk) {
            Some(f) => follow(sc, slot, settings, unsafe { &mut *f }),
            None => Verdict::of(Reason::PassHandshake),
        };
    }
    if tcp & (TCP_SYN | TCP_ACK) != TCP_ACK {
        // Data on a SYN: a server without a Fast Open cookie drops it, one with a cookie
        // takes it; which one is not knowable here. Data without ACK: the server throws it
        // away, so it must not move what the filter believes the server holds.
        return Verdict::of(Reason::DropMalformed);
    }
    let len = (seg.payload_end - seg.payload_off) as u32;
    let proxied = l.flags & LISTENER_PROXY_PROTOCOL != 0;
    let mut known = FLOWS.get_ptr_mut(fk);
    // Where the segment sits: decided in a function of its own, off the locators' chain.
    let pos = position(
        sc,
        known.unwrap_or(core::ptr::null_mut()),
        proxied as u64
            | ((settings.flags & SETTING_ENFORCE != 0) as u64) << 1
            | (settings.generation as u64) << 32,
    );
    let at = (pos & 0xff) as u8;
    if at == AT_REFUSED {
        return Verdict::of(Reason::DropFlow);
    }
    if at == AT_UNKNOWN {
        return Verdict::of(Reason::DropMalformed);
    }
    if at == AT_FRESH {
        known = None;
    }
    let k = ((pos >> 8) & 0xffff) as u32;
    let ctx_a = unsafe { core::ptr::read_volatile(&(*sc).tmp[2]) };
    let plen = (settings.key_prefix_len as u64) & 0x1f;
    let args = |i: u64, from: u32, to: u32| {
        i | (l_idx as u64 & 0x1ff) << 1
            | (from as u64 & 0x7ff) << 10
            | (to as u64 & 0x7ff) << 21
            | plen << 32
    };
    // The whole segment is judged into loc[1]; a retransmission's old part into loc[0].
    let first = if at == AT_RETRANS && k < len { 0 } else { 1 };
    locate(ctx, sc, l, args(first, 0, k), ctx_a);
    let a = unsafe { &(*sc).loc[first as usize] };
    if at == AT_RETRANS {
        let Some(f) = known else {
            return Verdict::of(Reason::DropMalformed);
        };
        let f = unsafe { &*f };
        // Both copies of the bytes before the old end must leave the stream in the same
        // place, and name the same client: the server may hold either.
        if a.result == http::SCAN_MALFORMED
            || ctx_to_u64(a.ctx) != ctx_to_u64(f.ctx_next)
            || (a.proxied != 0 && (a.family != f.family || !same16(&a.client, &f.client)))
            || (a.ctx.flags & CTX_HELLO != 0 && !same_pending(sc))
        {
            return Verdict::of(Reason::DropMalformed);
        }
        if k < len {
            locate(ctx, sc, l, args(1, k, len), ctx_to_u64(f.ctx_next));
            combine(sc);
        }
    }
    if at == AT_FRESH && l.locator == LOCATOR_FIX {
        // A FIX session names its key in the Logon only (tag 553): a message without it on
        // a connection the filter does not know may belong to a session logged on before
        // the flow was evicted (or before the program), whose key was never judged here.
        // A Logon (35=A) starts a session: one without the tag names no key.
        let out = unsafe { &mut (*sc).loc[1] };
        if out.result != http::SCAN_KEY && unsafe { (*sc).io.logon } == 0 {
            out.result = http::SCAN_MALFORMED;
        }
    }
    // The verdict and the flow's new state, in a function of its own: its frame is not on
    // the locators' call chain, which shares the 512-byte stack.
    let packed = slot as u64
        | (at as u64) << 8
        | (proxied as u64) << 10
        | (k as u64 & 0xffff) << 16
        | (len as u64 & 0xffff) << 32;
    settle(sc, settings, known.unwrap_or(core::ptr::null_mut()), packed)
}

/// Turns what the locator found into the verdict, and records the flow.
#[inline(never)]
fn settle(sc: ScratchPtr, settings: &Settings, known: *mut Flow, packed: u64) -> Verdict {
    let slot = (packed & 0xff) as u32;
    let at = ((packed >> 8) & 3) as u8;
    let proxied = (packed >> 10) & 1 != 0;
    let k = ((packed >> 16) & 0xffff) as u32;
    let len = ((packed >> 32) & 0xffff) as u32;
    let known = if known.is_null() { None } else { Some(known) };
    let seg = unsafe { &(*sc).seg };
    let seq = seg.seq;
    let fk = flow_key_ref(sc);
    let fresh_ctx = StreamCtx {
        flags: CTX_START | CTX_LINE | if proxied { CTX_PROXY } else { 0 },
        hdr_len: 0,
        rec_left: 0,
        hdr: [0; 4],
    };
    let out = unsafe { &(*sc).loc[1] };
    // The flow being built, in scratch; the client is the PROXY header's when there is one.
    let fl = unsafe { &mut (*sc).flow };
    if out.proxied != 0 {
        fl.family = out.family;
        fl.client = out.client;
    } else {
        match known {
            Some(f) if unsafe { (*f).flags } & FLOW_PROXIED != 0 => unsafe {
                fl.family = (*f).family;
                fl.client = (*f).client;
            },
            _ => {
                fl.family = seg.family;
                fl.client = seg.src;
            }
        }
    }
    let extra = if proxied { FLOW_PROXIED } else { 0 };
    let verdict = match out.result {
        http::SCAN_KEY => {
            unsafe {
                let p = fl.prefix.bytes.as_mut_ptr() as *mut u64;
                core::ptr::write_unaligned(p, out.prefix[0]);
                core::ptr::write_unaligned(p.add(1), out.prefix[1]);
            }
            // Keep-alive clients send the key with every request: the same key on a
            // connection judged under the live generation has the same verdict.
            let cached = match known {
                Some(f) => unsafe {
                    (*f).flags & FLOW_HAS_KEY != 0
                        && (*f).generation == settings.generation
                        && same16(&(*f).prefix.bytes, &fl.prefix.bytes)
                        && same16(&(*f).client, &fl.client)
                },
                None => false,
            };
            let (reason, stat_idx) = match known {
                Some(f) if cached => unsafe {
                    (
                        Reason::from_u8((*f).reason).unwrap_or(Reason::DropMalformed),
                        (*f).stat_idx,
                    )
                },
                _ => policy::judge_key(slot, settings, &fl.prefix, fl.family, &fl.client),
            };
            let first = match known {
                Some(f) => (unsafe { (*f).flags } & FLOW_HAS_KEY) == 0,
                None => true,
            };
            // Activity, and the key's rate limit: a message over it is dropped, but the flow
            // keeps the policy's verdict and its position, so the client's retransmission is
            // judged again (docs/DATAPATH.md "Rate limits").
            let limited = risk::record(
                sc,
                stat_idx as u64 | (reason as u64) << 32 | (first as u64) << 40,
            );
            if reason.is_drop() || limited {
                note_key(sc, &fl.prefix, &fl.client);
            }
            if limited && first {
                // Over the limit on its first key message: the connection stays unjudged, so
                // its retransmission is judged (and counted) as a first message again.
                fl.reason = Reason::PassHandshake as u8;
                fl.flags = extra;
                fl.stat_idx = NO_STAT;
            } else {
                fl.reason = reason as u8;
                fl.flags = FLOW_HAS_KEY | extra;
                fl.stat_idx = stat_idx;
            }
            let reason = if limited {
                Reason::DropRateLimited
            } else {
                reason
            };
            Verdict { reason, stat_idx }
        }
        tls::SCAN_NOKEY => no_key_verdict(sc, settings, extra),
        http::SCAN_NONE | tls::SCAN_PENDING => match known {
            Some(f) => {
                let f = unsafe { &mut *f };
                if f.flags & FLOW_HAS_KEY == 0 && f.reason == Reason::PassHandshake as u8 {
                    if out.result == tls::SCAN_PENDING {
                        keep_verdict(sc, f);
                        Verdict::of(Reason::PassHandshake)
                    } else {
                        // The first request after a PROXY header carried no key.
                        no_key_verdict(sc, settings, extra)
                    }
                } else {
                    let v = follow(sc, slot, settings, f);
                    keep_verdict(sc, f);
                    v
                }
            }
            None => {
                if out.result == tls::SCAN_PENDING {
                    let fl = unsafe { &mut (*sc).flow };
                    fl.reason = Reason::PassHandshake as u8;
                    fl.flags = extra;
                    fl.stat_idx = NO_STAT;
                    fl.prefix = KeyPrefix { bytes: [0; 16] };
                    Verdict::of(Reason::PassHandshake)
                } else {
                    no_key_verdict(sc, settings, extra)
                }
            }
        },
        _ => return Verdict::of(Reason::DropMalformed),
    };
    // Record the verdict; the stream position moves only with bytes the server may get.
    let mut verdict = verdict;
    let mut passes = !verdict.reason.is_drop() || settings.flags & SETTING_ENFORCE == 0;
    let fl = unsafe { &mut (*sc).flow };
    let held = match known {
        Some(f) => (unsafe { (*f).flags } & FLOW_HELD) != 0,
        None => false,
    };
    if passes && !held {
        // The first bytes this connection passes: remember it where no eviction reaches. A
        // full table cannot remember it, so nothing passes.
        if held_passed(fk) {
            fl.flags |= FLOW_HELD;
        } else {
            verdict = Verdict::of(Reason::DropMalformed);
            passes = settings.flags & SETTING_ENFORCE == 0;
        }
    } else if held {
        fl.flags |= FLOW_HELD;
    }
    fl.generation = settings.generation;
    fl._pad = 0;
    match known {
        Some(f) => {
            let f = unsafe { &*f };
            (fl.next_seq, fl.last_seq, fl.ctx_next, fl.ctx_last) =
                (f.next_seq, f.last_seq, f.ctx_next, f.ctx_last);
            fl.start_seq = f.start_seq;
            fl.prev_seen_s = f.prev_seen_s;
            fl.flags |= f.flags & FLOW_LONG;
            if passes && (at == AT_NEXT || k < len) {
                (fl.last_seq, fl.ctx_last) = (f.next_seq, f.ctx_next);
                (fl.next_seq, fl.ctx_next) = (seq.wrapping_add(len), out.ctx);
            }
            if fl.next_seq.wrapping_sub(fl.start_seq) >= 1 << 31 {
                // Each segment moves it by less than 64 KiB: set long before it could wrap.
                fl.flags |= FLOW_LONG;
            }
        }
        None => {
            fl.start_seq = seq;
            fl.prev_seen_s = unsafe { (*sc).prev_seen };
            (fl.last_seq, fl.ctx_last) = (seq, fresh_ctx);
            if passes {
                (fl.next_seq, fl.ctx_next) = (seq.wrapping_add(len), out.ctx);
            } else {
                (fl.next_seq, fl.ctx_next) = (seq, fresh_ctx);
            }
        }
    }
    fl.seen_s = coarse_secs();
    let pending_next = fl.ctx_next.flags & CTX_HELLO != 0;
    match known {
        // Rewritten in place: replacing an LRU element costs a node swap.
        Some(f) => unsafe { *f = *fl },
        None => {
            let _ = FLOWS.insert(fk, &*fl, 0);
        }
    }
    if pending_next && passes {
        // Where the ClientHello's walk goes on in the next segment.
        let io = unsafe { &(*sc).tls };
        let t = unsafe { &mut (*sc).pending };
        t.tls_seq = io.tls_seq as u32;
        t.tls_left = io.tls_left as u32;
        t.carry_len = (io.carry_len as usize).min(TLS_CARRY) as u8;
        t.carry = io.carry;
        let _ = TLS_PENDING.insert(fk, &*t, 0);
    }
    verdict
}

/// Records a SYN's ISN on its 5-tuple; false when the table is full.
#[inline(never)]
fn note_syn(fk: &FlowKey, isn: u32) -> bool {
    let Some(r) = HELD.get_ptr_mut(fk) else {
        // NOEXIST: a record made meanwhile (another CPU) is never overwritten with less.
        return HELD
            .insert(fk, &Held { isn, flags: 0 }, BPF_NOEXIST as u64)
            .is_ok();
    };
    let r = unsafe { &mut *r };
    if r.isn != isn {
        let second = r.flags & (HELD_SECOND | HELD_POISON);
        if second == 0 && far(isn, r.isn) {
            r.isn = isn;
            held_or(r, HELD_SECOND);
        } else if second == HELD_SECOND && far(isn, r.isn) && renewable(fk, r.isn) {
            // The stream before the flow's is closed: the server may hold only the flow's
            // stream, so the tuple may start one more, as it could its second.
            r.isn = isn;
        } else {
            // Two ISNs it cannot tell apart, or a third: where a stream starts is lost.
            held_or(r, HELD_POISON);
        }
    }
    true
}

/// Whether the tuple's flow follows the stream of the last recorded SYN (`isn`), and the
/// stream it replaced has sent no data for the daemon's idle time: the same assumption the
/// daemon's sweep forgets whole tuples on (servers close connections idle that long).
#[inline(always)]
fn renewable(fk: &FlowKey, isn: u32) -> bool {
    let idle = match HELD_IDLE.get(0) {
        Some(&i) if i != 0 => i,
        _ => return false,
    };
    let Some(f) = (unsafe { FLOWS.get(fk) }) else {
        return false;
    };
    let now = coarse_secs();
    f.flags & FLOW_LONG == 0
        && f.start_seq == isn.wrapping_add(1)
        && f.prev_seen_s != 0
        && now.wrapping_sub(f.prev_seen_s) >= idle
}

#[inline(always)]
fn held_or(r: &mut Held, bits: u32) {
    // One 64-bit atomic (BPF has no 32-bit one at this CPU level): `flags` is the value's
    // upper half on this little-endian target.
    // SAFETY: `r` points into a map value, 8-byte aligned and live for this program run.
    unsafe {
        core::intrinsics::atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(
            r as *mut Held as *mut u64,
            (bits as u64) << 32,
        )
    };
}

/// Whether data at `seq` starts the second connection recorded on the tuple in scratch.
#[inline(always)]
fn second_start(sc: ScratchPtr, seq: u32) -> bool {
    match unsafe { HELD.get(flow_key_ref(sc)) } {
        Some(r) => {
            r.flags & (HELD_SECOND | HELD_POISON) == HELD_SECOND && seq == r.isn.wrapping_add(1)
        }
        None => false,
    }
}

/// Marks the tuple's connection as having passed bytes; false when it cannot be recorded.
#[inline(always)]
fn held_passed(fk: &FlowKey) -> bool {
    match HELD.get_ptr_mut(fk) {
        Some(r) => {
            held_or(unsafe { &mut *r }, HELD_PASSED);
            true
        }
        // Its record was swept while the flow lived (a SYN long before the data).
        None => HELD
            .insert(
                fk,
                &Held {
                    isn: 0,
                    flags: HELD_PASSED,
                },
                BPF_NOEXIST as u64,
            )
            .is_ok(),
    }
}

/// The coarse monotonic clock in seconds (the daemon reads the same clock for `seen_s`).
#[inline(always)]
pub fn coarse_secs() -> u32 {
    // SAFETY: a helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Whether `seq` lies more than a receive window away from every byte the server may be
/// waiting for on the flow's stream: its `rcv_nxt` is somewhere in `[start_seq, next_seq]`
/// (the server may have dropped passed bytes: a bad checksum, a closed window), not only
/// near the filter's own positions.
#[inline(always)]
fn outside_stream(seq: u32, f: &Flow) -> bool {
    if f.flags & FLOW_LONG != 0 || f.start_seq == 0 {
        // Past 2 GiB the span may have wrapped; 0: a flow from before the start was kept.
        return false;
    }
    let lo = f.start_seq.wrapping_sub(MAX_WINDOW);
    // Below 2^31 + 2 windows: `FLOW_LONG` is set before the stream passes 2 GiB.
    let span = f.next_seq.wrapping_sub(lo).wrapping_add(MAX_WINDOW);
    seq.wrapping_sub(lo) > span
}

/// Receive windows stay below this (Linux caps them by tcp_rmem, 6 MiB by default).
const MAX_WINDOW: u32 = 1 << 26;

/// Whether sequence numbers `a` and `b` are further apart than any receive window.
#[inline(always)]
fn far(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d > MAX_WINDOW && d.wrapping_neg() > MAX_WINDOW
}

/// Whether the ClientHello walk a retransmission left in scratch is the one recorded for
/// the connection (same position, same carried bytes).
#[inline(always)]
fn same_pending(sc: ScratchPtr) -> bool {
    let Some(t) = (unsafe { TLS_PENDING.get(flow_key_ref(sc)) }) else {
        return false;
    };
    let io = unsafe { &(*sc).tls };
    if t.tls_seq as u64 != io.tls_seq & 0xffff_ffff
        || t.tls_left as u64 != io.tls_left
        || t.carry_len as u64 != io.carry_len
    {
        return false;
    }
    let mut diff = 0u64;
    for i in 0..TLS_CARRY / 8 {
        unsafe {
            diff |= *(t.carry.as_ptr() as *const u64).add(i)
                ^ *(io.carry.as_ptr() as *const u64).add(i);
        }
    }
    diff == 0
}

/// `loc[0]` then `loc[1]`: two ranges of one segment (a retransmission and what it adds),
/// combined into `loc[1]`. Keys must agree; anything unjudgeable in either is unjudgeable.
#[inline(always)]
fn combine(sc: ScratchPtr) {
    let a = unsafe { &(*sc).loc[0] };
    let out = unsafe { &mut (*sc).loc[1] };
    let b_result = out.result;
    if a.result == http::SCAN_MALFORMED || b_result == http::SCAN_MALFORMED {
        out.result = http::SCAN_MALFORMED;
        return;
    }
    if a.result == http::SCAN_KEY {
        if b_result == http::SCAN_KEY
            && (out.prefix[0] != a.prefix[0] || out.prefix[1] != a.prefix[1])
        {
            out.result = http::SCAN_MALFORMED;
        } else if b_result != http::SCAN_KEY {
            out.result = http::SCAN_KEY;
            out.prefix = a.prefix;
        }
    } else if a.result == tls::SCAN_NOKEY && b_result == http::SCAN_NONE {
        out.result = tls::SCAN_NOKEY;
    }
    if a.proxied != 0 {
        out.proxied = 1;
        out.family = a.family;
        out.client = a.client;
    }
}

/// Keeps a known connection's verdict fields in the flow being built.
#[inline(always)]
fn keep_verdict(sc: ScratchPtr, f: &Flow) {
    let fl = unsafe { &mut (*sc).flow };
    fl.reason = f.reason;
    fl.flags = f.flags & (FLOW_HAS_KEY | FLOW_PROXIED);
    fl.stat_idx = f.stat_idx;
    fl.prefix = f.prefix;
}

/// A message that positively carries no key: the `no_key` rule decides.
#[inline(always)]
fn no_key_verdict(sc: ScratchPtr, settings: &Settings, extra: u8) -> Verdict {
    let reason = no_key_reason(settings);
    let fl = unsafe { &mut (*sc).flow };
    fl.reason = reason as u8;
    fl.flags = extra;
    fl.stat_idx = NO_STAT;
    fl.prefix = KeyPrefix { bytes: [0; 16] };
    Verdict::of(reason)
}

/// Runs the listener's locator over payload bytes `[from, to)` (offsets into the payload),
/// from the stream context `c`, into `loc[i]`.
#[inline(always)]
fn locate(ctx: &XdpContext, sc: ScratchPtr, l: &Listener, args: u64, c: u64) {
    // BPF calls take five arguments: the small ones travel packed.
    let (i, l_idx, from, to, plen) = (
        (args & 1) as usize,
        ((args >> 1) & 0x1ff) as u32,
        ((args >> 10) & 0x7ff) as u32,
        ((args >> 21) & 0x7ff) as u32,
        ((args >> 32) & 0x1f) as usize,
    );
    let c = ctx_from_u64(c);
    let seg = unsafe { &(*sc).seg };
    let out = unsafe { &mut (*sc).loc[i & 1] };
    out.result = http::SCAN_MALFORMED;
    out.prefix = [0; 2];
    out.ctx = c;
    out.proxied = 0;
    let base = seg.payload_off;
    let mut start = base + (from as usize & 0x7ff);
    let end = base + (to as usize & 0x7ff);
    let mut flags = c.flags;
    if flags & CTX_PROXY != 0 {
        // A connection's first bytes must be a PROXY header from a trusted proxy.
        if l.proxy_set == 0 || !policy::in_set(l.proxy_set, seg.family, &seg.src) {
            return;
        }
        let io = unsafe { &mut (*sc).proxy };
        io.start = start as u64;
        io.end = end as u64;
        io.result = 0;
        io.len = 0;
        proxy::keywall_proxy(ctx.ctx, io);
        match io.result {
            proxy::PROXY_CLIENT => {
                out.client = io.addr;
                out.family = io.family as u8;
            }
            proxy::PROXY_LOCAL => {
                out.client = seg.src;
                out.family = seg.family;
            }
            _ => return,
        }
        out.proxied = 1;
        start += (io.len & 0x7ff) as usize;
        flags &= !CTX_PROXY;
        out.ctx.flags = flags;
        if start >= end {
            out.result = tls::SCAN_PENDING;
            return;
        }
    }
    match l.locator {
        LOCATOR_HTTP_HEADER | LOCATOR_FIX => {
            let fix = l.locator == LOCATOR_FIX;
            // The arguments travel in per-CPU scratch: the BPF stack is shared by both frames.
            let io = unsafe { &mut (*sc).io };
            io.start = start as u64;
            io.end = end as u64;
            io.plen = plen as u64;
            io.listener = l_idx as u64;
            io.sep = if fix { 1 } else { 0x0f };
            io.sep_fold = if fix { 0 } else { 0x07 };
            io.fix = fix as u64;
            io.first = (flags & CTX_START != 0) as u64;
            io.at_line = (flags & (CTX_START | CTX_LINE) != 0) as u64;
            io.logon = 0;
            io.result = http::SCAN_MALFORMED;
            http::keywall_http_scan(ctx.ctx, io);
            out.result = io.result;
            out.prefix = io.prefix;
            out.ctx.flags = if io.at_line != 0 { CTX_LINE } else { 0 };
        }
        LOCATOR_TLS_SNI => {
            let io = unsafe { &mut (*sc).tls };
            io.start = start as u64;
            io.end = end as u64;
            io.listener = l_idx as u64;
            io.plen = plen as u64;
            io.seq = seg.seq.wrapping_add((start - base) as u32) as u64;
            io.ctx_flags = flags as u64;
            io.rec_left = c.rec_left as u64;
            io.hdr_len = c.hdr_len as u64;
            io.hdr = u32::from_le_bytes(c.hdr) as u64;
            if flags & CTX_HELLO != 0 {
                match unsafe { TLS_PENDING.get(flow_key_ref(sc)) } {
                    Some(t) => {
                        io.tls_seq = t.tls_seq as u64;
                        io.tls_left = t.tls_left as u64;
                        io.carry_len = t.carry_len as u64;
                        io.carry = t.carry;
                    }
                    // The walk's state was evicted: cannot judge.
                    None => return,
                }
            }
            tls::keywall_tls_scan(ctx.ctx, io);
            out.result = io.result;
            out.prefix = io.prefix;
            out.ctx = StreamCtx {
                flags: io.ctx_flags as u8,
                hdr_len: io.hdr_len as u8,
                rec_left: io.rec_left as u16,
                hdr: (io.hdr as u32).to_le_bytes(),
            };
        }
        // Locators this build does not know fail closed.
        _ => {}
    }
}

/// Two 16-byte values compared as two words (no memcmp call, no stack).
#[inline(always)]
fn same16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr() as *const u64, b.as_ptr() as *const u64);
    unsafe { ld64(a) == ld64(b) && ld64(a.add(1)) == ld64(b.add(1)) }
}

#[inline(always)]
fn ctx_to_u64(c: StreamCtx) -> u64 {
    u64::from_le_bytes([
        c.flags,
        c.hdr_len,
        c.rec_left as u8,
        (c.rec_left >> 8) as u8,
        c.hdr[0],
        c.hdr[1],
        c.hdr[2],
        c.hdr[3],
    ])
}

#[inline(always)]
fn ctx_from_u64(v: u64) -> StreamCtx {
    let b = v.to_le_bytes();
    StreamCtx {
        flags: b[0],
        hdr_len: b[1],
        rec_left: u16::from_le_bytes([b[2], b[3]]),
        hdr: [b[4], b[5], b[6], b[7]],
    }
}

/// The flow key `flow_key_in` built for this packet.
#[inline(always)]
fn flow_key_ref(sc: ScratchPtr) -> &'static FlowKey {
    unsafe { &(*sc).flow_key }
}

/// Keeps a refused packet's key and client for its drop event.
#[inline(always)]
fn note_key(sc: ScratchPtr, prefix: &KeyPrefix, client: &[u8; 16]) {
    unsafe {
        (*sc).ev_prefix = *prefix;
        (*sc).ev_client = *client;
        (*sc).seen |= SEEN_KEY;
    }
}

#[inline(always)]
fn no_key_reason(settings: &Settings) -> Reason {
    if settings.flags & SETTING_NO_KEY_DROP != 0 {
        Reason::DropNoKey
    } else {
        Reason::PassNoKey
    }
}

/// A packet of a judged connection: re-judge it if the policy changed since, then follow.
#[inline(always)]
fn follow(sc: ScratchPtr, slot: u32, settings: &Settings, f: &mut Flow) -> Verdict {
    if f.generation != settings.generation {
        let reason = if f.flags & FLOW_HAS_KEY != 0 {
            let (reason, stat_idx) =
                policy::judge_key(slot, settings, &f.prefix, f.family, &f.client);
            f.stat_idx = stat_idx;
            reason
        } else if f.reason == Reason::PassHandshake as u8 {
            // Still waiting for its first request (after a PROXY header).
            Reason::PassHandshake
        } else {
            no_key_reason(settings)
        };
        f.reason = reason as u8;
        f.generation = settings.generation;
    }
    let dropped = Reason::from_u8(f.reason)
        .map(|r| r.is_drop())
        .unwrap_or(true);
    if dropped && f.flags & FLOW_HAS_KEY != 0 {
        note_key(sc, &f.prefix, &f.client);
    }
    // A key's passes are counted where it is judged (a connection, a request), not on every
    // packet that follows: that keeps the shared counter line and the clock read off the
    // established path. Its drops stay counted per packet (a refused connection retrying).
    Verdict {
        reason: if dropped {
            Reason::DropFlow
        } else {
            Reason::PassFlow
        },
        stat_idx: if dropped { f.stat_idx } else { NO_STAT },
    }
}

#[inline(always)]
fn finish(v: &Verdict, enforce: bool, bytes: u64) -> u32 {
    let drop = v.reason.is_drop();
    let slot = if drop && !enforce {
        AUDIT_OFFSET + v.reason as u32
    } else {
        v.reason as u32
    };
    if let Some(c) = REASONS.get_ptr_mut(slot) {
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
    if v.stat_idx != NO_STAT {
        if let Some(k) = KEY_STATS.get_ptr_mut(v.stat_idx) {
            // Shared across CPUs: atomic adds; the timestamp is a plain store.
            unsafe {
                let field = if drop {
                    core::ptr::addr_of_mut!((*k).dropped)
                } else {
                    core::ptr::addr_of_mut!((*k).passed)
                };
                // An atomic add the BPF ISA has natively (the stable atomics API needs CAS,
                // which the bpf target does not advertise).
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, 1);
                (*k).last_seen_ns = bpf_ktime_get_coarse_ns();
            }
        }
    }
    if drop && enforce {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
