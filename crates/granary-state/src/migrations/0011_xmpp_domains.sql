-- Chat domains this host serves besides Granary's own domain, and which
-- users have their chat address in one of them (everyone else is
-- user@<Granary's domain>). A user has exactly one chat address.
CREATE TABLE xmpp_domains (
    domain     TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

CREATE TABLE xmpp_users (
    user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    domain  TEXT NOT NULL REFERENCES xmpp_domains(domain) ON DELETE CASCADE
) STRICT;
CREATE INDEX xmpp_users_domain ON xmpp_users(domain);
