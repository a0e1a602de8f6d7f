//! The operator verbs that talk to the daemon's API: `policy apply|show`, `key show|lock|unlock`
//! and `events`.

use std::{io::Write as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    events::EventRecord,
    policy::Policy,
    source::api::{ApiAddr, read_token_file},
};

/// Attempts at a lock/unlock or an apply without a revision when another writer got in first.
const RETRIES: usize = 5;

pub struct Client {
    addr: ApiAddr,
    token: Option<String>,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// `--token-file`, else `KEYWALL_TOKEN`.
    pub fn new(addr: &str, token_file: Option<&Path>) -> Result<Client> {
        let token = match token_file {
            Some(p) => Some(String::from_utf8(read_token_file(p)?)?),
            None => std::env::var("KEYWALL_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        Ok(Client {
            addr: addr.parse()?,
            token,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    fn unreachable(&self, e: std::io::Error) -> anyhow::Error {
        anyhow!(
            "cannot reach the keywall daemon at {} ({e}); is `keywall run` running with this --api?",
            self.addr
        )
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        match &self.addr {
            ApiAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                exchange(s, req).await
            }
            ApiAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|e| self.unreachable(e))?;
                exchange(s, req).await
            }
        }
    }

    fn build(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "keywall");
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request parts")
    }

    /// One request; the status and the JSON body (`null` if the body is not JSON).
    pub fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Value)> {
        let req = self.build(method, path, body);
        self.rt.block_on(async {
            let resp = self.send(req).await?;
            let st = resp.status().as_u16();
            let b = resp
                .into_body()
                .collect()
                .await
                .context("reading the daemon's answer")?
                .to_bytes();
            Ok((st, serde_json::from_slice(&b).unwrap_or(Value::Null)))
        })
    }

    /// Streams a response line by line until it ends or `f` returns false.
    pub fn stream(&self, path: &str, mut f: impl FnMut(&str) -> Result<bool>) -> Result<()> {
        let req = self.build(Method::GET, path, None);
        self.rt.block_on(async {
            let mut resp = self.send(req).await?;
            if resp.status() != StatusCode::OK {
                let st = resp.status();
                let b = resp.into_body().collect().await?.to_bytes();
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                bail!("{}", error_text(st.as_u16(), &v));
            }
            let mut buf = Vec::new();
            while let Some(frame) = resp.body_mut().frame().await {
                let frame = frame.context("reading the event stream")?;
                let Some(d) = frame.data_ref() else { continue };
                buf.extend_from_slice(d);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    if !f(String::from_utf8_lossy(&line).trim_end())? {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    /// The applied revision (0 if nothing is applied).
    pub fn revision(&self) -> Result<u64> {
        let (st, v) = self.call(Method::GET, "/v1/policy", None)?;
        if st != 200 {
            bail!("{}", error_text(st, &v));
        }
        Ok(v["revision"].as_u64().unwrap_or(0))
    }
}

async fn exchange<S>(s: S, req: Request<Full<Bytes>>) -> Result<Response<Incoming>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .context("HTTP handshake with the daemon")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .context("sending the request to the daemon")
}

/// One sentence for an error answer.
pub fn error_text(status: u16, v: &Value) -> String {
    let msg = v["error"].as_str().unwrap_or("no details");
    let mut s = match status {
        400 => "rejected".to_owned(),
        401 => "unauthorized (give --token-file or KEYWALL_TOKEN)".to_owned(),
        404 => "not found".to_owned(),
        409 => "conflict".to_owned(),
        413 => "too large".to_owned(),
        503 => "unavailable".to_owned(),
        _ => format!("HTTP {status}"),
    };
    match v["at"].as_str() {
        Some(at) if !at.is_empty() => s.push_str(&format!(": {at}: {msg}")),
        _ => s.push_str(&format!(": {msg}")),
    }
    if status == 409
        && let Some(r) = v["revision"].as_u64()
    {
        s.push_str(&format!(" (applied revision {r})"));
    }
    s
}

/// Reads a policy file: TOML, or JSON (`.json`, or a document that starts with `{`).
pub fn read_policy_file(file: &Path) -> Result<Policy> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Policy::from_file_text(file, &text).map_err(|errs| {
        anyhow!(
            "{}: {}",
            file.display(),
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// Prints every error of a 400, one a line.
fn print_rejection(status: u16, v: &Value) {
    eprintln!("keywall: {}", error_text(status, v));
    if let Some(errs) = v["errors"].as_array()
        && errs.len() > 1
    {
        for e in errs.iter().skip(1) {
            eprintln!(
                "  {}: {}",
                e["at"].as_str().unwrap_or(""),
                e["error"].as_str().unwrap_or("")
            );
        }
    }
}

/// `keywall policy apply FILE`: exit 0 applied (or already applied), 1 rejected.
pub fn policy_apply(c: &Client, file: &Path) -> Result<u8> {
    let mut p = read_policy_file(file)?;
    let given = p.revision;
    for _ in 0..RETRIES {
        if given.is_none() {
            p.revision = Some(c.revision()? + 1);
        }
        let pb = crate::progress::spinner(format!(
            "{}: sending {} keys; the daemon answers once the kernel enforces them",
            file.display(),
            p.key.len()
        ));
        let res = c.call(Method::PUT, "/v1/policy", Some(serde_json::to_vec(&p)?));
        crate::progress::done(pb);
        let (st, v) = res?;
        match st {
            200 => {
                println!(
                    "{} revision {} ({:.1} ms)",
                    if v["changed"] == false {
                        "already applied:"
                    } else {
                        "applied"
                    },
                    v["revision"],
                    v["apply_ms"].as_f64().unwrap_or(0.0)
                );
                return Ok(0);
            }
            // Another writer took our revision between the read and the write: read again.
            409 if given.is_none() && v["source"].is_null() => continue,
            _ => {
                print_rejection(st, &v);
                return Ok(1);
            }
        }
    }
    bail!("gave up after {RETRIES} conflicting writes")
}

/// `keywall policy show [--json]`.
pub fn policy_show(c: &Client, as_json: bool) -> Result<u8> {
    let (st, v) = c.call(Method::GET, "/v1/policy", None)?;
    if st != 200 {
        print_rejection(st, &v);
        return Ok(1);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let p: Policy =
            serde_json::from_value(v).context("the daemon sent a policy we cannot read")?;
        print!("{}", toml::to_string(&p)?);
    }
    Ok(0)
}

/// `keywall key show PREFIX`.
pub fn key_show(c: &Client, prefix: &str, as_json: bool) -> Result<u8> {
    let (st, v) = c.call(
        Method::GET,
        &format!("/v1/keys/{}", path_escape(prefix)),
        None,
    )?;
    if st != 200 {
        print_rejection(st, &v);
        return Ok(1);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let k = &v["policy"];
    println!("key:      {prefix}");
    if k.is_null() {
        println!(
            "policy:   not in the applied policy (revision {})",
            v["revision"]
        );
    } else {
        let lock = if v["locked"] == true {
            match v["locked_until"].as_str() {
                Some(t) => format!("yes, until {t}"),
                None => "yes".into(),
            }
        } else if v["lock_expired"] == true {
            format!(
                "no (the lock expired at {})",
                v["locked_until"].as_str().unwrap_or("?")
            )
        } else {
            "no".into()
        };
        println!("locked:   {lock}");
        if let Some(r) = v["lock_reason"].as_str() {
            println!("reason:   {r}");
        }
        let list = |f: &str| {
            k[f].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "-".into())
        };
        println!("allow:    {}", list("allow"));
        println!("ipsets:   {}", list("ipsets"));
    }
    let a = &v["activity"];
    if !a.is_null() {
        println!(
            "allowed:  {}",
            a["last_allowed"].as_str().unwrap_or("never")
        );
        match a["last_refused"].as_str() {
            Some(t) => println!(
                "refused:  {t} ({})",
                a["last_refused_reason"].as_str().unwrap_or("?")
            ),
            None => println!("refused:  never"),
        }
        println!(
            "activity: {} requests on {} connections; {} networks in the window",
            a["requests"], a["connections"], a["networks"]
        );
    }
    let ct = &v["counters"];
    if !ct.is_null() {
        println!("passed:   {}", ct["passed"]);
        println!("dropped:  {}", ct["dropped"]);
        let ls = ct["last_seen_unix"].as_u64().unwrap_or(0);
        if ls == 0 {
            println!("seen:     never");
        } else {
            println!(
                "seen:     {}s ago",
                crate::state::now_unix().saturating_sub(ls)
            );
        }
    }
    Ok(0)
}

fn path_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `keywall key lock|unlock PREFIX`: one PATCH without a revision (an unconditional write,
/// which the daemon applies at its revision + 1), so the policy is never fetched.
/// `--for D` or `--until T` as the RFC 3339 instant a lock op carries (checked here, so a
/// typo is refused before anything is sent).
pub fn lock_until(for_: Option<&str>, until: Option<&str>) -> Result<Option<String>> {
    use crate::risk;
    Ok(match (for_, until) {
        (Some(d), _) => {
            let secs = risk::parse_duration(d).map_err(|e| anyhow::anyhow!("--for: {e}"))?;
            Some(risk::format_rfc3339(
                crate::state::now_unix() as i64 + secs as i64,
            ))
        }
        (None, Some(t)) => {
            risk::check_locked_until(t).map_err(|e| anyhow::anyhow!("--until: {e}"))?;
            Some(t.to_owned())
        }
        (None, None) => None,
    })
}

pub fn key_lock(
    c: &Client,
    prefix: &str,
    lock: bool,
    reason: Option<&str>,
    until: Option<&str>,
) -> Result<u8> {
    let op = if lock { "lock" } else { "unlock" };
    let mut o = json!({"op": op, "prefix": prefix});
    if let Some(r) = reason {
        o["lock_reason"] = r.into();
    }
    if let Some(t) = until {
        o["locked_until"] = t.into();
    }
    let body = json!({"ops": [o]});
    let (st, v) = c.call(
        Method::PATCH,
        "/v1/policy",
        Some(serde_json::to_vec(&body)?),
    )?;
    match st {
        200 => {
            if v["changed"] == false {
                println!("{prefix} was already {op}ed: revision {}", v["revision"]);
            } else {
                println!(
                    "{op}ed {prefix}{}: revision {} ({:.1} ms, enforced)",
                    until.map(|t| format!(" until {t}")).unwrap_or_default(),
                    v["revision"],
                    v["apply_ms"].as_f64().unwrap_or(0.0)
                );
            }
            Ok(0)
        }
        _ => {
            print_rejection(st, &v);
            Ok(1)
        }
    }
}

/// Which `keywall keys` listing.
pub enum Listing {
    /// `--for` (None: the policy's idle_lock_after, else 14d).
    Idle(Option<String>),
    Shared,
    Top,
}

/// `keywall keys idle|shared|top`: `GET /v1/activity` as a table, or its JSON.
pub fn keys_list(c: &Client, what: Listing, top: Option<usize>, as_json: bool) -> Result<u8> {
    let mut q = Vec::new();
    match &what {
        Listing::Idle(d) => match d {
            Some(d) => {
                crate::risk::parse_duration(d).map_err(|e| anyhow::anyhow!("--for: {e}"))?;
                q.push(format!("idle_for={d}"));
            }
            // The daemon takes the policy's idle_lock_after (else 14d): no policy download.
            None => q.push("idle_for=".into()),
        },
        Listing::Shared => q.push("shared=true".into()),
        Listing::Top => {}
    }
    if let Some(n) = top {
        q.push(format!("top={n}"));
    }
    let (st, v) = c.call(Method::GET, &format!("/v1/activity?{}", q.join("&")), None)?;
    if st != 200 {
        print_rejection(st, &v);
        return Ok(1);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let rows = v["keys"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:>10} {:>8} {:>5} {:<20} {:<20} LOCK",
        "KEY", "REQUESTS", "IDLE", "NETS", "LAST ALLOWED", "LAST REFUSED"
    );
    for r in &rows {
        let lock = if r["locked"] == true {
            format!(
                "locked{}{}",
                r["lock_reason"]
                    .as_str()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default(),
                r["locked_until"]
                    .as_str()
                    .map(|x| format!(" until {x}"))
                    .unwrap_or_default()
            )
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:>10} {:>8} {:>5} {:<20} {:<20} {lock}",
            r["prefix"].as_str().unwrap_or("?"),
            r["requests"],
            crate::risk::format_duration(r["idle_s"].as_u64().unwrap_or(0)),
            r["networks"],
            r["last_allowed"].as_str().unwrap_or("never"),
            r["last_refused"].as_str().unwrap_or("never"),
        );
    }
    println!(
        "({} of {} matched of {} keys; networks counted over {}, more than {} is shared)",
        rows.len(),
        v["matched"],
        v["total"],
        v["window"].as_str().unwrap_or("?"),
        v["networks_limit"]
    );
    Ok(0)
}

/// `keywall events [--json]`: streams until interrupted.
pub fn events(c: &Client, as_json: bool) -> Result<u8> {
    let stdout = std::io::stdout();
    c.stream("/v1/events", |line| {
        let mut out = stdout.lock();
        if as_json {
            writeln!(out, "{line}")?;
        } else {
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            match EventRecord::from_json(&v) {
                Some(r) => writeln!(out, "{}", r.to_line())?,
                None if !v["lagged"].is_null() => writeln!(
                    out,
                    "({} events lost: this reader was too slow)",
                    v["lagged"]
                )?,
                None => writeln!(out, "{line}")?,
            }
        }
        // A closed pipe (`| head`) ends the stream quietly.
        Ok(out.flush().is_ok())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_sentences() {
        assert_eq!(
            error_text(
                400,
                &json!({"error": "host bits set", "at": "ops[0].key.allow[0]"})
            ),
            "rejected: ops[0].key.allow[0]: host bits set"
        );
        assert_eq!(
            error_text(409, &json!({"error": "stale", "revision": 4})),
            "conflict: stale (applied revision 4)"
        );
    }

    #[test]
    fn path_escaping() {
        assert_eq!(path_escape("37c541a1"), "37c541a1");
        assert_eq!(path_escape("a/b c"), "a%2Fb%20c");
        assert_eq!(
            crate::source::api::percent_decode(&path_escape("x/?#%y")),
            "x/?#%y"
        );
    }
}
