//! `shear snapshot VMID …` and `shear snapshot prune …` (see
//! [`crate::snapshot`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::config::Config;
use crate::snapshot::ops::{self, CreateOptions, Target};
use crate::snapshot::record::{Listed, Standing};
use crate::units::{human_bytes, parse_duration};

/// `shear snapshot …`
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  shear snapshot 100 create pre-upgrade --vmstate --description 'before apt upgrade'\n  shear snapshot 100 list\n  shear snapshot 100 rollback pre-upgrade\n  shear snapshot prune --older-than 48h --dry-run"
)]
pub struct SnapshotArgs {
    /// VM id (every command but `prune`).
    pub vmid: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: SnapshotCommand,
    /// QMP socket (default: the config's template, as `shear backup`).
    #[arg(long, global = true)]
    pub qmp: Option<PathBuf>,
    /// qemu-ga socket (default: the config's template).
    #[arg(long, global = true)]
    pub qga: Option<PathBuf>,
    /// Run directory holding the per-VM locks (default: the config's).
    #[arg(long, global = true, env = "SHEAR_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// State directory holding the snapshot records (default: the
    /// config's state_dir, /var/lib/shear).
    #[arg(long, global = true, env = "SHEAR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot every disk at one instant (qcow2 internal snapshots):
    /// frozen through qemu-ga when it answers; with --vmstate the VM's
    /// memory too, so a rollback resumes it exactly there.
    Create {
        /// shear's name for it.
        name: String,
        /// Save the VM's memory and device state too.
        #[arg(long)]
        vmstate: bool,
        /// The disk that holds the memory (default: the first disk).
        #[arg(long, requires = "vmstate")]
        vmstate_disk: Option<String>,
        /// Free-text description.
        #[arg(long, default_value = "")]
        description: String,
        /// Seconds guest-fsfreeze-freeze may take.
        #[arg(long, default_value_t = 10)]
        freeze_timeout: u64,
        /// Seconds the snapshot-save job may take.
        #[arg(long, default_value_t = 600)]
        job_timeout: u64,
    },
    /// What QEMU has (each disk), joined with shear's names: time, age,
    /// memory, size, description; flags snapshots older than the limit
    /// and orphans both ways.
    List,
    /// Rename a snapshot (shear's name; QEMU's tag stays).
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
    /// Set a snapshot's description.
    Describe {
        /// The snapshot.
        name: String,
        /// The description.
        text: String,
    },
    /// Roll the VM back. With memory: the running VM resumes in the saved
    /// state. Without memory: refused while QEMU runs; once the VM is
    /// stopped, the snapshot is applied to the recorded image files.
    /// Asks for confirmation on a terminal unless --yes.
    Rollback {
        /// The snapshot.
        name: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Seconds the snapshot-load job may take.
        #[arg(long, default_value_t = 600)]
        job_timeout: u64,
    },
    /// Delete a snapshot shear made, on every disk.
    Delete {
        /// The snapshot.
        name: String,
    },
    /// Delete the snapshots shear made that are older than a limit, on
    /// the given VMs (default: every VM with a snapshot record). Snapshots
    /// made outside shear are never touched.
    Prune {
        /// Age limit: 48h, 2d, …
        #[arg(long)]
        older_than: String,
        /// Only these VMs (repeatable).
        #[arg(long = "vmid")]
        vmids: Vec<String>,
        /// Only list what would go.
        #[arg(long)]
        dry_run: bool,
    },
}

fn target(a: &SnapshotArgs, cfg: &Config, vmid: &str) -> anyhow::Result<Target> {
    crate::repo::VmId::new(vmid).with_context(|| format!("bad VM id {vmid:?}"))?;
    let max_age = match &cfg.snapshot_max_age {
        Some(s) => parse_duration(s).map_err(anyhow::Error::msg)?,
        None => ops::DEFAULT_MAX_AGE,
    };
    Ok(Target {
        vmid: vmid.to_string(),
        qmp: a.qmp.clone().unwrap_or_else(|| cfg.qmp_socket_for(vmid)),
        qga: Some(a.qga.clone().unwrap_or_else(|| cfg.qga_socket_for(vmid))),
        run_dir: a.run_dir.clone().unwrap_or_else(|| cfg.run_dir.clone()),
        state_dir: a
            .state_dir
            .clone()
            .or_else(|| cfg.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(crate::daemon::config::DEFAULT_STATE_DIR)),
        max_age,
    })
}

