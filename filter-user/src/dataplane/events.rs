//! `KW_EVENTS`, the drop-event ring buffer: opened from its pin, and its records decoded.
//! What the daemon does with them is `events.rs`'s.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Map, MapData, RingBuf};
use filter_common::{DropEvent, maps};

/// Parses one ring buffer record; None if it is shorter than a `DropEvent`.
pub fn parse_record(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() < std::mem::size_of::<DropEvent>() {
        return None;
    }
    // SAFETY: DropEvent is plain repr(C) data and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) })
}

/// Opens the pinned ring buffer.
pub fn open_ring(pin_dir: &Path) -> Result<RingBuf<MapData>> {
    let p = pin_dir.join(maps::EVENTS);
    let d = MapData::from_pin(&p).map_err(|e| {
        anyhow!(
            "drop events are not available: the ring buffer {} is not pinned at {} ({e}); \
             this XDP program build does not emit drop events",
            maps::EVENTS,
            p.display()
        )
    })?;
    let m = Map::from_map_data(d).context("opening KW_EVENTS")?;
    RingBuf::try_from(m).with_context(|| format!("{} is not a ring buffer", p.display()))
}
