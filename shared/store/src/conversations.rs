//! Conversations: creation, reads with messages, cursor listing, deletion, posting a user
//! message together with the job that answers it (one transaction), and the worker's side:
//! waiting for earlier turns, reading the history, appending the reply (fenced by attempt).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::FromRow;
use uuid::Uuid;

use crate::{NewJob, Result, Scope, Store};

/// A conversation as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, FromRow, utoipa::ToSchema)]
pub struct Conversation {
    pub id: Uuid,
    pub model: Option<String>,
    pub system: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// `drop_oldest` or `summarize`.
    pub context_strategy: String,
    /// Summary of the oldest turns, kept for reuse by the `summarize` strategy.
    pub summary: Option<String>,
    /// Turns before this one are covered by `summary` (0: no summary yet).
    pub summary_turn: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Serialize, FromRow, utoipa::ToSchema)]
pub struct Message {
    pub turn: i32,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    #[schema(value_type = Option<Object>)]
    pub tool_calls: Option<Value>,
    /// The `llm.chat` job answering this turn.
    pub job_id: Uuid,
    pub model: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub usage: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// An earlier turn whose job has not finished.
#[derive(Debug, Clone, FromRow)]
pub struct PendingTurn {
    pub turn: i32,
    /// Its job runs now (under a live lease).
    pub active: bool,
    /// A queued job's due time (retry backoff).
    pub run_at: Option<DateTime<Utc>>,
}

/// Fields of a new conversation.
#[derive(Debug, Clone)]
pub struct NewConversation {
    pub model: Option<String>,
    pub system: Option<String>,
    pub metadata: Value,
    pub context_strategy: String,
}

/// An assistant reply to append.
#[derive(Debug, Clone)]
pub struct Reply {
    pub conversation_id: Uuid,
    pub turn: i32,
    pub job_id: Uuid,
    pub attempt: i32,
    pub content: String,
    pub tool_calls: Option<Value>,
    pub model: String,
    pub usage: Value,
}

const CONV_COLS: &str =
    "id, model, system, metadata, context_strategy, summary, summary_turn, created_at, updated_at";
const MSG_COLS: &str = "turn, role, content, tool_calls, job_id, model, usage, created_at";

/// What appending a turn's reply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyAppend {
    Written,
    /// The conversation no longer exists.
    ConversationGone,
    /// Another attempt owns the job (or wrote a later reply), or the job is not running.
    Fenced,
}

impl Store {
    /// A new conversation of the tenant, recording who created it.
    pub async fn create_conversation(
        &self,
        tenant_id: Uuid,
        created_by: &str,
        c: &NewConversation,
    ) -> Result<Conversation> {
        let row = sqlx::query_as::<_, Conversation>(&format!(
            "INSERT INTO conversations (id, tenant_id, model, system, metadata, context_strategy,
                created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {CONV_COLS}"
        ))
        .bind(Uuid::now_v7())
        .bind(tenant_id)
        .bind(&c.model)
        .bind(&c.system)
        .bind(&c.metadata)
        .bind(&c.context_strategy)
        .bind(created_by)
        .fetch_one(self.pool())
        .await?;
        Ok(row)
    }

