//! `shear backup VMID --nbd NAME=URI [--bitmap NAME=BITMAP]`: store what
//! any NBD export serves (Proxmox VE's backup-provider API, libvirt's
//! pull-mode backup, `qemu-nbd`, `nbdkit`), one disk per NAME.
//!
//! No QMP, no qemu-ga, no freeze, no watchdog, no run record: nothing in
//! QEMU is changed, so there is nothing to undo. Holes come from
//! `base:allocation`. With `--bitmap NAME=BITMAP`, only the ranges dirty in
//! `qemu:dirty-bitmap:BITMAP` are read and every other chunk reuses the
//! previous backup of disk NAME of this VM in this repository (logically
//! full, like a QMP incremental). That the bitmap covers every change
//! since that backup is the caller's responsibility.
//!
//! When there is no usable previous backup of the disk (none, another
//! virtual size, chunk size or key, or it failed verify), the disk is read
//! in full and the reason is recorded and reported: a provider's first
//! backup with a bitmap works. The bitmap context itself must exist (an
//! unknown bitmap is an error before anything is stored).
//!
//! Every export is connected to (reachable, export exists, size, contexts)
//! before the repository session begins: bad input stores nothing.

use std::sync::Arc;
use std::time::Instant;

use super::backup::ms;
use super::cancel::Cancel;
use super::datapath::{self, DataPathConfig, DiskJob};
use super::events::{JobEvent, Observer, Phase};
use super::graph::VmDisk;
use super::lock::{lock_vm, private_dir};
use super::options::Mode;
use super::report::BackupReport;
use super::JobError;
use crate::repo::{self, Consistency, Repository};

/// Default NBD TCP port.
const NBD_PORT: u16 = 10809;

/// One `--nbd NAME=URI`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdDisk {
    /// Disk name in the backup.
    pub name: String,
    /// Where the export is.
    pub source: nbd_export::ExportSource,
    /// The URI without secrets (recorded as the disk's filename).
    pub uri: String,
}

/// Parse `NAME=URI`.
pub fn parse_disk_arg(arg: &str) -> Result<NbdDisk, String> {
    let (name, uri) = arg
        .split_once('=')
        .ok_or_else(|| format!("--nbd takes NAME=URI, not {arg:?}"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "--nbd {arg:?}: the disk name must be letters, digits, '-', '_' or '.'"
        ));
    }
    let (source, uri) = parse_uri(uri)?;
    Ok(NbdDisk {
        name: name.to_string(),
        source,
        uri,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// Parse an NBD URI (`nbd+unix:///EXPORT?socket=PATH`,
/// `nbd://HOST[:PORT]/EXPORT`): the source and the URI to record (user
/// info and query parameters other than `socket` dropped).
pub fn parse_uri(uri: &str) -> Result<(nbd_export::ExportSource, String), String> {
    let bad = |why: &str| format!("NBD URI {:?}: {why}", redact(uri));
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    // User info (never used by NBD) is not kept.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let export = percent_decode(path).map_err(|e| bad(&e))?;
    let mut socket = None;
    for kv in query.into_iter().flat_map(|q| q.split('&')) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "socket" => socket = Some(percent_decode(v).map_err(|e| bad(&e))?),
            k if k.starts_with("tls") => {
                return Err(bad("TLS is not supported by shear's NBD client"));
            }
            _ => {}
        }
    }
    match scheme {
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(bad(
                    "nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let socket = socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?;
            if socket.is_empty() {
                return Err(bad("empty socket path"));
            }
            let clean = format!("nbd+unix:///{path}?socket={socket}");
            Ok((nbd_export::ExportSource::unix(socket, export), clean))
        }
        "nbd" | "nbd+tcp" => {
            if authority.is_empty() {
                return Err(bad("no host"));
            }
            let has_port = if let Some(after) = authority.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| bad("unclosed '[' in host"))?;
                after[end + 1..].starts_with(':')
            } else {
                authority.contains(':')
            };
            let addr = if has_port {
                authority.to_string()
            } else {
                format!("{authority}:{NBD_PORT}")
            };
            let clean = format!("nbd://{addr}/{path}");
            Ok((nbd_export::ExportSource::tcp(addr, export), clean))
        }
        "nbds" | "nbds+unix" | "nbds+tcp" => Err(bad("TLS is not supported by shear's NBD client")),
        _ => Err(bad("unknown scheme")),
    }
}

