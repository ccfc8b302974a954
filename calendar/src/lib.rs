//! Calendar events as systemd.time(7) defines them (`OnCalendar=` of timer
//! units): parsing, systemd's normalized form and the next elapse, with
//! systemd's behaviour across daylight saving time changes.
//!
//! This is its own crate because it is a generic engine with no backup
//! policy in it: the daemon asks it "when is the next slot after T?" and
//! "which slots fell between T1 and T2?", and everything else (what runs
//! in a slot, missed-slot policy) stays in the daemon. It is tested
//! differentially against `systemd-analyze calendar` of systemd 252
//! (Debian 12) with glibc (see `tests/`): systemd's answers come from its
//! field-by-field search over glibc's `mktime(3)`, and the engine here
//! reproduces both, including `mktime`'s memory of the offset it used
//! last, which decides repeated fall-back times.
//!
//! ```
//! use calendar::CalendarEvent;
//! let ev: CalendarEvent = "mon..fri 22:00".parse().unwrap();
//! assert_eq!(ev.to_string(), "Mon..Fri *-*-* 22:00:00");
//! let base: jiff::Zoned = "2024-03-29T23:00:00+01:00[Europe/Berlin]".parse().unwrap();
//! let next = ev.next_after(&base).unwrap();
//! assert_eq!(next.to_string(), "2024-04-01T22:00:00+02:00[Europe/Berlin]");
//! ```
//!
//! What systemd does around DST, and this crate with it: a time that does
//! not exist (in the spring-forward gap) is moved forward by the size of
//! the gap, so `*-*-* 02:30` in Europe/Berlin skips the day of the change
//! while `*:30` fires at 03:30 CEST; a wall time that occurs twice (the
//! fall-back hour) fires once, at the occurrence with the UTC offset in
//! force when the computation reached it (so `*:0/15` fires through the
//! first 02:xx hour and skips the repeated one; a process that starts
//! inside the repeated hour still gets that hour's remaining slots). Where
//! the tzdb calls
//! winter time "DST" (Europe/Dublin), glibc resolves a gap time backwards;
//! systemd then steps on by an hour, and so does this crate (`*:30` goes
//! from 00:30 GMT to 02:30 IST on the change day). A computation that
//! does not settle within systemd's 1000 rounds gives up as systemd does
//! ([`CalendarEvent::try_next_after`]).
//!
//! Zones from the tzdb's `right/` tree count leap seconds in `time_t`;
//! glibc applies them like an offset, so systemd's elapses there are 27 s
//! later than the plain zone's (the leap seconds so far), and so are this
//! crate's.
//!
//! One deliberate difference: on a fall-back night systemd can answer
//! with the first occurrence of a repeated time although the base time is
//! already in the second one, i.e. with an instant in the past;
//! [`CalendarEvent::next_after`] never does (it follows systemd's chain
//! to the first slot after the base), so a scheduler never sees a slot
//! twice.
//!
//! A suffix naming the local zone's abbreviation (`… CET`, `… CEST`)
//! forces standard or daylight saving time as systemd does (through
//! glibc's `mktime` with `tm_isdst` set): that makes times in the other
//! half of the year drift or never elapse, exactly as in systemd.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

mod engine;

/// Proleptic Gregorian day arithmetic (H. Hinnant's algorithms), also for
/// callers that only need dates (the S3 test proxy's clock skew).
pub use engine::{civil_from_days, days_from_civil};

use engine::USEC_PER_SEC;

const MIN_YEAR: i64 = 1970;
const MAX_COMPONENTS: usize = 240;
/// Slots followed past an answer that was not after the base time (see
/// `try_next_after`): systemd's chain can walk through the rest of the
/// first pass of a repeated hour slot by slot, up to 3600 slots for an
/// every-second event (7200 for a two-hour repeat, as with historical
/// double summer time).
const MAX_CHAIN_STEPS: usize = 10_000;

/// One element of a component's comma list: `start`, `start..stop`,
/// `start/repeat` or `start..stop/repeat` (seconds in microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Component {
    pub(crate) start: i64,
    /// -1: no upper bound.
    pub(crate) stop: i64,
    /// 0: no repetition.
    pub(crate) repeat: i64,
}

/// A parsed calendar event (`OnCalendar=` expression).
#[derive(Clone, Debug, PartialEq)]
pub struct CalendarEvent {
    /// Bit 0 = Monday; `None` = every day.
    pub(crate) weekdays: Option<u8>,
    pub(crate) end_of_month: bool,
    pub(crate) utc: bool,
    /// -1, or the DST flag forced by a local zone abbreviation suffix
    /// (`… CET` = standard time, `… CEST` = daylight saving time).
    pub(crate) dst: i32,
    /// That abbreviation, for the normalized form.
    pub(crate) dst_name: Option<String>,
    /// An explicit time zone (`… Europe/Berlin`).
    pub(crate) timezone: Option<NamedZone>,
    // An empty chain is `*`.
    pub(crate) year: Vec<Component>,
    pub(crate) month: Vec<Component>,
    pub(crate) day: Vec<Component>,
    pub(crate) hour: Vec<Component>,
    pub(crate) minute: Vec<Component>,
    pub(crate) usec: Vec<Component>,
}

