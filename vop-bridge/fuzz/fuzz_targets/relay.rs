//! Fuzz target `relay`: see `mic_backend_common::fuzz::relay` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mic_backend_common::fuzz::relay(data));
