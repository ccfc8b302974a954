//! Repository subcommands.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::out;

use super::passphrase;
use super::{Cli, Command, FormatArg, KeyCommand, PruneArgs, RestoreArgs};
use crate::repo::gc::GcOptions;
use crate::repo::{
    BackupId, ImageFormat, InitOptions, KdfParams, KeepOptions, Key, MasterPrivateKey,
    MasterPublicKey, MasterSeal, PruneMark, Repository, RestoreOptions, VerifyTarget, VmId,
};

/// The key file a `key` subcommand works on: its PATH, else --keyfile.
fn key_path(cli: &Cli, path: Option<&Path>) -> anyhow::Result<std::path::PathBuf> {
    match path.or(cli.keyfile.as_deref()) {
        Some(p) => Ok(p.to_owned()),
        None => bail!("name the key file: --keyfile PATH (or SHEAR_KEYFILE)"),
    }
}

fn load_key(cli: &Cli) -> anyhow::Result<Option<Key>> {
    match &cli.keyfile {
        None => Ok(None),
        Some(path) => {
            let src = passphrase::key_source(cli.passphrase_file.as_deref());
            let pw = passphrase::existing(src, &format!("key file {}", path.display()))?;
            Ok(Some(Key::load_file(path, &pw)?))
        }
    }
}

pub(super) fn open(cli: &Cli) -> anyhow::Result<Repository> {
    let key = load_key(cli)?;
    let repo = Repository::open(&cli.repo, key)?;
    if let Some(path) = &cli.admin_token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("admin token file {}: {e}", path.display()))?;
        repo.authorize_admin(&token)?;
    }
    Ok(repo)
}

