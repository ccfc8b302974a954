//! `shear daemon` as a real process (issue 12): its HTTP API under abuse
//! (no VM), and, with one real guest, scheduled runs that prune, a VM
//! that is gone failing alone, SIGHUP with a broken config, a missed slot
//! run once at start, and SIGTERM in the middle of a backup.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shear_tests::shear::{assert_released_and_clean, run_ok, ShearEnv};
use shear_tests::{require_guest, shear_bin, wait_until, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

/// A `shear daemon` child; SIGKILLed on drop if still running.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(env: &ShearEnv) -> Daemon {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = env.dir.path().join(format!("daemon-{n}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(shear_bin())
            .args(["daemon", "--config"])
            .arg(config_path(env))
            .env("RUST_LOG", "info")
            .env_remove("SHEAR_TEST_FROZEN_HOOK")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        let d = Daemon { child, log };
        let sock = socket(env);
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(50),
            "the daemon's API socket",
            || UnixStream::connect(&sock).ok(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.id();
        let name = match sig {
            libc::SIGHUP => "HUP",
            libc::SIGTERM => "TERM",
            _ => "KILL",
        };
        run_ok({
            let mut c = Command::new("kill");
            c.arg(format!("-{name}")).arg(pid.to_string());
            c
        });
    }

    /// SIGTERM and wait for a clean exit (status 0) within `timeout`.
    fn stop(mut self, timeout: Duration) -> String {
        self.signal(libc::SIGTERM);
        let st = wait_until(
            timeout,
            Duration::from_millis(50),
            "the daemon to exit",
            || self.child.try_wait().unwrap(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()));
        let log = self.log_text();
        assert!(st.success(), "daemon exited {st}:\n{log}");
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_path(env: &ShearEnv) -> PathBuf {
    env.dir.path().join("daemon.toml")
}

fn socket(env: &ShearEnv) -> PathBuf {
    env.dir.path().join("api.sock")
}

/// Write the daemon config: the common part plus `jobs`.
fn write_config(env: &ShearEnv, vms_dir: &Path, extra: &str, jobs: &str) {
    let d = env.dir.path();
    let text = format!(
        r#"run_dir = "{run}"
state_dir = "{d}/state"
qmp_socket = "{vms}/{{vmid}}.qmp"
qga_socket = "{vms}/{{vmid}}.qga"
fleecing_dir = "{fleece}"
{extra}
[api]
socket = "{d}/api.sock"
{jobs}
"#,
        run = env.run_dir().display(),
        d = d.display(),
        vms = vms_dir.display(),
        fleece = env.fleece_dir().display(),
    );
    std::fs::write(config_path(env), text).unwrap();
}

/// One raw HTTP/1.1 exchange on `s`; returns (status, body).
fn exchange<S: Read + Write>(mut s: S, raw: &[u8]) -> (u16, Vec<u8>) {
    // The daemon may answer (413) and close before a huge body is sent.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response to {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        b = &b[nl + 2..];
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[..n]);
        b = &b[n + 2..];
    }
}

