//! Differential test against systemd itself: hundreds of generated
//! expressions (seeded random over the systemd.time(7) grammar, plus a
//! fixed list of tricky ones) and base times around DST changes in several
//! zones go through `systemd-analyze calendar --iterations=N
//! --base-time=@T` and through this crate; acceptance, the normalized form
//! and the next N elapses (to the second, which is what systemd-analyze
//! prints) must agree.
//!
//! A missing `systemd-analyze` is a failure (a differential test that does
//! not run proves nothing), unless `SHEAR_ALLOW_SKIP=1` outside CI
//! (`CI=true`), as everywhere else in shear's tests; `scripts/setup`
//! installs the `systemd` package that provides it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use calendar::CalendarEvent;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ITERATIONS: usize = 6;
/// UTC, the two DST zones the daemon's users are most likely in, a
/// half-hour DST shift (Lord Howe) and a "negative DST" zone (Dublin's
/// winter time is its DST in the tzdb).
const ZONES: [&str; 5] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Europe/Dublin",
];

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `systemd-analyze`, or `None` when skipping is allowed (else panics).
fn systemd_analyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from));
    if let Some(p) = dirs
        .into_iter()
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let allowed = !in_ci() && std::env::var("SHEAR_ALLOW_SKIP").is_ok_and(|v| v == "1");
    assert!(
        allowed,
        "prerequisite missing: systemd-analyze (run scripts/setup); a missing prerequisite is a \
         failure (set SHEAR_ALLOW_SKIP=1 to skip instead)"
    );
    eprintln!("SKIP: calendar differential test: prerequisite missing: systemd-analyze");
    if let Some(log) = std::env::var_os("SHEAR_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "calendar differential: systemd-analyze");
        }
    }
    None
}

/// What systemd said about one expression.
#[derive(Debug, PartialEq)]
enum Outcome {
    Refused,
    /// "Failed to determine next elapse" (the iteration limit): systemd
    /// then prints nothing else for the expression.
    GaveUp,
    Elapses(Verdict),
}

#[derive(Debug, PartialEq)]
struct Verdict {
    normalized: String,
    /// Elapses in seconds since the epoch.
    elapses: Vec<i64>,
}

fn parse_utc_line(s: &str) -> i64 {
    // "Wed 2024-03-27 09:00:20 UTC"
    let mut it = s.split_whitespace();
    let (_wd, date, time) = (it.next(), it.next(), it.next());
    let (Some(date), Some(time)) = (date, time) else {
        panic!("unexpected systemd-analyze timestamp {s:?}");
    };
    assert_eq!(it.next(), Some("UTC"), "not a UTC timestamp: {s:?}");
    let ts: Timestamp = format!("{date}T{time}Z")
        .parse()
        .unwrap_or_else(|e| panic!("systemd-analyze timestamp {s:?}: {e}"));
    ts.as_second()
}

