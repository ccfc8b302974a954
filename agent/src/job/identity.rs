//! Which VM is at the other end of the QMP socket, checked before anything
//! in it changes.
//!
//! A socket template without `{vmid}`, or a wrong `--qmp`, would otherwise
//! file one VM's disks under another VM's id (and undo another VM's
//! leftovers). shear's VM id is a free string; the evidence QEMU carries:
//!
//! - Proxmox starts QEMU with `-id VMID` and `-pidfile
//!   /var/run/qemu-server/VMID.pid`: equal is a match, different is a
//!   **mismatch** (refused).
//! - `-name` (`NAME` or `guest=NAME,…`; also `query-name`): equal to the VM
//!   id is a match. A different name proves nothing (on Proxmox it is the
//!   VM's name, `web`, not its id).
//! - None of these: identity unknown; the backup goes on as asked, with a
//!   warning saying so.
//!
//! The command line is read from `/proc/PID/cmdline`, PID being the QMP
//! peer's (SO_PEERCRED): QEMU's own pid, whatever wrapper started it.

use std::path::{Path, PathBuf};

use super::JobError;

/// What QEMU's command line says about its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuIds {
    /// Proxmox's `-id`.
    pub id: Option<String>,
    /// The guest name of `-name`.
    pub name: Option<String>,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
}

/// The verdict on one VM id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Positive evidence it is this VM (what matched).
    Match(String),
    /// Positive evidence it is another VM (what was found).
    Mismatch(String),
    /// No evidence either way.
    Unknown,
}

/// Parse QEMU's argv (without checking it is QEMU). The last occurrence of
/// an option wins, as in QEMU; `--opt` is the same as `-opt`.
pub fn parse_cmdline<S: AsRef<str>>(args: &[S]) -> QemuIds {
    let mut ids = QemuIds::default();
    let mut it = args.iter().map(AsRef::as_ref);
    while let Some(a) = it.next() {
        let opt = a.strip_prefix("--").or_else(|| a.strip_prefix('-'));
        let Some(opt) = opt else { continue };
        // `-opt=value` is not QEMU syntax; only `-opt value`.
        match opt {
            "id" => ids.id = it.next().map(str::to_string),
            "name" => ids.name = it.next().and_then(name_guest),
            "pidfile" => ids.pidfile = it.next().map(PathBuf::from),
            _ => {}
        }
    }
    ids
}

/// The guest name of a `-name` value: `NAME[,opts]` or `guest=NAME,…`
/// (QEMU option syntax: `,,` is a literal comma).
pub fn name_guest(value: &str) -> Option<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    for (i, item) in items.iter().enumerate() {
        match item.split_once('=') {
            Some(("guest", v)) => return Some(v.to_string()),
            None if i == 0 && !item.is_empty() => return Some(item.clone()),
            _ => {}
        }
    }
    None
}

/// The VM id of a Proxmox pidfile (`…/qemu-server/VMID.pid`).
pub fn pidfile_vmid(p: &Path) -> Option<String> {
    let dir = p.parent()?.file_name()?.to_str()?;
    if dir != "qemu-server" || p.extension()?.to_str()? != "pid" {
        return None;
    }
    p.file_stem()?.to_str().map(str::to_string)
}

/// Judge `vmid` against the command line and `query-name`.
pub fn judge(vmid: &str, ids: &QemuIds, qmp_name: Option<&str>) -> Verdict {
    if let Some(id) = &ids.id {
        return if id == vmid {
            Verdict::Match(format!("-id {id}"))
        } else {
            Verdict::Mismatch(format!("QEMU runs with -id {id}"))
        };
    }
    if let Some(n) = ids.pidfile.as_deref().and_then(pidfile_vmid) {
        return if n == vmid {
            Verdict::Match(format!("pidfile of VM {n}"))
        } else {
            Verdict::Mismatch(format!(
                "QEMU's pidfile is VM {n}'s ({})",
                ids.pidfile.as_deref().unwrap_or(Path::new("")).display()
            ))
        };
    }
    let names = [ids.name.as_deref(), qmp_name];
    if names.iter().flatten().any(|n| *n == vmid) {
        return Verdict::Match(format!("-name {vmid}"));
    }
    Verdict::Unknown
}

/// The command line of process `pid` (NUL-separated), if readable.
/// The command line of process `pid` (`/proc/PID/cmdline`, read bounded).
pub(super) fn cmdline_of(pid: u32) -> Option<Vec<String>> {
    use std::io::Read;
    let mut raw = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .take(MAX_CMDLINE)
        .read_to_end(&mut raw)
        .ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then_some(args)
}

