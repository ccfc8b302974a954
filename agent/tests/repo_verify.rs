//! F-35 (bit rot, tampering), F-44 (malformed objects): every injected
//! corruption is found by verify and named with the backups it breaks.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use shear::repo::{BackupId, ErrorKind, Repository, RestoreOptions, VerifyTarget};

/// Two backups of VM 100 sharing most chunks, one of VM 101 sharing some.
fn fixture(dir: &Path) -> (Repository, Vec<BackupId>, Vec<Vec<u8>>) {
    let repo = init_repo(dir, None);
    let a = image(20, 12 * CHUNK as usize);
    let mut b = a.clone();
    b[CHUNK as usize * 2..CHUNK as usize * 3].fill(0x11);
    let c = image(21, 6 * CHUNK as usize);
    let mut c2 = a[..6 * CHUNK as usize].to_vec();
    c2.extend_from_slice(&c);
    let ids = vec![
        backup(&repo, "100", 0, &[("d0", &a)]),
        backup(&repo, "100", 3600, &[("d0", &b)]),
        backup(&repo, "101", 0, &[("d0", &c2), ("d1", &c)]),
    ];
    (repo, ids, vec![a, b, c2])
}

/// The digests used by (backup, disk), in disk order.
fn entries(repo: &Repository, id: &BackupId, disk: &str) -> Vec<[u8; 32]> {
    repo.open_backup(id)
        .unwrap()
        .open_disk(disk)
        .unwrap()
        .entries()
        .to_vec()
}

fn users_of(report: &shear::repo::VerifyReport, digest: &[u8; 32]) -> Vec<String> {
    let hexd = hex::encode(digest);
    let c = report
        .bad_chunks
        .iter()
        .find(|c| c.digest == hexd)
        .unwrap_or_else(|| panic!("chunk {hexd} not reported: {report:#?}"));
    let mut v: Vec<String> = c.used_by.iter().map(|u| u.backup.to_string()).collect();
    v.sort();
    v.dedup(); // one backup may use it on several disks
    v
}

#[test]
fn f35_flipped_truncated_missing_swapped_chunks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids, imgs) = fixture(dir.path());
    assert!(repo.verify(&VerifyTarget::All, 2).unwrap().is_clean());
    let e0 = entries(&repo, &ids[0], "d0");
    let e1 = entries(&repo, &ids[1], "d0");
    let e2 = entries(&repo, &ids[2], "d1");
    let nz = |e: &Vec<[u8; 32]>| -> Vec<[u8; 32]> {
        e.iter().copied().filter(|d| *d != [0; 32]).collect()
    };
    // Shared by backups 0 and 1 (and 101's first 6 chunks when i < 6).
    let shared: Vec<_> = nz(&e0).into_iter().filter(|d| e1.contains(d)).collect();
    assert!(shared.len() >= 3);
    let only_c: Vec<_> = nz(&e2)
        .into_iter()
        .filter(|d| !e0.contains(d) && !e1.contains(d))
        .collect();
    assert!(only_c.len() >= 2, "fixture needs chunks only VM 101 uses");
    let flipped = shared[0];
    let truncated = shared[1];
    let missing = shared[2];
    let (swap_a, swap_b) = (only_c[0], only_c[1]);

    let p = |d: &[u8; 32]| chunk_path(dir.path(), &hex::encode(d));
    let f = OpenOptions::new().write(true).open(p(&flipped)).unwrap();
    f.write_all_at(&[0xff], 100).unwrap();
    let len = std::fs::metadata(p(&truncated)).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(p(&truncated))
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::remove_file(p(&missing)).unwrap();
    let (ba, bb) = (
        std::fs::read(p(&swap_a)).unwrap(),
        std::fs::read(p(&swap_b)).unwrap(),
    );
    std::fs::write(p(&swap_a), bb).unwrap();
    std::fs::write(p(&swap_b), ba).unwrap();

    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.bad_chunks.len(), 5, "{report:#?}");
    let id = |n: usize| ids[n].to_string();
    for d in [flipped, truncated, missing] {
        let users = users_of(&report, &d);
        assert!(
            users.contains(&id(0)) && users.contains(&id(1)),
            "{users:?}"
        );
    }
    assert_eq!(users_of(&report, &swap_a), vec![id(2)]);
    assert_eq!(users_of(&report, &swap_b), vec![id(2)]);
    let missing_entry = report
        .bad_chunks
        .iter()
        .find(|c| c.digest == hex::encode(missing))
        .unwrap();
    assert_eq!(missing_entry.problem, "missing");
    assert!(!missing_entry.quarantined);
    // Corrupt chunks are quarantined as .bad.
    for d in [flipped, truncated, swap_a, swap_b] {
        assert!(!p(&d).exists());
        assert!(p(&d).with_extension("bad").exists());
    }
    // Every backup is marked verify-failed, with the offsets named.
    for i in &ids {
        assert_eq!(repo.verify_state(i).unwrap().unwrap().state, "failed");
    }
    let b0 = report.backups.iter().find(|b| b.backup == ids[0]).unwrap();
    assert!(b0.problems.iter().any(|p| p.contains("offsets")));

    // Restoring an affected backup fails naming the chunk; no output stays.
    let out = tempfile::tempdir().unwrap();
    let e = repo
        .restore_disk(&ids[0], "d0", out.path(), &RestoreOptions::default())
        .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Corrupt),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);

    // The next backup of the same data does not dedup against bad or
    // missing chunks: it stores them again, and then everything restores.
    let heal = backup(&repo, "100", 7200, &[("d0", &imgs[0])]);
    let heal2 = backup(
        &repo,
        "101",
        7200,
        &[("d0", &imgs[2]), ("d1", &imgs[2][6 * CHUNK as usize..])],
    );
    let m = repo.load_manifest(&heal).unwrap();
    assert!(m.disks[0].new_chunks >= 3, "re-uploaded: {:?}", m.disks[0]);
    let _ = heal2;
    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(restore_raw(&repo, &ids[0], "d0", out.path()), imgs[0]);
}

