//! Fleet sync: the policy from etcd (docs/REFERENCE.md "etcd layout").
//!
//! Under the prefix, `settings` holds `{"settings": {…}, "listener": […]}`, `keys/<prefix>` one
//! key, `ipsets/<name>` a JSON array of CIDRs. Each entry is judged on its own: an invalid
//! value is rejected for that entry alone, which keeps its last good value (or stays absent),
//! while the rest keeps syncing. The [`Reconciler`] is that rule, pure and unit-tested; the
//! network side (snapshot at revision R, watch from R+1, resync after a compaction or a lost
//! watch, reconnect with backoff) is [`spawn`], and it writes the maps only through the
//! daemon's [`Engine`](crate::engine::Engine), like every other source.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    engine::{self, KeyStore, Refused, Rev, Submitted},
    policy::Policy,
    source::Shared,
};

/// Where the daemon finds the fleet's policy, and how it proves who it is.
#[derive(Clone, Debug, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Always ends with `/`.
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// From the command line: `URL[,URL…]` and the prefix (a missing final `/` is added, so
    /// `/keywall` does not also match `/keywall2/…`).
    pub fn new(urls: &str, prefix: &str) -> Result<EtcdConfig> {
        let endpoints: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            bail!("--etcd needs at least one URL");
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("--etcd {e}: use http://HOST:PORT or https://HOST:PORT");
            }
        }
        if prefix.is_empty() {
            bail!("--etcd-prefix must not be empty");
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(EtcdConfig {
            endpoints,
            prefix,
            ..Default::default()
        })
    }

    /// Checks the credential files now, so a typo fails at start rather than in a retry loop.
    pub fn check(&self) -> Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("--etcd-cert and --etcd-key go together");
        }
        for f in [&self.ca, &self.cert, &self.key, &self.password_file]
            .into_iter()
            .flatten()
        {
            std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
        }
        if self.password_file.is_some() && self.user.is_none() {
            bail!("--etcd-password-file needs --etcd-user");
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            bail!("--etcd-ca/--etcd-cert are for https:// endpoints");
        }
        Ok(())
    }
}

mod reconcile;

pub use reconcile::{Change, Entry, Good, Outcome, Parsed, Plan, Reconciler, SettingsDoc};

// ---------------------------------------------------------------------------------------------
// Status (the state dir's etcd-sync.json, read by `keywall status`)
// ---------------------------------------------------------------------------------------------

const STATUS_FILE: &str = "etcd-sync.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Connected, and the snapshot applied.
    pub up: bool,
    /// The etcd revision the daemon has read up to.
    pub synced_revision: u64,
    /// Why the last connection failed or ended.
    pub last_error: Option<String>,
    /// Entries whose latest value was refused: etcd key and why.
    pub errors: Vec<EntryError>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EntryError {
    pub key: String,
    pub error: String,
}

/// The etcd section of `status --json` (null when the daemon does not sync from etcd).
pub fn status_value(state_dir: &Path) -> Value {
    std::fs::read(state_dir.join(STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null)
}

/// A daemon that does not sync from etcd removes a stale etcd status.
pub fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(STATUS_FILE));
}

// ---------------------------------------------------------------------------------------------
// The network side
// ---------------------------------------------------------------------------------------------

/// Entries per page of the snapshot read (about 5 MB at 100 B an entry). etcd counts the
/// whole rest of the range for every page, so each page costs O(keys) on its side: at 1M
/// keys, pages of 5,000 made a snapshot 200 such counts (48 s on a loaded 2-core VM, and
/// three edges reading at once hit the 120 s snapshot timeout again and again).
const SNAPSHOT_PAGE: i64 = 50_000;
/// Largest gRPC message taken from etcd (a snapshot page, or a watch response carrying a big
/// transaction); tonic's default of 4 MiB is too small for either at scale.
pub(crate) const MAX_MESSAGE: usize = 256 << 20;

/// The end of the key range with this prefix (the prefix with its last byte below 0xff
/// incremented, the rest cut).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // the whole key space
}