/// Largest command line read (QEMU's are a few KiB; a hostile one is cut).
const MAX_CMDLINE: u64 = 1 << 20;

/// Check that the QEMU behind `qmp` is VM `vmid`, before anything changes
/// in it. A mismatch is [`JobError::WrongVm`]; no evidence is a warning
/// (returned), and the backup goes on as asked.
pub async fn verify(qmp: &qmp::Qmp, vmid: &str) -> Result<Option<String>, JobError> {
    let ids = qmp
        .peer_pid()
        .and_then(cmdline_of)
        .map(|a| parse_cmdline(&a))
        .unwrap_or_default();
    let name = qmp
        .execute_value("query-name", serde_json::Value::Null)
        .await
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string));
    match judge(vmid, &ids, name.as_deref()) {
        Verdict::Match(_) => Ok(None),
        Verdict::Mismatch(found) => Err(JobError::WrongVm {
            vmid: vmid.to_string(),
            socket: qmp.path().to_path_buf(),
            found,
        }),
        Verdict::Unknown => Ok(Some(format!(
            "could not check that {} is VM {vmid}'s QEMU (no -id, no -name {vmid}, no \
             qemu-server pidfile): backed up as asked",
            qmp.path().display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<&str> {
        s.split(' ').collect()
    }

    #[test]
    fn proxmox_command_line() {
        let a = argv(
            "/usr/bin/kvm -id 100 -name web01,debug-threads=on -no-shutdown \
             -chardev socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off \
             -mon chardev=qmp,mode=control -pidfile /var/run/qemu-server/100.pid -daemonize",
        );
        let ids = parse_cmdline(&a);
        assert_eq!(ids.id.as_deref(), Some("100"));
        assert_eq!(ids.name.as_deref(), Some("web01"));
        assert_eq!(
            pidfile_vmid(ids.pidfile.as_deref().unwrap()).as_deref(),
            Some("100")
        );
        assert!(matches!(
            judge("100", &ids, Some("web01")),
            Verdict::Match(_)
        ));
        // Another VM's QEMU: refused.
        let v = judge("101", &ids, Some("web01"));
        assert_eq!(v, Verdict::Mismatch("QEMU runs with -id 100".into()));
    }

    #[test]
    fn pidfile_alone_decides_without_id() {
        let ids = parse_cmdline(&argv("qemu -pidfile /run/qemu-server/7.pid"));
        assert!(matches!(judge("7", &ids, None), Verdict::Match(_)));
        assert!(matches!(judge("8", &ids, None), Verdict::Mismatch(_)));
        // A pidfile elsewhere says nothing.
        let ids = parse_cmdline(&argv("qemu -pidfile /tmp/vm/qemu.pid"));
        assert_eq!(judge("7", &ids, None), Verdict::Unknown);
        assert_eq!(pidfile_vmid(Path::new("/run/qemu-server/7.conf")), None);
    }

    #[test]
    fn name_forms() {
        assert_eq!(name_guest("web01").as_deref(), Some("web01"));
        assert_eq!(
            name_guest("web01,debug-threads=on").as_deref(),
            Some("web01")
        );
        assert_eq!(
            name_guest("process=qemu-foo,guest=foo,debug-threads=on").as_deref(),
            Some("foo")
        );
        assert_eq!(name_guest("guest=a,,b").as_deref(), Some("a,b"));
        assert_eq!(name_guest("debug-threads=on"), None);
        assert_eq!(name_guest(""), None);
        // The last -name wins; --name is the same option.
        let ids = parse_cmdline(&argv("qemu -name a --name guest=100"));
        assert_eq!(ids.name.as_deref(), Some("100"));
        assert!(matches!(judge("100", &ids, None), Verdict::Match(_)));
    }

    #[test]
    fn names_prove_only_a_match() {
        // Non-Proxmox QEMU named after its VM id: a match; another name
        // proves nothing (it may be the VM's name, not its id).
        let ids = parse_cmdline(&argv("qemu -name guest=foo"));
        assert_eq!(judge("100", &ids, Some("foo")), Verdict::Unknown);
        assert!(matches!(judge("foo", &ids, Some("foo")), Verdict::Match(_)));
        assert!(matches!(
            judge("100", &QemuIds::default(), Some("100")),
            Verdict::Match(_)
        ));
        assert_eq!(judge("100", &QemuIds::default(), None), Verdict::Unknown);
        // A dangling option at the end is ignored, not a panic.
        assert_eq!(parse_cmdline(&argv("qemu -id")), QemuIds::default());
    }
}
