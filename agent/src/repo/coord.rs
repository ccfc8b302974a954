//! Coordination without locks, for object stores ([`Coordination::Markers`]).
//!
//! An object store has no lock, no rename and (on many servers) no honoured
//! conditional PUT. What it has, and all this relies on: a PUT is atomic,
//! listings and reads after a completed PUT/DELETE see it (strong
//! read-after-write consistency, as AWS S3 and the usual servers give), and
//! every object carries a modification time from the *server's* clock. Only
//! server times are compared with each other; the clients' clocks never
//! matter (no clock-skew failure).
//!
//! Objects (under `coord/`):
//! - `in-progress/<vmid>-<time>-<rand>.json`: a running backup's marker;
//! - `gc/<rand>.json`: a running GC's marker (one per GC run);
//! - `gc-epoch`: a random value GC rewrites before it deletes any chunk;
//!   a writer's local cache of known chunks is valid only for the epoch it
//!   was filled in.
//!
//! Each marker is a *lease*: rewritten every lease/4 (heartbeat) by a
//! thread of its holder, deleted when the holder is done, and taken for
//! dead by others when its server time is older than its lease (recorded in
//! the marker itself, so all parties agree on it).
//!
//! The handshake (Dekker's, over a strongly consistent store):
//! - a **writer** writes its marker, *then* looks for a live GC marker; if
//!   one exists it waits until it is gone (or stale) before it reads the
//!   epoch and makes any dedup decision;
//! - **GC** writes its marker, *then* lists writers' markers; if a live one
//!   exists it deletes nothing (the report says so; the next run will).
//!   Otherwise it marks every manifest (after the listing, so a backup that
//!   committed and removed its marker before is seen), bumps the epoch, and
//!   deletes unreferenced chunks older than the grace period.
//!
//! Whatever the interleaving, one side sees the other: either GC defers,
//! or the writer starts its dedup decisions after GC's deletions are over
//! (and then sees the chunks as absent, and its cache as stale). A holder
//! checks before its last step (a writer's manifest, each GC deletion) that
//! its heartbeats never lapsed for half a lease (fencing): a process stopped
//! longer than its lease (F-38 on an object store) fails instead of acting
//! on a decision others may have overtaken.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::error::{ErrorKind, RepoError, Result};
use super::format::Digest;
use super::names::BackupId;

pub(crate) const IN_PROGRESS_KEY: &str = "coord/in-progress";
pub(crate) const GC_KEY: &str = "coord/gc";
pub(crate) const EPOCH_KEY: &str = "coord/gc-epoch";
pub(crate) const CLOCK_KEY: &str = "coord/clock";
/// The snapshot directory of the last committed backup (F-41: GC and prune
/// refuse a listing that misses it).
pub(crate) const LAST_COMMIT_KEY: &str = "coord/last-commit";

/// Records `dir` as the last committed backup (best effort: only a
/// cross-check for listings).
pub(crate) fn note_commit(b: &dyn Backend, dir: &str) {
    if let Err(e) = b.put(LAST_COMMIT_KEY, dir.as_bytes()) {
        tracing::warn!("could not record the last commit: {}", crate::chain(&e));
    }
}

