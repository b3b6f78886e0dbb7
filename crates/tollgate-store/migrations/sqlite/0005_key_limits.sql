-- Per-key limits. A key's family is the first key of its rotation chain:
-- a key made by rotating another takes that key's family (and its limits),
-- so the limits and counters of a rotated key carry over to its successor.
-- `limits` is the key's own limits as a JSON object (NULL: none), the same
-- on every key of a family.
--
-- Filling family_id touches every key; the change-log trigger is held off
-- for it, since no key changes in any way a gateway could see.
ALTER TABLE api_keys ADD COLUMN family_id TEXT;
DROP TRIGGER api_keys_changed_update;
UPDATE api_keys SET family_id = id;
CREATE TRIGGER api_keys_changed_update AFTER UPDATE ON api_keys
BEGIN
    INSERT INTO change_log (kind, id) VALUES ('key', NEW.id);
END;
ALTER TABLE api_keys ADD COLUMN limits TEXT;

CREATE INDEX api_keys_family ON api_keys (family_id);
