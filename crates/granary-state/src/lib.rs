//! Granary's state: one SQLite database, the only place SQL lives.
//!
//! [`Store::open`] checks that the file is a Granary database of a schema this
//! build understands, then applies pending migrations, each in its own
//! transaction. Every write that changes who may do what also appends an
//! audit event in the same transaction.
//!
//! The store is blocking (rusqlite); async callers run it on a blocking
//! thread. One connection behind a mutex is plenty for an admin-scale
//! workload and keeps writes serialised.

mod app_passwords;
mod audit;
mod grains;
mod invites;
mod mail;
mod migrate;
mod repos;
mod shared;
mod tasks;
mod totp;
mod users;
mod xmpp;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

pub use app_passwords::{AppPassword, RevokeSelector};
pub use audit::{AuditEvent, EventFilter};
pub use grains::{App, Grain, Grant, HostUid, NewApp};
pub use invites::{Invite, InviteKind, NewAccount, RedeemError, Redeemed, ValidInvite};
pub use mail::{MailAlias, MailDomainInfo, MailRoute};
pub use migrate::LATEST_SCHEMA_VERSION;
pub use repos::SshKey;
pub use shared::{Joined, Ledger};
pub use tasks::{TaskCert, TaskClient};
pub use totp::Totp;
pub use users::{User, UserCredentials};
pub use xmpp::XmppDomainInfo;

/// `PRAGMA application_id` of a Granary state database ('GRNY').
pub const APPLICATION_ID: i32 = 0x4752_4e59;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} is corrupt or not a Granary database ({detail}); restore it from a backup or move it aside"
    )]
    NotGranary { path: PathBuf, detail: String },
    #[error(
        "state database {path} has schema version {found}, newer than the {supported} this granary understands; run a newer granary or restore a backup"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("state database migration to version {version} failed: {source}")]
    Migration {
        version: u32,
        source: rusqlite::Error,
    },
    #[error("state database: {op}: {source}")]
    Query {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no user named {0}")]
    NoSuchUser(String),
    #[error("no app password {id} for user {user}")]
    NoSuchAppPassword { user: String, id: i64 },
    #[error("an app of kind {0} is already installed")]
    KindTaken(String),
    #[error("user {user} still has {grains} grain(s); remove them first")]
    UserHasGrains { user: String, grains: u64 },
    #[error("{0} already exists")]
    Conflict(String),
    /// A name or record that breaks one of Granary's rules.
    #[error("{0}")]
    Invalid(String),
    /// Another cluster node changed the shared records in the same
    /// instant; nothing was written, and trying again will do.
    #[error(
        "another node changed the shared records at the same moment; nothing was written, try again"
    )]
    Busy,
    /// The cluster's shared log cannot be read or written, or holds an
    /// entry this node cannot apply.
    #[error("shared records: {0}")]
    Shared(String),
}

/// Shorthand for wrapping rusqlite errors with the operation's name.
pub(crate) trait QueryContext<T> {
    fn op(self, op: &'static str) -> Result<T, StateError>;
}

impl<T> QueryContext<T> for Result<T, rusqlite::Error> {
    fn op(self, op: &'static str) -> Result<T, StateError> {
        self.map_err(|source| StateError::Query { op, source })
    }
}

pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Set once on a cluster node: the log every write goes through.
    sharing: OnceLock<shared::Sharing>,
}

/// One write: the connection, caught up with the cluster's log when the
/// store is shared. [`Writer::begin`] starts its transaction and
/// [`Writer::commit`] ends it.
pub(crate) struct Writer<'s> {
    conn: MutexGuard<'s, Connection>,
    sharing: Option<&'s shared::Sharing>,
}

impl Writer<'_> {
    pub(crate) fn begin(&self) -> Result<Transaction<'_>, rusqlite::Error> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        if self.sharing.is_some() {
            // Anything captured outside a write (a node-local touch of a
            // shared table) is not this write's to publish.
            tx.execute("DELETE FROM temp.share_changes", [])?;
        }
        Ok(tx)
    }

    /// Commits `tx`; on a cluster node, only once what it changed is in
    /// the cluster's log.
    pub(crate) fn commit(&self, tx: Transaction<'_>, op: &'static str) -> Result<(), StateError> {
        let Some(sharing) = self.sharing else {
            return tx.commit().op(op);
        };
        let published = sharing.publish(&tx)?;
        tx.commit().op(op)?;
        // Only once committed: other nodes are told this node holds it.
        if let Some(n) = published {
            sharing.reached(n);
        }
        Ok(())
    }
}

