//! Certificates from an ACME CA (`tls.acme`): one certificate for the
//! domain, its service hosts and every user's subdomain. It is ordered when
//! there is none, when the names change (a user added or removed: once
//! they stayed the same 2 minutes, at most every 4 hours), renewed at two
//! thirds of its lifetime, and written to `DATA_DIR/tls/acme`, where
//! the HTTPS listener's resolver picks it up without a restart. A failed
//! order leaves the served certificate alone and is tried again with
//! backoff (1 minute, doubling, at most 6 hours).
//!
//! Files, in `DATA_DIR/tls/acme` (private to the daemon's user):
//! `account.json` (the ACME account's key and URL, for this directory
//! only), `key.pem` and `cert.pem` (what is served; until the first order
//! succeeds, a copy of the local CA's), and `cert.json` (what the CA
//! issued: names and validity).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use granary_config::{Acme as AcmeConfig, AcmeChallenge};
use granary_gateway::acme::{Acme, CertificateStatus};
use granary_state::Store;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The most names one certificate may carry (Let's Encrypt's limit).
const MAX_NAMES: usize = 100;
/// How long one order may take, start to certificate.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// Looked at again at least this often (users added or removed are seen
/// then).
const RECHECK: i64 = 60;
/// What an order says when the CA's certificate is already due.
const CLOCK_OFF: &str = "the new certificate is already due for renewal";
/// No two orders closer than this, whatever else says so.
const MIN_GAP: i64 = 10;
/// Names that changed (users added or removed) are ordered once they have
/// been the same this long...
const SETTLE: i64 = 120;
/// ... and at most this often: Let's Encrypt issues 50 certificates per
/// domain a week, and a burst of new users must not use them up.
const NAME_CHANGE_GAP: i64 = 4 * 3600;

/// What the CA issued, beside `cert.pem`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Issued {
    directory: String,
    names: Vec<String>,
    not_before: i64,
    not_after: i64,
    issued_at: i64,
}

#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// `DATA_DIR/tls/acme`'s files.
pub(super) struct Files {
    dir: PathBuf,
}

