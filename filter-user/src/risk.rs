//! Risk controls (issue 13), the pure parts: durations (`2h`, `14d`), RFC 3339 instants for
//! `locked_until`, the clock the datapath compares lock expiries against, and what a key's
//! `KW_ACTIVITY` entry means (last allowed, last refused, distinct source networks in a
//! window).

use filter_common::{ACTIVITY_NETS, KeyActivity, Reason};
use serde_json::{Value, json};

/// Longest `lock_reason`, in bytes.
pub const MAX_LOCK_REASON: usize = 200;

/// `30s`, `15m`, `2h`, `14d` (one number and one unit) to seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration: use a number and s, m, h or d (`2h`, `14d`)");
    let unit = s.chars().last().ok_or_else(bad)?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// Seconds back to the shortest exact `s/m/h/d` form.
pub fn format_duration(secs: u64) -> String {
    for (unit, m) in [('d', 86_400), ('h', 3600), ('m', 60)] {
        if secs >= m && secs.is_multiple_of(m) {
            return format!("{}{unit}", secs / m);
        }
    }
    format!("{secs}s")
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 instant (`2026-12-01T08:00:00Z`, `2026-12-01T09:00:00+01:00`, fractions of a
/// second allowed and dropped) to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad =
        |why: &str| format!("{s:?} is not an RFC 3339 time ({why}), e.g. 2026-12-01T08:00:00Z");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short"));
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let t = &s[r];
        if t.bytes().all(|c| c.is_ascii_digit()) {
            Ok(t.parse::<i64>().unwrap_or(0))
        } else {
            Err(bad("digits expected"))
        }
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > mdays[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 60
    {
        return Err(bad("field out of range"));
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad("empty fraction"));
        }
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        t if t.len() == 6 && (t.starts_with('+') || t.starts_with('-')) && &t[3..4] == ":" => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(bad("offset out of range"));
            }
            let o = oh * 3600 + om * 60;
            if t.starts_with('-') { -o } else { o }
        }
        _ => return Err(bad("needs Z or an offset like +01:00")),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok(days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset)
}

/// Unix seconds to `2026-12-01T08:00:00Z`.
pub fn format_rfc3339(unix: i64) -> String {
    let t = crate::events::rfc3339(unix.max(0) as u64 * 1_000_000_000);
    // `...T08:00:00.000000000Z` to `...T08:00:00Z`
    format!("{}Z", &t[..19])
}

/// The seconds a `locked_until` instant may name: up to 2106 (the kernel record holds a u32).
pub fn check_locked_until(s: &str) -> Result<i64, String> {
    let t = parse_rfc3339(s)?;
    if !(0..u32::MAX as i64 - 3600).contains(&t) {
        return Err(format!("{s:?} is out of range (1970 to 2106)"));
    }
    Ok(t)
}

/// Whether a lock_reason is acceptable: bounded, printable, one line.
pub fn check_lock_reason(s: &str) -> Result<(), String> {
    if s.len() > MAX_LOCK_REASON {
        return Err(format!("is {} bytes; at most {MAX_LOCK_REASON}", s.len()));
    }
    if s.chars().any(char::is_control) {
        return Err("has control characters (newlines, tabs): keep it to one line".into());
    }
    Ok(())
}

fn clock_s(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec
}

/// CLOCK_TAI minus CLOCK_REALTIME in whole seconds (0 until an NTP daemon sets the kernel's
/// TAI offset, 37 after). The datapath compares lock expiries with CLOCK_TAI, the only
/// wall-based clock a BPF program can read.
pub fn tai_offset_s() -> i64 {
    // Read twice around the realtime read so a second boundary cannot skew it.
    let t1 = clock_s(libc::CLOCK_TAI);
    let r = clock_s(libc::CLOCK_REALTIME);
    let t2 = clock_s(libc::CLOCK_TAI);
    if t1 == t2 { t1 - r } else { t2 - r }
}