/// Backoff between reconnects: doubles from 100 ms up to 5 s.
pub fn next_backoff(cur: Duration) -> Duration {
    (cur * 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Starts the sync thread. It never returns: while etcd is unreachable it retries with
/// backoff, and enforcement stays as it was.
pub fn spawn(cfg: EtcdConfig, shared: Arc<Shared>) -> Result<()> {
    cfg.check()?;
    shared.metrics.set_sync("etcd", false);
    shared.metrics.set_sync_errors("etcd", 0);
    let mut sync = Sync {
        status: SyncStatus {
            endpoints: cfg.endpoints.clone(),
            prefix: cfg.prefix.clone(),
            ..Default::default()
        },
        cfg,
        shared,
        rec: Reconciler::default(),
        written: None,
    };
    sync.publish();
    std::thread::Builder::new()
        .name("keywall-etcd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("etcd sync cannot start its runtime: {e}");
                    return;
                }
            };
            rt.block_on(sync.run());
        })?;
    Ok(())
}

/// What a commit judges: a whole snapshot, or a batch of watched changes.
enum Work {
    Snapshot(Vec<Parsed>),
    Batch(Vec<Change>),
}

struct Sync {
    cfg: EtcdConfig,
    shared: Arc<Shared>,
    rec: Reconciler,
    status: SyncStatus,
    /// The status as last written, so an unchanged one is not rewritten.
    written: Option<SyncStatus>,
}

