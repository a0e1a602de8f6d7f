//! A sandbox of two network namespaces joined by a veth pair, for end-to-end tests.
//!
//! ```text
//!   client ns  kw-<tag>-<pid>-<n>-c          edge ns  kw-<tag>-<pid>-<n>-e
//!   [kwc<hash6>] 10.200.S.2/24  <--veth-->  [kwe<hash6>] 10.200.S.1/24   <- XDP attaches here
//!                fd00:6b77:0:G::2/64                      fd00:6b77:0:G::1/64
//! ```
//!
//! Many sandboxes run in parallel (threads and processes): every name carries the pid and a
//! per-process counter, and the interfaces are created inside their namespaces, so nothing
//! collides in the root namespace. Addresses exist only inside the sandbox's namespaces.
//!
//! Commands run in a namespace through `nsenter --net=/run/netns/NAME`, never `ip netns exec`,
//! which remounts /sys and hides the bpffs pins.
//!
//! Dropping the sandbox (or [`Sandbox::cleanup`]) kills every process inside its namespaces
//! (SIGTERM, then SIGKILL after 2 s), deletes the namespaces, the pin directory and the temp
//! directory. Set `KEYWALL_SANDBOX_KEEP=1` to keep them for debugging. Sandboxes left behind by
//! dead processes (a test killed by Ctrl-C) are removed by the next [`Sandbox::new`].

use std::{
    ffi::OsStr,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::{Deref, DerefMut},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of the sandbox's pin and temp directories: `kw-sb-<pid>-<n>`.
const DIR_PREFIX: &str = "kw-sb-";
/// Default `--max-time` of [`Sandbox::curl_from_client`], in seconds.
pub const CURL_MAX_TIME: &str = "3";

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` mounts /run/netns on first use; keep creations in one process serial.
static CREATE_LOCK: Mutex<()> = Mutex::new(());
static PREPARE: Once = Once::new();

/// Names and addresses of one sandbox, derived from (tag, pid, counter) alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub edge_ns: String,
    pub client_ns: String,
    pub edge_if: String,
    pub client_if: String,
    /// `kw-sb-<pid>-<n>`: the pin directory under /sys/fs/bpf and the temp directory.
    pub dir: String,
    /// Third octet of the IPv4 /24 (10.200.S.0/24).
    pub v4_subnet: u8,
    /// Fourth group of the IPv6 /64 (fd00:6b77:0:G::/64).
    pub v6_subnet: u16,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Keeps `[a-z0-9]` of the tag, at most 10 characters (`t` when nothing is left).
pub fn sanitize_tag(tag: &str) -> String {
    let t: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(10)
        .collect();
    if t.is_empty() { "t".into() } else { t }
}

pub fn derive_names(tag: &str, pid: u32, n: u32) -> Names {
    let tag = sanitize_tag(tag);
    let mut seed = pid.to_le_bytes().to_vec();
    seed.extend(n.to_le_bytes());
    let h = fnv1a(&seed);
    let hash6 = format!("{:06x}", h & 0xff_ffff);
    Names {
        edge_ns: format!("kw-{tag}-{pid}-{n}-e"),
        client_ns: format!("kw-{tag}-{pid}-{n}-c"),
        edge_if: format!("kwe{hash6}"),
        client_if: format!("kwc{hash6}"),
        dir: format!("{DIR_PREFIX}{pid}-{n}"),
        v4_subnet: (h >> 24) as u8,
        v6_subnet: (h >> 32) as u16,
    }
}

/// The pid of the process that made a sandbox namespace (`kw-<tag>-<pid>-<n>-e|c`).
pub fn ns_owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix("kw-")?;
    let rest = rest
        .strip_suffix("-e")
        .or_else(|| rest.strip_suffix("-c"))?;
    let mut parts = rest.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    if tag.is_empty() || n.parse::<u32>().is_err() {
        return None;
    }
    pid.parse().ok()
}

/// The pid of the process that made a sandbox directory (`kw-sb-<pid>-<n>`).
pub fn dir_owner_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(DIR_PREFIX)?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Whether `pid` is a live process (a zombie, waiting for its parent to reap it, is not).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S …": the state follows the last ')', since comm may hold anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Which kind of server [`Sandbox::spawn_server_edge`] starts. All listen dual-stack on `[::]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// HTTP/1.1 with keep-alive; every request gets `200` and a short fixed body.
    Http,
    /// The same over TLS, with a throw-away self-signed certificate (use `curl -k`).
    Https,
    /// Raw TCP (e.g. FIX): answers every chunk received with `ACK <len>\n`.
    TcpAck,
}

