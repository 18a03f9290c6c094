-- Events carry only the columns the schema file exposes: a column GraphQL never shows (a
-- password hash) must not leak through `data`/`before` either. The trigger takes the exposed
-- columns as a third argument (NULL: every column, when configured so); an UPDATE that changes
-- only hidden columns is, to Herald, no change and writes no event.

CREATE OR REPLACE FUNCTION herald.visible(row_json jsonb, columns text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN row_json IS NULL OR columns IS NULL THEN row_json
    ELSE (SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb)
            FROM jsonb_each(row_json) AS e WHERE e.key = ANY(columns))
  END
$$;

CREATE OR REPLACE FUNCTION herald.capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    entity     text := TG_ARGV[0];
    key_column text := TG_ARGV[1];
    columns    text[] := CASE WHEN TG_NARGS > 2 THEN TG_ARGV[2]::text[] END;
    after_row  jsonb;
    before_row jsonb;
    changed    text[];
    op         text;
    row_key    text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        op := 'insert';
        after_row := herald.visible(to_jsonb(NEW), columns);
        row_key := to_jsonb(NEW) ->> key_column;
    ELSIF TG_OP = 'UPDATE' THEN
        op := 'update';
        after_row := herald.visible(to_jsonb(NEW), columns);
        before_row := herald.visible(to_jsonb(OLD), columns);
        SELECT coalesce(array_agg(a.key ORDER BY a.key), '{}')
          INTO changed
          FROM jsonb_each(after_row) AS a
         WHERE a.value IS DISTINCT FROM before_row -> a.key;
        IF cardinality(changed) = 0 THEN
            RETURN NULL;
        END IF;
        row_key := to_jsonb(NEW) ->> key_column;
    ELSE
        op := 'delete';
        before_row := herald.visible(to_jsonb(OLD), columns);
        row_key := to_jsonb(OLD) ->> key_column;
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

CREATE OR REPLACE FUNCTION herald.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO public.herald_outbox (entity, op, key, before, actor, traceparent) '
        'SELECT $1, ''delete'', r.j ->> $2, herald.visible(r.j, $3), '
        '       nullif(current_setting(''herald.actor'', true), ''''), '
        '       nullif(current_setting(''herald.traceparent'', true), '''') '
        'FROM (SELECT to_jsonb(t) AS j FROM %s t) AS r',
        TG_RELID::regclass)
    USING TG_ARGV[0], TG_ARGV[1], CASE WHEN TG_NARGS > 2 THEN TG_ARGV[2]::text[] END;
    PERFORM pg_notify('herald_outbox', '');
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
END
$$;
