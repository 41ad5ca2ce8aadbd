//! `Blog`: the domains a user's blog answers on besides
//! `<user>.<domain>`.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::blog;

use super::{Ctx, blocking, fail, state_failure, user_name};

pub(super) struct Blog(pub(super) Rc<Ctx>);

/// A domain name, lower-cased without its final dot; `None` when empty.
fn domain_name(d: &str) -> Result<Option<String>, capnp::Error> {
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
}

impl blog::Server for Blog {
    async fn domains(
        self: CapRc<Self>,
        params: blog::DomainsParams,
        mut results: blog::DomainsResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let add = domain_name(p.get_add()?.to_str()?)?;
        let remove = domain_name(p.get_remove()?.to_str()?)?;
        let own = &self.0.info.domain;
        if let Some(d) = &add
            && (d == own || d.ends_with(&format!(".{own}")))
        {
            return Err(fail(format!(
                "{d} is under Granary's own domain; {user}'s blog is already at {user}.{own}"
            )));
        }
        let store = self.0.store.clone();
        let domains = blocking(move || {
            if let Some(d) = remove
                && !store
                    .remove_blog_domain(&user, &d, actor)
                    .map_err(state_failure)?
            {
                return Err(fail(format!("{d} is not one of {user}'s blog domains")));
            }
            if let Some(d) = add {
                store
                    .add_blog_domain(&user, &d, actor)
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
}
