-- Usage rows (docs/STORAGE.md) and their daily rollup.
--
-- Same columns as in Postgres. Encodings as in 0001: ids are canonical
-- lowercase UUID text, ts is RFC 3339 UTC text with six fractional digits
-- and `Z` (so text order is time order), day is `YYYY-MM-DD`.
--
-- WITHOUT ROWID: usage ids are UUID v7, so rows are appended in id order to
-- one B-tree instead of a rowid table plus an index on id.
--
-- No foreign keys to customers or api_keys, on purpose: usage rows must be
-- writable whatever order they arrive in, and a check per row would cost
-- an index probe per row on the hottest write path.

CREATE TABLE usage_events (
    id                  TEXT    NOT NULL PRIMARY KEY,
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
    cost_source         TEXT    NOT NULL
) WITHOUT ROWID;

-- Exports read a time range, and ts grows with insertion order, so this
-- index is appended to. No index on (customer_id, ts): per-customer figures
-- come from usage_daily, and its inserts would land all over the index.
CREATE INDEX usage_events_ts ON usage_events (ts);

-- One row per UTC day × customer × key × route × model, updated in the same
-- transaction as the rows it counts, for rows actually inserted only.
-- `model` is '' (not NULL) for rows without a model, so that it can be part
-- of the primary key and the ON CONFLICT target.
-- `requests` counts admitted rows, `rejected` rows refused by a limit,
-- `errors` admitted rows with outcome upstream_error or upstream_timeout or
-- status >= 500; the other columns are sums over all rows of the group.
CREATE TABLE usage_daily (
    day                TEXT    NOT NULL,
    customer_id        TEXT    NOT NULL,
    key_id             TEXT    NOT NULL,
    route              TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    requests           INTEGER NOT NULL,
    rejected           INTEGER NOT NULL,
    errors             INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    request_bytes      INTEGER NOT NULL,
    response_bytes     INTEGER NOT NULL,
    cost_nanos         INTEGER NOT NULL,
    PRIMARY KEY (day, customer_id, key_id, route, model)
) WITHOUT ROWID;

CREATE INDEX usage_daily_customer_day ON usage_daily (customer_id, day);
