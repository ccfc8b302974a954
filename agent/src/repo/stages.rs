//! CPU time per stage of the backup data path (issue 17's scaling model):
//! read, hash, compress, verify, encrypt, write, each with the bytes it
//! handled, summed over the threads of one disk's pipeline.
//!
//! Each thread's own CPU clock (`CLOCK_THREAD_CPUTIME_ID`, through
//! `rustix`: no `unsafe` here) is read before and after a stage's work on a
//! chunk, so the figure is CPU the thread used, not wall time it waited.
//! That is two clock reads per chunk and stage (a syscall of well under a
//! microsecond, against milliseconds of work on a 4 MiB chunk): always on.
//!
//! A pipeline thread [`attach`]es the disk's [`StageMeter`]; the blob and
//! writer code then [`charge`]s its work to the stage it belongs to. On a
//! thread with no meter (restore, sync, tests) `charge` only runs the work:
//! no clock is read. Charges do not nest: inside a charged piece of work,
//! a nested `charge` runs its work as part of the outer stage.
//!
//! What each stage holds (bytes: what the stage was given):
//! - `read`: the NBD reader threads (whole lifetime: connect, block status,
//!   reads, closing) and the thread that hands chunks to the pipeline;
//!   bytes received from the server.
//! - `hash`: the all-zero check and the chunk digest (BLAKE3, with the
//!   fingerprint of F-45's check in the same pass); bytes of
//!   the data chunks hashed.
//! - `compress`: the incompressibility probe, zstd, and the blob framing
//!   (CRC-32, the copy into the blob); plaintext bytes of new chunks.
//! - `verify`: the pre-store check of F-45 (decrypt, decompress, compare
//!   the XXH3-128 fingerprint taken with the digest);
//!   plaintext bytes checked.
//! - `encrypt`: AES-256-GCM of the payload (encrypted repositories only);
//!   payload bytes.
//! - `write`: the store's lookup of a chunk and the durable write of a new
//!   one (file, fsyncs, or an S3 PUT); encoded bytes written.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A stage of the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// NBD reader threads and the chunk hand-over.
    Read,
    /// Zero check and digest.
    Hash,
    /// Probe, zstd, blob framing.
    Compress,
    /// Pre-store decode and fingerprint check (F-45).
    Verify,
    /// AES-256-GCM.
    Encrypt,
    /// Store lookup and durable write.
    Write,
}

