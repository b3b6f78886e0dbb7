-- One b-tree for usage_events instead of two, as in Postgres: the table's
-- primary key becomes (ts, id), and the index on ts (0002), whose entries
-- were (ts, id), goes.
--
-- The table is WITHOUT ROWID, so its rows live in its primary key: keyed
-- by (ts, id), the rows themselves are in the export's order, and the
-- export reads `(ts, id) > (?, ?) ORDER BY ts, id` straight from the table
-- instead of from the index and then the table. Rows are inserted in
-- (ts, id) order, so they are still appended. What the key refuses is
-- what Postgres's refuses, the same (ts, id) twice: a replayed row
-- carries the ts of its first write, so replays are skipped as before.
--
-- SQLite cannot change a table's primary key in place: the rows are
-- copied into a new table, in key order, which then takes the old one's
-- name. This rewrites the table once, in this migration's transaction.

CREATE TABLE usage_events_by_ts (
    id                  TEXT    NOT NULL,
    client_request_id   TEXT,
    ts                  TEXT    NOT NULL,
    customer_id         TEXT    NOT NULL,
    key_id              TEXT    NOT NULL,
    instance            TEXT    NOT NULL,
    route               TEXT    NOT NULL,
    method              TEXT    NOT NULL,
    path                TEXT    NOT NULL,
    status              INTEGER NOT NULL,
    outcome             TEXT    NOT NULL,
    latency_us          INTEGER NOT NULL,
    upstream_latency_us INTEGER NOT NULL,
    request_bytes       INTEGER NOT NULL,
    response_bytes      INTEGER NOT NULL,
    model               TEXT,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cache_read_tokens   INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    cost_nanos          INTEGER NOT NULL,
    cost_source         TEXT    NOT NULL,
    PRIMARY KEY (ts, id)
) WITHOUT ROWID;

INSERT INTO usage_events_by_ts (
    id, client_request_id, ts, customer_id, key_id, instance, route, method, path, status,
    outcome, latency_us, upstream_latency_us, request_bytes, response_bytes, model,
    input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, cost_source)
SELECT
    id, client_request_id, ts, customer_id, key_id, instance, route, method, path, status,
    outcome, latency_us, upstream_latency_us, request_bytes, response_bytes, model,
    input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, cost_source
FROM usage_events
ORDER BY ts, id;

-- Drops usage_events_ts with it.
DROP TABLE usage_events;
ALTER TABLE usage_events_by_ts RENAME TO usage_events;
