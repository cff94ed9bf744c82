//! Shards: one glommio executor per shard core, each with its own
//! `SO_REUSEPORT` listener. A shard accepts connections and runs each in a
//! task of a `Latency::Matters` queue (so wakes from the persistence core and
//! query workers are served promptly), owning its state outright.
//!
//! Request path: `accept_loop` → `conn::serve` (bytes in, codec, `api::handle`,
//! bytes out). Shutdown: a oneshot from the main thread stops accepting, waits
//! a bounded time for in-flight requests, and ends the executor.

mod conn;

use crate::api::{ShardCtx, Shared};
use futures::channel::oneshot;
use glommio::net::TcpListener;
use glommio::{
    executor, ExecutorJoinHandle, Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle,
};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
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

/// Starts one shard per core of the plan, all listening on `addr`.
pub fn start(shared: Arc<Shared>, addr: SocketAddr) -> Result<ShardSet, ShardError> {
    let cfg = &shared.config;
    let mut shards = Vec::new();
    for (id, &core) in shared.plan.shards.iter().enumerate() {
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
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .spin_before_park(Duration::from_micros(cfg.cores.spin_before_park_us))
            .spawn(move || async move {
                // SAFETY: `fd` is a listening socket we own; nothing else uses it.
                let listener = unsafe { TcpListener::from_raw_fd(fd) };
                run_shard(id, shard_shared, listener, stop_rx).await
            })
            .map_err(|e| ShardError::Start {
                shard: id,
                core,
                message: e.to_string(),
            })?;
        shards.push((handle, stop_tx));
    }
    Ok(ShardSet { shards })
}

impl ShardSet {
    /// Stops accepting on every shard, lets in-flight requests finish, joins.
    pub fn shutdown(self) {
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

async fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: oneshot::Receiver<()>,
) {
    let grace = Duration::from_millis(shared.config.http.shutdown_grace_ms);
    let ctx = Rc::new(ShardCtx::new(id, shared));
    let queue = executor().create_task_queue(
        Shares::default(),
        Latency::Matters(Duration::from_millis(1)),
        "connections",
    );
    let accept = match glommio::spawn_local_into(accept_loop(listener, ctx.clone(), queue), queue) {
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
    let deadline = Instant::now() + grace;
    while ctx.in_flight.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if ctx.in_flight.get() > 0 {
        log::warn!(
            "shard {id}: {} request(s) still in flight at shutdown",
            ctx.in_flight.get()
        );
    }
}

async fn accept_loop(listener: TcpListener, ctx: Rc<ShardCtx>, queue: TaskQueueHandle) {
    let limit = ctx.shared.config.http.max_connections_per_shard;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let at_limit = ctx.connections.get() >= limit;
                let task = if at_limit {
                    ctx.metrics.connections_refused.inc();
                    glommio::spawn_local_into(conn::refuse(stream, ctx.clone()), queue)
                } else {
                    glommio::spawn_local_into(conn::serve(stream, ctx.clone()), queue)
                };
                match task {
                    Ok(task) => {
                        task.detach();
                    }
                    Err(e) => log::error!("shard {}: cannot spawn a connection task: {e}", ctx.id),
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                log::warn!("shard {}: accept failed: {e}", ctx.id);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