/// Run `shear snapshot`.
pub fn run(a: &SnapshotArgs) -> anyhow::Result<ExitCode> {
    let cfg = Config::load()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let SnapshotCommand::Prune {
        older_than,
        vmids,
        dry_run,
    } = &a.command
    {
        if a.vmid.is_some() {
            bail!("`shear snapshot prune` takes --vmid VMID, not a VM id before `prune`");
        }
        let limit = parse_duration(older_than).map_err(anyhow::Error::msg)?;
        if (a.qmp.is_some() || a.qga.is_some()) && vmids.len() != 1 {
            bail!("--qmp/--qga name one VM's sockets: give a single --vmid with them");
        }
        let probe = target(a, &cfg, vmids.first().map_or("0", String::as_str))?;
        let ids = if vmids.is_empty() {
            ops::recorded_vmids(&probe.state_dir)
        } else {
            vmids.clone()
        };
        let mut all = Vec::new();
        let mut failed = false;
        for id in &ids {
            let t = target(a, &cfg, id)?;
            match rt.block_on(ops::prune(&t, limit, *dry_run)) {
                Ok(v) => all.extend(v),
                Err(e) => {
                    failed = true;
                    eprintln!("shear: prune of VM {id}: {}", crate::chain(&e));
                }
            }
        }
        failed |= all.iter().any(|p| p.error.is_some());
        if a.json {
            crate::out!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            for p in &all {
                let what = match (&p.error, p.removed) {
                    (Some(e), _) => format!("FAILED: {e}"),
                    (None, true) => "deleted".into(),
                    (None, false) => "would delete (dry run)".into(),
                };
                crate::out!(
                    "VM {} snapshot {} (age {}): {what}",
                    p.vmid,
                    p.name,
                    age(p.age_s)
                );
            }
            if all.is_empty() {
                crate::out!("no snapshot made by shear is older than {older_than}");
            }
        }
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let Some(vmid) = a.vmid.as_deref() else {
        bail!(
            "give the VM id: shear snapshot VMID {{create|list|rename|describe|rollback|delete}} …"
        );
    };
    let t = target(a, &cfg, vmid)?;
    match &a.command {
        SnapshotCommand::Create {
            name,
            vmstate,
            vmstate_disk,
            description,
            freeze_timeout,
            job_timeout,
        } => {
            let o = CreateOptions {
                name: name.clone(),
                vmstate: *vmstate,
                vmstate_disk: vmstate_disk.clone(),
                description: description.clone(),
                freeze_timeout: Duration::from_secs(*freeze_timeout),
                job_timeout: Duration::from_secs(*job_timeout),
            };
            let r = rt.block_on(ops::create(&t, &o));
            // A guard dropped on any path thaws from a thread: let it end.
            guest_agent::wait_for_drop_thaws(Duration::from_secs(30));
            let r = r?;
            if a.json {
                crate::out!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                crate::out!(
                    "snapshot {} of VM {vmid} created (tag {}, {}; disks {}) in {} ms{}",
                    r.name,
                    r.tag,
                    if r.vmstate {
                        format!(
                            "with memory on {}",
                            r.vmstate_disk.as_deref().unwrap_or("?")
                        )
                    } else {
                        format!("{}-consistent, no memory", r.consistency)
                    },
                    r.disks.join(", "),
                    r.took_ms,
                    r.freeze_window_ms
                        .map(|w| format!(", guest frozen {w} ms"))
                        .unwrap_or_default()
                );
                for w in &r.warnings {
                    crate::out!("  warning: {w}");
                }
            }
        }
        SnapshotCommand::List => {
            let (rows, warnings) = rt.block_on(ops::list(&t))?;
            if a.json {
                crate::out!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "vmid": vmid,
                        "max_age_s": t.max_age.as_secs(),
                        "snapshots": rows,
                        "warnings": warnings,
                    }))?
                );
            } else {
                print_list(&rows, t.max_age)?;
                for w in &warnings {
                    crate::out!("warning: {w}");
                }
            }
        }
        SnapshotCommand::Rename { old, new } => {
            ops::rename(&t, old, new)?;
            if !a.json {
                crate::out!("snapshot {old} of VM {vmid} is now {new}");
            }
        }
        SnapshotCommand::Describe { name, text } => {
            ops::describe(&t, name, text)?;
            if !a.json {
                crate::out!("snapshot {name} of VM {vmid}: description set");
            }
        }
        SnapshotCommand::Rollback {
            name,
            yes,
            job_timeout,
        } => {
            let e = ops::entry(&t, name)?;
            if !yes {
                confirm(&format!(
                    "Roll VM {vmid} back to snapshot {name} ({}, {})? Everything written since \
                     is lost.",
                    fmt_time(e.created_unix),
                    if e.vmstate {
                        "with memory"
                    } else {
                        "disks only"
                    }
                ))?;
            }
            let r = rt.block_on(ops::rollback(&t, name, Duration::from_secs(*job_timeout)))?;
            if a.json {
                crate::out!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                crate::out!(
                    "VM {vmid} rolled back to {name} ({}; disks {}) in {} ms",
                    if r.how == "memory" {
                        "memory and disks: the VM resumed where the snapshot was taken"
                    } else {
                        "offline, disk images only"
                    },
                    r.disks.join(", "),
                    r.took_ms
                );
                if !r.bitmaps_removed.is_empty() {
                    crate::out!(
                        "  change tracking reset ({}): the next backup reads the disks in full",
                        r.bitmaps_removed.join(", ")
                    );
                }
                for w in &r.warnings {
                    crate::out!("  warning: {w}");
                }
            }
        }
        SnapshotCommand::Delete { name } => {
            let disks = rt.block_on(ops::delete(&t, name))?;
            if a.json {
                crate::out!(
                    "{}",
                    serde_json::json!({"vmid": vmid, "name": name, "deleted_on": disks})
                );
            } else {
                crate::out!(
                    "snapshot {name} of VM {vmid} deleted (disks: {})",
                    if disks.is_empty() {
                        "none had it any more".to_string()
                    } else {
                        disks.join(", ")
                    }
                );
            }
        }
        SnapshotCommand::Prune { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Ask on the terminal; refuse without one.
fn confirm(question: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(crate::snapshot::SnapshotError::NotConfirmed(
            "stdin is not a terminal: pass --yes to roll back without asking".into(),
        )
        .into());
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{question} [y/N] ")?;
    err.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(crate::snapshot::SnapshotError::NotConfirmed("answered no".into()).into())
    }
}

