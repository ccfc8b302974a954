//! Immutability (issue 14 §3): append-only repositories, where the backup
//! writer cannot delete or overwrite anything and prune/forget/GC need the
//! admin token; S3 Object Lock against moto (the real-server part is in
//! `s3_object_lock_*`).
// Test code: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

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
