-- Domains this host receives mail for. Every user has user@domain on
-- each; mail to an address nobody has goes to the domain's catch-all user
-- when it has one, and is refused at RCPT otherwise.
CREATE TABLE mail_domains (
    domain            TEXT PRIMARY KEY,
    catch_all_user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
    created_at        INTEGER NOT NULL DEFAULT (unixepoch())
) STRICT;

-- Extra addresses that deliver to one user: local@domain, lowercase.
CREATE TABLE mail_aliases (
    local      TEXT NOT NULL,
    domain     TEXT NOT NULL REFERENCES mail_domains(domain) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    PRIMARY KEY (local, domain)
) STRICT;
CREATE INDEX mail_aliases_user ON mail_aliases(user_id);
