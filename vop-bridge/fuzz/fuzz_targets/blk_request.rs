//! Fuzz target `blk_request`: see `mic_blk::fuzz::request` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mic_blk::fuzz::request(data));