/// A time zone named in an event, as found in the system's tzdb.
#[derive(Clone, Debug)]
pub(crate) struct NamedZone {
    name: String,
    tz: TimeZone,
}

impl PartialEq for NamedZone {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// Why an expression is not a calendar event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid calendar event {input:?}: {reason} (at byte {position})")]
pub struct ParseError {
    /// The expression as given.
    pub input: String,
    /// Byte offset in `input` where the problem was found.
    pub position: usize,
    /// What is wrong.
    pub reason: String,
}

/// The next-elapse computation gave up: systemd stops after 1000 rounds
/// of its field-by-field search (it logs "Infinite loop in calendar
/// calculation" and the timer does not elapse); so does this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("calendar computation gave up (systemd's iteration limit)")]
pub struct GaveUp;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    input: &'a str,
}

impl Parser<'_> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            input: self.input.to_string(),
            position: self.pos,
            reason: reason.into(),
        })
    }
    fn peek(&self) -> u8 {
        self.s.get(self.pos).copied().unwrap_or(0)
    }
    fn peek_at(&self, n: usize) -> u8 {
        self.s.get(self.pos + n).copied().unwrap_or(0)
    }
    fn skip_spaces(&mut self) {
        while self.peek() == b' ' {
            self.pos += 1;
        }
    }

    fn weekdays(&mut self, ev: &mut CalendarEvent) -> Result<(), ParseError> {
        const DAYS: [(&str, u8); 14] = [
            ("monday", 0),
            ("mon", 0),
            ("tuesday", 1),
            ("tue", 1),
            ("wednesday", 2),
            ("wed", 2),
            ("thursday", 3),
            ("thu", 3),
            ("friday", 4),
            ("fri", 4),
            ("saturday", 5),
            ("sat", 5),
            ("sunday", 6),
            ("sun", 6),
        ];
        let mut bits: u8 = 0;
        let mut range_from: Option<u8> = None;
        let mut first = true;
        loop {
            let rest = &self.s[self.pos..];
            let found = DAYS.iter().find(|(name, _)| {
                rest.len() >= name.len() && rest[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            });
            let Some(&(name, nr)) = found else {
                if first {
                    ev.weekdays = (bits != 0).then_some(bits);
                    return Ok(());
                }
                return self.err("expected a weekday");
            };
            if !matches!(self.peek_at(name.len()), 0 | b'-' | b'.' | b',' | b' ') {
                self.pos += name.len();
                return self.err("unexpected character after a weekday");
            }
            bits |= 1 << nr;
            if let Some(l) = range_from {
                if l > nr {
                    return self.err("weekday range goes backwards");
                }
                for j in l + 1..nr {
                    bits |= 1 << j;
                }
            }
            self.pos += name.len();
            ev.weekdays = Some(bits);
            match self.peek() {
                0 => return Ok(()),
                b' ' => {
                    self.skip_spaces();
                    return Ok(());
                }
                b'.' => {
                    if range_from.is_some() || self.peek_at(1) != b'.' {
                        return self.err("bad weekday range");
                    }
                    range_from = Some(nr);
                    self.pos += 2;
                }
                b'-' => {
                    if range_from.is_some() {
                        return self.err("bad weekday range");
                    }
                    range_from = Some(nr);
                    self.pos += 1;
                }
                b',' => {
                    range_from = None;
                    self.pos += 1;
                }
                _ => {}
            }
            if matches!(self.peek(), 0 | b' ') {
                self.skip_spaces();
                if range_from.is_some() {
                    return self.err("open weekday range");
                }
                return Ok(());
            }
            first = false;
        }
    }

    fn number(&mut self) -> Result<u64, ParseError> {
        if !self.peek().is_ascii_digit() {
            return self.err("expected a number");
        }
        let mut v: u64 = 0;
        while self.peek().is_ascii_digit() {
            v = match v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(self.peek() - b'0')))
            {
                Some(v) => v,
                None => return self.err("number out of range"),
            };
            self.pos += 1;
        }
        Ok(v)
    }

    fn decimal(&mut self, usec: bool) -> Result<i64, ParseError> {
        let mut v = self.number()?;
        if usec {
            v = match v.checked_mul(1_000_000) {
                Some(v) => v,
                None => return self.err("number out of range"),
            };
            if self.peek() == b'.' && self.peek_at(1) != b'.' {
                self.pos += 1;
                v += self.fraction()?;
            }
        }
        // systemd keeps every value in a C int.
        match i64::try_from(v) {
            Ok(v) if v <= i64::from(i32::MAX) => Ok(v),
            _ => self.err("number out of range"),
        }
    }

    /// Up to six fractional digits, rounded on the seventh.
    fn fraction(&mut self) -> Result<u64, ParseError> {
        let mut val: u64 = 0;
        let mut i = 0;
        while i < 6 {
            if !self.peek().is_ascii_digit() {
                if i == 0 {
                    return self.err("expected digits after the decimal point");
                }
                break;
            }
            val = val * 10 + u64::from(self.peek() - b'0');
            self.pos += 1;
            i += 1;
        }
        for _ in i..6 {
            val *= 10;
        }
        if (b'5'..=b'9').contains(&self.peek()) {
            val += 1;
        }
        while self.peek().is_ascii_digit() {
            self.pos += 1;
        }
        Ok(val)
    }

    fn components(&mut self, usec: bool) -> Result<Vec<Component>, ParseError> {
        let mut out = Vec::new();
        loop {
            if out.len() > MAX_COMPONENTS {
                return self.err("too many list elements");
            }
            let start = self.decimal(usec)?;
            let mut stop = -1;
            let mut repeat = 0;
            if self.peek() == b'.' && self.peek_at(1) == b'.' {
                self.pos += 2;
                stop = self.decimal(usec)?;
                repeat = if usec { USEC_PER_SEC } else { 1 };
            }
            if self.peek() == b'/' {
                self.pos += 1;
                repeat = self.decimal(usec)?;
                if repeat == 0 {
                    return self.err("repetition of zero");
                }
            } else if usec && stop >= 0 && start + repeat > stop {
                return self.err("seconds range shorter than a second");
            }
            if !matches!(self.peek(), 0 | b' ' | b',' | b'-' | b'~' | b':') {
                return self.err("unexpected character");
            }
            out.push(Component {
                start,
                stop,
                repeat,
            });
            if self.peek() == b',' {
                self.pos += 1;
            } else {
                return Ok(out);
            }
        }
    }

    fn chain(&mut self, usec: bool) -> Result<Vec<Component>, ParseError> {
        if self.peek() == b'*' {
            self.pos += 1;
            return Ok(if usec {
                vec![Component {
                    start: 0,
                    stop: -1,
                    repeat: USEC_PER_SEC,
                }]
            } else {
                Vec::new()
            });
        }
        self.components(usec)
    }

    /// The date part; `Ok(true)` when the expression was `@TIMESTAMP`.
    fn date(&mut self, ev: &mut CalendarEvent) -> Result<bool, ParseError> {
        if self.peek() == 0 {
            return Ok(false);
        }
        if self.peek() == b'@' {
            self.pos += 1;
            let v = self.number()?;
            let Ok(secs) = i64::try_from(v) else {
                return self.err("timestamp out of range");
            };
            let tm = engine::Clock::new(&TimeZone::UTC, true).localtime(secs);
            let one = |v: i64| {
                vec![Component {
                    start: v,
                    stop: -1,
                    repeat: 0,
                }]
            };
            ev.utc = true;
            ev.year = one(tm.year);
            ev.month = one(tm.mon + 1);
            ev.day = one(tm.mday);
            ev.hour = one(tm.hour);
            ev.minute = one(tm.min);
            ev.usec = one(tm.sec * USEC_PER_SEC);
            return Ok(true);
        }
        let save = self.pos;
        let first = self.chain(false)?;
        if matches!(self.peek(), 0 | b':') {
            self.pos = save;
            return Ok(false);
        }
        match self.peek() {
            b'~' => ev.end_of_month = true,
            b'-' => {}
            _ => return self.err("expected '-' or '~' in the date"),
        }
        self.pos += 1;
        let second = self.chain(false)?;
        if matches!(self.peek(), 0 | b' ') {
            self.skip_spaces();
            ev.month = first;
            ev.day = second;
            return Ok(false);
        }
        if ev.end_of_month {
            return self.err("'~' must come before the day");
        }
        match self.peek() {
            b'~' => ev.end_of_month = true,
            b'-' => {}
            _ => return self.err("expected '-' or '~' in the date"),
        }
        self.pos += 1;
        let third = self.chain(false)?;
        if !matches!(self.peek(), 0 | b' ') {
            return self.err("unexpected character after the date");
        }
        self.skip_spaces();
        ev.year = first;
        ev.month = second;
        ev.day = third;
        Ok(false)
    }

    fn time(&mut self, ev: &mut CalendarEvent) -> Result<(), ParseError> {
        let zero = || {
            vec![Component {
                start: 0,
                stop: -1,
                repeat: 0,
            }]
        };
        if self.peek() == 0 {
            ev.hour = zero();
            ev.minute = zero();
            ev.usec = zero();
            return Ok(());
        }
        let h = self.chain(false)?;
        if self.peek() != b':' {
            return self.err("expected ':' after the hour");
        }
        self.pos += 1;
        let m = self.chain(false)?;
        let s = if self.peek() == 0 {
            zero()
        } else {
            if self.peek() != b':' {
                return self.err("expected ':' after the minute");
            }
            self.pos += 1;
            let s = self.chain(true)?;
            if self.peek() != 0 {
                return self.err("unexpected character after the seconds");
            }
            s
        };
        ev.hour = h;
        ev.minute = m;
        ev.usec = s;
        Ok(())
    }
}

