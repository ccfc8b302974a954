//! Repository subcommands.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use zeroize::Zeroizing;

use super::{Cli, Command, FormatArg, KeyCommand, PruneArgs, RestoreArgs};
use crate::repo::gc::GcOptions;
use crate::repo::{
    BackupId, ImageFormat, InitOptions, KdfParams, KeepOptions, Key, PruneMark, Repository,
    RestoreOptions, VerifyTarget, VmId,
};

/// Reads the passphrase from --passphrase-file or SHEAR_KEY_PASSPHRASE.
fn passphrase(cli: &Cli) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(p) = &cli.passphrase_file {
        let mut text = Zeroizing::new(
            std::fs::read(p)
                .with_context(|| format!("cannot read passphrase file {}", p.display()))?,
        );
        while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            text.pop();
        }
        return Ok(text);
    }
    match std::env::var_os("SHEAR_KEY_PASSPHRASE") {
        Some(v) => Ok(Zeroizing::new(v.into_encoded_bytes())),
        None => bail!("no passphrase: set SHEAR_KEY_PASSPHRASE or use --passphrase-file"),
    }
}

fn load_key(cli: &Cli) -> anyhow::Result<Option<Key>> {
    match &cli.keyfile {
        None => Ok(None),
        Some(path) => {
            let pw = passphrase(cli)?;
            Ok(Some(Key::load_file(path, &pw)?))
        }
    }
}

pub(super) fn open(cli: &Cli) -> anyhow::Result<Repository> {
    let key = load_key(cli)?;
    Ok(Repository::open(&cli.repo, key)?)
}

