//! The daemon's contact with its host, outside the datapath: the capabilities it runs with,
//! readiness and reload notices to systemd, and the XDP programs of others on an interface.

use std::{ffi::CString, io, os::fd::RawFd};

use anyhow::{Context as _, Result, bail};

// ---------------------------------------------------------------------------------------------
// Capabilities

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities `keywall run` needs, and why:
/// - CAP_BPF: load the program, create and pin its maps, read them back;
/// - CAP_NET_ADMIN: attach XDP to an interface (and XDP programs are networking programs);
/// - CAP_PERFMON: without it the verifier applies its rules for untrusted loaders and refuses
///   the program (`R2 pointer -= pointer prohibited`: the packet walks subtract packet
///   pointers), as seen on 6.18.
pub const REQUIRED_CAPS: [(&str, u32); 3] = [
    ("CAP_BPF", CAP_BPF),
    ("CAP_NET_ADMIN", CAP_NET_ADMIN),
    ("CAP_PERFMON", CAP_PERFMON),
];

/// The effective capability set, from `CapEff` in /proc/self/status.
pub fn effective_caps() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_cap_eff(&status).context("no CapEff line in /proc/self/status")
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// The names of the required capabilities missing from `eff`. CAP_SYS_ADMIN stands in for
/// CAP_BPF and CAP_PERFMON, as the kernel lets it.
pub fn missing_caps(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    REQUIRED_CAPS
        .iter()
        .filter(|(_, c)| !(has(*c) || (*c != CAP_NET_ADMIN && has(CAP_SYS_ADMIN))))
        .map(|(n, _)| *n)
        .collect()
}

/// Refuses to start, in one line naming what is missing, before anything is loaded.
pub fn check_caps() -> Result<()> {
    let missing = missing_caps(effective_caps()?);
    if !missing.is_empty() {
        bail!(
            "missing capability {}: `keywall run` needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
             (as root, or as a user given them, e.g. AmbientCapabilities= in its unit)",
            missing.join(" and ")
        );
    }
    Ok(())
}

/// Gives `path` and what is pinned in it to `user` (and that user's group), for the unit's
/// privileged ExecStartPre: pins left by a daemon that ran as root (mode 0600) become the
/// user's, so the unit takes them over.
pub fn chown_to_user(path: &std::path::Path, user: &str) -> Result<()> {
    let name = CString::new(user)?;
    // SAFETY: `name` is a NUL-terminated C string that outlives the call; the result is
    // checked for NULL before it is read.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("no user {user:?}");
    }
    // SAFETY: `pw` is non-NULL and points to libc's static passwd record, read at once
    // (no other getpw* call in between).
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {user} {}", path.display()))?;
    for e in std::fs::read_dir(path)?.flatten() {
        std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))
            .with_context(|| format!("chown {user} {}", e.path().display()))?;
    }
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// systemd notifications

/// Sends `state` (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=…`) to systemd when the
/// daemon runs under a `Type=notify` unit ($NOTIFY_SOCKET set); otherwise does nothing.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(path.as_encoded_bytes(), state) {
        log::warn!("notifying systemd ({state:?}): {e}");
    }
}

fn send_notify(path: &[u8], state: &str) -> io::Result<()> {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    let addr = match path.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(path),
        )?,
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// XDP programs already on an interface

/// One XDP program attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// `native`, `skb` or `offload`.
    pub mode: &'static str,
    pub prog_id: u32,
    /// The program's name as the kernel knows it (at most 15 bytes).
    pub name: String,
    /// The bpf_link holding it, when it was attached through one (else through netlink).
    pub link_id: Option<u32>,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (prog id {}, {} mode, {})",
            if self.name.is_empty() {
                "<unnamed>"
            } else {
                &self.name
            },
            self.prog_id,
            self.mode,
            match self.link_id {
                Some(l) => format!("bpf_link {l}"),
                None => "attached through netlink".into(),
            }
        )
    }
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface)?;
    // SAFETY: `c` is a NUL-terminated C string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {iface:?}");
    }
    Ok(i)
}

