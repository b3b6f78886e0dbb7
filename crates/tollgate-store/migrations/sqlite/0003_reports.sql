-- Closed billing periods. Encodings as in 0001: ids are
-- canonical lowercase UUID text, closed_at is RFC 3339 UTC text with six
-- fractional digits and `Z`, period is 'YYYY-MM'.
--
-- No new index for the usage export, which pages through usage_events in
-- (ts, id) order: usage_events is WITHOUT ROWID with primary key id, so
-- every entry of its index on ts (0002) already ends in id: that index is
-- (ts, id), and SQLite uses it for `(ts, id) > (?, ?) ORDER BY ts, id`.
-- Another one would only cost writes.

-- A closed month: one row, written once. Closing inserts it and the lines
-- in one IMMEDIATE transaction, and writes lines only if this row was new.
CREATE TABLE billing_periods (
    period    TEXT NOT NULL PRIMARY KEY,
    closed_at TEXT NOT NULL
) WITHOUT ROWID;

-- The frozen lines of a closed month, as the admin computed them at
-- closing: a snapshot, so customer name and tier are copied, and there is
-- no foreign key to customers. included_requests is NULL when the tier had
-- no request quota.
CREATE TABLE billing_lines (
    period               TEXT    NOT NULL REFERENCES billing_periods (period),
    customer_id          TEXT    NOT NULL,
    customer             TEXT    NOT NULL,
    tier                 TEXT    NOT NULL,
    requests             INTEGER NOT NULL,
    included_requests    INTEGER,
    overage_requests     INTEGER NOT NULL,
    overage_charge_nanos INTEGER NOT NULL,
    metered_cost_nanos   INTEGER NOT NULL,
    total_nanos          INTEGER NOT NULL,
    PRIMARY KEY (period, customer_id)
) WITHOUT ROWID;
