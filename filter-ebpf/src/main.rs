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
mod scratch;
mod swar;
mod tls;

use core::intrinsics::AtomicOrdering;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::XdpContext,
};
use filter_common::{
    AUDIT_OFFSET, AllowKey, COUNTER_SLOTS, Control, Counter, DEFAULT_MAX_ALLOW, DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_KEYS, DEFAULT_MAX_SETS, DEFAULT_PREFILTER_WORDS_LOG2, EVENTS_RING_BYTES,
    FLOW_HAS_KEY, FLOW_PROXIED, FLOW_TLS_PENDING, Flow, FlowKey, KeyEntry, KeyPrefix, KeyStats,
    LISTENER_PROXY_PROTOCOL, LOCATOR_FIX, LOCATOR_HTTP_HEADER, LOCATOR_TLS_SNI, Listener,
    MAX_LISTENERS, Reason, SETTING_ACTION_RESET, SETTING_ENFORCE, SETTING_LOADED,
    SETTING_NO_KEY_DROP, SETTING_PREFILTER, SetMeta, Settings, TLS_CARRY, TlsPending,
};

use crate::{
    parse::{Parsed, Segment, TCP_ACK, TCP_RST, TCP_SYN},
    proxy::ProxyIo,
    scratch::{ScanIo, Scratch},
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
#[inline(always)]
pub fn ld64(p: *const u64) -> u64 {
    unsafe { core::ptr::read_volatile(p) }
}

/// One 2-byte load at `p`, whatever its alignment (see `ld64`).
#[inline(always)]
pub fn ld16(p: *const u16) -> u16 {
    unsafe { core::ptr::read_volatile(p) }
}

/// Per-CPU scratch, looked up once per packet.
pub type ScratchPtr = *mut Scratch;

/// Returns `x`, laundered through map memory so the verifier sees an unknown scalar.
///
/// Paths that reach the same point with different offsets (VLAN tags, IP options, extension
/// headers) then look alike and are verified once, instead of once per combination. Every
/// use is bounds checked after this, so nothing is trusted that was not checked.
#[inline(always)]
pub fn forget(sc: ScratchPtr, x: usize) -> usize {
    forget_in(sc, 0, x)
}

/// `forget` through word `i` of the scratch, for several values at once.
#[inline(always)]
pub fn forget_in(sc: ScratchPtr, i: usize, x: usize) -> usize {
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

/// The ceiling for benchmarks: drop everything.
#[xdp]
pub fn keywall_baseline_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
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
    if seg.payload_off >= seg.payload_end {
        // No payload: handshakes and bare ACKs carry no key. RSTs always pass so a server can
        // tear down; other packets of a known connection follow its verdict.
        if seg.tcp_flags & (TCP_SYN | TCP_RST) != 0 {
            if seg.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
                && settings.flags & SETTING_PREFILTER != 0
                && !prefilter::source_may_connect(slot, settings, l, seg)
            {
                return Verdict::of(Reason::DropPrefilter);
            }
            if seg.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && l.locator != LOCATOR_HTTP_HEADER {
                // A new connection on this 5-tuple: what was judged on an old one is void, as
                // a judged TLS or FIX connection is not scanned again. (HTTP segments are
                // always scanned, so those entries need no such care.)
                let _ = FLOWS.remove(flow_key_in(sc, seg));
            }
            return Verdict::of(Reason::PassHandshake);
        }
        return match FLOWS.get_ptr_mut(flow_key_in(sc, seg)) {
            Some(f) => follow(sc, slot, settings, unsafe { &mut *f }),
            None => Verdict::of(Reason::PassHandshake),
        };
    }
    let fk = flow_key_in(sc, seg);
    let plen = (settings.key_prefix_len as usize) & 0x1f;
    let mut start = seg.payload_off;
    let mut client = seg.src;
    let mut family = seg.family;
    let mut known = FLOWS.get_ptr_mut(fk);
    let proxied = l.flags & LISTENER_PROXY_PROTOCOL != 0;
    let extra = if proxied { FLOW_PROXIED } else { 0 };
    if proxied {
        match known {
            Some(f) if unsafe { (*f).flags } & FLOW_PROXIED != 0 => unsafe {
                client = (*f).client;
                family = (*f).family;
            },
            _ => {
                // A connection's first payload must be a PROXY header from a trusted proxy.
                if l.proxy_set == 0 || !policy::in_set(l.proxy_set, seg.family, &seg.src) {
                    return Verdict::of(Reason::DropMalformed);
                }
                let io = unsafe { &mut (*sc).proxy };
                *io = ProxyIo {
                    start: seg.payload_off as u64,
                    end: seg.payload_end as u64,
                    ..Default::default()
                };
                proxy::keywall_proxy(ctx.ctx, io);
                match io.result {
                    proxy::PROXY_CLIENT => {
                        client = io.addr;
                        family = io.family as u8;
                    }
                    proxy::PROXY_LOCAL => {}
                    _ => return Verdict::of(Reason::DropMalformed),
                }
                start += (io.len & 0x7ff) as usize;
                // Known from now on as proxied, with no key yet (pending).
                remember_pending(sc, fk, known, settings, FLOW_PROXIED, family, client);
                if start >= seg.payload_end {
                    return Verdict::of(Reason::PassHandshake);
                }
                known = FLOWS.get_ptr_mut(fk);
            }
        }
    }
    if l.locator != LOCATOR_HTTP_HEADER {
        // After a ClientHello everything is encrypted, and a FIX session logs on once: a
        // judged connection of those can carry no other key, so it just follows its verdict.
        if let Some(f) = known {
            let f = unsafe { &mut *f };
            if f.flags & FLOW_HAS_KEY != 0 {
                return follow(sc, slot, settings, f);
            }
        }
    }
    // The locator reports a key, none, or a segment it cannot judge safely.
    let (result, prefix) = match l.locator {
        LOCATOR_HTTP_HEADER | LOCATOR_FIX => {
            // The arguments travel in per-CPU scratch: the BPF stack is shared by both frames.
            let io = unsafe { &mut (*sc).io };
            *io = ScanIo {
                start: start as u64,
                end: seg.payload_end as u64,
                plen: plen as u64,
                listener: l_idx as u64,
                sep: if l.locator == LOCATOR_FIX {
                    1
                } else {
                    b'\n' as u64
                },
                result: http::SCAN_MALFORMED,
                prefix: [0; 2],
            };
            http::keywall_http_scan(ctx.ctx, io);
            (io.result, io.prefix)
        }
        LOCATOR_TLS_SNI => {
            let io = unsafe { &mut (*sc).tls };
            io.start = start as u64;
            io.end = seg.payload_end as u64;
            io.listener = l_idx as u64;
            io.plen = plen as u64;
            io.seq = seg.seq as u64;
            io.pending = 0;
            if let Some(f) = known {
                if unsafe { (*f).flags } & FLOW_TLS_PENDING != 0 {
                    if let Some(t) = unsafe { TLS_PENDING.get(fk) } {
                        io.pending = 1;
                        io.tls_seq = t.tls_seq as u64;
                        io.tls_left = t.tls_left as u64;
                        io.carry_len = t.carry_len as u64;
                        io.carry = t.carry;
                    }
                }
            }
            tls::keywall_tls_scan(ctx.ctx, io);
            if io.result == tls::SCAN_PENDING {
                // The ClientHello goes on in the next segment: this part passes, and the
                // connection keeps where the walk stopped.
                remember_pending(sc, fk, known, settings, FLOW_TLS_PENDING, family, client);
                let t = unsafe { &mut (*sc).pending };
                t.tls_seq = io.tls_seq as u32;
                t.tls_left = io.tls_left as u32;
                t.carry_len = (io.carry_len as usize).min(TLS_CARRY) as u8;
                t.carry = io.carry;
                let _ = TLS_PENDING.insert(fk, &*t, 0);
                return Verdict::of(Reason::PassHandshake);
            }
            (io.result, io.prefix)
        }
        // Locators this build does not know fail closed.
        _ => (http::SCAN_MALFORMED, [0; 2]),
    };
    match result {
        http::SCAN_KEY => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&prefix[0].to_le_bytes());
            bytes[8..].copy_from_slice(&prefix[1].to_le_bytes());
            let prefix = KeyPrefix { bytes };
            if let Some(f) = known {
                let f = unsafe { &mut *f };
                // Keep-alive clients send the key with every request: the same key on a
                // connection judged under the live generation has the same verdict.
                if f.flags & FLOW_HAS_KEY != 0
                    && f.generation == settings.generation
                    && f.prefix == prefix
                {
                    let reason = Reason::from_u8(f.reason).unwrap_or(Reason::DropMalformed);
                    if reason.is_drop() {
                        note_key(sc, &prefix, &client);
                    }
                    return Verdict {
                        reason,
                        stat_idx: f.stat_idx,
                    };
                }
            }
            let (reason, stat_idx) = policy::judge_key(slot, settings, &prefix, family, &client);
            if reason.is_drop() {
                note_key(sc, &prefix, &client);
            }
            remember(
                sc,
                fk,
                known,
                settings,
                reason,
                FLOW_HAS_KEY | extra,
                stat_idx,
                prefix,
                family,
                client,
            );
            Verdict { reason, stat_idx }
        }
        http::SCAN_NONE => match known {
            Some(f) => {
                let f = unsafe { &mut *f };
                if f.flags & FLOW_HAS_KEY == 0 && f.reason == Reason::PassHandshake as u8 {
                    // The first request after a PROXY header, or the rest of a ClientHello,
                    // carried no key.
                    let reason = no_key_reason(settings);
                    f.reason = reason as u8;
                    f.flags &= !FLOW_TLS_PENDING;
                    f.generation = settings.generation;
                    Verdict::of(reason)
                } else {
                    follow(sc, slot, settings, f)
                }
            }
            None => {
                let reason = no_key_reason(settings);
                let none = KeyPrefix { bytes: [0; 16] };
                remember(
                    sc, fk, None, settings, reason, extra, NO_STAT, none, family, client,
                );
                Verdict::of(reason)
            }
        },
        _ => Verdict::of(Reason::DropMalformed),
    }
}

