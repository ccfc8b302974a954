//! S3 repositories against a real S3 server (a single Garage node, built by
//! `scripts/setup` into /opt/shear-test/garage; crate `shear-test-s3`),
//! through a small fault-injecting HTTP proxy: 503 answers, a server
//! SIGKILLed mid-backup, listings of one key per page, a skewed server
//! clock, denied DELETEs, damaged uploads, cut downloads, request counts
//! for dedup.
// Test code: unwrap is the assertion.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
#[path = "common/s3.rs"]
mod s3;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{image, restore_raw, t, CHUNK};
use s3::{env_for, s3_repo, start_garage, start_proxy, Faults, Garage};
use shear::repo::{
    BackupMeta, CommitInfo, DiskSpec, InitOptions, KeepOptions, Repository, VerifyTarget,
};

/// Garage with bucket `shear`, the fault proxy in front of it, and this
/// process's AWS environment pointing at the proxy.
fn garage_behind_proxy() -> Option<(Garage, Arc<Faults>)> {
    let garage = start_garage()?;
    let faults = Arc::new(Faults::default());
    let proxy = start_proxy(garage.port, Arc::clone(&faults));
    env_for(&garage.creds(), proxy);
    Some((garage, faults))
}

fn opts() -> InitOptions {
    InitOptions {
        chunk_size: CHUNK,
        zstd_level: 1,
        ..InitOptions::default()
    }
}

fn backup(repo: &Repository, time: i64, data: &[u8]) -> shear::repo::Result<shear::repo::BackupId> {
    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(time));
    let s = repo.begin_backup(&meta)?;
    let d = s.add_disk(&DiskSpec::new("scsi0", data.len() as u64))?;
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        d.put_chunk(i as u64, c)?;
    }
    d.finish()?;
    s.commit(&CommitInfo::default())
}

/// init, backup, list, verify, restore byte-identical, dedup (second backup
/// uploads only its index and manifest), prune and GC on S3.
#[test]
fn s3_repository_round_trip_dedup_prune_gc() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    // Every listing one key per page: the server's pagination is followed
    // to the end (F-41: a short listing would make GC delete referenced
    // chunks).
    std::env::set_var("SHEAR_S3_LIST_PAGE_KEYS", "1");
    let loc = s3_repo("round-trip");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    assert_eq!(repo.location(), "s3://shear/round-trip");
    let again = Repository::init(&loc, None, &opts()).unwrap_err();
    assert_eq!(
        again.kind(),
        shear::repo::ErrorKind::AlreadyExists,
        "{again}"
    );

    let data = image(7, 48 * CHUNK as usize);
    let a = backup(&repo, 1, &data).unwrap();
    let repo = Repository::open(&loc, None).unwrap();
    let list = repo.list_backups(None).unwrap();
    assert_eq!(list.len(), 1);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &a, "scsi0", dir.path()), data);
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert!(v.chunks_checked > 10);

    // Dedup: same data again. Chunk uploads would be PUTs of ~64 KiB.
    let (p0, b0) = (
        faults.puts.load(Ordering::Acquire),
        faults.put_bytes.load(Ordering::Acquire),
    );
    let b = backup(&repo, 2, &data).unwrap();
    let (puts, bytes) = (
        faults.puts.load(Ordering::Acquire) - p0,
        faults.put_bytes.load(Ordering::Acquire) - b0,
    );
    eprintln!("second backup: {puts} PUTs, {bytes} bytes");
    let m = repo.load_manifest(&b).unwrap();
    assert_eq!(m.disks[0].new_chunks, 0);
    // marker (2 writes + heartbeats), index, manifest, clock probes.
    assert!(puts <= 8, "{puts} PUTs for a deduplicated backup");
    assert!(
        bytes < 16 << 10,
        "{bytes} bytes uploaded for a deduplicated backup"
    );

    // A third backup with different data, then prune to the last one and
    // GC: the first data's chunks go, the kept backup still restores.
    let other = image(8, 48 * CHUNK as usize);
    let c = backup(&repo, 3, &other).unwrap();
    let keep = KeepOptions {
        last: Some(1),
        ..KeepOptions::default()
    };
    let pr = repo
        .prune(&shear::repo::VmId::new("100").unwrap(), &keep, false)
        .unwrap();
    assert_eq!(pr.iter().filter(|e| e.removed).count(), 2);
    s3::wait_past_gc_start_resolution();
    let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
    assert!(g.deferred.is_none(), "{g:?}");
    assert!(g.chunks_removed > 0, "{g:?}");
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert_eq!(repo.list_backups(None).unwrap().len(), 1);
    assert_eq!(restore_raw(&repo, &c, "scsi0", dir.path()), other);
    let l0 = faults.lists.load(Ordering::Acquire);
    let chunks = repo.backend().list_objects("chunks").unwrap().len() as u64;
    let pages = faults.lists.load(Ordering::Acquire) - l0;
    assert!(
        chunks > 10 && pages >= chunks,
        "{chunks} chunk objects came in {pages} listing pages: not one key per page"
    );
}

