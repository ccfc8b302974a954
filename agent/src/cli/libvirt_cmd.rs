//! `shear backup DOMAIN… --libvirt` (see `libvirt::backup`) and the
//! `--libvirt` part of `shear restore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use super::backup_cmd::{err, out, BackupArgs};
use crate::config::Config;
use crate::job::backup::render_notes;
use crate::job::fleece::FleecePolicy;
use crate::libvirt::backup::LibvirtBackupOptions;
use crate::libvirt::virsh::Virsh;
use crate::libvirt::xml::{adapt_for_restore, RestoredDisk};

/// Options of the QMP path that mean nothing with --libvirt.
fn refuse_qmp_options(args: &BackupArgs) -> anyhow::Result<()> {
    let given = [
        ("--qmp", args.qmp.is_some()),
        ("--qga", args.qga.is_some()),
        ("--bitmap", !args.bitmap.is_empty()),
    ];
    for (name, set) in given {
        if set {
            bail!("{name} is not supported with --libvirt");
        }
    }
    Ok(())
}

/// One VM of `shear backup` and how it is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// The VM id (a libvirt domain's name).
    pub vmid: String,
    /// Through libvirt's backup API (else QEMU's monitor).
    pub libvirt: bool,
}

/// How each VM id of `shear backup` is reached: every one through libvirt
/// with `--libvirt`; else QEMU's monitor where its QMP socket exists (or
/// `--qmp`/`--qga` name the sockets), and libvirt where no socket is and
/// libvirt knows a domain of that name or UUID (said on the output). A
/// UUID becomes the domain's name (the repository's VM id).
pub(super) fn choose_targets(
    rt: &tokio::runtime::Runtime,
    args: &BackupArgs,
    cfg: &Config,
) -> anyhow::Result<Vec<Target>> {
    let virsh = Virsh::new(&args.connect);
    if args.libvirt {
        refuse_qmp_options(args)?;
        rt.block_on(virsh.check_version())
            .context("checking libvirt")?;
        return Ok(args
            .vmids
            .iter()
            .map(|v| Target {
                // Not found: the backup fails with libvirt's own message.
                vmid: rt
                    .block_on(virsh.find_domain(v))
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| v.clone()),
                libvirt: true,
            })
            .collect());
    }
    let explicit = args.qmp.is_some() || args.qga.is_some();
    let mut libvirt_present: Option<bool> = None;
    let mut targets = Vec::new();
    for vmid in &args.vmids {
        let socket = cfg.qmp_socket_for(vmid);
        let mut target = Target {
            vmid: vmid.clone(),
            libvirt: false,
        };
        if !explicit && !socket.exists() {
            let present = *libvirt_present
                .get_or_insert_with(|| which_virsh() && rt.block_on(virsh.check_version()).is_ok());
            if present {
                if let Ok(Some(name)) = rt.block_on(virsh.find_domain(vmid)) {
                    let line = format!(
                        "VM {vmid}: no QMP socket at {}; libvirt domain {name} found at {}: \
                         backing it up through libvirt",
                        socket.display(),
                        args.connect
                    );
                    if args.json {
                        err(format_args!("shear: {line}"));
                    } else {
                        out(format_args!("{line}"));
                    }
                    target = Target {
                        vmid: name,
                        libvirt: true,
                    };
                }
            }
        }
        targets.push(target);
    }
    if targets.iter().any(|t| t.libvirt) && !args.bitmap.is_empty() {
        bail!("--bitmap is not supported with libvirt domains");
    }
    Ok(targets)
}

/// Whether `virsh` is on the PATH (libvirt's client is installed).
fn which_virsh() -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join("virsh")).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// The options of one domain's backup.
#[allow(clippy::too_many_arguments)]
pub(super) fn options(
    args: &BackupArgs,
    cfg: &Config,
    dom: &str,
    run_dir: &Path,
    fleecing_dir: &Path,
    fleecing: FleecePolicy,
    zstd_level: Option<i32>,
    workers: usize,
    priority: crate::job::priority::DataPriority,
    script: Option<crate::hookscript::VmHooks>,
) -> LibvirtBackupOptions {
    LibvirtBackupOptions {
        domain: dom.to_string(),
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
        mode: args.mode.into(),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        script,
    }
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