fn request_raw(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn unix_conn(env: &ShearEnv) -> UnixStream {
    let s = UnixStream::connect(socket(env)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn call(env: &ShearEnv, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    exchange(unix_conn(env), &request_raw(method, path, "", body))
}

fn get_json(env: &ShearEnv, path: &str) -> Value {
    let (st, body) = call(env, "GET", path, b"");
    assert_eq!(st, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// A JSON error with this status and kind.
fn assert_error(st: u16, body: &[u8], want_status: u16, kind: &str) {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON ({st}): {}", String::from_utf8_lossy(body)));
    assert_eq!((st, v["kind"].as_str()), (want_status, Some(kind)), "{v}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until task `id` has ended; returns it.
fn wait_task(env: &ShearEnv, id: &str, timeout: Duration) -> Value {
    wait_until(
        timeout,
        Duration::from_millis(200),
        "the task to end",
        || {
            let t = get_json(env, &format!("/api/v1/tasks/{id}"));
            (t["status"] != "running").then_some(t)
        },
    )
    .unwrap()
}

/// No VM: every endpoint, tokens, malformed and huge bodies, path tricks,
/// a slow client, a bounded random-request loop (0 answers >= 500), a
/// valid and a broken SIGHUP, a clean SIGTERM.
#[test]
fn daemon_api_every_endpoint_and_abuse() {
    let env = ShearEnv::new();
    let vms = env.dir.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let port = free_port();
    let repo = env.repo();
    let jobs = format!(
        r#"listen = ["127.0.0.1:{port}"]
[[job]]
id = "manual"
schedule = "daily"
enabled = false
vmids = ["100"]
repo = "{repo}"
keep = {{ last = 1 }}
[[verify]]
id = "check"
schedule = "weekly"
repo = "{repo}"
[[policy]]
vmids = ["100"]
rpo = "1h"
"#,
        repo = repo.display()
    );
    write_config(&env, &vms, "space_low_percent = 100", &jobs);
    let d = Daemon::start(&env);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(socket(&env))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");

    // Every endpoint.
    let st = get_json(&env, "/api/v1/status");
    assert_eq!(st["jobs"], 2);
    let jl = get_json(&env, "/api/v1/jobs");
    assert_eq!(jl.as_array().unwrap().len(), 2, "{jl}");
    assert_eq!(get_json(&env, "/api/v1/jobs/manual")["vms"], json!(["100"]));
    // Run now: VM 100 has no QMP socket, so the run fails for it, with a log.
    let (s, b) = call(&env, "POST", "/api/v1/jobs/manual/run", b"");
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let task: Value = serde_json::from_slice(&b).unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    let t = wait_task(&env, &id, Duration::from_secs(30));
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["vms"][0]["vmid"], "100");
    assert!(
        t["vms"][0]["error"].as_str().unwrap().contains("100.qmp"),
        "{t}"
    );
    // Events: the RPO of VM 100 is missed (no backup at all), the run
    // failed naming VM 100, the repository is "low" (threshold 100 %).
    let events = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "events",
        || {
            let e = std::fs::read_to_string(env.dir.path().join("state/events.log")).ok()?;
            e.contains("\"space-low\"").then_some(e)
        },
    )
    .unwrap();
    let kinds: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    let has = |ev: &str, sev: &str| {
        kinds
            .iter()
            .any(|k| k["body"]["event"] == ev && k["severity"] == sev)
    };
    assert!(has("rpo-missed", "warning"), "{events}");
    assert!(has("job-failed", "error"), "{events}");
    assert!(has("space-low", "warning"), "{events}");
    let (s, log) = call(&env, "GET", &format!("/api/v1/tasks/{id}/log"), b"");
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&log).contains("backup FAILED"));
    assert!(!get_json(&env, "/api/v1/tasks")
        .as_array()
        .unwrap()
        .is_empty());
    // The verify job on the (empty) repository succeeds.
    let (s, b) = call(&env, "POST", "/api/v1/jobs/check/run", b"{}");
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let vid = serde_json::from_slice::<Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        wait_task(&env, &vid, Duration::from_secs(30))["status"],
        "ok"
    );
    let bl = get_json(&env, &format!("/api/v1/backups?repo={}", repo.display()));
    assert_eq!(bl, json!([]));
    assert!(get_json(&env, "/api/v1/backups").is_array());
    let (s, b) = call(
        &env,
        "GET",
        "/api/v1/backups/vm/100/2026-01-01T00:00:00Z",
        b"",
    );
    assert_error(s, &b, 404, "not-found");
    let vmsl = get_json(&env, "/api/v1/vms");
    assert_eq!(vmsl[0]["vmid"], "100");
    assert_eq!(vmsl[0]["running"], false);
    let repos = get_json(&env, "/api/v1/repos");
    assert_eq!(repos[0]["ok"], true, "{repos}");
    let (s, m) = call(&env, "GET", "/metrics", b"");
    let m = String::from_utf8(m).unwrap();
    assert_eq!(s, 200);
    for want in [
        "shear_backup_failures_total{vmid=\"100\"} 1",
        "shear_rpo_breached{vmid=\"100\"} 1",
        "shear_backup_bytes_read_total{vmid=\"100\"} 0",
        "# TYPE shear_rpo_seconds gauge",
        "# TYPE shear_backup_last_success_timestamp_seconds gauge",
        "# TYPE shear_backup_freeze_window_seconds gauge",
        "# TYPE shear_backup_last_duration_seconds gauge",
        &format!("shear_repo_bytes{{repo=\"{}\"}}", repo.display()),
    ] {
        assert!(m.contains(want), "metrics lack {want:?}:\n{m}");
    }
    // The CLI through the socket.
    let cli = |args: &[&str]| {
        let mut c = Command::new(shear_bin());
        c.args(args).arg("--config").arg(config_path(&env));
        c
    };
    let out = run_ok(cli(&["job", "list"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("manual"));
    let out = run_ok(cli(&["task", "log", &id]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("backup FAILED"));
    let out = run_ok(cli(&["task", "list", "--json"]));
    let tl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(tl
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == id.as_str()));
    let out = cli(&["report", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "RPO breached: exit 1");
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep[0]["rpo_status"], "breached", "{rep}");

    // Errors: JSON with a kind, never 5xx.
    let (s, b) = call(&env, "POST", "/api/v1/jobs/manual/run", b"{\"vmids\": [");
    assert_error(s, &b, 400, "bad-request");
    let (s, b) = call(&env, "POST", "/api/v1/jobs/manual/run", b"{\"vmid\": []}");
    assert_error(s, &b, 400, "bad-request");
    let (s, b) = call(
        &env,
        "POST",
        "/api/v1/jobs/manual/run",
        b"{\"vmids\": [\"999\"]}",
    );
    assert_error(s, &b, 400, "bad-request");
    let (s, b) = call(
        &env,
        "POST",
        "/api/v1/jobs/manual/run",
        &vec![b'x'; 1 << 20],
    );
    assert_error(s, &b, 413, "too-large");
    let (s, b) = call(&env, "DELETE", "/api/v1/jobs", b"");
    assert_error(s, &b, 405, "method-not-allowed");
    let (s, b) = call(&env, "POST", "/api/v1/jobs/nope/run", b"");
    assert_error(s, &b, 404, "not-found");
    // Path tricks: nothing outside the task directory or the configured
    // repositories is ever read.
    for p in [
        "/api/v1/tasks/..%2F..%2Fstate",
        "/api/v1/tasks/..%2Fstate.json/log",
        "/api/v1/tasks/%2Fetc%2Fpasswd/log",
        "/api/v1/backups?repo=/etc",
        "/api/v1/backups?repo=..%2F..%2F",
        "/../../etc/passwd",
        "/api/v1/jobs/..%2F..",
    ] {
        let (s, b) = call(&env, "GET", p, b"");
        assert_error(s, &b, 404, "not-found");
    }
    for p in [
        "/api/v1/backups/vm/..%2F..%2Fetc/passwd",
        "/api/v1/backups/vm/100/..",
        "/api/v1/tasks/%ff%fe",
        "/api/v1/backups?vmid=../x",
        "/api/v1/backups?nonsense=1",
    ] {
        let (s, b) = call(&env, "GET", p, b"");
        assert!(
            (400..500).contains(&s),
            "{p}: {s} {}",
            String::from_utf8_lossy(&b)
        );
    }

    // TCP: a token or 401 and nothing else.
    let tcp = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let unauthorized = json!({"error": "unauthorized", "kind": "unauthorized"});
    for h in [
        "",
        "Authorization: Bearer nope\r\n",
        "Authorization: Bearer ci:0000\r\n",
        "Authorization: Basic Y2k6eA==\r\n",
    ] {
        for p in ["/api/v1/jobs", "/metrics", "/nope"] {
            let (s, b) = exchange(tcp(), &request_raw("GET", p, h, b""));
            assert_eq!(s, 401, "{h:?} {p}");
            assert_eq!(serde_json::from_slice::<Value>(&b).unwrap(), unauthorized);
        }
    }
    let out = run_ok(cli(&["token", "create", "ci"]));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let tokens = std::fs::read_to_string(env.dir.path().join("state/tokens.json")).unwrap();
    assert!(
        !tokens.contains(token.split_once(':').unwrap().1),
        "secret stored in clear"
    );
    let auth = format!("Authorization: Bearer {token}\r\n");
    let (s, b) = exchange(tcp(), &request_raw("GET", "/api/v1/jobs", &auth, b""));
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let wrong = format!("Authorization: Bearer {token}0\r\n");
    assert_eq!(
        exchange(tcp(), &request_raw("GET", "/metrics", &wrong, b"")).0,
        401
    );

    // A slow client (half a request line, then silence) blocks nobody and
    // is dropped after the header timeout.
    let mut slow = UnixStream::connect(socket(&env)).unwrap();
    slow.write_all(b"GET /api/v1/jo").unwrap();
    let mut slow_tcp = tcp();
    slow_tcp
        .write_all(b"POST /api/v1/jobs/manual/run HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let t0 = Instant::now();
    for _ in 0..5 {
        get_json(&env, "/api/v1/status");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t0 = Instant::now();
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "slow client held {:?}",
        t0.elapsed()
    );

    // Bounded random requests: never a 5xx, never a hang.
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "G\tET",
    ];
    let paths = [
        "/api/v1/jobs",
        "/api/v1/jobs/manual",
        "/api/v1/jobs/manual/run",
        "/api/v1/tasks",
        &format!("/api/v1/tasks/{id}"),
        &format!("/api/v1/tasks/{id}/log"),
        "/api/v1/backups",
        "/api/v1/backups/vm/100/x",
        "/api/v1/vms",
        "/api/v1/repos",
        "/metrics",
        "/api/v1/status",
        "/",
        "//",
        "/api/v1/jobs/%00",
        "/api/v1/tasks/%2e%2e",
        "*",
        "/api/v1/backups?repo=%",
    ];
    let bodies: [&[u8]; 6] = [
        b"",
        b"{}",
        b"{\"vmids\":[]}",
        b"[1,2",
        b"\xff\xfe",
        b"{\"vmids\":[\"100\"]}",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..300 {
        let m = methods[usize::try_from(next() % 8).unwrap()];
        let mut p = paths[usize::try_from(next() % 18).unwrap()].to_string();
        if next() % 4 == 0 {
            let pos = usize::try_from(next()).unwrap() % (p.len() + 1);
            let c =
                ["%", "..", "/", "?", "#", "%zz", "é", " "][usize::try_from(next() % 8).unwrap()];
            if p.is_char_boundary(pos) {
                p.insert_str(pos, c);
            }
        }
        let body = bodies[usize::try_from(next() % 6).unwrap()];
        let raw = request_raw(m, &p, "", body);
        let (s, _) = if i % 3 == 0 {
            let h = if next() % 2 == 0 { auth.as_str() } else { "" };
            exchange(tcp(), &request_raw(m, &p, h, body))
        } else {
            exchange(unix_conn(&env), &raw)
        };
        assert!(s < 500, "{m} {p:?} → {s}");
        *statuses.entry(s).or_insert(0) += 1;
    }
    eprintln!("random requests by status: {statuses:?}");
    drop(slow_tcp);
    get_json(&env, "/api/v1/status");

    // SIGHUP: a valid change is taken, a broken file is refused and the
    // old config stays.
    write_config(
        &env,
        &vms,
        "",
        &jobs.replace("id = \"check\"", "id = \"check2\""),
    );
    d.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the reload",
        || (call(&env, "GET", "/api/v1/jobs/check2", b"").0 == 200).then_some(()),
    )
    .unwrap();
    std::fs::write(config_path(&env), "[[job]]\nid = \"x\"\nshedule = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the refusal",
        || d.log_text().contains("config reload REFUSED").then_some(()),
    )
    .unwrap();
    assert_eq!(get_json(&env, "/api/v1/jobs").as_array().unwrap().len(), 2);
    assert_eq!(get_json(&env, "/api/v1/jobs/check2")["kind"], "verify");

    let log = d.stop(Duration::from_secs(20));
    assert!(log.contains("shear daemon stopped"), "{log}");
    assert!(!socket(&env).exists(), "API socket left behind");
}

fn tasks_of(env: &ShearEnv, job: &str) -> Vec<Value> {
    get_json(env, "/api/v1/tasks")
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["job"] == job)
        .cloned()
        .collect()
}

fn vm_status(t: &Value, vmid: &str) -> Option<String> {
    t["vms"]
        .as_array()?
        .iter()
        .find(|v| v["vmid"] == vmid)
        .and_then(|v| v["status"].as_str().map(str::to_owned))
}

fn wait_idle(env: &ShearEnv) {
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        "no running task",
        || {
            get_json(env, "/api/v1/status")["running"]
                .as_u64()
                .filter(|n| *n == 0)
        },
    )
    .unwrap();
}

/// One real guest, one daemon process across three configs:
/// - a job every 4 s over VM 100 and VM 999 (no such VM) runs again and
///   again, backs 100 up, prunes to keep-last 2, fails only 999 (task,
///   event, metrics);
/// - SIGHUP with a broken config is refused, the job stays;
/// - SIGTERM (maybe mid-run) leaves the guest thawed and the graph clean;
/// - restarted after a missed slot, the repeat_missed job runs once with
///   trigger `missed`;
/// - SIGTERM while a bandwidth-limited backup reads: cancelled, guest
///   thawed, graph clean, nothing recorded, task `cancelled`.
#[test]
fn vm_daemon_schedules_prunes_fails_one_vm_reloads_and_stops_clean() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let vms = env.dir.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let cfg = VmConfig::guest().disk(DiskSpec::qcow2("d0", 64 * MIB).file("/seed.txt", b"d0"));
    let mut vm = TestVm::start(cfg).unwrap();
    std::os::unix::fs::symlink(vm.qmp_socket(), vms.join("100.qmp")).unwrap();
    std::os::unix::fs::symlink(vm.qga_socket(), vms.join("100.qga")).unwrap();
    let repo = env.repo();
    // A vzdump hook script recording each phase it is called for.
    let phases = env.dir.path().join("phases.txt");
    let hook = env.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1 $2 $3 job=$SHEAR_JOB\" >> {}\n",
            phases.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Real receivers for the job's notifications.
    let smtp = shear_tests::sinks::SmtpSink::start(env.dir.path())
        .expect("python3-aiosmtpd (scripts/setup installs it)");
    let web = shear_tests::sinks::HttpReceiver::start(204, "");
    let targets = format!(
        r#"[[notify_target]]
name = "web"
type = "webhook"
url = "{}"
[[notify_target]]
name = "mail"
type = "smtp"
server = "{}"
from = "shear@host.example"
to = ["ops@example.org"]
"#,
        web.url("/shear"),
        smtp.server()
    );
    let often = |enabled: bool| {
        format!(
            r#"[[job]]
id = "often"
schedule = "*:*:0/4"
enabled = {enabled}
vmids = ["100", "999"]
repo = "{}"
keep = {{ last = 2 }}
max_workers = 2
repeat_missed = true
notify = ["web", "mail"]
script = "{}"
[[policy]]
vmids = ["100"]
rpo = "1h"
"#,
            repo.display(),
            hook.display()
        )
    };
    write_config(&env, &vms, &targets, &often(true));
    let d = Daemon::start(&env);

    // Scheduled runs: three with VM 100 backed up, 999 failing alone.
    let done = wait_until(
        Duration::from_secs(180),
        Duration::from_millis(500),
        "3 good runs",
        || {
            let t = tasks_of(&env, "often");
            let ok = t
                .iter()
                .filter(|t| vm_status(t, "100").as_deref() == Some("ok"))
                .count();
            (ok >= 3).then_some(t)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    for t in done.iter().filter(|t| t["status"] != "running") {
        assert_eq!(t["trigger"], "schedule");
        assert_eq!(vm_status(t, "999").as_deref(), Some("failed"), "{t}");
        assert_eq!(t["status"], "failed", "a failed VM fails the task: {t}");
    }
    let good = done
        .iter()
        .find(|t| vm_status(t, "100").as_deref() == Some("ok"))
        .unwrap();
    let v100 = good["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vmid"] == "100")
        .unwrap();
    assert!(
        v100["backup_id"].as_str().unwrap().starts_with("vm/100/"),
        "{v100}"
    );
    assert!(v100["freeze_window_ms"].as_u64().is_some(), "{v100}");
    // Prune after each run: keep-last 2.
    wait_idle(&env);
    // The hook script saw vzdump's phases: per VM in order, the job's
    // around them; VM 999 (no socket) got backup-abort, 100 backup-end.
    let seen = std::fs::read_to_string(&phases).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    let pos = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("hook phase {l:?} missing:\n{seen}"))
    };
    let init = pos("job-init   job=often");
    let start = pos("job-start   job=often");
    let b100 = pos("backup-start snapshot 100 job=often");
    let e100 = pos("backup-end snapshot 100 job=often");
    let l100 = pos("log-end snapshot 100 job=often");
    let b999 = pos("backup-start snapshot 999 job=often");
    let a999 = pos("backup-abort snapshot 999 job=often");
    let end = pos("job-end   job=often");
    assert!(
        init < start && start < b100 && b100 < e100 && e100 < l100 && l100 < end,
        "{seen}"
    );
    assert!(start < b999 && b999 < a999 && a999 < end, "{seen}");
    assert!(!seen.contains("backup-end snapshot 999"), "{seen}");
    // Each run's job-failed notification (VM 999 failed, 100 ok) reached
    // the webhook receiver and the SMTP sink.
    // (An rpo-missed warning for VM 100 may come first: no backup yet.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let n: Value = loop {
        let req = web
            .recv(deadline.saturating_duration_since(Instant::now()))
            .expect("no job-failed notification reached the webhook");
        let n: Value = serde_json::from_slice(&req.body).unwrap();
        if n["kind"] == "job-failed" {
            break n;
        }
        assert_eq!(n["kind"], "rpo-missed", "{n}");
    };
    assert_eq!(n["job"], "often", "{n}");
    let rows = n["vms"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|v| v["vmid"] == "100" && v["status"] == "ok"),
        "{n}"
    );
    assert!(
        rows.iter()
            .any(|v| v["vmid"] == "999" && v["status"] == "failed"),
        "{n}"
    );
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "a job-failed mail in the SMTP sink",
        || {
            smtp.mails()
                .into_iter()
                .find(|m| m.contains("often") && m.contains("999") && m.contains("FAILED"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", smtp.mails()));
    assert_eq!(env.list().len(), 2, "keep last = 2 after 3+ backups");
    assert!(done.iter().any(|t| t["vms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["pruned"].as_u64() >= Some(1))));
    let events = std::fs::read_to_string(env.dir.path().join("state/events.log")).unwrap();
    assert!(
        events.lines().any(|l| l.contains("\"job-failed\"")
            && l.contains("999.qmp")
            && l.contains("\"status\":\"ok\"")),
        "job-failed event with VM 100 ok and VM 999 failed:\n{events}"
    );
    let (_, m) = call(&env, "GET", "/metrics", b"");
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("shear_backup_last_success_timestamp_seconds{vmid=\"100\"}"),
        "{m}"
    );
    assert!(m.contains("shear_rpo_breached{vmid=\"100\"} 0"), "{m}");
    assert!(
        !m.contains("shear_backup_failures_total{vmid=\"999\"} 0"),
        "{m}"
    );
    let b = get_json(
        &env,
        &format!("/api/v1/backups?vmid=100&repo={}", repo.display()),
    );
    let id = b[0]["backup_id"].as_str().unwrap().to_string();
    let shown = get_json(&env, &format!("/api/v1/backups/{id}"));
    assert_eq!(shown["manifest"]["vmid"], "100", "{shown}");

    // A broken config is refused; the job stays.
    std::fs::write(config_path(&env), "[[job]]\nid = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the refusal",
        || d.log_text().contains("config reload REFUSED").then_some(()),
    )
    .unwrap();
    assert_eq!(get_json(&env, "/api/v1/jobs/often")["schedule"], "*:*:0/4");

    // SIGTERM whenever: the guest and the graph are clean.
    d.stop(Duration::from_secs(120));
    assert_released_and_clean(&mut vm, &env, &["d0"]);

    // Down past a slot: repeat_missed runs it once at start.
    std::thread::sleep(Duration::from_secs(5));
    write_config(&env, &vms, &targets, &often(true));
    let d = Daemon::start(&env);
    let missed = wait_until(
        Duration::from_secs(120),
        Duration::from_millis(300),
        "the missed run",
        || {
            tasks_of(&env, "often")
                .into_iter()
                .find(|t| t["trigger"] == "missed" && t["status"] != "running")
        },
    )
    .unwrap();
    assert_eq!(vm_status(&missed, "100").as_deref(), Some("ok"), "{missed}");
    let n_missed = tasks_of(&env, "often")
        .iter()
        .filter(|t| t["trigger"] == "missed")
        .count();
    assert_eq!(n_missed, 1, "one missed run, not one per missed slot");

    // Reload: "often" off, a slow job on; SIGTERM while it reads.
    let slow = format!(
        r#"[[job]]
id = "slow"
schedule = "daily"
enabled = false
vmids = ["100"]
repo = "{}"
bwlimit = 512
"#,
        repo.display()
    );
    write_config(&env, &vms, &targets, &format!("{}{slow}", often(false)));
    d.signal(libc::SIGHUP);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        "the reload",
        || (call(&env, "GET", "/api/v1/jobs/slow", b"").0 == 200).then_some(()),
    )
    .unwrap();
    wait_idle(&env);
    vm.guest_sh("dd if=/dev/urandom of=/mnt/vda/big bs=1M count=24 2>/dev/null; sync")
        .unwrap();
    let before = env.list().len();
    let (s, b) = call(&env, "POST", "/api/v1/jobs/slow/run", b"");
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let task: Value = serde_json::from_slice(&b).unwrap();
    wait_until(
        Duration::from_secs(90),
        Duration::from_millis(20),
        "the slow backup to read",
        || {
            let e = vm.harness_qmp("query-block-exports", json!({})).unwrap();
            e.as_array().is_some_and(|a| !a.is_empty()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    let log = d.stop(Duration::from_secs(120));
    assert!(log.contains("cancelling the run"), "{log}");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_eq!(
        env.list().len(),
        before,
        "a cancelled backup is not recorded"
    );
    let tid = task["id"].as_str().unwrap();
    let tf: Value = serde_json::from_slice(
        &std::fs::read(env.dir.path().join(format!("state/tasks/{tid}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(tf["status"], "cancelled", "{tf}");
}
