//! The driver behind `scripts/bench` (issue 7): shear against the tools a
//! user would pick instead, in one run, on the same data and machine.
//!
//! It prepares a deterministic data set on the data disk of the demo-style
//! guest (host libraries and text, PRNG data, allocated zero clusters and
//! holes), boots the guest under TCG, and measures on the same running VM:
//!
//! 1. `shear backup` into a fresh repository (wall, CPU, peak RSS, bytes);
//! 2. `nbdcopy URI - | zstd -1 -T<cores>` to a file;
//! 3. `qemu-img convert -c -O qcow2 -o compression_type=zstd URI out.qcow2`;
//! 4. `nbdcopy URI null:` (read ceiling) and `zstd -1 -T<cores>` over the
//!    allocated data alone (compression ceiling);
//! 5. `shear restore` against `qemu-img convert` of the qcow2 from (3);
//! 6. the freeze window of consecutive backups;
//! 7. guest `dd oflag=direct` throughput idle, with the copy-before-write
//!    filter in place, and during backups (as is, `--workers 1`, `nice`);
//! 8. incremental backups (issue 10) with 1 % of the disk dirtied through
//!    the guest before each, into the last full backup's repository;
//! 9. a 1 TiB sparse qcow2 on a paused VM: full, incrementals with 8 × 1 MiB
//!    written, and the dirty-range mapping alone over NBD;
//! 10. the scaling model (issue 17, `bench_phases/scaling.rs`): CPU per
//!     stage from shear's own `--json` figures, the predicted throughput on
//!     1-32 cores, checked against `--workers 1` and `--workers 2` here;
//!
//! plus peak RSS of a backup of a larger (mostly sparse) disk, and `perf`
//! profiles of one backup (all CPUs) and of both restores. The anchors read an export the
//! bench builds through the harness's QMP monitor exactly as shear does
//! (fleece image, copy-before-write, snapshot-access, QEMU's NBD server):
//! same server, same data path inside QEMU.
//!
//! Writes `bench/results/<date>.md` and `.json` and prints the table.
#![forbid(unsafe_code)]

#[path = "bench_phases/s3.rs"]
mod s3_phase;
#[path = "bench_phases/scaling.rs"]
mod scaling_phase;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shear_tests::prereq::find_tool;
use shear_tests::{DiskSpec, TestVm, VmConfig};

/// `--only libvirt` (issue 18), kept apart.
#[path = "bench/libvirt.rs"]
mod libvirt_phase;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Device id of the data disk (the guest sees /dev/vda, mounted at /mnt/vda).
const DISK: &str = "virtio0";
/// Bump when the data set recipe changes (invalidates the cached image).
const DATASET_VERSION: u32 = 1;
/// Incompressible data is split into this many files of equal size.
const RANDOM_FILES: u64 = 8;
/// The random files as the guest sees them. The guest-write test overwrites
/// them in place; it runs after every backup measurement.
const GUEST_RANDOM_DIR: &str = "/mnt/vda/random";
/// Where GNU time lives (its rusage gives CPU and peak RSS of a command and
/// the children it waited for).
const GNU_TIME: &str = "/usr/bin/time";
/// qcow2 cluster size of the data set and the fleece image (QEMU's default).
const CLUSTER: u64 = 64 << 10;

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench FAILED: {e}");
        std::process::exit(1);
    }
}

fn say(msg: &str) {
    eprintln!("[bench] {msg}");
}

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Opts {
    size_gib: u64,
    quick: bool,
    runs: usize,
    freeze_runs: usize,
    perf: bool,
    keep: bool,
    /// `--only`: run just these issue-10 phases (empty: everything).
    only: Vec<String>,
}

const USAGE: &str =
    "usage: bench [--size GIB] [--quick] [--runs N] [--freeze-runs N] [--no-perf] [--keep]
  --size GIB        virtual size of the data disk (default 4; --quick: 1)
  --quick           one run of each figure on a small disk, no 16 GiB RSS run, no profile
  --runs N          runs per figure (default 5; --quick: 1)
  --freeze-runs N   consecutive backups for the freeze window (default 10)
  --no-perf         skip the perf profile
  --keep            keep bench/work/run (repositories, images) afterwards
  --only PHASES     only these phases, comma-separated: incremental (one full
                    backup per run, then the incrementals), huge (the 1 TiB disk),
                    snapshot (shear snapshot create/rollback, small guest disk),
                    serve (issue 13: nbdcopy from shear serve vs from qemu-nbd),
                    guest (issue 17: guest O_DIRECT writes and a CPU-bound guest
                    job idle vs during backups, default and --workers 1),
                    live (issue 13: live-restore RTO and time to independence),
                    boot (issue 13: shear verify --boot of the test guest's backup),
                    libvirt (issue 18: shear --libvirt full and incremental vs
                    virtnbdbackup on the same domain),
                    s3 (issue 14: backup to S3 on loopback vs a local directory;
                    sync with 1/4/16 streams, +0 and +40 ms per request),
                    scaling (issue 17: CPU per stage from shear's own figures, the
                    predicted throughput on 1-32 cores, checked with --workers 1/2)";

impl Opts {
    fn parse(mut args: impl Iterator<Item = String>) -> Res<Opts> {
        let mut size = None;
        let mut runs = None;
        let mut o = Opts {
            size_gib: 4,
            quick: false,
            runs: 5,
            freeze_runs: 10,
            perf: true,
            keep: false,
            only: Vec::new(),
        };
        while let Some(a) = args.next() {
            let mut num = |name: &str| -> Res<u64> {
                args.next()
                    .ok_or(format!("{name} needs a value"))?
                    .parse::<u64>()
                    .map_err(|e| format!("{name}: {e}"))
            };
            match a.as_str() {
                "--size" => size = Some(num("--size")?),
                "--runs" => runs = Some(num("--runs")?),
                "--freeze-runs" => {
                    o.freeze_runs = usize::try_from(num("--freeze-runs")?).ctx("--freeze-runs")?;
                }
                "--quick" => o.quick = true,
                "--no-perf" => o.perf = false,
                "--keep" => o.keep = true,
                "--only" => {
                    let v = args.next().ok_or("--only needs a value")?;
                    for p in v.split(',') {
                        if ![
                            "incremental",
                            "huge",
                            "snapshot",
                            "serve",
                            "guest",
                            "live",
                            "boot",
                            "libvirt",
                            "s3",
                            "scaling",
                        ]
                        .contains(&p)
                        {
                            return Err(format!("--only: unknown phase {p}\n{USAGE}"));
                        }
                        o.only.push(p.to_owned());
                    }
                }
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other}\n{USAGE}")),
            }
        }
        if o.quick {
            o.size_gib = 1;
            o.runs = 1;
            o.perf = false;
        }
        if let Some(s) = size {
            o.size_gib = s;
        }
        if let Some(r) = runs {
            o.runs = usize::try_from(r).ctx("--runs")?;
        }
        if o.size_gib == 0 || o.size_gib > 1024 {
            return Err("--size must be 1..=1024 GiB".into());
        }
        if o.runs == 0 || o.freeze_runs == 0 {
            return Err("--runs and --freeze-runs must be at least 1".into());
        }
        Ok(o)
    }
}

// ----------------------------------------------------------- measurement

/// One measured command.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Wall time, s.
    wall: f64,
    /// CPU user+sys of the command and the children it waited for, s.
    cpu: f64,
    /// Peak RSS (largest single process), KiB.
    rss_kib: u64,
    /// CPU QEMU spent meanwhile (NBD server, block layer, guest), s.
    qemu_cpu: f64,
    /// Bytes read from the export.
    read: u64,
    /// Bytes written (compressed output / stored chunks / image allocated).
    out: u64,
    /// Anything else worth keeping (shear's own report).
    extra: Value,
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summary(xs: &[f64]) -> Summary {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

impl Summary {
    fn json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
    /// `median [min–max]` with `prec` decimals (just the value for one run).
    fn show(self, prec: usize) -> String {
        if self.median.is_nan() {
            return "–".into();
        }
        if (self.max - self.min).abs() < f64::EPSILON {
            return format!("{:.prec$}", self.median);
        }
        format!(
            "{:.prec$} [{:.prec$}–{:.prec$}]",
            self.median, self.min, self.max
        )
    }
}

/// A named series of samples of one pipeline.
#[derive(Debug, Clone)]
struct Series {
    label: String,
    samples: Vec<Sample>,
}

impl Series {
    fn new(label: &str) -> Series {
        Series {
            label: label.into(),
            samples: Vec::new(),
        }
    }
    fn of(&self, f: impl Fn(&Sample) -> f64) -> Summary {
        summary(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
    fn wall(&self) -> Summary {
        self.of(|s| s.wall)
    }
    fn json(&self) -> Value {
        json!({
            "label": self.label,
            "wall_s": self.wall().json(),
            "cpu_s": self.of(|s| s.cpu).json(),
            "peak_rss_mib": self.of(|s| kib_to_mib(s.rss_kib)).json(),
            "qemu_cpu_s": self.of(|s| s.qemu_cpu).json(),
            "read_bytes": self.of(|s| s.read as f64).json(),
            "out_bytes": self.of(|s| s.out as f64).json(),
            "samples": self.samples.iter().map(|s| json!({
                "wall_s": s.wall, "cpu_s": s.cpu, "peak_rss_kib": s.rss_kib,
                "qemu_cpu_s": s.qemu_cpu, "read_bytes": s.read, "out_bytes": s.out,
                "extra": s.extra,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Guest write rates of one condition.
#[derive(Debug, Clone)]
struct Rates {
    label: String,
    /// MiB/s as dd measured it, one per run.
    mib_s: Vec<f64>,
    /// bytes, seconds (and overlap with the backup) per run.
    detail: Vec<Value>,
}

impl Rates {
    fn json(&self) -> Value {
        json!({"label": self.label, "mib_per_s": summary(&self.mib_s).json(),
               "samples": self.detail})
    }
}

fn kib_to_mib(k: u64) -> f64 {
    k as f64 / 1024.0
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// CPU time (user+sys) of a process so far, s; 0 when it is gone.
fn proc_cpu(pid: u32, clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is [0],
    // utime [11], stime [12].
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / clk_tck
}

fn run_quiet(cmd: &mut Command) -> Res<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

fn remove(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Allocated bytes of a file (st_blocks × 512).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Apparent size of every file under `dir`.
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// The bench's context: paths, tools, the shear binary.
#[derive(Debug)]
struct Bench {
    opts: Opts,
    root: PathBuf,
    work: PathBuf,
    run: PathBuf,
    shear: PathBuf,
    cores: usize,
    clk_tck: f64,
    size: u64,
}

impl Bench {
    /// Run `argv` under GNU time; QEMU's CPU is sampled around it.
    /// Everything is `sync`ed first so no earlier write-back is charged.
    fn measure(
        &self,
        argv: &[OsString],
        envs: &[(&str, OsString)],
        qemu_pid: u32,
    ) -> Res<(Sample, Vec<u8>)> {
        run_quiet(&mut Command::new("sync"))?;
        let tfile = self.run.join("gnu-time.out");
        remove(&tfile);
        let mut cmd = Command::new(GNU_TIME);
        cmd.args(["-f", "%e %U %S %M", "-o"]).arg(&tfile).args(argv);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let q0 = proc_cpu(qemu_pid, self.clk_tck);
        let t = Instant::now();
        let out = cmd.output().ctx("spawning GNU time")?;
        let wall = t.elapsed().as_secs_f64();
        let q1 = proc_cpu(qemu_pid, self.clk_tck);
        // BENCH_STDERR_LOG=<file>: keep every command's stderr (with
        // RUST_LOG=shear::timing=debug, where a backup's time goes).
        if let Some(log) = std::env::var_os("BENCH_STDERR_LOG") {
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
            {
                let _ = writeln!(f, "=== wall {wall:.3} s");
                let _ = f.write_all(&out.stderr);
            }
        }
        let shown = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        if !out.status.success() {
            return Err(format!(
                "`{shown}` failed ({}):\n{}\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 10),
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            ));
        }
        let times = std::fs::read_to_string(&tfile).ctx("reading GNU time's output")?;
        let last = times.lines().last().unwrap_or_default();
        let f: Vec<&str> = last.split_whitespace().collect();
        let num = |i: usize| -> Res<f64> {
            f.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or(format!("bad GNU time output {last:?}"))
        };
        let rss_kib = f
            .get(3)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(format!("bad GNU time output {last:?}"))?;
        let sample = Sample {
            wall,
            cpu: num(1)? + num(2)?,
            rss_kib,
            qemu_cpu: q1 - q0,
            ..Sample::default()
        };
        Ok((sample, out.stdout))
    }

    fn shear_env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("SHEAR_RUN_DIR", self.run.join("shear-run").into_os_string()),
            ("SHEAR_CONFIG", OsString::from("/nonexistent/shear.toml")),
        ]
    }

    fn shear_argv(&self, repo: &Path, args: &[&str]) -> Vec<OsString> {
        let mut v = vec![
            self.shear.clone().into_os_string(),
            "--repo".into(),
            repo.into(),
        ];
        v.extend(args.iter().map(OsString::from));
        v
    }

    /// A fresh, empty repository at `repo`.
    fn fresh_repo(&self, repo: &Path) -> Res<()> {
        remove(repo);
        let mut c = Command::new(&self.shear);
        c.arg("--repo").arg(repo).arg("init");
        for (k, v) in self.shear_env() {
            c.env(k, v);
        }
        run_quiet(&mut c).map(drop)
    }

    fn backup_args(&self, vm: &TestVm) -> Vec<String> {
        vec![
            "backup".into(),
            "100".into(),
            "--json".into(),
            "--qmp".into(),
            vm.qmp_socket().display().to_string(),
            "--qga".into(),
            vm.qga_socket().display().to_string(),
            "--fleecing-dir".into(),
            self.run.join("fleece").display().to_string(),
        ]
    }

    /// `shear backup` of the VM into `repo`, measured; returns the sample
    /// with shear's own report in `extra`.
    fn shear_backup(&self, vm: &TestVm, repo: &Path) -> Res<Sample> {
        let args = self.backup_args(vm);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut s, stdout) =
            self.measure(&self.shear_argv(repo, &args), &self.shear_env(), vm.pid())?;
        let report = backup_report(&stdout)?;
        s.read = sum_disks(&report, "bytes_read");
        s.out = sum_disks(&report, "bytes_stored");
        s.extra = report;
        Ok(s)
    }
}

/// The single report of `shear backup --json`; an error entry is an error.
fn backup_report(stdout: &[u8]) -> Res<Value> {
    let v: Value = serde_json::from_slice(stdout).map_err(|e| {
        format!(
            "shear backup printed no JSON ({e}): {}",
            String::from_utf8_lossy(stdout)
        )
    })?;
    let r = v
        .get(0)
        .cloned()
        .ok_or("shear backup printed an empty report")?;
    if let Some(e) = r.get("error") {
        return Err(format!("shear backup failed: {e}"));
    }
    Ok(r)
}

fn sum_disks(report: &Value, field: &str) -> u64 {
    report["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|x| x[field].as_u64()).sum())
        .unwrap_or(0)
}

/// An argument vector from mixed strings and paths.
fn argv(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

// ---------------------------------------------------------------- data set

/// What goes on the disk, scaled to its size.
#[derive(Debug, Clone)]
struct Plan {
    size: u64,
    libs: u64,
    text: u64,
    random: u64,
    zeros: u64,
}

impl Plan {
    /// The 4 GiB recipe (512 MiB libraries, 256 MiB text, 512 MiB PRNG data,
    /// 256 MiB allocated zeros, the rest holes). Smaller disks scale it down;
    /// larger ones keep it (more holes).
    fn for_size(size: u64) -> Plan {
        let base = 4 * GIB;
        let scale = |b: u64| {
            if size >= base {
                b
            } else {
                b / 4 * (size / GIB)
            }
        };
        let unit = RANDOM_FILES * MIB;
        Plan {
            size,
            libs: scale(512 * MIB),
            text: scale(256 * MIB),
            random: scale(512 * MIB) / unit * unit,
            zeros: scale(256 * MIB),
        }
    }
}

#[derive(Debug, Clone)]
struct HostFile {
    path: PathBuf,
    len: u64,
    mtime: u64,
}

/// Regular files under `roots` in a deterministic (sorted, depth-first)
/// order, up to `budget` bytes. `text`: only files whose first 4 KiB hold
/// no NUL byte and no compression magic.
fn walk(roots: &[&str], budget: u64, text: bool) -> Vec<HostFile> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut total = 0u64;
    for root in roots {
        let mut stack = vec![PathBuf::from(root)];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
            entries.sort_by_key(std::fs::DirEntry::file_name);
            let mut subdirs = Vec::new();
            for e in entries {
                let Ok(ft) = e.file_type() else { continue };
                let p = e.path();
                if ft.is_dir() {
                    subdirs.push(p);
                    continue;
                }
                if !ft.is_file() {
                    continue;
                }
                let Ok(md) = e.metadata() else { continue };
                if md.len() == 0 || p.to_str().is_none() {
                    continue;
                }
                // Skip what does not fit, or would dominate the mix (one
                // file is at most an eighth of the budget); stop when full.
                if total + md.len() > budget || md.len() > budget / 8 {
                    continue;
                }
                if text && !looks_like_text(&p) {
                    continue;
                }
                total += md.len();
                out.push(HostFile {
                    path: p,
                    len: md.len(),
                    mtime: u64::try_from(md.mtime()).unwrap_or(0),
                });
                if budget - total < MIB {
                    return out;
                }
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }
    out
}

fn looks_like_text(p: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(p) else {
        return false;
    };
    let mut head = [0u8; 4096];
    let Ok(n) = f.read(&mut head) else {
        return false;
    };
    let head = &head[..n];
    let compressed = head.starts_with(&[0x1f, 0x8b])
        || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z'])
        || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || head.starts_with(b"BZh");
    n > 0 && !compressed && !head.contains(&0)
}

/// FNV-1a: a stable key for the data set cache (inputs, not contents).
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // Field separator, so ("ab","c") and ("a","bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// Deterministic incompressible bytes (xorshift64*), seeded per file.
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Free block ranges of an ext4 image (from `dumpe2fs`), in bytes.
fn free_ranges(raw: &Path) -> Res<Vec<(u64, u64)>> {
    let text = run_quiet(Command::new(tool("dumpe2fs")).arg(raw))?;
    let mut block_size = 0u64;
    let mut ranges = Vec::new();
    // The superblock summary also has a "Free blocks:" line (a count);
    // the ranges are in the per-group part.
    let mut in_groups = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Block size:") {
            block_size = v.trim().parse().ctx("dumpe2fs block size")?;
        }
        in_groups |= line.starts_with("Group ");
        let Some(list) = line.strip_prefix("Free blocks:").filter(|_| in_groups) else {
            continue;
        };
        for r in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let a: u64 = a.trim().parse().ctx("dumpe2fs free range")?;
            let b: u64 = b.trim().parse().ctx("dumpe2fs free range")?;
            ranges.push((a, b + 1));
        }
    }
    if block_size == 0 {
        return Err("dumpe2fs printed no block size".into());
    }
    Ok(ranges
        .into_iter()
        .map(|(a, b)| (a * block_size, b * block_size))
        .collect())
}

fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

#[derive(Debug, Clone)]
struct Dataset {
    image: PathBuf,
    info: Value,
}

/// Build the data set image (qcow2) in `work`, or reuse the cached one when
/// its inputs (recipe, host file list with sizes and mtimes) are unchanged.
fn prepare_dataset(work: &Path, plan: &Plan) -> Res<Dataset> {
    let libs = walk(
        &["/usr/lib/x86_64-linux-gnu", "/usr/lib/gcc", "/usr/libexec"],
        plan.libs,
        false,
    );
    let text = walk(
        &["/usr/include", "/usr/lib/python3", "/usr/share"],
        plan.text,
        true,
    );
    let mut key = Fnv::new();
    key.add(&DATASET_VERSION.to_le_bytes());
    for v in [plan.size, plan.libs, plan.text, plan.random, plan.zeros] {
        key.add(&v.to_le_bytes());
    }
    for f in libs.iter().chain(&text) {
        key.add(f.path.as_os_str().as_encoded_bytes());
        key.add(&f.len.to_le_bytes());
        key.add(&f.mtime.to_le_bytes());
    }
    let key = format!("{:016x}", key.0);
    let prefix = format!("dataset-{}g-", plan.size / GIB);
    let image = work.join(format!("{prefix}{key}.qcow2"));
    let info_path = work.join(format!("{prefix}{key}.json"));
    if image.is_file() {
        if let Ok(info) = std::fs::read(&info_path)
            .ctx("read")
            .and_then(|b| serde_json::from_slice::<Value>(&b).ctx("parse"))
        {
            say(&format!("data set {key}: reusing {}", image.display()));
            return Ok(Dataset { image, info });
        }
    }
    // Stale data sets of this size are large: drop them (one per size).
    if let Ok(rd) = std::fs::read_dir(work) {
        for e in rd.filter_map(Result::ok) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) || n == "staging" {
                remove(&e.path());
            }
        }
    }
    let t = Instant::now();
    say(&format!(
        "building data set {key}: {} library files, {} text files, {} MiB PRNG data, {} MiB zeros on a {} GiB ext4 disk",
        libs.len(),
        text.len(),
        plan.random / MIB,
        plan.zeros / MIB,
        plan.size / GIB
    ));
    let staging = work.join("staging");
    std::fs::create_dir_all(&staging).ctx("creating the staging dir")?;
    for f in libs.iter().chain(&text) {
        let rel = f.path.strip_prefix("/").unwrap_or(&f.path);
        let dst = staging.join("host").join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).ctx("staging dir")?;
        }
        std::fs::copy(&f.path, &dst).ctx(&format!("copying {}", f.path.display()))?;
        // Plain files in the image: no setuid bits or odd modes from the host.
        std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .ctx("chmod")?;
    }
    let random_dir = staging.join("random");
    std::fs::create_dir_all(&random_dir).ctx("staging dir")?;
    let per_file = plan.random / RANDOM_FILES;
    let mut buf = vec![0u8; usize::try_from(per_file).ctx("random file size")?];
    for i in 0..RANDOM_FILES {
        fill_random(&mut buf, i + 1);
        std::fs::write(random_dir.join(format!("{i}.bin")), &buf).ctx("writing random data")?;
    }
    drop(buf);
    let raw = work.join("dataset.raw");
    remove(&raw);
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(plan.size))
        .ctx("creating the raw image")?;
    run_quiet(
        Command::new(tool("mkfs.ext4"))
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&staging)
            .arg(&raw),
    )?;
    remove(&staging);
    // Allocated zero clusters: zeroes written into free space (what a guest
    // leaves after zeroing freed space without discard), taken from the
    // end of the filesystem, cluster-aligned.
    let mut zero_ranges = Vec::new();
    let mut left = plan.zeros;
    for (a, b) in free_ranges(&raw)?.into_iter().rev() {
        if left == 0 {
            break;
        }
        let a = a.div_ceil(CLUSTER) * CLUSTER;
        let b = b / CLUSTER * CLUSTER;
        if b <= a {
            continue;
        }
        let len = (b - a).min(left);
        zero_ranges.push((b - len, len));
        left -= len;
    }
    let tmp = work.join("dataset.tmp.qcow2");
    run_quiet(
        Command::new(tool("qemu-img"))
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&tmp),
    )?;
    remove(&raw);
    for batch in zero_ranges.chunks(64) {
        let mut c = Command::new(tool("qemu-io"));
        c.args(["-f", "qcow2"]);
        for (off, len) in batch {
            c.arg("-c").arg(format!("write -q -P 0 {off} {len}"));
        }
        c.arg(&tmp);
        run_quiet(&mut c)?;
    }
    std::fs::rename(&tmp, &image).ctx("renaming the data set")?;
    let bytes = |v: &[HostFile]| v.iter().map(|f| f.len).sum::<u64>();
    let info = json!({
        "key": key,
        "virtual_size": plan.size,
        "filesystem": "ext4 (mkfs.ext4 -d on the host), qcow2 with 64 KiB clusters",
        "library_files": libs.len(),
        "library_bytes": bytes(&libs),
        "library_roots": "/usr/lib/x86_64-linux-gnu, /usr/lib/gcc, /usr/libexec",
        "text_files": text.len(),
        "text_bytes": bytes(&text),
        "text_roots": "/usr/include, /usr/lib/python3, /usr/share (NUL-free, uncompressed files)",
        "random_bytes": plan.random,
        "random_files": RANDOM_FILES,
        "zero_bytes": plan.zeros - left,
        "build_s": t.elapsed().as_secs_f64(),
    });
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info).ctx("json")?)
        .ctx("writing the data set info")?;
    say(&format!(
        "data set built in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        image.display()
    ));
    Ok(Dataset { image, info })
}

