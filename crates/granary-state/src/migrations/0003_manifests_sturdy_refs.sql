-- What the supervisor needs to run an app, and sturdy references to
-- granted capabilities.

-- The app's manifest (TOML, as installed) and whether it was installed
-- unsigned from a directory (development mode).
ALTER TABLE apps ADD COLUMN manifest TEXT NOT NULL DEFAULT '';
ALTER TABLE apps ADD COLUMN dev_mode INTEGER NOT NULL DEFAULT 0;

CREATE TABLE sturdy_refs (
    -- SHA-256 of the token; the token itself is only ever in the grain.
    token_hash  BLOB    PRIMARY KEY,
    -- The grain that saved it; only that grain may restore it.
    holder      TEXT    NOT NULL REFERENCES grains(id) ON DELETE CASCADE,
    grant_id    INTEGER NOT NULL REFERENCES grants(id) ON DELETE CASCADE,
    label       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;
CREATE INDEX sturdy_refs_grant ON sturdy_refs(grant_id);
