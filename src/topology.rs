//! The core plan: which cores run shards, which runs the persistence core and
//! which the delivery core, and whether threads are pinned. Computed once from
//! `[cores]` and the host's cores; shown by `--print-config`, the start-up log
//! and `GET /status`.

use crate::config::{ConfigError, CoreChoice, CoreList, CoresConfig};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorePlan {
    /// Cores of this host, as ids.
    pub host_cores: Vec<usize>,
    /// One shard per entry, in shard-id order.
    pub shards: Vec<usize>,
    pub persistence: usize,
    pub delivery: usize,
    pub pin: bool,
}

/// The ids of the cores this process may run on.
pub fn host_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if ids.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        ids = (0..n).collect();
    }
    ids.sort_unstable();
    ids
}

impl CorePlan {
    /// `auto` on 3+ cores: the last core runs persistence and delivery, every
    /// other core a shard. On 2 cores: one shard on core 0, persistence and
    /// delivery on core 1. On 1 core everything shares it.
    pub fn new(cfg: &CoresConfig, host: &[usize]) -> Result<CorePlan, ConfigError> {
        let host: Vec<usize> = host.to_vec();
        let exists = |key: &str, id: usize| -> Result<usize, ConfigError> {
            if host.contains(&id) {
                Ok(id)
            } else {
                Err(ConfigError {
                    key: key.into(),
                    value: id.to_string(),
                    reason: format!("core {id} does not exist on this host (cores {host:?})"),
                })
            }
        };
        let last = *host.last().unwrap_or(&0);
        let persistence = match &cfg.persistence {
            CoreChoice::Id(id) => exists("cores.persistence", *id)?,
            CoreChoice::Named(_) => match &cfg.shards {
                CoreList::Ids(ids) => host
                    .iter()
                    .rev()
                    .find(|c| !ids.contains(c))
                    .copied()
                    .unwrap_or(last),
                CoreList::Named(_) => last,
            },
        };
        let shards = match &cfg.shards {
            CoreList::Ids(ids) => {
                let mut seen = Vec::new();
                for &id in ids {
                    exists("cores.shards", id)?;
                    if seen.contains(&id) {
                        return Err(ConfigError {
                            key: "cores.shards".into(),
                            value: format!("{ids:?}"),
                            reason: format!("core {id} is listed twice"),
                        });
                    }
                    seen.push(id);
                }
                seen
            }
            CoreList::Named(_) => {
                let others: Vec<usize> =
                    host.iter().copied().filter(|&c| c != persistence).collect();
                if others.is_empty() {
                    vec![persistence]
                } else {
                    others
                }
            }
        };
        let delivery = match &cfg.delivery {
            CoreChoice::Id(id) => exists("cores.delivery", *id)?,
            CoreChoice::Named(_) => persistence,
        };
        Ok(CorePlan {
            host_cores: host,
            shards,
            persistence,
            delivery,
            pin: cfg.pin,
        })
    }

    /// Where query and verifier threads run: the persistence core when no
    /// shard uses it (Argon2 and database work then never preempt a shard),
    /// else unpinned.
    pub fn worker_core(&self) -> Option<usize> {
        (self.pin && !self.shards.contains(&self.persistence)).then_some(self.persistence)
    }

    /// A one-paragraph description for logs and `--print-config`.
    pub fn describe(&self) -> String {
        format!(
            "host cores {:?}; {} shard(s) on cores {:?}; persistence core {}; delivery core {}; pinning {}",
            self.host_cores,
            self.shards.len(),
            self.shards,
            self.persistence,
            self.delivery,
            if self.pin { "on" } else { "off" }
        )
    }
}

/// Pins the calling OS thread to `core` when pinning is on.
pub fn pin_current_thread(core: usize, pin: bool) {
    if pin && !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        log::warn!("could not pin thread to core {core}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(shards: CoreList) -> CoresConfig {
        CoresConfig {
            shards,
            ..CoresConfig::default()
        }
    }

    fn auto() -> CoreList {
        CoreList::Named("auto".into())
    }

    #[test]
    fn auto_plans_by_host_size() {
        let p = CorePlan::new(&cfg(auto()), &[0]).expect("1 core");
        assert_eq!(
            (p.shards.clone(), p.persistence, p.delivery),
            (vec![0], 0, 0)
        );
        let p = CorePlan::new(&cfg(auto()), &[0, 1]).expect("2 cores");
        assert_eq!(
            (p.shards.clone(), p.persistence, p.delivery),
            (vec![0], 1, 1)
        );
        let p = CorePlan::new(&cfg(auto()), &(0..8).collect::<Vec<_>>()).expect("8 cores");
        assert_eq!(p.shards, (0..7).collect::<Vec<_>>());
        assert_eq!(p.persistence, 7);
    }

    #[test]
    fn explicit_lists_are_honoured_and_checked() {
        let p = CorePlan::new(&cfg(CoreList::Ids(vec![0, 1])), &[0, 1]).expect("both");
        assert_eq!(p.shards, vec![0, 1]);
        assert_eq!(p.persistence, 1);
        let p = CorePlan::new(&cfg(CoreList::Ids(vec![1])), &[0, 1]).expect("one");
        assert_eq!(p.persistence, 0);
        let e = CorePlan::new(&cfg(CoreList::Ids(vec![0, 7])), &[0, 1]).expect_err("7");
        assert_eq!(e.key, "cores.shards");
        assert_eq!(e.value, "7");
        assert!(CorePlan::new(&cfg(CoreList::Ids(vec![0, 0])), &[0, 1]).is_err());
        let mut c = cfg(auto());
        c.persistence = CoreChoice::Id(9);
        assert_eq!(
            CorePlan::new(&c, &[0, 1]).expect_err("9").key,
            "cores.persistence"
        );
    }
}
