//! Notifications (issue 12) against real receivers: an SMTP sink
//! (aiosmtpd), local HTTP receivers and a sendmail program. Every target
//! gets its mail or JSON; a target that is down, failing or hung gives a
//! clear error within its deadline and the others still get theirs.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use shear::notify::{notify, Kind, MatcherConfig, Notification, Severity, TargetConfig, VmRow};
use shear_tests::sinks::{free_port, HttpReceiver, SmtpSink};

fn rows() -> Vec<VmRow> {
    vec![
        VmRow {
            vmid: "100".into(),
            status: "ok".into(),
            duration_ms: Some(4_200),
            size_bytes: Some(64 << 20),
            consistency: Some("application".into()),
            freeze_window_ms: Some(93),
            backup_id: Some("vm/100/2026-11-30T02:30:00Z".into()),
            ..VmRow::default()
        },
        VmRow {
            vmid: "101".into(),
            status: "failed".into(),
            duration_ms: Some(300),
            error: Some("QMP socket /run/qemu-server/101.qmp: connection refused".into()),
            ..VmRow::default()
        },
    ]
}

fn config(text: &str) -> (Vec<TargetConfig>, Vec<MatcherConfig>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shear.toml");
    std::fs::write(&p, text).unwrap();
    let c = shear::config::Config::load_from(&p).unwrap();
    (c.notify_target, c.notify_matcher)
}

