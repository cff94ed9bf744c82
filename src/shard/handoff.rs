//! Connection handoff between shards. A request whose API key belongs to
//! another shard (the key's routing slot) moves, with its connection, to that
//! shard: the socket is duplicated, sent with the decoded request and any
//! bytes already read, and the owner serves the rest of the connection. A
//! keep-alive client therefore costs one cross-shard message per connection,
//! not per request (`triggers_cross_shard_messages_total`).

use super::conn;
use crate::api::ShardCtx;
use crate::http::Request;
use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use glommio::net::TcpStream;
use glommio::TaskQueueHandle;
use std::cell::RefCell;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;

/// A connection on its way to its owner shard.
pub struct Handoff {
    pub fd: OwnedFd,
    pub request: Request,
    pub leftover: Vec<u8>,
    pub peer: Option<IpAddr>,
    /// Dropped by the owner shard when it is done with the connection.
    pub done: oneshot::Sender<()>,
}

/// One shard's links: the senders to every shard's handoff inbox, and the
/// connections this shard serves right now (so shutdown can close idle
/// keep-alive connections instead of leaving their tasks, and the shard
/// context they hold, behind).
pub struct Links {
    peers: RefCell<Vec<mpsc::Sender<Handoff>>>,
    open: RefCell<std::collections::HashSet<std::os::fd::RawFd>>,
    tasks: std::cell::Cell<usize>,
}

impl Links {
    pub fn new(peers: Vec<mpsc::Sender<Handoff>>) -> Rc<Links> {
        Rc::new(Links {
            peers: RefCell::new(peers),
            open: Default::default(),
            tasks: Default::default(),
        })
    }

    /// A connection task starts serving `fd`.
    pub fn serving(&self, fd: std::os::fd::RawFd) {
        self.open.borrow_mut().insert(fd);
        self.tasks.set(self.tasks.get() + 1);
    }

    /// That task ended (it no longer reads `fd`).
    pub fn ended(&self, fd: std::os::fd::RawFd) {
        self.open.borrow_mut().remove(&fd);
        self.tasks.set(self.tasks.get().saturating_sub(1));
    }

    /// Connection tasks still running.
    pub fn tasks(&self) -> usize {
        self.tasks.get()
    }

    /// Shuts every served socket down: idle connections see the end of the
    /// stream and their tasks finish.
    pub fn shut_all(&self) {
        for &fd in self.open.borrow().iter() {
            // SAFETY: `fd` is a socket a live connection task owns; shutdown
            // does not close it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// Queues `h` for `shard` without waiting; gives it back when the inbox is full.
    pub fn send(&self, shard: usize, h: Handoff) -> Result<(), Box<Handoff>> {
        let mut peers = self.peers.borrow_mut();
        match peers.get_mut(shard) {
            Some(tx) => tx.try_send(h).map_err(|e| Box::new(e.into_inner())),
            None => Err(Box::new(h)),
        }
    }
}

/// Serves every connection handed to this shard.
pub async fn receive(
    mut inbox: mpsc::Receiver<Handoff>,
    ctx: Rc<ShardCtx>,
    links: Rc<Links>,
    queue: TaskQueueHandle,
) {
    while let Some(h) = inbox.next().await {
        // SAFETY: the descriptor is a connected TCP socket whose ownership came with the message.
        let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
        let handed = conn::Handed {
            request: h.request,
            leftover: h.leftover,
            peer: h.peer,
            done: h.done,
        };
        match glommio::spawn_local_into(
            conn::serve(stream, ctx.clone(), links.clone(), Some(handed)),
            queue,
        ) {
            Ok(task) => {
                task.detach();
            }
            Err(e) => log::error!("shard {}: cannot spawn a handed connection: {e}", ctx.id),
        }
    }
}
