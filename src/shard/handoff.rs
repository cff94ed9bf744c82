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

/// The senders to every shard's handoff inbox, owned by one shard.
pub struct Links {
    peers: RefCell<Vec<mpsc::Sender<Handoff>>>,
}

impl Links {
    pub fn new(peers: Vec<mpsc::Sender<Handoff>>) -> Rc<Links> {
        Rc::new(Links {
            peers: RefCell::new(peers),
        })
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