/// `nbdinfo --map --totals`: (data bytes, zero/hole bytes) by block status.
fn block_status_totals(uri: &str) -> Res<(u64, u64)> {
    let text = run_quiet(Command::new("nbdinfo").args(["--map", "--totals", uri]))?;
    let (mut data, mut zero) = (0, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(bytes), Some(kind)) = (
            f.first().and_then(|v| v.parse::<u64>().ok()),
            f.get(2).and_then(|v| v.parse::<u32>().ok()),
        ) else {
            continue;
        };
        // Type bit 1 = reads as zero (hole or zero extent); else data.
        if kind & 2 == 0 {
            data += bytes;
        } else {
            zero += bytes;
        }
    }
    Ok((data, zero))
}

// ------------------------------------------------------- the anchors' export

/// A fleecing export of the data disk built through the harness's QMP
/// monitor exactly as shear builds its own (design.md §2).
#[derive(Debug)]
struct AnchorExport {
    socket: PathBuf,
    fleece: PathBuf,
}

const A_FLEECE: &str = "bench-fleece";
const A_CBW: &str = "bench-cbw";
const A_ACCESS: &str = "bench-access";
const A_EXPORT: &str = "bench-export";
const A_NAME: &str = "bench";

impl AnchorExport {
    fn up(vm: &mut TestVm, dir: &Path, size: u64) -> Res<AnchorExport> {
        std::fs::create_dir_all(dir).ctx("anchor dir")?;
        let fleece = dir.join("fleece.qcow2");
        let socket = dir.join("nbd.sock");
        remove(&fleece);
        remove(&socket);
        run_quiet(
            Command::new(tool("qemu-img"))
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                .arg(&fleece)
                .arg(size.to_string()),
        )?;
        let q = |vm: &mut TestVm, cmd: &str, args: Value| vm.harness_qmp(cmd, args).ctx(cmd);
        q(
            vm,
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": A_FLEECE, "discard": "unmap",
                   "file": {"driver": "file", "filename": fleece, "discard": "unmap"}}),
        )?;
        vm.qga("guest-fsfreeze-freeze", Value::Null)
            .ctx("guest-fsfreeze-freeze")?;
        let inside = (|| {
            q(
                vm,
                "blockdev-add",
                json!({"driver": "copy-before-write", "node-name": A_CBW,
                       "file": vm.disk_node(DISK), "target": A_FLEECE,
                       "on-cbw-error": "break-snapshot", "cbw-timeout": 45}),
            )?;
            q(
                vm,
                "qom-set",
                json!({"path": vm.qdev(DISK), "property": "drive", "value": A_CBW}),
            )?;
            q(
                vm,
                "blockdev-add",
                json!({"driver": "snapshot-access", "node-name": A_ACCESS, "file": A_CBW}),
            )
        })();
        let thaw = vm
            .qga("guest-fsfreeze-thaw", Value::Null)
            .ctx("guest-fsfreeze-thaw");
        inside?;
        thaw?;
        q(
            vm,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket}}}),
        )?;
        q(
            vm,
            "block-export-add",
            json!({"type": "nbd", "id": A_EXPORT, "node-name": A_ACCESS,
                   "name": A_NAME, "writable": false}),
        )?;
        Ok(AnchorExport { socket, fleece })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{A_NAME}?socket={}", self.socket.display())
    }

    /// Teardown in the only order QEMU accepts (design.md §2).
    fn down(self, vm: &mut TestVm) -> Res<()> {
        let q = |vm: &mut TestVm, cmd: &str, args: Value| vm.harness_qmp(cmd, args).ctx(cmd);
        q(vm, "block-export-del", json!({"id": A_EXPORT}))?;
        // Every monitor sees shear's own exports go too: wait for ours.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = vm
                .wait_event("BLOCK_EXPORT_DELETED", left)
                .ctx("waiting for BLOCK_EXPORT_DELETED")?;
            if ev["data"]["id"] == A_EXPORT {
                break;
            }
        }
        q(vm, "nbd-server-stop", json!({}))?;
        q(vm, "blockdev-del", json!({"node-name": A_ACCESS}))?;
        let node = vm.disk_node(DISK);
        q(
            vm,
            "qom-set",
            json!({"path": vm.qdev(DISK), "property": "drive", "value": node}),
        )?;
        q(vm, "blockdev-del", json!({"node-name": A_CBW}))?;
        q(vm, "blockdev-del", json!({"node-name": A_FLEECE}))?;
        remove(&self.fleece);
        Ok(())
    }
}

/// Read the export as shear's reader does (4 MiB chunks, block status) and
/// write the data chunks to `out`: the compression ceiling's input.
fn extract_allocated(socket: &Path, out: &Path) -> Res<(u64, u64)> {
    let src = nbd_export::ExportSource::unix(socket, A_NAME);
    let cfg = nbd_export::ReaderConfig::new(shear::repo::format::DEFAULT_CHUNK_SIZE);
    let mut stream = nbd_export::ChunkReader::start(&src, &cfg).map_err(|e| format!("{e}"))?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).ctx("creating alloc.raw")?);
    let mut data = 0u64;
    let mut chunks = 0u64;
    for item in &mut stream {
        let chunk = item.map_err(|e| format!("reading the export: {e}"))?;
        if let nbd_export::ChunkKind::Data(d) = chunk.kind {
            f.write_all(&d).ctx("writing alloc.raw")?;
            data += d.len() as u64;
            chunks += 1;
        }
    }
    f.flush().ctx("writing alloc.raw")?;
    Ok((data, chunks))
}

// ------------------------------------------------------------ guest writes

