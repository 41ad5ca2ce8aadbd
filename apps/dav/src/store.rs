//! The grain's collections: one file per object under `objects/`, named by
//! a hash of the object's name and content, and an SQLite index (WAL) of
//! collections, objects, their ETags, time ranges, sync history and dead
//! properties.
//!
//! A write is durable before it is acknowledged, at the cost of one fsync:
//! the index row and the content (in `pending`) commit in one transaction.
//! A background thread then writes each pending content to its file (temp
//! name, fsync, rename), fsyncs the directories once per batch, and only
//! then drops the pending copy; reads take the pending copy while there is
//! one. A crash anywhere leaves the content in one of the two places, and
//! at most an unreferenced file, removed at the next open.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

/// What a collection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Calendar,
    AddressBook,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Calendar => "calendar",
            Kind::AddressBook => "addressbook",
        }
    }

    fn parse(s: &str) -> Kind {
        if s == "addressbook" {
            Kind::AddressBook
        } else {
            Kind::Calendar
        }
    }

    /// The top-level path segment of this kind's homes.
    pub fn home_segment(self) -> &'static str {
        match self {
            Kind::Calendar => "calendars",
            Kind::AddressBook => "addressbooks",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Kind::Calendar => "text/calendar; charset=utf-8",
            Kind::AddressBook => "text/vcard; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Collection {
    pub id: i64,
    pub kind: Kind,
    pub name: String,
    pub display_name: String,
    pub color: String,
    pub description: String,
    /// Component types a calendar accepts (VEVENT, VTODO, VJOURNAL).
    pub components: Vec<String>,
    /// Random per collection: a sync token of a collection deleted and
    /// made again under the same name is not valid for the new one.
    pub incarnation: String,
    /// The number of the last change.
    pub seq: i64,
}

impl Collection {
    /// The RFC 6578 sync token (also the ctag).
    pub fn sync_token(&self) -> String {
        sync_token(&self.incarnation, self.seq)
    }
}

pub fn sync_token(incarnation: &str, seq: i64) -> String {
    format!("https://granary.invalid/sync/{incarnation}/{seq}")
}

/// The change number a token of this collection stands for; `None` for a
/// token of another collection (or incarnation), a malformed one, or one
/// from the future (the data was restored from an older snapshot).
pub fn parse_sync_token(c: &Collection, token: &str) -> Option<i64> {
    let rest = token.strip_prefix("https://granary.invalid/sync/")?;
    let (inc, seq) = rest.split_once('/')?;
    let seq: i64 = seq.parse().ok()?;
    (inc == c.incarnation && (0..=c.seq).contains(&seq)).then_some(seq)
}

/// What the index knows of one object.
#[derive(Debug, Clone)]
pub struct Object {
    pub name: String,
    pub uid: String,
    /// Strong, quoted.
    pub etag: String,
    pub size: i64,
    /// VEVENT, VTODO, VJOURNAL, VCARD.
    pub component: String,
    /// The span of every instance, UTC seconds; `None`: unbounded that way.
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// One instance: `start`..`end` is exactly its span.
    pub single: bool,
    file: String,
}

/// What the content of an object says, for the index.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub uid: String,
    pub component: String,
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// One instance, whose span `start`..`end` is exact.
    pub single: bool,
}

/// Conditions on a write (RFC 7232).
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// `If-Match`: one of these ETags (or `*`: any existing).
    pub if_match: Option<Vec<String>>,
    /// `If-None-Match`: none of these (`*`: must not exist).
    pub if_none_match: Option<Vec<String>>,
}

impl Preconditions {
    fn hold(&self, current: Option<&str>) -> bool {
        // Strong comparison (RFC 7232 §3.1): a weak tag never matches.
        let listed =
            |list: &Vec<String>| list.iter().any(|t| t == "*" || Some(t.as_str()) == current);
        if let Some(m) = &self.if_match
            && (current.is_none() || !listed(m))
        {
            return false;
        }
        if let Some(n) = &self.if_none_match
            && current.is_some()
            && listed(n)
        {
            return false;
        }
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("precondition failed")]
    Precondition,
    #[error("{0} already exists")]
    Exists(String),
    #[error("another object in this collection has the UID {0}")]
    UidConflict(String, String),
    #[error("no such collection")]
    NoCollection,
    #[error("the object was deleted meanwhile")]
    Gone,
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("index: {0}")]
    Db(#[from] rusqlite::Error),
}

