//! `Mail`: mail domains, aliases and catch-alls (the state), each user's
//! mail grain (through `Grains`), and the inbound spool.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_gateway::smtp::records::records;
use granary_grains::GrainId;
use granary_model::{MailAddress, MailDomain};
use granary_schema::admin_capnp::mail;

use super::{Ctx, blocking, fail, grain_failure, state_failure, user_name};

pub(super) struct Mail(pub(super) Rc<Ctx>);

/// Where calendar and contacts clients reach the DAV grains: `dav.<domain>`
/// on the HTTPS port, when the DAV app is installed and HTTPS listens.
pub(super) async fn dav_endpoint(ctx: &Ctx) -> Result<Option<(String, u16)>, capnp::Error> {
    let store = ctx.store.clone();
    let installed = blocking(move || store.app("dav").map_err(state_failure))
        .await?
        .is_some();
    let port = ctx.info.listener("https").map(|a| a.port());
    Ok(match (installed, port) {
        (true, Some(p)) => Some((format!("dav.{}", ctx.info.domain), p)),
        _ => None,
    })
}

fn domain(text: capnp::text::Reader<'_>) -> Result<MailDomain, capnp::Error> {
    MailDomain::parse(text.to_str()?).map_err(fail)
}

fn address(text: capnp::text::Reader<'_>) -> Result<MailAddress, capnp::Error> {
    MailAddress::parse(text.to_str()?).map_err(fail)
}

fn set_alias(
    mut out: granary_schema::admin_capnp::mail_alias::Builder<'_>,
    a: &granary_state::MailAlias,
) {
    out.set_address(&a.address);
    out.set_user(&a.user);
    out.set_created_at(a.created_at);
}

impl mail::Server for Mail {
    async fn add_domain(
        self: CapRc<Self>,
        params: mail::AddDomainParams,
        mut results: mail::AddDomainResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let d = domain(params.get()?.get_domain()?)?;
        let (store, dkim) = (self.0.store.clone(), self.0.dkim.clone());
        let created = blocking(move || {
            let created = store.add_mail_domain(&d, actor).map_err(state_failure)?;
            // Its DKIM keys, so mail from it is signed from the start.
            dkim.ensure(d.as_str()).map_err(fail)?;
            Ok(created)
        })
        .await?;
        results.get().set_created(created);
        Ok(())
    }

    async fn remove_domain(
        self: CapRc<Self>,
        params: mail::RemoveDomainParams,
        _: mail::RemoveDomainResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let d = domain(params.get()?.get_domain()?)?;
        let store = self.0.store.clone();
        blocking(move || {
            if store.remove_mail_domain(&d, actor).map_err(state_failure)? {
                Ok(())
            } else {
                Err(fail(format!("{d} is not one of this host's mail domains")))
            }
        })
        .await
    }

