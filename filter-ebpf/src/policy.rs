//! Judging a key prefix and a client address against the live policy slot.
//!
//! Exact-match hashes only: a key record carries up to four IPv4 hosts inline; longer lists,
//! IPv6 and CIDRs live in address sets, probed once per prefix length the set holds.

use filter_common::{
    AllowKey, FAMILY_V4, INLINE_V4, KEY_BOUND, KEY_LOCKED, KEY_PRESENT, KeyPrefix, KeyRecord,
    MAX_PLENS, MAX_SETS, Reason, SETTING_UNBOUND_DROP, SETTING_UNKNOWN_KEY_DROP, Settings,
};

use crate::{ALLOW, KEYS, NO_STAT, SETS};

/// The reason for a key-bearing packet, and the key's counter slot.
#[inline(always)]
pub fn judge_key(
    slot: u32,
    settings: &Settings,
    prefix: &KeyPrefix,
    family: u8,
    client: &[u8; 16],
) -> (Reason, u32) {
    let rec = match unsafe { KEYS.get(prefix) } {
        Some(e) => &e.slot[(slot & 1) as usize],
        None => return (unknown(settings), NO_STAT),
    };
    if rec.flags & KEY_PRESENT == 0 {
        return (unknown(settings), NO_STAT);
    }
    let idx = rec.stat_idx;
    if rec.flags & KEY_LOCKED != 0 && crate::risk::lock_holds(rec.locked_until) {
        return (Reason::DropLocked, idx);
    }
    if rec.flags & KEY_BOUND == 0 {
        let r = if settings.flags & SETTING_UNBOUND_DROP != 0 {
            Reason::DropNotAllowed
        } else {
            Reason::PassUnbound
        };
        return (r, idx);
    }
    if allowed(rec, family, client) {
        (Reason::PassAllowed, idx)
    } else {
        (Reason::DropNotAllowed, idx)
    }
}

#[inline(always)]
fn unknown(settings: &Settings) -> Reason {
    if settings.flags & SETTING_UNKNOWN_KEY_DROP != 0 {
        Reason::DropUnknownKey
    } else {
        Reason::PassUnknownKey
    }
}

#[inline(always)]
fn allowed(rec: &KeyRecord, family: u8, client: &[u8; 16]) -> bool {
    if family == FAMILY_V4 {
        let a = u32::from_ne_bytes([client[0], client[1], client[2], client[3]]);
        for i in 0..INLINE_V4 {
            if i < rec.n_inline_v4 as usize && rec.inline_v4[i] == a {
                return true;
            }
        }
    }
    for s in 0..MAX_SETS {
        if s >= rec.n_sets as usize {
            break;
        }
        if in_set(rec.sets[s], family, client) {
            return true;
        }
    }
    false
}

/// The address as two big-endian words, so masking is two ANDs (IPv4 in the top 32 bits).
#[inline(always)]
pub fn split(client: &[u8; 16]) -> (u64, u64) {
    let hi = u64::from_be_bytes([
        client[0], client[1], client[2], client[3], client[4], client[5], client[6], client[7],
    ]);
    let lo = u64::from_be_bytes([
        client[8], client[9], client[10], client[11], client[12], client[13], client[14],
        client[15],
    ]);
    (hi, lo)
}

#[inline(never)]
pub fn in_set(set_id: u32, family: u8, client: &[u8; 16]) -> bool {
    let Some(meta) = (unsafe { SETS.get(&set_id) }) else {
        return false;
    };
    let (n, plens) = if family == FAMILY_V4 {
        (meta.n_v4 as usize, &meta.v4_plens)
    } else {
        (meta.n_v6 as usize, &meta.v6_plens)
    };
    let (hi, lo) = split(client);
    for j in 0..MAX_PLENS {
        if j >= n {
            break;
        }
        let plen = (plens[j] & 0xff) as u32;
        let (mh, ml) = masks(plen);
        let mut key = AllowKey {
            set_id,
            family,
            plen: plen as u8,
            _pad: [0; 2],
            addr: [0; 16],
        };
        key.addr[..8].copy_from_slice(&(hi & mh).to_be_bytes());
        key.addr[8..].copy_from_slice(&(lo & ml).to_be_bytes());
        if unsafe { ALLOW.get(&key) }.is_some() {
            return true;
        }
    }
    false
}

/// Masks for the high and low 64 bits of a 128-bit address under a prefix length (IPv4
/// addresses sit in the top 32 bits, so their lengths apply unchanged).
#[inline(always)]
fn masks(plen: u32) -> (u64, u64) {
    let plen = if plen > 128 { 128 } else { plen };
    let mh = if plen == 0 {
        0
    } else if plen >= 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - plen)
    };
    let ml = if plen <= 64 {
        0
    } else if plen == 128 {
        u64::MAX
    } else {
        u64::MAX << (128 - plen)
    };
    (mh, ml)
}
