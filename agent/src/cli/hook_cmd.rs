//! `shear hook libvirt DOMAIN OPERATION SUBOP` and `shear hook pve VMID
//! PHASE`: lifecycle hooks (see docs/hooks.md).
//!
//! A hook never blocks the hypervisor for long: the start check reads the
//! repository's listing only; a backup is handed to a detached background
//! process (its own process group, stdio on a log file in the run
//! directory) and the hook returns at once. That process exports each disk
//! image read-only with `qemu-nbd -r` and stores it through the `--nbd`
//! path (`job::nbd_source`).

use crate::units::parse_duration;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;

use super::backup_cmd::{err, out};
use super::Cli;
use crate::config::Config;
use crate::job::backup::Cancel;
use crate::job::nbd_source::{run_nbd_backup, NbdBackupOptions, NbdDisk};

/// `shear hook …`
#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// libvirt's /etc/libvirt/hooks/qemu: DOMAIN OPERATION SUBOP [EXTRA];
    /// the domain XML on stdin.
    Libvirt {
        /// Domain name (the VM id in the repository).
        domain: String,
        /// Operation (prepare, start, started, stopped, release, …).
        operation: String,
        /// Sub-operation (begin, end, -).
        subop: String,
        /// What libvirt passes after (ignored).
        extra: Vec<String>,
    },
    /// A Proxmox VE hookscript: VMID PHASE.
    Pve {
        /// VM id.
        vmid: String,
        /// pre-start, post-start, pre-stop, post-stop.
        phase: String,
    },
    /// Internal: the detached offline backup a hook starts.
    #[command(name = "__offline-backup", hide = true)]
    OfflineBackup {
        /// VM id.
        vmid: String,
        /// NAME=FORMAT:PATH (FORMAT `auto`: qemu-nbd probes; PATH may be a
        /// PVE volume id, resolved with `pvesm path`).
        #[arg(long = "disk")]
        disks: Vec<String>,
    },
}

/// Longest domain XML read from stdin.
const MAX_XML: u64 = 4 << 20;
/// How long the background process waits for each qemu-nbd socket.
const QEMU_NBD_WAIT: Duration = Duration::from_secs(30);

/// Run `shear hook …`.
pub fn run(cli: &Cli, cmd: &HookCommand) -> anyhow::Result<ExitCode> {
    let cfg = Config::load()?;
    match cmd {
        HookCommand::Libvirt {
            domain, operation, ..
        } => {
            let op = operation.as_str();
            if op == "prepare" {
                return check_start(cli, &cfg, domain);
            }
            if cfg.hooks.backup_on.iter().any(|b| b == op) {
                let mut xml = String::new();
                std::io::stdin()
                    .take(MAX_XML)
                    .read_to_string(&mut xml)
                    .context("reading the domain XML from stdin")?;
                let disks = libvirt_disks(&xml);
                return start_background(cli, &cfg, domain, &disks);
            }
            Ok(ExitCode::SUCCESS)
        }
        HookCommand::Pve { vmid, phase } => {
            if phase == "pre-start" {
                return check_start(cli, &cfg, vmid);
            }
            if cfg.hooks.backup_on.iter().any(|b| b == phase) {
                let dir = cfg
                    .hooks
                    .pve_config_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/etc/pve/qemu-server"));
                let path = dir.join(format!("{vmid}.conf"));
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                return start_background(cli, &cfg, vmid, &pve_disks(&text));
            }
            Ok(ExitCode::SUCCESS)
        }
        HookCommand::OfflineBackup { vmid, disks } => offline_backup(cli, &cfg, vmid, disks),
    }
}

/// pre-start / prepare: refuse when the newest good backup is too old.
fn check_start(cli: &Cli, cfg: &Config, vmid: &str) -> anyhow::Result<ExitCode> {
    let Some(max) = &cfg.hooks.refuse_start_if_backup_older_than else {
        return Ok(ExitCode::SUCCESS);
    };
    let max = parse_duration(max).map_err(anyhow::Error::msg)?;
    let repo = super::repo_cmds::open(cli)?;
    let id = crate::repo::VmId::new(vmid)?;
    let newest = repo
        .list_backups(Some(&id))?
        .into_iter()
        .filter(|b| b.verify.as_ref().is_none_or(|v| v.state == "ok"))
        .map(|b| b.id)
        .max_by_key(crate::repo::BackupId::time);
    let now = time::OffsetDateTime::now_utc();
    match newest {
        None => {
            err(format_args!(
                "shear: refusing to start VM {vmid}: it has no good backup in {} (policy: \
                 refuse_start_if_backup_older_than = {})",
                cli.repo.display(),
                humantime(max)
            ));
            Ok(ExitCode::FAILURE)
        }
        Some(b) if (now - b.time()) > max => {
            err(format_args!(
                "shear: refusing to start VM {vmid}: its newest good backup is from {} (older \
                 than {}, the refuse_start_if_backup_older_than policy)",
                b.time_str(),
                humantime(max)
            ));
            Ok(ExitCode::FAILURE)
        }
        Some(_) => Ok(ExitCode::SUCCESS),
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// A disk of a stopped VM: name, format (`auto` = probe), image path or
/// PVE volume id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineDisk {
    /// Disk name (target dev, PVE key).
    pub name: String,
    /// Image format.
    pub format: String,
    /// Path or volume id.
    pub path: String,
}

fn attr(tag: &str, name: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let pat = format!("{name}={q}");
        if let Some(i) = tag.find(&pat) {
            let rest = &tag[i + pat.len()..];
            let end = rest.find(q)?;
            return Some(
                rest[..end]
                    .replace("&apos;", "'")
                    .replace("&quot;", "\"")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&"),
            );
        }
    }
    None
}

