//! libvirt domains: `shear backup DOMAIN --libvirt` and `shear restore
//! --libvirt`, through libvirt's own backup API (libvirt owns QEMU's
//! monitor, so shear cannot have a QMP socket of its own).
//!
//! - [`virsh`]: every libvirt call, as a `virsh` subprocess with a
//!   deadline and a typed error; the daemon's version is checked first;
//! - [`xml`]: domain XML (disks; adapted for a restore), backup XML
//!   (pull mode, unix-socket NBD server, scratch files), checkpoint XML;
//! - [`backup`]: the job: freeze, `backup-begin`, thaw, read every disk
//!   with shear's NBD data path (block status, and the checkpoint's
//!   `qemu:dirty-bitmap:backup-<disk>` context for an incremental), end
//!   the job, commit, then retire the previous checkpoint.

pub mod backup;
pub mod rescue;
pub mod virsh;
pub mod xml;

/// The oldest libvirt daemon shear's libvirt backups work with: pull-mode
/// backups with checkpoints are enabled in the QEMU driver by default from
/// 7.2.0 on (before, behind a QEMU capability flag).
pub const MIN_LIBVIRT: (u32, u32, u32) = (7, 2, 0);

/// Default connection URI.
pub const DEFAULT_URI: &str = "qemu:///system";

/// What a libvirt call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// `virsh` could not be started.
    #[error("cannot run virsh (install libvirt-clients)")]
    Spawn(#[source] std::io::Error),
    /// A call did not finish in time (it was killed).
    #[error("virsh {cmd} did not finish within {secs} s")]
    Timeout {
        /// The virsh command.
        cmd: String,
        /// Its deadline.
        secs: u64,
    },
    /// A call failed; libvirt's message.
    #[error("virsh {cmd} failed: {message}")]
    Failed {
        /// The virsh command.
        cmd: String,
        /// What virsh said on stderr (or its exit status).
        message: String,
    },
    /// The daemon is older than [`MIN_LIBVIRT`].
    #[error(
        "libvirt {found} is too old: shear's libvirt backups need libvirt >= {}.{}.{} \
         (pull-mode backups with checkpoints)",
        MIN_LIBVIRT.0, MIN_LIBVIRT.1, MIN_LIBVIRT.2
    )]
    TooOld {
        /// The version found.
        found: String,
    },
    /// XML that could not be parsed or lacks what shear needs.
    #[error("libvirt XML: {0}")]
    Xml(String),
    /// Anything else about the domain, said plainly.
    #[error("{0}")]
    Invalid(String),
}

impl LibvirtError {
    /// Whether retrying later unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LibvirtError::Timeout { .. })
    }
}

/// Whether `s` has a UUID's shape (8-4-4-4-12 hex digits).
pub fn looks_like_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parse a version `X.Y.Z` (or `X.Y`).
pub fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let mut it = s.trim().split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next().map_or(Some(0), |c| c.parse().ok())?;
    Some((a, b, c))
}

/// The daemon's version from `virsh version --daemon` output ("Running
/// against daemon: 11.3.0"), else the library's.
pub fn version_from_output(out: &str) -> Option<String> {
    let find = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().trim_start_matches("libvirt").trim().to_string())
    };
    find("Running against daemon:").or_else(|| find("Using library:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_parsed_and_compared_as_numbers() {
        let out = "Compiled against library: libvirt 11.3.0\nUsing library: libvirt 11.3.0\n\
                   Using API: QEMU 11.3.0\nRunning hypervisor: QEMU 10.0.2\n\
                   Running against daemon: 11.3.0\n";
        assert_eq!(version_from_output(out).as_deref(), Some("11.3.0"));
        assert_eq!(
            version_from_output("Using library: libvirt 7.1.0\n").as_deref(),
            Some("7.1.0")
        );
        assert_eq!(parse_version("11.3.0"), Some((11, 3, 0)));
        assert_eq!(parse_version("9.0"), Some((9, 0, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(parse_version("11.3.0").unwrap() >= MIN_LIBVIRT);
        assert!(parse_version("7.10.0").unwrap() >= MIN_LIBVIRT);
        assert!(parse_version("7.1.0").unwrap() < MIN_LIBVIRT);
        let e = LibvirtError::TooOld {
            found: "6.0.0".into(),
        };
        assert!(e.to_string().contains(">= 7.2.0"), "{e}");
    }

    #[test]
    fn uuids_are_told_from_names_and_vm_ids() {
        assert!(looks_like_uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fa0"));
        assert!(!looks_like_uuid("100"));
        assert!(!looks_like_uuid("web-01"));
        assert!(!looks_like_uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fa"));
        assert!(!looks_like_uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fzz"));
    }
}
