//! The `http-header` and `fix` locators: find the configured API-key headers (or the FIX tag,
//! `553=`) at line starts (field starts: FIX separates fields with SOH where HTTP has LF).
//!
//! Two passes keep the verifier's work linear:
//! 1. a branch-free SWAR walk, 8 bytes a step, that records every line start;
//! 2. a check of each recorded line start against the header names.
//!
//! Every line start in the segment is checked, not just the header block of a request that
//! begins the segment: a keep-alive connection can pipeline a second request with another key,
//! and a later segment can carry one. All keys found in one segment must agree. A key line
//! cut by the end of the segment fails closed (malformed), so no split hides a key.
//!
//! What servers tolerate is judged, not assumed away (docs/DATAPATH.md): a bare CR ends a
//! line too, `-` and `_` in a name are one character, a blank before the colon, a value
//! shorter than a key prefix (obs-fold) and the HTTP/2 preface are "cannot judge", and a
//! FIX tag with a leading zero is too.

use aya_ebpf::{
    bindings::xdp_md,
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use filter_common::{Listener, MAX_HEADERS};

use crate::{
    LISTENERS, SCRATCH, ScratchPtr, forget_in, ld64,
    scratch::{ScanIo, WINDOW_WORDS},
    swar::{HIGH, LOW7, ONES, low_bytes},
};

/// Steps of the scan (32 bytes each, or up to the first line start in them): 1,500 bytes with
/// `MAX_LINES` line starts. A larger payload fails closed.
const WIDE_STEPS: usize = 112;
/// Line starts checked per segment. More lines fail closed.
pub const MAX_LINES: usize = 64;
/// The bytes read at a line start: name with colon (<= 24), blanks (<= 8), key prefix (<= 16).
const WINDOW: usize = 48;

enum Found {
    None,
    /// Little-endian words of the prefix bytes.
    Key([u64; 2]),
    Malformed,
}

/// The last `rem` (1..=8) payload bytes before `end` (an offset from the frame start), low in a
/// word with zeros above, read as the 8 bytes ending at `end`: the headers before the payload
/// are longer than 8 bytes, so those are inside the frame. None if the frame says otherwise.
#[inline(always)]
fn last_bytes(sc: ScratchPtr, data: usize, data_end: usize, end: usize, rem: u64) -> Option<u64> {
    if end < 8 {
        return None;
    }
    // Laundered so LLVM keeps the offset non-negative in the verifier's eyes.
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let q = data + (unsafe { forget_in(sc, 0, end - 8) } & 0x3fff);
    if q + 8 > data_end {
        return None;
    }
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    Some(unsafe { ld64(q as *const u64) } >> (8 * (8 - rem)))
}

/// How far to advance past the first newline in `w` (8 if none), and whether there was one.
/// What the bpf_loop callback needs; lives on the caller's stack (bpf_loop requires that),
/// so it is kept to three pointers and the rest stays in the per-CPU scratch.
#[repr(C)]
struct LineLoop {
    ctx: *mut xdp_md,
    listener: *const Listener,
    sc: ScratchPtr,
}

extern "C" fn line_cb(i: u64, lc: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(lc as *mut LineLoop) };
    let acc = unsafe { &mut (*lc.sc).line };
    if i >= acc.n || acc.malformed != 0 {
        return 1;
    }
    let off = unsafe { (*lc.sc).lines[(i & 127) as usize] } as u64;
    let start = acc.start & 0x3fff;
    let end = acc.end & 0x3fff;
    if start + off >= end {
        return 0;
    }
    let ctx = XdpContext::new(lc.ctx);
    // The segment's first byte starts a line only if the stream or a separator says so;
    // otherwise it is just where the segment was cut (still checked for a key: over-detecting
    // a line start is safe).
    let true_start = i > 0 || acc.at_line != 0;
    check_line(
        &ctx,
        ((start + off) & 0x3fff) as usize,
        unsafe { &*lc.listener },
        lc.sc,
        true_start,
    );
    0
}

