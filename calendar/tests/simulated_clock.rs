//! A scheduler's view over simulated weeks that span both DST changes in
//! Europe/Berlin and America/New_York: a clock steps forward in uneven
//! ticks, each event fires every slot that came due since the last tick
//! (chaining `next_after` from the previous slot), and the fired slots
//! must be exactly `slots_between` over the whole span, strictly
//! increasing (none twice), each on a wall time the expression names,
//! equal to an independent minute-by-minute oracle (each named wall time
//! once, at its first occurrence), and with the per-day counts systemd
//! gives on the days of the changes.

use calendar::{slots_between, CalendarEvent};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Zoned};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Expression and a wall-clock predicate on (weekday 1=Mon, hour, minute,
/// second) that every slot must satisfy.
type Check = fn(i8, i8, i8, i8) -> bool;

const EVENTS: &[(&str, Check)] = &[
    ("*:0/15", |_, _, m, s| m % 15 == 0 && s == 0),
    ("*-*-* 02:30", |_, h, m, s| (h, m, s) == (2, 30, 0)),
    ("*-*-* 02,03:00", |_, h, m, s| {
        (h == 2 || h == 3) && (m, s) == (0, 0)
    }),
    ("hourly", |_, _, m, s| (m, s) == (0, 0)),
    ("daily", |_, h, m, s| (h, m, s) == (0, 0, 0)),
    ("mon..fri 22:00", |wd, h, m, s| {
        wd <= 5 && (h, m, s) == (22, 0, 0)
    }),
    ("Sun 01..03:0/20", |wd, h, m, s| {
        wd == 7 && (1..=3).contains(&h) && m % 20 == 0 && s == 0
    }),
];

fn start_of(zone: &TimeZone, y: i16, m: i8, d: i8) -> Zoned {
    Date::new(y, m, d)
        .expect("date")
        .to_zoned(zone.clone())
        .expect("midnight exists")
}

/// Runs the simulated scheduler from `start` to `end` for `event`.
fn simulate(event: &CalendarEvent, start: &Zoned, end: &Zoned, rng: &mut StdRng) -> Vec<Zoned> {
    let mut fired: Vec<Zoned> = Vec::new();
    let mut now = start.clone();
    let mut next = event.next_after(start);
    while now < *end {
        let tick = SignedDuration::from_secs(rng.random_range(1..=900));
        now = now.checked_add(tick).expect("clock step");
        if now > *end {
            now = end.clone();
        }
        while let Some(slot) = next.take() {
            if slot.timestamp() > now.timestamp() {
                next = Some(slot);
                break;
            }
            next = event.next_after(&slot);
            fired.push(slot);
        }
    }
    fired
}

/// Every whole minute in (start, end] whose wall time was not seen
/// before (the first pass of a repeated hour), in `start`'s zone.
fn first_occurrences(start: &Zoned, end: &Zoned) -> Vec<Zoned> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let (a, b) = (start.timestamp().as_second(), end.timestamp().as_second());
    let mut t = a - a.rem_euclid(60) + 60;
    while t <= b {
        let z = jiff::Timestamp::from_second(t)
            .expect("instant")
            .to_zoned(start.time_zone().clone());
        if seen.insert(z.datetime()) {
            out.push(z);
        }
        t += 60;
    }
    out
}

fn count_on(slots: &[Zoned], zone: &TimeZone, y: i16, m: i8, d: i8) -> usize {
    let day = Date::new(y, m, d).expect("date");
    slots
        .iter()
        .filter(|z| z.with_time_zone(zone.clone()).date() == day)
        .count()
}

/// (year, month, day)
type Day = (i16, i8, i8);

