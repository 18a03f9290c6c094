-- Event capture: every change to a declared table writes one outbox row in the same
-- transaction, from a trigger, so changes made straight in SQL become events too.

CREATE SCHEMA IF NOT EXISTS herald;

-- PostgreSQL 15 has no uuidv7(): a random (v4) UUID whose first 48 bits are replaced by the
-- Unix time in milliseconds and whose version nibble is set to 7, so ids sort by creation time.
CREATE OR REPLACE FUNCTION herald.uuidv7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
  SELECT encode(
    set_bit(
      set_bit(
        overlay(uuid_send(gen_random_uuid())
                PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
        52, 1),
      53, 1),
    'hex')::uuid
$$;

-- `seq` is the relay's order. It is taken inside the writing transaction while that transaction
-- holds the row lock of the changed row (an AFTER ROW trigger runs before the lock is released),
-- so two events for the same row get `seq` in commit order. The relay never keeps a high-water
-- mark: a row that commits late with a small `seq` is simply found on the next pass.
CREATE TABLE IF NOT EXISTS public.herald_outbox (
    seq         bigserial PRIMARY KEY,
    id          uuid NOT NULL DEFAULT herald.uuidv7(),
    entity      text NOT NULL,
    op          text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    key         text NOT NULL,
    data        jsonb,
    before      jsonb,
    changed     text[],
    tx          bigint NOT NULL DEFAULT txid_current(),
    -- The time of the change, as close to commit as PostgreSQL tells without
    -- track_commit_timestamp (which needs a server restart to turn on).
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text,
    traceparent text
);

-- Events that cannot be published (larger than the NATS max payload) are moved here with the
-- reason, so they never block the outbox and are never lost.
CREATE TABLE IF NOT EXISTS public.herald_outbox_failed (
    LIKE public.herald_outbox,
    failed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason    text NOT NULL,
    PRIMARY KEY (seq)
);

-- The trigger body. Arguments: entity name, key column.
-- An UPDATE that changes no column writes no event: nothing happened that an observer could act
-- on, and `changed` would be empty.
CREATE OR REPLACE FUNCTION herald.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    entity     text := TG_ARGV[0];
    key_column text := TG_ARGV[1];
    after_row  jsonb;
    before_row jsonb;
    changed    text[];
    op         text;
    row_key    text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        op := 'insert';
        after_row := to_jsonb(NEW);
        row_key := after_row ->> key_column;
    ELSIF TG_OP = 'UPDATE' THEN
        op := 'update';
        after_row := to_jsonb(NEW);
        before_row := to_jsonb(OLD);
        SELECT coalesce(array_agg(a.key ORDER BY a.key), '{}')
          INTO changed
          FROM jsonb_each(after_row) AS a
         WHERE a.value IS DISTINCT FROM before_row -> a.key;
        IF cardinality(changed) = 0 THEN
            RETURN NULL;
        END IF;
        row_key := after_row ->> key_column;
    ELSE
        op := 'delete';
        before_row := to_jsonb(OLD);
        row_key := before_row ->> key_column;
    END IF;

    INSERT INTO public.herald_outbox (entity, op, key, data, before, changed, actor, traceparent)
    VALUES (entity, op, row_key, after_row, before_row, changed,
            nullif(current_setting('herald.actor', true), ''),
            nullif(current_setting('herald.traceparent', true), ''));
    -- One notification per transaction: PostgreSQL folds identical payloads together.
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END
$$;

-- Declares a table as an entity: one AFTER ROW trigger capturing inserts, updates and deletes.
-- Idempotent, so every gateway replica may run it at start.
CREATE OR REPLACE FUNCTION herald.install_capture(target regclass, entity text, key_column text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = target AND attname = key_column
                      AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'table % has no column %', target, key_column;
    END IF;
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER herald_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH ROW EXECUTE FUNCTION herald.capture(%L, %L)',
        target, entity, key_column);
END
$$;
