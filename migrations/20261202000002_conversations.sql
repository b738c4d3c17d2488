-- Conversations: durable chat history per tenant. Each user message is one turn (part 0); the
-- assistant reply to it is part 1 of the same turn, written by the worker that answered it.

CREATE TABLE conversations (
    id               uuid PRIMARY KEY,               -- UUIDv7
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    model            text,                           -- default model of its messages
    system           text,                           -- system prompt, always kept in context
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    context_strategy text NOT NULL DEFAULT 'drop_oldest'
                     CHECK (context_strategy IN ('drop_oldest', 'summarize')),
    -- summary of turns < summary_turn (the `summarize` strategy reuses it)
    summary          text,
    summary_turn     integer NOT NULL DEFAULT 0,
    next_turn        integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_tenant_id ON conversations (tenant_id, id DESC);

CREATE TABLE conversation_messages (
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    turn             integer NOT NULL,
    part             smallint NOT NULL CHECK (part IN (0, 1)),   -- 0 user, 1 assistant
    role             text NOT NULL,
    content          text NOT NULL,
    tool_calls       jsonb,
    job_id           uuid NOT NULL,                  -- the llm.chat job answering this turn
    attempt          integer NOT NULL DEFAULT 0,     -- the attempt that wrote a reply (fencing)
    model            text,
    usage            jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, turn, part)
);
