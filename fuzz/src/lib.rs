//! The properties the fuzz targets check, as plain functions: each target in
//! `fuzz_targets/` calls one of them on libFuzzer's input, and this crate's
//! tests replay the checked-in seeds through the same functions.

pub mod event_body;
pub mod http_decoder;
pub mod key_parser;
