//! `shear backup DOMAIN… --libvirt` (see `libvirt::backup`) and the
//! `--libvirt` part of `shear restore`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::backup_cmd::{err, out, print_human, BackupArgs};
use super::progress::CliObserver;
use crate::chain;
use crate::config::Config;
use crate::job::backup::{render_notes, Cancel};
use crate::job::fleece::FleecePolicy;
use crate::libvirt::backup::{run_libvirt_backup, LibvirtBackupOptions};
use crate::libvirt::virsh::Virsh;
use crate::libvirt::xml::{adapt_for_restore, RestoredDisk};

/// Options of the QMP path that mean nothing with --libvirt.
fn refuse_qmp_options(args: &BackupArgs) -> anyhow::Result<()> {
    let given = [
        ("--qmp", args.qmp.is_some()),
        ("--qga", args.qga.is_some()),
        ("--script", args.script.is_some()),
        ("--notify", !args.notify.is_empty()),
        ("--bitmap", !args.bitmap.is_empty()),
        (
            "--mode suspend/stop",
            args.mode != super::backup_cmd::ModeArg::Snapshot,
        ),
    ];
    for (name, set) in given {
        if set {
            bail!("{name} is not supported with --libvirt (yet)");
        }
    }
    Ok(())
}

/// Run `shear backup DOMAIN… --libvirt`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    rt: &tokio::runtime::Runtime,
    repo: &Arc<crate::repo::Repository>,
    args: &BackupArgs,
    cfg: &Config,
    run_dir: &Path,
    fleecing_dir: &Path,
    fleecing: FleecePolicy,
    zstd_level: Option<i32>,
    workers: usize,
    priority: crate::job::priority::DataPriority,
    cancel: &Cancel,
) -> anyhow::Result<ExitCode> {
    refuse_qmp_options(args)?;
    let mut reports = Vec::new();
    let mut failed = 0;
    for dom in &args.vmids {
        let opts = LibvirtBackupOptions {
            domain: dom.clone(),
            uri: args.connect.clone(),
            run_dir: run_dir.to_path_buf(),
            fleecing_dir: fleecing_dir.to_path_buf(),
            fleecing,
            zstd_level,
            workers,
            connections: usize::from(args.connections),
            bwlimit_kib: args.bwlimit,
            priority,
            notes: render_notes(&args.notes_template, dom, dom, &cfg.node_name()),
            full: args.full,
            freeze_timeout: Duration::from_secs(args.freeze_timeout.max(1)),
            exclude: args.exclude.clone(),
            held_hook: crate::job::backup::held_hook_from_env(),
        };
        let progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let observer = Arc::new(CliObserver::new(progress));
        if !args.json {
            out(format_args!(
                "backing up libvirt domain {dom} ({})",
                args.connect
            ));
        }
        match rt.block_on(run_libvirt_backup(
            repo.clone(),
            opts,
            cancel.clone(),
            observer,
        )) {
            Ok(r) => {
                if args.json {
                    reports.push(serde_json::to_value(&r)?);
                } else {
                    print_human(&r);
                }
            }
            Err(e) => {
                failed += 1;
                let msg = chain(&e);
                if args.json {
                    reports.push(serde_json::json!({"vmid": dom, "error": msg}));
                } else {
                    err(format_args!("shear: backup of domain {dom} FAILED: {msg}"));
                    err(format_args!("shear: no backup was recorded"));
                }
            }
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    if args.json {
        out(format_args!("{}", serde_json::to_string_pretty(&reports)?));
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `shear restore --libvirt`: the captured domain XML adapted to the
/// restored disks, written to `<name>.xml` in `target` and defined when
/// asked. Returns the lines to print and the XML file.
pub(super) fn restore_domain(
    vm_config: &serde_json::Value,
    target: &Path,
    restored: &[(String, PathBuf, &str)],
    name: Option<&str>,
    replace: bool,
    define: Option<&str>,
) -> anyhow::Result<(Vec<String>, PathBuf)> {
    let Some(xml) = vm_config["libvirt_xml"].as_str() else {
        bail!("this backup holds no libvirt domain XML (it was not taken with --libvirt, and its QEMU was not libvirt's)");
    };
    let info = crate::libvirt::xml::parse_domain(xml).context("the backup's domain XML")?;
    let new_name = if replace {
        None
    } else {
        Some(
            name.map(str::to_string)
                .unwrap_or_else(|| format!("{}-restored", info.name)),
        )
    };
    let disks: Vec<RestoredDisk> = restored
        .iter()
        .map(|(d, p, f)| {
            let path = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            RestoredDisk {
                target: d.clone(),
                path,
                format: f.to_string(),
            }
        })
        .collect();
    let (text, mut lines) = adapt_for_restore(xml, &disks, new_name.as_deref(), replace)
        .context("adapting the domain XML")?;
    let dom_name = new_name.unwrap_or_else(|| info.name.clone());
    crate::repo::VmId::new(&dom_name)
        .with_context(|| format!("{dom_name:?} cannot be a file name: give --name"))?;
    let file = target.join(format!("{dom_name}.xml"));
    crate::fsutil::write_atomic(&file, text.as_bytes(), crate::fsutil::Existing::Replace)
        .with_context(|| format!("writing {}", file.display()))?;
    lines.push(format!(
        "wrote domain {dom_name} ({}) to {}",
        if replace {
            "same name and UUID as the original"
        } else {
            "new UUID and MAC addresses"
        },
        file.display()
    ));
    if let Some(uri) = define {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let virsh = Virsh::new(uri);
        rt.block_on(virsh.check_version())
            .context("checking libvirt")?;
        rt.block_on(virsh.define(&file))
            .with_context(|| format!("virsh define {}", file.display()))?;
        lines.push(format!("defined domain {dom_name} in {uri}"));
    }
    Ok((lines, file))
}
