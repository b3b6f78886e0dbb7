-- One b-tree on usage_events instead of two: the primary key becomes
-- (ts, id), and the index usage_events_ts_id (migration 3), which had the
-- same columns in the same order, is dropped.
--
-- The key's columns are unchanged, so what it refuses is unchanged: a
-- replayed row carries the ts of its first write, and (ts, id) catches it
-- exactly as (id, ts) did (the writer's COPY fails on it, its fallback's
-- ON CONFLICT DO NOTHING skips it). In (ts, id) order it also serves the
-- export's keyset, `(ts, id) > (…) ORDER BY ts, id`, exactly as the index
-- did, so the export keeps its (ts, id) order (docs/ADMIN-API.md). Only a
-- lookup by id without ts loses its index: nothing in Tollgate makes one,
-- and by hand one narrows it by ts (docs/STORAGE.md).
--
-- Every row cost an entry in each of the two b-trees, most of what
-- Postgres spent on a row beyond the COPY itself; now it costs one
-- (benches/usage_write.rs).
--
-- The slow part, building the new key of each partition over its rows, is
-- done first, with CREATE UNIQUE INDEX: that takes a SHARE lock (writes
-- wait, reads do not) for as long as the builds take. Only then is the old
-- key swapped for the new one, under an ACCESS EXCLUSIVE lock that takes
-- milliseconds: each partition's new index becomes its primary key, and
-- the parent's new primary key adopts them instead of building them again.
-- A partition that is not a plain table (partitioned again by hand) is left
-- to the parent's ADD PRIMARY KEY, which builds its key then.

DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT i.inhrelid::regclass FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_events'::regclass AND c.relkind = 'r'
    LOOP
        EXECUTE format('CREATE UNIQUE INDEX %I ON %s (ts, id)',
            'usage_events_key_' || part::oid, part);
    END LOOP;
END;
$$;

ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey;

-- Each partition's primary key takes the name Postgres gives the key of a
-- partition it attaches (as tollgate_ensure_usage_partition does):
-- <partition>_pkey.
DO $$
DECLARE
    part regclass;
    name text;
BEGIN
    FOR part, name IN
        SELECT i.inhrelid::regclass, c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_events'::regclass AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I',
            part, name || '_pkey', 'usage_events_key_' || part::oid);
    END LOOP;
END;
$$;

ALTER TABLE usage_events ADD CONSTRAINT usage_events_pkey PRIMARY KEY (ts, id);
DROP INDEX usage_events_ts_id;
