//! The Redis key schema. Every multi-key script touches keys of one hash tag (one Cluster slot).
//!
//! | key | type | what |
//! |---|---|---|
//! | `{P:q:<queue>}:p<prio>` | stream | ready jobs of a queue at a priority (group `workers`) |
//! | `{P:q:<queue>}:delayed` | zset | jobs waiting for `run_at` (score = ms), member `<id>:<tenant>:<prio>` |
//! | `{P:q:<queue>}:t:<tenant>:p<prio>` | (reserved) | per-tenant lanes for the fairness issue |
//! | `{P:job:<id>}:ev` | stream | live events of a job, entry id `<seq>-0`, field `e` = event JSON |
//! | `{P:job:<id>}:meta` | hash | `attempt`: highest attempt seen (fences stale publishers) |
//! | `P:evch:<id>` | pub/sub | live events of a job (one SUBSCRIBE per watched job per API process) |
//! | `P:cancel` | pub/sub | job ids whose cancellation was requested |
//! | `{P:meta}:epoch` | string | Redis epoch; its absence means Redis lost its data |
//! | `{P:q:<queue>}:epoch` | string | the epoch the queue's slot was marked in (a shard's own data loss) |
//! | `{P:meta}:marked` | hash | queue → the epoch its slot was last marked in |
//! | `{P:meta}:reclaims` | hash | deliveries reclaimed after an expired lease, per queue |
//! | `{P:quota:<tenant>}:rpm` | string | the tenant's request-rate state (GCRA theoretical arrival time, µs) |
//! | `{P:quota:<tenant>}:day:<YYYYMMDD>` | hash | the tenant's use that UTC day: `tokens`, `cpu_ms` |
//!
//! `P` is the configured prefix (`sy` by default; tests use a unique one each).

use uuid::Uuid;

/// Consumer group of every queue stream.
pub const GROUP: &str = "workers";
/// Job priorities, lowest first (one stream each; workers read the highest with work first).
pub const PRIORITIES: [i16; 10] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: std::sync::Arc<str>,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn stream(&self, queue: &str, priority: i16) -> String {
        format!("{{{}:q:{queue}}}:p{priority}", self.prefix)
    }

    /// The queue's key base `{P:q:<queue>}` (its hash tag: every key below shares a slot).
    pub fn queue_base(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}", self.prefix)
    }

    /// Per-tenant counters of the queue (see `fair.rs`).
    pub fn fair(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}:fair", self.prefix)
    }

    /// The queue's limits and tenant weights (see `fair.rs`).
    pub fn limits(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}:limits", self.prefix)
    }

    /// Rung when entries move into the queue's streams; idle workers wait on it.
    pub fn bell(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}:bell", self.prefix)
    }

    pub fn delayed(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}:delayed", self.prefix)
    }

    pub fn events(&self, job: Uuid) -> String {
        format!("{{{}:job:{job}}}:ev", self.prefix)
    }

    pub fn event_meta(&self, job: Uuid) -> String {
        format!("{{{}:job:{job}}}:meta", self.prefix)
    }

    pub fn event_channel(&self, job: Uuid) -> String {
        format!("{}:evch:{job}", self.prefix)
    }

    pub fn event_channel_prefix(&self) -> String {
        format!("{}:evch:", self.prefix)
    }

    /// Announces that credentials or tenant settings changed (a revoked key): every API
    /// replica drops its cached lookups at once instead of when they expire.
    pub fn credentials_channel(&self) -> String {
        format!("{}:credentials", self.prefix)
    }

    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.prefix)
    }

    /// A cached LLM response of one tenant (`hash` = SHA-256 of the request).
    pub fn llm_cache(&self, tenant: Uuid, hash: &str) -> String {
        format!("{{{}:cache:{tenant}}}:{hash}", self.prefix)
    }

    /// The single-flight lock of one cached request (same slot as the entry).
    pub fn llm_cache_lock(&self, tenant: Uuid, hash: &str) -> String {
        format!("{{{}:cache:{tenant}}}:{hash}:lock", self.prefix)
    }

    /// `code.exec` counters written by workers (`runs|<tier>|<language>|<outcome>`,
    /// `run_ms|<tier>|<language>`, `start_ms|<tier>|<language>`), read by `/metrics`.
    pub fn code_stats(&self) -> String {
        format!("{{{}:meta}}:code", self.prefix)
    }

    /// Warm gVisor sandboxes per worker: field `<worker>|<language>`, value `<n>|<unix s>`.
    pub fn code_pool(&self) -> String {
        format!("{{{}:meta}}:code_pool", self.prefix)
    }

    /// Cache counters (`hits`, `misses`, `shared`), read by every API's `/metrics`.
    pub fn llm_cache_stats(&self) -> String {
        format!("{{{}:meta}}:llm_cache", self.prefix)
    }

    /// A tenant's request-rate state (GCRA).
    pub fn quota_rate(&self, tenant: Uuid) -> String {
        format!("{{{}:quota:{tenant}}}:rpm", self.prefix)
    }

    /// A tenant's use on one UTC day (`day` = `YYYYMMDD`).
    pub fn quota_day(&self, tenant: Uuid, day: &str) -> String {
        format!("{{{}:quota:{tenant}}}:day:{day}", self.prefix)
    }

    /// Deliveries reclaimed from workers whose lease expired, per queue (read by `/metrics`).
    pub fn reclaims(&self) -> String {
        format!("{{{}:meta}}:reclaims", self.prefix)
    }

    /// Every queue that jobs were dispatched to or workers serve (the kinds' queues and named
    /// ones): what the scheduler and `/metrics` walk.
    pub fn queues(&self) -> String {
        format!("{{{}:meta}}:queues", self.prefix)
    }

    /// Which tenant named each named queue first (`queue` → tenant id): the API's
    /// `max_named_queues_per_tenant` counts them.
    pub fn queue_owners(&self) -> String {
        format!("{{{}:meta}}:queue_owners", self.prefix)
    }

    /// Live workers' reports (`id` → JSON), read by `GET /v1/workers`.
    pub fn workers(&self) -> String {
        format!("{{{}:meta}}:workers", self.prefix)
    }

    pub fn epoch(&self) -> String {
        format!("{{{}:meta}}:epoch", self.prefix)
    }

    /// The epoch a queue's slot was marked in: on a Redis Cluster a shard can lose its data
    /// while `{P:meta}` survives on another one; a marker gone missing tells the scheduler.
    pub fn queue_epoch(&self, queue: &str) -> String {
        format!("{{{}:q:{queue}}}:epoch", self.prefix)
    }

    /// Queue → the epoch the scheduler last marked its slot in.
    pub fn queue_marks(&self) -> String {
        format!("{{{}:meta}}:marked", self.prefix)
    }
}

/// The hash tag of a key (the part Redis Cluster hashes).
pub fn hash_tag(key: &str) -> &str {
    if let Some(start) = key.find('{') {
        if let Some(len) = key[start + 1..].find('}') {
            if len > 0 {
                return &key[start + 1..start + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_script_share_a_slot() {
        let k = Keys::new("sy");
        assert_eq!(hash_tag(&k.stream("llm", 0)), hash_tag(&k.delayed("llm")));
        let id = Uuid::now_v7();
        assert_eq!(hash_tag(&k.events(id)), hash_tag(&k.event_meta(id)));
        assert_ne!(
            hash_tag(&k.stream("llm", 0)),
            hash_tag(&k.stream("system", 0))
        );
        assert_eq!(k.stream("llm", 0), "{sy:q:llm}:p0");
    }
}