    /// A conversation in the scope (`None` when missing or not visible).
    pub async fn get_conversation(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
    ) -> Result<Option<Conversation>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let out = sqlx::query_as::<_, Conversation>(&format!(
            "SELECT {CONV_COLS} FROM conversations WHERE id = $1 AND tenant_id = $2
               AND ($3::text IS NULL OR created_by = $3)"
        ))
        .bind(id)
        .bind(scope.tenant_id)
        .bind(scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Messages in conversation order (turn, then user before assistant): every message of
    /// the turns before `upto_turn` and its user message (a reply an earlier attempt wrote for
    /// `upto_turn` itself is not part of its prompt).
    pub async fn messages(&self, id: Uuid, upto_turn: i32) -> Result<Vec<Message>> {
        Ok(sqlx::query_as::<_, Message>(&format!(
            "SELECT {MSG_COLS} FROM conversation_messages
             WHERE conversation_id = $1 AND (turn < $2 OR (turn = $2 AND part = 0))
             ORDER BY turn, part"
        ))
        .bind(id)
        .bind(upto_turn)
        .fetch_all(self.pool())
        .await?)
    }

    /// Messages of turns `from_turn..=upto_turn` (the reply of `upto_turn` excluded), in order:
    /// the part of the history a summary does not cover. An earlier turn that ended without a
    /// reply (failed, cancelled) is left out: its question was never answered, and a model
    /// seeing it would answer it along with the next one. With `max_bytes`, only the newest
    /// messages whose content fits in it (the newest always), from a question on: what a
    /// prompt that drops the oldest turns first can use, without reading a long history whole.
    pub async fn messages_from(
        &self,
        id: Uuid,
        from_turn: i32,
        upto_turn: i32,
        max_bytes: Option<i64>,
    ) -> Result<Vec<Message>> {
        let mut rows = sqlx::query_as::<_, Message>(&format!(
            "SELECT {MSG_COLS} FROM (
                 SELECT *, sum(octet_length(content)) OVER (ORDER BY turn DESC, part DESC) AS newer
                 FROM conversation_messages m
                 WHERE conversation_id = $1 AND turn >= $3
                   AND (turn < $2 OR (turn = $2 AND part = 0))
                   -- an earlier question without a reply (its turn failed or was cancelled)
                   AND (turn = $2 OR part = 1 OR EXISTS (
                        SELECT 1 FROM conversation_messages r
                        WHERE r.conversation_id = m.conversation_id AND r.turn = m.turn
                          AND r.part = 1))) m
             WHERE $4::bigint IS NULL OR newer - octet_length(content) < $4
             ORDER BY turn, part"
        ))
        .bind(id)
        .bind(upto_turn)
        .bind(from_turn)
        .bind(max_bytes)
        .fetch_all(self.pool())
        .await?;
        // a reply whose question the budget left out does not open the prompt
        if max_bytes.is_some() {
            let lead = rows.iter().take_while(|m| m.role != "user").count();
            rows.drain(..lead);
        }
        Ok(rows)
    }

