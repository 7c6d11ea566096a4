//! `cargo +nightly fuzz run heartbeat_body`: see `heartgate::fuzzing::heartbeat_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| heartgate::fuzzing::heartbeat_body(data));
