//! Which job runs when: a pure state machine driven by a clock, so a week
//! of simulated time (DST changes included) can be tested in milliseconds.
//!
//! Each enabled job has its next slot (`next_after(now)`). [`Scheduler::due`]
//! returns the jobs whose slot has come and moves each past `now`: a slot
//! fires at most once, and slots that passed while the daemon was busy or
//! the machine slept are coalesced into one run (like systemd timers). At
//! start, a job with `repeat_missed` whose recorded last slot is followed
//! by a slot before now runs once.

use std::collections::BTreeMap;

use jiff::Zoned;

use super::config::Job;
use super::schedule::Schedule;

/// Why a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its slot came.
    Schedule,
    /// A slot was missed while the daemon was down.
    Missed,
    /// Someone asked (API).
    Api,
}

impl Trigger {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Missed => "missed",
            Trigger::Api => "api",
        }
    }
}

/// A run to start.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    /// Job id.
    pub job: String,
    /// The slot (for `Missed`: the first missed one).
    pub slot: Zoned,
    /// Why.
    pub trigger: Trigger,
}

#[derive(Debug, Clone)]
struct Entry {
    schedule: Schedule,
    next: Option<Zoned>,
}

/// The schedule state of every enabled job.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    jobs: BTreeMap<String, Entry>,
}

impl Scheduler {
    /// Plan `jobs` from `now`. `last_slot(id)` is the job's recorded last
    /// slot; returns the missed runs to start at once.
    pub fn start(
        jobs: &[Job],
        now: &Zoned,
        last_slot: impl Fn(&str) -> Option<Zoned>,
    ) -> (Scheduler, Vec<Due>) {
        let mut s = Scheduler::default();
        let mut missed = Vec::new();
        for j in jobs.iter().filter(|j| j.enabled) {
            if j.repeat_missed {
                if let Some(last) = last_slot(&j.id) {
                    if let Some(first) = j.schedule.next_after(&last) {
                        if first <= *now {
                            missed.push(Due {
                                job: j.id.clone(),
                                slot: first,
                                trigger: Trigger::Missed,
                            });
                        }
                    }
                }
            }
            s.jobs.insert(
                j.id.clone(),
                Entry {
                    schedule: j.schedule.clone(),
                    next: j.schedule.next_after(now),
                },
            );
        }
        (s, missed)
    }

    /// After a reload: jobs whose schedule did not change keep their next
    /// slot; new or changed ones are planned from `now`; removed ones go.
    pub fn reload(&mut self, jobs: &[Job], now: &Zoned) {
        let mut new = BTreeMap::new();
        for j in jobs.iter().filter(|j| j.enabled) {
            let next = match self.jobs.get(&j.id) {
                Some(e) if e.schedule == j.schedule => e.next.clone(),
                _ => j.schedule.next_after(now),
            };
            new.insert(
                j.id.clone(),
                Entry {
                    schedule: j.schedule.clone(),
                    next,
                },
            );
        }
        self.jobs = new;
    }

    /// Jobs whose slot is at or before `now`, each once; their next slot
    /// moves past `now`.
    pub fn due(&mut self, now: &Zoned) -> Vec<Due> {
        let mut out = Vec::new();
        for (id, e) in &mut self.jobs {
            let Some(next) = e.next.clone() else { continue };
            if next <= *now {
                e.next = e.schedule.next_after(now);
                out.push(Due {
                    job: id.clone(),
                    slot: next,
                    trigger: Trigger::Schedule,
                });
            }
        }
        out
    }

    /// The next slot of a job.
    pub fn next_of(&self, id: &str) -> Option<&Zoned> {
        self.jobs.get(id).and_then(|e| e.next.as_ref())
    }

