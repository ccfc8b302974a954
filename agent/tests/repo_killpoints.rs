//! F-31 deterministic kill campaign: a writer process (this test binary,
//! re-executed) is SIGKILLed at each durable step of a backup, a prune, a GC
//! and a run-record update in turn, through the failpoints of
//! `shear::failpoint` (`SHEAR_TEST_KILL_AT=<kind>:<step>:<n>`: chunk, index,
//! manifest, snapshot directory, run record × create, write, fsync, rename,
//! dir-fsync, done, delete, mkdir, remove-tree).
//!
//! An unkilled run with `SHEAR_TEST_FAILPOINT_LOG` first lists the points a
//! workload passes; the campaign then kills at the first hit of every point
//! of a backup and of a run-record update, at the last chunk's steps, and at
//! the removing steps of prune and GC (the short mode, in the suite; the
//! long mode kills at every point of prune and GC too). After each kill:
//! - the child really died of SIGKILL at that point (not a normal exit);
//! - the repository opens, its lock and GC lock are free;
//! - `verify --all` is clean, every listed backup restores byte-identical,
//!   no earlier backup disappeared (beyond what prune allows), and the
//!   killed backup is either absent or complete;
//! - the next backup works;
//! - a run record reads back as the old or the new version, never torn.
//!
//! Long mode (`SHEAR_KILL_CAMPAIGN_KILLS=N`, `scripts/fuzz --long` sets
//! 1000): N more kills at seeded random hits (`*:<k>`) of random workloads,
//! with a per-point tally at the end. `SHEAR_KILL_CAMPAIGN_SEED` changes
//! the seed.
//!
//! The same campaign against an S3 repository (issue 14; a Garage node and
//! the fault proxy of crate `shear-test-s3`): backup, prune, GC and sync children
//! killed at the S3 backend's `put`/`put-done`/`delete` points, ten chosen
//! kills in the suite, `SHEAR_S3_KILL_CAMPAIGN_KILLS=N` more at random hits
//! (`scripts/fuzz --long`: 60). See `f31_s3_…` below.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use shear::job::record::{RunRecord, Step};
use shear::repo::gc::GcOptions;
use shear::repo::sync::SyncOptions;
use shear::repo::{
    Backend, BackupId, InitOptions, KeepOptions, LocalBackend, LockMode, LockWait, Repository,
    VerifyTarget, VmId,
};

const KEEP_LAST: usize = 3;

/// Workloads a child runs.
const MODES: [&str; 4] = ["backup", "prune", "gc", "record"];

/// Disk images of the backup at time `n`: `d0` is the same in every
/// backup (all dedup), `d1` is random, unique to `n`: every backup writes
/// the same number of new chunks, so a backup's failpoints are the same
/// from one run to the next.
fn images(n: i64) -> (Vec<u8>, Vec<u8>) {
    let d0 = image(1000, 3 * CHUNK as usize);
    let mut d1 = vec![0u8; 3 * CHUNK as usize];
    rand::rngs::StdRng::seed_from_u64(5000u64.wrapping_add(n as u64)).fill(&mut d1[..]);
    (d0, d1)
}

fn do_backup(repo: &Repository, n: i64) -> BackupId {
    backup_vm(repo, "100", n)
}

fn backup_vm(repo: &Repository, vmid: &str, n: i64) -> BackupId {
    let (d0, d1) = images(n);
    backup(repo, vmid, n * 3600, &[("d0", &d0), ("d1", &d1)])
}

fn record_versions(n: i64) -> (RunRecord, RunRecord) {
    let mut old = RunRecord::new("100", Path::new("/q"), None);
    old.pid = 1;
    old.steps.push(Step::Node {
        name: format!("old-{n}"),
    });
    let mut new = old.clone();
    new.steps.push(Step::Node {
        name: format!("new-{n}"),
    });
    (old, new)
}