/// The URI for an error message: no user info, no query but `socket`.
fn redact(uri: &str) -> String {
    match parse_uri_lossy(uri) {
        Some(s) => s,
        None => "<unparsable>".into(),
    }
}

fn parse_uri_lossy(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let rest = match rest.find('/') {
        Some(i) => {
            let (a, p) = rest.split_at(i);
            format!("{}{p}", a.rsplit_once('@').map_or(a, |(_, h)| h))
        }
        None => rest.rsplit_once('@').map_or(rest, |(_, h)| h).to_string(),
    };
    let socket = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find(|kv| kv.starts_with("socket="));
    Some(match socket {
        Some(s) => format!("{scheme}://{rest}?{s}"),
        None => format!("{scheme}://{rest}"),
    })
}

/// Options of an NBD-source backup.
#[derive(Debug, Clone)]
pub struct NbdBackupOptions {
    /// VM id the backup is stored under.
    pub vmid: String,
    /// The disks.
    pub disks: Vec<NbdDisk>,
    /// `(disk name, bitmap)` pairs (`--bitmap`).
    pub bitmaps: Vec<(String, String)>,
    /// Run directory (the per-VM lock).
    pub run_dir: std::path::PathBuf,
    /// zstd level; `None` = the repository's default.
    pub zstd_level: Option<i32>,
    /// Hash/compress worker threads.
    pub workers: usize,
    /// NBD connections per disk.
    pub connections: usize,
    /// Read limit, KiB/s (0: none).
    pub bwlimit_kib: u64,
    /// CPU and I/O priority of the data path.
    pub priority: super::priority::DataPriority,
    /// Notes.
    pub notes: String,
    /// Read every disk in full even with `--bitmap`.
    pub full: bool,
}

/// What a probe connection learned about one export.
#[derive(Debug)]
struct Probed {
    size: u64,
}

fn probe(disk: &NbdDisk, bitmap: Option<&str>) -> Result<Probed, JobError> {
    let mut src = disk.source.clone();
    if let Some(b) = bitmap {
        src = src.with_dirty_bitmap(b);
    }
    let client = datapath::connect_client(&src).map_err(|source| JobError::Nbd {
        step: format!(
            "connecting to {} for disk {}{}",
            disk.uri,
            disk.name,
            bitmap.map_or(String::new(), |b| format!(
                " (with meta context qemu:dirty-bitmap:{b})"
            ))
        ),
        source,
    })?;
    let size = client.info().size;
    let _ = client.disconnect();
    Ok(Probed { size })
}