/// 503 answers are retried with backoff: the backup succeeds and restores
/// byte-identical.
#[test]
fn s3_server_503_is_retried() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let loc = s3_repo("retry");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    faults.every.store(3, Ordering::Release);
    faults.inject_max.store(40, Ordering::Release);
    let data = image(11, 32 * CHUNK as usize);
    let id = backup(&repo, 1, &data).unwrap();
    let injected = faults.injected.load(Ordering::Acquire);
    assert!(injected >= 10, "only {injected} faults injected");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "scsi0", dir.path()), data);
    eprintln!("{injected} requests answered 503 and retried");
}

/// A server SIGKILLed mid-backup (F-31 on the server side): the backup
/// fails with a storage error, nothing incomplete is listed, the earlier
/// backup still verifies and restores, and once the server is back the
/// same backup run again commits and restores byte-identical.
#[test]
fn s3_server_killed_mid_backup_lists_nothing_and_retry_works_f31() {
    let Some((mut garage, _faults)) = garage_behind_proxy() else {
        return;
    };
    std::env::set_var("SHEAR_S3_RETRIES", "2");
    std::env::set_var("SHEAR_S3_RETRY_TIMEOUT", "3");
    let loc = s3_repo("killed");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    let first = image(21, 16 * CHUNK as usize);
    let a = backup(&repo, 1, &first).unwrap();

    let second = image(22, 32 * CHUNK as usize);
    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(2));
    let s = repo.begin_backup(&meta).unwrap();
    let d = s
        .add_disk(&DiskSpec::new("scsi0", second.len() as u64))
        .unwrap();
    let mut failed = None;
    for (i, c) in second.chunks(CHUNK as usize).enumerate() {
        if i == 8 {
            garage.kill();
        }
        if let Err(e) = d.put_chunk(i as u64, c) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("the backup went on with a dead server");
    assert!(
        matches!(e, shear::repo::RepoError::Io { .. }),
        "not a storage error: {e}"
    );
    drop(d);
    drop(s); // its cleanup fails too: the server is still dead
    garage
        .restart()
        .unwrap_or_else(|e| panic!("garage did not restart: {e}"));

    let repo = Repository::open(&loc, None).unwrap();
    let list = repo.list_backups(None).unwrap();
    assert_eq!(
        list.iter().map(|b| b.id.clone()).collect::<Vec<_>>(),
        vec![a.clone()]
    );
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &a, "scsi0", dir.path()), first);

    // The retry: the same data again, committed and byte-identical.
    let b = backup(&repo, 3, &second).unwrap();
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);
    assert_eq!(restore_raw(&repo, &b, "scsi0", dir.path()), second);
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
}

