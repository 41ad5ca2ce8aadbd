-- Taskwarrior sync. A TaskChampion client id (Taskwarrior 3) is a bearer
-- secret: only its SHA-256 is kept, looked up on every request. A taskd
-- certificate (Taskwarrior 2.6) is known by the SHA-256 of its DER and
-- carries the key the client names in each request. Ids are never reused
-- (AUTOINCREMENT): the tasks grain keeps a task list per client id, and a
-- revoked one's list must not come back for a new id.
CREATE TABLE task_clients (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    label        TEXT NOT NULL DEFAULT '',
    hash         BLOB NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL DEFAULT (unixepoch()),
    last_used_at INTEGER
) STRICT;
CREATE INDEX task_clients_user ON task_clients(user_id);

CREATE TABLE task_certs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    label       TEXT NOT NULL DEFAULT '',
    key         TEXT NOT NULL UNIQUE,
    fingerprint BLOB NOT NULL UNIQUE,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;
CREATE INDEX task_certs_user ON task_certs(user_id);
