//! Drop events: the kernel samples drops into the `KW_EVENTS` ring buffer (a per-CPU token
//! bucket, `EVENT_RATE_PER_CPU` a second in bursts of `EVENT_BURST`, so a flood cannot
//! overload the daemon). The daemon reads them here (the ring and its records are
//! `dataplane/events.rs`'s), logs each one, and fans them out to `GET /v1/events` (NDJSON)
//! and so to `keywall events`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use filter_common::{DropEvent, EVENT_AUDIT, EVENT_HAS_KEY, FAMILY_V4, Reason};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::dataplane::{counters::prefix_str, events::parse_record};

/// One drop event as operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub time_unix_ns: u64,
    pub src: IpAddr,
    pub prefix: Option<String>,
    pub reason: &'static str,
    /// The listener's port, and the client's.
    pub port: u16,
    pub sport: u16,
    /// Audit mode: counted as `observed`, and passed.
    pub audit: bool,
    /// `drop` for a sampled drop; `idle_lock`, `shared_key`, `shared_lock` for what the
    /// daemon's risk loop did (issue 13), which carry no address.
    pub kind: &'static str,
    /// The key's `lock_reason` when it is locked (filled in by the API from the policy).
    pub lock_reason: Option<String>,
    /// `shared_key`: networks seen in the window.
    pub networks: Option<u32>,
}

impl EventRecord {
    /// Converts a kernel record; `clock_offset_ns` is wall clock minus CLOCK_MONOTONIC.
    pub fn from_kernel(e: &DropEvent, clock_offset_ns: i128) -> EventRecord {
        let src = if e.family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(e.src[0], e.src[1], e.src[2], e.src[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(e.src))
        };
        let time = (e.time_ns as i128 + clock_offset_ns).max(0) as u64;
        EventRecord {
            time_unix_ns: time,
            src,
            prefix: (e.flags & EVENT_HAS_KEY != 0).then(|| prefix_str(&e.prefix)),
            reason: Reason::from_u8(e.reason).map_or("unknown", Reason::name),
            port: e.port,
            sport: e.sport,
            audit: e.flags & EVENT_AUDIT != 0,
            kind: "drop",
            lock_reason: None,
            networks: None,
        }
    }

    /// An event of the risk loop: `kind` (`idle_lock`, `shared_key`, `shared_lock`), the key,
    /// the reason, and the networks seen for a shared key.
    pub fn risk(
        kind: &'static str,
        prefix: &str,
        reason: &str,
        networks: Option<u32>,
    ) -> EventRecord {
        EventRecord {
            time_unix_ns: crate::state::now_unix() * 1_000_000_000,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix: Some(prefix.to_owned()),
            reason: if reason == "idle" { "idle" } else { "shared" },
            port: 0,
            sport: 0,
            audit: false,
            kind,
            lock_reason: None,
            networks,
        }
    }

    /// One NDJSON line's object.
    pub fn to_json(&self) -> Value {
        if self.kind != "drop" {
            return json!({
                "kind": self.kind,
                "time_unix_ns": self.time_unix_ns,
                "time": rfc3339(self.time_unix_ns),
                "prefix": self.prefix,
                "reason": self.reason,
                "networks": self.networks,
            });
        }
        json!({
            "kind": "drop",
            "lock_reason": self.lock_reason,
            "time_unix_ns": self.time_unix_ns,
            "time": rfc3339(self.time_unix_ns),
            "src": self.src.to_string(),
            "prefix": self.prefix,
            "reason": self.reason,
            "port": self.port,
            "sport": self.sport,
            "audit": self.audit,
        })
    }

    /// One plain log line.
    pub fn to_line(&self) -> String {
        if self.kind != "drop" {
            return format!(
                "{} {} key {}{}",
                rfc3339(self.time_unix_ns),
                self.kind,
                self.prefix.as_deref().unwrap_or("-"),
                self.networks
                    .map(|n| format!(" ({n} networks)"))
                    .unwrap_or_default()
            );
        }
        format!(
            "{} {} src {} port {} key {}{}{}",
            rfc3339(self.time_unix_ns),
            self.reason,
            sock_addr(self.src, self.sport),
            self.port,
            self.prefix.as_deref().unwrap_or("-"),
            self.lock_reason
                .as_deref()
                .map(|r| format!(" (locked: {r})"))
                .unwrap_or_default(),
            if self.audit { " (audit: passed)" } else { "" }
        )
    }

    /// Back from `to_json` (for `keywall events` without `--json`).
    pub fn from_json(v: &Value) -> Option<EventRecord> {
        let reason = v["reason"].as_str()?;
        if let Some(kind) = v["kind"].as_str()
            && kind != "drop"
        {
            let kind = ["idle_lock", "shared_key", "shared_lock"]
                .into_iter()
                .find(|k| *k == kind)?;
            let mut r = EventRecord::risk(
                kind,
                v["prefix"].as_str()?,
                reason,
                v["networks"].as_u64().map(|n| n as u32),
            );
            r.time_unix_ns = v["time_unix_ns"].as_u64()?;
            return Some(r);
        }
        Some(EventRecord {
            time_unix_ns: v["time_unix_ns"].as_u64()?,
            src: v["src"].as_str()?.parse().ok()?,
            prefix: v["prefix"].as_str().map(str::to_owned),
            reason: Reason::ALL
                .iter()
                .map(|r| r.name())
                .find(|n| *n == reason)
                .unwrap_or("unknown"),
            port: v["port"].as_u64()? as u16,
            sport: v["sport"].as_u64()? as u16,
            audit: v["audit"].as_bool().unwrap_or(false),
            kind: "drop",
            lock_reason: v["lock_reason"].as_str().map(str::to_owned),
            networks: None,
        })
    }
}

