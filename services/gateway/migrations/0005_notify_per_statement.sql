-- One pg_notify per statement instead of one per captured row. The row trigger used to call
-- pg_notify for every row it captured; PostgreSQL folds identical payloads, but each call still
-- searches the transaction's pending notifications, which a bulk statement pays for every row.
-- A statement-level AFTER trigger now notifies once per INSERT, UPDATE or DELETE statement on a
-- captured table (a statement that changed no row notifies too: the relay's pass finds nothing,
-- which is harmless). The notification is sent at commit, as before, so the relay never wakes
-- for rows it cannot see yet.
--
-- The row trigger also stops serialising the row twice and skips herald.visible() when every
-- column is captured, and herald.visible() picks the exposed keys in a loop instead of
-- rebuilding the object through jsonb_each (a SQL function that is never inlined here): the
-- same object, at less than half the cost per row.

CREATE OR REPLACE FUNCTION herald.visible(row_json jsonb, columns text[]) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    shown  jsonb := '{}'::jsonb;
    column_name text;
BEGIN
    IF row_json IS NULL OR columns IS NULL THEN
        RETURN row_json;
    END IF;
    FOREACH column_name IN ARRAY columns LOOP
        IF row_json ? column_name THEN
            shown := shown || jsonb_build_object(column_name, row_json -> column_name);
        END IF;
    END LOOP;
    RETURN shown;
END
$$;

CREATE OR REPLACE FUNCTION herald.notify_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION herald.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    entity     text := TG_ARGV[0];
    key_column text := TG_ARGV[1];
    columns    text[] := CASE WHEN TG_NARGS > 2 THEN TG_ARGV[2]::text[] END;
    new_json   jsonb;
    old_json   jsonb;
    after_row  jsonb;
    before_row jsonb;
    changed    text[];
    op         text;
    row_key    text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        op := 'insert';
        new_json := to_jsonb(NEW);
        row_key := new_json ->> key_column;
        after_row := CASE WHEN columns IS NULL THEN new_json
                          ELSE herald.visible(new_json, columns) END;
    ELSIF TG_OP = 'UPDATE' THEN
        op := 'update';
        new_json := to_jsonb(NEW);
        old_json := to_jsonb(OLD);
        row_key := new_json ->> key_column;
        IF columns IS NULL THEN
            after_row := new_json;
            before_row := old_json;
        ELSE
            after_row := herald.visible(new_json, columns);
            before_row := herald.visible(old_json, columns);
        END IF;
        SELECT coalesce(array_agg(a.key ORDER BY a.key), '{}')
          INTO changed
          FROM jsonb_each(after_row) AS a
         WHERE a.value IS DISTINCT FROM before_row -> a.key;
        IF cardinality(changed) = 0 THEN
            RETURN NULL;
        END IF;
    ELSE
        op := 'delete';
        old_json := to_jsonb(OLD);
        row_key := old_json ->> key_column;
        before_row := CASE WHEN columns IS NULL THEN old_json
                           ELSE herald.visible(old_json, columns) END;
    END IF;

    INSERT INTO public.herald_outbox (entity, op, key, data, before, changed, actor, traceparent)
    VALUES (entity, op, row_key, after_row, before_row, changed,
            nullif(current_setting('herald.actor', true), ''),
            nullif(current_setting('herald.traceparent', true), ''));
    -- No pg_notify here: herald_capture_notify sends one per statement.
    RETURN NULL;
END
$$;

-- `columns` NULL captures every column.
CREATE OR REPLACE FUNCTION herald.install_capture(target regclass, entity text, key_column text,
                                                  columns text[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = target AND attname = key_column
                      AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'table % has no column %', target, key_column;
    END IF;
    IF columns IS NULL THEN
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER herald_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
            'FOR EACH ROW EXECUTE FUNCTION herald.capture(%L, %L)',
            target, entity, key_column);
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER herald_capture_truncate BEFORE TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION herald.capture_truncate(%L, %L)',
            target, entity, key_column);
    ELSE
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER herald_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
            'FOR EACH ROW EXECUTE FUNCTION herald.capture(%L, %L, %L)',
            target, entity, key_column, columns::text);
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER herald_capture_truncate BEFORE TRUNCATE ON %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION herald.capture_truncate(%L, %L, %L)',
            target, entity, key_column, columns::text);
    END IF;
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER herald_capture_notify AFTER INSERT OR UPDATE OR DELETE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION herald.notify_outbox()',
        target);
END
$$;

-- The three-argument form of 0001/0002 (every column), kept for callers in SQL.
CREATE OR REPLACE FUNCTION herald.install_capture(target regclass, entity text, key_column text)
RETURNS void
LANGUAGE sql AS $$
  SELECT herald.install_capture(target, entity, key_column, NULL::text[])
$$;

-- Tables captured before this migration get their statement trigger now, so their changes keep
-- waking the relay before the gateway next re-installs the capture.
DO $$
DECLARE
    captured regclass;
BEGIN
    FOR captured IN SELECT tgrelid::regclass FROM pg_trigger
                     WHERE tgname = 'herald_capture' AND NOT tgisinternal LOOP
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER herald_capture_notify AFTER INSERT OR UPDATE OR DELETE '
            'ON %s FOR EACH STATEMENT EXECUTE FUNCTION herald.notify_outbox()',
            captured);
    END LOOP;
END
$$;
