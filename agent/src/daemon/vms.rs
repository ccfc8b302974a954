//! VMs known to the host: found through the config's QMP socket template
//! (Proxmox's `/var/run/qemu-server/{vmid}.qmp` by default), Proxmox's VM
//! configs (`/etc/pve/qemu-server/*.conf`), libvirt's running domains
//! (`/var/lib/libvirt/qemu/domain-*/monitor.sock`) and the jobs.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::config::{DaemonConfig, Selection};

/// One VM as the host knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownVm {
    /// VM id (libvirt: the domain name).
    pub vmid: String,
    /// Where it was found: `socket`, `pve-config`, `libvirt`, `job`.
    pub sources: Vec<String>,
    /// Its QMP socket per the config template.
    pub qmp_socket: PathBuf,
    /// Whether that socket exists (the VM runs).
    pub running: bool,
    /// Backup jobs naming it (or covering it with `all`).
    pub jobs: Vec<String>,
}

/// Most directory entries looked at per directory.
const MAX_ENTRIES: usize = 100_000;

/// VM ids whose expansion of `template` exists, by listing the directory
/// of the first path component holding `{vmid}`.
pub fn from_template(template: &str) -> Vec<String> {
    let path = Path::new(template);
    let mut parent = PathBuf::new();
    let mut rest = PathBuf::new();
    let mut pattern: Option<String> = None;
    for c in path.components() {
        match (&pattern, c) {
            (None, Component::Normal(s)) if s.to_string_lossy().contains("{vmid}") => {
                pattern = Some(s.to_string_lossy().into_owned());
            }
            (None, c) => parent.push(c),
            (Some(_), c) => rest.push(c),
        }
    }
    let Some(pattern) = pattern else {
        return Vec::new();
    };
    let Some((prefix, suffix)) = pattern.split_once("{vmid}") else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.take(MAX_ENTRIES).filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(mid) = name
            .strip_prefix(prefix)
            .and_then(|n| n.strip_suffix(suffix))
        else {
            continue;
        };
        if mid.is_empty() || crate::repo::VmId::new(mid).is_err() {
            continue;
        }
        let full = PathBuf::from(template.replace("{vmid}", mid));
        if full.exists() {
            out.push(mid.to_owned());
        }
    }
    out.sort();
    out
}

fn libvirt_domains(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.take(MAX_ENTRIES).filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        // domain-<N>-<name>
        let Some(rest) = name.strip_prefix("domain-") else {
            continue;
        };
        let Some((_, dom)) = rest.split_once('-') else {
            continue;
        };
        if e.path().join("monitor.sock").exists() && crate::repo::VmId::new(dom).is_ok() {
            out.push(dom.to_owned());
        }
    }
    out
}

/// Every VM known to the host, sorted by id.
pub fn known_vms(cfg: &DaemonConfig) -> Vec<KnownVm> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut add = |id: String, src: &str| {
        let e = map.entry(id).or_default();
        if !e.iter().any(|s| s == src) {
            e.push(src.to_owned());
        }
    };
    for id in from_template(&cfg.base.qmp_socket) {
        add(id, "socket");
    }
    for id in from_template(&cfg.base.pve_config) {
        add(id, "pve-config");
    }
    for id in libvirt_domains(Path::new("/var/lib/libvirt/qemu")) {
        add(id, "libvirt");
    }
    for j in &cfg.jobs {
        if let Some(Selection::List(v)) = j.backup.as_ref().map(|b| &b.vms) {
            for id in v {
                add(id.clone(), "job");
            }
        }
    }
    map.into_iter()
        .map(|(vmid, sources)| {
            let qmp_socket = cfg.base.qmp_socket_for(&vmid);
            let running = qmp_socket.exists();
            let jobs = cfg
                .jobs
                .iter()
                .filter(|j| match j.backup.as_ref().map(|b| &b.vms) {
                    Some(Selection::List(v)) => v.contains(&vmid),
                    Some(Selection::All { exclude }) => running && !exclude.contains(&vmid),
                    None => false,
                })
                .map(|j| j.id.clone())
                .collect();
            KnownVm {
                vmid,
                sources,
                qmp_socket,
                running,
                jobs,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_discovery() {
        let d = tempfile::tempdir().unwrap();
        for n in ["100.qmp", "101.qmp", "x.qga", "..qmp", "102.qmp.bak"] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        let t = format!("{}/{{vmid}}.qmp", d.path().display());
        assert_eq!(from_template(&t), vec!["100", "101"]);
        std::fs::create_dir_all(d.path().join("vm/7")).unwrap();
        std::fs::write(d.path().join("vm/7/mon.sock"), b"").unwrap();
        std::fs::create_dir_all(d.path().join("vm/8")).unwrap();
        let t = format!("{}/vm/{{vmid}}/mon.sock", d.path().display());
        assert_eq!(from_template(&t), vec!["7"]);
        let l = d.path().join("libvirt");
        std::fs::create_dir_all(l.join("domain-3-web")).unwrap();
        std::fs::write(l.join("domain-3-web/monitor.sock"), b"").unwrap();
        std::fs::create_dir_all(l.join("domain-4-gone")).unwrap();
        assert_eq!(libvirt_domains(&l), vec!["web"]);
    }
}
