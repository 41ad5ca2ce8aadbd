-- Installed apps, the grains that run them, and the routes owners grant
-- between grains.

CREATE TABLE apps (
    -- One installed app per grain kind.
    kind         TEXT    PRIMARY KEY,
    -- Derived from the signing key: an app id always belongs to one signer.
    app_id       TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    installed_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

CREATE TABLE grains (
    id         TEXT    PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
    kind       TEXT    NOT NULL REFERENCES apps(kind) ON DELETE RESTRICT,
    -- The host uid the grain runs as; never shared between grains.
    host_uid   INTEGER NOT NULL UNIQUE,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    UNIQUE (user_id, kind)
) STRICT;

CREATE TABLE grants (
    id          INTEGER PRIMARY KEY,
    from_grain  TEXT    NOT NULL REFERENCES grains(id) ON DELETE CASCADE,
    to_grain    TEXT    NOT NULL REFERENCES grains(id) ON DELETE CASCADE,
    -- `<interface>[:<argument>]`, e.g. `git.read:site`.
    capability  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL DEFAULT (unixepoch()),
    revoked_at  INTEGER
) STRICT;
CREATE UNIQUE INDEX grants_live ON grants(from_grain, to_grain, capability)
    WHERE revoked_at IS NULL;
