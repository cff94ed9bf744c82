//! One measured run: starts the connection coroutines, lets them work for
//! `--duration`, stops them and merges what they counted. A connection is
//! either a producer (closed loop, or open loop on a [`Schedule`]) or a
//! consumer (inbox page, then bulk ack of its ids).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::args::Args;
use crate::http::{Conn, Failure, Response};
use crate::progress::{self, Feed, Live};
use crate::scenario::{self, Kind, Role};
use crate::schedule::{Schedule, Timing};
use crate::stats::Stats;

/// How long after the end of the run unanswered requests are waited for.
const GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed connect, and of a consumer facing an empty inbox.
const BACKOFF: Duration = Duration::from_millis(10);

/// What a run measured.
pub struct RunResult {
    pub stats: Stats,
    /// Seconds from start to stop (responses arriving after stop still count).
    pub elapsed: f64,
    /// Open loop: the requested rate.
    pub rate: Option<f64>,
}

/// What every connection of a run shares.
struct Ctx {
    addr: String,
    keys: Arc<Vec<String>>,
    next_key: AtomicUsize,
    per_connection: usize,
    stop: AtomicBool,
    start: Instant,
    /// Past this (since start), waiting for a response is abandoned.
    hard_deadline: Duration,
    live: Arc<Live>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn give_up(&self) -> bool {
        self.start.elapsed() > self.hard_deadline
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The key for a new TCP connection: the next one, round robin.
    fn take_key(&self) -> Option<String> {
        if self.keys.is_empty() {
            return None;
        }
        let i = self.next_key.fetch_add(1, Ordering::Relaxed) % self.keys.len();
        self.keys.get(i).cloned()
    }

    /// Sleeps until `at` (since start) or until the run stops; true if stopped.
    fn sleep_until(&self, at: Duration) -> bool {
        loop {
            if self.stopped() {
                return true;
            }
            let now = self.now();
            if now >= at {
                return false;
            }
            let left = at - now;
            if left > Duration::from_millis(1) {
                // Coroutine timers are ~1 ms coarse: sleep short, then yield.
                let nap = (left - Duration::from_micros(500)).min(Duration::from_millis(100));
                may::coroutine::sleep(nap);
            } else {
                may::coroutine::yield_now();
            }
        }
    }
}

/// Runs the scenario for `duration` seconds, open loop at `rate` if given;
/// `label` prefixes the progress line.
pub fn run(
    a: &Args,
    keys: Arc<Vec<String>>,
    rate: Option<f64>,
    duration: f64,
    label: &str,
) -> RunResult {
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        addr: a.addr.clone(),
        keys,
        next_key: AtomicUsize::new(0),
        per_connection: a.per_connection(),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        hard_deadline: Duration::from_secs_f64(duration) + GRACE,
        live: live.clone(),
    });
    let printer_done = Arc::new(AtomicBool::new(false));
    let printer =
        (!a.quiet).then(|| progress::spawn_printer(live, printer_done.clone(), label.into()));

    let producers = a.connections - a.consumers();
    let results = Arc::new(Mutex::new(Stats::default()));
    let mut handles = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let role = scenario::role(a, i);
        let schedule = match (&role, rate) {
            (Role::Producer { .. }, Some(r)) => Some(Schedule::for_connection(r, producers, i)),
            _ => None,
        };
        let (ctx, results) = (ctx.clone(), results.clone());
        handles.push(may::go!(move || {
            let stats = connection(&ctx, &role, schedule);
            results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .merge(&stats);
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(duration));
    ctx.stop.store(true, Ordering::Relaxed);
    let elapsed = ctx.start.elapsed().as_secs_f64();
    for h in handles {
        let _ = h.join();
    }
    printer_done.store(true, Ordering::Relaxed);
    if let Some(p) = printer {
        let _ = p.join();
    }
    let stats = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    RunResult {
        stats,
        elapsed,
        rate,
    }
}

/// One connection slot until the run stops: reconnects (with the next key)
/// after errors, when the server closes, and every `--per-connection`.
fn connection(ctx: &Ctx, role: &Role, schedule: Option<Schedule>) -> Stats {
    let mut stats = Stats::default();
    let mut feed = Feed::new(ctx.live.clone());
    let mut next = 0u64; // index into the schedule
    'connect: while !ctx.stopped() {
        let key = ctx.take_key();
        let request = role.request(key.as_deref());
        let mut conn = match Conn::open(&ctx.addr) {
            Ok(c) => c,
            Err(_) => {
                stats.error(role.kind());
                feed.error();
                may::coroutine::sleep(BACKOFF);
                continue;
            }
        };
        let mut exchanges = 0usize;
        while !ctx.stopped() {
            let ok = match role {
                Role::Producer { kind, .. } => {
                    let intended = match schedule {
                        Some(s) => {
                            let at = s.intended(next);
                            next += 1;
                            if ctx.sleep_until(at) {
                                break 'connect;
                            }
                            Some(at)
                        }
                        None => None,
                    };
                    exchange(
                        ctx, &mut conn, *kind, &request, intended, &mut stats, &mut feed,
                    )
                    .is_some()
                }
                Role::Consumer => consume(
                    ctx,
                    &mut conn,
                    key.as_deref(),
                    &request,
                    &mut stats,
                    &mut feed,
                ),
            };
            exchanges += 1;
            let used_up = ctx.per_connection > 0 && exchanges >= ctx.per_connection;
            if !ok || conn.closing || used_up {
                continue 'connect;
            }
        }
    }
    stats
}

