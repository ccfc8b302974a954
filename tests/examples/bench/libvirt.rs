//! `--only libvirt` (issue 18): shear's libvirt backups against
//! virtnbdbackup on the same libvirt domain in the same run: per round a
//! full backup of the data set's disk by each, 1 % of the disk dirtied in
//! the guest, an incremental by each (from its own checkpoint). Without
//! virtnbdbackup (`scripts/setup` installs Debian's package), the anchor
//! is `nbdcopy URI null:` from a libvirt pull-mode export of the same
//! domain (full reads only; said in the report).

use super::*;
use shear_tests::libvirt::{virsh, LibvirtVm};

/// Every checkpoint of the domain goes (each tool starts its chain anew
/// every round; leftovers would cost both tools bitmap upkeep).
fn drop_checkpoints(dom: &str) {
    let list = virsh(&["checkpoint-list", "--name", "--", dom]).unwrap_or_default();
    for c in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let _ = virsh(&["checkpoint-delete", "--", dom, c]);
    }
}

/// `virtnbdbackup` on the PATH (or in /usr/bin).
fn virtnbdbackup() -> Option<PathBuf> {
    find_tool("virtnbdbackup")
}

/// Dirty 1 % of the disk in the guest (as `guest_dirty` does for the QMP
/// VM): `regions` × `region_mib` MiB of random data over the data set's
/// random files, O_DIRECT.
fn dirty(vm: &LibvirtVm, run: u64, regions: u64, region_mib: u64, file_mib: u64) -> Res<u64> {
    let span = file_mib.saturating_sub(region_mib) + 1;
    let cmds: Vec<String> = (0..regions)
        .map(|i| {
            let seek = (run * 2 * region_mib + i * 7 + 3) % span;
            format!(
                "dd if=/dev/urandom of={GUEST_RANDOM_DIR}/{}.bin bs=1M count={region_mib} seek={seek} \
                 oflag=direct conv=notrunc 2>/dev/null || exit 1",
                i % RANDOM_FILES
            )
        })
        .collect();
    vm.guest_sh(&cmds.join("; "))
        .map_err(|e| format!("guest dd (dirtying): {e}"))?;
    Ok(regions * region_mib * MIB)
}

/// The domain's QEMU pid (its CPU is sampled around each command).
fn qemu_pid(dom: &str) -> u32 {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{dom}.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

/// `nbdcopy URI null:` from a libvirt pull-mode export of the domain's
/// disk (the fallback anchor): backup-begin by hand, read, domjobabort.
fn nbdcopy_from_libvirt(b: &Bench, dom: &str, qpid: u32) -> Res<Sample> {
    let dir = b.run.join("lv-pull");
    remove(&dir);
    std::fs::create_dir_all(&dir).ctx("creating the pull-mode directory")?;
    let sock = dir.join("nbd.sock");
    let xml = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/>\
         <disks><disk name='vda' backup='yes' type='file'><scratch file='{}'/></disk></disks>\
         </domainbackup>",
        sock.display(),
        dir.join("vda.scratch").display()
    );
    let xml_file = dir.join("backup.xml");
    std::fs::write(&xml_file, xml).ctx("writing the backup XML")?;
    virsh(&[
        "backup-begin",
        "--domain",
        dom,
        "--backupxml",
        &xml_file.display().to_string(),
    ])
    .map_err(|e| e.to_string())?;
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    let r = b.measure(&argv(&[&"nbdcopy", &uri, &"null:"]), &[], qpid);
    let _ = virsh(&["domjobabort", "--", dom]);
    remove(&dir);
    Ok(r?.0)
}