/// The previous backup of disk `name` of `vmid` that clean chunks can
/// reuse, or why there is none.
fn find_base(
    repo: &Repository,
    vmid: &repo::VmId,
    name: &str,
    size: u64,
) -> Result<(repo::BackupId, Arc<Vec<repo::Digest>>), String> {
    let list = repo
        .list_backups(Some(vmid))
        .map_err(|e| format!("listing backups: {}", crate::chain(&e)))?;
    let fingerprint = repo
        .config()
        .encryption
        .as_ref()
        .map(|e| e.key_fingerprint.clone());
    for info in list.iter().rev() {
        let Ok(m) = repo.load_manifest(&info.id) else {
            continue;
        };
        let Some(e) = m.disks.iter().find(|d| d.name == name) else {
            continue;
        };
        let id = &info.id;
        if e.virtual_size != size {
            return Err(format!(
                "the previous backup {id} of disk {name} has another virtual size ({} bytes, the \
                 export {size})",
                e.virtual_size
            ));
        }
        if e.chunk_size != repo.config().chunk_size {
            return Err(format!("the previous backup {id} has another chunk size"));
        }
        if m.encryption.map(|e| e.key_fingerprint) != fingerprint {
            return Err(format!(
                "the previous backup {id} was written with another key"
            ));
        }
        if let Ok(Some(v)) = repo.verify_state(id) {
            if v.state != "ok" {
                return Err(format!("the previous backup {id} failed verify"));
            }
        }
        let reader = repo
            .open_backup(id)
            .map_err(|e| format!("backup {id} cannot be opened: {}", crate::chain(&e)))?;
        let d = reader.open_disk(name).map_err(|e| {
            format!(
                "the index of {name} in {id} is unreadable: {}",
                crate::chain(&e)
            )
        })?;
        return Ok((id.clone(), Arc::new(d.entries().to_vec())));
    }
    Err(format!(
        "no previous backup of disk {name} of VM {vmid} in this repository"
    ))
}