fn spawn_systemd(tool: &PathBuf, tz: &str, base: i64, exprs: &[String]) -> Child {
    Command::new(tool)
        .env("TZ", tz)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .arg("calendar")
        .arg(format!("--iterations={ITERATIONS}"))
        .arg(format!("--base-time=@{base}"))
        .arg("--")
        .args(exprs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-analyze")
}

/// Waits for one batch; the verdict per expression (`None`: refused).
fn systemd_verdicts(child: Child, exprs: &[String]) -> Vec<Outcome> {
    let out = child.wait_with_output().expect("wait for systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One block per accepted expression, separated by blank lines:
    // "Original form:" (only when it differs), "Normalized form:",
    // "Next elapse:", per elapse an optional "(in UTC):" (absent when the
    // local zone is UTC) and "From now:", then "Iter. #k:" ...
    let mut blocks = Vec::new();
    for block in stdout.split("\n\n") {
        let mut v = Verdict {
            normalized: String::new(),
            elapses: Vec::new(),
        };
        let mut pending: Option<String> = None;
        let mut any = false;
        for line in block.lines() {
            let Some((key, val)) = line.trim().split_once(": ") else {
                continue;
            };
            any = true;
            match key {
                "Normalized form" => v.normalized = val.to_string(),
                k if k == "Next elapse" || k.starts_with("Iter. #") => {
                    if let Some(p) = pending.take() {
                        v.elapses.push(parse_utc_line(&p));
                    }
                    if val != "never" {
                        pending = Some(val.to_string());
                    }
                }
                "(in UTC)" => {
                    pending = None;
                    v.elapses.push(parse_utc_line(val));
                }
                _ => {}
            }
        }
        if let Some(p) = pending.take() {
            v.elapses.push(parse_utc_line(&p));
        }
        if any {
            blocks.push(v);
        }
    }
    let mut failed = stderr
        .lines()
        .filter_map(|l| {
            let (gave_up, rest) =
                if let Some(r) = l.strip_prefix("Failed to parse calendar specification '") {
                    (false, r)
                } else {
                    (
                        true,
                        l.strip_prefix("Failed to determine next elapse for '")?,
                    )
                };
            Some((gave_up, rest[..rest.rfind("': ")?].to_string()))
        })
        .peekable();
    let mut blocks = blocks.into_iter();
    let verdicts: Vec<Outcome> = exprs
        .iter()
        .map(|e| match failed.peek() {
            Some((gave_up, f)) if f == e => {
                let gave_up = *gave_up;
                failed.next();
                if gave_up {
                    Outcome::GaveUp
                } else {
                    Outcome::Refused
                }
            }
            _ => Outcome::Elapses(blocks.next().unwrap_or_else(|| {
                panic!("no systemd-analyze output for {e:?}; stderr: {stderr}")
            })),
        })
        .collect();
    assert!(
        blocks.next().is_none() && failed.next().is_none(),
        "systemd-analyze output does not line up with the expressions; stderr: {stderr}"
    );
    verdicts
}

fn ours(expr: &str, tz: &TimeZone, base: i64) -> Outcome {
    let Ok(ev) = CalendarEvent::parse_with_local(expr, tz) else {
        return Outcome::Refused;
    };
    // The normalized form is itself an expression for the same event.
    let again = CalendarEvent::parse_with_local(&ev.to_string(), tz)
        .unwrap_or_else(|e| panic!("{expr:?}: normalized form does not parse: {e}"));
    assert_eq!(again, ev, "{expr:?}: normalized form is another event");
    let mut cur = Zoned::new(Timestamp::from_second(base).expect("base time"), tz.clone());
    let mut elapses = Vec::new();
    for _ in 0..ITERATIONS {
        let Ok(next) = ev.try_next_after(&cur) else {
            return Outcome::GaveUp;
        };
        let Some(next) = next else {
            break;
        };
        assert!(
            next.timestamp() > cur.timestamp(),
            "{expr}: {next} is not after {cur}"
        );
        elapses.push(next.timestamp().as_second());
        cur = next;
    }
    Outcome::Elapses(Verdict {
        normalized: ev.to_string(),
        elapses,
    })
}

/// Whether our outcome is systemd's. systemd can answer with an instant
/// that is not after its base (the first occurrence of a repeated time on
/// a fall-back night, while the base is in the second); this crate skips
/// such answers along systemd's own chain (see `try_next_after`), so
/// systemd's elapses are compared after dropping those that go back.
/// (Elapses are whole seconds here; a real step back is >= 30 minutes.)
fn agrees(theirs: &Outcome, ours: &Outcome, base: i64) -> bool {
    let (Outcome::Elapses(t), Outcome::Elapses(o)) = (theirs, ours) else {
        return theirs == ours;
    };
    let mut last = base;
    let forward: Vec<i64> = t
        .elapses
        .iter()
        .copied()
        .filter(|&s| {
            let keep = s >= last;
            if keep {
                last = s;
            }
            keep
        })
        .collect();
    let same_elapses = if t.elapses.len() < ITERATIONS {
        // systemd reached "never": so must we, at the same point.
        o.elapses == forward
    } else {
        o.elapses.len() == ITERATIONS && o.elapses[..forward.len()] == forward[..]
    };
    t.normalized == o.normalized && same_elapses
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn random_case(rng: &mut StdRng, s: &str) -> String {
    match rng.random_range(0..4) {
        0 => s.to_ascii_uppercase(),
        1 => s.to_ascii_lowercase(),
        _ => s.to_string(),
    }
}

fn num(rng: &mut StdRng, v: i64) -> String {
    if v < 10 && rng.random_bool(0.3) {
        format!("0{v}")
    } else {
        v.to_string()
    }
}

/// One comma list for a field with values in `lo..=hi` (occasionally
/// outside, to exercise refusals).
fn chain(rng: &mut StdRng, lo: i64, hi: i64, star: f64) -> String {
    if rng.random_bool(star) {
        return "*".into();
    }
    let n = rng.random_range(1..=3);
    let mut parts = Vec::new();
    for _ in 0..n {
        let v = |rng: &mut StdRng| {
            if rng.random_bool(0.02) {
                hi + 1
            } else {
                rng.random_range(lo..=hi)
            }
        };
        let a = v(rng);
        let part = match rng.random_range(0..6) {
            0 | 1 => num(rng, a),
            2 => {
                let b = v(rng);
                format!("{}..{}", num(rng, a.min(b)), num(rng, a.max(b)))
            }
            3 => format!(
                "{}/{}",
                num(rng, a),
                rng.random_range(1..=(hi - lo).max(1) / 2 + 1)
            ),
            4 => {
                let b = v(rng);
                format!(
                    "{}..{}/{}",
                    num(rng, a.min(b)),
                    num(rng, a.max(b)),
                    rng.random_range(1..=4)
                )
            }
            _ => {
                // A backwards range now and then.
                let b = v(rng);
                format!("{}..{}", num(rng, a.max(b)), num(rng, a.min(b)))
            }
        };
        parts.push(part);
    }
    parts.join(",")
}

fn seconds(rng: &mut StdRng) -> String {
    let base = chain(rng, 0, 59, 0.3);
    if base == "*" || !rng.random_bool(0.3) {
        return base;
    }
    let frac = pick(rng, &["5", "25", "123456", "1234567", "0000005", "75"]);
    if base.contains(['.', '/', ',']) {
        format!("{}.{frac}", rng.random_range(0..59))
    } else {
        format!("{base}.{frac}")
    }
}

fn weekdays(rng: &mut StdRng) -> String {
    const LONG: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let name = |rng: &mut StdRng, i: usize| {
        let n = if rng.random_bool(0.3) {
            LONG[i].to_string()
        } else {
            LONG[i][..3].to_string()
        };
        random_case(rng, &n)
    };
    let n = rng.random_range(1..=3);
    let mut parts = Vec::new();
    for _ in 0..n {
        let a = rng.random_range(0..7);
        match rng.random_range(0..4) {
            0 | 1 => parts.push(name(rng, a)),
            2 => {
                let b = rng.random_range(0..7);
                let (a, b) = if rng.random_bool(0.9) {
                    (a.min(b), a.max(b))
                } else {
                    (a, b)
                };
                parts.push(format!("{}..{}", name(rng, a), name(rng, b)));
            }
            _ => {
                let b = rng.random_range(a..7);
                parts.push(format!("{}-{}", name(rng, a), name(rng, b)));
            }
        }
    }
    parts.join(",")
}

fn expression(rng: &mut StdRng) -> String {
    let zone = match rng.random_range(0..20) {
        0 | 1 => " UTC".to_string(),
        2 => " utc".to_string(),
        3 => format!(
            " {}",
            pick(
                rng,
                &[
                    "Europe/Berlin",
                    "America/New_York",
                    "Australia/Lord_Howe",
                    "Asia/Kolkata",
                    "Pacific/Chatham"
                ]
            )
        ),
        _ => String::new(),
    };
    if rng.random_bool(0.08) {
        let k = pick(
            rng,
            &[
                "minutely",
                "hourly",
                "daily",
                "weekly",
                "monthly",
                "yearly",
                "annually",
                "quarterly",
                "semiannually",
                "semi-annually",
                "biannually",
            ],
        );
        return format!("{}{zone}", random_case(rng, k));
    }
    let mut parts = Vec::new();
    if rng.random_bool(0.35) {
        parts.push(weekdays(rng));
    }
    if rng.random_bool(0.6) {
        let sep = if rng.random_bool(0.15) { "~" } else { "-" };
        let (m, d) = (chain(rng, 1, 12, 0.5), chain(rng, 1, 31, 0.4));
        if rng.random_bool(0.6) {
            let y = if rng.random_bool(0.2) {
                chain(rng, 24, 40, 0.0)
            } else {
                chain(rng, 2024, 2040, 0.7)
            };
            parts.push(format!("{y}-{m}{sep}{d}"));
        } else {
            parts.push(format!("{m}{sep}{d}"));
        }
    }
    if rng.random_bool(0.85) {
        let h = chain(rng, 0, 23, 0.3);
        let m = chain(rng, 0, 59, 0.3);
        if rng.random_bool(0.4) {
            parts.push(format!("{h}:{m}:{}", seconds(rng)));
        } else {
            parts.push(format!("{h}:{m}"));
        }
    }
    if parts.is_empty() {
        parts.push("*-*-*".into());
    }
    format!("{}{zone}", parts.join(" "))
}

const TRICKY: &[&str] = &[
    "*-*-* 02:00",
    "*-*-* 02:30",
    "*-*-* 03:00",
    "*-*-* 01:59:59",
    "*-*-* 02:15",
    "*:0/15",
    "*:30",
    "*:*:0/20.5",
    "*-*-* 01,02,03:30",
    "*-*-* 2:00..59/10",
    "Sun *-*-* 02:30",
    "Sun *-*-* 1..3:*:0/30",
    "*-03,10~01..07 02:30",
    "*-*-* 02:30 Europe/Berlin",
    "*-*-* 02:15 Australia/Lord_Howe",
    "*-*-* 01:45 America/New_York",
    "daily",
    "hourly",
    "weekly",
    "monthly",
    "quarterly",
    "semiannually",
    "yearly",
    "minutely",
    "mon..fri 22:00",
    "Mon-Fri 02:30",
    "Sat,Sun 10:00",
    "*-02-29",
    "*-02-30",
    "*-*-31",
    "*-*~1",
    "*~07/2",
    "*-2~1..3",
    "*-*~03..1",
    "Mon *-*-1..7 4:00",
    "Fri *-*-13",
    "2024-*-* 00:00",
    "2199-12-31 23:59:59",
    "2030..2035/2-01-01",
    "*-*-* 23:59:59.999999",
    "*-*-* *:*:59.5",
    "*:*:*",
    "*:*",
    "12:00:00.1234567",
    "@1735689600",
    "@0",
    "00:00:00 UTC",
    "Mon *-05~07/1",
    "*-*-01..05,20..25/2 09..17/4:05,35",
    "Mon..Wed,Sat 7,19:00",
    "Wednesday..Monday",
    "Mon..",
    "Mon,",
    "*-*-* 24:00",
    "*-*-* 1:60",
    "*:0/0",
    "1..2..3",
    "*-*-*",
    "06-15",
    "70-01-01",
    "69-12-31",
    "*:0/15 CET",
    "*:0/15 CEST",
    "*-*-* 02:30 cest",
    "*:0/30 EST",
    "*-*-* 01:30 EDT",
    "daily GMT",
    "*-*-* 01:30 IST",
    "*:0/30 +11",
    "*-*-* 02:15 +1030",
    "12:00 UTC UTC",
    "*-*-* 02:30 Europe/Nowhere",
    "*-*-* 02:30 europe/berlin",
    "*:*/5",
    "Mon,,Tue",
    "Mon ,Tue",
    "Mon, 12:00",
    "Mon..Tue,Thu..Sat",
    "Mon-Tue-Wed",
    "daily  ",
    "  daily",
    "daily Etc/GMT-14",
    "hourly UTC",
    "weekly Europe/Dublin",
    "12:00 EST5EDT",
    "12:00 right/Europe/Berlin",
    "*:0/20 right/UTC",
    "12:00 Europe/../Europe/Berlin",
    "12:00 /usr/share/zoneinfo/UTC",
    "*-*-* 12:00:00 Asia/Kathmandu",
    "*-*-* 00:00 Pacific/Chatham",
    "2024-02-29 12:00",
    "2023-02-29",
    "*-*-29..31",
    "*-1/2-1",
    "*-*-1/10",
    "*-*~1/7",
    "*-*~3..1",
    "*-*-* *:*:1..3",
    "*-*-* *:*:1.5..3",
    "*-*-* *:*:0.5..1",
    "*:*:0/0.5",
    "*:*:0/0.000001",
    "*:*:59.9999995",
    "*:*:1.",
    "*:*:.5",
    "*:*:5.123456789",
    "0..23/5:0..59/7:0..59/13",
    "00,00,00:00",
    "23:59:59 UTC",
    "@1735689600 UTC",
    "@99999999999",
    "annually",
    "anually",
    "bi-annually",
    "SEMI-ANNUALLY",
    "Weekly",
    "weekly Mon",
    "2199-01-01",
    "2200-01-01",
    "1969-12-31",
    "1970-01-01 UTC",
    "*-*-0",
    "*-13-01",
    "*-*-* 1:2:3:4",
    "*-*-*-*",
    "Sun..Sat",
    "*~2..07,9..25/1 *:12..48,24:*",
    "*:*:*",
    "Sat..Sun 03:00",
];

/// Base times: a random instant in 2024..2030 and instants around each
/// DST change of `tz` in 2024 and 2025.
fn base_times(rng: &mut StdRng, tz: &TimeZone) -> Vec<i64> {
    let start = Timestamp::from_second(1_704_067_200).expect("2024"); // 2024-01-01
    let end = 1_767_225_600; // 2026-01-01
    let mut v = vec![rng.random_range(1_704_067_200..1_893_456_000)];
    let mut prev_offset = tz.to_offset(start);
    for tr in tz.following(start) {
        let t = tr.timestamp().as_second();
        if t >= end {
            break;
        }
        // Right at every change, and for a fall back (where systemd can
        // answer with the first occurrence of a repeated time) also a
        // while before it, so the elapses walk across the change.
        v.push(t);
        if tr.offset() < prev_offset {
            v.push(t + [-7200, -3600, -1][rng.random_range(0..3)]);
        }
        prev_offset = tr.offset();
    }
    v
}

#[test]
fn systemd_analyze_agrees_on_generated_and_tricky_expressions() {
    let Some(tool) = systemd_analyze() else {
        return;
    };
    let started = std::time::Instant::now();
    // CALENDAR_DIFF_SEED explores other samples (the default is fixed so a
    // failure reproduces).
    let seed = std::env::var("CALENDAR_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ca1e);
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut generated: Vec<String> = TRICKY.iter().map(|s| s.to_string()).collect();
    let mut seen: std::collections::HashSet<String> = generated.iter().cloned().collect();
    while generated.len() < TRICKY.len() + 400 {
        let e = expression(&mut rng);
        if seen.insert(e.clone()) {
            generated.push(e);
        }
    }
    // All batches run at once (systemd-analyze mostly waits on its
    // forks for zone-specific expressions), ours meanwhile.
    let mut runs = Vec::new();
    for zone in ZONES {
        let tz = TimeZone::get(zone).expect("system tzdb has the zone");
        for base in base_times(&mut rng, &tz) {
            // Each base time gets a different slice of the generated
            // expressions (plus all tricky ones), to keep the run short.
            let mut batch: Vec<String> = TRICKY.iter().map(|s| s.to_string()).collect();
            for _ in 0..80 {
                let e = &generated[rng.random_range(TRICKY.len()..generated.len())];
                if !batch.contains(e) {
                    batch.push(e.clone());
                }
            }
            let child = spawn_systemd(&tool, zone, base, &batch);
            runs.push((zone, tz.clone(), base, batch, child));
        }
    }
    let mut compared = 0usize;
    let mut went_back = 0usize;
    let mut accepted = 0usize;
    let mut mismatches: Vec<String> = Vec::new();
    let mut covered = std::collections::HashSet::new();
    for (zone, tz, base, batch, child) in runs {
        let mine: Vec<_> = batch.iter().map(|e| ours(e, &tz, base)).collect();
        let theirs = systemd_verdicts(child, &batch);
        for ((expr, t), o) in batch.iter().zip(theirs).zip(mine) {
            compared += 1;
            covered.insert(expr.clone());
            accepted += usize::from(t != Outcome::Refused);
            if let Outcome::Elapses(v) = &t {
                went_back += usize::from(
                    v.elapses.iter().any(|&s| s < base)
                        || v.elapses.windows(2).any(|w| w[1] < w[0]),
                );
            }
            if !agrees(&t, &o, base) {
                mismatches.push(format!(
                    "TZ={zone} base=@{base} {expr:?}:\n  systemd: {t:?}\n  ours:    {o:?}"
                ));
            }
        }
    }
    let took = started.elapsed();
    eprintln!(
        "compared {compared} (expression, zone, base time) cases over {} distinct expressions, \
         {accepted} accepted by systemd ({went_back} with an elapse going back in time), \
         {} mismatches, in {took:?}",
        covered.len(),
        mismatches.len()
    );
    assert!(
        took < Duration::from_secs(120),
        "differential test too slow: {took:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} disagreements with systemd-analyze, first ones:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        accepted > compared / 3,
        "too few valid expressions generated"
    );
    assert!(covered.len() > 300, "too few distinct expressions compared");
}
