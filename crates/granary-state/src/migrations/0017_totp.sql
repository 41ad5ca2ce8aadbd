-- The second factor of the web home's sign-in (RFC 6238 TOTP). The secret
-- is stored sealed (AES-256-GCM under a key file outside this database,
-- bound to the user's name); `last_step` is the newest time step accepted,
-- so a code is good once. Recovery codes are random (80 bits) and stored
-- as their SHA-256, each good once.
CREATE TABLE totp (
    user_id    INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    sealed     BLOB    NOT NULL,
    last_step  INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

CREATE TABLE totp_recovery (
    id      INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash    BLOB    NOT NULL UNIQUE,
    used_at INTEGER
) STRICT;
CREATE INDEX totp_recovery_user ON totp_recovery(user_id);
