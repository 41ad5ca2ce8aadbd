//! The host's server route into a user's mail grain: `mail.deliver`
//! (`services.capnp`'s `MailDelivery`), obtained from the grain's `offer`
//! for the host's own use (no grant: the route exists because the mail
//! app is installed). Only the host holds it.

use capnp::capability::FromClientHook;
use granary_grains::mail::{MailDelivery, MailStatus, MailboxStatus};
use granary_grains::{GrainError, Problem};
use granary_schema::services_capnp::mail_delivery;

use crate::{Supervisor, error};

/// The descriptor the mail app offers its delivery interface under.
pub const MAIL_DELIVER: &str = "mail.deliver";

impl Supervisor {
    /// Streams `mail` into the grain and waits until it is durable there.
    pub async fn deliver_mail(&self, grain: &str, mail: MailDelivery) -> Result<(), GrainError> {
        let running = self
            .inner
            .ensure_running(grain)
            .await
            .map_err(|p| error(grain, p))?;
        // A delivery keeps the grain awake like a connection does.
        let _busy = running.activity.busy();
        let delivery = self.delivery(grain, &running).await?;
        let mut request = delivery.deliver_request();
        {
            let mut env = request.get().init_envelope();
            env.set_id(&mail.id);
            env.set_from(&mail.from);
            let mut to = env.init_to(mail.to.len() as u32);
            for (i, a) in mail.to.iter().enumerate() {
                to.set(i as u32, a);
            }
        }
        let stream = request.send().pipeline.get_message();
        let file = tokio::fs::File::from_std(mail.message);
        let timeout = self.inner.params.config.call_timeout;
        // The grain takes the bytes as fast as it writes them; the whole
        // transfer gets the call timeout per 8 MiB on top of one timeout.
        let budget = timeout * (1 + (mail.size >> 23) as u32);
        let sent = tokio::time::timeout(budget, granary_handoff::pump_to(file, stream))
            .await
            .map_err(|_| error(grain, Problem::Grain("the delivery timed out".to_owned())))?;
        match sent {
            Ok(_) => Ok(()),
            Err(e) if e.kind == capnp::ErrorKind::Overloaded => Err(error(
                grain,
                Problem::Busy(format!("the mailbox cannot take it now: {}", e.extra)),
            )),
            Err(e) => Err(error(grain, Problem::Grain(format!("delivery: {e}")))),
        }
    }

    /// The grain's mailboxes and deliveries.
    pub async fn mail_status(&self, grain: &str) -> Result<MailStatus, GrainError> {
        let running = self
            .inner
            .ensure_running(grain)
            .await
            .map_err(|p| error(grain, p))?;
        let _busy = running.activity.busy();
        let delivery = self.delivery(grain, &running).await?;
        let call = delivery.status_request().send().promise;
        let answer = tokio::time::timeout(self.inner.params.config.call_timeout, call)
            .await
            .map_err(|_| error(grain, Problem::Grain("status timed out".to_owned())))?
            .map_err(|e| error(grain, Problem::Grain(format!("status: {e}"))))?;
        let read = || -> Result<MailStatus, capnp::Error> {
            let s = answer.get()?.get_status()?;
            let mut mailboxes = Vec::new();
            for m in s.get_mailboxes()? {
                mailboxes.push(MailboxStatus {
                    name: m.get_name()?.to_string()?,
                    special_use: m.get_special_use()?.to_string()?,
                    messages: m.get_messages(),
                    unseen: m.get_unseen(),
                    bytes: m.get_bytes(),
                });
            }
            Ok(MailStatus {
                mailboxes,
                last_delivery: Some(s.get_last_delivery()).filter(|t| *t > 0),
                deliveries: s.get_deliveries(),
            })
        };
        read().map_err(|e| error(grain, Problem::Grain(format!("status: {e}"))))
    }

    async fn delivery(
        &self,
        grain: &str,
        running: &std::rc::Rc<crate::slot::Running>,
    ) -> Result<mail_delivery::Client, GrainError> {
        let cap = self
            .inner
            .offer(running, MAIL_DELIVER, "")
            .await
            .map_err(|p| error(grain, p))?;
        Ok(mail_delivery::Client::new(cap.hook))
    }
}
