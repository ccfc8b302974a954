//! `shear backup VMID --nbd NAME=URI …`: see `job::nbd_source`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::backup_cmd::{err, out, print_human, BackupArgs};
use super::progress::CliObserver;
use crate::chain;
use crate::config::Config;
use crate::job::backup::{render_notes, Cancel};
use crate::job::nbd_source::{parse_disk_arg, run_nbd_backup, NbdBackupOptions};

/// Options of the QMP path that mean nothing with --nbd.
fn refuse_qmp_options(args: &BackupArgs) -> anyhow::Result<()> {
    let given = [
        ("--qmp", args.qmp.is_some()),
        ("--qga", args.qga.is_some()),
        ("--fleecing-dir", args.fleecing_dir.is_some()),
        ("--exclude", !args.exclude.is_empty()),
    ];
    for (name, set) in given {
        if set {
            bail!("{name} means nothing with --nbd (shear does not talk to QEMU then)");
        }
    }
    Ok(())
}

/// Run `shear backup VMID --nbd …`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    repo: Arc<crate::repo::Repository>,
    args: &BackupArgs,
    cfg: &Config,
    run_dir: &Path,
    zstd_level: Option<i32>,
    workers: usize,
    priority: crate::job::priority::DataPriority,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    let [vmid] = args.vmids.as_slice() else {
        bail!("--nbd names one VM's disks: give a single VMID with it");
    };
    crate::repo::VmId::new(vmid).with_context(|| format!("bad VM id {vmid:?}"))?;
    refuse_qmp_options(args)?;
    let disks = args
        .nbd
        .iter()
        .map(|a| parse_disk_arg(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let bitmaps = args
        .bitmap
        .iter()
        .map(|a| {
            a.split_once('=')
                .filter(|(n, b)| !n.is_empty() && !b.is_empty())
                .map(|(n, b)| (n.to_string(), b.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--bitmap takes NAME=BITMAP, not {a:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = NbdBackupOptions {
        vmid: vmid.clone(),
        disks,
        bitmaps,
        run_dir: run_dir.to_path_buf(),
        zstd_level,
        workers,
        connections: usize::from(args.connections),
        bwlimit_kib: args.bwlimit,
        priority,
        notes: render_notes(&args.notes_template, vmid, "", &cfg.node_name()),
        full: args.full,
    };
    let progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let observer = Arc::new(CliObserver::new(progress));
    if !args.json {
        out(format_args!("backing up VM {vmid} from NBD exports"));
    }
    match rt.block_on(run_nbd_backup(repo, opts, cancel.clone(), observer)) {
        Ok(r) => {
            if args.json {
                out(format_args!("{}", serde_json::to_string_pretty(&[&r])?));
            } else {
                print_human(&r);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let msg = chain(&e);
            if args.json {
                let v = serde_json::json!([{"vmid": vmid, "error": msg}]);
                out(format_args!("{}", serde_json::to_string_pretty(&v)?));
            } else {
                err(format_args!("shear: backup of VM {vmid} FAILED: {msg}"));
                err(format_args!("shear: no backup was recorded"));
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
