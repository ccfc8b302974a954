//! Next-elapse computation with systemd's semantics.
//!
//! systemd walks a broken-down local time (`struct tm`) field by field and
//! lets the C library's `mktime(3)` normalise it after every step; its DST
//! behaviour (times in a spring-forward gap move forward by the gap, a time
//! that occurs twice in the fall-back hour takes the UTC offset `mktime`
//! used last) is therefore glibc's. This module reproduces that walk over a
//! [`Clock`] that models glibc's `mktime`/`localtime_r` on a jiff
//! [`TimeZone`], including the "offset used last" state, so the elapses
//! agree with `systemd-analyze calendar` to the microsecond.

use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::{CalendarEvent, Component, GaveUp};

pub(crate) const USEC_PER_SEC: i64 = 1_000_000;
/// The last year systemd computes elapses for.
pub(crate) const MAX_YEAR: i64 = 2199;
/// systemd gives up on a computation after this many rounds.
const MAX_ITERATIONS: u32 = 1000;

/// A broken-down time, fields possibly out of range (as `struct tm`, but
/// with the full year and a 0-based month).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tm {
    pub year: i64,
    pub mon: i64,
    pub mday: i64,
    pub hour: i64,
    pub min: i64,
    pub sec: i64,
    /// -1 unknown, 0 standard time, 1 daylight saving time.
    pub isdst: i32,
    /// 0 = Sunday (set by normalisation only).
    pub wday: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1..=12).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month 1..=12, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl Tm {
    /// Seconds of this wall time counted as if it were UTC, with every
    /// field allowed out of range (what `mktime` does before it looks at
    /// the zone).
    fn wall_seconds(&self) -> i64 {
        let year = self.year + self.mon.div_euclid(12);
        let mon = self.mon.rem_euclid(12);
        let days = days_from_civil(year, mon + 1, 1) + self.mday - 1;
        days * 86_400 + self.hour * 3600 + self.min * 60 + self.sec
    }

    fn from_wall_seconds(w: i64, isdst: i32) -> Tm {
        let days = w.div_euclid(86_400);
        let secs = w.rem_euclid(86_400);
        let (year, m, d) = civil_from_days(days);
        Tm {
            year,
            mon: m - 1,
            mday: d,
            hour: secs / 3600,
            min: secs / 60 % 60,
            sec: secs % 60,
            isdst,
            wday: (days + 4).rem_euclid(7),
        }
    }
}

/// glibc's `mktime`/`localtime_r` (or `timegm`/`gmtime_r` in UTC) on one
/// time zone, with the offset `mktime` found last (glibc keeps it in a
/// static variable and starts its next search from it).
#[derive(Debug)]
pub(crate) struct Clock<'a> {
    tz: &'a TimeZone,
    utc: bool,
    guess: i64,
    /// Leap second table (instant, cumulative correction) of a `right/`
    /// zone, whose `time_t` counts leap seconds; empty otherwise.
    leaps: Vec<(i64, i64)>,
}

