//! Fuzz target `net_tx`: see `mic_net::fuzz::tx` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mic_net::fuzz::tx(data));