impl ServerKind {
    fn arg(self) -> &'static str {
        match self {
            ServerKind::Http => "http",
            ServerKind::Https => "https",
            ServerKind::TcpAck => "tcp",
        }
    }
}

/// The body every HTTP(S) request gets from the test server.
pub const HTTP_BODY: &str = "keywall-test-ok\n";

const SERVER_PY: &str = r#"
import socket, socketserver, ssl, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

mode, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
BODY = b"keywall-test-ok\n"

class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kw-test"
    sys_version = ""
    def serve(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > 0:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(BODY)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = serve
    def log_message(self, *args):
        pass

class TcpAck(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(b"ACK %d\n" % len(data))

class Server(socketserver.ThreadingMixIn, HTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    request_queue_size = 128  # a burst of connects must not overflow the accept queue
    daemon_threads = True
    tls = None
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)  # no getfqdn(): no DNS in a namespace
        self.server_name, self.server_port = "kw-test", port
    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's thread: a dropped ClientHello must
        # not stall accept() for everyone else.
        if self.tls is not None:
            request.settimeout(30)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
            request.settimeout(None)
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            if self.tls is not None:
                try:
                    request.close()
                except OSError:
                    pass

srv = Server(("::", port), TcpAck if mode == "tcp" else Http)
if mode == "https":
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    srv.tls = ctx
open(ready, "w").close()
srv.serve_forever()
"#;

/// Client programs (tests/scripts/clients.py) and the FIX acceptor, written into each sandbox.
const CLIENTS_PY: &str = include_str!("../scripts/clients.py");
const FIX_ACCEPTOR_PY: &str = include_str!("../scripts/fix_acceptor.py");

/// A process started in a sandbox namespace: derefs to [`Child`], and is killed (SIGKILL) and
/// reaped when dropped, unless it already exited or [`Proc::into_child`] took it out.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn new(child: Child) -> Proc {
        Proc { child: Some(child) }
    }

    /// The plain [`Child`], no longer killed on drop (the sandbox cleanup still kills it).
    pub fn into_child(mut self) -> Child {
        self.child
            .take()
            .expect("Proc always holds a child until dropped")
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; returns its exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own unreaped child's pid.
        unsafe { libc::kill(self.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.kill()?;
        Ok(self.wait()?)
    }
}

impl Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child
            .as_ref()
            .expect("Proc always holds a child until dropped")
    }
}

impl DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("Proc always holds a child until dropped")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take()
            && let Ok(None) = c.try_wait()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two namespaces, a veth pair, addresses, a pin directory and a temp directory.
pub struct Sandbox {
    names: Names,
    pin_dir: PathBuf,
    tmp_dir: PathBuf,
    state_dir: PathBuf,
    /// Next host numbers for [`Sandbox::add_client_v4`] / [`Sandbox::add_client_v6`].
    next_v4: AtomicU32,
    next_v6: AtomicU32,
    /// Whether [`Sandbox::cleanup`] ran. A mutex, not a flag: a second caller (the main thread
    /// while a Ctrl-C handler cleans up) must wait until the first one has finished, or the
    /// process could exit with the namespaces half removed.
    cleaned: Mutex<bool>,
}

impl Sandbox {
    /// Creates the sandbox. `tag` (a few letters naming the test) shows in namespace names.
    pub fn new(tag: &str) -> Result<Sandbox> {
        prepare_once();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let names = derive_names(tag, pid, n);
        let tmp_dir = std::env::temp_dir().join(&names.dir);
        let sb = Sandbox {
            pin_dir: Path::new(BPFFS).join(&names.dir),
            state_dir: tmp_dir.join("state"),
            tmp_dir,
            names,
            next_v4: AtomicU32::new(3),
            next_v6: AtomicU32::new(3),
            cleaned: Mutex::new(false),
        };
        // On error `sb` drops here, and its cleanup removes whatever was made.
        sb.build()
            .with_context(|| format!("creating sandbox {}", sb.names.edge_ns))?;
        Ok(sb)
    }

