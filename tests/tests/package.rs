//! The Debian package (issue 12): `scripts/package` builds it with
//! cargo-deb from this build's binary; it is unpacked into a temporary
//! root (`dpkg-deb -x`: nothing is installed on the host) and checked:
//! files, conffile, unit, the installed binary runs, its man pages render
//! with `man -l`, its example config loads.
//!
//! Not yet: starting `shear daemon` the way the unit's ExecStart does and
//! running one job through it (the daemon is not on main yet).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use shear_tests::shear::run_ok;
use shear_tests::{require_tool, workspace_root};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file that may have been gzipped by the packager.
fn plain_or_gz(p: &Path) -> PathBuf {
    if p.exists() {
        return p.to_path_buf();
    }
    let gz = PathBuf::from(format!("{}.gz", p.display()));
    assert!(
        gz.exists(),
        "neither {} nor .gz in the package",
        p.display()
    );
    gz
}

#[test]
fn package_deb_unpacks_runs_renders_man_pages_and_loads_its_config() {
    if !["cargo-deb", "dpkg-deb", "man"]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("deb");
    // The binary this test run uses (target/debug/shear): no second build.
    let out = run_ok({
        let mut c = Command::new(workspace_root().join("scripts/package"));
        c.args(["--profile", "dev", "--no-build", "--fast", "--out"])
            .arg(&out_dir);
        c
    });
    let deb = PathBuf::from(text(&out).lines().last().unwrap().trim());
    assert!(deb.is_file(), "{}", deb.display());
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("shear_{}", env!("CARGO_PKG_VERSION"))) && name.ends_with(".deb"),
        "{name}"
    );

    let field = |f: &str| {
        let o = run_ok({
            let mut c = Command::new("dpkg-deb");
            c.arg("-f").arg(&deb).arg(f);
            c
        });
        text(&o).trim().to_string()
    };
    assert_eq!(field("Package"), "shear");
    assert!(
        field("Depends").contains("qemu-utils"),
        "{}",
        field("Depends")
    );
    let ctrl = tmp.path().join("control");
    run_ok({
        let mut c = Command::new("dpkg-deb");
        c.arg("-e").arg(&deb).arg(&ctrl);
        c
    });
    let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/shear/shear.toml"),
        "{conffiles}"
    );

    let root = tmp.path().join("root");
    run_ok({
        let mut c = Command::new("dpkg-deb");
        c.arg("-x").arg(&deb).arg(&root);
        c
    });
    let bin = root.join("usr/bin/shear");
    let v = run_ok({
        let mut c = Command::new(&bin);
        c.arg("--version");
        c
    });
    assert_eq!(
        text(&v).trim(),
        format!("shear {}", env!("CARGO_PKG_VERSION"))
    );

    // The unit runs the daemon on the packaged config.
    let unit = [
        "lib/systemd/system/shear.service",
        "usr/lib/systemd/system/shear.service",
    ]
    .iter()
    .map(|p| root.join(p))
    .find(|p| p.exists())
    .expect("shear.service in the package");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text
            .lines()
            .any(|l| l == "ExecStart=/usr/bin/shear daemon --config /etc/shear/shear.toml"),
        "{unit_text}"
    );
    assert!(
        unit_text.contains("\nKillMode=control-group\n"),
        "{unit_text}"
    );

    // Man pages render.
    let man1 = root.join("usr/share/man/man1");
    for page in ["shear.1", "shear-backup.1", "shear-restore.1"] {
        let p = plain_or_gz(&man1.join(page));
        let o = run_ok({
            let mut c = Command::new("man");
            c.args(["-P", "cat", "-l"]).arg(&p);
            c.env("LANG", "C").env("LC_ALL", "C").env("MANWIDTH", "100");
            c
        });
        let t = text(&o);
        assert!(t.contains("NAME"), "{page}: {t}");
        if page == "shear-backup.1" {
            assert!(t.contains("--notify") && t.contains("--script"), "{t}");
        }
    }
    // Completions.
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/shear")).unwrap();
    assert!(
        bash.contains("backup") && bash.contains("complete"),
        "bash completion"
    );
    let zsh =
        std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_shear")).unwrap();
    assert!(zsh.starts_with("#compdef shear"), "zsh completion");
    assert!(root
        .join("usr/share/fish/vendor_completions.d/shear.fish")
        .is_file());
    assert!(plain_or_gz(&root.join("usr/share/doc/shear/hooks.md")).is_file());

    // The example config, as installed, is valid: a command that loads it
    // succeeds (and a broken one fails, so this check can fail).
    let cfg = root.join("etc/shear/shear.toml");
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    assert!(cfg_text.contains("#[[job]]"), "example job missing");
    let run_dir = tmp.path().join("run");
    let cleanup = |config: &Path| {
        let mut c = Command::new(&bin);
        c.args(["cleanup", "999", "--run-dir"])
            .arg(&run_dir)
            .env("SHEAR_CONFIG", config);
        c.output().unwrap()
    };
    let o = cleanup(&cfg);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text(&o).contains("nothing to clean up"));
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, format!("{cfg_text}\nno_such_key = 1\n")).unwrap();
    assert!(!cleanup(&broken).status.success());

    // The example [[job]], uncommented, is a valid daemon job (notify
    // names targets that stay commented out: dropped here).
    let repo = tmp.path().join("repo");
    let mut in_job = false;
    let mut job = String::new();
    for l in cfg_text.lines() {
        if l.starts_with("#[[job]]") {
            in_job = true;
        } else if in_job && !l.starts_with('#') {
            break;
        }
        if in_job && !l.starts_with("#notify") {
            let l = l.strip_prefix('#').unwrap_or(l);
            if l.starts_with("repo") {
                job.push_str(&format!("repo = \"{}\"\n", repo.display()));
            } else {
                job.push_str(l);
                job.push('\n');
            }
        }
    }
    assert!(job.contains("schedule = \"mon..fri 02:30\""), "{job}");
    let state = tmp.path().join("state");
    let sock = tmp.path().join("api.sock");
    let daemon_cfg = tmp.path().join("daemon.toml");
    std::fs::write(
        &daemon_cfg,
        format!(
            "{cfg_text}\nstate_dir = \"{}\"\nrun_dir = \"{}\"\n{job}\n[[verify]]\nid = \"verify\"\nschedule = \"weekly\"\nrepo = \"{}\"\n[api]\nsocket = \"{}\"\n",
            state.display(),
            run_dir.display(),
            repo.display(),
            sock.display()
        ),
    )
    .unwrap();
    run_ok({
        let mut c = Command::new(&bin);
        c.args(["init", "--repo"]).arg(&repo);
        c
    });
    // Start the daemon the way the unit's ExecStart does, with this
    // package's binary and config in place of /usr/bin and /etc.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/shear.service"))
        .or_else(|_| std::fs::read_to_string(root.join("usr/lib/systemd/system/shear.service")))
        .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .replace("/usr/bin/shear", &bin.display().to_string())
        .replace("/etc/shear/shear.toml", &daemon_cfg.display().to_string());
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let log = std::fs::File::create(tmp.path().join("daemon.log")).unwrap();
    let mut daemon = Command::new(argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if std::time::Instant::now() > deadline || daemon.try_wait().unwrap().is_some() {
            let _ = daemon.kill();
            panic!(
                "the packaged daemon did not come up:\n{}",
                std::fs::read_to_string(tmp.path().join("daemon.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // One job through it, with the packaged CLI.
    let ran = Command::new(&bin)
        .args(["job", "run", "verify", "--wait", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let listed = Command::new(&bin)
        .args(["job", "list", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let _ = Command::new("kill").arg(daemon.id().to_string()).status();
    let exit = daemon.wait().unwrap();
    assert!(
        ran.status.success() && text(&ran).contains(": ok"),
        "{}{}",
        text(&ran),
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(text(&listed).contains("nightly"), "{}", text(&listed));
    assert!(
        exit.success(),
        "the daemon did not stop cleanly on SIGTERM: {exit}"
    );
}
