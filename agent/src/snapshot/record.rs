//! The snapshot record of one VM: shear's names, descriptions and creation
//! facts for the QEMU snapshot tags it made, in
//! `<state_dir>/snapshots/<vmid>.json` (versioned JSON, written atomically;
//! format in docs/formats.md).
//!
//! QEMU's internal snapshots have a tag and no rename, no description of
//! ours: shear keeps them here, keyed by tag. QEMU stays the truth for what
//! exists: [`reconcile`] joins the record with what QEMU reports per disk
//! and flags orphans both ways (a tag in QEMU that the record does not know:
//! created outside shear; a record entry whose tag is gone from some or all
//! disks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::fsutil::{write_atomic, Existing};

/// Version of the record format this build writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// Largest record file read (a few KiB per snapshot).
const MAX_RECORD_BYTES: u64 = 16 << 20;

/// The record of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The VM id.
    pub vmid: String,
    /// Snapshots shear made, oldest first.
    pub snapshots: Vec<SnapshotEntry>,
}

/// One snapshot shear made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// shear's name (unique per VM; `rename` changes it).
    pub name: String,
    /// QEMU's snapshot tag on every disk (never changes).
    pub tag: String,
    /// Free text (`describe`).
    #[serde(default)]
    pub description: String,
    /// Creation time, Unix seconds (UTC).
    pub created_unix: i64,
    /// Whether the VM's memory and device state were saved (`--vmstate`).
    pub vmstate: bool,
    /// The disk holding the VM state (with `vmstate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmstate_disk: Option<String>,
    /// `application` (guest frozen), `crash`, or `memory` (with vmstate).
    pub consistency: String,
    /// The disks snapshotted, as they were at creation.
    pub disks: Vec<SnapshotDisk>,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDisk {
    /// Disk name (qdev id, as in backups).
    pub name: String,
    /// Image file at creation (the offline rollback applies to it).
    pub filename: String,
}

impl SnapshotRecord {
    /// An empty record for `vmid`.
    pub fn new(vmid: &str) -> Self {
        SnapshotRecord {
            version: RECORD_VERSION,
            vmid: vmid.to_string(),
            snapshots: Vec::new(),
        }
    }

    /// The entry named `name`.
    pub fn by_name(&self, name: &str) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// The entry with QEMU tag `tag`.
    pub fn by_tag(&self, tag: &str) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|s| s.tag == tag)
    }

    /// Rename `old` to `new`: the tag stays.
    pub fn rename(&mut self, old: &str, new: &str) -> Result<(), SnapshotError> {
        check_name(new)?;
        if self.by_name(new).is_some() {
            return Err(SnapshotError::Exists {
                vmid: self.vmid.clone(),
                name: new.to_string(),
            });
        }
        let vmid = self.vmid.clone();
        let e = self
            .snapshots
            .iter_mut()
            .find(|s| s.name == old)
            .ok_or_else(|| SnapshotError::NotFound {
                vmid,
                name: old.to_string(),
            })?;
        e.name = new.to_string();
        Ok(())
    }

    /// Set the description of `name`.
    pub fn describe(&mut self, name: &str, text: &str) -> Result<(), SnapshotError> {
        let vmid = self.vmid.clone();
        let e = self
            .snapshots
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| SnapshotError::NotFound {
                vmid,
                name: name.to_string(),
            })?;
        e.description = text.to_string();
        Ok(())
    }

    /// Remove the entry with tag `tag` (after QEMU deleted it).
    pub fn remove_tag(&mut self, tag: &str) {
        self.snapshots.retain(|s| s.tag != tag);
    }

    /// A QEMU tag for a new snapshot named `name`: the name itself unless a
    /// disk or the record already has that tag, else `name.2`, `name.3`…
    pub fn fresh_tag(&self, name: &str, in_qemu: &[String]) -> String {
        let taken = |t: &str| self.by_tag(t).is_some() || in_qemu.iter().any(|q| q == t);
        if !taken(name) {
            return name.to_string();
        }
        (2u32..)
            .map(|i| format!("{name}.{i}"))
            .find(|t| !taken(t))
            .unwrap_or_else(|| name.to_string())
    }
}

