//! F-32 (power loss) by crash-state replay, and F-34 (fsync failing) by
//! injected EIO.
//!
//! F-32, CrashMonkey/ALICE style: `shear::failpoint::record_start` logs
//! every durable operation the repository does (create, write, fsync,
//! rename, link, unlink, mkdir, rmdir, directory fsync) while it runs a
//! backup, a prune and a GC. A model file system then replays the log and
//! builds the states a power cut could leave after every prefix of it:
//! a file's data is durable only up to its last fsync (unsynced data is
//! dropped, kept, or torn in half), a directory's names only up to its last
//! fsync (later name changes of each directory persist as any prefix, in
//! order). Three states per cut: "lazy" (nothing unsynced persists),
//! "eager names" (every name change persists, no unsynced data: the
//! zero-length-file-after-rename case of PBS 647186dd) and a seeded random
//! mix. Each state is written to a directory and must: open without
//! repair; list every backup reported committed before the cut, verified
//! clean and restoring byte-identical; list nothing else that is not
//! complete; take a new backup; GC to no temp files.
//!
//! The short run (in the suite) cuts before every fsync barrier plus 16
//! random cuts; `SHEAR_POWER_LOSS_STATES=N` adds N random ones (long mode).
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shear::failpoint::{self, Action, FsOp, Rule};
use shear::repo::gc::GcOptions;
use shear::repo::{
    BackupId, BackupMeta, CommitInfo, DiskSpec, KeepOptions, RepoError, Repository, VerifyTarget,
    VmId,
};

/// The failpoint configuration and the operation log are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn images(n: i64) -> (Vec<u8>, Vec<u8>) {
    let mut d0 = image(1000, 3 * CHUNK as usize);
    let k = n.rem_euclid(3) as usize;
    d0[k * CHUNK as usize..(k + 1) * CHUNK as usize].fill(n as u8 | 1);
    let mut d1 = vec![0u8; 2 * CHUNK as usize];
    StdRng::seed_from_u64(7000u64.wrapping_add(n as u64)).fill(&mut d1[..]);
    (d0, d1)
}

fn try_backup(repo: &Repository, n: i64) -> Result<BackupId, RepoError> {
    let (d0, d1) = images(n);
    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(n * 3600));
    let s = repo.begin_backup(&meta)?;
    for (name, data) in [("d0", &d0), ("d1", &d1)] {
        let d = s.add_disk(&DiskSpec::new(name, data.len() as u64))?;
        for (i, c) in data.chunks(CHUNK as usize).enumerate() {
            d.put_chunk(i as u64, c)?;
        }
        d.finish()?;
    }
    s.commit(&CommitInfo::default())
}

fn n_of(id: &BackupId) -> i64 {
    (id.time().unix_timestamp() - 1_700_000_000) / 3600
}

/// Verify is clean and every listed backup (or only `only`) reads back as
/// its images (through the restore reader, chunk by chunk, in memory).
fn check_listed(repo: &Repository, only: Option<&BackupId>, ctx: &str) -> BTreeSet<BackupId> {
    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(report.is_clean(), "{ctx}: {report:#?}");
    let mut ids = BTreeSet::new();
    for b in repo.list_backups(None).unwrap() {
        ids.insert(b.id.clone());
        if only.is_some_and(|o| *o != b.id) {
            continue;
        }
        let (d0, d1) = images(n_of(&b.id));
        let r = repo.open_backup(&b.id).unwrap();
        for (name, want) in [("d0", d0), ("d1", d1)] {
            let disk = r.open_disk(name).unwrap();
            let mut got = Vec::new();
            for i in 0..disk.chunk_count() {
                got.extend(disk.read_chunk(i).unwrap());
            }
            assert!(got == want, "{ctx}: {} {name} differs", b.id);
        }
    }
    ids
}