    /// One page of a conversation's messages: the turns after `after_turn`, at most `turns` of
    /// them and at most `max_bytes` of content (whole turns; the first turn whatever its
    /// size), and the turn to read the next page after (`None`: this was the last page).
    pub async fn messages_page(
        &self,
        tenant: Uuid,
        id: Uuid,
        after_turn: i32,
        turns: i32,
        max_bytes: i64,
    ) -> Result<(Vec<Message>, Option<i32>)> {
        let mut tx = self.tenant_tx(tenant).await?;
        // the byte budget is applied in Postgres: rows past it are never sent here
        let mut rows = sqlx::query_as::<_, Message>(&format!(
            "SELECT {MSG_COLS} FROM (
                 SELECT *, sum(octet_length(content)) OVER (ORDER BY turn, part) AS upto,
                        min(turn) OVER () AS first
                 FROM conversation_messages
                 WHERE conversation_id = $1 AND turn > $2 AND turn <= $2 + $3 + 1) m
             WHERE upto - octet_length(content) < $4 OR turn = first
             ORDER BY turn, part"
        ))
        .bind(id)
        .bind(after_turn)
        .bind(turns)
        .bind(max_bytes)
        .fetch_all(&mut *tx)
        .await?;
        let window: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_messages
             WHERE conversation_id = $1 AND turn > $2 AND turn <= $2 + $3 + 1",
        )
        .bind(id)
        .bind(after_turn)
        .bind(turns)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let cut = (rows.len() as i64) < window;
        let last = after_turn.saturating_add(turns);
        let more = rows.iter().any(|m| m.turn > last);
        rows.retain(|m| m.turn <= last);
        // the budget ended inside a turn: that turn is left to the next page, unless it is
        // the page's only one
        if cut && !more {
            if let Some(t) = rows.last().map(|m| m.turn) {
                if rows.first().is_some_and(|m| m.turn != t) {
                    let parts = rows.iter().filter(|m| m.turn == t).count();
                    if parts < self.turn_parts(id, t).await? {
                        rows.retain(|m| m.turn != t);
                    }
                }
            }
        }
        let next = (cut || more).then(|| rows.last().map_or(after_turn, |m| m.turn));
        Ok((rows, next))
    }

    /// How many messages a turn has (1 until its reply is written, then 2).
    async fn turn_parts(&self, id: Uuid, turn: i32) -> Result<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_messages WHERE conversation_id = $1 AND turn = $2",
        )
        .bind(id)
        .bind(turn)
        .fetch_one(self.pool())
        .await?;
        Ok(n.max(0) as usize)
    }

    /// Newest first; `before` is the last id of the previous page.
    pub async fn list_conversations(
        &self,
        scope: impl Into<Scope>,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Conversation>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        let out = sqlx::query_as::<_, Conversation>(&format!(
            "SELECT {CONV_COLS} FROM conversations
             WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
               AND ($4::text IS NULL OR created_by = $4)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(scope.tenant_id)
        .bind(before)
        .bind(limit)
        .bind(scope.creator)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Deletes a conversation and its messages. Returns the jobs of its turns that had not
    /// finished (the caller cancels them: nobody is left to read their replies), or `None`
    /// when there was no such conversation.
    pub async fn delete_conversation(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
    ) -> Result<Option<Vec<Uuid>>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        // the row lock waits for a post in flight, so its turn is among those read below
        let found: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE id = $1 AND tenant_id = $2
               AND ($3::text IS NULL OR created_by = $3)
             FOR UPDATE",
        )
        .bind(id)
        .bind(scope.tenant_id)
        .bind(&scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Ok(None);
        }
        // the jobs of turns without a reply that are still to run or running
        let unfinished: Vec<Uuid> = sqlx::query_scalar(
            "SELECT j.id FROM conversation_messages m JOIN jobs j ON j.id = m.job_id
             WHERE m.conversation_id = $1 AND m.part = 0
               AND NOT EXISTS (SELECT 1 FROM conversation_messages r
                               WHERE r.conversation_id = m.conversation_id
                                 AND r.turn = m.turn AND r.part = 1)
               AND j.status IN ('queued', 'running')
             ORDER BY m.turn",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        // asked to cancel in the same commit: a turn that finds its conversation gone from
        // now on ends cancelled, not failed (its worker may look before it hears of the cancel)
        sqlx::query(
            "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, now())
             WHERE id = ANY($1) AND status IN ('queued', 'running')",
        )
        .bind(&unfinished)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM conversations WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(unfinished))
    }

    /// Stores a user message as the next turn and the job answering it, atomically. `make_job`
    /// gets the turn number and builds the job. `None` when the conversation does not exist.
    pub async fn post_message(
        &self,
        scope: impl Into<Scope>,
        id: Uuid,
        content: &str,
        model: &str,
        make_job: impl FnOnce(i32) -> NewJob,
    ) -> Result<Option<(Message, NewJob)>> {
        let scope = scope.into();
        let mut tx = self.tenant_tx(scope.tenant_id).await?;
        // the row lock orders concurrent posts: turns are numbered in commit order
        let turn: Option<i32> = sqlx::query_scalar(
            "UPDATE conversations SET next_turn = next_turn + 1, updated_at = now()
             WHERE id = $1 AND tenant_id = $2 AND ($3::text IS NULL OR created_by = $3)
             RETURNING next_turn - 1",
        )
        .bind(id)
        .bind(scope.tenant_id)
        .bind(scope.creator)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(turn) = turn else {
            return Ok(None);
        };
        let job = make_job(turn);
        crate::insert::insert_jobs_with(&mut *tx, std::slice::from_ref(&job)).await?;
        let msg = sqlx::query_as::<_, Message>(&format!(
            "INSERT INTO conversation_messages (conversation_id, turn, part, role, content, job_id, model)
             VALUES ($1, $2, 0, 'user', $3, $4, $5) RETURNING {MSG_COLS}"
        ))
        .bind(id)
        .bind(turn)
        .bind(content)
        .bind(job.id)
        .bind(model)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((msg, job)))
    }

    /// Jobs of earlier turns that have not finished yet: their turn, whether one is actively
    /// running (a live lease), and when a queued one is due (`None`: now).
    pub async fn unfinished_turns_before(&self, id: Uuid, turn: i32) -> Result<Vec<PendingTurn>> {
        Ok(sqlx::query_as::<_, PendingTurn>(
            "SELECT m.turn,
                    (j.status = 'running' AND j.lease_expires_at >= now()) AS active,
                    j.run_at
             FROM conversation_messages m JOIN jobs j ON j.id = m.job_id
             WHERE m.conversation_id = $1 AND m.part = 0 AND m.turn < $2
               AND j.status IN ('queued', 'running')
             ORDER BY m.turn",
        )
        .bind(id)
        .bind(turn)
        .fetch_all(self.pool())
        .await?)
    }

    /// The conversation a worker answers in (tenant-checked).
    pub async fn conversation_for_job(
        &self,
        tenant_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Conversation>> {
        self.get_conversation(tenant_id, id).await
    }

    /// Appends (or replaces, for a newer attempt of the same job) the assistant reply of a turn.
    /// False when a newer attempt already wrote it or the conversation is gone.
    pub async fn append_reply(&self, r: &Reply) -> Result<bool> {
        Ok(self.append_reply_outcome(r).await? == ReplyAppend::Written)
    }

    /// [`Store::append_reply`], saying why nothing was written: the conversation is gone
    /// (deleted before or while the reply was written), or the run was fenced.
    pub async fn append_reply_outcome(&self, r: &Reply) -> Result<ReplyAppend> {
        // Postgres holds no NUL in text or jsonb: a model that sent one still gets its reply kept
        let (mut content, mut tool_calls) = (r.content.clone(), r.tool_calls.clone());
        switchyard_core::nul::clean_str(&mut content);
        if let Some(t) = tool_calls.as_mut() {
            switchyard_core::nul::clean_json(t);
        }
        let done = sqlx::query(
            "INSERT INTO conversation_messages
                (conversation_id, turn, part, role, content, tool_calls, job_id, attempt, model, usage)
             SELECT $1, $2, 1, 'assistant', $3, $4, $5, $6, $7, $8
             WHERE EXISTS (SELECT 1 FROM conversations WHERE id = $1)
               -- only the job's current attempt, while it runs (fencing)
               AND EXISTS (SELECT 1 FROM jobs WHERE id = $5 AND attempt = $6 AND status = 'running')
             ON CONFLICT (conversation_id, turn, part) DO UPDATE
                SET content = EXCLUDED.content, tool_calls = EXCLUDED.tool_calls,
                    attempt = EXCLUDED.attempt, model = EXCLUDED.model, usage = EXCLUDED.usage,
                    created_at = now()
                WHERE conversation_messages.job_id = EXCLUDED.job_id
                  AND conversation_messages.attempt <= EXCLUDED.attempt",
        )
        .bind(r.conversation_id)
        .bind(r.turn)
        .bind(&content)
        .bind(&tool_calls)
        .bind(r.job_id)
        .bind(r.attempt)
        .bind(&r.model)
        .bind(&r.usage)
        .execute(self.pool())
        .await;
        let done = match done {
            Ok(d) => d,
            // deleted between the EXISTS check and the insert (the messages' foreign key)
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23503") => {
                return Ok(ReplyAppend::ConversationGone)
            }
            Err(e) => return Err(e.into()),
        };
        if done.rows_affected() == 1 {
            return Ok(ReplyAppend::Written);
        }
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)")
                .bind(r.conversation_id)
                .fetch_one(self.pool())
                .await?;
        Ok(if exists {
            ReplyAppend::Fenced
        } else {
            ReplyAppend::ConversationGone
        })
    }

    /// Keeps a summary of turns before `turn` for reuse.
    pub async fn save_summary(&self, id: Uuid, summary: &str, turn: i32) -> Result<()> {
        sqlx::query(
            "UPDATE conversations SET summary = $2, summary_turn = $3
             WHERE id = $1 AND summary_turn <= $3",
        )
        .bind(id)
        .bind(summary)
        .bind(turn)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The turn a stored summary covers (turns before it).
    pub async fn summary_turn(&self, id: Uuid) -> Result<i32> {
        Ok(
            sqlx::query_scalar("SELECT summary_turn FROM conversations WHERE id = $1")
                .bind(id)
                .fetch_optional(self.pool())
                .await?
                .unwrap_or(0),
        )
    }
}