fn sock_addr(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// `2026-11-23T23:49:26.123456789Z` from nanoseconds since the epoch.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let nanos = unix_ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Wall clock minus CLOCK_MONOTONIC (what `bpf_ktime_get_ns` counts), read now: it moves
/// when the wall clock is stepped, so it is read again for every batch.
pub fn clock_offset_ns() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// Reads events until `stop` is set: logs each one and sends it to `tx`.
pub fn pump(
    mut ring: RingBuf<MapData>,
    tx: broadcast::Sender<EventRecord>,
    stop: &AtomicBool,
) -> Result<()> {
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 250) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("polling KW_EVENTS");
        }
        let offset = clock_offset_ns();
        while let Some(item) = ring.next() {
            let Some(ev) = parse_record(&item) else {
                log::warn!("short drop event record ({} bytes)", item.len());
                continue;
            };
            let rec = EventRecord::from_kernel(&ev, offset);
            log::info!("drop event: {}", rec.to_line());
            // No receivers is fine: nobody is watching.
            let _ = tx.send(rec);
        }
        if r == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::KeyPrefix;

    #[test]
    fn risk_events_and_lock_reasons_round_trip() {
        let e = EventRecord::risk("shared_key", "goodkey1", "shared", Some(4));
        let v = e.to_json();
        assert_eq!(v["kind"], "shared_key");
        assert_eq!(v["networks"], 4);
        assert!(v.get("src").is_none(), "risk events carry no address: {v}");
        assert_eq!(EventRecord::from_json(&v), Some(e.clone()));
        assert!(
            e.to_line().contains("shared_key key goodkey1 (4 networks)"),
            "{}",
            e.to_line()
        );
        let mut d = EventRecord::from_kernel(
            &DropEvent {
                reason: Reason::DropLocked as u8,
                flags: EVENT_HAS_KEY,
                family: FAMILY_V4,
                ..Default::default()
            },
            0,
        );
        d.lock_reason = Some("leaked".into());
        let v = d.to_json();
        assert_eq!(
            (v["kind"].as_str(), v["lock_reason"].as_str()),
            (Some("drop"), Some("leaked"))
        );
        assert_eq!(EventRecord::from_json(&v), Some(d.clone()));
        assert!(d.to_line().contains("(locked: leaked)"), "{}", d.to_line());
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (a leap day) 12:34:56.5
        assert_eq!(
            rfc3339(951_827_696_500_000_000),
            "2000-02-29T12:34:56.500000000Z"
        );
        assert_eq!(
            rfc3339(1_763_900_000_000_000_001),
            "2025-11-23T12:13:20.000000001Z"
        );
    }

    fn kernel_event(family: u8, flags: u8) -> DropEvent {
        let mut prefix = KeyPrefix::default();
        prefix.bytes[..8].copy_from_slice(b"37c541a1");
        let mut src = [0u8; 16];
        if family == FAMILY_V4 {
            src[..4].copy_from_slice(&[198, 51, 100, 7]);
        } else {
            src = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        }
        DropEvent {
            time_ns: 5_000_000_000,
            src,
            prefix,
            family,
            reason: Reason::DropLocked as u8,
            flags,
            _pad: 0,
            port: 8080,
            sport: 40000,
        }
    }

    #[test]
    fn kernel_record_to_json_and_line() {
        let e = kernel_event(FAMILY_V4, EVENT_HAS_KEY);
        // SAFETY: DropEvent is repr(C) plain data; the slice covers exactly `e`, which
        // outlives it.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const DropEvent).cast::<u8>(),
                std::mem::size_of::<DropEvent>(),
            )
        };
        let back = parse_record(bytes).unwrap();
        assert!(parse_record(&bytes[..bytes.len() - 1]).is_none());
        let r = EventRecord::from_kernel(&back, 1_000_000_000_000_000_000);
        assert_eq!(r.time_unix_ns, 1_000_000_005_000_000_000);
        let v = r.to_json();
        assert_eq!(v["src"], "198.51.100.7");
        assert_eq!(v["prefix"], "37c541a1");
        assert_eq!(v["reason"], "drop_locked");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["sport"], 40000);
        assert_eq!(v["audit"], false);
        assert_eq!(v["time"], "2001-09-09T01:46:45.000000000Z");
        assert_eq!(EventRecord::from_json(&v), Some(r.clone()));
        assert_eq!(
            r.to_line(),
            "2001-09-09T01:46:45.000000000Z drop_locked src 198.51.100.7:40000 port 8080 key 37c541a1"
        );
    }

    #[test]
    fn keyless_v6_audit_event() {
        let e = kernel_event(filter_common::FAMILY_V6, EVENT_AUDIT);
        let r = EventRecord::from_kernel(&e, 0);
        let v = r.to_json();
        assert_eq!(v["src"], "2001:db8::7");
        assert!(v["prefix"].is_null());
        assert_eq!(v["audit"], true);
        assert!(
            r.to_line().contains("[2001:db8::7]:40000"),
            "{}",
            r.to_line()
        );
        assert!(r.to_line().ends_with("key - (audit: passed)"));
    }
}