    fn build(&self) -> Result<()> {
        let n = &self.names;
        fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("mkdir {}", self.state_dir.display()))?;
        if !is_bpffs(Path::new(BPFFS)) {
            bail!(
                "{BPFFS} is not a bpffs mount (run `cargo xtask setup`, or `mount -t bpf bpf {BPFFS}`)"
            );
        }
        fs::create_dir(&self.pin_dir)
            .with_context(|| format!("mkdir {}", self.pin_dir.display()))?;
        {
            let _g = CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            ip(&["netns", "add", &n.edge_ns])?;
            ip(&["netns", "add", &n.client_ns])?;
        }
        let (e, c) = (n.edge_ns.as_str(), n.client_ns.as_str());
        let (ei, ci) = (n.edge_if.as_str(), n.client_if.as_str());
        ip(&[
            "-n", e, "link", "add", ei, "type", "veth", "peer", "name", ci, "netns", c,
        ])?;
        ip(&[
            "-n",
            e,
            "addr",
            "add",
            &format!("{}/24", self.edge_v4()),
            "dev",
            ei,
        ])?;
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{}/24", self.client_v4()),
            "dev",
            ci,
        ])?;
        ip(&[
            "-n",
            e,
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.edge_v6()),
            "dev",
            ei,
            "nodad",
        ])?;
        ip(&[
            "-n",
            c,
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.client_v6()),
            "dev",
            ci,
            "nodad",
        ])?;
        for (ns, ifname) in [(e, ei), (c, ci)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
            let out = ns_command(ns, "ethtool")
                .args(["-K", ifname, "gro", "on"])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "netns: warning: `ethtool -K {ifname} gro on` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(err) => eprintln!(
                    "netns: warning: ethtool not runnable ({err}); GRO left off on {ifname}"
                ),
            }
        }
        // A veth delivers frames its peer sends with XDP_TX (the RSTs of `action = "reset"`)
        // only when it has an XDP program itself; GRO alone does not do it on this kernel
        // (seen on 6.18). Give the client side one that passes everything.
        let pass = self.tmp_dir().join("keywall-pass.o");
        std::fs::write(&pass, keywall::dataplane::PASS_OBJECT)
            .context("writing the pass object")?;
        ip(&[
            "-n",
            c,
            "link",
            "set",
            "dev",
            ci,
            "xdpdrv",
            "obj",
            pass.to_str().expect("utf-8 path"),
            "sec",
            "xdp",
        ])
        .context("attaching a pass-all XDP program to the client veth")?;
        Ok(())
    }

    pub fn names(&self) -> &Names {
        &self.names
    }
    pub fn edge_ns(&self) -> &str {
        &self.names.edge_ns
    }
    pub fn client_ns(&self) -> &str {
        &self.names.client_ns
    }
    /// The edge-side veth, where XDP attaches.
    pub fn edge_if(&self) -> &str {
        &self.names.edge_if
    }
    pub fn client_if(&self) -> &str {
        &self.names.client_if
    }
    pub fn edge_v4(&self) -> Ipv4Addr {
        self.host_v4(1)
    }
    pub fn client_v4(&self) -> Ipv4Addr {
        self.host_v4(2)
    }
    pub fn edge_v6(&self) -> Ipv6Addr {
        self.host_v6(1)
    }
    pub fn client_v6(&self) -> Ipv6Addr {
        self.host_v6(2)
    }
    /// The sandbox's IPv4 subnet, `10.200.S.0/24`.
    pub fn v4_net(&self) -> String {
        format!("{}/24", self.host_v4(0))
    }
    /// The sandbox's IPv6 subnet, `fd00:6b77:0:G::/64`.
    pub fn v6_net(&self) -> String {
        format!("{}/64", self.host_v6(0))
    }
    fn host_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.names.v4_subnet, host)
    }
    fn host_v6(&self, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x6b77, 0, self.names.v6_subnet, 0, 0, 0, host)
    }
    /// A unique directory under /sys/fs/bpf (created empty) for the daemon's `--pin-dir`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
    /// A temp directory (created empty) for the daemon's `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    /// The sandbox's own temp directory (holds `state_dir`, scripts, certificates, logs).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Adds another client address from the sandbox subnet (10.200.S.3, .4, …) and returns it.
    pub fn add_client_v4(&self) -> Result<Ipv4Addr> {
        let h = self.next_v4.fetch_add(1, Ordering::SeqCst);
        let host = u8::try_from(h)
            .ok()
            .filter(|h| *h < 255)
            .context("out of client IPv4 addresses")?;
        let a = self.host_v4(host);
        self.add_client_addr(IpAddr::V4(a))?;
        Ok(a)
    }

    /// Adds another client address from the sandbox subnet (…::3, ::4, …) and returns it.
    pub fn add_client_v6(&self) -> Result<Ipv6Addr> {
        let h = self.next_v6.fetch_add(1, Ordering::SeqCst);
        let a = self.host_v6(u16::try_from(h).context("out of client IPv6 addresses")?);
        self.add_client_addr(IpAddr::V6(a))?;
        Ok(a)
    }

    /// Adds `addr` to the client's veth. Inside the sandbox subnet that is all; outside it the
    /// edge also gets an on-link host route back to it, so any address works (bind to it with
    /// `curl --interface ADDR`).
    pub fn add_client_addr(&self, addr: IpAddr) -> Result<()> {
        let (c, ci) = (self.client_ns(), self.client_if());
        let (e, ei) = (self.edge_ns(), self.edge_if());
        match addr {
            IpAddr::V4(a) => {
                ip(&["-n", c, "addr", "add", &format!("{a}/32"), "dev", ci])?;
                if a.octets()[..3] != self.host_v4(0).octets()[..3] {
                    ip(&["-n", e, "route", "add", &format!("{a}/32"), "dev", ei])?;
                }
            }
            IpAddr::V6(a) => {
                ip(&[
                    "-n",
                    c,
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/128"),
                    "dev",
                    ci,
                    "nodad",
                ])?;
                if a.segments()[..4] != self.host_v6(0).segments()[..4] {
                    ip(&[
                        "-n",
                        e,
                        "-6",
                        "route",
                        "add",
                        &format!("{a}/128"),
                        "dev",
                        ei,
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// `nsenter --net=/run/netns/<edge ns> -- program`, to add args, env and stdio to.
    pub fn edge_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(self.edge_ns(), program)
    }
    pub fn client_cmd(&self, program: impl AsRef<OsStr>) -> Command {
        ns_command(self.client_ns(), program)
    }

    /// Runs a command in the edge namespace and returns its output, whatever its exit status.
    pub fn exec_edge<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec(self.edge_cmd(program).args(args))
    }
    pub fn exec_client<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        exec(self.client_cmd(program).args(args))
    }

    /// Like [`Sandbox::exec_edge`], but a non-zero exit is an error (with stderr); returns stdout.
    pub fn run_edge<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_ok(self.edge_cmd(program).args(args))
    }
    pub fn run_client<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_ok(self.client_cmd(program).args(args))
    }

    /// Starts a command in the edge namespace (stdin null, stdout/stderr inherited). The returned
    /// [`Proc`] kills it when dropped; the sandbox's cleanup kills it too if it still runs.
    /// For other stdio or env, spawn [`Sandbox::edge_cmd`] yourself (and wrap it in [`Proc::new`]).
    pub fn spawn_edge<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        spawn(self.edge_cmd(program).args(args).stdin(Stdio::null()))
    }
    pub fn spawn_client<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        spawn(self.client_cmd(program).args(args).stdin(Stdio::null()))
    }

    /// A keep-alive HTTP/1.1 server in the edge namespace on `[::]:port` (IPv4 and IPv6),
    /// answering every request with 200 and [`HTTP_BODY`]. Returns once it listens.
    pub fn spawn_http_server_edge(&self, port: u16) -> Result<Proc> {
        self.spawn_server_edge(port, ServerKind::Http)
    }

    /// Starts a test server of `kind` in the edge namespace; returns once it listens.
    pub fn spawn_server_edge(&self, port: u16, kind: ServerKind) -> Result<Proc> {
        let script = self.tmp_dir.join("server.py");
        if !script.exists() {
            fs::write(&script, SERVER_PY).context("writing server.py")?;
        }
        let ready = self.tmp_dir.join(format!("server-{port}.ready"));
        let log_path = self.tmp_dir.join(format!("server-{port}.log"));
        let _ = fs::remove_file(&ready);
        let mut cmd = self.edge_cmd("python3");
        cmd.arg(&script)
            .arg(kind.arg())
            .arg(port.to_string())
            .arg(&ready);
        if kind == ServerKind::Https {
            let (cert, key) = self.tls_cert()?;
            cmd.arg(cert).arg(key);
        }
        let log = fs::File::create(&log_path).context("creating server log")?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "test server ({kind:?} on port {port}) exited ({status}): {}",
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("test server ({kind:?} on port {port}) did not start listening within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// A self-signed certificate and key in the temp dir (made once): (cert.pem, key.pem).
    /// It names `*.api.test` (the TLS-SNI listeners' hostnames), `api.test` and
    /// `keywall-test`, so clients can verify it with `--cacert cert.pem`.
    pub fn tls_cert(&self) -> Result<(PathBuf, PathBuf)> {
        let cert = self.tmp_dir.join("cert.pem");
        let key = self.tmp_dir.join("key.pem");
        if !(cert.exists() && key.exists()) {
            run_ok(
                Command::new("openssl")
                    .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                    .args([
                        "ec_paramgen_curve:prime256v1",
                        "-nodes",
                        "-days",
                        "2",
                        "-subj",
                        "/CN=keywall-test",
                        "-addext",
                        "subjectAltName=DNS:*.api.test,DNS:api.test,DNS:keywall-test",
                        "-keyout",
                    ])
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert),
            )
            .context("making a test certificate with openssl")?;
        }
        Ok((cert, key))
    }

    /// The certificate and key of [`Sandbox::tls_cert`] in one file, as haproxy's `crt` wants.
    pub fn tls_pem_bundle(&self) -> Result<PathBuf> {
        let (cert, key) = self.tls_cert()?;
        let bundle = self.tmp_dir.join("bundle.pem");
        if !bundle.exists() {
            let text = fs::read_to_string(&cert)? + &fs::read_to_string(&key)?;
            fs::write(&bundle, text).context("writing bundle.pem")?;
        }
        Ok(bundle)
    }

    /// Writes one of the scripts under `tests/scripts/` into the temp dir (once); returns its path.
    pub fn script(&self, name: &str) -> Result<PathBuf> {
        let text = match name {
            "clients.py" => CLIENTS_PY,
            "fix_acceptor.py" => FIX_ACCEPTOR_PY,
            _ => bail!("no script named {name}"),
        };
        let path = self.tmp_dir.join(name);
        if !path.exists() {
            fs::write(&path, text).with_context(|| format!("writing {name}"))?;
        }
        Ok(path)
    }

    /// Runs `clients.py ARGS…` (tests/scripts/clients.py: TLS, split ClientHello, FIX, reset
    /// and SYN-flood clients) in the client namespace; returns its one-line answer.
    pub fn client_tool<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let script = self.script("clients.py")?;
        let out = run_ok(self.client_cmd("python3").arg(script).args(args))?;
        Ok(out.trim().to_owned())
    }

    /// A FIX acceptor (tests/scripts/fix_acceptor.py, on simplefix) in the edge namespace on
    /// `[::]:port`: every Logon is answered with a Logon. Returns once it listens.
    pub fn spawn_fix_acceptor_edge(&self, port: u16) -> Result<Proc> {
        let script = self.script("fix_acceptor.py")?;
        let ready = self.tmp_dir.join(format!("fix-{port}.ready"));
        let log_path = self.tmp_dir.join(format!("fix-{port}.log"));
        let _ = fs::remove_file(&ready);
        let log = fs::File::create(&log_path).context("creating the FIX acceptor log")?;
        let mut cmd = self.edge_cmd("python3");
        cmd.arg(&script)
            .arg(port.to_string())
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "FIX acceptor on port {port} exited ({status}): {} \
                     (is simplefix installed? `cargo xtask setup`)",
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            if Instant::now() > deadline {
                bail!("FIX acceptor on port {port} did not start listening within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// Starts haproxy (Debian's) in namespace `ns` on the configuration `config` (written to
    /// `<tmp>/<name>.cfg`), in the foreground, logging to `<tmp>/<name>.log`. Returns once every
    /// TCP port in `ports` listens in that namespace.
    pub fn spawn_haproxy(&self, ns: &str, name: &str, config: &str, ports: &[u16]) -> Result<Proc> {
        let cfg = self.tmp_dir.join(format!("{name}.cfg"));
        fs::write(&cfg, config).with_context(|| format!("writing {}", cfg.display()))?;
        let log_path = self.tmp_dir.join(format!("{name}.log"));
        let log = fs::File::create(&log_path).context("creating the haproxy log")?;
        let mut cmd = ns_command(ns, "haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "haproxy {name} exited ({status}): {}",
                    fs::read_to_string(&log_path).unwrap_or_default().trim()
                );
            }
            let listening = run_ok(ns_command(ns, "ss").args(["-Hltn"]))?;
            let all = ports.iter().all(|p| {
                listening.lines().any(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .is_some_and(|local| local.ends_with(&format!(":{p}")))
                })
            });
            if all {
                return Ok(child);
            }
            if Instant::now() > deadline {
                bail!("haproxy {name} did not listen on {ports:?} within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `curl -sS --max-time 3 ARGS…` in the client namespace; returns (exit code, stdout).
    /// A later `--max-time`/`-m` in `args` wins. Exit 28 is curl's timeout (what a drop looks like).
    pub fn curl_from_client<I, S>(&self, args: I) -> Result<(i32, String)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = exec(
            self.client_cmd("curl")
                .args(["-sS", "--max-time", CURL_MAX_TIME])
                .args(args),
        )?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Whether an XDP program is attached to the edge veth (from `ip -j link show`).
    pub fn xdp_attached(&self) -> Result<bool> {
        let out = run_ok(Command::new("ip").args([
            "-j",
            "-n",
            self.edge_ns(),
            "link",
            "show",
            "dev",
            self.edge_if(),
        ]))?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing `ip -j link show`")?;
        Ok(v.as_array()
            .and_then(|a| a.first())
            .is_some_and(|l| l.get("xdp").is_some()))
    }

    /// Kills everything in the namespaces, deletes them, the pin dir and the temp dir.
    /// Idempotent; [`Drop`] calls it. Safe to call from another thread (a Ctrl-C handler).
    pub fn cleanup(&self) {
        let mut cleaned = self.cleaned.lock().unwrap_or_else(|e| e.into_inner());
        if *cleaned {
            return;
        }
        *cleaned = true;
        if std::env::var_os("KEYWALL_SANDBOX_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "netns: KEYWALL_SANDBOX_KEEP=1: keeping {} / {}, {} and {}",
                self.edge_ns(),
                self.client_ns(),
                self.pin_dir.display(),
                self.tmp_dir.display()
            );
            return;
        }
        remove_namespaces(&[self.edge_ns(), self.client_ns()]);
        remove_dir(&self.pin_dir);
        remove_dir(&self.tmp_dir);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// `nsenter --net=/run/netns/NS -- program`.
pub fn ns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg("--")
        .arg(program);
    c
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn exec(c: &mut Command) -> Result<Output> {
    c.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(c)))
}

fn run_ok(c: &mut Command) -> Result<String> {
    let out = exec(c)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(c),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn(c: &mut Command) -> Result<Proc> {
    c.spawn()
        .map(Proc::new)
        .with_context(|| format!("cannot start `{}`", describe(c)))
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args)).map(|_| ())
}

fn is_bpffs(path: &Path) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && Path::new(f[1]) == path && f[2] == "bpf"
        })
    })
}