fn workload(root: &Path, n: i64, mode: &str) {
    let repo = Repository::open(root, None).unwrap();
    match mode {
        "backup" => {
            do_backup(&repo, n);
        }
        "prune" => {
            let keep = KeepOptions {
                last: Some(KEEP_LAST),
                ..KeepOptions::default()
            };
            repo.prune(&VmId::new("100").unwrap(), &keep, false)
                .unwrap();
        }
        "gc" => {
            repo.gc(&GcOptions::default()).unwrap();
        }
        "sync" => {
            // Into `root` (an S3 repository) from a local one.
            let src = std::env::var_os("SHEAR_KP_SYNC_SRC").unwrap();
            let src = Repository::open(Path::new(&src), None).unwrap();
            let opts = SyncOptions {
                streams: 4,
                ..SyncOptions::default()
            };
            shear::repo::sync::sync(&src, &repo, &opts).unwrap();
        }
        "record" => {
            // The old version is in place (written by the parent); the
            // child replaces it, then removes it (a run's last steps).
            let path = root.join("run/backup-100.json");
            let (_, new) = record_versions(n);
            new.save(&path).unwrap();
            RunRecord::remove(&path).unwrap();
        }
        _ => unreachable!(),
    }
}

/// The child: with `SHEAR_KP_REPO` it runs one workload (killed by its
/// failpoint); as a plain test it runs every workload once and checks it.
#[test]
fn killpoint_child_workload() {
    if let Some(root) = std::env::var_os("SHEAR_KP_REPO") {
        let n: i64 = std::env::var("SHEAR_KP_N").unwrap().parse().unwrap();
        let mode = std::env::var("SHEAR_KP_MODE").unwrap();
        workload(Path::new(&root), n, &mode);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    init_repo(dir.path(), None);
    std::fs::create_dir(dir.path().join("run")).unwrap();
    for n in 0..5 {
        workload(dir.path(), n, "backup");
    }
    for m in ["prune", "gc", "record"] {
        workload(dir.path(), 9, m);
    }
    let repo = Repository::open(dir.path(), None).unwrap();
    assert_eq!(repo.list_backups(None).unwrap().len(), KEEP_LAST);
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
}

/// Runs a child; `kill_at` arms its failpoint, `log` lists its points.
fn run_child(
    root: &Path,
    n: i64,
    mode: &str,
    kill_at: Option<&str>,
    log: Option<&Path>,
) -> std::process::ExitStatus {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "killpoint_child_workload", "--test-threads=1"])
        .env("SHEAR_KP_REPO", root)
        .env("SHEAR_KP_N", n.to_string())
        .env("SHEAR_KP_MODE", mode)
        .env_remove("SHEAR_TEST_KILL_AT")
        .env_remove("SHEAR_TEST_FAIL_AT")
        .env_remove("SHEAR_TEST_FAILPOINT_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(k) = kill_at {
        cmd.env("SHEAR_TEST_KILL_AT", k);
    }
    if let Some(l) = log {
        cmd.env("SHEAR_TEST_FAILPOINT_LOG", l);
    }
    cmd.status().unwrap()
}

