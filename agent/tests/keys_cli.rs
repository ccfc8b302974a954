//! Keys on the command line (issue 19): passphrases asked on a real
//! pseudo-terminal (twice for a new key, no echo, a mismatch and a weak
//! passphrase refused), a clear error instead of a hang without a
//! terminal, and a master key that recovers a repository whose passphrase
//! and key file are lost.
// Test code: helpers outside #[test] fns may unwrap.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shear::repo::{Key, Repository};

/// Drives a program on a pseudo-terminal (python3's pty module: the child
/// gets the pty as its controlling terminal and stdio). argv[1] is a JSON
/// list of [expected text, line to type]; each line is typed once the text
/// appeared and the terminal's echo is off. Prints a JSON object with the
/// whole transcript and the exit status.
const PTY_DRIVER: &str = r#"
import json, os, pty, select, sys, termios, time
steps = json.loads(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
out = b""
seen = 0
def more(deadline):
    global out
    r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
    if not r:
        return False
    try:
        d = os.read(fd, 4096)
    except OSError:
        d = b""
    out += d
    return bool(d)
failed = None
for want, send in steps:
    deadline = time.time() + 120
    while out.find(want.encode(), seen) < 0:
        if time.time() > deadline or not more(deadline):
            failed = "never saw %r" % want
            break
    if failed:
        break
    seen = out.find(want.encode(), seen) + len(want)
    # A passphrase is typed only once the terminal stopped echoing (the
    # master side reads the slave's termios): a prompt that never turns
    # echo off fails here.
    while termios.tcgetattr(fd)[3] & termios.ECHO:
        if time.time() > deadline:
            failed = "echo still on at %r" % want
            break
        time.sleep(0.01)
    if failed:
        break
    os.write(fd, (send + "\n").encode())
deadline = time.time() + 120
while time.time() < deadline and more(deadline):
    pass
if failed:
    os.kill(pid, 9)
_, st = os.waitpid(pid, 0)
print(json.dumps({"out": out.decode("utf-8", "replace"), "status": os.waitstatus_to_exitcode(st), "failed": failed}))
"#;

struct Tty {
    out: String,
    status: i32,
}

/// Runs `shear --repo REPO ARGS` on a pseudo-terminal, typing each step's
/// line once its text appeared. No passphrase in the environment.
fn on_tty(repo: &Path, args: &[&str], steps: &[(&str, &str)], env: &[(&str, &str)]) -> Tty {
    let steps: Vec<[&str; 2]> = steps.iter().map(|(a, b)| [*a, *b]).collect();
    let mut c = Command::new("python3");
    c.arg("-c")
        .arg(PTY_DRIVER)
        .arg(serde_json::to_string(&steps).unwrap())
        .arg(env!("CARGO_BIN_EXE_shear"))
        .arg("--repo")
        .arg(repo)
        .args(args);
    clean_env(&mut c);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "pty driver: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["failed"].is_null(), "{}: {}", v["failed"], v["out"]);
    Tty {
        out: v["out"].as_str().unwrap().to_string(),
        status: i32::try_from(v["status"].as_i64().unwrap()).unwrap(),
    }
}

fn clean_env(c: &mut Command) {
    for v in [
        "SHEAR_KEYFILE",
        "SHEAR_KEY_PASSPHRASE",
        "SHEAR_KEY_PASSPHRASE_FILE",
        "SHEAR_MASTER_PASSPHRASE",
        "SHEAR_MASTER_PASSPHRASE_FILE",
        "SHEAR_REPO",
    ] {
        c.env_remove(v);
    }
}

/// `shear` without a terminal (stdin /dev/null), with a deadline: a
/// command that waited for a passphrase would be killed and fail here.
fn no_tty(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shear"));
    c.arg("--repo").arg(repo).args(args);
    clean_env(&mut c);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shear {args:?} hung without a terminal");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const FAST_KDF: [&str; 4] = ["--kdf-memory-kib", "64", "--kdf-passes", "1"];

fn has_python() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import pty"])
        .status()
        .is_ok_and(|s| s.success());
    ok || !skip("python3 with the pty module (passphrase prompt tests)")
}

#[test]
fn cli_passphrase_asked_on_a_tty_twice_for_a_new_key_never_waited_for_without_one() {
    if !has_python() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let key = dir.path().join("key.json");
    let k = key.to_str().unwrap();
    let create: Vec<&str> = ["key", "create", k]
        .iter()
        .chain(FAST_KDF.iter())
        .copied()
        .collect();

    // A second entry that differs: refused, nothing written.
    let t = on_tty(
        &repo,
        &create,
        &[
            ("New passphrase for key file", "correct horse battery"),
            ("Repeat the passphrase", "correct horse batter"),
        ],
        &[],
    );
    assert_eq!(t.status, 1, "{}", t.out);
    assert!(t.out.contains("the two passphrases differ"), "{}", t.out);
    assert!(!key.exists(), "a mismatched entry wrote a key file");

    // A weak one: refused at the first entry (no second prompt).
    let t = on_tty(
        &repo,
        &create,
        &[("New passphrase for key file", "abc123")],
        &[],
    );
    assert_eq!(t.status, 1, "{}", t.out);
    assert!(t.out.contains("passphrase too short"), "{}", t.out);
    assert!(!t.out.contains("Repeat"), "{}", t.out);
    assert!(!key.exists());

    // Two equal entries: the key is made, and nothing typed was echoed.
    let pw = "tty typed passphrase";
    let t = on_tty(
        &repo,
        &create,
        &[
            ("New passphrase for key file", pw),
            ("Repeat the passphrase", pw),
        ],
        &[],
    );
    assert_eq!(t.status, 0, "{}", t.out);
    assert!(t.out.contains("created key"), "{}", t.out);
    assert!(!t.out.contains(pw), "the passphrase was echoed: {}", t.out);
    Key::load_file(&key, pw.as_bytes()).unwrap();

    // Unlocking asks once, on the terminal.
    let t = on_tty(
        &repo,
        &["--keyfile", k, "init"],
        &[("Passphrase for key file", pw)],
        &[],
    );
    assert_eq!(t.status, 0, "{}", t.out);
    assert!(
        t.out.contains("initialised encrypted repository"),
        "{}",
        t.out
    );
    let t = on_tty(
        &repo,
        &["--keyfile", k, "list"],
        &[("Passphrase for key file", "not it at all")],
        &[],
    );
    assert_eq!(t.status, 1, "{}", t.out);
    assert!(t.out.contains("wrong passphrase"), "{}", t.out);

    // The variable still works on a terminal (scripts under `script`).
    let t = on_tty(
        &repo,
        &["--keyfile", k, "list"],
        &[],
        &[("SHEAR_KEY_PASSPHRASE", pw)],
    );
    assert_eq!(t.status, 0, "{}", t.out);
    assert!(!t.out.contains("Passphrase for"), "{}", t.out);

    // No terminal, no passphrase: a clear error naming both ways, at once.
    let o = no_tty(&repo, &["--keyfile", k, "list"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("not on a terminal")
            && text(&o).contains("SHEAR_KEY_PASSPHRASE")
            && text(&o).contains("--passphrase-file"),
        "{}",
        text(&o)
    );
    let other = dir.path().join("other.json");
    let o = no_tty(
        &repo,
        &[
            "key",
            "create",
            other.to_str().unwrap(),
            "--kdf-memory-kib",
            "64",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not on a terminal"), "{}", text(&o));
    assert!(!other.exists());
    // And the file still works without a terminal.
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, format!("{pw}\n")).unwrap();
    let o = no_tty(
        &repo,
        &[
            "--keyfile",
            k,
            "--passphrase-file",
            pwfile.to_str().unwrap(),
            "list",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// A repository initialised with a master public key: after its key file
/// and passphrase are both lost, the master private key (and its own
/// passphrase) recover a working key file, and the backup restores
/// byte-identical. Recovery on a terminal asks for the master passphrase
/// once and the new one twice.
#[test]
fn cli_master_key_recovers_a_repository_whose_key_and_passphrase_are_lost() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (mkey, mpub, key) = (p("master.key"), p("master.pub"), p("key.json"));
    let mpw = [("SHEAR_MASTER_PASSPHRASE", "master passphrase 1")];
    let kpw = [("SHEAR_KEY_PASSPHRASE", "everyday passphrase")];
    let mut args: Vec<&str> = vec!["key", "create-master", &mkey, &mpub];
    args.extend(FAST_KDF);
    let o = no_tty(&repo_dir, &args, &mpw);
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&mkey).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut args: Vec<&str> = vec!["key", "create", &key];
    args.extend(FAST_KDF);
    let o = no_tty(&repo_dir, &args, &kpw);
    assert!(o.status.success(), "{}", text(&o));
    // --master-pubkey without a key: refused before anything is made.
    let o = no_tty(&repo_dir, &["init", "--master-pubkey", &mpub], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!repo_dir.exists());
    let o = no_tty(
        &repo_dir,
        &[
            "--keyfile",
            &key,
            "init",
            "--chunk-size",
            "65536",
            "--max-disk-size-gib",
            "1024",
            "--master-pubkey",
            &mpub,
        ],
        &kpw,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("sealed the key to master key"),
        "{}",
        text(&o)
    );
    let seal = repo_dir.join("master-key-seal.json");
    let seal_text = std::fs::read_to_string(&seal).unwrap();
    assert!(!seal_text.contains("everyday"), "{seal_text}");

    // A backup (the backup job's library path), then the key file and its
    // passphrase are lost.
    let unlocked = Key::load_file(Path::new(&key), b"everyday passphrase").unwrap();
    let fp = unlocked.fingerprint().to_string();
    let repo = Repository::open(&repo_dir, Some(unlocked)).unwrap();
    let img = image(19, 10 * CHUNK as usize);
    let id = backup(&repo, "100", 0, &[("d0", &img)]).to_string();
    drop(repo);
    std::fs::remove_file(&key).unwrap();

    // A wrong master passphrase, and another master key: refused, no file.
    let newkey = p("recovered.json");
    let mut args: Vec<&str> = vec!["key", "recover", &newkey, "--master-key", &mkey];
    args.extend(FAST_KDF);
    let o = no_tty(
        &repo_dir,
        &args,
        &[
            ("SHEAR_MASTER_PASSPHRASE", "not the master one"),
            ("SHEAR_KEY_PASSPHRASE", "new passphrase 22"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("wrong passphrase"), "{}", text(&o));
    assert!(!Path::new(&newkey).exists());
    let (okey, opub) = (p("other.key"), p("other.pub"));
    let mut oargs: Vec<&str> = vec!["key", "create-master", &okey, &opub];
    oargs.extend(FAST_KDF);
    assert!(no_tty(&repo_dir, &oargs, &mpw).status.success());
    let mut wrong: Vec<&str> = vec!["key", "recover", &newkey, "--master-key", &okey];
    wrong.extend(FAST_KDF);
    let o = no_tty(
        &repo_dir,
        &wrong,
        &[mpw[0], ("SHEAR_KEY_PASSPHRASE", "new passphrase 22")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("wrong key"), "{}", text(&o));
    assert!(!Path::new(&newkey).exists());

    // A seal file swapped for one of another key (anyone with the master
    // public key can make one): it opens, but is refused as not this
    // repository's key.
    let good_seal = std::fs::read(&seal).unwrap();
    let other_seal = shear::repo::MasterPublicKey::load_file(Path::new(&mpub))
        .unwrap()
        .seal(&Key::generate())
        .unwrap();
    std::fs::write(&seal, serde_json::to_vec(&other_seal).unwrap()).unwrap();
    let o = no_tty(
        &repo_dir,
        &args,
        &[mpw[0], ("SHEAR_KEY_PASSPHRASE", "new passphrase 22")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("is not the key of repository"),
        "{}",
        text(&o)
    );
    assert!(!Path::new(&newkey).exists());
    std::fs::write(&seal, good_seal).unwrap();

    // Recovery on a terminal: master passphrase once, the new one twice.
    if has_python() {
        let t = on_tty(
            &repo_dir,
            &args,
            &[
                ("Passphrase for master key", "master passphrase 1"),
                ("New passphrase for key file", "new passphrase 22"),
                ("Repeat the passphrase", "new passphrase 22"),
            ],
            &[],
        );
        assert_eq!(t.status, 0, "{}", t.out);
        assert!(t.out.contains(&format!("recovered key {fp}")), "{}", t.out);
    } else {
        let o = no_tty(
            &repo_dir,
            &args,
            &[mpw[0], ("SHEAR_KEY_PASSPHRASE", "new passphrase 22")],
        );
        assert!(o.status.success(), "{}", text(&o));
    }

    // The recovered key file opens the repository and restores the disk.
    let out = dir.path().join("out");
    let o = no_tty(
        &repo_dir,
        &[
            "--keyfile",
            &newkey,
            "restore",
            &id,
            "--target",
            out.to_str().unwrap(),
        ],
        &[("SHEAR_KEY_PASSPHRASE", "new passphrase 22")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(out.join("d0.raw")).unwrap() == img,
        "the restore from the recovered key differs"
    );
    // It carries the seal again: a second loss is recoverable from it too.
    let sealed = Key::file_master_seal(Path::new(&newkey)).unwrap().unwrap();
    assert_eq!(sealed.key_fingerprint, fp);

    // A repository made without a master key gets one later (`key seal`),
    // once; then recovery works from it.
    let repo2 = dir.path().join("repo2");
    let key2 = p("key2.json");
    let mut a: Vec<&str> = vec!["key", "create", &key2];
    a.extend(FAST_KDF);
    assert!(no_tty(&repo2, &a, &kpw).status.success());
    assert!(no_tty(&repo2, &["--keyfile", &key2, "init"], &kpw)
        .status
        .success());
    assert!(!repo2.join("master-key-seal.json").exists());
    let seal_cmd = [
        "--keyfile",
        key2.as_str(),
        "key",
        "seal",
        "--master-pubkey",
        mpub.as_str(),
    ];
    let o = no_tty(&repo2, &seal_cmd, &kpw);
    assert!(o.status.success(), "{}", text(&o));
    let o = no_tty(&repo2, &seal_cmd, &kpw);
    assert_eq!(o.status.code(), Some(1), "sealed twice: {}", text(&o));
    let fp2 = Key::file_fingerprint(Path::new(&key2)).unwrap().to_string();
    std::fs::remove_file(&key2).unwrap();
    let new2 = p("recovered2.json");
    let mut a: Vec<&str> = vec!["key", "recover", &new2, "--master-key", &mkey];
    a.extend(FAST_KDF);
    let o = no_tty(
        &repo2,
        &a,
        &[mpw[0], ("SHEAR_KEY_PASSPHRASE", "new passphrase 33")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        Key::file_fingerprint(Path::new(&new2)).unwrap().to_string(),
        fp2
    );
}
