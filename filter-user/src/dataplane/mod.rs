//! The kernel boundary: loading, pinning and attaching the XDP program, and writing policy
//! into its maps. This is the only module that touches maps for writing.
//!
//! Policy is double-buffered (see filter-common): `apply` writes the inactive slot, flips
//! `KW_CONTROL` in one word, then frees what no slot references any more. If a write fails
//! half way, the live slot is untouched and the mirror still describes the maps exactly, so
//! the next apply simply continues from there.
//!
//! The SYN prefilter (`KW_PREFILTER`, see `prefilter.rs`) follows the same scheme: each slot
//! owns half of the map, written through a shared memory mapping before the flip. A PATCH
//! sets the bits of sources it adds and writes only those words; a full apply rebuilds the
//! half from the policy.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use filter_common::{
    AllowKey, COUNTER_SLOTS, Control, Counter, FAMILY_V4, KEY_PRESENT, KeyEntry, KeyPrefix,
    KeyRecord, KeyStats, Listener, MAX_LISTENERS, MAX_PLENS, MAX_SETS, PROGRAM_NAME, SetMeta,
    Settings, maps,
};

pub mod activity;
pub mod batch;
pub mod counters;
pub mod events;
pub mod statkeys;

use aya::maps::IterableMap as _;

use crate::policy::{Compiled, SetContent};
use crate::prefilter::{self, Fill, Half, PlenPlan};

/// The compiled XDP object, built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keywall"));
/// An object whose only program (`keywall_pass`, section `xdp`) passes every frame: tests put
/// it on the client end of a veth, which then accepts the frames its peer sends with XDP_TX.
pub static PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keywall-pass"));

const PROG_PIN: &str = "prog";

/// Map capacities; `KW_KEYS` and `KW_KEY_STATS` share `keys`.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub keys: u32,
    pub allow: u32,
    pub sets: u32,
    pub flows: u32,
    /// log2 of the prefilter's 64-bit words per slot (`KW_PREFILTER` holds two slots).
    pub prefilter_words_log2: u8,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            keys: filter_common::DEFAULT_MAX_KEYS,
            allow: filter_common::DEFAULT_MAX_ALLOW,
            sets: filter_common::DEFAULT_MAX_SETS,
            flows: filter_common::DEFAULT_MAX_FLOWS,
            prefilter_words_log2: filter_common::DEFAULT_PREFILTER_WORDS_LOG2,
        }
    }
}

pub fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{iface}"))
}

/// Makes sure bpffs is mounted where pins go (it is not mounted at boot on every host).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let r = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("mount -t bpf")?;
        if !r.success() {
            bail!("bpffs is not mounted at /sys/fs/bpf and mounting it failed");
        }
    }
    fs::create_dir_all(pin_dir).with_context(|| format!("creating pin dir {}", pin_dir.display()))
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain C data, valid all zeroes.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    // SAFETY: a NUL-terminated path and a statfs buffer we own, both live for the call.
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC }
}

/// The loaded program and its maps.
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    pub maps: Maps,
}

/// Typed handles to every map.
pub struct Maps {
    pub control: Array<MapData, Control>,
    pub settings: Array<MapData, Settings>,
    pub listeners: Array<MapData, Listener>,
    pub listener_index: Array<MapData, u16>,
    pub keys: HashMap<MapData, KeyPrefix, KeyEntry>,
    pub sets: HashMap<MapData, u32, SetMeta>,
    pub allow: HashMap<MapData, AllowKey, u8>,
    pub reasons: PerCpuArray<MapData, Counter>,
    pub key_stats: Array<MapData, KeyStats>,
    /// Per-key activity (`KW_ACTIVITY`), indexed like `key_stats`.
    pub activity: Array<MapData, filter_common::KeyActivity>,
    /// Rate limits of limited keys (`KW_RATE`), by stat index.
    pub rate: HashMap<MapData, u32, filter_common::RateEntry>,
    pub flows: HashMap<MapData, filter_common::FlowKey, filter_common::Flow>,
    /// None while the loaded object has no prefilter (then nothing is written for it).
    pub prefilter: Option<PrefilterMap>,
    /// Counter slot -> key (`stats --by key --top N`); None if it could not be created.
    pub stat_keys: Option<statkeys::StatKeys>,
}

/// `KW_PREFILTER`, memory-mapped: an `Array<u64>` with `BPF_F_MMAPABLE`, slot s owning words
/// `[s << log2, (s + 1) << log2)`. Written through the mapping, since a million words through
/// `bpf_map_update_elem` would take a syscall each.
pub struct PrefilterMap {
    _data: MapData,
    ptr: *mut u64,
    words: usize,
    /// log2 of the words per slot, from the map's own size (a pinned map keeps its size).
    pub words_log2: u8,
}

// SAFETY: the mapping is owned like the fd it came from (unmapped once, in Drop); only
// `&mut self` writes through it, and reads are volatile word loads.
unsafe impl Send for PrefilterMap {}
unsafe impl Sync for PrefilterMap {}

impl PrefilterMap {
    fn open(data: MapData) -> Result<PrefilterMap> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let entries = data.info()?.max_entries() as usize;
        if entries < 2 || !entries.is_power_of_two() {
            bail!(
                "{} has {entries} entries; want 2 << words_log2",
                maps::PREFILTER
            );
        }
        let words_log2 = (entries / 2).trailing_zeros() as u8;
        let len = entries * 8;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the whole map; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mmap of {} (is it BPF_F_MMAPABLE?)", maps::PREFILTER));
        }
        Ok(PrefilterMap {
            _data: data,
            ptr: ptr.cast(),
            words: entries,
            words_log2,
        })
    }

    fn half_range(&self, slot: u32) -> std::ops::Range<usize> {
        let n = 1usize << self.words_log2;
        let start = (slot as usize & 1) * n;
        start..start + n
    }

    /// The words of one slot's half as they are in the map.
    pub fn read_half(&self, slot: u32) -> Vec<u64> {
        self.half_range(slot)
            .map(|i| {
                debug_assert!(i < self.words);
                // SAFETY: i is within the mapping; the kernel only reads these words.
                unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
            })
            .collect()
    }

    /// Writes the words of `slot` that differ from `words`, looking only at `dirty` ones
    /// when given; returns how many it wrote.
    fn write_half(&mut self, slot: u32, words: &[u64], dirty: Option<&[u32]>) -> usize {
        let range = self.half_range(slot);
        assert_eq!(words.len(), range.len(), "prefilter half size");
        let mut written = 0;
        let mut put = |j: usize| {
            // SAFETY: j < half size, so the index is within the mapping, and only this
            // loader writes it.
            unsafe {
                let p = self.ptr.add(range.start + j);
                if std::ptr::read_volatile(p) != words[j] {
                    std::ptr::write_volatile(p, words[j]);
                    written += 1;
                }
            }
        };
        match dirty {
            Some(d) => d.iter().for_each(|&j| put(j as usize % words.len())),
            None => (0..words.len()).for_each(put),
        }
        // The flip that makes these words live comes after them.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        written
    }
}

