//! Deadlines and limits.

use std::time::Duration;

/// Hard ceiling for [`Config::max_reply_bytes`]: whatever the caller asks
/// for, one reply never buffers more than this.
pub const MAX_REPLY_BYTES_CEILING: usize = 16 << 20;

/// Deadlines and limits for one agent connection and its freeze guard.
///
/// `#[non_exhaustive]`: start from [`Config::default`] and set fields.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// `connect(2)` plus the `guest-sync-delimited` round-trip. F-01 asks
    /// that a missing agent is detected within 2 s.
    pub connect_timeout: Duration,
    /// Default deadline for one command, covering the whole reply.
    pub command_timeout: Duration,
    /// Deadline for `guest-fsfreeze-freeze` (it syncs dirty data first, so
    /// it may legitimately take a while; measured 65-106 ms on TCG).
    pub freeze_timeout: Duration,
    /// Deadline for one thaw attempt (reconnect + sync + thaw + status).
    pub thaw_attempt_timeout: Duration,
    /// The thaw loop gives up (and logs at error level) after this long.
    pub thaw_deadline: Duration,
    /// How long dropping an un-thawed [`crate::FreezeGuard`] blocks the
    /// dropping thread waiting for the background thaw; the thaw goes on
    /// after that (see [`crate::wait_for_drop_thaws`]).
    pub drop_wait: Duration,
    /// Per-reply cap (one line of JSON). libvirt uses 10 MiB; 1 MiB is
    /// plenty for every command here. Clamped to
    /// [`MAX_REPLY_BYTES_CEILING`].
    pub max_reply_bytes: usize,
    /// Maximum nesting of arrays/objects in a reply; checked on the raw
    /// bytes before the JSON parser runs.
    pub max_json_depth: usize,
    /// Well-formed replies that are not ours tolerated while waiting for
    /// one reply (late replies to commands we gave up on).
    pub max_unsolicited_replies: usize,
    /// Bytes discarded while waiting for our sync reply before giving up.
    pub max_sync_discard_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(10),
            freeze_timeout: Duration::from_secs(30),
            thaw_attempt_timeout: Duration::from_secs(5),
            thaw_deadline: Duration::from_secs(60),
            drop_wait: Duration::from_secs(3),
            max_reply_bytes: 1 << 20,
            max_json_depth: 32,
            max_unsolicited_replies: 16,
            max_sync_discard_bytes: 4 << 20,
        }
    }
}

impl Config {
    pub(crate) fn reply_cap(&self) -> usize {
        self.max_reply_bytes.clamp(4096, MAX_REPLY_BYTES_CEILING)
    }

    pub(crate) fn depth_cap(&self) -> usize {
        // serde_json's own recursion limit is 128; stay well below it.
        self.max_json_depth.clamp(4, 100)
    }
}
