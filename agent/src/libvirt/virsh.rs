//! libvirt through `virsh`: one subprocess per call, each with a deadline
//! (killed when it passes), in the C locale, with libvirt's message as the
//! error.

use std::path::Path;
use std::time::Duration;

use super::{parse_version, version_from_output, LibvirtError, MIN_LIBVIRT};

/// Deadline of a quick query (state, XML, lists).
pub const QUERY: Duration = Duration::from_secs(30);
/// Deadline of `backup-begin` (creates scratch files, starts the NBD
/// server; a loaded host takes seconds).
pub const BEGIN: Duration = Duration::from_secs(120);

/// A libvirt connection (`virsh -c URI`).
#[derive(Debug, Clone)]
pub struct Virsh {
    uri: String,
}

fn message(stderr: &[u8], stdout: &[u8], status: std::process::ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("error:").trim())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        let out = String::from_utf8_lossy(stdout);
        let out = out.trim();
        if out.is_empty() {
            status.to_string()
        } else {
            out.to_string()
        }
    } else {
        lines.join("; ")
    }
}

impl Virsh {
    /// A connection to `uri`.
    pub fn new(uri: &str) -> Virsh {
        Virsh { uri: uri.into() }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Run `virsh -c URI -q ARGS…`; its stdout, or why it failed.
    pub async fn run(&self, args: &[&str], deadline: Duration) -> Result<String, LibvirtError> {
        let cmd = args.first().copied().unwrap_or("").to_string();
        let child = tokio::process::Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .arg("-q")
            .args(args)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(deadline, child).await {
            Err(_) => {
                return Err(LibvirtError::Timeout {
                    cmd,
                    secs: deadline.as_secs(),
                })
            }
            Ok(Err(e)) => return Err(LibvirtError::Spawn(e)),
            Ok(Ok(o)) => o,
        };
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(LibvirtError::Failed {
                cmd,
                message: message(&out.stderr, &out.stdout, out.status),
            })
        }
    }

    /// The client library's version (`virsh --version`: instant, no
    /// connection), refused when older than [`MIN_LIBVIRT`]. The daemon's
    /// is checked by [`Virsh::daemon_too_old`] when a backup call fails
    /// (`virsh version --daemon` takes seconds: it probes the hypervisor).
    pub async fn check_version(&self) -> Result<String, LibvirtError> {
        let out = tokio::time::timeout(
            QUERY,
            tokio::process::Command::new("virsh")
                .arg("--version")
                .env("LC_ALL", "C")
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| LibvirtError::Timeout {
            cmd: "--version".into(),
            secs: QUERY.as_secs(),
        })?
        .map_err(LibvirtError::Spawn)?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        match parse_version(&v) {
            Some(n) if n >= MIN_LIBVIRT => Ok(v),
            Some(_) => Err(LibvirtError::TooOld { found: v }),
            None => Err(LibvirtError::Invalid(format!(
                "cannot tell libvirt's version from `virsh --version`: {v:?}"
            ))),
        }
    }

    /// The daemon's version when it is older than [`MIN_LIBVIRT`] (as
    /// [`LibvirtError::TooOld`]), to explain a failed call.
    pub async fn daemon_too_old(&self) -> Option<LibvirtError> {
        let out = self.run(&["version", "--daemon"], QUERY).await.ok()?;
        let v = version_from_output(&out)?;
        (parse_version(&v)? < MIN_LIBVIRT).then_some(LibvirtError::TooOld { found: v })
    }

    /// Dirty bytes per disk since checkpoint `name` (`checkpoint-dumpxml
    /// --size`); a disk whose bitmap QEMU cannot size is absent.
    pub async fn checkpoint_sizes(
        &self,
        domain: &str,
        name: &str,
    ) -> Result<Vec<(String, u64)>, LibvirtError> {
        let out = self
            .run(&["checkpoint-dumpxml", "--size", "--", domain, name], QUERY)
            .await?;
        super::xml::parse_checkpoint_sizes(&out)
    }

    /// `virsh dumpxml DOMAIN`.
    pub async fn dumpxml(&self, domain: &str) -> Result<String, LibvirtError> {
        self.run(&["dumpxml", "--", domain], QUERY).await
    }

    /// `virsh domstate DOMAIN` (`running`, `paused`, `shut off`, …).
    pub async fn domstate(&self, domain: &str) -> Result<String, LibvirtError> {
        Ok(self
            .run(&["domstate", "--", domain], QUERY)
            .await?
            .trim()
            .to_string())
    }

    /// Freeze the guest's filesystems through its agent.
    pub async fn fsfreeze(&self, domain: &str, deadline: Duration) -> Result<(), LibvirtError> {
        self.run(&["domfsfreeze", "--", domain], deadline)
            .await
            .map(drop)
    }

    /// Thaw the guest's filesystems.
    pub async fn fsthaw(&self, domain: &str, deadline: Duration) -> Result<(), LibvirtError> {
        self.run(&["domfsthaw", "--", domain], deadline)
            .await
            .map(drop)
    }

    /// The names of the domain's checkpoints.
    pub async fn checkpoints(&self, domain: &str) -> Result<Vec<String>, LibvirtError> {
        let out = self
            .run(&["checkpoint-list", "--name", "--", domain], QUERY)
            .await?;
        Ok(super::xml::parse_name_list(&out))
    }

