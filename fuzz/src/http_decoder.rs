//! The request decoder (`triggers::http::Decoder`) under arbitrary bytes.
//!
//! Input layout: 4 parameter bytes, then the byte stream a client sends.
//! - byte 0: the header limit, `32 + 8 * b` (32..=2072);
//! - byte 1: the body limit, `8 * b` (the batch route gets twice that);
//! - bytes 2-3: the seed of one random split of the stream.
//!
//! The stream is fed whole, one byte at a time and in the seeded split, each
//! read going through `InBuf::read_space`/`commit` as the connection loop
//! does, and decoded until `Incomplete` or an error after each read. What
//! must hold: no panic; the three feeds give the same requests (method,
//! target, headers, body, version, keep-alive), the same error and the same
//! final "request in progress" state; after each read the undecoded bytes
//! stay within the header limit (or the chunk-size line limit); every body is
//! within the limit of its route; `100 Continue` is signalled at most once per
//! request, only for an HTTP/1.1 request that asked for it.

use triggers::http::{Decoded, Decoder, HttpError, InBuf, Limits, Method, Request};

/// What the connection loop asks of each read (src/shard/conn.rs).
const READ_CHUNK: usize = 16 * 1024;
/// The decoder's chunk-size line limit (src/http/decoder.rs).
const MAX_CHUNK_LINE: usize = 1024;
const BATCH_PATH: &str = "/api/events/batch";

#[derive(Debug, Clone, Copy)]
struct Params {
    max_header_bytes: usize,
    body_limit: usize,
    seed: u64,
}

impl Params {
    fn body_limit(&self, path: &str) -> usize {
        if path == BATCH_PATH {
            self.body_limit * 2
        } else {
            self.body_limit
        }
    }
}

/// One decoded request, owned, for comparison between feeds.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    method: Method,
    path: String,
    query: Option<String>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    http11: bool,
    keep_alive: bool,
}

impl Seen {
    fn of(r: &Request) -> Seen {
        Seen {
            method: r.method,
            path: r.path().to_string(),
            query: r.query().map(str::to_string),
            headers: r.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            body: r.body.clone(),
            http11: r.http11,
            keep_alive: r.keep_alive,
        }
    }

    fn expects_continue(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case(b"expect")
                && v.trim_ascii().eq_ignore_ascii_case(b"100-continue")
        })
    }
}

/// Everything a feed of the stream produced.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<Seen>,
    error: Option<HttpError>,
    in_progress: bool,
}

/// Runs the property on one fuzz input.
pub fn check(data: &[u8]) {
    let Some((params, stream)) = split_params(data) else {
        return;
    };
    let whole = run(&params, &[stream]);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(whole, run(&params, &bytes), "whole vs byte at a time");
    let seeded = seeded_split(stream, params.seed);
    assert_eq!(whole, run(&params, &seeded), "whole vs split {seeded:?}");
}

fn split_params(data: &[u8]) -> Option<(Params, &[u8])> {
    let (p, stream) = data.split_first_chunk::<4>()?;
    let params = Params {
        max_header_bytes: 32 + 8 * p[0] as usize,
        body_limit: 8 * p[1] as usize,
        seed: u64::from(u16::from_le_bytes([p[2], p[3]])),
    };
    Some((params, stream))
}

/// Cuts `stream` into pieces of 1..=n bytes, n and the cuts chosen by `seed`.
fn seeded_split(stream: &[u8], seed: u64) -> Vec<&[u8]> {
    let max_piece = 1 + (seed % 64) as usize;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut pieces = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = (1 + (x % max_piece as u64) as usize).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fn run(params: &Params, reads: &[&[u8]]) -> Outcome {
    let mut decoder = Decoder::new(Limits {
        max_header_bytes: params.max_header_bytes,
    });
    let limit = |_: Method, path: &str| params.body_limit(path);
    let mut buf = InBuf::with_capacity(4096);
    let mut out = Outcome {
        requests: Vec::new(),
        error: None,
        in_progress: false,
    };
    let mut continued = false;
    for read in reads {
        let space = buf.read_space(READ_CHUNK);
        space[..read.len()].copy_from_slice(read);
        buf.commit(read.len());
        loop {
            match decoder.decode(&mut buf, &limit) {
                Ok(Decoded::Request(r)) => {
                    let seen = Seen::of(&r);
                    check_request(params, &seen, continued);
                    continued = false;
                    out.requests.push(seen);
                }
                Ok(Decoded::Continue) => {
                    assert!(!continued, "a second 100 Continue for one request");
                    continued = true;
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        let bound = params.max_header_bytes.max(MAX_CHUNK_LINE);
        assert!(
            buf.len() <= bound,
            "{} undecoded bytes > {bound}",
            buf.len()
        );
    }
    out.in_progress = decoder.in_progress(&buf);
    out
}

fn check_request(params: &Params, r: &Seen, continued: bool) {
    assert!(r.path.starts_with('/'), "path {:?}", r.path);
    let limit = params.body_limit(&r.path);
    assert!(
        r.body.len() <= limit,
        "body {} > limit {limit}",
        r.body.len()
    );
    if continued {
        assert!(
            r.http11 && r.expects_continue(),
            "100 Continue not asked for"
        );
    }
}
