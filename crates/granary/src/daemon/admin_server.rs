//! The daemon side of `schema/admin.capnp`, served on the admin unix socket.
//!
//! Cap'n Proto RPC objects are `!Send`, so the admin interface runs on its
//! own thread with a single-threaded runtime and a `LocalSet`. Blocking work
//! (SQLite, argon2) goes to that runtime's blocking pool.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use capnp::capability::Rc;
use capnp_rpc::rpc_twoparty_capnp;
use granary_model::{GrainKind, UserName};
use granary_schema::admin_capnp::admin;
use granary_state::{RevokeSelector, StateError, Store};
use tokio::sync::watch;

use super::DaemonInfo;
use super::backup_admin::{Backups, Place};
use super::grain_admin::{self, Grains, fill_app, fill_grant, fill_status, grain_id};

/// Who appears as the actor in audit events written through the admin socket.
const ACTOR: &str = "admin";

/// Binds the admin socket, owner-only. The caller holds the data dir lock, so
/// a socket file already there is a leftover of a daemon that died.
pub(super) fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale admin socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale {}", path.display())),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    listener.set_nonblocking(true).context("admin socket")?;
    Ok(listener)
}

pub(super) struct AdminThread {
    handle: JoinHandle<()>,
}

impl AdminThread {
    pub(super) fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("the admin thread panicked");
        }
    }
}

/// Serves the admin interface on its own thread until `stop` turns true.
/// What the admin thread needs to run the supervisor.
pub(super) struct GrainsSetup {
    pub(super) params: granary_supervisor::SupervisorParams,
    pub(super) uids: granary_state::HostUid,
    pub(super) package_limits: granary_package::Limits,
    /// Packages to install at start (the demo's built-in apps).
    pub(super) preinstall: Vec<std::path::PathBuf>,
    pub(super) backup: granary_config::Backup,
    pub(super) data_dir: std::path::PathBuf,
    /// The gateway's requests for connections to grains.
    pub(super) connects:
        Option<tokio::sync::mpsc::Receiver<super::gateway_backend::ConnectRequest>>,
}

pub(super) fn spawn(
    listener: std::os::unix::net::UnixListener,
    store: Arc<Store>,
    info: DaemonInfo,
    grains: GrainsSetup,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<AdminThread> {
    let daemon_uid = nix::unistd::geteuid().as_raw();
    let handle = std::thread::Builder::new()
        .name("admin-rpc".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let listener = match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serve the admin socket");
                        return;
                    }
                };
                let datasets = grains.params.datasets.clone();
                let apps_dir = grains.params.apps_dir.clone();
                let sup = match granary_supervisor::Supervisor::new(grains.params) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the grain supervisor");
                        return;
                    }
                };
                let backups = std::rc::Rc::new(Backups {
                    store: store.clone(),
                    sup: sup.clone(),
                    datasets: datasets.clone(),
                    uids: grains.uids,
                    config: grains.backup,
                    data_dir: grains.data_dir,
                    busy: tokio::sync::Mutex::new(()),
                });
                backups.schedule();
                if let Some(requests) = grains.connects {
                    tokio::task::spawn_local(super::gateway_backend::serve_connects(sup.clone(), requests));
                }
                let service = Rc::new(AdminService {
                    backups,
                    store,
                    info,
                    grains: Grains {
                        sup: sup.clone(),
                        datasets,
                        apps_dir,
                        uids: grains.uids,
                        package_limits: grains.package_limits,
                    },
                });
                for package in grains.preinstall {
                    match service.install_package(package.clone(), false).await {
                        Ok((app, _)) => tracing::info!(app = %app.app_id, kind = %app.kind, version = %app.version, "built-in app installed"),
                        Err(e) => tracing::error!(package = %package.display(), error = %e.extra, "cannot install a built-in app"),
                    }
                }
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                tracing::warn!(error = %e, "admin accept failed");
                                continue;
                            }
                        },
                        _ = stop.wait_for(|s| *s) => {
                            tracing::info!("stopping grains");
                            sup.shutdown().await;
                            break;
                        }
                    };
                    // The socket is 0600 already; check the peer too, so a
                    // socket passed around or a loosened mode grants nothing.
                    match stream.peer_cred() {
                        Ok(cred) if cred.uid() == daemon_uid || cred.uid() == 0 => {}
                        Ok(cred) => {
                            tracing::warn!(
                                uid = cred.uid(),
                                "refused an admin connection from another user"
                            );
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read admin peer credentials");
                            continue;
                        }
                    }
                    let client: admin::Client = capnp_rpc::new_client_from_rc(service.clone());
                    let rpc = crate::admin::rpc_over_unix(
                        stream,
                        rpc_twoparty_capnp::Side::Server,
                        Some(client.client),
                    );
                    tokio::task::spawn_local(async move {
                        if let Err(e) = rpc.await {
                            tracing::debug!(error = %e, "admin connection ended");
                        }
                    });
                }
            });
        })
        .context("cannot start the admin thread")?;
    Ok(AdminThread { handle })
}

struct AdminService {
    backups: std::rc::Rc<Backups>,
    store: Arc<Store>,
    info: DaemonInfo,
    grains: Grains,
}