impl<'a> Clock<'a> {
    pub(crate) fn new(tz: &'a TimeZone, utc: bool) -> Clock<'a> {
        let leaps = if utc { Vec::new() } else { leap_table(tz) };
        Clock {
            tz,
            utc,
            guess: 0,
            leaps,
        }
    }

    /// (UTC offset in seconds, is DST) at instant `t`.
    fn offset_at(&self, t: i64) -> (i64, bool) {
        if self.utc {
            return (0, false);
        }
        match Timestamp::from_second(t) {
            Ok(ts) => {
                let o = self.tz.to_offset_info(ts);
                // glibc subtracts the leap seconds so far like an offset.
                let leap = self
                    .leaps
                    .iter()
                    .rev()
                    .find(|(at, _)| t >= *at)
                    .map_or(0, |(_, corr)| *corr);
                (i64::from(o.offset().seconds()) - leap, o.dst().is_dst())
            }
            Err(_) => (0, false),
        }
    }

    pub(crate) fn localtime(&self, t: i64) -> Tm {
        let (off, dst) = self.offset_at(t);
        Tm::from_wall_seconds(t + off, i32::from(dst))
    }

    /// Normalises `tm` in place and returns its instant, like `mktime`
    /// (`timegm` for UTC events). `None` where `mktime` would return -1.
    pub(crate) fn mktime(&mut self, tm: &mut Tm) -> Option<i64> {
        if self.utc {
            let w = tm.wall_seconds();
            *tm = Tm::from_wall_seconds(w, 0);
            return (w >= 0).then_some(w);
        }
        // glibc searches with the seconds clamped to 0..=59 (leap second
        // support) and adds the difference back afterwards; near a DST
        // change that decides which offset a time like 02:59:61 gets.
        let sec_clamped = tm.sec.clamp(0, 59);
        let w = tm.wall_seconds() - tm.sec + sec_clamped;
        let isdst = tm.isdst;
        // Probe: t -> w - offset(t) until it settles, starting from the
        // offset found last (glibc gives up after six probes).
        let mut t = w - self.guess;
        let mut prev = None;
        let mut found = None;
        let mut in_gap = false;
        for _ in 0..6 {
            let (off, _) = self.offset_at(t);
            let gt = w - off;
            if gt == t {
                found = Some(t);
                break;
            }
            if prev == Some(gt) {
                // The probes alternate between two instants: `w` falls in
                // a gap (spring forward). glibc takes the one whose DST
                // flag differs from the requested one, or, with none
                // requested, the one with DST: that moves 02:30 forward
                // to 03:30 CEST in Berlin, but 01:30 back to 00:30 GMT in
                // Dublin (whose winter time is the tzdb's "DST").
                let wanted = |t: i64| {
                    let dst = self.offset_at(t).1;
                    if isdst < 0 {
                        dst
                    } else {
                        dst != (isdst != 0)
                    }
                };
                found = Some(match (wanted(t), wanted(gt)) {
                    (true, false) => t,
                    (false, true) => gt,
                    _ => t.max(gt),
                });
                in_gap = true;
                break;
            }
            prev = Some(t);
            t = gt;
        }
        let mut t = found?;
        let (_, dst) = self.offset_at(t);
        if !in_gap && isdst >= 0 && (isdst != 0) != dst {
            // The wrong one of two candidates: glibc looks for a nearby
            // instant with the requested DST flag and uses its offset.
            t = self.other_dst(t, w, isdst != 0).unwrap_or_else(|| {
                let diff = i64::from(isdst == 0) - i64::from(dst);
                t + 3600 * diff
            });
        }
        self.guess = w - t;
        t += tm.sec - sec_clamped;
        *tm = self.localtime(t);
        (t >= 0).then_some(t)
    }

    fn other_dst(&self, t: i64, w: i64, want_dst: bool) -> Option<i64> {
        const STRIDE: i64 = 601_200;
        const BOUND: i64 = 457_243_200 / 2 + STRIDE;
        let mut delta = STRIDE;
        while delta < BOUND {
            for dir in [-1, 1] {
                let ot = t + delta * dir;
                let (off, dst) = self.offset_at(ot);
                if dst == want_dst {
                    return Some(w - off);
                }
            }
            delta += STRIDE;
        }
        None
    }
}

/// The leap second records of a `right/` zone's TZif file (version 2+
/// data block), as glibc applies them; empty for any other zone.
fn leap_table(tz: &TimeZone) -> Vec<(i64, i64)> {
    let Some(name) = tz.iana_name().filter(|n| n.starts_with("right/")) else {
        return Vec::new();
    };
    let Ok(data) = std::fs::read(std::path::Path::new("/usr/share/zoneinfo").join(name)) else {
        return Vec::new();
    };
    parse_leaps(&data).unwrap_or_default()
}

fn parse_leaps(data: &[u8]) -> Option<Vec<(i64, i64)>> {
    let be32 = |at: usize| -> Option<usize> {
        let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_be_bytes(b)).ok()
    };
    // Header: "TZif", version, 15 reserved, then the six counts.
    let counts = |at: usize| -> Option<[usize; 6]> {
        if data.get(at..at + 4)? != b"TZif" {
            return None;
        }
        let mut c = [0; 6];
        for (i, v) in c.iter_mut().enumerate() {
            *v = be32(at + 20 + 4 * i)?;
        }
        Some(c)
    };
    let [isut, isstd, leapcnt, timecnt, typecnt, charcnt] = counts(0)?;
    if *data.get(4)? < b'2' {
        return None;
    }
    // Skip the version 1 data block to the version 2 header.
    let v1 = timecnt * 5 + typecnt * 6 + charcnt + leapcnt * 8 + isstd + isut;
    let h2 = 44 + v1;
    let [_, _, leapcnt, timecnt, typecnt, charcnt] = counts(h2)?;
    let mut at = h2 + 44 + timecnt * 9 + typecnt * 6 + charcnt;
    let mut out = Vec::with_capacity(leapcnt);
    for _ in 0..leapcnt {
        let t: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
        let c: [u8; 4] = data.get(at + 8..at + 12)?.try_into().ok()?;
        out.push((i64::from_be_bytes(t), i64::from(i32::from_be_bytes(c))));
        at += 12;
    }
    Some(out)
}

