//! `KW_STAT_KEYS`: which key owns each `KW_KEY_STATS` slot (slot i -> key prefix), so that
//! `keywall stats --by key --top N` reads the counters, ranks them, and looks up only the
//! top keys, instead of joining a million-entry key map. The program never reads it: the
//! daemon creates and pins it beside the program's maps (an `Array` with `BPF_F_MMAPABLE`),
//! writes an entry through a shared mapping whenever a key gets a counter slot, and fills
//! it whole from the mirror at start (so maps pinned by an older daemon get it too).
//!
//! An entry may name a key that is gone (its slot freed, not yet reused): readers check each
//! candidate against `KW_KEYS` (present in the live slot, with this very counter slot).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use filter_common::KeyPrefix;

pub const PIN: &str = "KW_STAT_KEYS";

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct StatKeys {
    _data: MapData,
    ptr: *mut KeyPrefix,
    entries: usize,
}

// SAFETY: the mapping lives as long as the struct (unmapped in Drop); entries are written
// and read with volatile 16-byte accesses, and a torn read is caught by the reader's check
// against KW_KEYS.
unsafe impl Send for StatKeys {}
unsafe impl Sync for StatKeys {}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed `union bpf_attr` prefix larger than what these commands
    // read; pointers in it (a path) outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates an mmapable array of `entries` 16-byte values and pins it at `path`.
fn create(path: &Path, entries: u32) -> Result<()> {
    let mut attr = [0u64; 16];
    // map_type, key_size | value_size, max_entries, map_flags, then map_name at byte 28.
    attr[0] = BPF_MAP_TYPE_ARRAY as u64 | (4u64 << 32);
    attr[1] = size_of::<KeyPrefix>() as u64 | ((entries as u64) << 32);
    attr[2] = BPF_F_MMAPABLE as u64;
    // SAFETY: `attr` is 128 plain bytes; the name (12 bytes, NUL-padded) ends at byte 40.
    unsafe {
        let bytes = attr.as_mut_ptr().cast::<u8>();
        std::ptr::copy_nonoverlapping(b"KW_STAT_KEYS".as_ptr(), bytes.add(28), 12);
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("creating KW_STAT_KEYS")? as i32;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd as u64;
    let pinned = bpf(BPF_OBJ_PIN, &mut attr);
    // SAFETY: the fd BPF_MAP_CREATE returned, ours, closed once (the pin holds the map).
    unsafe { libc::close(fd) };
    pinned.with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

impl StatKeys {
    /// The daemon's: opens the pinned index, or (re)creates it to hold `entries` slots.
    pub fn open_or_create(pin_dir: &Path, entries: u32) -> Result<StatKeys> {
        let path = pin_dir.join(PIN);
        if let Ok(s) = StatKeys::open(pin_dir)
            && s.entries >= entries as usize
        {
            return Ok(s);
        }
        let _ = std::fs::remove_file(&path);
        create(&path, entries.max(1))?;
        StatKeys::open(pin_dir)
    }

    /// Opens the pinned index (readers: `keywall stats`).
    pub fn open(pin_dir: &Path) -> Result<StatKeys> {
        let path = pin_dir.join(PIN);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let info = data.info()?;
        if info.value_size() as usize != size_of::<KeyPrefix>() || info.key_size() != 4 {
            bail!("{} has another layout", path.display());
        }
        let entries = info.max_entries() as usize;
        let len = entries * size_of::<KeyPrefix>();
        // SAFETY: a fresh shared mapping of the whole map; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {}", path.display()));
        }
        Ok(StatKeys {
            _data: data,
            ptr: ptr.cast(),
            entries,
        })
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Records that counter slot `idx` belongs to `p` (ignored beyond the capacity).
    pub fn set(&self, idx: u32, p: KeyPrefix) {
        if (idx as usize) < self.entries {
            // SAFETY: idx is within the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(idx as usize), p) };
        }
    }

    pub fn get(&self, idx: u32) -> Option<KeyPrefix> {
        ((idx as usize) < self.entries).then(|| {
            // SAFETY: idx is within the mapping.
            unsafe { std::ptr::read_volatile(self.ptr.add(idx as usize)) }
        })
    }
}

impl Drop for StatKeys {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, with its length.
        unsafe { libc::munmap(self.ptr.cast(), self.entries * size_of::<KeyPrefix>()) };
    }
}
