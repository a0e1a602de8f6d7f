//! Sampled drop events: a per-CPU token bucket in front of the ring buffer, so a flood costs
//! the daemon at most `EVENT_RATE_PER_CPU` records a second per CPU (in bursts of
//! `EVENT_BURST`), and the program a clock read and a few stores per dropped packet.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use filter_common::{
    COUNTER_EVENTS_SENT, COUNTER_EVENTS_SUPPRESSED, EVENT_AUDIT, EVENT_BURST, EVENT_HAS_KEY,
    EVENT_RATE_PER_CPU,
};

use crate::{EVENTS, REASONS, SEEN_KEY, SEEN_SEG, ScratchPtr, Verdict};

/// Nanoseconds of budget one event costs, and the most budget a CPU can save up.
const COST_NS: u64 = 1_000_000_000 / EVENT_RATE_PER_CPU;
const CAP_NS: u64 = COST_NS * EVENT_BURST;
/// Drops suppressed without reading the clock once the bucket ran dry (a flood pays a
/// decrement per packet, not a helper call).
const SKIP_WHEN_EMPTY: u64 = 31;

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = REASONS.get_ptr_mut(slot) {
        unsafe { (*c).packets += 1 };
    }
}

#[inline(always)]
pub fn sample(sc: ScratchPtr, v: &Verdict, audit: bool, seen: u8) {
    let s = unsafe { &mut *sc };
    if s.ev_skip > 0 {
        // The bucket was empty a moment ago: a flood. Skip the clock for a while.
        s.ev_skip -= 1;
        count(COUNTER_EVENTS_SUPPRESSED);
        return;
    }
    // The coarse clock (a jiffy's resolution) is plenty for a 200/s bucket and costs less.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut budget = s.ev_budget + now.wrapping_sub(s.ev_last);
    if budget > CAP_NS {
        budget = CAP_NS;
    }
    s.ev_last = now;
    if budget < COST_NS {
        s.ev_budget = budget;
        s.ev_skip = SKIP_WHEN_EMPTY;
        count(COUNTER_EVENTS_SUPPRESSED);
        return;
    }
    s.ev_budget = budget - COST_NS;
    let e = &mut s.event;
    e.time_ns = now;
    e.reason = v.reason as u8;
    e.flags = if audit { EVENT_AUDIT } else { 0 };
    if seen & SEEN_SEG != 0 {
        e.family = s.seg.family;
        e.src = s.seg.src;
        e.port = s.seg.dport;
        e.sport = s.seg.sport;
    } else {
        e.family = 0;
        e.src = [0; 16];
        e.port = 0;
        e.sport = 0;
    }
    if seen & SEEN_KEY != 0 {
        e.prefix = s.ev_prefix;
        e.src = s.ev_client;
        e.flags |= EVENT_HAS_KEY;
    } else {
        e.prefix.bytes = [0; 16];
    }
    match EVENTS.output::<filter_common::DropEvent>(&*e, 0) {
        Ok(()) => count(COUNTER_EVENTS_SENT),
        Err(_) => count(COUNTER_EVENTS_SUPPRESSED),
    }
}
