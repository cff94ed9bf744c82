//! The client side of HTTP/1.1: a keep-alive connection on a `may` coroutine
//! TCP stream, and a response parser (`Content-Length` or `chunked` bodies)
//! that reports malformed responses as errors instead of panicking.

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

/// One parsed response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// What went wrong in an exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Connect, write or read failed, the peer closed, or the response was
    /// malformed: counted in `errors`.
    Error,
    /// No answer before the run's hard deadline: counted in `unfinished`.
    Abandoned,
}

/// A complete response and the bytes it used, or "need more bytes".
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Incomplete,
    Complete(Response, usize),
}

/// Parses one response at the start of `buf`.
pub fn parse_response(buf: &[u8]) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Incomplete),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = resp.code.ok_or("response without a status")?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| "non-UTF-8 header")?;
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse().map_err(|_| "bad Content-Length")?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    if no_body {
        return Ok(Parsed::Complete(
            Response {
                status,
                body: Vec::new(),
                close,
            },
            head,
        ));
    }
    if chunked {
        return Ok(match parse_chunked(&buf[head..])? {
            Some((body, used)) => Parsed::Complete(
                Response {
                    status,
                    body,
                    close,
                },
                head + used,
            ),
            None => Parsed::Incomplete,
        });
    }
    // Without framing the body would run to the close: read none, then reconnect.
    let close = close || length.is_none();
    let len = length.unwrap_or(0);
    if buf.len() < head + len {
        return Ok(Parsed::Incomplete);
    }
    let body = buf[head..head + len].to_vec();
    Ok(Parsed::Complete(
        Response {
            status,
            body,
            close,
        },
        head + len,
    ))
}

/// Decodes a chunked body; `None` while incomplete.
fn parse_chunked(mut buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let total = buf.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        buf = &buf[eol + 2..];
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                buf = &buf[eol + 2..];
                if eol == 0 {
                    return Ok(Some((body, total - buf.len())));
                }
            }
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        if &buf[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

/// How often a blocked read wakes up to ask whether to give up.
const READ_POLL: Duration = Duration::from_millis(200);

/// A keep-alive connection with its read buffer.
pub struct Conn {
    stream: may::net::TcpStream,
    buf: Vec<u8>,
    /// The server announced it closes: reconnect before the next request.
    pub closing: bool,
}

impl Conn {
    pub fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = may::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_POLL))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16384),
            closing: false,
        })
    }

    /// Sends one request and reads its response. `give_up` is asked while
    /// waiting; when it says yes the exchange is abandoned.
    pub fn exchange(
        &mut self,
        request: &[u8],
        give_up: impl Fn() -> bool,
    ) -> Result<Response, Failure> {
        self.stream.write_all(request).map_err(|_| Failure::Error)?;
        let mut chunk = [0u8; 16384];
        loop {
            match parse_response(&self.buf) {
                Ok(Parsed::Complete(resp, used)) => {
                    self.buf.drain(..used);
                    self.closing = resp.close;
                    return Ok(resp);
                }
                Ok(Parsed::Incomplete) => {}
                Err(_) => return Err(Failure::Error),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Failure::Error),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if give_up() {
                        return Err(Failure::Abandoned);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(Failure::Error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_response() {
        let raw = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200";
        let Ok(Parsed::Complete(r, used)) = parse_response(raw) else {
            panic!("expected a complete response");
        };
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (202, &b"{}"[..], false)
        );
        assert_eq!(used, raw.len() - "HTTP/1.1 200".len());
        assert_eq!(
            parse_response(&raw[..raw.len() - 14]),
            Ok(Parsed::Incomplete)
        );
    }

    #[test]
    fn chunked_response() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n";
        let Ok(Parsed::Complete(r, used)) = parse_response(raw) else {
            panic!("expected a complete response");
        };
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"abcde"[..], true)
        );
        assert_eq!(used, raw.len());
        for cut in 1..raw.len() {
            assert_eq!(
                parse_response(&raw[..cut]),
                Ok(Parsed::Incomplete),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn malformed_responses_are_errors() {
        assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_response(b"garbage garbage\r\n\r\n").is_err());
        let bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad_chunk).is_err());
    }
}
