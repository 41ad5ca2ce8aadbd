//! Installed apps, grains and grants: the records the supervisor works from.

use granary_model::UserName;
use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::{QueryContext, StateError, Store};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct App {
    pub kind: String,
    pub app_id: String,
    pub version: String,
    pub installed_at: i64,
    /// The manifest as installed (TOML).
    pub manifest: String,
    /// Installed unsigned from a directory.
    pub dev_mode: bool,
    /// The image directory relative to DATA_DIR/apps (empty for installs
    /// made before images were recorded: `<kind>/<version>`).
    pub image: String,
    /// What an upgrade replaced, for a rollback (empty when nothing).
    pub previous_version: String,
    pub previous_image: String,
    pub previous_manifest: String,
}

impl App {
    /// The image directory relative to DATA_DIR/apps.
    pub fn image_dir(&self) -> String {
        if self.image.is_empty() {
            format!("{}/{}", self.kind, self.version)
        } else {
            self.image.clone()
        }
    }
}

/// What `install_app` records.
#[derive(Debug, Clone)]
pub struct NewApp<'a> {
    pub kind: &'a str,
    pub app_id: &'a str,
    pub version: &'a str,
    pub manifest: &'a str,
    pub dev_mode: bool,
    pub image: &'a str,
    /// Another app id may take the kind over (`--replace`).
    pub replace: bool,
    /// Keep what this replaces as the rollback target.
    pub keep_previous: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Grain {
    pub id: String,
    pub user: String,
    pub kind: String,
    /// Which of the user's grains of an on-demand kind (a room's name);
    /// empty for the one grain per user and kind.
    pub instance: String,
    pub host_uid: u32,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Grant {
    pub id: i64,
    pub from_grain: String,
    pub to_grain: String,
    pub capability: String,
    pub created_at: i64,
}

const APP_COLUMNS: &str = "kind, app_id, version, installed_at, manifest, dev_mode, image,
    previous_version, previous_image, previous_manifest";

fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<App> {
    Ok(App {
        kind: r.get(0)?,
        app_id: r.get(1)?,
        version: r.get(2)?,
        installed_at: r.get(3)?,
        manifest: r.get(4)?,
        dev_mode: r.get(5)?,
        image: r.get(6)?,
        previous_version: r.get(7)?,
        previous_image: r.get(8)?,
        previous_manifest: r.get(9)?,
    })
}

/// Columns and joins of a grain row, for `SELECT {GRAIN_COLUMNS} WHERE ...`.
const GRAIN_COLUMNS: &str = "g.id, u.name, g.kind, g.host_uid, g.created_at, g.instance
    FROM grains g JOIN users u ON u.id = g.user_id";

fn grain_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Grain> {
    Ok(Grain {
        id: r.get(0)?,
        user: r.get(1)?,
        kind: r.get(2)?,
        host_uid: r.get(3)?,
        created_at: r.get(4)?,
        instance: r.get(5)?,
    })
}

/// How a new grain gets its host uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostUid {
    /// This one (a restore that keeps its uid, tests).
    Exact(u32),
    /// The lowest uid in `start..start + count` no grain has.
    FirstFreeIn(granary_model::UidRange),
}

