//! A decoded request: the copied header block with index ranges into it, and
//! the de-framed body. Produced by the decoder, consumed by the router.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Other,
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other => "OTHER",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The header block as received (request line and header lines).
    head: Vec<u8>,
    path: Range<u32>,
    query: Option<Range<u32>>,
    headers: Vec<(Range<u32>, Range<u32>)>,
    pub body: Vec<u8>,
    /// HTTP/1.1 (true) or HTTP/1.0 (false).
    pub http11: bool,
    /// Whether the client allows the connection to stay open after this request.
    pub keep_alive: bool,
}

impl Request {
    pub(crate) fn new(
        method: Method,
        head: Vec<u8>,
        target: Range<u32>,
        headers: Vec<(Range<u32>, Range<u32>)>,
        http11: bool,
    ) -> Request {
        let t = &head[target.start as usize..target.end as usize];
        let (path, query) = match t.iter().position(|&b| b == b'?') {
            Some(q) => {
                let q = q as u32;
                (
                    target.start..target.start + q,
                    Some(target.start + q + 1..target.end),
                )
            }
            None => (target.clone(), None),
        };
        let mut req = Request {
            method,
            head,
            path,
            query,
            headers,
            body: Vec::new(),
            http11,
            keep_alive: http11,
        };
        let mut keep_alive = http11;
        if let Some(conn) = req.header("connection") {
            for token in conn.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
        req.keep_alive = keep_alive;
        req
    }

    fn slice(&self, r: &Range<u32>) -> &[u8] {
        &self.head[r.start as usize..r.end as usize]
    }

    /// The path, without the query string. The decoder guarantees it is UTF-8.
    pub fn path(&self) -> &str {
        std::str::from_utf8(self.slice(&self.path)).unwrap_or("")
    }

    /// The raw query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.query
            .as_ref()
            .map(|r| std::str::from_utf8(self.slice(r)).unwrap_or(""))
    }

    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| self.slice(n).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| self.slice(v))
    }

    /// The header as a string, when it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every header, as (name, value) pairs in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (self.slice(n), self.slice(v)))
    }
}
