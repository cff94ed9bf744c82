//! Shards: one glommio executor per shard core, each with its own
//! `SO_REUSEPORT` listener. A shard accepts connections and runs each in a
//! task of a `Latency::Matters` queue (so wakes from the persistence core and
//! query workers are served promptly), owning its state outright.
//!
//! Request path: `accept_loop` → `conn::serve` (bytes in, codec, `api::handle`,
//! bytes out). Shutdown: a oneshot from the main thread stops accepting, waits
//! a bounded time for in-flight requests, and ends the executor.

mod conn;
mod handoff;

use crate::api::{EngineHooks, ShardCtx, Shared};
use crate::auth::invalidation::{Invalidation, InvalidationReceiver};
use crate::auth::lease::LeaseRequest;
use futures::channel::{mpsc, oneshot};
use futures::future::Either;
use futures::StreamExt;
use glommio::net::{TcpListener, TcpStream};
use glommio::{
    executor, ExecutorJoinHandle, Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle,
};
use handoff::{Handoff, Links};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shard {shard} on core {core}: {message}")]
    Start {
        shard: usize,
        core: usize,
        message: String,
    },
}

/// The running shards; [`ShardSet::shutdown`] stops and joins them.
pub struct ShardSet {
    shards: Vec<(ExecutorJoinHandle<()>, oneshot::Sender<()>)>,
    stopping: Arc<AtomicBool>,
}

/// Set when a shard ended without being asked to: its listening socket is
/// gone from the `SO_REUSEPORT` group's service, so the whole server stops
/// (SIGTERM to itself) and exits with an error rather than run degraded.
pub static SHARD_FAILED: AtomicBool = AtomicBool::new(false);

/// Lives as long as a shard's main future; its drop before shutdown marks
/// the shard as failed.
struct ShardAlive {
    id: usize,
    stopping: Arc<AtomicBool>,
}

impl Drop for ShardAlive {
    fn drop(&mut self) {
        if !self.stopping.load(Ordering::Acquire) {
            log::error!(
                "shard {} stopped unexpectedly; stopping the server",
                self.id
            );
            SHARD_FAILED.store(true, Ordering::Release);
            // SAFETY: raising a signal in our own process; the main thread's
            // signal iterator turns it into an orderly shutdown.
            unsafe { libc::raise(libc::SIGTERM) };
        }
    }
}

/// A listening socket with `SO_REUSEPORT`, so every shard binds the same address.
pub fn reuseport_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s)
}

/// How long glommio's accept may wait before the listen queue is checked
/// directly (see `accept_loop`).
const ACCEPT_RESCUE: Duration = Duration::from_millis(200);

/// Connection handoffs waiting for one shard.
const HANDOFF_QUEUE: usize = 1024;

/// Lease requests from other shards waiting for one shard (`auth::lease`).
const LEASE_QUEUE: usize = 4096;

fn glommio_sleep(d: Duration) -> Pin<Box<dyn Future<Output = ()>>> {
    Box::pin(glommio::timer::sleep(d))
}

fn glommio_spawn(f: Pin<Box<dyn Future<Output = ()>>>) {
    glommio::spawn_local(f).detach();
}

