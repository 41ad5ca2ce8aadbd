//! Mailboxes: the defaults, create, delete, rename, subscriptions.

use rusqlite::{OptionalExtension, params};

use super::{DEFAULT_MAILBOXES, Mailbox, Store, StoreError, unix_now};

/// The hierarchy delimiter.
pub const DELIMITER: char = '/';

/// `INBOX` in any case is INBOX; other names are kept as given, without a
/// trailing delimiter.
pub fn normal_name(name: &str) -> String {
    let name = name.trim_end_matches(DELIMITER);
    match name.split_once(DELIMITER) {
        Some((first, rest)) if first.eq_ignore_ascii_case("INBOX") => format!("INBOX/{rest}"),
        _ if name.eq_ignore_ascii_case("INBOX") => "INBOX".to_owned(),
        _ => name.to_owned(),
    }
}

fn valid_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && !name.starts_with(DELIMITER)
        && !name.contains("//")
        && !name.chars().any(|c| c.is_control() || c == '*' || c == '%')
        && name.split(DELIMITER).count() <= 16;
    if ok {
        Ok(())
    } else {
        Err(StoreError::Refused(format!(
            "{name:?} is not a usable mailbox name"
        )))
    }
}

const COLUMNS: &str = "id, name, special_use, uidvalidity, uidnext, highest_modseq, subscribed";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Mailbox> {
    Ok(Mailbox {
        id: r.get(0)?,
        name: r.get(1)?,
        special_use: r.get(2)?,
        uidvalidity: r.get(3)?,
        uidnext: r.get(4)?,
        highest_modseq: r.get::<_, i64>(5)? as u64,
        subscribed: r.get(6)?,
    })
}

pub(super) fn by_name(
    db: &rusqlite::Connection,
    name: &str,
) -> Result<Option<Mailbox>, StoreError> {
    Ok(db
        .query_row(
            &format!("SELECT {COLUMNS} FROM mailboxes WHERE name = ?1"),
            [normal_name(name)],
            row,
        )
        .optional()?)
}

pub(super) fn by_id(db: &rusqlite::Connection, id: i64) -> Result<Mailbox, StoreError> {
    Ok(db.query_row(
        &format!("SELECT {COLUMNS} FROM mailboxes WHERE id = ?1"),
        [id],
        row,
    )?)
}

/// A new UIDVALIDITY: the time, but always above every one given before,
/// including those of mailboxes since deleted (a client that cached a
/// deleted mailbox must not take a new one of that name for it).
fn next_uidvalidity(db: &rusqlite::Connection) -> Result<u32, StoreError> {
    let last: i64 = db.query_row(
        "SELECT max(coalesce((SELECT value FROM counters WHERE name = 'uidvalidity'), 0),
                coalesce((SELECT max(uidvalidity) FROM mailboxes), 0))",
        [],
        |r| r.get(0),
    )?;
    let now = (unix_now() as u64 & 0x7fff_ffff) as i64;
    let v = now.max(last + 1);
    db.execute(
        "INSERT INTO counters (name, value) VALUES ('uidvalidity', ?1)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        [v],
    )?;
    Ok(v as u32)
}

fn insert(db: &rusqlite::Connection, name: &str, special_use: &str) -> Result<(), StoreError> {
    let v = next_uidvalidity(db)?;
    db.execute(
        "INSERT INTO mailboxes (name, special_use, uidvalidity) VALUES (?1, ?2, ?3)",
        params![name, special_use, v],
    )?;
    Ok(())
}

