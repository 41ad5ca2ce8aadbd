//! The records every node of a cluster shares: users, credential hashes,
//! apps, grains, grants, domains, invites, task clients (every table but
//! the audit log, which stays each node's own, and this module's
//! bookkeeping).
//!
//! The cluster keeps one ordered log of entries, a [`Ledger`] (etcd, in
//! `granary-cluster`). An entry is the row images one write transaction
//! made on some node, captured by temporary triggers on this connection.
//! Every node applies the log in order to its own SQLite database, which
//! is then a cache of the log that answers every read locally.
//!
//! A write first catches up with the log, runs, and commits only once its
//! entry has been appended right after the last entry this node applied.
//! If another node's entry took that place (two nodes writing in the same
//! instant), nothing is committed and the caller is told to try again
//! ([`StateError::Busy`]); if the log cannot be reached, nothing is
//! committed either. So every node applies the same entries, in the same
//! order, to the same state, and a write the caller was told about is in
//! the log, which outlives any one node.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::{LATEST_SCHEMA_VERSION, QueryContext, StateError};

/// The cluster's log of shared writes.
pub trait Ledger: Send + Sync {
    /// What names this log (the cluster's id): a database that followed
    /// one log never follows another.
    fn id(&self) -> Result<String, String>;
    /// The entries after number `seq`, in order, with their numbers.
    fn entries_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, String>;
    /// Appends `entry` as number `seq + 1` if that number is still free;
    /// `Ok(false)` when another node's entry took it first.
    fn append(&self, seq: u64, entry: &[u8]) -> Result<bool, String>;
}

/// Tables that stay this node's own.
const LOCAL_TABLES: [&str; 2] = ["audit_events", "shared_log"];

/// One entry of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// The schema the rows were written under; every node of a cluster
    /// runs the same one.
    schema: u32,
    changes: Vec<Change>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    table: String,
    op: Op,
    /// Column name to value; blobs as hex. A delete carries the key only.
    row: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Delete,
}

/// A shared table's columns and key, read from the schema.
#[derive(Debug)]
struct Shape {
    columns: Vec<(String, bool)>,
    /// The primary key's columns; empty when the table has none (its rowid
    /// is the key then).
    key: Vec<String>,
}

impl Shape {
    fn is_blob(&self, column: &str) -> bool {
        self.columns.iter().any(|(c, blob)| c == column && *blob)
    }
}

/// What a store shares, once [`crate::Store::share`] turned sharing on.
pub(crate) struct Sharing {
    ledger: Arc<dyn Ledger>,
    shapes: BTreeMap<String, Shape>,
    /// The last entry applied, as last seen (a hint for other nodes; the
    /// database's `shared_log` is the truth).
    pub(crate) position: std::sync::atomic::AtomicU64,
}

/// How [`crate::Store::share`] found this node's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The log was empty: this node's records are its first entry.
    Seeded { records: u64 },
    /// The node caught up with the log, to entry `applied`.
    CaughtUp { applied: u64 },
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn shared_failure(e: impl std::fmt::Display) -> StateError {
    StateError::Shared(e.to_string())
}

fn shapes(conn: &Connection) -> Result<BTreeMap<String, Shape>, StateError> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .op("list tables")?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .op("list tables")?
        .collect::<Result<_, _>>()
        .op("list tables")?;
    let mut shapes = BTreeMap::new();
    for table in tables
        .into_iter()
        .filter(|t| !LOCAL_TABLES.contains(&t.as_str()))
    {
        let mut info = conn
            .prepare(&format!("PRAGMA table_info({})", quote(&table)))
            .op("read a table's columns")?;
        let mut columns = Vec::new();
        let mut key = Vec::new();
        let rows = info
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .op("read a table's columns")?;
        for row in rows {
            let (name, kind, pk) = row.op("read a table's columns")?;
            if pk > 0 {
                key.push((pk, name.clone()));
            }
            columns.push((name, kind.eq_ignore_ascii_case("BLOB")));
        }
        key.sort();
        shapes.insert(
            table,
            Shape {
                columns,
                key: key.into_iter().map(|(_, n)| n).collect(),
            },
        );
    }
    Ok(shapes)
}

