//! `granary certificates`: the ACME certificate's state, and ordering one
//! now (`granary status` shows the same state in a line or two); and
//! `granary audit`, the audit log.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::table::time;
use crate::cli::CertificatesCommand;

/// The ACME certificate as the daemon last saw it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AcmeView {
    directory: String,
    challenge: String,
    names: Vec<String>,
    /// Unix seconds; absent while none has come from the CA.
    not_after: Option<i64>,
    renew_at: Option<i64>,
    issued_at: Option<i64>,
    pub(crate) error: Option<String>,
    failures: u32,
    next_attempt: Option<i64>,
    /// Orders finished since the daemon started.
    orders: u64,
    /// The last `renew` request an order answered.
    answered: u64,
    /// Users whose subdomains did not fit.
    left_out: u32,
}

/// The ACME certificate's state; `None` without `tls.acme`.
pub(crate) async fn acme(admin: &admin::Client) -> anyhow::Result<Option<AcmeView>> {
    let response = super::certificates(admin)
        .acme_request()
        .send()
        .promise
        .await
        .map_err(remote)?;
    let r = response.get().map_err(remote)?;
    if !r.get_enabled() || !r.has_status() {
        return Ok(None);
    }
    let s = r.get_status().map_err(remote)?;
    let set = |t: i64| Some(t).filter(|t| *t != 0);
    Ok(Some(AcmeView {
        directory: text(s.get_directory())?,
        challenge: text(s.get_challenge())?,
        names: texts(s.get_names())?,
        not_after: set(s.get_not_after()),
        renew_at: set(s.get_renew_at()),
        issued_at: set(s.get_issued_at()),
        error: Some(text(s.get_error())?).filter(|e| !e.is_empty()),
        failures: s.get_failures(),
        next_attempt: set(s.get_next_attempt()),
        orders: s.get_orders(),
        answered: s.get_answered(),
        left_out: s.get_left_out(),
    }))
}

impl AcmeView {
    /// One line: where it comes from, how many names, when it expires.
    pub(crate) fn summary(&self) -> String {
        let served = match self.not_after {
            Some(t) => format!(
                "expires {}, renewed from {}",
                time(t),
                time(self.renew_at.unwrap_or(t))
            ),
            None => "none from the CA yet: the local CA's serves meanwhile".to_owned(),
        };
        format!(
            "ACME ({}) from {}: {} names, {served}",
            self.challenge,
            self.directory,
            self.names.len()
        )
    }
}

/// The lines `granary status` prints about it.
pub(crate) fn print_summary(a: &AcmeView) {
    println!("  certificate    {}", a.summary());
    if a.left_out > 0 {
        println!(
            "  CERTIFICATE    {} users' subdomains left out: one certificate names at most 100",
            a.left_out
        );
    }
    if let Some(e) = &a.error {
        let next = a
            .next_attempt
            .map_or_else(String::new, |t| format!("; next try {}", time(t)));
        println!(
            "  CERTIFICATE    ordering failed {} time(s) in a row{next}: {e}",
            a.failures
        );
    }
}

pub(crate) fn run(config: &Config, cmd: &CertificatesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertificatesCommand::Status { output } => {
            let view = with_admin(
                config,
                |admin: admin::Client| async move { acme(&admin).await },
            )?;
            let Some(view) = view else {
                anyhow::bail!(
                    "tls.acme is not set: certificates come from the local CA or tls.cert"
                );
            };
            if output.json {
                print_json(&view)?;
            } else {
                print_summary(&view);
                println!("  names          {}", view.names.join(" "));
                if let Some(t) = view.issued_at {
                    println!("  issued         {}", time(t));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CertificatesCommand::Renew => renew(config),
    }
}

/// Asks for a new certificate and waits until the daemon has one or the
/// order failed.
fn renew(config: &Config) -> anyhow::Result<ExitCode> {
    with_admin(config, |admin: admin::Client| async move {
        let before = acme(&admin).await?.ok_or_else(|| {
            anyhow::anyhow!("tls.acme is not set: certificates come from the local CA or tls.cert")
        })?;
        let asked = super::certificates(&admin)
            .renew_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let request = asked.get().map_err(remote)?.get_request();
        eprintln!(
            "Ordering a certificate for {} names from {} ...",
            before.names.len(),
            before.directory
        );
        // An order runs at most five minutes, and one may be under way already.
        let deadline = Instant::now() + Duration::from_secs(630);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Some(now) = acme(&admin).await? else {
                break;
            };
            if now.answered < request {
                continue;
            }
            if now.error.is_none() {
                println!(
                    "issued: expires {}, renewed from {}",
                    time(now.not_after.unwrap_or(0)),
                    time(now.renew_at.unwrap_or(0))
                );
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "granary: the order failed; the current certificate stays in service: {}",
                now.error.as_deref().unwrap_or("no reason given")
            );
            return Ok(ExitCode::FAILURE);
        }
        anyhow::bail!(
            "no outcome from the daemon after 10 minutes; see granary certificates status"
        )
    })
}

/// One audit event as `granary audit --json` prints it.
#[derive(Debug, Serialize)]
struct EventView {
    id: i64,
    at: i64,
    actor: String,
    action: String,
    subject: String,
    detail: String,
}

pub(crate) fn audit(config: &Config, args: &crate::cli::AuditArgs) -> anyhow::Result<ExitCode> {
    let events = with_admin(config, |admin: admin::Client| async move {
        let mut call = admin.audit_request();
        call.get().set_actor(args.actor.as_deref().unwrap_or(""));
        call.get()
            .set_action(args.action.as_deref().unwrap_or("").trim_end_matches('.'));
        call.get()
            .set_subject(args.subject.as_deref().unwrap_or(""));
        call.get().set_before(args.before.unwrap_or(0));
        call.get().set_limit(args.limit);
        let r = call.send().promise.await.map_err(remote)?;
        let mut out = Vec::new();
        for e in r.get().map_err(remote)?.get_events().map_err(remote)? {
            out.push(EventView {
                id: e.get_id(),
                at: e.get_at(),
                actor: text(e.get_actor())?,
                action: text(e.get_action())?,
                subject: text(e.get_subject())?,
                detail: text(e.get_detail())?,
            });
        }
        Ok(out)
    })?;
    if args.output.json {
        print_json(&events)?;
    } else {
        super::table::print(
            &["ID", "WHEN", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
            &events
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        time(e.at),
                        e.actor.clone(),
                        e.action.clone(),
                        e.subject.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect::<Vec<_>>(),
        );
        if let Some(last) = events.last().filter(|_| events.len() as u32 >= args.limit) {
            eprintln!("older: granary audit --before {}", last.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