impl Files {
    pub(super) fn new(tls_dir: &Path) -> Files {
        Files {
            dir: tls_dir.join("acme"),
        }
    }
    pub(super) fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    pub(super) fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn issued(&self) -> PathBuf {
        self.dir.join("cert.json")
    }
    fn account(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// Makes sure something servable is in place: the CA's certificate
    /// when there is one whose key matches, the local CA's otherwise.
    pub(super) fn bootstrap(
        &self,
        local: &granary_gateway::tls::local_ca::LocalCaFiles,
        owner: u32,
    ) -> anyhow::Result<()> {
        granary_files::ensure_private_dir(&self.dir, owner)?;
        // Until the CA has issued one, the local CA's current one (its
        // names follow the domain and the users).
        if self.issued().exists() && granary_gateway::tls::load(&self.cert(), &self.key()).is_ok() {
            return Ok(());
        }
        // None yet, or a crash between writing the key and the certificate.
        let _ = std::fs::remove_file(self.issued());
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        granary_files::write_atomic(&self.key(), &read(&local.server_key)?, 0o600)?;
        granary_files::write_atomic(&self.cert(), &read(&local.server_cert)?, 0o644)?;
        Ok(())
    }

    fn read_issued(&self, directory: &str) -> Option<Issued> {
        let text = std::fs::read(self.issued()).ok()?;
        let issued: Issued = serde_json::from_slice(&text).ok()?;
        (issued.directory == directory).then_some(issued)
    }
}

/// The names the certificate carries: the domain, its service hosts, and
/// each user's subdomain (sorted), at most [`MAX_NAMES`]; and how many
/// users did not fit.
fn wanted_names(domain: &str, mut users: Vec<String>) -> (Vec<String>, u32) {
    let mut names = vec![domain.to_owned()];
    let hosts =
        granary_gateway::services::SERVICE_HOSTS
            .iter()
            .chain(&["mta-sts", "autoconfig", "rooms"]);
    names.extend(hosts.map(|h| format!("{h}.{domain}")));
    users.sort();
    let mut left_out = 0;
    for u in users {
        let name = format!("{u}.{domain}");
        // A user named like a host (made before the name was reserved)
        // is already there.
        if names.contains(&name) {
            continue;
        }
        if names.len() == MAX_NAMES {
            left_out += 1;
            continue;
        }
        names.push(name);
    }
    (names, left_out)
}

/// When a certificate is renewed: two thirds into its lifetime.
fn renew_at(issued: &Issued) -> i64 {
    issued.not_before + (issued.not_after - issued.not_before) * 2 / 3
}

/// The wait after `failures` failed orders in a row.
fn backoff(failures: u32) -> i64 {
    (60i64 << failures.saturating_sub(1).min(9)).min(6 * 3600)
}

/// Keeps the certificate current until `stop` turns true.
pub(super) fn start(
    config: AcmeConfig,
    files: Files,
    domain: String,
    store: Arc<Store>,
    acme: Arc<Acme>,
    mut stop: watch::Receiver<bool>,
) {
    // What `granary certificates` shows before the first look.
    acme.set_status(CertificateStatus {
        directory: config.directory.clone(),
        challenge: config.challenge.name(),
        ..CertificateStatus::default()
    });
    tokio::spawn(async move {
        let (mut failures, mut retry_at, mut last_error) = (0u32, 0i64, None::<String>);
        // The last renewal asked for (`granary certificates renew`) that
        // an order answered, and the orders finished: published with the
        // outcome, under one lock.
        let (mut answered, mut orders) = (0u64, 0u64);
        // When the last order ended; since when the names have been what
        // they are, while they differ from the certificate's.
        // (Across restarts: the last issued one's time.)
        let mut last_order = files
            .read_issued(&config.directory)
            .map_or(0, |i| i.issued_at.min(super::unix_now()));
        let mut changed: Option<(Vec<String>, i64)> = None;
        loop {
            let users = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.list_users()).await
            };
            let users: Vec<String> = match users {
                Ok(Ok(u)) => u.into_iter().map(|u| u.name).collect(),
                failed => {
                    // Never order without the users' names: that would
                    // take their subdomains off the certificate.
                    let e = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(error = %e, "ACME: cannot list the users; looking again in a minute");
                    let mut status = acme.status().unwrap_or_default();
                    status.error = Some(format!("cannot list the users: {e}"));
                    // A renew asked now is answered with this failure.
                    answered = acme.requested();
                    status.answered = answered;
                    acme.set_status(status);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(RECHECK as u64)) => continue,
                        () = acme.wake.notified() => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            };
            let (names, left_out) = wanted_names(&domain, users);
            let issued = files.read_issued(&config.directory);
            let now = super::unix_now();
            let requested = acme.requested();
            let forced = requested > answered;
            if forced {
                retry_at = 0;
            }
            let due = match &issued {
                _ if forced => retry_at,
                // Another domain altogether: the one served names none of it.
                Some(i) if i.names.first() != names.first() => retry_at,
                Some(i) if i.names == names => {
                    changed = None;
                    renew_at(i).max(retry_at)
                }
                // Names changed under a certificate that still serves the
                // rest: once they settle, and not too often.
                Some(i) => {
                    let since = match &changed {
                        Some((n, at)) if *n == names => *at,
                        _ => {
                            changed = Some((names.clone(), now));
                            now
                        }
                    };
                    (since + SETTLE)
                        .max(last_order + NAME_CHANGE_GAP)
                        .min(renew_at(i))
                        .max(retry_at)
                }
                None => retry_at,
            }
            .max(last_order + MIN_GAP);
            acme.set_status(CertificateStatus {
                directory: config.directory.clone(),
                challenge: config.challenge.name(),
                names: names.clone(),
                left_out,
                not_after: issued.as_ref().map(|i| i.not_after),
                renew_at: issued.as_ref().map(renew_at),
                issued_at: issued.as_ref().map(|i| i.issued_at),
                error: last_error.clone(),
                failures,
                next_attempt: Some(due.max(now)),
                orders,
                answered,
            });
            if now >= due {
                tracing::info!(names = names.len(), left_out, directory = %config.directory, "ACME: ordering a certificate");
                let result =
                    tokio::time::timeout(ORDER_TIMEOUT, order(&config, &files, &names, &acme))
                        .await
                        .unwrap_or_else(|_| {
                            bail!("no certificate after {}s", ORDER_TIMEOUT.as_secs())
                        });
                acme.clear();
                acme.count(result.is_ok());
                orders += 1;
                answered = answered.max(requested);
                last_order = super::unix_now();
                match result {
                    Ok(i) => {
                        tracing::info!(
                            not_after = i.not_after,
                            renew_at = renew_at(&i),
                            "ACME: certificate issued and in service"
                        );
                        (failures, last_error) = (0, None);
                        retry_at = super::unix_now() + MIN_GAP;
                    }
                    Err(e) => {
                        failures += 1;
                        // A clock far off gets the CA's certificates thrown
                        // away: each try would spend one of the CA's limits.
                        let wait = match format!("{e:#}").contains(CLOCK_OFF) {
                            true => 6 * 3600,
                            false => backoff(failures),
                        };
                        retry_at = super::unix_now() + wait;
                        let e = format!("{e:#}");
                        tracing::warn!(error = %e, failures, retry_in_secs = wait, "ACME: ordering a certificate failed; the current one stays in service");
                        last_error = Some(e);
                    }
                }
                continue;
            }
            let wait = Duration::from_secs((due - now).clamp(1, RECHECK) as u64);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = acme.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

/// The account for this directory: the saved one, or a new one saved.
async fn account(config: &AcmeConfig, files: &Files) -> anyhow::Result<Account> {
    let builder = || -> anyhow::Result<_> {
        Ok(match &config.ca {
            Some(root) => Account::builder_with_root(root)?,
            None => Account::builder()?,
        })
    };
    if let Ok(text) = std::fs::read(files.account())
        && let Ok(saved) = serde_json::from_slice::<SavedAccount>(&text)
        && saved.directory == config.directory
    {
        return Ok(builder()?.from_credentials(saved.credentials).await?);
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            config.directory.clone(),
            None,
        )
        .await
        .context("creating the ACME account")?;
    let saved = SavedAccount {
        directory: config.directory.clone(),
        credentials,
    };
    granary_files::write_atomic(&files.account(), &serde_json::to_vec(&saved)?, 0o600)?;
    tracing::info!(directory = %config.directory, "ACME: account created");
    Ok(account)
}

/// One order, from account to certificate in service.
async fn order(
    config: &AcmeConfig,
    files: &Files,
    names: &[String],
    acme: &Acme,
) -> anyhow::Result<Issued> {
    let account = account(config, files).await?;
    let ids: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .context("placing the order")?;
    let kind = match config.challenge {
        AcmeChallenge::Http01 => ChallengeType::Http01,
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("an authorization is {other:?}"),
        }
        let mut challenge = authorization
            .challenge(kind.clone())
            .with_context(|| format!("the CA offers no {} challenge", config.challenge.name()))?;
        let key_authorization = challenge.key_authorization();
        match config.challenge {
            AcmeChallenge::Http01 => acme.answer_http(&challenge.token, key_authorization.as_str()),
            AcmeChallenge::TlsAlpn01 => {
                let Identifier::Dns(name) = challenge.identifier().identifier else {
                    bail!("the CA asks about something that is not a DNS name");
                };
                acme.answer_alpn(name, key_authorization.digest().as_ref())?;
            }
        }
        challenge.set_ready().await?;
    }
    let polling = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(120));
    let status = order.poll_ready(&polling).await?;
    if status != OrderStatus::Ready {
        bail!("the order is {status:?}: {}", why(&mut order).await);
    }
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await?;
    let chain = order.poll_certificate(&polling).await?;

    let first = first_certificate(&chain)?;
    let (not_before, not_after) = granary_wire::x509::validity(&first)
        .context("the CA's certificate has no validity this can read")?;
    let issued = Issued {
        directory: config.directory.clone(),
        names: names.to_vec(),
        not_before,
        not_after,
        issued_at: super::unix_now(),
    };
    // A certificate already due again (a clock far off, or a CA that
    // backdates) is not put in service: waiting, never ordering in a loop.
    if renew_at(&issued) <= super::unix_now() {
        bail!(
            "{CLOCK_OFF} (valid {} to {}): is this host's clock right? (next try in 6 hours, or granary certificates renew)",
            crate::admin::table::time(not_before),
            crate::admin::table::time(not_after)
        );
    }
    // Key, then certificate: the listener takes the pair only once they
    // match, and a start after a crash between the two serves the local
    // CA's again ([`Files::bootstrap`]).
    granary_files::write_atomic(&files.key(), key.serialize_pem().as_bytes(), 0o600)?;
    granary_files::write_atomic(&files.cert(), chain.as_bytes(), 0o644)?;
    granary_files::write_atomic(&files.issued(), &serde_json::to_vec(&issued)?, 0o644)?;
    Ok(issued)
}

/// The first certificate of a PEM chain, as DER.
fn first_certificate(chain: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let first = CertificateDer::pem_slice_iter(chain.as_bytes())
        .next()
        .context("the CA sent no certificate")??;
    Ok(first.to_vec())
}

/// What the CA said went wrong with an order: its error and each failed
/// challenge's.
async fn why(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    if let Some(e) = &order.state().error {
        reasons.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(a)) = authorizations.next().await {
        let name = a.identifier().to_string();
        for c in &a.challenges {
            if let Some(e) = &c.error {
                reasons.push(format!("{name}: {e}"));
            }
        }
    }
    if reasons.is_empty() {
        "the CA gave no reason".to_owned()
    } else {
        reasons.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_service_hosts_and_users_in_order() {
        let (names, left_out) = wanted_names(
            "example.org",
            vec!["bob".into(), "alice".into(), "rooms".into()],
        );
        assert_eq!(left_out, 0);
        assert_eq!(
            names.iter().filter(|n| *n == "rooms.example.org").count(),
            1
        );
        assert_eq!(names[0], "example.org");
        for host in ["git", "dav", "tasks", "mta-sts", "autoconfig", "rooms"] {
            assert!(names.contains(&format!("{host}.example.org")), "{host}");
        }
        let tail = &names[names.len() - 2..];
        assert_eq!(tail, ["alice.example.org", "bob.example.org"]);
    }

    #[test]
    fn users_past_the_limit_are_left_out_not_the_hosts() {
        let users: Vec<String> = (0..200).map(|i| format!("u{i:03}")).collect();
        let (names, left_out) = wanted_names("example.org", users);
        assert_eq!(names.len(), MAX_NAMES);
        assert!(names.contains(&"git.example.org".to_owned()));
        assert_eq!(left_out as usize, 200 - (MAX_NAMES - 12));
    }

    #[test]
    fn renewal_is_two_thirds_in_and_backoff_doubles_to_six_hours() {
        let i = Issued {
            directory: String::new(),
            names: Vec::new(),
            not_before: 1000,
            not_after: 1000 + 90 * 86400,
            issued_at: 1000,
        };
        assert_eq!(renew_at(&i), 1000 + 60 * 86400);
        assert_eq!(backoff(1), 60);
        assert_eq!(backoff(2), 120);
        assert_eq!(backoff(5), 960);
        assert_eq!(backoff(40), 6 * 3600);
    }
}
