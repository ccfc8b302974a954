//! `shear daemon`'s verify and gc jobs on a real repository (no VM):
//! a corrupted chunk makes the verify task fail with a `verify-damage`
//! event naming the backup; `outdated_after` skips backups verified
//! recently; a gc task succeeds; `shear report` shows the failed verify;
//! the verify-damage event reaches a real webhook receiver (the job's
//! `notify` target) as the documented JSON body.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn http(sock: &Path, method: &str, path: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = &out[end + 4..];
    (status, serde_json::from_slice(body).unwrap_or(Value::Null))
}

/// A one-request-at-a-time HTTP receiver on loopback: each POST body is
/// sent on the channel and answered 204.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<Value>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let body = loop {
                let Ok(n) = s.read(&mut tmp) else { break None };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&tmp[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    break Some(buf[end + 4..end + 4 + len].to_vec());
                }
            };
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            if let Some(b) = body {
                let _ = tx.send(serde_json::from_slice(&b).unwrap_or(Value::Null));
            }
        }
    });
    (url, rx)
}

/// `shear daemon --config CFG` (stderr to LOG), once its socket answers.
fn start_daemon(cfg: &Path, sock: &Path, log: &Path) -> std::process::Child {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shear"))
        .arg("daemon")
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn run_task(sock: &Path, job: &str) -> Value {
    let (s, t) = http(sock, "POST", &format!("/api/v1/jobs/{job}/run"));
    assert_eq!(s, 202, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, t) = http(sock, "GET", &format!("/api/v1/tasks/{id}"));
        if t["status"] != "running" {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} still running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn daemon_verify_damage_outdated_after_gc_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = init_repo(&root, None);
    let a = image(1, 4 * CHUNK as usize);
    let b = image(2, 4 * CHUNK as usize);
    let good = backup(&repo, "100", 0, &[("d0", &a)]);
    let bad = backup(&repo, "101", 10, &[("d0", &b)]);
    // Flip a byte of a chunk only VM 101's backup uses.
    let only_b: Vec<_> = chunk_files(&root)
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let a_has = a.chunks(CHUNK as usize).any(|c| blake3_hex(c) == name);
            !a_has
        })
        .collect();
    assert!(!only_b.is_empty());
    let victim = &only_b[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x5a;
    std::fs::write(victim, bytes).unwrap();

    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("shear.toml");
    let (hook_url, hooked) = webhook_receiver();
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{d}/state"
run_dir = "{d}/run"
[[verify]]
id = "verify"
schedule = "weekly"
repo = "{r}"
outdated_after = "30d"
notify = ["ops"]
[[gc]]
id = "gc"
schedule = "weekly"
repo = "{r}"
[[policy]]
vmids = ["100", "101"]
rpo = "1h"
[api]
socket = "{s}"
[[notify_target]]
name = "ops"
type = "webhook"
url = "{hook_url}"
"#,
            d = dir.path().display(),
            r = root.display(),
            s = sock.display()
        ),
    )
    .unwrap();
    let mut child = start_daemon(&cfg, &sock, &dir.path().join("daemon.log"));

    let t = run_task(&sock, "verify");
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["summary"].as_str().unwrap().contains(&bad.to_string()),
        "{t}"
    );
    assert!(
        !t["summary"].as_str().unwrap().contains(&good.to_string()),
        "{t}"
    );
    let events = std::fs::read_to_string(dir.path().join("state/events.log")).unwrap();
    let damage: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["body"]["event"] == "verify-damage")
        .collect();
    assert_eq!(damage.len(), 1, "{events}");
    assert_eq!(damage[0]["severity"], "error");
    assert_eq!(damage[0]["notify"], serde_json::json!(["ops"]));
    assert_eq!(
        damage[0]["body"]["backups"],
        serde_json::json!([bad.to_string()])
    );
    // The same event as a notification, through the job's webhook target.
    // The failed verify job sends two: verify-damage and job-failed (in
    // either order: sends run in parallel).
    let mut got: Vec<Value> = (0..2)
        .map(|_| {
            hooked
                .recv_timeout(Duration::from_secs(60))
                .expect("a notification did not reach the webhook")
        })
        .collect();
    got.sort_by_key(|n| n["kind"].as_str().unwrap_or_default().to_string());
    assert_eq!(got[0]["kind"], "job-failed", "{got:?}");
    assert_eq!(got[0]["job"], "verify", "{got:?}");
    let n = &got[1];
    assert_eq!(n["kind"], "verify-damage", "{n}");
    assert_eq!(n["severity"], "error", "{n}");
    assert_eq!(n["job"], "verify", "{n}");
    assert!(
        n["message"].as_str().unwrap().contains(&bad.to_string()),
        "{n}"
    );
    // Both were verified just now: outdated_after = 30d skips them.
    let t = run_task(&sock, "verify");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(
        t["summary"].as_str().unwrap().starts_with("0 backup(s)"),
        "{t}"
    );
    let t = run_task(&sock, "gc");
    assert_eq!(t["status"], "ok", "{t}");

    // The report: 100's newest good backup, 101 has none (verify failed).
    let out = Command::new(env!("CARGO_BIN_EXE_shear"))
        .args(["report", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |v: &str| {
        rep.as_array()
            .unwrap()
            .iter()
            .find(|r| r["vmid"] == v)
            .unwrap()
            .clone()
    };
    assert_eq!(row("100")["newest_good_backup"], good.to_string());
    assert_eq!(row("100")["last_verify_state"], "ok");
    assert_eq!(row("101")["newest_good_backup"], Value::Null);
    assert_eq!(row("101")["last_verify_state"], "failed");
    assert_eq!(row("101")["rpo_status"], "breached");
    assert_eq!(out.status.code(), Some(1));

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success());
}