/// Whether systemd would accept `name` as a time zone: a file in the
/// system's tzdb with the TZif magic (systemd's `timezone_is_valid`).
fn load_zone(name: &str) -> Option<TimeZone> {
    if name.is_empty()
        || name.starts_with('/')
        || name.len() > 255
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_+".contains(&b))
        || name.split('/').any(|p| p.is_empty() || p.starts_with('.'))
    {
        return None;
    }
    let dir = Path::new("/usr/share/zoneinfo");
    let data = std::fs::read(dir.join(name)).ok()?;
    if !data.starts_with(b"TZif") {
        return None;
    }
    TimeZone::tzif(name, &data).ok()
}

fn normalize_chain(chain: &mut Vec<Component>) {
    for c in chain.iter_mut() {
        if c.stop > c.start && c.repeat > 0 {
            c.stop -= (c.stop - c.start) % c.repeat;
        }
        if (c.stop > c.start && c.repeat > 0 && c.start + c.repeat > c.stop) || c.start == c.stop {
            c.repeat = 0;
            c.stop = -1;
        }
    }
    chain.sort();
    chain.dedup();
}

fn chain_valid(chain: &[Component], from: i64, to: i64, end_of_month: bool) -> bool {
    // systemd lowers the upper bound by 3 for `~` days once per list
    // element (its check recurses with the lowered bound), so a third
    // `~` element must be <= 22: "*-*~21..22,24/5,10..15" is refused.
    let mut to = to;
    chain.iter().all(|c| {
        if end_of_month {
            to -= 3;
        }
        if c.start < from || c.start > to || c.repeat > to - from {
            return false;
        }
        if c.stop >= 0 {
            c.stop >= from && c.stop <= to && c.start + c.repeat <= c.stop
        } else if end_of_month {
            c.start - c.repeat >= from
        } else {
            c.start + c.repeat <= to
        }
    })
}

