//! The live progress line on stderr, once per second: elapsed time,
//! requests/s over the last second, p50/p99 so far, errors. Connections feed
//! it through a [`Feed`] that batches their samples into the shared [`Live`].

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hist::Latency;

/// Counters shared by the connections of a run and the progress printer.
#[derive(Default)]
pub struct Live {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Mutex<Latency>,
}

/// One connection's buffer into [`Live`], flushed every 100 ms.
pub struct Feed {
    live: Arc<Live>,
    pending: Latency,
    requests: u64,
    errors: u64,
    flushed: Instant,
}

const FLUSH_EVERY: Duration = Duration::from_millis(100);

impl Feed {
    pub fn new(live: Arc<Live>) -> Feed {
        Feed {
            live,
            pending: Latency::default(),
            requests: 0,
            errors: 0,
            flushed: Instant::now(),
        }
    }

    pub fn response(&mut self, latency_us: u64) {
        self.pending.record(latency_us);
        self.requests += 1;
        self.maybe_flush();
    }

    pub fn error(&mut self) {
        self.errors += 1;
        self.maybe_flush();
    }

    fn maybe_flush(&mut self) {
        if self.flushed.elapsed() >= FLUSH_EVERY {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        self.live
            .requests
            .fetch_add(self.requests, Ordering::Relaxed);
        self.live.errors.fetch_add(self.errors, Ordering::Relaxed);
        if let Ok(mut h) = self.live.latency.lock() {
            h.merge(&self.pending);
        }
        self.pending.reset();
        (self.requests, self.errors) = (0, 0);
        self.flushed = Instant::now();
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Prints the progress line every second until `done` is set; `label`
/// prefixes it (e.g. the sweep step).
pub fn spawn_printer(
    live: Arc<Live>,
    done: Arc<AtomicBool>,
    label: String,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let tty = std::io::stderr().is_terminal();
        let start = Instant::now();
        let mut last_requests = 0u64;
        let mut next = start + Duration::from_secs(1);
        let mut printed = false;
        while !done.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            next += Duration::from_secs(1);
            let requests = live.requests.load(Ordering::Relaxed);
            let errors = live.errors.load(Ordering::Relaxed);
            let (p50, p99) = live
                .latency
                .lock()
                .map(|h| (h.percentile(50.0), h.percentile(99.0)))
                .unwrap_or((0, 0));
            let line = format!(
                "{label}[{:>4.0}s] {:>8} req/s  p50 {}  p99 {}  errors {errors}",
                start.elapsed().as_secs_f64(),
                requests - last_requests,
                human_us(p50),
                human_us(p99),
            );
            last_requests = requests;
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            printed = true;
        }
        if tty && printed {
            eprintln!();
        }
    })
}

/// `850us`, `12.3ms`, `1.25s`.
pub fn human_us(us: u64) -> String {
    match us {
        0..=9_999 => format!("{us}us"),
        10_000..=9_999_999 => format!("{:.1}ms", us as f64 / 1000.0),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_flushes_into_live() {
        let live = Arc::new(Live::default());
        {
            let mut f = Feed::new(live.clone());
            f.response(120);
            f.response(80);
            f.error();
        }
        assert_eq!(live.requests.load(Ordering::Relaxed), 2);
        assert_eq!(live.errors.load(Ordering::Relaxed), 1);
        assert_eq!(live.latency.lock().map(|h| h.max()).unwrap_or(0), 120);
        assert_eq!(human_us(950), "950us");
        assert_eq!(human_us(12_345), "12.3ms");
    }
}
