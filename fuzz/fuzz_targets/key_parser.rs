//! Fuzz target: the API key parser (see `src/key_parser.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| triggers_fuzz::key_parser::check(data));