/// Overwrite the first `files` data-set random files in the guest with
/// `dd if=/dev/zero bs=1M count=<file size> oflag=direct conv=notrunc`, one
/// after the other; returns (bytes, seconds). The guest's busybox dd prints
/// no timing and its `date` has no sub-second format, so the script reads
/// /proc/uptime (10 ms resolution) around the writes.
fn guest_dd(vm: &TestVm, files: u64, file_mib: u64) -> Res<(u64, f64)> {
    let paths: Vec<String> = (0..files)
        .map(|i| format!("{GUEST_RANDOM_DIR}/{i}.bin"))
        .collect();
    let script = format!(
        "read a _ </proc/uptime; for f in {}; do \
         dd if=/dev/zero of=$f bs=1M count={file_mib} oflag=direct conv=notrunc 2>/dev/null || exit 1; \
         done; read b _ </proc/uptime; echo \"$a $b\"",
        paths.join(" ")
    );
    // Host write-back of earlier runs must not land in this one.
    run_quiet(&mut Command::new("sync"))?;
    let out = vm.guest_exec(&["/bin/sh", "-c", &script]).ctx("guest dd")?;
    let text = out.stdout_str();
    if out.exit != 0 {
        return Err(format!(
            "guest dd failed ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let secs = parse_uptimes(&text).ok_or(format!("cannot parse the guest's uptimes: {text:?}"))?;
    Ok((files * file_mib * MIB, secs))
}

/// `"12.34 13.56"` (two /proc/uptime readings) → seconds between them.
fn parse_uptimes(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    let a = it.next()?.ok()?;
    let b = it.next()?.ok()?;
    (b >= a).then(|| (b - a).max(0.01))
}

// ------------------------------------------------------------------- run

#[derive(Debug, Default)]
struct Results {
    machine: Value,
    dataset: Value,
    block_status: (u64, u64),
    series: BTreeMap<&'static str, Series>,
    freeze_ms: Vec<f64>,
    /// Another QMP client's waits (connect, greeting, `query-status`) while
    /// the consecutive backups ran, ms: (worst, polls, failed).
    qmp_wait: Option<(f64, usize, usize)>,
    freeze_consistency: Vec<String>,
    guest: BTreeMap<&'static str, Rates>,
    guest_dd_mib: u64,
    rss: Vec<Value>,
    restore_diff: Value,
    /// Incremental phase: MiB the guest dirtied per run, in how many regions.
    incr_dirty: (u64, u64),
    /// 1 TiB phase: the dirty-range mapping timings.
    huge_map: Vec<Value>,
    /// Snapshot phase (issue 15): (figure, wall seconds per run).
    snapshot: Vec<(&'static str, Vec<f64>)>,
    profiles: Vec<Profile>,
    notes: Vec<String>,
    /// Whole `## ` sections a phase rendered itself (before the method).
    sections: Vec<String>,
    /// A phase's own figures for the JSON report, by key.
    extra: BTreeMap<&'static str, Value>,
    elapsed_s: f64,
}

impl Results {
    fn series(&mut self, key: &'static str, label: &str) -> &mut Series {
        self.series.entry(key).or_insert_with(|| Series::new(label))
    }
    fn get(&self, key: &str) -> Option<&Series> {
        self.series.get(key)
    }
    fn rate(&mut self, key: &'static str, label: &str, (bytes, secs): (u64, f64), extra: Value) {
        let e = self.guest.entry(key).or_insert_with(|| Rates {
            label: label.into(),
            mib_s: Vec::new(),
            detail: Vec::new(),
        });
        e.mib_s.push(mib(bytes) / secs.max(1e-6));
        let mut d = json!({"bytes": bytes, "seconds": secs});
        if let (Value::Object(d), Value::Object(x)) = (&mut d, extra) {
            d.extend(x);
        }
        e.detail.push(d);
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine_info(b: &Bench) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&b.root)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "cpu": model,
        "cores": b.cores,
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": first_line("uname", &["-r"]),
        "qemu": first_line("qemu-system-x86_64", &["--version"]),
        "accel": "tcg",
        "qemu_img": first_line("qemu-img", &["--version"]),
        "nbdcopy": first_line("nbdcopy", &["--version"]),
        "zstd": first_line("zstd", &["--version"]).trim_matches(|c| c == '*' || c == ' ').to_string(),
        "shear": first_line(&b.shear.display().to_string(), &["--version"]),
        "git": format!("{}{}", git(&["rev-parse", "--short", "HEAD"]), if dirty { " (uncommitted changes)" } else { "" }),
        "loadavg_start": loadavg(),
    })
}

fn run() -> Res<()> {
    let opts = Opts::parse(std::env::args().skip(1))?;
    if std::env::var_os("SHEAR_TEST_FROZEN_HOOK").is_some() {
        // A test hook run while the guest is held would be timed too.
        return Err("unset SHEAR_TEST_FROZEN_HOOK before benchmarking".into());
    }
    let t_all = Instant::now();
    if !shear_tests::require_guest() {
        return Err("prerequisites missing (run scripts/setup)".into());
    }
    for t in [
        "nbdcopy",
        "nbdinfo",
        "zstd",
        "qemu-img",
        "qemu-io",
        "mkfs.ext4",
        "dumpe2fs",
    ] {
        if find_tool(t).is_none() {
            return Err(format!("{t} not found (run scripts/setup)"));
        }
    }
    if !first_line(GNU_TIME, &["--version"]).contains("GNU") {
        return Err(format!("{GNU_TIME} is not GNU time (apt-get install time)"));
    }
    let root = shear_tests::workspace_root();
    let shear = std::env::var_os("SHEAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/shear"));
    if !shear.is_file() {
        return Err(format!(
            "{} not built (cargo build --release -p shear)",
            shear.display()
        ));
    }
    let work = root.join("bench/work");
    let run_dir = work.join("run");
    remove(&run_dir);
    std::fs::create_dir_all(&run_dir).ctx("creating bench/work/run")?;
    let clk_tck = first_line("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0);
    let b = Bench {
        size: opts.size_gib * GIB,
        opts,
        root,
        work,
        run: run_dir,
        shear,
        cores: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
        clk_tck,
    };
    let mut r = Results {
        machine: machine_info(&b),
        ..Results::default()
    };
    say(&format!(
        "{} GiB disk, {} run(s) per figure, {} cores",
        b.opts.size_gib, b.opts.runs, b.cores
    ));

    let only = |p: &str| b.opts.only.is_empty() || b.opts.only.iter().any(|o| o == p);
    if !b.opts.only.is_empty() {
        if only("incremental") {
            only_incremental(&b, &mut r)?;
        }
        if only("huge") {
            huge_phase(&b, &mut r)?;
        }
        if only("snapshot") {
            say("booting the guest (TCG) with a 256 MiB ext4 qcow2 disk");
            let vm = TestVm::start(
                VmConfig::guest().disk(DiskSpec::qcow2(DISK, 256 << 20).file("/seed", b"s")),
            )
            .ctx("starting the VM")?;
            snapshot_phase(&b, vm, &mut r)?;
        }
        if only("serve") {
            serve_phase(&b, &mut r)?;
        }
        if only("guest") {
            only_guest(&b, &mut r)?;
        }
        if only("live") {
            live_phase(&b, &mut r)?;
        }
        if only("boot") {
            boot_phase(&b, &mut r)?;
        }
        if only("libvirt") {
            libvirt_phase::libvirt_phase(&b, &mut r)?;
        }
        if only("s3") {
            s3_phase::s3_phase(&b, &mut r)?;
        }
        if only("scaling") {
            scaling_phase::scaling_only(&b, &mut r)?;
        }
    } else {
        let plan = Plan::for_size(b.size);
        let ds = prepare_dataset(&b.work, &plan)?;
        r.dataset = ds.info.clone();

        let disk = b.run.join("disk.qcow2");
        std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
        // Warm the page cache: every figure below is a warm-cache figure.
        std::io::copy(
            &mut std::fs::File::open(&disk).ctx("open")?,
            &mut std::io::sink(),
        )
        .ctx("reading the image")?;

        say("booting the guest (TCG) with the data disk");
        let mut vm =
            TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2(DISK, b.size).image(&disk)))
                .ctx("starting the VM")?;
        vm.guest_sh("grep -q ' /mnt/vda ext4' /proc/mounts")
            .ctx("the data disk is not mounted in the guest")?;

        main_rounds(&b, &mut vm, &mut r)?;
        restore_phase(&b, &mut r)?;
        incremental_phase(&b, &mut vm, &mut r)?;
        if b.opts.perf {
            profile_phase(&b, &vm, &mut r)?;
        }
        freeze_phase(&b, &vm, &mut r)?;
        scaling_phase::scaling_phase(&b, &mut vm, &mut r)?;
        guest_write_phase(&b, &mut vm, &mut r)?;
        guest_cpu_phase(&b, &mut vm, &mut r)?;
        // Shuts the VM down (its last figure is the offline rollback).
        snapshot_phase(&b, vm, &mut r)?;
        rss_phase(&b, &ds, &mut r)?;
        huge_phase(&b, &mut r)?;
    }
    r.elapsed_s = t_all.elapsed().as_secs_f64();
    r.machine["loadavg_end"] = json!(loadavg());
    let (md, js) = render(&b, &r);
    // A partial run leaves out the tables of the phases it did not run.
    let md = if b.opts.only.is_empty() {
        md
    } else {
        drop_empty_sections(&md)
    };
    let results = b.root.join("bench/results");
    std::fs::create_dir_all(&results).ctx("creating bench/results")?;
    let date = first_line("date", &["+%Y-%m-%d"]);
    let stem = if !b.opts.only.is_empty() {
        format!("{date}-only-{}", b.opts.only.join("-"))
    } else if b.opts.quick {
        format!("{date}-quick")
    } else if b.opts.size_gib != 4 {
        format!("{date}-{}g", b.opts.size_gib)
    } else {
        date
    };
    // A second run on the same day gets the time too: never overwrite a
    // report (an analysis may have been written into it).
    let stem = if results.join(format!("{stem}.md")).exists() {
        format!("{stem}-{}", first_line("date", &["+%H%M"]))
    } else {
        stem
    };
    let md_path = results.join(format!("{stem}.md"));
    let js_path = results.join(format!("{stem}.json"));
    std::fs::write(&md_path, &md).ctx("writing the report")?;
    std::fs::write(
        &js_path,
        serde_json::to_string_pretty(&js).ctx("json")? + "\n",
    )
    .ctx("writing the JSON")?;
    if !b.opts.keep {
        remove(&b.run);
    }
    println!("{md}");
    say(&format!(
        "wrote {} and {} ({:.0} s)",
        md_path.display(),
        js_path.display(),
        r.elapsed_s
    ));
    Ok(())
}

/// Issue 15: `shear snapshot` create and rollback, with and without
/// memory, on the running guest; the rollback without memory is offline
/// (QEMU cannot apply it under a running VM), so it comes last, after the
/// VM is shut down. Each snapshot is deleted again.
fn snapshot_phase(b: &Bench, mut vm: TestVm, r: &mut Results) -> Res<()> {
    let state = b.run.join("snapshot-state");
    let timed = |vm: &TestVm, args: &[&str]| -> Res<f64> {
        let mut c = Command::new(&b.shear);
        c.args(["snapshot", "100"]).args(args);
        c.arg("--qmp").arg(vm.qmp_socket());
        c.arg("--qga").arg(vm.qga_socket());
        c.arg("--state-dir").arg(&state);
        for (k, v) in b.shear_env() {
            c.env(k, v);
        }
        sync();
        let t = Instant::now();
        run_quiet(&mut c)?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut fig: Vec<(&'static str, Vec<f64>)> = vec![
        (
            "create, disks only (guest frozen through qemu-ga)",
            Vec::new(),
        ),
        (
            "create with memory (128 MiB guest, snapshot-save)",
            Vec::new(),
        ),
        (
            "rollback with memory (snapshot-load, VM resumes)",
            Vec::new(),
        ),
        ("delete (every disk)", Vec::new()),
    ];
    for round in 1..=b.opts.runs {
        say(&format!("snapshot round {round}/{}", b.opts.runs));
        let (d, m) = (format!("disk{round}"), format!("mem{round}"));
        fig[0].1.push(timed(&vm, &["create", &d])?);
        fig[1].1.push(timed(&vm, &["create", &m, "--vmstate"])?);
        fig[2].1.push(timed(&vm, &["rollback", &m, "--yes"])?);
        vm.guest_sh("true").ctx("the guest after the rollback")?;
        fig[3].1.push(timed(&vm, &["delete", &d])?);
        timed(&vm, &["delete", &m])?;
    }
    timed(&vm, &["create", "offline"])?;
    vm.shutdown().ctx("shutting the VM down")?;
    let off = timed(&vm, &["rollback", "offline", "--yes"])?;
    fig.push((
        "rollback without memory (VM stopped, qemu-img snapshot -a)",
        vec![off],
    ));
    r.snapshot = fig;
    Ok(())
}

/// `sync(1)`: nothing of an earlier step is left to write back meanwhile.
fn sync() {
    let _ = Command::new("sync").status();
}

/// Waits until `path` exists (a server's socket), or fails.
fn wait_path(path: &Path, what: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{what}: no socket {} within 120 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Issue 13: sequential read with `nbdcopy` (to `null:`) of the data set's
/// disk from `shear serve` (a backup of it) and from `qemu-nbd -r` of the
/// same data as a qcow2 file, interleaved per round. Warm page cache.
fn serve_phase(b: &Bench, r: &mut Results) -> Res<()> {
    let plan = Plan::for_size(b.size);
    let ds = prepare_dataset(&b.work, &plan)?;
    r.dataset = ds.info.clone();
    let disk = b.run.join("disk.qcow2");
    std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
    let repo = b.run.join("repo-serve");
    b.fresh_repo(&repo)?;
    {
        say("serve: backing up the data set (paused VM)");
        let vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2(DISK, b.size).image(&disk)))
            .ctx("starting the paused VM")?;
        b.shear_backup(&vm, &repo)?;
    }
    let ssock = b.run.join("shear-serve.sock");
    let qsock = b.run.join("qemu-nbd.sock");
    remove(&ssock);
    remove(&qsock);
    let mut c = Command::new(&b.shear);
    c.arg("--repo")
        .arg(&repo)
        .args(["serve", "vm/100", "--socket"])
        .arg(&ssock);
    for (k, v) in b.shear_env() {
        c.env(k, v);
    }
    let mut serve = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ctx("starting shear serve")?;
    let mut qnbd = Command::new("qemu-nbd")
        // -t: keep serving after a client leaves (one client per round).
        .args([
            "-r",
            "-t",
            "-f",
            "qcow2",
            "--shared=8",
            "--cache=writeback",
            "-k",
        ])
        .arg(&qsock)
        .arg(&disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ctx("starting qemu-nbd")?;
    let res = (|| -> Res<()> {
        wait_path(&ssock, "shear serve")?;
        wait_path(&qsock, "qemu-nbd")?;
        for round in 1..=b.opts.runs {
            say(&format!("serve round {round}/{}", b.opts.runs));
            // The server's CPU is sampled around each copy (in `qemu_cpu`).
            for (key, label, uri, server) in [
                (
                    "serve_shear",
                    "nbdcopy → null: from shear serve (backup, 4 MiB zstd chunks)",
                    format!("nbd+unix:///{DISK}?socket={}", ssock.display()),
                    serve.id(),
                ),
                (
                    "serve_qemu_nbd",
                    "nbdcopy → null: from qemu-nbd -r (qcow2 file)",
                    format!("nbd+unix:///?socket={}", qsock.display()),
                    qnbd.id(),
                ),
            ] {
                let argv = argv(&[&"nbdcopy", &uri, &"null:"]);
                let (s, _) = b.measure(&argv, &[], server)?;
                r.series(key, label).samples.push(s);
            }
            // What decoding and verifying every chunk costs with nothing
            // served: the part of the serve's CPU no server design avoids.
            let (s, _) = b.measure(
                &b.shear_argv(&repo, &["verify", "vm/100"]),
                &b.shear_env(),
                0,
            )?;
            r.series(
                "serve_verify",
                "shear verify of the same backup (read, decompress, BLAKE3 every chunk; nothing served)",
            )
            .samples
            .push(s);
        }
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let _ = serve.wait();
    let _ = qnbd.kill();
    let _ = qnbd.wait();
    res?;
    let (Some(sh), Some(qn), Some(ver)) = (
        r.get("serve_shear"),
        r.get("serve_qemu_nbd"),
        r.get("serve_verify"),
    ) else {
        return Ok(());
    };
    let med = |s: &Series, f: fn(&Sample) -> f64| s.of(f).median;
    let (sh_wall, qn_wall) = (sh.wall().median, qn.wall().median);
    // CPU-bound on these cores: decoding and verifying alone plus the
    // client's own CPU, spread perfectly over every core.
    let floor = (med(ver, |s| s.cpu) + med(sh, |s| s.cpu)) / b.cores as f64;
    r.notes.push(format!(
        "serve (issue 13): nbdcopy of the {} GiB disk from shear serve {sh_wall:.2} s, from qemu-nbd {qn_wall:.2} s: \
         shear serve at {:.2}× qemu-nbd's speed (target ≥ 1×). CPU per copy (medians): shear serve {:.2} s + nbdcopy {:.2} s; \
         qemu-nbd {:.2} s + nbdcopy {:.2} s. Decoding and verifying every chunk with nothing served (`shear verify`, same \
         backup) takes {:.2} s wall, {:.2} CPU s: with nbdcopy's own CPU, {} cores cannot serve this backup in less than \
         {floor:.2} s, at most {:.2}× qemu-nbd's speed here",
        b.opts.size_gib,
        qn_wall / sh_wall.max(1e-9),
        med(sh, |s| s.qemu_cpu),
        med(sh, |s| s.cpu),
        med(qn, |s| s.qemu_cpu),
        med(qn, |s| s.cpu),
        ver.wall().median,
        med(ver, |s| s.cpu),
        b.cores,
        qn_wall / floor.max(1e-9),
    ));
    Ok(())
}

/// Issue 13: `shear restore --live` of a backup of the data set's disk
/// into a qcow2 image, the guest started on it at once: the RTO (command
/// start → qemu-ga answers) and the time until the VM no longer depends on
/// the backup (the copy ended, the server stopped), per round.
fn live_phase(b: &Bench, r: &mut Results) -> Res<()> {
    let plan = Plan::for_size(b.size);
    let ds = prepare_dataset(&b.work, &plan)?;
    r.dataset = ds.info.clone();
    let disk = b.run.join("disk.qcow2");
    std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
    let repo = b.run.join("repo-live");
    b.fresh_repo(&repo)?;
    {
        say("live: backing up the data set (paused VM)");
        let vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2(DISK, b.size).image(&disk)))
            .ctx("starting the paused VM")?;
        b.shear_backup(&vm, &repo)?;
    }
    for round in 1..=b.opts.runs {
        say(&format!("live restore round {round}/{}", b.opts.runs));
        let target = b.run.join("live-target");
        let state = b.run.join("live-state");
        let qmp = b.run.join("live.qmp");
        remove(&target);
        remove(&state);
        remove(&qmp);
        let t0 = Instant::now();
        let mut c = Command::new(&b.shear);
        c.arg("--repo")
            .arg(&repo)
            .args(["restore", "vm/100", "--live", "--target"])
            .arg(&target)
            .arg("--qmp")
            .arg(&qmp)
            .arg("--state-dir")
            .arg(&state);
        for (k, v) in b.shear_env() {
            c.env(k, v);
        }
        let mut sup = c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ctx("starting shear restore --live")?;
        let out = sup.stdout.take().ok_or("no stdout")?;
        let mut ready = false;
        for l in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok) {
            if l.starts_with("live-restore: ready") {
                ready = true;
                break;
            }
        }
        if !ready {
            let _ = sup.kill();
            let _ = sup.wait();
            return Err("shear restore --live ended before it was ready".into());
        }
        let image = target.join(format!("{DISK}.qcow2"));
        let vm = TestVm::start(
            VmConfig::guest()
                .arg("-blockdev")
                .arg(
                    &json!({"driver": "qcow2", "node-name": "rst0",
                            "file": {"driver": "file", "filename": image}})
                    .to_string(),
                )
                .arg("-device")
                .arg("virtio-blk-pci,id=vd0,drive=rst0,rerror=stop,werror=stop")
                .arg("-qmp")
                .arg(&format!("unix:{},server=on,wait=off", qmp.display())),
        )
        .ctx("starting the VM on the live-restore image");
        let vm = match vm {
            Ok(v) => v,
            Err(e) => {
                let _ = sup.kill();
                let _ = sup.wait();
                return Err(e);
            }
        };
        let rto = t0.elapsed().as_secs_f64();
        let boot = vm.boot_time().map_or(0.0, |d| d.as_secs_f64());
        let st = sup.wait().ctx("waiting for shear restore --live")?;
        let independent = t0.elapsed().as_secs_f64();
        drop(vm);
        if !st.success() {
            return Err(format!("shear restore --live failed: {st}"));
        }
        r.series(
            "live_rto",
            "live restore: command start → qemu-ga answers (RTO)",
        )
        .samples
        .push(Sample {
            wall: rto,
            extra: json!({"qemu_start_to_qga_s": boot}),
            ..Sample::default()
        });
        r.series(
            "live_independent",
            "live restore: command start → VM independent of the backup",
        )
        .samples
        .push(Sample {
            wall: independent,
            ..Sample::default()
        });
    }
    if let (Some(rto), Some(ind)) = (r.get("live_rto"), r.get("live_independent")) {
        r.notes.push(format!(
            "live restore (issue 13): RTO {:.2} s (goal ≤ 10 s on the TCG guest), the VM independent of the backup after {:.2} s ({} GiB disk)",
            rto.wall().median,
            ind.wall().median,
            b.opts.size_gib
        ));
    }
    Ok(())
}