impl AdminService {
    /// An unsigned app directory, in development mode.
    async fn install_dir(
        &self,
        dir: std::path::PathBuf,
        replace: bool,
    ) -> Result<(granary_state::App, usize), capnp::Error> {
        let d = dir.clone();
        let (manifest, text) =
            blocking(move || grain_admin::read_app_dir(&d).map_err(any_failure)).await?;
        self.check_kind(&manifest, replace).await?;
        let apps_dir = self.grains.apps_dir.clone();
        if grain_admin::version_dir(&apps_dir, &manifest).exists() {
            self.stop_kind(&manifest.kind).await?;
        }
        let store = self.store.clone();
        let uids = self.grains.uids;
        let result = blocking(move || {
            grain_admin::install_dir(&apps_dir, &dir, &manifest, &text).map_err(any_failure)?;
            let image = format!("{}/{}", manifest.kind, manifest.version);
            record_app(&store, uids, &manifest, &text, true, &image, replace)
        })
        .await?;
        tracing::warn!(app = %result.0.app_id, version = %result.0.version, kind = %result.0.kind, "installed an UNSIGNED app in development mode");
        Ok(result)
    }

    /// A signed package file.
    async fn install_package(
        &self,
        path: std::path::PathBuf,
        replace: bool,
    ) -> Result<(granary_state::App, usize), capnp::Error> {
        let limits = self.grains.package_limits;
        let pkg = blocking(move || grain_admin::check_package(&path, &limits).map_err(any_failure))
            .await?;
        let installed = self.check_kind(&pkg.manifest, replace).await?;
        // The same app again at an older version would downgrade its data
        // behind the admin's back: that takes --replace.
        if let Some(old) = &installed
            && old.app_id == pkg.manifest.id
            && !replace
            && granary_model::compare_versions(&pkg.manifest.version, &old.version)
                == std::cmp::Ordering::Less
        {
            return Err(fail(format!(
                "{} {} is older than the installed {}; pass --replace to downgrade",
                pkg.manifest.kind, pkg.manifest.version, old.version
            )));
        }
        let apps_dir = self.grains.apps_dir.clone();
        let (image, pkg) = blocking(move || {
            let image =
                grain_admin::unpack_package(&apps_dir, &pkg, &limits).map_err(any_failure)?;
            Ok((image, pkg))
        })
        .await?;
        if installed.is_some_and(|old| old.image_dir() != image) {
            self.stop_kind(&pkg.manifest.kind).await?;
        }
        let store = self.store.clone();
        let uids = self.grains.uids;
        let result = blocking(move || {
            let text = pkg.manifest.to_toml();
            record_app(&store, uids, &pkg.manifest, &text, false, &image, replace)
        })
        .await?;
        tracing::info!(app = %result.0.app_id, version = %result.0.version, kind = %result.0.kind, "installed a signed package");
        Ok(result)
    }

    /// Refuses another app id for an installed kind unless `replace`;
    /// returns the app installed for the kind, if any.
    async fn check_kind(
        &self,
        manifest: &granary_model::Manifest,
        replace: bool,
    ) -> Result<Option<granary_state::App>, capnp::Error> {
        let (store, kind) = (self.store.clone(), manifest.kind.clone());
        let installed = blocking(move || store.app(&kind).map_err(state_failure)).await?;
        if let Some(app) = &installed
            && app.app_id != manifest.id
            && !replace
        {
            return Err(fail(format!(
                "kind {} is provided by {} already, and this app is {} (another signer); pass --replace to hand the kind over",
                manifest.kind, app.app_id, manifest.id
            )));
        }
        Ok(installed)
    }

    /// Stops every grain of a kind (they start again on next use).
    async fn stop_kind(&self, kind: &str) -> Result<(), capnp::Error> {
        let (store, k) = (self.store.clone(), kind.to_owned());
        let grains =
            blocking(move || store.grains_where(None, Some(&k)).map_err(state_failure)).await?;
        for g in grains {
            self.grains.sup.stop(&g.id).await.map_err(sup_failure)?;
        }
        Ok(())
    }
}

/// Records an installed app and the grain records it gives every user
/// (blocking: call on the blocking pool).
fn record_app(
    store: &Store,
    uids: granary_state::HostUid,
    manifest: &granary_model::Manifest,
    text: &str,
    dev_mode: bool,
    image: &str,
    replace: bool,
) -> Result<(granary_state::App, usize), capnp::Error> {
    let app = store
        .put_app(
            &granary_state::NewApp {
                kind: &manifest.kind,
                app_id: &manifest.id,
                version: &manifest.version,
                manifest: text,
                dev_mode,
                image,
                replace,
                keep_previous: false,
            },
            ACTOR,
        )
        .map_err(state_failure)?;
    let made = store.ensure_grains(uids, ACTOR).map_err(state_failure)?;
    Ok((app, made.len()))
}

/// A directory given on the command line, or a configured target's name
/// (anything without a '/').
fn place(dir: &str, target: &str) -> Result<Place, capnp::Error> {
    match (dir, target) {
        ("", "") => Err(fail("say where: --to DIR or --target NAME")),
        (d, "") if d.contains('/') => Ok(Place::Dir(std::path::PathBuf::from(d))),
        (name, "") | ("", name) => Ok(Place::Named(name.to_owned())),
        _ => Err(fail("give either a directory or a target, not both")),
    }
}

fn any_failure(e: anyhow::Error) -> capnp::Error {
    fail(format!("{e:#}"))
}

fn sup_failure(e: granary_supervisor::SupervisorError) -> capnp::Error {
    match e {
        granary_supervisor::SupervisorError::State(s) => state_failure(s),
        other => fail(other),
    }
}

/// An admin-facing failure: the message is what the CLI prints.
fn fail(message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(message.to_string())
}

fn state_failure(e: StateError) -> capnp::Error {
    match e {
        StateError::Query { .. } | StateError::Open { .. } | StateError::Migration { .. } => {
            tracing::error!(error = %e, "state database failure");
            fail(format!("internal error: {e}"))
        }
        other => fail(other),
    }
}

/// Runs blocking work (SQLite, argon2) off the RPC thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, capnp::Error> + Send + 'static,
) -> Result<T, capnp::Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| fail(format!("internal error: {e}")))?
}

