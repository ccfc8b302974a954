//! `shear::repo::fuzzing::chunk`: stored bytes, as is and as edits of a
//! valid object, through the real decoder (F-44, F-35).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shear::repo::fuzzing::chunk(data);
});