/// `--only boot` (issue 13): `shear verify --boot` of a backup of the
/// running test guest (its kernel and initramfs recorded with the backup, a
/// 256 MiB ext4 data disk): command start → the restore VM's qemu-ga
/// answers (`ping_ms` of the record) and the whole check.
fn boot_phase(b: &Bench, r: &mut Results) -> Res<()> {
    let repo = b.run.join("repo-boot");
    b.fresh_repo(&repo)?;
    {
        say("boot: backing up the running test guest");
        let vm = TestVm::start(
            VmConfig::guest().disk(DiskSpec::qcow2(DISK, 256 << 20).file("/hello.txt", b"hi\n")),
        )
        .ctx("starting the VM")?;
        b.shear_backup(&vm, &repo)?;
    }
    for round in 1..=b.opts.runs {
        say(&format!("verify --boot round {round}/{}", b.opts.runs));
        let t0 = Instant::now();
        let mut c = Command::new(&b.shear);
        c.arg("--repo").arg(&repo).args([
            "verify",
            "--boot",
            "vm/100",
            "--accel",
            "tcg",
            "--memory",
            "256",
            "--timeout",
            "180",
            "--probe",
            "cat /mnt/vda/hello.txt",
            "--json",
        ]);
        for (k, v) in b.shear_env() {
            c.env(k, v);
        }
        let out = c.output().ctx("running shear verify --boot")?;
        let wall = t0.elapsed().as_secs_f64();
        if !out.status.success() {
            return Err(format!(
                "shear verify --boot failed ({}): {}{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stdout), 10),
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            ));
        }
        let rec: Value =
            serde_json::from_slice(&out.stdout).ctx("parsing the restore-test record")?;
        if rec["state"] != "ok" || rec["probe"]["stdout"] != "hi\n" {
            return Err(format!("verify --boot did not pass: {rec}"));
        }
        let ping = rec["ping_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
        r.series("verify_boot", "shear verify --boot: whole check")
            .samples
            .push(Sample {
                wall,
                ..Sample::default()
            });
        r.series(
            "verify_boot_ping",
            "shear verify --boot: start → qemu-ga answers",
        )
        .samples
        .push(Sample {
            wall: ping,
            ..Sample::default()
        });
    }
    if let (Some(w), Some(p)) = (r.get("verify_boot"), r.get("verify_boot_ping")) {
        r.notes.push(format!(
            "verify --boot (issue 13): the restore VM's qemu-ga answered {} s after the command started; the whole check (boot, guest-get-fsinfo, probe, record, teardown) took {} s (TCG, 256 MiB guest, 256 MiB ext4 disk)",
            p.wall().show(2),
            w.wall().show(2)
        ));
    }
    Ok(())
}

/// `--only incremental`: the data set and guest as in a full run, one
/// shear full backup per run into a fresh repository (the wall time the
/// incrementals are compared with), then the incremental phase.
/// `--only guest` (issue 17): the guest-impact figures alone: full backups
/// for the read-phase length, then guest writes and a CPU-bound guest job
/// idle vs during backups.
fn only_guest(b: &Bench, r: &mut Results) -> Res<()> {
    let mut vm = data_set_vm(b, r)?;
    let repo = b.run.join("repo-main");
    for round in 1..=b.opts.runs.min(2) {
        say(&format!("full backup {round} (read-phase length)"));
        b.fresh_repo(&repo)?;
        let s = b.shear_backup(&vm, &repo)?;
        r.series("shear_backup", "shear backup (fresh repository)")
            .samples
            .push(s);
    }
    guest_write_phase(b, &mut vm, r)?;
    guest_cpu_phase(b, &mut vm, r)?;
    vm.shutdown().ctx("shutting the VM down")?;
    Ok(())
}

/// For an `--only` phase: the data set (prepared or reused), a copy of it
/// as the guest's data disk, and the guest booted with it mounted.
pub(crate) fn data_set_vm(b: &Bench, r: &mut Results) -> Res<TestVm> {
    let plan = Plan::for_size(b.size);
    let ds = prepare_dataset(&b.work, &plan)?;
    r.dataset = ds.info.clone();
    let disk = b.run.join("disk.qcow2");
    std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
    say("booting the guest (TCG) with the data disk");
    let vm = TestVm::start(VmConfig::guest().disk(DiskSpec::qcow2(DISK, b.size).image(&disk)))
        .ctx("starting the VM")?;
    vm.guest_sh("grep -q ' /mnt/vda ext4' /proc/mounts")
        .ctx("the data disk is not mounted in the guest")?;
    Ok(vm)
}

fn only_incremental(b: &Bench, r: &mut Results) -> Res<()> {
    let mut vm = data_set_vm(b, r)?;
    let repo = b.run.join("repo-main");
    for round in 1..=b.opts.runs {
        say(&format!("round {round}/{}: shear backup", b.opts.runs));
        b.fresh_repo(&repo)?;
        let s = b.shear_backup(&vm, &repo)?;
        r.series("shear_backup", "shear backup (fresh repository)")
            .samples
            .push(s);
    }
    incremental_phase(b, &mut vm, r)?;
    vm.shutdown().ctx("shutting the VM down")?;
    Ok(())
}

/// The report without the `## ` sections whose tables have no row left once
/// rows of figures that were not measured (NaN) are dropped.
fn drop_empty_sections(md: &str) -> String {
    let mut out = String::new();
    let mut sections: Vec<Vec<&str>> = vec![Vec::new()];
    for line in md.lines() {
        if line.starts_with("## ") {
            sections.push(Vec::new());
        }
        if let Some(cur) = sections.last_mut() {
            cur.push(line);
        }
    }
    for (k, sec) in sections.iter().enumerate() {
        let kept: Vec<&str> = sec
            .iter()
            .copied()
            .filter(|l| !(l.starts_with('|') && l.contains("NaN")))
            .collect();
        let table_lines = kept.iter().filter(|l| l.starts_with('|')).count();
        let separators = kept.iter().filter(|l| l.starts_with("|---")).count();
        // Header plus separator per table, and no data row: not measured.
        if k > 0 && table_lines > 0 && table_lines <= 2 * separators {
            continue;
        }
        for l in kept {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Figures 1-4: per round, the anchors on a fresh fleecing export, then
/// shear's own backup (which builds the same graph itself) into a fresh
/// repository. Interleaved so drift on the machine hits both alike.
fn main_rounds(b: &Bench, vm: &mut TestVm, r: &mut Results) -> Res<()> {
    let cores = b.cores.to_string();
    let anchor_dir = b.run.join("anchor");
    let zst = b.run.join("anchor.zst");
    let qcow = b.run.join("anchor.qcow2");
    let alloc = b.run.join("alloc.raw");
    let repo = b.run.join("repo-main");
    for round in 1..=b.opts.runs {
        say(&format!("round {round}/{}: anchors", b.opts.runs));
        let exp = AnchorExport::up(vm, &anchor_dir, b.size)?;
        let uri = exp.uri();
        if round == 1 {
            r.block_status = block_status_totals(&uri)?;
            // Warm-up (QEMU's caches), untimed.
            run_quiet(Command::new("nbdcopy").args([&uri, "null:"]))?;
            let (data, chunks) = extract_allocated(&exp.socket, &alloc)?;
            r.notes.push(format!(
                "compression ceiling input: the {chunks} data chunks (4 MiB, {:.0} MiB) shear's reader gets from the same export, concatenated into one file",
                mib(data)
            ));
        }
        let alloc_bytes = r.block_status.0;

        let (mut s, _) = b.measure(&argv(&[&"nbdcopy", &uri, &"null:"]), &[], vm.pid())?;
        s.read = alloc_bytes;
        r.series("nbdcopy_null", "nbdcopy URI null: (read ceiling)")
            .samples
            .push(s);

        remove(&zst);
        let pipeline =
            format!("set -o pipefail; nbdcopy \"$1\" - | zstd -1 -T{cores} -q -c > \"$2\"");
        let (mut s, _) = b.measure(
            &argv(&[&"bash", &"-c", &pipeline, &"bench", &uri, &zst]),
            &[],
            vm.pid(),
        )?;
        s.read = alloc_bytes;
        s.out = std::fs::metadata(&zst).map(|m| m.len()).unwrap_or(0);
        r.series(
            "nbdcopy_zstd",
            &format!("nbdcopy URI - | zstd -1 -T{cores} > file"),
        )
        .samples
        .push(s);
        remove(&zst);

        remove(&qcow);
        let (mut s, _) = b.measure(
            &argv(&[
                &"qemu-img",
                &"convert",
                &"-f",
                &"raw",
                &"-c",
                &"-O",
                &"qcow2",
                &"-o",
                &"compression_type=zstd",
                &uri,
                &qcow,
            ]),
            &[],
            vm.pid(),
        )?;
        s.read = alloc_bytes;
        s.out = allocated(&qcow);
        r.series(
            "qemu_img_convert",
            "qemu-img convert -c -O qcow2 -o compression_type=zstd URI out.qcow2",
        )
        .samples
        .push(s);
        exp.down(vm)?;

        say(&format!("round {round}/{}: shear backup", b.opts.runs));
        b.fresh_repo(&repo)?;
        let mut s = b.shear_backup(vm, &repo)?;
        s.extra["repo_bytes"] = json!(tree_bytes(&repo));
        r.series("shear_backup", "shear backup (fresh repository)")
            .samples
            .push(s);
    }

    say("compression ceiling: zstd over the allocated data");
    let alloc_bytes = std::fs::metadata(&alloc).map(|m| m.len()).unwrap_or(0);
    let out = b.run.join("alloc.zst");
    for _ in 0..b.opts.runs {
        remove(&out);
        let (mut s, _) = b.measure(
            &argv(&[
                &"zstd",
                &"-1",
                &format!("-T{cores}"),
                &"-q",
                &"-f",
                &alloc,
                &"-o",
                &out,
            ]),
            &[],
            0,
        )?;
        s.read = alloc_bytes;
        s.out = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        r.series(
            "zstd_ceiling",
            &format!("zstd -1 -T{cores} over the allocated data (compression ceiling)"),
        )
        .samples
        .push(s);
    }
    remove(&out);
    remove(&alloc);
    Ok(())
}

/// Figure 5: shear restore (raw, qcow2) against qemu-img convert of the
/// anchor's zstd qcow2; then how far the two raw results differ.
fn restore_phase(b: &Bench, r: &mut Results) -> Res<()> {
    let repo = b.run.join("repo-main");
    let id = r
        .get("shear_backup")
        .and_then(|s| s.samples.last())
        .and_then(|s| s.extra["backup_id"].as_str())
        .ok_or("no backup to restore")?
        .to_string();
    let qcow = b.run.join("anchor.qcow2");
    let shear_dir = b.run.join("restore-shear");
    let qemu_dir = b.run.join("restore-qemu");
    std::fs::create_dir_all(&qemu_dir).ctx("restore dir")?;
    for i in 0..b.opts.runs {
        say(&format!("restore {}/{}", i + 1, b.opts.runs));
        // raw last: the last raw restore stays for the comparison below.
        for (fmt, key, label) in [
            (
                "qcow2",
                "shear_restore_qcow2",
                "shear restore --format qcow2",
            ),
            ("raw", "shear_restore_raw", "shear restore --format raw"),
        ] {
            remove(&shear_dir);
            let argv = b.shear_argv(
                &repo,
                &[
                    "restore",
                    &id,
                    "--target",
                    &shear_dir.display().to_string(),
                    "--format",
                    fmt,
                ],
            );
            let (mut s, _) = b.measure(&argv, &b.shear_env(), 0)?;
            let img = shear_dir.join(format!("{DISK}.{fmt}"));
            s.out = allocated(&img);
            s.read = r
                .get("shear_backup")
                .and_then(|x| x.samples.last())
                .map_or(0, |x| x.out);
            r.series(key, label).samples.push(s);
        }
        // qemu-img's default cache mode never flushes the output; shear
        // restore fsyncs it. `-t writeback` makes qemu-img flush too.
        for (fmt, flush, key, label) in [
            (
                "raw",
                false,
                "qemu_img_restore_raw",
                "qemu-img convert -O raw out.qcow2 disk.raw",
            ),
            (
                "raw",
                true,
                "qemu_img_restore_raw_flush",
                "qemu-img convert -t writeback -O raw out.qcow2 disk.raw (flushes, as shear does)",
            ),
            (
                "qcow2",
                false,
                "qemu_img_restore_qcow2",
                "qemu-img convert -O qcow2 out.qcow2 disk.qcow2",
            ),
        ] {
            let img = qemu_dir.join(format!("disk.{fmt}"));
            remove(&img);
            let cache: &[&dyn AsRef<std::ffi::OsStr>] =
                if flush { &[&"-t", &"writeback"] } else { &[] };
            let mut args = argv(&[&"qemu-img", &"convert"]);
            args.extend(argv(cache));
            args.extend(argv(&[&"-f", &"qcow2", &"-O", &fmt, &qcow, &img]));
            let (mut s, _) = b.measure(&args, &[], 0)?;
            s.out = allocated(&img);
            s.read = allocated(&qcow);
            r.series(key, label).samples.push(s);
        }
    }
    // The last raw restores: shear's from its backup, qemu-img's from the
    // anchor export a few seconds earlier. An idle guest changes little in
    // between; count what differs.
    let (blocks, differ) = diff_blocks(
        &shear_dir.join(format!("{DISK}.raw")),
        &qemu_dir.join("disk.raw"),
    )?;
    say(&format!(
        "restored images: {differ} of {blocks} 4 KiB blocks differ"
    ));
    r.restore_diff = json!({"blocks_4k": blocks, "differing_blocks_4k": differ});
    remove(&shear_dir);
    remove(&qemu_dir);
    Ok(())
}

/// Compare two images of equal size in 4 KiB blocks.
fn diff_blocks(a: &Path, b: &Path) -> Res<(u64, u64)> {
    let la = std::fs::metadata(a).ctx("restored image")?.len();
    let lb = std::fs::metadata(b).ctx("restored image")?.len();
    if la != lb {
        return Err(format!(
            "restored images differ in size: {} {la} vs {} {lb}",
            a.display(),
            b.display()
        ));
    }
    let mut fa = std::io::BufReader::with_capacity(8 << 20, std::fs::File::open(a).ctx("open")?);
    let mut fb = std::io::BufReader::with_capacity(8 << 20, std::fs::File::open(b).ctx("open")?);
    let (mut blocks, mut differ) = (0u64, 0u64);
    let mut ba = vec![0u8; 4096];
    let mut bb = vec![0u8; 4096];
    let mut left = la;
    while left > 0 {
        let n = usize::try_from(left.min(4096)).ctx("block")?;
        fa.read_exact(&mut ba[..n]).ctx("read")?;
        fb.read_exact(&mut bb[..n]).ctx("read")?;
        if ba[..n] != bb[..n] {
            differ += 1;
        }
        blocks += 1;
        left -= n as u64;
    }
    Ok((blocks, differ))
}

/// A system-wide profile of one more backup (shear, QEMU, kernel).
fn profile_phase(b: &Bench, vm: &TestVm, r: &mut Results) -> Res<()> {
    let works = Command::new("perf")
        .args(["stat", "-e", "instructions", "true"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stderr).contains("instructions")
        });
    if !works {
        r.notes
            .push("profile skipped: `perf stat -e instructions true` does not work here".into());
        return Ok(());
    }
    let root = first_line("id", &["-u"]) == "0";
    say("profile: perf record of one backup");
    let repo = b.run.join("repo-perf");
    b.fresh_repo(&repo)?;
    let mut backup = vec![
        b.shear.clone().into_os_string(),
        "--repo".into(),
        repo.clone().into(),
    ];
    backup.extend(b.backup_args(vm).into_iter().map(OsString::from));
    let (p, stdout) = perf_profile(b, &backup, root)?;
    backup_report(&stdout)?;
    remove(&repo);
    r.profiles.push(Profile {
        title: format!(
            "one backup (fresh repository), {}",
            if root {
                "all CPUs (shear, QEMU, kernel)"
            } else {
                "shear only (not root)"
            }
        ),
        ..p
    });

    say("profile: perf record of the restores");
    let id = r
        .get("shear_backup")
        .and_then(|s| s.samples.last())
        .and_then(|s| s.extra["backup_id"].as_str())
        .ok_or("no backup to restore")?
        .to_string();
    let target = b.run.join("restore-perf");
    remove(&target);
    let restore = b.shear_argv(
        &b.run.join("repo-main"),
        &[
            "restore",
            &id,
            "--target",
            &target.display().to_string(),
            "--format",
            "raw",
        ],
    );
    let (p, _) = perf_profile(b, &restore, false)?;
    r.profiles.push(Profile {
        title: "shear restore --format raw".into(),
        ..p
    });
    remove(&target);
    std::fs::create_dir_all(&target).ctx("restore dir")?;
    let img = target.join("disk.raw");
    let convert = argv(&[
        &"qemu-img",
        &"convert",
        &"-f",
        &"qcow2",
        &"-O",
        &"raw",
        &b.run.join("anchor.qcow2"),
        &img,
    ]);
    let (p, _) = perf_profile(b, &convert, false)?;
    r.profiles.push(Profile {
        title: "qemu-img convert -O raw out.qcow2 disk.raw".into(),
        ..p
    });
    remove(&target);
    Ok(())
}

/// On-CPU samples of one command.
#[derive(Debug, Clone, Default)]
struct Profile {
    title: String,
    by_comm: Vec<String>,
    by_symbol: Vec<String>,
}

/// `perf record -F 999 [-a]` of `cmd`; the top of `perf report` by command
/// and by symbol, and the command's stdout.
fn perf_profile(b: &Bench, cmd: &[OsString], all_cpus: bool) -> Res<(Profile, Vec<u8>)> {
    let data = b.run.join("perf.data");
    run_quiet(&mut Command::new("sync"))?;
    let mut c = Command::new("perf");
    c.args(["record", "-q", "-F", "999", "-o"]).arg(&data);
    if all_cpus {
        c.arg("-a");
    }
    c.arg("--").args(cmd);
    for (k, v) in b.shear_env() {
        c.env(k, v);
    }
    let out = c.stdin(Stdio::null()).output().ctx("perf record")?;
    if !out.status.success() {
        return Err(format!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let report = |sort: &str, limit: &str| -> Res<Vec<String>> {
        let text = run_quiet(
            Command::new("perf")
                .args(["report", "-i"])
                .arg(&data)
                .args([
                    "--stdio",
                    "--no-children",
                    "-q",
                    "--sort",
                    sort,
                    "--percent-limit",
                    limit,
                ]),
        )?;
        Ok(text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .take(30)
            .map(str::to_string)
            .collect())
    };
    let p = Profile {
        title: String::new(),
        by_comm: report("comm,dso", "1")?,
        by_symbol: report("comm,dso,sym", "1")?,
    };
    remove(&data);
    Ok((p, out.stdout))
}

/// Figure 6: the freeze window of consecutive backups into one repository.
fn freeze_phase(b: &Bench, vm: &TestVm, r: &mut Results) -> Res<()> {
    say(&format!(
        "freeze window: {} consecutive backups",
        b.opts.freeze_runs
    ));
    let repo = b.run.join("repo-freeze");
    b.fresh_repo(&repo)?;
    // Issue 11: another client of the same QMP socket (Proxmox's qm, its
    // status daemon) polls it through every backup; its worst wait.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        let path = vm.qmp_socket();
        std::thread::spawn(move || {
            let (mut worst, mut polls, mut failed) = (0f64, 0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let ok = shear_tests::wire::HarnessQmp::connect(&path, Duration::from_secs(5))
                    .and_then(|mut q| {
                        q.execute("query-status", Value::Null, Duration::from_secs(5))
                    })
                    .is_ok();
                worst = worst.max(t.elapsed().as_secs_f64() * 1000.0);
                polls += 1;
                failed += usize::from(!ok);
                std::thread::sleep(Duration::from_millis(20));
            }
            (worst, polls, failed)
        })
    };
    for _ in 0..b.opts.freeze_runs {
        let s = b.shear_backup(vm, &repo)?;
        let ms = s.extra["freeze_window_ms"]
            .as_f64()
            .ok_or("backup report has no freeze_window_ms (is qemu-ga answering?)")?;
        r.freeze_ms.push(ms);
        r.freeze_consistency
            .push(s.extra["consistency"].as_str().unwrap_or("?").to_string());
        r.series(
            "shear_backup_repeat",
            "shear backup (into the same repository)",
        )
        .samples
        .push(s);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    r.qmp_wait = poller.join().ok();
    remove(&repo);
    Ok(())
}

/// Figure 7: guest O_DIRECT write throughput idle, with only the
/// copy-before-write filter in place, and during a shear backup.
fn guest_write_phase(b: &Bench, vm: &mut TestVm, r: &mut Results) -> Res<()> {
    // Size the write (whole random files) so it fits well inside a
    // backup's read phase: about a third of it when idle.
    let read_s = r.get("shear_backup").map_or(2.0, |s| {
        s.of(|x| x.extra["read_ms"].as_f64().unwrap_or(0.0) / 1000.0)
            .min
    });
    let file_mib = Plan::for_size(b.size).random / RANDOM_FILES / MIB;
    say("guest writes: idle");
    // Untimed warm-up: on first use TCG translates the guest's write path
    // (ext4 direct I/O, virtio-blk), which slows the first passes.
    guest_dd(vm, RANDOM_FILES, file_mib)?;
    let (_, secs) = guest_dd(vm, RANDOM_FILES, file_mib)?;
    let per_file_s = secs / RANDOM_FILES as f64;
    let mut files = 1;
    while files < RANDOM_FILES && (files + 1) as f64 * per_file_s <= read_s * 0.3 {
        files += 1;
    }
    r.guest_dd_mib = files * file_mib;
    for _ in 0..b.opts.runs {
        let s = guest_dd(vm, files, file_mib)?;
        r.rate("guest_write_idle", "idle", s, json!({}));
    }
    // A fresh filter per run: every write is the first to its cluster
    // since the snapshot, so every write waits for a copy to the fleece.
    say("guest writes: copy-before-write filter in place, nothing reading");
    for _ in 0..b.opts.runs {
        let exp = AnchorExport::up(vm, &b.run.join("anchor"), b.size)?;
        let s = guest_dd(vm, files, file_mib)?;
        exp.down(vm)?;
        r.rate(
            "guest_write_cbw",
            "copy-before-write filter + fleece in place, no reader",
            s,
            json!({}),
        );
    }
    // During backups: as a user runs it, then three ways of leaving the
    // guest more of the machine (what a fix could do automatically).
    let variants: [(&'static str, &str, &[&str], &[&str]); 4] = [
        (
            "guest_write_backup",
            "during a shear backup (fleecing)",
            &[],
            &[],
        ),
        (
            "guest_write_backup_w1",
            "during a shear backup --workers 1",
            &[],
            &["--workers", "1"],
        ),
        (
            "guest_write_backup_nice",
            "during a shear backup under nice -n 19",
            &["nice", "-n", "19"],
            &[],
        ),
        // Does reading slower leave the guest's writes more of QEMU? (The
        // issue's "slow down under write pressure", tried at a fixed rate:
        // about a third of the unthrottled read rate here.)
        (
            "guest_write_backup_bw",
            "during a shear backup --bwlimit 131072 (128 MiB/s)",
            &[],
            &["--bwlimit", "131072"],
        ),
    ];
    for (key, label, prefix, extra) in variants {
        say(&format!("guest writes: {label}"));
        for _ in 0..b.opts.runs {
            let (s, detail) = write_during_backup(b, vm, prefix, extra, files, file_mib)?;
            r.rate(key, label, s, detail);
        }
    }
    Ok(())
}

/// [`during_backup`] with the guest writes as the workload.
fn write_during_backup(
    b: &Bench,
    vm: &mut TestVm,
    prefix: &[&str],
    extra: &[&str],
    files: u64,
    file_mib: u64,
) -> Res<((u64, f64), Value)> {
    during_backup(b, vm, prefix, extra, |vm| guest_dd(vm, files, file_mib))
}

/// Start a backup, wait for its read phase (its export exists), run
/// `workload` in the guest, and report how much of it overlapped the
/// backup, with the backup's fleece peak (issue 17: the fleece holds only
/// what the guest overwrote before shear read it, so it is at most the
/// bytes written during the backup).
fn during_backup(
    b: &Bench,
    vm: &mut TestVm,
    prefix: &[&str],
    extra: &[&str],
    workload: impl FnOnce(&TestVm) -> Res<(u64, f64)>,
) -> Res<((u64, f64), Value)> {
    let repo = b.run.join("repo-write");
    b.fresh_repo(&repo)?;
    let bitmaps_before = shear_bitmaps(vm)?;
    let mut argv: Vec<OsString> = prefix.iter().map(OsString::from).collect();
    argv.push(b.shear.clone().into_os_string());
    argv.extend(["--repo".into(), repo.clone().into_os_string()]);
    argv.extend(b.backup_args(vm).into_iter().map(OsString::from));
    argv.extend(extra.iter().map(OsString::from));
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    for (k, v) in b.shear_env() {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().ctx("spawning shear backup")?;
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        (out, Instant::now())
    });
    let t_wait = Instant::now();
    loop {
        let exports = vm
            .harness_qmp("query-block-exports", json!({}))
            .ctx("query-block-exports")?;
        if exports.as_array().is_some_and(|a| !a.is_empty())
            || waiter.is_finished()
            || t_wait.elapsed() > Duration::from_secs(120)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let dd_start = Instant::now();
    let written = workload(vm);
    let dd_end = Instant::now();
    let (out, shear_end) = waiter.join().map_err(|_| "backup waiter panicked")?;
    let out = out.ctx("shear backup")?;
    let written = written.map_err(|e| {
        format!(
            "{e}\nthe backup meanwhile: {} {}\n{}\nguest console:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            vm.console_tail(30)
        )
    })?;
    if !out.status.success() {
        return Err(format!(
            "shear backup during guest writes failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let report = backup_report(&out.stdout)?;
    remove(&repo);
    // The change tracking this backup started at its freeze counts, at
    // the copy-before-write filter's own granularity (64 KiB clusters),
    // every guest write since: the most the fleece can have had to copy.
    // Removed after, so the runs' bitmaps do not pile up on the disk.
    let mut written_since_freeze = 0u64;
    for (node, name, count) in shear_bitmaps(vm)? {
        if bitmaps_before
            .iter()
            .any(|(n, m, _)| *n == node && *m == name)
        {
            continue;
        }
        written_since_freeze += count;
        vm.harness_qmp(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": name}),
        )
        .ctx("block-dirty-bitmap-remove")?;
    }
    let span = dd_end.duration_since(dd_start).as_secs_f64();
    let inside = shear_end
        .min(dd_end)
        .saturating_duration_since(dd_start)
        .as_secs_f64();
    let overlap = if span > 0.0 { inside / span } else { 0.0 };
    Ok((
        written,
        json!({"overlap": overlap, "backup_read_ms": report["read_ms"],
               "backup_total_ms": report["total_ms"],
               "fleece_peak_bytes": sum_disks(&report, "fleece_peak_bytes"),
               "written_since_freeze_bytes": written_since_freeze}),
    ))
}

/// The guest-write phase's rows with a backup running (`guest_write_phase`).
const GUEST_WRITE_BACKUPS: [&str; 4] = [
    "guest_write_backup",
    "guest_write_backup_w1",
    "guest_write_backup_nice",
    "guest_write_backup_bw",
];

/// A guest-write backup run's (fleece peak, guest writes since the freeze).
fn fleece_vs_written(d: &Value) -> Option<(f64, f64)> {
    Some((
        d["fleece_peak_bytes"].as_f64()?,
        d["written_since_freeze_bytes"].as_f64()?,
    ))
}

/// Every `shear-*` dirty bitmap on the VM's nodes: (node, name, dirty bytes).
fn shear_bitmaps(vm: &mut TestVm) -> Res<Vec<(String, String, u64)>> {
    let nodes = vm
        .harness_qmp("query-named-block-nodes", json!({"flat": true}))
        .ctx("query-named-block-nodes")?;
    let mut out = Vec::new();
    for n in nodes.as_array().into_iter().flatten() {
        let Some(node) = n["node-name"].as_str() else {
            continue;
        };
        for bm in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            let (Some(name), Some(count)) = (bm["name"].as_str(), bm["count"].as_u64()) else {
                continue;
            };
            if name.starts_with("shear-") {
                out.push((node.to_owned(), name.to_owned(), count));
            }
        }
    }
    Ok(out)
}

/// A CPU-bound guest job: busybox `md5sum` of a 16 MiB file in the
/// guest's RAM (tmpfs /tmp), `rounds` times; returns (bytes hashed,
/// seconds by the guest's /proc/uptime). No disk I/O: what it measures is
/// the CPU the guest's vCPU gets.
fn guest_cpu(vm: &TestVm, rounds: u32) -> Res<(u64, f64)> {
    let script = format!(
        "[ -f /tmp/cpu.bin ] || dd if=/dev/urandom of=/tmp/cpu.bin bs=1M count=16 2>/dev/null; \
         read a _ </proc/uptime; i=0; while [ $i -lt {rounds} ]; do \
         md5sum /tmp/cpu.bin >/dev/null || exit 1; i=$((i+1)); done; \
         read b _ </proc/uptime; echo \"$a $b\""
    );
    let out = vm
        .guest_exec(&["/bin/sh", "-c", &script])
        .ctx("guest md5sum")?;
    let text = out.stdout_str();
    if out.exit != 0 {
        return Err(format!(
            "guest md5sum failed ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let secs = parse_uptimes(&text).ok_or(format!("cannot parse the guest's uptimes: {text:?}"))?;
    Ok((u64::from(rounds) * 16 * MIB, secs))
}

/// Issue 17: a CPU-bound guest job idle and during backups (default
/// workers, `--workers 1`). Rates are MiB hashed per second in the guest.
fn guest_cpu_phase(b: &Bench, vm: &mut TestVm, r: &mut Results) -> Res<()> {
    let read_s = r.get("shear_backup").map_or(2.0, |s| {
        s.of(|x| x.extra["read_ms"].as_f64().unwrap_or(0.0) / 1000.0)
            .min
    });
    say("guest CPU job: idle");
    guest_cpu(vm, 1)?; // warm-up: TCG translates md5sum's loop once
    let (_, one) = guest_cpu(vm, 2)?;
    let per_round = one / 2.0;
    // About a third of a read phase, as the writes.
    let mut rounds = 1u32;
    while f64::from(rounds + 1) * per_round <= read_s * 0.3 && rounds < 64 {
        rounds += 1;
    }
    for _ in 0..b.opts.runs {
        let s = guest_cpu(vm, rounds)?;
        r.rate("guest_cpu_idle", "idle", s, json!({}));
    }
    let variants: [(&'static str, &str, &[&str]); 2] = [
        ("guest_cpu_backup", "during a shear backup", &[]),
        (
            "guest_cpu_backup_w1",
            "during a shear backup --workers 1",
            &["--workers", "1"],
        ),
    ];
    for (key, label, extra) in variants {
        say(&format!("guest CPU job: {label}"));
        for _ in 0..b.opts.runs {
            let (s, detail) = during_backup(b, vm, &[], extra, |vm| guest_cpu(vm, rounds))?;
            r.rate(key, label, s, detail);
        }
    }
    Ok(())
}

/// Peak RSS of a backup of a larger, mostly sparse disk (the data set
/// image grown to 16 GiB), on a paused VM (no guest needed for RSS).
fn rss_phase(b: &Bench, ds: &Dataset, r: &mut Results) -> Res<()> {
    if let Some(s) = r.get("shear_backup") {
        r.rss.push(json!({
            "virtual_gib": b.opts.size_gib,
            "read_mib": mib(s.samples.last().map_or(0, |x| x.read)),
            "peak_rss_mib": s.of(|x| kib_to_mib(x.rss_kib)).max,
            "how": "max over the full-backup runs (guest VM, fresh repository)",
        }));
    }
    if b.opts.quick || b.opts.size_gib >= 16 {
        return Ok(());
    }
    say("peak RSS: backup of a 16 GiB (mostly sparse) disk");
    let big = b.run.join("disk16.qcow2");
    std::fs::copy(&ds.image, &big).ctx("copying the data set")?;
    run_quiet(
        Command::new(tool("qemu-img"))
            .args(["resize", "-q", "-f", "qcow2"])
            .arg(&big)
            .arg("16G"),
    )?;
    let vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2(DISK, 16 * GIB).image(&big)))
        .ctx("starting the paused VM")?;
    let repo = b.run.join("repo-rss");
    b.fresh_repo(&repo)?;
    let s = b.shear_backup(&vm, &repo)?;
    r.rss.push(json!({
        "virtual_gib": 16,
        "read_mib": mib(s.read),
        "peak_rss_mib": kib_to_mib(s.rss_kib),
        "how": "one backup of the data set image grown to 16 GiB (qemu-img resize), paused VM, fresh repository",
    }));
    r.series("shear_backup_16g", "shear backup, 16 GiB disk (paused VM)")
        .samples
        .push(s);
    drop(vm);
    remove(&repo);
    remove(&big);
    Ok(())
}

// ------------------------------------------------------------ incremental

/// The disk's entry in a backup report, checked to be read `kind`
/// (`full` / `incremental`); anything else fails the bench.
fn expect_kind<'a>(report: &'a Value, kind: &str, what: &str) -> Res<&'a Value> {
    let disks = report["disks"]
        .as_array()
        .ok_or("backup report has no disks")?;
    // The QMP path names the disk by its qdev id (DISK); libvirt by its
    // target (`vda`): a report with a single disk is that disk.
    let d = disks
        .iter()
        .find(|d| d["name"] == DISK)
        .or(if disks.len() == 1 {
            disks.first()
        } else {
            None
        })
        .ok_or(format!("backup report has no disk {DISK}: {report}"))?;
    if d["kind"] != kind {
        return Err(format!(
            "{what}: disk {} was read {} (expected {kind}); full_reason: {}",
            d["name"], d["kind"], d["full_reason"]
        ));
    }
    Ok(d)
}

/// Dirty `regions` × `region_mib` MiB of the data set's random files in
/// the guest: busybox `dd if=/dev/urandom oflag=direct conv=notrunc`, one
/// region per file at an offset that moves with `run`. Returns the bytes
/// written.
fn guest_dirty(vm: &TestVm, run: u64, regions: u64, region_mib: u64, file_mib: u64) -> Res<u64> {
    let span = file_mib.saturating_sub(region_mib) + 1;
    let cmds: Vec<String> = (0..regions)
        .map(|i| {
            let seek = (run * 2 * region_mib + i * 7) % span;
            format!(
                "dd if=/dev/urandom of={GUEST_RANDOM_DIR}/{}.bin bs=1M count={region_mib} seek={seek} \
                 oflag=direct conv=notrunc 2>/dev/null || exit 1",
                i % RANDOM_FILES
            )
        })
        .collect();
    let out = vm
        .guest_exec(&["/bin/sh", "-c", &cmds.join("; ")])
        .ctx("guest dd (dirtying)")?;
    if out.exit != 0 {
        return Err(format!(
            "guest dd (dirtying) failed ({}): {}",
            out.exit,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(regions * region_mib * MIB)
}

/// Issue 10: incremental backups of the running VM with 1 % of the disk
/// dirtied through the guest before each, into the repository of the last
/// full backup (its dirty bitmap is on the disk).
fn incremental_phase(b: &Bench, vm: &mut TestVm, r: &mut Results) -> Res<()> {
    let repo = b.run.join("repo-main");
    let file_mib = Plan::for_size(b.size).random / RANDOM_FILES / MIB;
    let regions = RANDOM_FILES;
    let region_mib = (b.size / 100 / regions / MIB).clamp(1, file_mib);
    r.incr_dirty = (regions * region_mib, regions);
    for run in 0..b.opts.runs {
        say(&format!(
            "incremental {}/{}: dirty {} × {region_mib} MiB in the guest, then shear backup",
            run + 1,
            b.opts.runs,
            regions
        ));
        let written = guest_dirty(vm, run as u64, regions, region_mib, file_mib)?;
        let mut s = b.shear_backup(vm, &repo)?;
        let d = expect_kind(&s.extra, "incremental", "incremental backup (1 % dirty)")?;
        let dirty = d["dirty_bytes"].as_u64().unwrap_or(0);
        s.extra["guest_written_bytes"] = json!(written);
        s.extra["dirty_bytes"] = json!(dirty);
        r.series("shear_incremental", "shear backup, incremental (1 % dirty)")
            .samples
            .push(s);
    }
    // What any incremental costs with nothing to read (connect, freeze,
    // graph, exports, teardown, commit): the floor under every figure above.
    for run in 0..b.opts.runs {
        say(&format!(
            "incremental, nothing dirtied {}/{}",
            run + 1,
            b.opts.runs
        ));
        // Backup ids have one-second resolution: a backup of the same VM
        // within the second of the last one waits 1.1 s for the next id
        // (job/backup.rs). The dirty runs have the guest's dd in between;
        // these would measure that wait, so it passes untimed here.
        std::thread::sleep(Duration::from_millis(1100));
        let s = b.shear_backup(vm, &repo)?;
        expect_kind(
            &s.extra,
            "incremental",
            "incremental backup (nothing dirtied)",
        )?;
        r.series(
            "shear_incremental_idle",
            "shear backup, incremental (nothing dirtied)",
        )
        .samples
        .push(s);
    }
    // The repository disk's part: the bytes the dirty runs stored, written
    // durably the way the store writes chunks (4 MiB files on 4 threads,
    // each written, fsynced, renamed, its directory fsynced).
    let stored = r.get("shear_incremental").map_or(0, |s| {
        let mut v: Vec<u64> = s.samples.iter().map(|x| x.out).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    });
    for _ in 0..b.opts.runs {
        let secs = durable_store_floor(&b.run.join("store-floor"), stored)?;
        r.series(
            "store_floor",
            "durable write of the same stored bytes (4 threads, as the store)",
        )
        .samples
        .push(Sample {
            wall: secs,
            out: stored,
            ..Sample::default()
        });
    }
    Ok(())
}

/// Writes `bytes` as 4 MiB files of PRNG data into `dir` on 4 threads,
/// each file written, fsynced, renamed and its directory fsynced, like the
/// repository's chunk store; returns the seconds it took (data generated
/// before the clock starts).
fn durable_store_floor(dir: &Path, bytes: u64) -> Res<f64> {
    const CHUNK: u64 = 4 * MIB;
    remove(dir);
    std::fs::create_dir_all(dir).ctx("creating the store-floor directory")?;
    let files = bytes.div_ceil(CHUNK).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ bytes;
    let data: Vec<u8> = (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let next = std::sync::atomic::AtomicU64::new(0);
    let t = Instant::now();
    let result: Res<()> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                sc.spawn(|| -> Res<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= files {
                            return Ok(());
                        }
                        let len =
                            usize::try_from(CHUNK.min(bytes.saturating_sub(i * CHUNK)).max(1))
                                .unwrap_or(data.len());
                        let mut chunk = data[..len].to_vec();
                        chunk[..8].copy_from_slice(&i.to_le_bytes());
                        let tmp = dir.join(format!("{i}.tmp"));
                        let mut f = std::fs::File::create(&tmp).ctx("store floor: create")?;
                        f.write_all(&chunk).ctx("store floor: write")?;
                        f.sync_all().ctx("store floor: fsync")?;
                        std::fs::rename(&tmp, dir.join(format!("{i}.chunk")))
                            .ctx("store floor: rename")?;
                        std::fs::File::open(dir)
                            .and_then(|d| d.sync_all())
                            .ctx("store floor: fsync dir")?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| "store floor thread panicked".to_string())?
        })
    });
    result?;
    let secs = t.elapsed().as_secs_f64();
    remove(dir);
    Ok(secs)
}

/// Issue 10: a 1 TiB sparse qcow2 on a paused VM: a full backup (nearly
/// all holes), then incrementals with 8 × 1 MiB written through HMP
/// qemu-io before each; then the dirty-range mapping alone on an export
/// of the node with a bitmap.
fn huge_phase(b: &Bench, r: &mut Results) -> Res<()> {
    const HUGE: u64 = 1 << 40;
    const REGIONS: u64 = 8;
    say("1 TiB sparse disk: full backup");
    let img = b.run.join("disk1t.qcow2");
    remove(&img);
    let mut vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2(DISK, HUGE).image(&img)))
        .ctx("starting the paused VM with a 1 TiB disk")?;
    let repo = b.run.join("repo-huge");
    b.fresh_repo(&repo)?;
    let s = b.shear_backup(&vm, &repo)?;
    expect_kind(&s.extra, "full", "first backup of the 1 TiB disk")?;
    r.series(
        "huge_full",
        "shear backup, 1 TiB sparse disk, full (fresh repository)",
    )
    .samples
    .push(s);
    let write_regions = |vm: &mut TestVm, run: u64| -> Res<()> {
        for i in 0..REGIONS {
            // Spread over the disk, away from chunk boundaries' alignment.
            let off = i * (HUGE / REGIONS) + (run * 64 + i * 3) * MIB + 512 * 1024;
            // A pattern byte (qemu-io rejects more, quietly), never zero.
            let pattern = (run * 8 + i) % 255 + 1;
            vm.qemu_io(DISK, &format!("write -P {pattern} {off} 1M"))
                .ctx("qemu-io write")?;
        }
        Ok(())
    };
    for run in 0..b.opts.runs {
        say(&format!(
            "1 TiB sparse disk: incremental {}/{} ({REGIONS} × 1 MiB written)",
            run + 1,
            b.opts.runs
        ));
        write_regions(&mut vm, run as u64)?;
        // Backup ids have one-second resolution; qemu-io's writes take
        // less than that here, so the wait for the next id passes untimed
        // (as for the idle incremental above).
        std::thread::sleep(Duration::from_millis(1100));
        let mut s = b.shear_backup(&vm, &repo)?;
        let d = expect_kind(&s.extra, "incremental", "incremental of the 1 TiB disk")?;
        s.extra["dirty_bytes"] = json!(d["dirty_bytes"].as_u64().unwrap_or(0));
        r.series(
            "huge_incremental",
            "shear backup, 1 TiB sparse disk, incremental (8 × 1 MiB dirty)",
        )
        .samples
        .push(s);
    }
    if let Some(s) = r.get("huge_incremental") {
        r.rss.push(json!({
            "virtual_gib": 1024,
            "read_mib": mib(s.samples.last().map_or(0, |x| x.read)),
            "peak_rss_mib": s.of(|x| kib_to_mib(x.rss_kib)).max,
            "how": "max over the incremental runs of the 1 TiB sparse disk (paused VM; base index of 262144 digests loaded)",
        }));
    }
    remove(&repo);

    say("1 TiB sparse disk: mapping the dirty ranges over NBD");
    let node = vm.disk_node(DISK);
    let q = |vm: &mut TestVm, cmd: &str, args: Value| vm.harness_qmp(cmd, args).ctx(cmd);
    let bitmap = "bench-map";
    let dir = b.run.join("map");
    std::fs::create_dir_all(&dir).ctx("map dir")?;
    let socket = dir.join("nbd.sock");
    for run in 0..b.opts.runs {
        q(
            &mut vm,
            "block-dirty-bitmap-add",
            json!({"node": node, "name": bitmap, "persistent": false}),
        )?;
        write_regions(&mut vm, 100 + run as u64)?;
        q(
            &mut vm,
            "block-dirty-bitmap-disable",
            json!({"node": node, "name": bitmap}),
        )?;
        remove(&socket);
        q(
            &mut vm,
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket}}}),
        )?;
        q(
            &mut vm,
            "block-export-add",
            json!({"type": "nbd", "id": "bench-map", "node-name": node, "name": "map",
                   "writable": false, "bitmaps": [bitmap]}),
        )?;
        let measured = map_export(&socket, bitmap);
        q(&mut vm, "block-export-del", json!({"id": "bench-map"}))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = vm
                .wait_event("BLOCK_EXPORT_DELETED", left)
                .ctx("waiting for BLOCK_EXPORT_DELETED")?;
            if ev["data"]["id"] == "bench-map" {
                break;
            }
        }
        q(&mut vm, "nbd-server-stop", json!({}))?;
        q(
            &mut vm,
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": bitmap}),
        )?;
        r.huge_map.push(measured?);
    }
    drop(vm);
    remove(&img);
    remove(&dir);
    Ok(())
}

/// Time the planning inputs of an incremental read of the export `map` on
/// `socket`: one block status pass over the whole export with both
/// contexts (`base:allocation` + `qemu:dirty-bitmap:<bitmap>`, one
/// connection, as `Client::map` does), and the whole chunk reader (plan
/// every 4 MiB chunk, read the dirty ones; no store).
fn map_export(socket: &Path, bitmap: &str) -> Res<Value> {
    let src = nbd_export::ExportSource::unix(socket, "map").with_dirty_bitmap(bitmap);
    let ctx = format!("qemu:dirty-bitmap:{bitmap}");
    let t = Instant::now();
    let mut c = nbd_export::Client::connect(&src, &nbd_export::ClientOptions::default())
        .map_err(|e| format!("connecting to the map export: {e}"))?;
    let connect_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let dirty = c.map(&ctx).map_err(|e| format!("mapping {ctx}: {e}"))?;
    let dirty_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let alloc = c
        .map("base:allocation")
        .map_err(|e| format!("mapping base:allocation: {e}"))?;
    let alloc_s = t.elapsed().as_secs_f64();
    let _ = c.disconnect();
    let dirty_bytes: u64 = dirty
        .iter()
        .filter(|e| e.flags & 1 != 0)
        .map(|e| e.len)
        .sum();
    let data_bytes: u64 = alloc
        .iter()
        .filter(|e| e.flags & 2 == 0)
        .map(|e| e.len)
        .sum();
    let t = Instant::now();
    let cfg = nbd_export::ReaderConfig::new(shear::repo::format::DEFAULT_CHUNK_SIZE);
    let mut stream = nbd_export::ChunkReader::start(&src, &cfg).map_err(|e| format!("{e}"))?;
    for item in &mut stream {
        item.map_err(|e| format!("reading the map export: {e}"))?;
    }
    let reader_s = t.elapsed().as_secs_f64();
    let st = stream.stats();
    Ok(json!({
        "connect_s": connect_s,
        "dirty_map_s": dirty_s,
        "dirty_extents": dirty.len(),
        "dirty_bytes": dirty_bytes,
        "allocation_map_s": alloc_s,
        "allocation_extents": alloc.len(),
        "data_bytes": data_bytes,
        "reader_s": reader_s,
        "reader_block_status_requests": st.block_status_requests,
        "reader_data_chunks": st.data_chunks,
        "reader_clean_chunks": st.clean_chunks,
        "reader_zero_chunks": st.zero_chunks,
        "reader_bytes_read": st.bytes_read,
    }))
}

// ---------------------------------------------------------------- report

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn render(b: &Bench, r: &Results) -> (String, Value) {
    let mut md = String::new();
    let m = &r.machine;
    let d = &r.dataset;
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let _ = writeln!(md, "# shear benchmark, {date}\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB RAM), Linux {}, {} under TCG; {}; {}; {}.  ",
        m["cpu"].as_str().unwrap_or("?"),
        b.cores,
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["qemu"].as_str().unwrap_or("?"),
        m["nbdcopy"].as_str().unwrap_or("?"),
        m["zstd"].as_str().unwrap_or("?"),
        m["qemu_img"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "shear: {} (git {}). Load average at start: {}; at end: {}.\n",
        m["shear"].as_str().unwrap_or("?"),
        m["git"].as_str().unwrap_or("?"),
        m["loadavg_start"].as_str().unwrap_or("?"),
        m["loadavg_end"].as_str().unwrap_or("?"),
    );
    let (data, zero) = r.block_status;
    let _ = writeln!(
        md,
        "Data set ({} GiB virtual qcow2 on virtio-blk, ext4 built on the host, mounted by the running guest): \
         {} library files ({:.0} MiB), {} text files ({:.0} MiB), {:.0} MiB PRNG data in {} files, \
         {:.0} MiB of allocated zero clusters in free space, the rest never written. \
         Block status of the export: {:.0} MiB data, {:.0} MiB holes/zero.\n",
        b.opts.size_gib,
        d["library_files"],
        mib(d["library_bytes"].as_u64().unwrap_or(0)),
        d["text_files"],
        mib(d["text_bytes"].as_u64().unwrap_or(0)),
        mib(d["random_bytes"].as_u64().unwrap_or(0)),
        d["random_files"],
        mib(d["zero_bytes"].as_u64().unwrap_or(0)),
        mib(data),
        mib(zero),
    );
    let _ = writeln!(
        md,
        "Each figure: median [min–max] of {} run(s), warm page cache. Ratios are shear / anchor \
         (below 1: shear is faster or smaller).\n",
        b.opts.runs
    );

    let shear = r.get("shear_backup");
    let shear_wall = shear.map_or(f64::NAN, |s| s.wall().median);
    let _ = writeln!(
        md,
        "## Full backup: the same export of the same frozen disk\n"
    );
    let _ = writeln!(
        md,
        "| pipeline | wall s | CPU s | peak RSS MiB | read MiB | output MiB | QEMU CPU s | shear / this |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for key in [
        "shear_backup",
        "nbdcopy_zstd",
        "qemu_img_convert",
        "nbdcopy_null",
        "zstd_ceiling",
    ] {
        let Some(s) = r.get(key) else { continue };
        let w = s.wall();
        let q = s.of(|x| x.qemu_cpu);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            s.label.replace('|', "\\|"),
            w.show(2),
            s.of(|x| x.cpu).show(2),
            s.of(|x| kib_to_mib(x.rss_kib)).show(0),
            mib(s.samples.last().map_or(0, |x| x.read)),
            if s.samples.last().is_some_and(|x| x.out > 0) {
                s.of(|x| mib(x.out)).show(0)
            } else {
                "–".into()
            },
            if key == "zstd_ceiling" {
                "–".into()
            } else {
                q.show(2)
            },
            if key == "shear_backup" {
                "1".into()
            } else {
                format!("{:.2}", ratio(shear_wall, w.median))
            },
        );
    }
    if let Some(s) = shear.and_then(|s| s.samples.last()) {
        let _ = writeln!(
            md,
            "\nshear's own report (last run): setup {} ms (graph, freeze, exports), read+store {} ms, total {} ms; \
             {:.0} MiB read, {:.0} MiB skipped by block status, {:.0} MiB stored.",
            s.extra["setup_ms"], s.extra["read_ms"], s.extra["total_ms"],
            mib(s.read),
            mib(sum_disks(&s.extra, "bytes_skipped")),
            mib(s.out),
        );
    }

    let _ = writeln!(md, "\n## Restore\n");
    let _ = writeln!(
        md,
        "| pipeline | wall s | CPU s | peak RSS MiB | image allocated MiB | shear / this |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for (key, shear_key) in [
        ("shear_restore_raw", ""),
        ("qemu_img_restore_raw", "shear_restore_raw"),
        ("qemu_img_restore_raw_flush", "shear_restore_raw"),
        ("shear_restore_qcow2", ""),
        ("qemu_img_restore_qcow2", "shear_restore_qcow2"),
    ] {
        let Some(s) = r.get(key) else { continue };
        let rt = r.get(shear_key).map_or("".to_string(), |o| {
            format!("{:.2}", ratio(o.wall().median, s.wall().median))
        });
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            s.label,
            s.wall().show(2),
            s.of(|x| x.cpu).show(2),
            s.of(|x| kib_to_mib(x.rss_kib)).show(0),
            s.of(|x| mib(x.out)).show(0),
            rt
        );
    }
    if let (Some(blocks), Some(differ)) = (
        r.restore_diff["blocks_4k"].as_u64(),
        r.restore_diff["differing_blocks_4k"].as_u64(),
    ) {
        let _ = writeln!(
            md,
            "\nThe raw images restored by shear and by qemu-img differ in {differ} of {blocks} 4 KiB blocks \
             (the two exports were taken a few seconds apart from a mounted, idle guest)."
        );
    }

    let fz = summary(&r.freeze_ms);
    let apps = r
        .freeze_consistency
        .iter()
        .filter(|c| c.as_str() == "application")
        .count();
    let _ = writeln!(
        md,
        "\n## Freeze window ({} consecutive backups)\n",
        r.freeze_ms.len()
    );
    let _ = writeln!(
        md,
        "| min ms | median ms | max ms | application-consistent |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {:.0} | {:.0} | {:.0} | {apps} of {} |",
        fz.min,
        fz.median,
        fz.max,
        r.freeze_consistency.len()
    );
    if let Some((worst, polls, failed)) = r.qmp_wait {
        let _ = writeln!(
            md,
            "\nAnother QMP client polling the same monitor through these backups (connect, \
             greeting, `query-status`): worst wait **{worst:.0} ms** over {polls} polls, {failed} \
             failed (issue 11's aim: ≤ 1000 ms at any moment)."
        );
    }
    if let Some(s) = r.get("shear_backup_repeat") {
        let _ = writeln!(
            md,
            "\nThese backups went into one repository (incremental after the first: the guest is idle, so little is dirty): wall {} s.",
            s.wall().show(2)
        );
    }

    let _ = writeln!(
        md,
        "\n## Guest writes (busybox `dd if=/dev/zero bs=1M oflag=direct conv=notrunc` over {} MiB of existing files)\n",
        r.guest_dd_mib
    );
    let rate_med = |k: &str| {
        r.guest
            .get(k)
            .map_or(f64::NAN, |x| summary(&x.mib_s).median)
    };
    let idle = rate_med("guest_write_idle");
    let _ = writeln!(
        md,
        "| condition | MiB/s | vs idle | writes inside the backup's run | backup wall s | fleece peak MiB (guest data held) | guest writes since the freeze MiB (dirty bitmap) | peak above its run's writes |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for key in ["guest_write_idle", "guest_write_cbw"]
        .into_iter()
        .chain(GUEST_WRITE_BACKUPS)
    {
        let Some(x) = r.guest.get(key) else { continue };
        let values =
            |f: &str| -> Vec<f64> { x.detail.iter().filter_map(|d| d[f].as_f64()).collect() };
        let overlap = values("overlap");
        let overlap = if overlap.is_empty() {
            "–".to_string()
        } else {
            let o = summary(&overlap);
            format!("{:.0} % (min {:.0} %)", o.median * 100.0, o.min * 100.0)
        };
        let wall: Vec<f64> = values("backup_total_ms")
            .iter()
            .map(|v| v / 1000.0)
            .collect();
        let wall = if wall.is_empty() {
            "–".to_string()
        } else {
            summary(&wall).show(2)
        };
        let peaks = values("fleece_peak_bytes");
        let fleece = if peaks.is_empty() {
            "– | – | –".to_string()
        } else {
            // What the guest wrote since the freeze, by the change
            // tracking the backup started (64 KiB clusters, journal and
            // inode writes included): the most the fleece could have had
            // to hold.
            let bound = values("written_since_freeze_bytes");
            let peak_max = peaks.iter().copied().fold(0.0, f64::max);
            let bound_min = bound.iter().copied().fold(f64::INFINITY, f64::min);
            // Each run against its own bound, not the largest peak against
            // the smallest bound.
            let over = x
                .detail
                .iter()
                .filter_map(fleece_vs_written)
                .filter(|(peak, bound)| peak > bound)
                .count();
            format!(
                "{:.2} max | {:.2} min | {}",
                peak_max / MIB as f64,
                bound_min / MIB as f64,
                if over == 0 {
                    "no run".to_string()
                } else {
                    format!("**{over} run(s)**")
                }
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {overlap} | {wall} | {fleece} |",
            x.label,
            summary(&x.mib_s).show(1),
            ratio(rate_med(key), idle),
        );
    }
    let _ = writeln!(
        md,
        "\nshear has one mode, fleecing: the second row is the cost of the copy-before-write filter alone \
         (each first write to a cluster since the snapshot waits for a copy of the old data to the fleece \
         image). The writes start once the backup's export exists (its read phase); \"inside\" is the share \
         of the writes' duration before the backup ended. The fleece image holds only what the guest \
         overwrote before shear read and released it, so its peak must stay at or below the bytes written \
         during the backup (a bound: which of them hit not-yet-read ranges is not observable from outside). \
         The peak is shear's `fleece_peak_bytes`: guest data held, without the fleece qcow2's own metadata \
         (header, refcount and L1 tables, and the L2 tables QEMU adds). The guest's writes since the freeze \
         come from the dirty bitmap the backup started at its freeze, read after it ended (64 KiB clusters, \
         the filter's copy unit; ext4's journal and inode updates included, and whatever was written after \
         the backup ended): each run's peak must be at or below its own run's figure."
    );

    if r.guest.contains_key("guest_cpu_idle") {
        let idle = rate_med("guest_cpu_idle");
        let _ = writeln!(
            md,
            "\n## Guest CPU job (busybox `md5sum` of a 16 MiB file in the guest's RAM, repeated)\n"
        );
        let _ = writeln!(
            md,
            "| condition | MiB/s hashed | vs idle | job inside the backup's run | backup wall s |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for key in ["guest_cpu_idle", "guest_cpu_backup", "guest_cpu_backup_w1"] {
            let Some(x) = r.guest.get(key) else { continue };
            let values =
                |f: &str| -> Vec<f64> { x.detail.iter().filter_map(|d| d[f].as_f64()).collect() };
            let overlap = values("overlap");
            let overlap = if overlap.is_empty() {
                "–".to_string()
            } else {
                let o = summary(&overlap);
                format!("{:.0} % (min {:.0} %)", o.median * 100.0, o.min * 100.0)
            };
            let wall: Vec<f64> = values("backup_total_ms")
                .iter()
                .map(|v| v / 1000.0)
                .collect();
            let wall = if wall.is_empty() {
                "–".to_string()
            } else {
                summary(&wall).show(2)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {overlap} | {wall} |",
                x.label,
                summary(&x.mib_s).show(1),
                ratio(rate_med(key), idle),
            );
        }
        let _ = writeln!(
            md,
            "\nThe guest has one vCPU (TCG: one host thread); the host has {} cores. shear's data path runs at nice 19 and SCHED_BATCH (`--nice`, `--ionice`), so its workers take only CPU the vCPU thread leaves idle.",
            b.cores
        );
    }

    let _ = writeln!(md, "\n## Peak RSS of `shear backup`\n");
    let _ = writeln!(md, "| virtual disk | data read MiB | peak RSS MiB | how |");
    let _ = writeln!(md, "|---|---|---|---|");
    for x in &r.rss {
        let _ = writeln!(
            md,
            "| {} GiB | {:.0} | {:.1} | {} |",
            x["virtual_gib"],
            x["read_mib"].as_f64().unwrap_or(0.0),
            x["peak_rss_mib"].as_f64().unwrap_or(0.0),
            x["how"].as_str().unwrap_or("")
        );
    }

    if let Some(inc) = r.get("shear_incremental") {
        let (dirty_mib, regions) = r.incr_dirty;
        let _ = writeln!(
            md,
            "\n## Incremental backup (issue 10): 1 % of the disk dirty\n\n\
             Before each run the guest overwrites {dirty_mib} MiB ({regions} regions of {} MiB in the data set's \
             random files, busybox `dd if=/dev/urandom oflag=direct conv=notrunc`, untimed); then `shear backup` \
             into the repository of the last full backup above (its dirty bitmap is on the disk). Every run \
             reported the disk as `kind: incremental`.\n",
            dirty_mib / regions.max(1)
        );
        let _ = writeln!(
            md,
            "| backup | wall s | CPU s | peak RSS MiB | dirty MiB (bitmap) | read MiB | stored MiB | freeze / setup / read / total ms (last run) | wall / full |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for (key, s) in [("shear_backup", shear), ("shear_incremental", Some(inc))] {
            let Some(s) = s else { continue };
            let dirty = if key == "shear_incremental" {
                s.of(|x| mib(x.extra["dirty_bytes"].as_u64().unwrap_or(0)))
                    .show(1)
            } else {
                "–".into()
            };
            let last = s.samples.last().map_or(String::new(), |x| {
                format!(
                    "{} / {} / {} / {}",
                    x.extra["freeze_window_ms"],
                    x.extra["setup_ms"],
                    x.extra["read_ms"],
                    x.extra["total_ms"]
                )
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {dirty} | {} | {} | {last} | {:.3} |",
                s.label,
                s.wall().show(3),
                s.of(|x| x.cpu).show(2),
                s.of(|x| kib_to_mib(x.rss_kib)).show(0),
                s.of(|x| mib(x.read)).show(1),
                s.of(|x| mib(x.out)).show(1),
                ratio(s.wall().median, shear_wall),
            );
        }
        if let (Some(idle), Some(floor)) = (r.get("shear_incremental_idle"), r.get("store_floor")) {
            let (fixed, disk) = (idle.wall().median, floor.wall().median);
            let _ = writeln!(
                md,
                "\nWhat bounds it, same run: an incremental with nothing dirtied (the guest idle) takes \
                 {} s ({:.1} % of the full backup): qemu-ga, the freeze, the graph, the exports, teardown and \
                 commit under TCG. Writing the bytes the dirty runs stored ({:.1} MiB) durably the way the \
                 store does (4 MiB files, 4 threads, fsync + rename + directory fsync) takes {} s on this \
                 repository's disk ({:.1} %). Together: {:.3} s = {:.1} % of the full backup, before any byte \
                 is read or hashed.",
                idle.wall().show(3),
                100.0 * ratio(fixed, shear_wall),
                mib(floor.samples.first().map_or(0, |x| x.out)),
                floor.wall().show(3),
                100.0 * ratio(disk, shear_wall),
                fixed + disk,
                100.0 * ratio(fixed + disk, shear_wall),
            );
        }
    }

    if let Some(full) = r.get("huge_full") {
        let _ = writeln!(
            md,
            "\n## 1 TiB sparse qcow2 (issue 10): finding the dirty ranges\n\n\
             A paused VM (no guest) with a 1 TiB qcow2 that has never been written; 4 MiB chunks \
             (262144 per disk). The first backup is full (all holes); before each incremental, HMP \
             `qemu-io` writes 8 × 1 MiB spread over the disk.\n"
        );
        let _ = writeln!(
            md,
            "| backup | wall s | CPU s | peak RSS MiB | dirty MiB (bitmap) | read MiB | setup / read / total ms (last run) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for s in [Some(full), r.get("huge_incremental")]
            .into_iter()
            .flatten()
        {
            let last = s.samples.last().map_or(String::new(), |x| {
                format!(
                    "{} / {} / {}",
                    x.extra["setup_ms"], x.extra["read_ms"], x.extra["total_ms"]
                )
            });
            let dirty: Vec<f64> = s
                .samples
                .iter()
                .filter_map(|x| x.extra["dirty_bytes"].as_u64())
                .map(mib)
                .collect();
            let dirty = if dirty.is_empty() {
                "–".into()
            } else {
                summary(&dirty).show(1)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {dirty} | {} | {last} |",
                s.label,
                s.wall().show(3),
                s.of(|x| x.cpu).show(2),
                s.of(|x| kib_to_mib(x.rss_kib)).show(0),
                s.of(|x| mib(x.read)).show(1),
            );
        }
        if !r.huge_map.is_empty() {
            let col = |f: &str| -> Summary {
                summary(
                    &r.huge_map
                        .iter()
                        .filter_map(|m| m[f].as_f64())
                        .collect::<Vec<_>>(),
                )
            };
            let m0 = &r.huge_map[0];
            let _ = writeln!(
                md,
                "\nThe mapping alone: QEMU's NBD server exports the disk's node with a disabled bitmap \
                 (8 × 1 MiB written after it was added); shear's NBD client (`nbd_export`) asks block \
                 status over the whole export with both contexts (`base:allocation`, \
                 `qemu:dirty-bitmap:…`) in requests of up to 4 GiB, 4 in flight on one connection \
                 (`Client::map`); the chunk reader (2 connections) plans every chunk and reads the dirty \
                 ones, storing nothing.\n"
            );
            let _ = writeln!(md, "| step | s | result |");
            let _ = writeln!(md, "|---|---|---|");
            let _ = writeln!(
                md,
                "| block status pass, dirty-bitmap map | {} | {} extents, {:.1} MiB dirty |",
                col("dirty_map_s").show(3),
                m0["dirty_extents"],
                mib(m0["dirty_bytes"].as_u64().unwrap_or(0))
            );
            let _ = writeln!(
                md,
                "| block status pass, allocation map | {} | {} extents, {:.1} MiB data |",
                col("allocation_map_s").show(3),
                m0["allocation_extents"],
                mib(m0["data_bytes"].as_u64().unwrap_or(0))
            );
            let _ = writeln!(
                md,
                "| chunk reader: plan 262144 chunks, read the dirty ones | {} | {} block status requests; {} data, {} clean, {} zero chunks; {:.0} MiB read |",
                col("reader_s").show(3),
                m0["reader_block_status_requests"],
                m0["reader_data_chunks"],
                m0["reader_clean_chunks"],
                m0["reader_zero_chunks"],
                mib(m0["reader_bytes_read"].as_u64().unwrap_or(0))
            );
        }
    }

    // Goals from issue 7 (aims, not gates).
    let goals = goals(r);
    let _ = writeln!(md, "\n## Goals (issue 7; aims, not gates)\n");
    let _ = writeln!(md, "| goal | aim | measured | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for g in &goals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            g["goal"].as_str().unwrap_or("").replace('|', "\\|"),
            g["aim"].as_str().unwrap_or(""),
            g["measured"].as_str().unwrap_or(""),
            match g["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        );
    }

    if !r.profiles.is_empty() {
        let _ = writeln!(
            md,
            "\n## Profiles\n\n`perf record -F 999`; shares of the on-CPU samples (idle time is not sampled)."
        );
        for p in &r.profiles {
            let _ = writeln!(md, "\n### {}\n\nBy thread and object:\n\n```", p.title);
            for l in &p.by_comm {
                let _ = writeln!(md, "{l}");
            }
            let _ = writeln!(md, "```\n\nBy thread, object and symbol (≥ 1 %):\n\n```");
            for l in &p.by_symbol {
                let _ = writeln!(md, "{l}");
            }
            let _ = writeln!(md, "```");
        }
    }

    if !r.snapshot.is_empty() {
        let _ = writeln!(md, "\n## VM snapshots (`shear snapshot`, issue 15)\n");
        let _ = writeln!(md, "| figure | wall s |");
        let _ = writeln!(md, "|---|---|");
        for (label, xs) in &r.snapshot {
            let _ = writeln!(md, "| {label} | {} |", summary(xs).show(3));
        }
    }
    for sec in &r.sections {
        let _ = writeln!(md, "\n{}", sec.trim_end());
    }
    let _ = writeln!(md, "\n## Method\n");
    let mut method = vec![
        "One guest VM (tiny Linux guest, TCG, 128 MiB, qemu-ga) with the data disk; every pipeline reads the disk \
         through QEMU's own NBD server from a snapshot-access node over a copy-before-write filter with a fleece \
         image, set up inside a guest-fsfreeze (design.md §2). The bench builds that export for the anchors \
         through its QMP monitor; `shear backup` builds the same graph itself on the same disk, in the same round."
            .to_string(),
        "shear's wall time covers the whole command (connect, fleece image, freeze, graph, exports, read, \
         hash, compress, store, teardown, commit); the anchors get the export ready-made."
            .into(),
        "CPU and peak RSS come from GNU time (wait4 rusage: user+sys of the command and the children it \
         waited for; for a pipeline run under bash, RSS is that of its largest process). \
         QEMU CPU is /proc/<qemu>/stat before and after (NBD server, block layer, idle guest)."
            .into(),
        "read MiB is shear's own count for shear and the block-status data of the export for the anchors \
         (nbdcopy and qemu-img skip holes and zero extents the same way). output MiB: compressed file size, \
         allocated qcow2 size, or shear's stored chunk bytes."
            .into(),
        "Guest writes are busybox dd inside the guest (O_DIRECT, 1 MiB requests) overwriting the data set's \
         random files from the start, so every write is the first to its clusters since the snapshot and \
         waits for a copy to the fleece image (the worst case for copy-before-write). The amount is chosen \
         so the writes take about a third of a backup's read phase when idle. The guest's vCPU is emulated \
         (TCG), but O_DIRECT hands whole buffers to QEMU, whose host threads do the copying: the rates are \
         those of QEMU's block layer into the host page cache. Timing: the guest's /proc/uptime (10 ms)."
            .into(),
        "Each round's shear backup goes into a fresh repository (nothing to deduplicate against). \
         Everything is synced before each timed command; nothing is evicted from the page cache \
         (the data set fits in RAM)."
            .into(),
    ];
    method.extend(r.notes.iter().cloned());
    for n in &method {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(
        md,
        "\nReproduce: `scripts/bench{}` (whole run {:.0} s).",
        if b.opts.quick {
            " --quick".to_string()
        } else if b.opts.size_gib != 4 {
            format!(" --size {}", b.opts.size_gib)
        } else {
            String::new()
        },
        r.elapsed_s
    );

    let js = json!({
        "date": date,
        "machine": r.machine,
        "options": {"size_gib": b.opts.size_gib, "runs": b.opts.runs, "quick": b.opts.quick,
                    "freeze_runs": b.opts.freeze_runs},
        "dataset": r.dataset,
        "block_status": {"data_bytes": data, "zero_bytes": zero},
        "series": r.series.iter().map(|(k, v)| (k.to_string(), v.json())).collect::<serde_json::Map<_, _>>(),
        "freeze_window_ms": {"samples": r.freeze_ms, "summary": fz.json(),
                             "consistency": r.freeze_consistency},
        "other_qmp_client_wait_ms": r.qmp_wait.map(|(w, p, f)| json!({"worst": w, "polls": p, "failed": f})),
        "guest_write": {"dd_mib": r.guest_dd_mib,
                        "conditions": r.guest.iter().map(|(k, v)| (k.to_string(), v.json())).collect::<serde_json::Map<_, _>>()},
        "peak_rss": r.rss,
        "restore_diff": r.restore_diff,
        "incremental_dirty": {"mib": r.incr_dirty.0, "regions": r.incr_dirty.1},
        "huge_map": r.huge_map,
        "snapshot": r.snapshot.iter().map(|(k, xs)| json!({"figure": k, "samples_s": xs, "summary": summary(xs).json()})).collect::<Vec<_>>(),
        "goals": goals,
        "profiles": r.profiles.iter().map(|p| json!({
            "title": p.title, "by_thread": p.by_comm, "by_symbol": p.by_symbol,
        })).collect::<Vec<_>>(),
        "notes": r.notes,
        "phases": r.extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<serde_json::Map<_, _>>(),
        "elapsed_s": r.elapsed_s,
    });
    (md, js)
}

fn goals(r: &Results) -> Vec<Value> {
    let med = |k: &str| r.get(k).map_or(f64::NAN, |s| s.wall().median);
    let shear = med("shear_backup");
    let mut g = Vec::new();
    let mut speedup = |goal: &str, anchor: &str, aim: f64| {
        let a = med(anchor);
        let x = a / shear;
        g.push(json!({
            "goal": goal, "aim": format!("≥ {aim}× faster"),
            "measured": format!("{x:.2}× (ratio {:.2})", shear / a),
            "met": x.is_finite().then_some(x >= aim),
        }));
    };
    speedup("full backup vs nbdcopy | zstd", "nbdcopy_zstd", 3.0);
    speedup(
        "full backup vs qemu-img convert -c",
        "qemu_img_convert",
        4.0,
    );
    let ceiling = med("zstd_ceiling");
    let frac = ceiling / shear;
    g.push(json!({
        "goal": "throughput vs compression ceiling (zstd -1 over the allocated data)",
        "aim": "≥ 70 %",
        "measured": format!("{:.0} % (wall ratio {:.2})", frac * 100.0, shear / ceiling),
        "met": frac.is_finite().then_some(frac >= 0.7),
    }));
    let rs = med("shear_restore_raw") / med("qemu_img_restore_raw");
    g.push(json!({
        "goal": "restore (raw) vs qemu-img convert",
        "aim": "≥ 2× faster",
        "measured": format!("{:.2}× (ratio {rs:.2})", 1.0 / rs),
        "met": rs.is_finite().then_some(rs <= 0.5),
    }));
    let rate = |k: &str| {
        r.guest
            .get(k)
            .map_or(f64::NAN, |x| summary(&x.mib_s).median)
    };
    let w = rate("guest_write_backup") / rate("guest_write_idle");
    g.push(json!({
        "goal": "guest write throughput during backup (fleecing) vs idle",
        "aim": "≥ 80 %",
        "measured": format!("{:.0} %", w * 100.0),
        "met": w.is_finite().then_some(w >= 0.8),
    }));
    // Issue 17: the fleece holds at most what the guest overwrote, in every
    // backup run of the guest-write phase.
    let fleece_runs: Vec<(f64, f64)> = GUEST_WRITE_BACKUPS
        .iter()
        .filter_map(|k| r.guest.get(*k))
        .flat_map(|x| x.detail.iter())
        .filter_map(fleece_vs_written)
        .collect();
    if !fleece_runs.is_empty() {
        let within = fleece_runs.iter().filter(|(p, b)| p <= b).count();
        let worst = fleece_runs.iter().map(|(p, b)| p / b).fold(0.0, f64::max);
        g.push(json!({
            "goal": "fleece peak vs the guest's writes since the freeze (per run)",
            "aim": "≤ 100 %",
            "measured": format!("{within} of {} runs within; largest {:.1} %", fleece_runs.len(), worst * 100.0),
            "met": Some(within == fleece_runs.len()),
        }));
    }
    let c = rate("guest_cpu_backup") / rate("guest_cpu_idle");
    if c.is_finite() {
        g.push(json!({
            "goal": "CPU-bound guest job during backup vs idle",
            "aim": "≥ 90 %",
            "measured": format!("{:.0} %", c * 100.0),
            "met": Some(c >= 0.9),
        }));
    }
    let rss = r
        .rss
        .iter()
        .filter_map(|x| x["peak_rss_mib"].as_f64())
        .fold(f64::NAN, f64::max);
    let inc = med("shear_incremental") / shear;
    if inc.is_finite() {
        g.push(json!({
            "goal": "incremental backup, 1 % of the disk dirty, vs full backup (wall)",
            "aim": "≤ 5 %",
            "measured": format!("{:.1} %", inc * 100.0),
            "met": Some(inc <= 0.05),
        }));
    }
    let map = summary(
        &r.huge_map
            .iter()
            .filter_map(|m| m["dirty_map_s"].as_f64())
            .collect::<Vec<_>>(),
    )
    .median;
    if map.is_finite() {
        g.push(json!({
            "goal": "finding the dirty ranges of a 1 TiB sparse qcow2 (block status pass)",
            "aim": "< 1 s",
            "measured": format!("{map:.3} s (whole incremental: {:.2} s)", med("huge_incremental")),
            "met": Some(map < 1.0),
        }));
    }
    g.push(json!({
        "goal": "peak RSS of shear backup",
        "aim": "< 256 MiB",
        "measured": format!("{rss:.1} MiB (largest disk measured)"),
        "met": rss.is_finite().then_some(rss < 256.0),
    }));
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_median_min_max() {
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = summary(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn guest_uptimes_parse() {
        assert_eq!(parse_uptimes("12.50 13.75\n"), Some(1.25));
        assert_eq!(parse_uptimes("12.50 12.50\n"), Some(0.01));
        assert_eq!(parse_uptimes("13.00 12.00"), None);
        assert_eq!(parse_uptimes("x"), None);
    }
}
