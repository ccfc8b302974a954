//! `scripts/bench --only scaling` (issue 17; also part of a full run): the
//! scaling model of `shear_tests::scaling`, built and checked in one run
//! on the data set's running guest:
//!
//! 1. the read ceiling: `nbdcopy URI null:` of a fleecing export of the
//!    same disk (a full run reuses its own figure);
//! 2. one `shear backup --workers 2` into a fresh repository: its
//!    `disks[].stages` (CPU seconds and bytes per stage, measured by shear
//!    itself) and QEMU's CPU meanwhile give the CPU seconds per GiB read of
//!    each stage;
//! 3. the model's throughput for 1, 2, 4, 8, 16 and 32 cores;
//! 4. `--workers 1` and `--workers 2` backups (fresh repositories,
//!    interleaved): the measured data-path time (`read_ms`) against the
//!    model's prediction for this machine's cores.

use super::*;
use shear_tests::scaling::{relative_error, Costs, Model, StageTotals, STAGES};

/// Cores the model is evaluated for.
const CORES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Where each stage runs (the model's reading of it).
fn runs_on(stage: &str) -> &'static str {
    match stage {
        "read" => "1 NBD reader thread + the hand-over thread (serial)",
        "write" => "4 store threads",
        _ => "the `--workers` workers",
    }
}

/// `--only scaling`: the data set and guest as in a full run, then the phase.
pub(super) fn scaling_only(b: &Bench, r: &mut Results) -> Res<()> {
    let mut vm = data_set_vm(b, r)?;
    scaling_phase(b, &mut vm, r)?;
    vm.shutdown().ctx("shutting the VM down")?;
    Ok(())
}