impl Drop for PrefilterMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, with its length.
        unsafe { libc::munmap(self.ptr.cast(), self.words * 8) };
    }
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Maps> {
        fn t(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        }
        Ok(Maps {
            control: t(ebpf, maps::CONTROL)?.try_into()?,
            settings: t(ebpf, maps::SETTINGS)?.try_into()?,
            listeners: t(ebpf, maps::LISTENERS)?.try_into()?,
            listener_index: t(ebpf, maps::LISTENER_INDEX)?.try_into()?,
            keys: t(ebpf, maps::KEYS)?.try_into()?,
            sets: t(ebpf, maps::SETS)?.try_into()?,
            allow: t(ebpf, maps::ALLOW)?.try_into()?,
            reasons: t(ebpf, maps::REASONS)?.try_into()?,
            key_stats: t(ebpf, maps::KEY_STATS)?.try_into()?,
            activity: t(ebpf, maps::ACTIVITY)?.try_into()?,
            rate: t(ebpf, maps::RATE)?.try_into()?,
            flows: t(ebpf, maps::FLOWS)?.try_into()?,
            prefilter: match ebpf.take_map(maps::PREFILTER) {
                Some(Map::Array(data)) => Some(PrefilterMap::open(data)?),
                Some(_) => bail!("{} is not an array", maps::PREFILTER),
                None => None,
            },
            stat_keys: None,
        })
    }
}

impl Dataplane {
    /// Loads the program, creating its maps or reusing the ones pinned in `pin_dir`.
    pub fn load(pin_dir: &Path, cap: Capacity) -> Result<Dataplane> {
        ensure_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(maps::KEYS, cap.keys)
            .map_max_entries(maps::KEY_STATS, cap.keys)
            .map_max_entries(maps::ACTIVITY, cap.keys)
            .map_max_entries(maps::RATE, cap.keys)
            .map_max_entries(maps::ALLOW, cap.allow)
            .map_max_entries(maps::SETS, cap.sets)
            .map_max_entries(maps::FLOWS, cap.flows)
            .map_max_entries(maps::PREFILTER, 2u32 << cap.prefilter_words_log2.min(26))
            .load(EBPF_OBJECT)
            .context("loading the keywall object (maps pinned with another layout? `keywall detach --all` removes them)")?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?
            .try_into()?;
        prog.load()
            .context("the kernel verifier rejected the XDP program")?;
        let mut maps = Maps::take(&mut ebpf)?;
        // Only readers' speed depends on it: without it `stats --by key` joins the maps.
        maps.stat_keys = statkeys::StatKeys::open_or_create(pin_dir, cap.keys)
            .map_err(|e| {
                log::warn!("no counter-slot index ({e:#}): `stats --by key` reads every key")
            })
            .ok();
        Ok(Dataplane {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            maps,
        })
    }

    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing"))?
            .try_into()?)
    }

    /// Pins the program so operators see what is attached.
    pub fn pin_program(&mut self) -> Result<()> {
        let path = self.pin_dir.join(PROG_PIN);
        let _ = fs::remove_file(&path);
        self.program()?.pin(&path).context("pinning the program")?;
        Ok(())
    }

    /// Attaches to `iface`, or takes over the pinned link there without a gap.
    /// Returns the mode used, or "takeover".
    pub fn attach(&mut self, iface: &str, mode: &str) -> Result<String> {
        let pin = link_pin_path(&self.pin_dir, iface);
        if pin.exists() {
            let pinned = PinnedLink::from_pin(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?;
            let fd_link: FdLink = pinned.into();
            let link = XdpLink::try_from(fd_link)?;
            // bpf_link_update swaps the program atomically: packets never see no program.
            self.program()?
                .attach_to_link(link)
                .with_context(|| format!("taking over the XDP link on {iface}"))?;
            return Ok("takeover".into());
        }
        let try_mode = |dp: &mut Dataplane, m: XdpMode| -> Result<()> {
            let prog = dp.program()?;
            let id = prog.attach(iface, m)?;
            let link = prog.take_link(id)?;
            let fd_link = FdLink::try_from(link)?;
            fd_link
                .pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
            Ok(())
        };
        match mode {
            "native" => try_mode(self, XdpMode::Driver).map(|_| "native".into()),
            "skb" => try_mode(self, XdpMode::Skb).map(|_| "skb".into()),
            "auto" => match try_mode(self, XdpMode::Driver) {
                Ok(()) => Ok("native".into()),
                Err(e) => {
                    log::warn!("native XDP failed on {iface} ({e:#}); falling back to skb mode");
                    try_mode(self, XdpMode::Skb).map(|_| "skb".into())
                }
            },
            other => bail!("unknown --xdp-mode {other:?} (auto|native|skb)"),
        }
    }
}

/// What one slot holds, as written to the maps.
#[derive(Clone, Default)]
struct SlotView {
    settings: Settings,
    listeners: BTreeMap<u16, Listener>,
}

/// Timing and size of one apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyReport {
    pub generation: u32,
    pub slot: u32,
    pub keys_written: usize,
    pub sets_created: usize,
    pub sets_freed: usize,
    /// The prefilter half was rebuilt from the whole union (not just added to).
    pub prefilter_rebuilt: bool,
    /// Prefilter words that differed and were written.
    pub prefilter_words_written: usize,
    pub elapsed: std::time::Duration,
}

/// The loader's exact picture of the policy maps, kept in step with every write.
#[derive(Default)]
pub struct Mirror {
    active: u32,
    slots: [SlotView; 2],
    keys: BTreeMap<KeyPrefix, KeyEntry>,
    sets: StdHashMap<u32, SetContent>,
    set_ids: StdHashMap<SetContent, u32>,
    next_set: u32,
    /// `KW_KEY_STATS` slots free below `next_idx` (a key's own slot is in its records).
    free_idx: Vec<u32>,
    next_idx: u32,
    /// Key records and listeners (over both slots) that reference each set; a set at zero is freed.
    set_refs: StdHashMap<u32, u32>,
    /// Sets whose count reached zero since the last clean-up.
    unreferenced: BTreeSet<u32>,
    /// The ipset ids each slot was written with (None: unknown, after a restart).
    ipsets: [Option<BTreeMap<String, u32>>; 2],
    /// A superset of the keys whose records differ between the two slots (None: unknown).
    lag: Option<BTreeSet<KeyPrefix>>,
    /// Each slot's prefilter half: the sources its key records contribute, and its words.
    prefilter: [Half; 2],
    /// Entries in `KW_ALLOW` (the sum of every set's size).
    allow_entries: usize,
    /// `KW_RATE` as written (limits only, state zero), by stat index.
    rates: StdHashMap<u32, filter_common::RateEntry>,
    /// The TAI offset lock expiries were written with (None: none written yet; after a
    /// restart, taken as today's).
    tai_offset: Option<i64>,
}

