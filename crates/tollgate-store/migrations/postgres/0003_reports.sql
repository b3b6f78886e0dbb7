-- Usage exports and closed billing periods.
--
-- The export pages through usage_events in (ts, id) order with a keyset
-- cursor, so it needs a b-tree on exactly that: each page is one index
-- descent and a short forward scan, whatever the page's depth. Created on
-- the partitioned table, it is created on every partition, and on those
-- that tollgate_ensure_usage_partition attaches later. Its inserts land at
-- the right edge (ts grows with insertion), unlike the (customer_id, ts)
-- index that 0002 left out. It supersedes the BRIN index on ts, which is
-- dropped: a range scan now has a better path, and each index costs writes.
--
-- Building it takes a SHARE lock on usage_events (writes wait, reads do
-- not) for as long as the build takes on the rows already there.
CREATE INDEX usage_events_ts_id ON usage_events (ts, id);
DROP INDEX usage_events_ts;

-- A closed month: one row, written once. Its primary key is what makes
-- closing idempotent across processes: the closer inserts this row with ON
-- CONFLICT DO NOTHING and writes lines only if the insert happened; a
-- concurrent closer's insert waits on the uncommitted row, then finds it.
CREATE TABLE billing_periods (
    period    text        PRIMARY KEY CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),   -- 'YYYY-MM'
    closed_at timestamptz NOT NULL
);

-- The frozen lines of a closed month, as the admin computed them at
-- closing: a snapshot, so customer name and tier are copied, and there is
-- no foreign key to customers. Counts and money as in usage_daily
-- (nano-USD in bigint); included_requests is NULL when the tier had no
-- request quota.
CREATE TABLE billing_lines (
    period               text   NOT NULL REFERENCES billing_periods (period),
    customer_id          uuid   NOT NULL,
    customer             text   NOT NULL,
    tier                 text   NOT NULL,
    requests             bigint NOT NULL,
    included_requests    bigint,
    overage_requests     bigint NOT NULL,
    overage_charge_nanos bigint NOT NULL,
    metered_cost_nanos   bigint NOT NULL,
    total_nanos          bigint NOT NULL,
    PRIMARY KEY (period, customer_id)
);
