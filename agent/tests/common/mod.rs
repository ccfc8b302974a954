//! Helpers shared by the repository integration tests.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use shear::repo::{
    BackupId, BackupMeta, CommitInfo, DiskSpec, InitOptions, Key, Repository, RestoreOptions,
};
use time::OffsetDateTime;

/// Small chunks keep the tests fast while exercising many chunks.
pub const CHUNK: u32 = 64 << 10;

pub fn init_repo(dir: &Path, key: Option<Key>) -> Repository {
    Repository::init(
        dir,
        key,
        &InitOptions {
            chunk_size: CHUNK,
            zstd_level: 1,
            ..InitOptions::default()
        },
    )
    .unwrap()
}

/// A deterministic image: per chunk, one of random / text-like / zero.
pub fn image(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    for c in v.chunks_mut(CHUNK as usize) {
        match rng.random_range(0..3) {
            0 => rng.fill(c),
            1 => {
                let base: u8 = rng.random();
                for (i, b) in c.iter_mut().enumerate() {
                    *b = base.wrapping_add((i % 97) as u8);
                }
            }
            _ => {}
        }
    }
    v
}

pub fn t(n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + n).unwrap()
}

/// Backs up `disks` as one backup of `vmid` at time `t(time)`.
pub fn backup(repo: &Repository, vmid: &str, time: i64, disks: &[(&str, &[u8])]) -> BackupId {
    let mut meta = BackupMeta::new(vmid, &format!("vm-{vmid}"));
    meta.time = Some(t(time));
    let s = repo.begin_backup(&meta).unwrap();
    for (name, data) in disks {
        let d = s.add_disk(&DiskSpec::new(name, data.len() as u64)).unwrap();
        for (i, c) in data.chunks(CHUNK as usize).enumerate() {
            d.put_chunk(i as u64, c).unwrap();
        }
        d.finish().unwrap();
    }
    s.commit(&CommitInfo::default()).unwrap()
}

pub fn restore_raw(repo: &Repository, id: &BackupId, disk: &str, dir: &Path) -> Vec<u8> {
    let r = repo
        .restore_disk(
            id,
            disk,
            dir,
            &RestoreOptions {
                force: true,
                ..RestoreOptions::default()
            },
        )
        .unwrap();
    std::fs::read(&r.path).unwrap()
}

/// Every chunk file in the repository (not quarantined ones).
pub fn chunk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(root.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_none() && !p.to_string_lossy().contains(".tmp-") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn chunk_bytes(root: &Path) -> u64 {
    chunk_files(root)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Every file under `root`, recursively.
pub fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn chunk_path(root: &Path, digest_hex: &str) -> PathBuf {
    root.join("chunks").join(&digest_hex[..2]).join(digest_hex)
}

pub fn has_qemu_img() -> bool {
    std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A missing prerequisite: a failure unless the user asked for skips with
/// `SHEAR_ALLOW_SKIP=1` (never under `CI=true`); an allowed skip is printed
/// and appended to `$SHEAR_SKIP_LOG` for `scripts/test`'s summary. Returns
/// `false` so a test can `return` on it. (Same rule as `shear_tests::prereq`.)
#[allow(dead_code)]
pub fn skip(what: &str) -> bool {
    use std::io::Write;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let allowed = !ci && std::env::var("SHEAR_ALLOW_SKIP").is_ok_and(|v| v == "1");
    assert!(
        allowed,
        "prerequisite missing: {what}; a missing prerequisite is a failure (set \
         SHEAR_ALLOW_SKIP=1 to skip instead)"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_string();
    eprintln!("SKIP: {test}: {what}");
    if let Some(log) = std::env::var_os("SHEAR_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {what}");
        }
    }
    false
}
