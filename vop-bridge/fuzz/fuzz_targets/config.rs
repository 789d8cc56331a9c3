//! Fuzz target `config`: see `vop_bridge::fuzz::config` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vop_bridge::fuzz::config(data));
