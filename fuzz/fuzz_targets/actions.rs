//! `cargo +nightly fuzz run actions`: see `heartgate::fuzzing::actions`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| heartgate::fuzzing::actions(data));