/// The XDP programs on `iface`, read from the kernel (RTM_GETLINK, and the XDP links).
pub fn attached_xdp(iface: &str) -> Result<Vec<Attached>> {
    let idx = ifindex(iface)?;
    let ids = netlink_xdp_ids(idx).with_context(|| format!("reading the XDP state of {iface}"))?;
    let links = xdp_links(idx).unwrap_or_default();
    Ok(ids
        .into_iter()
        .map(|(mode, prog_id)| Attached {
            mode,
            prog_id,
            name: prog_name(prog_id).unwrap_or_default(),
            link_id: links.iter().find(|(_, p)| *p == prog_id).map(|(l, _)| *l),
        })
        .collect())
}

/// Removes `a` from `iface`: BPF_LINK_DETACH for a link, else an empty netlink attach in its mode.
pub fn detach_foreign(iface: &str, a: &Attached) -> Result<()> {
    match a.link_id {
        Some(l) => {
            let fd = bpf_fd_by_id(BPF_LINK_GET_FD_BY_ID, l)?;
            let r = bpf(BPF_LINK_DETACH, &mut attr_fd(fd));
            close(fd);
            r.map(|_| ()).context("BPF_LINK_DETACH")
        }
        None => netlink_set_xdp_none(ifindex(iface)?, a.mode),
    }
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_XDP: u32 = 6;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed 128-byte `union bpf_attr` prefix, larger than what the
    // commands used here read or write, and its size is passed with it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn attr_fd(fd: RawFd) -> [u64; 16] {
    let mut a = [0u64; 16];
    a[0] = fd as u32 as u64;
    a
}

fn close(fd: RawFd) {
    // SAFETY: `fd` is a descriptor this module opened and owns; it is closed once.
    unsafe { libc::close(fd) };
}

fn bpf_fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<RawFd> {
    let mut a = [0u64; 16];
    a[0] = id as u64;
    bpf(cmd, &mut a).map(|fd| fd as RawFd)
}

/// BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer of `N` bytes.
fn obj_info<const N: usize>(fd: RawFd) -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut a = [0u64; 16];
    a[0] = fd as u32 as u64 | ((N as u64) << 32);
    a[1] = buf.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    Ok(buf)
}

fn prog_name(id: u32) -> io::Result<String> {
    let fd = bpf_fd_by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    // struct bpf_prog_info: name[16] at offset 64.
    let info = obj_info::<256>(fd);
    close(fd);
    let info = info?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// (link id, prog id) of every XDP link on `ifindex`.
fn xdp_links(ifindex: u32) -> io::Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut a = [0u64; 16];
        a[0] = id as u64;
        match bpf(BPF_LINK_GET_NEXT_ID, &mut a) {
            Ok(_) => id = (a[0] >> 32) as u32,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let Ok(fd) = bpf_fd_by_id(BPF_LINK_GET_FD_BY_ID, id) else {
            continue; // gone meanwhile
        };
        // struct bpf_link_info: type, id, prog_id, then the union (xdp.ifindex at 16).
        let info = obj_info::<64>(fd);
        close(fd);
        let Ok(info) = info else { continue };
        let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
        if word(0) == BPF_LINK_TYPE_XDP && word(16) == ifindex {
            out.push((word(4), word(8)));
        }
    }
}

// rtnetlink, just what is needed for IFLA_XDP.
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFLA_XDP: u16 = 43;
const NLA_F_NESTED: u16 = 1 << 15;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
const XDP_ATTACHED_MULTI: u8 = 4;

fn mode_flag(mode: &str) -> u32 {
    match mode {
        "skb" => 1 << 1,
        "native" => 1 << 2,
        _ => 1 << 3,
    }
}

struct Netlink(RawFd);

impl Drop for Netlink {
    fn drop(&mut self) {
        close(self.0);
    }
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2) takes plain integers; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink(fd))
    }

    /// Sends one request (header filled in here) and returns the first answer's payload
    /// type and bytes (after the nlmsghdr). A netlink error becomes an io::Error.
    fn request(&self, ty: u16, flags: u16, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: `msg` is valid for `msg.len()` bytes for the duration of the call.
        if unsafe { libc::send(self.0, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for `buf.len()` bytes; recv writes at most that many.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let buf = &buf[..n as usize];
        if buf.len() < 16 {
            return Err(io::Error::other("short netlink answer"));
        }
        let len = (u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize).min(buf.len());
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        let payload = buf[16..len].to_vec();
        if ty == NLMSG_ERROR {
            let err = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err));
            }
        }
        Ok((ty, payload))
    }
}