/// A snapshot name shear accepts: 1..=128 printable characters, no
/// leading `-`, and not all digits (QEMU matches an all-digit name against
/// snapshot ids too).
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let bad = |why: &str| Err(SnapshotError::BadName(name.to_string(), why.to_string()));
    if name.is_empty() || name.chars().count() > 128 {
        return bad("1 to 128 characters");
    }
    if name.chars().any(char::is_control) {
        return bad("no control characters");
    }
    if name.starts_with('-') {
        return bad("must not start with '-'");
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return bad("not all digits (QEMU would take it for a snapshot id)");
    }
    Ok(())
}

/// Where the record of `vmid` lives.
pub fn record_path(state_dir: &Path, vmid: &str) -> PathBuf {
    state_dir.join("snapshots").join(format!("{vmid}.json"))
}

/// Load the record of `vmid`; a missing file is an empty record.
pub fn load(state_dir: &Path, vmid: &str) -> Result<SnapshotRecord, SnapshotError> {
    use std::io::Read;
    let path = record_path(state_dir, vmid);
    let bad = |what: String| SnapshotError::Record {
        path: path.clone(),
        what,
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SnapshotRecord::new(vmid)),
        Err(e) => return Err(bad(format!("cannot open: {e}"))),
    };
    let mut text = String::new();
    file.take(MAX_RECORD_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match v.get("version").and_then(serde_json::Value::as_u64) {
        Some(n) if n == u64::from(RECORD_VERSION) => {}
        Some(n) => {
            return Err(bad(format!(
                "version {n} is not supported by this shear (reads version {RECORD_VERSION})"
            )))
        }
        None => return Err(bad("no version".into())),
    }
    let r: SnapshotRecord =
        serde_json::from_value(v).map_err(|e| bad(format!("malformed: {e}")))?;
    if r.vmid != vmid {
        return Err(bad(format!("holds VM {:?}, not {vmid:?}", r.vmid)));
    }
    Ok(r)
}

/// Write the record atomically (private directory, temp file, fsync,
/// rename).
pub fn save(state_dir: &Path, r: &SnapshotRecord) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    let path = record_path(state_dir, &r.vmid);
    let bad = |what: String| SnapshotError::Record {
        path: path.clone(),
        what,
    };
    let dir = crate::fsutil::parent_dir(&path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| bad(format!("creating {}: {e}", dir.display())))?;
    let data = serde_json::to_vec_pretty(r).map_err(|e| bad(format!("encoding: {e}")))?;
    write_atomic(&path, &data, Existing::Replace).map_err(|e| bad(crate::chain(&e)))
}

/// One internal snapshot as QEMU reports it on one disk
/// (`query-block` → `inserted.image.snapshots[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuSnapshot {
    /// Tag (`name`).
    pub tag: String,
    /// VM state size in bytes (0: disk-only).
    pub vm_state_size: u64,
    /// Creation time (`date-sec`).
    pub date_sec: i64,
}

/// Parse `inserted.image.snapshots` of one disk (peer data: anything
/// missing or odd is skipped, never a panic).
pub fn parse_qemu_snapshots(v: Option<&serde_json::Value>) -> Vec<QemuSnapshot> {
    v.and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some(QemuSnapshot {
                tag: s.get("name")?.as_str()?.to_string(),
                vm_state_size: s
                    .get("vm-state-size")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                date_sec: s
                    .get("date-sec")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// Where a listed snapshot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// In the record and on every disk.
    Ok,
    /// In QEMU but not in the record: created outside shear.
    Foreign,
    /// In the record but on some disks only (deleted there behind shear's
    /// back, or a disk was added since).
    Partial,
    /// In the record but gone from every disk.
    Gone,
}

impl Standing {
    /// A short mark for the human listing.
    pub fn mark(self) -> &'static str {
        match self {
            Standing::Ok => "",
            Standing::Foreign => "created outside shear",
            Standing::Partial => "missing on some disks",
            Standing::Gone => "gone from QEMU (deleted outside shear)",
        }
    }
}

/// One row of `shear snapshot list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// shear's name (the tag for a foreign snapshot).
    pub name: String,
    /// QEMU's tag.
    pub tag: String,
    /// Where it stands.
    pub standing: Standing,
    /// Creation time, Unix seconds (the record's, else QEMU's).
    pub created_unix: i64,
    /// Age in seconds at listing time.
    pub age_s: i64,
    /// Older than the configured limit.
    pub too_old: bool,
    /// With memory (record, else QEMU's vm-state-size > 0).
    pub vmstate: bool,
    /// VM state size in bytes (largest over the disks).
    pub vm_state_size: u64,
    /// Description (empty for foreign ones).
    pub description: String,
    /// Disks that have the tag.
    pub on_disks: Vec<String>,
    /// Disks that lack it.
    pub missing_on: Vec<String>,
}