fn blake3_hex(c: &[u8]) -> String {
    blake3::hash(c).to_hex().to_string()
}

/// An encrypted repository with a `[[repo_key]]`: the daemon's verify job
/// decrypts and checks it, and the API lists its backups; a wrong
/// passphrase fails the task naming the key file, the daemon keeps
/// running.
#[test]
fn daemon_encrypted_repository_with_repo_key() {
    use shear::repo::{KdfParams, Key};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let kpath = dir.path().join("key.json");
    let key = Key::create_file(
        &kpath,
        b"long enough pw",
        KdfParams::insecure_fast_for_tests(),
    )
    .unwrap();
    let repo = init_repo(&root, Some(key));
    let id = backup(&repo, "100", 0, &[("d0", &image(3, 2 * CHUNK as usize))]);
    drop(repo);
    let pw = dir.path().join("pw");
    let wrong = dir.path().join("wrong");
    std::fs::write(&pw, "long enough pw\n").unwrap();
    std::fs::write(&wrong, "not the passphrase\n").unwrap();
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("shear.toml");
    let write = |pass: &Path| {
        std::fs::write(
            &cfg,
            format!(
                r#"state_dir = "{d}/state"
run_dir = "{d}/run"
[[verify]]
id = "verify"
schedule = "weekly"
repo = "{r}"
[[repo_key]]
repo = "{r}"
keyfile = "{k}"
passphrase_file = "{p}"
[api]
socket = "{s}"
"#,
                d = dir.path().display(),
                r = root.display(),
                k = kpath.display(),
                p = pass.display(),
                s = sock.display()
            ),
        )
        .unwrap();
    };
    write(&pw);
    let mut child = start_daemon(&cfg, &sock, &dir.path().join("daemon.log"));
    let t = run_task(&sock, "verify");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(
        t["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 backup(s) verified"),
        "{t}"
    );
    let (s, list) = http(&sock, "GET", "/api/v1/backups");
    assert_eq!(s, 200, "{list}");
    assert!(list.to_string().contains(&id.to_string()), "{list}");

    // The passphrase file now holds a wrong one (read at each open).
    std::fs::copy(&wrong, &pw).unwrap();
    let t = run_task(&sock, "verify");
    assert_eq!(t["status"], "failed", "{t}");
    assert!(
        t["summary"]
            .as_str()
            .unwrap()
            .contains(&kpath.display().to_string()),
        "{t}"
    );
    let (s, _) = http(&sock, "GET", "/api/v1/jobs");
    assert_eq!(s, 200, "the daemon still answers");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    assert!(child.wait().unwrap().success());
}