fn ifinfomsg(ifindex: u32) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    m
}

/// Walks netlink attributes: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// (mode, prog id) of each XDP program on `ifindex`.
fn netlink_xdp_ids(ifindex: u32) -> io::Result<Vec<(&'static str, u32)>> {
    let nl = Netlink::open()?;
    let (ty, payload) = nl.request(RTM_GETLINK, 0, &ifinfomsg(ifindex))?;
    if ty != RTM_NEWLINK || payload.len() < 16 {
        return Err(io::Error::other("unexpected netlink answer"));
    }
    let Some((_, xdp)) = attrs(&payload[16..])
        .into_iter()
        .find(|(t, _)| *t == IFLA_XDP)
    else {
        return Ok(Vec::new());
    };
    let nested = attrs(xdp);
    let u32_of = |t: u16| {
        nested
            .iter()
            .find(|(a, _)| *a == t)
            .and_then(|(_, v)| v.get(..4))
            .map(|v| u32::from_ne_bytes(v.try_into().unwrap()))
    };
    let attached = nested
        .iter()
        .find(|(a, _)| *a == IFLA_XDP_ATTACHED)
        .and_then(|(_, v)| v.first().copied())
        .unwrap_or(0);
    let mut out = Vec::new();
    match attached {
        XDP_ATTACHED_DRV | XDP_ATTACHED_SKB | XDP_ATTACHED_HW => {
            let mode = match attached {
                XDP_ATTACHED_DRV => "native",
                XDP_ATTACHED_SKB => "skb",
                _ => "offload",
            };
            if let Some(id) = u32_of(IFLA_XDP_PROG_ID) {
                out.push((mode, id));
            }
        }
        XDP_ATTACHED_MULTI => {
            for (t, mode) in [
                (IFLA_XDP_DRV_PROG_ID, "native"),
                (IFLA_XDP_SKB_PROG_ID, "skb"),
                (IFLA_XDP_HW_PROG_ID, "offload"),
            ] {
                if let Some(id) = u32_of(t).filter(|&i| i != 0) {
                    out.push((mode, id));
                }
            }
        }
        _ => {}
    }
    Ok(out)
}

/// RTM_SETLINK with IFLA_XDP { FD = -1, FLAGS = mode }: removes a netlink-attached program.
fn netlink_set_xdp_none(ifindex: u32, mode: &str) -> Result<()> {
    let mut body = ifinfomsg(ifindex);
    let mut nest = Vec::new();
    for (t, v) in [
        (IFLA_XDP_FD, (-1i32).to_ne_bytes()),
        (IFLA_XDP_FLAGS, mode_flag(mode).to_ne_bytes()),
    ] {
        nest.extend_from_slice(&8u16.to_ne_bytes());
        nest.extend_from_slice(&t.to_ne_bytes());
        nest.extend_from_slice(&v);
    }
    body.extend_from_slice(&((4 + nest.len()) as u16).to_ne_bytes());
    body.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
    body.extend_from_slice(&nest);
    let nl = Netlink::open()?;
    nl.request(RTM_SETLINK, NLM_F_ACK, &body)
        .context("removing the XDP program through netlink")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_named() {
        let all = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert!(missing_caps(all).is_empty());
        assert_eq!(missing_caps(all & !(1 << CAP_PERFMON)), ["CAP_PERFMON"]);
        assert_eq!(missing_caps(0), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
        // CAP_SYS_ADMIN covers BPF and PERFMON, never NET_ADMIN.
        assert_eq!(missing_caps(1 << CAP_SYS_ADMIN), ["CAP_NET_ADMIN"]);
        let status = "Name:\tkeywall\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        assert_eq!(parse_cap_eff(status), Some(all));
    }
}
