//! The control-plane API (docs/REFERENCE.md "Control-plane API"): HTTP/1.1 and JSON over a unix socket, or
//! TCP with a bearer token (and TLS with client certificates beyond loopback).
//!
//! Sources: one authoritative source per daemon. With `--policy FILE` the file is the
//! source and API writes get 409; without it the API is. Writes are serialised by the engine's
//! mutex and answered only once the kernel maps enforce them and the state dir holds them.

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Frame, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{broadcast, mpsc},
};

use crate::{
    dataplane::PinnedView,
    engine::{Change, Engine, Refused, Rev, Submitted},
    metrics::Metrics,
    policy::{PatchRequest, Policy, PolicyError},
    source::{Shared, Source},
};

pub const DEFAULT_MAX_BODY: usize = 512 << 20;

// ---------------------------------------------------------------------------------------------
// Addresses and configuration

/// Where the API listens (and where clients connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiAddr {
    Unix(PathBuf),
    /// `HOST:PORT` as given.
    Tcp(String),
}

impl fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ApiAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for ApiAddr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<ApiAddr> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                bail!("--api unix: needs a socket path");
            }
            return Ok(ApiAddr::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    return Ok(ApiAddr::Tcp(a.to_owned()));
                }
                _ => bail!("--api tcp:HOST:PORT expected, got {s:?}"),
            }
        }
        bail!("--api must be unix:PATH or tcp:HOST:PORT, got {s:?}")
    }
}

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub addr: ApiAddr,
    /// The bearer token (TCP only).
    pub token: Option<Vec<u8>>,
    pub tls: Option<TlsFiles>,
    /// Plain TCP beyond loopback, on purpose.
    pub insecure: bool,
    pub max_body: usize,
}

/// Reads a token file: its first line, trimmed; an empty token is refused.
pub fn read_token_file(p: &Path) -> Result<Vec<u8>> {
    let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let t = s.lines().next().unwrap_or("").trim();
    if t.is_empty() {
        bail!("{} holds no token", p.display());
    }
    Ok(t.as_bytes().to_vec())
}

impl ApiConfig {
    /// Refuses combinations that would expose the API.
    pub fn check(&self) -> Result<()> {
        let ApiAddr::Tcp(a) = &self.addr else {
            return Ok(());
        };
        if self.token.is_none() {
            bail!(
                "--api {} needs --token-file: TCP clients must present a bearer token",
                self.addr
            );
        }
        let addrs = resolve(a)?;
        let beyond_loopback = addrs.iter().any(|s| !s.ip().is_loopback());
        if beyond_loopback && self.tls.is_none() && !self.insecure {
            bail!(
                "refusing to serve the API on {a} without TLS: it is not a loopback address, so the \
                 bearer token and every policy would cross the network in clear text. Give \
                 --api-tls-cert and --api-tls-key (and --api-client-ca to require client \
                 certificates), or --api-insecure if that network is trusted"
            );
        }
        Ok(())
    }
}

