//! `shear::repo::fuzzing::record`: the bytes of a run record a killed run
//! left, through the real parser (`RunRecord::decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shear::repo::fuzzing::record(data);
});
