#![allow(clippy::unwrap_used)]

use super::config::{routed, validate};
use super::*;

fn rows() -> Vec<VmRow> {
    vec![
        VmRow {
            vmid: "100".into(),
            status: "ok".into(),
            duration_ms: Some(12_340),
            size_bytes: Some(3 << 20),
            consistency: Some("application".into()),
            freeze_window_ms: Some(87),
            backup_id: Some("vm/100/2026-11-30T02:30:00Z".into()),
            ..VmRow::default()
        },
        VmRow {
            vmid: "101".into(),
            status: "failed".into(),
            duration_ms: Some(500),
            error: Some("QMP socket /run/101.qmp: connection refused".into()),
            ..VmRow::default()
        },
    ]
}

fn targets(toml_text: &str) -> crate::config::Config {
    toml::from_str(toml_text).unwrap()
}

#[test]
fn job_notification_severity_and_kind_follow_the_rows() {
    let n = Notification::for_job("nightly", "pve1", rows());
    assert_eq!(n.severity, Severity::Error);
    assert_eq!(n.kind, Kind::JobFailed);
    assert!(n.title.contains("1 of 2 VM(s) FAILED"), "{}", n.title);
    let ok = Notification::for_job("nightly", "pve1", rows()[..1].to_vec());
    assert_eq!((ok.severity, ok.kind), (Severity::Info, Kind::JobFinished));
    let mut crash = rows()[..1].to_vec();
    crash[0].consistency = Some("crash".into());
    let w = Notification::for_job("nightly", "pve1", crash);
    assert_eq!((w.severity, w.kind), (Severity::Warning, Kind::JobFinished));
}

#[test]
fn text_rendering_has_a_row_per_vm_and_the_errors() {
    let n = Notification::for_job("nightly", "pve1", rows());
    let t = n.render_text();
    assert!(t.contains("Job:      nightly"), "{t}");
    assert!(t.contains("Event:    job-failed"), "{t}");
    let row100 = t.lines().find(|l| l.starts_with("100 ")).unwrap();
    for want in ["ok", "12.34 s", "3.0 MiB", "application", "87 ms"] {
        assert!(row100.contains(want), "{want:?} not in {row100:?}");
    }
    assert!(
        t.contains("VM 100 backup: vm/100/2026-11-30T02:30:00Z"),
        "{t}"
    );
    assert!(t.contains("VM 101 error: QMP socket /run/101.qmp: connection refused"));
    assert!(t.lines().all(|l| l.len() <= TEXT_WIDTH), "{t}");
    assert_eq!(n.subject(), format!("[shear error] {}", n.title));
}

#[test]
fn json_rendering_round_trips_with_documented_names() {
    let n = Notification::for_job("nightly", "pve1", rows());
    let v: serde_json::Value = serde_json::from_str(&n.render_json()).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["severity"], "error");
    assert_eq!(v["kind"], "job-failed");
    assert_eq!(v["job"], "nightly");
    assert_eq!(v["vms"][0]["freeze_window_ms"], 87);
    assert_eq!(v["vms"][0]["size_bytes"], 3 << 20);
    assert!(v["vms"][1].get("backup_id").is_none());
    let back: Notification = serde_json::from_value(v).unwrap();
    assert_eq!(back, n);
}