fn resolve(a: &str) -> Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs as _;
    let v: Vec<SocketAddr> = a
        .to_socket_addrs()
        .with_context(|| format!("resolving {a}"))?
        .collect();
    if v.is_empty() {
        bail!("{a} resolves to no address");
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Pure rules

/// Constant-time equality: the time taken depends on the lengths only, never on where the
/// first difference is.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// True if an `Authorization` header value carries `token` as a bearer token.
pub fn bearer_ok(header: Option<&[u8]>, token: &[u8]) -> bool {
    let Some(h) = header else { return false };
    let Some(t) = h
        .strip_prefix(b"Bearer ")
        .or_else(|| h.strip_prefix(b"bearer "))
    else {
        return false;
    };
    ct_eq(t.trim_ascii(), token)
}

pub use crate::engine::{Decision, decide, patch_prefixes};

/// A reply: status and JSON body.
pub type Reply = (StatusCode, Value);

/// 400 with the first error's place, and every error.
pub fn bad_input(errs: &[PolicyError]) -> Reply {
    let first = errs
        .first()
        .cloned()
        .unwrap_or_else(|| PolicyError::new("", "invalid input"));
    (
        StatusCode::BAD_REQUEST,
        json!({
            "error": first.message,
            "at": first.at,
            "errors": errs.iter().map(|e| json!({"at": e.at, "error": e.message})).collect::<Vec<_>>(),
        }),
    )
}

fn conflict(applied: u64, why: &str) -> Reply {
    (
        StatusCode::CONFLICT,
        json!({"error": why, "revision": applied}),
    )
}

impl Shared {
    /// 409 for API writes while another source owns the policy.
    fn not_ours(&self, eng: &Engine) -> Option<Reply> {
        match &self.source {
            Source::Api => None,
            Source::File(p) => Some((
                StatusCode::CONFLICT,
                json!({
                    "error": format!("policy is managed by the policy file {}", p.display()),
                    "revision": eng.revision(),
                    "source": "file",
                }),
            )),
            Source::Etcd(prefix) => Some((
                StatusCode::CONFLICT,
                json!({
                    "error": format!("policy is managed by etcd {prefix}"),
                    "revision": eng.revision(),
                    "source": "etcd",
                }),
            )),
        }
    }

    /// The answer to a submit.
    fn reply(t0: Instant, r: std::result::Result<Submitted, Refused>) -> Reply {
        match r {
            Ok(Submitted::Applied { revision, .. }) => (
                StatusCode::OK,
                json!({
                    "revision": revision,
                    "apply_ms": t0.elapsed().as_secs_f64() * 1e3,
                    "changed": true,
                }),
            ),
            Ok(Submitted::Unchanged { revision }) => (
                StatusCode::OK,
                json!({
                    "revision": revision,
                    "apply_ms": t0.elapsed().as_secs_f64() * 1e3,
                    "changed": false,
                }),
            ),
            Err(Refused::Conflict { applied, why }) => conflict(applied, &why),
            Err(Refused::Invalid(errs)) => bad_input(&errs),
            Err(Refused::Failed(e)) => {
                log::error!("API write failed: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": format!("{e:#}")}),
                )
            }
        }
    }

    /// `PUT /v1/policy`: parsed and validated here (before the engine lock), then submitted.
    pub fn put_policy(&self, body: &[u8]) -> Reply {
        let t0 = Instant::now();
        // Refused before reaching the engine: counted here.
        let reject = |r: Reply| {
            self.metrics.update("api", "rejected");
            r
        };
        let Ok(text) = std::str::from_utf8(body) else {
            return reject(bad_input(&[PolicyError::new("", "body is not UTF-8")]));
        };
        let mut p = match Policy::from_json_str(text) {
            Ok(p) => p,
            Err(errs) => return reject(bad_input(&errs)),
        };
        let Some(rev) = p.revision else {
            return reject(bad_input(&[PolicyError::new(
                "revision",
                "required: the API carries its own revision",
            )]));
        };
        // Validation is the expensive part at 1M keys: done before taking the lock.
        let compiled = match crate::engine::compile_whole(&mut p) {
            Ok(c) => c,
            Err(errs) => return reject(bad_input(&errs)),
        };
        log::debug!("PUT {rev}: parsed and validated in {:?}", t0.elapsed());
        let mut eng = self.engine.lock().unwrap();
        if let Some(r) = self.not_ours(&eng) {
            self.metrics.update("api", "conflict");
            return r;
        }
        let r = eng.submit(
            Change::Policy(Box::new(p), Box::new(compiled)),
            Rev::Conditional(rev),
            "api",
        );
        Self::reply(t0, r)
    }

    /// `PATCH /v1/policy`: `revision` given is a conditional write, left out an unconditional
    /// one (docs/REFERENCE.md "Control-plane API").
    pub fn patch_policy(&self, body: &[u8]) -> Reply {
        let t0 = Instant::now();
        let reject = |r: Reply| {
            self.metrics.update("api", "rejected");
            r
        };
        let Ok(text) = std::str::from_utf8(body) else {
            return reject(bad_input(&[PolicyError::new("", "body is not UTF-8")]));
        };
        let req = match PatchRequest::from_json_str(text) {
            Ok(p) => p,
            Err(errs) => return reject(bad_input(&errs)),
        };
        let mut eng = self.engine.lock().unwrap();
        if let Source::File(p) = &self.source
            && let Some(r) = self.unlock_overlay(&mut eng, p, &req.ops)
        {
            return Self::reply(t0, r);
        }
        if let Some(r) = self.not_ours(&eng) {
            self.metrics.update("api", "conflict");
            return r;
        }
        let rev = req.revision.map_or(Rev::Next, Rev::Conditional);
        let r = eng.submit(Change::Ops(req.ops), rev, "api");
        Self::reply(t0, r)
    }

    /// Under a policy file, the one write the API takes: unlocking keys the daemon locked
    /// on its own (`autolock.rs`). They leave the overlay and the unlock is applied as the
    /// file's own state. None when the ops are anything else (the file owns them: 409).
    fn unlock_overlay(
        &self,
        eng: &mut Engine,
        file: &std::path::Path,
        ops: &[crate::policy::PatchOp],
    ) -> Option<std::result::Result<Submitted, Refused>> {
        let mut overlay = self.overlay.lock().unwrap();
        let all_auto = !ops.is_empty()
            && ops.iter().all(|op| {
                matches!(op, crate::policy::PatchOp::Unlock { prefix } if overlay.locks.contains_key(prefix))
            });
        if !all_auto {
            return None;
        }
        let now = crate::state::now_unix() as i64;
        let before = overlay.clone();
        for op in ops {
            if let crate::policy::PatchOp::Unlock { prefix } = op {
                overlay.clear(prefix, now);
            }
        }
        let r = eng.submit(
            Change::Ops(ops.to_vec()),
            Rev::Next,
            &format!("file:{}", file.display()),
        );
        match &r {
            Ok(_) => {
                if let Err(e) = overlay.save(&self.state_dir) {
                    log::error!("saving {}: {e:#}", crate::autolock::FILE);
                }
            }
            Err(_) => *overlay = before,
        }
        Some(r)
    }

    /// After answering a write: settles the inactive slot after a whole-policy apply, and
    /// writes a snapshot when the PATCH journal has grown long.
    pub fn after_write(&self) {
        let fold = {
            let mut eng = self.engine.lock().unwrap();
            if let Err(e) = eng.settle() {
                log::error!("settling the inactive slot: {e:#}");
            }
            if eng.wants_compaction() {
                eng.begin_fold()
            } else {
                Ok(None)
            }
        };
        // The snapshot is written without the engine lock: writers go on meanwhile.
        if let Err(e) = fold.and_then(|f| f.map_or(Ok(()), |f| f.finish())) {
            log::error!("writing a policy snapshot: {e:#}");
        }
    }

    /// `GET /v1/policy`: the applied policy with its revision (an empty one, revision 0,
    /// before anything was applied).
    pub fn get_policy(&self) -> Result<Bytes> {
        let eng = self.engine.lock().unwrap();
        let v = match &eng.applied {
            Some(a) => a.policy_json(),
            None => serde_json::to_vec(&Policy {
                revision: Some(0),
                ..Default::default()
            })?,
        };
        Ok(Bytes::from(v))
    }

    /// `GET /v1/keys/{prefix}`.
    pub fn get_key(&self, prefix: &str) -> Reply {
        let (key, revision) = {
            let eng = self.engine.lock().unwrap();
            (eng.key(prefix), eng.revision())
        };
        let view = PinnedView::open(&self.pin_dir).ok();
        let counters = view.as_ref().and_then(|v| {
            crate::dataplane::counters::key_count(v, prefix)
                .ok()
                .flatten()
        });
        if key.is_none() && counters.is_none() {
            return (
                StatusCode::NOT_FOUND,
                json!({"error": format!("no key with prefix {prefix:?}"), "revision": revision}),
            );
        }
        let window_s = {
            let eng = self.engine.lock().unwrap();
            crate::activity::shared_rule(eng.applied.as_ref().map(|a| &a.head)).0
        };
        let clocks = crate::activity::Clocks::now();
        let act = view.as_ref().and_then(|v| {
            crate::activity::key_activity(v, prefix, window_s, &clocks)
                .ok()
                .flatten()
        });
        let mut v =
            json!({"prefix": prefix, "policy": key, "counters": counters, "revision": revision});
        if let (Value::Object(o), Value::Object(f)) = (
            &mut v,
            crate::activity::key_fields(key.as_ref(), act.as_ref(), &clocks),
        ) {
            o.extend(f);
        }
        (StatusCode::OK, v)
    }

    /// `GET /v1/activity?idle_for=&shared=&top=`.
    pub fn get_activity(&self, query: &str) -> Reply {
        let q = match crate::activity::Query::parse(query) {
            Ok(q) => q,
            Err(e) => return (StatusCode::BAD_REQUEST, json!({"error": e})),
        };
        let view = match PinnedView::open(&self.pin_dir) {
            Ok(v) => v,
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": format!("{e:#}")}),
                );
            }
        };
        // The head (settings, listeners, ipsets: no keys) is copied under the lock; the maps
        // are read without it; then the rows answered (at most `top`) are looked up in the
        // engine's key store: the policy is never materialised.
        let head = {
            let eng = self.engine.lock().unwrap();
            eng.applied.as_ref().map(|a| a.head.clone())
        };
        let keys = |prefixes: &[String]| {
            let eng = self.engine.lock().unwrap();
            prefixes.iter().map(|p| eng.key(p)).collect()
        };
        match crate::activity::listing(
            &view,
            head.as_ref(),
            keys,
            &q,
            &crate::activity::Clocks::now(),
        ) {
            Ok(v) => (StatusCode::OK, v),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("{e:#}")}),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

type RespBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<RespBody> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("static response parts")
}

fn error_response(status: StatusCode, msg: &str) -> Response<RespBody> {
    json_response(status, &json!({"error": msg}))
}

/// A bound API listener.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp {
        listener: TcpListener,
        token: Vec<u8>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    },
}

/// Binds the API address: a unix socket (mode 0600 in a 0700 directory it creates), or TCP.
pub async fn bind(cfg: &ApiConfig) -> Result<Listener> {
    match &cfg.addr {
        ApiAddr::Unix(p) => {
            if let Some(dir) = p.parent()
                && !dir.as_os_str().is_empty()
                && !dir.exists()
            {
                use std::os::unix::fs::DirBuilderExt as _;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            // A socket left by a daemon that died: nobody answers on it any more.
            if p.exists() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    bail!(
                        "another process already serves the API on {} (another keywall run?)",
                        p.display()
                    );
                }
                std::fs::remove_file(p)
                    .with_context(|| format!("removing stale socket {}", p.display()))?;
            }
            let l = UnixListener::bind(p)
                .with_context(|| format!("binding the API socket {}", p.display()))?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", p.display()))?;
            Ok(Listener::Unix(l, p.clone()))
        }
        ApiAddr::Tcp(a) => {
            let token = cfg
                .token
                .clone()
                .ok_or_else(|| anyhow!("--api tcp: needs --token-file"))?;
            let tls = match &cfg.tls {
                Some(t) => Some(tls_acceptor(t)?),
                None => None,
            };
            let listener = TcpListener::bind(a.as_str())
                .await
                .with_context(|| format!("binding the API on {a}"))?;
            Ok(Listener::Tcp {
                listener,
                token,
                tls,
            })
        }
    }
}

