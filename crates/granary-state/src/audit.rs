//! The audit trail: append-only, written inside the transaction of the
//! change it records.

use rusqlite::params;

use crate::{QueryContext, StateError, Store};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEvent {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

/// Which audit events to read; empty fields match everything.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventFilter {
    /// Exactly this actor ("admin", "daemon", "web:alice").
    pub actor: String,
    /// This action, or every action under it ("user" matches "user.add").
    pub action: String,
    /// Subjects containing this text.
    pub subject: String,
    /// Only events older than this id (the next page); 0: the newest.
    pub before: i64,
    /// At most this many (1 to 1,000).
    pub limit: u32,
}

/// One row of `SELECT id, at, actor, action, subject, detail`.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEvent> {
    Ok(AuditEvent {
        id: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        subject: r.get(4)?,
        detail: r.get(5)?,
    })
}

/// Appends one event inside the caller's transaction. Details must never
/// carry secrets.
pub(crate) fn record(
    tx: &rusqlite::Connection,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), StateError> {
    tx.execute(
        "INSERT INTO audit_events (actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4)",
        params![actor, action, subject, detail],
    )
    .op("append audit event")
    .map(drop)
}

impl Store {
    /// Appends an event that is not tied to another write (a login failure
    /// burst, a daemon start).
    pub fn record_event(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        detail: &str,
    ) -> Result<(), StateError> {
        record(&self.conn(), actor, action, subject, detail)
    }

    /// The newest `limit` events, newest first.
    pub fn recent_events(&self, limit: u32) -> Result<Vec<AuditEvent>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at, actor, action, subject, detail FROM audit_events
                 ORDER BY id DESC LIMIT ?1",
            )
            .op("read audit events")?;
        let rows = stmt.query_map([limit], event_row).op("read audit events")?;
        rows.collect::<Result<_, _>>().op("read audit events")
    }

    /// Events matching `filter`, newest first.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<AuditEvent>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, at, actor, action, subject, detail FROM audit_events
                 WHERE (?1 = '' OR actor = ?1)
                   AND (?2 = '' OR action = ?2 OR substr(action, 1, length(?2) + 1) = ?2 || '.')
                   AND (?3 = '' OR instr(subject, ?3) > 0)
                   AND (?4 = 0 OR id < ?4)
                 ORDER BY id DESC LIMIT ?5",
            )
            .op("read audit events")?;
        let rows = stmt
            .query_map(
                rusqlite::params![
                    filter.actor,
                    filter.action,
                    filter.subject,
                    filter.before,
                    filter.limit.clamp(1, 1000)
                ],
                event_row,
            )
            .op("read audit events")?;
        rows.collect::<Result<_, _>>().op("read audit events")
    }

    /// When each grain was last exported whole by a backup on this node,
    /// read from the newest 1,000 `backup.export` events in one query.
    pub fn last_backups(&self) -> Result<std::collections::HashMap<String, i64>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT at, detail FROM audit_events WHERE action = 'backup.export'
                 ORDER BY id DESC LIMIT 1000",
            )
            .op("read backups")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .op("read backups")?;
        let mut last = std::collections::HashMap::new();
        for row in rows {
            let (at, detail) = row.op("read backups")?;
            for grain in detail.split(' ').filter_map(|w| w.strip_suffix("=ok")) {
                last.entry(grain.to_owned()).or_insert(at);
            }
        }
        Ok(last)
    }

    /// When `grain` was last exported whole by a backup (its `backup.export`
    /// event says `<grain>=ok`); `None` if never on this node.
    pub fn last_backup(&self, grain: &str) -> Result<Option<i64>, StateError> {
        self.conn()
            .query_row(
                "SELECT max(at) FROM audit_events WHERE action = 'backup.export'
                   AND (' ' || detail || ' ') LIKE ('% ' || ?1 || '=ok %')",
                [grain],
                |r| r.get(0),
            )
            .op("read last backup")
    }
}

#[cfg(test)]
mod tests {
    use super::EventFilter;
    #[test]
    fn events_filter_by_actor_action_prefix_and_subject() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&dir.path().join("s.db")).unwrap();
        store
            .record_event("admin", "user.add", "alice", "")
            .unwrap();
        store
            .record_event("admin", "user.remove", "bob", "")
            .unwrap();
        store
            .record_event("daemon", "users.sync", "alice", "")
            .unwrap();
        let f = |actor: &str, action: &str, subject: &str| EventFilter {
            actor: actor.into(),
            action: action.into(),
            subject: subject.into(),
            before: 0,
            limit: 50,
        };
        let subjects = |f: EventFilter| -> Vec<String> {
            store
                .events(&f)
                .unwrap()
                .into_iter()
                .map(|e| e.subject)
                .collect()
        };
        assert_eq!(subjects(f("admin", "user", "")), ["bob", "alice"]);
        // A group is whole words: "user" is not "users.sync".
        assert_eq!(subjects(f("", "user", "")), ["bob", "alice"]);
        assert_eq!(subjects(f("", "user.add", "")), ["alice"]);
        assert!(
            subjects(f("", "use", "")).is_empty(),
            "a prefix is whole words"
        );
        assert_eq!(subjects(f("", "", "ali")).len(), 2);
        let newest = store.events(&f("", "", "")).unwrap()[0].id;
        let older = EventFilter {
            before: newest,
            ..f("", "", "")
        };
        assert!(store.events(&older).unwrap().iter().all(|e| e.id < newest));
    }

    use crate::test_support::*;

    #[test]
    fn changes_leave_events_newest_first() {
        let store = store_with_user("alice");
        store
            .record_event("daemon", "daemon.start", "-", "pid=1")
            .unwrap();
        let events = store.recent_events(10).unwrap();
        let actions: Vec<_> = events.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["daemon.start", "user.add"]);
        assert_eq!(events[1].actor, "test");
        assert_eq!(events[1].subject, "alice");
        assert_eq!(store.recent_events(1).unwrap().len(), 1);
    }
}
