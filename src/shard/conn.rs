//! One client connection: read bytes, run the codec, hand each request to the
//! router, write responses in request order. Enforces the request timeout
//! (408 and close), the idle keep-alive timeout, and closes after framing
//! errors. Nothing a client sends can panic this loop: the codec returns
//! errors, and handlers never unwrap input-derived data.

use super::handoff::{Handoff, Links};
use crate::api::{self, Reply, ShardCtx};
use crate::http::{Decoded, Decoder, InBuf, Limits, Request, Response, CONTINUE_100};
use futures::channel::oneshot;
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
    retire(stream, true).await;
}

/// A connection arriving from another shard, with its first request.
pub struct Handed {
    pub request: Request,
    pub leftover: Vec<u8>,
    pub peer: Option<IpAddr>,
    /// Dropped when this shard is done with the connection: the shard that
    /// accepted it keeps its own descriptor open until then.
    pub done: oneshot::Sender<()>,
}

/// Duplicates the socket and sends it, with `request` and the unread bytes,
/// to `shard`. On success, the receiver resolves when that shard is done with
/// the connection.
fn hand_over(
    stream: &TcpStream,
    links: &Links,
    shard: usize,
    request: Request,
    inbuf: &InBuf,
    peer: Option<IpAddr>,
) -> Option<oneshot::Receiver<()>> {
    // SAFETY: dup of a descriptor we own; the copy is owned by the message.
    let dup = unsafe { libc::dup(stream.as_raw_fd()) };
    if dup < 0 {
        return None;
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    let (done, released) = oneshot::channel();
    let h = Handoff {
        fd,
        request,
        leftover: inbuf.bytes().to_vec(),
        peer,
        done,
    };
    links.send(shard, h).ok().map(|()| released)
}

/// How a connection's loop ended.
enum End {
    /// Closed here (by the peer, an error, a timeout or `Connection: close`).
    Closed,
    /// Sent to its owner shard, which now serves it; resolves when it is done.
    HandedOff(oneshot::Receiver<()>),
}

/// Serves one connection until it closes or moves to another shard.
///
/// Two rules keep glommio's reactor healthy; both were found under connection
/// churn on two shards, where breaking either made a shard stop accepting
/// (`tests/shards.rs` reproduces it):
/// - never drop a stream while glommio may still have an io_uring operation in
///   flight on it (`armed`: the readiness poll every new glommio stream starts
///   with, or a read or write that failed or timed out) — see [`read_some`]
///   and [`retire`];
/// - after a handoff, the shard that accepted the connection keeps its own
///   descriptor until the owner shard is done with the connection, so the
///   accepting shard is the one that closes the socket last.
pub async fn serve(
    mut stream: TcpStream,
    ctx: Rc<ShardCtx>,
    links: Rc<Links>,
    handed: Option<Handed>,
) {
    let mut armed = true;
    let (handed, done) = match handed {
        Some(h) => {
            let Handed {
                request,
                leftover,
                peer,
                done,
            } = h;
            (Some((request, leftover, peer)), Some(done))
        }
        None => (None, None),
    };
    struct Serving(Rc<Links>, std::os::fd::RawFd);
    impl Drop for Serving {
        fn drop(&mut self) {
            self.0.ended(self.1);
        }
    }
    links.serving(stream.as_raw_fd());
    let _serving = Serving(links.clone(), stream.as_raw_fd());
    let end = {
        let _open = Open::new(ctx.clone());
        run(&mut stream, &ctx, &links, handed, &mut armed).await
    };
    match end {
        End::HandedOff(released) => {
            glommio::spawn_local(async move {
                let _ = released.await;
                if armed {
                    // The owner shut the socket down: the armed poll completes.
                    let _ = stream.set_read_timeout(Some(RETIRE_WAIT));
                    let _ = stream.read(&mut []).await;
                }
                drop(stream);
                drop(done);
            })
            .detach();
        }
        End::Closed => {
            retire(stream, armed).await;
            drop(done);
        }
    }
}

/// Closes a connection without leaving glommio an operation to cancel:
/// shutting the socket down makes any armed poll complete, and the reactor
/// collects it before the stream is dropped.
async fn retire(mut stream: TcpStream, armed: bool) {
    // Shut down, not only close: the shard that accepted the connection may
    // still hold a copy of the descriptor, and the peer must see the end.
    let _ = stream.shutdown(std::net::Shutdown::Both).await;
    if armed {
        let _ = stream.set_read_timeout(Some(RETIRE_WAIT));
        let mut sink = [0u8; 64];
        let _ = stream.read(&mut sink).await;
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// How long a closing connection waits for its armed poll to complete.
const RETIRE_WAIT: Duration = Duration::from_millis(100);

async fn run(
    stream: &mut TcpStream,
    ctx: &Rc<ShardCtx>,
    links: &Links,
    handed: Option<(Request, Vec<u8>, Option<IpAddr>)>,
    armed: &mut bool,
) -> End {
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
        Some((request, leftover, peer)) => {
            inbuf.extend(&leftover);
            (Some(request), peer)
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
                        let _in_flight = InFlight::new(ctx);
                        match api::handle(ctx, req, peer) {
                            Reply::Ready(r) => r,
                            Reply::Handoff { shard, request } => {
                                // Answers already due leave first, in order.
                                if !write(stream, ctx, &mut out).await {
                                    *armed = true;
                                    break 'conn;
                                }
                                if let Some(released) =
                                    hand_over(stream, links, shard, request, &inbuf, peer)
                                {
                                    return End::HandedOff(released);
                                }
                                api::handoff_failed(ctx)
                            }
                            Reply::Pending(mut pending) => {
                                // Earlier pipelined answers go out now, not after the wait.
                                if !write(stream, ctx, &mut out).await {
                                    *armed = true;
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
                        if !write(stream, ctx, &mut out).await {
                            *armed = true;
                        }
                        break 'conn;
                    }
                }
                Ok(Decoded::Continue) => {
                    out.extend_from_slice(CONTINUE_100);
                    if !write(stream, ctx, &mut out).await {
                        *armed = true;
                        break 'conn;
                    }
                }
                Ok(Decoded::Incomplete) => break,
                Err(e) => {
                    api::framing_error(ctx, &e).encode(&mut out, false);
                    if !write(stream, ctx, &mut out).await {
                        *armed = true;
                    }
                    break 'conn;
                }
            }
        }
        if !write(stream, ctx, &mut out).await {
            *armed = true;
            break;
        }
        let timeout = if decoder.in_progress(&inbuf) {
            let started = *request_started.get_or_insert_with(Instant::now);
            match request_timeout.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => {
                    send_timeout(stream, ctx, &mut out).await;
                    *armed = true;
                    break;
                }
            }
        } else {
            idle_timeout
        };
        // Only once no glommio operation is armed on the socket: the busy
        // poll reads with plain `recv` and must not leave one behind.
        if !*armed && busy_poll_us > 0 && ctx.connections.get() <= busy_poll_max_connections {
            match busy_poll(stream, &mut inbuf, Duration::from_micros(busy_poll_us)) {
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
        let read = read_some(stream, &mut inbuf).await;
        *armed = read.is_err();
        match read {
            Ok(0) => break,
            Ok(n) => {
                ctx.metrics.bytes_in.add(n as u64);
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                if decoder.in_progress(&inbuf) {
                    send_timeout(stream, ctx, &mut out).await;
                    *armed = true;
                }
                break;
            }
            Err(_) => break,
        }
    }
    End::Closed
}

/// Waits for bytes and reads what has arrived into `inbuf`; `Ok(0)` is end of stream.
///
/// glommio's `read` arms an io_uring poll for the next read whenever it
/// returns fewer bytes than asked. Dropping a stream with that poll in flight
/// makes glommio cancel it, and under load those cancellations have been seen
/// to lose unrelated operations of the same ring (a shard stopped accepting).
/// So the wait asks glommio for exactly one byte — a full read arms nothing —
/// and the rest is taken with a non-blocking `recv`. After a successful read
/// no operation is left in flight on the socket: a connection can be handed
/// to another shard or closed without any cancellation.
async fn read_some(stream: &mut TcpStream, inbuf: &mut InBuf) -> std::io::Result<usize> {
    let space = inbuf.read_space(READ_CHUNK);
    let first = stream.read(&mut space[..1]).await?;
    if first == 0 {
        return Ok(0);
    }
    let rest = &mut space[1..];
    // SAFETY: recv writes at most `rest.len()` bytes into memory we own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            rest.as_mut_ptr().cast(),
            rest.len(),
            libc::MSG_DONTWAIT,
        )
    };
    // Nothing more (or an error, which the next read reports): keep the one byte.
    let total = 1 + n.max(0) as usize;
    inbuf.commit(total);
    Ok(total)
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