/// One request over TCP with `headers`; (status, body bytes).
fn tcp_call(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut plain = Vec::new();
        let mut b = &body[..];
        while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
            let n =
                usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&b[nl + 2..nl + 2 + n]);
            b = &b[nl + 2 + n + 2..];
        }
        body = plain;
    }
    (status, body)
}

/// F-48: API tokens and what they may do, on the daemon's TCP listener.
/// - Unknown, wrong, expired and disabled tokens get the same 401 on every
///   route, whether the resource exists or not.
/// - A read-only token gets 403 on every non-GET route before any lookup
///   (an existing and a missing job alike).
/// - A token limited to VM 100 (a tenant) gets 403 on host-wide views, and
///   another VM's backup, job and task answer exactly like ones that do not
///   exist; lists show only its VM; a run of a shared job runs only its VM.
/// - No route passes QMP or HMP through; 10 000 levels of JSON nesting get
///   400; `token create`/`delete` run concurrently lose no write (the
///   token file's lock; unit test in `daemon::tokens`).
#[test]
fn daemon_api_token_scopes_and_refusals_f48() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let repo = init_repo(&root, None);
    let img = image(7, CHUNK as usize);
    backup(&repo, "100", 0, &[("d0", &img)]);
    let other = backup(&repo, "101", 0, &[("d0", &img)]);
    drop(repo);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("shear.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{d}/state"
run_dir = "{d}/run"
qmp_socket = "{d}/vms/{{vmid}}.qmp"
[[job]]
id = "a"
schedule = "daily"
enabled = false
vmids = ["100", "101"]
repo = "{r}"
[[job]]
id = "b"
schedule = "daily"
enabled = false
vmids = ["101"]
repo = "{r}"
[api]
socket = "{s}"
listen = ["127.0.0.1:{port}"]
"#,
            d = dir.path().display(),
            r = root.display(),
            s = sock.display()
        ),
    )
    .unwrap();
    let token = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shear"))
            .arg("token")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "token {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "Authorization: Bearer {}\r\n",
            String::from_utf8(out.stdout).unwrap().trim()
        )
    };
    let expiring = token(&["create", "exp", "--expires-in", "1s"]);
    let full = token(&["create", "admin"]);
    let ro = token(&["create", "ro", "--read-only"]);
    let tenant = token(&["create", "t100", "--vmid", "100"]);
    let disabled = token(&["create", "dis"]);
    token(&["disable", "dis"]);
    let listed = token(&["list"]);
    assert!(
        listed.contains("read-only") && listed.contains("vms 100") && listed.contains("DISABLED"),
        "{listed}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let mut child = start_daemon(&cfg, &sock, &dir.path().join("daemon.log"));
    let call = |h: &str, m: &str, p: &str, b: &[u8]| tcp_call(port, m, p, h, b);
    let json = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
    let other_path = format!("/api/v1/backups/{other}");
    let missing_path = other_path.replace("vm/101/", "vm/102/");

    // 401 alike for every bad credential, existing resource or not.
    let unauthorized = serde_json::json!({"error": "unauthorized", "kind": "unauthorized"});
    let wrong = full.replace("admin:", "admin:0");
    for h in ["", wrong.as_str(), expiring.as_str(), disabled.as_str()] {
        for (m, p) in [
            ("GET", "/api/v1/jobs"),
            ("GET", "/api/v1/jobs/a"),
            ("GET", "/api/v1/jobs/nope"),
            ("POST", "/api/v1/jobs/a/run"),
            ("GET", other_path.as_str()),
            ("GET", missing_path.as_str()),
            ("GET", "/metrics"),
        ] {
            let (s, b) = call(h, m, p, b"");
            assert_eq!((s, json(&b)), (401, unauthorized.clone()), "{h:?} {m} {p}");
        }
    }

    // Read-only: GETs work, anything else is 403 before the lookup.
    assert_eq!(call(&ro, "GET", "/api/v1/jobs", b"").0, 200);
    let forbidden = serde_json::json!({"error": "this token may not do that", "kind": "forbidden"});
    for p in ["/api/v1/jobs/a/run", "/api/v1/jobs/nope/run"] {
        let (s, b) = call(&ro, "POST", p, b"");
        assert_eq!(
            (s, json(&b)),
            (403, forbidden.clone()),
            "read-only POST {p}"
        );
    }

    // The tenant of VM 100.
    for p in ["/api/v1/status", "/api/v1/repos", "/metrics"] {
        let (s, b) = call(&tenant, "GET", p, b"");
        assert_eq!((s, json(&b)), (403, forbidden.clone()), "tenant {p}");
    }
    let (s, b) = call(&tenant, "GET", "/api/v1/jobs", b"");
    assert_eq!(s, 200);
    let jobs = json(&b);
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(jobs[0]["id"], "a");
    assert_eq!(jobs[0]["vms"], serde_json::json!(["100"]));
    assert_eq!(
        jobs[0]["backup"]["vms"],
        serde_json::json!(["100"]),
        "{jobs}"
    );
    let (s1, b1) = call(&tenant, "GET", "/api/v1/jobs/b", b"");
    let (s2, b2) = call(&tenant, "GET", "/api/v1/jobs/x", b"");
    assert_eq!(
        (
            s1,
            String::from_utf8_lossy(&b1).replace("\\\"b\\\"", "\\\"x\\\"")
        ),
        (s2, String::from_utf8_lossy(&b2).to_string())
    );
    assert_eq!(s1, 404);
    let (s, b) = call(&tenant, "GET", "/api/v1/backups", b"");
    assert_eq!(s, 200);
    let list = json(&b);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(list.to_string().contains("vm/100/"), "{list}");
    let (s, b) = call(&tenant, "GET", "/api/v1/backups?vmid=101", b"");
    assert_eq!((s, json(&b)), (200, serde_json::json!([])));
    let (s1, b1) = call(&tenant, "GET", &other_path, b"");
    let (s2, b2) = call(&tenant, "GET", &missing_path, b"");
    assert_eq!(s1, 404);
    assert_eq!(
        (
            s1,
            String::from_utf8_lossy(&b1).replace("vm/101/", "vm/102/")
        ),
        (s2, String::from_utf8_lossy(&b2).to_string()),
        "another tenant's backup must read like a missing one"
    );
    assert_eq!(call(&full, "GET", &other_path, b"").0, 200);
    let (s, b) = call(&tenant, "GET", "/api/v1/vms", b"");
    assert_eq!(s, 200);
    let vms: Vec<Value> = json(&b).as_array().unwrap().clone();
    assert!(vms.iter().all(|v| v["vmid"] == "100"), "{vms:?}");
    // Runs: job b is "not there"; 101 in job a reads like a VM it lacks.
    let (s1, b1) = call(&tenant, "POST", "/api/v1/jobs/b/run", b"");
    let (s2, b2) = call(&tenant, "POST", "/api/v1/jobs/x/run", b"");
    assert_eq!((s1, s2), (404, 404));
    assert_eq!(
        String::from_utf8_lossy(&b1).replace("\\\"b\\\"", "\\\"x\\\""),
        String::from_utf8_lossy(&b2)
    );
    let (s1, b1) = call(
        &tenant,
        "POST",
        "/api/v1/jobs/a/run",
        br#"{"vmids":["101"]}"#,
    );
    let (s2, b2) = call(
        &tenant,
        "POST",
        "/api/v1/jobs/a/run",
        br#"{"vmids":["999"]}"#,
    );
    assert_eq!((s1, s2), (400, 400));
    assert_eq!(
        String::from_utf8_lossy(&b1).replace("101", "999"),
        String::from_utf8_lossy(&b2)
    );
    // A full token's task of job b is invisible to the tenant.
    let (s, b) = call(&full, "POST", "/api/v1/jobs/b/run", b"");
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let b_task = json(&b)["id"].as_str().unwrap().to_string();
    for p in [
        format!("/api/v1/tasks/{b_task}"),
        format!("/api/v1/tasks/{b_task}/log"),
    ] {
        let (s, _) = call(&tenant, "GET", &p, b"");
        assert_eq!(s, 404, "tenant sees {p}");
    }
    // The tenant's own run of job a covers VM 100 only.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (s, b) = loop {
        let (s, b) = call(&tenant, "POST", "/api/v1/jobs/a/run", b"");
        if s != 409 || Instant::now() > deadline {
            break (s, b);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let a_task = json(&b)["id"].as_str().unwrap().to_string();
    let t = loop {
        let (_, b) = call(&tenant, "GET", &format!("/api/v1/tasks/{a_task}"), b"");
        let t = json(&b);
        if t["status"] != "running" {
            break t;
        }
        assert!(Instant::now() < deadline, "task still running");
        std::thread::sleep(Duration::from_millis(100));
    };
    let vmids: Vec<&str> = t["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmid"].as_str().unwrap())
        .collect();
    assert_eq!(vmids, ["100"], "{t}");
    let (s, tl) = call(&tenant, "GET", "/api/v1/tasks", b"");
    assert_eq!(s, 200);
    let tl = json(&tl);
    assert!(
        tl.as_array().unwrap().iter().all(|t| t["job"] == "a"),
        "{tl}"
    );

    // Only typed operations: nothing reaches QMP or HMP.
    for p in [
        "/api/v1/qmp",
        "/api/v1/vms/100/qmp",
        "/api/v1/hmp",
        "/api/v1/vms/100/exec",
    ] {
        let (s, _) = call(
            &full,
            "POST",
            p,
            br#"{"execute":"migrate","arguments":{"uri":"exec:touch /tmp/x"}}"#,
        );
        assert!(s == 404 || s == 405, "{p}: {s}");
    }
    // Deep nesting is a 400, not a crash or a 5xx.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (s, _) = call(&full, "POST", "/api/v1/jobs/a/run", deep.as_bytes());
    assert_eq!(s, 400);
    let (s, _) = call(&full, "GET", "/api/v1/status", b"");
    assert_eq!(s, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// Issue 15 in the daemon: snapshots made by `shear snapshot` and left past
/// `snapshot_max_age` raise one `snapshot-old` warning per VM (routed to
/// the targets of the jobs covering it, here a real webhook), not repeated
/// while nothing changes; a VM whose snapshots are all young raises none;
/// `/metrics` carries the oldest snapshot's age.
#[test]
fn daemon_warns_once_about_snapshots_past_their_age_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    drop(init_repo(&root, None));
    let snaps = dir.path().join("state/snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = |vmid: &str, ages_h: &[u64]| {
        let entries: Vec<Value> = ages_h
            .iter()
            .enumerate()
            .map(|(i, h)| {
                serde_json::json!({
                    "name": format!("s{i}"),
                    "tag": format!("s{i}"),
                    "description": "",
                    "created_unix": now - h * 3600,
                    "vmstate": false,
                    "consistency": "crash",
                    "disks": [{"name": "d0", "filename": "/nonexistent/d0.qcow2"}],
                })
            })
            .collect();
        std::fs::write(
            snaps.join(format!("{vmid}.json")),
            serde_json::to_vec(&serde_json::json!({
                "version": 1, "vmid": vmid, "snapshots": entries,
            }))
            .unwrap(),
        )
        .unwrap();
    };
    record("100", &[72, 50, 1]);
    record("101", &[2]);
    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("shear.toml");
    let (hook_url, hooked) = webhook_receiver();
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{d}/state"
run_dir = "{d}/run"
snapshot_max_age = "48h"
[[job]]
id = "nightly"
schedule = "daily"
enabled = false
vmids = ["100", "101"]
repo = "{r}"
notify = ["ops"]
[api]
socket = "{s}"
[[notify_target]]
name = "ops"
type = "webhook"
url = "{hook_url}"
"#,
            d = dir.path().display(),
            r = root.display(),
            s = sock.display()
        ),
    )
    .unwrap();
    let mut child = start_daemon(&cfg, &sock, &dir.path().join("daemon.log"));
    let got = hooked.recv_timeout(Duration::from_secs(60)).unwrap();
    let text = got.to_string();
    assert_eq!(got["kind"], "snapshot-old", "{got:#}");
    assert_eq!(got["severity"], "warning", "{got:#}");
    assert!(text.contains("VM 100"), "{got:#}");
    assert!(
        text.contains("2 snapshot(s) older than 2d, the oldest 3d"),
        "{got:#}"
    );
    // No second warning (VM 100 again, or VM 101 whose snapshot is young).
    if let Ok(more) = hooked.recv_timeout(Duration::from_secs(3)) {
        panic!("a second notification: {more:#}");
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut m = String::new();
    s.read_to_string(&mut m).unwrap();
    let line = m
        .lines()
        .find(|l| l.starts_with("shear_snapshot_oldest_age_seconds{vmid=\"100\"}"))
        .unwrap_or_else(|| panic!("no age gauge:\n{m}"));
    let age: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
    assert!((72.0 * 3600.0..73.0 * 3600.0).contains(&age), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

/// `[[sync]]` jobs: copy the selected VM's backups (vmid filter, verify)
/// to another repository, remove vanished ones on the next run, and a
/// sync that fails (target missing) ends as a failed task with a
/// job-failed notification to the job's target.
#[test]
fn daemon_sync_job_vmid_filter_remove_vanished_and_failure_notification() {
    let dir = tempfile::tempdir().unwrap();
    let src_root = dir.path().join("src");
    let dst_root = dir.path().join("dst");
    let src = init_repo(&src_root, None);
    let dst = init_repo(&dst_root, None);
    let a = image(31, 4 * CHUNK as usize);
    let b = image(32, 4 * CHUNK as usize);
    let c = image(33, 4 * CHUNK as usize);
    let first = backup(&src, "100", 0, &[("d0", &a)]);
    let second = backup(&src, "100", 10, &[("d0", &b)]);
    backup(&src, "101", 20, &[("d0", &c)]);

    let sock = dir.path().join("api.sock");
    let cfg = dir.path().join("shear.toml");
    let (hook_url, hooked) = webhook_receiver();
    std::fs::write(
        &cfg,
        format!(
            r#"state_dir = "{d}/state"
run_dir = "{d}/run"
[[sync]]
id = "offsite"
schedule = "daily"
from = "{s}"
to = "{t}"
vmids = [100]
remove_vanished = true
verify = true
[[sync]]
id = "broken"
schedule = "daily"
from = "{s}"
to = "{d}/missing"
notify = ["ops"]
[api]
socket = "{sock}"
[[notify_target]]
name = "ops"
type = "webhook"
url = "{hook_url}"
"#,
            d = dir.path().display(),
            s = src_root.display(),
            t = dst_root.display(),
            sock = sock.display()
        ),
    )
    .unwrap();
    let mut child = start_daemon(&cfg, &sock, &dir.path().join("daemon.log"));

    let t = run_task(&sock, "offsite");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(
        t["summary"]
            .as_str()
            .unwrap()
            .starts_with("2 backup(s) copied"),
        "{t}"
    );
    let listed: Vec<String> = dst
        .list_backups(None)
        .unwrap()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(listed, vec![first.to_string(), second.to_string()]);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(restore_raw(&dst, &second, "d0", out.path()), b);

    // The source forgets its first backup: the next run removes it.
    src.forget(&first).unwrap();
    let t = run_task(&sock, "offsite");
    assert_eq!(t["status"], "ok", "{t}");
    assert!(
        t["summary"]
            .as_str()
            .unwrap()
            .contains("1 vanished removed"),
        "{t}"
    );
    let listed: Vec<String> = dst
        .list_backups(None)
        .unwrap()
        .iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(listed, vec![second.to_string()]);

    let t = run_task(&sock, "broken");
    assert_eq!(t["status"], "failed", "{t}");
    assert!(t["summary"].as_str().unwrap().contains("missing"), "{t}");
    let n = hooked
        .recv_timeout(Duration::from_secs(60))
        .expect("the job-failed notification did not reach the webhook");
    assert_eq!(n["kind"], "job-failed", "{n}");
    assert_eq!(n["job"], "broken", "{n}");

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
