//! The supervisor on a thread of its own, and [`LocalGrains`], the `Send`
//! handle through which the rest of the daemon reaches it.
//!
//! Capnp-rpc objects are `!Send`, so the supervisor lives on one thread
//! with a current-thread runtime and a `LocalSet`. Each [`Grains`] call
//! crosses to that thread as a job (a closure run there with the
//! [`Supervisor`]) and its answer comes back on a oneshot. The caller's
//! tracing span goes with the job, so what the supervisor logs for a
//! connection carries the connection's fields.

use std::future::Future;
use std::pin::Pin;
use std::thread::JoinHandle;

use granary_grains::mail::{MailDelivery, MailStatus};
use granary_grains::{
    Connection, GrainError, GrainId, GrainStatus, Grains, GrainsFuture, Identity, Peer, Problem,
    Snapshot, SnapshotTaken, Start,
};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::{Supervisor, SupervisorParams};

type Job = Box<dyn FnOnce(Supervisor) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

enum Msg {
    Run(Job, tracing::Span),
    /// Stop every grain, answer, and end the thread.
    Shutdown(oneshot::Sender<()>),
}

/// Requests waiting for the supervisor thread before callers wait too.
const QUEUE: usize = 1024;

/// The `Send` handle to the local supervisor: [`Grains`] for grains on this
/// node. Cheap to clone.
#[derive(Clone)]
pub struct LocalGrains {
    jobs: mpsc::Sender<Msg>,
}

/// The supervisor's thread; [`SupervisorThread::stop`] stops every grain
/// and ends it.
pub struct SupervisorThread {
    jobs: mpsc::Sender<Msg>,
    handle: JoinHandle<()>,
    exits: std::sync::Arc<tokio::sync::Notify>,
}

impl LocalGrains {
    /// Starts the supervisor (its spawner thread, audit flusher and
    /// snapshot scheduler) on a thread named `grains`.
    pub fn spawn(params: SupervisorParams) -> std::io::Result<(LocalGrains, SupervisorThread)> {
        let (jobs, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let (ready_tx, ready) =
            std::sync::mpsc::channel::<std::io::Result<std::sync::Arc<tokio::sync::Notify>>>();
        let handle = std::thread::Builder::new()
            .name("grains".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let sup = match Supervisor::new(params) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(sup.grain_exits()));
                    while let Some(msg) = rx.recv().await {
                        match msg {
                            Msg::Run(job, span) => {
                                tokio::task::spawn_local(job(sup.clone()).instrument(span));
                            }
                            Msg::Shutdown(done) => {
                                tracing::info!("stopping grains");
                                sup.shutdown().await;
                                let _ = done.send(());
                                break;
                            }
                        }
                    }
                });
            })?;
        let exits = ready
            .recv()
            .map_err(|_| std::io::Error::other("the supervisor thread died while starting"))??;
        Ok((
            LocalGrains { jobs: jobs.clone() },
            SupervisorThread {
                jobs,
                handle,
                exits,
            },
        ))
    }

    /// Runs `work` with the supervisor on its thread and brings the answer
    /// back.
    fn run<T, F, Fut>(&self, grain: String, work: F) -> GrainsFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(Supervisor) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, GrainError>> + 'static,
    {
        let jobs = self.jobs.clone();
        let span = tracing::Span::current();
        Box::pin(async move {
            let stopping = || GrainError {
                grain: grain.clone(),
                problem: Problem::Stopping,
            };
            let (reply, answer) = oneshot::channel();
            let job: Job = Box::new(move |sup| {
                Box::pin(async move {
                    let _ = reply.send(work(sup).await);
                })
            });
            jobs.send(Msg::Run(job, span))
                .await
                .map_err(|_| stopping())?;
            answer.await.map_err(|_| stopping())?
        })
    }

    /// Runs `work` on the supervisor's thread, for what [`Grains`] does not
    /// cover (benchmarks, host services). `None` once it has stopped.
    pub async fn with_supervisor<T, F, Fut>(&self, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(Supervisor) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        self.run(String::new(), move |sup| async move { Ok(work(sup).await) })
            .await
            .ok()
    }
}

impl SupervisorThread {
    /// See [`Supervisor::grain_exits`].
    pub fn grain_exits(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.exits.clone()
    }

    /// Stops every grain gracefully and ends the thread.
    pub async fn stop(self) {
        let (done, stopped) = oneshot::channel();
        if self.jobs.send(Msg::Shutdown(done)).await.is_ok() {
            let _ = stopped.await;
        }
        drop(self.jobs);
        let handle = self.handle;
        let joined = tokio::task::spawn_blocking(move || handle.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("the supervisor thread panicked");
        }
    }
}

