//! One reply line through the parser and a small framer
//! (`guest_agent::fuzzing::reply_line`), F-08.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    guest_agent::fuzzing::reply_line(data);
});