#[test]
fn matchers_route_like_proxmox() {
    let cfg = targets(
        r#"
[[notify_target]]
name = "ops"
type = "webhook"
url = "http://127.0.0.1:9/x"

[[notify_target]]
name = "mail"
type = "smtp"
server = "127.0.0.1:25"
from = "shear@host.example"
to = ["ops@example.org"]

[[notify_target]]
name = "pager"
type = "webhook"
url = "https://pager.example/x"
match_severity = ["error"]
match_vmid = ["101"]

[[notify_matcher]]
name = "errors-to-mail"
match_severity = ["error", "warning"]
match_job = ["nightly"]
target = ["mail"]

[[notify_matcher]]
name = "vm-200-any"
match_vmid = ["200"]
target = ["mail"]
"#,
    );
    validate(&cfg.notify_target, &cfg.notify_matcher).unwrap();
    let t = |name: &str| cfg.notify_target.iter().find(|t| t.name == name).unwrap();
    let m = &cfg.notify_matcher;
    let failed = Notification::for_job("nightly", "pve1", rows());
    let ok = Notification::for_job("nightly", "pve1", rows()[..1].to_vec());
    let weekly_failed = Notification::for_job("weekly", "pve1", rows());
    // No matcher names ops: it gets everything.
    assert!(routed(t("ops"), m, &ok));
    assert!(routed(t("ops"), m, &failed));
    // mail: only what a matcher naming it matches.
    assert!(routed(t("mail"), m, &failed));
    assert!(!routed(t("mail"), m, &ok));
    assert!(!routed(t("mail"), m, &weekly_failed));
    let mut vm200 = ok.clone();
    vm200.vms[0].vmid = "200".into();
    assert!(routed(t("mail"), m, &vm200), "second matcher (any job)");
    // pager: its own filters, all of them.
    assert!(routed(t("pager"), m, &failed));
    assert!(!routed(t("pager"), m, &ok));
    let mut failed_100 = failed.clone();
    failed_100.vms.truncate(1);
    failed_100.vms[0].status = "failed".into();
    let failed_100 = Notification::for_job("nightly", "pve1", failed_100.vms);
    assert!(!routed(t("pager"), m, &failed_100), "vmid 101 not in it");

    // mode = any, invert_match.
    let mut any = m[0].clone();
    any.mode = config::MatchMode::Any;
    assert!(any.matches(&weekly_failed), "severity alone matches");
    any.invert_match = true;
    assert!(!any.matches(&weekly_failed));
}

#[test]
fn bad_target_configs_are_refused_with_the_reason() {
    let cases = [
        (
            "[[notify_target]]\nname = \"a\"\ntype = \"webhook\"\nurl = \"ftp://x/\"\n",
            "http:// or https://",
        ),
        (
            "[[notify_target]]\nname = \"a\"\ntype = \"sendmail\"\nfrom = \"not an address\"\nto = [\"x@y.z\"]\n",
            "bad from address",
        ),
        (
            "[[notify_target]]\nname = \"a\"\ntype = \"sendmail\"\nfrom = \"a@b.c\"\nto = []\n",
            "to is empty",
        ),
        (
            "[[notify_target]]\nname = \"a\"\ntype = \"webhook\"\nurl = \"http://x/\"\n[[notify_target]]\nname = \"a\"\ntype = \"webhook\"\nurl = \"http://y/\"\n",
            "defined twice",
        ),
        (
            "[[notify_matcher]]\nname = \"m\"\ntarget = [\"nope\"]\n",
            "not a [[notify_target]]",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shear.toml");
    for (text, want) in cases {
        std::fs::write(&p, text).unwrap();
        let e = crate::config::Config::load_from(&p).unwrap_err();
        assert!(
            matches!(e, crate::config::ConfigError::Invalid { .. }),
            "{text}: {e}"
        );
        let msg = crate::chain(&e);
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
    // An unknown type or key is a parse error.
    std::fs::write(&p, "[[notify_target]]\nname = \"a\"\ntype = \"pigeon\"\n").unwrap();
    let e = crate::config::Config::load_from(&p).unwrap_err();
    assert!(matches!(e, crate::config::ConfigError::Parse { .. }), "{e}");
}

#[test]
fn select_names_unknown_targets() {
    let cfg =
        targets("[[notify_target]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"http://x/\"\n");
    assert_eq!(
        select(&cfg.notify_target, &["ops".into()]).unwrap().len(),
        1
    );
    let e = select(&cfg.notify_target, &["opz".into()]).unwrap_err();
    assert!(e.contains("\"opz\"") && e.contains("known: ops"), "{e}");
}

#[test]
fn long_lines_wrap_at_spaces_and_long_words_are_cut() {
    let long = format!("VM 101 error: {}", "word ".repeat(40));
    let w = wrap(&long, 20);
    assert!(w.lines().all(|l| l.chars().count() <= 20), "{w}");
    assert!(w.lines().skip(1).all(|l| l.starts_with("  ")), "{w}");
    let joined: Vec<&str> = w.split_whitespace().collect();
    let orig: Vec<&str> = long.split_whitespace().collect();
    assert_eq!(joined, orig, "no word lost");
    let w = wrap(&"x".repeat(50), 20);
    assert_eq!(w.replace(['\n', ' '], ""), "x".repeat(50));
    assert!(w.lines().all(|l| l.chars().count() <= 20), "{w}");
}

#[test]
fn webhook_signature_is_hmac_sha256() {
    // RFC 4231 test case 2.
    assert_eq!(
        webhook::signature("Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}
