-- A conversation turn's reply is written by the attempt that got it, just before that
-- attempt's end commits. An attempt that died in between (a killed worker, a lost lease) left
-- its reply behind; when a later attempt then ended the job failed or cancelled, the turn kept
-- a reply nobody was charged for, and later turns were built on it. When an `llm.chat` job of
-- a conversation ends failed or cancelled, its turn's reply goes: the turn reads as
-- unanswered, as every turn that ends without a reply does.
CREATE FUNCTION jobs_drop_unended_reply() RETURNS trigger AS $$
BEGIN
    DELETE FROM conversation_messages
     WHERE conversation_id = (NEW.input -> 'conversation' ->> 'id')::uuid
       AND turn = (NEW.input -> 'conversation' ->> 'turn')::int
       AND part = 1
       AND job_id = NEW.id;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

-- only the end of a conversation's turn pays for it
CREATE TRIGGER jobs_drop_unended_reply AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (NEW.kind = 'llm.chat'
          AND NEW.status IN ('failed', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.input ? 'conversation')
    EXECUTE FUNCTION jobs_drop_unended_reply();
