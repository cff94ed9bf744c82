//! Key invalidation across shards and across server processes sharing the
//! database: rotation sends `NOTIFY triggers_keys, 'key:<key_id>'` in its
//! transaction; one listener thread per process `LISTEN`s and forwards each
//! notice to every shard, which drops the entry from its cache. After a lost
//! connection (notices may have been missed) every shard clears its cache.

use crate::store::DbSettings;
use futures::channel::mpsc::UnboundedSender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub const CHANNEL: &str = "triggers_keys";

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

fn broadcast(shards: &[UnboundedSender<Invalidation>], msg: Invalidation) {
    for s in shards {
        let _ = s.unbounded_send(msg.clone());
    }
}

/// Starts the listener thread; it exits when `stop` is set.
pub fn start(
    settings: DbSettings,
    shards: Vec<UnboundedSender<Invalidation>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("key-invalidation".into())
        .spawn(move || {
            let mut first = true;
            while !stop.load(Ordering::Relaxed) {
                let mut client = match settings.connect() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                };
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).is_err() {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                if !first {
                    log::info!("key invalidation listener reconnected; clearing key caches");
                    broadcast(&shards, Invalidation::All);
                }
                first = false;
                'listen: while !stop.load(Ordering::Relaxed) {
                    {
                        let mut notices = client.notifications();
                        let mut iter = notices.timeout_iter(Duration::from_millis(250));
                        loop {
                            match fallible_iterator::FallibleIterator::next(&mut iter) {
                                Ok(Some(n)) => broadcast(&shards, parse(n.payload())),
                                Ok(None) => break,
                                Err(_) => break 'listen,
                            }
                        }
                    }
                    if client.is_closed() {
                        break;
                    }
                }
            }
        })
        .expect("spawn the key invalidation thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(parse("key:abc"), Invalidation::Key("abc".into()));
        assert_eq!(parse("key:"), Invalidation::All);
        assert_eq!(parse("whatever"), Invalidation::All);
    }
}
