//! Data disks for test VMs, made on the host without root (no loop mounts):
//! `mkfs.ext4 -d` populates a filesystem from a staging directory;
//! `debugfs` and `e2fsck -fn` inspect images offline.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{herr, Result};

/// Image format of a data disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 (the usual format of a managed VM disk).
    Qcow2,
    /// Raw file.
    Raw,
}

impl DiskFormat {
    /// QEMU driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Bus the disk is attached to in the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// `virtio-blk-pci` (guest sees /dev/vdX).
    VirtioBlk,
    /// `scsi-hd` on a `virtio-scsi-pci` controller (guest sees /dev/sdX).
    ScsiHd,
    /// `ide-hd` on q35's AHCI controller (`bus=ide.N`: a SATA disk).
    IdeHd,
    /// `ide-cd` on q35's AHCI controller with the image as its medium (a
    /// CD-ROM with an ISO; always a legacy `-drive …,media=cdrom`).
    IdeCd,
}

/// One data disk of a [`crate::VmConfig`].
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Device id (also names the nodes: `file-<id>`, `drv-<id>`; a legacy
    /// disk's BlockBackend is `drive-<id>`).
    pub id: String,
    /// Image format.
    pub format: DiskFormat,
    /// Bus.
    pub bus: DiskBus,
    /// Virtual size in bytes.
    pub size: u64,
    /// Format it as ext4 on the host before the VM starts.
    pub ext4: bool,
    /// Files to put in the ext4 filesystem (path inside the fs, content).
    pub files: Vec<(String, Vec<u8>)>,
    /// Use this existing image instead of creating one.
    pub image: Option<PathBuf>,
    /// Attach the legacy way, as Proxmox VE 8 and libvirt do:
    /// `-drive file=…,if=none,id=drive-<id>,format=…` and the device with
    /// `drive=drive-<id>`. QEMU names the node itself (`#blockNNN`):
    /// [`crate::TestVm::disk_node`] asks QEMU for it.
    pub legacy: bool,
    /// Run the device (virtio-blk) or its controller (virtio-scsi) in the
    /// iothread `io0`.
    pub iothread: bool,
    /// Attach the image read-only (`readonly=on` / `"read-only": true`).
    pub read_only: bool,
}

