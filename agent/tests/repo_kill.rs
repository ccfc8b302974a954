//! F-31 crash campaign: a writer process is SIGKILLed at random points (a
//! seeded schedule) while it backs up, prunes or garbage-collects. After
//! every kill `verify --all` is clean, every backup that is listed restores
//! byte-identical, and no earlier backup disappeared (except as prune
//! allows). At the end GC leaves no temp file and no partial backup.
//!
//! The writer is this test binary re-executed with `SHEAR_KILL_REPO` set:
//! `kill_child_workload` then runs one workload and exits.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;
use rand::{Rng, SeedableRng};
use shear::repo::gc::GcOptions;
use shear::repo::{
    BackupId, BackupMeta, ChunkPipeline, CommitInfo, DiskSpec, KeepOptions, Repository,
    VerifyTarget, VmId,
};

const KILLS: u32 = 50;
const MAX_ITERATIONS: i64 = 200;
const KEEP_LAST: usize = 6;

/// Disk images of the backup taken at time `n`: `d0` shares most chunks
/// with every other backup (dedup), `d1` is unique.
fn images(n: i64) -> (Vec<u8>, Vec<u8>) {
    let mut d0 = image(1000, 12 * CHUNK as usize);
    let k = (n as usize) % 12;
    d0[k * CHUNK as usize..(k + 1) * CHUNK as usize].fill(n as u8 | 1);
    let d1 = image(5000u64.wrapping_add(n as u64), 4 * CHUNK as usize);
    (d0, d1)
}

/// One child workload: 0 = backup, 1 = backup + prune, 2 = GC.
fn workload(repo: &Repository, n: i64, mode: u32, (d0, d1): (Vec<u8>, Vec<u8>)) {
    if mode == 2 {
        repo.gc(&GcOptions::default()).unwrap();
        return;
    }
    let mut meta = BackupMeta::new("100", "kill-test");
    meta.time = Some(t(n * 3600));
    let s = repo.begin_backup(&meta).unwrap();
    let p = ChunkPipeline::new(2, 2);
    for (name, img) in [("d0", &d0), ("d1", &d1)] {
        let d = s.add_disk(&DiskSpec::new(name, img.len() as u64)).unwrap();
        for (i, c) in img.chunks(CHUNK as usize).enumerate() {
            p.submit(&d, i as u64, c.to_vec()).unwrap();
        }
    }
    p.finish().unwrap();
    s.finish_all().unwrap();
    s.commit(&CommitInfo::default()).unwrap();
    if mode == 1 {
        let keep = KeepOptions {
            last: Some(KEEP_LAST),
            ..KeepOptions::default()
        };
        repo.prune(&VmId::new("100").unwrap(), &keep, false)
            .unwrap();
    }
}

/// Runs in the child process; as a plain test (no env) it runs the three
/// workloads to completion and checks the result, so it asserts something.
#[test]
fn kill_child_workload() {
    if let Some(repo) = std::env::var_os("SHEAR_KILL_REPO") {
        let n: i64 = std::env::var("SHEAR_KILL_N").unwrap().parse().unwrap();
        let mode: u32 = std::env::var("SHEAR_KILL_MODE").unwrap().parse().unwrap();
        // Tell the parent the workload starts now (process start-up and
        // making the test data are not the write path the kills sample).
        let data = images(n);
        println!("START");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        let repo = Repository::open(Path::new(&repo), None).unwrap();
        workload(&repo, n, mode, data);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    for (n, mode) in [(0, 0), (1, 1), (2, 2)] {
        workload(&repo, n, mode, images(n));
    }
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
}

/// Starts a child workload and returns once it reported START.
fn spawn_child(repo: &Path, n: i64, mode: u32) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill_child_workload",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("SHEAR_KILL_REPO", repo)
        .env("SHEAR_KILL_N", n.to_string())
        .env("SHEAR_KILL_MODE", mode.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        // EOF (0) means the child exited before starting: let wait() tell.
        if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 || line.contains("START")
        {
            break;
        }
    }
    // Keep draining so the child never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// Temp files and snapshot directories without a manifest.
fn partial_state(root: &Path) -> BTreeSet<std::path::PathBuf> {
    let mut out: BTreeSet<_> = all_files(root)
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(".tmp-"))
        .collect();
    if let Ok(rd) = std::fs::read_dir(root.join("backups/vm/100")) {
        out.extend(
            rd.map(|e| e.unwrap().path())
                .filter(|p| !p.join("manifest.blob").exists()),
        );
    }
    out
}

