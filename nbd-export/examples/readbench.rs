//! Reads a whole export to a null sink with the chunk reader and prints one
//! line of results. Used by `scripts/bench-nbd`.
//!
//! ```text
//! readbench --socket PATH | --tcp HOST:PORT [--export NAME] [--bitmap NAME]
//!           [--engine uring|sync|auto] [--connections N] [--request-size BYTES]
//!           [--chunk-size BYTES] [--budget BYTES] [--repeat N] [--no-recycle]
//! ```
//!
//! Buffers go back to the reader through its `Recycler`, as the backup job
//! does after compressing a chunk; `--no-recycle` drops them instead.
//!
//! Output (one line per run): `engine=.. conns=.. secs=.. size_mib=..
//! read_mib=.. mib_s=..` where `mib_s` is the export size over wall time
//! (the same measure as `nbdcopy URI null:`, which also skips zeroes).

use std::process::ExitCode;
use std::time::Instant;

use nbd_export::{ChunkKind, ChunkReader, EngineChoice, ExportSource, ReaderConfig};

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut tcp = None;
    let mut export = String::new();
    let mut bitmap = None;
    let mut cfg = ReaderConfig::new(4 << 20); // --chunk-size overrides
    let mut repeat = 1;
    let mut recycle = true;
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--socket" => socket = Some(val()?),
            "--tcp" => tcp = Some(val()?),
            "--export" => export = val()?,
            "--bitmap" => bitmap = Some(val()?),
            "--engine" => cfg.engine = EngineChoice::parse(&val()?).map_err(|e| e.to_string())?,
            "--connections" => cfg.connections = val()?.parse().map_err(|e| format!("{e}"))?,
            "--request-size" => {
                cfg.read_request_len =
                    u32::try_from(parse_size(&val()?)?).map_err(|e| e.to_string())?;
            }
            "--chunk-size" => {
                cfg.chunk_size = u32::try_from(parse_size(&val()?)?).map_err(|e| e.to_string())?;
            }
            "--budget" => cfg.byte_budget = parse_size(&val()?)?,
            "--repeat" => repeat = val()?.parse().map_err(|e| format!("{e}"))?,
            "--no-recycle" => recycle = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let mut src = match (socket, tcp) {
        (Some(p), None) => ExportSource::unix(p, export),
        (None, Some(t)) => ExportSource::tcp(t, export),
        _ => return Err("give exactly one of --socket or --tcp".into()),
    };
    if let Some(b) = bitmap {
        src = src.with_dirty_bitmap(b);
    }
    for _ in 0..repeat {
        let t = Instant::now();
        let mut stream = ChunkReader::start(&src, &cfg).map_err(|e| format!("{e:#?}"))?;
        let size = stream.export_info().size;
        let recycler = stream.recycler();
        let mut sink = 0u64;
        for item in &mut stream {
            let chunk = item.map_err(|e| format!("{e:#?}"))?;
            if let ChunkKind::Data(d) = chunk.kind {
                // Touch the data so the read cannot be optimised away.
                sink = sink.wrapping_add(u64::from(d[d.len() / 2]));
                if recycle {
                    recycler.recycle(d);
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let st = stream.stats();
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "engine={} conns={} req={} recycle={recycle} secs={secs:.3} size_mib={:.0} read_mib={:.0} mib_s={:.0} data_chunks={} zero_chunks={} clean_chunks={} requests={} reused={} sink={sink}",
            stream.engine(),
            stream.connections(),
            cfg.read_request_len,
            mib(size),
            mib(st.bytes_read),
            mib(size) / secs,
            st.data_chunks,
            st.zero_chunks,
            st.clean_chunks,
            st.read_requests,
            st.buffers_reused,
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("readbench: {e}");
            ExitCode::FAILURE
        }
    }
}