/// The points a workload passes, in order, from an unkilled run on a copy
/// of the repository.
fn points_of(root: &Path, n: i64, mode: &str) -> Vec<String> {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(root, copy.path());
    if mode == "record" {
        prepare_record(copy.path(), n);
    }
    let log = copy.path().join("points.log");
    let st = run_child(copy.path(), n, mode, None, Some(&log));
    assert!(st.success(), "unkilled {mode} run failed: {st:?}");
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

fn prepare_record(root: &Path, n: i64) {
    let _ = std::fs::create_dir(root.join("run"));
    record_versions(n)
        .0
        .save(&root.join("run/backup-100.json"))
        .unwrap();
}

/// Checks the repository after a kill; returns the backups listed.
fn check_after_kill(
    root: &Path,
    out: &Path,
    before: &BTreeSet<BackupId>,
    killed_n: i64,
    mode: &str,
    ctx: &str,
) -> BTreeSet<BackupId> {
    let repo = Repository::open(root, None).unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
    let b = LocalBackend::new(root).unwrap();
    for lock in ["lock", "gc.lock"] {
        b.lock(lock, LockMode::Exclusive, LockWait::NoWait)
            .unwrap_or_else(|e| panic!("{ctx}: {lock} still held: {e}"));
    }
    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(report.is_clean(), "{ctx}: {report:#?}");
    let now: BTreeSet<BackupId> = repo
        .list_backups(None)
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    // Verify checked every digest; restore the newest and the killed one.
    let killed = BackupId::new(VmId::new("100").unwrap(), t(killed_n * 3600));
    let newest = now.iter().rev().take(usize::from(killed_n % 4 == 0));
    for id in newest.chain(now.get(&killed)) {
        let n = (id.time().unix_timestamp() - 1_700_000_000) / 3600;
        let (d0, d1) = images(n);
        assert_eq!(restore_raw(&repo, id, "d0", out), d0, "{ctx}: {id}");
        assert_eq!(restore_raw(&repo, id, "d1", out), d1, "{ctx}: {id}");
    }
    // Nothing earlier vanished, except what prune may remove (it keeps the
    // newest KEEP_LAST).
    let newest: Vec<_> = before.iter().rev().take(KEEP_LAST).collect();
    for id in before {
        if mode != "prune" || newest.contains(&id) {
            assert!(now.contains(id), "{ctx}: {id} disappeared");
        }
    }
    if mode == "backup" {
        // Absent, or complete (killed after its manifest was durable): it
        // restored above. Nothing half-visible.
        let id = BackupId::new(VmId::new("100").unwrap(), t(killed_n * 3600));
        let dir = root.join(format!("backups/vm/100/{}", id.time_str()));
        let listed = now.contains(&id);
        if dir.exists() && !listed {
            assert!(
                !dir.join("manifest.blob").exists(),
                "{ctx}: a manifest that is not listed"
            );
        }
    }
    if mode == "record" {
        let path = root.join("run/backup-100.json");
        let (old, new) = record_versions(killed_n);
        match RunRecord::load(&path) {
            Ok(None) => {}
            Ok(Some(r)) => assert!(r == old || r == new, "{ctx}: record is neither version"),
            Err(e) => panic!("{ctx}: torn run record: {e}"),
        }
    }
    now
}

struct Campaign {
    root: tempfile::TempDir,
    out: tempfile::TempDir,
    n: i64,
    kills: usize,
    tally: BTreeMap<String, usize>,
}

impl Campaign {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let repo = init_repo(root.path(), None);
        for n in 0..2 {
            do_backup(&repo, n);
        }
        Campaign {
            root,
            out: tempfile::tempdir().unwrap(),
            n: 10,
            kills: 0,
            tally: BTreeMap::new(),
        }
    }

    fn listed(&self) -> BTreeSet<BackupId> {
        let repo = Repository::open(self.root.path(), None).unwrap();
        repo.list_backups(None)
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect()
    }

    /// Kills a `mode` run at `spec` (`<point>:<k>`); asserts everything.
    fn kill(&mut self, mode: &str, spec: &str) {
        self.kill_or_finish(mode, spec, false);
    }

    /// As `kill`; with `may_finish` a run that ends before its k-th hit
    /// (random kills of prune/GC, whose work varies) is checked the same.
    fn kill_or_finish(&mut self, mode: &str, spec: &str, may_finish: bool) {
        self.n += 1;
        let n = self.n;
        let root = self.root.path();
        if mode == "record" {
            prepare_record(root, n);
        }
        let before = self.listed();
        let ctx = format!("{mode} killed at {spec} (run {n})");
        let st = run_child(root, n, mode, Some(spec), None);
        if may_finish && st.success() {
            check_after_kill(root, self.out.path(), &before, n, mode, &ctx);
            return;
        }
        assert_eq!(
            st.signal(),
            Some(9),
            "{ctx}: the child was not killed at its failpoint ({st:?})"
        );
        self.kills += 1;
        let point = spec.rsplit_once(':').unwrap().0.to_string();
        *self.tally.entry(format!("{mode} {point}")).or_default() += 1;
        check_after_kill(root, self.out.path(), &before, n, mode, &ctx);
        // The next backup works, and the repository stays small.
        let repo = Repository::open(root, None).unwrap();
        self.n += 1;
        do_backup(&repo, self.n);
        assert!(
            repo.verify(&VerifyTarget::All, 2).unwrap().is_clean(),
            "{ctx}: after the next backup"
        );
        if self.kills.is_multiple_of(4) {
            let keep = KeepOptions {
                last: Some(KEEP_LAST + 1),
                ..KeepOptions::default()
            };
            repo.prune(&VmId::new("100").unwrap(), &keep, false)
                .unwrap();
        }
    }

    /// Makes sure prune and GC have something to do.
    fn seed_garbage(&mut self) {
        let repo = Repository::open(self.root.path(), None).unwrap();
        for _ in 0..2 {
            self.n += 1;
            do_backup(&repo, self.n);
        }
    }

    fn points(&mut self, mode: &str) -> Vec<String> {
        if mode != "backup" {
            self.seed_garbage();
        }
        points_of(self.root.path(), self.n + 1, mode)
    }
}

