//! A room on disk: one SQLite database in the room grain's dataset
//! (`/var/xmpp/room.db`, WAL, `synchronous = FULL`): its settings, the
//! affiliations, who is in it, and its history (which is also the room's
//! message archive, XEP-0313). A message is committed before anyone sees
//! it, so what was shown was kept.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Affiliation, Role};

#[derive(Debug, thiserror::Error)]
#[error("the room store: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

pub type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS affiliations (
    jid         TEXT PRIMARY KEY,
    affiliation TEXT NOT NULL
) STRICT;
-- Who is in the room, so a room grain that was stopped while people sat
-- in it still knows them when it starts again.
CREATE TABLE IF NOT EXISTS occupants (
    full TEXT PRIMARY KEY,
    nick TEXT NOT NULL,
    role TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS history (
    n      INTEGER PRIMARY KEY,
    id     TEXT    NOT NULL UNIQUE,
    ts     INTEGER NOT NULL,
    stanza TEXT    NOT NULL
) STRICT;
";

/// One kept message: the stanza as it was sent to the occupants (from
/// `room@rooms.<domain>/<nick>`, no `to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub id: String,
    pub ts: i64,
    pub stanza: String,
}

/// A search of the history (XEP-0313 with XEP-0059 paging).
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub after: Option<String>,
    pub before: Option<String>,
    /// The last page (`<before/>` empty).
    pub last_page: bool,
    pub max: usize,
}

pub struct Page {
    pub items: Vec<Kept>,
    pub count: u64,
    /// Nothing more in the direction of paging.
    pub complete: bool,
}

pub struct RoomStore {
    conn: Connection,
}

impl RoomStore {
    pub fn open(dir: &Path) -> Result<RoomStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("{}: {e}", dir.display())),
            ))
        })?;
        let conn = Connection::open(dir.join("room.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(RoomStore { conn })
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Sets these settings, all or none.
    pub fn set_settings(&self, pairs: &[(&str, &str)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        for (key, value) in pairs {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn affiliation(&self, jid: &str) -> Result<Affiliation> {
        let a: Option<String> = self
            .conn
            .query_row(
                "SELECT affiliation FROM affiliations WHERE jid = ?1",
                [jid],
                |r| r.get(0),
            )
            .optional()?;
        Ok(a.and_then(|a| Affiliation::parse(&a))
            .unwrap_or(Affiliation::None))
    }

    pub fn set_affiliation(&self, jid: &str, a: Affiliation) -> Result<()> {
        self.set_affiliations(&[(jid.to_owned(), a)])
    }

    /// Sets these affiliations, all or none.
    pub fn set_affiliations(&self, changes: &[(String, Affiliation)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        for (jid, a) in changes {
            if *a == Affiliation::None {
                tx.execute("DELETE FROM affiliations WHERE jid = ?1", [jid])?;
            } else {
                tx.execute(
                    "INSERT INTO affiliations (jid, affiliation) VALUES (?1, ?2)
                     ON CONFLICT (jid) DO UPDATE SET affiliation = excluded.affiliation",
                    params![jid, a.as_str()],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The addresses with affiliation `a`, sorted.
    pub fn with_affiliation(&self, a: Affiliation) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT jid FROM affiliations WHERE affiliation = ?1 ORDER BY jid")?;
        let rows = stmt.query_map([a.as_str()], |r| r.get(0))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn put_occupant(&self, full: &str, nick: &str, role: Role) -> Result<()> {
        self.conn.execute(
            "INSERT INTO occupants (full, nick, role) VALUES (?1, ?2, ?3)
             ON CONFLICT (full) DO UPDATE SET nick = excluded.nick, role = excluded.role",
            params![full, nick, role.as_str()],
        )?;
        Ok(())
    }

    pub fn drop_occupant(&self, full: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM occupants WHERE full = ?1", [full])?;
        Ok(())
    }

    /// Everyone in the room: (full address, nick, role).
    pub fn occupants(&self) -> Result<Vec<(String, String, Role)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT full, nick, role FROM occupants ORDER BY nick, full")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (full, nick, role) = row?;
            out.push((full, nick, Role::parse(&role).unwrap_or(Role::Participant)));
        }
        Ok(out)
    }

    pub fn keep(&self, m: &Kept) -> Result<()> {
        self.conn.execute(
            "INSERT INTO history (id, ts, stanza) VALUES (?1, ?2, ?3)",
            params![m.id, m.ts, m.stanza],
        )?;
        Ok(())
    }

    /// The last `n` messages since `since` (ms), oldest first.
    pub fn recent(&self, n: usize, since: Option<i64>) -> Result<Vec<Kept>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, ts, stanza FROM (
                 SELECT n, id, ts, stanza FROM history WHERE ts >= ?2 ORDER BY n DESC LIMIT ?1
             ) ORDER BY n",
        )?;
        let rows = stmt.query_map(params![n as i64, since.unwrap_or(i64::MIN)], kept)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn history_len(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM history", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// One page of the history; `None` when `after` or `before` names a
    /// message that is not in it.
    pub fn query(&self, q: &HistoryQuery) -> Result<Option<Page>> {
        let position = |id: &str| -> Result<Option<i64>> {
            Ok(self
                .conn
                .query_row("SELECT n FROM history WHERE id = ?1", [id], |r| r.get(0))
                .optional()?)
        };
        let after = match &q.after {
            Some(id) => match position(id)? {
                Some(n) => Some(n),
                None => return Ok(None),
            },
            None => None,
        };
        let before = match &q.before {
            Some(id) => match position(id)? {
                Some(n) => Some(n),
                None => return Ok(None),
            },
            None => None,
        };
        let (start, end) = (q.start.unwrap_or(i64::MIN), q.end.unwrap_or(i64::MAX));
        let count = self.conn.query_row(
            "SELECT count(*) FROM history WHERE ts BETWEEN ?1 AND ?2",
            params![start, end],
            |r| r.get::<_, i64>(0),
        )? as u64;
        let backwards = before.is_some() || q.last_page;
        let (lo, hi) = (after.unwrap_or(i64::MIN), before.unwrap_or(i64::MAX));
        let sql = if backwards {
            "SELECT id, ts, stanza FROM history WHERE ts BETWEEN ?1 AND ?2 AND n > ?3 AND n < ?4
             ORDER BY n DESC LIMIT ?5"
        } else {
            "SELECT id, ts, stanza FROM history WHERE ts BETWEEN ?1 AND ?2 AND n > ?3 AND n < ?4
             ORDER BY n LIMIT ?5"
        };
        // One more than asked tells whether the page is the last.
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(params![start, end, lo, hi, (q.max + 1) as i64], kept)?;
        let mut items: Vec<Kept> = rows.collect::<std::result::Result<_, _>>()?;
        let complete = items.len() <= q.max;
        items.truncate(q.max);
        if backwards {
            items.reverse();
        }
        Ok(Some(Page {
            items,
            count,
            complete,
        }))
    }

    /// Makes everything committed part of the main database file (before
    /// a snapshot); answers what was done.
    pub fn checkpoint(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok("room store checkpointed".to_owned())
    }
}

fn kept(r: &rusqlite::Row<'_>) -> rusqlite::Result<Kept> {
    Ok(Kept {
        id: r.get(0)?,
        ts: r.get(1)?,
        stanza: r.get(2)?,
    })
}