impl Stage {
    /// Every stage, in report order.
    pub const ALL: [Stage; 6] = [
        Stage::Read,
        Stage::Hash,
        Stage::Compress,
        Stage::Verify,
        Stage::Encrypt,
        Stage::Write,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one disk's data path, shared by its threads.
#[derive(Debug, Default)]
pub struct StageMeter {
    cpu_ns: [AtomicU64; 6],
    bytes: [AtomicU64; 6],
}

impl StageMeter {
    /// A meter at zero.
    pub fn new() -> Arc<StageMeter> {
        Arc::new(StageMeter::default())
    }

    /// Adds `cpu_ns` nanoseconds of CPU and `bytes` to `stage`.
    pub fn add(&self, stage: Stage, cpu_ns: u64, bytes: u64) {
        self.cpu_ns[stage.index()].fetch_add(cpu_ns, Ordering::Relaxed);
        self.bytes[stage.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    /// The figures so far.
    pub fn figures(&self) -> StageFigures {
        let f = |s: Stage| StageFigure {
            cpu_s: self.cpu_ns[s.index()].load(Ordering::Relaxed) as f64 / 1e9,
            bytes: self.bytes[s.index()].load(Ordering::Relaxed),
        };
        StageFigures {
            read: f(Stage::Read),
            hash: f(Stage::Hash),
            compress: f(Stage::Compress),
            verify: f(Stage::Verify),
            encrypt: f(Stage::Encrypt),
            write: f(Stage::Write),
        }
    }
}

/// One stage's CPU seconds and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFigure {
    /// CPU seconds (user + system) the stage's threads spent on it.
    pub cpu_s: f64,
    /// Bytes the stage handled (see the module documentation).
    pub bytes: u64,
}

/// Every stage's figures (`shear backup --json`: `disks[].stages`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFigures {
    /// NBD reader threads and the chunk hand-over.
    pub read: StageFigure,
    /// Zero check and digest.
    pub hash: StageFigure,
    /// Probe, zstd, blob framing.
    pub compress: StageFigure,
    /// Pre-store decode and fingerprint check (F-45).
    pub verify: StageFigure,
    /// AES-256-GCM (0 without encryption).
    pub encrypt: StageFigure,
    /// Store lookup and durable write.
    pub write: StageFigure,
}

impl StageFigures {
    /// The figure of `stage`.
    pub fn get(&self, stage: Stage) -> StageFigure {
        match stage {
            Stage::Read => self.read,
            Stage::Hash => self.hash,
            Stage::Compress => self.compress,
            Stage::Verify => self.verify,
            Stage::Encrypt => self.encrypt,
            Stage::Write => self.write,
        }
    }

    /// CPU seconds of every stage together.
    pub fn total_cpu_s(&self) -> f64 {
        Stage::ALL.iter().map(|s| self.get(*s).cpu_s).sum()
    }
}

/// CPU time this thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

thread_local! {
    static METER: RefCell<Option<Arc<StageMeter>>> = const { RefCell::new(None) };
    /// Inside a [`charge`]: nested charges belong to the outer one.
    static CHARGING: Cell<bool> = const { Cell::new(false) };
}

/// Charges this thread's stage work to `meter` from now on (`None`: stop).
pub fn attach(meter: Option<Arc<StageMeter>>) {
    METER.with(|m| *m.borrow_mut() = meter);
}

/// Runs `work`, charging the CPU time it takes on this thread and `bytes`
/// to `stage` of the thread's meter (no meter: just runs it).
pub fn charge<T>(stage: Stage, bytes: u64, work: impl FnOnce() -> T) -> T {
    let meter = if CHARGING.with(Cell::get) {
        None
    } else {
        METER.with(|m| m.borrow().clone())
    };
    let Some(meter) = meter else {
        return work();
    };
    CHARGING.with(|c| c.set(true));
    let t0 = thread_cpu_ns();
    let out = work();
    let spent = thread_cpu_ns().saturating_sub(t0);
    CHARGING.with(|c| c.set(false));
    meter.add(stage, spent, bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU work of a fixed size (not a fixed time: on a loaded machine
    /// the thread may get little of the wall time).
    fn spin(iterations: u64) -> u64 {
        let mut x = 1u64;
        for _ in 0..iterations {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        x
    }

    #[test]
    fn charges_cpu_and_bytes_to_the_attached_meter_only() {
        let meter = StageMeter::new();
        // No meter: nothing is counted anywhere.
        charge(Stage::Hash, 10, || spin(1_000_000));
        attach(Some(Arc::clone(&meter)));
        charge(Stage::Hash, 4096, || spin(20_000_000));
        // Sleeping is not CPU.
        charge(Stage::Write, 100, || {
            std::thread::sleep(std::time::Duration::from_millis(50));
        });
        // Nested: the outer stage gets it all.
        charge(Stage::Compress, 7, || {
            charge(Stage::Encrypt, 3, || spin(10_000_000))
        });
        attach(None);
        charge(Stage::Hash, 1, || spin(1_000_000));
        let f = meter.figures();
        assert_eq!(f.hash.bytes, 4096);
        assert!(f.hash.cpu_s > 0.0, "{f:?}");
        assert_eq!(f.write.bytes, 100);
        assert!(
            f.write.cpu_s < f.hash.cpu_s,
            "a sleep was counted as CPU: {f:?}"
        );
        assert_eq!(f.compress.bytes, 7);
        assert!(f.compress.cpu_s > 0.0, "{f:?}");
        assert_eq!(f.encrypt, StageFigure::default());
        assert_eq!(f.read, StageFigure::default());
        let sum = f.hash.cpu_s + f.write.cpu_s + f.compress.cpu_s;
        assert!((f.total_cpu_s() - sum).abs() < 1e-9);
    }

    #[test]
    fn thread_clock_counts_this_thread_only() {
        let t0 = thread_cpu_ns();
        // Another thread burning CPU does not move this thread's clock.
        std::thread::spawn(|| spin(50_000_000)).join().unwrap();
        let idle = thread_cpu_ns() - t0;
        let t1 = thread_cpu_ns();
        spin(50_000_000);
        let busy = thread_cpu_ns() - t1;
        assert!(busy > idle, "busy {busy} ns, idle {idle} ns");
    }
}
