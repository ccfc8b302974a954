//! `scripts/bench --only s3` (issue 14), a self-contained phase: on the
//! same data set and in the same run,
//!
//! - `shear backup` of the paused VM's data disk into a fresh local
//!   repository and into a fresh S3 repository on loopback (a single
//!   Garage node, `shear_tests::s3`, data on this machine's disk);
//! - `shear sync` of that backup from the local repository into fresh S3
//!   repositories with 1, 4 and 16 streams, through a proxy that adds
//!   0 ms and 40 ms to every request (a long link on loopback).
//!
//! Garage keeps its objects in a temporary directory (under `$TMPDIR`):
//! size the data set (`--size`) to that disk.

use super::*;
use shear_tests::s3::{Creds, Faults, Garage};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The server, as the report names it.
const SERVER: &str = "Garage 2.5 on loopback";

/// Added latency per request for the "long link" figures, ms.
const LINK_MS: u64 = 40;

fn s3_env(b: &Bench, creds: &Creds, port: u16) -> Vec<(&'static str, OsString)> {
    let mut env = b.shear_env();
    for (k, v) in shear_tests::s3::env(creds, port, &b.run.join("s3-cache")) {
        let k: &'static str = match k.as_str() {
            "AWS_ACCESS_KEY_ID" => "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY" => "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION" => "AWS_REGION",
            "AWS_ENDPOINT_URL" => "AWS_ENDPOINT_URL",
            _ => "SHEAR_CACHE_DIR",
        };
        env.push((k, OsString::from(v)));
    }
    env
}

