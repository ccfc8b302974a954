//! vzdump-compatible hook scripts and CLI notifications (issue 12) on the
//! real guest: `shear backup --script HOOK --notify web,mail`.
//!
//! One boot proves: the phases come in vzdump's order with vzdump's
//! arguments and environment (stop mode: pre-stop, pre-restart,
//! post-restart), LOGFILE at log-end holds the VM's log, TARGET at
//! backup-end names the committed backup; the job-finished notification
//! reaches a real SMTP sink and a webhook receiver; then a hook exiting 1
//! at backup-start aborts that VM's backup with a clear error before
//! anything is touched (nothing stored, guest running and thawed, graph,
//! fleecing dir and run dir clean) and job-failed is notified.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{json, Value};
use shear_tests::shear::{assert_graph_clean, assert_released_and_clean, report_of, ShearEnv};
use shear_tests::sinks::{HttpReceiver, SmtpSink};
use shear_tests::{require_guest, DiskSpec, TestVm, VmConfig};

const MIB: u64 = 1 << 20;

fn phases(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn vm_hook_script_phases_env_backup_start_abort_and_notify() {
    if !require_guest() {
        return;
    }
    let env = ShearEnv::new();
    let dir = env.dir.path();
    let Some(smtp) = SmtpSink::start(dir) else {
        return;
    };
    let web = HttpReceiver::start(200, "ok");
    std::fs::write(
        dir.join("no-config.toml"),
        format!(
            r#"node = "testnode"

[[notify_target]]
name = "web"
type = "webhook"
url = "{}"

[[notify_target]]
name = "mail"
type = "smtp"
server = "{}"
from = "shear@testnode.example"
to = ["ops@example.org"]
"#,
            web.url("/hook"),
            smtp.server()
        ),
    )
    .unwrap();
    let log = dir.join("hook.log");
    let refuse = dir.join("refuse");
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            r#"#!/bin/sh
echo "$*|VMTYPE=${{VMTYPE-}}|DUMPDIR=${{DUMPDIR-}}|HOSTNAME=${{HOSTNAME-}}|TARGET=${{TARGET-}}|LOGFILE=${{LOGFILE:+set}}" >> {log}
if [ "$1" = log-end ]; then cp "$LOGFILE" {dir}/vm-log.txt; fi
if [ "$1" = backup-end ]; then echo "copied $TARGET offsite"; fi
if [ "$1" = backup-start ] && [ -e {refuse} ]; then
    echo "maintenance window: refusing VM $3" >&2
    exit 1
fi
exit 0
"#,
            log = log.display(),
            dir = dir.display(),
            refuse = refuse.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hook_s = hook.to_str().unwrap();
    let repo = env.repo().display().to_string();

    let mut vm =
        TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2("d0", 32 * MIB).ext4())).unwrap();

    // 1. Stop mode, every phase.
    let out = env
        .backup(
            &vm,
            &[
                "--mode",
                "stop",
                "--stop-timeout",
                "90",
                "--script",
                hook_s,
                "--notify",
                "web,mail",
            ],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    let report = report_of(&out);
    let id = report["backup_id"].as_str().unwrap().to_string();
    let want = |p: &str, target: &str, logfile: &str| {
        format!("{p} stop 100|VMTYPE=qemu|DUMPDIR={repo}|HOSTNAME=testnode|TARGET={target}|LOGFILE={logfile}")
    };
    let job = |p: &str| format!("{p}|VMTYPE=|DUMPDIR={repo}|HOSTNAME=|TARGET=|LOGFILE=");
    assert_eq!(
        phases(&log),
        vec![
            job("job-init"),
            job("job-start"),
            want("backup-start", "", ""),
            want("pre-stop", "", ""),
            want("pre-restart", "", ""),
            want("post-restart", "", ""),
            want("backup-end", &id, ""),
            want("log-end", "", "set"),
            job("job-end"),
        ],
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains(&format!("hook backup-end: copied {id} offsite")),
        "{stderr}"
    );
    let vm_log = std::fs::read_to_string(dir.join("vm-log.txt")).unwrap();
    assert!(
        vm_log.contains("backup of VM 100 (stop mode) starts"),
        "{vm_log}"
    );
    assert!(
        vm_log.contains(&format!("backup {id} committed")),
        "{vm_log}"
    );
    // The guest boots again right after the filters went in.
    shear_tests::wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        "guest back",
        || vm.qga("guest-ping", json!(null)).ok(),
    )
    .unwrap();
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    // LOGFILE was removed after log-end (and its directory with it).
    // Notifications: webhook JSON and mail.
    let req = web.recv(Duration::from_secs(10)).unwrap();
    let v: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(v["kind"], "job-finished", "{v}");
    assert_eq!(v["job"], "cli");
    assert_eq!(v["host"], "testnode");
    assert_eq!(v["vms"][0]["vmid"], "100");
    assert_eq!(v["vms"][0]["status"], "ok");
    assert_eq!(v["vms"][0]["backup_id"], id.as_str());
    assert_eq!(v["vms"][0]["consistency"], "application");
    assert_eq!(v["vms"][0]["freeze_window_ms"], report["freeze_window_ms"]);
    let mails = smtp.wait_mails(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1, "{stderr}");
    let unfold = |m: &str| m.replace("\r\n", "\n").replace("\n ", " ");
    let m = unfold(&mails[0]);
    assert!(m.contains("Subject: [shear "), "{m}");
    assert!(
        m.contains("shear backup job cli on testnode: 1 VM(s) backed up"),
        "{m}"
    );
    assert!(m.contains(&format!("VM 100 backup: {id}")), "{m}");
    assert!(
        stderr.contains("notification sent to web") && stderr.contains("notification sent to mail")
    );

    // 2. backup-start exits 1: that VM's backup is aborted before anything
    //    is touched; the other phases still run; job-failed is notified.
    std::fs::write(&refuse, "").unwrap();
    std::fs::remove_file(&log).unwrap();
    let out = env
        .backup(&vm, &["--script", hook_s, "--notify", "web,mail"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r[0]["kind"], "hook", "{r}");
    assert_eq!(r[0]["guest"], "untouched", "{r}");
    let err = r[0]["error"].as_str().unwrap();
    assert!(
        err.contains("aborted by the hook script")
            && err.contains("failed at phase backup-start (exit status: 1)")
            && err.contains("maintenance window: refusing VM 100"),
        "{err}"
    );
    let want = |p: &str| {
        format!("{p} snapshot 100|VMTYPE=qemu|DUMPDIR={repo}|HOSTNAME=testnode|TARGET=|LOGFILE=")
    };
    let mut log_end = want("log-end");
    log_end.replace_range(log_end.len() - "LOGFILE=".len().., "LOGFILE=set");
    assert_eq!(
        phases(&log),
        vec![
            job("job-init"),
            job("job-start"),
            want("backup-start"),
            want("backup-abort"),
            log_end,
            job("job-end"),
        ]
    );
    // Nothing stored, nothing touched.
    let list: Value = serde_json::from_slice(
        &env.shear(&["list", "100", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_released_and_clean(&mut vm, &env, &["d0"]);
    assert_graph_clean(&mut vm, &env, &["d0"]);
    let req = web.recv(Duration::from_secs(10)).unwrap();
    let v: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(v["kind"], "job-failed", "{v}");
    assert_eq!(v["severity"], "error");
    assert_eq!(v["vms"][0]["status"], "failed");
    assert!(v["vms"][0]["error"]
        .as_str()
        .unwrap()
        .contains("backup-start"));
    let mails = smtp.wait_mails(2, Duration::from_secs(10));
    assert_eq!(mails.len(), 2);
    let m = unfold(&mails[1]);
    assert!(m.contains("Subject: [shear error]"), "{m}");
    assert!(
        m.contains("VM 100 error: aborted by the hook script"),
        "{m}"
    );
}
