//! The request decoder: a state machine over received bytes. It finds the
//! header block (bounded by `Limits::max_header_bytes`), decides the body
//! framing (`Content-Length` or `chunked`, never both), enforces the body limit
//! the caller names for the route, de-chunks, and tells the engine when to send
//! `100 Continue`. Body bytes move out of the input buffer as they arrive, so
//! the buffer stays bounded by the header limit plus one read.

use super::request::{Method, Request};
use std::ops::Range;

/// Maximum number of header lines; more is answered like an oversized header block.
const MAX_HEADERS: usize = 100;
/// A chunk-size line longer than this is malformed.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
}

/// Framing errors, decided while reading; each ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Malformed(&'static str),
    HeaderTooLarge,
    BodyTooLarge { limit: usize },
}

#[derive(Debug)]
pub enum Decoded {
    /// A complete request; more may follow in the buffer (pipelining).
    Request(Request),
    /// The client waits for `100 Continue` before sending the body.
    Continue,
    /// Need more bytes.
    Incomplete,
}

/// Received bytes not yet decoded. Reads go into [`InBuf::read_space`].
pub struct InBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl InBuf {
    pub fn with_capacity(n: usize) -> InBuf {
        InBuf {
            data: vec![0; n.max(64)],
            start: 0,
            end: 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space at the end for the next read, at least `min` bytes: moves
    /// undecoded bytes to the front, and grows only when that is not enough.
    pub fn read_space(&mut self, min: usize) -> &mut [u8] {
        if self.data.len() - self.end < min {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < min {
                let want = (self.end + min).max(self.data.len() * 2);
                self.data.resize(want, 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Marks `n` bytes of the read space as received.
    pub fn commit(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.data.len());
        self.end = (self.end + n).min(self.data.len());
    }

    /// Appends bytes (tests and engines that read into their own buffers).
    pub fn extend(&mut self, bytes: &[u8]) {
        let space = self.read_space(bytes.len());
        space[..bytes.len()].copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer { seen: usize },
}

enum Framing {
    Length(usize),
    Chunked(Chunk),
}

enum State {
    Head {
        scanned: usize,
    },
    Body {
        req: Request,
        framing: Framing,
        limit: usize,
        continue_pending: bool,
    },
}

pub struct Decoder {
    limits: Limits,
    state: State,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            state: State::Head { scanned: 0 },
        }
    }

    /// True while a request is partly received (its timer is running).
    pub fn in_progress(&self, buf: &InBuf) -> bool {
        !matches!(self.state, State::Head { .. }) || !buf.is_empty()
    }

    /// Decodes as far as the buffered bytes allow. `body_limit` names the
    /// largest body accepted for a method and path.
    pub fn decode(
        &mut self,
        buf: &mut InBuf,
        body_limit: &dyn Fn(Method, &str) -> usize,
    ) -> Result<Decoded, HttpError> {
        if let State::Head { .. } = self.state {
            if let Some(done) = self.decode_head(buf, body_limit)? {
                return Ok(done);
            }
        }
        self.decode_body(buf)
    }

    /// Returns `Some` when there is nothing more to do now (incomplete, or a
    /// body-less request), `None` when the state moved to `Body`.
    fn decode_head(
        &mut self,
        buf: &mut InBuf,
        body_limit: &dyn Fn(Method, &str) -> usize,
    ) -> Result<Option<Decoded>, HttpError> {
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        let leading = buf
            .bytes()
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if leading > 0 {
            buf.consume(leading);
            self.state = State::Head { scanned: 0 };
        }
        let bytes = buf.bytes();
        let State::Head { scanned } = &mut self.state else {
            unreachable!("decode_head runs in the Head state")
        };
        // Parse only once the end of the header block has arrived, so a
        // slow-dripping client costs a scan of each byte once, not a re-parse.
        let from = scanned.saturating_sub(3);
        let head_end = find_head_end(&bytes[from..]).map(|e| from + e);
        *scanned = bytes.len();
        // Too large is decided on the block's length before it is parsed, so
        // the answer does not depend on how the bytes were split into reads.
        match head_end {
            Some(end) if end > self.limits.max_header_bytes => {
                return Err(HttpError::HeaderTooLarge)
            }
            Some(_) => {}
            None if bytes.len() > self.limits.max_header_bytes => {
                return Err(HttpError::HeaderTooLarge)
            }
            None => return Ok(Some(Decoded::Incomplete)),
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let head_len = match parsed.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(HttpError::Malformed("incomplete header block"))
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeaderTooLarge),
            Err(_) => return Err(HttpError::Malformed("malformed request head")),
        };
        if head_len > self.limits.max_header_bytes {
            return Err(HttpError::HeaderTooLarge);
        }
        let method = Method::parse(parsed.method.unwrap_or(""));
        let target = parsed.path.unwrap_or("");
        if !target.starts_with('/') {
            return Err(HttpError::Malformed(
                "request target must be an absolute path",
            ));
        }
        let http11 = parsed.version == Some(1);
        let base = bytes.as_ptr() as usize;
        let range = |s: &[u8]| -> Range<u32> {
            let start = (s.as_ptr() as usize - base) as u32;
            start..start + s.len() as u32
        };
        let target_range = range(target.as_bytes());
        let mut content_length: Option<u64> = None;
        let mut chunked = false;
        let mut has_te = false;
        let mut expect_continue = false;
        let mut header_ranges = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            header_ranges.push((range(h.name.as_bytes()), range(h.value)));
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = parse_content_length(h.value)
                    .ok_or(HttpError::Malformed("invalid Content-Length"))?;
                if content_length.is_some_and(|c| c != v) {
                    return Err(HttpError::Malformed("conflicting Content-Length headers"));
                }
                content_length = Some(v);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                has_te = true;
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or(b"");
                chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("expect") {
                expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
        }
        if has_te && content_length.is_some() {
            return Err(HttpError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        if has_te && (!chunked || !http11) {
            return Err(HttpError::Malformed("unsupported Transfer-Encoding"));
        }
        let limit = body_limit(method, target.split('?').next().unwrap_or(""));
        let framing = if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            let len = content_length.unwrap_or(0);
            if len > limit as u64 {
                return Err(HttpError::BodyTooLarge { limit });
            }
            Framing::Length(len as usize)
        };
        let head = bytes[..head_len].to_vec();
        let has_body_bytes = bytes.len() > head_len;
        buf.consume(head_len);
        let req = Request::new(method, head, target_range, header_ranges, http11);
        if let Framing::Length(0) = framing {
            self.state = State::Head { scanned: 0 };
            return Ok(Some(Decoded::Request(req)));
        }
        self.state = State::Body {
            req,
            framing,
            limit,
            continue_pending: expect_continue && http11 && !has_body_bytes,
        };
        Ok(None)
    }

    fn decode_body(&mut self, buf: &mut InBuf) -> Result<Decoded, HttpError> {
        let State::Body {
            req,
            framing,
            limit,
            continue_pending,
        } = &mut self.state
        else {
            return Ok(Decoded::Incomplete);
        };
        if *continue_pending {
            *continue_pending = false;
            if buf.is_empty() {
                return Ok(Decoded::Continue);
            }
        }
        let done = match framing {
            Framing::Length(remaining) => {
                let take = (*remaining).min(buf.len());
                req.body.extend_from_slice(&buf.bytes()[..take]);
                buf.consume(take);
                *remaining -= take;
                *remaining == 0
            }
            Framing::Chunked(chunk) => dechunk(
                chunk,
                buf,
                &mut req.body,
                *limit,
                self.limits.max_header_bytes,
            )?,
        };
        if !done {
            return Ok(Decoded::Incomplete);
        }
        let State::Body { req, .. } =
            std::mem::replace(&mut self.state, State::Head { scanned: 0 })
        else {
            unreachable!("state was Body")
        };
        Ok(Decoded::Request(req))
    }
}

/// Advances the chunked-body state machine; true when the body is complete.
fn dechunk(
    chunk: &mut Chunk,
    buf: &mut InBuf,
    body: &mut Vec<u8>,
    limit: usize,
    max_trailer: usize,
) -> Result<bool, HttpError> {
    loop {
        match chunk {
            Chunk::Size => match httparse::parse_chunk_size(chunk_line(buf)) {
                Ok(httparse::Status::Complete((used, size))) => {
                    buf.consume(used);
                    if size == 0 {
                        *chunk = Chunk::Trailer { seen: 0 };
                    } else {
                        let size =
                            usize::try_from(size).map_err(|_| HttpError::BodyTooLarge { limit })?;
                        if body.len().saturating_add(size) > limit {
                            return Err(HttpError::BodyTooLarge { limit });
                        }
                        *chunk = Chunk::Data(size);
                    }
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(HttpError::Malformed("chunk size line too long"));
                    }
                    return Ok(false);
                }
                Err(_) => return Err(HttpError::Malformed("invalid chunk size")),
            },
            Chunk::Data(remaining) => {
                let take = (*remaining).min(buf.len());
                body.extend_from_slice(&buf.bytes()[..take]);
                buf.consume(take);
                *remaining -= take;
                if *remaining > 0 {
                    return Ok(false);
                }
                *chunk = Chunk::DataEnd;
            }
            Chunk::DataEnd => {
                let bytes = buf.bytes();
                if bytes.len() < 2 {
                    if bytes.first().is_some_and(|&b| b != b'\r' && b != b'\n') {
                        return Err(HttpError::Malformed("chunk not followed by CRLF"));
                    }
                    return Ok(false);
                }
                match bytes {
                    [b'\r', b'\n', ..] => buf.consume(2),
                    [b'\n', ..] => buf.consume(1),
                    _ => return Err(HttpError::Malformed("chunk not followed by CRLF")),
                }
                *chunk = Chunk::Size;
            }
            Chunk::Trailer { seen } => {
                let bytes = buf.bytes();
                let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
                    if *seen + bytes.len() > max_trailer {
                        return Err(HttpError::HeaderTooLarge);
                    }
                    return Ok(false);
                };
                let line_empty = nl == 0 || (nl == 1 && bytes[0] == b'\r');
                buf.consume(nl + 1);
                *seen += nl + 1;
                if *seen > max_trailer {
                    return Err(HttpError::HeaderTooLarge);
                }
                if line_empty {
                    return Ok(true);
                }
            }
        }
    }
}

/// Where the next chunk-size line is looked for: its limit and one byte
/// more, so a longer line is refused however its bytes arrived.
fn chunk_line(buf: &InBuf) -> &[u8] {
    &buf.bytes()[..buf.len().min(MAX_CHUNK_LINE + 1)]
}

/// The length of the header block through its empty line, once it has arrived.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = bytes[i..].iter().position(|&b| b == b'\n') {
        let at = i + p;
        let rest = &bytes[at + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        i = at + 1;
    }
    None
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64;

    fn limit(_: Method, path: &str) -> usize {
        if path == "/big" {
            1024
        } else {
            LIMIT
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(Limits {
            max_header_bytes: 256,
        })
    }

    fn decode_all(input: &[u8]) -> Vec<Result<Decoded, HttpError>> {
        let mut d = decoder();
        let mut buf = InBuf::with_capacity(16);
        buf.extend(input);
        let mut out = Vec::new();
        loop {
            let r = d.decode(&mut buf, &limit);
            let stop = matches!(r, Ok(Decoded::Incomplete) | Err(_));
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    fn request(r: &Result<Decoded, HttpError>) -> &Request {
        match r {
            Ok(Decoded::Request(req)) => req,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn simple_get_with_query_and_headers() {
        let out = decode_all(b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nX-Request-ID: r1\r\n\r\n");
        let req = request(&out[0]);
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query(), Some("x=1&y=2"));
        assert_eq!(req.header("x-request-id"), Some(&b"r1"[..]));
        assert_eq!(req.header("HOST"), Some(&b"h"[..]));
        assert!(req.keep_alive);
        assert!(matches!(out[1], Ok(Decoded::Incomplete)));
    }

    #[test]
    fn pipelined_requests_come_out_in_order() {
        let out = decode_all(
            b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\n\r\n",
        );
        assert_eq!(request(&out[0]).path(), "/1");
        assert_eq!(request(&out[1]).path(), "/2");
        assert_eq!(request(&out[1]).body, b"abc");
        assert_eq!(request(&out[2]).path(), "/3");
        assert!(matches!(out[3], Ok(Decoded::Incomplete)));
    }

    #[test]
    fn byte_at_a_time_gives_the_same_request() {
        let input =
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n";
        let mut d = decoder();
        let mut buf = InBuf::with_capacity(4);
        let mut got = None;
        for &b in input.iter() {
            buf.extend(&[b]);
            match d.decode(&mut buf, &limit) {
                Ok(Decoded::Request(r)) => got = Some(r),
                Ok(_) => {}
                Err(e) => panic!("{e:?}"),
            }
        }
        let req = got.expect("request decoded");
        assert_eq!(req.body, b"abcde");
        assert!(buf.is_empty());
    }

    #[test]
    fn chunked_body_over_the_limit_is_413() {
        let out = decode_all(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n");
        assert_eq!(
            out[0].as_ref().err(),
            Some(&HttpError::BodyTooLarge { limit: LIMIT })
        );
    }

    #[test]
    fn content_length_over_the_route_limit_is_413_before_the_body() {
        let out = decode_all(b"POST /x HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
        assert_eq!(
            out[0].as_ref().err(),
            Some(&HttpError::BodyTooLarge { limit: LIMIT })
        );
        let out = decode_all(b"POST /big HTTP/1.1\r\nContent-Length: 65\r\n\r\n");
        assert!(matches!(out[0], Ok(Decoded::Incomplete)));
    }

    #[test]
    fn expect_continue_is_signalled_once_before_the_body() {
        let mut d = decoder();
        let mut buf = InBuf::with_capacity(64);
        buf.extend(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert!(matches!(d.decode(&mut buf, &limit), Ok(Decoded::Continue)));
        assert!(matches!(
            d.decode(&mut buf, &limit),
            Ok(Decoded::Incomplete)
        ));
        buf.extend(b"ok");
        let Ok(Decoded::Request(r)) = d.decode(&mut buf, &limit) else {
            panic!("expected request")
        };
        assert_eq!(r.body, b"ok");
        // over the limit: 413 and no Continue
        let out =
            decode_all(b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 999\r\n\r\n");
        assert!(matches!(out[0], Err(HttpError::BodyTooLarge { .. })));
    }

    #[test]
    fn oversized_header_block_is_431_even_without_its_end() {
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 300));
        let out = decode_all(&input);
        assert_eq!(out[0].as_ref().err(), Some(&HttpError::HeaderTooLarge));
        input.extend(b"\r\n\r\n");
        let out = decode_all(&input);
        assert_eq!(out[0].as_ref().err(), Some(&HttpError::HeaderTooLarge));
    }

    /// The last result of decoding `input` in reads of `step` bytes.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
        max_header_bytes: usize,
    ) -> Result<(), HttpError> {
        let mut d = Decoder::new(Limits { max_header_bytes });
        let mut buf = InBuf::with_capacity(16);
        for piece in input.chunks(step) {
            buf.extend(piece);
            loop {
                match d.decode(&mut buf, &limit)? {
                    Decoded::Incomplete => break,
                    Decoded::Request(_) | Decoded::Continue => {}
                }
            }
        }
        Ok(())
    }

    #[test]
    fn too_large_head_is_431_however_it_is_split() {
        // Found by fuzz/http_decoder: a malformed header block longer than the
        // limit was 400 when it came in one read and 431 when it came in pieces.
        let minimized = b"\0\0pe\": \"uoe\": \"uo\"}}\n\r\x01\0e\"uo\"}}\n\r\n";
        let mut found = b"POST /api/events HTTP/2.1\r\nHost: localhost\r\nX: ".to_vec();
        found.extend(std::iter::repeat_n(b'a', 300));
        found.extend(b"\r\n\r\n");
        for (input, max) in [(&minimized[..], 32), (&found[..], 256)] {
            for step in [1, 7, input.len()] {
                assert_eq!(
                    decode_in_steps(input, step, max),
                    Err(HttpError::HeaderTooLarge),
                    "{step}-byte reads of {:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // At the limit exactly, the block is parsed (and here it is malformed).
        let at_limit = &found[..];
        assert!(matches!(
            decode_in_steps(at_limit, at_limit.len(), at_limit.len()),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn long_chunk_size_line_is_refused_however_it_is_split() {
        // Found by fuzz/http_decoder: a chunk-size line over the limit (a long
        // extension) was accepted in one read and refused in pieces.
        let with_line = |ext: usize| {
            let mut input = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=".to_vec();
            input.extend(std::iter::repeat_n(b'\x84', ext));
            input.extend(b"\r\nabc\r\n0\r\n\r\n");
            input
        };
        // "3;x=" + ext + CRLF: 1025 bytes is the longest line taken.
        let (longest, too_long) = (with_line(1019), with_line(1020));
        for step in [1, 100, too_long.len()] {
            assert_eq!(decode_in_steps(&longest, step, 256), Ok(()), "{step}");
            assert_eq!(
                decode_in_steps(&too_long, step, 256),
                Err(HttpError::Malformed("chunk size line too long")),
                "{step}-byte reads"
            );
        }
    }

    #[test]
    fn framing_errors_are_malformed() {
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ] {
            let out = decode_all(bad);
            assert!(
                matches!(out.last(), Some(Err(HttpError::Malformed(_)))),
                "{:?} -> {:?}",
                String::from_utf8_lossy(bad),
                out
            );
        }
    }

    #[test]
    fn connection_header_decides_keep_alive() {
        let out = decode_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!request(&out[0]).keep_alive);
        let out = decode_all(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!request(&out[0]).keep_alive);
        let out = decode_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(request(&out[0]).keep_alive);
    }

    #[test]
    fn in_progress_tracks_partial_requests() {
        let mut d = decoder();
        let mut buf = InBuf::with_capacity(64);
        assert!(!d.in_progress(&buf));
        buf.extend(b"GET / HT");
        assert!(matches!(
            d.decode(&mut buf, &limit),
            Ok(Decoded::Incomplete)
        ));
        assert!(d.in_progress(&buf));
        buf.extend(b"TP/1.1\r\n\r\n");
        assert!(matches!(
            d.decode(&mut buf, &limit),
            Ok(Decoded::Request(_))
        ));
        assert!(!d.in_progress(&buf));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: random splices of valid and invalid pieces.
        let pieces: [&[u8]; 12] = [
            b"GET / HTTP/1.1\r\n",
            b"POST /x HTTP/1.1\r\n",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"\r\n",
            b"5\r\nhello\r\n",
            b"0\r\n\r\n",
            b"\x00\xff\x80",
            b"Expect: 100-continue\r\n",
            b"ffffffffffffffffffff\r\n",
            b":::\r\n",
            b"\n\n\n",
        ];
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            let mut d = decoder();
            let mut buf = InBuf::with_capacity(8);
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.extend(pieces[(seed % pieces.len() as u64) as usize]);
                while let Ok(Decoded::Request(_) | Decoded::Continue) = d.decode(&mut buf, &limit) {
                }
            }
        }
    }
}
