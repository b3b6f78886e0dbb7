-- The webhook outbox. An event is recorded once: `dedup` names what it is
-- about (e.g. a customer's monthly_requests reaching 0.8 in 2026-12), and
-- its uniqueness is what makes an event fire exactly once across restarts.
-- `body` is the exact JSON sent and signed; `id` is its webhook-id, the
-- same on every attempt.
CREATE TABLE webhook_events (
    id         TEXT NOT NULL PRIMARY KEY,
    type       TEXT NOT NULL,
    dedup      TEXT NOT NULL UNIQUE,
    body       TEXT NOT NULL,
    created_at TEXT NOT NULL
) WITHOUT ROWID;

-- One delivery per event and endpoint; see the Postgres migration for the
-- claiming rules, which are the same here.
CREATE TABLE webhook_deliveries (
    id              TEXT    NOT NULL PRIMARY KEY,
    event_id        TEXT    NOT NULL REFERENCES webhook_events (id),
    url             TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      TEXT    NOT NULL,
    next_attempt_at TEXT,
    delivered_at    TEXT,
    UNIQUE (event_id, url)
) WITHOUT ROWID;

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