/// Entries in the policy maps, as the mirror knows them (no map walk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    pub keys: u64,
    pub allow: u64,
    pub sets: u64,
    pub key_stats: u64,
}

impl Mirror {
    pub fn generation(&self) -> u32 {
        self.slots[self.active as usize].settings.generation
    }
    pub fn active_slot(&self) -> u32 {
        self.active
    }
    /// How full the live prefilter half is (None before anything was built).
    pub fn prefilter_fill(&self) -> Option<Fill> {
        let h = &self.prefilter[self.active as usize];
        (!h.words.is_empty()).then(|| prefilter::fill(&h.words, &h.plan))
    }

    /// The live slot's prefilter words and prefix lengths (for tests and status).
    pub fn prefilter_half(&self) -> (&[u64], &PlenPlan) {
        let h = &self.prefilter[self.active as usize];
        (&h.words, &h.plan)
    }

    /// Entries of `KW_KEYS`, `KW_ALLOW`, `KW_SETS` and the `KW_KEY_STATS` slots handed out.
    pub fn fill(&self) -> MapFill {
        MapFill {
            keys: self.keys.len() as u64,
            allow: self.allow_entries as u64,
            sets: self.sets.len() as u64,
            // Every key in the map holds one counter slot.
            key_stats: self.keys.len() as u64,
        }
    }

    /// After a restart over pinned maps the mirror does not know which set each ipset name
    /// was written as, so the next write to each slot would examine every key. A set's id
    /// follows from its content (sets are interned by content): when every ipset of the
    /// restored policy is in the maps, the live slot used those ids; so did the other slot
    /// for every key it does not lag on, when the lag is known. Returns whether it adopted.
    pub fn adopt_ipsets(&mut self, ipsets: &BTreeMap<String, SetContent>) -> bool {
        let mut ids = BTreeMap::new();
        for (name, content) in ipsets {
            match self.set_ids.get(content) {
                Some(id) => ids.insert(name.clone(), *id),
                None => return false,
            };
        }
        let active = self.active as usize;
        for s in 0..2 {
            if s == active || self.lag.is_some() {
                if self.ipsets[s].is_none() {
                    for id in ids.values() {
                        *self.set_refs.entry(*id).or_default() += 1;
                    }
                }
                self.ipsets[s] = Some(ids.clone());
            }
        }
        true
    }

    pub fn key_count(&self) -> usize {
        let a = self.active as usize;
        self.keys
            .values()
            .filter(|e| e.slot[a].flags & KEY_PRESENT != 0)
            .count()
    }

    /// Rebuilds the picture from the maps (after a restart over pinned maps).
    pub fn read(m: &Maps) -> Result<Mirror> {
        let mut mi = Mirror {
            active: m.control.get(&0, 0)?.active_slot & 1,
            ..Default::default()
        };
        for s in 0..2u32 {
            mi.slots[s as usize].settings = m.settings.get(&s, 0)?;
        }
        for slot in 0..2u32 {
            for n in 1..=MAX_LISTENERS as u16 {
                let l = m.listeners.get(&filter_common::listener_slot(slot, n), 0)?;
                if l.locator != 0 {
                    mi.slots[slot as usize].listeners.insert(l.port, l);
                }
            }
        }
        batch::for_each::<AllowKey, u8>(m.allow.map(), |ks, _| {
            for k in ks {
                mi.sets
                    .entry(k.set_id)
                    .or_default()
                    .insert((k.family, k.plen, k.addr));
            }
        })?;
        batch::for_each::<u32, SetMeta>(m.sets.map(), |ids, _| {
            for id in ids {
                mi.sets.entry(*id).or_default();
            }
        })?;
        let mut used = Vec::new();
        let mut entries = Vec::new();
        batch::for_each::<KeyPrefix, KeyEntry>(m.keys.map(), |ks, es| {
            for (k, e) in ks.iter().zip(es) {
                if let Some(r) = e.slot.iter().find(|r| r.flags & KEY_PRESENT != 0) {
                    used.push(r.stat_idx);
                    // Refilled whole at every start: maps pinned before the index existed
                    // (or an index lost) are covered too.
                    if let Some(sk) = &m.stat_keys {
                        sk.set(r.stat_idx, *k);
                    }
                }
                entries.push((*k, *e));
            }
        })?;
        // Built in one pass from sorted entries (inserting a million in hash order costs
        // seconds).
        entries.sort_unstable_by_key(|(k, _)| *k);
        mi.keys = entries.into_iter().collect();
        for e in mi.keys.values() {
            for r in &e.slot {
                for id in record_sets(r) {
                    *mi.set_refs.entry(*id).or_default() += 1;
                }
            }
        }
        for slot in &mi.slots {
            for l in slot.listeners.values() {
                if l.proxy_set != 0 {
                    *mi.set_refs.entry(l.proxy_set).or_default() += 1;
                }
            }
        }
        if let Some(pf) = &m.prefilter {
            // The two halves are counted at once, each on its own thread.
            let counted: Vec<Half> = std::thread::scope(|sc| {
                let (keys, sets) = (&mi.keys, &mi.sets);
                let jobs: Vec<_> = (0..2usize)
                    .map(|s| {
                        sc.spawn(move || {
                            let mut h = Half::default();
                            // Counting only: the words are read back below, not rebuilt.
                            h.expect_rebuild();
                            for e in keys.values() {
                                h.record_changed(&KeyRecord::default(), &e.slot[s], sets);
                            }
                            h
                        })
                    })
                    .collect();
                jobs.into_iter()
                    .map(|j| j.join().expect("counting a prefilter half panicked"))
                    .collect()
            });
            for (s, mut h) in counted.into_iter().enumerate() {
                let st = mi.slots[s].settings;
                let plan = PlenPlan {
                    v4: st.pf_v4_plens[..(st.pf_n_v4 as usize).min(MAX_PLENS)].to_vec(),
                    v6: st.pf_v6_plens[..(st.pf_n_v6 as usize).min(MAX_PLENS)].to_vec(),
                };
                // Words written under another size (or never) are rebuilt on the next apply.
                let valid = st.pf_words_log2 == pf.words_log2
                    && st.flags & filter_common::SETTING_LOADED != 0;
                h.restore(pf.read_half(s as u32), plan, valid);
                mi.prefilter[s] = h;
            }
        }
        mi.unreferenced = mi
            .sets
            .keys()
            .filter(|id| !mi.set_refs.contains_key(id))
            .copied()
            .collect();
        mi.lag = lag_of(&mi.keys);
        batch::for_each::<u32, filter_common::RateEntry>(m.rate.map(), |ids, vals| {
            for (id, v) in ids.iter().zip(vals) {
                mi.rates.insert(*id, rate_config(v));
            }
        })?;
        mi.next_set = mi.sets.keys().copied().max().unwrap_or(0) + 1;
        used.sort_unstable();
        used.dedup();
        mi.next_idx = used.last().map_or(0, |m| m + 1);
        mi.free_idx = (0..mi.next_idx)
            .filter(|i| used.binary_search(i).is_err())
            .collect();
        mi.set_ids = mi.sets.iter().map(|(id, c)| (c.clone(), *id)).collect();
        mi.allow_entries = mi.sets.values().map(|c| c.len()).sum();
        Ok(mi)
    }

