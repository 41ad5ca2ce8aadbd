//! The account on disk: one SQLite database in the grain's dataset
//! (`/var/xmpp/chat.db`, WAL). Every change is a committed transaction
//! before the grain answers for it (a roster push, an archived message).
//! Commits survive the grain's or the host's crash; only a message kept
//! for an offline user is also fsynced before the host's delivery call
//! returns (`synchronous = FULL` for that commit): the rest is fsynced at
//! the next checkpoint, so a power cut can lose the last moments of the
//! archive and roster, never a message nobody has received.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
#[error("the chat store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

pub type Result<T> = std::result::Result<T, StoreError>;

/// A roster item's subscription (RFC 6121 §2.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    None,
    To,
    From,
    Both,
}

impl Sub {
    pub fn as_str(self) -> &'static str {
        match self {
            Sub::None => "none",
            Sub::To => "to",
            Sub::From => "from",
            Sub::Both => "both",
        }
    }

    fn parse(s: &str) -> Sub {
        match s {
            "to" => Sub::To,
            "from" => Sub::From,
            "both" => Sub::Both,
            _ => Sub::None,
        }
    }

    /// The user receives the contact's presence.
    pub fn to(self) -> bool {
        matches!(self, Sub::To | Sub::Both)
    }

    /// The contact receives the user's presence.
    pub fn from(self) -> bool {
        matches!(self, Sub::From | Sub::Both)
    }

    pub fn with_to(self, on: bool) -> Sub {
        Sub::of(on, self.from())
    }

    pub fn with_from(self, on: bool) -> Sub {
        Sub::of(self.to(), on)
    }

    fn of(to: bool, from: bool) -> Sub {
        match (to, from) {
            (true, true) => Sub::Both,
            (true, false) => Sub::To,
            (false, true) => Sub::From,
            (false, false) => Sub::None,
        }
    }
}

/// One contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The contact's bare address.
    pub jid: String,
    pub name: Option<String>,
    pub sub: Sub,
    /// The user asked to subscribe and has no answer yet (`ask='subscribe'`).
    pub ask: bool,
    pub groups: Vec<String>,
}

impl Item {
    pub fn new(jid: &str) -> Item {
        Item {
            jid: jid.to_owned(),
            name: None,
            sub: Sub::None,
            ask: false,
            groups: Vec::new(),
        }
    }
}

/// One archived message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Its stanza id (XEP-0359) and MAM id.
    pub id: String,
    /// Milliseconds since the epoch.
    pub ts: i64,
    pub stanza: String,
}

/// What a MAM query asks for (XEP-0313 with XEP-0059 paging).
#[derive(Debug, Clone, Default)]
pub struct ArchiveQuery {
    pub with: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub after: Option<String>,
    pub before: Option<String>,
    /// `<before/>` with no id: the last page.
    pub last_page: bool,
    pub max: usize,
}

/// A page of the archive.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<Archived>,
    /// No more results beyond this page in the direction asked.
    pub complete: bool,
    /// How many match the filters, regardless of paging.
    pub count: u64,
}

/// An upload slot, or the file uploaded into it (XEP-0363).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub name: String,
    pub size: u64,
    pub content_type: String,
    /// The file is there (the slot was used).
    pub stored: bool,
    /// Until when the slot takes its upload (Unix seconds).
    pub slot_until: i64,
    /// When the file is deleted.
    pub expires_at: i64,
}

