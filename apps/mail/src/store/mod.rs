//! The mail store, in the grain's `/var/mail`: each message a file written
//! once (`msg/<n>/<blob>`), and an SQLite index (`index.db`) of mailboxes,
//! UIDs, flags, keywords and modification sequences.
//!
//! Durability: a message's file is fsynced and renamed into place, its
//! directory fsynced, and only then is the index transaction that names
//! it committed (WAL, `synchronous = FULL`). A crash before the commit
//! leaves at most a file nothing names, which the next message with that
//! number replaces; nothing is acknowledged before the commit.
//!
//! Every method is blocking; async code calls them on the blocking pool.
//! After every change the [`Store::changes`] counter moves, so sessions
//! watching a mailbox (IDLE) look for what changed.

pub mod mailboxes;
pub mod read;
pub mod write;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use read::{Msg, Status};
pub use write::{Delivered, FlagChange};

/// System flags, as bits of `messages.flags`.
pub const SEEN: u32 = 1;
pub const ANSWERED: u32 = 2;
pub const FLAGGED: u32 = 4;
pub const DELETED: u32 = 8;
pub const DRAFT: u32 = 16;

/// The system flags and their IMAP names.
pub const SYSTEM_FLAGS: [(u32, &str); 5] = [
    (SEEN, "\\Seen"),
    (ANSWERED, "\\Answered"),
    (FLAGGED, "\\Flagged"),
    (DELETED, "\\Deleted"),
    (DRAFT, "\\Draft"),
];

/// The mailboxes every store has from the start, with their roles.
pub const DEFAULT_MAILBOXES: [(&str, &str); 6] = [
    ("INBOX", ""),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
    ("Archive", "\\Archive"),
];

/// One mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub id: i64,
    pub name: String,
    pub special_use: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub highest_modseq: u64,
    pub subscribed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the index: {0}")]
    Db(rusqlite::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no mailbox named {0}")]
    NoMailbox(String),
    #[error("a mailbox named {0} exists already")]
    Exists(String),
    /// The dataset has no room (ENOSPC, EDQUOT): try again once space is
    /// freed.
    #[error("the mailbox storage is full")]
    Full,
    /// Refused for a reason the client is told as is.
    #[error("{0}")]
    Refused(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        // SQLite's own "disk full" (the WAL or the database could not
        // grow) is the same temporary condition as a message file's.
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full,
            _ => StoreError::Db(e),
        }
    }
}

impl StoreError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
        move |source| {
            // ENOSPC, EDQUOT.
            if matches!(source.raw_os_error(), Some(28) | Some(122)) {
                return StoreError::Full;
            }
            StoreError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// The store. Shared by every session and the delivery interface.
pub struct Store {
    dir: PathBuf,
    db: Mutex<Connection>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Store {
    /// Opens the store under `dir` (made on first use with the default
    /// mailboxes). Leftover temporary files are removed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        for sub in ["", "msg", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(StoreError::io("create", &d))?;
        }
        let tmp = dir.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let conn = Connection::open(dir.join("index.db"))?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version == 0 {
            conn.execute_batch(&format!("BEGIN;{}COMMIT;", include_str!("schema.sql")))?;
        } else if version > 1 {
            return Err(StoreError::Refused(format!(
                "the mail index has version {version}, newer than this app understands"
            )));
        }
        let store = Store {
            dir: dir.to_path_buf(),
            db: Mutex::new(conn),
            changes: tokio::sync::watch::Sender::new(0),
        };
        store.ensure_default_mailboxes()?;
        Ok(store)
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watched by sessions: moves after every change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn blob_path(&self, blob: i64) -> PathBuf {
        self.dir
            .join("msg")
            .join((blob >> 12).to_string())
            .join(blob.to_string())
    }

    /// A message's bytes.
    pub fn read_blob(&self, blob: i64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(blob);
        std::fs::read(&path).map_err(StoreError::io("read", &path))
    }

    /// Writes the index's WAL into the database file, so a snapshot holds
    /// one consistent file; a one-line report.
    pub fn checkpoint(&self) -> Result<String, StoreError> {
        let db = self.db();
        db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        let (boxes, messages): (i64, i64) = db.query_row(
            "SELECT (SELECT count(*) FROM mailboxes), (SELECT count(*) FROM messages)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(format!(
            "checkpointed the mail index: {boxes} mailboxes, {messages} messages"
        ))
    }

    /// Bytes in use and the limit, from the file system under the store
    /// (the dataset's quota on ZFS and btrfs).
    pub fn usage(&self) -> Option<(u64, u64)> {
        let s = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        let frag = s.fragment_size() as u64;
        let total = s.blocks() as u64 * frag;
        let free = s.blocks_available() as u64 * frag;
        Some((total.saturating_sub(free), total))
    }
}

/// `\Seen \Flagged $Junk`: the system flags of `flags` and the keywords.
pub fn flag_names(flags: u32, keywords: &str) -> Vec<String> {
    let mut out: Vec<String> = SYSTEM_FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    out.extend(keywords.split_whitespace().map(str::to_owned));
    out
}

/// The bit of a system flag (`\seen` in any case), if it is one.
pub fn system_flag(name: &str) -> Option<u32> {
    SYSTEM_FLAGS
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name))
        .map(|(bit, _)| *bit)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