/// `locked_until` (Unix seconds) as the kernel record's CLOCK_TAI seconds; 0 stays "forever".
pub fn tai_until(unix: Option<i64>, tai_offset: i64) -> u32 {
    match unix {
        None => 0,
        // An instant at the epoch would read as "forever": 1 is as expired.
        Some(t) => (t + tai_offset).clamp(1, u32::MAX as i64) as u32,
    }
}

/// A kernel expiry moved by `delta` seconds (the TAI offset changed); never to 0 ("forever").
pub fn shift_until(until: u32, delta: i64) -> u32 {
    (until as i64 + delta).clamp(1, u32::MAX as i64) as u32
}

/// Locked keys by `lock_reason` ("" for none), for status without a walk over the policy.
/// Distinct reasons beyond `MAX_REASONS` are counted under "(other)".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockReasons(pub std::collections::BTreeMap<String, u64>);

const MAX_REASONS: usize = 1000;
const OTHER: &str = "(other)";

impl LockReasons {
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a crate::policy::Key>) -> LockReasons {
        let mut r = LockReasons::default();
        for k in keys {
            r.add(k, 1);
        }
        r
    }

    /// Counts a key in (`n` = 1) or out (-1) if it is locked.
    pub fn add(&mut self, k: &crate::policy::Key, n: i64) {
        if !k.locked {
            return;
        }
        let reason = k.lock_reason.as_deref().unwrap_or("");
        let label = if self.0.contains_key(reason) || self.0.len() < MAX_REASONS {
            reason
        } else {
            OTHER
        };
        let e = self.0.entry(label.to_owned()).or_default();
        *e = e.saturating_add_signed(n);
        if *e == 0 {
            self.0.remove(label);
        }
    }

    /// The most common reasons, for status: (reason, locked keys), at most `n`.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.0.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

/// Whether a lock with this expiry (Unix seconds) holds at `now` (Unix seconds).
pub fn lock_holds(locked_until: Option<i64>, now: i64) -> bool {
    locked_until.is_none_or(|t| now < t)
}

/// CLOCK_MONOTONIC minus... the other way: wall clock seconds minus CLOCK_MONOTONIC seconds,
/// to place the datapath's coarse monotonic stamps in wall time.
pub fn mono_to_unix_offset() -> i64 {
    clock_s(libc::CLOCK_REALTIME) - clock_s(libc::CLOCK_MONOTONIC)
}

/// Now on the datapath's activity clock (CLOCK_MONOTONIC seconds).
pub fn mono_now_s() -> u32 {
    clock_s(libc::CLOCK_MONOTONIC) as u32
}

/// Distinct networks among `nets` seen within `window_s` of `now_mono_s` (both on the
/// activity clock; minutes mod 65536 in the slots). A slot stamped in the current minute
/// counts; `window_s` is rounded up to whole minutes.
pub fn networks_in_window(nets: &[u32; ACTIVITY_NETS], now_mono_s: u32, window_s: u64) -> u32 {
    let now_min = (now_mono_s / 60) & 0xffff;
    let win_min = window_s.div_ceil(60).min(0xfffe) as u32;
    let mut fps: Vec<u32> = Vec::with_capacity(ACTIVITY_NETS);
    for &v in nets {
        if v == 0 {
            continue;
        }
        let age = now_min.wrapping_sub(v & 0xffff) & 0xffff;
        if age <= win_min && !fps.contains(&(v >> 16)) {
            fps.push(v >> 16);
        }
    }
    fps.len() as u32
}

/// One key's activity in wall time, as operators read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activity {
    pub requests: u64,
    pub connections: u64,
    /// Unix seconds, None if never.
    pub last_allowed: Option<i64>,
    pub last_refused: Option<i64>,
    pub last_refused_reason: Option<&'static str>,
    /// Distinct source networks within the window.
    pub networks: u32,
}