/// `json_object(...)` of a row in a trigger (`row` is NEW or OLD).
fn image(shape: &Shape, row: &str, key_only: bool) -> String {
    let mut parts = Vec::new();
    if shape.key.is_empty() {
        parts.push(format!("'rowid', {row}.rowid"));
    }
    for (column, blob) in &shape.columns {
        if key_only && !shape.key.contains(column) {
            continue;
        }
        let value = format!("{row}.{}", quote(column));
        let value = match blob {
            true => format!("iif({value} IS NULL, NULL, hex({value}))"),
            false => value,
        };
        parts.push(format!("'{}', {value}", column.replace('\'', "''")));
    }
    format!("json_object({})", parts.join(", "))
}

/// Installs the capturing triggers on this connection (temporary: they
/// exist only while sharing is on, and only for this connection).
fn install_triggers(conn: &Connection, shapes: &BTreeMap<String, Shape>) -> Result<(), StateError> {
    let mut sql = String::from(
        "CREATE TEMP TABLE IF NOT EXISTS share_changes (
            n INTEGER PRIMARY KEY, tbl TEXT NOT NULL, op TEXT NOT NULL, img TEXT NOT NULL);\n",
    );
    for (table, shape) in shapes {
        let t = table.replace('\'', "''");
        let on = format!("main.{}", quote(table));
        let key_moved = match shape.key.is_empty() {
            true => "OLD.rowid IS NOT NEW.rowid".to_owned(),
            false => shape
                .key
                .iter()
                .map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k)))
                .collect::<Vec<_>>()
                .join(" OR "),
        };
        let (put_new, key_old) = (image(shape, "NEW", false), image(shape, "OLD", true));
        let trigger = |event: &str| quote(&format!("share_{table}_{event}"));
        sql.push_str(&format!(
            "CREATE TEMP TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON {on} BEGIN
                INSERT INTO share_changes (tbl, op, img) VALUES ('{t}', 'put', {put_new}); END;
             CREATE TEMP TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {on} BEGIN
                INSERT INTO share_changes (tbl, op, img) SELECT '{t}', 'delete', {key_old} WHERE {key_moved};
                INSERT INTO share_changes (tbl, op, img) VALUES ('{t}', 'put', {put_new}); END;
             CREATE TEMP TRIGGER IF NOT EXISTS {del} AFTER DELETE ON {on} BEGIN
                INSERT INTO share_changes (tbl, op, img) VALUES ('{t}', 'delete', {key_old}); END;\n",
            ins = trigger("insert"),
            upd = trigger("update"),
            del = trigger("delete"),
        ));
    }
    conn.execute_batch(&sql).op("install the sharing triggers")
}

pub(crate) fn applied(conn: &Connection) -> Result<u64, StateError> {
    conn.query_row("SELECT applied FROM shared_log WHERE id = 1", [], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .op("read the shared log position")
    .map(|n| n.unwrap_or(0) as u64)
}

fn set_applied(conn: &Connection, seq: u64) -> Result<(), StateError> {
    conn.execute(
        "INSERT INTO shared_log (id, applied) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET applied = excluded.applied",
        [seq as i64],
    )
    .op("record the shared log position")
    .map(drop)
}

/// The changes captured so far in this transaction, taken (the capture
/// table is left empty).
fn take_changes(conn: &Connection) -> Result<Vec<Change>, StateError> {
    let mut stmt = conn
        .prepare("SELECT tbl, op, img FROM temp.share_changes ORDER BY n")
        .op("read captured changes")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .op("read captured changes")?;
    let mut changes = Vec::new();
    for row in rows {
        let (table, op, img) = row.op("read captured changes")?;
        let op = match op.as_str() {
            "put" => Op::Put,
            _ => Op::Delete,
        };
        let row = serde_json::from_str(&img).map_err(shared_failure)?;
        changes.push(Change { table, op, row });
    }
    clear_changes(conn)?;
    Ok(changes)
}

pub(crate) fn clear_changes(conn: &Connection) -> Result<(), StateError> {
    conn.execute("DELETE FROM temp.share_changes", [])
        .op("clear captured changes")
        .map(drop)
}

fn to_sql(value: &serde_json::Value, blob: bool) -> Result<Value, String> {
    use serde_json::Value as J;
    Ok(match value {
        J::Null => Value::Null,
        J::Bool(b) => Value::Integer(*b as i64),
        J::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().ok_or("a number out of range")?),
        },
        J::String(s) if blob => Value::Blob(hex::decode(s).map_err(|_| "a blob that is not hex")?),
        J::String(s) => Value::Text(s.clone()),
        J::Array(_) | J::Object(_) => return Err("a nested value".to_owned()),
    })
}

