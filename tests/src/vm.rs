//! [`TestVm`]: one QEMU process with its sockets, disks and cleanup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::disk::{create_disk, DiskBus, DiskSpec};
use crate::prereq::{find_tool, guest_image};
use crate::wire::{base64_decode, qga_call, HarnessQmp};
use crate::{herr, wait_until, Result};

/// How long a booted guest may take until qemu-ga answers. TCG boots the
/// tiny guest in 3-6 s; a loaded 2-core machine can take much longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default deadline for one harness QMP command or QGA exchange.
const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// What to launch.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Boot the tiny Linux guest (else: `-S`, paused, no guest).
    pub boot_guest: bool,
    /// Add the qemu-guest-agent virtio-serial port (guest mode only).
    pub qga: bool,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Data disks, in order (the guest sees vda, vdb, … / sda, …).
    pub disks: Vec<DiskSpec>,
    /// Extra QEMU arguments.
    pub extra_args: Vec<String>,
}

impl VmConfig {
    /// QEMU paused (`-S`), no guest: for block-graph tests.
    pub fn paused() -> Self {
        VmConfig {
            boot_guest: false,
            qga: false,
            memory_mib: 64,
            disks: Vec::new(),
            extra_args: Vec::new(),
        }
    }
    /// Boot the tiny guest with qemu-ga.
    pub fn guest() -> Self {
        VmConfig {
            boot_guest: true,
            qga: true,
            memory_mib: 128,
            disks: Vec::new(),
            extra_args: Vec::new(),
        }
    }
    /// Add a data disk.
    pub fn disk(mut self, d: DiskSpec) -> Self {
        self.disks.push(d);
        self
    }
    /// Boot without the guest-agent port (for "no QGA" tests).
    pub fn without_qga(mut self) -> Self {
        self.qga = false;
        self
    }
    /// Add raw QEMU arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }
}

/// Result of a command run in the guest.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    /// Exit code (or signal, negated).
    pub exit: i64,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Stdout as text.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A running QEMU. Killed (by pid) and cleaned up on drop.
#[derive(Debug)]
pub struct TestVm {
    child: Option<Child>,
    dir: tempfile::TempDir,
    harness_qmp: HarnessQmp,
    disks: BTreeMap<String, (DiskSpec, PathBuf)>,
    /// Legacy disks: id → (qdev, node name) as `query-block` reported them
    /// at start (QEMU names their nodes).
    legacy: BTreeMap<String, (String, String)>,
    boot_time: Option<Duration>,
    booted: bool,
}