#[test]
fn f31_kill_at_every_durable_step_of_backup_prune_gc_and_record() {
    let mut c = Campaign::new();
    let mut covered = BTreeSet::new();
    let extra: usize = std::env::var("SHEAR_KILL_CAMPAIGN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);

    for mode in MODES {
        let pts = c.points(mode);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for p in &pts {
            *counts.entry(p.clone()).or_default() += 1;
        }
        assert!(!counts.is_empty(), "{mode} passed no failpoint");
        for (point, count) in counts {
            // The first hit of every point. A backup passes the same
            // points every run; what prune and GC do depends on what is
            // garbage, so they are listed again on the state the kill sees.
            if mode != "backup" && mode != "record" {
                // Short mode: the steps that remove data; long mode: all.
                if extra == 0
                    && !["snapshot:rename", "snapshot:remove-tree", "chunk:delete"]
                        .contains(&point.as_str())
                {
                    continue;
                }
                c.seed_garbage();
                let now = points_of(c.root.path(), c.n + 1, mode);
                if !now.contains(&point) {
                    continue;
                }
            }
            c.kill(mode, &format!("{point}:1"));
            covered.insert(format!("{mode} {point}"));
            // And the last chunk's steps of a backup.
            if mode == "backup" && count > 1 && point.starts_with("chunk:") {
                c.kill(mode, &format!("{point}:{count}"));
            }
        }
    }
    // The steps the campaign must reach (kill after write, before/after
    // fsync, before/after rename, before the directory fsync, after it).
    for want in [
        "backup chunk:write",
        "backup chunk:fsync",
        "backup chunk:rename",
        "backup chunk:dir-fsync",
        "backup chunk:done",
        "backup index:fsync",
        "backup index:rename",
        "backup index:dir-fsync",
        "backup manifest:write",
        "backup manifest:fsync",
        "backup manifest:rename",
        "backup manifest:dir-fsync",
        "backup manifest:done",
        "backup snapshot:mkdir",
        "prune snapshot:rename",
        "prune snapshot:remove-tree",
        "gc chunk:delete",
        "record record:fsync",
        "record record:rename",
        "record record:dir-fsync",
    ] {
        assert!(covered.contains(want), "{want} not reached: {covered:?}");
    }
    let deterministic = c.kills;

    // Long mode: seeded random hits of random workloads.
    let seed: u64 = std::env::var("SHEAR_KILL_CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0031);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut lengths: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..extra {
        let mode = MODES[rng.random_range(0..MODES.len())];
        if mode != "backup" {
            c.seed_garbage();
        }
        let len = match lengths.get(mode) {
            Some(l) => *l,
            None => {
                let l = c.points(mode).len();
                lengths.insert(mode, l);
                l
            }
        };
        let k = rng.random_range(1..=len.max(1));
        c.kill_or_finish(mode, &format!("*:{k}"), mode != "backup");
    }
    // What is left behind is swept and the repository is consistent.
    let repo = Repository::open(c.root.path(), None).unwrap();
    repo.gc(&GcOptions::default()).unwrap();
    for f in all_files(c.root.path()) {
        let s = f.to_string_lossy();
        assert!(
            !s.contains(".tmp-") || s.contains("/run/"),
            "temp file left after GC: {s}"
        );
    }
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
    eprintln!(
        "kill campaign: {} kills ({deterministic} at every point, {extra} random, seed {seed:#x})",
        c.kills
    );
    for (p, n) in &c.tally {
        eprintln!("  {n:5}  {p}");
    }
}

// ------------------------------------------------ the same on S3 (issue 14)

/// Lease of the writers' and GC's markers in the S3 campaign: short, so a
/// killed writer's marker goes stale within the campaign (GC defers while
/// it is live), long enough that a loaded machine never misses a heartbeat
/// (every lease/4; fencing at lease/2).
const S3_LEASE_SECS: u64 = 6;

/// Workloads of the S3 campaign: a sync is from a local repository (VM
/// 200's backups) into the S3 one.
const S3_MODES: [&str; 4] = ["backup", "prune", "gc", "sync"];

/// Each listed backup and the chunks (hex digests) its disks reference.
type Refs = BTreeMap<BackupId, BTreeSet<String>>;

struct S3Campaign {
    _garage: s3::Garage,
    faults: Arc<s3::Faults>,
    loc: std::path::PathBuf,
    /// VM 200's backups, synced into the S3 repository.
    src: tempfile::TempDir,
    /// Every backup ever made in `src` (it is pruned too: the S3 copy may
    /// keep older ones than the source still has).
    src_made: BTreeSet<BackupId>,
    out: tempfile::TempDir,
    n: i64,
    kills: usize,
    finished: usize,
    /// Chunk DELETEs the server received.
    chunk_deletes: usize,
    /// GC runs that deleted chunks.
    gc_deleting: usize,
    tally: BTreeMap<String, usize>,
    /// When a writer (backup, sync) was last killed: its marker stays live
    /// for a lease, and GC defers until then.
    writer_killed: Option<Instant>,
}

impl S3Campaign {
    fn new() -> Option<Self> {
        let garage = s3::start_garage()?;
        let faults = Arc::new(s3::Faults::default());
        let proxy = s3::start_proxy(garage.port, Arc::clone(&faults));
        // The children inherit this process's environment.
        s3::env_for(&garage.creds(), proxy);
        std::env::set_var("SHEAR_S3_LEASE_SECS", S3_LEASE_SECS.to_string());
        let loc = s3::s3_repo("kill-campaign");
        let repo = Repository::init(
            &loc,
            None,
            &InitOptions {
                chunk_size: CHUNK,
                zstd_level: 1,
                ..InitOptions::default()
            },
        )
        .unwrap();
        for n in 0..2 {
            do_backup(&repo, n);
        }
        let src = tempfile::tempdir().unwrap();
        let s = init_repo(src.path(), None);
        let first = backup_vm(&s, "200", 1);
        Some(S3Campaign {
            _garage: garage,
            faults,
            loc,
            src,
            src_made: BTreeSet::from([first]),
            out: tempfile::tempdir().unwrap(),
            n: 10,
            kills: 0,
            finished: 0,
            chunk_deletes: 0,
            gc_deleting: 0,
            tally: BTreeMap::new(),
            writer_killed: None,
        })
    }

    fn repo(&self) -> Repository {
        Repository::open(&self.loc, None).unwrap()
    }

    fn refs(&self, repo: &Repository) -> Refs {
        let mut out = Refs::new();
        for b in repo.list_backups(None).unwrap() {
            let r = repo.open_backup(&b.id).unwrap();
            let mut set = BTreeSet::new();
            for d in &r.manifest().disks {
                let disk = r.open_disk(&d.name).unwrap();
                set.extend(disk.entries().iter().map(hex::encode));
            }
            out.insert(b.id, set);
        }
        out
    }

    /// Makes sure prune (more than KEEP_LAST backups of VM 100) and GC
    /// (unreferenced chunks: backups pruned here) have work.
    fn prepare(&mut self, mode: &str) {
        let repo = self.repo();
        match mode {
            "prune" => {
                let vm = VmId::new("100").unwrap();
                while repo.list_backups(Some(&vm)).unwrap().len() < KEEP_LAST + 2 {
                    self.n += 1;
                    do_backup(&repo, self.n);
                }
            }
            "gc" => {
                for _ in 0..2 {
                    self.n += 1;
                    do_backup(&repo, self.n);
                }
                let keep = KeepOptions {
                    last: Some(KEEP_LAST),
                    ..KeepOptions::default()
                };
                repo.prune(&VmId::new("100").unwrap(), &keep, false)
                    .unwrap();
                // A killed writer's marker is live for a lease: GC would
                // defer and delete nothing.
                if let Some(k) = self.writer_killed {
                    let stale = k + Duration::from_secs(S3_LEASE_SECS + 1);
                    if let Some(w) = stale.checked_duration_since(Instant::now()) {
                        std::thread::sleep(w);
                    }
                }
            }
            "sync" => {
                // Something new to copy.
                let src = Repository::open(self.src.path(), None).unwrap();
                self.src_made.insert(backup_vm(&src, "200", self.n + 1));
            }
            _ => {}
        }
    }

    /// Runs one `mode` child, killed at `spec` (`<point>:<k>`) or logging
    /// its points to `log`; checks the repository afterwards. Returns
    /// whether the child was killed.
    fn step(&mut self, mode: &str, spec: Option<&str>, log: Option<&Path>) -> bool {
        let t_step = Instant::now();
        self.prepare(mode);
        let t_prepared = t_step.elapsed();
        self.n += 1;
        let n = self.n;
        let repo = self.repo();
        let before: BTreeSet<BackupId> = repo
            .list_backups(None)
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        let deletes0 = self.faults.deletes.lock().unwrap().len();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "killpoint_child_workload", "--test-threads=1"])
            .env("SHEAR_KP_REPO", &self.loc)
            .env("SHEAR_KP_N", n.to_string())
            .env("SHEAR_KP_MODE", mode)
            .env("SHEAR_KP_SYNC_SRC", self.src.path())
            .env_remove("SHEAR_TEST_KILL_AT")
            .env_remove("SHEAR_TEST_FAIL_AT")
            .env_remove("SHEAR_TEST_FAILPOINT_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(k) = spec {
            cmd.env("SHEAR_TEST_KILL_AT", k);
        }
        if let Some(l) = log {
            cmd.env("SHEAR_TEST_FAILPOINT_LOG", l);
        }
        let t_child = Instant::now();
        let out = cmd.output().unwrap();
        let t_child = t_child.elapsed();
        let ctx = format!("S3 {mode} killed at {} (run {n})", spec.unwrap_or("-"));
        let killed = out.status.signal() == Some(9);
        assert!(
            killed || out.status.success(),
            "{ctx}: the child failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if killed {
            self.kills += 1;
            if mode == "backup" || mode == "sync" {
                self.writer_killed = Some(Instant::now());
            }
        } else {
            self.finished += 1;
        }
        let deleted: Vec<String> = self.faults.deletes.lock().unwrap()[deletes0..]
            .iter()
            .filter(|k| k.contains("/chunks/"))
            .filter_map(|k| k.rsplit('/').next().map(str::to_owned))
            .collect();
        self.chunk_deletes += deleted.len();
        if mode == "gc" && !deleted.is_empty() {
            self.gc_deleting += 1;
        }
        let t_check = Instant::now();
        self.check(&repo, mode, n, &before, &deleted, &ctx);
        let t_check = t_check.elapsed();
        if killed {
            // The next backup works (it waits for a killed GC's marker to
            // go stale); the repository stays small.
            // (The next step's check verifies it with everything else.)
            self.n += 1;
            do_backup(&repo, self.n);
            if self.kills.is_multiple_of(4) {
                let keep = KeepOptions {
                    last: Some(KEEP_LAST + 1),
                    ..KeepOptions::default()
                };
                for vm in ["100", "200"] {
                    repo.prune(&VmId::new(vm).unwrap(), &keep, false).unwrap();
                }
                // The source too, or the next sync copies back what was
                // pruned here.
                let src = Repository::open(self.src.path(), None).unwrap();
                src.prune(&VmId::new("200").unwrap(), &keep, false).unwrap();
            }
        }
        eprintln!(
            "{ctx}: {} in {:.1} s (prepare {:.1}, child {:.1}, check {:.1})",
            if killed { "killed" } else { "ended" },
            t_step.elapsed().as_secs_f64(),
            t_prepared.as_secs_f64(),
            t_child.as_secs_f64(),
            t_check.as_secs_f64()
        );
        killed
    }

    fn check(
        &self,
        repo: &Repository,
        mode: &str,
        n: i64,
        before: &BTreeSet<BackupId>,
        deleted: &[String],
        ctx: &str,
    ) {
        // Requests, not CPU: more threads than cores.
        let report = repo.verify(&VerifyTarget::All, 8).unwrap();
        assert!(report.is_clean(), "{ctx}: {report:#?}");
        let after = self.refs(repo);
        // No chunk a listed backup references was deleted (verify found
        // them all; this says none was deleted and uploaded again).
        for (id, refs) in &after {
            if let Some(d) = deleted.iter().find(|d| refs.contains(*d)) {
                panic!("{ctx}: chunk {d} deleted though listed backup {id} references it");
            }
        }
        // Nothing earlier vanished, except what prune may remove.
        let newest: Vec<&BackupId> = before
            .iter()
            .filter(|id| id.vmid().as_str() == "100")
            .rev()
            .take(KEEP_LAST)
            .collect();
        for id in before {
            if mode != "prune" || id.vmid().as_str() != "100" || newest.contains(&id) {
                assert!(after.contains_key(id), "{ctx}: {id} disappeared");
            }
        }
        // Nothing incomplete is listed: every listed backup is one this
        // campaign made (VM 200's: one made in the sync source), and the
        // killed run's backup is absent or restores byte-identical.
        for id in after.keys() {
            if id.vmid().as_str() == "200" {
                assert!(
                    self.src_made.contains(id),
                    "{ctx}: {id} was never made in the sync source"
                );
            }
        }
        let mut check: Vec<BackupId> = Vec::new();
        let killed = BackupId::new(VmId::new("100").unwrap(), t(n * 3600));
        if after.contains_key(&killed) {
            check.push(killed);
        }
        if mode == "sync" {
            check.extend(
                after
                    .keys()
                    .filter(|id| id.vmid().as_str() == "200" && !before.contains(*id))
                    .cloned(),
            );
        }
        for id in check {
            let n = (id.time().unix_timestamp() - 1_700_000_000) / 3600;
            let (d0, d1) = images(n);
            assert_eq!(
                restore_raw(repo, &id, "d0", self.out.path()),
                d0,
                "{ctx}: {id}"
            );
            assert_eq!(
                restore_raw(repo, &id, "d1", self.out.path()),
                d1,
                "{ctx}: {id}"
            );
        }
    }

    /// The points a `mode` run passes, from an unkilled (checked) run.
    fn points(&mut self, mode: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("points.log");
        assert!(
            !self.step(mode, None, Some(&log)),
            "an unkilled run was killed"
        );
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// F-31 on an S3 repository (issue 14): backup, prune, GC and sync
/// processes SIGKILLed at their PUTs and DELETEs (failpoints `put`,
/// `put-done`, `delete` of repo/s3.rs) against a real S3 server (Garage).
/// After each kill: `verify --all` clean, nothing incomplete listed (a
/// killed backup is absent or restores byte-identical; a killed sync lists
/// only complete copies), nothing earlier vanished beyond what prune
/// allows, no chunk a listed backup references was ever deleted (the
/// proxy records every DELETE), and the next backup works. Short mode: ten
/// kills at chosen points; `SHEAR_S3_KILL_CAMPAIGN_KILLS=N` (`scripts/fuzz
/// --long`: 60) adds N kills at seeded random hits of random workloads.
#[test]
fn f31_s3_kill_backup_prune_gc_sync_at_puts_and_deletes() {
    let Some(mut c) = S3Campaign::new() else {
        return;
    };
    let t0 = Instant::now();
    let chosen = [
        ("backup", "chunk:put:2"),
        ("backup", "manifest:put:1"),
        ("backup", "manifest:put-done:1"),
        ("sync", "chunk:put:3"),
        ("sync", "manifest:put:1"),
        ("prune", "manifest:delete:1"),
        ("prune", "index:delete:1"),
        // (After the prunes: the killed writers' leases ran out meanwhile.)
        ("gc", "chunk:delete:1"),
        ("gc", "chunk:delete:3"),
        ("backup", "index:put-done:1"),
    ];
    for (mode, spec) in chosen {
        assert!(
            c.step(mode, Some(spec), None),
            "S3 {mode} was not killed at {spec}"
        );
        *c.tally.entry(format!("{mode} {spec}")).or_default() += 1;
    }
    assert!(
        c.chunk_deletes > 0 && c.gc_deleting > 0,
        "GC deleted no chunk: the no-referenced-chunk-deleted check had nothing to check"
    );
    let chosen_kills = c.kills;

    let extra: usize = std::env::var("SHEAR_S3_KILL_CAMPAIGN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seed: u64 = std::env::var("SHEAR_KILL_CAMPAIGN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0014);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut logs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut attempts = 0;
    while c.kills < chosen_kills + extra {
        attempts += 1;
        assert!(
            attempts <= 3 * extra,
            "only {} random kills in {attempts} attempts",
            c.kills - chosen_kills
        );
        let mode = S3_MODES[rng.random_range(0..S3_MODES.len())];
        if !logs.contains_key(mode) {
            let l = c.points(mode);
            assert!(!l.is_empty(), "{mode} passed no failpoint");
            logs.insert(mode, l);
        }
        let log = &logs[mode];
        let k = rng.random_range(1..=log.len());
        let near = log[k - 1].clone();
        if c.step(mode, Some(&format!("*:{k}")), None) {
            *c.tally.entry(format!("{mode} ~{near}")).or_default() += 1;
        }
    }

    // Everything left behind is swept once the killed holders' leases ran
    // out; every listed backup restores byte-identical.
    if let Some(k) = c.writer_killed {
        let stale = k + Duration::from_secs(S3_LEASE_SECS + 1);
        if let Some(w) = stale.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    let repo = c.repo();
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert!(g.deferred.is_none(), "{g:?}");
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
    for b in repo.list_backups(None).unwrap() {
        let n = (b.id.time().unix_timestamp() - 1_700_000_000) / 3600;
        let (d0, d1) = images(n);
        assert_eq!(restore_raw(&repo, &b.id, "d0", c.out.path()), d0);
        assert_eq!(restore_raw(&repo, &b.id, "d1", c.out.path()), d1);
    }
    eprintln!(
        "S3 kill campaign: {} kills ({chosen_kills} at chosen points, {} random, seed {seed:#x}), \
         {} runs that ended before their point, {} chunk DELETEs ({} GC runs deleting), {:.0} s",
        c.kills,
        c.kills - chosen_kills,
        c.finished,
        c.chunk_deletes,
        c.gc_deleting,
        t0.elapsed().as_secs_f64()
    );
    for (p, n) in &c.tally {
        eprintln!("  {n:5}  {p}");
    }
}
