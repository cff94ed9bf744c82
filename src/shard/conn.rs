//! One client connection: read bytes, run the codec, hand each request to the
//! router, write responses in request order. Enforces the request timeout
//! (408 and close), the idle keep-alive timeout, and closes after framing
//! errors. Nothing a client sends can panic this loop: the codec returns
//! errors, and handlers never unwrap input-derived data.

use super::handoff::{Handoff, Links};
use crate::api::{self, Reply, ShardCtx};
use crate::http::{Decoded, Decoder, InBuf, Limits, Request, Response, CONTINUE_100};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes asked of each read.
const READ_CHUNK: usize = 16 * 1024;

/// Keeps the shard's connection count and gauge true however the task ends.
struct Open(Rc<ShardCtx>);

impl Open {
    fn new(ctx: Rc<ShardCtx>) -> Open {
        ctx.connections.set(ctx.connections.get() + 1);
        ctx.metrics.connections_open.add(1);
        ctx.metrics.connections_accepted.inc();
        Open(ctx)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
        self.0.metrics.connections_open.add(-1);
    }
}

/// Marks a request in flight until dropped.
struct InFlight<'a>(&'a ShardCtx);

impl<'a> InFlight<'a> {
    fn new(ctx: &'a ShardCtx) -> InFlight<'a> {
        ctx.in_flight.set(ctx.in_flight.get() + 1);
        InFlight(ctx)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
    }
}

async fn write(stream: &mut TcpStream, ctx: &ShardCtx, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = stream.write_all(out).await.is_ok();
    ctx.metrics.bytes_out.add(out.len() as u64);
    out.clear();
    ok
}

/// Answers 503 and closes: the shard is at its connection limit.
pub async fn refuse(mut stream: TcpStream, ctx: Rc<ShardCtx>) {
    let mut out = Vec::new();
    api::too_many_connections(&ctx).encode(&mut out, false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = write(&mut stream, &ctx, &mut out).await;
}

/// A connection arriving from another shard, with its first request.
pub struct Handed {
    pub request: Request,
    pub leftover: Vec<u8>,
    pub peer: Option<IpAddr>,
}

/// Duplicates the socket and sends it, with `request` and the unread bytes, to `shard`.
fn hand_over(
    stream: &TcpStream,
    links: &Links,
    shard: usize,
    request: Request,
    inbuf: &InBuf,
    peer: Option<IpAddr>,
) -> bool {
    // SAFETY: dup of a descriptor we own; the copy is owned by the message.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        return false;
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let h = Handoff {
        fd,
        request,
        leftover: inbuf.bytes().to_vec(),
        peer,
    };
    links.send(shard, h).is_ok()
}

pub async fn serve(
    mut stream: TcpStream,
    ctx: Rc<ShardCtx>,
    links: Rc<Links>,
    handed: Option<Handed>,
) {
    let _open = Open::new(ctx.clone());
    let http = &ctx.shared.config.http;
    let request_timeout = Duration::from_millis(http.request_timeout_ms);
    let idle_timeout = Duration::from_millis(http.idle_timeout_ms);
    // Work on other threads (queries, commits) gets the request timeout, and
    // always outlasts the persistence core's commit deadline by a second: a
    // request is never answered before its commit is decided.
    let commit_timeout = Duration::from_millis(ctx.shared.config.ingest.commit_timeout_ms);
    let pending_timeout = request_timeout.max(commit_timeout + Duration::from_secs(1));
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(request_timeout));
    let config = &ctx.shared.config;
    let body_limit = |m, p: &str| api::body_limit(config, m, p);
    let mut decoder = Decoder::new(Limits {
        max_header_bytes: http.max_header_bytes,
    });
    let mut inbuf = InBuf::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let (mut first, peer) = match handed {
        Some(h) => {
            inbuf.extend(&h.leftover);
            (Some(h.request), h.peer)
        }
        None => (None, stream.peer_addr().ok().map(|a| a.ip())),
    };
    let mut request_started: Option<Instant> = None;
    let busy_poll_us = http.busy_poll_us;
    let busy_poll_max_connections = http.busy_poll_max_connections;
    'conn: loop {
        loop {
            let next = match first.take() {
                Some(req) => Ok(Decoded::Request(req)),
                None => decoder.decode(&mut inbuf, &body_limit),
            };
            match next {
                Ok(Decoded::Request(req)) => {
                    request_started = None;
                    let keep_alive = req.keep_alive;
                    let response = {
                        let _in_flight = InFlight::new(&ctx);
                        match api::handle(&ctx, req, peer) {
                            Reply::Ready(r) => r,
                            Reply::Handoff { shard, request } => {
                                // Answers already due leave first, in order.
                                if !write(&mut stream, &ctx, &mut out).await {
                                    break 'conn;
                                }
                                if hand_over(&stream, &links, shard, request, &inbuf, peer) {
                                    return;
                                }
                                api::handoff_failed(&ctx)
                            }
                            Reply::Pending(mut pending) => {
                                // Earlier pipelined answers go out now, not after the wait.
                                if !write(&mut stream, &ctx, &mut out).await {
                                    break 'conn;
                                }
                                let future = &mut pending.future;
                                let done = glommio::timer::timeout(pending_timeout, async move {
                                    Ok(future.await)
                                })
                                .await;
                                match done {
                                    Ok(r) => r,
                                    Err(_) => pending.timed_out(),
                                }
                            }
                        }
                    };
                    let keep = keep_alive && !response.close;
                    response.encode(&mut out, keep);
                    if !keep {
                        let _ = write(&mut stream, &ctx, &mut out).await;
                        break 'conn;
                    }
                }
                Ok(Decoded::Continue) => {
                    out.extend_from_slice(CONTINUE_100);
                    if !write(&mut stream, &ctx, &mut out).await {
                        break 'conn;
                    }
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    api::framing_error(&ctx, &e).encode(&mut out, false);
                    let _ = write(&mut stream, &ctx, &mut out).await;
                    break 'conn;
                }
            }
        }
        if !write(&mut stream, &ctx, &mut out).await {
            break;
        }
        let timeout = if decoder.in_progress(&inbuf) {
            let started = *request_started.get_or_insert_with(Instant::now);
            match request_timeout.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    send_timeout(&mut stream, &ctx, &mut out).await;
                    break;
                }
            }
        } else {
            idle_timeout
        };
        if busy_poll_us > 0 && ctx.connections.get() <= busy_poll_max_connections {
            match busy_poll(&stream, &mut inbuf, Duration::from_micros(busy_poll_us)) {
                Some(0) => break,
                Some(n) => {
                    ctx.metrics.bytes_in.add(n as u64);
                    // This path never parks: let other tasks run when the slice is used up.
                    glommio::yield_if_needed().await;
                    continue;
                }
                None => {}
            }
        }
        let _ = stream.set_read_timeout(Some(timeout));
        match stream.read(inbuf.read_space(READ_CHUNK)).await {
            Ok(0) => break,
            Ok(n) => {
                inbuf.commit(n);
                ctx.metrics.bytes_in.add(n as u64);
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                if decoder.in_progress(&inbuf) {
                    send_timeout(&mut stream, &ctx, &mut out).await;
                }
                break;
            }
            Err(_) => break,
        }
    }
}

/// Lightly loaded shards trade a little CPU for latency: before parking the
/// connection on io_uring, poll the socket with non-blocking `recv` for up to
/// `budget`. `Some(n)`: bytes received (0 = peer closed); `None`: nothing came.
fn busy_poll(stream: &TcpStream, inbuf: &mut InBuf, budget: Duration) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let start = Instant::now();
    loop {
        let space = inbuf.read_space(READ_CHUNK);
        // SAFETY: recv writes at most `space.len()` bytes into memory we own.
        let n = unsafe {
            libc::recv(
                fd,
                space.as_mut_ptr().cast(),
                space.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            inbuf.commit(n as usize);
            return Some(n as usize);
        }
        if n == 0 {
            return Some(0);
        }
        let err = std::io::Error::last_os_error().kind();
        if err != ErrorKind::WouldBlock && err != ErrorKind::Interrupted {
            return None;
        }
        if start.elapsed() >= budget {
            return None;
        }
        std::hint::spin_loop();
    }
}

async fn send_timeout(stream: &mut TcpStream, ctx: &ShardCtx, out: &mut Vec<u8>) {
    let r: Response = api::request_timeout(ctx);
    r.encode(out, false);
    let _ = write(stream, ctx, out).await;
}