/// A scratch directory on tmpfs when there is one: the crash states are
/// built by the model, so real fsyncs there only cost time.
fn scratch_dir() -> tempfile::TempDir {
    match Path::new("/dev/shm") {
        p if p.is_dir() => tempfile::tempdir_in(p).unwrap(),
        _ => tempfile::tempdir().unwrap(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------- F-34

#[test]
fn f34_failing_fsync_or_write_fails_the_backup_nothing_committed_earlier_intact() {
    let _g = serial();
    let dir = scratch_dir();
    let repo = init_repo(dir.path(), None);
    try_backup(&repo, 0).unwrap();
    let mut n = 0;
    for point in [
        "chunk:fsync:1",
        "chunk:fsync:2",
        "chunk:dir-fsync:2",
        "chunk:write:1",
        "index:fsync:1",
        "index:dir-fsync:2",
        "manifest:fsync:1",
        "manifest:dir-fsync:1",
        "snapshot:dir-fsync:1",
    ] {
        n += 1;
        let before = check_listed(&repo, None, point);
        failpoint::configure(vec![Rule::parse(point, Action::Fail(libc::EIO)).unwrap()]);
        let res = try_backup(&repo, n);
        failpoint::configure(Vec::new());
        let err = match res {
            Ok(id) => panic!("{point}: the backup {id} succeeded despite EIO"),
            Err(e) => error_chain(&e),
        };
        let name = point.rsplit_once(':').unwrap().0;
        assert!(
            err.contains(&format!("injected at failpoint {name}"))
                && err.contains("Input/output error"),
            "{point}: the error does not name the failed step: {err}"
        );
        // Not listed, no manifest or directory left, no temp file (a
        // failed fsync's temp file is discarded, never re-synced).
        let now = check_listed(&repo, None, point);
        assert_eq!(now, before, "{point}: listed backups changed");
        let id = BackupId::new(VmId::new("100").unwrap(), t(n * 3600));
        assert!(
            !dir.path()
                .join(format!("backups/vm/100/{}", id.time_str()))
                .exists(),
            "{point}: the failed backup's directory stayed"
        );
        for f in all_files(dir.path()) {
            assert!(
                !f.to_string_lossy().contains(".tmp-"),
                "{point}: temp file left: {}",
                f.display()
            );
        }
        // The next backup works (and writes what the failed one lost).
        n += 1;
        try_backup(&repo, n).unwrap_or_else(|e| panic!("{point}: next backup: {e}"));
        check_listed(&repo, None, point);
    }
}

/// F-34 through the chunk pipeline: a chunk's fsync failing on a store
/// thread fails `finish` with the failed step named, that chunk is never
/// recorded in the index nor reported stored (the hook that releases read
/// ranges from the snapshot), and the session commits nothing.
#[test]
fn f34_failing_fsync_on_a_pipeline_store_thread_fails_the_backup() {
    let _g = serial();
    let dir = scratch_dir();
    let repo = init_repo(dir.path(), None);
    let before = check_listed(&repo, None, "pipeline");
    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(7 * 3600));
    let s = repo.begin_backup(&meta).unwrap();
    // Six distinct, incompressible chunks: every one is stored.
    let mut data = vec![0u8; 6 * CHUNK as usize];
    StdRng::seed_from_u64(34).fill(&mut data[..]);
    let d = s.add_disk(&DiskSpec::new("d0", data.len() as u64)).unwrap();
    let stored = std::sync::Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let stored = std::sync::Arc::clone(&stored);
        std::sync::Arc::new(move |i: u64| stored.lock().unwrap().push(i)) as shear::repo::StoredHook
    };
    failpoint::configure(vec![
        Rule::parse("chunk:fsync:3", Action::Fail(libc::EIO)).unwrap()
    ]);
    let p = shear::repo::ChunkPipeline::with_hooks(
        2,
        2,
        &(std::sync::Arc::new(drop) as shear::repo::BufferRecycler),
        Some(hook),
    );
    let mut submit_err = None;
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        if let Err(e) = p.submit(&d, i as u64, c.to_vec()) {
            submit_err = Some(e);
            break;
        }
    }
    let res = p.finish();
    failpoint::configure(Vec::new());
    let finish_err = res.expect_err("a chunk fsync failed: finish must fail");
    // The first error is returned once: by `submit` if the failure was seen
    // there (then `finish` only says a worker failed), else by `finish`.
    let err = error_chain(submit_err.as_ref().unwrap_or(&finish_err));
    assert!(
        err.contains("injected at failpoint chunk:fsync") && err.contains("Input/output error"),
        "the error does not name the failed step: {err} (finish: {finish_err})"
    );
    // At most the other five chunks were stored, and every chunk reported
    // stored is durable: its object exists.
    let reported = stored.lock().unwrap().clone();
    assert!(
        reported.len() <= 5,
        "the failed chunk was reported stored: {reported:?}"
    );
    for i in &reported {
        let c = &data[*i as usize * CHUNK as usize..(*i as usize + 1) * CHUNK as usize];
        let digest = shear::repo::blob::chunk_digest(None, c);
        let h = hex::encode(digest);
        let key = format!("chunks/{}/{h}", &h[..2]);
        assert!(
            dir.path().join(&key).exists(),
            "chunk {i} reported stored but {key} is absent"
        );
    }
    // The index cannot be finished: a chunk is missing from it.
    d.finish().expect_err("the disk lacks its failed chunk");
    drop(s);
    assert_eq!(check_listed(&repo, None, "pipeline"), before);
}

