//! Risk controls (issue 13): lock expiry and per-key activity. Kept apart from the decision
//! code so the verdict path stays as it was: a lock with an expiry costs one clock read on
//! a locked key's messages, and activity is written once per judged key message (a new
//! connection or a request), never per packet. Nothing here can turn a refusal into a pass.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::generated::{bpf_ktime_get_ns, bpf_ktime_get_tai_ns},
    macros::map,
    maps::{Array, HashMap},
};
use filter_common::{
    ACT_RATE_LIMITED, DEFAULT_MAX_KEYS, KeyActivity, RateEntry, Reason, gcra, net_fingerprint,
    net_slot,
};

use crate::{NO_STAT, ScratchPtr};

/// Sized like `KW_KEY_STATS` by the loader (one entry per key slot).
#[map(name = "KW_ACTIVITY")]
static ACTIVITY: Array<KeyActivity> = Array::pinned(DEFAULT_MAX_KEYS, 0);
/// Rate limits of the keys that have one (by stat index); memory follows their number.
#[map(name = "KW_RATE")]
static RATE: HashMap<u32, RateEntry> = HashMap::pinned(DEFAULT_MAX_KEYS, BPF_F_NO_PREALLOC);

/// Whether a lock whose record says `locked_until` (CLOCK_TAI seconds, 0: forever) still
/// holds. CLOCK_TAI follows the wall clock (it is CLOCK_REALTIME plus the TAI offset), so
/// every edge with a synchronised clock ends the lock at the same instant.
#[inline(always)]
pub fn lock_holds(locked_until: u32) -> bool {
    locked_until == 0 || unsafe { bpf_ktime_get_tai_ns() } / 1_000_000_000 < locked_until as u64
}

/// Records one judged key message: `packed` is the stat index (bits 0..32), the reason
/// (32..40) and whether it is the connection's first key message (bit 40). The client is
/// the flow being built in scratch (`flow.client`, `flow.family`). Returns true when the
/// message passes the policy but is over the key's rate limit: it is then dropped as
/// `drop_rate_limited` (and recorded as that refusal). A refusal is never changed.
#[inline(never)]
pub fn record(sc: ScratchPtr, packed: u64) -> bool {
    let idx = (packed & 0xffff_ffff) as u32;
    if idx == NO_STAT {
        return false;
    }
    let Some(a) = ACTIVITY.get_ptr_mut(idx) else {
        return false;
    };
    let mut reason = ((packed >> 32) & 0xff) as u8;
    let new_conn = (packed >> 40) & 1 != 0;
    let mut limited = false;
    if reason < Reason::DropNotAllowed as u8 && unsafe { (*a).flags } & ACT_RATE_LIMITED != 0 {
        limited = !conforms(idx, new_conn);
        if limited {
            reason = Reason::DropRateLimited as u8;
        }
    }
    let now_s = crate::coarse_secs();
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            core::ptr::addr_of_mut!((*a).requests),
            1,
        );
        if new_conn {
            core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
                core::ptr::addr_of_mut!((*a).connections),
                1,
            );
        }
        if reason < Reason::DropNotAllowed as u8 {
            if (*a).last_allowed_s != now_s {
                (*a).last_allowed_s = now_s;
            }
        } else {
            (*a).last_refused_s = now_s;
            (*a).last_refused_reason = reason;
        }
        let fl = &(*sc).flow;
        let fp = net_fingerprint(fl.family, &fl.client);
        let minute = now_s / 60;
        let (i, write) = net_slot(&(*a).nets, fp, minute);
        if write {
            (*a).nets[i % filter_common::ACTIVITY_NETS] = fp << 16 | (minute & 0xffff);
        }
    }
    limited
}

/// Whether a key message conforms to the key's limits (a new connection's first message
/// counts against both). The state moves only when it conforms, so a burst that is refused
/// costs the key nothing. CPUs share the entry without a lock: two CPUs at the same instant
/// can both take the last slot (the limit is exceeded by at most one message per other CPU).
/// A key flagged limited but without an entry (being rewritten) passes on its policy verdict.
#[inline(always)]
fn conforms(idx: u32, new_conn: bool) -> bool {
    let Some(r) = RATE.get_ptr_mut(&idx) else {
        return true;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        let conn = if new_conn && (*r).conn_t != 0 {
            match gcra((*r).conn_t, (*r).conn_tau, (*r).conn_tat, now) {
                Some(t) => t,
                None => return false,
            }
        } else {
            0
        };
        let req = if (*r).req_t != 0 {
            match gcra((*r).req_t, (*r).req_tau, (*r).req_tat, now) {
                Some(t) => t,
                None => return false,
            }
        } else {
            0
        };
        if conn != 0 {
            (*r).conn_tat = conn;
        }
        if req != 0 {
            (*r).req_tat = req;
        }
    }
    true
}