/// SQLite's table of AUTOINCREMENT counters, carried in a seed entry.
const SEQUENCES: &str = "sqlite_sequence";

fn apply_change(
    conn: &Connection,
    shapes: &BTreeMap<String, Shape>,
    change: &Change,
) -> Result<(), String> {
    if change.table == SEQUENCES && change.op == Op::Put {
        // A counter only ever grows.
        let name = change.row.get("name").and_then(|n| n.as_str());
        let seq = change.row.get("seq").and_then(|n| n.as_i64());
        let (Some(name), Some(seq)) = (name, seq) else {
            return Err("an id counter without a name or value".to_owned());
        };
        if !shapes.contains_key(name) {
            return Err(format!(
                "an id counter of table {name:?}, which this node does not share"
            ));
        }
        return conn
            .execute_batch(&format!(
                "UPDATE sqlite_sequence SET seq = max(seq, {seq}) WHERE name = '{name}';
                 INSERT INTO sqlite_sequence (name, seq) SELECT '{name}', {seq}
                     WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = '{name}');"
            ))
            .map_err(|e| e.to_string());
    }
    let shape = shapes.get(&change.table).ok_or_else(|| {
        format!(
            "it names table {:?}, which this node does not share",
            change.table
        )
    })?;
    let value = |column: &str| -> Result<Value, String> {
        let v = change
            .row
            .get(column)
            .ok_or_else(|| format!("its {} row lacks column {column}", change.table))?;
        to_sql(v, shape.is_blob(column))
    };
    let table = quote(&change.table);
    let key: Vec<String> = match shape.key.is_empty() {
        true => vec!["rowid".to_owned()],
        false => shape.key.clone(),
    };
    let (sql, values) = match change.op {
        Op::Delete => {
            let wheres: Vec<String> = key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} = ?{}", quote(k), i + 1))
                .collect();
            let values = key
                .iter()
                .map(|k| value(k))
                .collect::<Result<Vec<_>, _>>()?;
            (
                format!("DELETE FROM {table} WHERE {}", wheres.join(" AND ")),
                values,
            )
        }
        Op::Put => {
            let mut columns: Vec<&str> = shape.columns.iter().map(|(c, _)| c.as_str()).collect();
            if shape.key.is_empty() {
                columns.insert(0, "rowid");
            }
            let values = columns
                .iter()
                .map(|c| value(c))
                .collect::<Result<Vec<_>, _>>()?;
            let names: Vec<String> = columns.iter().map(|c| quote(c)).collect();
            let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
            let sql = if shape.key.is_empty() {
                // No key to name in ON CONFLICT: the rowid is replaced
                // (such tables are never referenced by others).
                format!(
                    "INSERT OR REPLACE INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    marks.join(", ")
                )
            } else {
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|c| !shape.key.iter().any(|k| k == *c))
                    .map(|c| format!("{0} = excluded.{0}", quote(c)))
                    .collect();
                let action = match updates.is_empty() {
                    true => "NOTHING".to_owned(),
                    false => format!("UPDATE SET {}", updates.join(", ")),
                };
                let keys: Vec<String> = shape.key.iter().map(|k| quote(k)).collect();
                format!(
                    "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
                    names.join(", "),
                    marks.join(", "),
                    keys.join(", ")
                )
            };
            (sql, values)
        }
    };
    conn.execute(&sql, rusqlite::params_from_iter(values))
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Sharing {
    /// Applies the log's entries this database has not seen, in one
    /// transaction; returns the number of the last one. Holds `conn`
    /// while it asks the log: for the start, and tests.
    pub(crate) fn catch_up(&self, conn: &Connection) -> Result<u64, StateError> {
        let entries = self.fetch(applied(conn)?)?;
        self.apply(conn, entries)
    }

    /// The log's entries after `seq`; asked without the connection held,
    /// so reads never wait on the log.
    pub(crate) fn fetch(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, StateError> {
        self.ledger
            .entries_after(seq)
            .map_err(|e| StateError::Shared(format!("cannot read the shared log: {e}")))
    }

    /// Applies fetched `entries` in one transaction, skipping those the
    /// database applied meanwhile; returns the number of the last entry
    /// applied.
    pub(crate) fn apply(
        &self,
        conn: &Connection,
        entries: Vec<(u64, Vec<u8>)>,
    ) -> Result<u64, StateError> {
        let applied = applied(conn)?;
        let entries: Vec<_> = entries.into_iter().filter(|(n, _)| *n > applied).collect();
        if entries.is_empty() {
            self.reached(applied);
            return Ok(applied);
        }
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .op("begin applying the shared log")?;
        // Rows arrive in the order they were written; the references
        // between them are checked once the whole batch is in.
        tx.pragma_update(None, "defer_foreign_keys", true)
            .op("defer foreign keys")?;
        let mut seq = applied;
        for (n, bytes) in entries {
            if n != seq + 1 {
                return Err(StateError::Shared(format!(
                    "the shared log skips from entry {seq} to {n}"
                )));
            }
            let unusable = |why: String| {
                StateError::Shared(format!(
                    "entry {n} of the shared log cannot be applied: {why}"
                ))
            };
            let entry: Entry =
                serde_json::from_slice(&bytes).map_err(|e| unusable(e.to_string()))?;
            if entry.schema != LATEST_SCHEMA_VERSION {
                return Err(unusable(format!(
                    "it was written under schema {}, and this node runs schema {LATEST_SCHEMA_VERSION}: run the same granary on every node",
                    entry.schema
                )));
            }
            for change in &entry.changes {
                apply_change(&tx, &self.shapes, change).map_err(unusable)?;
            }
            seq = n;
        }
        set_applied(&tx, seq)?;
        clear_changes(&tx)?;
        tx.commit().op("commit the shared log's entries")?;
        self.reached(seq);
        Ok(seq)
    }

    /// Before a write transaction commits: appends what it changed to the
    /// log right after the last entry this node applied, and records that
    /// the node has applied it. Fails, so that the caller rolls back, when
    /// the log cannot take it there. The entry's number once appended
    /// (`None`: the write changed no shared row).
    pub(crate) fn publish(&self, tx: &Connection) -> Result<Option<u64>, StateError> {
        let changes = take_changes(tx)?;
        if changes.is_empty() {
            return Ok(None);
        }
        let seq = applied(tx)?;
        let entry = serde_json::to_vec(&Entry {
            schema: LATEST_SCHEMA_VERSION,
            changes,
        })
        .map_err(shared_failure)?;
        match self.ledger.append(seq, &entry) {
            Ok(true) => set_applied(tx, seq + 1).map(|()| Some(seq + 1)),
            Ok(false) => Err(StateError::Busy),
            Err(e) => Err(StateError::Shared(format!(
                "cannot write to the shared log: {e}"
            ))),
        }
    }

    /// Notes that the database holds the log up to entry `n` (committed).
    pub(crate) fn reached(&self, n: u64) {
        self.position
            .fetch_max(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every shared row this database holds, as one log entry's changes,
    /// and where its AUTOINCREMENT counters stand (ids deleted before
    /// seeding must never be handed out again on another node).
    fn everything(&self, conn: &Connection) -> Result<Vec<Change>, StateError> {
        let mut changes = Vec::new();
        let mut stmt = conn
            .prepare(
                "SELECT json_object('name', name, 'seq', seq) FROM sqlite_sequence ORDER BY name",
            )
            .op("read id counters")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .op("read id counters")?;
        for img in rows {
            let row: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&img.op("read id counters")?).map_err(shared_failure)?;
            if row
                .get("name")
                .and_then(|n| n.as_str())
                .is_some_and(|n| self.shapes.contains_key(n))
            {
                changes.push(Change {
                    table: SEQUENCES.to_owned(),
                    op: Op::Put,
                    row,
                });
            }
        }
        for (table, shape) in &self.shapes {
            let sql = format!(
                "SELECT {} FROM main.{} AS t",
                image(shape, "t", false),
                quote(table)
            );
            let mut stmt = conn.prepare(&sql).op("read shared rows")?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .op("read shared rows")?;
            for img in rows {
                let img = img.op("read shared rows")?;
                changes.push(Change {
                    table: table.clone(),
                    op: Op::Put,
                    row: serde_json::from_str(&img).map_err(shared_failure)?,
                });
            }
        }
        Ok(changes)
    }
}

/// Turns sharing on for `conn` (see [`crate::Store::share`]).
pub(crate) fn start(
    conn: &Connection,
    ledger: Arc<dyn Ledger>,
) -> Result<(Sharing, Joined), StateError> {
    let sharing = Sharing {
        shapes: shapes(conn)?,
        ledger,
        position: Default::default(),
    };
    install_triggers(conn, &sharing.shapes)?;
    clear_changes(conn)?;
    let log = sharing
        .ledger
        .id()
        .map_err(|e| StateError::Shared(format!("cannot read the cluster's id: {e}")))?;
    let followed: String = conn
        .query_row("SELECT log FROM shared_log WHERE id = 1", [], |r| r.get(0))
        .op("read which log this database follows")?;
    if followed.is_empty() {
        conn.execute("UPDATE shared_log SET log = ?1 WHERE id = 1", [&log])
            .op("note which log this database follows")?;
    } else if followed != log {
        return Err(StateError::Shared(format!(
            "this state database holds the shared records of cluster {followed}, and this etcd holds cluster {log}: point [cluster].etcd at that cluster's etcd, or start this node with an empty state database"
        )));
    }
    if applied(conn)? == 0 {
        let own = sharing.everything(conn)?;
        // Only the first page is needed to tell an empty log.
        let first = sharing.fetch(0)?;
        let records = own.iter().filter(|c| c.table != SEQUENCES).count() as u64;
        if records > 0 {
            let entry = serde_json::to_vec(&Entry {
                schema: LATEST_SCHEMA_VERSION,
                changes: own,
            })
            .map_err(shared_failure)?;
            match first.first() {
                None => match sharing.ledger.append(0, &entry) {
                    Ok(true) => {
                        set_applied(conn, 1)?;
                        sharing.reached(1);
                        return Ok((sharing, Joined::Seeded { records }));
                    }
                    Ok(false) => {
                        return Err(StateError::Shared(
                            "another node wrote the cluster's first shared records at the same moment; start this node again with an empty state database to join them".to_owned(),
                        ));
                    }
                    Err(e) => {
                        return Err(StateError::Shared(format!(
                            "cannot write to the shared log: {e}"
                        )));
                    }
                },
                // This node seeded the log and stopped before it noted so.
                Some((1, bytes)) if *bytes == entry => {
                    set_applied(conn, 1)?;
                    sharing.reached(1);
                    return Ok((sharing, Joined::Seeded { records }));
                }
                Some(_) => {
                    return Err(StateError::Shared(format!(
                        "this node's state database holds {records} records of its own (users, apps, grains…) and the cluster already has its shared records; a node joins an existing cluster with an empty state database (move DATA_DIR/state/granary.db aside)"
                    )));
                }
            }
        }
    }
    let applied = sharing.catch_up(conn)?;
    sharing.reached(applied);
    Ok((sharing, Joined::CaughtUp { applied }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::test_support::name;
    use crate::{RevokeSelector, Store};

    /// The cluster's log, in memory; `blind` makes a node miss what others
    /// wrote (as if it read the log an instant too early).
    #[derive(Default)]
    struct MemoryLedger {
        name: Mutex<String>,
        log: Mutex<Vec<Vec<u8>>>,
        blind: AtomicBool,
        down: AtomicBool,
    }

    impl Ledger for MemoryLedger {
        fn id(&self) -> Result<String, String> {
            Ok(self.name.lock().unwrap().clone())
        }
        fn entries_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
            if self.down.load(Ordering::SeqCst) {
                return Err("unreachable".into());
            }
            if self.blind.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let log = self.log.lock().unwrap();
            Ok((seq as usize..log.len())
                .map(|i| (i as u64 + 1, log[i].clone()))
                .collect())
        }
        fn append(&self, seq: u64, entry: &[u8]) -> Result<bool, String> {
            if self.down.load(Ordering::SeqCst) {
                return Err("unreachable".into());
            }
            let mut log = self.log.lock().unwrap();
            if log.len() as u64 != seq {
                return Ok(false);
            }
            log.push(entry.to_vec());
            Ok(true)
        }
    }

    fn node(ledger: &Arc<MemoryLedger>) -> Store {
        let store = Store::open_in_memory().unwrap();
        store.share(ledger.clone()).unwrap();
        store
    }

    #[test]
    fn a_write_on_one_node_is_read_on_every_node() {
        let ledger = Arc::new(MemoryLedger::default());
        let (a, b) = (node(&ledger), node(&ledger));
        a.add_user(&name("alice"), "$argon2id$a", "test").unwrap();
        let pw = a
            .add_app_password(&name("alice"), "mail", "phone", "$argon2id$p", "test")
            .unwrap();
        // Task client ids are blobs, and their hash is looked up by value.
        a.add_task_client(&name("alice"), "laptop", &[0, 1, 0xfe, 0xff], "test")
            .unwrap();
        b.catch_up().unwrap();
        let alice = b.user(&name("alice")).unwrap().expect("alice on node b");
        assert_eq!(alice, a.user(&name("alice")).unwrap().unwrap());
        let creds = b
            .credentials(&name("alice"), Some("mail"))
            .unwrap()
            .unwrap();
        assert_eq!(
            creds,
            a.credentials(&name("alice"), Some("mail"))
                .unwrap()
                .unwrap()
        );
        assert_eq!(
            b.task_client_by_hash(&[0, 1, 0xfe, 0xff])
                .unwrap()
                .unwrap()
                .0,
            "alice"
        );
        // And back: b revokes, a sees it.
        let n = b
            .revoke_app_passwords(&name("alice"), &RevokeSelector::Id(pw.id), "test")
            .unwrap();
        assert_eq!(n, 1);
        a.catch_up().unwrap();
        assert!(
            a.list_app_passwords(&name("alice"), None)
                .unwrap()
                .is_empty()
        );
        // A delete cascades the same way everywhere.
        a.remove_user(&name("alice"), "test").unwrap();
        b.catch_up().unwrap();
        assert_eq!(b.user(&name("alice")).unwrap(), None);
        assert!(
            b.task_client_by_hash(&[0, 1, 0xfe, 0xff])
                .unwrap()
                .is_none()
        );
        assert_eq!(b.counts().unwrap(), a.counts().unwrap());
        // Audit events stay each node's own.
        assert!(!a.recent_events(10).unwrap().is_empty());
        assert!(
            b.recent_events(10)
                .unwrap()
                .iter()
                .all(|e| e.action != "user.add")
        );
    }

    /// Every shared row of a store, as the log would carry it.
    fn dump(store: &Store) -> Vec<String> {
        let conn = store.conn();
        let sharing = store.sharing.get().expect("shared");
        let mut rows: Vec<String> = sharing
            .everything(&conn)
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c.table, serde_json::Value::Object(c.row.clone())))
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn every_kind_of_shared_record_arrives_whole() {
        use granary_model::{MailAddress, MailDomain, UidRange};
        let ledger = Arc::new(MemoryLedger::default());
        let (a, b) = (node(&ledger), node(&ledger));
        let uids = crate::HostUid::FirstFreeIn(UidRange {
            start: 7000,
            count: 100,
        });
        a.add_user(&name("alice"), "$argon2id$a", "test").unwrap();
        b.add_user(&name("bob"), "$argon2id$b", "test").unwrap();
        a.install_app("hello", "org.test.hello", "1", "", false, "test")
            .unwrap();
        b.install_app("mail", "org.test.mail", "1", "", false, "test")
            .unwrap();
        a.ensure_grains(uids, "test").unwrap();
        let grant = b
            .add_grant("alice-hello", "bob-mail", "notify", "test")
            .unwrap();
        a.save_sturdy_ref(&[9; 32], "alice-hello", grant.id, "saved")
            .unwrap();
        a.add_app_password_with_scram(
            &name("bob"),
            "xmpp",
            "phone",
            "$argon2id$x",
            "scram",
            "test",
        )
        .unwrap();
        let domain = MailDomain::parse("example.org").unwrap();
        b.add_mail_domain(&domain, "test").unwrap();
        a.add_mail_alias(
            &MailAddress::parse("info@example.org").unwrap(),
            &name("alice"),
            "test",
        )
        .unwrap();
        b.add_ssh_key(
            &name("alice"),
            "ssh-ed25519 AAAA",
            "SHA256:x",
            "laptop",
            "test",
        )
        .unwrap();
        a.add_blog_domain(&name("alice"), "blog.example.org", "test")
            .unwrap();
        b.add_task_cert(&name("bob"), "laptop", "key", &[7; 32], i64::MAX, "test")
            .unwrap();
        a.add_invite(
            crate::InviteKind::Contact,
            Some(&name("alice")),
            None,
            &[5; 32],
            i64::MAX,
            1,
            "test",
        )
        .unwrap();
        a.catch_up().unwrap();
        b.catch_up().unwrap();
        let rows = dump(&a);
        for table in [
            "users",
            "apps",
            "grains",
            "grants",
            "sturdy_refs",
            "app_passwords",
            "mail_domains",
            "mail_aliases",
            "ssh_keys",
            "blog_domains",
            "task_certs",
            "invites",
        ] {
            assert!(
                rows.iter().any(|r| r.starts_with(&format!("{table} "))),
                "no {table} row in {rows:#?}"
            );
        }
        assert_eq!(rows, dump(&b));
        // Deletes and updates, from the other side.
        assert!(b.drop_sturdy_ref(&[9; 32], "alice-hello").unwrap());
        assert!(a.revoke_grant(grant.id, "test").unwrap());
        a.catch_up().unwrap();
        b.catch_up().unwrap();
        assert_eq!(dump(&a), dump(&b));
        assert!(!dump(&a).iter().any(|r| r.starts_with("sturdy_refs ")));
    }

    #[test]
    fn two_nodes_writing_at_once_never_diverge() {
        let ledger = Arc::new(MemoryLedger::default());
        let (a, b) = (node(&ledger), node(&ledger));
        b.catch_up().unwrap();
        a.add_user(&name("alice"), "$argon2id$a", "test").unwrap();
        // b has not seen alice when it writes: its entry would follow one
        // that is no longer last. Refused, and nothing written on b.
        ledger.blind.store(true, Ordering::SeqCst);
        let err = b
            .add_user(&name("alice"), "$argon2id$b", "test")
            .unwrap_err();
        assert!(matches!(err, StateError::Busy), "{err}");
        assert_eq!(b.user(&name("alice")).unwrap(), None);
        ledger.blind.store(false, Ordering::SeqCst);
        // Trying again reads alice first, and the rule applies as on one node.
        let err = b
            .add_user(&name("alice"), "$argon2id$b", "test")
            .unwrap_err();
        assert!(matches!(err, StateError::UserExists(_)), "{err}");
        assert_eq!(ledger.log.lock().unwrap().len(), 1);
    }

    #[test]
    fn nothing_is_written_when_the_log_is_out_of_reach() {
        let ledger = Arc::new(MemoryLedger::default());
        let a = node(&ledger);
        ledger.down.store(true, Ordering::SeqCst);
        let err = a
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap_err();
        assert!(matches!(err, StateError::Shared(_)), "{err}");
        ledger.down.store(false, Ordering::SeqCst);
        assert_eq!(a.user(&name("alice")).unwrap(), None);
        assert!(ledger.log.lock().unwrap().is_empty());
        // Reads never need the log.
        ledger.down.store(true, Ordering::SeqCst);
        assert!(a.list_users().unwrap().is_empty());
    }

    #[test]
    fn the_first_node_seeds_the_log_and_a_used_node_cannot_join() {
        let ledger = Arc::new(MemoryLedger::default());
        let first = Store::open_in_memory().unwrap();
        first
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap();
        first
            .add_app_password(&name("alice"), "mail", "phone", "$argon2id$p", "test")
            .unwrap();
        assert_eq!(
            first.share(ledger.clone()).unwrap(),
            Joined::Seeded { records: 2 }
        );
        let fresh = Store::open_in_memory().unwrap();
        assert_eq!(
            fresh.share(ledger.clone()).unwrap(),
            Joined::CaughtUp { applied: 1 }
        );
        assert_eq!(
            fresh.credentials(&name("alice"), Some("mail")).unwrap(),
            first.credentials(&name("alice"), Some("mail")).unwrap()
        );
        let used = Store::open_in_memory().unwrap();
        used.add_user(&name("bob"), "$argon2id$b", "test").unwrap();
        let err = used.share(ledger.clone()).unwrap_err();
        assert!(err.to_string().contains("empty state database"), "{err}");
        // A node that starts again resumes where it was.
        first
            .add_user(&name("carol"), "$argon2id$c", "test")
            .unwrap();
        assert_eq!(fresh.catch_up().unwrap(), 2);
        assert!(fresh.user(&name("carol")).unwrap().is_some());
    }

    #[test]
    fn ids_deleted_before_seeding_are_never_handed_out_again() {
        let ledger = Arc::new(MemoryLedger::default());
        let first = Store::open_in_memory().unwrap();
        first
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap();
        let a = first
            .add_task_client(&name("alice"), "one", &[1], "test")
            .unwrap();
        let b = first
            .add_task_client(&name("alice"), "two", &[2], "test")
            .unwrap();
        first
            .revoke_task_client(&name("alice"), b.id, "test")
            .unwrap();
        first.share(ledger.clone()).unwrap();
        let fresh = node(&ledger);
        let c = fresh
            .add_task_client(&name("alice"), "three", &[3], "test")
            .unwrap();
        assert!(c.id > b.id && b.id > a.id, "{a:?} {b:?} {c:?}");
        // A node-local touch is neither sent nor kept for the next write.
        let log_len = ledger.log.lock().unwrap().len();
        fresh.task_client_by_hash(&[3]).unwrap().unwrap();
        assert_eq!(ledger.log.lock().unwrap().len(), log_len);
        assert_eq!(
            fresh
                .conn()
                .query_row("SELECT count(*) FROM temp.share_changes", [], |r| r
                    .get::<_, i64>(0))
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_node_that_seeded_the_log_and_stopped_before_noting_it_starts_again() {
        let ledger = Arc::new(MemoryLedger::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let first = Store::open(&path).unwrap();
        first
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap();
        first.share(ledger.clone()).unwrap();
        // As if the answer to the seeding append had been lost.
        first
            .conn()
            .execute("UPDATE shared_log SET applied = 0", [])
            .unwrap();
        drop(first);
        let again = Store::open(&path).unwrap();
        assert_eq!(
            again.share(ledger.clone()).unwrap(),
            Joined::Seeded { records: 1 }
        );
        assert_eq!(ledger.log.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_database_that_followed_one_cluster_never_follows_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let one = Arc::new(MemoryLedger::default());
        *one.name.lock().unwrap() = "cluster-one".into();
        let store = Store::open(&path).unwrap();
        store.share(one.clone()).unwrap();
        store
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap();
        drop(store);
        let two = Arc::new(MemoryLedger::default());
        *two.name.lock().unwrap() = "cluster-two".into();
        let err = Store::open(&path).unwrap().share(two).unwrap_err();
        assert!(err.to_string().contains("cluster cluster-one"), "{err}");
        Store::open(&path).unwrap().share(one).unwrap();
    }

    #[test]
    fn an_entry_from_another_schema_is_refused_loudly() {
        let ledger = Arc::new(MemoryLedger::default());
        let a = node(&ledger);
        ledger
            .log
            .lock()
            .unwrap()
            .push(serde_json::to_vec(&serde_json::json!({"schema": 999, "changes": []})).unwrap());
        let err = a.catch_up().unwrap_err();
        assert!(
            err.to_string().contains("same granary on every node"),
            "{err}"
        );
        let err = a
            .add_user(&name("alice"), "$argon2id$a", "test")
            .unwrap_err();
        assert!(matches!(err, StateError::Shared(_)), "{err}");
    }
}
