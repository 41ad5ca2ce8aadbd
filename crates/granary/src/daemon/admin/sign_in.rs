//! The web home's `WebGate`: signing in with the account password, and the
//! second factor (TOTP or a recovery code) when it is on. Both hand out a
//! `Home` (`home.rs`) only once everything checked out.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_model::UserName;
use granary_schema::admin_capnp::{second_factor, web_gate};

use super::home::{WRONG, account_password_ok, home_for, now, recovery_hash};
use super::{Ctx, blocking, fail, state_failure};

/// Wrong codes a pending sign-in takes before it is spent.
const CODE_TRIES: u32 = 5;

pub(super) struct WebGate(pub(super) Rc<Ctx>);

impl web_gate::Server for WebGate {
    async fn sign_in(
        self: CapRc<Self>,
        params: web_gate::SignInParams,
        mut results: web_gate::SignInResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let user = p.get_user()?.to_str()?.trim().to_ascii_lowercase();
        let password = p.get_password()?.to_str()?;
        if password.len() > granary_auth::MAX_PASSWORD_LEN
            || !account_password_ok(&self.0, &user, password).await?
        {
            return Err(fail(WRONG));
        }
        let name = UserName::existing(&user).map_err(|_| fail(WRONG))?;
        let store = self.0.store.clone();
        let n = name.clone();
        let totp = blocking(move || store.totp(&n).map_err(state_failure)).await?;
        if totp.is_some() {
            tracing::info!(user = %name, "web sign-in: password right, code asked");
            results
                .get()
                .set_second(capnp_rpc::new_client(SecondFactor {
                    ctx: self.0.clone(),
                    user: name,
                    tries: std::cell::Cell::new(0),
                }));
        } else {
            tracing::info!(user = %name, "web sign-in");
            results.get().set_home(home_for(&self.0, name).await?);
        }
        Ok(())
    }
}

struct SecondFactor {
    ctx: Rc<Ctx>,
    user: UserName,
    tries: std::cell::Cell<u32>,
}

impl second_factor::Server for SecondFactor {
    async fn code(
        self: CapRc<Self>,
        params: second_factor::CodeParams,
        mut results: second_factor::CodeResults,
    ) -> Result<(), capnp::Error> {
        // The try is taken before any wait, so codes sent at once all count.
        let tried = self.tries.get();
        if tried >= CODE_TRIES {
            return Err(fail("too many wrong codes; sign in again"));
        }
        self.tries.set(tried + 1);
        let given = params.get()?.get_code()?.to_str()?.to_owned();
        let (store, user, key) = (self.ctx.store.clone(), self.user.clone(), self.ctx.web_key);
        let ok = blocking(move || {
            let Some(t) = store.totp(&user).map_err(state_failure)? else {
                // Turned off meanwhile: the password alone was enough.
                return Ok(true);
            };
            let digits = given.chars().filter(|c| !c.is_whitespace()).count() == 6;
            if digits {
                let secret =
                    granary_auth::totp::open(&key, user.as_str(), &t.sealed).map_err(fail)?;
                let now = granary_auth::totp::step_at(now());
                let step =
                    granary_auth::totp::verify(&secret, &given, now, t.last_step.max(0) as u64);
                return match step {
                    Some(step) => store
                        .spend_totp_step(&user, step as i64)
                        .map_err(state_failure),
                    None => Ok(false),
                };
            }
            store
                .spend_recovery_code(&user, &recovery_hash(&given), user.as_ref())
                .map_err(state_failure)
        })
        .await?;
        if !ok {
            return Err(fail("wrong code"));
        }
        self.tries.set(CODE_TRIES);
        tracing::info!(user = %self.user, "web sign-in with a second factor");
        results
            .get()
            .set_home(home_for(&self.ctx, self.user.clone()).await?);
        Ok(())
    }
}

/// Serves the web home's gate on its socket pair (no root `Admin` there).
pub(super) fn serve(stream: std::os::unix::net::UnixStream, ctx: &Rc<Ctx>) {
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the web home's gate");
            return;
        }
    };
    let gate: granary_schema::admin_capnp::web_gate::Client =
        capnp_rpc::new_client(WebGate(ctx.clone()));
    let rpc = crate::admin::rpc_over_unix(
        stream,
        capnp_rpc::rpc_twoparty_capnp::Side::Server,
        Some(gate.client),
    );
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            tracing::debug!(error = %e, "web gate connection ended");
        }
    });
}
