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
        let rows = stmt
            .query_map([limit], |r| {
                Ok(AuditEvent {
                    id: r.get(0)?,
                    at: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    subject: r.get(4)?,
                    detail: r.get(5)?,
                })
            })
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