fn parse_backup(s: &str) -> anyhow::Result<BackupId> {
    Ok(s.parse::<BackupId>()?)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A backup id, or `vm/<vmid>` / `vm/<vmid>/latest`: the newest backup of
/// that VM.
pub(super) fn resolve_backup(repo: &Repository, s: &str) -> anyhow::Result<BackupId> {
    let vm = s
        .strip_suffix("/latest")
        .unwrap_or(s)
        .strip_prefix("vm/")
        .filter(|v| !v.contains('/'));
    if let Some(v) = vm {
        let vmid = VmId::new(v)?;
        let list = repo.list_backups(Some(&vmid))?;
        return match list.last() {
            Some(b) => Ok(b.id.clone()),
            None => bail!("VM {v} has no backups in {}", repo.location()),
        };
    }
    parse_backup(s)
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
            max_disk_size_gib,
            master_pubkey,
            append_only,
            object_lock_days,
            object_lock_mode,
        } => {
            let max_entries = crate::repo::format::MAX_INDEX_ENTRIES;
            let holds = u64::from(*chunk_size).saturating_mul(max_entries);
            if holds < max_disk_size_gib.saturating_mul(1 << 30) {
                bail!(
                    "chunks of {chunk_size} bytes hold disks up to {} GiB ({max_entries} chunks per disk), \
                     less than --max-disk-size-gib {max_disk_size_gib}: use a larger --chunk-size \
                     or a smaller --max-disk-size-gib",
                    holds >> 30
                );
            }
            if master_pubkey.is_some() && cli.keyfile.is_none() {
                bail!("--master-pubkey needs an encrypted repository: give --keyfile");
            }
            let key = load_key(&cli)?;
            // The seal to a master key, checked before anything is created.
            let seal = match (&key, master_pubkey, &cli.keyfile) {
                (Some(k), Some(pk), _) => Some(MasterPublicKey::load_file(pk)?.seal(k)?),
                (Some(_), None, Some(kf)) => Key::file_master_seal(kf)?,
                _ => None,
            };
            let admin_token = append_only.then(crate::repo::immut::new_admin_token);
            let opts = InitOptions {
                zstd_level: *zstd_level,
                chunk_size: *chunk_size,
                append_only: admin_token
                    .as_ref()
                    .map(|t| crate::repo::immut::AppendOnly {
                        admin_token_hash: crate::repo::immut::admin_token_hash(t),
                    }),
                object_lock: object_lock_days.map(|d| crate::repo::immut::ObjectLock {
                    mode: if object_lock_mode == "governance" {
                        crate::repo::immut::RetentionMode::Governance
                    } else {
                        crate::repo::immut::RetentionMode::Compliance
                    },
                    retention_secs: u64::from(d) * 86_400,
                }),
            };
            // The token file first: an append-only repository whose token
            // was lost needs the config edited by hand to administer.
            if let (Some(t), Some(path)) = (&admin_token, &cli.admin_token_file) {
                crate::fsutil::write_atomic(
                    path,
                    format!("{t}\n").as_bytes(),
                    crate::fsutil::Existing::Keep,
                )
                .map_err(|e| anyhow::anyhow!("admin token file {}: {e}", path.display()))?;
            }
            if seal.is_some() && crate::repo::url_backend(&cli.repo)?.is_some() {
                bail!(
                    "a master-key seal is kept beside a local repository only: not yet on {}",
                    cli.repo.display()
                );
            }
            let fp = key.as_ref().map(Key::fingerprint);
            let repo = Repository::init(&cli.repo, key, &opts)?;
            if let Some(seal) = &seal {
                let path = cli.repo.join(crate::repo::master::REPO_SEAL_NAME);
                seal.write_new(&path)?;
                out!(
                    "sealed the key to master key {} in {}",
                    seal.master_fingerprint,
                    path.display()
                );
            }
            match fp {
                Some(fp) => out!(
                    "initialised encrypted repository {} (key {fp})",
                    repo.location()
                ),
                None => out!("initialised repository {}", repo.location()),
            }
            match (&admin_token, &cli.admin_token_file) {
                (Some(_), Some(path)) => out!(
                    "append-only: prune, forget, gc and unprotect need the admin token in {} \
                     (keep it off this host)",
                    path.display()
                ),
                (Some(t), None) => out!(
                    "append-only: prune, forget, gc and unprotect need this admin token \
                     (shown once; keep it off this host): {t}"
                ),
                _ => {}
            }
        }
        Command::Key { command } => match command {
            KeyCommand::Create {
                path,
                master_pubkey,
                kdf_memory_kib,
                kdf_passes,
            } => {
                let master = master_pubkey
                    .as_deref()
                    .map(MasterPublicKey::load_file)
                    .transpose()?;
                refuse_existing(path)?;
                let pw = passphrase::new(
                    passphrase::key_source(cli.passphrase_file.as_deref()),
                    &format!("key file {}", path.display()),
                )?;
                let params = kdf(*kdf_memory_kib, *kdf_passes);
                let key = Key::generate();
                let seal = master.map(|m| m.seal(&key)).transpose()?;
                key.save_file(path, &pw, params, seal.as_ref())?;
                if let Some(s) = &seal {
                    out!("sealed to master key {}", s.master_fingerprint);
                }
                out!(
                    "created key {} fingerprint {}",
                    path.display(),
                    key.fingerprint()
                );
            }
            KeyCommand::Show { path } => {
                out!(
                    "{}",
                    Key::file_fingerprint(&key_path(&cli, path.as_deref())?)?
                );
            }
            KeyCommand::Paperkey { path } => {
                let path = key_path(&cli, path.as_deref())?;
                let fp = Key::file_fingerprint(&path)?;
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read key file {}", path.display()))?;
                out!("shear key file {} (fingerprint {fp})", path.display());
                out!("The key inside is wrapped under its passphrase: keep the passphrase apart.");
                out!("-----BEGIN SHEAR KEY FILE-----");
                out!("{}", text.trim_end());
                out!("-----END SHEAR KEY FILE-----");
            }
            KeyCommand::CreateMaster {
                private,
                public,
                master_passphrase_file,
                kdf_memory_kib,
                kdf_passes,
            } => {
                refuse_existing(private)?;
                refuse_existing(public)?;
                let pw = passphrase::new(
                    passphrase::master_source(master_passphrase_file.as_deref()),
                    &format!("master key {}", private.display()),
                )?;
                let pk = MasterPrivateKey::create_files(
                    private,
                    public,
                    &pw,
                    kdf(*kdf_memory_kib, *kdf_passes),
                )?;
                out!(
                    "created master key {} (private: keep it offline) and {} (public), fingerprint {}",
                    private.display(),
                    public.display(),
                    pk.fingerprint()
                );
            }
            KeyCommand::Seal { master_pubkey } => {
                let master = MasterPublicKey::load_file(master_pubkey)?;
                let Some(key) = load_key(&cli)? else {
                    bail!("name the repository's key file: --keyfile PATH (or SHEAR_KEYFILE)");
                };
                let seal = master.seal(&key)?;
                // Only the repository's own key (open checks the fingerprint).
                let repo = Repository::open(&cli.repo, Some(key))?;
                let path = cli.repo.join(crate::repo::master::REPO_SEAL_NAME);
                seal.write_new(&path)?;
                out!(
                    "sealed the key of {} to master key {} in {}",
                    repo.location(),
                    seal.master_fingerprint,
                    path.display()
                );
            }
            KeyCommand::Recover {
                new,
                master_key,
                master_passphrase_file,
                kdf_memory_kib,
                kdf_passes,
            } => recover(
                &cli,
                new,
                master_key,
                master_passphrase_file.as_deref(),
                kdf(*kdf_memory_kib, *kdf_passes),
            )?,
        },
        Command::List { vmid, json } => {
            let repo = open(&cli)?;
            let vmid = vmid.as_deref().map(VmId::new).transpose()?;
            let list = repo.list_backups(vmid.as_ref())?;
            if *json {
                print_json(&list)?;
            } else if list.is_empty() {
                match &vmid {
                    Some(v) => out!("no backups of VM {v} in {}", repo.location()),
                    None => out!("no backups in {}", repo.location()),
                }
            } else {
                for b in &list {
                    out!("{}", list_line(b));
                }
            }
        }
        Command::Show {
            backup,
            json,
            config,
        } => {
            let repo = open(&cli)?;
            let id = resolve_backup(&repo, backup)?;
            let m = repo.load_manifest(&id)?;
            if *config {
                if *json {
                    print_json(&m.vm_config)?;
                } else {
                    print!("{}", super::vm_definition::show(&m.vm_config));
                }
            } else if *json {
                print_json(&m)?;
            } else {
                out!("backup       {}", m.backup_id);
                out!("vm           {} ({})", m.vmid, m.vm_name);
                out!("mode         {:?}, {:?} consistent", m.mode, m.consistency);
                if let Some(b) = &m.base {
                    out!("base         {b}");
                }
                if let Some(e) = &m.encryption {
                    out!("encryption   {} key {}", e.alg, e.key_fingerprint);
                }
                out!(
                    "timings      total {} ms, freeze {}",
                    m.timings.total_ms,
                    m.timings
                        .freeze_window_ms
                        .map_or("-".into(), |f| format!("{f} ms"))
                );
                out!("tool         {}", m.tool_version);
                for d in &m.disks {
                    out!(
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
                            (crate::repo::ReadKind::Incremental, _) => out!(
                                "  read incremental from {}: {} changed",
                                r.base.as_deref().unwrap_or("?"),
                                mib(r.dirty_bytes.unwrap_or(0))
                            ),
                            (crate::repo::ReadKind::Full, Some(why)) => {
                                out!("  read in full: {why}");
                            }
                            (crate::repo::ReadKind::Full, None) => out!("  read in full"),
                        }
                        if let Some(b) = &r.bitmap {
                            out!(
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
                    out!("notes        {}", m.notes);
                }
                match repo.restore_test(&id) {
                    Ok(Some(r)) => out!(
                        "restore test {}",
                        super::boot_cmd::restore_test_line(&id.to_string(), &r)
                    ),
                    Ok(None) => out!("restore test never (run `shear verify --boot`)"),
                    Err(e) => out!("restore test unreadable: {}", crate::chain(&e)),
                }
            }
        }
        Command::Verify {
            backup, all, json, ..
        } => {
            let repo = open(&cli)?;
            let target = match (backup, all) {
                (Some(b), false) => VerifyTarget::Backup(resolve_backup(&repo, b)?),
                (None, true) => VerifyTarget::All,
                _ => bail!("give a backup id or --all"),
            };
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
            let report = repo.verify(&target, threads)?;
            if *json {
                print_json(&report)?;
            } else {
                for c in &report.bad_chunks {
                    out!(
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
                        out!(
                            "    used by {} disk {} at offsets {:?}",
                            u.backup,
                            u.disk,
                            u.offsets
                        );
                    }
                }
                for b in &report.backups {
                    if b.ok {
                        out!("ok      {}", b.backup);
                    } else {
                        out!("FAILED  {}", b.backup);
                        for p in &b.problems {
                            out!("    {p}");
                        }
                    }
                }
                for s in &report.skipped {
                    out!("skipped {s}");
                }
                if let Some(why) = &report.not_recorded {
                    out!("result not recorded in the repository (read-only?): {why}");
                }
                out!(
                    "{} backup(s), {} chunk(s) checked, {} bad",
                    report.backups.len(),
                    report.chunks_checked,
                    report.bad_chunks.len()
                );
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(super::EXIT_DAMAGE));
            }
        }
        Command::Prune(args) => prune(&cli, args)?,
        Command::Protect { backup } => {
            let repo = open(&cli)?;
            repo.set_protected(&resolve_backup(&repo, backup)?, true)?;
        }
        Command::Unprotect { backup } => {
            let repo = open(&cli)?;
            repo.set_protected(&resolve_backup(&repo, backup)?, false)?;
        }
        Command::Forget { backup } => {
            let repo = open(&cli)?;
            repo.forget(&resolve_backup(&repo, backup)?)?;
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
                out!(
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
                if let Some(why) = &r.deferred {
                    out!("{why}");
                }
            }
        }
        Command::Restore(args) => restore(&cli, args)?,
        Command::Sync {
            from,
            to,
            vmid,
            last,
            verify,
            remove_vanished,
            streams,
            json,
        } => {
            let key = load_key(&cli)?;
            let src = Repository::open(from, key)?;
            // The target stores blobs as they are: it needs no key (sync
            // checks that both have the same key fingerprint).
            let dst = Repository::open(to, None)?;
            let opts = crate::repo::sync::SyncOptions {
                vmid: vmid.as_deref().map(VmId::new).transpose()?,
                last: *last,
                verify: *verify,
                remove_vanished: *remove_vanished,
                streams: *streams,
            };
            let t0 = std::time::Instant::now();
            let r = crate::repo::sync::sync(&src, &dst, &opts)?;
            if *json {
                print_json(&r)?;
            } else {
                for id in &r.copied {
                    out!("copied {id}");
                }
                out!(
                    "{} backup(s) copied, {} already there; {} chunk(s) copied ({}), {} present; {:.1} s",
                    r.copied.len(),
                    r.already_present,
                    r.chunks_copied,
                    mib(r.bytes_copied),
                    r.chunks_present,
                    t0.elapsed().as_secs_f64()
                );
                for id in &r.removed {
                    out!("removed vanished {id}");
                }
                for why in &r.not_removed {
                    out!("kept vanished {why}");
                }
            }
        }
        Command::Backup(_)
        | Command::Watchdog(_)
        | Command::Cleanup(_)
        | Command::Hook { .. }
        | Command::Generate { .. }
        | Command::Daemon(_)
        | Command::Job(_)
        | Command::Task(_)
        | Command::Token(_)
        | Command::Report(_)
        | Command::Snapshot(_)
        | Command::Serve(_)
        | Command::Files(_) => {
            anyhow::bail!("internal: {:?} is dispatched in cli::run", cli.command)
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn kdf(m_cost_kib: u32, t_cost: u32) -> KdfParams {
    KdfParams {
        m_cost_kib,
        t_cost,
        p_cost: 1,
    }
}

/// Refuses a path that exists, before any passphrase is asked.
fn refuse_existing(path: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        bail!("{} exists: nothing was written", path.display());
    }
    Ok(())
}

/// `key recover`: the sealed key from the old key file or the repository,
/// opened with the master private key, saved under a new passphrase (and
/// sealed to the same master key again).
fn recover(
    cli: &Cli,
    new: &Path,
    master_key: &Path,
    master_passphrase_file: Option<&Path>,
    params: KdfParams,
) -> anyhow::Result<()> {
    refuse_existing(new)?;
    let from_keyfile = match &cli.keyfile {
        Some(kf) => Key::file_master_seal(kf)?.map(|s| (s, kf.display().to_string())),
        None => None,
    };
    let repo_seal = cli.repo.join(crate::repo::master::REPO_SEAL_NAME);
    let (seal, from) = match from_keyfile {
        Some(found) => found,
        None if repo_seal.exists() => (
            MasterSeal::load_file(&repo_seal)?,
            repo_seal.display().to_string(),
        ),
        None => bail!(
            "no sealed key found: neither {} nor {} holds one (was the key or the repository \
             created with --master-pubkey?)",
            cli.keyfile
                .as_ref()
                .map_or("--keyfile (not given)".to_string(), |k| k
                    .display()
                    .to_string()),
            repo_seal.display()
        ),
    };
    let mpw = passphrase::existing(
        passphrase::master_source(master_passphrase_file),
        &format!("master key {}", master_key.display()),
    )?;
    let master = MasterPrivateKey::load_file(master_key, &mpw)?;
    let key = master
        .unseal(&seal)
        .with_context(|| format!("cannot open the sealed key from {from}"))?;
    // A seal that opens but holds another key than the repository's (a
    // swapped seal file) is refused before anything is written.
    if let Ok(repo) = Repository::open(&cli.repo, None) {
        if let Some(e) = &repo.config().encryption {
            if e.key_fingerprint != key.fingerprint().to_string() {
                bail!(
                    "the key sealed in {from} ({}) is not the key of repository {} ({}): nothing was written",
                    key.fingerprint(),
                    repo.location(),
                    e.key_fingerprint
                );
            }
        }
    }
    let pw = passphrase::new(
        passphrase::key_source(cli.passphrase_file.as_deref()),
        &format!("key file {}", new.display()),
    )?;
    let reseal = master.public().seal(&key)?;
    key.save_file(new, &pw, params, Some(&reseal))?;
    out!(
        "recovered key {} from {from} with master key {}; wrote {} (new passphrase)",
        key.fingerprint(),
        master.public().fingerprint(),
        new.display()
    );
    Ok(())
}

/// One line of `shear list`: id, name, disks, sizes, consistency, state.
fn list_line(b: &crate::repo::BackupInfo) -> String {
    use crate::repo::ManifestState;
    let mut line = b.id.to_string();
    match (&b.summary, b.manifest) {
        (Some(s), _) => {
            let size: u64 = s.disks.iter().map(|d| d.1).sum();
            line.push_str(&format!(
                "  {}  {} disk(s) {} virtual, {} stored  {:?}, {} consistent",
                s.vm_name,
                s.disks.len(),
                mib(size),
                mib(s.stored_bytes),
                s.mode,
                match s.consistency {
                    crate::repo::Consistency::Application => "application",
                    crate::repo::Consistency::Crash => "crash",
                },
            ));
        }
        (None, ManifestState::Locked) => line.push_str("  (encrypted: give --keyfile for details)"),
        (None, _) => line.push_str(&format!(
            "  MANIFEST DAMAGED ({})",
            b.manifest_error.as_deref().unwrap_or("unreadable")
        )),
    }
    if b.protected {
        line.push_str("  protected");
    }
    match &b.verify {
        Some(v) => line.push_str(&format!("  last verify: {} at {}", v.state, v.time)),
        None => line.push_str("  never verified"),
    }
    if let Some(r) = &b.restore_test {
        line.push_str(&format!("  last restore test: {} at {}", r.state, r.time));
    }
    if let Some(s) = &b.summary {
        if !s.notes.is_empty() {
            line.push_str(&format!("  \"{}\"", s.notes));
        }
    }
    line
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
        out!("{}  {what}", e.backup);
    }
    Ok(())
}

/// Fails naming every disk in `wanted` that backup `id` lacks, and the
/// disks it has.
pub(super) fn check_disk_names(
    id: &impl std::fmt::Display,
    wanted: &[String],
    names: &[String],
) -> anyhow::Result<()> {
    let unknown: Vec<&str> = wanted
        .iter()
        .filter(|d| !names.contains(d))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "backup {id} has no disk {}; its disks: {}",
            unknown.join(", "),
            names.join(", ")
        );
    }
    Ok(())
}