/// Default lease of a writer's marker.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// The lease writers use (`SHEAR_S3_LEASE_SECS`, for tests; default 15 min).
pub fn lease() -> Duration {
    std::env::var("SHEAR_S3_LEASE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_LEASE, Duration::from_secs)
}

/// GC's grace period: younger unreferenced chunks are not deleted
/// (`SHEAR_S3_GC_GRACE_SECS`; default one hour).
pub fn gc_grace() -> Duration {
    std::env::var("SHEAR_S3_GC_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(3600), Duration::from_secs)
}

fn rand_hex() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A running backup's marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub backup: String,
    pub host: String,
    pub pid: u32,
    /// Server time of the first write (0 in the first write itself).
    pub started_ms: i64,
    pub lease_ms: i64,
}

/// The store's current time: the server time of a probe object.
pub(crate) fn server_now(b: &dyn Backend) -> Result<i64> {
    let key = format!("{CLOCK_KEY}/{}", rand_hex());
    b.put(&key, b"")?;
    let t = b.modified_ms(&key)?;
    let _ = b.delete(&key);
    t.ok_or_else(|| RepoError::corrupt(key, "probe object vanished after it was written"))
}

/// Reads the GC epoch ("" when no GC ever deleted).
pub(crate) fn epoch(b: &dyn Backend) -> Result<String> {
    match b.get(EPOCH_KEY, 1024) {
        Ok(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// Starts a new GC epoch (before any chunk is deleted).
pub(crate) fn bump_epoch(b: &dyn Backend) -> Result<()> {
    b.put(EPOCH_KEY, rand_hex().as_bytes())
}

/// Every marker under `prefix` with its server time: (key, modified, marker).
pub(crate) fn markers(b: &dyn Backend, prefix: &str) -> Result<Vec<(String, i64, Option<Marker>)>> {
    let mut out = Vec::new();
    for o in b.list_objects(prefix)? {
        let m = match b.get(&o.key, 64 << 10) {
            Ok(x) => serde_json::from_slice::<Marker>(&x).ok(),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.push((o.key, o.modified_ms, m));
    }
    Ok(out)
}

/// Whether a marker is live at server time `now`. An unreadable marker
/// counts as live for the default lease (never as an excuse to delete).
pub(crate) fn is_live(modified: i64, m: Option<&Marker>, now: i64) -> bool {
    let lease = m.map_or(ms(DEFAULT_LEASE), |m| m.lease_ms.max(1000));
    now - modified <= lease
}

/// A held marker (a writer's or GC's) and its heartbeat thread.
pub(crate) struct Lease {
    backend: Arc<dyn Backend>,
    key: String,
    lease: Duration,
    stop: Arc<AtomicBool>,
    beat: Arc<Mutex<Beat>>,
    thread: Option<JoinHandle<()>>,
    /// Server time of the marker's first write.
    pub started_ms: i64,
}

struct Beat {
    /// Start of the last successful heartbeat write.
    last_start: Instant,
    /// Some gap between two successful writes exceeded half the lease.
    lapsed: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

/// Live markers under `prefix` at the store's time now.
pub(crate) fn live_markers(b: &dyn Backend, prefix: &str) -> Result<Vec<(String, Option<Marker>)>> {
    let list = markers(b, prefix)?;
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let now = server_now(b)?;
    Ok(list
        .into_iter()
        .filter(|(_, t, m)| is_live(*t, m.as_ref(), now))
        .map(|(k, _, m)| (k, m))
        .collect())
}

impl Lease {
    /// Writes a marker `<prefix>/<name>-<rand>.json` and starts its heartbeat.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        prefix: &str,
        name: &str,
        what: &str,
    ) -> Result<Lease> {
        let lease = lease();
        let key = format!("{prefix}/{name}-{}.json", rand_hex());
        let mut marker = Marker {
            backup: what.to_owned(),
            host: std::fs::read_to_string("/etc/hostname")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            pid: std::process::id(),
            started_ms: 0,
            lease_ms: ms(lease),
        };
        let json = |m: &Marker| serde_json::to_vec(m).unwrap_or_default();
        backend.put(&key, &json(&marker))?;
        let started = backend
            .modified_ms(&key)?
            .ok_or_else(|| RepoError::corrupt(&key, "marker vanished after it was written"))?;
        marker.started_ms = started;
        let stop = Arc::new(AtomicBool::new(false));
        let beat = Arc::new(Mutex::new(Beat {
            last_start: Instant::now(),
            lapsed: false,
        }));
        let thread = {
            let (backend, key, stop, beat) = (
                Arc::clone(&backend),
                key.clone(),
                Arc::clone(&stop),
                Arc::clone(&beat),
            );
            let body = json(&marker);
            let every = lease / 4;
            std::thread::Builder::new()
                .name("shear-heartbeat".into())
                .spawn(move || {
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        if Instant::now() >= next {
                            let t = Instant::now();
                            if backend.put(&key, &body).is_ok() {
                                // The server stamped the previous write no
                                // earlier than its start and this one no
                                // later than now: that gap is what others
                                // may have seen.
                                let mut b = beat.lock().unwrap_or_else(|p| p.into_inner());
                                if b.last_start.elapsed() > lease / 2 {
                                    b.lapsed = true;
                                }
                                b.last_start = t;
                            }
                            next = Instant::now() + every;
                        }
                        std::thread::sleep(Duration::from_millis(50).min(every));
                    }
                })
                .ok()
        };
        Ok(Lease {
            backend,
            key,
            lease,
            stop,
            beat,
            thread,
            started_ms: started,
        })
    }

    /// Fencing: fails if the heartbeat lapsed for half a lease or the
    /// marker is gone.
    pub fn check_fresh(&self) -> Result<()> {
        let (since, lapsed) = {
            let b = self.beat.lock().unwrap_or_else(|p| p.into_inner());
            (b.last_start.elapsed(), b.lapsed)
        };
        if lapsed || since > self.lease / 2 || self.backend.size(&self.key)?.is_none() {
            return Err(RepoError::Busy {
                what: format!(
                    "the in-progress marker {} was not renewed for {}s (lease {}s): others may \
                     have taken this process for dead, so it stops here; run it again",
                    self.key,
                    since.as_secs(),
                    self.lease.as_secs()
                ),
            });
        }
        Ok(())
    }

    /// Stops the heartbeat and deletes the marker.
    pub fn end(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.backend.delete(&self.key);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.stop.load(Ordering::Acquire) {
            self.finish();
        }
    }
}

/// A writer's side of the handshake: its marker, then (after any running
/// GC is over) the epoch its cache must match.
pub(crate) fn begin_writer(backend: &Arc<dyn Backend>, id: &BackupId) -> Result<(Lease, String)> {
    begin_writer_named(
        backend,
        &format!("{}-{}", id.vmid(), id.time_str()),
        &id.to_string(),
    )
}

/// [`begin_writer`] for a writer that is not one backup (a sync).
pub(crate) fn begin_writer_named(
    backend: &Arc<dyn Backend>,
    name: &str,
    what: &str,
) -> Result<(Lease, String)> {
    let lease = Lease::acquire(Arc::clone(backend), IN_PROGRESS_KEY, name, what)?;
    // Wait for a running GC's deletions to end (bounded by its lease: a
    // dead GC's marker goes stale).
    let deadline = Instant::now() + self::lease() * 4;
    loop {
        let gcs = live_markers(&**backend, GC_KEY)?;
        if gcs.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(RepoError::Busy {
                what: "a garbage collection kept running on this repository".into(),
            });
        }
        tracing::info!("waiting for a garbage collection ({}) to finish", gcs[0].0);
        std::thread::sleep(Duration::from_millis(500));
    }
    let epoch = epoch(&**backend)?;
    Ok((lease, epoch))
}

/// A local cache of chunks known to exist in one repository, valid for one
/// GC epoch: a backup does not pay a HEAD per chunk it has seen before.
#[derive(Debug)]
pub(crate) struct ChunkCache {
    path: Option<PathBuf>,
    epoch: String,
    pub known: HashSet<Digest>,
}

impl ChunkCache {
    fn dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("SHEAR_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        if rustix::process::geteuid().is_root() {
            return Some(PathBuf::from("/var/cache/shear"));
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("shear"))
    }

    /// Loads the cache of repository `repo_id` if it belongs to `epoch`.
    pub fn load(repo_id: &str, epoch: &str) -> ChunkCache {
        let path = Self::dir().map(|d| d.join(format!("chunks-{repo_id}")));
        let mut known = HashSet::new();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            let mut lines = text.lines();
            if lines.next() == Some(&format!("epoch {epoch}")) {
                for l in lines {
                    let mut d = [0u8; 32];
                    if hex::decode_to_slice(l.trim(), &mut d).is_ok() {
                        known.insert(d);
                    }
                }
            }
        }
        ChunkCache {
            path,
            epoch: epoch.to_owned(),
            known,
        }
    }

    /// Saves `known` (best effort: the cache is only an optimisation).
    pub fn save(&self, more: &HashSet<Digest>) {
        let Some(path) = &self.path else { return };
        let mut text = format!("epoch {}\n", self.epoch);
        for d in self.known.union(more) {
            text.push_str(&hex::encode(d));
            text.push('\n');
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ =
            crate::fsutil::write_atomic(path, text.as_bytes(), crate::fsutil::Existing::Replace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_liveness_uses_its_own_lease_and_server_times() {
        let m = Marker {
            backup: "vm/100/x".into(),
            host: "h".into(),
            pid: 1,
            started_ms: 1000,
            lease_ms: 5000,
        };
        assert!(is_live(10_000, Some(&m), 15_000));
        assert!(!is_live(10_000, Some(&m), 15_001));
        // Unreadable marker: live for the default lease, never "dead".
        assert!(is_live(0, None, ms(DEFAULT_LEASE)));
        assert!(!is_live(0, None, ms(DEFAULT_LEASE) + 1));
    }

    #[test]
    fn chunk_cache_is_dropped_when_gc_changed_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("SHEAR_CACHE_DIR", dir.path());
        let mut c = ChunkCache::load("repo1", "e1");
        assert!(c.known.is_empty());
        c.known.insert([7u8; 32]);
        c.save(&HashSet::from([[8u8; 32]]));
        let same = ChunkCache::load("repo1", "e1");
        assert_eq!(same.known.len(), 2);
        let after_gc = ChunkCache::load("repo1", "e2");
        assert!(
            after_gc.known.is_empty(),
            "a cache from another GC epoch was trusted"
        );
        assert!(ChunkCache::load("repo2", "e1").known.is_empty());
    }
}