/// The lowest uid of the range that no grain holds: `start` itself, or one
/// past a held uid whose successor is free.
fn first_free_uid(tx: &rusqlite::Connection, start: u32, count: u32) -> Result<u32, StateError> {
    let end = i64::from(start) + i64::from(count);
    let free: Option<i64> = tx
        .query_row(
            "SELECT CASE
                 WHEN NOT EXISTS (SELECT 1 FROM grains WHERE host_uid = ?1) THEN ?1
                 ELSE (SELECT min(g.host_uid + 1) FROM grains g
                       WHERE g.host_uid >= ?1 AND g.host_uid + 1 < ?2
                         AND NOT EXISTS (SELECT 1 FROM grains h WHERE h.host_uid = g.host_uid + 1))
             END",
            params![i64::from(start), end],
            |r| r.get(0),
        )
        .op("find a free host uid")?;
    free.map(|uid| uid as u32).ok_or_else(|| {
        StateError::Conflict(format!(
            "every host uid in {start}+{count} is taken; widen jail.uid_range"
        ))
    })
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl Store {
    /// Records an installed app. The kind must be free or already belong to
    /// the same app id (an upgrade, which replaces the version).
    pub fn register_app(
        &self,
        kind: &str,
        app_id: &str,
        version: &str,
        actor: &str,
    ) -> Result<App, StateError> {
        self.install_app(kind, app_id, version, "", false, actor)
    }

    /// Records an installed app with its manifest (the older signature,
    /// for development installs).
    pub fn install_app(
        &self,
        kind: &str,
        app_id: &str,
        version: &str,
        manifest: &str,
        dev_mode: bool,
        actor: &str,
    ) -> Result<App, StateError> {
        let image = format!("{kind}/{version}");
        self.put_app(
            &NewApp {
                kind,
                app_id,
                version,
                manifest,
                dev_mode,
                image: &image,
                replace: false,
                keep_previous: false,
            },
            actor,
        )
    }

    /// Records an installed app. The kind must be free or belong to the same
    /// app id (an upgrade or reinstall), unless `replace`.
    pub fn put_app(&self, new: &NewApp<'_>, actor: &str) -> Result<App, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin install app")?;
        let holder: Option<App> = tx
            .query_row(
                &format!("SELECT {APP_COLUMNS} FROM apps WHERE kind = ?1"),
                [new.kind],
                app_from_row,
            )
            .optional()
            .op("find app")?;
        match &holder {
            Some(other) if other.app_id != new.app_id && !new.replace => {
                return Err(StateError::KindTaken(new.kind.to_owned()));
            }
            Some(old) => {
                let (pv, pi, pm) = if new.keep_previous {
                    (old.version.clone(), old.image_dir(), old.manifest.clone())
                } else {
                    (String::new(), String::new(), String::new())
                };
                tx.execute(
                    "UPDATE apps SET app_id = ?2, version = ?3, manifest = ?4, dev_mode = ?5,
                         image = ?6, previous_version = ?7, previous_image = ?8,
                         previous_manifest = ?9, installed_at = unixepoch()
                     WHERE kind = ?1",
                    params![
                        new.kind,
                        new.app_id,
                        new.version,
                        new.manifest,
                        new.dev_mode,
                        new.image,
                        pv,
                        pi,
                        pm
                    ],
                )
            }
            None => tx.execute(
                "INSERT INTO apps (kind, app_id, version, manifest, dev_mode, image)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    new.kind,
                    new.app_id,
                    new.version,
                    new.manifest,
                    new.dev_mode,
                    new.image
                ],
            ),
        }
        .op("write app")?;
        let action = match &holder {
            Some(old) if old.app_id != new.app_id => "app.replace",
            Some(_) if new.keep_previous => "app.upgrade",
            _ => "app.install",
        };
        record(
            &tx,
            actor,
            action,
            new.kind,
            &format!(
                "app={} version={} image={}{}",
                new.app_id,
                new.version,
                new.image,
                if new.dev_mode {
                    " unsigned-dev-mode"
                } else {
                    ""
                }
            ),
        )?;
        let app = tx
            .query_row(
                &format!("SELECT {APP_COLUMNS} FROM apps WHERE kind = ?1"),
                [new.kind],
                app_from_row,
            )
            .op("read app")?;
        w.commit(tx, "commit install app")?;
        Ok(app)
    }

    /// Puts the previous version back after a failed upgrade.
    pub fn roll_back_app(&self, kind: &str, actor: &str) -> Result<App, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin roll back app")?;
        let n = tx
            .execute(
                "UPDATE apps SET version = previous_version, image = previous_image,
                     manifest = previous_manifest, previous_version = '',
                     previous_image = '', previous_manifest = ''
                 WHERE kind = ?1 AND previous_version != ''",
                [kind],
            )
            .op("roll back app")?;
        if n == 0 {
            return Err(StateError::Conflict(format!(
                "no previous version of {kind} to roll back to"
            )));
        }
        record(&tx, actor, "app.rollback", kind, "")?;
        let app = tx
            .query_row(
                &format!("SELECT {APP_COLUMNS} FROM apps WHERE kind = ?1"),
                [kind],
                app_from_row,
            )
            .op("read app")?;
        w.commit(tx, "commit roll back app")?;
        Ok(app)
    }

    pub fn list_apps(&self) -> Result<Vec<App>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {APP_COLUMNS} FROM apps ORDER BY kind"))
            .op("list apps")?;
        let rows = stmt.query_map([], app_from_row).op("list apps")?;
        rows.collect::<Result<_, _>>().op("list apps")
    }

    /// Creates the record of `user`'s grain of `kind` with the host uid
    /// `host_uid` chooses. One grain per user and kind; host uids are never
    /// shared, and a free one is picked inside the same transaction as the
    /// insert, so two grains can never race for one uid.
    pub fn create_grain(
        &self,
        id: &str,
        user: &UserName,
        kind: &str,
        host_uid: HostUid,
        actor: &str,
    ) -> Result<Grain, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin create grain")?;
        let uid = crate::users::user_id(&tx, user)?;
        let host_uid = match host_uid {
            HostUid::Exact(uid) => uid,
            HostUid::FirstFreeIn(range) => first_free_uid(&tx, range.start, range.count)?,
        };
        // A restored room keeps its name: the id carries it.
        let instance = granary_model::GrainId::parse(id)
            .ok()
            .and_then(|g| g.instance().map(str::to_owned))
            .unwrap_or_default();
        let inserted = tx.execute(
            "INSERT INTO grains (id, user_id, kind, host_uid, instance) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, uid, kind, host_uid, instance],
        );
        match inserted {
            Err(e) if is_constraint(&e) => {
                return Err(StateError::Conflict(format!(
                    "grain {id} ({user}/{kind}, uid {host_uid}) or its kind/uid"
                )));
            }
            other => other.op("insert grain")?,
        };
        record(
            &tx,
            actor,
            "grain.create",
            id,
            &format!("{user}/{kind} uid={host_uid}"),
        )?;
        let grain = tx
            .query_row(
                &format!("SELECT {GRAIN_COLUMNS} WHERE g.id = ?1"),
                [id],
                grain_from_row,
            )
            .op("read new grain")?;
        w.commit(tx, "commit create grain")?;
        Ok(grain)
    }

    pub fn list_grains(&self) -> Result<Vec<Grain>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT {GRAIN_COLUMNS} ORDER BY u.name, g.kind"))
            .op("list grains")?;
        let rows = stmt.query_map([], grain_from_row).op("list grains")?;
        rows.collect::<Result<_, _>>().op("list grains")
    }

    pub fn app(&self, kind: &str) -> Result<Option<App>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {APP_COLUMNS} FROM apps WHERE kind = ?1"),
                [kind],
                app_from_row,
            )
            .optional()
            .op("read app")
    }

    /// Forgets an installed app. Refused while grains of its kind exist.
    pub fn remove_app(&self, kind: &str, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove app")?;
        let grains: i64 = tx
            .query_row("SELECT count(*) FROM grains WHERE kind = ?1", [kind], |r| {
                r.get(0)
            })
            .op("count grains of app")?;
        if grains > 0 {
            return Err(StateError::Conflict(format!(
                "{grains} grain(s) of kind {kind}"
            )));
        }
        let n = tx
            .execute("DELETE FROM apps WHERE kind = ?1", [kind])
            .op("delete app")?;
        if n > 0 {
            record(&tx, actor, "app.remove", kind, "")?;
        }
        w.commit(tx, "commit remove app")?;
        Ok(n > 0)
    }

    /// Creates the missing grain records for every user and installed app
    /// (one grain per user per app), each with a free host uid from
    /// `uids`, all in one transaction. Returns the grains it created.
    pub fn ensure_grains(&self, uids: HostUid, actor: &str) -> Result<Vec<Grain>, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin ensure grains")?;
        let missing: Vec<(i64, String, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT u.id, u.name, a.kind FROM users u CROSS JOIN apps a
                     WHERE NOT EXISTS (SELECT 1 FROM grains g
                                       WHERE g.user_id = u.id AND g.kind = a.kind)
                     ORDER BY u.name, a.kind",
                )
                .op("find missing grains")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .op("find missing grains")?;
            rows.collect::<Result<_, _>>().op("find missing grains")?
        };
        // Kinds whose grains are made on demand (rooms) get none here.
        let on_demand: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT kind, manifest FROM apps")
                .op("read app manifests")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .op("read app manifests")?;
            let apps: Vec<(String, String)> =
                rows.collect::<Result<_, _>>().op("read app manifests")?;
            apps.into_iter()
                .filter(|(_, m)| granary_model::Manifest::parse(m).is_ok_and(|m| m.on_demand))
                .map(|(kind, _)| kind)
                .collect()
        };
        let mut created = Vec::new();
        for (user_id, user, kind) in missing {
            if on_demand.contains(&kind) {
                continue;
            }
            let host_uid = match uids {
                HostUid::Exact(uid) => uid,
                HostUid::FirstFreeIn(range) => first_free_uid(&tx, range.start, range.count)?,
            };
            let id = granary_model::GrainId::for_user(&user, &kind)
                .map_err(|e| StateError::Invalid(e.to_string()))?
                .to_string();
            tx.execute(
                "INSERT INTO grains (id, user_id, kind, host_uid) VALUES (?1, ?2, ?3, ?4)",
                params![id, user_id, kind, host_uid],
            )
            .op("insert grain")?;
            record(
                &tx,
                actor,
                "grain.create",
                &id,
                &format!("{user}/{kind} uid={host_uid}"),
            )?;
            created.push(
                tx.query_row(
                    &format!("SELECT {GRAIN_COLUMNS} WHERE g.id = ?1"),
                    [&id],
                    grain_from_row,
                )
                .op("read new grain")?,
            );
        }
        w.commit(tx, "commit ensure grains")?;
        Ok(created)
    }

    /// Makes `user`'s grain of the on-demand `kind` named `instance` (a
    /// chat room), unless the name is taken in that kind or the user
    /// already has `most` of them. Checked and made in one transaction.
    pub fn create_instance_grain(
        &self,
        user: &UserName,
        kind: &str,
        instance: &str,
        uids: HostUid,
        most: u32,
        actor: &str,
    ) -> Result<Grain, StateError> {
        let id = granary_model::GrainKind::new(kind)
            .map_err(|e| StateError::Invalid(e.to_string()))
            .and_then(|k| {
                granary_model::GrainId::instance_of(user, &k, instance)
                    .map_err(|e| StateError::Invalid(e.to_string()))
            })?
            .to_string();
        let w = self.writer()?;
        let tx = w.begin().op("begin create instance grain")?;
        let uid = crate::users::user_id(&tx, user)?;
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM grains WHERE kind = ?1 AND instance = ?2)",
                params![kind, instance],
                |r| r.get(0),
            )
            .op("check the instance name")?;
        if taken {
            return Err(StateError::Conflict(format!("a {kind} named {instance}")));
        }
        let held: u32 = tx
            .query_row(
                "SELECT count(*) FROM grains WHERE user_id = ?1 AND kind = ?2 AND instance <> ''",
                params![uid, kind],
                |r| r.get(0),
            )
            .op("count the user's instances")?;
        if held >= most {
            return Err(StateError::Invalid(format!(
                "{user} has {held} grains of kind {kind}, the most allowed"
            )));
        }
        let host_uid = match uids {
            HostUid::Exact(uid) => uid,
            HostUid::FirstFreeIn(range) => first_free_uid(&tx, range.start, range.count)?,
        };
        tx.execute(
            "INSERT INTO grains (id, user_id, kind, host_uid, instance) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, uid, kind, host_uid, instance],
        )
        .op("insert instance grain")?;
        record(
            &tx,
            actor,
            "grain.create",
            &id,
            &format!("{user}/{kind}/{instance} uid={host_uid}"),
        )?;
        let grain = tx
            .query_row(
                &format!("SELECT {GRAIN_COLUMNS} WHERE g.id = ?1"),
                [&id],
                grain_from_row,
            )
            .op("read new grain")?;
        w.commit(tx, "commit create instance grain")?;
        Ok(grain)
    }

    /// The grain of `kind` named `instance`, whoever owns it.
    pub fn instance_grain(&self, kind: &str, instance: &str) -> Result<Option<Grain>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {GRAIN_COLUMNS} WHERE g.kind = ?1 AND g.instance = ?2"),
                params![kind, instance],
                grain_from_row,
            )
            .optional()
            .op("read instance grain")
    }

    pub fn grain(&self, id: &str) -> Result<Option<Grain>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {GRAIN_COLUMNS} WHERE g.id = ?1"),
                [id],
                grain_from_row,
            )
            .optional()
            .op("read grain")
    }

    /// Grains of one user, or of one kind.
    pub fn grains_where(
        &self,
        user: Option<&str>,
        kind: Option<&str>,
    ) -> Result<Vec<Grain>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {GRAIN_COLUMNS} WHERE (?1 IS NULL OR u.name = ?1)
                 AND (?2 IS NULL OR g.kind = ?2) ORDER BY u.name, g.kind"
            ))
            .op("list grains")?;
        let rows = stmt
            .query_map(params![user, kind], grain_from_row)
            .op("list grains")?;
        rows.collect::<Result<_, _>>().op("list grains")
    }

    /// The app version the grain's data was last migrated to ("" when never).
    pub fn grain_app_version(&self, id: &str) -> Result<String, StateError> {
        self.conn()
            .query_row("SELECT app_version FROM grains WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .op("read grain app version")
    }

    /// Records that the grain's data now belongs to `version`.
    pub fn set_grain_app_version(&self, id: &str, version: &str) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set grain app version")?;
        let old: String = tx
            .query_row("SELECT app_version FROM grains WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .op("read grain app version")?;
        tx.execute(
            "UPDATE grains SET app_version = ?2 WHERE id = ?1",
            params![id, version],
        )
        .op("set grain app version")?;
        if old != version {
            record(
                &tx,
                "supervisor",
                "grain.migrate",
                id,
                &format!("from={old:?} to={version}"),
            )?;
        }
        w.commit(tx, "commit set grain app version")
    }

    /// Sets grain `id`'s quota: `None` for the default (storage.quota_mib),
    /// `Some(0)` for none, else bytes. Audited as `grain.quota`.
    pub fn set_grain_quota(
        &self,
        id: &str,
        quota: Option<u64>,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set grain quota")?;
        let n = tx
            .execute(
                "UPDATE grains SET quota_bytes = ?2 WHERE id = ?1",
                params![id, quota.map(|q| q as i64)],
            )
            .op("set grain quota")?;
        if n == 0 {
            return Err(StateError::Invalid(format!("no grain {id}")));
        }
        let detail = match quota {
            None => "default".to_owned(),
            Some(0) => "none".to_owned(),
            Some(b) => format!("{b} bytes"),
        };
        record(&tx, actor, "grain.quota", id, &detail)?;
        w.commit(tx, "commit set grain quota")
    }

    /// The grains whose quota is not the default: (id, 0 for none or
    /// bytes).
    pub fn grain_quotas(&self) -> Result<Vec<(String, u64)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, quota_bytes FROM grains WHERE quota_bytes IS NOT NULL ORDER BY id")
            .op("read grain quotas")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .op("read grain quotas")?;
        rows.collect::<Result<_, _>>().op("read grain quotas")
    }

    /// Deletes a grain's record with its grants and sturdy references.
    pub fn delete_grain(&self, id: &str, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin delete grain")?;
        let n = tx
            .execute("DELETE FROM grains WHERE id = ?1", [id])
            .op("delete grain")?;
        if n > 0 {
            record(&tx, actor, "grain.delete", id, "")?;
        }
        w.commit(tx, "commit delete grain")?;
        Ok(n > 0)
    }

    /// The live grant that lets `from_grain` use `capability`, if any (the
    /// oldest when several grains provide it).
    pub fn find_grant(
        &self,
        from_grain: &str,
        capability: &str,
    ) -> Result<Option<Grant>, StateError> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {GRANT_COLUMNS} FROM grants WHERE from_grain = ?1
                     AND capability = ?2 AND revoked_at IS NULL ORDER BY id LIMIT 1"
                ),
                params![from_grain, capability],
                grant_from_row,
            )
            .optional()
            .op("find grant")
    }

    /// The live grant that lets `from_grain` use `capability` provided by
    /// `to_grain`, if any.
    pub fn find_grant_from(
        &self,
        from_grain: &str,
        to_grain: &str,
        capability: &str,
    ) -> Result<Option<Grant>, StateError> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT {GRANT_COLUMNS} FROM grants WHERE from_grain = ?1 AND to_grain = ?2
                     AND capability = ?3 AND revoked_at IS NULL"
                ),
                params![from_grain, to_grain, capability],
                grant_from_row,
            )
            .optional()
            .op("find grant")
    }

    /// The live grants `from_grain` holds, with each provider's owner and
    /// kind, oldest first.
    pub fn grants_held(
        &self,
        from_grain: &str,
    ) -> Result<Vec<(Grant, String, String)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT g.id, g.from_grain, g.to_grain, g.capability, g.created_at, u.name, p.kind
                 FROM grants g JOIN grains p ON p.id = g.to_grain JOIN users u ON u.id = p.user_id
                 WHERE g.from_grain = ?1 AND g.revoked_at IS NULL ORDER BY g.id",
            )
            .op("list held grants")?;
        let rows = stmt
            .query_map([from_grain], |r| {
                Ok((grant_from_row(r)?, r.get(5)?, r.get(6)?))
            })
            .op("list held grants")?;
        rows.collect::<Result<_, _>>().op("list held grants")
    }

    /// A grant by id, live or not, with whether it is still live.
    pub fn grant(&self, id: i64) -> Result<Option<(Grant, bool)>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {GRANT_COLUMNS}, revoked_at IS NULL FROM grants WHERE id = ?1"),
                [id],
                |r| Ok((grant_from_row(r)?, r.get(5)?)),
            )
            .optional()
            .op("read grant")
    }

    /// Stores a sturdy reference: the token's hash, who saved it and for
    /// which grant.
    pub fn save_sturdy_ref(
        &self,
        token_hash: &[u8],
        holder: &str,
        grant_id: i64,
        label: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin save sturdy ref")?;
        let held: i64 = tx
            .query_row(
                "SELECT count(*) FROM sturdy_refs WHERE holder = ?1",
                [holder],
                |r| r.get(0),
            )
            .op("count sturdy refs")?;
        if held >= MAX_STURDY_REFS_PER_GRAIN {
            return Err(StateError::Conflict(format!(
                "{MAX_STURDY_REFS_PER_GRAIN} saved tokens of grain {holder}; drop some first"
            )));
        }
        tx.execute(
            "INSERT INTO sturdy_refs (token_hash, holder, grant_id, label) VALUES (?1, ?2, ?3, ?4)",
            params![token_hash, holder, grant_id, label],
        )
        .op("insert sturdy ref")?;
        record(
            &tx,
            holder,
            "token.save",
            holder,
            &format!("grant={grant_id} label={label}"),
        )?;
        w.commit(tx, "commit save sturdy ref")
    }

    /// The live grant a sturdy reference held by `holder` stands for; `None`
    /// for an unknown token, another grain's token or a revoked grant.
    pub fn sturdy_ref(&self, token_hash: &[u8], holder: &str) -> Result<Option<Grant>, StateError> {
        self.conn()
            .query_row(
                "SELECT g.id, g.from_grain, g.to_grain, g.capability, g.created_at
                 FROM sturdy_refs s JOIN grants g ON g.id = s.grant_id
                 WHERE s.token_hash = ?1 AND s.holder = ?2 AND g.revoked_at IS NULL",
                params![token_hash, holder],
                grant_from_row,
            )
            .optional()
            .op("read sturdy ref")
    }

    /// Forgets a sturdy reference held by `holder`; false when there was none.
    pub fn drop_sturdy_ref(&self, token_hash: &[u8], holder: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin drop sturdy ref")?;
        let n = tx
            .execute(
                "DELETE FROM sturdy_refs WHERE token_hash = ?1 AND holder = ?2",
                params![token_hash, holder],
            )
            .op("delete sturdy ref")?;
        w.commit(tx, "commit drop sturdy ref")?;
        Ok(n > 0)
    }

    /// Grants `from_grain` the capability `capability` provided by
    /// `to_grain`. Granting what is already granted is a conflict.
    pub fn add_grant(
        &self,
        from_grain: &str,
        to_grain: &str,
        capability: &str,
        actor: &str,
    ) -> Result<Grant, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add grant")?;
        let inserted = tx.execute(
            "INSERT INTO grants (from_grain, to_grain, capability) VALUES (?1, ?2, ?3)",
            params![from_grain, to_grain, capability],
        );
        match inserted {
            Err(e) if is_constraint(&e) => {
                return Err(StateError::Conflict(format!(
                    "grant {from_grain} -> {to_grain} {capability} (or an unknown grain)"
                )));
            }
            other => other.op("insert grant")?,
        };
        let id = tx.last_insert_rowid();
        record(
            &tx,
            actor,
            "grant.add",
            from_grain,
            &format!("id={id} to={to_grain} cap={capability}"),
        )?;
        let grant = tx
            .query_row(
                &format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?1"),
                [id],
                grant_from_row,
            )
            .op("read grant")?;
        w.commit(tx, "commit add grant")?;
        Ok(grant)
    }

    /// Grants that have not been revoked.
    pub fn live_grants(&self) -> Result<Vec<Grant>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, from_grain, to_grain, capability, created_at FROM grants
                 WHERE revoked_at IS NULL ORDER BY id",
            )
            .op("list grants")?;
        let rows = stmt.query_map([], grant_from_row).op("list grants")?;
        rows.collect::<Result<_, _>>().op("list grants")
    }

    /// Every revoked grant, as its id and what tells it from a later
    /// grant given the same id (holder, provider, capability, creation
    /// time): what a cluster node compares after it applied the shared
    /// records, to cut capabilities another node's revoke ended.
    pub fn revoked_grants(&self) -> Result<Vec<(i64, String)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, from_grain || ' ' || to_grain || ' ' || capability || ' ' || created_at \
                 FROM grants WHERE revoked_at IS NOT NULL ORDER BY id",
            )
            .op("read revoked grants")?;
        let ids = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .op("read revoked grants")?
            .collect::<Result<Vec<(i64, String)>, _>>()
            .op("read revoked grants")?;
        Ok(ids)
    }

    /// Revokes a live grant; false when there was none with that id.
    pub fn revoke_grant(&self, id: i64, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin revoke grant")?;
        let n = tx
            .execute(
                "UPDATE grants SET revoked_at = unixepoch() WHERE id = ?1 AND revoked_at IS NULL",
                [id],
            )
            .op("revoke grant")?;
        if n > 0 {
            record(&tx, actor, "grant.revoke", &id.to_string(), "")?;
        }
        w.commit(tx, "commit revoke grant")?;
        Ok(n > 0)
    }
}

