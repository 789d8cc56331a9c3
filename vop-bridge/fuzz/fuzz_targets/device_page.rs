//! Fuzz target `device_page`: see `vop_bridge::fuzz::device_page` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vop_bridge::fuzz::device_page(data));
