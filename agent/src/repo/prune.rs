//! Prune: retention by keep-last/hourly/daily/weekly/monthly/yearly with
//! Proxmox Backup Server's semantics (docs/maintenance.rst, prune simulator):
//!
//! - rules run in that order over the backups, newest first;
//! - a rule keeps the newest backup of each period (hour, day, ISO week,
//!   month, year) until it has kept N periods;
//! - a period that an earlier rule already covered is skipped (the backup
//!   kept by one rule is not counted by the next; the next only reaches
//!   further back);
//! - protected backups are never removed and never count for a rule.
//!
//! Periods are computed in UTC (PBS uses the server's local time zone; UTC
//! makes the result the same on every host and free of DST changes).
//! Only committed backups take part; incomplete directories are GC's job.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::backend::{LockMode, LockWait};
use super::error::{ErrorKind, RepoError, Result};
use super::names::{BackupId, VmId};
use super::Repository;

/// Keep counts; `None` = rule not used. Also the daemon's
/// `keep = { last = 3, daily = 7 }` (unknown keys refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepOptions {
    /// Keep the last N backups.
    pub last: Option<usize>,
    /// Newest backup of each of the last N hours.
    pub hourly: Option<usize>,
    /// … days.
    pub daily: Option<usize>,
    /// … ISO weeks.
    pub weekly: Option<usize>,
    /// … months.
    pub monthly: Option<usize>,
    /// … years.
    pub yearly: Option<usize>,
}

impl KeepOptions {
    /// Whether some rule keeps at least one backup.
    pub fn keeps_something(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .any(|k| k.is_some_and(|n| n > 0))
    }
}

/// Decision for one backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneMark {
    /// Kept by a rule.
    Keep,
    /// Kept because it is protected.
    Protected,
    /// To be removed.
    Remove,
}

/// The selection, pure: `list` is (time, protected) per backup in any order;
/// returns a mark per input position.
pub fn compute_prune(list: &[(OffsetDateTime, bool)], keep: &KeepOptions) -> Vec<PruneMark> {
    let mut order: Vec<usize> = (0..list.len()).collect();
    order.sort_by(|a, b| list[*b].0.cmp(&list[*a].0)); // newest first
    let mut mark: HashMap<usize, PruneMark> = HashMap::new();
    type Period = fn(OffsetDateTime) -> String;
    let rules: [(Option<usize>, Period); 6] = [
        (keep.last, |t| t.unix_timestamp().to_string()),
        (keep.hourly, |t| {
            format!(
                "{}/{}/{}/{}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour()
            )
        }),
        (keep.daily, |t| {
            format!("{}/{}/{}", t.year(), u8::from(t.month()), t.day())
        }),
        (keep.weekly, |t| {
            let (y, w, _) = t.to_iso_week_date();
            format!("{y}/{w}")
        }),
        (keep.monthly, |t| {
            format!("{}/{}", t.year(), u8::from(t.month()))
        }),
        (keep.yearly, |t| t.year().to_string()),
    ];
    for (n, period) in rules {
        let Some(n) = n else { continue };
        // Periods already covered by backups an earlier rule kept.
        let covered: HashSet<String> = order
            .iter()
            .filter(|i| mark.get(i) == Some(&PruneMark::Keep))
            .map(|i| period(list[*i].0))
            .collect();
        let mut kept: HashSet<String> = HashSet::new();
        for &i in &order {
            if mark.contains_key(&i) {
                continue;
            }
            if list[i].1 {
                mark.insert(i, PruneMark::Protected);
                continue;
            }
            let p = period(list[i].0);
            if covered.contains(&p) {
                continue;
            }
            if kept.contains(&p) {
                mark.insert(i, PruneMark::Remove);
            } else {
                if kept.len() >= n {
                    break;
                }
                kept.insert(p);
                mark.insert(i, PruneMark::Keep);
            }
        }
    }
    (0..list.len())
        .map(|i| match mark.get(&i) {
            Some(m) => *m,
            None if list[i].1 => PruneMark::Protected,
            None => PruneMark::Remove,
        })
        .collect()
}

/// One line of a prune report.
#[derive(Debug, Clone, Serialize)]
pub struct PruneEntry {
    /// Backup.
    pub backup: BackupId,
    /// Decision.
    pub mark: PruneMark,
    /// True when it was removed (false on a dry run or when skipped).
    pub removed: bool,
    /// Why a backup marked for removal was not removed.
    pub skipped: Option<String>,
}

impl Repository {
    /// Applies `keep` to the committed backups of `vmid`, newest first in
    /// the result. Refuses options that keep nothing. With `dry_run`
    /// nothing is removed. Backups in use (a restore, or the base of a
    /// running incremental) are skipped, never waited for (F-39).
    pub fn prune(&self, vmid: &VmId, keep: &KeepOptions, dry_run: bool) -> Result<Vec<PruneEntry>> {
        if !keep.keeps_something() {
            return Err(RepoError::invalid(
                "keep options",
                "they would keep nothing; give at least one --keep-* > 0",
            ));
        }
        let _repo_lock = self.lock_repo(LockMode::Shared, LockWait::Forever)?;
        let dirs: Vec<_> = self
            .snapshot_dirs_checked(Some(vmid))?
            .into_iter()
            .filter(|s| s.complete)
            .collect();
        let list: Vec<(OffsetDateTime, bool)> =
            dirs.iter().map(|s| (s.id.time(), s.protected)).collect();
        let marks = compute_prune(&list, keep);
        if !dry_run && marks.contains(&PruneMark::Remove) {
            self.require_admin("prune")?;
        }
        let mut out = Vec::new();
        for (s, mark) in dirs.into_iter().zip(marks).rev() {
            let mut e = PruneEntry {
                backup: s.id,
                mark,
                removed: false,
                skipped: None,
            };
            if mark == PruneMark::Remove && !dry_run {
                match self.lock_snapshot(&e.backup, LockMode::Exclusive, LockWait::NoWait) {
                    Ok(lock) => {
                        // Re-check under the lock: it may have been protected since.
                        let pkey = format!("{}/{}", e.backup.dir_key(), super::PROTECTED_NAME);
                        if self.inner.backend.size(&pkey)?.is_some() {
                            e.mark = PruneMark::Protected;
                        } else if let Some(until) = self.locked_until(&e.backup)? {
                            // Object Lock: the server would keep it anyway;
                            // a delete would only hide it (delete marker).
                            e.skipped = Some(format!(
                                "under S3 Object Lock until {}",
                                super::immut::format_ms(until)
                            ));
                        } else {
                            self.remove_snapshot_locked(&e.backup, lock)?;
                            e.removed = true;
                        }
                    }
                    Err(err) if matches!(err.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {
                        e.skipped = Some(err.to_string());
                    }
                    Err(err) => return Err(err),
                }
            }
            out.push(e);
        }
        Ok(out)
    }
}