/// `--target-device DISK=DEV` values as (disk, device) pairs.
pub(super) fn device_map(values: &[String]) -> anyhow::Result<Vec<(String, std::path::PathBuf)>> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((d, p)) if !d.is_empty() && !p.is_empty() => Ok((d.to_owned(), p.into())),
            _ => bail!(
                "--target-device {v:?}: expected DISK=DEVICE, e.g. scsi0=/dev/vg0/vm-100-disk-0"
            ),
        })
        .collect()
}

fn restore(cli: &Cli, a: &RestoreArgs) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if a.live.live {
        return super::live_cmd::run(cli, a);
    }
    let repo = open(cli)?;
    let id = resolve_backup(&repo, &a.backup)?;
    let reader = repo.open_backup(&id)?;
    let names: Vec<String> = reader
        .manifest()
        .disks
        .iter()
        .map(|d| d.name.clone())
        .collect();
    check_disk_names(&id, &a.disks, &names)?;
    let disks: Vec<String> = if a.disks.is_empty() {
        names.clone()
    } else {
        a.disks.clone()
    };
    let opts = RestoreOptions {
        format: match a.format.unwrap_or(FormatArg::Raw) {
            FormatArg::Raw => ImageFormat::Raw,
            FormatArg::Qcow2 => ImageFormat::Qcow2,
        },
        force: a.force,
        ..RestoreOptions::default()
    };
    let map = device_map(&a.target_devices)?;
    let target: &Path = a.target.as_deref().unwrap_or(Path::new(""));
    let device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let disks: Vec<String> = if map.is_empty() {
        disks
    } else {
        let wanted: Vec<String> = map.iter().map(|(d, _)| d.clone()).collect();
        check_disk_names(&id, &wanted, &names)?;
        Vec::new()
    };
    if device && disks.len() != 1 {
        bail!(
            "{} is a block device: restore one disk onto it (--disk NAME; the backup has {})",
            target.display(),
            disks.join(", ")
        );
    }
    if !device && map.is_empty() {
        std::fs::create_dir_all(target)
            .with_context(|| format!("creating restore target {}", target.display()))?;
    }
    let mut reports = if map.is_empty() {
        Vec::new()
    } else {
        reader
            .restore_disks_to_devices(&map, &opts)
            .with_context(|| format!("restore of {id} onto block devices failed"))?
    };
    if !a.json {
        for r in &reports {
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            out!(
                "restored {} → {} ({} virtual, {} data, {:.0} MiB/s), image digest {} verified",
                r.disk,
                r.path.display(),
                mib(r.virtual_size),
                mib(r.data_bytes),
                r.virtual_size as f64 / (1 << 20) as f64 / secs,
                r.image_digest
            );
        }
    }
    for d in &disks {
        let r = if device {
            reader.restore_disk_to_device(d, target, &opts)
        } else {
            reader.restore_disk(d, target, &opts)
        }
        .with_context(|| format!("restore of disk {d} from {id} failed"))?;
        if !a.json {
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            out!(
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
    let format = match a.format.unwrap_or(FormatArg::Raw) {
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
    // The VM's definition goes beside restored files; a block device
    // target has no "beside" (`show --config` prints it).
    let definition = if target.is_dir() {
        super::vm_definition::write_beside(
            &reader.manifest().vm_config,
            target,
            &reports
                .iter()
                .map(|r| (r.disk.clone(), r.path.clone(), format))
                .collect::<Vec<_>>(),
        )?
    } else {
        Vec::new()
    };
    let libvirt = if a.libvirt {
        if !target.is_dir() {
            bail!("--libvirt writes the domain XML beside the restored disks: give a directory as --target");
        }
        let restored: Vec<(String, std::path::PathBuf, &str)> = reports
            .iter()
            .map(|r| (r.disk.clone(), r.path.clone(), format))
            .collect();
        Some(super::libvirt_cmd::restore_domain(
            &reader.manifest().vm_config,
            target,
            &restored,
            a.name.as_deref(),
            a.replace,
            a.define.then_some(a.connect.as_str()),
        )?)
    } else {
        None
    };
    let devices: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let at = super::boot_cmdline::attachment(&reader.manifest().vm_config, &r.disk);
            serde_json::json!({"disk": r.disk, "device": at.device, "read_only": at.read_only})
        })
        .collect();
    if a.json {
        let mut v = serde_json::json!({"disks": reports, "devices": devices, "qemu_command": boot});
        if let Some((_, file)) = &libvirt {
            v["libvirt_xml"] = serde_json::json!(file);
        }
        print_json(&v)?;
    } else {
        for d in &devices {
            out!(
                "disk {} attaches as {}{}",
                d["disk"].as_str().unwrap_or("?"),
                d["device"].as_str().unwrap_or("?"),
                if d["read_only"] == true {
                    ", read-only (as it was)"
                } else {
                    ""
                }
            );
        }
        out!("boot the restored disks with:\n  {boot}");
        for f in &definition {
            out!("wrote {}", f.display());
        }
        for l in libvirt.iter().flat_map(|(lines, _)| lines) {
            out!("{l}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod device_map_tests {
    use super::device_map;

    #[test]
    fn target_device_values_are_disk_equals_device() {
        let m = device_map(&["scsi0=/dev/vg0/a".into(), "virtio1=/dev/zd0".into()]).unwrap();
        assert_eq!(m[0].0, "scsi0");
        assert_eq!(m[1].1, std::path::Path::new("/dev/zd0"));
        for bad in ["scsi0", "=/dev/x", "scsi0="] {
            let e = device_map(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("expected DISK=DEVICE"), "{bad}: {e}");
        }
    }
}