    /// The earliest next slot of any job.
    pub fn earliest(&self) -> Option<&Zoned> {
        self.jobs.values().filter_map(|e| e.next.as_ref()).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::{Job, JobKind};

    fn job(id: &str, schedule: &str, repeat_missed: bool) -> Job {
        Job {
            id: id.into(),
            kind: JobKind::Gc,
            schedule: schedule.parse().unwrap(),
            repo: "/r".into(),
            notify: Vec::new(),
            repeat_missed,
            enabled: true,
            backup: None,
            outdated_after: None,
            sync: None,
        }
    }

    /// A week of simulated time in Europe/Berlin across the autumn DST
    /// change (25 Oct 2026, 03:00 CEST → 02:00 CET: 02:xx happens twice),
    /// and a second week across the spring one (29 Mar 2026, 02:xx does
    /// not exist), with a test clock advancing in uneven steps shorter
    /// than every job's period: every slot fires exactly once, in order,
    /// none twice, none missed.
    #[test]
    fn simulated_week_every_slot_once_across_dst() {
        let jobs = vec![
            job("quarter", "*:0/15", false),
            job("night", "*-*-* 02:30", false),
            job("hourly", "hourly", false),
            job("weekdays", "mon..fri 22:00", false),
            job("monthly-last", "*-*~01 03:00", false),
        ];
        for start in [
            "2026-10-21T12:07:00+02:00[Europe/Berlin]",
            "2026-03-25T12:07:00+01:00[Europe/Berlin]",
        ] {
            let t0: Zoned = start.parse().unwrap();
            let end = t0.checked_add(jiff::Span::new().days(7)).unwrap();
            let (mut s, missed) = Scheduler::start(&jobs, &t0, |_| None);
            assert!(missed.is_empty());
            let mut fired: BTreeMap<String, Vec<jiff::Timestamp>> = BTreeMap::new();
            let mut now = t0.clone();
            let mut step = 0i64;
            while now < end {
                // 17 s .. 14 min 17 s, varying: never a whole period.
                step = (step * 7 + 13) % 857;
                now = now
                    .checked_add(jiff::SignedDuration::from_secs(17 + step))
                    .unwrap();
                for d in s.due(&now) {
                    assert!(d.slot <= now, "fired early: {d:?}");
                    fired.entry(d.job).or_default().push(d.slot.timestamp());
                }
            }
            for j in &jobs {
                let want: Vec<jiff::Timestamp> =
                    calendar::slots_between(j.schedule.event(), &t0, &now, 10_000)
                        .into_iter()
                        .map(|z| z.timestamp())
                        .collect();
                let got = fired.remove(&j.id).unwrap_or_default();
                assert!(
                    !want.is_empty() || j.id == "monthly-last",
                    "{}: no slot",
                    j.id
                );
                assert_eq!(got, want, "job {} from {start}", j.id);
                let mut dedup = got.clone();
                dedup.dedup();
                assert_eq!(dedup.len(), got.len(), "a slot fired twice");
            }
            // 7 days of quarter hours, plus or minus the DST hour.
            let q = calendar::slots_between(jobs[0].schedule.event(), &t0, &end, 10_000);
            assert!((7 * 96 - 4..=7 * 96 + 4).contains(&q.len()), "{}", q.len());
        }
    }

    #[test]
    fn missed_slot_runs_once_at_start_and_reload_keeps_plans() {
        let jobs = vec![job("a", "*:0/15", true), job("b", "*:0/15", false)];
        let now: Zoned = "2026-05-01T12:00:30+02:00[Europe/Berlin]".parse().unwrap();
        let last: Zoned = "2026-05-01T10:00:00+02:00[Europe/Berlin]".parse().unwrap();
        let (mut s, missed) = Scheduler::start(&jobs, &now, |_| Some(last.clone()));
        // Only the repeat_missed job, once, for the first missed slot.
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].job, "a");
        assert_eq!(missed[0].trigger, Trigger::Missed);
        assert_eq!(
            missed[0].slot.to_string(),
            "2026-05-01T10:15:00+02:00[Europe/Berlin]"
        );
        // Not missed when the last slot is the latest.
        let recent: Zoned = "2026-05-01T12:00:00+02:00[Europe/Berlin]".parse().unwrap();
        let (_, none) = Scheduler::start(&jobs, &now, |_| Some(recent.clone()));
        assert!(none.is_empty());
        let next = s.next_of("a").cloned().unwrap();
        let changed = vec![job("a", "*:0/15", true), job("c", "hourly", false)];
        s.reload(&changed, &now);
        assert_eq!(s.next_of("a"), Some(&next));
        assert!(s.next_of("b").is_none());
        assert_eq!(
            s.next_of("c").unwrap().to_string(),
            "2026-05-01T13:00:00+02:00[Europe/Berlin]"
        );
    }
}
