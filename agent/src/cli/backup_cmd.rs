//! `shear backup` and the hidden `shear __watchdog`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use super::backup_job::JobExtras;
use super::progress::CliObserver;
use crate::chain;
use crate::config::Config;
use crate::hookscript::{HookPhase, VmLog};
use crate::job::backup::{
    held_hook_from_env, run_backup, BackupOptions, Cancel, Mode, DEFAULT_CBW_TIMEOUT_S,
};
use crate::job::report::BackupReport;
use crate::units::human_bytes;

/// `--mode` (vzdump's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Live: freeze (if qemu-ga answers), insert filters, thaw at once.
    Snapshot,
    /// Pause the vCPUs while the filters go in.
    Suspend,
    /// Orderly shutdown, filters in, boot again at once; back up the clean state.
    Stop,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Snapshot => Mode::Snapshot,
            ModeArg::Suspend => Mode::Suspend,
            ModeArg::Stop => Mode::Stop,
        }
    }
}
use crate::job::fleece::{FleecePolicy, MinFree};

/// `shear backup …`
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// VM id(s) to back up, one after the other.
    #[arg(required = true)]
    pub vmids: Vec<String>,
    /// Backup mode (vzdump's): snapshot (live), suspend, stop.
    #[arg(long, value_enum, default_value_t = ModeArg::Snapshot)]
    pub mode: ModeArg,
    /// QMP socket (default: the config's template, Proxmox's layout).
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// qemu-guest-agent socket (default: the config's template).
    #[arg(long)]
    pub qga: Option<PathBuf>,
    /// Where fleecing images go (default: the config's, /var/lib/shear/fleece).
    #[arg(long)]
    pub fleecing_dir: Option<PathBuf>,
    /// Accept a RAM-backed (tmpfs/ramfs) fleecing directory.
    #[arg(long)]
    pub fleecing_allow_tmpfs: bool,
    /// Free space the fleecing directory needs before the backup starts:
    /// a percentage of the disks' allocated size (10%) or a size (20G, 0).
    #[arg(long)]
    pub fleecing_min_free: Option<String>,
    /// Run directory (default: the config's, /run/shear).
    #[arg(long, env = "SHEAR_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Compression: zstd[:LEVEL] or none (default: the repository's level).
    #[arg(long)]
    pub compress: Option<String>,
    /// Hash/compress worker threads, 1..=256 (default: the number of cores).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// NBD connections per disk, 1..=16.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub connections: u8,
    /// Read bandwidth limit in KiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub bwlimit: u64,
    /// Nice value of the data-path threads, 0..=19 (default: the config's
    /// `nice`, else 19 with SCHED_BATCH; 0: unchanged).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=19))]
    pub nice: Option<u8>,
    /// I/O priority of the data-path threads (vzdump's): 0..=7
    /// best-effort level, 8 idle class (default: the config's `ionice`,
    /// else 7).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=8))]
    pub ionice: Option<u8>,
    /// Disk to leave out (by name, e.g. scsi1); repeatable.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Notes template: {{vmid}}, {{guestname}}, {{node}}.
    #[arg(long, default_value = "")]
    pub notes_template: String,
    /// Seconds guest-fsfreeze-freeze may take before the guest is thawed and
    /// the backup goes on crash-consistent.
    #[arg(long, default_value_t = 10)]
    pub freeze_timeout: u64,
    /// copy-before-write timeout in seconds (a slower fleece write breaks the
    /// snapshot, never the guest's write).
    #[arg(long, default_value_t = DEFAULT_CBW_TIMEOUT_S)]
    pub cbw_timeout: u32,
    /// Stop mode: seconds the guest may take to shut down.
    #[arg(long, default_value_t = 600)]
    pub stop_timeout: u64,
    /// Read every disk in full, even where change tracking allows an
    /// incremental read (tracking starts anew from this backup).
    #[arg(long)]
    pub full: bool,
    /// Back up the media in CD-ROM drives too (an ISO is not a disk of
    /// the VM: skipped by default, as vzdump does).
    #[arg(long)]
    pub include_cdrom: bool,
    /// Back up an NBD export as disk NAME instead of asking QEMU
    /// (no QMP, no qemu-ga): NAME=nbd+unix:///EXPORT?socket=PATH or
    /// NAME=nbd://HOST[:PORT]/EXPORT; repeatable, one VMID.
    #[arg(long, value_name = "NAME=URI")]
    pub nbd: Vec<String>,
    /// With --nbd: read only what meta context qemu:dirty-bitmap:BITMAP
    /// marks dirty in disk NAME's export, reusing the previous backup of
    /// that disk for the rest (read in full, with the reason, when there
    /// is none); repeatable.
    #[arg(long, value_name = "NAME=BITMAP", requires = "nbd")]
    pub bitmap: Vec<String>,
    /// Back up libvirt domains (the VMIDs are domain names) through
    /// libvirt's backup API: freeze, pull-mode backup-begin, thaw, read,
    /// with one checkpoint chain per repository for incrementals.
    #[arg(long, conflicts_with = "nbd")]
    pub libvirt: bool,
    /// libvirt connection URI (with --libvirt, and where a VM id without a
    /// QMP socket is looked up as a libvirt domain name or UUID).
    #[arg(long, value_name = "URI", default_value = crate::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// One JSON document (an array with one entry per VM) on stdout.
    #[arg(long)]
    pub json: bool,
    /// vzdump hook script, called at the phases job-init, job-start,
    /// backup-start, pre-stop, pre-restart, post-restart, backup-end,
    /// backup-abort, log-end, job-end, job-abort with vzdump's arguments
    /// and environment; a non-zero exit at backup-start aborts that VM's
    /// backup (default: `script` in shear.toml; docs/hooks.md).
    #[arg(long, value_name = "PATH", conflicts_with = "nbd")]
    pub script: Option<PathBuf>,
    /// Send the job's notification (job-finished or job-failed) to these
    /// [[notify_target]]s of shear.toml, comma-separated (vzdump's
    /// --notification-target).
    #[arg(
        long,
        value_name = "TARGET[,TARGET]",
        value_delimiter = ',',
        conflicts_with = "nbd"
    )]
    pub notify: Vec<String>,
}

