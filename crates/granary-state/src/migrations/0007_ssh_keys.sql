-- Users' SSH public keys (for git over SSH): the key as `type base64`,
-- its SHA-256 fingerprint, a label. Public keys are not secrets.
CREATE TABLE ssh_keys (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key          TEXT NOT NULL UNIQUE,
    fingerprint  TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL DEFAULT (unixepoch()),
    last_used_at INTEGER
) STRICT;
CREATE INDEX ssh_keys_user ON ssh_keys(user_id);
