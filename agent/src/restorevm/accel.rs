//! `--accel auto` that survives a KVM which cannot run guests.
//!
//! QEMU given `-accel kvm -accel tcg` takes KVM whenever `/dev/kvm` opens.
//! On hosts with a broken nested KVM (cloud VMs, CI runners) the guest
//! then hangs for ever right after the firmware: measured on the project
//! machine with the tiny guest, the vCPU thread spins in the host kernel
//! with the guest stuck in the kernel's decompressor (RIP below 0x5000000,
//! paging on), the serial console stays empty and the virtio-serial
//! device is never started, while the same guest under TCG prints its
//! first console line and starts virtio-serial within ~4 s. So a KVM guest
//! "makes progress" when either shows up: any byte on the serial console
//! or the guest's driver starting the virtio-serial device (which carries
//! qemu-ga, so every guest a restore test or `shear files` can use starts
//! it, console or not). A KVM guest with neither within the deadline, and
//! not reading its disks in the last [`DISK_QUIET`] (a slow boot with no
//! console, e.g. Windows before its virtio-serial driver loads), is
//! killed and the VM restarted under TCG. TCG guests are never judged
//! (a slow TCG boot is only slow).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{RestoreVm, VmSpec};
use crate::repo::BackupReader;

/// What one look at a running KVM guest saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes on the serial console so far.
    pub console_bytes: u64,
    /// The guest's driver started the virtio-serial device.
    pub virtio_serial_started: bool,
    /// When (time since QEMU started) the guest's disks were last seen
    /// read: a guest with no console whose virtio-serial driver loads late
    /// (e.g. Windows) keeps reading its disk while it boots; a stuck one
    /// stops after the firmware and boot loader.
    pub last_disk_read: Option<Duration>,
}

/// Disk reads within this long of a look count as booting.
pub const DISK_QUIET: Duration = Duration::from_secs(10);

/// The judgement of a KVM guest at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The guest shows signs of booting: leave it alone.
    Progressing,
    /// No sign yet, still within the deadline.
    Waiting,
    /// No sign within the deadline: restart under TCG.
    Stuck,
}

/// Judges a KVM guest `elapsed` after QEMU started, given `limit`.
pub fn kvm_verdict(p: Progress, elapsed: Duration, limit: Duration) -> Verdict {
    let reading = p
        .last_disk_read
        .is_some_and(|t| elapsed.saturating_sub(t) < DISK_QUIET);
    if p.console_bytes > 0 || p.virtio_serial_started {
        Verdict::Progressing
    } else if elapsed >= limit && !reading {
        Verdict::Stuck
    } else {
        Verdict::Waiting
    }
}

/// The one line printed (and recorded) when KVM is abandoned.
pub fn fallback_reason(limit: Duration) -> String {
    format!(
        "KVM guest showed no progress within {} s (no serial console output, virtio-serial \
         never started, no disk reads in the last {} s: a KVM that cannot run guests, e.g. \
         broken nested virtualisation); restarting the VM under TCG (--accel tcg skips the \
         KVM attempt)",
        limit.as_secs(),
        DISK_QUIET.as_secs()
    )
}

/// Whether `accel` is the `auto` list (KVM first, TCG after it).
pub fn is_auto(accel: &[String]) -> bool {
    accel.len() == 2 && accel[0] == "kvm" && accel[1] == "tcg"
}

/// Starts the VM; with the `auto` accelerator list and a `limit`, watches a
/// KVM guest for progress and restarts it under TCG when it shows none.
/// Returns the VM and, after a fallback, the reason (already printed on
/// stderr).
pub async fn start(
    backup: &Arc<BackupReader>,
    spec: &VmSpec,
    limit: Option<Duration>,
) -> anyhow::Result<(RestoreVm, Option<String>)> {
    let vm = RestoreVm::start(backup, spec)?;
    let Some(limit) = limit.filter(|_| is_auto(&spec.accel)) else {
        return Ok((vm, None));
    };
    if !watch_kvm(&vm, limit).await {
        return Ok((vm, None));
    }
    let reason = fallback_reason(limit);
    eprintln!("shear: {reason}");
    drop(vm);
    let mut tcg = spec.clone();
    tcg.accel = vec!["tcg".into()];
    Ok((RestoreVm::start(backup, &tcg)?, Some(reason)))
}

