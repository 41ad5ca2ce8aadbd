//! `Apps`: install, list, upgrade and remove apps. One app per kind; a
//! package's signature decides who may replace it.

use std::path::PathBuf;
use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_grains::{GrainId, Start};
use granary_model::Manifest;
use granary_schema::admin_capnp::{self, apps};
use granary_state::{App, Store};

use super::{ACTOR, Ctx, any_failure, blocking, fail, grain_failure, state_failure};
use crate::daemon::install;

pub(super) struct Apps(pub(super) Rc<Ctx>);

/// An unsigned app directory, in development mode.
async fn install_dir(ctx: &Ctx, dir: PathBuf, replace: bool) -> Result<(App, usize), capnp::Error> {
    let d = dir.clone();
    let (manifest, text) = blocking(move || install::read_app_dir(&d).map_err(any_failure)).await?;
    check_kind(ctx, &manifest, replace).await?;
    let apps_dir = ctx.apps_dir.clone();
    if install::version_dir(&apps_dir, &manifest).exists() {
        stop_kind(ctx, &manifest.kind).await?;
    }
    let store = ctx.store.clone();
    let uids = ctx.uids;
    let result = blocking(move || {
        install::install_dir(&apps_dir, &dir, &manifest, &text).map_err(any_failure)?;
        let image = format!("{}/{}", manifest.kind, manifest.version);
        record_app(&store, uids, &manifest, &text, true, &image, replace)
    })
    .await?;
    tracing::warn!(app = %result.0.app_id, version = %result.0.version, kind = %result.0.kind, "installed an UNSIGNED app in development mode");
    Ok(result)
}

