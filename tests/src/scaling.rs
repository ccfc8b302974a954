//! The scaling model of issue 17 (used by the bench's `--only scaling`
//! phase): from the per-stage CPU figures one `shear backup --json` reports
//! (`disks[].stages`, agent/src/repo/stages.rs), the CPU seconds per GiB
//! read of each stage, and from those the data path's throughput on more
//! cores.
//!
//! Where each stage runs decides how it scales:
//! - `hash`, `compress`, `verify`, `encrypt` run on the `--workers` CPU
//!   workers: they scale with the workers;
//! - `write` runs on the pipeline's store threads (4): it scales up to 4;
//! - `read` is serial: one NBD reader thread (one io_uring for all
//!   connections) plus the one thread that hands chunks to the workers;
//! - QEMU's own CPU (NBD server, block layer) runs on the same host;
//! - the read ceiling (`nbdcopy URI null:` of the same export, measured in
//!   the same run) bounds reading whatever shear does.
//!
//! With `c_s` the CPU seconds per GiB read of stage `s`, `P = c_hash +
//! c_compress + c_verify + c_encrypt`, `C = Σ c_s + c_qemu`, `n` cores and
//! `w` workers, the data path's throughput in GiB/s is
//!
//! ```text
//! X(n, w) = min( w / P,            parallel stages on the workers
//!                1 / c_read,       the serial read stage
//!                min(n, 4) / c_write,
//!                R,                the read ceiling
//!                n / C )           every stage and QEMU sharing n cores
//! ```
//!
//! A stage with no cost sets no bound. The model assumes the stages
//! overlap perfectly (a pipeline with enough buffering: shear's budget is
//! 64 MiB) and that the CPU per GiB stays what it was in the measured run;
//! it is optimistic where stages wait on each other.

use serde_json::Value;

/// The stages `shear backup --json` reports, in order.
pub const STAGES: [&str; 6] = ["read", "hash", "compress", "verify", "encrypt", "write"];

/// Store threads of shear's pipeline (`shear::repo::STORE_THREADS`).
pub const STORE_THREADS: usize = 4;

const GIB: f64 = (1u64 << 30) as f64;

/// CPU and bytes of each stage, summed over a backup's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTotals {
    /// `(cpu_s, bytes)` per stage, in [`STAGES`] order.
    pub stages: [(f64, u64); 6],
    /// Bytes read from the exports (`disks[].bytes_read`).
    pub bytes_read: u64,
}

impl StageTotals {
    /// The totals of one backup report (an element of `shear backup
    /// --json`'s array); `None` if a disk lacks its stage figures.
    pub fn from_report(report: &Value) -> Option<StageTotals> {
        let mut t = StageTotals::default();
        for d in report["disks"].as_array()? {
            t.bytes_read += d["bytes_read"].as_u64()?;
            for (k, name) in STAGES.iter().enumerate() {
                let s = &d["stages"][name];
                t.stages[k].0 += s["cpu_s"].as_f64()?;
                t.stages[k].1 += s["bytes"].as_u64()?;
            }
        }
        Some(t)
    }

    /// CPU seconds of `stage`.
    pub fn cpu_s(&self, stage: &str) -> f64 {
        STAGES
            .iter()
            .position(|s| *s == stage)
            .map_or(0.0, |k| self.stages[k].0)
    }

    /// Bytes `stage` handled.
    pub fn bytes(&self, stage: &str) -> u64 {
        STAGES
            .iter()
            .position(|s| *s == stage)
            .map_or(0, |k| self.stages[k].1)
    }
}

/// CPU seconds per GiB read, per stage, plus QEMU's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Costs {
    /// Per stage, in [`STAGES`] order.
    pub per_gib: [f64; 6],
    /// QEMU's CPU seconds per GiB read during the same backup.
    pub qemu_per_gib: f64,
}