pub struct Store {
    dir: PathBuf,
    db: Mutex<Connection>,
    /// Set by writers, cleared by the file writer, which waits on `wake`.
    dirty: Mutex<bool>,
    wake: std::sync::Condvar,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS collections (
    -- Never reused: a collection's files live under its id.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    color TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    components TEXT NOT NULL DEFAULT '',
    incarnation TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (kind, name)
) STRICT;
CREATE TABLE IF NOT EXISTS objects (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    component TEXT NOT NULL,
    start INTEGER,
    end INTEGER,
    single INTEGER NOT NULL DEFAULT 0,
    file TEXT NOT NULL,
    PRIMARY KEY (collection_id, name),
    UNIQUE (collection_id, uid)
) STRICT;
CREATE TABLE IF NOT EXISTS changes (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (collection_id, name)
) STRICT;
CREATE INDEX IF NOT EXISTS changes_by_seq ON changes (collection_id, seq);
CREATE TABLE IF NOT EXISTS pending (
    collection_id INTEGER NOT NULL,
    file TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (collection_id, file)
) STRICT;
CREATE TABLE IF NOT EXISTS dead_props (
    path TEXT NOT NULL,
    key TEXT NOT NULL,
    xml TEXT NOT NULL,
    PRIMARY KEY (path, key)
) STRICT;
";

const COLLECTION_COLUMNS: &str =
    "id, kind, name, display_name, color, description, components, incarnation, seq";
const OBJECT_COLUMNS: &str = "name, uid, etag, size, component, start, end, file, single";

fn collection_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Collection> {
    let components: String = r.get(6)?;
    Ok(Collection {
        id: r.get(0)?,
        kind: Kind::parse(&r.get::<_, String>(1)?),
        name: r.get(2)?,
        display_name: r.get(3)?,
        color: r.get(4)?,
        description: r.get(5)?,
        components: components
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        incarnation: r.get(7)?,
        seq: r.get(8)?,
    })
}

fn object_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Object> {
    Ok(Object {
        name: r.get(0)?,
        uid: r.get(1)?,
        etag: r.get(2)?,
        size: r.get(3)?,
        component: r.get(4)?,
        start: r.get(5)?,
        end: r.get(6)?,
        file: r.get(7)?,
        single: r.get(8)?,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("the kernel's random source");
    hex(&b)
}

/// The strong ETag of some content.
pub fn etag_of(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    format!("\"{}\"", hex(&d.as_ref()[..16]))
}

/// What a new collection starts with.
#[derive(Debug, Clone, Default)]
pub struct NewCollection {
    pub display_name: String,
    pub color: String,
    pub description: String,
    pub components: Vec<String>,
}

/// A property a PROPPATCH may set on a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveProp {
    DisplayName,
    Color,
    Description,
}

impl Store {
    /// Opens (creating) the store in `dir`; removes files a crash left
    /// unreferenced.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir.join("objects"))?;
        let conn = Connection::open(dir.join("index.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        let store = Store {
            dir: dir.to_owned(),
            db: Mutex::new(conn),
            dirty: Mutex::new(true),
            wake: std::sync::Condvar::new(),
        };
        store.sweep()?;
        Ok(store)
    }

    /// Gives every collection a new incarnation, so no sync token handed
    /// out before holds: what the app does when its data was set back
    /// (a failover to an older copy, a snapshot rollback), as a token's
    /// change number could otherwise come to stand for other changes.
    pub fn new_incarnations(&self) -> Result<usize, StoreError> {
        let db = self.db();
        let ids: Vec<i64> = db
            .prepare("SELECT id FROM collections")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in &ids {
            db.execute(
                "UPDATE collections SET incarnation = ?1 WHERE id = ?2",
                params![random_hex(8), id],
            )?;
        }
        Ok(ids.len())
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes object files no index row names (left by a crash between
    /// writing a file and committing, or committing and removing).
    fn sweep(&self) -> Result<(), StoreError> {
        let db = self.db();
        let mut known = std::collections::HashSet::new();
        {
            let mut stmt = db.prepare("SELECT collection_id, file FROM objects")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (c, f) = row?;
                known.insert(format!("{c}/{f}"));
            }
        }
        for dir in std::fs::read_dir(self.dir.join("objects"))? {
            let dir = dir?;
            let c = dir.file_name().to_string_lossy().into_owned();
            let exists: bool = c.parse::<i64>().is_ok_and(|id| {
                db.query_row("SELECT 1 FROM collections WHERE id = ?1", [id], |_| Ok(()))
                    .optional()
                    .ok()
                    .flatten()
                    .is_some()
            });
            if !exists {
                std::fs::remove_dir_all(dir.path())?;
                continue;
            }
            for f in std::fs::read_dir(dir.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                if !known.contains(&format!("{c}/{name}")) {
                    std::fs::remove_file(f.path())?;
                }
            }
        }
        Ok(())
    }

    /// Makes the default calendar and address book the first time the
    /// store is used (never again, so a user may delete them).
    pub fn ensure_defaults(&self) -> Result<(), StoreError> {
        let made = self
            .db()
            .query_row("SELECT 1 FROM meta WHERE key = 'defaults'", [], |_| Ok(()))
            .optional()?
            .is_some();
        if made {
            return Ok(());
        }
        for (kind, name, display, components) in [
            (
                Kind::Calendar,
                "calendar",
                "Calendar",
                vec!["VEVENT".to_owned(), "VTODO".to_owned()],
            ),
            (Kind::AddressBook, "contacts", "Contacts", vec![]),
        ] {
            match self.create_collection(
                kind,
                name,
                &NewCollection {
                    display_name: display.to_owned(),
                    components,
                    ..NewCollection::default()
                },
            ) {
                Ok(_) | Err(StoreError::Exists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.db().execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('defaults', '1')",
            [],
        )?;
        Ok(())
    }

    pub fn collections(&self, kind: Kind) -> Result<Vec<Collection>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {COLLECTION_COLUMNS} FROM collections WHERE kind = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map([kind.as_str()], collection_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn collection(&self, kind: Kind, name: &str) -> Result<Option<Collection>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!(
                    "SELECT {COLLECTION_COLUMNS} FROM collections WHERE kind = ?1 AND name = ?2"
                ),
                params![kind.as_str(), name],
                collection_from_row,
            )
            .optional()?)
    }

    pub fn create_collection(
        &self,
        kind: Kind,
        name: &str,
        new: &NewCollection,
    ) -> Result<Collection, StoreError> {
        let db = self.db();
        let inserted = db.execute(
            "INSERT INTO collections (kind, name, display_name, color, description, components, incarnation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                kind.as_str(),
                name,
                new.display_name,
                new.color,
                new.description,
                new.components.join(","),
                random_hex(8)
            ],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Exists(name.to_owned()));
            }
            other => other?,
        };
        let id = db.last_insert_rowid();
        std::fs::create_dir_all(self.dir.join("objects").join(id.to_string()))?;
        // The directory's entry durable before any file in it is.
        std::fs::File::open(self.dir.join("objects"))?.sync_all()?;
        Ok(db.query_row(
            &format!("SELECT {COLLECTION_COLUMNS} FROM collections WHERE id = ?1"),
            [id],
            collection_from_row,
        )?)
    }