/// Removes the socket file on a clean exit.
pub fn remove_socket(cfg: &ApiConfig) {
    if let ApiAddr::Unix(p) = &cfg.addr {
        let _ = std::fs::remove_file(p);
    }
}

fn tls_acceptor(t: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &Path| -> Result<Vec<u8>> {
        std::fs::read(p).with_context(|| format!("reading {}", p.display()))
    };
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut read(&t.cert)?.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", t.cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", t.cert.display());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(&t.key)?.as_slice())
        .with_context(|| format!("parsing {}", t.key.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", t.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
                roots
                    .add(c.with_context(|| format!("parsing {}", ca.display()))?)
                    .with_context(|| format!("adding a CA from {}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts connections forever.
pub async fn serve(l: Listener, sh: Arc<Shared>) {
    sh.metrics.set_sync("api", sh.source == Source::Api);
    match l {
        Listener::Unix(l, _) => loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s, sh.clone(), None));
                }
                Err(e) => accept_failed(e).await,
            }
        },
        Listener::Tcp {
            listener,
            token,
            tls,
        } => {
            let token: Arc<[u8]> = token.into();
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        let _ = s.set_nodelay(true);
                        let sh = sh.clone();
                        let token = token.clone();
                        match &tls {
                            Some(acc) => {
                                let acc = acc.clone();
                                tokio::spawn(async move {
                                    match acc.accept(s).await {
                                        Ok(s) => serve_conn(s, sh, Some(token)).await,
                                        Err(e) => log::warn!("API TLS handshake from {peer}: {e}"),
                                    }
                                });
                            }
                            None => {
                                tokio::spawn(serve_conn(s, sh, Some(token)));
                            }
                        }
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and the like: back off instead of spinning.
    log::warn!("API accept: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

async fn serve_conn<S>(s: S, sh: Arc<Shared>, token: Option<Arc<[u8]>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let sh = sh.clone();
        let token = token.clone();
        async move { Ok::<_, Infallible>(handle(req, sh, token).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(s), svc)
        .await
    {
        log::debug!("API connection: {e}");
    }
}

/// Reads a body up to `max` bytes; Err is the reply (413, or 400 for a broken body).
pub async fn read_body(req: Request<Incoming>, max: usize) -> Result<Bytes, Reply> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("body larger than {max} bytes (--api-max-body)")}),
        )
    };
    if let Some(n) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && n > max as u64
    {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            json!({"error": format!("reading the body: {e}")}),
        )),
    }
}

