-- Invites (`granary invite create`): a link that lets a friend make an
-- account here. The token is a bearer secret: only its SHA-256 is kept.
-- `kind` is 'account' (a new user) or 'contact' (a new user who becomes
-- the inviter's contact, both ways). An invite is valid while it is not
-- revoked, not expired and used fewer than `max_uses` times; each use is
-- recorded with the account it made. Ids are never reused.
CREATE TABLE invites (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    hash       BLOB NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('account', 'contact')),
    inviter_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    max_uses   INTEGER NOT NULL CHECK (max_uses > 0),
    uses       INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    CHECK (kind = 'account' OR inviter_id IS NOT NULL)
) STRICT;

CREATE TABLE invite_uses (
    invite_id INTEGER NOT NULL REFERENCES invites(id) ON DELETE CASCADE,
    user      TEXT NOT NULL,
    used_at   INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;
CREATE INDEX invite_uses_invite ON invite_uses(invite_id);