fn parse_backup(s: &str) -> anyhow::Result<BackupId> {
    Ok(s.parse::<BackupId>()?)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[allow(clippy::needless_pass_by_value)] // owns the parsed command line
pub(super) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Init {
            zstd_level,
            chunk_size,
        } => {
            let key = load_key(&cli)?;
            let opts = InitOptions {
                zstd_level: *zstd_level,
                chunk_size: *chunk_size,
            };
            let fp = key.as_ref().map(Key::fingerprint);
            let repo = Repository::init(&cli.repo, key, &opts)?;
            match fp {
                Some(fp) => println!(
                    "initialised encrypted repository {} (key {fp})",
                    repo.location()
                ),
                None => println!("initialised repository {}", repo.location()),
            }
        }
        Command::Key { command } => match command {
            KeyCommand::Create {
                path,
                kdf_memory_kib,
                kdf_passes,
            } => {
                let pw = passphrase(&cli)?;
                let params = KdfParams {
                    m_cost_kib: *kdf_memory_kib,
                    t_cost: *kdf_passes,
                    p_cost: 1,
                };
                let key = Key::create_file(path, &pw, params)?;
                println!(
                    "created key {} fingerprint {}",
                    path.display(),
                    key.fingerprint()
                );
            }
            KeyCommand::Show { path } => {
                println!("{}", Key::file_fingerprint(path)?);
            }
        },
        Command::List { vmid, json } => {
            let repo = open(&cli)?;
            let vmid = vmid.as_deref().map(VmId::new).transpose()?;
            let list = repo.list_backups(vmid.as_ref())?;
            if *json {
                print_json(&list)?;
            } else {
                for b in &list {
                    let mut line = b.id.to_string();
                    if let Some(s) = &b.summary {
                        let size: u64 = s.disks.iter().map(|d| d.1).sum();
                        line.push_str(&format!(
                            "  {}  {} disk(s) {}  {:?}/{:?}",
                            s.vm_name,
                            s.disks.len(),
                            mib(size),
                            s.mode,
                            s.consistency
                        ));
                    }
                    if b.protected {
                        line.push_str("  protected");
                    }
                    if let Some(v) = &b.verify {
                        line.push_str(&format!("  verify:{}", v.state));
                    }
                    println!("{line}");
                }
            }
        }
        Command::Show { backup, json } => {
            let repo = open(&cli)?;
            let id = parse_backup(backup)?;
            let m = repo.load_manifest(&id)?;
            if *json {
                print_json(&m)?;
            } else {
                println!("backup       {}", m.backup_id);
                println!("vm           {} ({})", m.vmid, m.vm_name);
                println!("mode         {:?}, {:?} consistent", m.mode, m.consistency);
                if let Some(b) = &m.base {
                    println!("base         {b}");
                }
                if let Some(e) = &m.encryption {
                    println!("encryption   {} key {}", e.alg, e.key_fingerprint);
                }
                println!(
                    "timings      total {} ms, freeze {}",
                    m.timings.total_ms,
                    m.timings
                        .freeze_window_ms
                        .map_or("-".into(), |f| format!("{f} ms"))
                );
                println!("tool         {}", m.tool_version);
                for d in &m.disks {
                    println!(
                        "disk {}: {} virtual, {} data, {} new stored, {} dedup, image {}",
                        d.name,
                        mib(d.virtual_size),
                        mib(d.data_bytes),
                        mib(d.stored_bytes),
                        mib(d.dedup_bytes),
                        d.image_digest
                    );
                    if let Some(r) = &d.read {
                        match (r.kind, &r.full_reason) {
                            (crate::repo::ReadKind::Incremental, _) => println!(
                                "  read incremental from {}: {} changed",
                                r.base.as_deref().unwrap_or("?"),
                                mib(r.dirty_bytes.unwrap_or(0))
                            ),
                            (crate::repo::ReadKind::Full, Some(why)) => {
                                println!("  read in full: {why}");
                            }
                            (crate::repo::ReadKind::Full, None) => println!("  read in full"),
                        }
                        if let Some(b) = &r.bitmap {
                            println!(
                                "  tracking   {b} ({})",
                                if r.bitmap_persistent {
                                    "persistent"
                                } else {
                                    "lost when QEMU restarts"
                                }
                            );
                        }
                    }
                }
                if !m.notes.is_empty() {
                    println!("notes        {}", m.notes);
                }
            }
        }
        Command::Verify { backup, all, json } => {
            let repo = open(&cli)?;
            let target = match (backup, all) {
                (Some(b), false) => VerifyTarget::Backup(parse_backup(b)?),
                (None, true) => VerifyTarget::All,
                _ => bail!("give a backup id or --all"),
            };
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
            let report = repo.verify(&target, threads)?;
            if *json {
                print_json(&report)?;
            } else {
                for c in &report.bad_chunks {
                    println!(
                        "BAD chunk {}: {}{}",
                        c.digest,
                        c.problem,
                        if c.quarantined {
                            " (quarantined as .bad)"
                        } else {
                            ""
                        }
                    );
                    for u in &c.used_by {
                        println!(
                            "    used by {} disk {} at offsets {:?}",
                            u.backup, u.disk, u.offsets
                        );
                    }
                }
                for b in &report.backups {
                    if b.ok {
                        println!("ok      {}", b.backup);
                    } else {
                        println!("FAILED  {}", b.backup);
                        for p in &b.problems {
                            println!("    {p}");
                        }
                    }
                }
                for s in &report.skipped {
                    println!("skipped {s}");
                }
                println!(
                    "{} backup(s), {} chunk(s) checked, {} bad",
                    report.backups.len(),
                    report.chunks_checked,
                    report.bad_chunks.len()
                );
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Prune(args) => prune(&cli, args)?,
        Command::Protect { backup } => {
            open(&cli)?.set_protected(&parse_backup(backup)?, true)?;
        }
        Command::Unprotect { backup } => {
            open(&cli)?.set_protected(&parse_backup(backup)?, false)?;
        }
        Command::Forget { backup } => {
            open(&cli)?.forget(&parse_backup(backup)?)?;
        }
        Command::Gc {
            wait,
            dry_run,
            json,
        } => {
            let repo = open(&cli)?;
            let r = repo.gc(&GcOptions {
                wait: std::time::Duration::from_secs(*wait),
                dry_run: *dry_run,
            })?;
            if *json {
                print_json(&r)?;
            } else {
                println!(
                    "marked {} backup(s), {} chunk(s) referenced; removed {} chunk(s) ({}), {} temp file(s), {} incomplete backup(s), {} quarantined chunk(s){}",
                    r.backups_marked,
                    r.chunks_referenced,
                    r.chunks_removed,
                    mib(r.bytes_removed),
                    r.temp_files_removed,
                    r.incomplete_backups_removed,
                    r.bad_chunks_removed,
                    if *dry_run { " (dry run: nothing deleted)" } else { "" }
                );
            }
        }
        Command::Restore(args) => restore(&cli, args)?,
        Command::Backup(_) | Command::Watchdog(_) | Command::Cleanup(_) | Command::Hook { .. } => {
            anyhow::bail!("internal: {:?} is dispatched in cli::run", cli.command)
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn prune(cli: &Cli, a: &PruneArgs) -> anyhow::Result<()> {
    let repo = open(cli)?;
    let vmid = VmId::new(&a.vmid)?;
    let keep = KeepOptions {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let entries = repo.prune(&vmid, &keep, a.dry_run)?;
    if a.json {
        return print_json(&entries);
    }
    for e in &entries {
        let what = match (e.mark, e.removed, &e.skipped) {
            (PruneMark::Keep, ..) => "keep".to_string(),
            (PruneMark::Protected, ..) => "keep (protected)".to_string(),
            (PruneMark::Remove, true, _) => "removed".to_string(),
            (PruneMark::Remove, false, Some(why)) => format!("remove: skipped, {why}"),
            (PruneMark::Remove, false, None) => "remove (dry run)".to_string(),
        };
        println!("{}  {what}", e.backup);
    }
    Ok(())
}

fn restore(cli: &Cli, a: &RestoreArgs) -> anyhow::Result<()> {
    let repo = open(cli)?;
    let id = parse_backup(&a.backup)?;
    let reader = repo.open_backup(&id)?;
    let disks: Vec<String> = if a.disks.is_empty() {
        reader
            .manifest()
            .disks
            .iter()
            .map(|d| d.name.clone())
            .collect()
    } else {
        a.disks.clone()
    };
    let opts = RestoreOptions {
        format: match a.format {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        },
        force: a.force,
        ..RestoreOptions::default()
    };
    let target: &Path = &a.target;
    std::fs::create_dir_all(target)
        .with_context(|| format!("creating restore target {}", target.display()))?;
    let mut reports = Vec::new();
    for d in &disks {
        let r = reader
            .restore_disk(d, target, &opts)
            .with_context(|| format!("restore of disk {d} from {id} failed"))?;
        if !a.json {
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            println!(
                "restored {} → {} ({} virtual, {} data, {:.0} MiB/s), image digest {} verified",
                r.disk,
                r.path.display(),
                mib(r.virtual_size),
                mib(r.data_bytes),
                r.virtual_size as f64 / (1 << 20) as f64 / secs,
                r.image_digest
            );
        }
        reports.push(r);
    }
    let format = match a.format {
        FormatArg::Raw => "raw",
        FormatArg::Qcow2 => "qcow2",
    };
    let restored: Vec<super::boot_cmdline::RestoredDisk<'_>> = reports
        .iter()
        .map(|r| super::boot_cmdline::RestoredDisk {
            name: &r.disk,
            path: &r.path,
            format,
        })
        .collect();
    let boot = super::boot_cmdline::qemu_command(&reader.manifest().vm_config, &restored);
    if a.json {
        print_json(&serde_json::json!({"disks": reports, "qemu_command": boot}))?;
    } else {
        println!("boot the restored disks with:\n  {boot}");
    }
    Ok(())
}