impl Store {
    /// Opens (creating if missing) and migrates the database at `path`.
    /// A corrupt file, a foreign SQLite file or a newer schema is refused
    /// before anything is written to it.
    pub fn open(path: &Path) -> Result<Store, StateError> {
        let conn = Connection::open(path).map_err(|source| StateError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        migrate::check_and_migrate(&conn, path, migrate::MIGRATIONS)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            sharing: OnceLock::new(),
        })
    }

    /// An in-memory store, for tests of code that uses the store.
    pub fn open_in_memory() -> Result<Store, StateError> {
        let conn = Connection::open_in_memory().map_err(|source| StateError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        migrate::check_and_migrate(&conn, Path::new(":memory:"), migrate::MIGRATIONS)?;
        Ok(Store {
            path: PathBuf::from(":memory:"),
            conn: Mutex::new(conn),
            sharing: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<u32, StateError> {
        migrate::user_version(&self.conn()).op("read schema version")
    }

    /// Makes this store a cache of the cluster's shared records in
    /// `ledger` (see the `shared` module): from now on every write goes
    /// through the log. A database whose records the log has never seen
    /// becomes the log's first entry when the log is empty, and is refused
    /// when it is not (a node joins with an empty state database). Call it once,
    /// before anything writes.
    pub fn share(&self, ledger: Arc<dyn Ledger>) -> Result<Joined, StateError> {
        let conn = self.conn();
        if self.sharing.get().is_some() {
            return Err(StateError::Invalid("the store is already shared".into()));
        }
        let (sharing, joined) = shared::start(&conn, ledger)?;
        let _ = self.sharing.set(sharing);
        Ok(joined)
    }

    /// Applies what other nodes wrote since this node last looked; returns
    /// the number of the last entry applied. Nothing to do on a store that
    /// is not shared.
    pub fn catch_up(&self) -> Result<u64, StateError> {
        let from = shared::applied(&self.conn())?;
        let Some(sharing) = self.sharing.get() else {
            return Ok(from);
        };
        // The log is asked with the connection free: reads go on meanwhile.
        let entries = sharing.fetch(from)?;
        sharing.apply(&self.conn(), entries)
    }

    /// Runs `write` again while another node's write got in first
    /// ([`StateError::Busy`]), up to five times with a short pause: for
    /// the daemon's own writes, which nobody can be asked to repeat. Call
    /// it on a blocking thread, as every store call is.
    pub fn retrying<T>(
        &self,
        mut write: impl FnMut(&Store) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let mut tries = 0u64;
        loop {
            match write(self) {
                Err(StateError::Busy) if tries < 5 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10 * tries));
                }
                other => return other,
            }
        }
    }

    /// How far this node has applied the cluster's log, without waiting
    /// for the database (0 on a store that is not shared).
    pub fn position(&self) -> u64 {
        self.sharing
            .get()
            .map_or(0, |s| s.position.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The connection for one write, caught up with the cluster's log (read
    /// before the connection is taken, so a log out of reach fails the
    /// write without holding up reads).
    pub(crate) fn writer(&self) -> Result<Writer<'_>, StateError> {
        let sharing = self.sharing.get();
        if sharing.is_some() {
            self.catch_up()?;
        }
        Ok(Writer {
            conn: self.conn(),
            sharing,
        })
    }

    /// After a node-local touch of a shared row (a last-use time): what
    /// the triggers captured is not to be sent, nor kept in memory.
    pub(crate) fn forget_captured(&self, conn: &Connection) {
        if self.sharing.get().is_some() {
            let _ = shared::clear_changes(conn);
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Connection settings applied on every open.
fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // An in-memory database answers "memory"; a file switches to WAL.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    // FULL: a change the admin was told about survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Summary counts for `granary status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub users: u64,
    pub app_passwords: u64,
    pub apps: u64,
    pub grains: u64,
    pub grants: u64,
}

impl Store {
    pub fn counts(&self) -> Result<Counts, StateError> {
        let conn = self.conn();
        let count = |sql: &str| -> Result<u64, StateError> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .op("count rows")
        };
        Ok(Counts {
            users: count("SELECT count(*) FROM users")?,
            app_passwords: count("SELECT count(*) FROM app_passwords")?,
            apps: count("SELECT count(*) FROM apps")?,
            grains: count("SELECT count(*) FROM grains")?,
            grants: count("SELECT count(*) FROM grants WHERE revoked_at IS NULL")?,
        })
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use granary_model::UserName;

    pub(crate) fn store() -> Store {
        Store::open_in_memory().unwrap()
    }

    pub(crate) fn name(s: &str) -> UserName {
        UserName::new(s).unwrap()
    }

    pub(crate) fn store_with_user(user: &str) -> Store {
        let store = store();
        store
            .add_user(&name(user), "$argon2id$fake", "test")
            .unwrap();
        store
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;

    #[test]
    fn counts_follow_the_tables() {
        let store = store_with_user("alice");
        let counts = store.counts().unwrap();
        assert_eq!(counts.users, 1);
        assert_eq!(counts.app_passwords, 0);
        assert_eq!(counts.grains, 0);
    }
}