/// `mktime` on a copy; the copy's normalised fields and the instant.
fn normalized(clock: &mut Clock<'_>, tm: &Tm) -> Option<(Tm, i64)> {
    let mut t = *tm;
    let s = clock.mktime(&mut t)?;
    Some((t, s))
}

/// The day of the month that is `day` days before the end of `tm`'s month
/// (1 = the last day), or -1.
fn end_of_month(clock: &mut Clock<'_>, tm: &Tm, day: i64) -> i64 {
    let mut t = *tm;
    t.mon += 1;
    t.mday = 1 - day;
    match clock.mktime(&mut t) {
        Some(_) if t.mon == tm.mon => t.mday,
        _ => -1,
    }
}

/// The earliest value of `chain` at or after `*val`: `None` if there is
/// none, else whether `*val` changed.
fn find_matching(
    clock: &mut Clock<'_>,
    chain: &[Component],
    end_of_month_days: bool,
    tm: &Tm,
    val: &mut i64,
) -> Option<bool> {
    if chain.is_empty() {
        return Some(false);
    }
    let mut best: Option<i64> = None;
    for c in chain {
        let (mut start, mut stop) = (c.start, c.stop);
        if end_of_month_days {
            start = end_of_month(clock, tm, c.start);
            stop = end_of_month(clock, tm, c.stop);
            if stop > 0 {
                std::mem::swap(&mut start, &mut stop);
            }
        }
        if start >= *val {
            if best.is_none_or(|d| start < d) {
                best = Some(start);
            }
        } else if c.repeat > 0 {
            let n = (*val - start + c.repeat - 1) / c.repeat;
            let k = start + c.repeat * n;
            if best.is_none_or(|d| k < d) && (stop < 0 || k <= stop) {
                best = Some(k);
            }
        }
    }
    let d = best?;
    let changed = *val != d;
    *val = d;
    Some(changed)
}

/// After a field was set: `Err(())` if normalising would go backwards or
/// the year is out of range, `Ok(true)` if `tm` is already normal,
/// `Ok(false)` if it was not (then `tm` is the normalised time with the
/// field below the first changed one reset).
fn within_bounds(clock: &mut Clock<'_>, tm: &mut Tm) -> Result<bool, ()> {
    if tm.year > MAX_YEAR {
        return Err(());
    }
    let Some((mut t, _)) = normalized(clock, tm) else {
        return Err(());
    };
    let cmp = if t.year != tm.year {
        t.mon = 0;
        t.year.cmp(&tm.year)
    } else if t.mon != tm.mon {
        t.mday = 1;
        t.mon.cmp(&tm.mon)
    } else if t.mday != tm.mday {
        t.hour = 0;
        t.mday.cmp(&tm.mday)
    } else if t.hour != tm.hour {
        t.min = 0;
        t.hour.cmp(&tm.hour)
    } else if t.min != tm.min {
        t.sec = 0;
        t.min.cmp(&tm.min)
    } else {
        t.sec.cmp(&tm.sec)
    };
    match cmp {
        std::cmp::Ordering::Less => Err(()),
        std::cmp::Ordering::Greater => {
            *tm = t;
            Ok(false)
        }
        std::cmp::Ordering::Equal => Ok(true),
    }
}

