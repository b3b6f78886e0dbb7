-- Usage rows (docs/STORAGE.md) and their daily rollup.
--
-- usage_events is range-partitioned by month on ts, one partition per UTC
-- month named usage_events_YYYY_MM. The gateway creates them ahead of time
-- (at migrate: the current month and the next two) and before writing a
-- batch that holds a month it has not ensured yet, through
-- tollgate_ensure_usage_partition below. There is deliberately no DEFAULT
-- partition: rows always land in their month, old months can be detached
-- or dropped whole, and attaching a month never has to scan a default.
--
-- The primary key must contain the partition key, hence (id, ts). Ids are
-- still unique in practice: a replayed row carries the ts of its first
-- write (the spool stores the row, not the request), so (id, ts) catches
-- replays: the writer's COPY fails on it, and its fallback's
-- ON CONFLICT DO NOTHING skips them.
--
-- No foreign keys to customers or api_keys, on purpose: usage rows must be
-- writable whatever order they reach the database in (a replayed spool may
-- precede a restored customer), and a foreign-key check per row would cost
-- an index probe per row on the hottest write path.
--
-- No CHECK constraints on outcome or cost_source either: only the writer,
-- which takes them from enums, fills these columns, and a rejected batch
-- would be stuck in the spool.

CREATE TABLE usage_events (
    id                  uuid        NOT NULL,
    client_request_id   text,
    ts                  timestamptz NOT NULL,
    customer_id         uuid        NOT NULL,
    key_id              uuid        NOT NULL,
    instance            text        NOT NULL,
    route               text        NOT NULL,
    method              text        NOT NULL,
    path                text        NOT NULL,
    status              integer     NOT NULL,
    outcome             text        NOT NULL,
    latency_us          bigint      NOT NULL,
    upstream_latency_us bigint      NOT NULL,
    request_bytes       bigint      NOT NULL,
    response_bytes      bigint      NOT NULL,
    model               text,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    cache_read_tokens   bigint      NOT NULL,
    cache_write_tokens  bigint      NOT NULL,
    cost_nanos          bigint      NOT NULL,
    cost_source         text        NOT NULL,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

-- Exports read a time range. ts grows with insertion order, so a BRIN index
-- (a few pages per partition) narrows a range to the blocks holding it, at
-- almost no cost per insert. There is deliberately no b-tree on
-- (customer_id, ts): every per-customer figure is served by usage_daily,
-- and that index, whose inserts land on a page per customer, cost a quarter
-- of the write throughput (benches/usage_write.rs).
CREATE INDEX usage_events_ts ON usage_events USING brin (ts) WITH (autosummarize = on);

-- One row per UTC day × customer × key × route × model, kept consistent with
-- usage_events by the same transaction that inserts the rows: only rows
-- actually inserted are added, so replays never double count.
-- `model` is '' (not NULL) for rows without a model, so that it can be part
-- of the primary key and the ON CONFLICT target. `route` and `model` compare
-- bytewise (COLLATE "C"): cheaper than a linguistic collation in the key
-- every upsert searches, and the order the writer sorts groups in, so that
-- every writer locks groups in the same order.
-- Every batch updates many rows in place; fillfactor 70 leaves room on each
-- page for the new versions, so that updates stay HOT (no index entry per
-- update). It makes the rollup a third cheaper.
-- `requests` counts admitted rows, `rejected` rows refused by a limit
-- (rate_limited, quota_exceeded, budget_exceeded, route_forbidden,
-- payload_too_large), `errors` admitted rows with outcome upstream_error or
-- upstream_timeout or status >= 500; the other columns are sums over all
-- rows of the group, rejected ones included.
CREATE TABLE usage_daily (
    day                date   NOT NULL,
    customer_id        uuid   NOT NULL,
    key_id             uuid   NOT NULL,
    route              text   COLLATE "C" NOT NULL,
    model              text   COLLATE "C" NOT NULL,
    requests           bigint NOT NULL,
    rejected           bigint NOT NULL,
    errors             bigint NOT NULL,
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cache_read_tokens  bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    request_bytes      bigint NOT NULL,
    response_bytes     bigint NOT NULL,
    cost_nanos         bigint NOT NULL,
    PRIMARY KEY (day, customer_id, key_id, route, model)
) WITH (fillfactor = 70);

-- Per-customer reports over a date range.
CREATE INDEX usage_daily_customer_day ON usage_daily (customer_id, day);

-- Makes sure the partition of usage_events for the UTC month containing
-- `month` exists; returns whether this call created it. Safe to call from
-- any number of sessions at once (they queue on an advisory lock) and
-- usable by hand, e.g. to create partitions further ahead.
--
-- The partition is created as a plain table and then attached, rather than
-- with CREATE TABLE ... PARTITION OF: attaching needs only a SHARE UPDATE
-- EXCLUSIVE lock on usage_events, so it neither waits for nor blocks the
-- readers and writers of the table (PARTITION OF takes ACCESS EXCLUSIVE,
-- which would queue every write behind a long export). Attaching creates the
-- partition's copies of the primary key and the indexes. A lock wait is
-- bounded by lock_timeout (5 s), after which the caller sees an error and
-- retries later.
CREATE FUNCTION tollgate_ensure_usage_partition(month date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    first_day  date := date_trunc('month', month)::date;
    next_day   date := (date_trunc('month', month) + interval '1 month')::date;
    table_name text := 'usage_events_' || to_char(first_day, 'YYYY_MM');
BEGIN
    PERFORM set_config('lock_timeout', '5s', true);
    -- "tgpartn\0" in ASCII; distinct from the migration lock.
    PERFORM pg_advisory_xact_lock(8387796394835209728);
    IF EXISTS (
        SELECT 1 FROM pg_inherits
        WHERE inhparent = 'usage_events'::regclass
          AND inhrelid = to_regclass(quote_ident(table_name))
    ) THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE IF NOT EXISTS %I (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
        table_name);
    EXECUTE format(
        'ALTER TABLE usage_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        table_name,
        to_char(first_day, 'YYYY-MM-DD') || ' 00:00:00+00',
        to_char(next_day, 'YYYY-MM-DD') || ' 00:00:00+00');
    RETURN true;
END;
$$;
