//! Whole-map reads in batches (`BPF_MAP_LOOKUP_BATCH`): a few syscalls for a million entries,
//! where aya's iterators make one or two per entry. Falls back to aya's iterator on kernels
//! (or map types) without batch support.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{Result, bail};
use aya::{Pod, maps::MapData};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall.
const CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` with every entry of a hash or (non per-CPU) array map, a chunk at a time. Entries
/// added or removed meanwhile may or may not be seen (as with any map walk).
pub fn for_each<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(&[K], &[V])) -> Result<()> {
    let info = map.info()?;
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        bail!(
            "map key/value sizes {}/{} do not match the reader's {}/{}",
            info.key_size(),
            info.value_size(),
            size_of::<K>(),
            size_of::<V>()
        );
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = Vec::with_capacity(chunk);
    let mut vals: Vec<V> = Vec::with_capacity(chunk);
    // The position token: a bucket index for hash maps, a key for arrays; 64 bytes hold both.
    let mut token_in = [0u8; 64];
    let mut token_out = [0u8; 64];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                token_in.as_mut_ptr() as u64
            },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: vals.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_MAP_LOOKUP_BATCH; the kernel
        // writes at most `count` keys and values into buffers with capacity for `chunk` of
        // each (sizes checked against the map above), and at most key_size (<= 64 for our
        // maps) bytes into the token.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = attr.count as usize;
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            None | Some(libc::ENOENT) => {
                // SAFETY: the kernel filled the first `n` (<= chunk) entries of each buffer.
                unsafe {
                    keys.set_len(n);
                    vals.set_len(n);
                }
                f(&keys, &vals);
                keys.clear();
                vals.clear();
                if err.is_some() {
                    return Ok(()); // ENOENT: that was the last chunk
                }
                token_in = token_out;
                first = false;
            }
            // A hash bucket holds more entries than one chunk: ask for more at once.
            Some(libc::ENOSPC) if chunk < 1 << 20 => {
                chunk *= 4;
                keys.reserve(chunk);
                vals.reserve(chunk);
            }
            Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524) if first => {
                // No batch support for this map: one entry at a time.
                return slow(map, f);
            }
            _ => return Err(err.expect("an error").into()),
        }
    }
}

/// The `map_elem` member of `union bpf_attr` (lookup, and get-next-key with `value` as the
/// next key).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

fn elem_call(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the element commands; its pointers are
    // set by the callers to buffers of the map's key and value sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One entry at a time (get-next-key, lookup), in chunks like `for_each`.
fn slow<K: Pod, V: Pod>(map: &MapData, mut f: impl FnMut(&[K], &[V])) -> Result<()> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut keys: Vec<K> = Vec::with_capacity(CHUNK);
    let mut vals: Vec<V> = Vec::with_capacity(CHUNK);
    // SAFETY: Pod types are plain data, valid for any bit pattern, including zeroes.
    let mut cur: K = unsafe { std::mem::zeroed() };
    let mut next: K = unsafe { std::mem::zeroed() };
    let mut val: V = unsafe { std::mem::zeroed() };
    let mut first = true;
    loop {
        let mut a = ElemAttr {
            map_fd: fd,
            key: if first { 0 } else { &cur as *const K as u64 },
            value: &mut next as *mut K as u64,
            ..Default::default()
        };
        match elem_call(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e.into()),
        }
        first = false;
        cur = next;
        let mut a = ElemAttr {
            map_fd: fd,
            key: &cur as *const K as u64,
            value: &mut val as *mut V as u64,
            ..Default::default()
        };
        match elem_call(BPF_MAP_LOOKUP_ELEM, &mut a) {
            Ok(()) => {
                keys.push(cur);
                vals.push(val);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        }
        if keys.len() == CHUNK {
            f(&keys, &vals);
            keys.clear();
            vals.clear();
        }
    }
    f(&keys, &vals);
    Ok(())
}

/// Number of entries (a hash map's fill), read in batches.
pub fn count<K: Pod, V: Pod>(map: &MapData) -> Result<usize> {
    let mut n = 0;
    for_each::<K, V>(map, |k, _| n += k.len())?;
    Ok(n)
}

const _: () = assert!(size_of::<BatchAttr>() == 56);
const _: () = assert!(size_of::<ElemAttr>() == 32);

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i] -> vals[i]` for every i with `BPF_MAP_UPDATE_BATCH` (one syscall for
/// thousands of entries), in order; falls back to one update per entry where the kernel has
/// no batch support. On an error, the entries before the failing one are written.
pub fn update_all<K: Pod, V: Pod>(map: &MapData, keys: &[K], vals: &[V]) -> Result<()> {
    assert_eq!(keys.len(), vals.len(), "one value per key");
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: vals[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_MAP_UPDATE_BATCH; the kernel
        // reads `count` keys and values from buffers holding at least that many (the caller's
        // sizes match the map's: a mismatch fails with EINVAL before any read past them,
        // since the kernel reads key_size/value_size-sized elements and K/V are those).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        done += attr.count as usize;
        match err.raw_os_error() {
            // Interrupted part way (a signal, or the kernel yielding): carry on from there.
            Some(libc::EINTR) | Some(libc::EAGAIN) if attr.count > 0 => continue,
            Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(524) if done == 0 => {
                return slow_update(map, keys, vals);
            }
            _ => return Err(err.into()),
        }
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_ELEM` per entry.
fn slow_update<K: Pod, V: Pod>(map: &MapData, keys: &[K], vals: &[V]) -> Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    let fd = map.fd().as_fd().as_raw_fd();
    for (k, v) in keys.iter().zip(vals) {
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: k as *const K as u64,
            value: v as *const V as u64,
            ..Default::default()
        };
        // SAFETY: a `map_elem` attr pointing at one key and one value of the map's sizes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &mut attr as *mut ElemAttr,
                size_of::<ElemAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}