fn run_env(
    b: &Bench,
    envs: &[(&'static str, OsString)],
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> Res<Vec<u8>> {
    let mut c = Command::new(&b.shear);
    for a in args {
        c.arg(a);
    }
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.stdin(Stdio::null()).output().ctx("running shear")?;
    if !out.status.success() {
        return Err(format!(
            "shear failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        ));
    }
    Ok(out.stdout)
}

/// The sync figure keys (static, for [`Results::series`]).
fn sync_key(streams: usize, delay: u64) -> (&'static str, String) {
    let key = match (streams, delay) {
        (1, 0) => "s3_sync_1_stream",
        (4, 0) => "s3_sync_4_streams",
        (16, 0) => "s3_sync_16_streams",
        (1, _) => "s3_sync_1_stream_40ms",
        (4, _) => "s3_sync_4_streams_40ms",
        _ => "s3_sync_16_streams_40ms",
    };
    (
        key,
        format!("shear sync local → S3, {streams} stream(s), +{delay} ms per request"),
    )
}

pub(super) fn s3_phase(b: &Bench, r: &mut Results) -> Res<()> {
    if shear_tests::s3::garage_binary().is_none() {
        return Err(
            "garage missing (scripts/setup installs it into /opt/shear-test/garage)".into(),
        );
    }
    let plan = Plan::for_size(b.size);
    let ds = prepare_dataset(&b.work, &plan)?;
    r.dataset = ds.info.clone();
    let disk = b.run.join("disk.qcow2");
    std::fs::copy(&ds.image, &disk).ctx("copying the data set")?;
    let server = Garage::start(&["shear"])?;
    let creds = server.creds();
    let proxy = Arc::new(Faults::default());
    let proxy_port = shear_tests::s3::start_proxy(server.port, Arc::clone(&proxy));
    let direct = s3_env(b, &creds, server.port);
    let local = b.run.join("repo-s3-local");
    {
        say(&format!(
            "s3: backing up the data set (paused VM) to a local directory and to S3 ({SERVER})"
        ));
        let vm = TestVm::start(VmConfig::paused().disk(DiskSpec::qcow2(DISK, b.size).image(&disk)))
            .ctx("starting the paused VM")?;
        let args = b.backup_args(&vm);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        for round in 1..=b.opts.runs {
            say(&format!("s3 backup round {round}/{}", b.opts.runs));
            b.fresh_repo(&local)?;
            let (mut s, out) = b.measure(&b.shear_argv(&local, &args), &b.shear_env(), vm.pid())?;
            let rep = backup_report(&out)?;
            s.read = sum_disks(&rep, "bytes_read");
            s.out = sum_disks(&rep, "bytes_stored");
            r.series("s3_local_backup", "shear backup → local directory")
                .samples
                .push(s);
            let s3 = PathBuf::from(format!("s3://shear/bench-backup-{round}"));
            run_env(b, &direct, &[&"--repo", &s3, &"init"])?;
            let (mut s, out) = b.measure(&b.shear_argv(&s3, &args), &direct, vm.pid())?;
            let rep = backup_report(&out)?;
            s.read = sum_disks(&rep, "bytes_read");
            s.out = sum_disks(&rep, "bytes_stored");
            r.series("s3_backup", "shear backup → S3 (Garage on loopback)")
                .samples
                .push(s);
        }
    }
    let via_proxy = s3_env(b, &creds, proxy_port);
    let mut n = 0;
    for delay in [0, LINK_MS] {
        proxy.delay_ms.store(delay, Ordering::Release);
        for streams in [1usize, 4, 16] {
            for round in 1..=b.opts.runs {
                n += 1;
                say(&format!(
                    "s3 sync, {streams} stream(s), +{delay} ms per request, round {round}/{}",
                    b.opts.runs
                ));
                let to = PathBuf::from(format!("s3://shear/bench-sync-{n}"));
                run_env(b, &via_proxy, &[&"--repo", &to, &"init"])?;
                proxy.max_inflight.store(0, Ordering::Release);
                let argv: Vec<OsString> = vec![
                    b.shear.clone().into_os_string(),
                    "sync".into(),
                    "--from".into(),
                    local.clone().into_os_string(),
                    "--to".into(),
                    to.into_os_string(),
                    "--streams".into(),
                    streams.to_string().into(),
                    "--json".into(),
                ];
                let (mut s, out) = b.measure(&argv, &via_proxy, 0)?;
                let rep: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
                s.out = rep["bytes_copied"].as_u64().unwrap_or(0);
                s.extra = json!({
                    "report": rep,
                    "max_requests_in_flight": proxy.max_inflight.load(Ordering::Acquire),
                });
                let (key, label) = sync_key(streams, delay);
                r.series(key, &label).samples.push(s);
            }
        }
    }
    drop(server);
    // The figures, as notes (the markdown report's method list).
    let med = |k: &str| r.get(k).map(|s| s.wall().median);
    if let (Some(l), Some(s)) = (med("s3_local_backup"), med("s3_backup")) {
        let bytes = r
            .get("s3_backup")
            .and_then(|x| x.samples.last())
            .map_or(0, |x| x.read);
        r.notes.push(format!(
            "S3 (issue 14): backup of the {} GiB data set ({:.0} MiB read) to a local directory {l:.2} s, \
             to S3 ({SERVER}) {s:.2} s: S3 at {:.2}× the local time",
            b.opts.size_gib,
            mib(bytes),
            s / l.max(1e-9)
        ));
    }
    for delay in [0, LINK_MS] {
        let mut parts = Vec::new();
        for streams in [1usize, 4, 16] {
            let (key, _) = sync_key(streams, delay);
            if let Some(x) = r.get(key) {
                let w = x.wall().median;
                let bytes = x.samples.last().map_or(0, |s| s.out);
                let inflight = x.samples.last().map_or(0, |s| {
                    s.extra["max_requests_in_flight"].as_u64().unwrap_or(0)
                });
                parts.push(format!(
                    "{streams} stream(s) {w:.2} s ({:.1} MiB/s, ≤{inflight} requests in flight)",
                    mib(bytes) / w.max(1e-9)
                ));
            }
        }
        r.notes.push(format!(
            "S3 sync local → S3 ({SERVER}) through a proxy adding {delay} ms per request: {}",
            parts.join(", ")
        ));
    }
    Ok(())
}