pub(super) fn libvirt_phase(b: &Bench, r: &mut Results) -> Res<()> {
    if !shear_tests::libvirt::require_libvirt() {
        return Err("libvirt missing (run scripts/setup)".into());
    }
    let plan = Plan::for_size(b.size);
    let ds = prepare_dataset(&b.work, &plan)?;
    r.dataset = ds.info.clone();
    let disk = b.run.join("lv-disk.qcow2");
    std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
    say("libvirt: defining and booting the domain (TCG) on the data set's disk");
    let vm = LibvirtVm::start("shear-bench", &[DiskSpec::qcow2(DISK, b.size).image(&disk)])
        .map_err(|e| format!("starting the libvirt domain: {e}"))?;
    let dom = vm.name.clone();
    let qpid = qemu_pid(&dom);
    let vnb = virtnbdbackup();
    let file_mib = plan.random / RANDOM_FILES / MIB;
    let regions = RANDOM_FILES;
    let region_mib = (b.size / 100 / regions / MIB).clamp(1, file_mib);
    let env = b.shear_env();
    let fleece = b.run.join("lv-fleece").display().to_string();
    for round in 0..b.opts.runs {
        say(&format!("libvirt round {}/{}", round + 1, b.opts.runs));
        drop_checkpoints(&dom);
        // shear: full into a fresh repository, then an incremental.
        let repo = b.run.join("repo-libvirt");
        b.fresh_repo(&repo)?;
        let args = [
            "backup",
            dom.as_str(),
            "--libvirt",
            "--json",
            "--fleecing-dir",
            fleece.as_str(),
        ];
        for (key, label, incremental) in [
            ("lv_shear_full", "shear backup --libvirt, full", false),
            (
                "lv_shear_incr",
                "shear backup --libvirt, incremental (1 % dirty)",
                true,
            ),
        ] {
            if incremental {
                dirty(&vm, round as u64 * 2, regions, region_mib, file_mib)?;
            }
            let (mut s, stdout) = b.measure(&b.shear_argv(&repo, &args), &env, qpid)?;
            let report = backup_report(&stdout)?;
            expect_kind(
                &report,
                if incremental { "incremental" } else { "full" },
                label,
            )?;
            s.read = sum_disks(&report, "bytes_read");
            s.out = sum_disks(&report, "bytes_stored");
            s.extra = report;
            r.series(key, label).samples.push(s);
        }
        drop_checkpoints(&dom);
        match &vnb {
            Some(tool) => {
                let out = b.run.join("virtnbdbackup");
                remove(&out);
                for (key, label, level) in [
                    ("lv_vnb_full", "virtnbdbackup -l full -z (lz4)", "full"),
                    (
                        "lv_vnb_incr",
                        "virtnbdbackup -l inc -z (lz4), 1 % dirty",
                        "inc",
                    ),
                ] {
                    if level == "inc" {
                        dirty(&vm, round as u64 * 2 + 1, regions, region_mib, file_mib)?;
                    }
                    let before = tree_bytes(&out);
                    let argv = argv(&[
                        tool,
                        &"-U",
                        &shear_tests::libvirt::URI,
                        &"-d",
                        &dom,
                        &"-l",
                        &level,
                        &"-z",
                        &"--noprogress",
                        &"-o",
                        &out,
                    ]);
                    let (mut s, _) = b.measure(&argv, &[], qpid)?;
                    s.out = tree_bytes(&out).saturating_sub(before);
                    r.series(key, label).samples.push(s);
                }
                remove(&out);
            }
            None => {
                let s = nbdcopy_from_libvirt(b, &dom, qpid)?;
                r.series(
                    "lv_nbdcopy_null",
                    "nbdcopy URI null: from a libvirt pull-mode export",
                )
                .samples
                .push(s);
            }
        }
    }
    drop_checkpoints(&dom);
    drop(vm);
    remove(&disk);
    let mut notes = Vec::new();
    let med = |k: &str| r.get(k).map(|s| s.wall().median);
    let out_mib = |k: &str| {
        r.get(k)
            .and_then(|s| s.samples.last())
            .map_or(0.0, |s| mib(s.out))
    };
    let line = |what: &str, shear: &str, anchor: &str, name: &str| -> Option<String> {
        let (s, a) = (med(shear)?, med(anchor)?);
        Some(format!(
            "libvirt (issue 18), {what} of the {} GiB domain: shear {s:.2} s ({:.0} MiB stored), \
             {name} {a:.2} s ({:.0} MiB written): shear / {name} = {:.2}",
            b.opts.size_gib,
            out_mib(shear),
            out_mib(anchor),
            s / a.max(1e-9)
        ))
    };
    if vnb.is_some() {
        notes.extend(line(
            "full backup",
            "lv_shear_full",
            "lv_vnb_full",
            "virtnbdbackup",
        ));
        notes.extend(line(
            "incremental backup (1 % dirty)",
            "lv_shear_incr",
            "lv_vnb_incr",
            "virtnbdbackup",
        ));
        notes.push(format!(
            "libvirt: virtnbdbackup {} (Debian's package), stream format with lz4 (-z); shear \
             with zstd, deduplicated, in a fresh repository per round; both freeze through \
             qemu-ga and read libvirt's pull-mode NBD export.",
            first_line("virtnbdbackup", &["-V"])
        ));
    } else {
        notes.extend(line(
            "full read",
            "lv_shear_full",
            "lv_nbdcopy_null",
            "nbdcopy → null",
        ));
        notes.push(
            "libvirt: virtnbdbackup is not installed here (scripts/setup installs Debian's \
             package when it can): the anchor is nbdcopy → null from a libvirt pull-mode export \
             of the same domain, a read ceiling without storage (no incremental figure for it)."
                .into(),
        );
        if let Some(s) = med("lv_shear_incr") {
            notes.push(format!(
                "libvirt: shear's incremental backup (1 % dirty) took {s:.2} s"
            ));
        }
    }
    r.notes.extend(notes);
    Ok(())
}
