//! The one test driver of `keywall run`: started in a sandbox's edge namespace with the
//! sandbox's interface, pin dir and state dir, its stdout and stderr in a log file; waited
//! for (the API answering, or any readiness a test names); stopped on drop, with the log's
//! last lines printed when the test is failing.

use std::{
    fs,
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    api_bench::{call, keywall_bin},
    netns::{Proc, Sandbox},
};

/// How a daemon is launched, beyond its arguments.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Another `keywall` binary (the demo's release build); default: the one beside the test.
    pub bin: Option<PathBuf>,
    /// A program and its arguments that run keywall (`setpriv --reuid nobody ...`).
    pub wrapper: Vec<String>,
    /// More environment (`NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
}

/// A running `keywall run`.
pub struct Daemon<'a> {
    pub sb: &'a Sandbox,
    pub proc: Option<Proc>,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Its API socket.
    pub sock: PathBuf,
    /// The command line, for a demo to show.
    pub cmdline: String,
}

impl<'a> Daemon<'a> {
    /// Starts daemon number `n` of the sandbox (its log and API socket carry the number)
    /// with `extra` arguments (`--policy FILE`, `--metrics ADDR`, `--etcd URL`, ...) and
    /// waits (20 s at most) until the API answers.
    pub fn start(sb: &'a Sandbox, n: u32, extra: &[&str]) -> Result<Daemon<'a>> {
        Self::start_waiting(sb, n, extra, Duration::from_secs(20))
    }

    /// `start`, waiting up to `wait` for the API (a restart over a million keys takes
    /// seconds on a loaded machine).
    pub fn start_waiting(
        sb: &'a Sandbox,
        n: u32,
        extra: &[&str],
        wait: Duration,
    ) -> Result<Daemon<'a>> {
        let mut d = Self::spawn(sb, n, extra)?;
        d.wait_api_for(wait)?;
        Ok(d)
    }

    /// Starts it without waiting for anything.
    pub fn spawn(sb: &'a Sandbox, n: u32, extra: &[&str]) -> Result<Daemon<'a>> {
        Self::spawn_with(sb, n, extra, &Launch::default())
    }

    /// `spawn`, launched as `how` says.
    ///
    /// Defaults a test can override by naming the flag in `extra`: `--state-dir` (the
    /// sandbox's), `--api` (`unix:` a socket in the sandbox's tmp dir), `--metrics off`,
    /// `--xdp-mode native`, `--poll-ms 100`. `RUST_LOG` is `KEYWALL_TEST_LOG`, else info.
    pub fn spawn_with(sb: &'a Sandbox, n: u32, extra: &[&str], how: &Launch) -> Result<Daemon<'a>> {
        let bin = match &how.bin {
            Some(b) => b.clone(),
            None => keywall_bin()?,
        };
        let log = sb.tmp_dir().join(format!("keywall-{n}.log"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--iface".into(),
            sb.edge_if().into(),
            "--pin-dir".into(),
            sb.pin_dir().display().to_string(),
        ];
        let mut default = |flag: &str, value: String| {
            if !extra.contains(&flag) {
                args.push(flag.into());
                args.push(value);
            }
        };
        default("--state-dir", sb.state_dir().display().to_string());
        let sock = sb.tmp_dir().join(format!("api-{n}.sock"));
        default("--api", format!("unix:{}", sock.display()));
        default("--metrics", "off".into());
        default("--xdp-mode", "native".into());
        default("--poll-ms", "100".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        // With `--api unix:PATH` in `extra`, that is the socket.
        let sock = match extra.iter().position(|a| *a == "--api") {
            Some(i) => extra
                .get(i + 1)
                .and_then(|a| a.strip_prefix("unix:"))
                .map(PathBuf::from)
                .unwrap_or(sock),
            None => sock,
        };
        let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match how.wrapper.split_first() {
            Some((w, wargs)) => {
                let mut c = sb.edge_cmd(w);
                c.args(wargs).arg(&bin);
                c
            }
            None => sb.edge_cmd(&bin),
        };
        cmd.args(&args)
            .env(
                "RUST_LOG",
                std::env::var("KEYWALL_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(how.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        let child = cmd.spawn().context("starting keywall run")?;
        Ok(Daemon {
            sb,
            proc: Some(Proc::new(child)),
            log,
            sock,
            cmdline: format!(
                "{} {} {}",
                how.wrapper.join(" "),
                bin.display(),
                args.join(" ")
            )
            .trim_start()
            .to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last `n` lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Err (with the log) if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let p = self.proc.as_mut().context("daemon not running")?;
        if let Some(st) = p.try_wait()? {
            bail!("keywall run exited ({st}); log:\n{}", self.log_text());
        }
        Ok(())
    }

    /// Panics (with the log) if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Err(e) = self.check_running() {
            panic!("{e:#}");
        }
    }

    /// Waits (20 s at most) for `GET /v1/status` to answer 200.
    pub fn wait_api(&mut self) -> Result<()> {
        self.wait_api_for(Duration::from_secs(20))
    }

    pub fn wait_api_for(&mut self, wait: Duration) -> Result<()> {
        let sock = self.sock.clone();
        self.wait_for(wait, "the API to answer", || {
            match call(&sock, "GET", "/v1/status", None) {
                Ok((200, _)) => Ok(()),
                Ok((st, v)) => Err(format!("{st} {v}")),
                Err(e) => Err(format!("{e:#}")),
            }
        })
    }

    /// Polls `ready` every 50 ms until it says Ok, for `within` at most; Err (with the last
    /// answer and the log) if it never does or the daemon exits.
    pub fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        mut ready: impl FnMut() -> Result<(), String>,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_running()?;
            let last = match ready() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                bail!(
                    "waited {within:?} for {what}; last: {last}\nlog:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        call(&self.sock, method, path, body)
    }

    /// SIGTERM and wait (SIGKILL after 5 s).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// SIGKILL, and reap it (a zombie would still look alive to `keywall status`).
    pub fn kill9(&mut self) {
        let mut p = self.proc.take().expect("daemon running");
        // SAFETY: kill(2) on our own unreaped child.
        let rc = unsafe { libc::kill(p.id() as i32, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {}", p.id());
        let st = p.wait().expect("reaping the daemon");
        assert!(!st.success(), "killed daemon exited successfully?");
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let _ = self.stop();
        if thread::panicking() {
            eprintln!(
                "--- {} (last lines) ---\n{}\n---",
                self.log.display(),
                self.log_tail(60)
            );
        }
    }
}