#[test]
fn f35_damaged_index_and_manifest_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids, imgs) = fixture(dir.path());
    let idx = dir
        .path()
        .join(ids[1].to_string().replace("vm/", "backups/vm/"))
        .join("d0.fidx");
    let f = OpenOptions::new().write(true).open(&idx).unwrap();
    f.write_all_at(&[0x42], 70).unwrap();
    let man = dir
        .path()
        .join(ids[2].to_string().replace("vm/", "backups/vm/"))
        .join("manifest.blob");
    let f = OpenOptions::new().write(true).open(&man).unwrap();
    f.write_all_at(&[0x42], 60).unwrap();

    let report = repo.verify(&VerifyTarget::All, 2).unwrap();
    assert!(!report.is_clean());
    let get = |id: &BackupId| report.backups.iter().find(|b| &b.backup == id).unwrap();
    assert!(get(&ids[0]).ok, "untouched backup stays ok: {report:#?}");
    let b1 = get(&ids[1]);
    assert!(
        !b1.ok && b1.problems.iter().any(|p| p.contains("index of disk d0")),
        "{b1:?}"
    );
    let b2 = get(&ids[2]);
    assert!(
        !b2.ok && b2.problems.iter().any(|p| p.contains("manifest")),
        "{b2:?}"
    );
    assert_eq!(repo.verify_state(&ids[1]).unwrap().unwrap().state, "failed");
    assert_eq!(repo.verify_state(&ids[0]).unwrap().unwrap().state, "ok");
    // Restore of the damaged ones fails before creating output; the
    // intact backup still restores.
    let out = tempfile::tempdir().unwrap();
    repo.restore_disk(&ids[1], "d0", out.path(), &RestoreOptions::default())
        .unwrap_err();
    repo.restore_disk(&ids[2], "d0", out.path(), &RestoreOptions::default())
        .unwrap_err();
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    assert_eq!(restore_raw(&repo, &ids[0], "d0", out.path()), imgs[0]);
    // GC refuses to sweep while a manifest is unreadable (it cannot know
    // what that backup references).
    let before = chunk_files(dir.path()).len();
    repo.gc(&Default::default()).unwrap_err();
    assert_eq!(chunk_files(dir.path()).len(), before);
}

#[test]
fn f44_hostile_index_and_manifest_objects_are_rejected() {
    // An index that declares 2^40 entries, an oversized manifest, and a
    // chunk stored in place of a manifest (type confusion, F-42).
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids, _) = fixture(dir.path());
    let sdir = |id: &BackupId| {
        dir.path()
            .join(id.to_string().replace("vm/", "backups/vm/"))
    };
    // Chunk bytes as manifest: refused by the object type.
    let some_chunk = chunk_files(dir.path())[0].clone();
    std::fs::copy(&some_chunk, sdir(&ids[0]).join("manifest.blob")).unwrap();
    let e = repo.load_manifest(&ids[0]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("object type"), "{e}");
    // A 20 MiB manifest file: refused before reading it whole.
    std::fs::write(sdir(&ids[1]).join("manifest.blob"), vec![b'{'; 20 << 20]).unwrap();
    assert_eq!(
        repo.load_manifest(&ids[1]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    // Deep JSON nesting inside a well-formed blob.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let blob = shear::repo::blob::encode(
        shear::repo::format::ObjectType::Manifest,
        deep.as_bytes(),
        Some(1),
        None,
        b"",
    )
    .unwrap();
    std::fs::write(sdir(&ids[2]).join("manifest.blob"), blob).unwrap();
    assert_eq!(
        repo.load_manifest(&ids[2]).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let report = repo.verify(&VerifyTarget::All, 1).unwrap();
    assert_eq!(report.backups.iter().filter(|b| !b.ok).count(), 3);
}