/// The separators in the 32 bytes at `p` (which the caller bounds-checked), from byte `skip`
/// on: how far to advance from there past the first one (to the window's end if none), and
/// whether there was one. Straight-line arithmetic (no selects, which BPF turns into
/// branches), so the verifier sees one state per iteration.
#[inline(always)]
fn step4(p: usize, seps: u64, fold: u64, skip: usize) -> (usize, usize) {
    // Each word's flags (high bit per separator byte) gathered into one byte, bit j = byte j.
    let gather = |o: usize| {
        // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
        let m = newline_mask(unsafe { ld64((p + o) as *const u64) } | fold, seps);
        ((m >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
    };
    let s = gather(0) | gather(8) << 8 | gather(16) << 16 | gather(24) << 24;
    // Only the lowest flag is exact (a borrow can set flags above a true one), and the lowest
    // is all this needs.
    let s = s >> skip;
    // A sentinel just past the window: without a separator, the step ends at the window's end.
    let sentinel = 32 - skip;
    let t = s | 1 << sentinel;
    let lsb = t & t.wrapping_neg();
    // A separator unless the lowest bit is the sentinel (written so LLVM keeps it arithmetic:
    // a zero test would become a branch). Past a separator at bit b: b + 1 bytes.
    let hit = ((lsb >> sentinel) & 1) ^ 1;
    ((lsb - 1).count_ones() as usize + hit as usize, hit as usize)
}

/// `seps` is the separator byte in every byte of a word.
#[inline(always)]
fn newline_mask(w: u64, seps: u64) -> u64 {
    let x = w ^ seps;
    x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080
}

pub const SCAN_NONE: u64 = 0;
pub const SCAN_KEY: u64 = 1;
pub const SCAN_MALFORMED: u64 = 2;

/// The locator as a *global* BPF function: the verifier checks it once, on its own, instead
/// of once for every way a packet can reach it (VLAN tags, IPv4 or IPv6, extension headers).
/// It gets nothing but the context and plain numbers, so it trusts nothing about the caller.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn keywall_http_scan(ctx: *mut xdp_md, io: *mut ScanIo) -> i64 {
    if ctx.is_null() || io.is_null() {
        return 0;
    }
    let io = unsafe { &mut *io };
    io.result = SCAN_MALFORMED;
    let Some(sc) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(l) = LISTENERS.get((io.listener & 0x1ff) as u32) else {
        return 0;
    };
    let xctx = XdpContext::new(ctx);
    let start = (io.start & 0x3fff) as usize;
    let end = (io.end & 0x3fff) as usize;
    let fix = io.fix != 0;
    if io.first != 0 && !stream_start_ok(&xctx, start, end, fix) {
        return 0;
    }
    unsafe {
        (*sc).line.fix = fix as u64;
        (*sc).line.at_line = io.at_line;
        (*sc).line.logon = 0;
    }
    match scan(
        &xctx,
        sc,
        start,
        end,
        l,
        (io.plen & 0x1f) as usize,
        io.sep & 0xff,
        io.sep_fold & 0xff,
    ) {
        Found::None => io.result = SCAN_NONE,
        Found::Malformed => io.result = SCAN_MALFORMED,
        Found::Key(p) => {
            io.result = SCAN_KEY;
            io.prefix = p;
        }
    }
    io.at_line = unsafe { (*sc).line.at_line };
    io.logon = unsafe { (*sc).line.logon };
    0
}

/// The first bytes of a stream: an HTTP/1.x request line (an upper-case method of 1 to 7
/// letters, then a space), or a FIX message (`8=FIX`). Anything else (TLS, the HTTP/2
/// preface's binary frames, garbage) is not judged.
#[inline(always)]
fn stream_start_ok(ctx: &XdpContext, start: usize, end: usize, fix: bool) -> bool {
    let p = ctx.data() + start;
    if start + 8 > end || p + 8 > ctx.data_end() {
        return false;
    }
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let w = unsafe { ld64(p as *const u64) };
    if fix {
        return w & low_bytes(5) == u64::from_le_bytes(*b"8=FIX\0\0\0");
    }
    let sp = eq_mask(w, b' ');
    let k = leading_bytes(sp);
    if k == 0 || k >= 8 {
        return false;
    }
    // A-Z: 0x41..=0x5a.
    let ge_a = ((w & LOW7) + ONES * (0x80 - 0x41)) & HIGH;
    let gt_z = ((w & LOW7) + ONES * (0x80 - 0x5b)) & HIGH;
    let upper = ge_a & !gt_z & !w & HIGH;
    upper & low_bytes(k) == HIGH & low_bytes(k)
}

/// Scans the payload `[start, end)` (offsets from the frame start).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan(
    ctx: &XdpContext,
    sc: ScratchPtr,
    start: usize,
    end: usize,
    l: &Listener,
    plen: usize,
    seps: u64,
    seps2: u64,
) -> Found {
    let lines = unsafe { &mut (*sc).lines };
    if end <= start {
        return Found::None;
    }
    let len = end - start;

    // Pass 1, in a BPF function of its own: its frame is not on the stack while pass 2's
    // callback runs (the chain shares 512 bytes).
    let n = record_lines(
        ctx,
        sc,
        start as u64 | (end as u64) << 16,
        seps2 << 8 | seps,
    );
    if n == NO_LINES {
        return Found::Malformed;
    }
    let n = n as usize & 0xff;
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let len = unsafe { forget_in(sc, 3, len) } & 0x3fff;
    if n > MAX_LINES {
        return Found::Malformed;
    }
    // Does the segment end with a separator (the next one then starts a true line)?
    let last = lines[(n.wrapping_sub(1)) & 127] as usize;
    let ends_at_line = n > 1 && last == len;

    // Pass 2: check each line start, in a bpf_loop so the verifier checks the body once
    // rather than once per line.
    unsafe {
        // Field by field: a struct literal would be built on the (shared) stack first.
        let acc = &mut (*sc).line;
        acc.start = start as u64;
        acc.end = end as u64;
        acc.plen = plen as u64;
        acc.n = n as u64;
        acc.found = 0;
        acc.malformed = 0;
        acc.prefix = [0; 2];
    }
    let mut lc = LineLoop {
        ctx: ctx.ctx,
        listener: l as *const Listener,
        sc,
    };
    let done = unsafe {
        bpf_loop(
            MAX_LINES as u32,
            line_cb as *mut c_void,
            &mut lc as *mut LineLoop as *mut c_void,
            0,
        )
    };
    let acc = unsafe { (*sc).line };
    unsafe { (*sc).line.at_line = ends_at_line as u64 };
    if done < 0 || acc.malformed != 0 {
        return Found::Malformed;
    }
    if acc.found != 0 {
        Found::Key(acc.prefix)
    } else {
        Found::None
    }
}

