//! F-43/F-47: an encrypted repository is unreadable without its key, a
//! wrong key is refused before anything is written, key files are guarded.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use shear::repo::{ErrorKind, KdfParams, Key, RepoError, Repository, RestoreOptions, VerifyTarget};

const MARKER: &[u8] = b"SECRET-GUEST-DATA-0123456789";

fn secret_image() -> Vec<u8> {
    let mut v = vec![0u8; 8 * CHUNK as usize];
    for (n, c) in v.chunks_mut(CHUNK as usize).enumerate().take(5) {
        for (i, w) in c.chunks_mut(MARKER.len()).enumerate() {
            let m = &MARKER[..w.len()];
            w.copy_from_slice(m);
            w[0] = (n + i) as u8; // vary chunks, keep the marker text
        }
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn f47_encrypted_repo_unreadable_without_key_and_wrong_key_rejected() {
    let kdir = tempfile::tempdir().unwrap();
    let kpath = kdir.path().join("key.json");
    let key = Key::create_file(&kpath, b"pw", KdfParams::insecure_fast_for_tests()).unwrap();
    let fp = key.fingerprint();
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), Some(key));
    assert!(repo.is_encrypted());
    let img = secret_image();
    let id = backup(&repo, "100", 0, &[("secret-disk", &img)]);
    let m = repo.load_manifest(&id).unwrap();
    assert_eq!(
        m.encryption.as_ref().unwrap().key_fingerprint,
        fp.to_string()
    );
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&repo, &id, "secret-disk", out.path()), img);

    // Nothing in the repository reveals the data, the disk name or the VM
    // name; only ids (paths) and sizes are visible.
    for f in all_files(dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [
            MARKER,
            &b"secret-disk"[..],
            &b"vm-100"[..],
            &b"GUEST-DATA"[..],
        ] {
            assert!(
                !contains(&bytes, needle),
                "{} leaks {:?}",
                f.display(),
                needle
            );
        }
    }

    // Without the key: list shows ids only; data operations need the key.
    let blind = Repository::open(dir.path(), None).unwrap();
    let list = blind.list_backups(None).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert!(list[0].summary.is_none());
    assert!(matches!(
        blind.load_manifest(&id),
        Err(RepoError::KeyRequired)
    ));
    assert!(matches!(
        blind.restore_disk(&id, "secret-disk", out.path(), &RestoreOptions::default()),
        Err(RepoError::KeyRequired)
    ));
    assert!(matches!(
        blind.verify(&VerifyTarget::All, 1),
        Err(RepoError::KeyRequired)
    ));
    assert!(matches!(
        blind.begin_backup(&shear::repo::BackupMeta::new("100", "x")),
        Err(RepoError::KeyRequired)
    ));

    // A different key is refused at open, naming both fingerprints, before
    // any read or write.
    // Reopening with the key file works.
    Repository::open(dir.path(), Some(Key::load_file(&kpath, b"pw").unwrap())).unwrap();
    let other = Key::generate();
    let e = Repository::open(dir.path(), Some(other)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Key);
    let msg = e.to_string();
    assert!(
        msg.contains("wrong key") && msg.contains(&fp.to_string()),
        "{msg}"
    );
    // Wrong passphrase.
    assert!(matches!(
        Key::load_file(&kpath, b"nope"),
        Err(RepoError::WrongPassphrase { .. })
    ));
    // Group/world readable key file refused.
    std::fs::set_permissions(&kpath, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        Key::load_file(&kpath, b"pw"),
        Err(RepoError::KeyFileInsecure { .. })
    ));
    // A key for an unencrypted repository is refused too.
    let plain = tempfile::tempdir().unwrap();
    init_repo(plain.path(), None);
    assert!(matches!(
        Repository::open(plain.path(), Some(Key::generate())),
        Err(RepoError::KeyNotExpected)
    ));
}

#[test]
fn f43_dedup_is_scoped_per_key() {
    // The same plaintext under two keys yields different chunk names; under
    // one key it dedups.
    let img = secret_image();
    let (k1, k2) = (Key::generate(), Key::generate());
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let r1 = init_repo(d1.path(), Some(k1));
    let r2 = init_repo(d2.path(), Some(k2));
    backup(&r1, "100", 0, &[("d0", &img)]);
    backup(&r2, "100", 0, &[("d0", &img)]);
    let names = |p: &std::path::Path| -> Vec<_> {
        chunk_files(p)
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect()
    };
    let (n1, n2) = (names(d1.path()), names(d2.path()));
    assert!(!n1.is_empty());
    assert!(n1.iter().all(|n| !n2.contains(n)));
    // Plain BLAKE3 of a chunk is not its name (no confirmation oracle).
    let plain_name = blake3::hash(&img[..CHUNK as usize]).to_hex().to_string();
    assert!(n1.iter().all(|n| n.to_string_lossy() != plain_name));
    let id2 = backup(&r1, "100", 60, &[("d0", &img)]);
    assert_eq!(r1.load_manifest(&id2).unwrap().disks[0].new_chunks, 0);
}

#[test]
fn f47_unencrypted_chunk_never_accepted_in_encrypted_repo() {
    // A chunk file planted without encryption under the right name is not
    // treated as present (dedup) and is reported corrupt by verify.
    let key = Key::generate();
    let dir = tempfile::tempdir().unwrap();
    let repo = init_repo(dir.path(), Some(key));
    let img = secret_image();
    let id = backup(&repo, "100", 0, &[("d0", &img)]);
    let entry = repo
        .open_backup(&id)
        .unwrap()
        .open_disk("d0")
        .unwrap()
        .entries()[0];
    let path = chunk_path(dir.path(), &hex::encode(entry));
    let plain = shear::repo::blob::encode(
        shear::repo::format::ObjectType::Chunk,
        &img[..CHUNK as usize],
        Some(1),
        None,
        &entry,
    )
    .unwrap();
    std::fs::write(&path, &plain).unwrap();
    let report = repo.verify(&VerifyTarget::All, 1).unwrap();
    assert_eq!(report.bad_chunks.len(), 1, "{report:#?}");
    // After quarantine, a new backup uploads the chunk again (encrypted).
    let id2 = backup(&repo, "100", 60, &[("d0", &img)]);
    assert!(repo.load_manifest(&id2).unwrap().disks[0].new_chunks >= 1);
    assert!(repo
        .verify(&VerifyTarget::Backup(id2), 1)
        .unwrap()
        .is_clean());
}