#[test]
fn notify_real_smtp_webhook_sendmail_and_down_targets_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let Some(smtp) = SmtpSink::start(dir.path()) else {
        return;
    };
    let hook = HttpReceiver::start(204, "");
    let broken = HttpReceiver::start(500, "receiver broke");
    let hung = HttpReceiver::hung();
    let dead_http = free_port();
    let dead_smtp = free_port();
    // A real sendmail-compatible program: records its arguments and the mail.
    let sendmail = dir.path().join("sendmail");
    let sent = dir.path().join("sendmail.out");
    std::fs::write(
        &sendmail,
        format!(
            "#!/bin/sh\necho \"ARGS: $*\" > {0}\ncat >> {0}\n",
            sent.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&sendmail, std::fs::Permissions::from_mode(0o755)).unwrap();

    let (targets, matchers) = config(&format!(
        r#"
[[notify_target]]
name = "mail"
type = "smtp"
server = "{smtp}"
from = "shear@pve1.example"
to = ["ops@example.org", "oncall@example.org"]

[[notify_target]]
name = "web"
type = "webhook"
url = "{web}"
headers = {{ Authorization = "Bearer t0ken" }}
secret = "s3cret"

[[notify_target]]
name = "local"
type = "sendmail"
command = "{sendmail}"
from = "root@pve1.example"
to = ["root@localhost"]

[[notify_target]]
name = "broken"
type = "webhook"
url = "{broken}"

[[notify_target]]
name = "hung"
type = "webhook"
url = "{hung}"
timeout = 3

[[notify_target]]
name = "dead-web"
type = "webhook"
url = "http://127.0.0.1:{dead_http}/x"

[[notify_target]]
name = "dead-mail"
type = "smtp"
server = "127.0.0.1:{dead_smtp}"
mode = "insecure"
from = "shear@pve1.example"
to = ["ops@example.org"]

[[notify_target]]
name = "infos-only"
type = "webhook"
url = "{web}"
match_severity = ["info"]
"#,
        smtp = smtp.server(),
        web = hook.url("/shear"),
        sendmail = sendmail.display(),
        broken = broken.url("/b"),
        hung = hung.url("/h"),
    ));
    let n = Notification::for_job("nightly", "pve1", rows());
    assert_eq!((n.severity, n.kind), (Severity::Error, Kind::JobFailed));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let results = rt.block_on(notify(&targets, &matchers, &n));
    let took = t0.elapsed();
    for (name, r) in &results {
        eprintln!("{name}: {r:?}");
    }
    let get = |name: &str| {
        results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("no result for {name}: {results:?}"))
    };
    // Routed: every target but infos-only (an error is not an info).
    assert_eq!(results.len(), 7, "{results:?}");
    get("mail").as_ref().unwrap();
    get("web").as_ref().unwrap();
    get("local").as_ref().unwrap();
    let e = shear::chain(get("broken").as_ref().unwrap_err());
    assert!(e.contains("500") && e.contains("receiver broke"), "{e}");
    assert!(e.contains(&broken.url("/b")), "{e}");
    let e = shear::chain(get("hung").as_ref().unwrap_err());
    assert!(
        e.contains("did not answer within 3 s") || e.contains("timed out"),
        "{e}"
    );
    let e = shear::chain(get("dead-web").as_ref().unwrap_err());
    assert!(
        e.contains(&format!("127.0.0.1:{dead_http}")) && e.contains("refused"),
        "{e}"
    );
    let e = shear::chain(get("dead-mail").as_ref().unwrap_err());
    assert!(
        e.contains(&format!("SMTP server 127.0.0.1:{dead_smtp}")) && e.contains("refused"),
        "{e}"
    );
    // Sends run at once: the hung target's 3 s deadline bounds the whole call.
    assert!(took < Duration::from_secs(20), "notify took {took:?}");

    // The webhook got the JSON body, headers and signature.
    let req = hook.recv(Duration::from_secs(5)).unwrap();
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/shear");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(req.header("authorization"), Some("Bearer t0ken"));
    assert_eq!(
        req.header("x-shear-signature").unwrap(),
        shear::notify::webhook_signature("s3cret", &req.body)
    );
    let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["kind"], "job-failed");
    assert_eq!(v["severity"], "error");
    assert_eq!(v["job"], "nightly");
    assert_eq!(v["host"], "pve1");
    assert_eq!(v["vms"][0]["vmid"], "100");
    assert_eq!(v["vms"][0]["backup_id"], "vm/100/2026-11-30T02:30:00Z");
    assert_eq!(v["vms"][0]["freeze_window_ms"], 93);
    assert_eq!(v["vms"][0]["consistency"], "application");
    assert_eq!(v["vms"][1]["status"], "failed");
    assert!(v["vms"][1]["error"]
        .as_str()
        .unwrap()
        .contains("101.qmp: connection refused"));
    assert!(
        hook.try_recv().is_none(),
        "infos-only must not get an error"
    );

    // The SMTP sink got one mail for both recipients, readable text.
    let mails = smtp.wait_mails(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1, "{mails:?}");
    // Headers may be folded (RFC 5322): unfold.
    let m = &mails[0].replace("\r\n", "\n").replace("\n ", " ");
    assert!(m.contains("From: shear@pve1.example"), "{m}");
    assert!(
        m.contains("ops@example.org") && m.contains("oncall@example.org"),
        "{m}"
    );
    assert!(
        m.contains("Subject: [shear error] shear backup job nightly on pve1: 1 of 2 VM(s) FAILED"),
        "{m}"
    );
    let row = m.lines().find(|l| l.starts_with("100 ")).unwrap();
    for want in ["ok", "4.20 s", "64.0 MiB", "application", "93 ms"] {
        assert!(row.contains(want), "{want:?} not in {row:?}");
    }
    assert!(
        m.contains("VM 100 backup: vm/100/2026-11-30T02:30:00Z"),
        "{m}"
    );
    // Plain text, not quoted-printable or base64.
    assert!(
        !m.contains("Content-Transfer-Encoding: quoted-printable"),
        "{m}"
    );
    assert!(!m.contains("Content-Transfer-Encoding: base64"), "{m}");
    assert!(m.contains("VM 101 error: QMP socket /run/qemu-server/101.qmp: connection refused"));

    // sendmail got the same mail on stdin.
    let s = std::fs::read_to_string(&sent).unwrap();
    assert!(s.contains("root@localhost"), "{s}");
    assert!(s.contains("Subject: [shear error]"), "{s}");
    assert!(s.contains("VM 101 error:"), "{s}");

    // An info goes to infos-only (and web); matchers are honoured end to end.
    let ok = Notification::for_job("nightly", "pve1", rows()[..1].to_vec());
    let only: Vec<TargetConfig> = targets
        .iter()
        .filter(|t| t.name == "infos-only")
        .cloned()
        .collect();
    let r = rt.block_on(notify(&only, &matchers, &ok));
    assert_eq!(r.len(), 1);
    r[0].1.as_ref().unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&hook.recv(Duration::from_secs(5)).unwrap().body).unwrap();
    assert_eq!(v["kind"], "job-finished");
    assert_eq!(v["severity"], "info");
}