    fn set_meta(content: &SetContent) -> SetMeta {
        let mut m = SetMeta::default();
        let mut v4 = BTreeSet::new();
        let mut v6 = BTreeSet::new();
        for (fam, plen, _) in content {
            if *fam == FAMILY_V4 {
                v4.insert(*plen)
            } else {
                v6.insert(*plen)
            };
        }
        // Longest first: hosts are the common case.
        for (i, p) in v4.iter().rev().take(MAX_PLENS).enumerate() {
            m.v4_plens[i] = *p;
        }
        for (i, p) in v6.iter().rev().take(MAX_PLENS).enumerate() {
            m.v6_plens[i] = *p;
        }
        m.n_v4 = v4.len().min(MAX_PLENS) as u8;
        m.n_v6 = v6.len().min(MAX_PLENS) as u8;
        m
    }

    /// The id of a set with this content, writing it to the maps if it is new.
    fn intern_set(
        &mut self,
        m: &mut Maps,
        content: &SetContent,
        created: &mut usize,
    ) -> Result<u32> {
        if let Some(id) = self.set_ids.get(content) {
            return Ok(*id);
        }
        let id = self.next_set.max(1);
        self.next_set = id + 1;
        // Record the set before writing so a failed write is still freed by GC.
        self.sets.insert(id, SetContent::new());
        for &(family, plen, addr) in content {
            let k = AllowKey {
                set_id: id,
                family,
                plen,
                _pad: [0; 2],
                addr,
            };
            m.allow
                .insert(k, 1u8, 0)
                .context("writing an allow entry (KW_ALLOW full?)")?;
            if self
                .sets
                .get_mut(&id)
                .expect("just inserted")
                .insert((family, plen, addr))
            {
                self.allow_entries += 1;
            }
        }
        m.sets
            .insert(id, Self::set_meta(content), 0)
            .context("writing a set (KW_SETS full?)")?;
        self.set_ids.insert(content.clone(), id);
        self.unreferenced.insert(id);
        *created += 1;
        Ok(id)
    }

    fn stat_for(&mut self, m: &mut Maps, prefix: &KeyPrefix, cap: u32) -> Result<u32> {
        if let Some(r) = self
            .keys
            .get(prefix)
            .and_then(|e| e.slot.iter().find(|r| r.flags & KEY_PRESENT != 0))
        {
            return Ok(r.stat_idx);
        }
        let idx = match self.free_idx.pop() {
            Some(i) => i,
            None => {
                if self.next_idx >= cap {
                    bail!("more keys than KW_KEY_STATS holds ({cap})");
                }
                self.next_idx += 1;
                self.next_idx - 1
            }
        };
        m.key_stats.set(idx, KeyStats::default(), 0)?;
        // A slot handed to another key starts with no activity (a deleted key's history
        // must not make a new key look used, or shared).
        let fresh = filter_common::KeyActivity {
            since_s: crate::risk::mono_now_s(),
            ..Default::default()
        };
        m.activity.set(idx, fresh, 0)?;
        if let Some(sk) = &m.stat_keys {
            sk.set(idx, *prefix);
        }
        Ok(idx)
    }

    /// Writes `c` into the inactive slot and makes it live, examining every key.
    pub fn apply(&mut self, m: &mut Maps, c: &Compiled, key_cap: u32) -> Result<ApplyReport> {
        self.apply_changes(m, c, None, key_cap)
    }