impl Grains for LocalGrains {
    fn connect(
        &self,
        grain: &GrainId,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> GrainsFuture<Connection> {
        let (id, service) = (grain.to_string(), service.to_owned());
        self.run(grain.shown(), move |sup| async move {
            sup.connect_send(&id, &service, identity, peer).await
        })
    }

    fn start(&self, grain: &GrainId, how: Start) -> GrainsFuture<()> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            match how {
                Start::Running => sup.start(&id).await,
                Start::Answering => sup.start_checked(&id).await,
            }
        })
    }

    fn stop(&self, grain: &GrainId) -> GrainsFuture<bool> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move { sup.stop(&id).await })
    }

    fn stop_within(&self, grain: &GrainId, within: std::time::Duration) -> GrainsFuture<bool> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.stop_within(&id, within).await
        })
    }

    fn status(&self, grain: &GrainId) -> GrainsFuture<GrainStatus> {
        let id = grain.to_string();
        self.run(
            grain.shown(),
            move |sup| async move { sup.status(&id).await },
        )
    }

    fn list(&self) -> GrainsFuture<Vec<GrainStatus>> {
        self.run("*".to_owned(), |sup| async move { sup.list().await })
    }

    fn logs(&self, grain: &GrainId, max_bytes: u64) -> GrainsFuture<Vec<u8>> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.logs(&id, max_bytes).await
        })
    }

    fn snapshot(&self, grain: &GrainId, label: &str) -> GrainsFuture<SnapshotTaken> {
        let (id, label) = (grain.to_string(), label.to_owned());
        self.run(grain.shown(), move |sup| async move {
            sup.snapshot(&id, &label).await
        })
    }

    fn snapshots(&self, grain: &GrainId) -> GrainsFuture<Vec<Snapshot>> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.list_snapshots(&id).await
        })
    }

    fn prune(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        let id = grain.to_string();
        self.run(
            grain.shown(),
            move |sup| async move { sup.prune(&id).await },
        )
    }

    fn rollback(&self, grain: &GrainId, snapshot: &str) -> GrainsFuture<bool> {
        let (id, snapshot) = (grain.to_string(), snapshot.to_owned());
        self.run(grain.shown(), move |sup| async move {
            sup.rollback(&id, &snapshot).await
        })
    }

    fn hold(&self, grain: &GrainId, reason: &str) -> GrainsFuture<()> {
        let (id, reason) = (grain.to_string(), reason.to_owned());
        self.run(grain.shown(), move |sup| async move {
            sup.hold(&id, &reason).await
        })
    }

    fn release(&self, grain: &GrainId) -> GrainsFuture<()> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.release(&id);
            Ok(())
        })
    }

    fn forget(&self, grain: &GrainId) -> GrainsFuture<()> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.forget(&id).await;
            Ok(())
        })
    }

    fn grant_revoked(&self, grant: i64) -> GrainsFuture<()> {
        self.run(format!("grant {grant}"), move |sup| async move {
            sup.revoked(grant);
            Ok(())
        })
    }

    fn serve_grant(&self, grant: i64, holder: &GrainId) -> GrainsFuture<Connection> {
        let id = holder.to_string();
        self.run(holder.shown(), move |sup| async move {
            sup.serve_grant(grant, &id).await
        })
    }

    fn deliver_mail(&self, grain: &GrainId, mail: MailDelivery) -> GrainsFuture<()> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.deliver_mail(&id, mail).await
        })
    }

    fn mail_status(&self, grain: &GrainId) -> GrainsFuture<MailStatus> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.mail_status(&id).await
        })
    }

    fn deliver_xmpp(
        &self,
        grain: &GrainId,
        stanza: granary_grains::mail::XmppStanza,
    ) -> GrainsFuture<()> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.deliver_xmpp(&id, stanza).await
        })
    }

    fn xmpp_status(&self, grain: &GrainId) -> GrainsFuture<granary_grains::mail::XmppStatus> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.xmpp_status(&id).await
        })
    }

    fn xmpp_befriend(&self, grain: &GrainId, jid: &str, name: &str) -> GrainsFuture<()> {
        let (id, jid, name) = (grain.to_string(), jid.to_owned(), name.to_owned());
        self.run(grain.shown(), move |sup| async move {
            sup.xmpp_befriend(&id, &jid, &name).await
        })
    }

    fn xmpp_room_members(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        let id = grain.to_string();
        self.run(grain.shown(), move |sup| async move {
            sup.xmpp_room_members(&id).await
        })
    }
}