/// Sturdy references one grain may keep.
pub(crate) const MAX_STURDY_REFS_PER_GRAIN: i64 = 1000;

const GRANT_COLUMNS: &str = "id, from_grain, to_grain, capability, created_at";

fn grant_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        id: r.get(0)?,
        from_grain: r.get(1)?,
        to_grain: r.get(2)?,
        capability: r.get(3)?,
        created_at: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[test]
    fn one_app_per_kind_and_upgrades_keep_the_kind() {
        let store = store();
        store.register_app("git", "app-a", "1", "admin").unwrap();
        assert!(matches!(
            store.register_app("git", "app-b", "1", "admin"),
            Err(StateError::KindTaken(k)) if k == "git"
        ));
        let upgraded = store.register_app("git", "app-a", "2", "admin").unwrap();
        assert_eq!(upgraded.version, "2");
        assert_eq!(store.list_apps().unwrap(), vec![upgraded]);
    }

    #[test]
    fn grains_are_unique_per_user_kind_and_uid() {
        let store = store_with_user("alice");
        store.add_user(&name("bob"), "h", "admin").unwrap();
        store.register_app("git", "app-a", "1", "admin").unwrap();
        store.register_app("blog", "app-b", "1", "admin").unwrap();
        let g = store
            .create_grain(
                "g1",
                &name("alice"),
                "git",
                HostUid::Exact(100_000),
                "admin",
            )
            .unwrap();
        assert_eq!(
            (g.user.as_str(), g.kind.as_str(), g.host_uid),
            ("alice", "git", 100_000)
        );
        // Same user and kind again.
        assert!(matches!(
            store.create_grain(
                "g2",
                &name("alice"),
                "git",
                HostUid::Exact(100_001),
                "admin"
            ),
            Err(StateError::Conflict(_))
        ));
        // Same uid for another grain.
        assert!(matches!(
            store.create_grain("g3", &name("bob"), "git", HostUid::Exact(100_000), "admin"),
            Err(StateError::Conflict(_))
        ));
        // Kind with no app installed.
        assert!(matches!(
            store.create_grain("g4", &name("bob"), "mail", HostUid::Exact(100_004), "admin"),
            Err(StateError::Conflict(_))
        ));
        assert!(matches!(
            store.create_grain(
                "g5",
                &name("ghost"),
                "git",
                HostUid::Exact(100_005),
                "admin"
            ),
            Err(StateError::NoSuchUser(_))
        ));
        assert_eq!(store.list_grains().unwrap().len(), 1);

        // A user with grains cannot be removed behind the supervisor's back.
        assert!(matches!(
            store.remove_user(&name("alice"), "admin"),
            Err(StateError::UserHasGrains { grains: 1, .. })
        ));
    }

    #[test]
    fn host_uids_are_allocated_lowest_free_first_and_never_shared() {
        let store = store_with_user("alice");
        store.add_user(&name("bob"), "h", "admin").unwrap();
        for kind in ["git", "blog", "mail"] {
            store.register_app(kind, kind, "1", "admin").unwrap();
        }
        let range = HostUid::FirstFreeIn(granary_model::UidRange {
            start: 5000,
            count: 3,
        });
        let uid = |id: &str, user: &str, kind: &str| {
            store
                .create_grain(id, &name(user), kind, range, "admin")
                .map(|g| g.host_uid)
        };
        assert_eq!(uid("a", "alice", "git").unwrap(), 5000);
        assert_eq!(uid("b", "alice", "blog").unwrap(), 5001);
        assert_eq!(uid("c", "bob", "git").unwrap(), 5002);
        let full = uid("d", "bob", "blog").unwrap_err();
        assert!(full.to_string().contains("widen jail.uid_range"), "{full}");
        // A freed uid is handed out again, lowest first.
        store
            .conn()
            .execute("DELETE FROM grains WHERE id = 'b'", [])
            .unwrap();
        assert_eq!(uid("d", "bob", "blog").unwrap(), 5001);
        let all: Vec<u32> = store
            .list_grains()
            .unwrap()
            .iter()
            .map(|g| g.host_uid)
            .collect();
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(all.len(), unique.len());
    }

    #[test]
    fn grants_add_list_revoke() {
        let store = store_with_user("alice");
        store.register_app("git", "app-a", "1", "admin").unwrap();
        store.register_app("blog", "app-b", "1", "admin").unwrap();
        store
            .create_grain("git1", &name("alice"), "git", HostUid::Exact(1), "admin")
            .unwrap();
        store
            .create_grain("blog1", &name("alice"), "blog", HostUid::Exact(2), "admin")
            .unwrap();

        let grant = store
            .add_grant("blog1", "git1", "git.read:site", "alice")
            .unwrap();
        assert!(matches!(
            store.add_grant("blog1", "git1", "git.read:site", "alice"),
            Err(StateError::Conflict(_))
        ));
        assert!(matches!(
            store.add_grant("blog1", "nope", "git.read:site", "alice"),
            Err(StateError::Conflict(_))
        ));
        assert_eq!(store.live_grants().unwrap(), vec![grant.clone()]);
        assert!(store.revoke_grant(grant.id, "alice").unwrap());
        assert!(!store.revoke_grant(grant.id, "alice").unwrap());
        assert!(store.live_grants().unwrap().is_empty());
        // Once revoked, the same route may be granted again.
        store
            .add_grant("blog1", "git1", "git.read:site", "alice")
            .unwrap();
    }
}