/// Once per process: mount bpffs if needed, and remove sandboxes of dead processes.
fn prepare_once() {
    PREPARE.call_once(|| {
        if !is_bpffs(Path::new(BPFFS)) {
            let ok = Command::new("mount")
                .args(["-t", "bpf", "bpf", BPFFS])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("netns: warning: could not mount bpffs on {BPFFS}");
            }
        }
        if let Err(e) = cleanup_stale() {
            eprintln!("netns: warning: cleaning stale sandboxes: {e:#}");
        }
    });
}

/// Removes sandboxes (namespaces, pin dirs, temp dirs) whose creating process is gone.
/// Returns how many namespaces it removed.
pub fn cleanup_stale() -> Result<usize> {
    let mut stale = Vec::new();
    if let Ok(rd) = fs::read_dir(NETNS_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ns_owner_pid(&name).is_some_and(|p| !pid_alive(p)) {
                stale.push(name);
            }
        }
    }
    let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
    remove_namespaces(&refs);
    for base in [PathBuf::from(BPFFS), std::env::temp_dir()] {
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dir_owner_pid(&name).is_some_and(|p| !pid_alive(p)) {
                    remove_dir(&e.path());
                }
            }
        }
    }
    Ok(stale.len())
}

/// (dev, inode) of a network namespace file.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Pids of the processes whose network namespace is one of `ids` (never our own).
fn pids_in(ids: &[(u64, u64)]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).is_some_and(|id| ids.contains(&id))
        })
        .collect()
}

