//! Bytes from the QMP socket → bounded line reader → decoder. Must never
//! panic, never return a line over the limit, and never recurse past the
//! depth limit (a stack overflow would abort the fuzzer).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qmp::codec::{decode_line, read_line_bounded, Limits};
use tokio::io::BufReader;

static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    // Small limits so the fuzzer reaches them; the first byte varies the
    // read-buffer size so lines split across reads at every offset.
    let limits = Limits {
        max_line_bytes: 4096,
        max_depth: 16,
    };
    let cap = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    });
    rt.block_on(async {
        let mut reader = BufReader::with_capacity(cap, data);
        let mut line = Vec::new();
        while let Ok(true) = read_line_bounded(&mut reader, &mut line, limits.max_line_bytes).await
        {
            assert!(line.len() <= limits.max_line_bytes);
            let _ = decode_line(&line, &limits);
        }
    });
});
