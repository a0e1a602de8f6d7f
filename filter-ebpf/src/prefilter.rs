//! The SYN prefilter: a handshake to a listener passes only from a source some key could
//! allow. The loader keeps the union of every allow entry as a blocked Bloom filter per slot
//! (see `filter_common::prefilter_probe`): no false negatives, so no allowed source is ever
//! refused; a false positive only lets the SYN reach the key check.

use filter_common::{FAMILY_V4, LISTENER_PROXY_PROTOCOL, Listener, MAX_PLENS, Settings};

use crate::{PREFILTER, parse::Segment, policy};

/// Whether `seg`'s source may open a connection to listener `l` under `settings`.
#[inline(always)]
pub fn source_may_connect(slot: u32, settings: &Settings, l: &Listener, seg: &Segment) -> bool {
    if l.flags & LISTENER_PROXY_PROTOCOL != 0 {
        // Only the trusted proxies connect to a PROXY listener; clients are judged later,
        // by the address the proxy reports.
        return l.proxy_set != 0 && policy::in_set(l.proxy_set, seg.family, &seg.src);
    }
    let (hi, lo) = policy::split(&seg.src);
    let (n, plens) = if seg.family == FAMILY_V4 {
        (settings.pf_n_v4 as usize, &settings.pf_v4_plens)
    } else {
        (settings.pf_n_v6 as usize, &settings.pf_v6_plens)
    };
    let log2 = settings.pf_words_log2 & 31;
    let base = (slot & 1) << log2;
    for j in 0..MAX_PLENS {
        if j >= n {
            break;
        }
        let plen = plens[j];
        let (mh, ml) = filter_common::mask_addr(hi, lo, plen);
        let (word, bits) = filter_common::prefilter_probe(seg.family, plen, mh, ml, log2);
        if let Some(w) = PREFILTER.get(base | word) {
            if *w & bits == bits {
                return true;
            }
        }
    }
    false
}
