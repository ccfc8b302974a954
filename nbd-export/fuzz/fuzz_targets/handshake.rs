//! The handshake parser (greeting, option replies, info items), fed as
//! everything the server says during negotiation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_export::fuzzing::handshake(data);
});
