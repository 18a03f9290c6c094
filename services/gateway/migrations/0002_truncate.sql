-- TRUNCATE fires no row triggers, so without this a truncated table would lose its delete
-- events. A BEFORE TRUNCATE statement trigger writes one delete event per row still there.

CREATE OR REPLACE FUNCTION herald.capture_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO public.herald_outbox (entity, op, key, before, actor, traceparent) '
        'SELECT $1, ''delete'', r.j ->> $2, r.j, '
        '       nullif(current_setting(''herald.actor'', true), ''''), '
        '       nullif(current_setting(''herald.traceparent'', true), '''') '
        'FROM (SELECT to_jsonb(t) AS j FROM %s t) AS r',
        TG_RELID::regclass)
    USING TG_ARGV[0], TG_ARGV[1];
    PERFORM pg_notify('herald_outbox', '');
    RETURN NULL;
END
$$;

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
    EXECUTE format(
        'CREATE OR REPLACE TRIGGER herald_capture_truncate BEFORE TRUNCATE ON %s '
        'FOR EACH STATEMENT EXECUTE FUNCTION herald.capture_truncate(%L, %L)',
        target, entity, key_column);
END
$$;