#[cfg(test)]
mod supervisor_queries {
    use super::*;
    use crate::test_support::*;

    const UIDS: HostUid = HostUid::FirstFreeIn(granary_model::UidRange {
        start: 7000,
        count: 100,
    });

    #[test]
    fn on_demand_grains_are_named_unique_and_bounded_per_user() {
        let store = store_with_user("alice");
        store.add_user(&name("bob"), "h", "admin").unwrap();
        let manifest = "id = 'org.x.room'\nversion = '1'\nkind = 'room'\non_demand = true\nexec = ['/bin/r']\n";
        store
            .install_app("room", "org.x.room", "1", manifest, true, "admin")
            .unwrap();
        // None for every user: rooms come when someone asks for one.
        assert!(store.ensure_grains(UIDS, "admin").unwrap().is_empty());
        let g = store
            .create_instance_grain(&name("alice"), "room", "family", UIDS, 2, "admin")
            .unwrap();
        assert_eq!(
            (g.id.as_str(), g.user.as_str(), g.instance.as_str()),
            ("alice-room--family", "alice", "family")
        );
        assert_eq!(store.instance_grain("room", "family").unwrap(), Some(g));
        assert_eq!(store.instance_grain("room", "work").unwrap(), None);
        // A name is one room, whoever asks.
        assert!(matches!(
            store.create_instance_grain(&name("bob"), "room", "family", UIDS, 2, "admin"),
            Err(StateError::Conflict(_))
        ));
        assert!(matches!(
            store.create_instance_grain(&name("bob"), "room", "Bad_Name", UIDS, 2, "admin"),
            Err(StateError::Invalid(_))
        ));
        store
            .create_instance_grain(&name("alice"), "room", "work", UIDS, 2, "admin")
            .unwrap();
        assert!(matches!(
            store.create_instance_grain(&name("alice"), "room", "third", UIDS, 2, "admin"),
            Err(StateError::Invalid(_))
        ));
        store
            .create_instance_grain(&name("bob"), "room", "third", UIDS, 2, "admin")
            .unwrap();
        // A restore by id keeps the name.
        assert!(store.delete_grain("alice-room--work", "admin").unwrap());
        let back = store
            .create_grain("alice-room--work", &name("alice"), "room", UIDS, "admin")
            .unwrap();
        assert_eq!(back.instance, "work");
    }

