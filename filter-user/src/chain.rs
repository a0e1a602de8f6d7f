//! `keywall chain`: the chaining slot. Slot 0 of the pinned program array `KW_NEXT` holds an
//! XDP program that runs after keywall on every packet keywall passes (a tail call); its
//! verdict is final. The slot is pinned with the maps, so it survives daemon restarts and
//! takeovers; `keywall detach --all` removes it with the other pins.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    maps::{Map, MapData, ProgramArray},
    programs::{ProgramInfo, loaded_programs},
};

pub const NEXT_MAP: &str = "KW_NEXT";

fn slot(pin_dir: &Path) -> Result<ProgramArray<MapData>> {
    let path = pin_dir.join(NEXT_MAP);
    if !path.exists() {
        bail!(
            "no {} under {}: start `keywall run` with this --pin-dir first (a daemon older than the chaining slot has none)",
            NEXT_MAP,
            pin_dir.display()
        );
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(ProgramArray::try_from(Map::ProgramArray(data))?)
}

/// What to chain: a pinned program, or a loaded program's id.
pub enum Target<'a> {
    Pin(&'a Path),
    Id(u32),
}

/// Puts `target` into the slot; packets keywall passes go to it from the next one on.
/// Returns the chained program's name and id.
pub fn set(pin_dir: &Path, target: Target) -> Result<(String, u32)> {
    let info = match target {
        Target::Pin(p) => ProgramInfo::from_pin(p)
            .with_context(|| format!("opening the pinned program {}", p.display()))?,
        Target::Id(id) => loaded_programs()
            .filter_map(|i| i.ok())
            .find(|i| i.id() == id)
            .ok_or_else(|| anyhow!("no loaded BPF program with id {id}"))?,
    };
    let name = info.name_as_str().unwrap_or("").to_owned();
    let id = info.id();
    let fd = info.fd()?;
    let mut arr = slot(pin_dir)?;
    arr.set(0, &fd, 0).map_err(|e| {
        anyhow!(
            "the kernel refused {name} (id {id}) in the chaining slot ({e}): it must be an XDP program, \
             loaded without XDP frags support like keywall, and not bound to a device"
        )
    })?;
    Ok((name, id))
}

/// Empties the slot: keywall's pass verdicts are final again.
pub fn clear(pin_dir: &Path) -> Result<()> {
    let mut arr = slot(pin_dir)?;
    match arr.clear_index(&0) {
        Ok(()) => Ok(()),
        // Already empty.
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
