//! Replays the checked-in inputs (fuzz/seeds and fuzz/regressions) through
//! the targets' properties without libFuzzer: `cargo test` in fuzz/.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let data = std::fs::read(&path).expect("readable input");
            eprintln!("{}", path.display());
            check(&data);
            seen += 1;
        }
    }
    assert!(seen > 0, "no inputs for {target}");
}

#[test]
fn http_decoder_inputs() {
    replay("http_decoder", triggers_fuzz::http_decoder::check);
}

#[test]
fn key_parser_inputs() {
    replay("key_parser", triggers_fuzz::key_parser::check);
}

#[test]
fn event_body_inputs() {
    replay("event_body", triggers_fuzz::event_body::check);
}