fn tag<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    let i = block.find(&format!("<{name} "))?;
    let rest = &block[i..];
    Some(&rest[..rest.find('>')?])
}

/// The file/block disks of a libvirt domain XML (CD-ROMs and network
/// disks left out).
pub fn libvirt_disks(xml: &str) -> Vec<OfflineDisk> {
    let mut v = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        let block = &rest[i..];
        let end = block.find("</disk>").unwrap_or(block.len());
        let (d, after) = block.split_at(end);
        rest = after;
        let head = &d[..d.find('>').unwrap_or(d.len())];
        if attr(head, "device").as_deref().is_some_and(|x| x != "disk") {
            continue;
        }
        let Some(src) = tag(d, "source") else {
            continue;
        };
        let Some(path) = attr(src, "file").or_else(|| attr(src, "dev")) else {
            continue;
        };
        let Some(name) = tag(d, "target").and_then(|t| attr(t, "dev")) else {
            continue;
        };
        let format = tag(d, "driver")
            .and_then(|t| attr(t, "type"))
            .unwrap_or_else(|| "auto".into());
        v.push(OfflineDisk { name, format, path });
    }
    v
}

/// The disks of a PVE VM config (the current config, before any
/// `[snapshot]` section; CD-ROMs and `none` left out).
pub fn pve_disks(conf: &str) -> Vec<OfflineDisk> {
    let mut v = Vec::new();
    for line in conf.lines() {
        if line.starts_with('[') {
            break;
        }
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
        if bus == key
            || !matches!(
                bus,
                "scsi" | "virtio" | "sata" | "ide" | "efidisk" | "tpmstate"
            )
        {
            continue;
        }
        let val = val.trim();
        if val.split(',').any(|o| o == "media=cdrom") {
            continue;
        }
        let vol = val.split(',').next().unwrap_or_default();
        if vol.is_empty() || vol == "none" {
            continue;
        }
        let format = val
            .split(',')
            .find_map(|o| o.strip_prefix("format="))
            .map(str::to_string)
            .unwrap_or_else(|| {
                if vol.ends_with(".qcow2") {
                    "qcow2".into()
                } else if vol.ends_with(".raw") || vol.starts_with('/') {
                    "raw".into()
                } else {
                    "auto".into()
                }
            });
        v.push(OfflineDisk {
            name: key.to_string(),
            format,
            path: vol.to_string(),
        });
    }
    v
}

