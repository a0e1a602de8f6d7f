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
const fn call(helper: i32) -> Insn {
    i(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    i(0x95, 0, 0, 0, 0)
}

/// Byte offsets in an untagged IPv4/TCP frame without options that the generator rewrites.
pub const OFF_SRC_LO16: usize = 28;
pub const OFF_IP_ID: usize = 18;
pub const OFF_TCP_SEQ_LO16: usize = 40;
pub const GEN_MIN_FRAME: usize = 54;

/// The generator's template rule: with the source's low 16 bits 0, the IP ID 0xffff and the
/// low 16 bits of the TCP sequence 0xffff, writing d, 0xffff-d, 0xffff-d keeps both the IP
/// and the TCP checksum valid (each one's-complement sum is unchanged, and no field wraps).
pub fn gen_template_ok(frame: &[u8]) -> bool {
    frame.len() >= GEN_MIN_FRAME
        && frame[12..14] == [0x08, 0x00]
        && frame[14] == 0x45
        && frame[23] == 6
        && frame[OFF_SRC_LO16..OFF_SRC_LO16 + 2] == [0, 0]
        && frame[OFF_IP_ID..OFF_IP_ID + 2] == [0xff, 0xff]
        && frame[OFF_TCP_SEQ_LO16..OFF_TCP_SEQ_LO16 + 2] == [0xff, 0xff]
}

/// Instructions of the generator: a random 16-bit d per frame (source low 16 bits = d, IP ID
/// and TCP sequence low 16 bits = 0xffff - d), then `bpf_redirect(ifindex)`.
fn generator_insns(ifindex: u32) -> Vec<Insn> {
    vec![
        mov_reg(6, 1),
        ldx_w(7, 6, 0), // data
        ldx_w(8, 6, 4), // data_end
        mov_reg(2, 7),
        add_imm(2, GEN_MIN_FRAME as i32),
        jgt_reg(2, 8, 14), // too short: pass (never for our templates)
        call(HELPER_GET_PRANDOM_U32),
        and_imm(0, 0xffff),
        mov_reg(1, 0),
        be16(1),
        stx_h(7, 1, OFF_SRC_LO16 as i16),
        mov_imm(2, 0xffff),
        sub_reg(2, 0),
        be16(2),
        stx_h(7, 2, OFF_IP_ID as i16),
        stx_h(7, 2, OFF_TCP_SEQ_LO16 as i16),
        mov_imm(1, ifindex as i32),
        mov_imm(2, 0),
        call(HELPER_REDIRECT),
        exit(),
        mov_imm(0, XDP_PASS as i32),
        exit(),
    ]
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

/// The live-frames generator for the interface `ifindex` (in the loading thread's netns).
pub fn generator(ifindex: u32) -> Result<RawProg> {
    load("kwb_gen", &generator_insns(ifindex))
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
        let insns = generator_insns(7);
        let j = insns.iter().position(|i| i.code == 0x2d).expect("jump");
        let target = j + 1 + insns[j].off as usize;
        assert_eq!(insns[target].code, 0xb7);
        assert_eq!(insns[target].imm, XDP_PASS as i32);
        assert_eq!(insns[target + 1].code, 0x95);
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
}