    /// Like `apply`, but `changed` names every key whose policy may differ from the live
    /// slot's (a PATCH knows them). Only those, and the keys the inactive slot still lags on,
    /// are examined, so a one-key change costs one key, not the whole policy. Falls back to
    /// examining every key when the ipsets changed or the lag is unknown.
    pub fn apply_changes(
        &mut self,
        m: &mut Maps,
        c: &Compiled,
        changed: Option<&BTreeSet<KeyPrefix>>,
        key_cap: u32,
    ) -> Result<ApplyReport> {
        let t0 = Instant::now();
        let target = 1 - self.active;
        let ti = target as usize;
        let mut rep = ApplyReport {
            slot: target,
            ..Default::default()
        };

        // 1. Address sets of the ipsets.
        let mut ipset_ids = BTreeMap::new();
        for (name, content) in &c.ipsets {
            let id = self.intern_set(m, content, &mut rep.sets_created)?;
            ipset_ids.insert(name.clone(), id);
        }
        // Sorted and without repeats; a whole apply merges two sorted key lists (a Vec, not a
        // set: at 1M keys the set's nodes cost more than the writes).
        let (candidates, examined_all): (Vec<KeyPrefix>, bool) = match (changed, &self.lag) {
            (Some(ch), Some(lag)) if self.ipsets[ti].as_ref() == Some(&ipset_ids) => {
                (ch.union(lag).copied().collect(), false)
            }
            _ => (merge_sorted(self.keys.keys(), c.keys.keys()), true),
        };

        // 2. Listeners of the target slot: numbered in port order, rewritten when they differ.
        let mut want: BTreeMap<u16, Listener> = c
            .listeners
            .iter()
            .map(|(p, l)| (*p, Listener { port: *p, ..*l }))
            .collect();
        for (port, content) in &c.proxy_sets {
            let id = self.intern_set(m, content, &mut rep.sets_created)?;
            if let Some(l) = want.get_mut(port) {
                l.proxy_set = id;
            }
        }
        if self.slots[ti].listeners != want {
            if c.listeners.len() > MAX_LISTENERS as usize {
                bail!("more than {MAX_LISTENERS} listeners");
            }
            // Until every write is done the mirror holds no listeners for this slot (so a
            // failed write is redone in full), and so no references to their sets.
            let old = std::mem::take(&mut self.slots[ti].listeners);
            for l in old.values().filter(|l| l.proxy_set != 0) {
                self.release_set(l.proxy_set);
            }
            for port in old.keys() {
                if !c.listeners.contains_key(port) {
                    m.listener_index.set(
                        filter_common::listener_index_slot(target, *port),
                        0u16,
                        0,
                    )?;
                }
            }
            for (i, (port, l)) in want.iter().enumerate() {
                let n = i as u16 + 1;
                m.listeners
                    .set(filter_common::listener_slot(target, n), *l, 0)?;
                m.listener_index
                    .set(filter_common::listener_index_slot(target, *port), n, 0)?;
            }
            for n in c.listeners.len() as u16 + 1..=old.len().max(c.listeners.len()) as u16 {
                m.listeners.set(
                    filter_common::listener_slot(target, n),
                    Listener::default(),
                    0,
                )?;
            }
            // Trusted-proxy sets are referenced by listeners as sets are by key records.
            for l in want.values().filter(|l| l.proxy_set != 0) {
                *self.set_refs.entry(l.proxy_set).or_default() += 1;
            }
            self.slots[ti].listeners = want;
        }

        let t_keys = Instant::now();
        // 3. Keys: only entries whose target record changes are written. A full apply builds
        //    the prefilter half from the policy itself meanwhile, on another thread (it walks
        //    every allow entry; the key writes wait on syscalls).
        let old_lag = self.lag.take();
        let pf_log2 = m.prefilter.as_ref().map(|p| p.words_log2);
        let built = std::thread::scope(|scope| -> Result<Option<(PlenPlan, Vec<u64>)>> {
            // Only a whole policy (`changed` None) holds every key in `c`.
            let whole = examined_all && changed.is_none();
            let job = match (whole, pf_log2) {
                (true, Some(log2)) => Some(
                    scope.spawn(move || prefilter::build(|| prefilter::compiled_entries(c), log2)),
                ),
                _ => None,
            };
            if whole {
                self.prefilter[ti].expect_rebuild();
            }
            self.write_keys(
                m,
                c,
                &candidates,
                ti,
                &ipset_ids,
                key_cap,
                changed,
                &mut rep,
            )?;
            Ok(job.map(|j| j.join().expect("the prefilter build panicked")))
        })?;
        // Keys that may now differ between the slots: what lagged before, and what changed.
        // After a whole apply that is most keys: then "unknown" (None) is as good, and the
        // settle that follows examines every key anyway.
        self.lag = if examined_all {
            // Keys inserted one by one in order leave every B-tree node a little over half
            // full (about 190 bytes a key at 1M); rebuilt from the sorted entries, the nodes
            // are full (about 105). A whole apply is the write that inserts many keys, and
            // the rebuild costs a few tens of ms next to its seconds.
            self.keys = std::mem::take(&mut self.keys).into_iter().collect();
            lag_of(&self.keys)
        } else {
            let mut lag: BTreeSet<KeyPrefix> = old_lag.unwrap_or_default();
            lag.extend(candidates.iter().copied());
            lag.retain(|p| self.keys.get(p).is_some_and(|e| e.slot[0] != e.slot[1]));
            Some(lag)
        };
        let candidates_len = candidates.len();
        drop(candidates);
        // The slot holds its ipsets even when no key binds one, so an unused ipset keeps its
        // id and a PATCH does not fall back to examining every key.
        for id in ipset_ids.values() {
            *self.set_refs.entry(*id).or_default() += 1;
        }
        for id in self.ipsets[ti]
            .take()
            .into_iter()
            .flat_map(|m| m.into_values())
        {
            self.release_set(id);
        }
        self.ipsets[ti] = Some(ipset_ids);

        let d_keys = t_keys.elapsed();
        let t_pf = Instant::now();
        // 4. The prefilter half of the target slot: new sources added in place; rebuilt from
        //    the whole union on a full apply or once too much of it is stale.
        let mut s = c.settings;
        if let Some(pf) = m.prefilter.as_mut() {
            // A settle that left no key lagging: this slot now holds exactly the live slot's
            // records, so it takes the live half as it is (at 1M keys rebuilding it took
            // over a second of the engine lock).
            let settled = changed.is_some_and(|ch| ch.is_empty())
                && self.lag.as_ref().is_some_and(|l| l.is_empty())
                && self.slots[ti].listeners == self.slots[1 - ti].listeners;
            if settled {
                self.prefilter[ti] = Half::copy_of(&self.prefilter[1 - ti]);
            }
            let half = &mut self.prefilter[ti];
            let (keys, sets) = (&self.keys, &self.sets);
            let entries =
                || prefilter::record_entries(keys.values().map(move |e| &e.slot[ti]), sets);
            rep.prefilter_rebuilt = half.update(built, entries, pf.words_log2);
            let dirty = half.take_dirty();
            rep.prefilter_words_written = pf.write_half(target, &half.words, dirty.as_deref());
            let (n_v4, v4, n_v6, v6) = half.plan.kernel_lists();
            s.pf_words_log2 = pf.words_log2;
            s.pf_n_v4 = n_v4;
            s.pf_v4_plens = v4;
            s.pf_n_v6 = n_v6;
            s.pf_v6_plens = v6;
        }

        // 5. Settings, then the flip.
        s.generation = self.generation().wrapping_add(1);
        m.settings.set(target, s, 0)?;
        self.slots[ti].settings = s;
        m.control.set(
            0,
            Control {
                active_slot: target,
                _pad: 0,
            },
            0,
        )?;
        self.active = target;
        rep.generation = s.generation;

        let d_pf = t_pf.elapsed();
        // 6. Free what neither slot references any more.
        let t_gc = Instant::now();
        rep.sets_freed = self.gc(m)?;
        rep.elapsed = t0.elapsed();
        if rep.elapsed > std::time::Duration::from_millis(100) {
            log::debug!(
                "apply: {} candidates, {} keys written in {d_keys:?}, prefilter {d_pf:?}, {} sets freed in {:?}, {:?} in all",
                candidates_len,
                rep.keys_written,
                rep.sets_freed,
                t_gc.elapsed(),
                rep.elapsed
            );
        }
        Ok(rep)
    }