impl Sync {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let err = self.session(&mut backoff).await;
            let msg = format!("{err:#}");
            log::warn!(
                "etcd sync: {msg}; enforcing the last applied policy, retrying in {backoff:?}"
            );
            self.shared.metrics.set_sync("etcd", false);
            self.status.up = false;
            self.status.last_error = Some(msg);
            self.publish();
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff);
        }
    }

    async fn connect(&self) -> Result<etcd_client::Client> {
        connect(&self.cfg).await
    }

    /// One connection: snapshot, apply, watch until something breaks. Returns why it ended.
    async fn session(&mut self, backoff: &mut Duration) -> anyhow::Error {
        match self.session_inner(backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(&mut self, backoff: &mut Duration) -> Result<std::convert::Infallible> {
        use etcd_client::{EventType, WatchOptions};
        let client = self.connect().await?;
        let (rev, kvs) =
            tokio::time::timeout(Duration::from_secs(120), self.read_snapshot(&client))
                .await
                .map_err(|_| anyhow!("snapshot timed out"))?
                .context("reading the snapshot")?;
        let n = kvs.len();
        let pb = crate::progress::spinner(format!(
            "etcd: applying the snapshot of {} ({n} entries)",
            self.cfg.prefix
        ));
        let res = self.commit(Work::Snapshot(kvs), rev);
        crate::progress::done(pb);
        res?;
        log::info!(
            "etcd: snapshot of {} at revision {rev}: {n} entries, {} refused",
            self.cfg.prefix,
            self.rec.errors().len()
        );
        self.status.up = true;
        self.status.last_error = None;
        self.status.synced_revision = rev;
        self.shared.metrics.set_sync("etcd", true);
        self.publish();
        *backoff = Duration::from_millis(100);

        let mut stream = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE)
            .watch(
                self.cfg.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev as i64 + 1),
                ),
            )
            .await
            .context("starting the watch")?;
        loop {
            let first = stream
                .message()
                .await
                .context("watch")?
                .ok_or_else(|| anyhow!("the watch stream ended"))?;
            // Drain what is already there: one apply for a burst of writes.
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(Ok(Some(m))) => batch.push(m),
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(anyhow!(e).context("watch")),
                    Err(_) => break,
                }
            }
            let mut changes = Vec::new();
            let mut last_rev = 0u64;
            for m in &batch {
                if m.canceled() {
                    if m.compact_revision() > 0 {
                        bail!(
                            "watch from revision {} was compacted (oldest is {}): resyncing",
                            rev + 1,
                            m.compact_revision()
                        );
                    }
                    bail!("watch canceled: {}", m.cancel_reason());
                }
                if let Some(h) = m.header() {
                    last_rev = last_rev.max(h.revision() as u64);
                }
                for ev in m.events() {
                    let Some(kv) = ev.kv() else { continue };
                    last_rev = last_rev.max(kv.mod_revision() as u64);
                    let Some(name) = self.entry_name(kv.key()) else {
                        continue;
                    };
                    changes.push(match ev.event_type() {
                        EventType::Put => Change {
                            name,
                            value: Some(kv.value().to_vec()),
                        },
                        EventType::Delete => Change::delete(&name),
                    });
                }
            }
            if changes.is_empty() {
                continue;
            }
            self.commit(Work::Batch(changes), last_rev)?;
            self.status.synced_revision = last_rev;
            self.publish();
        }
    }

    /// Every entry under the prefix at one revision, read in pages (a policy of a million
    /// keys is far beyond one gRPC message). Returns that revision and the entries.
    async fn read_snapshot(&self, client: &etcd_client::Client) -> Result<(u64, Vec<Parsed>)> {
        use etcd_client::GetOptions;
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let prefix = self.cfg.prefix.as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone();
        let mut rev: i64 = 0;
        let mut kvs = Vec::new();
        loop {
            let mut o = GetOptions::new()
                .with_range(end.clone())
                .with_limit(SNAPSHOT_PAGE);
            if rev > 0 {
                o = o.with_revision(rev); // every page at the first page's revision
            }
            let mut page = kv.get(from.clone(), Some(o)).await?;
            if rev == 0 {
                rev = page.header().map_or(0, |h| h.revision());
            }
            let more = page.more();
            let items = page.take_kvs();
            let Some(last) = items.last() else { break };
            from = last.key().to_vec();
            from.push(0); // the next key after the last one read
            // Parsed page by page, off the engine lock: the page's bytes go at once.
            for kv in items {
                if let Some(n) = self.entry_name(kv.key()) {
                    kvs.push(Parsed::new(&n, kv.value().to_vec()));
                }
            }
            if !more {
                break;
            }
        }
        Ok((rev as u64, kvs))
    }

    /// The name under the prefix (None for keys that are not UTF-8, reported in the log).
    fn entry_name(&self, key: &[u8]) -> Option<String> {
        let Ok(k) = std::str::from_utf8(key) else {
            log::warn!("etcd: ignoring a key that is not UTF-8: {key:?}");
            return None;
        };
        let name = k.strip_prefix(self.cfg.prefix.as_str())?;
        // The edges' activity digests and `keywall fleet`'s own records share the prefix;
        // they are not policy (fleet.rs).
        if crate::fleet::not_policy(name) {
            return None;
        }
        Some(name.to_owned())
    }

    /// Records the reconciler's refusals (metrics, status, log).
    fn record_errors(&mut self, out: &Outcome) {
        let m = &self.shared.metrics;
        for _ in 0..out.rejected {
            m.update("etcd", "rejected");
        }
        self.status.errors = self
            .rec
            .errors()
            .iter()
            .map(|(k, e)| EntryError {
                key: format!("{}{k}", self.cfg.prefix),
                error: e.clone(),
            })
            .collect();
        m.set_sync_errors("etcd", self.status.errors.len());
        if out.rejected > 0 {
            for e in &self.status.errors {
                log::warn!(
                    "etcd: {} refused, keeps its last good value: {}",
                    e.key,
                    e.error
                );
            }
        }
    }

    /// Judges a snapshot or a watch batch against the engine's etcd policy and submits what
    /// it plans, under the engine lock (the reconciler reads the good state there instead of
    /// keeping a copy), then records the outcome.
    fn commit(&mut self, work: Work, rev: u64) -> Result<()> {
        let shared = self.shared.clone();
        let rec = &mut self.rec;
        let snapshot = matches!(work, Work::Snapshot(_));
        let result = tokio::task::block_in_place(|| {
            let mut eng = shared.engine.lock().unwrap();
            let owned = eng.applied.as_ref().is_some_and(|a| a.source == "etcd");
            let empty = (Policy::default(), KeyStore::default());
            let good = match &eng.applied {
                Some(a) if owned => Good {
                    head: &a.head,
                    keys: &a.keys,
                },
                _ => Good {
                    head: &empty.0,
                    keys: &empty.1,
                },
            };
            let (out, plan) = match work {
                Work::Snapshot(entries) => rec.snapshot(entries, good, owned),
                // No policy from etcd applied (the snapshot's was refused): read it again.
                Work::Batch(_) if !owned => {
                    return Err(anyhow!("no policy from etcd is applied yet: resyncing"));
                }
                Work::Batch(changes) => rec.apply(changes, good),
            };
            let (r, ops) = match plan {
                Plan::Nothing => return Ok((out, None)),
                Plan::Ops(ops) => (
                    eng.submit(engine::Change::Ops(ops.clone()), Rev::Set(rev), "etcd"),
                    Some(ops),
                ),
                Plan::Whole(p, c) => {
                    let r = eng.submit(engine::Change::Policy(p, c), Rev::Set(rev), "etcd");
                    // Bring the other slot up to date now, so the next watched lock writes
                    // its one key instead of every key that slot lags on.
                    if let Err(e) = eng.settle() {
                        log::error!("etcd: settling the inactive slot: {e:#}");
                    }
                    (r, None)
                }
            };
            if let (Err(Refused::Invalid(errs)), Some(ops)) = (&r, &ops) {
                let msg = errs.first().map(|e| e.to_string()).unwrap_or_default();
                rec.refused_by_engine(ops, &msg);
            }
            let fold = if eng.wants_compaction() {
                eng.begin_fold()
            } else {
                Ok(None)
            };
            drop(eng);
            // The watch goes on while the snapshot is written.
            match fold {
                Ok(Some(f)) => f.finish_later(),
                Ok(None) => {}
                Err(e) => log::error!("etcd: starting a policy snapshot: {e:#}"),
            }
            Ok((out, Some(r)))
        });
        // A snapshot parsed every entry (a resync after a lost watch too, even when it writes
        // nothing): that heap goes back to the kernel, or the daemon's RSS keeps it. After a
        // watched batch a trim would cost a lock milliseconds, and there is little to return.
        if snapshot {
            crate::engine::trim_heap();
        }
        let (out, r) = result?;
        self.record_errors(&out);
        match r {
            None => {
                self.shared.metrics.update("etcd", "unchanged");
                Ok(())
            }
            Some(Ok(Submitted::Applied { report, .. })) => {
                log::info!(
                    "etcd: applied revision {rev} ({} entries changed, {} keys written, {:?})",
                    out.accepted,
                    report.keys_written,
                    report.elapsed
                );
                Ok(())
            }
            Some(Ok(Submitted::Unchanged { .. })) => Ok(()),
            Some(Err(Refused::Invalid(errs))) => {
                // The reconciler judged each entry as the engine does: not expected.
                log::error!(
                    "etcd: revision {rev} refused by the engine: {}",
                    errs.first().map(|e| e.to_string()).unwrap_or_default()
                );
                Ok(())
            }
            Some(Err(Refused::Conflict { why, .. })) => Err(anyhow!(why)),
            // The maps keep the last applied policy; a fresh snapshot tries again.
            Some(Err(Refused::Failed(e))) => Err(e.context("applying the policy from etcd")),
        }
    }

    /// Writes the status file when it changed.
    fn publish(&mut self) {
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        let dir = &self.shared.state_dir;
        // Renamed into place but not fsynced: it is a report (rewritten at every batch),
        // not state, and an fsync per batch would slow the next lock down.
        let tmp = dir.join(format!(".{STATUS_FILE}.tmp"));
        let res = serde_json::to_vec_pretty(&self.status)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(std::fs::write(&tmp, b)?))
            .and_then(|()| Ok(std::fs::rename(&tmp, dir.join(STATUS_FILE))?));
        if let Err(e) = res {
            log::warn!("etcd: writing the sync status: {e:#}");
        }
        self.written = Some(self.status.clone());
    }
}