/// Sends one request and records its outcome; the response when it counted.
fn exchange(
    ctx: &Ctx,
    conn: &mut Conn,
    kind: Kind,
    request: &[u8],
    intended: Option<Duration>,
    stats: &mut Stats,
    feed: &mut Feed,
) -> Option<Response> {
    let sent = ctx.now();
    match conn.exchange(request, || ctx.give_up()) {
        Ok(resp) => {
            let done = ctx.now();
            let timing = match intended {
                Some(intended) => Timing {
                    intended,
                    sent,
                    done,
                },
                None => Timing::unscheduled(sent, done),
            };
            match events_in(kind, &resp) {
                Ok(events) => {
                    stats.record(kind, resp.status, timing, events);
                    feed.response(timing.corrected_us());
                    Some(resp)
                }
                Err(_) => {
                    stats.error(kind);
                    feed.error();
                    None
                }
            }
        }
        Err(Failure::Abandoned) => {
            stats.unfinished(kind);
            None
        }
        Err(Failure::Error) => {
            stats.error(kind);
            feed.error();
            None
        }
    }
}

/// Events a response moved; a success whose body cannot be read is an error.
fn events_in(kind: Kind, resp: &Response) -> Result<u64, String> {
    match (kind, resp.status) {
        (Kind::Ingest, 202) => Ok(1),
        (Kind::Batch, 202) => scenario::batch_accepted(&resp.body),
        (Kind::Ack, 200) => scenario::ack_count(&resp.body),
        (Kind::Inbox, 200) => scenario::inbox_ids(&resp.body).map(|_| 0),
        _ => Ok(0),
    }
}

/// A consumer step: one inbox page, then a bulk ack of its ids (or a short
/// pause when it was empty). False when the connection must be renewed.
fn consume(
    ctx: &Ctx,
    conn: &mut Conn,
    key: Option<&str>,
    inbox_request: &[u8],
    stats: &mut Stats,
    feed: &mut Feed,
) -> bool {
    let Some(page) = exchange(ctx, conn, Kind::Inbox, inbox_request, None, stats, feed) else {
        return false;
    };
    let ids = match (page.status, scenario::inbox_ids(&page.body)) {
        (200, Ok(ids)) => ids,
        _ => Vec::new(),
    };
    if ids.is_empty() {
        may::coroutine::sleep(BACKOFF);
        return !conn.closing;
    }
    if conn.closing {
        return false;
    }
    let ack = scenario::ack_request(key, &ids);
    exchange(ctx, conn, Kind::Ack, &ack, None, stats, feed).is_some()
}