impl Costs {
    /// From one backup's totals and QEMU's CPU meanwhile.
    pub fn from_totals(t: &StageTotals, qemu_cpu_s: f64) -> Option<Costs> {
        if t.bytes_read == 0 {
            return None;
        }
        let gib = t.bytes_read as f64 / GIB;
        let mut per_gib = [0.0; 6];
        for (k, (cpu, _)) in t.stages.iter().enumerate() {
            per_gib[k] = cpu / gib;
        }
        Some(Costs {
            per_gib,
            qemu_per_gib: qemu_cpu_s.max(0.0) / gib,
        })
    }

    /// Cost of `stage` per GiB read.
    pub fn of(&self, stage: &str) -> f64 {
        STAGES
            .iter()
            .position(|s| *s == stage)
            .map_or(0.0, |k| self.per_gib[k])
    }

    /// The stages that run on the workers (`P`).
    pub fn parallel(&self) -> f64 {
        self.of("hash") + self.of("compress") + self.of("verify") + self.of("encrypt")
    }

    /// Every stage and QEMU (`C`).
    pub fn total(&self) -> f64 {
        self.per_gib.iter().sum::<f64>() + self.qemu_per_gib
    }
}

/// The model: costs plus the read ceiling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    /// CPU per GiB read.
    pub costs: Costs,
    /// The read ceiling, GiB/s (`f64::INFINITY`: not measured).
    pub read_ceiling: f64,
}

/// A predicted throughput and what bounds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// GiB read per second of the data path.
    pub gib_s: f64,
    /// The bound that is lowest: `workers`, `read stage`, `store threads`,
    /// `read ceiling` or `cores`.
    pub bound: &'static str,
}

impl Model {
    /// Throughput of the data path with `cores` cores and `workers`
    /// workers (see the module documentation for the formula).
    pub fn predict(&self, cores: usize, workers: usize) -> Prediction {
        let c = &self.costs;
        // A bound of `capacity / cost`; no cost, no bound.
        let rate = |capacity: f64, cost: f64| {
            if cost > 0.0 {
                capacity / cost
            } else {
                f64::INFINITY
            }
        };
        let n = cores.max(1) as f64;
        let bounds = [
            ("workers", rate(workers.max(1) as f64, c.parallel())),
            ("read stage", rate(1.0, c.of("read"))),
            (
                "store threads",
                rate(cores.clamp(1, STORE_THREADS) as f64, c.of("write")),
            ),
            ("read ceiling", self.read_ceiling),
            ("cores", rate(n, c.total())),
        ];
        let (bound, gib_s) =
            bounds
                .iter()
                .copied()
                .fold(("none", f64::INFINITY), |best, (name, x)| {
                    if x < best.1 {
                        (name, x)
                    } else {
                        best
                    }
                });
        Prediction { gib_s, bound }
    }

    /// Seconds the data path needs for `bytes` at the predicted rate.
    pub fn predict_seconds(&self, cores: usize, workers: usize, bytes: u64) -> f64 {
        bytes as f64 / GIB / self.predict(cores, workers).gib_s
    }
}

