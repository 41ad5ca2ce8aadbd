-- Domains their owners registered for their blog (besides
-- <user>.<domain>); a domain belongs to one user.
CREATE TABLE blog_domains (
    domain     TEXT PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;
