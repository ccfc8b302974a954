//! Immutability (issue 14 §3): append-only repositories, where the backup
//! writer cannot delete or overwrite anything and prune/forget/GC need the
//! admin token; S3 Object Lock against moto 5.2.5 (Garage, the S3 server
//! of the other S3 tests, has no Object Lock: no versioning, retention or
//! legal hold); F-41 listings and `[s3]` settings against Garage.
// Test code: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{backup, image, restore_raw, CHUNK};
use shear::repo::gc::GcOptions;
use shear::repo::immut::{admin_token_hash, AppendOnly};
use shear::repo::{ErrorKind, InitOptions, KeepOptions, Repository, VerifyTarget, VmId};

fn append_only_repo(dir: &Path, token: &str) -> Repository {
    Repository::init(
        dir,
        None,
        &InitOptions {
            chunk_size: CHUNK,
            zstd_level: 1,
            append_only: Some(AppendOnly {
                admin_token_hash: admin_token_hash(token),
            }),
            ..InitOptions::default()
        },
    )
    .unwrap()
}

/// The writer backs up as usual; every deletion (prune, forget, GC,
/// unprotect, a raw backend delete/rename) and every overwrite of a
/// manifest is refused until the admin token is given; a wrong token is
/// refused too; with the right one prune and GC work.
#[test]
fn append_only_refuses_deletes_and_overwrites_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let token = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let repo = append_only_repo(&root, token);
    let a = image(1, 8 * CHUNK as usize);
    let b = image(2, 8 * CHUNK as usize);
    let id_a = backup(&repo, "100", 1, &[("scsi0", &a)]);
    let id_b = backup(&repo, "100", 2, &[("scsi0", &b)]);
    // Same data again: the existing chunks are left as they are.
    let id_c = backup(&repo, "100", 3, &[("scsi0", &b)]);

    let repo = Repository::open(&root, None).unwrap();
    assert!(repo.is_append_only());
    let keep = KeepOptions {
        last: Some(1),
        ..KeepOptions::default()
    };
    let vm = VmId::new("100").unwrap();
    let e = repo.prune(&vm, &keep, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("append-only"), "{e}");
    // A dry run only reports.
    assert_eq!(repo.prune(&vm, &keep, true).unwrap().len(), 3);
    let e = repo.forget(&id_a).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = repo.gc(&GcOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    repo.set_protected(&id_a, true).unwrap();
    let e = repo.set_protected(&id_a, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    // The backend itself refuses, whoever calls it.
    let be = repo.backend();
    let dkey = format!("backups/vm/100/{}", id_b.time_str());
    let mkey = format!("{dkey}/manifest.blob");
    let before = std::fs::read(root.join(&mkey)).unwrap();
    assert_eq!(
        be.delete(&mkey).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        be.put(&mkey, b"ransom").unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        be.remove_tree(&dkey).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        be.rename(&dkey, "backups/vm/100/x").unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    assert_eq!(std::fs::read(root.join(&mkey)).unwrap(), before);
    assert_eq!(repo.list_backups(None).unwrap().len(), 3);
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());

    // A wrong token changes nothing.
    let e = repo.authorize_admin(&"f".repeat(64)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = repo.prune(&vm, &keep, false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    // The admin: prune and GC work (protected a is kept).
    repo.authorize_admin(token).unwrap();
    let pr = repo.prune(&vm, &keep, false).unwrap();
    assert_eq!(pr.iter().filter(|e| e.removed).count(), 1, "{pr:?}");
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(g.backups_marked, 2, "{g:?}");
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id_a, "scsi0", out.path()), a);
    assert_eq!(restore_raw(&repo, &id_c, "scsi0", out.path()), b);
}

fn shear(repo: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shear"))
        .arg("--repo")
        .arg(repo)
        .args(args)
        .env_remove("SHEAR_KEYFILE")
        .env_remove("SHEAR_REPO")
        .env_remove("SHEAR_ADMIN_TOKEN_FILE")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `shear init --append-only --admin-token-file F` writes the token (never
/// over an existing file); `prune` without it fails and names the cause,
/// with it succeeds; `init --object-lock-days` on a local path is refused.
#[test]
fn cli_append_only_init_and_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let tok = dir.path().join("admin.token");
    let o = shear(
        &root,
        &[
            "init",
            "--chunk-size",
            "65536",
            "--max-disk-size-gib",
            "64",
            "--append-only",
            "--admin-token-file",
            tok.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("append-only"), "{}", text(&o));
    let token = std::fs::read_to_string(&tok).unwrap();
    assert_eq!(token.trim().len(), 64);
    let repo = Repository::open(&root, None).unwrap();
    backup(&repo, "100", 1, &[("scsi0", &image(3, 4 * CHUNK as usize))]);
    backup(&repo, "100", 2, &[("scsi0", &image(4, 4 * CHUNK as usize))]);

    let o = shear(&root, &["prune", "100", "--keep-last", "1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("admin token"), "{}", text(&o));
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);
    let o = shear(
        &root,
        &[
            "--admin-token-file",
            tok.to_str().unwrap(),
            "prune",
            "100",
            "--keep-last",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(repo.list_backups(None).unwrap().len(), 1);

    // A second init never overwrites a token file.
    let o = shear(
        &dir.path().join("repo2"),
        &[
            "init",
            "--append-only",
            "--admin-token-file",
            tok.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&tok).unwrap(), token);

    let o = shear(
        &dir.path().join("repo3"),
        &["init", "--object-lock-days", "7"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("S3"), "{}", text(&o));
}

// ---------------------------------------------------------------------------
// S3 Object Lock against moto (scripts/setup installs it): Garage 2.5
// implements no Object Lock (GetObjectRetention, PutObjectRetention and
// bucket versioning are missing), so these stay on moto.

#[path = "common/s3.rs"]
mod s3;

/// moto_server with bucket `shear-lock` (Object Lock) and `shear-plain`,
/// and the AWS environment pointing at it.
fn start_lock_moto() -> Option<s3::Moto> {
    let m = s3::start_moto_with_buckets(&[
        ("shear-lock", "x-amz-bucket-object-lock-enabled: true\r\n"),
        ("shear-plain", ""),
    ])?;
    s3::env_for(&m.creds(), m.port);
    Some(m)
}

/// Garage with bucket `shear-plain`, and the AWS environment pointing at it.
fn start_plain_garage() -> Option<s3::Garage> {
    let g = s3::start_garage_with_buckets(&["shear-plain"])?;
    s3::env_for(&g.creds(), g.port);
    Some(g)
}

fn server_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// S3 Object Lock on moto: init refuses a bucket without Object Lock;
/// chunks, indexes and manifests are stored retained (COMPLIANCE) and the
/// server refuses to destroy such a version; prune and forget refuse a
/// retained backup and say until when; GC extends the retention of chunks
/// still referenced once half the period is gone, keeps unreferenced chunks
/// still retained (and says until when), and deletes them once it ran out.
#[test]
fn s3_object_lock_retention_prune_and_gc() {
    use shear::repo::immut::{ObjectLock, RetentionMode};
    let Some(moto) = start_lock_moto() else {
        return;
    };
    const RET: u64 = 8;
    let lock = ObjectLock {
        mode: RetentionMode::Compliance,
        retention_secs: RET,
    };
    let opts = InitOptions {
        chunk_size: CHUNK,
        zstd_level: 1,
        object_lock: Some(lock),
        ..InitOptions::default()
    };
    let plain = Path::new("s3://shear-plain/r");
    let e = Repository::init(plain, None, &opts).unwrap_err();
    assert!(e.to_string().contains("Object Lock"), "{e}");

    let loc = Path::new("s3://shear-lock/r");
    let repo = Repository::init(loc, None, &opts).unwrap();
    assert_eq!(repo.config().object_lock, Some(lock));
    let a_data = image(21, 6 * CHUNK as usize);
    let b_data = image(22, 6 * CHUNK as usize);
    let t_a = server_ms();
    let a = backup(&repo, "100", 1, &[("scsi0", &a_data)]);
    let b = backup(&repo, "100", 2, &[("scsi0", &b_data)]);
    let repo = Repository::open(loc, None).unwrap();

    // Stored retained, in the configured mode.
    let mkey = format!("backups/vm/100/{}/manifest.blob", a.time_str());
    let r = repo.backend().retention(&mkey).unwrap().unwrap();
    assert_eq!(r.mode, RetentionMode::Compliance);
    assert!(r.until_ms > server_ms(), "{r:?}");
    assert!(
        r.until_ms <= t_a + i64::try_from(RET).unwrap() * 1000 + 5000,
        "{r:?}"
    );
    let chunk_keys: Vec<String> = repo
        .backend()
        .list_objects("chunks")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(chunk_keys.len() >= 4, "{chunk_keys:?}");
    let first = repo.backend().retention(&chunk_keys[0]).unwrap().unwrap();

    // The server refuses to destroy the retained version (what protects
    // against a stolen writer key), whoever asks.
    let path = format!("/shear-lock/r/{}", mkey.replace(':', "%3A"));
    let auth = "Authorization: AWS4-HMAC-SHA256 Credential=shear-test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n";
    let head = s3::raw(moto.port, "HEAD", &path, auth).unwrap();
    let version = s3::header(&head, "x-amz-version-id")
        .unwrap_or_else(|| panic!("{head}"))
        .to_owned();
    let del = s3::raw(
        moto.port,
        "DELETE",
        &format!("{path}?versionId={version}"),
        auth,
    )
    .unwrap();
    assert!(del.starts_with("HTTP/1.1 403"), "{del}");

    // Prune and forget refuse, naming the date.
    let keep = KeepOptions {
        last: Some(1),
        ..KeepOptions::default()
    };
    let vm = VmId::new("100").unwrap();
    let pr = repo.prune(&vm, &keep, false).unwrap();
    let pa = pr.iter().find(|e| e.backup == a).unwrap();
    assert!(!pa.removed, "{pr:?}");
    let why = pa.skipped.clone().unwrap_or_default();
    assert!(why.contains("Object Lock until 20"), "{why}");
    let e = repo.forget(&a).unwrap_err();
    assert!(e.to_string().contains("until 20"), "{e}");
    assert_eq!(repo.list_backups(None).unwrap().len(), 2);

    // Past half the period, GC extends what backups reference.
    std::thread::sleep(Duration::from_millis(RET * 1000 / 2 + 1500));
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert!(g.deferred.is_none(), "{g:?}");
    assert_eq!(g.retention_extended, chunk_keys.len() as u64, "{g:?}");
    assert_eq!(g.chunks_removed, 0, "{g:?}");
    let later = repo.backend().retention(&chunk_keys[0]).unwrap().unwrap();
    assert!(
        later.until_ms > first.until_ms + 2000,
        "{first:?} -> {later:?}"
    );

    // Once a's own retention ran out, prune removes it; its chunks are
    // still retained (extended above): GC keeps them and says until when.
    while repo.backend().retention(&mkey).unwrap().unwrap().until_ms + 500 > server_ms() {
        std::thread::sleep(Duration::from_millis(250));
    }
    let pr = repo.prune(&vm, &keep, false).unwrap();
    assert!(pr.iter().any(|e| e.backup == a && e.removed), "{pr:?}");
    assert_eq!(repo.list_backups(None).unwrap().len(), 1);
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert!(g.chunks_locked > 0, "{g:?}");
    assert_eq!(g.chunks_removed, 0, "{g:?}");
    let until = shear::repo::immut::parse_ms(g.locked_until.as_deref().unwrap()).unwrap();
    while until + 500 > server_ms() {
        std::thread::sleep(Duration::from_millis(250));
    }
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(g.chunks_locked, 0, "{g:?}");
    assert!(g.chunks_removed >= 1, "{g:?}");
    eprintln!("{g:?}");
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &b, "scsi0", out.path()), b_data);
}

// ---------------------------------------------------------------------------
// F-41: S3 LIST errors or partial listings during GC and prune.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use shear::repo::backend::{ListEntry, LockGuard, ObjectInfo};
use shear::repo::{Backend, Coordination, LockMode, LockWait, RepoError};

const HEALTHY: u8 = 0;
/// Listings stop after their first page (1 entry per group, 3 objects).
const STOPS_EARLY: u8 = 1;
/// A listing fails on its third page (after the client's retries).
const PAGE_3_FAILS: u8 = 2;
/// Listings come back empty.
const EMPTY: u8 = 3;

/// An S3 backend whose listings misbehave (F-41's injection, at the point
/// where the repository consumes them).
#[derive(Debug)]
struct FaultyListings {
    inner: Arc<dyn Backend>,
    mode: AtomicU8,
}

impl FaultyListings {
    fn fault(&self, prefix: &str) -> u8 {
        // Only the listings GC and prune decide on; the markers' own
        // listings stay healthy.
        if prefix.starts_with("backups") || prefix.starts_with("chunks") {
            self.mode.load(Ordering::Acquire)
        } else {
            HEALTHY
        }
    }
}

impl Backend for FaultyListings {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> shear::repo::Result<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str, max_len: usize) -> shear::repo::Result<Vec<u8>> {
        self.inner.get(key, max_len)
    }
    fn get_prefix(&self, key: &str, len: usize) -> shear::repo::Result<Option<Vec<u8>>> {
        self.inner.get_prefix(key, len)
    }
    fn size(&self, key: &str) -> shear::repo::Result<Option<u64>> {
        self.inner.size(key)
    }
    fn delete(&self, key: &str) -> shear::repo::Result<bool> {
        self.inner.delete(key)
    }
    fn rename(&self, from: &str, to: &str) -> shear::repo::Result<()> {
        self.inner.rename(from, to)
    }
    fn list(&self, prefix: &str) -> shear::repo::Result<Vec<ListEntry>> {
        let mut l = self.inner.list(prefix)?;
        match self.fault(prefix) {
            STOPS_EARLY => l.truncate(1),
            PAGE_3_FAILS if l.len() > 2 => {
                return Err(RepoError::Io {
                    op: "list",
                    path: prefix.into(),
                    source: std::io::Error::other("500 Internal Server Error (page 3)"),
                })
            }
            EMPTY => {
                return Err(RepoError::NotFound {
                    what: prefix.to_owned(),
                })
            }
            _ => {}
        }
        Ok(l)
    }
    fn create_dir(&self, key: &str) -> shear::repo::Result<()> {
        self.inner.create_dir(key)
    }
    fn ensure_dir(&self, key: &str) -> shear::repo::Result<()> {
        self.inner.ensure_dir(key)
    }
    fn remove_tree(&self, key: &str) -> shear::repo::Result<()> {
        self.inner.remove_tree(key)
    }
    fn lock(&self, key: &str, mode: LockMode, wait: LockWait) -> shear::repo::Result<LockGuard> {
        self.inner.lock(key, mode, wait)
    }
    fn is_temp_name(&self, name: &str) -> bool {
        self.inner.is_temp_name(name)
    }
    fn coordination(&self) -> Coordination {
        self.inner.coordination()
    }
    fn list_objects(&self, prefix: &str) -> shear::repo::Result<Vec<ObjectInfo>> {
        let mut l = self.inner.list_objects(prefix)?;
        match self.fault(prefix) {
            STOPS_EARLY => l.truncate(3),
            PAGE_3_FAILS if l.len() > 2 => {
                return Err(RepoError::Io {
                    op: "list",
                    path: prefix.into(),
                    source: std::io::Error::other("500 Internal Server Error (page 3)"),
                })
            }
            EMPTY => l.clear(),
            _ => {}
        }
        Ok(l)
    }
    fn modified_ms(&self, key: &str) -> shear::repo::Result<Option<i64>> {
        self.inner.modified_ms(key)
    }
}

/// F-41: with listings that stop early, fail on page 3, or come back
/// empty, GC and prune on an S3 repository fail ("listing incomplete" or
/// the listing's error) and delete nothing; healthy again, they work.
#[test]
fn f41_partial_s3_listings_abort_gc_and_prune() {
    let Some(_garage) = start_plain_garage() else {
        return;
    };
    let loc = Path::new("s3://shear-plain/f41");
    let s3 = shear::repo::url_backend(loc).unwrap().unwrap();
    let faulty = Arc::new(FaultyListings {
        inner: Arc::clone(&s3),
        mode: AtomicU8::new(HEALTHY),
    });
    let opts = InitOptions {
        chunk_size: CHUNK,
        zstd_level: 1,
        ..InitOptions::default()
    };
    let repo = Repository::init_backend(faulty.clone(), None, &opts).unwrap();
    let datas: Vec<Vec<u8>> = (0..4).map(|i| image(40 + i, 6 * CHUNK as usize)).collect();
    let ids: Vec<_> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| backup(&repo, "100", i64::try_from(i).unwrap() + 1, &[("scsi0", d)]))
        .collect();
    // Backup 1 goes (healthy), so GC has chunks to delete.
    repo.forget(&ids[0]).unwrap();
    let objects = || {
        let mut v: Vec<String> = s3
            .list_objects("")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !k.starts_with("coord/"))
            .collect();
        v.sort();
        v
    };
    let before = objects();
    let keep = KeepOptions {
        last: Some(1),
        ..KeepOptions::default()
    };
    let vm = VmId::new("100").unwrap();
    for mode in [STOPS_EARLY, PAGE_3_FAILS, EMPTY] {
        faulty.mode.store(mode, Ordering::Release);
        let e = repo.gc(&GcOptions::default()).unwrap_err();
        let e2 = repo.prune(&vm, &keep, false).unwrap_err();
        for e in [&e, &e2] {
            let s = e.to_string();
            match mode {
                PAGE_3_FAILS => assert!(format!("{e:?}").contains("page 3"), "mode {mode}: {e:?}"),
                _ => {
                    assert!(
                        matches!(e, RepoError::ListingIncomplete { .. }),
                        "mode {mode}: {e:?}"
                    );
                    assert!(s.contains("listing incomplete"), "{s}");
                }
            }
        }
        assert_eq!(objects(), before, "mode {mode} deleted something");
    }
    faulty.mode.store(HEALTHY, Ordering::Release);
    s3::wait_past_gc_start_resolution();
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert!(g.chunks_removed > 0, "{g:?}");
    assert_eq!(g.backups_marked, 3, "{g:?}");
    let pr = repo.prune(&vm, &keep, false).unwrap();
    assert_eq!(pr.iter().filter(|e| e.removed).count(), 2, "{pr:?}");
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &ids[3], "scsi0", out.path()), datas[3]);
}

