//! Key invalidation across shards and across server processes sharing the
//! database: rotation sends `NOTIFY triggers_keys, 'key:<key_id>'` in its
//! transaction; one listener thread per process `LISTEN`s and forwards each
//! notice to every shard, which drops the entry from its cache. After a lost
//! connection (notices may have been missed) every shard clears its cache.
//!
//! Each shard's inbox of invalidations is bounded ([`channel`]) and fails
//! closed: a notice that finds it full sets the shard's "clear everything"
//! flag instead, so a revoked key still stops working (the shard drops its
//! whole cache and its leases, and re-verifies keys as they come). The
//! listener thread is supervised: a panic in it counts in
//! `triggers_worker_panics_total{pool="invalidation"}`, clears every shard's
//! cache (notices may have been missed) and the listener starts again.

use crate::store::DbSettings;
use crossbeam_channel::TrySendError;
use futures::task::AtomicWaker;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

pub const CHANNEL: &str = "triggers_keys";

/// Invalidations one shard's inbox holds before a notice falls back to
/// clearing the shard's whole cache.
pub const INBOX_CAPACITY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Key(String),
    All,
}

/// Parses a notice payload (`key:<key_id>`); anything else clears everything.
pub fn parse(payload: &str) -> Invalidation {
    match payload.strip_prefix("key:") {
        Some(id) if !id.is_empty() => Invalidation::Key(id.to_string()),
        _ => Invalidation::All,
    }
}

/// What the sender and the receiver of one inbox share.
struct Signal {
    /// Set by a sender that found the inbox full: clear everything.
    clear_all: AtomicBool,
    /// The shard task waiting for invalidations.
    waker: AtomicWaker,
}

/// The sending side of one shard's inbox; never blocks, never loses an
/// invalidation (a full inbox turns it into "clear everything").
#[derive(Clone)]
pub struct InvalidationSender {
    /// Always `Some` until dropped (see `Drop`).
    tx: Option<crossbeam_channel::Sender<Invalidation>>,
    signal: Arc<Signal>,
}

/// The shard's side: a stream of invalidations (`Invalidation::All` first
/// whenever a sender found the inbox full).
pub struct InvalidationReceiver {
    rx: crossbeam_channel::Receiver<Invalidation>,
    signal: Arc<Signal>,
}

/// One shard's inbox of at most `capacity` invalidations.
pub fn channel(capacity: usize) -> (InvalidationSender, InvalidationReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    let signal = Arc::new(Signal {
        clear_all: AtomicBool::new(false),
        waker: AtomicWaker::new(),
    });
    let receiver = InvalidationReceiver {
        rx,
        signal: signal.clone(),
    };
    let sender = InvalidationSender {
        tx: Some(tx),
        signal,
    };
    (sender, receiver)
}

impl InvalidationSender {
    pub fn send(&self, msg: Invalidation) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.signal.clear_all.store(true, Ordering::SeqCst),
            Err(TrySendError::Disconnected(_)) => return,
        }
        self.signal.waker.wake();
    }
}

impl Drop for InvalidationSender {
    /// The channel half goes first, then the wake: the last sender's drop
    /// lets a waiting receiver see the stream end.
    fn drop(&mut self) {
        drop(self.tx.take());
        self.signal.waker.wake();
    }
}

impl InvalidationReceiver {
    fn ready(&self) -> Option<Poll<Option<Invalidation>>> {
        if self.signal.clear_all.swap(false, Ordering::SeqCst) {
            return Some(Poll::Ready(Some(Invalidation::All)));
        }
        match self.rx.try_recv() {
            Ok(msg) => Some(Poll::Ready(Some(msg))),
            Err(crossbeam_channel::TryRecvError::Disconnected) => Some(Poll::Ready(None)),
            Err(crossbeam_channel::TryRecvError::Empty) => None,
        }
    }
}

impl futures::Stream for InvalidationReceiver {
    type Item = Invalidation;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Invalidation>> {
        if let Some(p) = self.ready() {
            return p;
        }
        // Register, then look again: a send between the two is seen now,
        // a later one wakes this task.
        self.signal.waker.register(cx.waker());
        self.ready().unwrap_or(Poll::Pending)
    }
}

