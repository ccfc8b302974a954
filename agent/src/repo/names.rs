//! Names that become path components: strictly validated (F-46).
//!
//! A VM id or disk name is `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` and must not
//! contain `..`. It therefore never is `.`/`..`, never holds `/` or NUL, and
//! fits in any filesystem's name limit. Backup times are UTC, whole seconds,
//! `YYYY-MM-DDTHH:MM:SSZ` exactly (the round trip through the parser must
//! give the same string, so there is one spelling per instant).

use std::fmt;
use std::str::FromStr;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::error::{RepoError, Result};

/// Longest VM id or disk name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a VM id or disk name against the strict name rule.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let bytes = name.as_bytes();
    let ok_len = !bytes.is_empty() && bytes.len() <= MAX_NAME_LEN;
    let ok_first = bytes.first().is_some_and(u8::is_ascii_alphanumeric);
    let ok_rest = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok_len && ok_first && ok_rest && !name.contains("..") {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(RepoError::invalid(
            what,
            format!(
                "{shown:?}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,{}}} without \"..\"",
                MAX_NAME_LEN - 1
            ),
        ))
    }
}

/// A validated VM id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(String);

impl VmId {
    /// Validates `s` as a VM id.
    pub fn new(s: &str) -> Result<Self> {
        validate_name("VM id", s)?;
        Ok(VmId(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Formats a backup time as the canonical `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Parses a canonical backup time; any other spelling is rejected.
pub fn parse_time(s: &str) -> Result<OffsetDateTime> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| RepoError::invalid("backup time", format!("{s:?}: {e}")))?;
    if format_time(t) != s {
        return Err(RepoError::invalid(
            "backup time",
            format!("{s:?}: must be UTC whole seconds, YYYY-MM-DDTHH:MM:SSZ"),
        ));
    }
    Ok(t)
}

/// `vm/<vmid>/<UTC RFC 3339 time>`: names one backup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupId {
    vmid: VmId,
    time: OffsetDateTime,
}

impl BackupId {
    /// Builds an id; the time is truncated to whole seconds.
    pub fn new(vmid: VmId, time: OffsetDateTime) -> Self {
        let time = time.to_offset(UtcOffset::UTC);
        let time = time.replace_nanosecond(0).unwrap_or(time);
        BackupId { vmid, time }
    }

    /// The VM id.
    pub fn vmid(&self) -> &VmId {
        &self.vmid
    }

    /// The backup time (UTC).
    pub fn time(&self) -> OffsetDateTime {
        self.time
    }

    /// The canonical time string.
    pub fn time_str(&self) -> String {
        format_time(self.time)
    }

    /// Relative key of the snapshot directory in the repository.
    pub(crate) fn dir_key(&self) -> String {
        format!("backups/vm/{}/{}", self.vmid, self.time_str())
    }
}

impl PartialOrd for BackupId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BackupId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.vmid, self.time).cmp(&(&other.vmid, other.time))
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm/{}/{}", self.vmid, self.time_str())
    }
}

impl FromStr for BackupId {
    type Err = RepoError;

    fn from_str(s: &str) -> Result<Self> {
        let mut parts = s.splitn(3, '/');
        let (Some("vm"), Some(vmid), Some(time)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(RepoError::invalid(
                "backup id",
                format!("{s:?}: expected vm/<vmid>/<YYYY-MM-DDTHH:MM:SSZ>"),
            ));
        };
        Ok(BackupId {
            vmid: VmId::new(vmid)?,
            time: parse_time(time)?,
        })
    }
}

impl serde::Serialize for BackupId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BackupId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f46_hostile_names_rejected() {
        let long = "a".repeat(4096);
        for bad in [
            "",
            ".",
            "..",
            "../../x",
            "a/../../b",
            "a/b",
            "a\0b",
            "-x",
            ".hidden",
            "a..b",
            "ä",
            "a b",
            long.as_str(),
        ] {
            assert!(validate_name("test", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["100", "web-01", "drive-virtio0", "a.b_c", &"z".repeat(64)] {
            validate_name("test", good).unwrap();
        }
        validate_name("test", &"z".repeat(65)).unwrap_err();
    }

    #[test]
    fn backup_id_round_trip_and_strictness() {
        let id: BackupId = "vm/100/2024-05-01T12:00:00Z".parse().unwrap();
        assert_eq!(id.to_string(), "vm/100/2024-05-01T12:00:00Z");
        assert_eq!(id.dir_key(), "backups/vm/100/2024-05-01T12:00:00Z");
        for bad in [
            "vm/100/2024-05-01T12:00:00+01:00",
            "vm/100/2024-05-01T12:00:00.5Z",
            "vm/../2024-05-01T12:00:00Z",
            "ct/100/2024-05-01T12:00:00Z",
            "vm/100",
            "vm/100/2024-05-01T12:00:00Z/x",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad} accepted");
        }
    }
}
