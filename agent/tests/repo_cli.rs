//! The `shear` binary's repository commands, end to end.
// Test code: helpers outside #[test] fns may unwrap; sizes and seeds are small.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use shear::repo::{Key, Repository};

fn shear(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shear"));
    c.arg("--repo").arg(repo).args(args);
    c.env_remove("SHEAR_KEYFILE")
        .env_remove("SHEAR_KEY_PASSPHRASE")
        .env_remove("SHEAR_REPO");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cli_encrypted_repo_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let key = dir.path().join("key.json");
    let pw = [("SHEAR_KEY_PASSPHRASE", "correct horse")];
    let k = key.to_str().unwrap();
    let o = shear(
        &repo_dir,
        &[
            "key",
            "create",
            k,
            "--kdf-memory-kib",
            "64",
            "--kdf-passes",
            "1",
        ],
        &pw,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let o = shear(
        &repo_dir,
        &[
            "--keyfile",
            k,
            "init",
            "--chunk-size",
            "65536",
            "--max-disk-size-gib",
            "1024",
        ],
        &pw,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("encrypted"));

    // Backups made through the library (the backup job's path).
    let unlocked = Key::load_file(&key, b"correct horse").unwrap();
    let repo = Repository::open(&repo_dir, Some(unlocked)).unwrap();
    let img = image(70, 10 * CHUNK as usize);
    let id1 = backup(&repo, "100", 0, &[("d0", &img)]);
    let id2 = backup(&repo, "100", 86_400, &[("d0", &img)]);
    let (s1, s2) = (id1.to_string(), id2.to_string());

    // list without the key: ids only.
    let o = shear(&repo_dir, &["list", "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v[0]["summary"].is_null());
    // show without the key: clear error.
    let o = shear(&repo_dir, &["show", &s1], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("encrypted"), "{}", text(&o));
    // Wrong passphrase and insecure key file: clear errors.
    let o = shear(
        &repo_dir,
        &["--keyfile", k, "show", &s1],
        &[("SHEAR_KEY_PASSPHRASE", "nope")],
    );
    assert!(text(&o).contains("wrong passphrase"), "{}", text(&o));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = shear(&repo_dir, &["--keyfile", k, "show", &s1], &pw);
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A different key: named as wrong before anything happens.
    let other = dir.path().join("other.json");
    let o = shear(
        &repo_dir,
        &[
            "key",
            "create",
            other.to_str().unwrap(),
            "--kdf-memory-kib",
            "64",
            "--kdf-passes",
            "1",
        ],
        &pw,
    );
    assert!(o.status.success());
    let o = shear(
        &repo_dir,
        &["--keyfile", other.to_str().unwrap(), "list"],
        &pw,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("wrong key"), "{}", text(&o));

    let with_key = |args: &[&str]| {
        let mut a = vec!["--keyfile", k];
        a.extend_from_slice(args);
        shear(&repo_dir, &a, &pw)
    };
    let o = with_key(&["show", &s1]);
    assert!(
        o.status.success() && text(&o).contains("disk d0"),
        "{}",
        text(&o)
    );
    let o = with_key(&["verify", "--all"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // Restore as qcow2 and raw; no overwrite without --force.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = with_key(&["restore", &s2, "--target", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(out.join("d0.raw")).unwrap(), img);
    let o = with_key(&["restore", &s2, "--target", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    let o = with_key(&[
        "restore",
        &s2,
        "--disk",
        "d0",
        "--format",
        "qcow2",
        "--target",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        &std::fs::read(out.join("d0.qcow2")).unwrap()[..4],
        b"QFI\xfb"
    );

    // protect / prune --dry-run / prune / gc.
    assert!(with_key(&["protect", &s1]).status.success());
    let o = with_key(&["prune", "100", "--keep-last", "1", "--dry-run"]);
    assert!(
        text(&o).contains(&format!("{s1}  keep (protected)")),
        "{}",
        text(&o)
    );
    assert!(with_key(&["unprotect", &s1]).status.success());
    let o = with_key(&["prune", "100", "--keep-last", "1", "--dry-run"]);
    assert!(
        text(&o).contains(&format!("{s1}  remove (dry run)")),
        "{}",
        text(&o)
    );
    let o = with_key(&["prune", "100", "--keep-last", "1"]);
    assert!(text(&o).contains(&format!("{s1}  removed")), "{}", text(&o));
    let o = with_key(&["prune", "100"]);
    assert_eq!(o.status.code(), Some(1), "keeping nothing is refused");
    let o = with_key(&["gc"]);
    assert!(o.status.success(), "{}", text(&o));

    // Corrupt a chunk: verify exits 2 and names the backup.
    let chunk = chunk_files(&repo_dir)[0].clone();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&chunk, bytes).unwrap();
    let o = with_key(&["verify", "--all"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains(&format!("used by {s2}")), "{}", text(&o));
    let o = with_key(&["list"]);
    assert!(text(&o).contains("last verify: failed at "), "{}", text(&o));
    // Bad ids are refused.
    let o = with_key(&["show", "vm/../x/2024-01-01T00:00:00Z"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn cli_bad_repository_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = shear(&file, &["list"], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a directory"), "{}", text(&o));
    let o = shear(&file, &["init"], &[]);
    assert_eq!(o.status.code(), Some(1));
    let o = shear(&dir.path().join("missing"), &["list"], &[]);
    assert!(text(&o).contains("shear init"), "{}", text(&o));
}

/// Issue 19: weak passphrases are refused, `key show` takes --keyfile,
/// `key paperkey` prints the key file, and init checks the chunk-count
/// limit against the largest disk.
#[test]
fn cli_key_commands_and_init_chunk_limit() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let key = dir.path().join("key.json");
    let k = key.to_str().unwrap();
    let create = |pw: &str| {
        shear(
            &repo_dir,
            &[
                "key",
                "create",
                k,
                "--kdf-memory-kib",
                "64",
                "--kdf-passes",
                "1",
            ],
            &[("SHEAR_KEY_PASSPHRASE", pw)],
        )
    };
    let o = create("abc");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("too short"), "{}", text(&o));
    assert!(!key.exists());
    let o = create("ninechars");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("weak passphrase"), "{}", text(&o));
    let by_path = shear(&repo_dir, &["key", "show", k], &[]);
    let by_flag = shear(&repo_dir, &["--keyfile", k, "key", "show"], &[]);
    assert!(by_flag.status.success(), "{}", text(&by_flag));
    assert_eq!(by_path.stdout, by_flag.stdout);
    let fp = String::from_utf8_lossy(&by_flag.stdout).trim().to_string();
    let o = shear(&repo_dir, &["--keyfile", k, "key", "paperkey"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(t.contains(&fp), "{t}");
    let body = t
        .split("-----BEGIN SHEAR KEY FILE-----\n")
        .nth(1)
        .and_then(|r| r.split("-----END SHEAR KEY FILE-----").next())
        .unwrap();
    let typed_back = dir.path().join("typed.json");
    std::fs::write(&typed_back, body).unwrap();
    std::fs::set_permissions(&typed_back, std::fs::Permissions::from_mode(0o600)).unwrap();
    Key::load_file(&typed_back, b"ninechars").unwrap();

    let o = shear(&repo_dir, &["init", "--chunk-size", "65536"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("1024 GiB"), "{}", text(&o));
    assert!(!repo_dir.exists());
    let o = shear(
        &repo_dir,
        &[
            "init",
            "--chunk-size",
            "65536",
            "--max-disk-size-gib",
            "1024",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// Issue 19: `verify` on a read-only repository (a mirror) verifies and
/// prints its result; only recording it is skipped, and it says so.
#[test]
fn cli_verify_on_read_only_repository_still_reports() {
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let o = shear(
        &repo_dir,
        &["init", "--chunk-size", "65536", "--max-disk-size-gib", "1"],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let repo = Repository::open(&repo_dir, None).unwrap();
    let img = image(71, 4 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("d0", &img)]).to_string();
    drop(repo);
    let ro = dir.path().join("mirror");
    std::fs::create_dir(&ro).unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&repo_dir)
        .arg(&ro)
        .status();
    if !bind.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot bind-mount (needs root)");
        return;
    }
    let _guard = Unmount(ro.clone());
    let st = Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(st.success());
    let o = shear(&ro, &["verify", &id], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&format!("ok      {id}")), "{t}");
    assert!(t.contains("result not recorded"), "{t}");
}
