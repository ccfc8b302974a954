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
