//! Entry points for the fuzz targets (`guest-agent/fuzz`, run by
//! `scripts/fuzz`): the sans-IO decoder fed arbitrary bytes as if read from
//! the agent's socket. Each asserts the decoder's bounds (a violation is a
//! panic, which the fuzzer reports as a crash); errors are fine.

use crate::config::Config;
use crate::wire::{exceeds_depth, parse_reply, Framer, Session};

/// The whole client side of one connection: the bytes are split into reads
/// (sizes from the first byte), framed, matched against a sync round-trip
/// and then against a command's reply, the way the client consumes them.
/// Small limits (4 KiB lines, depth 8, 16 unsolicited replies) so the
/// fuzzer reaches them.
pub fn reply_stream(data: &[u8]) {
    let (head, body) = data.split_first().unwrap_or((&1, &[]));
    let read_size = usize::from(*head).max(1);
    let config = Config {
        max_reply_bytes: 4096,
        max_json_depth: 8,
        max_unsolicited_replies: 16,
        max_sync_discard_bytes: 8192,
        ..Config::default()
    };
    let cap = config.reply_cap();
    let depth = config.depth_cap();
    let mut session = Session::new(&config);
    let (_, sync) = session.start_sync();
    let mut pending = None;
    for read in body.chunks(read_size) {
        session.framer.push(read);
        while let Some(frame) = session.framer.next_frame() {
            let Ok(line) = frame else {
                // A framing error ends the command; the client resyncs.
                session.framer.skip_until_sentinel();
                continue;
            };
            assert!(line.len() <= cap, "line of {} bytes past {cap}", line.len());
            assert!(!line.contains(&b'\n') && !line.contains(&0xFF));
            assert!(!exceeds_depth(&line, depth), "line deeper than {depth}");
            match pending.as_mut() {
                None => {
                    if let Ok(true) = session.on_sync_line(&sync, &line) {
                        let (_, p) = session
                            .start_command("guest-ping", &serde_json::json!({}))
                            .unwrap_or_else(|e| panic!("encoding a command: {e}"));
                        pending = Some(p);
                    }
                }
                Some(p) => {
                    let _ = session.on_reply_line(p, &line);
                }
            }
            assert!(session.framer.buffered() <= cap + read.len());
        }
        assert!(session.framer.buffered() <= cap);
    }
}

/// One line through the reply parser alone, at depth limit 8.
pub fn reply_line(data: &[u8]) {
    let _ = parse_reply(data, 8);
    let mut framer = Framer::new(256, 8);
    framer.push(data);
    while let Some(frame) = framer.next_frame() {
        if let Ok(line) = frame {
            assert!(line.len() <= 256 && !exceeds_depth(&line, 8));
        }
    }
}

#[cfg(test)]
mod tests {
    // The fuzz bodies on a few inputs, so a broken body fails the unit
    // tests and not only the fuzz run.
    #[test]
    fn fuzz_bodies_take_hostile_and_plain_input() {
        let mut inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\x01\xff{\"return\": 1}\n{\"return\": {}}\n".to_vec(),
            b"\x07\xff\xff\n\n[[[[[[[[[[[[[[[[[[[\n".to_vec(),
        ];
        let mut long = vec![3u8];
        long.extend(std::iter::repeat_n(b'a', 10_000));
        inputs.push(long);
        for d in &inputs {
            super::reply_stream(d);
            super::reply_line(d);
        }
    }
}
