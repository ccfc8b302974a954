//! [`LibvirtVm`]: the tiny guest as a real libvirt domain (`<domain
//! type='qemu'>`, TCG) on the host's `qemu:///system` daemon, with its
//! qemu-ga channel; the harness talks to it through `virsh` only
//! (`qemu-agent-command`).
//!
//! The daemon: there is no systemd on the project machines, so
//! [`ensure_daemon`] starts `virtlogd` and `libvirtd` by hand when
//! `qemu:///system` does not answer (one shared daemon: its paths are fixed
//! for root). Domains have unique names and are destroyed and undefined
//! (with their checkpoint metadata) on drop.
//!
//! QEMU runs as root (`<seclabel model='dac'>` `+0:+0`, no relabelling): the
//! test's images and the guest build stay as they are.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::disk::{create_disk, DiskSpec};
use crate::prereq::{find_tool, guest_image, skip};
use crate::wire::base64_decode;
use crate::{herr, wait_until, Result};

/// The connection every libvirt test uses.
pub const URI: &str = "qemu:///system";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Run `virsh -c URI -q ARGS` with a deadline: stdout, or the error.
pub fn virsh(args: &[&str]) -> Result<String> {
    let mut child = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .arg("-q")
        .args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| herr!("cannot run virsh: {e}"))?;
    let t0 = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if t0.elapsed() > CMD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(herr!("virsh {args:?} did not finish in {CMD_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(herr!(
            "virsh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Require virsh, libvirtd and virtlogd (`scripts/setup` installs them).
pub fn require_libvirt() -> bool {
    for t in ["virsh", "libvirtd", "virtlogd"] {
        if find_tool(t).is_none() {
            return skip(&format!("{t} (libvirt)"));
        }
    }
    true
}

/// Make sure `qemu:///system` answers: start `virtlogd` and `libvirtd`
/// (daemonised, they outlive the test) when it does not.
pub fn ensure_daemon() -> Result<()> {
    if virsh(&["uri"]).is_ok() {
        return Ok(());
    }
    for d in ["virtlogd", "libvirtd"] {
        let running = Command::new("pgrep")
            .args(["-x", d])
            .output()
            .is_ok_and(|o| o.status.success());
        if !running {
            // A racing starter's daemon wins (its pidfile lock): then this
            // one exits non-zero and the wait below still succeeds.
            let tool = find_tool(d).ok_or_else(|| herr!("{d} not found"))?;
            let _ = Command::new(tool).arg("-d").status()?;
        }
    }
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "libvirtd to answer",
        || virsh(&["uri"]).ok(),
    )?;
    Ok(())
}

/// A libvirt domain of the tiny guest. Destroyed and undefined on drop.
#[derive(Debug)]
pub struct LibvirtVm {
    /// Domain name.
    pub name: String,
    dir: tempfile::TempDir,
    /// `(target, image path)` per disk.
    pub disks: Vec<(String, PathBuf)>,
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl LibvirtVm {
    /// Define the domain (disks `vda`, `vdb`, … from `specs`, qcow2 or raw
    /// as each says; a spec's existing `image` is used in place) and start
    /// it; waits until qemu-ga answers.
    pub fn start(prefix: &str, specs: &[DiskSpec]) -> Result<LibvirtVm> {
        ensure_daemon()?;
        let img = guest_image().ok_or_else(|| herr!("no guest image"))?;
        let base = crate::shear::disk_tmp();
        let dir = tempfile::Builder::new()
            .prefix("shear-lv-")
            .tempdir_in(&base)?;
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("x")
                .trim_start_matches("shear-lv-")
        )
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "");
        let mut disks = Vec::new();
        let mut disk_xml = String::new();
        for (i, spec) in specs.iter().enumerate() {
            let target = format!("vd{}", (b'a' + u8::try_from(i).unwrap_or(0)) as char);
            // An existing image (`DiskSpec::image`) is used where it is.
            let path = match &spec.image {
                Some(p) => p.clone(),
                None => {
                    let p = dir
                        .path()
                        .join(format!("{target}.{}", spec.format.driver()));
                    create_disk(spec, &p)?;
                    p
                }
            };
            disk_xml.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
                 <source file='{}'/><target dev='{target}' bus='virtio'/></disk>\n",
                spec.format.driver(),
                xml_escape(&path.display().to_string())
            ));
            disks.push((target, path));
        }
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{qemu}</emulator>
{disk_xml}    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
",
            kernel = xml_escape(&img.kernel.display().to_string()),
            initrd = xml_escape(&img.initrd.display().to_string()),
            qemu = find_tool("qemu-system-x86_64")
                .ok_or_else(|| herr!("no qemu-system-x86_64"))?
                .display(),
            console = xml_escape(&dir.path().join("console.log").display().to_string()),
        );
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml)?;
        if let Err(e) = virsh(&["define", "--file", &file.display().to_string()]) {
            // A define that timed out may still complete in the daemon.
            let _ = virsh(&["undefine", "--", &name]);
            return Err(e);
        }
        let vm = LibvirtVm { name, dir, disks };
        vm.boot()?;
        Ok(vm)
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start the (shut off) domain and wait for qemu-ga.
    pub fn boot(&self) -> Result<()> {
        virsh(&["start", "--", &self.name])?;
        self.wait_agent()
    }

    /// Wait until qemu-ga answers (the guest runs).
    pub fn wait_agent(&self) -> Result<()> {
        wait_until(
            BOOT_TIMEOUT,
            Duration::from_millis(500),
            "qemu-ga in the libvirt guest",
            || self.agent("guest-ping", &json!({})).ok(),
        )
        .map_err(|e| {
            let console =
                std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
            herr!("{e}; console:\n{console}")
        })?;
        Ok(())
    }

    /// A qemu-ga command through libvirt.
    pub fn agent(&self, cmd: &str, args: &Value) -> Result<Value> {
        let req = json!({"execute": cmd, "arguments": args}).to_string();
        let out = virsh(&[
            "qemu-agent-command",
            "--timeout",
            "10",
            "--",
            &self.name,
            &req,
        ])?;
        let v: Value =
            serde_json::from_str(out.trim()).map_err(|e| herr!("qemu-ga reply {out:?}: {e}"))?;
        Ok(v["return"].clone())
    }

    /// Run a shell script in the guest; its stdout, or an error unless it
    /// exits 0.
    pub fn guest_sh(&self, script: &str) -> Result<String> {
        let r = self.agent(
            "guest-exec",
            &json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}),
        )?;
        let pid = r["pid"].as_i64().ok_or_else(|| herr!("no pid in {r}"))?;
        let st = wait_until(
            CMD_TIMEOUT,
            Duration::from_millis(100),
            "guest-exec to finish",
            || {
                self.agent("guest-exec-status", &json!({"pid": pid}))
                    .ok()
                    .filter(|s| s["exited"] == true)
            },
        )?;
        let out = st["out-data"]
            .as_str()
            .map(base64_decode)
            .transpose()?
            .unwrap_or_default();
        if st["exitcode"].as_i64() != Some(0) {
            return Err(herr!("guest script failed: {script}: {st}"));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// `virsh domstate`.
    pub fn state(&self) -> String {
        virsh(&["domstate", "--", &self.name])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    /// Orderly power-off from inside (data disks flushed and unmounted);
    /// waits until the domain is shut off.
    pub fn poweroff(&self) -> Result<()> {
        let _ = self.agent("guest-exec", &json!({"path": "/sbin/shear-poweroff"}));
        wait_until(
            Duration::from_secs(60),
            Duration::from_millis(200),
            "the domain to shut off",
            || (self.state() == "shut off").then_some(()),
        )
    }

    /// SIGKILL the domain's QEMU (a crash); waits until libvirt sees it.
    pub fn kill_qemu(&self) -> Result<()> {
        let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name))?;
        let st = Command::new("kill").args(["-9", pid.trim()]).status()?;
        if !st.success() {
            return Err(herr!("kill -9 {pid} failed"));
        }
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "libvirt to see QEMU gone",
            || (self.state() == "shut off").then_some(()),
        )
    }

    /// The domain's checkpoint names.
    pub fn checkpoints(&self) -> Vec<String> {
        virsh(&["checkpoint-list", "--name", "--", &self.name])
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Whether libvirt reports a job on the domain.
    pub fn has_job(&self) -> bool {
        virsh(&["domjobinfo", "--", &self.name]).is_ok_and(|o| {
            o.lines()
                .find_map(|l| l.trim().strip_prefix("Job type:"))
                .is_some_and(|t| t.trim() != "None")
        })
    }

    /// While shear holds the guest (its filesystems frozen, the backup
    /// begun): copy each disk image as it is at that instant into a raw
    /// file (`qemu-img convert -U`: the freeze flushed the guest and QEMU,
    /// and nothing reaches the disk until the thaw). Returns the files.
    ///
    /// (backup_incremental's `blockdev-backup` oracle cannot be used:
    /// libvirt's own backup job holds the disk's node.)
    pub fn take_truth(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (target, path) in &self.disks {
            let truth = self.dir.path().join(format!("truth-{target}.raw"));
            let _ = std::fs::remove_file(&truth);
            let o = Command::new("qemu-img")
                .args(["convert", "-U", "-O", "raw"])
                .arg(path)
                .arg(&truth)
                .output()?;
            if !o.status.success() {
                return Err(herr!(
                    "qemu-img convert {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            out.push(truth);
        }
        Ok(out)
    }
}

impl Drop for LibvirtVm {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", "--", &self.name]);
        let _ = virsh(&["undefine", "--checkpoints-metadata", "--", &self.name]);
    }
}