fn const_chain(values: &[i64]) -> Vec<Component> {
    values
        .iter()
        .map(|&start| Component {
            start,
            stop: -1,
            repeat: 0,
        })
        .collect()
}

/// The local zone's abbreviations for standard and daylight saving time,
/// as glibc's `tzname[0]` and `tzname[1]` (the most recent ones).
fn local_abbreviations(local: &TimeZone) -> [String; 2] {
    let now = Timestamp::now();
    let mut names: [Option<String>; 2] = [None, None];
    let note = |names: &mut [Option<String>; 2], abbrev: &str, dst: bool| {
        let slot = &mut names[usize::from(dst)];
        if slot.is_none() {
            *slot = Some(abbrev.to_string());
        }
    };
    let info = local.to_offset_info(now);
    note(&mut names, info.abbreviation(), info.dst().is_dst());
    for tr in local.following(now).take(4) {
        note(&mut names, tr.abbreviation(), tr.dst().is_dst());
    }
    for tr in local.preceding(now).take(400) {
        if names[0].is_some() && names[1].is_some() {
            break;
        }
        note(&mut names, tr.abbreviation(), tr.dst().is_dst());
    }
    let [std, dst] = names;
    let std = std.unwrap_or_default();
    let dst = dst.unwrap_or_else(|| std.clone());
    [std, dst]
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

impl FromStr for CalendarEvent {
    type Err = ParseError;

    /// Parses with the system's local zone ([`TimeZone::system`]) as the
    /// one whose abbreviations (`… CET`) systemd accepts as a suffix.
    fn from_str(input: &str) -> Result<Self, ParseError> {
        CalendarEvent::parse_with_local(input, &TimeZone::system())
    }
}

impl CalendarEvent {
    /// Parses `input` as systemd would in a process whose local zone is
    /// `local`: only that matters for an abbreviation suffix (`… CET`,
    /// `… EDT`), which means "local time with DST forced off/on".
    pub fn parse_with_local(input: &str, local: &TimeZone) -> Result<Self, ParseError> {
        let mut ev = CalendarEvent {
            weekdays: None,
            end_of_month: false,
            utc: false,
            dst: -1,
            dst_name: None,
            timezone: None,
            year: Vec::new(),
            month: Vec::new(),
            day: Vec::new(),
            hour: Vec::new(),
            minute: Vec::new(),
            usec: Vec::new(),
        };
        let mut text = input;
        // An abbreviation suffix is the whole last word (systemd wants a
        // space before it); abbreviations are made of letters, digits, '+'
        // and '-', so only such a last word needs the zone's names.
        let last_word = input.rsplit(' ').next().unwrap_or_default();
        let abbrevs = if input.contains(' ')
            && !ends_with_ignore_case(input, " UTC")
            && !last_word.is_empty()
            && last_word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-')
        {
            local_abbreviations(local)
        } else {
            [String::new(), String::new()]
        };
        let abbrev = (0..2).find(|&j| {
            let name = &abbrevs[j];
            !name.is_empty()
                && input.len() > name.len()
                && ends_with_ignore_case(input, name)
                && input.as_bytes()[input.len() - name.len() - 1] == b' '
        });
        if ends_with_ignore_case(input, " UTC") {
            ev.utc = true;
            text = &input[..input.len() - 4];
        } else if let Some(j) = abbrev {
            let name = &abbrevs[j];
            text = &input[..input.len() - name.len() - 1];
            ev.dst = i32::from(j == 1);
            ev.dst_name = Some(name.clone());
        } else if let Some(sp) = input.rfind(' ') {
            if let Some(tz) = load_zone(&input[sp + 1..]) {
                ev.timezone = Some(NamedZone {
                    name: input[sp + 1..].to_string(),
                    tz,
                });
                text = &input[..sp];
            }
        }
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
            input,
        };
        if text.is_empty() {
            return p.err("empty expression");
        }
        let lower = text.to_ascii_lowercase();
        let zero = const_chain(&[0]);
        let one = const_chain(&[1]);
        match lower.as_str() {
            "minutely" => ev.usec = zero,
            "hourly" => {
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "daily" => {
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "monthly" => {
                ev.day = one;
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "annually" | "yearly" | "anually" => {
                ev.month = one.clone();
                ev.day = one;
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "weekly" => {
                ev.weekdays = Some(1);
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "quarterly" => {
                ev.month = const_chain(&[1, 4, 7, 10]);
                ev.day = one;
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            "biannually" | "bi-annually" | "semiannually" | "semi-annually" => {
                ev.month = const_chain(&[1, 7]);
                ev.day = one;
                ev.hour = zero.clone();
                ev.minute = zero.clone();
                ev.usec = zero;
            }
            _ => {
                p.weekdays(&mut ev)?;
                if !p.date(&mut ev)? {
                    p.time(&mut ev)?;
                }
                if p.peek() != 0 {
                    return p.err("unexpected trailing text");
                }
            }
        }
        ev.normalize();
        if !ev.valid() {
            return Err(ParseError {
                input: input.to_string(),
                position: 0,
                reason: "a value or repetition is out of range".into(),
            });
        }
        Ok(ev)
    }

    fn normalize(&mut self) {
        if self.weekdays.is_some_and(|b| b >= 127) {
            self.weekdays = None;
        }
        if self.end_of_month && self.day.is_empty() {
            self.end_of_month = false;
        }
        for c in &mut self.year {
            for v in [&mut c.start, &mut c.stop] {
                if (0..70).contains(v) {
                    *v += 2000;
                } else if (70..100).contains(v) {
                    *v += 1900;
                }
            }
        }
        for chain in [
            &mut self.year,
            &mut self.month,
            &mut self.day,
            &mut self.hour,
            &mut self.minute,
            &mut self.usec,
        ] {
            normalize_chain(chain);
        }
    }

    fn valid(&self) -> bool {
        chain_valid(&self.year, MIN_YEAR, engine::MAX_YEAR, false)
            && chain_valid(&self.month, 1, 12, false)
            && chain_valid(&self.day, 1, 31, self.end_of_month)
            && chain_valid(&self.hour, 0, 23, false)
            && chain_valid(&self.minute, 0, 59, false)
            && chain_valid(&self.usec, 0, 60 * USEC_PER_SEC - 1, false)
    }

    /// The zone the event is computed in, given the caller's zone.
    fn zone(&self, local: &TimeZone) -> TimeZone {
        if self.utc {
            return TimeZone::UTC;
        }
        match &self.timezone {
            Some(z) => z.tz.clone(),
            None => local.clone(),
        }
    }

    /// The first elapse strictly after `after`, in the event's time zone
    /// (the `after`'s zone, or the event's explicit zone if it names one).
    /// `None` when the event never elapses again (systemd also gives up
    /// after the year 2199).
    pub fn next_after(&self, after: &Zoned) -> Option<Zoned> {
        self.try_next_after(after).ok().flatten()
    }

    /// [`next_after`](Self::next_after), telling "never again" (`Ok(None)`)
    /// from "gave up" (systemd's iteration limit, which a few odd
    /// combinations of lists and DST changes hit; systemd then does not
    /// elapse the timer either).
    pub fn try_next_after(&self, after: &Zoned) -> Result<Option<Zoned>, GaveUp> {
        let tz = self.zone(after.time_zone());
        let after_us = after.timestamp().as_microsecond();
        // systemd compares wall times, so on a fall-back night it can
        // answer with the first occurrence of a repeated time although
        // `after` lies in the second one (an instant in the past). Such an
        // answer is a slot that is already over: follow systemd's chain
        // from it to the first slot that is really after `after`, so a
        // caller never gets the same slot twice.
        let mut cur = after_us;
        for _ in 0..MAX_CHAIN_STEPS {
            let Some(next) = engine::next_usec(self, &tz, cur)? else {
                return Ok(None);
            };
            if next > after_us {
                return Ok(Timestamp::from_microsecond(next)
                    .ok()
                    .map(|ts| Zoned::new(ts, tz)));
            }
            cur = next;
        }
        Err(GaveUp)
    }
}

/// Slots of `event` in (since, until], oldest first, at most `limit` —
/// for missed-slot detection (repeat_missed = systemd's Persistent=true).
pub fn slots_between(
    event: &CalendarEvent,
    since: &Zoned,
    until: &Zoned,
    limit: usize,
) -> Vec<Zoned> {
    let mut out = Vec::new();
    let mut cur = since.clone();
    while out.len() < limit {
        let Some(next) = event.next_after(&cur) else {
            break;
        };
        if next.timestamp() > until.timestamp() {
            break;
        }
        out.push(next.clone());
        cur = next;
    }
    out
}

fn fmt_chain(
    f: &mut fmt::Formatter<'_>,
    width: usize,
    chain: &[Component],
    usec: bool,
) -> fmt::Result {
    let d = if usec { USEC_PER_SEC } else { 1 };
    let star = chain.is_empty()
        || (usec
            && chain
                .iter()
                .any(|c| c.start == 0 && c.stop < 0 && c.repeat == USEC_PER_SEC));
    if star {
        return f.write_str("*");
    }
    for (i, c) in chain.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{:0width$}", c.start / d)?;
        if c.start % d > 0 {
            write!(f, ".{:06}", c.start % d)?;
        }
        if c.stop > 0 {
            write!(f, "..{:0width$}", c.stop / d)?;
        }
        if c.stop % d > 0 {
            write!(f, ".{:06}", c.stop % d)?;
        }
        if c.repeat > 0 && !(c.stop > 0 && c.repeat == d) {
            write!(f, "/{}", c.repeat / d)?;
        }
        if c.repeat % d > 0 {
            write!(f, ".{:06}", c.repeat % d)?;
        }
    }
    Ok(())
}

impl fmt::Display for CalendarEvent {
    /// systemd's normalized form (`systemd-analyze calendar`'s
    /// "Normalized form:").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(bits) = self.weekdays {
            const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
            let mut need_comma = false;
            let mut l: Option<usize> = None;
            for x in 0..=7 {
                let set = x < 7 && bits & (1 << x) != 0;
                if set {
                    if l.is_none() {
                        if need_comma {
                            f.write_str(",")?;
                        }
                        need_comma = true;
                        f.write_str(DAYS[x])?;
                        l = Some(x);
                    }
                } else if let Some(start) = l {
                    if x > start + 1 {
                        f.write_str(if x > start + 2 { ".." } else { "," })?;
                        f.write_str(DAYS[x - 1])?;
                    }
                    l = None;
                }
            }
            f.write_str(" ")?;
        }
        fmt_chain(f, 4, &self.year, false)?;
        f.write_str("-")?;
        fmt_chain(f, 2, &self.month, false)?;
        f.write_str(if self.end_of_month { "~" } else { "-" })?;
        fmt_chain(f, 2, &self.day, false)?;
        f.write_str(" ")?;
        fmt_chain(f, 2, &self.hour, false)?;
        f.write_str(":")?;
        fmt_chain(f, 2, &self.minute, false)?;
        f.write_str(":")?;
        fmt_chain(f, 2, &self.usec, true)?;
        if self.utc {
            f.write_str(" UTC")?;
        } else if let Some(z) = &self.timezone {
            write!(f, " {}", z.name)?;
        } else if let Some(name) = &self.dst_name {
            write!(f, " {name}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> CalendarEvent {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn zoned(s: &str) -> Zoned {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn next_n(e: &str, base: &str, n: usize) -> Vec<String> {
        let e = ev(e);
        let mut cur = zoned(base);
        let mut out = Vec::new();
        for _ in 0..n {
            match e.next_after(&cur) {
                Some(z) => {
                    out.push(z.strftime("%a %Y-%m-%d %H:%M:%S%.f %Z").to_string());
                    cur = z;
                }
                None => break,
            }
        }
        out
    }

    #[test]
    fn normalized_forms_of_common_expressions() {
        for (input, norm) in [
            ("*-*-* 02:00", "*-*-* 02:00:00"),
            ("mon..fri 22:00", "Mon..Fri *-*-* 22:00:00"),
            ("Mon,Wed,Fri 8:5", "Mon,Wed,Fri *-*-* 08:05:00"),
            ("Sat,Sun", "Sat,Sun *-*-* 00:00:00"),
            ("daily", "*-*-* 00:00:00"),
            ("hourly", "*-*-* *:00:00"),
            ("minutely", "*-*-* *:*:00"),
            ("weekly", "Mon *-*-* 00:00:00"),
            ("monthly", "*-*-01 00:00:00"),
            ("yearly", "*-01-01 00:00:00"),
            ("quarterly", "*-01,04,07,10-01 00:00:00"),
            ("semiannually", "*-01,07-01 00:00:00"),
            ("*:0/15", "*-*-* *:00/15:00"),
            ("*:*", "*-*-* *:*:00"),
            ("*:*:*", "*-*-* *:*:*"),
            ("12,14,13,12:20,10,30", "*-*-* 12,13,14:10,20,30:00"),
            ("2003-03-05", "2003-03-05 00:00:00"),
            ("05-05", "*-05-05 00:00:00"),
            ("*-*-1..7 4:00", "*-*-01..07 04:00:00"),
            ("*~01", "*-*~01 00:00:00"),
            ("*-02~03..5", "*-02~03..05 00:00:00"),
            ("9..17/2:00", "*-*-* 09..17/2:00:00"),
            ("*:*:0.5", "*-*-* *:*:00.500000"),
            ("*-*-* 00:00:00 UTC", "*-*-* 00:00:00 UTC"),
            ("daily utc", "*-*-* 00:00:00 UTC"),
            ("Mon-Wed", "Mon..Wed *-*-* 00:00:00"),
            ("Mon..Tue", "Mon,Tue *-*-* 00:00:00"),
            ("mon,tue,wed,thu,fri,sat,sun", "*-*-* 00:00:00"),
            ("12-10-15", "2012-10-15 00:00:00"),
            ("@1700000000", "2023-11-14 22:13:20 UTC"),
            ("02:00 Europe/Berlin", "*-*-* 02:00:00 Europe/Berlin"),
        ] {
            assert_eq!(ev(input).to_string(), norm, "{input}");
        }
    }

    #[test]
    fn invalid_expressions_are_refused_with_a_position() {
        for bad in [
            "",
            "fooday",
            "Mon..",
            "Fri..Mon",
            "*-*-* 25:00",
            "*-*-32",
            "*:60",
            "*-*-* 02:00 Nowhere/City",
            "*:0/0",
            "2:",
            "*-*~01-01",
            "12:00:00 junk",
            "Mond",
        ] {
            let e = bad.parse::<CalendarEvent>();
            assert!(e.is_err(), "{bad:?} parsed as {e:?}");
        }
        let e = "*-*-* 12:xx".parse::<CalendarEvent>().unwrap_err();
        assert_eq!(e.position, 9, "{e}");
        assert!(e.to_string().contains("12:xx"), "{e}");
    }

    #[test]
    fn next_elapses_of_common_expressions() {
        let base = "2024-03-27T10:00:00+01:00[Europe/Berlin]";
        assert_eq!(
            next_n("*-*-* 02:00", base, 3),
            [
                "Thu 2024-03-28 02:00:00 CET",
                "Fri 2024-03-29 02:00:00 CET",
                "Sat 2024-03-30 02:00:00 CET"
            ]
        );
        assert_eq!(
            next_n("mon..fri 22:00", base, 4),
            [
                "Wed 2024-03-27 22:00:00 CET",
                "Thu 2024-03-28 22:00:00 CET",
                "Fri 2024-03-29 22:00:00 CET",
                "Mon 2024-04-01 22:00:00 CEST"
            ]
        );
        assert_eq!(
            next_n("*:0/15", base, 3),
            [
                "Wed 2024-03-27 10:15:00 CET",
                "Wed 2024-03-27 10:30:00 CET",
                "Wed 2024-03-27 10:45:00 CET"
            ]
        );
        assert_eq!(
            next_n("weekly", base, 2),
            [
                "Mon 2024-04-01 00:00:00 CEST",
                "Mon 2024-04-08 00:00:00 CEST"
            ]
        );
        assert_eq!(
            next_n("monthly", base, 2),
            [
                "Mon 2024-04-01 00:00:00 CEST",
                "Wed 2024-05-01 00:00:00 CEST"
            ]
        );
        assert_eq!(next_n("*-02~01", base, 1), ["Fri 2025-02-28 00:00:00 CET"]);
        assert_eq!(next_n("*-02-29", base, 1), ["Tue 2028-02-29 00:00:00 CET"]);
        assert_eq!(next_n("2020-01-01", base, 1), Vec::<String>::new());
        // As systemd: the overflow past :59 carries the half second into
        // the next minute (systemd-analyze prints 10:01:20 as the third).
        assert_eq!(
            next_n("*:*:0/20.5", base, 3),
            [
                "Wed 2024-03-27 10:00:20.5 CET",
                "Wed 2024-03-27 10:00:41 CET",
                "Wed 2024-03-27 10:01:20.5 CET"
            ]
        );
    }

    #[test]
    fn dst_gap_and_repeated_hour_behave_as_systemd() {
        // Spring forward in Berlin: 02:00 CET -> 03:00 CEST on 2024-03-31.
        let base = "2024-03-30T12:00:00+01:00[Europe/Berlin]";
        assert_eq!(
            next_n("*-*-* 02:30", base, 2),
            [
                "Mon 2024-04-01 02:30:00 CEST",
                "Tue 2024-04-02 02:30:00 CEST"
            ]
        );
        assert_eq!(
            next_n("*:30", "2024-03-31T01:00:00+01:00[Europe/Berlin]", 2),
            [
                "Sun 2024-03-31 01:30:00 CET",
                "Sun 2024-03-31 03:30:00 CEST"
            ]
        );
        // Fall back: 03:00 CEST -> 02:00 CET on 2024-10-27; the repeated
        // hour fires once.
        assert_eq!(
            next_n("*:0/30", "2024-10-27T01:40:00+02:00[Europe/Berlin]", 4),
            [
                "Sun 2024-10-27 02:00:00 CEST",
                "Sun 2024-10-27 02:30:00 CEST",
                "Sun 2024-10-27 03:00:00 CET",
                "Sun 2024-10-27 03:30:00 CET"
            ]
        );
    }

    #[test]
    fn never_answers_a_slot_that_is_already_over() {
        // 2024-10-27 02:00 CET is in Berlin's repeated hour. systemd
        // answers 02:30 CEST for the last-week-of-October event, which is
        // 30 minutes *before* the base; the next slot after the base on
        // systemd's chain is the next day's.
        assert_eq!(
            next_n(
                "*-03,10~01..07 02:30",
                "2024-10-27T02:00:00+01:00[Europe/Berlin]",
                2
            ),
            ["Mon 2024-10-28 02:30:00 CET", "Tue 2024-10-29 02:30:00 CET"]
        );
        // The third `~` list element is bounded at 22 days, as in systemd.
        let third = "*-01~21..22,24/5,10..15".parse::<CalendarEvent>();
        assert_eq!(
            third.map_err(|e| e.reason),
            Err("a value or repetition is out of range".to_string())
        );
        assert_eq!(
            ev("*-01~24/5,10..15").to_string(),
            "*-01~10..15,24/5 00:00:00"
        );
    }

    #[test]
    fn a_process_started_in_the_repeated_hour_gets_the_next_real_slot() {
        // From 02:00 CET (second pass) systemd answers 02:12 CEST (first
        // pass, 48 minutes earlier) and then chains second by second
        // through 02:48:59 CEST (2220 slots, all before the base); the
        // first slot after the base on that chain is 03:12 CET.
        let e = ev("*~2..07,9..25/1 *:12..48,24:*");
        let base = zoned("2024-10-27T02:00:00+01:00[Europe/Berlin]");
        let n = e.next_after(&base).expect("elapses");
        assert_eq!(n.to_string(), "2024-10-27T03:12:00+01:00[Europe/Berlin]");
    }

    #[test]
    fn explicit_zone_and_utc_override_the_callers_zone() {
        let base = zoned("2024-06-01T00:00:00+02:00[Europe/Berlin]");
        let n = ev("*-*-* 09:00 America/New_York")
            .next_after(&base)
            .expect("elapses");
        assert_eq!(n.to_string(), "2024-06-01T09:00:00-04:00[America/New_York]");
        let n = ev("daily UTC").next_after(&base).expect("elapses");
        assert_eq!(n.timestamp().to_string(), "2024-06-01T00:00:00Z");
        // A right/ zone counts the 27 leap seconds so far, as glibc does.
        if Path::new("/usr/share/zoneinfo/right/UTC").exists() {
            let n = ev("12:00 right/UTC").next_after(&base).expect("elapses");
            assert_eq!(n.timestamp().to_string(), "2024-06-01T12:00:27Z");
        }
    }

    #[test]
    fn garbage_and_extreme_base_times_neither_panic_nor_hang() {
        // A small deterministic generator over the grammar's alphabet (no
        // dependency on rand in the library's unit tests).
        let tokens = [
            "*",
            "*",
            "-",
            "-",
            "~",
            ":",
            ":",
            "..",
            ",",
            "/",
            " ",
            " ",
            "0",
            "1",
            "2",
            "5",
            "12",
            "29",
            "31",
            "59",
            "2024",
            "2199",
            "Mon",
            "fri",
            "daily",
            " UTC",
            "@1700000000",
            ".5",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let bases: Vec<Zoned> = [
            "1900-01-01T00:00:00+00:00[UTC]",
            "1970-01-01T00:00:00+00:00[UTC]",
            "2199-12-31T23:59:59+01:00[Europe/Berlin]",
            "2300-06-01T00:00:00-04:00[America/New_York]",
            "9999-12-30T00:00:00+00:00[UTC]",
        ]
        .iter()
        .map(|s| zoned(s))
        .collect();
        let mut parsed = 0;
        for _ in 0..8000 {
            let len = usize::try_from(next() % 12).unwrap_or(0) + 1;
            let s: String = (0..len)
                .map(|_| tokens[usize::try_from(next() % 28).unwrap_or(0)])
                .collect();
            let Ok(e) = s.parse::<CalendarEvent>() else {
                continue;
            };
            parsed += 1;
            assert_eq!(ev(&e.to_string()), e, "{s:?}");
            for b in &bases {
                if let Some(n) = e.next_after(b) {
                    assert!(n.timestamp() > b.timestamp(), "{s:?} after {b}: {n}");
                }
            }
        }
        assert!(parsed > 50, "only {parsed} generated strings parsed");
    }

    #[test]
    fn slots_between_lists_missed_slots_oldest_first() {
        let e = ev("*:0/15");
        let since = zoned("2024-01-01T10:00:00+00:00[UTC]");
        let until = zoned("2024-01-01T11:00:00+00:00[UTC]");
        let s = slots_between(&e, &since, &until, 100);
        let hm: Vec<_> = s.iter().map(|z| z.strftime("%H:%M").to_string()).collect();
        assert_eq!(hm, ["10:15", "10:30", "10:45", "11:00"]);
        assert_eq!(slots_between(&e, &since, &until, 2).len(), 2);
        assert!(slots_between(&e, &until, &since, 10).is_empty());
    }
}