fn user_name(text: capnp::text::Reader<'_>) -> Result<UserName, capnp::Error> {
    UserName::new(text.to_str()?).map_err(fail)
}

fn grain_kind(text: &str) -> Result<GrainKind, capnp::Error> {
    GrainKind::new(text).map_err(fail)
}

/// A password chosen by the admin, or a generated one (returned to show once).
fn chosen_or_generated(password: &str) -> Result<(String, Option<String>), capnp::Error> {
    if password.is_empty() {
        let generated = granary_auth::generate_password().map_err(fail)?;
        Ok((generated.clone(), Some(generated)))
    } else {
        granary_auth::check_password_policy(password).map_err(fail)?;
        Ok((password.to_owned(), None))
    }
}

fn hash(password: &str) -> Result<String, capnp::Error> {
    granary_auth::hash_password(password).map_err(fail)
}

fn fill_ssh_key(
    mut out: granary_schema::admin_capnp::ssh_key::Builder<'_>,
    k: &granary_state::SshKey,
) {
    out.set_id(k.id);
    out.set_user(&k.user);
    out.set_key(&k.key);
    out.set_fingerprint(&k.fingerprint);
    out.set_label(&k.label);
    out.set_created_at(k.created_at);
    out.set_last_used_at(k.last_used_at.unwrap_or(0));
}

fn fill_user(mut out: granary_schema::admin_capnp::user::Builder<'_>, user: &granary_state::User) {
    out.set_name(&user.name);
    out.set_created_at(user.created_at);
    out.set_app_passwords(user.app_passwords as u32);
}

fn fill_app_password(
    mut out: granary_schema::admin_capnp::app_password::Builder<'_>,
    p: &granary_state::AppPassword,
) {
    out.set_id(p.id);
    out.set_user(&p.user);
    out.set_kind(&p.kind);
    out.set_label(&p.label);
    out.set_created_at(p.created_at);
    out.set_last_used_at(p.last_used_at.unwrap_or(0));
}

impl admin::Server for AdminService {
    async fn status(
        self: Rc<Self>,
        _: admin::StatusParams,
        mut results: admin::StatusResults,
    ) -> Result<(), capnp::Error> {
        let store = self.store.clone();
        let (counts, schema) = blocking(move || {
            Ok((
                store.counts().map_err(state_failure)?,
                store.schema_version().map_err(state_failure)?,
            ))
        })
        .await?;
        let info = &self.info;
        let mut s = results.get().init_status();
        s.set_healthy(true);
        s.set_version(env!("CARGO_PKG_VERSION"));
        s.set_schema_version(schema);
        s.set_pid(std::process::id());
        s.set_uptime_seconds(info.started.elapsed().as_secs());
        s.set_data_dir(info.data_dir.to_string_lossy().as_ref());
        s.set_domain(&info.domain);
        s.set_storage_backend(info.storage_backend);
        s.set_sandbox(&info.sandbox);
        s.set_ca_file(
            info.ca_file
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_str(),
        );
        s.set_users(counts.users);
        s.set_app_passwords(counts.app_passwords);
        s.set_apps(counts.apps);
        s.set_grains(counts.grains);
        s.set_grants(counts.grants);
        let mut listeners = s.init_listeners(info.listeners.len() as u32);
        for (i, (name, address)) in info.listeners.iter().enumerate() {
            let mut l = listeners.reborrow().get(i as u32);
            l.set_name(name);
            l.set_address(address);
        }
        Ok(())
    }

    async fn add_user(
        self: Rc<Self>,
        params: admin::AddUserParams,
        mut results: admin::AddUserResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let (password, generated) = chosen_or_generated(p.get_password()?.to_str()?)?;
        let store = self.store.clone();
        let user = blocking(move || {
            // Check first so a taken name costs no hashing.
            if store.user(&name).map_err(state_failure)?.is_some() {
                return Err(state_failure(StateError::UserExists(name.to_string())));
            }
            let hash = hash(&password)?;
            store.add_user(&name, &hash, ACTOR).map_err(state_failure)
        })
        .await?;
        tracing::info!(user = %user.name, "user added");
        let (store, uids) = (self.store.clone(), self.grains.uids);
        let made =
            blocking(move || store.ensure_grains(uids, ACTOR).map_err(state_failure)).await?;
        for g in made {
            tracing::info!(grain = %g.id, "grain record created");
        }
        let mut r = results.get();
        fill_user(r.reborrow().init_user(), &user);
        r.set_generated_password(generated.as_deref().unwrap_or(""));
        Ok(())
    }

    async fn list_users(
        self: Rc<Self>,
        _: admin::ListUsersParams,
        mut results: admin::ListUsersResults,
    ) -> Result<(), capnp::Error> {
        let store = self.store.clone();
        let users = blocking(move || store.list_users().map_err(state_failure)).await?;
        let mut list = results.get().init_users(users.len() as u32);
        for (i, user) in users.iter().enumerate() {
            fill_user(list.reborrow().get(i as u32), user);
        }
        Ok(())
    }

    async fn remove_user(
        self: Rc<Self>,
        params: admin::RemoveUserParams,
        _: admin::RemoveUserResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let purge = p.get_purge();
        let store = self.store.clone();
        let shown = name.to_string();
        let (s, n) = (store.clone(), shown.clone());
        if blocking(move || s.user(&name).map_err(state_failure))
            .await?
            .is_none()
        {
            return Err(state_failure(StateError::NoSuchUser(shown)));
        }
        let s = store.clone();
        let grains =
            blocking(move || s.grains_where(Some(&n), None).map_err(state_failure)).await?;
        self.grains
            .remove_grains(&store, grains, purge, &format!("user {shown}"))
            .await
            .map_err(any_failure)?;
        let name = UserName::new(&shown).map_err(fail)?;
        blocking(move || store.remove_user(&name, ACTOR).map_err(state_failure)).await?;
        tracing::info!(user = %shown, "user removed");
        Ok(())
    }