    /// Writes the target slot's record of every candidate key whose record changes.
    #[allow(clippy::too_many_arguments)]
    fn write_keys(
        &mut self,
        m: &mut Maps,
        c: &Compiled,
        candidates: &[KeyPrefix],
        ti: usize,
        ipset_ids: &BTreeMap<String, u32>,
        key_cap: u32,
        changed: Option<&BTreeSet<KeyPrefix>>,
        rep: &mut ApplyReport,
    ) -> Result<()> {
        // Records go to the kernel in batches (a syscall per entry cost about a third of a
        // 1M-key apply); the mirror is updated as they are queued.
        let mut pending = (Vec::new(), Vec::new());
        let r = self
            .queue_keys(
                m,
                c,
                candidates,
                ti,
                ipset_ids,
                key_cap,
                changed,
                rep,
                &mut pending,
            )
            .and_then(|_| flush_keys(m, &mut pending));
        if r.is_err() {
            // Some queued records may not be in the map: read the mirror back from the maps,
            // so it describes them exactly again (the live slot was not touched).
            match Mirror::read(m) {
                Ok(fresh) => *self = fresh,
                Err(e) => log::error!("re-reading the maps after a failed write: {e:#}"),
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn queue_keys(
        &mut self,
        m: &mut Maps,
        c: &Compiled,
        candidates: &[KeyPrefix],
        ti: usize,
        ipset_ids: &BTreeMap<String, u32>,
        key_cap: u32,
        changed: Option<&BTreeSet<KeyPrefix>>,
        rep: &mut ApplyReport,
        pending: &mut (Vec<KeyPrefix>, Vec<KeyEntry>),
    ) -> Result<()> {
        for p in candidates {
            let new = if changed.is_some_and(|ch| !ch.contains(p)) {
                // Not changed by this write (a key the target slot lags on): it gets the
                // live slot's record, so `c` need not hold the keys a write leaves alone.
                self.keys
                    .get(p)
                    .map_or(KeyRecord::default(), |e| e.slot[1 - ti])
            } else {
                match c.keys.get(p) {
                    Some(k) => {
                        self.record_for(m, p, k, ipset_ids, key_cap, &mut rep.sets_created)?
                    }
                    None => KeyRecord::default(),
                }
            };
            let mut e = self.keys.get(p).copied().unwrap_or_default();
            if e.slot[ti] == new {
                continue;
            }
            let old = e.slot[ti];
            e.slot[ti] = new;
            self.prefilter[ti].record_changed(&old, &new, &self.sets);
            if e.slot[1 - ti].flags & KEY_PRESENT == 0 && new.flags & KEY_PRESENT == 0 {
                if self.keys.contains_key(p) {
                    m.keys.remove(p)?;
                }
                self.keys.remove(p);
                // The key's counter slot was held by the record just replaced.
                if old.flags & KEY_PRESENT != 0 {
                    self.sync_rate(m, old.stat_idx, None)?;
                    self.free_idx.push(old.stat_idx);
                }
            } else {
                pending.0.push(*p);
                pending.1.push(e);
                if pending.0.len() >= KEY_BATCH {
                    flush_keys(m, pending)?;
                }
                self.keys.insert(*p, e);
            }
            self.release(&old);
            for id in record_sets(&new) {
                *self.set_refs.entry(*id).or_default() += 1;
            }
            rep.keys_written += 1;
        }
        Ok(())
    }

    /// The record of key `p` for a slot, interning its own address set.
    fn record_for(
        &mut self,
        m: &mut Maps,
        p: &KeyPrefix,
        k: &crate::policy::CompiledKey,
        ipset_ids: &BTreeMap<String, u32>,
        key_cap: u32,
        sets_created: &mut usize,
    ) -> Result<KeyRecord> {
        let mut r = KeyRecord {
            flags: k.flags,
            ..Default::default()
        };
        for (i, a) in k.inline_v4.iter().take(r.inline_v4.len()).enumerate() {
            r.inline_v4[i] = *a;
            r.n_inline_v4 = i as u8 + 1;
        }
        let mut sets = Vec::new();
        if let Some(own) = &k.own_set {
            sets.push(self.intern_set(m, own, sets_created)?);
        }
        for name in &k.ipsets {
            sets.push(
                *ipset_ids
                    .get(name)
                    .ok_or_else(|| anyhow!("unknown ipset {name}"))?,
            );
        }
        if sets.len() > MAX_SETS {
            bail!("key {p:?} references more than {MAX_SETS} address sets");
        }
        for (i, s) in sets.iter().enumerate() {
            r.sets[i] = *s;
        }
        r.n_sets = sets.len() as u8;
        if k.flags & filter_common::KEY_LOCKED != 0 && k.locked_until.is_some() {
            let off = *self
                .tai_offset
                .get_or_insert_with(crate::risk::tai_offset_s);
            r.locked_until = crate::risk::tai_until(k.locked_until, off);
        }
        r.stat_idx = self.stat_for(m, p, key_cap)?;
        self.sync_rate(m, r.stat_idx, k.rate)?;
        Ok(r)
    }

    /// Writes a key's limits (`KW_RATE` and the activity flag that sends the datapath there).
    /// Not double-buffered: a changed limit holds from this write, a moment before the
    /// slot flips (limits never decide whether a key is allowed).
    fn sync_rate(
        &mut self,
        m: &mut Maps,
        idx: u32,
        want: Option<filter_common::RateEntry>,
    ) -> Result<()> {
        if self.rates.get(&idx) == want.as_ref() {
            return Ok(());
        }
        let mut a = m.activity.get(&idx, 0).unwrap_or_default();
        match want {
            Some(cfg) => {
                // The entry first, then the flag: a flagged key always finds its entry.
                m.rate
                    .insert(idx, cfg, 0)
                    .context("writing a rate limit (KW_RATE)")?;
                a.flags |= filter_common::ACT_RATE_LIMITED;
                m.activity.set(idx, a, 0)?;
                self.rates.insert(idx, cfg);
            }
            None => {
                a.flags &= !filter_common::ACT_RATE_LIMITED;
                m.activity.set(idx, a, 0)?;
                let _ = m.rate.remove(&idx);
                self.rates.remove(&idx);
            }
        }
        Ok(())
    }

    /// Keeps lock expiries on the wall clock when the kernel's TAI offset moves (an NTP
    /// daemon sets it, usually once after boot): every record with an expiry is moved by the
    /// change, in both slots, one element write per key. Returns the offsets and the keys
    /// rewritten when it moved.
    pub fn follow_tai_offset(&mut self, m: &mut Maps) -> Result<Option<(i64, i64, usize)>> {
        let now = crate::risk::tai_offset_s();
        let Some(old) = self.tai_offset else {
            return Ok(None);
        };
        if old == now {
            return Ok(None);
        }
        let mut n = 0;
        for (p, e) in self.keys.iter_mut() {
            let mut changed = false;
            for r in e.slot.iter_mut() {
                if r.locked_until != 0 {
                    r.locked_until = crate::risk::shift_until(r.locked_until, now - old);
                    changed = true;
                }
            }
            if changed {
                m.keys.insert(*p, *e, 0)?;
                n += 1;
            }
        }
        self.tai_offset = Some(now);
        Ok(Some((old, now, n)))
    }

    /// Drops one record's references to its sets.
    fn release(&mut self, r: &KeyRecord) {
        for id in record_sets(r) {
            self.release_set(*id);
        }
    }

    fn release_set(&mut self, id: u32) {
        if let Some(n) = self.set_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.set_refs.remove(&id);
                self.unreferenced.insert(id);
            }
        }
    }

    /// Frees the sets no record references any more (after the flip, so no reader has them).
    fn gc(&mut self, m: &mut Maps) -> Result<usize> {
        let dead: Vec<u32> = std::mem::take(&mut self.unreferenced)
            .into_iter()
            .filter(|id| !self.set_refs.contains_key(id))
            .collect();
        for id in &dead {
            let content = self.sets.remove(id).unwrap_or_default();
            self.allow_entries -= content.len();
            let _ = m.sets.remove(id);
            for &(family, plen, addr) in &content {
                let _ = m.allow.remove(&AllowKey {
                    set_id: *id,
                    family,
                    plen,
                    _pad: [0; 2],
                    addr,
                });
            }
            self.set_ids.remove(&content);
        }
        Ok(dead.len())
    }
}

/// A `KW_RATE` entry's limits, without its state.
fn rate_config(e: &filter_common::RateEntry) -> filter_common::RateEntry {
    filter_common::RateEntry {
        conn_tat: 0,
        req_tat: 0,
        ..*e
    }
}

/// Key records per `BPF_MAP_UPDATE_BATCH`.
const KEY_BATCH: usize = 4096;

fn flush_keys(m: &Maps, pending: &mut (Vec<KeyPrefix>, Vec<KeyEntry>)) -> Result<()> {
    if pending.0.is_empty() {
        return Ok(());
    }
    batch::update_all(m.keys.map(), &pending.0, &pending.1)
        .context("writing keys (KW_KEYS full?)")?;
    pending.0.clear();
    pending.1.clear();
    Ok(())
}

/// The keys whose two slots differ, or None (examine every key) when more than a quarter do.
fn lag_of(keys: &BTreeMap<KeyPrefix, KeyEntry>) -> Option<BTreeSet<KeyPrefix>> {
    let mut lag = BTreeSet::new();
    for (p, e) in keys {
        if e.slot[0] != e.slot[1] {
            lag.insert(*p);
            if lag.len() > 1024 && lag.len() > keys.len() / 4 {
                return None;
            }
        }
    }
    Some(lag)
}

/// The union of two sorted lists, sorted, each element once.
fn merge_sorted<'a>(
    a: impl Iterator<Item = &'a KeyPrefix>,
    b: impl Iterator<Item = &'a KeyPrefix>,
) -> Vec<KeyPrefix> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    let mut out = Vec::with_capacity(a.size_hint().0.max(b.size_hint().0));
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(x), Some(y)) if x > y => b.next(),
            (Some(_), Some(_)) => {
                b.next();
                a.next()
            }
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        out.extend(next.copied());
    }
    out
}

