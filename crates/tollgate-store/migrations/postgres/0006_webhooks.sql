-- The webhook outbox. An event is recorded once: `dedup` names what it is
-- about (e.g. a customer's monthly_requests reaching 0.8 in 2026-12), and
-- its uniqueness is what makes an event fire exactly once across every
-- instance and restart. `body` is the exact JSON sent and signed; `id` is
-- its webhook-id, the same on every attempt.
CREATE TABLE webhook_events (
    id         uuid        PRIMARY KEY,
    type       text        NOT NULL,
    dedup      text        NOT NULL CONSTRAINT webhook_events_dedup_unique UNIQUE,
    body       text        NOT NULL,
    created_at timestamptz NOT NULL
);

-- One delivery per event and endpoint. A pending delivery is due at
-- `next_attempt_at`; a sender claims it by moving that time past the
-- attempt's deadline (so a sender that dies mid-attempt leaves it due
-- again, for any instance) and settles it after: delivered, pending with
-- the next back-off, or failed once 24 hours have passed.
CREATE TABLE webhook_deliveries (
    id              uuid        PRIMARY KEY,
    event_id        uuid        NOT NULL REFERENCES webhook_events (id),
    url             text        NOT NULL,
    status          text        NOT NULL
                    CONSTRAINT webhook_deliveries_status CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL,
    next_attempt_at timestamptz,
    delivered_at    timestamptz,
    CONSTRAINT webhook_deliveries_event_url UNIQUE (event_id, url)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