/// Join the record with QEMU's per-disk snapshot lists (`disks`: name →
/// snapshots), in creation order. `max_age_s`: the warning limit.
pub fn reconcile(
    record: &SnapshotRecord,
    disks: &[(String, Vec<QemuSnapshot>)],
    now_unix: i64,
    max_age_s: i64,
) -> Vec<Listed> {
    // tag → (disks having it, largest vm state, earliest date)
    let mut seen: BTreeMap<&str, (Vec<String>, u64, i64)> = BTreeMap::new();
    for (disk, snaps) in disks {
        for s in snaps {
            let e = seen
                .entry(s.tag.as_str())
                .or_insert((Vec::new(), 0, s.date_sec));
            if !e.0.contains(disk) {
                e.0.push(disk.clone());
            }
            e.1 = e.1.max(s.vm_state_size);
            e.2 = e.2.min(s.date_sec);
        }
    }
    let all_disks: Vec<String> = disks.iter().map(|(d, _)| d.clone()).collect();
    let missing = |on: &[String]| -> Vec<String> {
        all_disks
            .iter()
            .filter(|d| !on.contains(d))
            .cloned()
            .collect()
    };
    let mut rows = Vec::new();
    for e in &record.snapshots {
        let (on, size) = seen
            .get(e.tag.as_str())
            .map(|(on, size, _)| (on.clone(), *size))
            .unwrap_or_default();
        let standing = if on.is_empty() {
            Standing::Gone
        } else if on.len() < all_disks.len() {
            Standing::Partial
        } else {
            Standing::Ok
        };
        let age = now_unix.saturating_sub(e.created_unix);
        rows.push(Listed {
            name: e.name.clone(),
            tag: e.tag.clone(),
            standing,
            created_unix: e.created_unix,
            age_s: age,
            too_old: age > max_age_s,
            vmstate: e.vmstate,
            vm_state_size: size,
            description: e.description.clone(),
            missing_on: missing(&on),
            on_disks: on,
        });
    }
    for (tag, (on, size, date)) in &seen {
        if record.by_tag(tag).is_some() {
            continue;
        }
        let age = now_unix.saturating_sub(*date);
        rows.push(Listed {
            name: (*tag).to_string(),
            tag: (*tag).to_string(),
            standing: Standing::Foreign,
            created_unix: *date,
            age_s: age,
            too_old: age > max_age_s,
            vmstate: *size > 0,
            vm_state_size: *size,
            description: String::new(),
            missing_on: missing(on),
            on_disks: on.clone(),
        });
    }
    rows.sort_by(|a, b| {
        a.created_unix
            .cmp(&b.created_unix)
            .then_with(|| a.name.cmp(&b.name))
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, tag: &str, t: i64) -> SnapshotEntry {
        SnapshotEntry {
            name: name.into(),
            tag: tag.into(),
            description: String::new(),
            created_unix: t,
            vmstate: false,
            vmstate_disk: None,
            consistency: "crash".into(),
            disks: vec![SnapshotDisk {
                name: "d0".into(),
                filename: "/img/d0.qcow2".into(),
            }],
        }
    }

    fn q(tag: &str, size: u64, t: i64) -> QemuSnapshot {
        QemuSnapshot {
            tag: tag.into(),
            vm_state_size: size,
            date_sec: t,
        }
    }

    #[test]
    fn orphans_are_flagged_both_ways() {
        let mut r = SnapshotRecord::new("100");
        r.snapshots.push(entry("a", "a", 100));
        r.snapshots.push(entry("b", "b", 200));
        r.snapshots.push(entry("c", "c", 300));
        let disks = vec![
            (
                "d0".to_string(),
                vec![q("a", 0, 100), q("c", 0, 300), q("x", 5000, 50)],
            ),
            ("d1".to_string(), vec![q("a", 0, 100), q("x", 0, 50)]),
        ];
        let rows = reconcile(&r, &disks, 1000, 500);
        let by = |n: &str| rows.iter().find(|l| l.name == n).unwrap().clone();
        assert_eq!(by("a").standing, Standing::Ok);
        assert_eq!(by("b").standing, Standing::Gone);
        assert_eq!(by("b").missing_on, vec!["d0", "d1"]);
        assert_eq!(by("c").standing, Standing::Partial);
        assert_eq!(by("c").missing_on, vec!["d1"]);
        let x = by("x");
        assert_eq!(x.standing, Standing::Foreign);
        assert!(x.vmstate, "vm-state-size > 0 means with memory");
        assert_eq!(x.vm_state_size, 5000);
        // Creation order, foreign ones included.
        let names: Vec<&str> = rows.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["x", "a", "b", "c"]);
        // Age limit: 1000-100 = 900 > 500; 1000-300 = 700 > 500.
        assert!(by("a").too_old);
        let rows = reconcile(&r, &disks, 1000, 800);
        assert!(rows.iter().find(|l| l.name == "a").unwrap().too_old);
        assert!(!rows.iter().find(|l| l.name == "c").unwrap().too_old);
    }

    #[test]
    fn rename_keeps_the_tag_and_refuses_clashes() {
        let mut r = SnapshotRecord::new("100");
        r.snapshots.push(entry("a", "a", 1));
        r.snapshots.push(entry("b", "b", 2));
        r.rename("a", "pre-upgrade").unwrap();
        assert_eq!(r.by_name("pre-upgrade").unwrap().tag, "a");
        assert!(matches!(
            r.rename("pre-upgrade", "b"),
            Err(SnapshotError::Exists { .. })
        ));
        assert!(matches!(
            r.rename("nope", "c"),
            Err(SnapshotError::NotFound { .. })
        ));
        assert!(matches!(
            r.rename("b", "123"),
            Err(SnapshotError::BadName(..))
        ));
        r.describe("b", "before the upgrade").unwrap();
        assert_eq!(r.by_name("b").unwrap().description, "before the upgrade");
        // A new snapshot named like the old tag gets another tag.
        assert_eq!(r.fresh_tag("a", &[]), "a.2");
        assert_eq!(r.fresh_tag("z", &["z".into(), "z.2".into()]), "z.3");
        assert_eq!(r.fresh_tag("new", &[]), "new");
    }

    #[test]
    fn record_round_trips_and_refuses_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = SnapshotRecord::new("100");
        r.snapshots.push(entry("a", "a", 1));
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path(), "100").unwrap(), r);
        assert_eq!(load(dir.path(), "101").unwrap(), SnapshotRecord::new("101"));
        let p = record_path(dir.path(), "100");
        std::fs::write(&p, r#"{"version":2,"vmid":"100","snapshots":[]}"#).unwrap();
        let e = load(dir.path(), "100").unwrap_err();
        assert!(
            crate::chain(&e).contains("version 2 is not supported"),
            "{e}"
        );
        // A record copied under another VM's name is refused.
        std::fs::write(&p, r#"{"version":1,"vmid":"7","snapshots":[]}"#).unwrap();
        let e = load(dir.path(), "100").unwrap_err();
        assert!(crate::chain(&e).contains("holds VM \"7\""), "{e}");
    }

    #[test]
    fn qemu_snapshot_lists_are_parsed_leniently() {
        let v = serde_json::json!([
            {"id": "1", "name": "a", "vm-state-size": 123, "date-sec": 5},
            {"id": "2"},
            {"name": "b"}
        ]);
        let s = parse_qemu_snapshots(Some(&v));
        assert_eq!(s, vec![q("a", 123, 5), q("b", 0, 0)]);
        assert!(parse_qemu_snapshots(None).is_empty());
    }
}