/// F-36 on an object store: GC runs while a backup that deduplicated
/// against unreferenced chunks is in progress; it deletes none of them
/// (it defers), the backup commits and restores byte-identical. F-38: a
/// writer whose marker went stale (stopped past its lease) refuses to
/// commit.
#[test]
fn s3_gc_never_deletes_chunks_of_running_backup_f36_f38() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let loc = s3_repo("gc-race");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    let data = image(31, 24 * CHUNK as usize);
    let a = backup(&repo, 1, &data).unwrap();
    repo.forget(&a).unwrap(); // every chunk is unreferenced now

    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(2));
    let s = repo.begin_backup(&meta).unwrap();
    let d = s
        .add_disk(&DiskSpec::new("scsi0", data.len() as u64))
        .unwrap();
    let mut dedup = 0;
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        if d.put_chunk(i as u64, c).unwrap() == shear::repo::writer::ChunkOutcome::Deduplicated {
            dedup += 1;
        }
    }
    assert!(dedup > 5, "the backup did not deduplicate ({dedup})");
    let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
    assert!(
        g.deferred.is_some(),
        "GC did not see the running backup: {g:?}"
    );
    assert_eq!(g.chunks_removed, 0);
    d.finish().unwrap();
    let b = s.commit(&CommitInfo::default()).unwrap();
    let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
    assert!(g.deferred.is_none(), "{g:?}");
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &b, "scsi0", dir.path()), data);

    // F-38: a lease of 2 s, a writer that stalls 3 s before commit.
    std::env::set_var("SHEAR_S3_LEASE_SECS", "2");
    let mut meta = BackupMeta::new("100", "vm-100");
    meta.time = Some(t(3));
    let s = repo.begin_backup(&meta).unwrap();
    let d = s
        .add_disk(&DiskSpec::new("scsi0", data.len() as u64))
        .unwrap();
    for (i, c) in data.chunks(CHUNK as usize).enumerate() {
        d.put_chunk(i as u64, c).unwrap();
    }
    d.finish().unwrap();
    faults.dead.store(true, Ordering::Release); // heartbeats fail
    std::thread::sleep(Duration::from_secs(3));
    faults.dead.store(false, Ordering::Release);
    let e = s.commit(&CommitInfo::default()).unwrap_err();
    assert!(
        matches!(e, shear::repo::RepoError::Busy { .. }) && e.to_string().contains("not renewed"),
        "{e}"
    );
    assert_eq!(repo.list_backups(None).unwrap().len(), 1);
}

/// F-37 on an object store: the server's clock two days behind, then two
/// days ahead of this host's (the proxy shifts every time the server
/// reports: `Last-Modified`, `Date`, listings). shear compares server times
/// only with server times: GC still defers to a running backup's marker
/// (which this host's clock would call two days old, long dead), keeps
/// unreferenced chunks younger than the grace period (two days old, or
/// from the future, by this host's clock), and deletes them once past it.
#[test]
fn f37_s3_server_clock_skew_changes_no_gc_decision() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    std::env::set_var("SHEAR_S3_GC_GRACE_SECS", "3600");
    let loc = s3_repo("skew");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    for (n, skew) in [(0i64, -2 * 86_400i64), (10, 2 * 86_400)] {
        faults.skew_secs.store(skew, Ordering::Release);
        let data = image(81 + n.unsigned_abs(), 12 * CHUNK as usize);
        let a = backup(&repo, n + 1, &data).unwrap();
        repo.forget(&a).unwrap(); // its chunks: unreferenced, seconds old
                                  // A backup running that deduplicates against them.
        let mut meta = BackupMeta::new("100", "vm-100");
        meta.time = Some(t(n + 2));
        let s = repo.begin_backup(&meta).unwrap();
        let d = s
            .add_disk(&DiskSpec::new("scsi0", data.len() as u64))
            .unwrap();
        for (i, c) in data.chunks(CHUNK as usize).enumerate() {
            d.put_chunk(i as u64, c).unwrap();
        }
        let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
        assert!(
            g.deferred.is_some(),
            "server clock {skew:+} s: GC did not see the running backup: {g:?}"
        );
        assert_eq!(g.chunks_removed, 0, "{g:?}");
        d.finish().unwrap();
        let b = s.commit(&CommitInfo::default()).unwrap();
        repo.forget(&b).unwrap();
        let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
        assert!(g.deferred.is_none(), "{g:?}");
        assert_eq!(
            g.chunks_removed, 0,
            "server clock {skew:+} s: chunks younger than the grace period were deleted: {g:?}"
        );
        assert!(g.chunks_kept > 4, "{g:?}");
    }
    // Past the grace period (now 0 s; server times have 1 s resolution).
    std::env::set_var("SHEAR_S3_GC_GRACE_SECS", "0");
    s3::wait_past_gc_start_resolution();
    let g = repo.gc(&shear::repo::gc::GcOptions::default()).unwrap();
    assert!(g.chunks_removed > 8, "{g:?}");
    assert!(repo.list_backups(None).unwrap().is_empty());
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
}

