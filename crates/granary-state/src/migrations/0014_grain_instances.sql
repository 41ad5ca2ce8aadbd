-- Grains of which a user may own several, each named by an instance (chat
-- rooms: alice-room--family). The one-per-user-and-kind rule becomes one
-- per user, kind and instance ('' for the ordinary grain), and an instance
-- name is unique within its kind, so a room's address finds one grain.
--
-- SQLite cannot change a table's constraints in place: the table is made
-- again, the documented way. This migration runs with foreign keys off (a
-- DROP would otherwise delete every grant and sturdy ref through their
-- cascades); the migration code checks them before it commits.
CREATE TABLE grains_new (
    id          TEXT    PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
    kind        TEXT    NOT NULL REFERENCES apps(kind) ON DELETE RESTRICT,
    instance    TEXT    NOT NULL DEFAULT '',
    -- The host uid the grain runs as; never shared between grains.
    host_uid    INTEGER NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL DEFAULT (unixepoch()),
    app_version TEXT    NOT NULL DEFAULT '',
    UNIQUE (user_id, kind, instance)
) STRICT;

INSERT INTO grains_new (id, user_id, kind, host_uid, created_at, app_version)
    SELECT id, user_id, kind, host_uid, created_at, app_version FROM grains;
DROP TABLE grains;
ALTER TABLE grains_new RENAME TO grains;

CREATE UNIQUE INDEX grains_kind_instance ON grains (kind, instance) WHERE instance <> '';