fn remove_namespaces(names: &[&str]) {
    let ids: Vec<(u64, u64)> = names
        .iter()
        .filter_map(|n| ns_id(&Path::new(NETNS_DIR).join(n)))
        .collect();
    if !ids.is_empty() {
        let mut pids = pids_in(&ids);
        for &p in &pids {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(p, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pids.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            pids = pids_in(&ids);
        }
        for &p in &pids {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    for n in names {
        if Path::new(NETNS_DIR).join(n).exists() {
            let out = Command::new("ip").args(["netns", "del", n]).output();
            if let Ok(o) = out
                && !o.status.success()
            {
                eprintln!(
                    "netns: warning: ip netns del {n}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
    }
}

fn remove_dir(p: &Path) {
    if let Err(e) = fs::remove_dir_all(p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("netns: warning: removing {}: {e}", p.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_kernel_limits() {
        for pid in [1u32, 4_194_304, 123_456] {
            for n in [0u32, 7, 99_999] {
                let names = derive_names("a-very-long-tag-name!", pid, n);
                assert!(
                    names.edge_if.len() <= 15 && names.client_if.len() <= 15,
                    "{names:?}"
                );
                assert_eq!(names.edge_if[3..], names.client_if[3..]);
                assert!(names.edge_if.starts_with("kwe") && names.client_if.starts_with("kwc"));
                assert!(names.edge_ns.ends_with("-e") && names.client_ns.ends_with("-c"));
                assert!(names.edge_ns.len() < 40);
            }
        }
    }

    #[test]
    fn names_are_deterministic_and_distinct() {
        assert_eq!(derive_names("x", 10, 1), derive_names("x", 10, 1));
        let a = derive_names("x", 10, 1);
        let b = derive_names("x", 10, 2);
        assert_ne!(a.edge_ns, b.edge_ns);
        assert_ne!(a.edge_if, b.edge_if);
        assert_ne!(a.dir, b.dir);
    }

    #[test]
    fn tags_are_sanitized() {
        assert_eq!(sanitize_tag("Demo_Run-1"), "demorun1");
        assert_eq!(sanitize_tag("--"), "t");
        assert_eq!(sanitize_tag("abcdefghijklmnop"), "abcdefghij");
    }

    #[test]
    fn owner_pids_round_trip() {
        let names = derive_names("http", 4321, 17);
        assert_eq!(ns_owner_pid(&names.edge_ns), Some(4321));
        assert_eq!(ns_owner_pid(&names.client_ns), Some(4321));
        assert_eq!(dir_owner_pid(&names.dir), Some(4321));
        assert_eq!(ns_owner_pid("kw-4321-17-e"), None);
        assert_eq!(ns_owner_pid("other-ns"), None);
        assert_eq!(ns_owner_pid("kw-a-b-c-e"), None);
        assert_eq!(dir_owner_pid("kw-t-4321-1"), None);
        assert_eq!(dir_owner_pid("kw-sb-x-1"), None);
    }

    #[test]
    fn liveness() {
        assert!(pid_alive(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not yet reaped: a zombie counts as dead.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "child {pid} never exited");
            thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }
}
