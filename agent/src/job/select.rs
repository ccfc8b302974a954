//! Which of a VM's disks a backup reads: `--exclude` names must name a
//! disk (or a device skipped anyway, such as a CD-ROM), else the backup
//! is refused before the guest is touched, listing the real names.

use super::graph::VmDisk;
use super::JobError;

/// The disks left after `exclude`; an unknown name is an error.
/// `skipped`: messages about devices discovery left out (CD-ROMs…).
pub(super) fn apply_exclude(
    all: Vec<VmDisk>,
    exclude: &[String],
    skipped: &[String],
) -> Result<Vec<VmDisk>, JobError> {
    let unknown: Vec<&str> = exclude
        .iter()
        .filter(|x| {
            !all.iter().any(|d| &d.name == *x)
                && !skipped.iter().any(|m| {
                    m.split(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
                        .any(|w| w == x.as_str())
                })
        })
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
        return Err(JobError::Invalid(format!(
            "--exclude names no disk of this VM: {}; its disks: {}",
            unknown.join(", "),
            names.join(", ")
        )));
    }
    Ok(all
        .into_iter()
        .filter(|d| !exclude.iter().any(|x| x == &d.name))
        .collect())
}