/// `--repo` with a URL scheme never becomes a local directory named
/// `s3:` or `gs:` (it did before: the path was taken literally).
#[test]
fn repo_url_is_not_a_local_directory() {
    let cwd = tempfile::tempdir().unwrap();
    for url in ["gs://bucket/p", "s3://shear-none/p"] {
        let out = Command::new(env!("CARGO_BIN_EXE_shear"))
            .current_dir(cwd.path())
            .args(["--repo", url, "init"])
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "y")
            .env("SHEAR_S3_RETRIES", "0")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}: init succeeded");
        let left: Vec<_> = std::fs::read_dir(cwd.path()).unwrap().collect();
        assert!(
            left.is_empty(),
            "{url}: left {left:?} in the working directory"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        if url.starts_with("gs") {
            assert!(err.contains("unsupported scheme gs://"), "{err}");
        } else {
            assert!(
                err.contains("127.0.0.1:1") || err.contains("onnect"),
                "{err}"
            );
        }
    }
    let _ = Path::new("");
}

/// `shear sync` local → S3 → local: identical restores and digests; a sync
/// interrupted (server dead) lists nothing incomplete and the rerun copies
/// only what did not arrive.
#[test]
fn s3_sync_local_to_s3_and_back_resumes() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    std::env::set_var("SHEAR_S3_RETRIES", "1");
    std::env::set_var("SHEAR_S3_RETRY_TIMEOUT", "2");
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    let src = common::init_repo(&local, None);
    let d1 = image(41, 32 * CHUNK as usize);
    let d2 = image(42, 32 * CHUNK as usize);
    let a = common::backup(&src, "100", 1, &[("scsi0", &d1)]);
    let b = common::backup(&src, "100", 2, &[("scsi0", &d2)]);
    let loc = s3_repo("sync");
    let s3 = Repository::init(&loc, None, &opts()).unwrap();

    // Interrupted: the server dies after a few requests.
    let sync_opts = shear::repo::sync::SyncOptions {
        verify: true,
        ..Default::default()
    };
    faults.every.store(0, Ordering::Release);
    let stop_after = faults.puts.load(Ordering::Acquire) + 12;
    let f2 = Arc::clone(&faults);
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while f2.puts.load(Ordering::Acquire) < stop_after && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        f2.dead.store(true, Ordering::Release);
    });
    shear::repo::sync::sync(&src, &s3, &sync_opts).unwrap_err();
    killer.join().unwrap();
    faults.dead.store(false, Ordering::Release);
    assert!(
        s3.list_backups(None).unwrap().is_empty(),
        "an incomplete backup is listed"
    );

    let r = shear::repo::sync::sync(&src, &s3, &sync_opts).unwrap();
    assert_eq!(r.copied, vec![a.clone(), b.clone()]);
    assert!(
        r.chunks_present > 0,
        "the rerun copied everything again: {r:?}"
    );
    let again = shear::repo::sync::sync(&src, &s3, &sync_opts).unwrap();
    assert_eq!(
        (
            again.copied.len(),
            again.already_present,
            again.chunks_copied
        ),
        (0, 2, 0)
    );
    let v = s3.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");

    // And back to a new local repository.
    let back = common::init_repo(&dir.path().join("back"), None);
    let r = shear::repo::sync::sync(&s3, &back, &sync_opts).unwrap();
    assert_eq!(r.copied.len(), 2);
    for (id, data) in [(&a, &d1), (&b, &d2)] {
        let m0 = src.load_manifest(id).unwrap();
        let m1 = back.load_manifest(id).unwrap();
        assert_eq!(m0.disks[0].image_digest, m1.disks[0].image_digest);
        let out = dir.path().join(format!("r-{}", id.time_str()));
        std::fs::create_dir_all(&out).unwrap();
        assert_eq!(&restore_raw(&back, id, "scsi0", &out), data);
    }
    assert!(back.verify(&VerifyTarget::All, 2).unwrap().is_clean());
}