// ---------------------------------------------------------------- F-32

type Ino = usize;

#[derive(Debug, Clone)]
enum DirOp {
    Add(String, Ino),
    Remove(String),
}

#[derive(Debug, Clone)]
enum Node {
    File {
        durable: Vec<u8>,
        latest: Vec<u8>,
    },
    Dir {
        durable: BTreeMap<String, Ino>,
        latest: BTreeMap<String, Ino>,
        pending: Vec<DirOp>,
    },
}

/// The model file system: what is durable and what is only in the cache.
#[derive(Debug, Clone)]
struct Model {
    root: PathBuf,
    nodes: Vec<Node>,
}

/// Applies directory changes in order; an `Add` named
/// `\0rename\0<from>\0<to>` is an atomic same-directory rename.
fn apply_dir_ops(entries: &mut BTreeMap<String, Ino>, ops: &[DirOp]) {
    for op in ops {
        match op {
            DirOp::Add(n, i) => match n.strip_prefix("\0rename\0") {
                Some(rest) => {
                    let (from, to) = rest.split_once('\0').unwrap();
                    entries.remove(from);
                    entries.insert(to.to_string(), *i);
                }
                None => {
                    entries.insert(n.clone(), *i);
                }
            },
            DirOp::Remove(n) => {
                entries.remove(n);
            }
        }
    }
}

impl Model {
    /// The directory tree at `root`, all durable (the state before the log).
    fn load(root: &Path) -> Model {
        let mut m = Model {
            root: root.to_owned(),
            nodes: Vec::new(),
        };
        m.load_node(root);
        m
    }

