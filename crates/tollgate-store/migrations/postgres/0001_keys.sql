-- Customers, API keys and the NOTIFY triggers the key feed listens to.

CREATE TABLE customers (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL CONSTRAINT customers_name_unique UNIQUE,
    tier       text        NOT NULL,
    overrides  jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    customer_id uuid        NOT NULL REFERENCES customers (id),
    digest      bytea       NOT NULL CONSTRAINT api_keys_digest_unique UNIQUE
                            CHECK (octet_length(digest) = 32),   -- BLAKE3 of the key
    prefix      text        NOT NULL,
    name        text,
    routes      text[],                                          -- NULL = every route
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE INDEX api_keys_prefix ON api_keys (prefix);
CREATE INDEX api_keys_customer_id ON api_keys (customer_id, id);

-- The change feed: every committed insert or update of a key or a customer
-- notifies 'tollgate_changes' with 'key:<uuid>' or 'customer:<uuid>'.
-- Postgres delivers notifications at commit, and only then.
CREATE FUNCTION tollgate_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_changes', TG_ARGV[0] || ':' || NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER customers_changed AFTER INSERT OR UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_change('customer');

CREATE TRIGGER api_keys_changed AFTER INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tollgate_notify_change('key');
