//! Bytes from the qemu-ga socket through framing, the sync round-trip and
//! reply matching (`guest_agent::fuzzing::reply_stream`), F-08.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_agent::fuzzing::reply_stream(data);
});
