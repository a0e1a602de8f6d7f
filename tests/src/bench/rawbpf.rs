//! Three tiny XDP programs the bench needs and that no object ships: a drop-all (the flood
//! ceiling), and the live-frames generator that spreads source addresses and redirects every
//! frame into a veth. aya 0.14 loads programs only from objects, so these are built from raw
//! instructions and driven with the `bpf()` syscall directly (load, test run, XDP link).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

const HELPER_GET_PRANDOM_U32: i32 = 7;
const HELPER_REDIRECT: i32 = 23;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.dst & 0xf) | (self.src << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

const fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}
const fn mov_imm(dst: u8, imm: i32) -> Insn {
    i(0xb7, dst, 0, 0, imm)
}
const fn mov_reg(dst: u8, src: u8) -> Insn {
    i(0xbf, dst, src, 0, 0)
}
const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
    i(0x61, dst, src, off, 0)
}
const fn stx_h(dst: u8, src: u8, off: i16) -> Insn {
    i(0x6b, dst, src, off, 0)
}
const fn add_imm(dst: u8, imm: i32) -> Insn {
    i(0x07, dst, 0, 0, imm)
}
const fn and_imm(dst: u8, imm: i32) -> Insn {
    i(0x57, dst, 0, 0, imm)
}
const fn sub_reg(dst: u8, src: u8) -> Insn {
    i(0x1f, dst, src, 0, 0)
}
/// Host to big-endian, 16 bits.
const fn be16(dst: u8) -> Insn {
    i(0xdc, dst, 0, 0, 16)
}
const fn jgt_reg(dst: u8, src: u8, off: i16) -> Insn {
    i(0x2d, dst, src, off, 0)
}
const fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
    i(0x55, dst, 0, off, imm)
}
const fn rsh_imm(dst: u8, imm: i32) -> Insn {
    i(0x77, dst, 0, 0, imm)
}
const fn add_reg(dst: u8, src: u8) -> Insn {
    i(0x0f, dst, src, 0, 0)
}
const fn call(helper: i32) -> Insn {
    i(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    i(0x95, 0, 0, 0, 0)
}

/// Byte offsets in an untagged IPv4/TCP frame without options that the generator rewrites.
pub const OFF_SRC_LO16: usize = 28;
pub const OFF_IP_ID: usize = 18;
pub const OFF_TCP_SPORT: usize = 34;
pub const OFF_TCP_SEQ_HI16: usize = 38;
pub const OFF_TCP_SEQ_LO16: usize = 40;
pub const GEN_MIN_FRAME: usize = 54;

fn be16_at(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// The generator's template rule: with the source's low 16 bits 0, the IP ID 0xffff and the
/// low 16 bits of the TCP sequence 0xfffe or 0xffff, writing d (0..=0xfffe) into the source
/// and subtracting it from the other two keeps both the IP and the TCP checksum valid (each
/// one's-complement sum is unchanged, and no field wraps). With `port_bits` > 0 the source
/// port also moves up by e (0..2^port_bits) and the sequence's high 16 bits down by e, so
/// they must leave room for it.
pub fn gen_template_ok(frame: &[u8], port_bits: u32) -> bool {
    let mask = (1u32 << port_bits) - 1;
    frame.len() >= GEN_MIN_FRAME
        && frame[12..14] == [0x08, 0x00]
        && frame[14] == 0x45
        && frame[23] == 6
        && frame[OFF_SRC_LO16..OFF_SRC_LO16 + 2] == [0, 0]
        && frame[OFF_IP_ID..OFF_IP_ID + 2] == [0xff, 0xff]
        && be16_at(frame, OFF_TCP_SEQ_LO16) >= 0xfffe
        && port_bits <= 15
        && u32::from(be16_at(frame, OFF_TCP_SPORT)) + mask <= 0xffff
        && u32::from(be16_at(frame, OFF_TCP_SEQ_HI16)) >= mask
}

/// What the generator does to one frame for the random draws d (source low 16 bits, capped
/// at 0xfffe) and e (source port offset, `port_bits` wide): the same rewrite as
/// `generator_insns`, for tests and for telling which frames belong together.
pub fn gen_rewrite(frame: &mut [u8], d: u16, e: u16, port_bits: u32) {
    let d = if d == 0xffff { 0 } else { d };
    let put = |f: &mut [u8], off: usize, v: u16| f[off..off + 2].copy_from_slice(&v.to_be_bytes());
    let (id, lo) = (be16_at(frame, OFF_IP_ID), be16_at(frame, OFF_TCP_SEQ_LO16));
    put(frame, OFF_SRC_LO16, d);
    put(frame, OFF_IP_ID, id - d);
    put(frame, OFF_TCP_SEQ_LO16, lo - d);
    if port_bits > 0 {
        let e = e & ((1u16 << port_bits) - 1);
        let (sp, hi) = (
            be16_at(frame, OFF_TCP_SPORT),
            be16_at(frame, OFF_TCP_SEQ_HI16),
        );
        put(frame, OFF_TCP_SPORT, sp + e);
        put(frame, OFF_TCP_SEQ_HI16, hi - e);
    }
}

/// Instructions of the generator for `template`: a random 16-bit d per frame (source low 16
/// bits = d, IP ID and TCP sequence low 16 bits = template value - d), with `port_bits` > 0
/// also a random e (source port = template port + e, sequence high 16 bits = template
/// value minus e), then `bpf_redirect(ifindex)`. A SYN template whose sequence ends in 0xfffe and a
/// data template with the same fields ending in 0xffff give, for the same (d, e), a SYN and
/// the data segment at its ISN + 1.
fn generator_insns(ifindex: u32, template: &[u8], port_bits: u32) -> Vec<Insn> {
    let seq_lo = i32::from(be16_at(template, OFF_TCP_SEQ_LO16));
    let sport = i32::from(be16_at(template, OFF_TCP_SPORT));
    let seq_hi = i32::from(be16_at(template, OFF_TCP_SEQ_HI16));
    let mut v = vec![
        mov_reg(6, 1),
        ldx_w(7, 6, 0), // data
        ldx_w(8, 6, 4), // data_end
        mov_reg(2, 7),
        add_imm(2, GEN_MIN_FRAME as i32),
        jgt_reg(2, 8, 0), // too short: pass (never for our templates); patched below
        call(HELPER_GET_PRANDOM_U32),
        mov_reg(9, 0),
        and_imm(0, 0xffff),
        jne_imm(0, 0xffff, 1),
        mov_imm(0, 0),
        mov_reg(1, 0),
        be16(1),
        stx_h(7, 1, OFF_SRC_LO16 as i16),
        mov_imm(2, 0xffff),
        sub_reg(2, 0),
        be16(2),
        stx_h(7, 2, OFF_IP_ID as i16),
        mov_imm(2, seq_lo),
        sub_reg(2, 0),
        be16(2),
        stx_h(7, 2, OFF_TCP_SEQ_LO16 as i16),
    ];
    if port_bits > 0 {
        v.extend([
            rsh_imm(9, 16),
            and_imm(9, (1i32 << port_bits) - 1),
            mov_imm(2, sport),
            add_reg(2, 9),
            be16(2),
            stx_h(7, 2, OFF_TCP_SPORT as i16),
            mov_imm(2, seq_hi),
            sub_reg(2, 9),
            be16(2),
            stx_h(7, 2, OFF_TCP_SEQ_HI16 as i16),
        ]);
    }
    v.extend([
        mov_imm(1, ifindex as i32),
        mov_imm(2, 0),
        call(HELPER_REDIRECT),
        exit(),
    ]);
    let pass = v.len();
    v.extend([mov_imm(0, XDP_PASS as i32), exit()]);
    // The bounds check jumps to the pass exit.
    v[5].off = (pass - 6) as i16;
    v
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
fn get32(a: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(a[off..off + 4].try_into().expect("4 bytes"))
}

/// A loaded raw XDP program.
pub struct RawProg {
    pub fd: OwnedFd,
    pub name: &'static str,
}

fn load(name: &'static str, insns: &[Insn]) -> Result<RawProg> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.bytes()).collect();
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_XDP);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, code.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log level
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    let mut pname = [0u8; 16];
    pname[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    attr[48..64].copy_from_slice(&pname);
    put32(&mut attr, 68, BPF_XDP);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(RawProg {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            name,
        }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(0);
            bail!(
                "loading {name}: {e}; verifier: {}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// `XDP_DROP` for every frame: the ceiling a filter that drops can reach.
pub fn drop_all() -> Result<RawProg> {
    load("kwb_drop_all", &[mov_imm(0, XDP_DROP as i32), exit()])
}

/// The live-frames generator for the interface `ifindex` (in the loading thread's netns),
/// for frames built from `template` (see `generator_insns`).
pub fn generator(ifindex: u32, template: &[u8], port_bits: u32) -> Result<RawProg> {
    load("kwb_gen", &generator_insns(ifindex, template, port_bits))
}

pub struct RunResult {
    pub retval: u32,
    /// The kernel's average per run (meaningless with live frames).
    pub per_run: Duration,
}

impl RawProg {
    /// `BPF_PROG_TEST_RUN` on `frame`, `repeat` times.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<RunResult> {
        self.run(frame, repeat, 0)
    }

    /// Sends `frames` live frames built from `frame` through the program (`XDP_REDIRECT`
    /// transmits them). Must run in the netns the redirect target lives in.
    pub fn send_live(&self, frame: &[u8], frames: u32) -> Result<()> {
        self.run(frame, frames, BPF_F_TEST_XDP_LIVE_FRAMES)
            .map(|_| ())
    }

    fn run(&self, frame: &[u8], repeat: u32, flags: u32) -> Result<RunResult> {
        let mut attr = [0u8; 80];
        put32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put32(&mut attr, 8, frame.len() as u32);
        put64(&mut attr, 16, frame.as_ptr() as u64);
        put32(&mut attr, 32, repeat);
        put32(&mut attr, 64, flags);
        // A long run is interruptible: a pending signal ends it with EINTR. Run it again.
        let mut tries = 0;
        loop {
            match bpf(BPF_PROG_TEST_RUN, &mut attr) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 20 => tries += 1,
                r => {
                    r.with_context(|| format!("BPF_PROG_TEST_RUN ({})", self.name))?;
                    break;
                }
            }
        }
        Ok(RunResult {
            retval: get32(&attr, 4),
            per_run: Duration::from_nanos(u64::from(get32(&attr, 36))),
        })
    }

    /// Attaches in native (driver) mode to `ifindex`, which must be in the calling thread's
    /// netns. Closing the returned link detaches.
    pub fn attach_native(&self, ifindex: u32) -> Result<OwnedFd> {
        let mut attr = [0u8; 64];
        put32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put32(&mut attr, 4, ifindex);
        put32(&mut attr, 8, BPF_XDP);
        put32(&mut attr, 12, 1 << 2); // XDP_FLAGS_DRV_MODE
        let fd = bpf(BPF_LINK_CREATE, &mut attr)
            .with_context(|| format!("attaching {} (ifindex {ifindex})", self.name))?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

/// The ifindex of `name` in the calling thread's netns.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name} here: {}", io::Error::last_os_error());
    }
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_check_jumps_to_the_pass_exit() {
        let mut t = vec![0u8; 60];
        t[40..42].copy_from_slice(&[0xff, 0xff]);
        t[38..40].copy_from_slice(&[0x00, 0x10]);
        for bits in [0, 3] {
            let insns = generator_insns(7, &t, bits);
            let j = insns.iter().position(|i| i.code == 0x2d).expect("jump");
            let target = j + 1 + insns[j].off as usize;
            assert_eq!(insns[target].code, 0xb7);
            assert_eq!(insns[target].imm, XDP_PASS as i32);
            assert_eq!(insns[target + 1].code, 0x95);
        }
    }

    /// The compensation trick: one's-complement sums over the rewritten words stay equal.
    #[test]
    fn rewritten_fields_keep_the_sum() {
        let fold = |v: u32| {
            let mut s = v;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            s
        };
        for d in [0u32, 1, 0x7fff, 0x8000, 0xfffe, 0xffff] {
            assert_eq!(fold(d + (0xffff - d)), fold(0xffff));
        }
    }

    /// The rewrite keeps both checksums valid, and a SYN template ending in 0xfffe and a
    /// data template ending in 0xffff give the data segment at the SYN's ISN + 1.
    #[test]
    fn rewrite_keeps_checksums_and_pairs_syn_with_data() {
        use crate::packet::{Pkt, checksum};
        let tcp_ok = |f: &[u8]| {
            let src: [u8; 4] = f[26..30].try_into().unwrap();
            let dst: [u8; 4] = f[30..34].try_into().unwrap();
            let total = u16::from_be_bytes([f[16], f[17]]) as usize;
            let l4 = &f[34..14 + total];
            let mut ph = Vec::new();
            ph.extend_from_slice(&src);
            ph.extend_from_slice(&dst);
            ph.extend_from_slice(&[0, 6]);
            ph.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ph.extend_from_slice(l4);
            checksum(&ph) == 0
        };
        let base = |p: Pkt| p.ipv4_id(0xffff);
        let syn = base(Pkt::tcp4([10, 77, 0, 0], [192, 0, 2, 1], 40000, 8080))
            .seq(0x0100_fffe)
            .syn()
            .build();
        let data = base(Pkt::tcp4([10, 77, 0, 0], [192, 0, 2, 1], 40000, 8080))
            .seq(0x0100_ffff)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        assert!(gen_template_ok(&syn, 3) && gen_template_ok(&data, 3));
        for (d, e) in [(0u16, 0u16), (1, 7), (0x7fff, 3), (0xfffe, 5), (0xffff, 1)] {
            let (mut s, mut t) = (syn.clone(), data.clone());
            gen_rewrite(&mut s, d, e, 3);
            gen_rewrite(&mut t, d, e, 3);
            for f in [&s, &t] {
                assert_eq!(checksum(&f[14..34]), 0, "IP checksum (d {d}, e {e})");
                assert!(tcp_ok(f), "TCP checksum (d {d}, e {e})");
            }
            let seq = |f: &[u8]| u32::from_be_bytes(f[38..42].try_into().unwrap());
            assert_eq!(seq(&s).wrapping_add(1), seq(&t));
            assert_eq!(s[26..36], t[26..36]);
        }
    }
}