/// The set ids a record references.
fn record_sets(r: &KeyRecord) -> &[u32] {
    if r.flags & KEY_PRESENT == 0 {
        return &[];
    }
    &r.sets[..(r.n_sets as usize).min(MAX_SETS)]
}

/// Read-only views of the pinned maps, for operator verbs that run without the daemon.
pub struct PinnedView {
    pub control: Array<MapData, Control>,
    pub settings: Array<MapData, Settings>,
    pub reasons: PerCpuArray<MapData, Counter>,
    pub key_stats: Array<MapData, KeyStats>,
    /// None when the pinned object predates per-key activity.
    pub activity: Option<Array<MapData, filter_common::KeyActivity>>,
    pub keys: HashMap<MapData, KeyPrefix, KeyEntry>,
    pub flows: HashMap<MapData, filter_common::FlowKey, filter_common::Flow>,
    pub listeners: Array<MapData, Listener>,
    /// None when the pinned object has no prefilter.
    pub prefilter: Option<PrefilterMap>,
    /// None when no daemon made it (an older one): readers join the maps instead.
    pub stat_keys: Option<statkeys::StatKeys>,
}

/// The live slot as the pinned maps hold it (works with the daemon down).
pub struct LiveSlot {
    /// 0 or 1.
    pub slot: u32,
    pub settings: Settings,
    /// Listeners with a locator in the live slot.
    pub listeners: usize,
}

impl PinnedView {
    /// The live slot: its number, settings and listener count.
    pub fn live_slot(&self) -> Result<LiveSlot> {
        let slot = self.control.get(&0, 0)?.active_slot & 1;
        let settings = self.settings.get(&slot, 0)?;
        let listeners = (1..=MAX_LISTENERS as u16)
            .filter(|n| {
                self.listeners
                    .get(&filter_common::listener_slot(slot, *n), 0)
                    .is_ok_and(|l| l.locator != 0)
            })
            .count();
        Ok(LiveSlot {
            slot,
            settings,
            listeners,
        })
    }

    /// Entries in the connection table (a batched walk).
    pub fn flow_count(&self) -> Result<usize> {
        batch::count::<filter_common::FlowKey, filter_common::Flow>(self.flows.map())
    }

    /// How full the live slot's prefilter is, from the pinned maps (works with the daemon down).
    pub fn prefilter_fill(&self) -> Result<Option<Fill>> {
        let Some(pf) = &self.prefilter else {
            return Ok(None);
        };
        let slot = self.control.get(&0, 0)?.active_slot & 1;
        let st = self.settings.get(&slot, 0)?;
        if st.pf_words_log2 != pf.words_log2 {
            return Ok(None); // never written at this size
        }
        let plan = PlenPlan {
            v4: st.pf_v4_plens[..(st.pf_n_v4 as usize).min(MAX_PLENS)].to_vec(),
            v6: st.pf_v6_plens[..(st.pf_n_v6 as usize).min(MAX_PLENS)].to_vec(),
        };
        Ok(Some(prefilter::fill(&pf.read_half(slot), &plan)))
    }

    pub fn open(pin_dir: &Path) -> Result<PinnedView> {
        fn o(dir: &Path, name: &str) -> Result<Map> {
            let p = dir.join(name);
            let d = MapData::from_pin(&p).with_context(|| {
                format!("no keywall maps pinned at {} (is keywall running, or was it ever run with this --pin-dir?)", p.display())
            })?;
            Ok(Map::from_map_data(d)?)
        }
        Ok(PinnedView {
            control: o(pin_dir, maps::CONTROL)?.try_into()?,
            settings: o(pin_dir, maps::SETTINGS)?.try_into()?,
            reasons: o(pin_dir, maps::REASONS)?.try_into()?,
            key_stats: o(pin_dir, maps::KEY_STATS)?.try_into()?,
            activity: match MapData::from_pin(pin_dir.join(maps::ACTIVITY)) {
                Ok(d) => Some(Map::from_map_data(d)?.try_into()?),
                Err(_) => None,
            },
            keys: o(pin_dir, maps::KEYS)?.try_into()?,
            flows: o(pin_dir, maps::FLOWS)?.try_into()?,
            listeners: o(pin_dir, maps::LISTENERS)?.try_into()?,
            prefilter: match MapData::from_pin(pin_dir.join(maps::PREFILTER)) {
                Ok(d) => Some(PrefilterMap::open(d)?),
                Err(_) => None,
            },
            stat_keys: statkeys::StatKeys::open(pin_dir).ok(),
        })
    }
}

/// Connections that passed bytes (`KW_HELD`) and how long each has had no flow entry.
///
/// The kernel never evicts `KW_HELD`: a connection whose flow entry was evicted stays there, and
/// its later segments are refused (the filter lost its position in the stream). An entry is
/// removed here once its flow has been gone for `idle`: by then the server has closed the
/// connection (servers close idle ones far sooner), so the tuple may start a new connection.
pub struct HeldGc {
    held: HashMap<MapData, filter_common::FlowKey, filter_common::Held>,
    flows: HashMap<MapData, filter_common::FlowKey, filter_common::Flow>,
    /// When each entry was first seen without a flow.
    missing: std::collections::HashMap<filter_common::FlowKey, std::time::Instant>,
    pub idle: std::time::Duration,
}

