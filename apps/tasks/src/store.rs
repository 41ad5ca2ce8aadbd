//! The grain's SQLite store: TaskChampion's versions and snapshots (the
//! core's `Storage` trait, one transaction per request) and the taskd
//! transaction log. Every write is committed with `synchronous = FULL`
//! before the client is answered.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use taskchampion_sync_server_core::{Client, Snapshot, Storage, StorageTxn, Version};
use uuid::Uuid;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tc_clients (
    client_id         TEXT PRIMARY KEY,
    latest_version_id TEXT NOT NULL,
    snapshot_version  TEXT,
    snapshot_time     INTEGER,
    versions_since    INTEGER NOT NULL DEFAULT 0,
    snapshot          BLOB
) STRICT;
CREATE TABLE IF NOT EXISTS tc_versions (
    client_id         TEXT NOT NULL,
    version_id        TEXT NOT NULL,
    parent_version_id TEXT NOT NULL,
    history_segment   BLOB NOT NULL,
    PRIMARY KEY (client_id, version_id),
    UNIQUE (client_id, parent_version_id)
) STRICT;
CREATE TABLE IF NOT EXISTS taskd_log (
    seq  INTEGER PRIMARY KEY,
    line TEXT NOT NULL
) STRICT;
";

/// The store at `dir/tasks.sqlite`, with a few connections kept open.
pub struct Store {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let store = Store {
            path: dir.join("tasks.sqlite"),
            idle: Mutex::default(),
        };
        let conn = store.connect()?;
        conn.execute_batch(SCHEMA)
            .context("cannot create the schema")?;
        store.put(conn);
        Ok(store)
    }

    fn connect(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(conn)
    }

    fn take(&self) -> anyhow::Result<Connection> {
        if let Some(c) = self.idle.lock().expect("not poisoned").pop() {
            return Ok(c);
        }
        self.connect()
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().expect("not poisoned");
        if idle.len() < 4 && conn.is_autocommit() {
            idle.push(conn);
        }
    }

    /// Folds the write-ahead log into the database file, so a snapshot of
    /// the dataset holds everything in one file.
    pub fn checkpoint(&self) -> anyhow::Result<String> {
        let conn = self.take()?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        self.put(conn);
        Ok("tasks.sqlite checkpointed".to_owned())
    }

    /// Runs one taskd sync in one transaction: `run` gets the whole
    /// transaction log (oldest first) and returns the lines to append and
    /// its answer; the lines are committed before the answer is returned.
    pub fn taskd_sync<T>(
        &self,
        run: impl FnOnce(&[String]) -> (Vec<String>, T),
    ) -> anyhow::Result<T> {
        let mut conn = self.take()?;
        let answer = {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let log = {
                let mut stmt = tx.prepare_cached("SELECT line FROM taskd_log ORDER BY seq")?;
                stmt.query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?
            };
            let (lines, answer) = run(&log);
            if !lines.is_empty() {
                let mut stmt = tx.prepare_cached("INSERT INTO taskd_log (line) VALUES (?1)")?;
                for l in &lines {
                    stmt.execute([l])?;
                }
            }
            tx.commit()?;
            answer
        };
        self.put(conn);
        Ok(answer)
    }
}

/// The store as the TaskChampion core's storage (the core owns its
/// storage; the taskd side shares the same store).
pub struct Versions(pub std::sync::Arc<Store>);

#[async_trait::async_trait]
impl Storage for Versions {
    async fn txn(&self, client_id: Uuid) -> anyhow::Result<Box<dyn StorageTxn + '_>> {
        let conn = self.0.take()?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(Box::new(Txn {
            store: &self.0,
            conn: Some(conn),
            client: client_id.to_string(),
        }))
    }
}

/// One request's transaction: rolled back unless committed.
struct Txn<'a> {
    store: &'a Store,
    conn: Option<Connection>,
    client: String,
}

impl Txn<'_> {
    fn conn(&self) -> &Connection {
        self.conn.as_ref().expect("open until dropped")
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            self.store.put(conn);
        }
    }
}

fn uuid(text: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(text).with_context(|| format!("a stored version id is not a UUID: {text}"))
}

