//! Fuzz target: the HTTP request decoder (see `src/http_decoder.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| triggers_fuzz::http_decoder::check(data));