impl Store {
    pub(super) fn ensure_default_mailboxes(&self) -> Result<(), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (name, role) in DEFAULT_MAILBOXES {
            if by_name(&tx, name)?.is_none() {
                insert(&tx, name, role)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every mailbox, sorted by name (INBOX first).
    pub fn mailboxes(&self) -> Result<Vec<Mailbox>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {COLUMNS} FROM mailboxes ORDER BY name != 'INBOX', name"
        ))?;
        let rows = stmt.query_map([], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mailbox(&self, name: &str) -> Result<Mailbox, StoreError> {
        by_name(&self.db(), name)?.ok_or_else(|| StoreError::NoMailbox(name.to_owned()))
    }

    /// Creates `name` and any missing parent.
    pub fn create_mailbox(&self, name: &str) -> Result<(), StoreError> {
        let name = normal_name(name);
        valid_name(&name)?;
        let mut db = self.db();
        let tx = db.transaction()?;
        if by_name(&tx, &name)?.is_some() {
            return Err(StoreError::Exists(name));
        }
        let parts: Vec<&str> = name.split(super::mailboxes::DELIMITER).collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join("/");
            if by_name(&tx, &parent)?.is_none() {
                insert(&tx, &parent, "")?;
            }
        }
        insert(&tx, &name, "")?;
        tx.commit()?;
        drop(db);
        self.changed();
        Ok(())
    }

    /// Deletes a mailbox and its messages. INBOX and mailboxes with
    /// children are refused.
    pub fn delete_mailbox(&self, name: &str) -> Result<(), StoreError> {
        let name = normal_name(name);
        if name == "INBOX" {
            return Err(StoreError::Refused("INBOX cannot be deleted".to_owned()));
        }
        let mut db = self.db();
        let tx = db.transaction()?;
        let mb = by_name(&tx, &name)?.ok_or_else(|| StoreError::NoMailbox(name.clone()))?;
        let children: i64 = tx.query_row(
            "SELECT count(*) FROM mailboxes WHERE substr(name, 1, length(?1)) = ?1",
            [format!("{name}/")],
            |r| r.get(0),
        )?;
        if children > 0 {
            return Err(StoreError::Refused(format!(
                "{name} has mailboxes under it; delete those first"
            )));
        }
        let blobs = super::write::release_messages(&tx, mb.id, None)?;
        tx.execute("DELETE FROM mailboxes WHERE id = ?1", [mb.id])?;
        tx.commit()?;
        drop(db);
        self.remove_blob_files(&blobs);
        self.changed();
        Ok(())
    }

    /// Renames a mailbox and those under it. Renaming INBOX moves its
    /// messages to a new mailbox and leaves INBOX empty (RFC 3501 §6.3.5).
    pub fn rename_mailbox(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (from, to) = (normal_name(from), normal_name(to));
        valid_name(&to)?;
        let mut db = self.db();
        let tx = db.transaction()?;
        let mb = by_name(&tx, &from)?.ok_or_else(|| StoreError::NoMailbox(from.clone()))?;
        if by_name(&tx, &to)?.is_some() {
            return Err(StoreError::Exists(to));
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(StoreError::Refused(format!(
                "{from} cannot move under itself"
            )));
        }
        if from == "INBOX" {
            insert(&tx, &to, "")?;
            let new = by_name(&tx, &to)?.expect("just made");
            super::write::move_all(&tx, mb.id, new.id)?;
        } else {
            let children: Vec<(i64, String)> = {
                let mut stmt = tx.prepare(
                    "SELECT id, name FROM mailboxes WHERE substr(name, 1, length(?1)) = ?1",
                )?;
                let rows = stmt.query_map([format!("{from}/")], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let parts: Vec<&str> = to.split(DELIMITER).collect();
            for i in 1..parts.len() {
                let parent = parts[..i].join("/");
                if by_name(&tx, &parent)?.is_none() {
                    insert(&tx, &parent, "")?;
                }
            }
            tx.execute(
                "UPDATE mailboxes SET name = ?2 WHERE id = ?1",
                params![mb.id, to],
            )?;
            for (id, name) in children {
                let renamed = format!("{to}{}", &name[from.len()..]);
                tx.execute(
                    "UPDATE mailboxes SET name = ?2 WHERE id = ?1",
                    params![id, renamed],
                )?;
            }
        }
        tx.commit()?;
        drop(db);
        self.changed();
        Ok(())
    }

    pub fn subscribe(&self, name: &str, on: bool) -> Result<(), StoreError> {
        let name = normal_name(name);
        let n = self.db().execute(
            "UPDATE mailboxes SET subscribed = ?2 WHERE name = ?1",
            params![name, on],
        )?;
        if n == 0 && on {
            return Err(StoreError::NoMailbox(name));
        }
        Ok(())
    }
}