async fn handle(
    req: Request<Incoming>,
    sh: Arc<Shared>,
    token: Option<Arc<[u8]>>,
) -> Response<RespBody> {
    if let Some(t) = &token
        && !bearer_ok(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            t,
        )
    {
        let mut r = error_response(StatusCode::UNAUTHORIZED, "missing or invalid bearer token");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/v1/policy") => {
            let sh2 = sh.clone();
            match tokio::task::spawn_blocking(move || sh2.get_policy()).await {
                Ok(Ok(b)) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(b))
                    .expect("static response parts"),
                Ok(Err(e)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::PUT, "/v1/policy") | (&Method::PATCH, "/v1/policy") => {
            let body = match read_body(req, sh.max_body).await {
                Ok(b) => b,
                Err((st, v)) => {
                    sh.metrics.update("api", "rejected");
                    return json_response(st, &v);
                }
            };
            let sh2 = sh.clone();
            let is_put = method == Method::PUT;
            let r = tokio::task::spawn_blocking(move || {
                if is_put {
                    sh2.put_policy(&body)
                } else {
                    sh2.patch_policy(&body)
                }
            })
            .await;
            // Housekeeping off the answer's path.
            let sh3 = sh.clone();
            tokio::task::spawn_blocking(move || sh3.after_write());
            match r {
                Ok((st, v)) => json_response(st, &v),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/v1/status") => {
            let sh2 = sh.clone();
            let r = tokio::task::spawn_blocking(move || {
                let live = sh2.published.lock().unwrap().clone();
                let mut v = crate::status::status_json(&sh2.pin_dir, &sh2.state_dir, live)?;
                v["policy_source"] = sh2.source.kind().into();
                // Automatic locks as the daemon holds them (the file may be older).
                v["auto_locks"] = crate::status::auto_locks_json(&sh2.overlay.lock().unwrap());
                v["events"] = match &sh2.events_error {
                    None => "available".into(),
                    Some(e) => e.clone().into(),
                };
                Ok::<_, anyhow::Error>(v)
            })
            .await;
            match r {
                Ok(Ok(v)) => json_response(StatusCode::OK, &v),
                Ok(Err(e)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/v1/stats") => {
            let top = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("top="))
                .and_then(|v| v.parse::<usize>().ok());
            let sh2 = sh.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::dataplane::counters::stats_json(&PinnedView::open(&sh2.pin_dir)?, top)
            })
            .await;
            match r {
                Ok(Ok(v)) => json_response(StatusCode::OK, &v),
                Ok(Err(e)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, p) if p.starts_with("/v1/keys/") => {
            let prefix = percent_decode(&p["/v1/keys/".len()..]);
            let sh2 = sh.clone();
            match tokio::task::spawn_blocking(move || sh2.get_key(&prefix)).await {
                Ok((st, v)) => json_response(st, &v),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/v1/activity") => {
            let sh2 = sh.clone();
            match tokio::task::spawn_blocking(move || sh2.get_activity(&query)).await {
                Ok((st, v)) => json_response(st, &v),
                Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (&Method::GET, "/v1/events") => events_response(&sh),
        (_, "/v1/policy")
        | (_, "/v1/status")
        | (_, "/v1/stats")
        | (_, "/v1/events")
        | (_, "/v1/activity") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error_response(StatusCode::NOT_FOUND, &format!("no such endpoint {path}")),
    }
}

/// `%XX` escapes in a path segment.
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A body fed from a channel: each message is one chunk.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// `GET /v1/events`: NDJSON, one drop event a line, until the client goes away.
fn events_response(sh: &Arc<Shared>) -> Response<RespBody> {
    if let Some(e) = &sh.events_error {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    let mut sub = sh.events.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let sh = sh.clone();
    tokio::spawn(async move {
        loop {
            let line = match sub.recv().await {
                Ok(mut ev) => {
                    // A refused key's lock reason, from the policy (skipped while a write
                    // holds the engine: events never wait for one).
                    if ev.kind == "drop"
                        && ev.lock_reason.is_none()
                        && let Some(p) = &ev.prefix
                        && let Ok(eng) = sh.engine.try_lock()
                        && let Some(k) = eng.key(p)
                        && k.locked_at(crate::state::now_unix() as i64)
                    {
                        ev.lock_reason = k.lock_reason.clone();
                    }
                    let mut l = serde_json::to_vec(&ev.to_json()).unwrap_or_default();
                    l.push(b'\n');
                    l
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // A slow reader loses events, never the daemon's memory.
                    format!("{{\"lagged\":{n}}}\n").into_bytes()
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(line)).await.is_err() {
                return; // the client went away
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(ChannelBody { rx }.boxed())
        .expect("static response parts")
}

/// Serves `GET /metrics`.
pub async fn serve_metrics(l: TcpListener, m: Arc<Metrics>) {
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                accept_failed(e).await;
                continue;
            }
        };
        let m = m.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let m = m.clone();
                async move {
                    if req.uri().path() != "/metrics" {
                        return Ok::<_, Infallible>(error_response(
                            StatusCode::NOT_FOUND,
                            "metrics are at /metrics",
                        ));
                    }
                    let text = tokio::task::spawn_blocking(move || m.render())
                        .await
                        .unwrap_or_default();
                    Ok(Response::builder()
                        .header(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(full(text))
                        .expect("static response parts"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Patch, key_prefix};

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"s3cret-token", b"s3cret-token"));
        assert!(!ct_eq(b"s3cret-token", b"s3cret-tokem"));
        assert!(!ct_eq(b"s3cret-token", b"s3cret-toke"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
        // Lengths that differ by a multiple of 256 must not wrap to "equal".
        assert!(!ct_eq(&[0u8; 0], &[0u8; 256]));
    }

    #[test]
    fn bearer_header() {
        let t = b"tok123";
        assert!(bearer_ok(Some(b"Bearer tok123"), t));
        assert!(bearer_ok(Some(b"Bearer tok123 "), t));
        assert!(!bearer_ok(Some(b"Bearer tok124"), t));
        assert!(!bearer_ok(Some(b"Basic tok123"), t));
        assert!(!bearer_ok(Some(b"tok123"), t));
        assert!(!bearer_ok(None, t));
    }

    #[test]
    fn revision_rules() {
        assert_eq!(decide(0, 1, || false), Decision::Apply);
        assert_eq!(decide(5, 6, || false), Decision::Apply);
        assert_eq!(decide(5, 5, || true), Decision::Unchanged);
        assert_eq!(decide(5, 5, || false), Decision::Conflict);
        assert_eq!(decide(5, 4, || true), Decision::Conflict);
        assert_eq!(decide(0, 0, || false), Decision::Conflict);
    }

    #[test]
    fn api_addresses() {
        assert_eq!(
            "unix:/run/keywall/api.sock".parse::<ApiAddr>().unwrap(),
            ApiAddr::Unix("/run/keywall/api.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:9477".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tcp("127.0.0.1:9477".into())
        );
        assert_eq!(
            "tcp:[::1]:9477".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tcp("[::1]:9477".into())
        );
        for bad in ["tcp:9477", "tcp:host:x", "unix:", "http://x", "127.0.0.1:1"] {
            assert!(bad.parse::<ApiAddr>().is_err(), "{bad}");
        }
    }

    fn cfg(addr: &str, token: bool, tls: bool, insecure: bool) -> ApiConfig {
        ApiConfig {
            addr: addr.parse().unwrap(),
            token: token.then(|| b"t".to_vec()),
            tls: tls.then(|| TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                client_ca: None,
            }),
            insecure,
            max_body: DEFAULT_MAX_BODY,
        }
    }

    #[test]
    fn tcp_needs_token_and_tls_beyond_loopback() {
        assert!(cfg("unix:/x", false, false, false).check().is_ok());
        assert!(cfg("tcp:127.0.0.1:1", false, false, false).check().is_err());
        assert!(cfg("tcp:127.0.0.1:1", true, false, false).check().is_ok());
        assert!(cfg("tcp:[::1]:1", true, false, false).check().is_ok());
        let e = cfg("tcp:192.0.2.1:1", true, false, false)
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("clear text"), "{e}");
        assert!(cfg("tcp:192.0.2.1:1", true, true, false).check().is_ok());
        assert!(cfg("tcp:192.0.2.1:1", true, false, true).check().is_ok());
    }

    #[test]
    fn patch_prefixes_name_changed_keys() {
        let p = Patch::from_json_str(
            r#"{"revision":2,"ops":[{"op":"lock","prefix":"aaaaaaaa"},
                {"op":"upsert","key":{"prefix":"bbbbbbbb","allow":["10.0.0.1"]}},
                {"op":"delete","prefix":"cccccccc"}]}"#,
        )
        .unwrap();
        let s = patch_prefixes(&p).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.contains(&key_prefix("bbbbbbbb")));
        let p = Patch::from_json_str(
            r#"{"revision":2,"ops":[{"op":"set_ipset","name":"b","cidrs":[]}]}"#,
        )
        .unwrap();
        assert!(patch_prefixes(&p).is_none());
    }

    #[test]
    fn bad_input_names_the_place() {
        let (st, v) = bad_input(&[
            PolicyError::new("ops[2].key.allow[0]", "host bits set in 10.0.0.1/8"),
            PolicyError::new("ops[3].prefix", "no key"),
        ]);
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(v["at"], "ops[2].key.allow[0]");
        assert_eq!(v["error"], "host bits set in 10.0.0.1/8");
        assert_eq!(v["errors"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("37c541a1"), "37c541a1");
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
