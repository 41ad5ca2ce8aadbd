//! The daemon side of `schema/admin.capnp`, served on the admin unix
//! socket: the root `Admin` (status, and one capability per concern) here,
//! each concern in a file of its own.
//!
//! Cap'n Proto RPC objects are `!Send`, so the admin interface runs on its
//! own thread with a single-threaded runtime and a `LocalSet`. Blocking
//! work (SQLite, argon2, file copies) goes to that runtime's blocking
//! pool. Grains are reached only through [`Grains`]; the supervisor lives
//! on its own thread.

mod apps;
mod backups;
mod blog;
mod certificates;
mod doctor;
mod doctor_hosts;
mod git;
mod grains;
mod grants;
mod health;
mod home;
mod home_tasks;
mod invites;
mod mail;
mod sign_in;
mod snapshots;
mod status;
mod tasks;
mod usage;
mod users;
mod xmpp;
pub(crate) use users::scram_verifiers;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use capnp::capability::Rc as CapRc;
use capnp_rpc::rpc_twoparty_capnp;
use granary_grains::{GrainError, GrainId, Grains};
use granary_model::{GrainKind, UserName};
use granary_schema::admin_capnp::admin;
use granary_state::{HostUid, StateError, Store};
use tokio::sync::watch;

use super::DaemonInfo;
use super::backups::Backups;

/// Who appears as the actor in audit events written through the admin socket.
pub(super) const ACTOR: &str = "admin";

/// What every admin capability works with.
#[derive(Clone)]
pub(super) struct Ctx {
    /// Who the audit log names for what is done through this: "admin" (the
    /// CLI), or "web:USER" (the web home, and its admin pages).
    pub(super) actor: &'static str,
    pub(super) store: Arc<Store>,
    /// A cluster node's grains: calls on one another node runs go there.
    pub(super) grains: Arc<dyn Grains>,
    /// This node's own grains, as moves drive them.
    pub(super) local_grains: Arc<dyn Grains>,
    pub(super) datasets: Arc<dyn granary_datasets::Datasets>,
    pub(super) apps_dir: PathBuf,
    pub(super) uids: HostUid,
    pub(super) package_limits: granary_package::Limits,
    /// The architectures whose images this node unpacks, preferred first.
    pub(super) image_arches: Vec<&'static str>,
    pub(super) info: DaemonInfo,
    pub(super) backups: Rc<Backups>,
    /// The local CA's directory, when it issues the certificate.
    pub(super) local_ca: Option<PathBuf>,
    /// The MX's inbound spool.
    pub(super) spool: Arc<granary_spool::Spool>,
    /// The outbound queue.
    pub(super) outbound: Arc<granary_spool::Spool>,
    pub(super) dkim: granary_gateway::smtp::DkimKeys,
    /// Seals second-factor secrets (`keys/web.key`).
    pub(super) web_key: [u8; 32],
    /// The gateway's cache of verified logins: a revoked app password is
    /// forgotten there at once.
    pub(super) verified: Arc<granary_gateway::VerifiedLogins>,
    /// Each grain's measured dataset size and when (the web home's).
    pub(super) usage:
        Rc<std::cell::RefCell<std::collections::HashMap<String, (std::time::Instant, u64)>>>,
}

impl Ctx {
    /// The same, acting for `user` of the web home: the audit log names
    /// them ("web:USER").
    pub(super) fn for_web(self: &Rc<Ctx>, user: &str) -> Rc<Ctx> {
        Rc::new(Ctx {
            actor: web_actor(user),
            ..(**self).clone()
        })
    }

    /// The inbound spool, or the outbound queue.
    pub(super) fn queue(&self, outbound: bool) -> Arc<granary_spool::Spool> {
        if outbound {
            self.outbound.clone()
        } else {
            self.spool.clone()
        }
    }
}