/// `[s3]` settings (endpoint, credentials file, path style) open an S3
/// repository with no AWS_* variables; the request-rate limit holds (60
/// HEADs at 20/s with a burst of 20 take >= 2 s); `sync` with 1 and 8
/// streams copies the same chunks (times printed: measured, not asserted).
#[test]
fn s3_settings_from_config_rate_limit_and_sync_streams() {
    use shear::repo::s3_settings::{install, S3Settings};
    use shear::repo::sync::{sync, SyncOptions};
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;
    let Some(garage) = start_plain_garage() else {
        return;
    };
    let key = garage.creds();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("s3.credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            key.key_id, key.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    for v in [
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    ] {
        std::env::remove_var(v);
    }
    let settings = S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{}", garage.port)),
        region: Some(key.region.clone()),
        addressing_style: Some("path".into()),
        credentials_file: Some(creds.clone()),
        ..S3Settings::default()
    };
    install(S3Settings {
        max_requests_per_second: Some(20),
        ..settings.clone()
    });
    let opts = InitOptions {
        chunk_size: CHUNK,
        zstd_level: 1,
        ..InitOptions::default()
    };
    let repo = Repository::init(Path::new("s3://shear-plain/cfg"), None, &opts).unwrap();
    let t = Instant::now();
    for _ in 0..60 {
        assert_eq!(repo.backend().size("chunks/00/none").unwrap(), None);
    }
    let limited = t.elapsed();
    install(settings.clone());
    let repo = Repository::open(Path::new("s3://shear-plain/cfg"), None).unwrap();
    let t = Instant::now();
    for _ in 0..60 {
        assert_eq!(repo.backend().size("chunks/00/none").unwrap(), None);
    }
    let free = t.elapsed();
    eprintln!("60 HEADs: {limited:?} at 20 req/s, {free:?} unlimited");
    assert!(limited >= Duration::from_millis(1900), "{limited:?}");

    // A credentials file others can read is refused.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Repository::open(Path::new("s3://shear-plain/cfg"), None).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Sync streams.
    let src = common::init_repo(&dir.path().join("src"), None);
    let data = image(77, 64 * CHUNK as usize);
    let id = backup(&src, "100", 1, &[("scsi0", &data)]);
    let mut chunks = None;
    for streams in [1usize, 8] {
        let dst = Repository::init(
            Path::new(&format!("s3://shear-plain/streams{streams}")),
            None,
            &opts,
        )
        .unwrap();
        let t = Instant::now();
        let r = sync(
            &src,
            &dst,
            &SyncOptions {
                streams,
                ..SyncOptions::default()
            },
        )
        .unwrap();
        eprintln!(
            "sync to S3 with {streams} stream(s): {} chunks, {} bytes in {:?}",
            r.chunks_copied,
            r.bytes_copied,
            t.elapsed()
        );
        assert_eq!(*chunks.get_or_insert(r.chunks_copied), r.chunks_copied);
        assert!(r.chunks_copied > 16, "{r:?}");
        let out = tempfile::tempdir().unwrap();
        assert_eq!(restore_raw(&dst, &id, "scsi0", out.path()), data);
    }
}