impl HeldGc {
    pub fn open(pin_dir: &Path, idle: std::time::Duration) -> Result<HeldGc> {
        let o = |name: &str| -> Result<Map> {
            let d = MapData::from_pin(pin_dir.join(name))
                .with_context(|| format!("opening the pinned {name}"))?;
            Ok(Map::from_map_data(d)?)
        };
        // The program starts a further stream on a tuple once the one before has been idle
        // this long (the assumption this sweep rests on too); 0 until written.
        let idle_s = idle.as_secs().min(u32::MAX as u64) as u32;
        let mut held_idle: aya::maps::Array<MapData, u32> = o(maps::HELD_IDLE)?.try_into()?;
        held_idle
            .set(0, idle_s, 0)
            .context("writing the idle time to KW_HELD_IDLE")?;
        Ok(HeldGc {
            held: o(maps::HELD)?.try_into()?,
            flows: o(maps::FLOWS)?.try_into()?,
            missing: Default::default(),
            idle,
        })
    }

    /// One pass: forgets connections whose client sent no data for `idle` (their flow and
    /// held entries), and held entries whose flow has been gone for `idle`; returns how many
    /// connections it forgot.
    pub fn sweep(&mut self) -> Result<usize> {
        let now = std::time::Instant::now();
        let idle_s = self.idle.as_secs().min(u32::MAX as u64) as u32;
        let now_s = coarse_monotonic_secs();
        let mut stale = Vec::new();
        let mut live = std::collections::HashSet::new();
        batch::for_each::<filter_common::FlowKey, filter_common::Flow>(
            self.flows.map(),
            |ks, fs| {
                for (k, f) in ks.iter().zip(fs) {
                    if now_s.wrapping_sub(f.seen_s) >= idle_s {
                        stale.push(*k);
                    } else {
                        live.insert(*k);
                    }
                }
            },
        )?;
        let mut removed = 0;
        for k in &stale {
            // The held entry first: a flow without one is refused nothing it should not be.
            let _ = self.held.remove(k);
            if self.flows.remove(k).is_ok() {
                removed += 1;
            }
        }
        let mut held = Vec::new();
        batch::for_each::<filter_common::FlowKey, filter_common::Held>(
            self.held.map(),
            |ks, _| held.extend_from_slice(ks),
        )?;
        let mut seen = std::collections::HashMap::with_capacity(self.missing.len());
        for k in held {
            if live.contains(&k) {
                continue;
            }
            let since = self.missing.get(&k).copied().unwrap_or(now);
            if now.duration_since(since) >= self.idle {
                if self.held.remove(&k).is_ok() {
                    removed += 1;
                }
            } else {
                seen.insert(k, since);
            }
        }
        self.missing = seen;
        Ok(removed)
    }
}

/// The clock the datapath stamps flows with (`bpf_ktime_get_coarse_ns`), in seconds.
fn coarse_monotonic_secs() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// Sums per-CPU reason counters: `[enforce or pass slots..., audit slots...]`.
pub fn read_reasons(reasons: &PerCpuArray<MapData, Counter>) -> Result<Vec<Counter>> {
    let mut out = vec![Counter::default(); COUNTER_SLOTS as usize];
    for (i, o) in out.iter_mut().enumerate() {
        for c in reasons.get(&(i as u32), 0)?.iter() {
            o.packets += c.packets;
            o.bytes += c.bytes;
        }
    }
    Ok(out)
}

/// Detaches `iface` (removing its link pin), or everything and all pins.
pub fn detach(pin_dir: &Path, iface: Option<&str>) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let entries =
        fs::read_dir(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(ifn) = name.strip_prefix("link_")
            && iface.is_none_or(|i| i == ifn)
        {
            // Detach explicitly: a running daemon may still hold the link open, and then
            // removing the pin alone would leave the program attached.
            force_detach_link(&e.path())
                .with_context(|| format!("detaching {}", e.path().display()))?;
            fs::remove_file(e.path())?;
            done.push(ifn.to_owned());
        }
    }
    if iface.is_none() {
        fs::remove_dir_all(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(done)
}

/// BPF_LINK_DETACH on a pinned link (aya 0.14 has no call for it).
fn force_detach_link(pin: &Path) -> Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET reads the pathname pointer (a live CString) from a zeroed attr
    // larger than the kernel's `obj` member.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut attr = [0u64; 16];
    attr[0] = fd as u64;
    // SAFETY: BPF_LINK_DETACH reads the link fd from a zeroed attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: the fd BPF_OBJ_GET returned, ours, closed once.
    unsafe { libc::close(fd as i32) };
    if r < 0 {
        return Err(err.into());
    }
    Ok(())
}

/// Interfaces that have a pinned link.
pub fn pinned_ifaces(pin_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("link_")
                .map(str::to_owned)
        })
        .collect();
    v.sort();
    v
}

/// A pinned map's capacity, from the kernel's own map info.
pub fn map_capacity(pin_dir: &Path, name: &str) -> Option<u32> {
    let d = aya::maps::MapData::from_pin(pin_dir.join(name)).ok()?;
    d.info().ok().map(|i| i.max_entries())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kp(s: &str) -> KeyPrefix {
        crate::policy::key_prefix(s)
    }

    #[test]
    fn merge_sorted_is_the_sorted_union() {
        let a: Vec<KeyPrefix> = ["a", "c", "d", "f"].map(kp).to_vec();
        let b: Vec<KeyPrefix> = ["b", "c", "f", "g"].map(kp).to_vec();
        let got = merge_sorted(a.iter(), b.iter());
        assert_eq!(got, ["a", "b", "c", "d", "f", "g"].map(kp).to_vec());
        assert_eq!(merge_sorted(a.iter(), [].iter()), a);
        assert!(merge_sorted([].iter(), [].iter()).is_empty());
    }

    #[test]
    fn lag_lists_the_keys_whose_slots_differ_or_gives_up() {
        let rec = |f: u8| KeyRecord {
            flags: KEY_PRESENT | f,
            ..Default::default()
        };
        let mut keys = BTreeMap::new();
        for i in 0..5000u32 {
            let differs = i % 10 == 0;
            let e = KeyEntry {
                slot: [
                    rec(0),
                    rec(if differs {
                        filter_common::KEY_LOCKED
                    } else {
                        0
                    }),
                ],
            };
            keys.insert(kp(&format!("k{i:07}")), e);
        }
        let lag = lag_of(&keys).expect("a tenth differs: listed");
        assert_eq!(lag.len(), 500);
        assert!(lag.contains(&kp("k0000010")) && !lag.contains(&kp("k0000011")));
        for e in keys.values_mut() {
            e.slot[1] = rec(filter_common::KEY_LOCKED);
        }
        assert!(
            lag_of(&keys).is_none(),
            "most differ: unknown (examine every key)"
        );
    }
}
