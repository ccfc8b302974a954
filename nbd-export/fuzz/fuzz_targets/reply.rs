//! The transmission-phase reply parser, fed as the server side of a
//! connection with reads and block status requests in flight.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_export::fuzzing::reply_stream(data);
});