/// Run one NBD-source backup.
pub async fn run_nbd_backup(
    repo: Arc<Repository>,
    opts: NbdBackupOptions,
    cancel: Cancel,
    observer: Observer,
) -> Result<BackupReport, JobError> {
    let t0 = Instant::now();
    observer.event(&JobEvent::Phase {
        vmid: &opts.vmid,
        phase: Phase::Prepare,
    });
    let vmid = repo::VmId::new(&opts.vmid).map_err(JobError::repo("VM id"))?;
    if opts.disks.is_empty() {
        return Err(JobError::Invalid("no --nbd disk given".into()));
    }
    for (i, d) in opts.disks.iter().enumerate() {
        if opts.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(JobError::Invalid(format!("disk {} given twice", d.name)));
        }
    }
    for (name, _) in &opts.bitmaps {
        if !opts.disks.iter().any(|d| &d.name == name) {
            return Err(JobError::Invalid(format!(
                "--bitmap names disk {name}, which no --nbd gives"
            )));
        }
    }
    private_dir(&opts.run_dir)?;
    let _lock = lock_vm(&opts.run_dir, &opts.vmid)?;
    let mut warnings = Vec::new();
    let mut jobs = Vec::new();
    for d in &opts.disks {
        let bitmap = opts
            .bitmaps
            .iter()
            .find(|(n, _)| n == &d.name)
            .map(|(_, b)| b.clone());
        let (r, src) = {
            let (d2, b2) = (d.clone(), bitmap.clone());
            let r = tokio::task::spawn_blocking(move || probe(&d2, b2.as_deref()))
                .await
                .map_err(|e| JobError::Invalid(format!("probe thread failed: {e}")))?;
            (r, d.source.clone())
        };
        let size = r?.size;
        cancel.check()?;
        let (incremental, full_reason, base) = match &bitmap {
            None => (None, Some("no --bitmap given".to_string()), None),
            Some(_) if opts.full => (None, Some("--full was given".to_string()), None),
            Some(b) => match find_base(&repo, &vmid, &d.name, size) {
                Ok((id, digests)) => (Some((b.clone(), digests)), None, Some(id.to_string())),
                Err(why) => {
                    let msg = format!("disk {} is read in full despite --bitmap: {why}", d.name);
                    observer.event(&JobEvent::Warning {
                        vmid: &opts.vmid,
                        message: &msg,
                    });
                    warnings.push(msg);
                    (None, Some(why), None)
                }
            },
        };
        let kind = if incremental.is_some() {
            repo::ReadKind::Incremental
        } else {
            repo::ReadKind::Full
        };
        jobs.push(DiskJob {
            disk: VmDisk {
                name: d.name.clone(),
                device: String::new(),
                qdev: d.name.clone(),
                node: String::new(),
                format: "raw".into(),
                filename: d.uri.clone(),
                virtual_size: size,
                allocated_size: None,
                read_only: true,
            },
            source: src,
            fleece: None,
            release: None,
            incremental,
            read: repo::DiskRead {
                kind,
                full_reason,
                base,
                dirty_bytes: None,
                bitmap: None,
                bitmap_persistent: false,
                filename: d.uri.clone(),
                fleece_peak_bytes: None,
            },
        });
    }
    let setup_ms = ms(t0.elapsed());
    observer.event(&JobEvent::Phase {
        vmid: &opts.vmid,
        phase: Phase::Read,
    });
    let t_read = Instant::now();
    let base = jobs
        .iter()
        .find_map(|j| j.read.base.as_deref())
        .and_then(|b| b.parse::<repo::BackupId>().ok());
    let meta = repo::BackupMeta {
        zstd_level: opts.zstd_level,
        base,
        ..repo::BackupMeta::new(&opts.vmid, "")
    };
    let session = datapath::begin_session(&repo, &meta).await?;
    let dp = DataPathConfig::new(
        opts.workers,
        opts.connections,
        opts.bwlimit_kib,
        opts.priority,
    );
    let vm_config = serde_json::json!({
        "source": "nbd",
        "disks": jobs.iter().map(|j| serde_json::json!({
            "name": j.disk.name, "uri": j.disk.filename, "virtual-size": j.disk.virtual_size,
        })).collect::<Vec<_>>(),
    });
    let (session, disks) =
        datapath::read_all_blocking(session, jobs, dp, cancel.clone(), observer.clone()).await?;
    let read_ms = ms(t_read.elapsed());
    observer.event(&JobEvent::Phase {
        vmid: &opts.vmid,
        phase: Phase::Commit,
    });
    let incremental = disks.iter().any(|d| d.kind == repo::ReadKind::Incremental);
    let info = repo::CommitInfo {
        mode: if incremental {
            repo::BackupMode::Incremental
        } else {
            repo::BackupMode::Full
        },
        consistency: Consistency::Crash,
        vm_mode: Mode::Nbd.as_str().into(),
        vm_config,
        notes: opts.notes.clone(),
        freeze_window_ms: None,
    };
    let id = session
        .commit(&info)
        .map_err(JobError::repo("committing the manifest"))?;
    Ok(BackupReport {
        backup_id: id.to_string(),
        vmid: opts.vmid,
        mode: Mode::Nbd,
        consistency: Consistency::Crash,
        freeze_window_ms: None,
        disks,
        setup_ms,
        read_ms,
        total_ms: ms(t0.elapsed()),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_and_tcp_uris_parse_and_lose_their_secrets() {
        let d = parse_disk_arg("d0=nbd+unix:///exp%20a?socket=/run/x.sock").unwrap();
        assert_eq!(d.name, "d0");
        assert_eq!(
            d.source.endpoint,
            nbd_export::Endpoint::Unix("/run/x.sock".into())
        );
        assert_eq!(d.source.export_name, "exp a");
        let (s, clean) = parse_uri("nbd://user:secret@host/e?foo=bar").unwrap();
        assert_eq!(s.endpoint, nbd_export::Endpoint::Tcp("host:10809".into()));
        assert_eq!(clean, "nbd://host:10809/e");
        assert!(!clean.contains("secret"));
        let (s, _) = parse_uri("nbd://[::1]:1234/").unwrap();
        assert_eq!(s.endpoint, nbd_export::Endpoint::Tcp("[::1]:1234".into()));
        assert_eq!(s.export_name, "");
        assert!(parse_uri("nbds://h/e").unwrap_err().contains("TLS"));
        assert!(parse_uri("nbd+unix:///e").unwrap_err().contains("socket"));
        assert!(parse_uri("http://h/e").unwrap_err().contains("scheme"));
        assert!(!parse_uri("nbd://u:pw@h/e?tls-creds=x")
            .unwrap_err()
            .contains("pw"));
        parse_disk_arg("nouri").unwrap_err();
        parse_disk_arg("a/b=nbd://h/e").unwrap_err();
    }
}