    fn load_node(&mut self, p: &Path) -> Ino {
        let ino = self.nodes.len();
        if p.is_dir() {
            self.nodes.push(Node::Dir {
                durable: BTreeMap::new(),
                latest: BTreeMap::new(),
                pending: Vec::new(),
            });
            let mut entries = BTreeMap::new();
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                let child = self.load_node(&e.path());
                entries.insert(e.file_name().into_string().unwrap(), child);
            }
            self.nodes[ino] = Node::Dir {
                durable: entries.clone(),
                latest: entries,
                pending: Vec::new(),
            };
        } else {
            let data = std::fs::read(p).unwrap();
            self.nodes.push(Node::File {
                durable: data.clone(),
                latest: data,
            });
        }
        ino
    }

    /// (parent directory, name) of a path inside the root.
    fn split(&self, p: &Path) -> Option<(Ino, String)> {
        let rel = p.strip_prefix(&self.root).ok()?;
        let name = rel.file_name()?.to_string_lossy().into_owned();
        let mut cur = 0;
        for c in rel.parent()?.components() {
            cur = self.child(cur, &c.as_os_str().to_string_lossy())?;
        }
        Some((cur, name))
    }

    fn child(&self, dir: Ino, name: &str) -> Option<Ino> {
        match &self.nodes[dir] {
            Node::Dir { latest, .. } => latest.get(name).copied(),
            Node::File { .. } => None,
        }
    }

    fn resolve(&self, p: &Path) -> Option<Ino> {
        if p == self.root {
            return Some(0);
        }
        let (d, n) = self.split(p)?;
        self.child(d, &n)
    }

    fn dir_op(&mut self, dir: Ino, op: DirOp) {
        if let Node::Dir {
            latest, pending, ..
        } = &mut self.nodes[dir]
        {
            apply_dir_ops(latest, std::slice::from_ref(&op));
            pending.push(op);
        }
    }

    fn apply(&mut self, op: &FsOp) {
        match op {
            FsOp::Create(p) | FsOp::Mkdir(p) => {
                let Some((d, n)) = self.split(p) else { return };
                let ino = self.nodes.len();
                self.nodes.push(match op {
                    FsOp::Create(_) => Node::File {
                        durable: Vec::new(),
                        latest: Vec::new(),
                    },
                    _ => Node::Dir {
                        durable: BTreeMap::new(),
                        latest: BTreeMap::new(),
                        pending: Vec::new(),
                    },
                });
                self.dir_op(d, DirOp::Add(n, ino));
            }
            FsOp::Write(p, data) => {
                if let Some(i) = self.resolve(p) {
                    if let Node::File { latest, .. } = &mut self.nodes[i] {
                        latest.clone_from(data);
                    }
                }
            }
            FsOp::Fsync(p) => {
                if let Some(i) = self.resolve(p) {
                    if let Node::File { durable, latest } = &mut self.nodes[i] {
                        durable.clone_from(latest);
                    }
                }
            }
            FsOp::Rename(a, b) | FsOp::Link(a, b) => {
                let (Some((da, na)), Some((db, nb))) = (self.split(a), self.split(b)) else {
                    return;
                };
                let Some(ino) = self.child(da, &na) else {
                    return;
                };
                if matches!(op, FsOp::Rename(..)) {
                    if da == db {
                        // One directory: the rename is atomic. Model it as
                        // one pending step (remove + add applied together).
                        self.dir_op(da, DirOp::Remove(na));
                        self.dir_op(da, DirOp::Add(nb, ino));
                        self.fuse_last_two(da);
                        return;
                    }
                    self.dir_op(da, DirOp::Remove(na));
                }
                self.dir_op(db, DirOp::Add(nb, ino));
            }
            FsOp::Unlink(p) | FsOp::Rmdir(p) => {
                if let Some((d, n)) = self.split(p) {
                    self.dir_op(d, DirOp::Remove(n));
                }
            }
            FsOp::FsyncDir(p) => {
                if let Some(i) = self.resolve(p) {
                    if let Node::Dir {
                        durable, pending, ..
                    } = &mut self.nodes[i]
                    {
                        apply_dir_ops(durable, pending);
                        pending.clear();
                    }
                }
            }
            FsOp::Mark(_) => {}
        }
    }

    /// Turns the last two pending ops of `dir` (a same-directory rename's
    /// remove and add) into one step, so no cut falls between them: a
    /// rename within a directory is atomic on a journaled file system.
    /// Encoded as an `Add` whose name is `\0rename\0<from>\0<to>`.
    fn fuse_last_two(&mut self, dir: Ino) {
        if let Node::Dir { pending, .. } = &mut self.nodes[dir] {
            let add = pending.pop();
            let rm = pending.pop();
            if let (Some(DirOp::Remove(r)), Some(DirOp::Add(n, i))) = (rm, add) {
                pending.push(DirOp::Add(format!("\0rename\0{r}\0{n}"), i));
            }
        }
    }

    /// Writes the crash state to `dst`: per directory, its durable names
    /// plus a prefix of its pending changes; per file, durable data or
    /// (for unsynced data) whatever `pick` chooses.
    fn materialize(&self, dst: &Path, strategy: Strategy, rng: &mut StdRng) {
        self.write_node(0, dst, strategy, rng);
    }

    fn write_node(&self, ino: Ino, dst: &Path, strategy: Strategy, rng: &mut StdRng) {
        match &self.nodes[ino] {
            Node::File { durable, latest } => {
                let data = if durable == latest {
                    durable.clone()
                } else {
                    match strategy {
                        Strategy::Lazy | Strategy::EagerNames => durable.clone(),
                        Strategy::Random => match rng.random_range(0..3) {
                            0 => durable.clone(),
                            1 => latest.clone(),
                            _ => latest[..latest.len() / 2].to_vec(),
                        },
                    }
                };
                std::fs::write(dst, data).unwrap();
            }
            Node::Dir {
                durable, pending, ..
            } => {
                std::fs::create_dir_all(dst).unwrap();
                let k = match strategy {
                    Strategy::Lazy => 0,
                    Strategy::EagerNames => pending.len(),
                    Strategy::Random => rng.random_range(0..=pending.len()),
                };
                let mut entries = durable.clone();
                apply_dir_ops(&mut entries, &pending[..k]);
                for (name, child) in entries {
                    self.write_node(child, &dst.join(name), strategy, rng);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    Lazy,
    EagerNames,
    Random,
}

/// The model itself: unsynced data is dropped, names persist only as a
/// prefix per directory, a same-directory rename is never half-done.
#[test]
fn f32_model_keeps_renames_atomic_and_drops_unsynced_data() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/old"), b"old").unwrap();
    let mut m = Model::load(dir.path());
    let d = dir.path().join("d");
    let tmp = d.join("x.tmp");
    for op in [
        FsOp::Create(tmp.clone()),
        FsOp::Write(tmp.clone(), b"new".to_vec()),
        FsOp::Fsync(tmp.clone()),
        FsOp::Rename(tmp.clone(), d.join("old")),
        FsOp::Create(d.join("unsynced")),
        FsOp::Write(d.join("unsynced"), b"data".to_vec()),
    ] {
        m.apply(&op);
    }
    let mut rng = StdRng::seed_from_u64(1);
    let state = |m: &Model, s: Strategy, rng: &mut StdRng| {
        let out = tempfile::tempdir().unwrap();
        m.materialize(out.path(), s, rng);
        let mut files: Vec<(String, Vec<u8>)> = all_files(out.path())
            .into_iter()
            .map(|f| {
                (
                    f.strip_prefix(out.path()).unwrap().display().to_string(),
                    std::fs::read(&f).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let file = |n: &str, d: &[u8]| (n.to_string(), d.to_vec());
    // Nothing of the directory synced: the old state.
    assert_eq!(state(&m, Strategy::Lazy, &mut rng), [file("d/old", b"old")]);
    // Names persisted; synced data kept, unsynced data lost.
    assert_eq!(
        state(&m, Strategy::EagerNames, &mut rng),
        [file("d/old", b"new"), file("d/unsynced", b"")]
    );
    // Random cuts never leave both names of a rename, nor a temp name
    // without its rename having been undone.
    for _ in 0..50 {
        let s = state(&m, Strategy::Random, &mut rng);
        let names: Vec<_> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"d/old"), "{names:?}");
        assert!(
            !(names.contains(&"d/x.tmp") && names.len() > 2),
            "{names:?}"
        );
    }
    m.apply(&FsOp::FsyncDir(d.clone()));
    assert_eq!(
        state(&m, Strategy::Lazy, &mut rng),
        [file("d/old", b"new"), file("d/unsynced", b"")]
    );
    // A rename without an fsync of the data first (PBS 647186dd's bug):
    // the eager state has the final name with no data, which the replay
    // of the repository below would catch.
    let y = d.join("y.tmp");
    for op in [
        FsOp::Create(y.clone()),
        FsOp::Write(y.clone(), b"zzz".to_vec()),
        FsOp::Rename(y, d.join("y")),
    ] {
        m.apply(&op);
    }
    assert!(state(&m, Strategy::EagerNames, &mut rng).contains(&file("d/y", b"")));
}

#[test]
fn f32_power_loss_at_every_fsync_barrier_and_random_cuts() {
    let _g = serial();
    let dir = scratch_dir();

    let root = dir.path().to_owned();
    let repo = init_repo(&root, None);
    for n in 0..3 {
        try_backup(&repo, n).unwrap();
    }
    let initial: BTreeSet<BackupId> = repo
        .list_backups(None)
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    drop(repo);
    let model0 = Model::load(&root);

    // The recorded run: a backup, a prune (removes two) and a GC.
    let repo = Repository::open(&root, None).unwrap();
    failpoint::record_start();
    let b3 = try_backup(&repo, 3).unwrap();
    let mut log = failpoint::record_take();
    log.push(FsOp::Mark(format!("committed {b3}")));
    failpoint::record_start();
    let keep = KeepOptions {
        last: Some(2),
        ..KeepOptions::default()
    };
    repo.prune(&VmId::new("100").unwrap(), &keep, false)
        .unwrap();
    repo.gc(&GcOptions::default()).unwrap();
    log.extend(failpoint::record_take());
    drop(repo);
    let committed_at = log.iter().position(|o| matches!(o, FsOp::Mark(_))).unwrap();
    let syncs = log
        .iter()
        .filter(|o| matches!(o, FsOp::Fsync(_) | FsOp::FsyncDir(_)))
        .count();
    assert!(syncs >= 10, "too few fsyncs logged: {log:#?}");
    assert!(
        log.iter().any(|o| matches!(o, FsOp::Rmdir(_))),
        "prune/GC removed nothing"
    );

    // Cuts: before every fsync barrier and at the end (lazy and eager),
    // plus random cuts with random states.
    let mut cuts: Vec<(usize, Strategy)> = Vec::new();
    for (i, o) in log.iter().enumerate() {
        if matches!(o, FsOp::Fsync(_) | FsOp::FsyncDir(_) | FsOp::Mark(_)) {
            cuts.push((i, Strategy::Lazy));
            cuts.push((i, Strategy::EagerNames));
        }
    }
    cuts.push((log.len(), Strategy::Lazy));
    cuts.push((log.len(), Strategy::EagerNames));
    let extra: usize = std::env::var("SHEAR_POWER_LOSS_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut rng = StdRng::seed_from_u64(0x5eed_0032);
    for _ in 0..16 + extra {
        cuts.push((rng.random_range(0..=log.len()), Strategy::Random));
    }

    let mut prefix_model = model0.clone();
    let mut applied = 0;
    cuts.sort_by_key(|c| c.0);
    let mut next_n = 100;
    let mut states = 0;
    let started = std::time::Instant::now();
    for (k, strategy) in cuts {
        while applied < k {
            prefix_model.apply(&log[applied]);
            applied += 1;
        }
        states += 1;
        let ctx = format!("power cut before op {k}/{} ({strategy:?})", log.len());
        let state = scratch_dir();
        prefix_model.materialize(state.path(), strategy, &mut rng);
        let repo = Repository::open(state.path(), None)
            .unwrap_or_else(|e| panic!("{ctx}: the repository does not open: {e}"));
        let listed = check_listed(&repo, Some(&b3), &ctx);
        // Reported committed before the cut: there.
        if k > committed_at {
            assert!(listed.contains(&b3), "{ctx}: committed {b3} lost");
        }
        // Earlier backups: there until prune may have removed them.
        let prune_started = k > committed_at + 1;
        let newest: Vec<_> = initial.iter().rev().take(1).collect();
        for id in &initial {
            if !prune_started || newest.contains(&id) {
                assert!(listed.contains(id), "{ctx}: earlier {id} lost");
            }
        }
        // Nothing that is not one of ours.
        for id in &listed {
            assert!(*id == b3 || initial.contains(id), "{ctx}: stray {id}");
        }
        // The next backup and a GC work without repair.
        next_n += 1;
        try_backup(&repo, next_n).unwrap_or_else(|e| panic!("{ctx}: next backup: {e}"));
        repo.gc(&GcOptions::default())
            .unwrap_or_else(|e| panic!("{ctx}: gc: {e}"));
        let after = check_listed(&repo, Some(&b3), &ctx);
        assert_eq!(after.len(), listed.len() + 1, "{ctx}: GC changed the list");
        for f in all_files(state.path()) {
            assert!(
                !f.to_string_lossy().contains(".tmp-"),
                "{ctx}: temp file left after GC: {}",
                f.display()
            );
        }
    }
    eprintln!(
        "power loss: {states} crash states over {} logged operations ({syncs} fsyncs) in {:?}",
        log.len(),
        started.elapsed()
    );
}
