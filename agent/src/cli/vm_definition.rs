//! The captured VM definition on the command line: `shear show --config`
//! and the files `shear restore` writes beside the disks.

use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::job::definition::adapt_cmdline;

/// What `show --config` prints: QEMU's view as JSON, then the Proxmox
/// config and the libvirt XML when they were captured.
pub fn show(vm_config: &Value) -> String {
    let mut qemu = vm_config.clone();
    let mut out = String::new();
    if let Some(o) = qemu.as_object_mut() {
        let pve = o.remove("pve_config");
        let xml = o.remove("libvirt_xml");
        out.push_str("# QEMU's view (QMP and the process's command line)\n");
        out.push_str(&serde_json::to_string_pretty(&qemu).unwrap_or_default());
        out.push('\n');
        if let Some(p) = pve.filter(|p| !p.is_null()) {
            out.push_str(&format!(
                "# Proxmox config ({})\n{}\n",
                p["path"].as_str().unwrap_or("?"),
                p["text"].as_str().unwrap_or("")
            ));
        }
        if let Some(x) = xml.and_then(|x| x.as_str().map(str::to_string)) {
            out.push_str("# libvirt domain XML\n");
            out.push_str(&x);
            out.push('\n');
        }
    } else {
        out.push_str("(no VM definition was captured in this backup)\n");
    }
    out
}

/// Write the captured definition beside restored disks: `vm-definition.json`
/// always, `pve.conf` and `domain.xml` when captured, and `qemu-cmdline.sh`
/// (the original QEMU command line with each disk's image path replaced by
/// its restored file, and what cannot be reused dropped and listed).
/// `restored` pairs each disk name with its restored path and format.
/// Returns the files written.
pub fn write_beside(
    vm_config: &Value,
    target: &Path,
    restored: &[(String, std::path::PathBuf, &str)],
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    let mut put = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = target.join(name);
        crate::fsutil::write_atomic(&path, text.as_bytes(), crate::fsutil::Existing::Replace)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    put(
        "vm-definition.json",
        &serde_json::to_string_pretty(vm_config).unwrap_or_default(),
    )?;
    if let Some(t) = vm_config["pve_config"]["text"].as_str() {
        put("pve.conf", t)?;
    }
    if let Some(x) = vm_config["libvirt_xml"].as_str() {
        put("domain.xml", x)?;
    }
    if let Some(argv) = vm_config["cmdline"].as_array() {
        let argv: Vec<String> = argv
            .iter()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let disks = vm_config["disks"].as_array().cloned().unwrap_or_default();
        let mut pairs = Vec::new();
        let mut notes = Vec::new();
        for (name, path, format) in restored {
            let Some(d) = disks.iter().find(|d| d["name"] == name.as_str()) else {
                continue;
            };
            let orig = d["filename"].as_str().unwrap_or("").to_string();
            pairs.push((orig.clone(), path.display().to_string()));
            if d["format"].as_str().is_some_and(|f| f != *format) {
                notes.push(format!(
                    "# disk {name} was {} and is restored as {format}: adjust its format= (or \
                     restore with --format {})",
                    d["format"].as_str().unwrap_or("?"),
                    d["format"].as_str().unwrap_or("?")
                ));
            }
        }
        let (out, dropped) = adapt_cmdline(&argv, &pairs);
        let mut sh = String::from(
            "#!/bin/sh\n# The VM's own QEMU command line as captured at backup time, with\n\
             # each disk's image replaced by its restored file.\n",
        );
        for d in &dropped {
            sh.push_str(&format!("# dropped (belongs to the old process): {d}\n"));
        }
        for n in &notes {
            sh.push_str(n);
            sh.push('\n');
        }
        sh.push_str("exec");
        for w in &out {
            sh.push(' ');
            sh.push_str(&super::boot_cmdline::sh_quote(w));
        }
        sh.push('\n');
        put("qemu-cmdline.sh", &sh)?;
    }
    Ok(written)
}