/// Records a connection that has no key yet but is expected to show one (after a PROXY
/// header, or in the rest of a ClientHello): `pass_handshake` until then.
#[inline(always)]
fn remember_pending(
    sc: ScratchPtr,
    fk: &FlowKey,
    known: Option<*mut Flow>,
    settings: &Settings,
    flags: u8,
    family: u8,
    client: [u8; 16],
) {
    let none = KeyPrefix { bytes: [0; 16] };
    remember(
        sc,
        fk,
        known,
        settings,
        Reason::PassHandshake,
        flags,
        NO_STAT,
        none,
        family,
        client,
    );
}

/// Records a connection's verdict: rewritten in place when the connection is known (replacing
/// an LRU element costs a node swap), inserted otherwise. Built in scratch, not on the stack.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn remember(
    sc: ScratchPtr,
    fk: &FlowKey,
    known: Option<*mut Flow>,
    settings: &Settings,
    reason: Reason,
    flags: u8,
    stat_idx: u32,
    prefix: KeyPrefix,
    family: u8,
    client: [u8; 16],
) {
    let flow = unsafe { &mut (*sc).flow };
    *flow = Flow {
        generation: settings.generation,
        reason: reason as u8,
        flags,
        family,
        _pad: 0,
        stat_idx,
        _pad2: 0,
        prefix,
        client,
    };
    match known {
        Some(f) => unsafe { *f = *flow },
        None => {
            let _ = FLOWS.insert(fk, &*flow, 0);
        }
    }
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
    Verdict {
        reason: if dropped {
            Reason::DropFlow
        } else {
            Reason::PassFlow
        },
        stat_idx: f.stat_idx,
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