/// Hand the backup to a detached process and return at once.
fn start_background(
    cli: &Cli,
    cfg: &Config,
    vmid: &str,
    disks: &[OfflineDisk],
) -> anyhow::Result<ExitCode> {
    crate::repo::VmId::new(vmid)?;
    if disks.is_empty() {
        err(format_args!("shear: VM {vmid} has no disk to back up"));
        return Ok(ExitCode::SUCCESS);
    }
    let run_dir = std::env::var_os("SHEAR_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cfg.run_dir.clone());
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let log_path = run_dir.join(format!("hook-{vmid}.log"));
    let mut c = super::detached_shear(
        &cli.repo,
        cli.keyfile.as_deref(),
        cli.passphrase_file.as_deref(),
        &log_path,
    )?;
    c.args(["hook", "__offline-backup", vmid]);
    for d in disks {
        c.arg("--disk")
            .arg(format!("{}={}:{}", d.name, d.format, d.path));
    }
    c.env("SHEAR_RUN_DIR", &run_dir);
    let child = c.spawn().context("starting the background backup")?;
    out(format_args!(
        "shear: backup of VM {vmid} started in the background (pid {}, log {})",
        child.id(),
        log_path.display()
    ));
    Ok(ExitCode::SUCCESS)
}

/// Our socket directory; removed on drop.
struct SockDir(PathBuf);
impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-nbd we started; killed on drop.
struct QemuNbd(std::process::Child);
impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn resolve_volume(vol: &str) -> anyhow::Result<PathBuf> {
    if vol.starts_with('/') {
        return Ok(PathBuf::from(vol));
    }
    let out = Proc::new("pvesm")
        .args(["path", vol])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running pvesm path {vol}"))?;
    if !out.status.success() {
        bail!(
            "pvesm path {vol}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The background process: qemu-nbd -r per image, then the `--nbd` path.
fn offline_backup(
    cli: &Cli,
    cfg: &Config,
    vmid: &str,
    disks: &[String],
) -> anyhow::Result<ExitCode> {
    let run_dir = std::env::var_os("SHEAR_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cfg.run_dir.clone());
    err(format_args!("shear: offline backup of VM {vmid} starting"));
    let dir = SockDir(run_dir.join(format!("offline-{vmid}-{}", std::process::id())));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir.0)
            .context("creating the socket directory")?;
    }
    let mut servers = Vec::new();
    let mut nbd = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let (name, rest) = d
            .split_once('=')
            .with_context(|| format!("bad --disk {d:?}"))?;
        let (format, vol) = rest
            .split_once(':')
            .with_context(|| format!("bad --disk {d:?}"))?;
        let path = resolve_volume(vol)?;
        let sock = dir.0.join(format!("{i}.sock"));
        let mut c = Proc::new("qemu-nbd");
        c.args(["-r", "-t", "-e", "16", "-x", "disk", "--socket"])
            .arg(&sock);
        if format != "auto" {
            c.args(["-f", format]);
        }
        c.arg(&path).stdin(Stdio::null());
        servers.push(QemuNbd(c.spawn().with_context(|| {
            format!("starting qemu-nbd for {}", path.display())
        })?));
        wait_for(&sock, servers.last_mut())?;
        let uri = format!("nbd+unix:///disk?socket={}", sock.display());
        let (source, _) = crate::job::nbd_source::parse_uri(&uri).map_err(anyhow::Error::msg)?;
        nbd.push(NbdDisk {
            name: name.to_string(),
            source,
            uri: format!("file:{}", path.display()),
        });
    }
    let repo = Arc::new(super::repo_cmds::open(cli)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let opts = NbdBackupOptions {
        vmid: vmid.to_string(),
        disks: nbd,
        bitmaps: Vec::new(),
        run_dir,
        zstd_level: None,
        workers: 2,
        connections: nbd_export::tuning::DEFAULT_CONNECTIONS,
        bwlimit_kib: 0,
        priority: crate::job::priority::DataPriority::default(),
        notes: format!("offline backup by shear hook of VM {vmid}"),
        full: false,
    };
    let observer = Arc::new(super::progress::CliObserver::new(false));
    let r = rt.block_on(run_nbd_backup(repo, opts, Cancel::default(), observer));
    drop(servers);
    match r {
        Ok(r) => {
            err(format_args!(
                "shear: backup {} of VM {vmid} committed",
                r.backup_id
            ));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            err(format_args!(
                "shear: offline backup of VM {vmid} FAILED: {}",
                crate::chain(&e)
            ));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn wait_for(sock: &Path, server: Option<&mut QemuNbd>) -> anyhow::Result<()> {
    let deadline = Instant::now() + QEMU_NBD_WAIT;
    let Some(server) = server else {
        bail!("no qemu-nbd");
    };
    while !sock.exists() {
        if let Some(st) = server.0.try_wait()? {
            bail!("qemu-nbd exited ({st}) before serving {}", sock.display());
        }
        if Instant::now() > deadline {
            bail!(
                "qemu-nbd did not serve {} within {QEMU_NBD_WAIT:?}",
                sock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_xml_and_pve_config_give_the_disks() {
        let xml = r#"<domain><devices>
          <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
            <source file='/var/lib/libvirt/images/a&amp;b.qcow2'/><target dev='vda' bus='virtio'/></disk>
          <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
          <disk type="block" device="disk"><source dev="/dev/vg/lv"/><target dev="vdb"/></disk>
        </devices></domain>"#;
        let d = libvirt_disks(xml);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].path, "/var/lib/libvirt/images/a&b.qcow2");
        assert_eq!((d[0].name.as_str(), d[0].format.as_str()), ("vda", "qcow2"));
        assert_eq!((d[1].name.as_str(), d[1].format.as_str()), ("vdb", "auto"));
        let conf = "boot: order=scsi0\nscsi0: local-lvm:vm-100-disk-0,size=32G\n\
                    ide2: none,media=cdrom\nvirtio1: /img/b.qcow2,size=1G\n\
                    [snap1]\nscsi5: local:old,size=1G\n";
        let d = pve_disks(conf);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].path, "local-lvm:vm-100-disk-0");
        assert_eq!(d[1].format, "qcow2");
        assert_eq!(
            parse_duration("48h").unwrap(),
            Duration::from_secs(48 * 3600)
        );
        parse_duration("48").unwrap_err();
    }
}