/// One `shear backup --workers N` into a fresh repository, measured.
fn backup_with_workers(b: &Bench, vm: &TestVm, workers: usize) -> Res<Sample> {
    let repo = b.run.join("repo-scaling");
    b.fresh_repo(&repo)?;
    let mut args = b.backup_args(vm);
    args.extend(["--workers".to_string(), workers.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut s, stdout) = b.measure(&b.shear_argv(&repo, &args), &b.shear_env(), vm.pid())?;
    let report = backup_report(&stdout)?;
    s.read = sum_disks(&report, "bytes_read");
    s.out = sum_disks(&report, "bytes_stored");
    s.extra = report;
    remove(&repo);
    Ok(s)
}

/// Data-path seconds of a backup (its `read_ms`).
fn read_s(s: &Sample) -> f64 {
    s.extra["read_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0
}

pub(super) fn scaling_phase(b: &Bench, vm: &mut TestVm, r: &mut Results) -> Res<()> {
    // 1. The read ceiling (a full run measured it already, same export).
    if r.get("nbdcopy_null").is_none_or(|s| s.samples.is_empty()) {
        say("scaling: read ceiling (nbdcopy → null)");
        let exp = AnchorExport::up(vm, &b.run.join("anchor"), b.size)?;
        let uri = exp.uri();
        r.block_status = block_status_totals(&uri)?;
        let data = r.block_status.0;
        run_quiet(Command::new("nbdcopy").args([&uri, "null:"]))?;
        for _ in 0..b.opts.runs {
            let (mut s, _) = b.measure(&argv(&[&"nbdcopy", &uri, &"null:"]), &[], vm.pid())?;
            s.read = data;
            r.series("nbdcopy_null", "nbdcopy URI null: (read ceiling)")
                .samples
                .push(s);
        }
        exp.down(vm)?;
    }
    let ceiling = r
        .get("nbdcopy_null")
        .map(|s| s.of(|x| x.read as f64 / GIB as f64 / x.wall))
        .map_or(f64::INFINITY, |s| s.median);

    // 2. Calibration: one --workers 2 backup.
    say("scaling: calibration backup --workers 2");
    let cal = backup_with_workers(b, vm, 2)?;
    let totals = StageTotals::from_report(&cal.extra)
        .ok_or("shear backup --json has no disks[].stages (shear too old?)")?;
    let costs =
        Costs::from_totals(&totals, cal.qemu_cpu).ok_or("the calibration backup read nothing")?;
    let model = Model {
        costs,
        read_ceiling: ceiling,
    };
    r.series(
        "scaling_calibration",
        "shear backup --workers 2 (scaling model calibration)",
    )
    .samples
    .push(cal.clone());

    // 4. Measured: --workers 1 and 2, interleaved.
    for round in 1..=b.opts.runs {
        for (key, label, w) in [
            ("scaling_w1", "shear backup --workers 1", 1),
            ("scaling_w2", "shear backup --workers 2", 2),
        ] {
            say(&format!("scaling round {round}/{}: {label}", b.opts.runs));
            let s = backup_with_workers(b, vm, w)?;
            r.series(key, label).samples.push(s);
        }
    }

    // The report section.
    let gib_read = totals.bytes_read as f64 / GIB as f64;
    let mut md = String::new();
    let _ = writeln!(md, "## Scaling model (issue 17)\n");
    let _ = writeln!(
        md,
        "CPU per stage as shear measures it (`disks[].stages` of `shear backup --json`: each \
         thread's own CPU clock around each stage's work on each chunk), from one \
         `--workers 2` backup of {:.0} MiB read; QEMU's CPU during that backup {:.2} s.\n",
        mib(totals.bytes_read),
        cal.qemu_cpu
    );
    let _ = writeln!(
        md,
        "| stage | runs on | CPU s | MiB handled | CPU s per GiB read | CPU s per GiB handled |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let mut stages_js = serde_json::Map::new();
    for st in STAGES {
        let (cpu, bytes) = (totals.cpu_s(st), totals.bytes(st));
        let per_own = if bytes > 0 {
            cpu / (bytes as f64 / GIB as f64)
        } else {
            0.0
        };
        let _ = writeln!(
            md,
            "| {st} | {} | {cpu:.3} | {:.0} | {:.3} | {per_own:.3} |",
            runs_on(st),
            mib(bytes),
            costs.of(st)
        );
        stages_js.insert(
            st.to_string(),
            json!({"cpu_s": cpu, "bytes": bytes, "cpu_s_per_gib_read": costs.of(st),
                   "cpu_s_per_gib_handled": per_own}),
        );
    }
    let _ = writeln!(
        md,
        "| QEMU (NBD server, block layer, idle guest) | QEMU's threads | {:.3} | – | {:.3} | – |",
        cal.qemu_cpu, costs.qemu_per_gib
    );
    let stage_sum = totals.stages.iter().map(|s| s.0).sum::<f64>();
    let _ = writeln!(
        md,
        "\nThe stages add up to {stage_sum:.2} CPU s of shear's {:.2} s (GNU time; the rest: \
         setup, QMP, fleece sampling, releasing, teardown). Read ceiling (nbdcopy → null, \
         same export): {:.2} GiB/s.\n",
        cal.cpu, ceiling
    );
    let _ = writeln!(
        md,
        "Model: with c_s the CPU s per GiB read of stage s, P = c_hash + c_compress + c_verify + \
         c_encrypt (on the workers), C = all stages + QEMU, n cores and w workers (w = n), the \
         data path reads **X(n, w) = min(w / P, 1 / c_read, min(n, 4) / c_write, R, n / C)** \
         GiB/s, R the read ceiling measured here. It assumes the stages overlap perfectly and \
         the CPU per GiB stays as measured (the ceiling R is this machine's, under TCG).\n"
    );
    let _ = writeln!(
        md,
        "| cores (= workers) | predicted GiB/s | MiB/s | bound | data path s for this data set |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let mut predictions = Vec::new();
    for n in CORES {
        let p = model.predict(n, n);
        let _ = writeln!(
            md,
            "| {n} | {:.3} | {:.0} | {} | {:.2} |",
            p.gib_s,
            p.gib_s * 1024.0,
            p.bound,
            gib_read / p.gib_s
        );
        predictions.push(json!({"cores": n, "workers": n, "gib_s": p.gib_s, "bound": p.bound}));
    }
    let _ = writeln!(
        md,
        "\nChecked on this machine ({} cores): data-path time (`read_ms`) of `--workers 1` and \
         `--workers 2` backups into fresh repositories, {} run(s) each, against the model.\n",
        b.cores, b.opts.runs
    );
    let _ = writeln!(
        md,
        "| workers | predicted s | bound | measured s | predicted / measured throughput | error |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let mut checks = Vec::new();
    for (key, w) in [("scaling_w1", 1usize), ("scaling_w2", 2)] {
        let Some(series) = r.get(key) else { continue };
        let measured = series.of(read_s);
        let bytes = series.samples.last().map_or(0, |s| s.read);
        let p = model.predict(b.cores, w);
        let predicted = model.predict_seconds(b.cores, w, bytes);
        let err = relative_error(predicted, measured.median);
        let _ = writeln!(
            md,
            "| {w} | {predicted:.2} | {} | {} | {:.2} | {:+.0} % |",
            p.bound,
            measured.show(2),
            measured.median / predicted,
            err * 100.0
        );
        checks.push(
            json!({"workers": w, "cores": b.cores, "predicted_s": predicted,
                           "bound": p.bound, "measured_s": measured.json(), "error": err}),
        );
    }
    r.sections.push(md);
    r.extra.insert(
        "scaling",
        json!({"stages": stages_js, "qemu_cpu_s": cal.qemu_cpu,
               "qemu_cpu_s_per_gib_read": costs.qemu_per_gib,
               "bytes_read": totals.bytes_read, "read_ceiling_gib_s": ceiling,
               "predictions": predictions, "checks": checks}),
    );
    Ok(())
}
