//! Long-polling inbox requests (`GET /api/inbox?wait=`) waiting for a
//! commit of their organization's events, on the organization's owner
//! shard. Bounded: a full table refuses (the request gets its empty page at
//! once instead of waiting). A waiting request that goes away (it timed
//! out, its connection closed) removes its own entry when its [`Waiting`]
//! is dropped, so the count is exact and room is never found by a scan.

use futures::channel::oneshot;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// One waiting request: its type filter and how to wake it.
struct Waiter {
    filter: Option<String>,
    tx: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Table {
    /// Per organization, the waiters by their sequence number.
    by_org: HashMap<uuid::Uuid, HashMap<u64, Waiter, ahash::RandomState>, ahash::RandomState>,
    count: usize,
    next: u64,
}

impl Table {
    fn remove(&mut self, org: uuid::Uuid, seq: u64) {
        let Some(list) = self.by_org.get_mut(&org) else {
            return;
        };
        if list.remove(&seq).is_some() {
            self.count -= 1;
        }
        if list.is_empty() {
            self.by_org.remove(&org);
        }
    }
}

/// Inbox requests waiting for a commit, per organization, on one shard.
pub struct InboxWaiters {
    table: Rc<RefCell<Table>>,
    capacity: usize,
}

/// A registered wait: completes at the next matching commit; dropping it
/// (the request is answered or gone) takes its entry out of the table.
pub struct Waiting {
    rx: oneshot::Receiver<()>,
    org: uuid::Uuid,
    seq: u64,
    table: Rc<RefCell<Table>>,
}

impl Future for Waiting {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.rx).poll(cx).map(|_| ())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Never borrowed across an await, so the borrow succeeds; if it
        // ever did not, the entry would go at the organization's next wake.
        if let Ok(mut t) = self.table.try_borrow_mut() {
            t.remove(self.org, self.seq);
        }
    }
}

impl InboxWaiters {
    pub fn new(capacity: usize) -> InboxWaiters {
        InboxWaiters {
            table: Rc::default(),
            capacity,
        }
    }

    /// A future that completes at the next commit for `org` (of `event_type`,
    /// when given); `None` when the shard already holds its limit of waiters.
    pub fn wait(&self, org: uuid::Uuid, event_type: Option<String>) -> Option<Waiting> {
        let mut t = self.table.borrow_mut();
        if t.count >= self.capacity {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let seq = t.next;
        t.next += 1;
        let waiter = Waiter {
            filter: event_type,
            tx: Some(tx),
        };
        t.by_org.entry(org).or_default().insert(seq, waiter);
        t.count += 1;
        debug_assert!(t.count <= self.capacity);
        Some(Waiting {
            rx,
            org,
            seq,
            table: self.table.clone(),
        })
    }

    /// An event of `org` with `event_type` was committed: wakes (and
    /// removes) the organization's waiters whose filter it matches.
    pub fn wake(&self, org: uuid::Uuid, event_type: &str) {
        let mut guard = self.table.borrow_mut();
        let t = &mut *guard;
        let Some(list) = t.by_org.get_mut(&org) else {
            return;
        };
        let before = list.len();
        list.retain(|_, w| {
            if w.filter.as_deref().is_some_and(|f| f != event_type) {
                return true;
            }
            if let Some(tx) = w.tx.take() {
                let _ = tx.send(());
            }
            false
        });
        let woken = before - list.len();
        if list.is_empty() {
            t.by_org.remove(&org);
        }
        t.count -= woken;
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.table.borrow().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn full_refuses_and_gone_requests_make_room_at_once() {
        let w = InboxWaiters::new(3);
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let first = w.wait(a, None).expect("room");
        let typed = w.wait(a, Some("x".into())).expect("room");
        let other = w.wait(b, None).expect("room");
        assert_eq!(w.len(), 3);
        assert!(w.wait(b, None).is_none(), "full: refused");
        // A request that goes away frees its place without any scan.
        drop(other);
        assert_eq!(w.len(), 2);
        let mut again = w.wait(b, None).expect("room again");
        // A commit of another type wakes the untyped waiter only.
        w.wake(a, "y");
        assert_eq!(first.now_or_never(), Some(()));
        assert_eq!(w.len(), 2);
        let mut typed = typed;
        assert_eq!((&mut typed).now_or_never(), None);
        w.wake(a, "x");
        assert_eq!(typed.now_or_never(), Some(()));
        assert_eq!(w.len(), 1);
        assert_eq!((&mut again).now_or_never(), None);
        w.wake(b, "z");
        assert_eq!(again.now_or_never(), Some(()));
        assert!(w.is_empty());
        assert!(w.table.borrow().by_org.is_empty());
    }
}