/// F-40: credentials without s3:DeleteObject (every DELETE answered 403
/// AccessDenied): backups still work and restore byte-identical; prune
/// fails saying access was denied, and removes nothing.
#[test]
fn f40_s3_credentials_without_delete_back_up_and_prune_fails_clearly() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let loc = s3_repo("no-delete");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    faults.deny_deletes.store(true, Ordering::Release);
    let d1 = image(51, 8 * CHUNK as usize);
    let d2 = image(52, 8 * CHUNK as usize);
    backup(&repo, 1, &d1).unwrap();
    let b = backup(&repo, 2, &d2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &b, "scsi0", dir.path()), d2);
    let keep = KeepOptions {
        last: Some(1),
        ..KeepOptions::default()
    };
    let e = repo
        .prune(&shear::repo::VmId::new("100").unwrap(), &keep, false)
        .unwrap_err();
    let msg = shear::chain(&e);
    assert!(
        msg.contains("403") || msg.contains("Access Denied") || msg.contains("AccessDenied"),
        "{msg}"
    );
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);
}

/// F-40: PUT bodies corrupted on the way (a byte flipped by the proxy in
/// the first 2 chunk uploads). Garage checks each body against the signed
/// SHA-256 and `x-amz-checksum-sha256` and refuses it (400 InvalidDigest,
/// which object_store does not retry): shear uploads it again, the backup
/// verifies clean and restores byte-identical. Every chunk upload damaged:
/// the backup fails after 3 attempts, naming the chunk as corrupt.
#[test]
fn f40_s3_corrupted_uploads_are_refused_by_the_server_and_uploaded_again() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let loc = s3_repo("corrupt-put");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    faults.corrupt_puts.store(2, Ordering::Release);
    let data = image(61, 16 * CHUNK as usize);
    let id = backup(&repo, 1, &data).unwrap();
    assert_eq!(faults.corrupted.load(Ordering::Acquire), 2);
    let v = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(v.is_clean(), "{v:?}");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "scsi0", dir.path()), data);

    faults.corrupted.store(0, Ordering::Release);
    faults.corrupt_puts.store(u64::MAX, Ordering::Release);
    let e = backup(&repo, 2, &image(62, 4 * CHUNK as usize)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, shear::repo::RepoError::Corrupt { .. })
            && msg.contains("chunks/")
            && msg.contains("InvalidDigest")
            && msg.contains("3 times"),
        "{e:?}"
    );
    // (Chunk uploads run in parallel: other chunks were damaged too.)
    assert!(faults.corrupted.load(Ordering::Acquire) >= 3, "{e}");
    assert_eq!(repo.list_backups(None).unwrap().len(), 1);
}