#[test]
fn every_slot_fires_exactly_once_across_both_dst_changes() {
    let mut rng = StdRng::seed_from_u64(0xd57_c10c);
    // (zone, spring span, fall span): each span holds that zone's change.
    let spans: [(&str, Day, Day, Day, Day); 2] = [
        (
            "Europe/Berlin",
            (2024, 3, 27),
            (2024, 4, 3),
            (2024, 10, 23),
            (2024, 10, 30),
        ),
        (
            "America/New_York",
            (2024, 3, 6),
            (2024, 3, 13),
            (2024, 10, 30),
            (2024, 11, 6),
        ),
    ];
    for (zone_name, s0, s1, f0, f1) in spans {
        let zone = TimeZone::get(zone_name).expect("tzdb");
        for (from, to) in [(s0, s1), (f0, f1)] {
            let start = start_of(&zone, from.0, from.1, from.2);
            let end = start_of(&zone, to.0, to.1, to.2);
            let minutes = first_occurrences(&start, &end);
            for (expr, check) in EVENTS {
                let event: CalendarEvent = expr.parse().expect("valid expression");
                let fired = simulate(&event, &start, &end, &mut rng);
                // Independent oracle: every wall time the expression names
                // fires once, at its first occurrence; wall times in a gap
                // do not exist (systemd moves them forward by the gap,
                // onto a time that either matches anyway or does not).
                let oracle: Vec<i64> = minutes
                    .iter()
                    .filter(|z| {
                        check(
                            z.weekday().to_monday_one_offset(),
                            z.hour(),
                            z.minute(),
                            z.second(),
                        )
                    })
                    .map(|z| z.timestamp().as_second())
                    .collect();
                let fired_secs: Vec<i64> =
                    fired.iter().map(|z| z.timestamp().as_second()).collect();
                assert_eq!(
                    fired_secs, oracle,
                    "{zone_name} {expr}: fired slots differ from the oracle"
                );
                let expected = slots_between(&event, &start, &end, 100_000);
                assert_eq!(
                    fired, expected,
                    "{zone_name} {expr}: the stepped clock fired other slots than slots_between"
                );
                assert!(!fired.is_empty(), "{zone_name} {expr}: nothing fired");
                for w in fired.windows(2) {
                    assert!(
                        w[0].timestamp() < w[1].timestamp(),
                        "{zone_name} {expr}: {} fired twice or out of order ({})",
                        w[1],
                        w[0]
                    );
                }
                for z in &fired {
                    assert_eq!(z.time_zone(), &zone, "{expr}: slot {z} in another zone");
                    let ok = check(
                        z.weekday().to_monday_one_offset(),
                        z.hour(),
                        z.minute(),
                        z.second(),
                    );
                    assert!(ok, "{zone_name} {expr}: slot {z} is not a time it names");
                    assert_eq!(z.subsec_nanosecond(), 0, "{expr}: {z}");
                }
                // A daemon that was down for the second half asks
                // slots_between at start: the missed ones, oldest first.
                let mid = start
                    .checked_add(SignedDuration::from_hours(84))
                    .expect("mid");
                let last_before = fired.iter().rfind(|z| **z <= mid).cloned();
                let missed = slots_between(&event, &mid, &end, 100_000);
                let after_mid: Vec<_> = fired.iter().filter(|z| **z > mid).cloned().collect();
                assert_eq!(missed, after_mid, "{zone_name} {expr}: missed slots");
                if let Some(last) = last_before {
                    assert_eq!(
                        slots_between(&event, &last, &end, 100_000),
                        after_mid,
                        "{zone_name} {expr}: resuming from the last fired slot"
                    );
                }
            }
        }
    }

    // The days of the changes, as systemd counts them.
    let berlin = TimeZone::get("Europe/Berlin").expect("tzdb");
    let ny = TimeZone::get("America/New_York").expect("tzdb");
    let month = |zone: &TimeZone, y, m, expr: &str| {
        let ev: CalendarEvent = expr.parse().expect("valid");
        let start = start_of(zone, y, m, 1);
        let end = start
            .checked_add(SignedDuration::from_hours(24 * 40))
            .expect("end");
        slots_between(&ev, &start, &end, 100_000)
    };
    // Spring forward: 02:00-02:59 does not exist; the quarter hours of the
    // gap are gone (23 hours of them), 02:30 does not fire that day, and
    // "02,03:00" fires once (02:00 moves to 03:00, which then is the
    // same slot).
    let q = month(&berlin, 2024, 3, "*:0/15");
    assert_eq!(count_on(&q, &berlin, 2024, 3, 31), 23 * 4);
    assert_eq!(count_on(&q, &berlin, 2024, 3, 30), 24 * 4);
    let q = month(&ny, 2024, 3, "*:0/15");
    assert_eq!(count_on(&q, &ny, 2024, 3, 10), 23 * 4);
    assert_eq!(
        count_on(
            &month(&berlin, 2024, 3, "*-*-* 02:30"),
            &berlin,
            2024,
            3,
            31
        ),
        0
    );
    assert_eq!(
        count_on(
            &month(&berlin, 2024, 3, "*-*-* 02,03:00"),
            &berlin,
            2024,
            3,
            31
        ),
        1
    );
    // Fall back: 02:00-02:59 happens twice; each wall time fires once
    // (in the first pass), so the day still has 24 * 4 quarter hours and
    // 02:30 fires once.
    let q = month(&berlin, 2024, 10, "*:0/15");
    assert_eq!(count_on(&q, &berlin, 2024, 10, 27), 24 * 4);
    let q = month(&ny, 2024, 11, "*:0/15");
    assert_eq!(count_on(&q, &ny, 2024, 11, 3), 24 * 4);
    let h = month(&berlin, 2024, 10, "*-*-* 02:30");
    assert_eq!(count_on(&h, &berlin, 2024, 10, 27), 1);
    let first = h
        .iter()
        .find(|z| z.date() == Date::new(2024, 10, 27).expect("date"))
        .expect("02:30 on the change day");
    assert_eq!(
        first.offset().seconds(),
        7200,
        "fires in the first pass (CEST)"
    );
}
