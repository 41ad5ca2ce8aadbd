//! `Certificates`: the ACME certificate's status, and ordering one now.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::certificates;

use super::{Ctx, blocking, fail, state_failure};

pub(super) struct Certificates(pub(super) Rc<Ctx>);

impl certificates::Server for Certificates {
    async fn acme(
        self: CapRc<Self>,
        _: certificates::AcmeParams,
        mut results: certificates::AcmeResults,
    ) -> Result<(), capnp::Error> {
        let status = self.0.info.acme.as_ref().and_then(|a| a.status());
        let mut r = results.get();
        r.set_enabled(self.0.info.acme.is_some());
        let Some(s) = status else {
            return Ok(());
        };
        let mut out = r.init_status();
        out.set_directory(&s.directory);
        out.set_challenge(s.challenge);
        let mut names = out.reborrow().init_names(s.names.len() as u32);
        for (i, n) in s.names.iter().enumerate() {
            names.set(i as u32, n);
        }
        out.set_not_after(s.not_after.unwrap_or(0));
        out.set_renew_at(s.renew_at.unwrap_or(0));
        out.set_issued_at(s.issued_at.unwrap_or(0));
        out.set_error(s.error.as_deref().unwrap_or(""));
        out.set_failures(s.failures);
        out.set_next_attempt(s.next_attempt.unwrap_or(0));
        out.set_orders(s.orders);
        out.set_answered(s.answered);
        out.set_left_out(s.left_out);
        Ok(())
    }

    async fn renew(
        self: CapRc<Self>,
        _: certificates::RenewParams,
        mut results: certificates::RenewResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let Some(acme) = &self.0.info.acme else {
            return Err(fail(
                "certificates come from an ACME CA only with tls.acme set; this host uses the local CA or tls.cert",
            ));
        };
        let request = acme.renew_now();
        let store = self.0.store.clone();
        blocking(move || {
            store
                .record_event(actor, "certificates.renew", "-", "")
                .map_err(state_failure)
        })
        .await?;
        results.get().set_request(request);
        Ok(())
    }
}
