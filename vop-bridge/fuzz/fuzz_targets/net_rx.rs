//! Fuzz target `net_rx`: see `mic_net::fuzz::rx` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mic_net::fuzz::rx(data));