/// Relative error of a prediction: `(predicted - measured) / measured`.
pub fn relative_error(predicted: f64, measured: f64) -> f64 {
    if measured > 0.0 {
        (predicted - measured) / measured
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stage(cpu: f64, bytes: u64) -> Value {
        json!({"cpu_s": cpu, "bytes": bytes})
    }

    /// Two disks of 0.5 GiB read each, chosen so that per GiB read:
    /// read 0.2, hash 0.4, compress 1.2, verify 0.3, encrypt 0.1, write 0.25.
    fn report() -> Value {
        let half = 1u64 << 29;
        let disk = |k: f64| {
            json!({
                "bytes_read": half,
                "stages": {
                    "read": stage(0.1 * k, half),
                    "hash": stage(0.2 * k, half),
                    "compress": stage(0.6 * k, half),
                    "verify": stage(0.15 * k, half),
                    "encrypt": stage(0.05 * k, half / 2),
                    "write": stage(0.125 * k, half / 2),
                }
            })
        };
        json!({"disks": [disk(1.0), disk(1.0)]})
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn totals_and_costs_per_gib() {
        let t = StageTotals::from_report(&report()).unwrap();
        assert_eq!(t.bytes_read, 1 << 30);
        assert!(close(t.cpu_s("compress"), 1.2));
        assert_eq!(t.bytes("write"), 1 << 29);
        let c = Costs::from_totals(&t, 0.75).unwrap();
        assert!(close(c.of("read"), 0.2));
        assert!(close(c.of("hash"), 0.4));
        assert!(close(c.of("write"), 0.25));
        assert!(close(c.qemu_per_gib, 0.75));
        // P = 0.4 + 1.2 + 0.3 + 0.1; C = P + 0.2 + 0.25 + 0.75.
        assert!(close(c.parallel(), 2.0));
        assert!(close(c.total(), 3.2));
        // Nothing read: no costs per GiB.
        let empty = StageTotals::default();
        assert_eq!(Costs::from_totals(&empty, 1.0), None);
        // A disk without stage figures (an older shear): no totals.
        assert_eq!(
            StageTotals::from_report(&json!({"disks": [{"bytes_read": 1}]})),
            None
        );
    }

    #[test]
    fn prediction_is_the_lowest_bound() {
        let t = StageTotals::from_report(&report()).unwrap();
        let m = Model {
            costs: Costs::from_totals(&t, 0.75).unwrap(),
            read_ceiling: 3.0,
        };
        // 1 core: every stage shares it: 1 / 3.2.
        let p = m.predict(1, 1);
        assert_eq!(p.bound, "cores");
        assert!(close(p.gib_s, 1.0 / 3.2));
        // 2 cores, 1 worker: workers 1/2 = 0.5 < cores 2/3.2 = 0.625.
        let p = m.predict(2, 1);
        assert_eq!(p.bound, "workers");
        assert!(close(p.gib_s, 0.5));
        // 2 cores, 2 workers: cores 0.625 < workers 1.0.
        let p = m.predict(2, 2);
        assert_eq!(p.bound, "cores");
        assert!(close(p.gib_s, 2.0 / 3.2));
        // 8 cores: workers 4.0, cores 2.5, read stage 5, store 16, ceiling 3.
        let p = m.predict(8, 8);
        assert_eq!(p.bound, "cores");
        assert!(close(p.gib_s, 2.5));
        // 16 cores: cores 5.0, workers 8, read stage 5.0, ceiling 3.
        let p = m.predict(16, 16);
        assert_eq!(p.bound, "read ceiling");
        assert!(close(p.gib_s, 3.0));
        // Without a ceiling the serial read stage bounds it (5 GiB/s).
        let free = Model {
            read_ceiling: f64::INFINITY,
            ..m
        };
        let p = free.predict(32, 32);
        assert_eq!(p.bound, "read stage");
        assert!(close(p.gib_s, 5.0));
        // Seconds for 1.5 GiB at 2 cores, 1 worker: 1.5 / 0.5.
        assert!(close(m.predict_seconds(2, 1, 3 << 29), 3.0));
        assert!(close(relative_error(3.3, 3.0), 0.1));
        assert!(relative_error(1.0, 0.0).is_nan());
    }

    #[test]
    fn store_threads_bound_writing_and_free_stages_set_no_bound() {
        let mut per_gib = [0.0; 6];
        // Only writing costs: 1 s per GiB on the store threads.
        per_gib[5] = 1.0;
        let m = Model {
            costs: Costs {
                per_gib,
                qemu_per_gib: 0.0,
            },
            read_ceiling: f64::INFINITY,
        };
        let p = m.predict(2, 2);
        // Store threads min(2, 4) / 1 = 2 = cores 2 / 1: either is right;
        // the first listed wins a tie.
        assert!(close(p.gib_s, 2.0));
        assert_eq!(p.bound, "store threads");
        // 32 cores: 4 store threads.
        let p = m.predict(32, 32);
        assert_eq!(p.bound, "store threads");
        assert!(close(p.gib_s, 4.0));
        // Nothing costs anything, no ceiling: unbounded.
        let none = Model {
            costs: Costs::default(),
            read_ceiling: f64::INFINITY,
        };
        assert_eq!(none.predict(4, 4).gib_s, f64::INFINITY);
    }
}