/// Starts one shard per core of the plan, all listening on `addr`; shard `i`
/// receives key invalidations on `invalidations[i]`.
pub fn start(
    shared: Arc<Shared>,
    addr: SocketAddr,
    invalidations: Vec<InvalidationReceiver>,
    completions: Vec<mpsc::UnboundedReceiver<crate::persist::Completions>>,
) -> Result<ShardSet, ShardError> {
    let cfg = &shared.config;
    let mut shards = Vec::new();
    let stopping = Arc::new(AtomicBool::new(false));
    let (handoff_tx, handoff_rx): (Vec<_>, Vec<_>) = shared
        .plan
        .shards
        .iter()
        .map(|_| mpsc::channel::<Handoff>(HANDOFF_QUEUE))
        .unzip();
    let (lease_tx, lease_rx): (Vec<_>, Vec<_>) = shared
        .plan
        .shards
        .iter()
        .map(|_| mpsc::channel::<LeaseRequest>(LEASE_QUEUE))
        .unzip();
    let mut inboxes = handoff_rx
        .into_iter()
        .zip(invalidations)
        .zip(completions)
        .zip(lease_rx);
    for (id, &core) in shared.plan.shards.iter().enumerate() {
        let Some((((inbox, invalidations), completions), leases)) = inboxes.next() else {
            break;
        };
        let peers = handoff_tx.clone();
        let lease_peers = lease_tx.clone();
        let socket = reuseport_listener(addr, cfg.http.listen_backlog)
            .map_err(|source| ShardError::Listen { addr, source })?;
        let fd: RawFd = socket.into_raw_fd();
        let placement = if shared.plan.pin {
            Placement::Fixed(core)
        } else {
            Placement::Unbound
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let shard_shared = shared.clone();
        // The executor signals once it runs: if glommio cannot build its
        // reactor, the closure is dropped unrun and start-up fails here
        // instead of leaving a listener nobody serves.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let shard_stopping = stopping.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .spin_before_park(Duration::from_micros(cfg.cores.spin_before_park_us))
            .spawn(move || async move {
                let _alive = ShardAlive {
                    id,
                    stopping: shard_stopping,
                };
                let _ = ready_tx.send(());
                // SAFETY: `fd` is a listening socket we own; nothing else uses it.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                let links = Links::new(peers);
                let mail = Mail {
                    handoffs: inbox,
                    invalidations,
                    completions,
                    leases,
                    lease_peers,
                };
                run_shard(id, shard_shared, (listener, fd), links, mail, stop_rx).await
            })
            .map_err(|e| ShardError::Start {
                shard: id,
                core,
                message: e.to_string(),
            })?;
        if ready_rx.recv().is_err() {
            stopping.store(true, Ordering::Release);
            let message = match handle.join() {
                Err(e) => e.to_string(),
                Ok(()) => "the executor ended before it ran".into(),
            };
            return Err(ShardError::Start {
                shard: id,
                core,
                message,
            });
        }
        shards.push((handle, stop_tx));
    }
    Ok(ShardSet { shards, stopping })
}

impl ShardSet {
    /// Stops accepting on every shard, lets in-flight requests finish, joins.
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        let mut handles = Vec::new();
        for (handle, stop) in self.shards {
            let _ = stop.send(());
            handles.push(handle);
        }
        for (id, handle) in handles.into_iter().enumerate() {
            if let Err(e) = handle.join() {
                log::error!("shard {id} ended with an error: {e}");
            }
        }
    }
}

/// What other threads send one shard.
struct Mail {
    /// Connections handed over by other shards.
    handoffs: mpsc::Receiver<Handoff>,
    /// Key invalidations from the LISTEN/NOTIFY thread and other shards
    /// (bounded; an overflow arrives as `Invalidation::All`).
    invalidations: InvalidationReceiver,
    /// Committed (or failed) ingests from the persistence writers.
    completions: mpsc::UnboundedReceiver<crate::persist::Completions>,
    /// Lease requests for keys this shard owns.
    leases: mpsc::Receiver<LeaseRequest>,
    /// Where this shard sends its own lease requests, by shard id.
    lease_peers: Vec<mpsc::Sender<LeaseRequest>>,
}

async fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    (listener, listen_fd): (TcpListener, RawFd),
    links: Rc<Links>,
    mail: Mail,
    stop: oneshot::Receiver<()>,
) {
    let Mail {
        handoffs: inbox,
        mut invalidations,
        completions,
        mut leases,
        lease_peers,
    } = mail;
    let grace = Duration::from_millis(shared.config.http.shutdown_grace_ms);
    let hooks = EngineHooks {
        sleep: glommio_sleep,
        spawn: glommio_spawn,
    };
    let ctx = Rc::new(ShardCtx::new(id, shared, hooks, lease_peers));
    let queue = executor().create_task_queue(
        Shares::default(),
        Latency::Matters(Duration::from_millis(1)),
        "connections",
    );
    let c = ctx.clone();
    let invalidation = glommio::spawn_local_into(
        async move {
            while let Some(msg) = invalidations.next().await {
                match msg {
                    Invalidation::Key(key_id) => {
                        c.auth.cache.borrow_mut().invalidate(&key_id);
                        c.auth.leases.borrow_mut().invalidate(&key_id);
                    }
                    Invalidation::All => {
                        c.auth.cache.borrow_mut().clear();
                        c.auth.leases.borrow_mut().clear();
                    }
                }
            }
        },
        queue,
    );
    // The two detached tasks below hold the context weakly: they outlive the
    // shard's main future, and the context (with the persistence rings in
    // `Shared`) must be dropped when it ends, or persistence never stops.
    let c = Rc::downgrade(&ctx);
    let lessor = glommio::spawn_local_into(
        async move {
            while let Some(request) = leases.next().await {
                if let Some(c) = c.upgrade() {
                    crate::api::serve_lease(&c, request);
                }
            }
        },
        queue,
    );
    let handoffs = glommio::spawn_local_into(
        handoff::receive(inbox, ctx.clone(), links.clone(), queue),
        queue,
    );
    // Commits reach waiting requests through this task: one wake per batch.
    // It runs until the executor ends, so draining requests still complete.
    let c = Rc::downgrade(&ctx);
    let wake = move |stored: &[(uuid::Uuid, String)]| {
        if let Some(c) = c.upgrade() {
            for (org, event_type) in stored {
                c.inbox_waiters.wake(*org, event_type);
            }
        }
    };
    match glommio::spawn_local_into(crate::persist::complete(completions, wake), queue) {
        Ok(task) => {
            task.detach();
        }
        Err(e) => {
            log::error!("shard {id}: cannot spawn the commit completion task: {e}");
            return;
        }
    }
    // Lease requests are served until the executor ends, so other shards'
    // draining requests still get their answers.
    match lessor {
        Ok(task) => {
            task.detach();
        }
        Err(e) => {
            log::error!("shard {id}: cannot spawn the lease task: {e}");
            return;
        }
    }
    let (Ok(invalidation), Ok(handoffs)) = (invalidation, handoffs) else {
        log::error!("shard {id}: cannot spawn its service tasks");
        return;
    };
    let accept = match glommio::spawn_local_into(
        accept_loop(listener, listen_fd, ctx.clone(), links.clone(), queue),
        queue,
    ) {
        Ok(task) => task,
        Err(e) => {
            log::error!("shard {id}: cannot spawn the accept loop: {e}");
            return;
        }
    };
    log::debug!("shard {id} serving");
    let _ = stop.await;
    ctx.draining.set(true);
    // Dropping the accept task closes the listener: no new connections.
    drop(accept);
    drop(handoffs);
    drop(invalidation);
    let deadline = Instant::now() + grace;
    while ctx.in_flight.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Idle keep-alive connections end now: their tasks hold the shard's
    // context (and through it the persistence rings and the query pool),
    // and a task still pending when the executor ends is never dropped.
    links.shut_all();
    let deadline = Instant::now() + Duration::from_secs(1);
    while links.tasks() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if ctx.in_flight.get() > 0 {
        log::warn!(
            "shard {id}: {} request(s) still in flight at shutdown",
            ctx.in_flight.get()
        );
    }
}

