//! Supervision of the server's worker threads (query workers, verifiers,
//! the persistence writers, the key-invalidation listener): a panic in one
//! job is caught where the thread runs it ([`catch`]), counted per pool
//! (`triggers_worker_panics_total{pool=...}`), logged as one error line
//! naming the pool and the code location (never the panic message, which
//! may hold payload or secrets), and the thread goes on with its next job.
//! The job's reply channel is dropped by the unwinding, so whoever waited
//! on it sees the job fail (the API answers 500 `internal_error`).
//!
//! Debug builds only: `TRIGGERS_DEBUG_PANIC_ON=query,verify` makes every
//! worker of the named pools panic on its first job ([`debug_panic_armed`]),
//! for the tests of this supervision. Release builds have no such hook.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Once;

/// The pools with their own series; any other name counts as `other`.
const POOLS: [&str; 5] = ["query", "verify", "persist", "invalidation", "other"];

static PANICS: [AtomicU64; POOLS.len()] = [const { AtomicU64::new(0) }; POOLS.len()];

thread_local! {
    /// Set while this thread runs a job inside [`catch`].
    static SUPERVISED: Cell<bool> = const { Cell::new(false) };
    /// Where the last supervised panic on this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn slot(pool: &str) -> usize {
    POOLS
        .iter()
        .position(|&p| p == pool)
        .unwrap_or(POOLS.len() - 1)
}

/// Counts one caught panic of a worker of `pool`.
pub fn count_panic(pool: &'static str) {
    PANICS[slot(pool)].fetch_add(1, Relaxed);
}

/// Panics caught so far in `pool`.
pub fn panics(pool: &str) -> u64 {
    PANICS[slot(pool)].load(Relaxed)
}

/// Installs (once) a panic hook that, for panics inside [`catch`], only
/// notes the location: `catch` logs the one line. Other panics go to the
/// hook that was there before.
fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if SUPERVISED.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                LOCATION.with(|l| *l.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f` on this worker thread, catching a panic: `None` when it
/// panicked (counted for `pool` and logged once). What `f` owned, its reply
/// channel included, is dropped by the unwinding.
pub fn catch<R>(pool: &'static str, f: impl FnOnce() -> R) -> Option<R> {
    install_hook();
    let outer = SUPERVISED.with(|s| s.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    SUPERVISED.with(|s| s.set(outer));
    match result {
        Ok(r) => Some(r),
        Err(payload) => {
            // The payload may own anything the job held: dropped here,
            // never printed.
            drop(payload);
            count_panic(pool);
            let at = LOCATION
                .with(|l| l.borrow_mut().take())
                .unwrap_or_else(|| "an unknown location".into());
            log::error!(
                "a {pool} worker job panicked at {at}; the job failed, the worker goes on \
                 (triggers_worker_panics_total{{pool=\"{pool}\"}})"
            );
            None
        }
    }
}

/// Whether the workers of `pool` are to panic on their first job
/// (`TRIGGERS_DEBUG_PANIC_ON`, a comma-separated list of pools). Debug
/// builds only: tests of supervision.
#[cfg(debug_assertions)]
pub fn debug_panic_armed(pool: &str) -> bool {
    std::env::var("TRIGGERS_DEBUG_PANIC_ON").is_ok_and(|v| v.split(',').any(|p| p.trim() == pool))
}

/// `triggers_worker_panics_total`, one series per pool.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP triggers_worker_panics_total Panics caught in worker jobs, by pool (the job failed, the thread went on)."
    );
    let _ = writeln!(out, "# TYPE triggers_worker_panics_total counter");
    for (i, pool) in POOLS.iter().enumerate() {
        let _ = writeln!(
            out,
            "triggers_worker_panics_total{{pool=\"{pool}\"}} {}",
            PANICS[i].load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_counted_and_drops_what_the_job_owned() {
        let before = panics("other");
        let (tx, rx) = futures::channel::oneshot::channel::<u32>();
        let r = catch("test-pool", move || {
            let _owned = tx;
            panic!("secret payload");
        });
        assert_eq!(r, None::<()>);
        assert_eq!(panics("other"), before + 1);
        // The reply channel went with the job: its receiver sees it cancelled.
        assert!(futures::executor::block_on(rx).is_err());
        assert_eq!(catch("test-pool", || 7), Some(7));
        assert_eq!(panics("other"), before + 1);
        let mut text = String::new();
        render(&mut text);
        assert!(text.contains("triggers_worker_panics_total{pool=\"query\"} "));
        assert!(text.contains(&format!(
            "triggers_worker_panics_total{{pool=\"other\"}} {}",
            panics("other")
        )));
    }
}