impl Activity {
    /// From the kernel entry; `mono_off` is `mono_to_unix_offset()`.
    pub fn from_kernel(a: &KeyActivity, mono_off: i64, now_mono_s: u32, window_s: u64) -> Activity {
        let wall = |s: u32| (s != 0).then(|| s as i64 + mono_off);
        Activity {
            requests: a.requests,
            connections: a.connections as u64,
            last_allowed: wall(a.last_allowed_s),
            last_refused: wall(a.last_refused_s),
            last_refused_reason: (a.last_refused_s != 0)
                .then(|| Reason::from_u8(a.last_refused_reason).map_or("unknown", Reason::name)),
            networks: networks_in_window(&a.nets, now_mono_s, window_s),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "connections": self.connections,
            "last_allowed": self.last_allowed.map(format_rfc3339),
            "last_allowed_unix": self.last_allowed,
            "last_refused": self.last_refused.map(format_rfc3339),
            "last_refused_unix": self.last_refused,
            "last_refused_reason": self.last_refused_reason,
            "networks": self.networks,
        })
    }
}

/// The window `networks` counts over when the policy sets none (`shared_key.window`).
pub const DEFAULT_NETWORK_WINDOW_S: u64 = 3600;

#[cfg(test)]
mod tests {
    use super::*;
    use filter_common::{FAMILY_V4, FAMILY_V6, net_fingerprint, net_slot};

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(30));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("14d"), Ok(14 * 86_400));
        for bad in [
            "",
            "h",
            "2",
            "2w",
            "-1h",
            "1.5h",
            "2 h",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(7200), "2h");
        assert_eq!(format_duration(90), "90s");
        assert_eq!(format_duration(14 * 86_400), "14d");
    }

    #[test]
    fn rfc3339_round_trip_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2026-12-01T08:00:00Z"), Ok(1_796_112_000));
        assert_eq!(
            parse_rfc3339("2026-12-01T09:00:00+01:00"),
            Ok(1_796_112_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T07:30:00-00:30"),
            Ok(1_796_112_000)
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T08:00:00.123456Z"),
            Ok(1_796_112_000)
        );
        assert_eq!(format_rfc3339(1_796_112_000), "2026-12-01T08:00:00Z");
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z").map(format_rfc3339),
            Ok("2024-02-29T00:00:00Z".into())
        );
        for bad in [
            "2026-12-01",
            "2026-12-01T08:00:00",
            "2026-13-01T08:00:00Z",
            "2025-02-29T08:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T08:00:00+1:00",
            "2026-12-01T08:00:00.Z",
            "tomorrow",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
        assert!(check_locked_until("2200-01-01T00:00:00Z").is_err());
    }

    #[test]
    fn lock_reasons_are_counted() {
        let k = |locked: bool, r: Option<&str>| {
            let mut k: crate::policy::Key =
                serde_json::from_value(serde_json::json!({"prefix": "aaaaaaaa"})).unwrap();
            k.locked = locked;
            k.lock_reason = r.map(str::to_owned);
            k
        };
        let keys = [
            k(true, Some("idle")),
            k(true, Some("idle")),
            k(true, None),
            k(false, None),
        ];
        let mut r = LockReasons::of(&keys);
        assert_eq!(r.top(10), [("idle".to_owned(), 2), (String::new(), 1)]);
        r.add(&keys[0], -1);
        r.add(&keys[0], -1);
        assert_eq!(r.top(10), [(String::new(), 1)]);
    }

    #[test]
    fn lock_reasons_are_bounded_and_one_line() {
        assert!(check_lock_reason("leaked on a forum (ticket 1234)").is_ok());
        assert!(check_lock_reason(&"x".repeat(201)).is_err());
        assert!(check_lock_reason("two\nlines").is_err());
    }

    #[test]
    fn expiry_clock() {
        assert_eq!(tai_until(None, 37), 0);
        assert_eq!(tai_until(Some(1000), 37), 1037);
        assert_eq!(tai_until(Some(0), 0), 1);
        assert_eq!(shift_until(1000, 37), 1037);
        assert_eq!(
            shift_until(10, -37),
            1,
            "an expiry never turns into forever"
        );
        assert!(lock_holds(None, i64::MAX));
        assert!(lock_holds(Some(100), 99));
        assert!(!lock_holds(Some(100), 100));
        // The kernel's TAI offset is whole seconds and never negative.
        let o = tai_offset_s();
        assert!((0..=100).contains(&o), "{o}");
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    #[test]
    fn fingerprints_are_per_network() {
        let a = net_fingerprint(FAMILY_V4, &v4([198, 51, 100, 7]));
        assert_eq!(
            a,
            net_fingerprint(FAMILY_V4, &v4([198, 51, 100, 200])),
            "same /24"
        );
        assert_ne!(a, net_fingerprint(FAMILY_V4, &v4([198, 51, 101, 7])));
        let mut x: [u8; 16] = "2001:db8:1:2::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let b = net_fingerprint(FAMILY_V6, &x);
        x[6] = 0xff; // still the same /48
        assert_eq!(b, net_fingerprint(FAMILY_V6, &x));
        x[5] ^= 1;
        assert_ne!(b, net_fingerprint(FAMILY_V6, &x));
        assert_ne!(net_fingerprint(FAMILY_V4, &[0; 16]), 0);
    }

    /// The kernel's slot choice, run here as the datapath runs it.
    fn see(nets: &mut [u32; ACTIVITY_NETS], net: u8, minute: u32) {
        let fp = net_fingerprint(FAMILY_V4, &v4([10, 0, net, 1]));
        let (i, write) = net_slot(nets, fp, minute);
        if write {
            nets[i] = fp << 16 | (minute & 0xffff);
        }
    }

    #[test]
    fn sliding_window_counts_distinct_networks() {
        let mut nets = [0u32; ACTIVITY_NETS];
        for n in 0..4 {
            see(&mut nets, n, 100);
        }
        see(&mut nets, 0, 101); // again: no new slot
        assert_eq!(networks_in_window(&nets, 101 * 60, 3600), 4);
        // An hour later only network 0 (seen at 101) is inside a 1h window at minute 161.
        assert_eq!(networks_in_window(&nets, 161 * 60, 3600), 1);
        assert_eq!(networks_in_window(&nets, 162 * 60, 3600), 0);
        // More networks than slots: the oldest go, the count saturates at ACTIVITY_NETS.
        for n in 10..20 {
            see(&mut nets, n, 200);
        }
        assert_eq!(
            networks_in_window(&nets, 200 * 60, 60),
            ACTIVITY_NETS as u32
        );
        // Minutes wrap at 65536 without losing recent slots.
        let mut nets = [0u32; ACTIVITY_NETS];
        see(&mut nets, 1, 65_535);
        see(&mut nets, 2, 65_536);
        assert_eq!(networks_in_window(&nets, 65_536 * 60, 120), 2);
    }

    #[test]
    fn activity_in_wall_time() {
        let mut a = KeyActivity {
            requests: 5,
            connections: 2,
            last_allowed_s: 1000,
            ..Default::default()
        };
        let got = Activity::from_kernel(&a, 1_700_000_000, 1000, 3600);
        assert_eq!(got.last_allowed, Some(1_700_001_000));
        assert_eq!(got.last_refused, None);
        assert_eq!(got.last_refused_reason, None);
        a.last_refused_s = 1001;
        a.last_refused_reason = Reason::DropLocked as u8;
        let got = Activity::from_kernel(&a, 0, 1000, 3600);
        assert_eq!(got.last_refused_reason, Some("drop_locked"));
        assert_eq!(got.to_json()["last_allowed"], "1970-01-01T00:16:40Z");
    }
}