/// `record_lines` found more payload or more line starts than its budget, or a frame shorter
/// than it claims.
const NO_LINES: u64 = 0xffff;

/// Pass 1: records the line starts of the payload `[start, end)` (offsets from the frame start,
/// packed in `bounds`) as payload offsets in `lines`, and returns how many (or `NO_LINES`).
/// `sepfold`: the separator byte, and the bits separators may differ in, in bits 8..16.
#[inline(never)]
fn record_lines(ctx: &XdpContext, sc: ScratchPtr, bounds: u64, sepfold: u64) -> u64 {
    let start = (bounds & 0x3fff) as usize;
    let end = ((bounds >> 16) & 0x3fff) as usize;
    let seps = ONES * (sepfold & 0xff);
    let seps2 = ONES * ((sepfold >> 8) & 0xff);
    // One 32-bit load each: LLVM would merge the two fields into one 64-bit load here, which
    // the verifier refuses on a context.
    let (data, data_end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    let lines = unsafe { &mut (*sc).lines };
    if end <= start {
        return NO_LINES;
    }
    let len = end - start;
    // Pass 1: record line starts (as payload offsets). The payload start counts as one,
    // since a segment may begin exactly where the previous one ended a line.
    lines[0] = 0;
    let mut n: usize = 1;
    let mut pos: usize = 0;
    // The 32 bytes read each step end no later than the payload's end: near it they start
    // before `pos` (in the headers, for a short payload: the frame has more than 32 bytes of
    // them), and the flags before `pos` are shifted out. So every step is one straight-line
    // 32-byte read, and no step needs a tail of its own. One step per line start or per 32
    // bytes; two exits, no other branch: every iteration reaches the loop head in a single
    // state, so the verifier's work stays linear.
    if end < 32 {
        return NO_LINES;
    }
    let last = end - 32;
    for _ in 0..WIDE_STEPS {
        if pos >= len {
            break;
        }
        let at = start + pos;
        // min(at, last) without a select (BPF turns selects into branches, and LLVM finds a
        // min in any arithmetic form of it: the sign bit is laundered so it cannot).
        // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
        let d = unsafe { forget_in(sc, 0, last.wrapping_sub(at)) };
        let r = at.wrapping_sub((((d as i64) >> 63) as usize) & at.wrapping_sub(last));
        let p = data + (r & 0x3fff);
        if p + 32 > data_end {
            break;
        }
        let (adv, is_nl) = step4(p, seps, seps2, at.wrapping_sub(r) & 31);
        pos += adv;
        // Branch-free append: the slot is overwritten unless this step found a newline.
        lines[n & 127] = pos as u16;
        n += is_nl;
    }
    // Each iteration leaves the loop with its own pos and n; launder them so those exits
    // become one state for the verifier.
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let pos = unsafe { forget_in(sc, 1, pos) } & 0x3fff;
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let n = unsafe { forget_in(sc, 2, n) } & 0xff;
    // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
    let len = unsafe { forget_in(sc, 3, len) } & 0x3fff;
    if pos < len {
        // More payload (or more line starts) than the scan budget.
        return NO_LINES;
    }
    n as u64
}

/// High bit set in each byte of `x` equal to `b`, exactly (no borrow between bytes).
#[inline(always)]
fn eq_mask(x: u64, b: u8) -> u64 {
    let t = x ^ (ONES * b as u64);
    !(((t & LOW7) + LOW7) | t | LOW7)
}

/// High bit set in each byte that may be part of a key: printable ASCII, 0x21..=0x7e.
#[inline(always)]
fn key_byte_mask(x: u64) -> u64 {
    // (b & 0x7f) + 0x5f carries into the high bit iff (b & 0x7f) >= 0x21; never across bytes.
    let ge21 = ((x & LOW7) + ONES * 0x5f) & HIGH;
    ge21 & !x & !eq_mask(x, 0x7f)
}

/// Leading bytes (from the low end) before the first byte whose high bit is set in `m`; 8 if none.
#[inline(always)]
fn leading_bytes(m: u64) -> u64 {
    let lsb = m & m.wrapping_neg();
    (lsb.wrapping_sub(1) & HIGH).count_ones() as u64
}

/// The 8 bytes at byte offset `o` of the window (little endian).
#[inline(always)]
fn load8(buf: &[u64; WINDOW_WORDS], o: u64) -> u64 {
    // The window lives in a map value sized so that any offset LLVM leaves unmasked still
    // stays inside it (the verifier checks the value's bounds, not our intent).
    let i = ((o >> 3) & 7) as usize;
    let sh = (o & 7) * 8;
    let lo = buf[i] >> sh;
    let hi = if sh == 0 { 0 } else { buf[i + 1] << (64 - sh) };
    lo | hi
}

#[inline(always)]
fn avail_mask(avail: usize, word_idx: usize) -> u64 {
    let have = avail.saturating_sub(word_idx * 8);
    low_bytes(have as u64)
}

/// Spaces read past at a line start; a line with as many fails closed.
const LEAD_MAX: usize = 24;

/// The spaces at `off` (an offset from the frame start), up to `LEAD_MAX`.
#[inline(always)]
fn leading_spaces(data: usize, data_end: usize, sc: ScratchPtr, off: usize, end: usize) -> usize {
    let mut n = 0;
    for _ in 0..LEAD_MAX / 8 {
        let o = (off + n) & 0x3fff;
        if o >= end {
            return n;
        }
        let p = data + o;
        let w = if p + 8 <= data_end && o + 8 <= end {
            // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
            unsafe { ld64(p as *const u64) }
        } else {
            let rem = (((end - o).wrapping_sub(1)) & 7) as u64 + 1;
            match last_bytes(sc, data, data_end, end, rem) {
                Some(w) => w,
                None => return LEAD_MAX,
            }
        };
        // Past the payload's end the word is zero padded: no spaces there.
        let k = leading_bytes(!eq_mask(w, b' ') & HIGH) as usize;
        n += k;
        if k < 8 {
            return n;
        }
    }
    n
}

/// Checks one line start (`off`, from the frame start) against the listener's header names.
/// Branch-light on purpose: the verifier walks it once per recorded line.
#[inline(always)]
fn check_line(ctx: &XdpContext, off: usize, l: &Listener, sc: ScratchPtr, true_start: bool) {
    let acc = unsafe { &mut (*sc).line };
    let end = (acc.end & 0x3fff) as usize;
    let plen = acc.plen & 0x1f;
    let data = ctx.data();
    let data_end = ctx.data_end();
    // Spaces before a name (HTTP): lenient servers read a header after them, or fold the line
    // into the previous value. The name is compared after them, and a key header there fails
    // closed (which of the two the server does is not knowable here).
    let lead = if acc.fix == 0 {
        leading_spaces(data, data_end, sc, off, end)
    } else {
        0
    };
    if lead >= LEAD_MAX {
        acc.malformed = 1;
        return;
    }
    let folded = lead != 0;
    let off = (off + lead) & 0x3fff;
    let p = data + off;
    // The first 8 bytes of the line (fewer at the payload end, zero padded), for a cheap
    // first comparison.
    let (w0, have) = if p + 8 <= data_end && off + 8 <= end {
        // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
        (unsafe { ld64(p as *const u64) }, 8u64)
    } else {
        if off >= end {
            return;
        }
        let rem = (((end - off).wrapping_sub(1)) & 7) as u64 + 1;
        match last_bytes(sc, data, data_end, end, rem) {
            Some(w) => (w, rem),
            None => {
                acc.malformed = 1;
                return;
            }
        }
    };
    if acc.fix != 0 {
        // A tag number with a leading zero (`0553=`) is the same tag to lenient engines.
        if true_start && w0 & 0xff == b'0' as u64 {
            acc.malformed = 1;
            return;
        }
        if have >= 5 && w0 & low_bytes(5) == u64::from_le_bytes(*b"35=A\x01\0\0\0") {
            acc.logon = 1;
        }
    } else if have == 8 && w0 == u64::from_le_bytes(*b"PRI * HT") {
        // The HTTP/2 preface: what follows is binary frames whose headers are compressed.
        acc.malformed = 1;
        return;
    }
    {
        // Most lines (Host, User-Agent, the blank line ending the headers) differ from every
        // key header in their first bytes: reject them before building the window.
        let have_mask = low_bytes(have);
        let mut any = false;
        for h in 0..MAX_HEADERS {
            if h >= l.n_headers as usize {
                break;
            }
            let (name, fold, mask) = (
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                unsafe { ld64(l.header_names[h].as_ptr() as *const u64) },
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                unsafe { ld64(l.header_fold[h].as_ptr() as *const u64) },
                // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
                unsafe { ld64(l.header_mask[h].as_ptr() as *const u64) },
            );
            // The colon (`=` for FIX) is left out here: a blank before it is checked below.
            let hl1 = (l.header_len[h] as u64).wrapping_sub(1) & 31;
            let colon = if hl1 < 8 { 0xffu64 << (8 * hl1) } else { 0 };
            if ((w0 | fold) ^ name) & mask & !colon & have_mask == 0 {
                any = true;
                break;
            }
        }
        if !any {
            return;
        }
    }
    let buf = unsafe { &mut (*sc).window };
    let avail: usize;
    if p + WINDOW <= data_end && off + WINDOW <= end {
        let s = p as *const u64;
        for j in 0..WINDOW / 8 {
            // SAFETY: a read the verifier proved in bounds, or the per-CPU scratch.
            buf[j] = unsafe { ld64(s.add(j)) };
        }
        // load8 may read one word past the window.
        buf[WINDOW / 8] = 0;
        buf[WINDOW / 8 + 1] = 0;
        avail = WINDOW;
    } else {
        for w in buf.iter_mut().take(10) {
            *w = 0;
        }
        if off >= end {
            return;
        }
        let rem = end - off;
        if rem > WINDOW || rem == 0 {
            return;
        }
        // Written so the verifier sees a length in 1..=64 (the buffer's size).
        let rem = ((rem - 1) & 0x3f) + 1;
        let r = unsafe {
            bpf_xdp_load_bytes(ctx.ctx, off as u32, buf.as_mut_ptr() as *mut _, rem as u32)
        };
        if r != 0 {
            acc.malformed = 1;
            return;
        }
        avail = rem;
    }
    let am = [
        avail_mask(avail, 0),
        avail_mask(avail, 1),
        avail_mask(avail, 2),
    ];
    let mut hit = MAX_HEADERS;
    let mut blank_colon = false;
    for h in 0..MAX_HEADERS {
        if h >= l.n_headers as usize {
            break;
        }
        let hl1 = (l.header_len[h] as u64).wrapping_sub(1) & 31;
        let mut diff = 0u64;
        let mut diff_nc = 0u64;
        for j in 0..3 {
            let (name, fold, mask) = unsafe {
                (
                    ld64((l.header_names[h].as_ptr() as *const u64).add(j)),
                    ld64((l.header_fold[h].as_ptr() as *const u64).add(j)),
                    ld64((l.header_mask[h].as_ptr() as *const u64).add(j)),
                )
            };
            // Only the bytes the segment has are compared: a name cut by the segment end
            // still matches, and is then failed closed below.
            let mask = mask & am[j];
            let d = ((buf[j] | fold) ^ name) & mask;
            diff |= d;
            let colon = if hl1 >> 3 == j as u64 {
                0xffu64 << (8 * (hl1 & 7))
            } else {
                0
            };
            diff_nc |= d & !colon;
        }
        if diff == 0 {
            hit = h;
            break;
        }
        if diff_nc == 0 {
            // The name, then something else where the colon should be: a blank there
            // (`X-MBX-APIKEY : k`) is a header to lenient servers.
            let c = load8(buf, hl1) & 0xff;
            if c == b' ' as u64 || c == b'\t' as u64 {
                blank_colon = true;
            }
        }
    }
    if blank_colon {
        acc.malformed = 1;
        return;
    }
    if hit >= MAX_HEADERS {
        return;
    }
    if folded {
        acc.malformed = 1;
        return;
    }
    let hlen = (l.header_len[hit] as u64) & 31;
    if (avail as u64) < hlen {
        // The segment ends inside what may be a key header's name.
        acc.malformed = 1;
        return;
    }
    let after = load8(buf, hlen);
    let ows = leading_bytes(!(eq_mask(after, b' ') | eq_mask(after, b'\t')) & HIGH);
    let v = (hlen + ows) & 63;
    let v0 = load8(buf, v);
    let v1 = load8(buf, v + 8);
    let n0 = leading_bytes(!key_byte_mask(v0) & HIGH);
    let n1 = leading_bytes(!key_byte_mask(v1) & HIGH);
    let vlen = n0 + (n0 >> 3) * n1;
    if vlen < plen {
        // Cut by the end of the segment, empty (an obs-fold continuation may follow), or
        // broken by a blank: not a key this filter can judge.
        acc.malformed = 1;
        return;
    }
    let p0 = v0 & low_bytes(plen);
    let p1 = v1 & low_bytes(plen.saturating_sub(8));
    if acc.found != 0 && (acc.prefix[0] != p0 || acc.prefix[1] != p1) {
        acc.malformed = 1;
        return;
    }
    acc.found = 1;
    acc.prefix = [p0, p1];
}