    /// Deletes a collection with its objects.
    pub fn delete_collection(&self, c: &Collection) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute("DELETE FROM collections WHERE id = ?1", [c.id])?;
        tx.execute("DELETE FROM pending WHERE collection_id = ?1", [c.id])?;
        let prefix = format!("{}/{}/", c.kind.home_segment(), c.name);
        tx.execute(
            "DELETE FROM dead_props WHERE path = ?1 OR substr(path, 1, length(?1)) = ?1",
            [&prefix],
        )?;
        tx.commit()?;
        drop(db);
        let _ = std::fs::remove_dir_all(self.dir.join("objects").join(c.id.to_string()));
        Ok(())
    }

    /// A PROPPATCH in one transaction: live properties of the collection
    /// (a change for its ctag and sync token) and dead properties of
    /// `path`, all or none.
    pub fn proppatch(
        &self,
        c: &Collection,
        changes: &[(LiveProp, String)],
        path: &str,
        dead: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        set_dead(&tx, path, dead)?;
        for (prop, value) in changes {
            let column = match prop {
                LiveProp::DisplayName => "display_name",
                LiveProp::Color => "color",
                LiveProp::Description => "description",
            };
            tx.execute(
                &format!("UPDATE collections SET {column} = ?1 WHERE id = ?2"),
                params![value, c.id],
            )?;
        }
        if !changes.is_empty() {
            // The ctag and sync token move, so clients refetch properties.
            tx.execute("UPDATE collections SET seq = seq + 1 WHERE id = ?1", [c.id])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn objects(&self, c: &Collection) -> Result<Vec<Object>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE collection_id = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map([c.id], object_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Objects whose span meets [start, end) (UTC seconds; `None`:
    /// unbounded), a superset of those with an instance in it.
    pub fn objects_in(
        &self,
        c: &Collection,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<Object>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE collection_id = ?1
             AND (?3 IS NULL OR start IS NULL OR start < ?3)
             AND (?2 IS NULL OR end IS NULL OR end >= ?2)
             ORDER BY name"
        ))?;
        let rows = stmt.query_map(params![c.id, start, end], object_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn object(&self, c: &Collection, name: &str) -> Result<Option<Object>, StoreError> {
        Ok(self
            .db()
            .query_row(
                &format!(
                    "SELECT {OBJECT_COLUMNS} FROM objects WHERE collection_id = ?1 AND name = ?2"
                ),
                params![c.id, name],
                object_from_row,
            )
            .optional()?)
    }

    /// An object's content.
    pub fn read(&self, c: &Collection, o: &Object) -> Result<Vec<u8>, StoreError> {
        let pending: Option<Vec<u8>> = self
            .db()
            .query_row(
                "SELECT data FROM pending WHERE collection_id = ?1 AND file = ?2",
                params![c.id, o.file],
                |r| r.get(0),
            )
            .optional()?;
        match pending {
            Some(data) => Ok(data),
            // Not pending: its file was written (and fsynced) first.
            None => match std::fs::read(self.file_path(c.id, &o.file)) {
                Ok(data) => Ok(data),
                // Replaced or deleted since `o` was read: the object as it
                // is now, or gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match self.object(c, &o.name)? {
                        Some(now) if now.file != o.file => self.read(c, &now),
                        _ => Err(StoreError::Gone),
                    }
                }
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Tells the file writer there is work.
    fn poke(&self) {
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_one();
    }

    /// Writes pending contents to their files until none is left; how many.
    pub fn materialize(&self) -> Result<usize, StoreError> {
        let mut done = 0;
        loop {
            // Keys first; each content is read, written and dropped in
            // turn, so memory holds one object at a time.
            let batch: Vec<(i64, String)> = {
                let db = self.db();
                let mut stmt = db.prepare("SELECT collection_id, file FROM pending LIMIT 256")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            if batch.is_empty() {
                return Ok(done);
            }
            let mut dirs = std::collections::BTreeSet::new();
            let mut written = Vec::new();
            for (c, file) in &batch {
                let data: Option<Vec<u8>> = self
                    .db()
                    .query_row(
                        "SELECT data FROM pending WHERE collection_id = ?1 AND file = ?2",
                        params![c, file],
                        |r| r.get(0),
                    )
                    .optional()?;
                // Gone meanwhile: replaced or deleted before it was written.
                let Some(data) = data else { continue };
                let path = self.file_path(*c, file);
                write_file(&path, &data)?;
                dirs.insert(path.parent().expect("in a directory").to_owned());
                written.push((*c, file.clone()));
            }
            for d in &dirs {
                std::fs::File::open(d)?.sync_all()?;
            }
            let mut orphans = Vec::new();
            {
                let mut db = self.db();
                let tx = db.transaction()?;
                for (c, file) in &written {
                    tx.execute(
                        "DELETE FROM pending WHERE collection_id = ?1 AND file = ?2",
                        params![c, file],
                    )?;
                    // Replaced or deleted while we wrote it.
                    let named = tx
                        .query_row(
                            "SELECT 1 FROM objects WHERE collection_id = ?1 AND file = ?2",
                            params![c, file],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some();
                    if !named {
                        orphans.push(self.file_path(*c, file));
                    }
                }
                tx.commit()?;
            }
            for o in orphans {
                let _ = std::fs::remove_file(o);
            }
            done += batch.len();
        }
    }

    /// Runs the file writer on a thread of its own for as long as the
    /// store lives.
    pub fn spawn_file_writer(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("dav-files".into())
            .spawn(move || {
                loop {
                    let Some(store) = weak.upgrade() else { return };
                    {
                        let mut dirty = store.dirty.lock().unwrap_or_else(|p| p.into_inner());
                        while !*dirty {
                            let (d, timeout) = store
                                .wake
                                .wait_timeout(dirty, std::time::Duration::from_secs(5))
                                .unwrap_or_else(|p| p.into_inner());
                            dirty = d;
                            if timeout.timed_out() {
                                break;
                            }
                        }
                        *dirty = false;
                    }
                    if let Err(e) = store.materialize() {
                        // The contents stay pending (and readable); try again.
                        eprintln!("granary-dav: writing object files: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            });
    }

    fn file_path(&self, collection: i64, file: &str) -> PathBuf {
        self.dir
            .join("objects")
            .join(collection.to_string())
            .join(file)
    }

    /// Stores `data` as `name` if the preconditions hold and no other
    /// object has its UID; durable when it returns. `Ok((etag, created))`.
    pub fn put(
        &self,
        c: &Collection,
        name: &str,
        data: &[u8],
        meta: &ObjectMeta,
        pre: &Preconditions,
    ) -> Result<(String, bool), StoreError> {
        let etag = etag_of(data);
        // A name of its own for every write: no two writers ever share a
        // file, so removing the one a write replaced can never take another
        // write's content.
        let file = random_hex(16);
        let mut db = self.db();
        let tx = db.transaction()?;
        let current = etag_and_file(&tx, c.id, name)?;
        if !pre.hold(current.as_ref().map(|(e, _)| e.as_str())) {
            return Err(StoreError::Precondition);
        }
        let other: Option<String> = tx
            .query_row(
                "SELECT name FROM objects WHERE collection_id = ?1 AND uid = ?2 AND name != ?3",
                params![c.id, meta.uid, name],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(other) = other {
            return Err(StoreError::UidConflict(meta.uid.clone(), other));
        }
        // The content commits with the row; the file comes after.
        tx.execute(
            "INSERT INTO pending (collection_id, file, data) VALUES (?1, ?2, ?3)",
            params![c.id, file, data],
        )?;
        if let Some((_, old)) = &current
            && *old != file
        {
            tx.execute(
                "DELETE FROM pending WHERE collection_id = ?1 AND file = ?2",
                params![c.id, old],
            )?;
        }
        tx.execute(
            "INSERT INTO objects (collection_id, name, uid, etag, size, component, start, end, file, single)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (collection_id, name) DO UPDATE SET uid = excluded.uid,
               etag = excluded.etag, size = excluded.size, component = excluded.component,
               start = excluded.start, end = excluded.end, file = excluded.file,
               single = excluded.single",
            params![
                c.id,
                name,
                meta.uid,
                etag,
                data.len() as i64,
                meta.component,
                meta.start,
                meta.end,
                file,
                meta.single
            ],
        )?;
        note_change(&tx, c.id, name, false)?;
        tx.commit()?;
        drop(db);
        if let Some((_, old)) = &current
            && *old != file
        {
            let _ = std::fs::remove_file(self.file_path(c.id, old));
        }
        self.poke();
        Ok((etag, current.is_none()))
    }

    /// Deletes an object if the preconditions hold; false when it did not
    /// exist.
    pub fn delete(
        &self,
        c: &Collection,
        name: &str,
        pre: &Preconditions,
    ) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let current = etag_and_file(&tx, c.id, name)?;
        if !pre.hold(current.as_ref().map(|(e, _)| e.as_str())) {
            return Err(StoreError::Precondition);
        }
        let Some((_, file)) = current else {
            return Ok(false);
        };
        tx.execute(
            "DELETE FROM objects WHERE collection_id = ?1 AND name = ?2",
            params![c.id, name],
        )?;
        tx.execute(
            "DELETE FROM pending WHERE collection_id = ?1 AND file = ?2",
            params![c.id, file],
        )?;
        let path = format!("{}/{}/{}", c.kind.home_segment(), c.name, name);
        tx.execute("DELETE FROM dead_props WHERE path = ?1", [&path])?;
        note_change(&tx, c.id, name, true)?;
        tx.commit()?;
        drop(db);
        let _ = std::fs::remove_file(self.file_path(c.id, &file));
        Ok(true)
    }

    /// Names changed after change `seq`, with whether each was deleted,
    /// and the collection's current change number.
    pub fn changes_since(
        &self,
        c: &Collection,
        seq: i64,
    ) -> Result<(Vec<(String, bool)>, i64), StoreError> {
        let db = self.db();
        let now: i64 = db.query_row("SELECT seq FROM collections WHERE id = ?1", [c.id], |r| {
            r.get(0)
        })?;
        let mut stmt = db.prepare(
            "SELECT name, deleted FROM changes WHERE collection_id = ?1 AND seq > ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![c.id, seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((rows.collect::<Result<_, _>>()?, now))
    }

    /// Dead properties of a resource (`kind-home/collection/[object]`).
    pub fn dead_props(&self, path: &str) -> Result<Vec<(String, String)>, StoreError> {
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT key, xml FROM dead_props WHERE path = ?1 ORDER BY key")?;
        let rows = stmt.query_map([path], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Dead properties of every object under a collection's path, by
    /// object name.
    pub fn dead_props_under(
        &self,
        collection_path: &str,
    ) -> Result<std::collections::HashMap<String, Vec<(String, String)>>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT path, key, xml FROM dead_props
             WHERE substr(path, 1, length(?1)) = ?1 AND path != ?1 ORDER BY path, key",
        )?;
        let rows = stmt.query_map([collection_path], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
        })?;
        let mut out: std::collections::HashMap<String, Vec<(String, String)>> =
            std::collections::HashMap::new();
        for row in rows {
            let (path, key, xml) = row?;
            let name = path[collection_path.len()..].to_owned();
            out.entry(name).or_default().push((key, xml));
        }
        Ok(out)
    }
}

/// Sets (`Some`) or removes (`None`) dead properties.
fn set_dead(
    tx: &rusqlite::Transaction<'_>,
    path: &str,
    changes: &[(String, Option<String>)],
) -> Result<(), StoreError> {
    for (key, xml) in changes {
        match xml {
            Some(xml) => tx.execute(
                "INSERT INTO dead_props (path, key, xml) VALUES (?1, ?2, ?3)
                 ON CONFLICT (path, key) DO UPDATE SET xml = excluded.xml",
                params![path, key, xml],
            )?,
            None => tx.execute(
                "DELETE FROM dead_props WHERE path = ?1 AND key = ?2",
                params![path, key],
            )?,
        };
    }
    Ok(())
}

impl Store {
    /// Folds the WAL into the database so a snapshot of the dataset holds
    /// the whole index in one file; says what it did.
    pub fn checkpoint(&self) -> Result<String, StoreError> {
        // Every object in its file, then the WAL folded in.
        self.materialize()?;
        let db = self.db();
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let n: i64 = db.query_row("SELECT count(*) FROM objects", [], |r| r.get(0))?;
        Ok(format!("dav index checkpointed ({n} objects)"))
    }
}

/// The ETag and file of `name`, if it exists.
fn etag_and_file(
    tx: &rusqlite::Transaction<'_>,
    collection: i64,
    name: &str,
) -> Result<Option<(String, String)>, StoreError> {
    Ok(tx
        .query_row(
            "SELECT etag, file FROM objects WHERE collection_id = ?1 AND name = ?2",
            params![collection, name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// Records a change of `name` under the collection's next change number.
fn note_change(
    tx: &rusqlite::Transaction<'_>,
    collection: i64,
    name: &str,
    deleted: bool,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE collections SET seq = seq + 1 WHERE id = ?1",
        [collection],
    )?;
    tx.execute(
        "INSERT INTO changes (collection_id, name, seq, deleted)
         VALUES (?1, ?2, (SELECT seq FROM collections WHERE id = ?1), ?3)
         ON CONFLICT (collection_id, name) DO UPDATE SET seq = excluded.seq, deleted = excluded.deleted",
        params![collection, name, deleted],
    )?;
    Ok(())
}

/// Writes a file under a temporary name, fsyncs it and renames it into
/// place (the caller fsyncs the directory).
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("object files live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", random_hex(8)));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: &str) -> ObjectMeta {
        ObjectMeta {
            uid: uid.into(),
            component: "VEVENT".into(),
            start: Some(0),
            end: Some(10),
            single: true,
        }
    }

    #[test]
    fn puts_deletes_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.ensure_defaults().unwrap();
        let c = s.collection(Kind::Calendar, "calendar").unwrap().unwrap();
        let (etag, created) = s
            .put(&c, "a.ics", b"one", &meta("u1"), &Preconditions::default())
            .unwrap();
        assert!(created);
        // If-None-Match: * on an existing object fails; If-Match with the
        // right ETag succeeds.
        let none = Preconditions {
            if_none_match: Some(vec!["*".into()]),
            ..Default::default()
        };
        assert!(matches!(
            s.put(&c, "a.ics", b"two", &meta("u1"), &none),
            Err(StoreError::Precondition)
        ));
        let matching = Preconditions {
            if_match: Some(vec![etag.clone()]),
            ..Default::default()
        };
        let (etag2, created) = s.put(&c, "a.ics", b"two", &meta("u1"), &matching).unwrap();
        assert!(!created);
        assert_ne!(etag, etag2);
        assert!(matches!(
            s.put(&c, "b.ics", b"x", &meta("u1"), &Preconditions::default()),
            Err(StoreError::UidConflict(..))
        ));
        // Readable while pending and once in its file; one file per object.
        let o = s.object(&c, "a.ics").unwrap().unwrap();
        assert_eq!(s.read(&c, &o).unwrap(), b"two");
        assert_eq!(s.materialize().unwrap(), 1);
        assert_eq!(s.read(&c, &o).unwrap(), b"two");
        let files = || {
            std::fs::read_dir(dir.path().join("objects").join(c.id.to_string()))
                .unwrap()
                .count()
        };
        assert_eq!(files(), 1);
        let c = s.collection(Kind::Calendar, "calendar").unwrap().unwrap();
        let token = c.sync_token();
        assert_eq!(parse_sync_token(&c, &token), Some(2));
        // Data set back: no token handed out before holds, even once the
        // change numbers pass it again.
        s.new_incarnations().unwrap();
        let renewed = s.collection(Kind::Calendar, "calendar").unwrap().unwrap();
        assert_eq!(renewed.seq, c.seq);
        assert_eq!(parse_sync_token(&renewed, &token), None);
        let c = renewed;
        assert!(s.delete(&c, "a.ics", &Preconditions::default()).unwrap());
        let (changes, now) = s.changes_since(&c, 2).unwrap();
        assert_eq!(changes, vec![("a.ics".to_owned(), true)]);
        assert_eq!(now, 3);
        // One file per live object; a reopen keeps the index and files.
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let c = s.collection(Kind::Calendar, "calendar").unwrap().unwrap();
        assert!(s.objects(&c).unwrap().is_empty());
        let files = std::fs::read_dir(dir.path().join("objects").join(c.id.to_string()))
            .unwrap()
            .count();
        assert_eq!(files, 0);
    }
}
