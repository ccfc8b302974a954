//! Prerequisite checks. A missing prerequisite is a failure (a suite that
//! silently skips every VM test proves nothing), unless the user asked for
//! skips explicitly with `SHEAR_ALLOW_SKIP=1` (never under `CI=true`). Each
//! allowed skip is printed and, when `SHEAR_SKIP_LOG` names a file, appended
//! to it so `scripts/test` can summarise what did not run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// True when running under CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether the user asked for skips (`SHEAR_ALLOW_SKIP=1`, not under CI).
pub fn skips_allowed() -> bool {
    !in_ci() && std::env::var("SHEAR_ALLOW_SKIP").is_ok_and(|v| v == "1")
}

/// A prerequisite (`what`) is missing: panics unless skips were asked for;
/// then records the skip and returns `false` (the test returns early).
pub fn skip(what: &str) -> bool {
    let msg = format!("prerequisite missing: {what} (run scripts/setup)");
    assert!(
        skips_allowed(),
        "{msg}; a missing prerequisite is a failure (set SHEAR_ALLOW_SKIP=1 to skip instead)"
    );
    let test = std::thread::current()
        .name()
        .unwrap_or("unknown test")
        .to_string();
    eprintln!("SKIP: {test}: {msg}");
    if let Some(log) = std::env::var_os("SHEAR_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {what}");
        }
    }
    false
}

fn missing(what: &str) -> bool {
    skip(what)
}

/// Whether `tool` is on PATH (also looks in /usr/sbin and /sbin).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Require an external tool: `false` (skip) only when skips are allowed.
pub fn require_tool(tool: &str) -> bool {
    find_tool(tool).is_some() || missing(tool)
}

/// Require `qemu-system-x86_64` (≥ 7.1) and `qemu-img`.
pub fn require_qemu() -> bool {
    let Some(q) = find_tool("qemu-system-x86_64") else {
        return missing("qemu-system-x86_64");
    };
    if !require_tool("qemu-img") {
        return false;
    }
    match qemu_version(&q) {
        Some((maj, min)) if (maj, min) >= (7, 1) => true,
        Some((maj, min)) => missing(&format!("QEMU >= 7.1 (found {maj}.{min})")),
        None => missing("a working qemu-system-x86_64 --version"),
    }
}

fn qemu_version(q: &Path) -> Option<(u32, u32)> {
    let out = Command::new(q).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ver = text.split("version ").nth(1)?;
    let mut it = ver.split(|c: char| !c.is_ascii_digit());
    let maj = it.next()?.parse().ok()?;
    let min = it.next()?.parse().ok()?;
    Some((maj, min))
}

/// The tiny test guest: kernel and initramfs built by `vm-images/build-guest`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs (busybox + qemu-ga + virtio modules).
    pub initrd: PathBuf,
}

/// Where the guest build lives: `$SHEAR_BUILD_DIR/guest/current`.
pub fn guest_image() -> Option<GuestImage> {
    let build = std::env::var_os("SHEAR_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build"));
    let cur = build.join("guest").join("current");
    let img = GuestImage {
        kernel: cur.join("vmlinuz"),
        initrd: cur.join("initrd.gz"),
    };
    (img.kernel.is_file() && img.initrd.is_file()).then_some(img)
}

/// Require QEMU and the guest image (for `vm_*` tests).
pub fn require_guest() -> bool {
    if !require_qemu() {
        return false;
    }
    if guest_image().is_none() {
        return missing("the test guest image (vm-images/build-guest)");
    }
    true
}
