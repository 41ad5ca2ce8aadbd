//! Per-device app passwords: one per client, valid for one grain kind,
//! revocable one by one.

use granary_model::UserName;
use rusqlite::params;

use crate::audit::record;
use crate::users::user_id;
use crate::{QueryContext, StateError, Store};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AppPassword {
    pub id: i64,
    pub user: String,
    pub kind: String,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// Which app passwords `revoke` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeSelector {
    Id(i64),
    Kind(String),
}

const COLUMNS: &str = "a.id, u.name, a.kind, a.label, a.created_at, a.last_used_at";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AppPassword> {
    Ok(AppPassword {
        id: row.get(0)?,
        user: row.get(1)?,
        kind: row.get(2)?,
        label: row.get(3)?,
        created_at: row.get(4)?,
        last_used_at: row.get(5)?,
    })
}

impl Store {
    /// The SCRAM verifiers of a user's app passwords of `kind` that have
    /// them: (id, verifiers, one per line). A disabled user's too (a new
    /// password of theirs takes the same salt); the directory refuses them.
    pub fn scram_verifiers(
        &self,
        user: &UserName,
        kind: &str,
    ) -> Result<Vec<(i64, String)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT a.id, a.scram FROM app_passwords a JOIN users u ON u.id = a.user_id
                 WHERE u.name = ?1 AND a.kind = ?2 AND a.scram != '' ORDER BY a.id",
            )
            .op("read scram verifiers")?;
        let rows = stmt
            .query_map(params![user.as_str(), kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .op("read scram verifiers")?;
        rows.collect::<Result<_, _>>().op("read scram verifiers")
    }

    pub fn add_app_password(
        &self,
        user: &UserName,
        kind: &str,
        label: &str,
        password_hash: &str,
        actor: &str,
    ) -> Result<AppPassword, StateError> {
        self.add_app_password_with_scram(user, kind, label, password_hash, "", actor)
    }

    /// [`Store::add_app_password`] with the SCRAM verifiers of the same
    /// password (for protocols that need them), in the same transaction.
    pub fn add_app_password_with_scram(
        &self,
        user: &UserName,
        kind: &str,
        label: &str,
        password_hash: &str,
        scram: &str,
        actor: &str,
    ) -> Result<AppPassword, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add app password")?;
        let uid = user_id(&tx, user)?;
        tx.execute(
            "INSERT INTO app_passwords (user_id, kind, label, password_hash, scram)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![uid, kind, label, password_hash, scram],
        )
        .op("insert app password")?;
        let id = tx.last_insert_rowid();
        record(
            &tx,
            actor,
            "app-password.add",
            user.as_str(),
            &format!("id={id} kind={kind} label={label}"),
        )?;
        let created = tx
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM app_passwords a JOIN users u ON u.id = a.user_id
                     WHERE a.id = ?1"
                ),
                [id],
                from_row,
            )
            .op("read new app password")?;
        w.commit(tx, "commit add app password")?;
        Ok(created)
    }

    /// The user's app passwords (never their hashes), optionally of one kind.
    pub fn list_app_passwords(
        &self,
        user: &UserName,
        kind: Option<&str>,
    ) -> Result<Vec<AppPassword>, StateError> {
        let conn = self.conn();
        let uid = user_id(&conn, user)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM app_passwords a JOIN users u ON u.id = a.user_id
                 WHERE a.user_id = ?1 AND (?2 IS NULL OR a.kind = ?2) ORDER BY a.id"
            ))
            .op("list app passwords")?;
        let rows = stmt
            .query_map(params![uid, kind], from_row)
            .op("list app passwords")?;
        rows.collect::<Result<_, _>>().op("list app passwords")
    }

    /// Revokes one app password by id, or all of a kind. Returns how many.
    /// Revoking an id the user does not have is an error (a typo should not
    /// look like success); revoking a kind with none is zero.
    pub fn revoke_app_passwords(
        &self,
        user: &UserName,
        which: &RevokeSelector,
        actor: &str,
    ) -> Result<usize, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin revoke app passwords")?;
        let uid = user_id(&tx, user)?;
        let (count, detail) = match which {
            RevokeSelector::Id(id) => {
                let n = tx
                    .execute(
                        "DELETE FROM app_passwords WHERE user_id = ?1 AND id = ?2",
                        params![uid, id],
                    )
                    .op("revoke app password")?;
                if n == 0 {
                    return Err(StateError::NoSuchAppPassword {
                        user: user.to_string(),
                        id: *id,
                    });
                }
                (n, format!("id={id}"))
            }
            RevokeSelector::Kind(kind) => {
                let n = tx
                    .execute(
                        "DELETE FROM app_passwords WHERE user_id = ?1 AND kind = ?2",
                        params![uid, kind],
                    )
                    .op("revoke app passwords")?;
                (n, format!("kind={kind} count={n}"))
            }
        };
        if count > 0 {
            record(&tx, actor, "app-password.revoke", user.as_str(), &detail)?;
        }
        w.commit(tx, "commit revoke app passwords")?;
        Ok(count)
    }

    /// Notes that an app password was just used (shown in listings so a
    /// user can spot a device they no longer have).
    pub fn touch_app_password(&self, id: i64) -> Result<(), StateError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE app_passwords SET last_used_at = unixepoch() WHERE id = ?1",
            [id],
        )
        .op("touch app password")?;
        self.forget_captured(&conn);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[test]
    fn scram_verifiers_are_kept_beside_the_hash_and_go_with_revocation() {
        let store = store_with_user("alice");
        store
            .add_app_password(&name("alice"), "xmpp", "old", "h0", "admin")
            .unwrap();
        let a = store
            .add_app_password_with_scram(
                &name("alice"),
                "xmpp",
                "phone",
                "h1",
                "SCRAM-SHA-1$x\nSCRAM-SHA-256$y",
                "admin",
            )
            .unwrap();
        assert_eq!(
            store.scram_verifiers(&name("alice"), "xmpp").unwrap(),
            vec![(a.id, "SCRAM-SHA-1$x\nSCRAM-SHA-256$y".to_owned())]
        );
        assert!(
            store
                .scram_verifiers(&name("alice"), "mail")
                .unwrap()
                .is_empty()
        );
        store
            .revoke_app_passwords(&name("alice"), &RevokeSelector::Id(a.id), "admin")
            .unwrap();
        assert!(
            store
                .scram_verifiers(&name("alice"), "xmpp")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn add_list_and_filter_by_kind() {
        let store = store_with_user("alice");
        let a = store
            .add_app_password(&name("alice"), "git", "laptop", "h1", "admin")
            .unwrap();
        store
            .add_app_password(&name("alice"), "mail", "phone", "h2", "admin")
            .unwrap();
        assert_eq!(
            (a.user.as_str(), a.kind.as_str(), a.label.as_str()),
            ("alice", "git", "laptop")
        );
        assert_eq!(a.last_used_at, None);
        assert_eq!(
            store
                .list_app_passwords(&name("alice"), None)
                .unwrap()
                .len(),
            2
        );
        let git = store
            .list_app_passwords(&name("alice"), Some("git"))
            .unwrap();
        assert_eq!(git, vec![a.clone()]);
        assert_eq!(
            store.user(&name("alice")).unwrap().unwrap().app_passwords,
            2
        );

        let creds = store
            .credentials(&name("alice"), Some("git"))
            .unwrap()
            .unwrap();
        assert_eq!(creds.app_passwords, vec![(a.id, "h1".to_owned())]);
    }

    #[test]
    fn unknown_user_is_an_error() {
        let store = store();
        assert!(matches!(
            store.add_app_password(&name("ghost"), "git", "x", "h", "admin"),
            Err(StateError::NoSuchUser(_))
        ));
        assert!(matches!(
            store.list_app_passwords(&name("ghost"), None),
            Err(StateError::NoSuchUser(_))
        ));
    }

    #[test]
    fn revoke_by_id_and_by_kind() {
        let store = store_with_user("alice");
        store.add_user(&name("bob"), "h", "admin").unwrap();
        let a1 = store
            .add_app_password(&name("alice"), "git", "one", "h", "admin")
            .unwrap();
        store
            .add_app_password(&name("alice"), "git", "two", "h", "admin")
            .unwrap();
        store
            .add_app_password(&name("alice"), "mail", "three", "h", "admin")
            .unwrap();
        let bobs = store
            .add_app_password(&name("bob"), "git", "bob's", "h", "admin")
            .unwrap();

        // Alice cannot revoke Bob's password by guessing its id.
        assert!(matches!(
            store.revoke_app_passwords(&name("alice"), &RevokeSelector::Id(bobs.id), "admin"),
            Err(StateError::NoSuchAppPassword { .. })
        ));
        assert_eq!(
            store
                .revoke_app_passwords(&name("alice"), &RevokeSelector::Id(a1.id), "admin")
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .revoke_app_passwords(&name("alice"), &RevokeSelector::Kind("git".into()), "admin")
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .revoke_app_passwords(&name("alice"), &RevokeSelector::Kind("git".into()), "admin")
                .unwrap(),
            0
        );
        let left: Vec<_> = store
            .list_app_passwords(&name("alice"), None)
            .unwrap()
            .into_iter()
            .map(|p| p.label)
            .collect();
        assert_eq!(left, ["three"]);
        assert_eq!(
            store.list_app_passwords(&name("bob"), None).unwrap().len(),
            1
        );
    }

    #[test]
    fn touch_records_last_use() {
        let store = store_with_user("alice");
        let p = store
            .add_app_password(&name("alice"), "git", "laptop", "h", "admin")
            .unwrap();
        store.touch_app_password(p.id).unwrap();
        let p = &store.list_app_passwords(&name("alice"), None).unwrap()[0];
        assert!(p.last_used_at.is_some());
    }
}