    async fn domains(
        self: CapRc<Self>,
        _: mail::DomainsParams,
        mut results: mail::DomainsResults,
    ) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let domains = blocking(move || store.mail_domains().map_err(state_failure)).await?;
        let mut list = results.get().init_domains(domains.len() as u32);
        for (i, d) in domains.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_domain(&d.domain);
            out.set_catch_all(d.catch_all.as_deref().unwrap_or(""));
            out.set_aliases(d.aliases as u32);
            out.set_created_at(d.created_at);
        }
        Ok(())
    }

    async fn set_catch_all(
        self: CapRc<Self>,
        params: mail::SetCatchAllParams,
        _: mail::SetCatchAllResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let d = domain(p.get_domain()?)?;
        let user = match p.get_user()?.to_str()? {
            "" => None,
            _ => Some(user_name(p.get_user()?)?),
        };
        let store = self.0.store.clone();
        blocking(move || {
            store
                .set_catch_all(&d, user.as_ref(), actor)
                .map_err(state_failure)
        })
        .await
    }

    async fn add_alias(
        self: CapRc<Self>,
        params: mail::AddAliasParams,
        mut results: mail::AddAliasResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let a = address(p.get_address()?)?;
        let user = user_name(p.get_user()?)?;
        let store = self.0.store.clone();
        let alias = blocking(move || {
            store
                .add_mail_alias(&a, &user, actor)
                .map_err(state_failure)
        })
        .await?;
        set_alias(results.get().init_alias(), &alias);
        Ok(())
    }

    async fn remove_alias(
        self: CapRc<Self>,
        params: mail::RemoveAliasParams,
        _: mail::RemoveAliasResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let a = address(params.get()?.get_address()?)?;
        let store = self.0.store.clone();
        blocking(move || {
            if store.remove_mail_alias(&a, actor).map_err(state_failure)? {
                Ok(())
            } else {
                Err(fail(format!("{} is not an alias", a.full())))
            }
        })
        .await
    }

    async fn aliases(
        self: CapRc<Self>,
        params: mail::AliasesParams,
        mut results: mail::AliasesResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = match p.get_user()?.to_str()? {
            "" => None,
            _ => Some(user_name(p.get_user()?)?),
        };
        let store = self.0.store.clone();
        let aliases =
            blocking(move || store.mail_aliases(user.as_ref()).map_err(state_failure)).await?;
        let mut list = results.get().init_aliases(aliases.len() as u32);
        for (i, a) in aliases.iter().enumerate() {
            set_alias(list.reborrow().get(i as u32), a);
        }
        Ok(())
    }

    async fn status(
        self: CapRc<Self>,
        params: mail::StatusParams,
        mut results: mail::StatusResults,
    ) -> Result<(), capnp::Error> {
        let user = user_name(params.get()?.get_user()?)?;
        let store = self.0.store.clone();
        let who = user.clone();
        let (domains, aliases) = blocking(move || {
            if store.user(&who).map_err(state_failure)?.is_none() {
                return Err(fail(format!("no user named {who}")));
            }
            Ok((
                store.mail_domains().map_err(state_failure)?,
                store.mail_aliases(Some(&who)).map_err(state_failure)?,
            ))
        })
        .await?;
        let grain = GrainId::for_user(user.as_str(), "mail").map_err(fail)?;
        let status = self
            .0
            .grains
            .mail_status(&grain)
            .await
            .map_err(grain_failure)?;
        let mut addresses: Vec<String> = domains
            .iter()
            .map(|d| format!("{user}@{}", d.domain))
            .collect();
        addresses.extend(aliases.into_iter().map(|a| a.address));
        let mut out = results.get().init_status();
        out.set_user(user.as_str());
        let mut list = out.reborrow().init_addresses(addresses.len() as u32);
        for (i, a) in addresses.iter().enumerate() {
            list.set(i as u32, a);
        }
        let mut boxes = out.reborrow().init_mailboxes(status.mailboxes.len() as u32);
        for (i, m) in status.mailboxes.iter().enumerate() {
            let mut b = boxes.reborrow().get(i as u32);
            b.set_name(&m.name);
            b.set_special_use(&m.special_use);
            b.set_messages(m.messages);
            b.set_unseen(m.unseen);
            b.set_bytes(m.bytes);
        }
        out.set_last_delivery(status.last_delivery.unwrap_or(0));
        out.set_deliveries(status.deliveries);
        out.set_waiting(self.0.spool.waiting_for(user.as_str()) as u32);
        Ok(())
    }

    async fn spool(
        self: CapRc<Self>,
        params: mail::SpoolParams,
        mut results: mail::SpoolResults,
    ) -> Result<(), capnp::Error> {
        let messages = self.0.queue(params.get()?.get_outbound()).list();
        let mut list = results.get().init_messages(messages.len() as u32);
        for (i, m) in messages.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_id(&m.id);
            out.set_from(&m.from);
            out.set_size(m.size);
            out.set_received_at(m.received_at);
            out.set_client(&m.client);
            out.set_attempts(m.attempts);
            out.set_next_attempt(m.next_attempt);
            out.set_last_error(m.last_error.as_deref().unwrap_or(""));
            out.set_held(m.held);
            let mut rs = out.init_recipients(m.recipients.len() as u32);
            for (j, r) in m.recipients.iter().enumerate() {
                let mut o = rs.reborrow().get(j as u32);
                o.set_address(&r.address);
                o.set_user(&r.user);
                o.set_state(r.state);
            }
        }
        Ok(())
    }

    async fn retry(
        self: CapRc<Self>,
        params: mail::RetryParams,
        mut results: mail::RetryResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = p.get_id()?.to_str()?.to_owned();
        let n = self
            .0
            .queue(p.get_outbound())
            .retry((!id.is_empty()).then_some(id.as_str()))
            .map_err(fail)?;
        results.get().set_count(n as u32);
        Ok(())
    }

    async fn delete_spooled(
        self: CapRc<Self>,
        params: mail::DeleteSpooledParams,
        _: mail::DeleteSpooledResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let id = p.get_id()?.to_str()?.to_owned();
        let (spool, store) = (self.0.queue(p.get_outbound()), self.0.store.clone());
        blocking(move || {
            spool.delete(&id).map_err(fail)?;
            store
                .record_event(actor, "mail.spool.delete", &id, "")
                .map_err(state_failure)
        })
        .await
    }

    async fn hold(
        self: CapRc<Self>,
        params: mail::HoldParams,
        _: mail::HoldResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let id = p.get_id()?.to_str()?.to_owned();
        let held = p.get_hold();
        let (spool, store) = (self.0.queue(p.get_outbound()), self.0.store.clone());
        blocking(move || {
            spool.hold(&id, held).map_err(fail)?;
            let event = if held {
                "mail.queue.hold"
            } else {
                "mail.queue.release"
            };
            store
                .record_event(actor, event, &id, "")
                .map_err(state_failure)
        })
        .await
    }

    async fn dkim(
        self: CapRc<Self>,
        params: mail::DkimParams,
        mut results: mail::DkimResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let d = domain(p.get_domain()?)?;
        let (rotate, activate, force) = (p.get_rotate(), p.get_activate(), p.get_force());
        let (store, dkim) = (self.0.store.clone(), self.0.dkim.clone());
        if activate && !force {
            // Only keys receivers can find: each pending selector's record
            // must be in DNS, as the doctor sees it.
            let (listed, name) = (dkim.clone(), d.as_str().to_owned());
            let pending: Vec<_> = blocking(move || listed.list(&name).map_err(fail))
                .await?
                .into_iter()
                .filter(|k| k.pending)
                .collect();
            for k in &pending {
                if let Err(why) = super::doctor::dkim_published(&self.0, d.as_str(), k).await {
                    return Err(fail(format!(
                        "{}._domainkey.{d} is not published yet ({why}); publish it (granary mail dns {d}), wait for DNS, then activate again (or --force)",
                        k.selector
                    )));
                }
            }
        }
        let keys = blocking(move || {
            if !store
                .mail_domains()
                .map_err(state_failure)?
                .iter()
                .any(|m| m.domain == d.as_str())
            {
                return Err(fail(format!(
                    "{d} is not one of this host's mail domains (granary mail domain list)"
                )));
            }
            let keys = if rotate {
                let keys = dkim.rotate(d.as_str()).map_err(fail)?;
                store
                    .record_event(actor, "mail.dkim.rotate", d.as_str(), "")
                    .map_err(state_failure)?;
                keys
            } else if activate {
                let keys = dkim.activate(d.as_str()).map_err(fail)?;
                store
                    .record_event(actor, "mail.dkim.activate", d.as_str(), "")
                    .map_err(state_failure)?;
                keys
            } else {
                dkim.list(d.as_str()).map_err(fail)?
            };
            Ok(keys)
        })
        .await?;
        let mut list = results.get().init_keys(keys.len() as u32);
        for (i, k) in keys.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_selector(&k.selector);
            out.set_algorithm(k.algorithm.tag());
            out.set_created_at(k.created_at);
            out.set_signing(k.signing);
            out.set_pending(k.pending);
            out.set_record(k.record());
        }
        Ok(())
    }

    async fn retire_dkim(
        self: CapRc<Self>,
        params: mail::RetireDkimParams,
        _: mail::RetireDkimResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let d = domain(p.get_domain()?)?;
        let selector = p.get_selector()?.to_str()?.to_owned();
        let (store, dkim) = (self.0.store.clone(), self.0.dkim.clone());
        blocking(move || {
            dkim.retire(d.as_str(), &selector).map_err(fail)?;
            store
                .record_event(actor, "mail.dkim.retire", d.as_str(), &selector)
                .map_err(state_failure)
        })
        .await
    }

    async fn dns_records(
        self: CapRc<Self>,
        params: mail::DnsRecordsParams,
        mut results: mail::DnsRecordsResults,
    ) -> Result<(), capnp::Error> {
        let d = domain(params.get()?.get_domain()?)?;
        let (store, dkim) = (self.0.store.clone(), self.0.dkim.clone());
        let name = d.as_str().to_owned();
        let keys = blocking(move || {
            if !store
                .mail_domains()
                .map_err(state_failure)?
                .iter()
                .any(|m| m.domain == name)
            {
                return Err(fail(format!(
                    "{name} is not one of this host's mail domains (granary mail domain add {name})"
                )));
            }
            dkim.list(&name).map_err(fail)
        })
        .await?;
        let dav = dav_endpoint(&self.0).await?;
        let info = &self.0.info;
        let ports = info.mail_ports();
        let records = records(
            d.as_str(),
            &info.mail_hostname,
            &info.mta_sts_mode,
            &keys,
            ports,
            dav.as_ref().map(|(h, p)| (h.as_str(), *p)),
        );
        let mut list = results.get().init_records(records.len() as u32);
        for (i, r) in records.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_name(&r.name);
            out.set_kind(r.kind);
            out.set_value(&r.value);
            out.set_purpose(&r.purpose);
        }
        Ok(())
    }
}
