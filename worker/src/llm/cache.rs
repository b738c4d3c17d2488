//! Exact-match LLM response cache in Redis, scoped per tenant: the key is the SHA-256 of the
//! request (model, prompt, limits, tools); the entry keeps the reply and the chunks it streamed
//! so a hit replays them as events. Identical concurrent requests share one provider call: the
//! first takes a short lock (extended while its call runs), the others wait for its entry.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use switchyard_core::job::{ChatMessage, LlmChatInput, ToolCall};
use switchyard_queue::Keys;
use switchyard_queue::RedisConn;
use uuid::Uuid;

use super::{ChatOutput, Usage};

/// A lock lives this long unless its holder extends it (a crashed holder frees it soon).
pub const LOCK_TTL: Duration = Duration::from_secs(10);
/// How often a holder extends its lock.
pub const LOCK_EXTEND: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// Extends the lock only if `ARGV[1]` (the job) holds it.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
/// Stores the entry (`KEYS[2]`) and releases the lock if `ARGV[1]` holds it.
const PUT: &str = r"
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1";
/// Releases the lock if `ARGV[1]` holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";
/// Takes the lock for `ARGV[1]` (for `ARGV[2]` ms) unless someone holds it; returns nothing
/// when taken, else the holder (or [`UNSERVED`]).
const TAKE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false";
/// Turns the lock `ARGV[1]` holds into the [`UNSERVED`] mark for `ARGV[3]` ms.
const MARK_UNSERVED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0";
/// What the lock holds for a while after its holder's call left no entry (it failed, or a
/// fallback model answered): identical requests then call the provider each, at once, rather
/// than take the lock one after another and each wait out the whole model chain again.
const UNSERVED: &str = "!unserved";

#[derive(Clone)]
pub struct ResponseCache {
    conn: RedisConn,
    keys: Keys,
    ttl: Duration,
    extend: Arc<redis::Script>,
    put: Arc<redis::Script>,
    release: Arc<redis::Script>,
    take: Arc<redis::Script>,
    unserved: Arc<redis::Script>,
}

/// What a cache entry holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub text: String,
    pub finish_reason: String,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The alias and provider that produced the reply.
    pub model: String,
    pub provider: String,
    /// The text deltas as they streamed.
    pub chunks: Vec<String>,
    /// The model's refusal (entries from before it have none).
    #[serde(default)]
    pub refusal: Option<String>,
}

impl Entry {
    pub fn output(&self) -> ChatOutput {
        ChatOutput {
            text: self.text.clone(),
            finish_reason: self.finish_reason.clone(),
            tool_calls: self.tool_calls.clone(),
            usage: Usage::new(self.prompt_tokens, self.completion_tokens),
            refusal: self.refusal.clone(),
        }
    }
}

/// How a lookup ended.
pub enum Lookup {
    /// The reply was cached (`shared`: another request's call produced it while we waited).
    Hit { entry: Entry, shared: bool },
    /// We hold the lock: call the provider, then [`ResponseCache::put`].
    Lead,
    /// The cache is unavailable or the leader took too long: call without caching.
    Bypass,
}

