//! Schema versions: `PRAGMA user_version` is the number of migrations
//! applied. Migrations are append-only; an applied one is never edited.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::{APPLICATION_ID, StateError, configure};

pub(crate) struct Migration {
    pub(crate) version: u32,
    pub(crate) sql: &'static str,
    /// Remakes a table that others reference: runs with foreign keys off
    /// (a `DROP TABLE` would cascade), and they are checked before commit.
    pub(crate) remakes_tables: bool,
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("migrations/0001_users.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 2,
        sql: include_str!("migrations/0002_apps_grains_grants.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 3,
        sql: include_str!("migrations/0003_manifests_sturdy_refs.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 4,
        sql: include_str!("migrations/0004_app_images.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 5,
        sql: include_str!("migrations/0005_grain_app_version.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 6,
        sql: include_str!("migrations/0006_public_repos.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 7,
        sql: include_str!("migrations/0007_ssh_keys.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 8,
        sql: include_str!("migrations/0008_blog_domains.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 9,
        sql: include_str!("migrations/0009_mail.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 10,
        sql: include_str!("migrations/0010_scram.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 11,
        sql: include_str!("migrations/0011_xmpp_domains.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 12,
        sql: include_str!("migrations/0012_tasks.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 13,
        sql: include_str!("migrations/0013_invites.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 14,
        sql: include_str!("migrations/0014_grain_instances.sql"),
        remakes_tables: true,
    },
    Migration {
        version: 15,
        sql: include_str!("migrations/0015_group_invites.sql"),
        remakes_tables: true,
    },
    Migration {
        version: 16,
        sql: include_str!("migrations/0016_shared_log.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 17,
        sql: include_str!("migrations/0017_totp.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 18,
        sql: include_str!("migrations/0018_user_disabled.sql"),
        remakes_tables: false,
    },
    Migration {
        version: 19,
        sql: include_str!("migrations/0019_grain_quota.sql"),
        remakes_tables: false,
    },
];

/// The schema version this build creates and understands.
pub const LATEST_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

pub(crate) fn user_version(conn: &Connection) -> Result<u32, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))
}

/// Refuses anything that is not a healthy Granary database of a known
/// version (without writing to it), then applies `migrations` above the
/// current version.
pub(crate) fn check_and_migrate(
    conn: &Connection,
    path: &Path,
    migrations: &[Migration],
) -> Result<(), StateError> {
    let not_granary = |detail: String| StateError::NotGranary {
        path: path.to_path_buf(),
        detail,
    };
    // Reading the header is the first thing that fails on a non-database.
    let found = user_version(conn).map_err(|e| not_granary(e.to_string()))?;
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|e| not_granary(e.to_string()))?;
    if found == 0 {
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| not_granary(e.to_string()))?;
        if objects != 0 {
            return Err(not_granary(
                "it holds tables but no Granary schema version".to_owned(),
            ));
        }
    } else if app_id != APPLICATION_ID {
        return Err(not_granary(format!(
            "application id {app_id:#x} is not Granary's"
        )));
    }
    let supported = migrations.len() as u32;
    if found > supported {
        return Err(StateError::TooNew {
            path: path.to_path_buf(),
            found,
            supported,
        });
    }
    if found > 0 {
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| not_granary(e.to_string()))?;
        if check != "ok" {
            return Err(not_granary(format!("integrity check: {check}")));
        }
    }

    configure(conn).map_err(|source| StateError::Open {
        path: path.to_path_buf(),
        source,
    })?;

    for migration in migrations.iter().filter(|m| m.version > found) {
        apply(conn, migration).map_err(|source| StateError::Migration {
            version: migration.version,
            source,
        })?;
    }
    Ok(())
}

fn apply(conn: &Connection, migration: &Migration) -> Result<(), rusqlite::Error> {
    if !migration.remakes_tables {
        return apply_in_transaction(conn, migration);
    }
    // The pragma is a no-op inside a transaction, so it goes around it, and
    // comes back on whatever happened.
    conn.pragma_update(None, "foreign_keys", false)?;
    let applied = apply_in_transaction(conn, migration);
    let restored = conn.pragma_update(None, "foreign_keys", true);
    applied.and(restored)
}

fn apply_in_transaction(conn: &Connection, migration: &Migration) -> Result<(), rusqlite::Error> {
    // `Transaction` needs `&mut Connection`; an unchecked one is fine because
    // nothing else can use this connection while we hold it.
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.execute_batch(migration.sql)?;
    if migration.remakes_tables {
        // Every reference must still hold, or nothing is committed.
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .optional()?;
        if let Some(table) = broken {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
                Some(format!("a reference from {table} no longer holds")),
            ));
        }
    }
    tx.pragma_update(None, "user_version", migration.version)?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use crate::test_support::name;

    #[test]
    fn fresh_database_gets_the_latest_schema() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("g.db")).unwrap();
        assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
        let mode: String = store
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: bool = store
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert!(fk);
    }

    #[test]
    fn older_schema_upgrades_in_place_keeping_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        {
            // A database as the first release left it: migration 1 only.
            let conn = Connection::open(&path).unwrap();
            check_and_migrate(&conn, &path, &MIGRATIONS[..1]).unwrap();
            conn.execute(
                "INSERT INTO users (name, password_hash) VALUES ('alice', 'h')",
                [],
            )
            .unwrap();
            assert_eq!(user_version(&conn).unwrap(), 1);
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
        assert!(store.user(&name("alice")).unwrap().is_some());
        assert_eq!(store.counts().unwrap().grains, 0);
    }

    #[test]
    fn remaking_grains_keeps_grants_and_sturdy_refs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        {
            let conn = Connection::open(&path).unwrap();
            check_and_migrate(&conn, &path, &MIGRATIONS[..13]).unwrap();
            conn.execute_batch(
                "INSERT INTO users (id, name, password_hash) VALUES (1, 'alice', 'h');
                 INSERT INTO apps (kind, app_id, version) VALUES ('git', 'a', '1'), ('blog', 'b', '1');
                 INSERT INTO grains (id, user_id, kind, host_uid, app_version)
                     VALUES ('alice-git', 1, 'git', 70000, '1'), ('alice-blog', 1, 'blog', 70001, '1');
                 INSERT INTO grants (id, from_grain, to_grain, capability)
                     VALUES (7, 'alice-blog', 'alice-git', 'git.read:site');
                 INSERT INTO sturdy_refs (token_hash, holder, grant_id, label)
                     VALUES (x'00', 'alice-blog', 7, 'site');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let c = store.conn();
        let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT count(*) FROM grants"), 1);
        assert_eq!(count("SELECT count(*) FROM sturdy_refs"), 1);
        assert_eq!(count("SELECT count(*) FROM grains WHERE instance = ''"), 2);
        assert_eq!(
            count("SELECT count(*) FROM grains WHERE app_version = '1' AND host_uid >= 70000"),
            2
        );
        let fk: bool = c
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert!(fk, "foreign keys are back on after the migration");
        // The cascades still point at the new table.
        c.execute("DELETE FROM grains WHERE id = 'alice-blog'", [])
            .unwrap();
        assert_eq!(count("SELECT count(*) FROM grants"), 0);
        assert_eq!(count("SELECT count(*) FROM sturdy_refs"), 0);
    }

    #[test]
    fn remaking_invites_keeps_their_uses_and_never_reuses_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        {
            let conn = Connection::open(&path).unwrap();
            check_and_migrate(&conn, &path, &MIGRATIONS[..14]).unwrap();
            conn.execute_batch(
                "INSERT INTO users (id, name, password_hash) VALUES (1, 'alice', 'h');
                 INSERT INTO invites (hash, kind, inviter_id, max_uses, uses, expires_at)
                     VALUES (x'01', 'contact', 1, 2, 1, 9999999999),
                            (x'02', 'account', NULL, 1, 0, 9999999999),
                            (x'03', 'account', NULL, 1, 0, 9999999999);
                 DELETE FROM invites WHERE id > 1;
                 INSERT INTO invite_uses (invite_id, user) VALUES (1, 'bob');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let list = store.invites().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].used_by, ["bob"]);
        assert_eq!(list[0].kind, crate::InviteKind::Contact);
        let next = store
            .add_invite(
                crate::InviteKind::Account,
                None,
                None,
                b"new",
                9_999_999_999,
                1,
                "test",
            )
            .unwrap();
        assert_eq!(next.id, 4, "ids of deleted invites are not given again");
    }

    #[test]
    fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        drop(Store::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", LATEST_SCHEMA_VERSION + 1)
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let err = Store::open(&path)
            .err()
            .expect("newer schema must be refused");
        assert!(
            matches!(err, StateError::TooNew { found, supported, .. }
                if found == LATEST_SCHEMA_VERSION + 1 && supported == LATEST_SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("newer granary"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn garbage_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let garbage = b"this is not a database, it is a shopping list\n".repeat(200);
        std::fs::write(&path, &garbage).unwrap();
        let err = Store::open(&path).err().expect("garbage must be refused");
        assert!(matches!(err, StateError::NotGranary { .. }), "{err}");
        assert!(
            err.to_string().contains("restore it from a backup"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), garbage);
    }

    #[test]
    fn foreign_sqlite_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE songs (title TEXT)")
                .unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, StateError::NotGranary { .. }), "{err}");

        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("application id"), "{err}");
    }

    #[test]
    fn failed_migration_leaves_the_previous_version() {
        let conn = Connection::open_in_memory().unwrap();
        let broken = [
            MIGRATIONS[0].clone_ref(),
            Migration {
                version: 2,
                sql: "CREATE TABLE ok_so_far (x); THIS IS NOT SQL;",
                remakes_tables: false,
            },
        ];
        let err = check_and_migrate(&conn, Path::new(":memory:"), &broken).unwrap_err();
        assert!(matches!(err, StateError::Migration { version: 2, .. }));
        assert_eq!(user_version(&conn).unwrap(), 1);
        let leftover: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'ok_so_far'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(leftover, 0, "a failed migration must roll back entirely");
    }

    impl Migration {
        fn clone_ref(&self) -> Migration {
            Migration {
                version: self.version,
                sql: self.sql,
                remakes_tables: self.remakes_tables,
            }
        }
    }
}