fn check_repo(repo: &Repository, out: &Path, ctx: &str) -> BTreeSet<BackupId> {
    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(report.is_clean(), "{ctx}: {report:#?}");
    let mut ids = BTreeSet::new();
    for b in repo.list_backups(None).unwrap() {
        let n = (b.id.time().unix_timestamp() - 1_700_000_000) / 3600;
        let (d0, d1) = images(n);
        assert_eq!(restore_raw(repo, &b.id, "d0", out), d0, "{ctx}: {}", b.id);
        assert_eq!(restore_raw(repo, &b.id, "d1", out), d1, "{ctx}: {}", b.id);
        ids.insert(b.id);
    }
    ids
}

#[test]
fn f31_kill_writer_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let out = tempfile::tempdir().unwrap();
    // Calibrate: how long each unkilled workload takes end to end (GC runs
    // on the repository left by the first two).
    let mut full = Vec::new();
    for (n, mode) in [(-2, 0), (-1, 1), (0, 2)] {
        let mut child = spawn_child(dir.path(), n, mode);
        let start = Instant::now();
        let st = child.wait().unwrap();
        assert!(st.success());
        full.push(start.elapsed());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0031);
    let mut before = check_repo(&repo, out.path(), "initial");
    let mut killed = 0;
    let mut mid_write = 0;
    let mut partial = partial_state(dir.path());
    let mut n = 0i64;
    // Until KILLS kills landed mid-run (seeded delays; a run that finished
    // before its kill updates the duration estimate, so machine load does
    // not thin out the campaign).
    while killed < KILLS {
        n += 1;
        assert!(n <= MAX_ITERATIONS, "only {killed} kills in {n} runs");
        let mode = match rng.random_range(0..10) {
            0..=5 => 0,
            6..=7 => 1,
            _ => 2,
        };
        // Uniform over the run, so kills land in process start, chunk
        // writes, index writes, the commit, prune and GC alike.
        let delay = full[mode as usize].mul_f64(rng.random_range(0.0..0.95));
        let mut child = spawn_child(dir.path(), n, mode);
        let started = Instant::now();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
            child.wait().unwrap();
        } else {
            assert!(child.wait().unwrap().success(), "unkilled run {n} failed");
            full[mode as usize] = started.elapsed();
        }
        let ctx = format!("iteration {n} mode {mode} after {delay:?}");
        // Did this kill land inside the write path (new partial state)?
        let partial_now = partial_state(dir.path());
        if partial_now.difference(&partial).next().is_some() {
            mid_write += 1;
        }
        partial = partial_now;
        let now = check_repo(&repo, out.path(), &ctx);
        // Nothing earlier vanished, except what prune may remove: it keeps
        // the newest KEEP_LAST including the backup just made.
        let newest: Vec<_> = before.iter().rev().take(KEEP_LAST - 1).collect();
        for id in &before {
            if mode != 1 || newest.contains(&id) {
                assert!(now.contains(id), "{ctx}: {id} disappeared");
            }
        }
        before = now;
    }
    assert!(
        mid_write >= 20,
        "only {mid_write} kills left partial writes behind: the schedule misses the write path"
    );
    eprintln!("{n} runs, {killed} kills, {mid_write} left partial state behind");
    // Everything left behind is swept; the repository stays consistent.
    repo.gc(&GcOptions::default()).unwrap();
    for f in all_files(dir.path()) {
        assert!(
            !f.to_string_lossy().contains(".tmp-"),
            "temp file left: {}",
            f.display()
        );
    }
    let vm = dir.path().join("backups/vm/100");
    for e in std::fs::read_dir(vm).unwrap() {
        let p = e.unwrap().path();
        assert!(
            p.join("manifest.blob").exists(),
            "partial backup left: {}",
            p.display()
        );
    }
    check_repo(&repo, out.path(), "final");
}