/// `sync --streams`: with 40 ms added to every request (a long link, by the
/// proxy), 8 streams really keep more requests in flight at once than one
/// stream does (counted by the proxy); both copies restore
/// byte-identical. How much faster that is is a figure for the bench, not
/// a timed assertion here (times are printed only).
#[test]
fn s3_sync_streams_keep_requests_in_flight() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = common::init_repo(&dir.path().join("src"), None);
    let data = image(91, 48 * CHUNK as usize);
    let id = common::backup(&src, "100", 1, &[("scsi0", &data)]);
    let mut most = Vec::new();
    for streams in [1usize, 8] {
        let loc = s3_repo(&format!("streams-{streams}"));
        let dst = Repository::init(&loc, None, &opts()).unwrap();
        faults.delay_ms.store(40, Ordering::Release);
        faults.max_inflight.store(0, Ordering::Release);
        let t = Instant::now();
        let r = shear::repo::sync::sync(
            &src,
            &dst,
            &shear::repo::sync::SyncOptions {
                streams,
                ..Default::default()
            },
        )
        .unwrap();
        let took = t.elapsed();
        faults.delay_ms.store(0, Ordering::Release);
        let max = faults.max_inflight.load(Ordering::Acquire);
        eprintln!(
            "sync with {streams} stream(s), 40 ms per request: {} chunks in {took:?}, \
             at most {max} request(s) in flight",
            r.chunks_copied
        );
        assert!(r.chunks_copied > 16, "{r:?}");
        most.push(max);
        let out = tempfile::tempdir().unwrap();
        assert_eq!(restore_raw(&dst, &id, "scsi0", out.path()), data);
    }
    // One stream still overlaps a few requests of its own (metadata beside
    // the chunk copy), so compare with it rather than with 1.
    assert!(
        most[1] >= 6 && most[1] > most[0],
        "8 streams kept at most {} requests in flight, 1 stream {}",
        most[1],
        most[0]
    );
}

/// F-40: GET bodies cut short (the proxy closes the connection after half
/// of a chunk's body). A few such cuts are retried (resumed) and the
/// restore is byte-identical; a cut on every GET fails with a typed error
/// naming the chunk object, not with a digest error or a short restore.
#[test]
fn f40_s3_truncated_get_body_is_retried_and_persistent_cut_names_the_object() {
    let Some((_garage, faults)) = garage_behind_proxy() else {
        return;
    };
    let loc = s3_repo("truncated-get");
    let repo = Repository::init(&loc, None, &opts()).unwrap();
    let data = image(71, 16 * CHUNK as usize);
    let id = backup(&repo, 1, &data).unwrap();

    faults.truncate_gets.store(3, Ordering::Release);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "scsi0", dir.path()), data);
    assert_eq!(
        faults.truncated.load(Ordering::Acquire),
        3,
        "the proxy cut fewer GET bodies than asked"
    );

    // Every chunk GET cut short: after a bounded number of retries, the
    // read fails saying which object.
    std::env::set_var("SHEAR_S3_RETRIES", "2");
    std::env::set_var("SHEAR_S3_RETRY_TIMEOUT", "10");
    let repo = Repository::open(&loc, None).unwrap();
    faults.truncated.store(0, Ordering::Release);
    faults.truncate_gets.store(u64::MAX, Ordering::Release);
    let t0 = Instant::now();
    let reader = repo.open_backup(&id).unwrap();
    let disk = reader.open_disk("scsi0").unwrap();
    let first = data
        .chunks(CHUNK as usize)
        .position(|c| c.iter().any(|&b| b != 0))
        .unwrap() as u64;
    let e = disk.read_chunk(first).unwrap_err();
    let took = t0.elapsed();
    let digest = hex::encode(disk.entries()[first as usize]);
    match &e {
        shear::repo::RepoError::Io { op, path, source } => {
            assert_eq!(*op, "read the whole body of", "{e}");
            assert!(
                path.to_string_lossy()
                    .ends_with(&format!("chunks/{}/{digest}", &digest[..2])),
                "the error does not name the chunk object {digest}: {e}"
            );
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        }
        other => panic!("not a read error naming the object: {other:?}"),
    }
    let cuts = faults.truncated.load(Ordering::Acquire);
    assert!(
        (2..=8).contains(&cuts),
        "{cuts} cut bodies for one read: the retries are not bounded as configured"
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    eprintln!(
        "persistent cut: {} after {cuts} cut bodies, {took:?}",
        shear::chain(&e)
    );
}