/// A signed package file (also the demo's built-in apps at start).
pub(super) async fn install_package(
    ctx: &Ctx,
    path: PathBuf,
    replace: bool,
) -> Result<(App, usize), capnp::Error> {
    let (limits, runs) = (ctx.package_limits, ctx.image_arches.clone());
    let pkg = blocking(move || install::check_package(&path, &limits).map_err(any_failure)).await?;
    let installed = check_kind(ctx, &pkg.manifest, replace).await?;
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
    let apps_dir = ctx.apps_dir.clone();
    let (image, pkg) = blocking(move || {
        let image =
            install::unpack_package(&apps_dir, &pkg, &limits, &runs).map_err(any_failure)?;
        Ok((image, pkg))
    })
    .await?;
    if installed.is_some_and(|old| old.image_dir() != image) {
        stop_kind(ctx, &pkg.manifest.kind).await?;
    }
    let store = ctx.store.clone();
    let uids = ctx.uids;
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
    ctx: &Ctx,
    manifest: &Manifest,
    replace: bool,
) -> Result<Option<App>, capnp::Error> {
    let (store, kind) = (ctx.store.clone(), manifest.kind.clone());
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

/// Every grain of a kind, by id.
async fn grains_of(ctx: &Ctx, kind: &str) -> Result<Vec<GrainId>, capnp::Error> {
    let (store, k) = (ctx.store.clone(), kind.to_owned());
    let grains =
        blocking(move || store.grains_where(None, Some(&k)).map_err(state_failure)).await?;
    grains
        .iter()
        .map(|g| GrainId::parse(&g.id).map_err(fail))
        .collect()
}

/// Stops every grain of a kind (they start again on next use).
async fn stop_kind(ctx: &Ctx, kind: &str) -> Result<(), capnp::Error> {
    for id in grains_of(ctx, kind).await? {
        ctx.local_grains.stop(&id).await.map_err(grain_failure)?;
    }
    Ok(())
}

/// Records an installed app and the grain records it gives every user
/// (blocking: call on the blocking pool).
fn record_app(
    store: &Store,
    uids: granary_state::HostUid,
    manifest: &Manifest,
    text: &str,
    dev_mode: bool,
    image: &str,
    replace: bool,
) -> Result<(App, usize), capnp::Error> {
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

fn set_texts(mut list: capnp::text_list::Builder<'_>, items: &[String]) {
    for (i, v) in items.iter().enumerate() {
        list.set(i as u32, v);
    }
}

fn fill_app(mut out: admin_capnp::app::Builder<'_>, app: &App) {
    out.set_kind(&app.kind);
    out.set_app_id(&app.app_id);
    out.set_version(&app.version);
    out.set_dev_mode(app.dev_mode);
    out.set_installed_at(app.installed_at);
    if let Ok(m) = Manifest::parse(&app.manifest) {
        set_texts(
            out.reborrow().init_services(m.services.len() as u32),
            &m.services,
        );
        set_texts(out.reborrow().init_offers(m.offers.len() as u32), &m.offers);
        fill_manifest(out.init_manifest(), &m);
    }
}

/// `granary_model::Manifest` as `schema/package.capnp`'s `Manifest`.
fn fill_manifest(mut out: granary_schema::package_capnp::manifest::Builder<'_>, m: &Manifest) {
    out.set_id(&m.id);
    out.set_version(&m.version);
    out.set_kind(&m.kind);
    out.set_per_user(m.per_user);
    out.set_title(&m.title);
    set_texts(out.reborrow().init_exec(m.exec.len() as u32), &m.exec);
    set_texts(out.reborrow().init_env(m.env.len() as u32), &m.env);
    set_texts(
        out.reborrow().init_services(m.services.len() as u32),
        &m.services,
    );
    set_texts(out.reborrow().init_offers(m.offers.len() as u32), &m.offers);
    set_texts(
        out.reborrow().init_requests(m.requests.len() as u32),
        &m.requests,
    );
    set_texts(
        out.reborrow().init_migrate(m.migrate.len() as u32),
        &m.migrate,
    );
    out.set_idle_timeout_seconds(m.idle_timeout_seconds.unwrap_or(0));
    let mut limits = out.init_limits();
    limits.set_memory_mib(m.limits.memory_mib.unwrap_or(0));
    limits.set_pids(m.limits.pids.unwrap_or(0));
    limits.set_cpu_weight(m.limits.cpu_weight.unwrap_or(0));
}

impl apps::Server for Apps {
    async fn install(
        self: CapRc<Self>,
        params: apps::InstallParams,
        mut results: apps::InstallResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let path = PathBuf::from(p.get_path()?.to_str()?);
        let replace = p.get_replace();
        let (app, made) = if path.is_dir() {
            install_dir(&self.0, path, replace).await?
        } else {
            install_package(&self.0, path, replace).await?
        };
        let mut r = results.get();
        fill_app(r.reborrow().init_app(), &app);
        r.set_grains_created(made as u32);
        Ok(())
    }

    async fn list(
        self: CapRc<Self>,
        _: apps::ListParams,
        mut results: apps::ListResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let apps = blocking(move || store.list_apps().map_err(state_failure)).await?;
        let mut list = results.get().init_apps(apps.len() as u32);
        for (i, app) in apps.iter().enumerate() {
            fill_app(list.reborrow().get(i as u32), app);
        }
        Ok(())
    }

    async fn remove(
        self: CapRc<Self>,
        params: apps::RemoveParams,
        _: apps::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let kind = p.get_kind()?.to_str()?.to_owned();
        let purge = p.get_purge();
        let (store, k) = (self.0.store.clone(), kind.clone());
        let grains =
            blocking(move || store.grains_where(None, Some(&k)).map_err(state_failure)).await?;
        super::grains::remove_grains(&self.0, grains, purge, &format!("app {kind}"))
            .await
            .map_err(any_failure)?;
        let (store, k) = (self.0.store.clone(), kind.clone());
        let removed = blocking(move || store.remove_app(&k, actor).map_err(state_failure)).await?;
        if !removed {
            return Err(fail(format!("no app of kind {kind} is installed")));
        }
        let _ = std::fs::remove_dir_all(self.0.apps_dir.join(&kind));
        tracing::info!(%kind, "app removed");
        Ok(())
    }

    async fn upgrade(
        self: CapRc<Self>,
        params: apps::UpgradeParams,
        mut results: apps::UpgradeResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let ctx = &self.0;
        let path = PathBuf::from(params.get()?.get_path()?.to_str()?);
        let (limits, runs) = (ctx.package_limits, ctx.image_arches.clone());
        let pkg =
            blocking(move || install::check_package(&path, &limits).map_err(any_failure)).await?;
        let (store, kind) = (ctx.store.clone(), pkg.manifest.kind.clone());
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
        let apps_dir = ctx.apps_dir.clone();
        let (image, pkg) = blocking(move || {
            let image =
                install::unpack_package(&apps_dir, &pkg, &limits, &runs).map_err(any_failure)?;
            Ok((image, pkg))
        })
        .await?;

        // Which grains to bring back on the new version (at least one, to
        // check that it starts).
        let of_kind = grains_of(ctx, &current.kind).await?;
        let mut restart = Vec::new();
        for id in &of_kind {
            let status = ctx.local_grains.status(id).await.map_err(grain_failure)?;
            if status.state == "running" {
                restart.push(id.clone());
            }
        }
        if restart.is_empty()
            && let Some(first) = of_kind.first()
        {
            restart.push(first.clone());
        }
        for id in &of_kind {
            ctx.local_grains.stop(id).await.map_err(grain_failure)?;
        }
        // The grains about to start on the new version (and migrate) are
        // snapshotted first, so a failed upgrade puts their data back too.
        // The snapshots stay (`upgrade-<time>`, never pruned).
        let label = granary_datasets::timed_label("upgrade");
        let mut saved = Vec::new();
        for id in &restart {
            if ctx.datasets.path(id).exists() {
                ctx.local_grains
                    .snapshot(id, &label)
                    .await
                    .map_err(grain_failure)?;
                saved.push(id.clone());
            }
        }
        let store = ctx.store.clone();
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
                    actor,
                )
                .map_err(state_failure)
        })
        .await?;
        let mut failure = None;
        for id in &restart {
            if let Err(e) = ctx.local_grains.start(id, Start::Answering).await {
                failure = Some(e.to_string());
                break;
            }
        }
        let mut r = results.get();
        r.set_previous_version(&current.version);
        let Some(error) = failure else {
            tracing::info!(kind = %app.kind, from = %current.version, to = %app.version, "app upgraded");
            fill_app(r.reborrow().init_app(), &app);
            r.set_restarted(restart.len() as u32);
            return Ok(());
        };
        tracing::error!(kind = %app.kind, version = %app.version, %error, "upgrade failed to start; rolling back");
        for id in &restart {
            let _ = ctx.local_grains.stop(id).await;
        }
        // The data as it was before any migration, and the version it
        // belongs to.
        for id in &saved {
            if let Err(e) = ctx.local_grains.rollback(id, &label).await {
                tracing::error!(grain = %id, error = %e, "cannot put the grain's data back after a failed upgrade");
            }
            let (store, id, version) = (ctx.store.clone(), id.to_string(), current.version.clone());
            blocking(move || {
                store
                    .set_grain_app_version(&id, &version)
                    .map_err(state_failure)
            })
            .await?;
        }
        let (store, kind) = (ctx.store.clone(), app.kind.clone());
        let back =
            blocking(move || store.roll_back_app(&kind, actor).map_err(state_failure)).await?;
        let mut restarted = 0;
        for id in &restart {
            if ctx.local_grains.start(id, Start::Running).await.is_ok() {
                restarted += 1;
            }
        }
        fill_app(r.reborrow().init_app(), &back);
        r.set_restarted(restarted);
        r.set_rolled_back(true);
        r.set_error(&error);
        Ok(())
    }
}