impl TestVm {
    /// Launch QEMU; in guest mode, wait until qemu-ga answers.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "call sites build the config inline"
    )]
    pub fn start(cfg: VmConfig) -> Result<TestVm> {
        Self::start_with(&cfg)
    }

    /// [`TestVm::start`] borrowing the config (to start several alike).
    pub fn start_with(cfg: &VmConfig) -> Result<TestVm> {
        let qemu = find_tool("qemu-system-x86_64").ok_or_else(|| herr!("no qemu-system-x86_64"))?;
        let base = std::env::var_os("SHEAR_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix("shear-vm-")
            .tempdir_in(&base)?;
        let d = dir.path();

        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "q35".into(),
            "-m".into(),
            cfg.memory_mib.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            format!("file:{}", d.join("console.log").display()),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                d.join("harness.qmp").display()
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d.join("qmp.sock").display()),
            "-pidfile".into(),
            d.join("qemu.pid").display().to_string(),
        ];
        if cfg.boot_guest {
            let img =
                guest_image().ok_or_else(|| herr!("no guest image: run vm-images/build-guest"))?;
            args.extend([
                "-kernel".into(),
                img.kernel.display().to_string(),
                "-initrd".into(),
                img.initrd.display().to_string(),
                "-append".into(),
                "console=ttyS0 panic=-1 quiet".into(),
                "-no-reboot".into(),
            ]);
            if cfg.qga {
                args.extend([
                    "-chardev".into(),
                    format!(
                        "socket,id=qga0,path={},server=on,wait=off",
                        d.join("qga.sock").display()
                    ),
                    "-device".into(),
                    "virtio-serial-pci,id=vser0".into(),
                    "-device".into(),
                    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
                ]);
            }
        } else {
            args.push("-S".into());
        }

        let mut disks = BTreeMap::new();
        if cfg.disks.iter().any(|s| s.iothread) {
            args.push("-object".into());
            args.push("iothread,id=io0".into());
        }
        let scsi_iothread = cfg
            .disks
            .iter()
            .any(|s| s.iothread && s.bus == DiskBus::ScsiHd);
        let mut have_scsi = false;
        let mut ide_port = 0u32;
        for spec in &cfg.disks {
            let path = match &spec.image {
                Some(p) if p.exists() => p.clone(),
                // A path of the test's choosing (outliving this VM, for
                // restarts): made there on first use.
                Some(p) => {
                    create_disk(spec, p)?;
                    p.clone()
                }
                None => {
                    let p = d.join(format!("{}.{}", spec.id, spec.format.driver()));
                    create_disk(spec, &p)?;
                    p
                }
            };
            // The device's `drive=`: the format node, or the BlockBackend of
            // a legacy `-drive`.
            let drive = if spec.legacy {
                let path = path.display().to_string();
                if path.contains(',') {
                    return Err(herr!("a legacy -drive path cannot hold a comma: {path}"));
                }
                let media = if spec.bus == DiskBus::IdeCd {
                    ",media=cdrom"
                } else if spec.read_only {
                    ",readonly=on"
                } else {
                    ""
                };
                args.push("-drive".into());
                args.push(format!(
                    "file={path},if=none,id=drive-{},format={}{media}",
                    spec.id,
                    spec.format.driver()
                ));
                format!("drive-{}", spec.id)
            } else {
                args.push("-blockdev".into());
                args.push(
                    json!({"driver": "file", "filename": path, "node-name": format!("file-{}", spec.id),
                           "read-only": spec.read_only})
                        .to_string(),
                );
                args.push("-blockdev".into());
                args.push(
                    json!({"driver": spec.format.driver(), "file": format!("file-{}", spec.id),
                           "node-name": format!("drv-{}", spec.id), "read-only": spec.read_only})
                    .to_string(),
                );
                format!("drv-{}", spec.id)
            };
            let id = &spec.id;
            match spec.bus {
                DiskBus::VirtioBlk => {
                    let io = if spec.iothread { ",iothread=io0" } else { "" };
                    args.push("-device".into());
                    args.push(format!("virtio-blk-pci,id={id},drive={drive}{io}"));
                }
                DiskBus::ScsiHd => {
                    if !have_scsi {
                        let io = if scsi_iothread { ",iothread=io0" } else { "" };
                        args.push("-device".into());
                        args.push(format!("virtio-scsi-pci,id=vscsi0{io}"));
                        have_scsi = true;
                    }
                    args.push("-device".into());
                    args.push(format!("scsi-hd,id={id},drive={drive},bus=vscsi0.0"));
                }
                DiskBus::IdeHd | DiskBus::IdeCd => {
                    // q35's AHCI controller has six ports, ide.0 … ide.5.
                    let dev = if spec.bus == DiskBus::IdeCd {
                        "ide-cd"
                    } else {
                        "ide-hd"
                    };
                    args.push("-device".into());
                    args.push(format!("{dev},id={id},drive={drive},bus=ide.{ide_port}"));
                    ide_port += 1;
                }
            }
            disks.insert(spec.id.clone(), (spec.clone(), path));
        }
        args.extend(cfg.extra_args.iter().cloned());

        // setpriv --pdeathsig: QEMU dies with the test process even if our
        // Drop never runs (a test runner's SIGKILL on timeout).
        // stdbuf -oL: HMP qemu-io prints its results (and its errors) with
        // printf on QEMU's stdout; line buffering makes them readable in
        // qemu.out as soon as the command returns.
        let mut wrapper: Vec<PathBuf> = Vec::new();
        if let Some(sp) = find_tool("setpriv") {
            wrapper.extend([sp, "--pdeathsig".into(), "KILL".into(), "--".into()]);
        }
        if let Some(sb) = find_tool("stdbuf") {
            wrapper.extend([sb, "-oL".into(), "-eL".into()]);
        }
        wrapper.push(qemu);
        let mut cmd = Command::new(&wrapper[0]);
        cmd.args(&wrapper[1..]);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(d.join("qemu.out"))?))
            .stderr(Stdio::from(std::fs::File::create(d.join("qemu.err"))?));
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| herr!("spawn qemu: {e}"))?;

        let mut vm_child = Some(child);
        let harness_path = d.join("harness.qmp");
        let connect = wait_until(
            Duration::from_secs(30),
            Duration::from_millis(20),
            "QMP socket",
            || {
                if let Some(c) = vm_child.as_mut() {
                    if let Ok(Some(_)) = c.try_wait() {
                        return Some(Err(herr!("QEMU exited at start")));
                    }
                }
                if !harness_path.exists() {
                    return None;
                }
                HarnessQmp::connect(&harness_path, CMD_TIMEOUT).ok().map(Ok)
            },
        );
        let harness_qmp = match connect.and_then(|r| r) {
            Ok(q) => q,
            Err(e) => {
                if let Some(mut c) = vm_child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let err = std::fs::read_to_string(d.join("qemu.err")).unwrap_or_default();
                return Err(herr!("QEMU did not start: {e}; stderr: {err}"));
            }
        };
        let mut vm = TestVm {
            child: vm_child,
            dir,
            harness_qmp,
            disks,
            legacy: BTreeMap::new(),
            boot_time: None,
            booted: cfg.boot_guest,
        };
        vm.learn_legacy_nodes()?;
        if cfg.boot_guest && cfg.qga {
            vm.wait_qga_ready(started)?;
        }
        Ok(vm)
    }

    fn wait_qga_ready(&mut self, started: Instant) -> Result<()> {
        let qga = self.qga_socket().to_path_buf();
        let res = wait_until(
            BOOT_TIMEOUT,
            Duration::from_millis(100),
            "qemu-ga to answer guest-ping",
            || {
                if let Some(c) = self.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Some(Err(herr!("QEMU exited during boot: {st}")));
                    }
                }
                qga_call(
                    &qga,
                    "guest-ping",
                    Value::Null,
                    Duration::from_secs(1),
                    true,
                )
                .ok()
                .map(|_| Ok(()))
            },
        );
        match res.and_then(|r| r) {
            Ok(()) => {
                let t = started.elapsed();
                self.boot_time = Some(t);
                eprintln!(
                    "[harness] QEMU start -> qemu-ga ready: {:.2} s",
                    t.as_secs_f64()
                );
                Ok(())
            }
            Err(e) => Err(herr!("{e}; console:\n{}", self.console_tail(30))),
        }
    }

    /// Time from QEMU start to qemu-ga ready (guest mode).
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }
    /// The VM's private directory (sockets, disks, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// QMP monitor reserved for the code under test.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }
    /// The qemu-ga chardev socket.
    pub fn qga_socket(&self) -> PathBuf {
        self.dir().join("qga.sock")
    }
    /// QEMU's pid (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }
    /// Image file of disk `id`.
    pub fn disk_path(&self, id: &str) -> PathBuf {
        self.disks
            .get(id)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| panic!("no disk {id}"))
    }
    /// Format (top) node name of disk `id`: `drv-<id>`, or for a legacy
    /// disk the node QEMU inserted at start (`#blockNNN`).
    pub fn disk_node(&self, id: &str) -> String {
        match self.legacy.get(id) {
            Some((_, node)) => node.clone(),
            None => format!("drv-{id}"),
        }
    }
    /// qdev path of disk `id` (what `query-block` reports as `qdev`).
    pub fn qdev(&self, id: &str) -> String {
        if let Some((qdev, _)) = self.legacy.get(id) {
            return qdev.clone();
        }
        match self.disks.get(id).map(|(s, _)| s.bus) {
            Some(DiskBus::VirtioBlk) | None => format!("/machine/peripheral/{id}/virtio-backend"),
            Some(_) => format!("/machine/peripheral/{id}"),
        }
    }
    /// Whether disk `id` is attached with a legacy `-drive`.
    pub fn is_legacy(&self, id: &str) -> bool {
        self.legacy.contains_key(id)
    }
    /// The node device `qdev` uses now (`query-block` `inserted.node-name`;
    /// `None` without a medium or without such a device).
    pub fn current_node(&mut self, qdev: &str) -> Result<Option<String>> {
        let blocks = self.harness_qmp("query-block", json!({}))?;
        Ok(blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["qdev"] == qdev)
            .and_then(|b| b["inserted"]["node-name"].as_str().map(str::to_string)))
    }

    /// Record the qdev and node name of every legacy disk.
    fn learn_legacy_nodes(&mut self) -> Result<()> {
        let ids: Vec<String> = self
            .disks
            .values()
            .filter(|(s, _)| s.legacy)
            .map(|(s, _)| s.id.clone())
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let blocks = self.harness_qmp("query-block", json!({}))?;
        for id in ids {
            let b = blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["device"] == format!("drive-{id}"))
                .ok_or_else(|| herr!("query-block has no drive-{id}: {blocks}"))?;
            let qdev = b["qdev"]
                .as_str()
                .ok_or_else(|| herr!("drive-{id} has no qdev: {b}"))?;
            let node = b["inserted"]["node-name"]
                .as_str()
                .ok_or_else(|| herr!("drive-{id} has no medium: {b}"))?;
            self.legacy.insert(id, (qdev.to_string(), node.to_string()));
        }
        Ok(())
    }
    /// Last `n` lines of the serial console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir().join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run a QMP command on the harness's own monitor.
    pub fn harness_qmp(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.harness_qmp.execute(cmd, args, CMD_TIMEOUT)
    }
    /// Wait for a QMP event on the harness monitor.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        self.harness_qmp.wait_event(name, timeout)
    }
    /// Run an HMP command; returns its output.
    pub fn hmp(&mut self, line: &str) -> Result<String> {
        let r = self.harness_qmp("human-monitor-command", json!({"command-line": line}))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }
    /// Write on disk `id` from the host side, as a guest write would:
    /// HMP `qemu-io -d <qdev> "<io>"`, e.g. `write -P 0xab 0 64k`.
    /// Fails when qemu-io reports an error.
    pub fn qemu_io(&mut self, id: &str, io: &str) -> Result<String> {
        let qdev = self.qdev(id);
        let out_path = self.dir().join("qemu.out");
        let before = std::fs::metadata(&out_path).map(|m| m.len()).unwrap_or(0);
        let reply = self.hmp(&format!("qemu-io -d {qdev} \"{io}\""))?;
        // qemu-io reports on QEMU's stdout, not in the HMP reply.
        let all = std::fs::read(&out_path)?;
        let start = usize::try_from(before).unwrap_or(usize::MAX).min(all.len());
        let out = format!("{reply}{}", String::from_utf8_lossy(&all[start..]));
        let lower = out.to_lowercase();
        if lower.contains("failed") || lower.contains("error") || lower.contains("invalid") {
            return Err(herr!("qemu-io {io} on {id}: {out}"));
        }
        Ok(out)
    }

    /// One qemu-ga command (connect, resync, command, close).
    pub fn qga(&self, cmd: &str, args: Value) -> Result<Value> {
        qga_call(&self.qga_socket(), cmd, args, CMD_TIMEOUT, true)
    }

    /// Run `argv` in the guest via guest-exec, wait for it, capture output.
    pub fn guest_exec(&self, argv: &[&str]) -> Result<ExecOutput> {
        let (path, rest) = argv.split_first().ok_or_else(|| herr!("empty argv"))?;
        let r = self.qga(
            "guest-exec",
            json!({"path": path, "arg": rest, "capture-output": true}),
        )?;
        let pid = r["pid"]
            .as_i64()
            .ok_or_else(|| herr!("guest-exec: no pid in {r}"))?;
        let st = wait_until(
            CMD_TIMEOUT * 2,
            Duration::from_millis(50),
            "guest-exec to finish",
            || match self.qga("guest-exec-status", json!({"pid": pid})) {
                Ok(s) if s["exited"] == true => Some(Ok(s)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            },
        )??;
        let dec = |k: &str| -> Result<Vec<u8>> {
            st.get(k)
                .and_then(Value::as_str)
                .map(base64_decode)
                .unwrap_or_else(|| Ok(Vec::new()))
        };
        let exit = st["exitcode"]
            .as_i64()
            .or_else(|| st["signal"].as_i64().map(|s| -s))
            .unwrap_or(-1);
        Ok(ExecOutput {
            exit,
            stdout: dec("out-data")?,
            stderr: dec("err-data")?,
        })
    }

    /// Run a shell script in the guest; fails unless it exits 0.
    pub fn guest_sh(&self, script: &str) -> Result<String> {
        let out = self.guest_exec(&["/bin/sh", "-c", script])?;
        if out.exit != 0 {
            return Err(herr!(
                "guest script failed ({}): {script}\nstdout: {}\nstderr: {}",
                out.exit,
                out.stdout_str(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout_str())
    }

    /// Orderly stop: in guest mode flush and unmount the data disks and
    /// power off; otherwise QMP `quit`. Waits for QEMU to exit.
    pub fn shutdown(&mut self) -> Result<()> {
        if self.booted && self.qga_socket().exists() {
            // shear-poweroff kills every guest process, qemu-ga too, and
            // that sometimes happens before qemu-ga wrote its guest-exec
            // reply: a closed connection then means the command ran. Whether
            // the guest really powered off is decided by QEMU's exit below.
            match qga_call(
                &self.qga_socket(),
                "guest-exec",
                json!({"path": "/sbin/shear-poweroff"}),
                CMD_TIMEOUT,
                true,
            ) {
                Err(e) if !e.is_peer_closed() => return Err(e),
                _ => {}
            }
        } else {
            let _ = self.harness_qmp("quit", Value::Null);
        }
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| herr!("QEMU already reaped"))?;
        let st = wait_until(
            Duration::from_secs(60),
            Duration::from_millis(50),
            "QEMU to exit",
            || child.try_wait().ok().flatten(),
        )?;
        self.child = None;
        if !st.success() {
            return Err(herr!("QEMU exited with {st}"));
        }
        Ok(())
    }

    /// Wait (at most `timeout`) for QEMU to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| herr!("QEMU already reaped"))?;
        let st = wait_until(timeout, Duration::from_millis(20), "QEMU to exit", || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(st)
    }

    /// Kill QEMU with SIGKILL now and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[harness] test failed; QEMU dir {}; console tail:\n{}\nqemu stderr:\n{}",
                self.dir().display(),
                self.console_tail(40),
                std::fs::read_to_string(self.dir().join("qemu.err")).unwrap_or_default()
            );
        }
        self.kill();
        if std::env::var_os("SHEAR_KEEP_TEST_DIRS").is_some() {
            let kept = std::mem::replace(
                &mut self.dir,
                tempfile::TempDir::new().unwrap_or_else(|_| panic!("tempdir")),
            );
            eprintln!("[harness] kept {}", kept.keep().display());
        }
    }
}
