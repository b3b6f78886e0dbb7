-- Per-key limits. A key's family is the first key of its rotation chain:
-- a key made by rotating another takes that key's family (and its limits),
-- so the limits and counters of a rotated key carry over to its successor.
-- `limits` is the key's own limits as a JSON object (NULL: none), the same
-- on every key of a family.
--
-- Filling family_id touches every key; the change-feed trigger is held off
-- for it, since no key changes in any way a gateway could see.
ALTER TABLE api_keys ADD COLUMN family_id uuid;
ALTER TABLE api_keys DISABLE TRIGGER api_keys_changed;
UPDATE api_keys SET family_id = id;
ALTER TABLE api_keys ENABLE TRIGGER api_keys_changed;
ALTER TABLE api_keys ALTER COLUMN family_id SET NOT NULL;
ALTER TABLE api_keys ADD COLUMN limits jsonb
    CONSTRAINT api_keys_limits_object CHECK (limits IS NULL OR jsonb_typeof(limits) = 'object');

CREATE INDEX api_keys_family ON api_keys (family_id);