fn fmt_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(crate::repo::names::format_time)
        .unwrap_or_else(|_| unix.to_string())
}

fn age(s: i64) -> String {
    let s = s.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn print_list(rows: &[Listed], max_age: Duration) -> std::io::Result<()> {
    if rows.is_empty() {
        crate::out!("no snapshots");
        return Ok(());
    }
    crate::out!(
        "{:<24} {:<20} {:>6} {:<6} {:>10}  DESCRIPTION",
        "NAME",
        "CREATED (UTC)",
        "AGE",
        "MEMORY",
        "VM STATE"
    );
    for r in rows {
        let mut marks = Vec::new();
        if r.too_old {
            marks.push(format!(
                "! older than {}",
                age(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX))
            ));
        }
        if r.standing != Standing::Ok {
            let m = match r.standing {
                Standing::Partial => format!("missing on {}", r.missing_on.join(", ")),
                s => s.mark().to_string(),
            };
            marks.push(m);
        }
        if r.tag != r.name {
            marks.push(format!("QEMU tag {}", r.tag));
        }
        crate::out!(
            "{:<24} {:<20} {:>6} {:<6} {:>10}  {}{}",
            r.name,
            fmt_time(r.created_unix),
            age(r.age_s),
            if r.vmstate { "yes" } else { "no" },
            if r.vm_state_size > 0 {
                human_bytes(r.vm_state_size)
            } else {
                "-".into()
            },
            r.description,
            if marks.is_empty() {
                String::new()
            } else {
                format!("  [{}]", marks.join("; "))
            }
        );
    }
    Ok(())
}