/// A client for `cfg` (TLS, client certificate and user as configured): the daemon's sync,
/// its activity publisher and `keywall fleet` connect the same way.
pub async fn connect(cfg: &EtcdConfig) -> Result<etcd_client::Client> {
    use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

    // Keep-alive pings notice a silent partition within 15 s, not at the next write. etcd
    // closes a connection that pings more often than its --grpc-keepalive-min-time (5 s by
    // default) while nothing else flows: every 2 s made an idle edge lose its watch and
    // re-read the whole prefix every 8 s.
    let mut o = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    if let Some(u) = &cfg.user {
        let pw = match &cfg.password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => String::new(),
        };
        o = o.with_user(u.clone(), pw);
    }
    if cfg.ca.is_some() || cfg.cert.is_some() {
        let mut t = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            t = t.ca_certificate(Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            ));
        }
        if let (Some(c), Some(k)) = (&cfg.cert, &cfg.key) {
            t = t.identity(Identity::from_pem(
                std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
                std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
            ));
        }
        o = o.with_tls(t);
    }
    etcd_client::Client::connect(&cfg.endpoints, Some(o))
        .await
        .context("connecting")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_gets_its_slash() {
        let c = EtcdConfig::new("http://a:2379, http://b:2379", "/kw").unwrap();
        assert_eq!(c.prefix, "/kw/");
        assert_eq!(c.endpoints, ["http://a:2379", "http://b:2379"]);
        assert!(EtcdConfig::new("a:2379", "/kw/").is_err());
        assert!(EtcdConfig::new("", "/kw/").is_err());
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Duration::from_millis(100);
        let mut seen = vec![];
        for _ in 0..10 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[0], Duration::from_millis(200));
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(5));
    }
}
