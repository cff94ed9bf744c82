//! Connection handoff between shards. A request whose API key belongs to
//! another shard (the key's routing slot) moves, with its connection, to that
//! shard: the socket is duplicated, sent with the decoded request and any
//! bytes already read, and the owner serves the rest of the connection. A
//! keep-alive client therefore costs one cross-shard message per connection,
//! not per request (`triggers_cross_shard_messages_total`).

use super::conn;
use crate::api::ShardCtx;
use crate::http::Request;
use glommio::channels::shared_channel::{ConnectedSender, SharedReceiver, SharedSender};
use glommio::net::TcpStream;
use glommio::TaskQueueHandle;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;

/// A connection on its way to its owner shard.
pub struct Handoff {
    pub fd: OwnedFd,
    pub request: Request,
    pub leftover: Vec<u8>,
    pub peer: Option<IpAddr>,
}

/// A shard's senders to every other shard's handoff inbox (glommio shared
/// channels: the receiving executor learns of new items in its own reactor
/// loop, so a handoff is never left waiting for an unrelated wake-up).
pub struct Links {
    peers: Vec<Option<ConnectedSender<Handoff>>>,
}

impl Links {
    /// Connects to every peer (each peer's receiving task must be running).
    pub async fn connect(senders: Vec<Option<SharedSender<Handoff>>>) -> Rc<Links> {
        let mut peers = Vec::with_capacity(senders.len());
        for s in senders {
            peers.push(match s {
                Some(s) => Some(s.connect().await),
                None => None,
            });
        }
        Rc::new(Links { peers })
    }

    /// Queues `h` for `shard` without waiting; false (and `h` dropped, closing
    /// its descriptor copy) when the inbox is full or gone.
    pub fn send(&self, shard: usize, h: Handoff) -> bool {
        match self.peers.get(shard).and_then(Option::as_ref) {
            Some(tx) => tx.try_send(h).is_ok(),
            None => false,
        }
    }
}

/// Serves every connection handed to this shard through `inbox`.
pub async fn receive(
    inbox: SharedReceiver<Handoff>,
    ctx: Rc<ShardCtx>,
    links: Rc<std::cell::OnceCell<Rc<Links>>>,
    queue: TaskQueueHandle,
) {
    let inbox = inbox.connect().await;
    while let Some(h) = inbox.recv().await {
        // SAFETY: the descriptor is a connected TCP socket whose ownership came with the message.
        let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
        let Some(links) = links.get().cloned() else {
            // Not serving yet: the connection closes (its client retries).
            continue;
        };
        let handed = conn::Handed {
            request: h.request,
            leftover: h.leftover,
            peer: h.peer,
        };
        match glommio::spawn_local_into(
            conn::serve(stream, ctx.clone(), links, Some(handed)),
            queue,
        ) {
            Ok(task) => {
                task.detach();
            }
            Err(e) => log::error!("shard {}: cannot spawn a handed connection: {e}", ctx.id),
        }
    }
}
