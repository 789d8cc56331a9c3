//! Fuzz target `console`: see `mic_console::fuzz::console` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mic_console::fuzz::console(data));