    #[test]
    fn ensure_grains_makes_one_per_user_and_app_once() {
        let store = store_with_user("alice");
        store.add_user(&name("bob"), "h", "admin").unwrap();
        assert!(store.ensure_grains(UIDS, "admin").unwrap().is_empty());
        store
            .install_app("hello", "org.x.hello", "1", "kind = 'hello'", true, "admin")
            .unwrap();
        let made = store.ensure_grains(UIDS, "admin").unwrap();
        let ids: Vec<&str> = made.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["alice-hello", "bob-hello"]);
        assert!(store.ensure_grains(UIDS, "admin").unwrap().is_empty());
        assert_eq!(store.grains_where(Some("bob"), None).unwrap().len(), 1);
        assert_eq!(store.grains_where(None, Some("hello")).unwrap().len(), 2);
        let app = store.app("hello").unwrap().unwrap();
        assert!(app.dev_mode);
        assert_eq!(app.manifest, "kind = 'hello'");
        assert!(matches!(
            store.remove_app("hello", "admin"),
            Err(StateError::Conflict(_))
        ));
        assert!(store.delete_grain("alice-hello", "admin").unwrap());
        assert!(store.delete_grain("bob-hello", "admin").unwrap());
        assert!(store.remove_app("hello", "admin").unwrap());
        store.remove_user(&name("bob"), "admin").unwrap();
    }

    #[test]
    fn sturdy_refs_follow_their_grant_and_holder() {
        let store = store_with_user("alice");
        store
            .install_app("a", "x.a", "1", "", true, "admin")
            .unwrap();
        store
            .install_app("b", "x.b", "1", "", true, "admin")
            .unwrap();
        store.ensure_grains(UIDS, "admin").unwrap();
        let grant = store
            .add_grant("alice-b", "alice-a", "notify:x", "alice")
            .unwrap();
        assert_eq!(
            store.find_grant("alice-b", "notify:x").unwrap(),
            Some(grant.clone())
        );
        assert_eq!(store.find_grant("alice-a", "notify:x").unwrap(), None);
        store
            .save_sturdy_ref(&[1; 32], "alice-b", grant.id, "site")
            .unwrap();
        assert_eq!(
            store.sturdy_ref(&[1; 32], "alice-b").unwrap(),
            Some(grant.clone())
        );
        // Another grain cannot use it.
        assert_eq!(store.sturdy_ref(&[1; 32], "alice-a").unwrap(), None);
        store.revoke_grant(grant.id, "alice").unwrap();
        assert_eq!(store.sturdy_ref(&[1; 32], "alice-b").unwrap(), None);
        assert_eq!(store.grant(grant.id).unwrap(), Some((grant, false)));
        assert!(store.drop_sturdy_ref(&[1; 32], "alice-b").unwrap());
        assert!(!store.drop_sturdy_ref(&[1; 32], "alice-b").unwrap());
    }
}