fn parse_compress(s: Option<&str>) -> anyhow::Result<Option<i32>> {
    let Some(s) = s else { return Ok(None) };
    match s.split_once(':') {
        None if s == "zstd" => Ok(None),
        None if s == "none" => Ok(Some(0)),
        Some(("zstd", level)) => {
            let l: i32 = level
                .parse()
                .with_context(|| format!("bad zstd level {level:?}"))?;
            if !(1..=19).contains(&l) {
                bail!("zstd level must be 1..=19, not {l}");
            }
            Ok(Some(l))
        }
        _ => bail!("--compress takes zstd, zstd:LEVEL or none, not {s:?}"),
    }
}

/// Run `shear backup`.
pub fn run(cli: &super::Cli, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    if args.vmids.len() > 1 && (args.qmp.is_some() || args.qga.is_some()) {
        bail!("--qmp/--qga name one VM's sockets: give a single VMID with them");
    }
    if args.nbd.is_empty() {
        for vmid in &args.vmids {
            crate::repo::VmId::new(vmid).with_context(|| format!("bad VM id {vmid:?}"))?;
        }
    }
    let cfg = Config::load()?;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| cfg.run_dir.clone());
    let fleecing_dir = args
        .fleecing_dir
        .clone()
        .unwrap_or_else(|| cfg.fleecing_dir());
    let fleecing = FleecePolicy {
        allow_tmpfs: args.fleecing_allow_tmpfs || cfg.fleecing_allow_tmpfs,
        min_free: match &args.fleecing_min_free {
            Some(s) => MinFree::parse(s).map_err(anyhow::Error::msg)?,
            None => cfg.fleecing_min_free().map_err(anyhow::Error::msg)?,
        },
    };
    let zstd_level = parse_compress(args.compress.as_deref())?;
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let held_hook = held_hook_from_env();
    let mode = Mode::from(args.mode);
    let priority = cfg
        .data_priority(args.nice, args.ionice)
        .map_err(anyhow::Error::msg)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let cancel = Cancel::default();
    rt.spawn(cancel_on_signals(cancel.clone()));

    if !args.nbd.is_empty() {
        let repo = Arc::new(super::repo_cmds::open(cli)?);
        return super::nbd_cmd::run(
            &rt, repo, args, &cfg, &run_dir, zstd_level, workers, priority, &cancel,
        );
    }
    // QEMU's monitor, or libvirt's backup API (--libvirt, or a domain
    // found by name or UUID where no QMP socket is).
    let targets = super::libvirt_cmd::choose_targets(&rt, args, &cfg)?;
    let mut extras = JobExtras::new(
        &cfg,
        args.script.clone(),
        &args.notify,
        cli.repo.display().to_string(),
        &run_dir,
    )?;
    // job-init comes before the repository is opened (vzdump: before the
    // storage is accessed, e.g. to wake it up).
    rt.block_on(extras.job_phase(HookPhase::JobInit));
    let repo = match super::repo_cmds::open(cli) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            let msg = chain(e.as_ref());
            for vmid in &args.vmids {
                extras.vm_failed(vmid, msg.clone());
            }
            rt.block_on(extras.finish(Some(msg)));
            return Err(e);
        }
    };
    rt.block_on(extras.job_phase(HookPhase::JobStart));
    let mut reports: Vec<serde_json::Value> = Vec::new();
    let mut failed = 0usize;
    for target in &targets {
        let vmid = &target.vmid;
        let t0 = std::time::Instant::now();
        let mut log = VmLog::default();
        log.line(&format!(
            "shear {}: backup of VM {vmid} ({} mode) starts",
            env!("CARGO_PKG_VERSION"),
            mode.as_str()
        ));
        if let Err(e) = rt.block_on(extras.backup_start(vmid, mode.as_str())) {
            // Before anything in the VM was touched.
            failed += 1;
            let msg = format!("aborted by the hook script: {}", chain(&e));
            if args.json {
                reports.push(serde_json::json!({
                    "vmid": vmid,
                    "error": msg,
                    "kind": "hook",
                    "guest": "untouched",
                }));
            } else {
                err(format_args!("shear: backup of VM {vmid} FAILED: {msg}"));
                err(format_args!(
                    "shear: the guest was not touched; no backup was recorded"
                ));
            }
            rt.block_on(extras.vm_done(vmid, mode.as_str(), Err(msg), t0.elapsed(), log));
            continue;
        }
        let progress = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let observer = Arc::new(CliObserver::new(progress));
        let result = if target.libvirt {
            let opts = super::libvirt_cmd::options(
                args,
                &cfg,
                vmid,
                &run_dir,
                &fleecing_dir,
                fleecing,
                zstd_level,
                workers,
                priority,
                extras.vm_hooks(vmid, mode.as_str()),
            );
            if !args.json {
                out(format_args!(
                    "backing up libvirt domain {vmid} ({}, {} mode)",
                    args.connect,
                    mode.as_str()
                ));
            }
            rt.block_on(crate::libvirt::backup::run_libvirt_backup(
                repo.clone(),
                opts,
                cancel.clone(),
                observer.clone(),
            ))
        } else {
            let qmp = args.qmp.clone().unwrap_or_else(|| cfg.qmp_socket_for(vmid));
            let qga = Some(args.qga.clone().unwrap_or_else(|| cfg.qga_socket_for(vmid)));
            let opts = BackupOptions {
                vmid: vmid.clone(),
                qmp,
                qga,
                mode,
                run_dir: run_dir.clone(),
                fleecing_dir: fleecing_dir.clone(),
                pve_config: cfg.pve_config_for(vmid),
                fleecing,
                zstd_level,
                workers,
                connections: usize::from(args.connections),
                bwlimit_kib: args.bwlimit,
                priority,
                exclude: args.exclude.clone(),
                notes_template: args.notes_template.clone(),
                node: cfg.node_name(),
                freeze_timeout: Duration::from_secs(args.freeze_timeout),
                cbw_timeout_s: args.cbw_timeout,
                stop_timeout: Duration::from_secs(args.stop_timeout),
                full: args.full,
                include_cdrom: args.include_cdrom,
                held_hook: held_hook.clone(),
                script: extras.vm_hooks(vmid, mode.as_str()),
            };
            if !args.json {
                out(format_args!(
                    "backing up VM {vmid} ({} mode)",
                    mode.as_str()
                ));
            }
            rt.block_on(run_backup(
                repo.clone(),
                opts,
                cancel.clone(),
                observer.clone(),
            ))
        };
        match result {
            Ok(r) => {
                if args.json {
                    reports.push(serde_json::to_value(&r)?);
                } else {
                    print_human(&r);
                }
                rt.block_on(extras.vm_done(vmid, mode.as_str(), Ok(&r), t0.elapsed(), log));
            }
            Err(e) => {
                failed += 1;
                let msg = chain(&e);
                let failure = super::json_errors::backup_failure(&e, observer.guest_touched());
                if args.json {
                    reports.push(serde_json::json!({
                        "vmid": vmid,
                        "error": msg,
                        "kind": failure.kind,
                        "guest": failure.guest,
                    }));
                } else {
                    err(format_args!("shear: backup of VM {vmid} FAILED: {msg}"));
                    err(format_args!("shear: {}", failure.tail));
                }
                rt.block_on(extras.vm_done(vmid, mode.as_str(), Err(msg), t0.elapsed(), log));
            }
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    // A guard dropped on an error path thaws from a thread: let it finish.
    guest_agent::wait_for_drop_thaws(Duration::from_secs(30));
    let aborted = cancel
        .is_cancelled()
        .then(|| "cancelled by a signal before every VM was backed up".to_string());
    rt.block_on(extras.finish(aborted));
    if args.json {
        out(format_args!("{}", serde_json::to_string_pretty(&reports)?));
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Signals whose default action ends the process. Each one cancels the run
/// the way SIGINT does (guest released, graph restored, nothing recorded):
/// a dropped SSH session (SIGHUP), Ctrl-\ (SIGQUIT), a stray `kill -USR1`,
/// a CPU or file-size limit… must never leave a filter in a VM. SIGPIPE is
/// not among them: the Rust runtime ignores it, so a closed stdout gives
/// EPIPE on write (which [`out`] and [`err`] ignore) instead of killing us.
/// SIGKILL cannot be caught: the thaw watchdog covers it.
const CANCEL_SIGNALS: &[(libc::c_int, &str)] = &[
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGPOLL, "SIGPOLL"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
];

/// Cancel `cancel` on any of [`CANCEL_SIGNALS`], for the life of the runtime.
async fn cancel_on_signals(cancel: Cancel) {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    for &(num, name) in CANCEL_SIGNALS {
        match signal(SignalKind::from_raw(num)) {
            Ok(mut s) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if tx.send(name).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => err(format_args!("shear: cannot handle {name}: {e}")),
        }
    }
    drop(tx);
    while let Some(which) = rx.recv().await {
        // Cancel first: the message may fail (the terminal is gone after a
        // SIGHUP) and must not stand in the way.
        cancel.cancel(which);
        err(format_args!(
            "shear: {which} received: stopping, releasing the guest and cleaning up"
        ));
    }
}

/// A line on stdout; a closed or broken stdout is not an error of the
/// backup (never panics, unlike `println!`).
pub(super) fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_fmt(line).and_then(|()| o.write_all(b"\n"));
    let _ = o.flush();
}

/// A line on stderr; never panics (the terminal may be gone).
pub(super) fn err(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(line).and_then(|()| e.write_all(b"\n"));
}

pub(super) fn print_human(r: &BackupReport) {
    out(format_args!("backup {} committed", r.backup_id));
    let held = r.freeze_window_ms.map_or_else(
        || "guest not held".to_string(),
        |ms| format!("guest held {ms} ms"),
    );
    out(format_args!(
        "  mode {}, consistency {}, {held}",
        r.mode.as_str(),
        match r.consistency {
            crate::repo::Consistency::Application => "application",
            crate::repo::Consistency::Crash => "crash",
        },
    ));
    for d in &r.disks {
        let how = match (&d.kind, &d.full_reason, d.dirty_bytes) {
            (crate::repo::ReadKind::Incremental, _, dirty) => format!(
                "incremental ({} changed since {})",
                human_bytes(dirty.unwrap_or(0)),
                d.base.as_deref().unwrap_or("the base")
            ),
            (crate::repo::ReadKind::Full, Some(why), _) => format!("full read: {why}"),
            (crate::repo::ReadKind::Full, None, _) => "full read".to_string(),
        };
        out(format_args!(
            "  disk {}: {how}\n    {} virtual, {} read, {} skipped (holes/zeros/unchanged), {} stored, {} deduplicated",
            d.name,
            human_bytes(d.virtual_size),
            human_bytes(d.bytes_read),
            human_bytes(d.bytes_skipped),
            human_bytes(d.bytes_stored),
            human_bytes(d.bytes_deduplicated)
        ));
    }
    #[allow(clippy::cast_precision_loss)]
    let s = |ms: u64| ms as f64 / 1000.0;
    out(format_args!(
        "  took {:.2} s (setup {:.2} s, read {:.2} s)",
        s(r.total_ms),
        s(r.setup_ms),
        s(r.read_ms)
    ));
    for w in &r.warnings {
        out(format_args!("  warning: {w}"));
    }
}

/// `shear cleanup VMID`
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// VM id.
    pub vmid: String,
    /// QMP socket (default: the one the run record names).
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// qemu-ga socket (default: the one the run record names).
    #[arg(long)]
    pub qga: Option<PathBuf>,
    /// Run directory (default: the config's, /run/shear).
    #[arg(long, env = "SHEAR_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
}

/// Run `shear cleanup`.
pub fn cleanup(args: &CleanupArgs) -> anyhow::Result<ExitCode> {
    use crate::job::cleanup::{cleanup_vm, Whose};
    crate::repo::VmId::new(&args.vmid).with_context(|| format!("bad VM id {:?}", args.vmid))?;
    let cfg = Config::load()?;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| cfg.run_dir.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let vmid = &args.vmid;
    let result = rt.block_on(cleanup_vm(
        &run_dir,
        vmid,
        args.qmp.as_deref(),
        args.qga.as_deref(),
        Whose::Any,
    ));
    let r = match result {
        Ok(r) => r,
        Err(e) => anyhow::bail!("cleanup of VM {vmid}: {}", chain(&e)),
    };
    if !r.found {
        out(format_args!("VM {vmid}: nothing to clean up"));
        return Ok(ExitCode::SUCCESS);
    }
    out(format_args!(
        "VM {vmid}: took back {} change(s) left by shear pid {}{}",
        r.undone.len(),
        r.pid.unwrap_or(0),
        if r.qemu_gone { " (QEMU is gone)" } else { "" }
    ));
    for u in &r.undone {
        out(format_args!("  {u}"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `shear __watchdog` (internal): see [`crate::job::watchdog`].
#[derive(Debug, Args)]
pub struct WatchdogArgs {
    /// QMP socket.
    #[arg(long, required_unless_present = "libvirt")]
    pub qmp: Option<PathBuf>,
    /// qemu-ga socket.
    #[arg(long)]
    pub qga: Option<PathBuf>,
    /// Run directory holding the agent's run record.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// VM id of the run record.
    #[arg(long)]
    pub vmid: Option<String>,
    /// A libvirt domain's watchdog: the connection URI
    /// ([`crate::libvirt::rescue`]).
    #[arg(
        long,
        value_name = "URI",
        conflicts_with = "qmp",
        requires = "domain",
        requires = "run_dir"
    )]
    pub libvirt: Option<String>,
    /// With --libvirt: the domain.
    #[arg(long, requires = "libvirt")]
    pub domain: Option<String>,
    /// With --libvirt: seconds a domain still running after a stop-mode
    /// shutdown request is watched before it counts as running.
    #[arg(long, default_value_t = 600)]
    pub stop_grace: u64,
}

/// Run the watchdog process.
pub fn watchdog(args: &WatchdogArgs) -> ExitCode {
    let code = match (&args.libvirt, &args.domain, &args.run_dir, &args.qmp) {
        (Some(uri), Some(dom), Some(run_dir), _) => {
            crate::libvirt::rescue::run(uri, dom, run_dir, Duration::from_secs(args.stop_grace))
        }
        (_, _, _, Some(qmp)) => {
            let record = args.run_dir.as_deref().zip(args.vmid.as_deref());
            crate::job::watchdog::run(qmp, args.qga.as_deref(), record)
        }
        _ => 2,
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_template_renders_vzdump_variables() {
        use crate::job::backup::render_notes;
        assert_eq!(
            render_notes(
                "{{guestname}} ({{vmid}}) on {{node}}\\nnightly",
                "100",
                "web",
                "pve1"
            ),
            "web (100) on pve1\nnightly"
        );
    }

    #[test]
    fn compress_option_parses() {
        assert_eq!(parse_compress(None).unwrap(), None);
        assert_eq!(parse_compress(Some("zstd")).unwrap(), None);
        assert_eq!(parse_compress(Some("zstd:3")).unwrap(), Some(3));
        assert_eq!(parse_compress(Some("none")).unwrap(), Some(0));
        parse_compress(Some("zstd:0")).unwrap_err();
        parse_compress(Some("gzip")).unwrap_err();
    }
}
