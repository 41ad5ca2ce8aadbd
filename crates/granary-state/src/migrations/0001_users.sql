-- Users, their credentials, and the audit trail.
-- Secrets are stored only as argon2id PHC strings.

PRAGMA application_id = 1196576345; -- 'GRNY'

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    -- argon2id PHC string of the account password.
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

-- Per-device passwords for protocol clients (IMAP, DAV, XMPP, git, ...),
-- each valid for one grain kind only.
CREATE TABLE app_passwords (
    id            INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind          TEXT    NOT NULL,
    label         TEXT    NOT NULL,
    password_hash TEXT    NOT NULL,
    created_at    INTEGER NOT NULL DEFAULT (unixepoch()),
    last_used_at  INTEGER
) STRICT;
CREATE INDEX app_passwords_by_user_kind ON app_passwords(user_id, kind);

-- Who did what, when. Written in the same transaction as the change it
-- describes, so the trail never claims a change that did not happen.
CREATE TABLE audit_events (
    id      INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL DEFAULT (unixepoch()),
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    subject TEXT    NOT NULL,
    detail  TEXT    NOT NULL DEFAULT ''
) STRICT;
