-- Git repositories their owner made public: they clone without
-- authentication (pushing always needs the owner). Private is the default,
-- so only public ones are listed.
CREATE TABLE public_repos (
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    repo       TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (unixepoch()),
    PRIMARY KEY (user_id, repo)
) STRICT;