fn matches_weekday(clock: &mut Clock<'_>, bits: Option<u8>, tm: &Tm) -> bool {
    let Some(bits) = bits else { return true };
    let Some((t, _)) = normalized(clock, tm) else {
        return false;
    };
    let k = if t.wday == 0 { 6 } else { t.wday - 1 };
    bits & (1 << k) != 0
}

/// systemd's `find_next`: the first matching time at or after `tm` +
/// `usec` (microseconds within the second).
fn find_next(
    ev: &CalendarEvent,
    clock: &mut Clock<'_>,
    tm: Tm,
    usec: i64,
) -> Result<Option<(Tm, i64)>, GaveUp> {
    let mut c = tm;
    let mut us = usec;
    // Set once a candidate came out not after the start (a DST change
    // moved it back): from then on the DST flag mktime found is kept.
    let mut keep_dst = false;
    for _ in 0..MAX_ITERATIONS {
        let _ = clock.mktime(&mut c);
        if !keep_dst {
            c.isdst = ev.dst;
        }

        let snap = c;
        let Some(r) = find_matching(clock, &ev.year, false, &snap, &mut c.year) else {
            return Ok(None);
        };
        if r {
            c.mon = 0;
            c.mday = 1;
            (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
        }
        if within_bounds(clock, &mut c) != Ok(true) {
            return Ok(None);
        }

        let mut m = c.mon + 1;
        let snap = c;
        let r = find_matching(clock, &ev.month, false, &snap, &mut m);
        c.mon = m - 1;
        if r == Some(true) {
            c.mday = 1;
            (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
        }
        match r.map(|_| within_bounds(clock, &mut c)) {
            None | Some(Err(())) => {
                c.year += 1;
                c.mon = 0;
                c.mday = 1;
                (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }

        let mut d = c.mday;
        let snap = c;
        let r = find_matching(clock, &ev.day, ev.end_of_month, &snap, &mut d);
        c.mday = d;
        if r == Some(true) {
            (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
        }
        match r.map(|_| within_bounds(clock, &mut c)) {
            None | Some(Err(())) => {
                c.mon += 1;
                c.mday = 1;
                (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }

        if !matches_weekday(clock, ev.weekdays, &c) {
            c.mday += 1;
            (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
            continue;
        }

        let mut h = c.hour;
        let snap = c;
        let r = find_matching(clock, &ev.hour, false, &snap, &mut h);
        c.hour = h;
        if r == Some(true) {
            (c.min, c.sec, us) = (0, 0, 0);
        }
        match r.map(|_| within_bounds(clock, &mut c)) {
            None | Some(Err(())) => {
                c.mday += 1;
                (c.hour, c.min, c.sec, us) = (0, 0, 0, 0);
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }

        let mut mi = c.min;
        let snap = c;
        let r = find_matching(clock, &ev.minute, false, &snap, &mut mi);
        c.min = mi;
        if r == Some(true) {
            (c.sec, us) = (0, 0);
        }
        match r.map(|_| within_bounds(clock, &mut c)) {
            None | Some(Err(())) => {
                c.hour += 1;
                (c.min, c.sec, us) = (0, 0, 0);
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }

        let mut s = c.sec * USEC_PER_SEC + us;
        let snap = c;
        let r = find_matching(clock, &ev.usec, false, &snap, &mut s);
        us = s % USEC_PER_SEC;
        c.sec = s / USEC_PER_SEC;
        match r.map(|_| within_bounds(clock, &mut c)) {
            None | Some(Err(())) => {
                c.min += 1;
                (c.sec, us) = (0, 0);
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }
        // Not after the start (a gap resolved backwards, as in Dublin
        // whose winter time is the tzdb's DST): step an hour on and let
        // mktime pick the DST flag.
        let fields = |t: &Tm| (t.year, t.mon, t.mday, t.hour, t.min, t.sec);
        let stuck = match fields(&tm).cmp(&fields(&c)) {
            std::cmp::Ordering::Equal => usec > us,
            o => o.is_gt(),
        };
        if stuck {
            keep_dst = true;
            c.hour += 1;
            continue;
        }
        return Ok(Some((c, us)));
    }
    Err(GaveUp)
}

/// The first elapse strictly after `after_us` (microseconds since the
/// epoch), as microseconds since the epoch.
pub(crate) fn next_usec(
    ev: &CalendarEvent,
    tz: &TimeZone,
    after_us: i64,
) -> Result<Option<i64>, GaveUp> {
    let Some(usec) = after_us.checked_add(1) else {
        return Ok(None);
    };
    let t = usec.div_euclid(USEC_PER_SEC);
    let mut clock = Clock::new(tz, ev.utc);
    let tm = clock.localtime(t);
    let Some((mut tm, us)) = find_next(ev, &mut clock, tm, usec.rem_euclid(USEC_PER_SEC))? else {
        return Ok(None);
    };
    Ok(clock
        .mktime(&mut tm)
        .and_then(|t| t.checked_mul(USEC_PER_SEC)?.checked_add(us)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-800_000, -1, 0, 1, 59, 365, 11_016, 19_782, 84_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn mktime_spring_gap_moves_forward_and_fall_back_follows_last_offset() {
        let tz = TimeZone::get("Europe/Berlin").expect("tzdb has Europe/Berlin");
        let mut clock = Clock::new(&tz, false);
        let tm = |h, isdst| Tm {
            year: 2024,
            mon: 2,
            mday: 31,
            hour: h,
            min: 30,
            sec: 0,
            isdst,
            wday: 0,
        };
        // 02:30 does not exist on 2024-03-31: glibc gives 03:30 CEST.
        let mut t = tm(2, -1);
        assert_eq!(clock.mktime(&mut t), Some(1_711_848_600));
        assert_eq!((t.hour, t.isdst), (3, 1));
        // 02:30 on 2024-10-27 happens twice: the offset used last decides.
        let fall = |h| Tm {
            mon: 9,
            mday: 27,
            ..tm(h, -1)
        };
        let (mut a, mut b, mut c) = (fall(1), fall(2), fall(4));
        clock.mktime(&mut a);
        assert_eq!(clock.mktime(&mut b), Some(1_729_989_000));
        clock.mktime(&mut c);
        let mut b = fall(2);
        assert_eq!(clock.mktime(&mut b), Some(1_729_992_600));
    }

    #[test]
    fn mktime_gap_takes_the_dst_side_even_when_that_is_backwards() {
        // Europe/Dublin: winter GMT is the tzdb's DST (negative save), so
        // glibc resolves 01:30 on 2024-03-31 (a gap) to 00:30 GMT.
        let tz = TimeZone::get("Europe/Dublin").expect("tzdb has Europe/Dublin");
        let mut clock = Clock::new(&tz, false);
        let mut t = Tm {
            year: 2024,
            mon: 2,
            mday: 31,
            hour: 1,
            min: 30,
            sec: 0,
            isdst: -1,
            wday: 0,
        };
        assert_eq!(clock.mktime(&mut t), Some(1_711_845_000));
        assert_eq!((t.hour, t.isdst), (0, 1));
        // With DST requested (isdst = 1) glibc prefers the side whose flag
        // differs from the request: 02:30 IST.
        let mut t = Tm {
            hour: 1,
            isdst: 1,
            ..t
        };
        assert_eq!(clock.mktime(&mut t), Some(1_711_848_600));
        assert_eq!((t.hour, t.isdst), (2, 0));
    }
}
