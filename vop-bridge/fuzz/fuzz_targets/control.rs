//! Fuzz target `control`: see `vop_bridge::fuzz::control` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vop_bridge::fuzz::control(data));
