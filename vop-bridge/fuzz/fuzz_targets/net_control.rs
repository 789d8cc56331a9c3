//! Fuzz target `net_control`: see `vop_bridge::fuzz::net_control` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vop_bridge::fuzz::net_control(data));