#[cfg(test)]
mod app_versions {
    use super::*;
    use crate::test_support::*;

    fn app<'a>(id: &'a str, version: &'a str, image: &'a str) -> NewApp<'a> {
        NewApp {
            kind: "git",
            app_id: id,
            version,
            manifest: "m",
            dev_mode: false,
            image,
            replace: false,
            keep_previous: true,
        }
    }

    #[test]
    fn upgrades_keep_the_previous_version_for_a_rollback() {
        let store = store();
        store.put_app(&app("ka", "1", "git/aaa"), "admin").unwrap();
        let up = store.put_app(&app("ka", "2", "git/bbb"), "admin").unwrap();
        assert_eq!(
            (up.previous_version.as_str(), up.previous_image.as_str()),
            ("1", "git/aaa")
        );
        // Another signer needs replace.
        assert!(matches!(
            store.put_app(&app("kb", "3", "git/ccc"), "admin"),
            Err(StateError::KindTaken(_))
        ));
        let back = store.roll_back_app("git", "admin").unwrap();
        assert_eq!(
            (back.version.as_str(), back.image_dir().as_str()),
            ("1", "git/aaa")
        );
        assert!(store.roll_back_app("git", "admin").is_err());
        let replaced = store
            .put_app(
                &NewApp {
                    replace: true,
                    ..app("kb", "3", "git/ccc")
                },
                "admin",
            )
            .unwrap();
        assert_eq!(replaced.app_id, "kb");
    }
}
