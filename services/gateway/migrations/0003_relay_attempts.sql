-- Failed publish attempts, per outbox row. Kept beside the outbox rather than in it so outbox
-- rows are never updated: a row's `xmin` stays its writing transaction, whose commit time the
-- relay reads as the event's `at`.
--
-- A row whose publish the server refused waits until `retry_at`, and with it every later row of
-- its key (order per key), while other keys go on. After `max_attempts` refusals the row moves
-- to `herald_outbox_failed` with a dead letter, and its key moves on.
CREATE TABLE IF NOT EXISTS public.herald_outbox_attempts (
    seq        bigint PRIMARY KEY,
    entity     text NOT NULL,
    key        text NOT NULL,
    attempts   integer NOT NULL,
    last_error text NOT NULL,
    retry_at   timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS herald_outbox_attempts_key
    ON public.herald_outbox_attempts (entity, key, retry_at);