/// True when QEMU runs the guest under KVM and the guest is [`Verdict::Stuck`].
/// False when QEMU uses TCG, the guest progresses, QEMU exits or QMP never
/// answers (the caller's own deadline and checks then apply).
async fn watch_kvm(vm: &RestoreVm, limit: Duration) -> bool {
    let qmp_deadline = vm.started + limit.max(Duration::from_secs(5));
    let qmp = loop {
        if vm.exited() || Instant::now() >= qmp_deadline {
            return false;
        }
        match qmp::Qmp::connect(vm.dir.join("qmp.sock"), Duration::from_secs(2)).await {
            Ok((q, _events)) => break q,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let kvm = qmp
        .execute_value("query-kvm", serde_json::Value::Null)
        .await
        .is_ok_and(|v| v["enabled"] == true);
    if !kvm {
        return false;
    }
    let mut reads = 0u64;
    let mut last_disk_read = None;
    loop {
        if vm.exited() {
            return false;
        }
        let now_reads = qmp
            .execute_value("query-blockstats", serde_json::Value::Null)
            .await
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|d| d["stats"]["rd_operations"].as_u64())
                        .sum::<u64>()
                })
            })
            .unwrap_or(reads);
        if now_reads > reads {
            reads = now_reads;
            last_disk_read = Some(vm.started.elapsed());
        }
        // Unknown (an older QEMU without the command): the console alone.
        let started = qmp
            .execute_value(
                "x-query-virtio-status",
                serde_json::json!({"path": "/machine/peripheral/vser0/virtio-backend"}),
            )
            .await
            .is_ok_and(|v| v["started"] == true);
        let p = Progress {
            console_bytes: std::fs::metadata(vm.dir.join("console.log")).map_or(0, |m| m.len()),
            virtio_serial_started: started,
            last_disk_read,
        };
        match kvm_verdict(p, vm.started.elapsed(), limit) {
            Verdict::Progressing => return false,
            Verdict::Stuck => return true,
            Verdict::Waiting => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kvm_guest_without_console_or_virtio_serial_is_stuck_only_after_the_limit() {
        let limit = Duration::from_secs(30);
        let none = Progress::default();
        assert_eq!(
            kvm_verdict(none, Duration::from_secs(29), limit),
            Verdict::Waiting
        );
        assert_eq!(kvm_verdict(none, limit, limit), Verdict::Stuck);
        let console = Progress {
            console_bytes: 1,
            ..Progress::default()
        };
        assert_eq!(
            kvm_verdict(console, Duration::from_secs(300), limit),
            Verdict::Progressing
        );
        // A guest that writes nothing on the serial console but started
        // qemu-ga's virtio-serial device is booting.
        let vser = Progress {
            virtio_serial_started: true,
            ..Progress::default()
        };
        assert_eq!(
            kvm_verdict(vser, Duration::from_secs(300), limit),
            Verdict::Progressing
        );
        // Still reading its disk (a slow boot with no console): not yet;
        // reads that stopped (firmware and boot loader, then a hang): stuck.
        let reading = |t: u64| Progress {
            last_disk_read: Some(Duration::from_secs(t)),
            ..Progress::default()
        };
        let at = Duration::from_secs(45);
        assert_eq!(kvm_verdict(reading(40), at, limit), Verdict::Waiting);
        assert_eq!(kvm_verdict(reading(2), at, limit), Verdict::Stuck);
        assert_eq!(
            kvm_verdict(reading(2), Duration::from_secs(20), limit),
            Verdict::Waiting
        );
    }

    #[test]
    fn only_auto_falls_back() {
        let v = |s: &[&str]| s.iter().map(|&x| x.to_owned()).collect::<Vec<_>>();
        assert!(is_auto(&v(&["kvm", "tcg"])));
        assert!(!is_auto(&v(&["kvm"])));
        assert!(!is_auto(&v(&["tcg"])));
        assert!(fallback_reason(Duration::from_secs(30)).contains("TCG"));
    }
}
