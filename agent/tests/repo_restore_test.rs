//! The restore-test record (`restore-test.json`, docs/formats.md §6a):
//! written beside a committed backup without touching its manifest,
//! listed, version-checked on read, and without guest output in an
//! encrypted repository.
// Test code: helpers outside #[test] fns may unwrap.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use shear::repo::restore_test::{ProbeResult, RestoreTest, SeenFilesystem};
use shear::repo::{BackupId, ErrorKind, Key, VmId};

fn record(stdout: &str) -> RestoreTest {
    RestoreTest {
        format: "shear-restore-test".into(),
        version: 1,
        state: "ok".into(),
        reason: String::new(),
        time: "2026-11-30T12:00:00Z".into(),
        ping_ms: Some(4321),
        total_ms: 5000,
        accel: "tcg".into(),
        accel_fallback: Some("KVM guest showed no progress within 30 s".into()),
        boot: "kernel".into(),
        filesystems: vec![SeenFilesystem {
            name: "vda".into(),
            mountpoint: "/".into(),
            fs_type: "ext4".into(),
        }],
        probe: Some(ProbeResult {
            command: "cat /etc/hostname".into(),
            exit_code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
            output_bytes: stdout.len() as u64,
            truncated: false,
        }),
        tool_version: "shear test".into(),
    }
}

#[test]
fn restore_test_record_beside_an_immutable_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), None);
    let img = image(1, 4 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("scsi0", &img)]);
    let snap = dir.path().join("backups").join(id.to_string());
    let manifest = std::fs::read(snap.join("manifest.blob")).unwrap();
    assert_eq!(repo.restore_test(&id).unwrap(), None);

    let r = record("host-a\n");
    repo.put_restore_test(&id, &r).unwrap();
    assert_eq!(repo.restore_test(&id).unwrap(), Some(r.clone()));
    assert_eq!(std::fs::read(snap.join("manifest.blob")).unwrap(), manifest);
    let listed = repo.list_backups(None).unwrap();
    assert_eq!(listed[0].restore_test.as_ref(), Some(&r));
    // The backup still verifies and restores as before.
    repo.load_manifest(&id).unwrap();
    assert_eq!(restore_raw(&repo, &id, "scsi0", dir.path()), img);

    // Replacing keeps one record (the newest).
    let mut r2 = record("host-b\n");
    r2.state = "failed".into();
    r2.reason = "the probe failed (exit code 1)".into();
    repo.put_restore_test(&id, &r2).unwrap();
    assert_eq!(repo.restore_test(&id).unwrap(), Some(r2));

    // Only for a committed backup.
    let other = BackupId::new(VmId::new("100").unwrap(), t(99));
    let e = repo.put_restore_test(&other, &r).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // A record of an unknown version is refused, not misread.
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("restore-test.json")).unwrap()).unwrap();
    v["version"] = 2.into();
    std::fs::write(snap.join("restore-test.json"), v.to_string()).unwrap();
    let e = repo.restore_test(&id).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
}

#[test]
fn restore_test_record_holds_no_guest_output_when_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), Some(Key::generate()));
    let id = backup(&repo, "100", 0, &[("scsi0", &image(2, 2 * CHUNK as usize))]);
    repo.put_restore_test(&id, &record("SECRET-GUEST-OUTPUT\n"))
        .unwrap();
    let raw = std::fs::read(
        dir.path()
            .join("backups")
            .join(id.to_string())
            .join("restore-test.json"),
    )
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains("SECRET-GUEST-OUTPUT"),
        "guest output stored in clear in an encrypted repository"
    );
    let back = repo.restore_test(&id).unwrap().unwrap();
    let p = back.probe.unwrap();
    assert_eq!(p.stdout, "");
    assert_eq!(p.output_bytes, 20);
    assert_eq!(p.exit_code, Some(0));
}
