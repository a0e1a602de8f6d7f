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
        let s = EtcdServer {
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
        let child = ns_command(&self.ns, "etcd")
            .args(["--name", "kw"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", ETCD_URL])
            .args(["--advertise-client-urls", ETCD_URL])
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
        let out = ns_command(&self.ns, "etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", ETCD_URL, "--command-timeout", "5s"])
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
