-- Group invites (`granary invite create --group NAME`): a new user who
-- becomes a member of a group chat, and the contact of its members.
-- `room` names the room (its grain's instance); the inviter is the room's
-- owner. The kind's CHECK changes, so the table is made again (with
-- foreign keys off, as for migration 14: invite_uses refers to it).
CREATE TABLE invites_new (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    hash       BLOB NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('account', 'contact', 'group')),
    inviter_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    room       TEXT NOT NULL DEFAULT '',
    max_uses   INTEGER NOT NULL CHECK (max_uses > 0),
    uses       INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    CHECK (kind = 'account' OR inviter_id IS NOT NULL),
    CHECK ((kind = 'group') = (room <> ''))
) STRICT;

INSERT INTO invites_new (id, hash, kind, inviter_id, max_uses, uses, created_at, expires_at, revoked_at)
    SELECT id, hash, kind, inviter_id, max_uses, uses, created_at, expires_at, revoked_at FROM invites;
-- Ids are never reused: the sequence carries over (copying rows sets it to
-- the largest id left, which forgets invites deleted with their inviter).
DELETE FROM sqlite_sequence WHERE name = 'invites_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'invites_new', seq FROM sqlite_sequence WHERE name = 'invites';
DROP TABLE invites;
ALTER TABLE invites_new RENAME TO invites;
