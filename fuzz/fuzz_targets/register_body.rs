//! `cargo +nightly fuzz run register_body`: see `heartgate::fuzzing::register_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| heartgate::fuzzing::register_body(data));