pub struct Store {
    /// The directory the store is in (uploads live beside it).
    pub dir: std::path::PathBuf,
    conn: Mutex<Connection>,
    /// Offline messages and their bytes, once counted.
    offline_totals: Mutex<Option<(u64, u64)>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS roster (
    jid TEXT PRIMARY KEY, name TEXT, sub TEXT NOT NULL, ask INTEGER NOT NULL,
    groups TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_in (jid TEXT PRIMARY KEY, stanza TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offline (id INTEGER PRIMARY KEY, stanza TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS archive (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, ts INTEGER NOT NULL,
    with_jid TEXT NOT NULL, stanza TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS archive_with ON archive (with_jid, seq);
CREATE TABLE IF NOT EXISTS pep_nodes (
    node TEXT PRIMARY KEY, access TEXT NOT NULL, max_items INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pep_items (
    node TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS blocked (jid TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL,
    content_type TEXT NOT NULL, stored INTEGER NOT NULL DEFAULT 0,
    slot_until INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS push (
    jid TEXT NOT NULL, node TEXT NOT NULL, options TEXT NOT NULL, PRIMARY KEY (jid, node));
";

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let conn = Connection::open(dir.join("chat.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            dir: dir.to_owned(),
            conn: Mutex::new(conn),
            offline_totals: Mutex::new(None),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the WAL back into the database, for a snapshot.
    pub fn checkpoint(&self) -> Result<String> {
        self.conn()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        let (contacts, archived) = self.sizes()?;
        Ok(format!(
            "checkpointed: {contacts} contacts, {archived} archived messages"
        ))
    }

    /// Contacts and archived messages.
    pub fn sizes(&self) -> Result<(u64, u64)> {
        let c = self.conn();
        let contacts: i64 = c.query_row("SELECT count(*) FROM roster", [], |r| r.get(0))?;
        let archived: i64 = c.query_row("SELECT count(*) FROM archive", [], |r| r.get(0))?;
        Ok((contacts as u64, archived as u64))
    }

    fn meta(c: &Connection, key: &str) -> Result<Option<String>> {
        Ok(
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?,
        )
    }

    fn set_meta(c: &Connection, key: &str, value: &str) -> Result<()> {
        c.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    // The roster.

    pub fn roster_version(&self) -> Result<u64> {
        let c = self.conn();
        Ok(Self::meta(&c, "roster_ver")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    fn bump_version(c: &Connection) -> Result<u64> {
        let v = Self::meta(c, "roster_ver")?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        Self::set_meta(c, "roster_ver", &v.to_string())?;
        Ok(v)
    }

    fn item_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Item> {
        let groups: String = r.get(4)?;
        Ok(Item {
            jid: r.get(0)?,
            name: r.get(1)?,
            sub: Sub::parse(&r.get::<_, String>(2)?),
            ask: r.get::<_, i64>(3)? != 0,
            groups: groups
                .split('\n')
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    pub fn roster(&self) -> Result<Vec<Item>> {
        let c = self.conn();
        let mut stmt =
            c.prepare_cached("SELECT jid, name, sub, ask, groups FROM roster ORDER BY jid")?;
        let rows = stmt.query_map([], Self::item_of)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn item(&self, jid: &str) -> Result<Option<Item>> {
        let c = self.conn();
        let mut stmt =
            c.prepare_cached("SELECT jid, name, sub, ask, groups FROM roster WHERE jid = ?1")?;
        Ok(stmt.query_row([jid], Self::item_of).optional()?)
    }

    /// Adds or replaces an item; the new roster version.
    pub fn put_item(&self, item: &Item) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO roster (jid, name, sub, ask, groups) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (jid) DO UPDATE SET name = excluded.name, sub = excluded.sub,
               ask = excluded.ask, groups = excluded.groups",
            params![
                item.jid,
                item.name,
                item.sub.as_str(),
                item.ask as i64,
                item.groups.join("\n")
            ],
        )?;
        let v = Self::bump_version(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    /// Removes an item (and any pending request from it); the new version.
    pub fn remove_item(&self, jid: &str) -> Result<u64> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM roster WHERE jid = ?1", [jid])?;
        tx.execute("DELETE FROM pending_in WHERE jid = ?1", [jid])?;
        let v = Self::bump_version(&tx)?;
        tx.commit()?;
        Ok(v)
    }

    // Subscription requests waiting for the user's answer.

    pub fn add_pending(&self, jid: &str, stanza: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO pending_in (jid, stanza) VALUES (?1, ?2)
             ON CONFLICT (jid) DO UPDATE SET stanza = excluded.stanza",
            params![jid, stanza],
        )?;
        Ok(())
    }

    pub fn remove_pending(&self, jid: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM pending_in WHERE jid = ?1", [jid])?
            > 0)
    }

    pub fn is_pending(&self, jid: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM pending_in WHERE jid = ?1", [jid], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub fn pending(&self) -> Result<Vec<String>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached("SELECT stanza FROM pending_in ORDER BY jid")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // Offline messages.

    /// Keeps a message for the user's next login, fsynced before it
    /// returns (the sender's grain is told it was delivered only then).
    pub fn push_offline(&self, stanza: &str) -> Result<()> {
        let c = self.conn();
        c.pragma_update(None, "synchronous", "FULL")?;
        let done = c.execute("INSERT INTO offline (stanza) VALUES (?1)", [stanza]);
        c.pragma_update(None, "synchronous", "NORMAL")?;
        done?;
        if let Some((n, bytes)) = self
            .offline_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            *n += 1;
            *bytes += stanza.len() as u64;
        }
        Ok(())
    }

    /// Offline messages kept, and their bytes (counted once, then kept
    /// up to date, so a full store costs no scan per message).
    pub fn offline_size(&self) -> Result<(u64, u64)> {
        if let Some(totals) = *self
            .offline_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        {
            return Ok(totals);
        }
        let (n, bytes): (i64, i64) = self.conn().query_row(
            "SELECT count(*), coalesce(sum(length(stanza)), 0) FROM offline",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let totals = (n as u64, bytes as u64);
        *self
            .offline_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(totals);
        Ok(totals)
    }

    pub fn offline_count(&self) -> Result<u64> {
        let n: i64 = self
            .conn()
            .query_row("SELECT count(*) FROM offline", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// The oldest `limit` offline messages; `forget_offline` removes them
    /// once delivered.
    pub fn offline(&self, limit: usize) -> Result<Vec<(i64, String)>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached("SELECT id, stanza FROM offline ORDER BY id LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn forget_offline(&self, up_to: i64) -> Result<()> {
        self.conn()
            .execute("DELETE FROM offline WHERE id <= ?1", [up_to])?;
        *self
            .offline_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    // The archive.

    pub fn archive(&self, id: &str, ts: i64, with: &str, stanza: &str) -> Result<()> {
        self.archive_many(
            &[Archived {
                id: id.to_owned(),
                ts,
                stanza: stanza.to_owned(),
            }],
            &[with.to_owned()],
        )
    }

    /// Archives several messages in one transaction (`with[i]` is the
    /// other party of `items[i]`).
    pub fn archive_many(&self, items: &[Archived], with: &[String]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO archive (id, ts, with_jid, stanza) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (a, w) in items.iter().zip(with) {
                stmt.execute(params![a.id, a.ts, w, a.stanza])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn seq_of(c: &Connection, id: &str) -> Result<Option<i64>> {
        Ok(
            c.query_row("SELECT seq FROM archive WHERE id = ?1", [id], |r| r.get(0))
                .optional()?,
        )
    }

    /// A page of archived messages, oldest first. `Ok(None)` when an
    /// `after` or `before` id is not in the archive (item-not-found).
    pub fn query(&self, q: &ArchiveQuery) -> Result<Option<Page>> {
        let c = self.conn();
        let mut filter = String::from("1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(w) = &q.with {
            args.push(w.clone().into());
            filter.push_str(&format!(" AND with_jid = ?{}", args.len()));
        }
        if let Some(s) = q.start {
            args.push(s.into());
            filter.push_str(&format!(" AND ts >= ?{}", args.len()));
        }
        if let Some(e) = q.end {
            args.push(e.into());
            filter.push_str(&format!(" AND ts <= ?{}", args.len()));
        }
        let count: i64 = c.query_row(
            &format!("SELECT count(*) FROM archive WHERE {filter}"),
            rusqlite::params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        let mut paged = filter.clone();
        let mut page_args = args.clone();
        for (id, op) in [(&q.after, ">"), (&q.before, "<")] {
            if let Some(id) = id {
                let Some(seq) = Self::seq_of(&c, id)? else {
                    return Ok(None);
                };
                page_args.push(seq.into());
                paged.push_str(&format!(" AND seq {op} ?{}", page_args.len()));
            }
        }
        let backwards = q.before.is_some() || q.last_page;
        let order = if backwards { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT id, ts, stanza FROM archive WHERE {paged} ORDER BY seq {order} LIMIT {}",
            q.max + 1
        );
        let mut stmt = c.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(page_args.iter()), |r| {
            Ok(Archived {
                id: r.get(0)?,
                ts: r.get(1)?,
                stanza: r.get(2)?,
            })
        })?;
        let mut items: Vec<Archived> = rows.collect::<rusqlite::Result<_>>()?;
        let complete = items.len() <= q.max;
        items.truncate(q.max);
        if backwards {
            items.reverse();
        }
        Ok(Some(Page {
            items,
            complete,
            count: count as u64,
        }))
    }

    // vCard-temp.

    pub fn vcard(&self) -> Result<Option<String>> {
        Self::meta(&self.conn(), "vcard")
    }

    pub fn set_vcard(&self, xml: &str) -> Result<()> {
        Self::set_meta(&self.conn(), "vcard", xml)
    }

    // PEP.

    /// Stores an item, creating the node with `access` and `max_items` if
    /// it is new (an existing node keeps its own), keeping at most the
    /// node's `max_items` items.
    pub fn publish(
        &self,
        node: &str,
        id: &str,
        payload: &str,
        access: &str,
        max_items: u32,
    ) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        // A node keeps the options it was made with.
        tx.execute(
            "INSERT INTO pep_nodes (node, access, max_items) VALUES (?1, ?2, ?3)
             ON CONFLICT (node) DO NOTHING",
            params![node, access, max_items],
        )?;
        let max_items: u32 = tx.query_row(
            "SELECT max_items FROM pep_nodes WHERE node = ?1",
            [node],
            |r| r.get(0),
        )?;
        let seq: i64 = tx.query_row(
            "SELECT coalesce(max(seq), 0) + 1 FROM pep_items WHERE node = ?1",
            [node],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO pep_items (node, id, seq, payload) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (node, id) DO UPDATE SET seq = excluded.seq, payload = excluded.payload",
            params![node, id, seq, payload],
        )?;
        tx.execute(
            "DELETE FROM pep_items WHERE node = ?1 AND seq <= ?2",
            params![node, seq - max_items as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The node's access model and item limit, if it exists.
    pub fn node_config(&self, node: &str) -> Result<Option<(String, u32)>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT access, max_items FROM pep_nodes WHERE node = ?1",
                [node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// The node's access model, if it exists.
    pub fn node_access(&self, node: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT access FROM pep_nodes WHERE node = ?1",
                [node],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Items of a node, newest first: all, or those with the given ids.
    pub fn items(&self, node: &str, ids: &[String], max: usize) -> Result<Vec<(String, String)>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(
            "SELECT id, payload FROM pep_items WHERE node = ?1 ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map([node], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, payload): (String, String) = row?;
            if ids.is_empty() || ids.contains(&id) {
                out.push((id, payload));
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    pub fn retract(&self, node: &str, id: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM pep_items WHERE node = ?1 AND id = ?2",
            params![node, id],
        )? > 0)
    }

    pub fn delete_node(&self, node: &str) -> Result<bool> {
        let c = self.conn();
        c.execute("DELETE FROM pep_items WHERE node = ?1", [node])?;
        Ok(c.execute("DELETE FROM pep_nodes WHERE node = ?1", [node])? > 0)
    }

    pub fn nodes(&self) -> Result<Vec<(String, String)>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached("SELECT node, access FROM pep_nodes ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // Blocking.

    pub fn add_upload_slot(
        &self,
        id: &str,
        name: &str,
        size: u64,
        content_type: &str,
        slot_until: i64,
        expires_at: i64,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO uploads (id, name, size, content_type, slot_until, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, name, size as i64, content_type, slot_until, expires_at],
        )?;
        Ok(())
    }

    pub fn upload(&self, id: &str) -> Result<Option<Upload>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, size, content_type, stored, slot_until, expires_at
                 FROM uploads WHERE id = ?1",
                [id],
                |r| {
                    Ok(Upload {
                        name: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        content_type: r.get(2)?,
                        stored: r.get(3)?,
                        slot_until: r.get(4)?,
                        expires_at: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    /// The file of slot `id` is in place (written and synced first);
    /// `false` when the slot is gone or was used already.
    pub fn upload_stored(&self, id: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE uploads SET stored = 1 WHERE id = ?1 AND NOT stored",
            [id],
        )?;
        Ok(n == 1)
    }

    /// Slots still open, and the bytes of files and open slots together.
    pub fn upload_usage(&self, now: i64) -> Result<(u64, u64)> {
        Ok(self.conn().query_row(
            "SELECT coalesce(sum(NOT stored), 0), coalesce(sum(size), 0) FROM uploads
             WHERE (stored AND expires_at > ?1) OR (NOT stored AND slot_until > ?1)",
            [now],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// Forgets expired files and unused slots past their time, except
    /// `busy` ones (being uploaded to); their ids (whose files the caller
    /// deletes).
    pub fn expire_uploads(&self, now: i64, busy: &[String]) -> Result<Vec<String>> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let due: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM uploads WHERE (stored AND expires_at <= ?1)
                    OR (NOT stored AND slot_until <= ?1)",
            )?;
            let rows = stmt.query_map([now], |r| r.get(0))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        let due: Vec<String> = due.into_iter().filter(|id| !busy.contains(id)).collect();
        for id in &due {
            tx.execute("DELETE FROM uploads WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(due)
    }

    /// Keeps a push registration (XEP-0357), replacing one for the same
    /// app server and node; `false` when the account has `max` already.
    pub fn push_add(&self, jid: &str, node: &str, options: &str, max: u64) -> Result<bool> {
        let c = self.conn();
        let (count, exists): (i64, bool) = c.query_row(
            "SELECT count(*), coalesce(sum(jid = ?1 AND node = ?2), 0) > 0 FROM push",
            params![jid, node],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if !exists && count as u64 >= max {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO push (jid, node, options) VALUES (?1, ?2, ?3)
             ON CONFLICT (jid, node) DO UPDATE SET options = excluded.options",
            params![jid, node, options],
        )?;
        Ok(true)
    }

    /// Drops the registrations for an app server (one node, or all).
    pub fn push_remove(&self, jid: &str, node: Option<&str>) -> Result<usize> {
        Ok(self.conn().execute(
            "DELETE FROM push WHERE jid = ?1 AND (?2 IS NULL OR node = ?2)",
            params![jid, node],
        )?)
    }

    /// Every push registration: (app server, node, publish options).
    pub fn push_registrations(&self) -> Result<Vec<(String, String, String)>> {
        let c = self.conn();
        let mut stmt = c.prepare("SELECT jid, node, options FROM push ORDER BY jid, node")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn blocked(&self) -> Result<Vec<String>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached("SELECT jid FROM blocked ORDER BY jid")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn block(&self, jids: &[String]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        for j in jids {
            tx.execute("INSERT OR IGNORE INTO blocked (jid) VALUES (?1)", [j])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Unblocks `jids`, or everyone when empty.
    pub fn unblock(&self, jids: &[String]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        if jids.is_empty() {
            tx.execute("DELETE FROM blocked", [])?;
        }
        for j in jids {
            tx.execute("DELETE FROM blocked WHERE jid = ?1", [j])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether `jid` (full or bare) is blocked: the full address, the
    /// bare one, or its domain.
    pub fn is_blocked(&self, full: &str, bare: &str, domain: &str) -> Result<bool> {
        let c = self.conn();
        let mut stmt = c.prepare_cached("SELECT 1 FROM blocked WHERE jid IN (?1, ?2, ?3)")?;
        Ok(stmt
            .query_row(params![full, bare, domain], |_| Ok(()))
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roster_versions_and_archive_pages() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.roster_version().unwrap(), 0);
        let mut bob = Item::new("bob@example.org");
        bob.sub = Sub::To;
        bob.groups = vec!["Friends".into()];
        assert_eq!(s.put_item(&bob).unwrap(), 1);
        assert_eq!(s.item("bob@example.org").unwrap().unwrap(), bob);
        assert_eq!(s.remove_item("bob@example.org").unwrap(), 2);
        for i in 0..10 {
            s.archive(
                &format!("id{i}"),
                i,
                if i % 2 == 0 { "a@x" } else { "b@x" },
                "<m/>",
            )
            .unwrap();
        }
        let q = |f: &dyn Fn(&mut ArchiveQuery)| {
            let mut q = ArchiveQuery {
                max: 3,
                ..Default::default()
            };
            f(&mut q);
            s.query(&q).unwrap().unwrap()
        };
        let first = q(&|_| {});
        assert_eq!(
            first
                .items
                .iter()
                .map(|a| a.id.as_str())
                .collect::<Vec<_>>(),
            ["id0", "id1", "id2"]
        );
        assert!(!first.complete);
        assert_eq!(first.count, 10);
        let next = q(&|q| q.after = Some("id8".into()));
        assert_eq!(next.items.len(), 1);
        assert!(next.complete);
        let last = q(&|q| q.last_page = true);
        assert_eq!(
            last.items.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["id7", "id8", "id9"]
        );
        let with = q(&|q| {
            q.with = Some("a@x".into());
            q.before = Some("id6".into());
        });
        assert_eq!(
            with.items.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["id0", "id2", "id4"]
        );
        assert!(
            s.query(&ArchiveQuery {
                after: Some("nope".into()),
                max: 5,
                ..Default::default()
            })
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn offline_totals_follow_pushes_and_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.offline_size().unwrap(), (0, 0));
        for m in ["<a/>", "<bb/>", "<ccc/>"] {
            s.push_offline(m).unwrap();
        }
        assert_eq!(s.offline_size().unwrap(), (3, 4 + 5 + 6));
        let first_two = s.offline(2).unwrap();
        assert_eq!(first_two.len(), 2);
        s.forget_offline(first_two[1].0).unwrap();
        assert_eq!(s.offline_size().unwrap(), (1, 6));
        assert_eq!(s.offline(10).unwrap()[0].1, "<ccc/>");
    }

    #[test]
    fn pep_keeps_max_items() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            s.publish("n", &format!("i{i}"), "<x/>", "presence", 1)
                .unwrap();
        }
        assert_eq!(
            s.items("n", &[], 10).unwrap(),
            vec![("i2".to_owned(), "<x/>".to_owned())]
        );
        s.publish("bm", "a", "<a/>", "whitelist", 1000).unwrap();
        s.publish("bm", "b", "<b/>", "whitelist", 1000).unwrap();
        assert_eq!(s.items("bm", &[], 10).unwrap().len(), 2);
        assert_eq!(s.node_access("bm").unwrap().as_deref(), Some("whitelist"));
    }
}