    async fn set_password(
        self: Rc<Self>,
        params: admin::SetPasswordParams,
        mut results: admin::SetPasswordResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let (password, generated) = chosen_or_generated(p.get_password()?.to_str()?)?;
        let store = self.store.clone();
        blocking(move || {
            if store.user(&name).map_err(state_failure)?.is_none() {
                return Err(state_failure(StateError::NoSuchUser(name.to_string())));
            }
            let hash = hash(&password)?;
            store
                .set_password_hash(&name, &hash, ACTOR)
                .map_err(state_failure)
        })
        .await?;
        results
            .get()
            .set_generated_password(generated.as_deref().unwrap_or(""));
        Ok(())
    }

    async fn check_password(
        self: Rc<Self>,
        params: admin::CheckPasswordParams,
        mut results: admin::CheckPasswordResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let name = user_name(p.get_name()?)?;
        let kind = match p.get_kind()?.to_str()? {
            "" => None,
            k => Some(grain_kind(k)?),
        };
        let password = p.get_password()?.to_str()?.to_owned();
        let store = self.store.clone();
        let valid = blocking(move || {
            let Some(creds) = store
                .credentials(&name, kind.as_ref().map(GrainKind::as_str))
                .map_err(state_failure)?
            else {
                return Ok(false);
            };
            if granary_auth::verify_password(&password, &creds.password_hash).map_err(fail)? {
                return Ok(true);
            }
            for (id, hash) in &creds.app_passwords {
                if granary_auth::verify_password(&password, hash).map_err(fail)? {
                    store.touch_app_password(*id).map_err(state_failure)?;
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await?;
        results.get().set_valid(valid);
        Ok(())
    }

    async fn add_app_password(
        self: Rc<Self>,
        params: admin::AddAppPasswordParams,
        mut results: admin::AddAppPasswordResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let kind = grain_kind(p.get_kind()?.to_str()?)?;
        let label = p.get_label()?.to_str()?.trim().to_owned();
        if label.len() > 200 || label.chars().any(char::is_control) {
            return Err(fail("label must be at most 200 printable characters"));
        }
        let store = self.store.clone();
        let (record, password) = blocking(move || {
            if store.user(&user).map_err(state_failure)?.is_none() {
                return Err(state_failure(StateError::NoSuchUser(user.to_string())));
            }
            let password = granary_auth::generate_password().map_err(fail)?;
            let hash = hash(&password)?;
            let record = store
                .add_app_password(&user, kind.as_str(), &label, &hash, ACTOR)
                .map_err(state_failure)?;
            Ok((record, password))
        })
        .await?;
        let mut r = results.get();
        fill_app_password(r.reborrow().init_app_password(), &record);
        r.set_password(&password);
        Ok(())
    }

    async fn list_app_passwords(
        self: Rc<Self>,
        params: admin::ListAppPasswordsParams,
        mut results: admin::ListAppPasswordsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let kind = match p.get_kind()?.to_str()? {
            "" => None,
            k => Some(grain_kind(k)?),
        };
        let store = self.store.clone();
        let list = blocking(move || {
            store
                .list_app_passwords(&user, kind.as_ref().map(GrainKind::as_str))
                .map_err(state_failure)
        })
        .await?;
        let mut out = results.get().init_app_passwords(list.len() as u32);
        for (i, p) in list.iter().enumerate() {
            fill_app_password(out.reborrow().get(i as u32), p);
        }
        Ok(())
    }

    async fn revoke_app_passwords(
        self: Rc<Self>,
        params: admin::RevokeAppPasswordsParams,
        mut results: admin::RevokeAppPasswordsResults,
    ) -> Result<(), capnp::Error> {
        use granary_schema::admin_capnp::revoke_selector::Which;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let selector = match p.get_selector()?.which()? {
            Which::Id(id) => RevokeSelector::Id(id),
            Which::Kind(kind) => RevokeSelector::Kind(grain_kind(kind?.to_str()?)?.to_string()),
        };
        let store = self.store.clone();
        let n = blocking(move || {
            store
                .revoke_app_passwords(&user, &selector, ACTOR)
                .map_err(state_failure)
        })
        .await?;
        results.get().set_revoked(n as u32);
        Ok(())
    }

    async fn install_app(
        self: Rc<Self>,
        params: admin::InstallAppParams,
        mut results: admin::InstallAppResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let path = std::path::PathBuf::from(p.get_path()?.to_str()?);
        let replace = p.get_replace();
        let (app, made) = if path.is_dir() {
            self.install_dir(path, replace).await?
        } else {
            self.install_package(path, replace).await?
        };
        let mut r = results.get();
        fill_app(r.reborrow().init_app(), &app);
        r.set_grains_created(made as u32);
        Ok(())
    }

    async fn list_snapshots(
        self: Rc<Self>,
        params: admin::ListSnapshotsParams,
        mut results: admin::ListSnapshotsResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_id(params.get()?.get_grain()?.to_str()?);
        let snaps = self
            .grains
            .sup
            .list_snapshots(&id)
            .await
            .map_err(sup_failure)?;
        let mut list = results.get().init_snapshots(snaps.len() as u32);
        for (i, s) in snaps.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_name(&s.name);
            out.set_created_at(s.created);
        }
        Ok(())
    }

    async fn create_snapshot(
        self: Rc<Self>,
        params: admin::CreateSnapshotParams,
        mut results: admin::CreateSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_id(p.get_grain()?.to_str()?);
        let label = match p.get_label()?.to_str()? {
            "" => granary_datasets::timed_label("manual"),
            l if l.starts_with("auto-") => {
                return Err(fail("labels starting with auto- are the scheduler's"));
            }
            l => {
                if !granary_datasets::valid_label(l) {
                    return Err(fail(format!(
                        "snapshot label {l:?} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
                    )));
                }
                l.to_owned()
            }
        };
        let taken = self
            .grains
            .sup
            .snapshot(&id, &label)
            .await
            .map_err(sup_failure)?;
        let mut r = results.get();
        r.set_name(&taken.name);
        r.set_report(&taken.report);
        r.set_frozen_micros(taken.frozen.as_micros() as u64);
        Ok(())
    }

    async fn rollback_snapshot(
        self: Rc<Self>,
        params: admin::RollbackSnapshotParams,
        mut results: admin::RollbackSnapshotResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_id(p.get_grain()?.to_str()?);
        let name = p.get_name()?.to_str()?.to_owned();
        let restarted = self
            .grains
            .sup
            .rollback(&id, &name)
            .await
            .map_err(sup_failure)?;
        let (store, detail) = (self.store.clone(), format!("snapshot={name}"));
        let i = id.clone();
        blocking(move || {
            store
                .record_event(ACTOR, "grain.rollback", &i, &detail)
                .map_err(state_failure)
        })
        .await?;
        results.get().set_restarted(restarted);
        Ok(())
    }

    async fn prune_snapshots(
        self: Rc<Self>,
        params: admin::PruneSnapshotsParams,
        mut results: admin::PruneSnapshotsResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_id(params.get()?.get_grain()?.to_str()?);
        let deleted = self.grains.sup.prune(&id).await.map_err(sup_failure)?;
        let mut list = results.get().init_deleted(deleted.len() as u32);
        for (i, d) in deleted.iter().enumerate() {
            list.set(i as u32, d);
        }
        Ok(())
    }

    async fn export_backup(
        self: Rc<Self>,
        params: admin::ExportBackupParams,
        mut results: admin::ExportBackupResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let place = place(p.get_dir()?.to_str()?, p.get_target()?.to_str()?)?;
        let non_empty = |t: &str| Some(t.to_owned()).filter(|t| !t.is_empty());
        let user = non_empty(p.get_user()?.to_str()?);
        let grain = non_empty(p.get_grain()?.to_str()?).map(|g| grain_id(&g));
        let progress = p.get_progress().ok();
        let report = self
            .backups
            .export(place, user, grain, progress)
            .await
            .map_err(fail)?;
        results
            .get()
            .set_report_json(serde_json::to_string(&report).map_err(fail)?);
        Ok(())
    }

    async fn restore_backup(
        self: Rc<Self>,
        params: admin::RestoreBackupParams,
        mut results: admin::RestoreBackupResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let place = place(p.get_from()?.to_str()?, "")?;
        let non_empty = |t: &str| Some(t.to_owned()).filter(|t| !t.is_empty());
        let grain = p.get_grain()?.to_str()?.to_owned();
        let identity = p.get_identity()?.to_vec();
        let trust = p
            .get_trust()?
            .iter()
            .map(|t| Ok(t?.to_str()?.to_owned()))
            .collect::<Result<Vec<_>, capnp::Error>>()?;
        let progress = p.get_progress().ok();
        let json = if p.get_drill() {
            let report = self
                .backups
                .drill(place, non_empty(&grain), identity, trust, progress)
                .await
                .map_err(fail)?;
            serde_json::to_string(&report)
        } else {
            if grain.is_empty() {
                return Err(fail("name the grain to restore (--grain USER/KIND)"));
            }
            let report = self
                .backups
                .restore(
                    place,
                    &grain,
                    identity,
                    non_empty(p.get_as()?.to_str()?),
                    non_empty(p.get_snapshot()?.to_str()?),
                    trust,
                    progress,
                )
                .await
                .map_err(fail)?;
            serde_json::to_string(&report)
        };
        results.get().set_report_json(json.map_err(fail)?);
        Ok(())
    }

    async fn backup_keys(
        self: Rc<Self>,
        _: admin::BackupKeysParams,
        mut results: admin::BackupKeysResults,
    ) -> Result<(), capnp::Error> {
        let backups = self.backups.clone();
        let (key, recipients, targets) = backups.describe().map_err(fail)?;
        let mut r = results.get();
        r.set_node_key(&key);
        let mut list = r.reborrow().init_recipients(recipients.len() as u32);
        for (i, x) in recipients.iter().enumerate() {
            list.set(i as u32, x);
        }
        let mut list = r.init_targets(targets.len() as u32);
        for (i, x) in targets.iter().enumerate() {
            list.set(i as u32, x);
        }
        Ok(())
    }

    async fn add_ssh_key(
        self: Rc<Self>,
        params: admin::AddSshKeyParams,
        mut results: admin::AddSshKeyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let line = p.get_key()?.to_str()?.to_owned();
        let mut label = p.get_label()?.to_str()?.to_owned();
        let (key, fingerprint) = granary_gateway::ssh::parse_public_key(&line).map_err(fail)?;
        if label.is_empty() {
            // The key line's comment, if it has one.
            label = line
                .split_whitespace()
                .nth(2)
                .unwrap_or("")
                .chars()
                .take(64)
                .collect();
        }
        let store = self.store.clone();
        let added = blocking(move || {
            store
                .add_ssh_key(&user, &key, &fingerprint, &label, ACTOR)
                .map_err(state_failure)
        })
        .await?;
        fill_ssh_key(results.get().init_key(), &added);
        Ok(())
    }

    async fn list_ssh_keys(
        self: Rc<Self>,
        params: admin::ListSshKeysParams,
        mut results: admin::ListSshKeysResults,
    ) -> Result<(), capnp::Error> {
        let user = user_name(params.get()?.get_user()?)?;
        let store = self.store.clone();
        let keys = blocking(move || store.list_ssh_keys(&user).map_err(state_failure)).await?;
        let mut list = results.get().init_keys(keys.len() as u32);
        for (i, k) in keys.iter().enumerate() {
            fill_ssh_key(list.reborrow().get(i as u32), k);
        }
        Ok(())
    }

    async fn remove_ssh_key(
        self: Rc<Self>,
        params: admin::RemoveSshKeyParams,
        mut results: admin::RemoveSshKeyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let id = p.get_id();
        let store = self.store.clone();
        let removed = blocking(move || {
            store
                .remove_ssh_key(&user, id, ACTOR)
                .map_err(state_failure)
        })
        .await?;
        results.get().set_removed(removed);
        Ok(())
    }

    async fn blog_domains(
        self: Rc<Self>,
        params: admin::BlogDomainsParams,
        mut results: admin::BlogDomainsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let normal = |d: &str| -> Result<Option<String>, capnp::Error> {
            let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
            if d.is_empty() {
                return Ok(None);
            }
            let ok = d.len() <= 253
                && d.contains('.')
                && d.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(fail(format!("{d:?} is not a domain name")));
            }
            Ok(Some(d))
        };
        let add = normal(p.get_add()?.to_str()?)?;
        let remove = normal(p.get_remove()?.to_str()?)?;
        if let Some(d) = &add
            && (d == &self.info.domain || d.ends_with(&format!(".{}", self.info.domain)))
        {
            return Err(fail(format!(
                "{d} is under Granary's own domain; {user}'s blog is already at {user}.{}",
                self.info.domain
            )));
        }
        let store = self.store.clone();
        let domains = blocking(move || {
            if let Some(d) = remove
                && !store
                    .remove_blog_domain(&user, &d, ACTOR)
                    .map_err(state_failure)?
            {
                return Err(fail(format!("{d} is not one of {user}'s blog domains")));
            }
            if let Some(d) = add {
                store
                    .add_blog_domain(&user, &d, ACTOR)
                    .map_err(state_failure)?;
            }
            store.blog_domains(&user).map_err(state_failure)
        })
        .await?;
        let mut list = results.get().init_domains(domains.len() as u32);
        for (i, d) in domains.iter().enumerate() {
            list.set(i as u32, d);
        }
        Ok(())
    }

    async fn git_repo(
        self: Rc<Self>,
        params: admin::GitRepoParams,
        mut results: admin::GitRepoResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let repo = p.get_repo()?.to_str()?.trim_end_matches(".git").to_owned();
        if !granary_wire::http::valid_repo(&repo) {
            return Err(fail(format!(
                "{repo:?} is not a repository name: 1 to 100 of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
            )));
        }
        let mut created = false;
        if p.get_create() {
            let id = granary_model::GrainId::for_user(user.as_str(), "git")
                .map_err(fail)?
                .to_string();
            let status = self.grains.sup.status(&id).await.map_err(|_| {
                fail(format!(
                    "{user} has no git grain: is the git app installed? (granary app list)"
                ))
            })?;
            let conn = self
                .grains
                .sup
                .connect(
                    &status.id,
                    "http",
                    granary_supervisor::Identity::user(user.as_str(), "admin-cli"),
                )
                .await
                .map_err(sup_failure)?;
            created = super::grain_admin::ask_git_create(conn, user.as_str(), &repo).await?;
        }
        let visibility = p.get_visibility()?.to_str()?.to_owned();
        let store = self.store.clone();
        let (u, r) = (user.clone(), repo.clone());
        let public = blocking(move || {
            match visibility.as_str() {
                "" => {}
                "public" | "private" => store
                    .set_repo_public(&u, &r, visibility == "public", ACTOR)
                    .map_err(state_failure)?,
                other => {
                    return Err(fail(format!(
                        "visibility {other:?} is neither public nor private"
                    )));
                }
            }
            store.repo_public(u.as_str(), &r).map_err(state_failure)
        })
        .await?;
        let mut r = results.get();
        r.set_public(public);
        r.set_created(created);
        Ok(())
    }

    async fn upgrade_app(
        self: Rc<Self>,
        params: admin::UpgradeAppParams,
        mut results: admin::UpgradeAppResults,
    ) -> Result<(), capnp::Error> {
        let path = std::path::PathBuf::from(params.get()?.get_path()?.to_str()?);
        let limits = self.grains.package_limits;
        let pkg = blocking(move || grain_admin::check_package(&path, &limits).map_err(any_failure))
            .await?;
        let (store, kind) = (self.store.clone(), pkg.manifest.kind.clone());
        let current = blocking(move || store.app(&kind).map_err(state_failure))
            .await?
            .ok_or_else(|| {
                fail(format!(
                    "no app of kind {} is installed; use `granary app install`",
                    pkg.manifest.kind
                ))
            })?;
        if current.app_id != pkg.manifest.id {
            return Err(fail(format!(
                "kind {} is provided by {}, but this package is signed as {}; `granary app install --replace` hands the kind to another signer",
                current.kind, current.app_id, pkg.manifest.id
            )));
        }
        if granary_model::compare_versions(&pkg.manifest.version, &current.version)
            != std::cmp::Ordering::Greater
        {
            return Err(fail(format!(
                "version {} is not newer than the installed {}",
                pkg.manifest.version, current.version
            )));
        }
        let apps_dir = self.grains.apps_dir.clone();
        let (image, pkg) = blocking(move || {
            let image =
                grain_admin::unpack_package(&apps_dir, &pkg, &limits).map_err(any_failure)?;
            Ok((image, pkg))
        })
        .await?;

        // Which grains to bring back on the new version (at least one, to
        // check that it starts).
        let grains = self.grains.sup.list().await.map_err(sup_failure)?;
        let of_kind: Vec<_> = grains.iter().filter(|g| g.kind == current.kind).collect();
        let mut restart: Vec<String> = of_kind
            .iter()
            .filter(|g| g.state == "running")
            .map(|g| g.id.clone())
            .collect();
        if restart.is_empty()
            && let Some(first) = of_kind.first()
        {
            restart.push(first.id.clone());
        }
        for g in &of_kind {
            self.grains.sup.stop(&g.id).await.map_err(sup_failure)?;
        }
        // The grains about to start on the new version (and migrate) are
        // snapshotted first, so a failed upgrade puts their data back too.
        // The snapshots stay (`upgrade-<time>`, never pruned).
        let label = granary_datasets::timed_label("upgrade");
        let mut saved = Vec::new();
        for id in &restart {
            if self.grains.datasets.path(id).exists() {
                self.grains
                    .sup
                    .snapshot(id, &label)
                    .await
                    .map_err(sup_failure)?;
                saved.push(id.clone());
            }
        }
        let store = self.store.clone();
        let manifest_text = pkg.manifest.to_toml();
        let m = pkg.manifest.clone();
        let app = blocking(move || {
            store
                .put_app(
                    &granary_state::NewApp {
                        kind: &m.kind,
                        app_id: &m.id,
                        version: &m.version,
                        manifest: &manifest_text,
                        dev_mode: false,
                        image: &image,
                        replace: false,
                        keep_previous: true,
                    },
                    ACTOR,
                )
                .map_err(state_failure)
        })
        .await?;
        let mut failure = None;
        for id in &restart {
            if let Err(e) = self.grains.sup.start_checked(id).await {
                failure = Some(e.to_string());
                break;
            }
        }
        let mut r = results.get();
        r.set_previous_version(&current.version);
        match failure {
            None => {
                tracing::info!(kind = %app.kind, from = %current.version, to = %app.version, "app upgraded");
                fill_app(r.reborrow().init_app(), &app);
                r.set_restarted(restart.len() as u32);
            }
            Some(error) => {
                tracing::error!(kind = %app.kind, version = %app.version, %error, "upgrade failed to start; rolling back");
                for id in &restart {
                    let _ = self.grains.sup.stop(id).await;
                }
                // The data as it was before any migration, and the version
                // it belongs to.
                for id in &saved {
                    if let Err(e) = self.grains.sup.rollback(id, &label).await {
                        tracing::error!(grain = %id, error = %e, "cannot put the grain's data back after a failed upgrade");
                    }
                    let (store, id, version) =
                        (self.store.clone(), id.clone(), current.version.clone());
                    blocking(move || {
                        store
                            .set_grain_app_version(&id, &version)
                            .map_err(state_failure)
                    })
                    .await?;
                }
                let (store, kind) = (self.store.clone(), app.kind.clone());
                let back =
                    blocking(move || store.roll_back_app(&kind, ACTOR).map_err(state_failure))
                        .await?;
                let mut restarted = 0;
                for id in &restart {
                    if self.grains.sup.start(id).await.is_ok() {
                        restarted += 1;
                    }
                }
                fill_app(r.reborrow().init_app(), &back);
                r.set_restarted(restarted);
                r.set_rolled_back(true);
                r.set_error(&error);
            }
        }
        Ok(())
    }

    async fn list_apps(
        self: Rc<Self>,
        _: admin::ListAppsParams,
        mut results: admin::ListAppsResults,
    ) -> Result<(), capnp::Error> {
        let store = self.store.clone();
        let apps = blocking(move || store.list_apps().map_err(state_failure)).await?;
        let mut list = results.get().init_apps(apps.len() as u32);
        for (i, app) in apps.iter().enumerate() {
            fill_app(list.reborrow().get(i as u32), app);
        }
        Ok(())
    }

    async fn remove_app(
        self: Rc<Self>,
        params: admin::RemoveAppParams,
        _: admin::RemoveAppResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let kind = p.get_kind()?.to_str()?.to_owned();
        let purge = p.get_purge();
        let store = self.store.clone();
        let k = kind.clone();
        let s = store.clone();
        let grains =
            blocking(move || s.grains_where(None, Some(&k)).map_err(state_failure)).await?;
        self.grains
            .remove_grains(&store, grains, purge, &format!("app {kind}"))
            .await
            .map_err(any_failure)?;
        let k = kind.clone();
        let removed = blocking(move || store.remove_app(&k, ACTOR).map_err(state_failure)).await?;
        if !removed {
            return Err(fail(format!("no app of kind {kind} is installed")));
        }
        let _ = std::fs::remove_dir_all(self.grains.apps_dir.join(&kind));
        tracing::info!(%kind, "app removed");
        Ok(())
    }

    async fn list_grains(
        self: Rc<Self>,
        _: admin::ListGrainsParams,
        mut results: admin::ListGrainsResults,
    ) -> Result<(), capnp::Error> {
        let grains = self.grains.sup.list().await.map_err(sup_failure)?;
        let mut list = results.get().init_grains(grains.len() as u32);
        for (i, g) in grains.iter().enumerate() {
            fill_status(list.reborrow().get(i as u32), g);
        }
        Ok(())
    }

    async fn start_grain(
        self: Rc<Self>,
        params: admin::StartGrainParams,
        mut results: admin::StartGrainResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_id(params.get()?.get_grain()?.to_str()?);
        self.grains.sup.start(&id).await.map_err(sup_failure)?;
        let status = self.grains.sup.status(&id).await.map_err(sup_failure)?;
        fill_status(results.get().init_status(), &status);
        Ok(())
    }

    async fn stop_grain(
        self: Rc<Self>,
        params: admin::StopGrainParams,
        mut results: admin::StopGrainResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_id(params.get()?.get_grain()?.to_str()?);
        let was = self.grains.sup.stop(&id).await.map_err(sup_failure)?;
        results.get().set_was_running(was);
        Ok(())
    }

    async fn grain_status(
        self: Rc<Self>,
        params: admin::GrainStatusParams,
        mut results: admin::GrainStatusResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_id(params.get()?.get_grain()?.to_str()?);
        let status = self.grains.sup.status(&id).await.map_err(sup_failure)?;
        fill_status(results.get().init_status(), &status);
        Ok(())
    }

    async fn grain_logs(
        self: Rc<Self>,
        params: admin::GrainLogsParams,
        mut results: admin::GrainLogsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_id(p.get_grain()?.to_str()?);
        self.grains.sup.status(&id).await.map_err(sup_failure)?;
        let max = p.get_max_bytes().min(4 << 20);
        let log = self.grains.sup.logs(&id, max).map_err(sup_failure)?;
        results.get().set_log(&log);
        Ok(())
    }

    async fn connect_grain(
        self: Rc<Self>,
        params: admin::ConnectGrainParams,
        mut results: admin::ConnectGrainResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let reference = p.get_grain()?.to_str()?.to_owned();
        let id = grain_id(&reference);
        let service = p.get_service()?.to_str()?.to_owned();
        let client = p.get_client()?;
        let status = self.grains.sup.status(&id).await.map_err(sup_failure)?;
        let user = match p.get_user()?.to_str()? {
            "" => status.user.clone(),
            u => u.to_owned(),
        };
        let conn = self
            .grains
            .sup
            .connect(
                &id,
                &service,
                granary_supervisor::Identity::user(&user, "admin-cli"),
            )
            .await
            .map_err(sup_failure)?;
        let (read, write) = conn.stream.into_split();
        let guard = conn.guard;
        tokio::task::spawn_local(async move {
            if let Err(e) = granary_supervisor::handoff::pump_to(read, client).await {
                tracing::debug!(error = %e, "grain connection ended");
            }
            drop(guard);
        });
        let upstream: granary_schema::stream_capnp::byte_stream::Client =
            capnp_rpc::new_client(granary_supervisor::handoff::ByteStreamWriter::new(write));
        results.get().set_upstream(upstream);
        Ok(())
    }

    async fn add_grant(
        self: Rc<Self>,
        params: admin::AddGrantParams,
        mut results: admin::AddGrantResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let from = grain_id(p.get_from()?.to_str()?);
        let to = grain_id(p.get_to()?.to_str()?);
        let cap = p.get_capability()?.to_str()?.to_owned();
        granary_model::check_descriptor(&cap).map_err(fail)?;
        let store = self.store.clone();
        let grant = blocking(move || {
            let grain = |id: &str| -> Result<granary_state::Grain, capnp::Error> {
                store
                    .grain(id)
                    .map_err(state_failure)?
                    .ok_or_else(|| fail(format!("no grain {id}")))
            };
            let (f, t) = (grain(&from)?, grain(&to)?);
            if f.id == t.id {
                return Err(fail("a grain needs no grant to reach itself"));
            }
            if f.user != t.user {
                return Err(fail(format!(
                    "{}/{} and {}/{} belong to different users; grants stay within one user's grains",
                    f.user, f.kind, t.user, t.kind
                )));
            }
            let app = store
                .app(&t.kind)
                .map_err(state_failure)?
                .ok_or_else(|| fail(format!("no app of kind {} is installed", t.kind)))?;
            let manifest = granary_model::Manifest::parse(&app.manifest).map_err(fail)?;
            if !manifest.offers(&cap) {
                return Err(fail(format!(
                    "{} ({}) does not offer {}; it offers: {}",
                    t.kind,
                    manifest.id,
                    cap,
                    if manifest.offers.is_empty() { "nothing".to_owned() } else { manifest.offers.join(", ") }
                )));
            }
            store.add_grant(&f.id, &t.id, &cap, ACTOR).map_err(state_failure)
        })
        .await?;
        tracing::info!(grant = grant.id, from = %grant.from_grain, to = %grant.to_grain, cap = %grant.capability, "grant added");
        fill_grant(results.get().init_grant(), &grant);
        Ok(())
    }

    async fn list_grants(
        self: Rc<Self>,
        _: admin::ListGrantsParams,
        mut results: admin::ListGrantsResults,
    ) -> Result<(), capnp::Error> {
        let store = self.store.clone();
        let grants = blocking(move || store.live_grants().map_err(state_failure)).await?;
        let mut list = results.get().init_grants(grants.len() as u32);
        for (i, g) in grants.iter().enumerate() {
            fill_grant(list.reborrow().get(i as u32), g);
        }
        Ok(())
    }

    async fn revoke_grant(
        self: Rc<Self>,
        params: admin::RevokeGrantParams,
        _: admin::RevokeGrantResults,
    ) -> Result<(), capnp::Error> {
        let id = params.get()?.get_id();
        let store = self.store.clone();
        let revoked =
            blocking(move || store.revoke_grant(id, ACTOR).map_err(state_failure)).await?;
        if !revoked {
            return Err(fail(format!("no live grant {id}")));
        }
        self.grains.sup.revoked(id);
        tracing::info!(grant = id, "grant revoked");
        Ok(())
    }
}
