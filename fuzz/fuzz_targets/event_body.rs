//! Fuzz target: event and batch body validation (see `src/event_body.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| triggers_fuzz::event_body::check(data));