/// "web:USER", made once per user for the life of the daemon (the audit
/// calls take a `&'static str`; there are as many as users who sign in).
fn web_actor(user: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let name = format!("web:{user}");
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

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

/// What the admin thread is started with (everything `Send`; the `!Send`
/// parts are made on the thread).
pub(super) struct AdminSetup {
    pub(super) store: Arc<Store>,
    pub(super) grains: Arc<dyn Grains>,
    pub(super) local_grains: Arc<dyn Grains>,
    pub(super) datasets: Arc<dyn granary_datasets::Datasets>,
    pub(super) apps_dir: PathBuf,
    pub(super) uids: HostUid,
    pub(super) package_limits: granary_package::Limits,
    /// The architectures whose images this node unpacks, preferred first.
    pub(super) image_arches: Vec<&'static str>,
    pub(super) info: DaemonInfo,
    pub(super) backup: granary_config::Backup,
    pub(super) data_dir: PathBuf,
    /// Packages to install at start (the demo's built-in apps).
    pub(super) preinstall: Vec<PathBuf>,
    /// Told when those are installed.
    pub(super) installed: tokio::sync::oneshot::Sender<()>,
    pub(super) local_ca: Option<PathBuf>,
    pub(super) spool: Arc<granary_spool::Spool>,
    pub(super) outbound: Arc<granary_spool::Spool>,
    pub(super) dkim: granary_gateway::smtp::DkimKeys,
    /// The web home's end of its socket pair: served a `WebGate` only.
    pub(super) web: Option<std::os::unix::net::UnixStream>,
    pub(super) web_key: [u8; 32],
    pub(super) verified: Arc<granary_gateway::VerifiedLogins>,
}

/// Serves the admin interface on its own thread until `stop` turns true;
/// runs the backup schedule there too, and installs the built-in apps
/// before it accepts anyone.
pub(super) fn spawn(
    listener: std::os::unix::net::UnixListener,
    setup: AdminSetup,
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
                let backups = Rc::new(Backups {
                    store: setup.store.clone(),
                    grains: setup.grains.clone(),
                    datasets: setup.datasets.clone(),
                    uids: setup.uids,
                    config: setup.backup,
                    data_dir: setup.data_dir,
                    busy: tokio::sync::Mutex::new(()),
                    local_ca: setup.local_ca.clone(),
                    domain: setup.info.domain.clone(),
                });
                backups.schedule();
                let ctx = Rc::new(Ctx {
                    actor: ACTOR,
                    store: setup.store,
                    grains: setup.grains,
                    local_grains: setup.local_grains,
                    datasets: setup.datasets,
                    apps_dir: setup.apps_dir,
                    uids: setup.uids,
                    package_limits: setup.package_limits,
                    image_arches: setup.image_arches,
                    info: setup.info,
                    backups,
                    local_ca: setup.local_ca,
                    spool: setup.spool,
                    outbound: setup.outbound,
                    dkim: setup.dkim,
                    web_key: setup.web_key,
                    verified: setup.verified,
                    usage: Default::default(),
                });
                for package in setup.preinstall {
                    match apps::install_package(&ctx, package.clone(), false).await {
                        Ok((app, _)) => tracing::info!(app = %app.app_id, kind = %app.kind, version = %app.version, "built-in app installed"),
                        Err(e) => tracing::error!(package = %package.display(), error = %e.extra, "cannot install a built-in app"),
                    }
                }
                let _ = setup.installed.send(());
                if let Some(web) = setup.web {
                    sign_in::serve(web, &ctx);
                }
                let root: admin::Client = capnp_rpc::new_client(AdminService { ctx });
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                tracing::warn!(error = %e, "admin accept failed");
                                continue;
                            }
                        },
                        _ = stop.wait_for(|s| *s) => break,
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
                    let rpc = crate::admin::rpc_over_unix(
                        stream,
                        rpc_twoparty_capnp::Side::Server,
                        Some(root.clone().client),
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

/// The root capability.
struct AdminService {
    ctx: Rc<Ctx>,
}

/// The root capability over `ctx` (the admin pages' own, through `Home`).
pub(super) fn root(ctx: Rc<Ctx>) -> admin::Client {
    capnp_rpc::new_client(AdminService { ctx })
}

impl admin::Server for AdminService {
    async fn status(
        self: CapRc<Self>,
        _: admin::StatusParams,
        results: admin::StatusResults,
    ) -> Result<(), capnp::Error> {
        status::fill(&self.ctx, results).await
    }

    async fn users(
        self: CapRc<Self>,
        _: admin::UsersParams,
        mut results: admin::UsersResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_users(capnp_rpc::new_client(users::Users(self.ctx.clone())));
        Ok(())
    }

    async fn apps(
        self: CapRc<Self>,
        _: admin::AppsParams,
        mut results: admin::AppsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_apps(capnp_rpc::new_client(apps::Apps(self.ctx.clone())));
        Ok(())
    }

    async fn grains(
        self: CapRc<Self>,
        _: admin::GrainsParams,
        mut results: admin::GrainsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_grains(capnp_rpc::new_client(grains::GrainsAdmin(self.ctx.clone())));
        Ok(())
    }

    async fn grants(
        self: CapRc<Self>,
        _: admin::GrantsParams,
        mut results: admin::GrantsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_grants(capnp_rpc::new_client(grants::Grants(self.ctx.clone())));
        Ok(())
    }

    async fn snapshots(
        self: CapRc<Self>,
        _: admin::SnapshotsParams,
        mut results: admin::SnapshotsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_snapshots(capnp_rpc::new_client(snapshots::Snapshots(
                self.ctx.clone(),
            )));
        Ok(())
    }

    async fn backups(
        self: CapRc<Self>,
        _: admin::BackupsParams,
        mut results: admin::BackupsResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_backups(capnp_rpc::new_client(backups::BackupsAdmin(
                self.ctx.clone(),
            )));
        Ok(())
    }

    async fn git(
        self: CapRc<Self>,
        _: admin::GitParams,
        mut results: admin::GitResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_git(capnp_rpc::new_client(git::Git(self.ctx.clone())));
        Ok(())
    }

    async fn blog(
        self: CapRc<Self>,
        _: admin::BlogParams,
        mut results: admin::BlogResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_blog(capnp_rpc::new_client(blog::Blog(self.ctx.clone())));
        Ok(())
    }

    async fn mail(
        self: CapRc<Self>,
        _: admin::MailParams,
        mut results: admin::MailResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_mail(capnp_rpc::new_client(mail::Mail(self.ctx.clone())));
        Ok(())
    }

    async fn xmpp(
        self: CapRc<Self>,
        _: admin::XmppParams,
        mut results: admin::XmppResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_xmpp(capnp_rpc::new_client(xmpp::Xmpp(self.ctx.clone())));
        Ok(())
    }

    async fn tasks(
        self: CapRc<Self>,
        _: admin::TasksParams,
        mut results: admin::TasksResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_tasks(capnp_rpc::new_client(tasks::Tasks(self.ctx.clone())));
        Ok(())
    }

    async fn invites(
        self: CapRc<Self>,
        _: admin::InvitesParams,
        mut results: admin::InvitesResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_invites(capnp_rpc::new_client(invites::Invites(self.ctx.clone())));
        Ok(())
    }

    async fn certificates(
        self: CapRc<Self>,
        _: admin::CertificatesParams,
        mut results: admin::CertificatesResults,
    ) -> Result<(), capnp::Error> {
        let certificates = certificates::Certificates(self.ctx.clone());
        results
            .get()
            .set_certificates(capnp_rpc::new_client(certificates));
        Ok(())
    }

    async fn audit(
        self: CapRc<Self>,
        params: admin::AuditParams,
        mut results: admin::AuditResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let filter = granary_state::EventFilter {
            actor: p.get_actor()?.to_string()?,
            action: p.get_action()?.to_string()?,
            subject: p.get_subject()?.to_string()?,
            before: p.get_before(),
            limit: p.get_limit(),
        };
        let store = self.ctx.store.clone();
        let events = blocking(move || store.events(&filter).map_err(state_failure)).await?;
        let mut out = results.get().init_events(events.len() as u32);
        for (i, e) in events.iter().enumerate() {
            let mut o = out.reborrow().get(i as u32);
            o.set_id(e.id);
            o.set_at(e.at);
            o.set_actor(&e.actor);
            o.set_action(&e.action);
            o.set_subject(&e.subject);
            o.set_detail(&e.detail);
        }
        Ok(())
    }

    async fn doctor(
        self: CapRc<Self>,
        _: admin::DoctorParams,
        mut results: admin::DoctorResults,
    ) -> Result<(), capnp::Error> {
        let findings = doctor::run(&self.ctx).await?;
        let mut list = results.get().init_checks(findings.len() as u32);
        for (i, f) in findings.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_area(f.area);
            out.set_name(&f.name);
            out.set_level(f.level.as_str());
            out.set_detail(&f.detail);
            out.set_fix(&f.fix);
        }
        Ok(())
    }
}

