//! Property-based fuzzing of the reply and handshake parsers (the same
//! entry points as the cargo-fuzz targets in `nbd-export/fuzz`): arbitrary
//! and mutated server bytes never panic, and a well-formed stream parses.

use nbd_export::fuzzing;
use proptest::prelude::*;

#[test]
fn sample_stream_parses_cleanly() {
    let out = fuzzing::reply_stream(&fuzzing::sample_replies());
    // Five commands succeed, the one with an ERROR_OFFSET chunk fails.
    assert_eq!(
        out,
        fuzzing::ReplyOutcome {
            ok: 5,
            server_errors: 1,
            fatal: false
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_reply_bytes(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = fuzzing::reply_stream(&data);
    }

    #[test]
    fn mutated_reply_stream(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        shape in any::<u8>(),
    ) {
        let mut data = fuzzing::sample_replies();
        data[0] = shape;
        for (i, b) in &flips {
            let i = 1 + i.index(data.len() - 1);
            data[i] = *b;
        }
        let keep = 1 + cut.index(data.len());
        data.truncate(keep);
        let _ = fuzzing::reply_stream(&data);
    }

    #[test]
    fn arbitrary_handshake_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = fuzzing::handshake(&data);
    }
}

#[test]
fn sample_handshake_negotiates() {
    let info = fuzzing::handshake(&fuzzing::sample_handshake()).unwrap();
    assert_eq!(info.size, 1 << 30);
    assert_eq!(info.min_block(), 512);
    assert_eq!(info.context_id("base:allocation"), Some(7));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_handshake(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut data = fuzzing::sample_handshake();
        for (i, b) in &flips {
            let i = i.index(data.len());
            data[i] = *b;
        }
        let keep = cut.index(data.len() + 1);
        data.truncate(keep);
        if let Ok(info) = fuzzing::handshake(&data) {
            prop_assert!(info.size < 1 << 63);
        }
    }
}
