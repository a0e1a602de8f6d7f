//! A real etcd (Debian's `etcd-server`) for the fleet tests, in a namespace of its own that
//! edge sandboxes are joined to.
//!
//! ```text
//!   etcd ns kw-fleetetcd-<pid>-<n>-e                    edge ns of sandbox i
//!   lo 10.250.0.1/32  <- etcd listens here              [kwetcd] 10.250.<i+1>.2/30
//!   [fl<i>] 10.250.<i+1>.1/30  <----------- veth ---------->   route 10.250.0.1 via .1
//! ```
//!
//! Each edge daemon reaches etcd at `http://10.250.0.1:2379` over its own veth, which is not
//! the interface the filter is attached to, so the policy can never cut a daemon off from
//! etcd. The addresses exist only in these namespaces, so any number of fleets run at once.
//! The test process itself talks to etcd from a thread that entered the etcd namespace
//! ([`EtcdServer::in_ns`]), or with `etcdctl` run there.
//!
//! Dropping it kills etcd, deletes the namespace (and with it every veth) and the data dir.

use std::{
    fs,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::{NETNS_DIR, Proc, Sandbox, ns_command};

pub const ETCD_ADDR: &str = "10.250.0.1";
pub const ETCD_URL: &str = "http://10.250.0.1:2379";
/// The same etcd when started with [`EtcdServer::start_tls`].
pub const ETCD_TLS_URL: &str = "https://10.250.0.1:2379";
/// The edge side of the link to etcd.
const EDGE_LINK: &str = "kwetcd";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct EtcdServer {
    pub ns: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    // Interior mutability: a test stops and resumes etcd while daemons borrow the fleet.
    proc: Mutex<Option<Proc>>,
    links: AtomicU32,
    pub tls: Option<TlsFiles>,
    /// `user:password` etcdctl authenticates with, once auth is enabled.
    pub root: Mutex<Option<String>>,
}

/// A throw-away CA, etcd's server certificate (for 10.250.0.1) and a client certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TlsFiles {
    /// EC P-256 keys, valid for two days, made with the openssl CLI.
    pub fn make(dir: &std::path::Path) -> Result<TlsFiles> {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keywall test CA",
        ]);
        openssl(dir, &a)?;
        for (name, cn, usage, san) in [
            (
                "server",
                "etcd",
                "serverAuth,clientAuth",
                "IP:10.250.0.1,IP:127.0.0.1",
            ),
            ("client", "keywall-edge", "clientAuth", "DNS:keywall-edge"),
        ] {
            let mut a = vec!["req"];
            a.extend(ec);
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let subj = format!("/CN={cn}");
            a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &a)?;
            let ext = format!("{name}.ext");
            fs::write(
                dir.join(&ext),
                format!(
                    "subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
                ),
            )?;
            let pem = format!("{name}.pem");
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            )?;
        }
        Ok(TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl EtcdServer {
    /// Makes the namespace and starts etcd in it.
    pub fn start() -> Result<EtcdServer> {
        Self::start_with(false)
    }

    /// etcd serving TLS only, requiring client certificates of its own CA ([`ETCD_TLS_URL`]).
    pub fn start_tls() -> Result<EtcdServer> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<EtcdServer> {
        if which("etcd").is_none() || which("etcdctl").is_none() {
            bail!(
                "etcd and etcdctl are not installed (run `cargo xtask setup`: etcd-server, etcd-client)"
            );
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // The sandbox naming (kw-<tag>-<pid>-<n>-e), so a run killed midway is cleaned by
        // the next one like any sandbox.
        let ns = format!("kw-fleetetcd-{pid}-{n}-e");
        let dir = std::env::temp_dir().join(format!("kw-etcd-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let tls = if tls {
            let d = dir.join("tls");
            fs::create_dir_all(&d)?;
            Some(TlsFiles::make(&d)?)
        } else {
            None
        };
        let s = EtcdServer {
            tls,
            root: Mutex::new(None),
            ns: ns.clone(),
            data_dir: dir.join("data"),
            log: dir.join("etcd.log"),
            proc: Mutex::new(None),
            links: AtomicU32::new(0),
        };
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ETCD_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        s.resume()?;
        Ok(s)
    }

    /// Joins a sandbox's edge namespace to etcd.
    pub fn connect(&self, sb: &Sandbox) -> Result<()> {
        let i = self.links.fetch_add(1, Ordering::SeqCst) + 1;
        if i > 250 {
            bail!("too many edges on one etcd");
        }
        let ours = format!("fl{i}");
        ip(&[
            "-n",
            &self.ns,
            "link",
            "add",
            &ours,
            "type",
            "veth",
            "peer",
            "name",
            EDGE_LINK,
            "netns",
            sb.edge_ns(),
        ])?;
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("10.250.{i}.1/30"),
            "dev",
            &ours,
        ])?;
        ip(&[
            "-n",
            sb.edge_ns(),
            "addr",
            "add",
            &format!("10.250.{i}.2/30"),
            "dev",
            EDGE_LINK,
        ])?;
        ip(&["-n", &self.ns, "link", "set", &ours, "up"])?;
        ip(&["-n", sb.edge_ns(), "link", "set", EDGE_LINK, "up"])?;
        ip(&[
            "-n",
            sb.edge_ns(),
            "route",
            "add",
            &format!("{ETCD_ADDR}/32"),
            "via",
            &format!("10.250.{i}.1"),
        ])?;
        Ok(())
    }

    /// Starts etcd (again, on the same data dir) and waits until it answers.
    pub fn resume(&self) -> Result<()> {
        let mut slot = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = ns_command(&self.ns, "etcd");
        cmd.args(["--name", "kw"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", self.url()])
            .args(["--advertise-client-urls", self.url()]);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "kw=http://127.0.0.1:2380"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        *slot = Some(Proc::new(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = slot.as_mut()
                && let Some(st) = p.try_wait()?
            {
                *slot = None;
                bail!("etcd exited ({st}): {}", self.log_tail());
            }
            if self.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy in 20 s: {}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops etcd (SIGKILL: what a crash or a partition looks like to its clients).
    pub fn stop(&self) -> Result<()> {
        let taken = self.proc.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut p) = taken {
            p.kill()?;
            p.wait()?;
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `etcdctl ARGS` against this etcd; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let root = self.root.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.ctl_as(root.as_deref(), args)
    }

    /// The etcd URL clients use.
    pub fn url(&self) -> &'static str {
        if self.tls.is_some() {
            ETCD_TLS_URL
        } else {
            ETCD_URL
        }
    }

    /// `etcdctl` as `user:password` (None: no password auth).
    pub fn ctl_as(&self, user: Option<&str>, args: &[&str]) -> Result<String> {
        let mut cmd = ns_command(&self.ns, "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", self.url(), "--command-timeout", "5s"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(|_| ())
    }

    pub fn del(&self, key: &str) -> Result<()> {
        self.ctl(&["del", key]).map(|_| ())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<u64> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("endpoint status")?;
        v[0]["Status"]["header"]["revision"]
            .as_u64()
            .with_context(|| format!("no revision in {out}"))
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> Result<u64> {
        let r = self.revision()?;
        self.ctl(&["compact", &r.to_string(), "--physical"])?;
        Ok(r)
    }

    /// Turns authentication on: `root` (who writes, as the control plane) and `user`, who may
    /// only read under `prefix` (as an edge). Later [`EtcdServer::ctl`] calls run as root.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) -> Result<()> {
        let root_pw = "root-pw-for-tests";
        self.ctl(&[
            "user",
            "add",
            "root",
            "--new-user-password",
            root_pw,
            "--interactive=false",
        ])?;
        self.ctl(&["user", "grant-role", "root", "root"])?;
        self.ctl(&["role", "add", "keywall-edge"])?;
        self.ctl(&[
            "role",
            "grant-permission",
            "keywall-edge",
            "--prefix=true",
            "read",
            prefix,
        ])?;
        self.ctl(&[
            "user",
            "add",
            user,
            "--new-user-password",
            password,
            "--interactive=false",
        ])?;
        self.ctl(&["user", "grant-role", user, "keywall-edge"])?;
        self.ctl(&["auth", "enable"])?;
        *self.root.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("root:{root_pw}"));
        Ok(())
    }

    /// Runs `f` on a thread that entered the etcd namespace (setns is per thread), so a
    /// client in the test process reaches [`ETCD_URL`].
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let path = PathBuf::from(NETNS_DIR).join(&self.ns);
        thread::scope(|s| {
            s.spawn(|| {
                let ns =
                    fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                // SAFETY: setns(2) on a namespace fd we hold, for this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "setns {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the etcd-namespace thread panicked"))?
        })
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.stop();
        if thread::panicking() {
            eprintln!("--- etcd log (last lines) ---\n{}\n---", self.log_tail());
        }
        if std::env::var_os("KEYWALL_SANDBOX_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "KEYWALL_SANDBOX_KEEP=1: keeping {} and {}",
                self.ns,
                self.data_dir.display()
            );
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stdin(Stdio::null())
            .output();
        if let Some(d) = self.data_dir.parent() {
            let _ = fs::remove_dir_all(d);
        }
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}
