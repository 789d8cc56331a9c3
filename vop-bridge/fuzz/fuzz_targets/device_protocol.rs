//! Fuzz target `device_protocol`: see `vop_bridge::fuzz::device_protocol` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vop_bridge::fuzz::device_protocol(data));
