//! Query workers: a few OS threads, each with its own synchronous `postgres`
//! connection, fed through one bounded crossbeam channel. A shard submits a
//! closure with `try_send` (never blocking) and awaits a oneshot that the
//! worker completes; the shard task is woken from the worker's thread.
//!
//! Supervised (`crate::supervise`): a job that panics is caught, counted in
//! `triggers_worker_panics_total{pool=...}` and fails alone (its oneshot is
//! dropped, the shard answers 500); the worker drops its connection, which
//! may be mid-transaction, and goes on with the next job.

use super::{DbSettings, StoreError};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use futures::channel::oneshot;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The future a shard awaits for a query's answer.
pub type Reply<T> = oneshot::Receiver<Result<T, StoreError>>;

/// A lazily (re)connected database connection owned by one worker.
pub struct Connection {
    settings: DbSettings,
    client: Option<postgres::Client>,
}

impl Connection {
    pub fn new(settings: DbSettings) -> Connection {
        Connection {
            settings,
            client: None,
        }
    }

    /// The live client, connecting first if needed.
    pub fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        match &mut self.client {
            Some(c) => Ok(c),
            slot => Ok(slot.insert(self.settings.connect()?)),
        }
    }

    /// Drops the connection after an error that may have broken it.
    pub fn reset(&mut self) {
        self.client = None;
    }
}

/// One worker's loop: runs jobs until the pool's queue closes, each under
/// `supervise::catch`.
fn serve(pool: &'static str, rx: &Receiver<Job>, mut conn: Connection) {
    #[cfg(debug_assertions)]
    let mut armed = crate::supervise::debug_panic_armed(pool);
    while let Ok(job) = rx.recv() {
        let ran = crate::supervise::catch(pool, || {
            #[cfg(debug_assertions)]
            if std::mem::take(&mut armed) {
                panic!("TRIGGERS_DEBUG_PANIC_ON: an injected panic");
            }
            job(&mut conn)
        });
        if ran.is_none() {
            conn.reset();
        }
    }
}

#[derive(Clone)]
pub struct QueryPool {
    tx: Sender<Job>,
}

impl QueryPool {
    /// Starts `workers` threads sharing a queue of `capacity` jobs, pinned to
    /// `core` when given; `name` names the threads and the pool's panic series.
    pub fn start(
        name: &'static str,
        settings: DbSettings,
        workers: usize,
        capacity: usize,
        core: Option<usize>,
    ) -> (QueryPool, Vec<JoinHandle<()>>) {
        let (tx, rx) = bounded::<Job>(capacity);
        let handles = (0..workers)
            .map(|i| {
                let rx: Receiver<Job> = rx.clone();
                let settings = settings.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            crate::topology::pin_current_thread(core, true);
                        }
                        serve(name, &rx, Connection::new(settings));
                    })
                    .expect("spawn query worker thread")
            })
            .collect();
        (QueryPool { tx }, handles)
    }

    /// Queues `f` for a worker without blocking; `Overloaded` when the queue is full.
    pub fn submit<T, F>(&self, f: F) -> Result<Reply<T>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send + 'static,
    {
        let (done, reply) = oneshot::channel();
        let job: Job = Box::new(move |conn: &mut Connection| {
            let result = conn.client().and_then(f);
            if result.as_ref().is_err_and(StoreError::is_connection_error) {
                conn.reset();
            }
            let _ = done.send(result);
        });
        match self.tx.try_send(job) {
            Ok(()) => Ok(reply),
            Err(TrySendError::Full(_)) => Err(StoreError::Overloaded),
            Err(TrySendError::Disconnected(_)) => {
                Err(StoreError::Unavailable("query workers stopped".into()))
            }
        }
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}