fn broadcast(shards: &[InvalidationSender], msg: Invalidation) {
    for s in shards {
        s.send(msg.clone());
    }
}

/// Starts the listener thread; it exits when `stop` is set.
pub fn start(
    settings: DbSettings,
    shards: Vec<InvalidationSender>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("key-invalidation".into())
        .spawn(move || {
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let session = || listen(&settings, &shards, &stop, &mut first);
                match crate::supervise::catch("invalidation", session) {
                    Some(true) => {}
                    Some(false) => std::thread::sleep(Duration::from_millis(500)),
                    None => {
                        // Notices may have been missed: fail closed.
                        broadcast(&shards, Invalidation::All);
                        first = false;
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        })
        .expect("spawn the key invalidation thread")
}

/// One session: connect, `LISTEN`, forward notices until the connection
/// breaks or `stop` is set. False when it could not connect or listen.
fn listen(
    settings: &DbSettings,
    shards: &[InvalidationSender],
    stop: &AtomicBool,
    first: &mut bool,
) -> bool {
    let Ok(mut client) = settings.connect() else {
        return false;
    };
    if client.batch_execute(&format!("LISTEN {CHANNEL}")).is_err() {
        return false;
    }
    if !*first {
        log::info!("key invalidation listener reconnected; clearing key caches");
        broadcast(shards, Invalidation::All);
    }
    *first = false;
    while !stop.load(Ordering::Relaxed) {
        {
            let mut notices = client.notifications();
            let mut iter = notices.timeout_iter(Duration::from_millis(250));
            loop {
                match fallible_iterator::FallibleIterator::next(&mut iter) {
                    Ok(Some(n)) => broadcast(shards, parse(n.payload())),
                    Ok(None) => break,
                    Err(_) => return true,
                }
            }
        }
        if client.is_closed() {
            break;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::StreamExt;

    #[test]
    fn a_full_inbox_fails_closed_to_clearing_everything() {
        let (tx, mut rx) = channel(2);
        for i in 0..5 {
            tx.send(Invalidation::Key(format!("k{i}")));
        }
        let got: Vec<Invalidation> = futures::executor::block_on(async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(rx.next().await.expect("open"));
            }
            got
        });
        // The overflow clears everything first; what fitted follows.
        assert_eq!(got[0], Invalidation::All);
        assert_eq!(
            got[1..],
            [
                Invalidation::Key("k0".into()),
                Invalidation::Key("k1".into())
            ]
        );
        // Room again: keys go one by one.
        tx.send(Invalidation::Key("k9".into()));
        let next = futures::executor::block_on(rx.next());
        assert_eq!(next, Some(Invalidation::Key("k9".into())));
        drop(tx);
        assert_eq!(futures::executor::block_on(rx.next()), None);
    }

    #[test]
    fn a_send_from_another_thread_wakes_the_waiting_shard() {
        let (tx, mut rx) = channel(1);
        let sender = std::thread::spawn(move || {
            for i in 0..200 {
                tx.send(Invalidation::Key(format!("k{i}")));
                if i % 50 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        // The stream ends only when the sender is gone (a lost wake-up
        // would hang here); a key that did not fit is stood for by an `All`.
        let got: Vec<Invalidation> = futures::executor::block_on(rx.by_ref().collect());
        sender.join().expect("sender");
        let last = Invalidation::Key("k199".into());
        assert!(got.contains(&last) || got.contains(&Invalidation::All));
        let keys = got
            .iter()
            .filter(|m| matches!(m, Invalidation::Key(_)))
            .count();
        assert!(keys == 200 || got.contains(&Invalidation::All), "{keys}");
    }

    #[test]
    fn payloads() {
        assert_eq!(parse("key:abc"), Invalidation::Key("abc".into()));
        assert_eq!(parse("key:"), Invalidation::All);
        assert_eq!(parse("whatever"), Invalidation::All);
    }
}
