//! `KW_ACTIVITY` decoded (issue 13): each live key's activity entry, found through the key
//! map's live slot (`stat_idx`). Whole-map reads go in batches (two walks for any number of
//! keys), like the counters.

use anyhow::Result;
use aya::maps::IterableMap as _;
use filter_common::{KEY_PRESENT, KeyActivity, KeyEntry, KeyPrefix};

use super::{PinnedView, batch};

/// Calls `f` with every key of the live slot and its activity entry (zero when it has none).
/// Nothing is called when the pinned program has no activity map.
pub fn for_each_key_activity(
    view: &PinnedView,
    mut f: impl FnMut(&KeyPrefix, KeyActivity),
) -> Result<()> {
    let Some(act_map) = &view.activity else {
        return Ok(());
    };
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let mut acts: Vec<KeyActivity> = Vec::new();
    batch::for_each::<u32, KeyActivity>(act_map.map(), |idx, vals| {
        for (i, v) in idx.iter().zip(vals) {
            let i = *i as usize;
            if acts.len() <= i {
                acts.resize(i + 1, KeyActivity::default());
            }
            acts[i] = *v;
        }
    })?;
    batch::for_each::<KeyPrefix, KeyEntry>(view.keys.map(), |ks, es| {
        for (k, e) in ks.iter().zip(es) {
            let r = e.slot[slot];
            if r.flags & KEY_PRESENT == 0 {
                continue;
            }
            f(
                k,
                acts.get(r.stat_idx as usize).copied().unwrap_or_default(),
            );
        }
    })?;
    Ok(())
}

/// One key's activity entry, or None when the key is not in the live slot (or the pinned
/// object has no activity map). Two lookups, no walk.
pub fn key_activity(view: &PinnedView, prefix: &str) -> Result<Option<KeyActivity>> {
    let Some(act) = &view.activity else {
        return Ok(None);
    };
    let slot = (view.control.get(&0, 0)?.active_slot & 1) as usize;
    let Ok(e) = view.keys.get(&crate::policy::key_prefix(prefix), 0) else {
        return Ok(None);
    };
    let r = e.slot[slot];
    if r.flags & KEY_PRESENT == 0 {
        return Ok(None);
    }
    Ok(Some(act.get(&r.stat_idx, 0).unwrap_or_default()))
}