async fn accept_loop(
    listener: TcpListener,
    listen_fd: RawFd,
    ctx: Rc<ShardCtx>,
    links: Rc<Links>,
    queue: TaskQueueHandle,
) {
    let limit = ctx.shared.config.http.max_connections_per_shard;
    let serve = |stream: TcpStream| {
        let task = if ctx.connections.get() >= limit {
            ctx.metrics.connections_refused.inc();
            glommio::spawn_local_into(conn::refuse(stream, ctx.clone()), queue)
        } else {
            glommio::spawn_local_into(conn::serve(stream, ctx.clone(), links.clone(), None), queue)
        };
        match task {
            Ok(task) => {
                task.detach();
            }
            Err(e) => log::error!("shard {}: cannot spawn a connection task: {e}", ctx.id),
        }
    };
    loop {
        let mut accept = std::pin::pin!(listener.accept());
        loop {
            let tick = std::pin::pin!(glommio::timer::sleep(ACCEPT_RESCUE));
            match futures::future::select(accept.as_mut(), tick).await {
                Either::Left((Ok(stream), _)) => {
                    serve(stream);
                    break;
                }
                Either::Left((Err(e), _)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    log::warn!("shard {}: accept failed: {e}", ctx.id);
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    break;
                }
                Either::Right(((), _)) => {
                    // glommio's accept has waited ACCEPT_RESCUE: usually an idle
                    // listener. But under connection churn on this machine
                    // (kernel 6.x, glommio 0.9) a shard's io_uring ACCEPT was
                    // seen to vanish without a completion, leaving the shard deaf
                    // while its listen queue filled (`tests/shards.rs`). So
                    // whatever the listen queue holds now is taken directly. The
                    // accept in flight is never cancelled: a cancellation racing
                    // its completion leaks the accepted socket (seen: a client
                    // whose request sat unread in an accepted socket).
                    while let Some(stream) = accept_queued(listen_fd) {
                        ctx.metrics.accept_rescues.inc();
                        serve(stream);
                    }
                }
            }
        }
    }
}

/// A connection waiting in the listen queue, taken without blocking (the
/// listener is a blocking socket: glommio's own first attempt flips
/// `O_NONBLOCK` the same way).
fn accept_queued(listener: RawFd) -> Option<TcpStream> {
    let mut ready = libc::pollfd {
        fd: listener,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, zero timeout.
    if unsafe { libc::poll(&mut ready, 1, 0) } != 1 {
        return None;
    }
    // SAFETY: fcntl and accept4 on a listening socket this shard owns; the
    // flags are restored before returning.
    unsafe {
        let flags = libc::fcntl(listener, libc::F_GETFL);
        if flags < 0 {
            return None;
        }
        libc::fcntl(listener, libc::F_SETFL, flags | libc::O_NONBLOCK);
        let fd = libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        );
        libc::fcntl(listener, libc::F_SETFL, flags);
        // SAFETY: a connected socket accept4 just created; we own it.
        (fd >= 0).then(|| TcpStream::from_raw_fd(fd))
    }
}