/// An admin-facing failure: the message is what the CLI prints.
pub(super) fn fail(message: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(message.to_string())
}

pub(super) fn any_failure(e: anyhow::Error) -> capnp::Error {
    fail(format!("{e:#}"))
}

pub(super) fn state_failure(e: StateError) -> capnp::Error {
    match e {
        StateError::Query { .. } | StateError::Open { .. } | StateError::Migration { .. } => {
            tracing::error!(error = %e, "state database failure");
            fail(format!("internal error: {e}"))
        }
        other => fail(other),
    }
}

pub(super) fn grain_failure(e: GrainError) -> capnp::Error {
    fail(e)
}

/// Runs blocking work (SQLite, argon2) off the RPC thread.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, capnp::Error> + Send + 'static,
) -> Result<T, capnp::Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| fail(format!("internal error: {e}")))?
}

/// A user an admin names (an existing one: names reserved later stay
/// usable; `users.add` checks the reservation itself).
pub(super) fn user_name(text: capnp::text::Reader<'_>) -> Result<UserName, capnp::Error> {
    UserName::existing(text.to_str()?).map_err(fail)
}

pub(super) fn grain_kind(text: &str) -> Result<GrainKind, capnp::Error> {
    GrainKind::new(text).map_err(fail)
}

/// `alice/git` or a grain id, checked.
pub(super) fn grain_ref(text: capnp::text::Reader<'_>) -> Result<GrainId, capnp::Error> {
    GrainId::from_reference(text.to_str()?).map_err(fail)
}