#[async_trait::async_trait(?Send)]
impl StorageTxn for Txn<'_> {
    async fn get_client(&mut self) -> anyhow::Result<Option<Client>> {
        let row: Option<(String, Option<String>, Option<i64>, u32)> = self
            .conn()
            .prepare_cached(
                "SELECT latest_version_id, snapshot_version, snapshot_time, versions_since
                 FROM tc_clients WHERE client_id = ?1",
            )?
            .query_row([&self.client], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((latest, snap_version, snap_time, versions_since)) = row else {
            return Ok(None);
        };
        let snapshot = match (snap_version, snap_time) {
            (Some(v), Some(t)) => Some(Snapshot {
                version_id: uuid(&v)?,
                timestamp: Utc
                    .timestamp_opt(t, 0)
                    .single()
                    .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                versions_since,
            }),
            _ => None,
        };
        Ok(Some(Client {
            latest_version_id: uuid(&latest)?,
            snapshot,
        }))
    }

    async fn new_client(&mut self, latest_version_id: Uuid) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO tc_clients (client_id, latest_version_id) VALUES (?1, ?2)",
            params![self.client, latest_version_id.to_string()],
        )?;
        Ok(())
    }

    async fn set_snapshot(&mut self, snapshot: Snapshot, data: Vec<u8>) -> anyhow::Result<()> {
        let n = self.conn().execute(
            "UPDATE tc_clients SET snapshot_version = ?2, snapshot_time = ?3,
                 versions_since = ?4, snapshot = ?5 WHERE client_id = ?1",
            params![
                self.client,
                snapshot.version_id.to_string(),
                snapshot.timestamp.timestamp(),
                snapshot.versions_since,
                data
            ],
        )?;
        anyhow::ensure!(n == 1, "no such client");
        Ok(())
    }

    async fn get_snapshot_data(&mut self, version_id: Uuid) -> anyhow::Result<Option<Vec<u8>>> {
        let row: Option<(Option<String>, Option<Vec<u8>>)> = self
            .conn()
            .query_row(
                "SELECT snapshot_version, snapshot FROM tc_clients WHERE client_id = ?1",
                [&self.client],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((Some(v), Some(data))) => {
                anyhow::ensure!(
                    uuid(&v)? == version_id,
                    "the stored snapshot is of another version"
                );
                Ok(Some(data))
            }
            _ => Ok(None),
        }
    }

    async fn get_version_by_parent(
        &mut self,
        parent_version_id: Uuid,
    ) -> anyhow::Result<Option<Version>> {
        self.version_where("parent_version_id", parent_version_id)
    }

    async fn get_version(&mut self, version_id: Uuid) -> anyhow::Result<Option<Version>> {
        self.version_where("version_id", version_id)
    }

    async fn add_version(
        &mut self,
        version_id: Uuid,
        parent_version_id: Uuid,
        history_segment: Vec<u8>,
    ) -> anyhow::Result<()> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO tc_versions (client_id, version_id, parent_version_id, history_segment)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            self.client,
            version_id.to_string(),
            parent_version_id.to_string(),
            history_segment
        ])?;
        // Only on top of the latest version (or the first one): a
        // concurrent add with the same parent loses here.
        let n = conn
            .prepare_cached(
                "UPDATE tc_clients SET latest_version_id = ?2, versions_since = versions_since + 1
                 WHERE client_id = ?1 AND (latest_version_id = ?3 OR latest_version_id = ?4)",
            )?
            .execute(params![
                self.client,
                version_id.to_string(),
                parent_version_id.to_string(),
                Uuid::nil().to_string()
            ])?;
        anyhow::ensure!(n == 1, "the parent version is not the latest");
        Ok(())
    }

    async fn commit(&mut self) -> anyhow::Result<()> {
        self.conn().execute_batch("COMMIT")?;
        Ok(())
    }
}

impl Txn<'_> {
    fn version_where(&self, column: &str, id: Uuid) -> anyhow::Result<Option<Version>> {
        let sql = format!(
            "SELECT version_id, parent_version_id, history_segment FROM tc_versions
             WHERE client_id = ?1 AND {column} = ?2"
        );
        let row: Option<(String, String, Vec<u8>)> = self
            .conn()
            .prepare_cached(&sql)?
            .query_row(params![self.client, id.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        row.map(|(v, p, segment)| {
            Ok(Version {
                version_id: uuid(&v)?,
                parent_version_id: uuid(&p)?,
                history_segment: segment,
            })
        })
        .transpose()
    }
}