/// The request's identity: everything that shapes the reply, including what the requested
/// alias resolves to (`route`: provider, upstream model, window and reply budget; a change of
/// the model table no longer serves the old model's replies for the rest of their TTL).
pub fn fingerprint(
    input: &LlmChatInput,
    head: &[ChatMessage],
    history: &[ChatMessage],
    route: Option<&str>,
) -> String {
    let mut canonical = json!({
        "v": 1,
        "model": input.model,
        "head": head,
        "history": history,
        "max_tokens": input.max_tokens,
        "temperature": input.temperature,
        "tools": input.tools,
        "tool_choice": input.tool_choice,
    });
    // only the parameters given: a request without them keeps the fingerprint it had before
    // they existed
    if let Some(p) = input.parallel_tool_calls {
        canonical["parallel_tool_calls"] = p.into();
    }
    if let Some(r) = route {
        canonical["route"] = r.into();
    }
    if let Value::Object(extra) = serde_json::to_value(input.sampling()).unwrap_or_default() {
        if !extra.is_empty() {
            canonical["sampling"] = Value::Object(extra);
        }
    }
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

impl ResponseCache {
    pub fn new(conn: RedisConn, keys: Keys, ttl: Duration) -> Self {
        ResponseCache {
            conn,
            keys,
            ttl,
            extend: Arc::new(redis::Script::new(EXTEND)),
            put: Arc::new(redis::Script::new(PUT)),
            release: Arc::new(redis::Script::new(RELEASE)),
            take: Arc::new(redis::Script::new(TAKE)),
            unserved: Arc::new(redis::Script::new(MARK_UNSERVED)),
        }
    }

    async fn get(&self, tenant: Uuid, fp: &str) -> redis::RedisResult<Option<Entry>> {
        let raw: Option<String> = self
            .conn
            .clone()
            .get(self.keys.llm_cache(tenant, fp))
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Finds the reply, or takes the lock to produce it, or waits for the holder of the lock
    /// (at most `wait`).
    pub async fn lookup(&self, tenant: Uuid, fp: &str, job: Uuid, wait: Duration) -> Lookup {
        let started = tokio::time::Instant::now();
        let mut waited = false;
        let mut polls = 0u32;
        loop {
            match self.get(tenant, fp).await {
                Ok(Some(entry)) => {
                    self.count(if waited { "shared" } else { "hits" }).await;
                    return Lookup::Hit {
                        entry,
                        shared: waited,
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "response cache unavailable; calling the provider");
                    return Lookup::Bypass;
                }
            }
            let holder: redis::RedisResult<Option<String>> = self
                .take
                .key(self.keys.llm_cache_lock(tenant, fp))
                .arg(job.to_string())
                .arg(LOCK_TTL.as_millis() as u64)
                .invoke_async(&mut self.conn.clone())
                .await;
            match holder.as_ref().map(Option::as_deref) {
                // the last holder's call left nothing to share: call, as it did
                Ok(Some(UNSERVED)) => {
                    self.count("misses").await;
                    return Lookup::Bypass;
                }
                Ok(None) => {
                    // the previous holder stores its entry before it unlocks: look once more
                    if let Ok(Some(entry)) = self.get(tenant, fp).await {
                        self.release(tenant, fp, job).await;
                        self.count("shared").await;
                        return Lookup::Hit {
                            entry,
                            shared: true,
                        };
                    }
                    self.count("misses").await;
                    return Lookup::Lead;
                }
                Ok(Some(_)) if started.elapsed() < wait => {
                    waited = true;
                    // 20 ms, growing to 200 ms: prompt for short calls, light for long ones
                    polls += 1;
                    tokio::time::sleep(POLL.saturating_mul(polls.min(10))).await;
                }
                Ok(Some(_)) => {
                    self.count("misses").await;
                    return Lookup::Bypass;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "response cache lock failed; calling the provider");
                    return Lookup::Bypass;
                }
            }
        }
    }

    /// Keeps the lock while the call runs (only the holder can).
    pub async fn extend(&self, tenant: Uuid, fp: &str, job: Uuid) {
        let _: redis::RedisResult<i64> = self
            .extend
            .key(self.keys.llm_cache_lock(tenant, fp))
            .arg(job.to_string())
            .arg(LOCK_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await;
    }

    /// Stores the reply and releases the lock if this job still holds it (one round trip).
    pub async fn put(&self, tenant: Uuid, fp: &str, job: Uuid, entry: &Entry) {
        let Ok(raw) = serde_json::to_string(entry) else {
            return;
        };
        let r: redis::RedisResult<i64> = self
            .put
            .key(self.keys.llm_cache_lock(tenant, fp))
            .key(self.keys.llm_cache(tenant, fp))
            .arg(job.to_string())
            .arg(raw)
            .arg(self.ttl.as_secs().max(1))
            .invoke_async(&mut self.conn.clone())
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not store a cached response");
        }
    }

    /// Releases the lock without an entry (the call failed) if this job holds it: a waiter
    /// takes over.
    pub async fn release(&self, tenant: Uuid, fp: &str, job: Uuid) {
        let _: redis::RedisResult<i64> = self
            .release
            .key(self.keys.llm_cache_lock(tenant, fp))
            .arg(job.to_string())
            .invoke_async(&mut self.conn.clone())
            .await;
    }

    /// The holder's call left no entry (it failed, or a fallback answered): the lock becomes
    /// the [`UNSERVED`] mark for a lock's lifetime, so the requests waiting for it, and those
    /// arriving meanwhile, call the provider themselves instead of taking turns.
    pub async fn unserved(&self, tenant: Uuid, fp: &str, job: Uuid) {
        let _: redis::RedisResult<redis::Value> = self
            .unserved
            .key(self.keys.llm_cache_lock(tenant, fp))
            .arg(job.to_string())
            .arg(UNSERVED)
            .arg(LOCK_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await;
    }

    async fn count(&self, field: &str) {
        let _: redis::RedisResult<i64> = self
            .conn
            .clone()
            .hincr(self.keys.llm_cache_stats(), field, 1)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(extra: Value) -> LlmChatInput {
        let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn what_the_alias_resolves_to_changes_the_fingerprint() {
        let head = [ChatMessage::new("user", "hi")];
        let i = input(json!({}));
        let a = fingerprint(&i, &head, &[], Some("openai/gpt-4o/128000/4096"));
        let b = fingerprint(&i, &head, &[], Some("openai/gpt-4o-mini/128000/4096"));
        assert_ne!(a, b);
        assert_ne!(a, fingerprint(&i, &head, &[], None));
        assert_eq!(
            a,
            fingerprint(&i, &head, &[], Some("openai/gpt-4o/128000/4096"))
        );
    }

    #[test]
    fn every_sampling_parameter_changes_the_fingerprint_and_absent_ones_keep_it() {
        let head = [ChatMessage::new("user", "hi")];
        let plain = fingerprint(&input(json!({})), &head, &[], None);
        // the fingerprint a request without sampling parameters had before they existed
        let before = hex::encode(Sha256::digest(
            json!({"v": 1, "model": "m", "head": head, "history": [], "max_tokens": null,
                   "temperature": null, "tools": null, "tool_choice": null})
            .to_string()
            .as_bytes(),
        ));
        assert_eq!(plain, before);
        let variants = [
            json!({"top_p": 0.5}),
            json!({"stop": "x"}),
            json!({"seed": 7}),
            json!({"presence_penalty": 1.0}),
            json!({"frequency_penalty": -1.0}),
            json!({"response_format": {"type": "json_object"}}),
            json!({"parallel_tool_calls": false}),
        ];
        let mut seen = std::collections::HashSet::from([plain]);
        for v in variants {
            assert!(
                seen.insert(fingerprint(&input(v.clone()), &head, &[], None)),
                "{v}"
            );
        }
    }
}
