-- Customers, API keys and the change log the key feed polls.
--
-- Conventions (docs/STORAGE.md): ids are canonical lowercase UUID text, so text
-- order is id order; timestamps are RFC 3339 text in UTC with exactly six
-- fractional digits and `Z`, so text order is time order.

CREATE TABLE customers (
    id         TEXT NOT NULL PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    tier       TEXT NOT NULL,
    overrides  TEXT NOT NULL DEFAULT '{}',   -- JSON object
    created_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE api_keys (
    id          TEXT NOT NULL PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    digest      BLOB NOT NULL UNIQUE CHECK (length(digest) = 32),   -- BLAKE3 of the key
    prefix      TEXT NOT NULL,
    name        TEXT,
    routes      TEXT,                        -- JSON array of route names; NULL = every route
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    revoked_at  TEXT
) WITHOUT ROWID;

CREATE INDEX api_keys_prefix ON api_keys (prefix);
CREATE INDEX api_keys_customer_id ON api_keys (customer_id, id);

-- Every committed change to a key or a customer appends a row here; `watch`
-- polls it. AUTOINCREMENT keeps `seq` strictly increasing and never reused,
-- so a watcher that finds `seq` not contiguous after its last one knows rows
-- were pruned before it saw them.
CREATE TABLE change_log (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,                      -- 'key' | 'customer'
    id   TEXT NOT NULL
);

CREATE TRIGGER customers_changed_insert AFTER INSERT ON customers
BEGIN
    INSERT INTO change_log (kind, id) VALUES ('customer', NEW.id);
END;

CREATE TRIGGER customers_changed_update AFTER UPDATE ON customers
BEGIN
    INSERT INTO change_log (kind, id) VALUES ('customer', NEW.id);
END;

CREATE TRIGGER api_keys_changed_insert AFTER INSERT ON api_keys
BEGIN
    INSERT INTO change_log (kind, id) VALUES ('key', NEW.id);
END;

CREATE TRIGGER api_keys_changed_update AFTER UPDATE ON api_keys
BEGIN
    INSERT INTO change_log (kind, id) VALUES ('key', NEW.id);
END;