    /// Delete a checkpoint (libvirt keeps the changes it tracked for the
    /// checkpoints around it). When QEMU cannot (its bitmap is broken or
    /// gone), the metadata alone goes.
    pub async fn checkpoint_delete(&self, domain: &str, name: &str) -> Result<(), LibvirtError> {
        match self
            .run(&["checkpoint-delete", "--", domain, name], QUERY)
            .await
        {
            Ok(_) => Ok(()),
            Err(first) => self
                .run(
                    &["checkpoint-delete", "--metadata", "--", domain, name],
                    QUERY,
                )
                .await
                .map(drop)
                .map_err(|_| first),
        }
    }

    /// `virsh backup-begin` with backup (and checkpoint) XML files.
    pub async fn backup_begin(
        &self,
        domain: &str,
        backup_xml: &Path,
        checkpoint_xml: Option<&Path>,
    ) -> Result<(), LibvirtError> {
        let b = backup_xml.display().to_string();
        let mut args = vec!["backup-begin", "--domain", domain, "--backupxml", &b];
        let c = checkpoint_xml.map(|p| p.display().to_string());
        if let Some(c) = &c {
            args.extend(["--checkpointxml", c]);
        }
        self.run(&args, BEGIN).await.map(drop)
    }

    /// Whether the domain has a job (`domjobinfo`'s "Job type" is not None).
    /// A domain that is not running has none.
    pub async fn job_active(&self, domain: &str) -> Result<bool, LibvirtError> {
        let out = match self.run(&["domjobinfo", "--", domain], QUERY).await {
            Ok(o) => o,
            Err(e) => {
                return match self.domstate(domain).await {
                    Ok(st) if st != "running" && st != "paused" => Ok(false),
                    _ => Err(e),
                }
            }
        };
        Ok(out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Job type:"))
            .is_some_and(|t| t.trim() != "None"))
    }

    /// End the domain's job (a pull-mode backup ends this way) and wait
    /// until libvirt says it is gone.
    pub async fn job_end(&self, domain: &str, deadline: Duration) -> Result<(), LibvirtError> {
        let t0 = std::time::Instant::now();
        if self.job_active(domain).await? {
            if let Err(e) = self.run(&["domjobabort", "--", domain], QUERY).await {
                // It may have ended meanwhile.
                if self.job_active(domain).await? {
                    return Err(e);
                }
            }
        }
        while self.job_active(domain).await? {
            if t0.elapsed() > deadline {
                return Err(LibvirtError::Timeout {
                    cmd: "domjobabort".into(),
                    secs: deadline.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Pause the domain's vCPUs (`virsh suspend`).
    pub async fn suspend(&self, domain: &str) -> Result<(), LibvirtError> {
        self.run(&["suspend", "--", domain], QUERY).await.map(drop)
    }

    /// Let a paused domain run (`virsh resume`).
    pub async fn resume(&self, domain: &str) -> Result<(), LibvirtError> {
        self.run(&["resume", "--", domain], QUERY).await.map(drop)
    }

    /// Ask the guest to power down through the ACPI power button (as the
    /// QMP path's `system_powerdown`).
    pub async fn shutdown_acpi(&self, domain: &str) -> Result<(), LibvirtError> {
        self.run(&["shutdown", "--mode", "acpi", "--", domain], QUERY)
            .await
            .map(drop)
    }

    /// Start a shut-off domain, its vCPUs paused when `paused`.
    pub async fn start(&self, domain: &str, paused: bool) -> Result<(), LibvirtError> {
        let mut args = vec!["start"];
        if paused {
            args.push("--paused");
        }
        args.extend(["--", domain]);
        self.run(&args, BEGIN).await.map(drop)
    }

    /// Whether the domain is persistent (`dominfo`'s "Persistent: yes"): a
    /// transient one is gone once shut down.
    pub async fn is_persistent(&self, domain: &str) -> Result<bool, LibvirtError> {
        let out = self.run(&["dominfo", "--", domain], QUERY).await?;
        Ok(out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Persistent:"))
            .is_some_and(|v| v.trim() == "yes"))
    }

    /// The domain called `name_or_uuid` (by name, else by UUID; never by
    /// libvirt's numeric id, which a VM id like `100` would match by
    /// accident): its name, or `None`.
    pub async fn find_domain(&self, name_or_uuid: &str) -> Result<Option<String>, LibvirtError> {
        let names = self.run(&["list", "--all", "--name"], QUERY).await?;
        if super::xml::parse_name_list(&names)
            .iter()
            .any(|n| n == name_or_uuid)
        {
            return Ok(Some(name_or_uuid.to_string()));
        }
        if !super::looks_like_uuid(name_or_uuid) {
            return Ok(None);
        }
        match self.run(&["domname", "--", name_or_uuid], QUERY).await {
            Ok(n) if !n.trim().is_empty() => Ok(Some(n.trim().to_string())),
            Ok(_) | Err(LibvirtError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `virsh define FILE`: the name of the defined domain.
    pub async fn define(&self, file: &Path) -> Result<String, LibvirtError> {
        let f = file.display().to_string();
        self.run(&["define", "--file", &f], QUERY).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn libvirt_messages_lose_the_error_prefix() {
        let st = std::process::ExitStatus::from_raw(256);
        assert_eq!(
            message(
                b"error: failed to get domain 'x'\nerror: Domain not found\n",
                b"",
                st
            ),
            "failed to get domain 'x'; Domain not found"
        );
        assert_eq!(message(b"", b"", st), "exit status: 1");
    }
}
