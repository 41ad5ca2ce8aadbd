-- The mail grain's index. Messages themselves are files (msg/<n>/<blob>),
-- written once; this database says which mailbox holds which message,
-- with its UID, flags and modification sequence.
PRAGMA user_version = 1;

CREATE TABLE mailboxes (
    id             INTEGER PRIMARY KEY,
    -- The full name, '/' between levels; INBOX is always "INBOX".
    name           TEXT NOT NULL UNIQUE,
    -- RFC 6154 role: \Sent, \Drafts, \Junk, \Trash, \Archive, or ''.
    special_use    TEXT NOT NULL DEFAULT '',
    uidvalidity    INTEGER NOT NULL,
    uidnext        INTEGER NOT NULL DEFAULT 1,
    highest_modseq INTEGER NOT NULL DEFAULT 1,
    subscribed     INTEGER NOT NULL DEFAULT 1
) STRICT;

-- One file per distinct message; copies share it.
CREATE TABLE blobs (
    -- Never reused once committed: a deleted message's file is unlinked
    -- after its transaction, when a new message could otherwise have
    -- taken its number (and so its path).
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    size          INTEGER NOT NULL,
    refs          INTEGER NOT NULL,
    -- ENVELOPE and BODYSTRUCTURE as IMAP sends them, made once.
    envelope      TEXT NOT NULL,
    bodystructure TEXT NOT NULL,
    body          TEXT NOT NULL,
    -- RFC 5322 Date, unix seconds (0: none); for SEARCH SENTBEFORE etc.
    sent_date     INTEGER NOT NULL DEFAULT 0,
    -- How the junk filter was trained on it: 0 not, 1 ham, 2 spam.
    trained       INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE messages (
    id           INTEGER PRIMARY KEY,
    mailbox_id   INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid          INTEGER NOT NULL,
    blob_id      INTEGER NOT NULL REFERENCES blobs(id),
    modseq       INTEGER NOT NULL,
    -- \Seen 1, \Answered 2, \Flagged 4, \Deleted 8, \Draft 16.
    flags        INTEGER NOT NULL DEFAULT 0,
    -- Keywords, space-separated ($Junk, $Forwarded, ...).
    keywords     TEXT NOT NULL DEFAULT '',
    internaldate INTEGER NOT NULL,
    UNIQUE (mailbox_id, uid)
) STRICT;
CREATE INDEX messages_modseq ON messages(mailbox_id, modseq);

-- UIDs expunged, with the modseq of their removal (QRESYNC, and sessions
-- that must tell their clients).
CREATE TABLE expunged (
    mailbox_id INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid        INTEGER NOT NULL,
    modseq     INTEGER NOT NULL
) STRICT;
CREATE INDEX expunged_modseq ON expunged(mailbox_id, modseq);

-- Deliveries already stored, by the host's spool id: a repeated delivery
-- is acknowledged without a second copy.
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL
) STRICT;

-- The junk filter's counts: how often each token was seen in ham and
-- spam the user sorted, and how many messages of each.
CREATE TABLE junk_tokens (
    token TEXT PRIMARY KEY,
    ham   INTEGER NOT NULL DEFAULT 0,
    spam  INTEGER NOT NULL DEFAULT 0
) STRICT, WITHOUT ROWID;

CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
INSERT INTO counters (name, value) VALUES
    ('junk_ham', 0), ('junk_spam', 0), ('deliveries', 0), ('last_delivery', 0),
    -- The last UIDVALIDITY given: never given again, even to a mailbox
    -- made again under a deleted one's name.
    ('uidvalidity', 0);