impl DiskSpec {
    fn new(id: &str, format: DiskFormat, size: u64) -> Self {
        DiskSpec {
            id: id.to_string(),
            format,
            bus: DiskBus::VirtioBlk,
            size,
            ext4: false,
            files: Vec::new(),
            image: None,
            legacy: false,
            iothread: false,
            read_only: false,
        }
    }
    /// A CD-ROM (`ide-cd`, legacy `-drive …,media=cdrom`) whose medium is
    /// `image` (a raw ISO-like file).
    pub fn cdrom(id: &str, image: &Path) -> Self {
        let mut d = Self::new(id, DiskFormat::Raw, 0);
        d.bus = DiskBus::IdeCd;
        d.legacy = true;
        d.image = Some(image.to_path_buf());
        d
    }
    /// Attach as `ide-hd` on the AHCI controller (SATA).
    pub fn ide(mut self) -> Self {
        self.bus = DiskBus::IdeHd;
        self
    }
    /// Attach with a legacy `-drive … if=none,id=drive-<id>` (see [`DiskSpec::legacy`]).
    pub fn legacy(mut self) -> Self {
        self.legacy = true;
        self
    }
    /// Attach the image read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
    /// Run the device (or its SCSI controller) in iothread `io0`.
    pub fn iothread(mut self) -> Self {
        self.iothread = true;
        self
    }
    /// A qcow2 disk of `size` bytes on virtio-blk.
    pub fn qcow2(id: &str, size: u64) -> Self {
        Self::new(id, DiskFormat::Qcow2, size)
    }
    /// A raw disk of `size` bytes on virtio-blk.
    pub fn raw(id: &str, size: u64) -> Self {
        Self::new(id, DiskFormat::Raw, size)
    }
    /// Attach as `scsi-hd` on virtio-scsi instead of virtio-blk.
    pub fn scsi(mut self) -> Self {
        self.bus = DiskBus::ScsiHd;
        self
    }
    /// Format as ext4 (the guest mounts it read-write at /mnt/<dev>).
    pub fn ext4(mut self) -> Self {
        self.ext4 = true;
        self
    }
    /// Put a file in the ext4 filesystem (implies `ext4()`).
    pub fn file(mut self, path: &str, content: &[u8]) -> Self {
        self.ext4 = true;
        self.files.push((path.to_string(), content.to_vec()));
        self
    }
    /// Use this image file (its format must match); made there with the
    /// spec's contents if it does not exist yet.
    pub fn image(mut self, path: &Path) -> Self {
        self.image = Some(path.to_path_buf());
        self
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| herr!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(herr!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool(name: &str) -> PathBuf {
    crate::prereq::find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// Make a raw ext4 image of `size` bytes at `path` holding `files`.
pub fn make_ext4_image(path: &Path, size: u64, files: &[(String, Vec<u8>)]) -> Result<()> {
    let staging = tempfile::tempdir()?;
    for (name, content) in files {
        let rel = name.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            return Err(herr!("bad file name {name}"));
        }
        let p = staging.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
    }
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    drop(f);
    run(Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(staging.path())
        .arg(path))?;
    Ok(())
}

/// Create the image for `spec` at `path`.
pub(crate) fn create_disk(spec: &DiskSpec, path: &Path) -> Result<()> {
    match (spec.format, spec.ext4) {
        (DiskFormat::Raw, false) => {
            let f = std::fs::File::create(path)?;
            f.set_len(spec.size)?;
        }
        (DiskFormat::Raw, true) => make_ext4_image(path, spec.size, &spec.files)?,
        (DiskFormat::Qcow2, false) => {
            run(Command::new(tool("qemu-img"))
                .args(["create", "-q", "-f", "qcow2"])
                .arg(path)
                .arg(spec.size.to_string()))?;
        }
        (DiskFormat::Qcow2, true) => {
            let raw = path.with_extension("ext4.raw");
            make_ext4_image(&raw, spec.size, &spec.files)?;
            run(Command::new(tool("qemu-img"))
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(path))?;
            std::fs::remove_file(&raw)?;
        }
    }
    Ok(())
}

/// Convert `image` (any format QEMU reads) to a raw file `out`.
pub fn to_raw(image: &Path, out: &Path) -> Result<()> {
    run(Command::new(tool("qemu-img"))
        .args(["convert", "-q", "-O", "raw"])
        .arg(image)
        .arg(out))?;
    Ok(())
}

/// A raw view of an image: the image itself, or a raw copy of a qcow2
/// (removed on drop).
enum RawView {
    Same(PathBuf),
    Copy(tempfile::NamedTempFile),
}

impl RawView {
    fn of(image: &Path) -> Result<RawView> {
        if is_qcow2(image)? {
            let tmp = tempfile::NamedTempFile::new()?;
            to_raw(image, tmp.path())?;
            Ok(RawView::Copy(tmp))
        } else {
            Ok(RawView::Same(image.to_path_buf()))
        }
    }
    fn path(&self) -> &Path {
        match self {
            RawView::Same(p) => p,
            RawView::Copy(t) => t.path(),
        }
    }
}

/// Read a file out of an ext4 image (raw or qcow2) without mounting it.
pub fn debugfs_cat(image: &Path, path_in_fs: &str) -> Result<Vec<u8>> {
    let raw = RawView::of(image)?;
    let raw = raw.path();
    let out = Command::new(tool("debugfs"))
        .args(["-R", &format!("cat {path_in_fs}")])
        .arg(raw)
        .output()?;
    if !out.status.success() {
        return Err(herr!(
            "debugfs cat {path_in_fs} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File not found") {
        return Err(herr!("{path_in_fs} not found in {}", image.display()));
    }
    Ok(out.stdout)
}

/// `e2fsck -fn` on an image (raw or qcow2): Ok when the filesystem is clean.
pub fn e2fsck_clean(image: &Path) -> Result<()> {
    let raw = RawView::of(image)?;
    let raw = raw.path();
    let out = Command::new(tool("e2fsck")).arg("-fn").arg(raw).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(herr!(
            "e2fsck -fn {} exited {}: {}{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn is_qcow2(image: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(image)?;
    Ok(f.read(&mut magic)? == 4 && &magic == b"QFI\xfb")
}
