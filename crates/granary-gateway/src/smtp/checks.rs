//! SPF, DKIM, DMARC and ARC on arriving mail (`mail-auth`), through the
//! configured DNS resolver. The verdict becomes this host's
//! `Authentication-Results` header; a DMARC `p=reject` failure is refused.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use granary_wire::smtp::Reply;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{AuthenticatedMessage, AuthenticationResults, DmarcResult, MessageAuthenticator};

/// The whole check may take this long before the message is taken with
/// a `temperror` verdict.
const CHECK_BUDGET: Duration = Duration::from_secs(30);

/// What the checks decided about one message.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `Authentication-Results: ...\r\n`, ready to prepend.
    pub header: String,
    /// The refusal when the sender's DMARC policy says reject.
    pub reject: Option<Reply>,
}

/// Runs the checks. Cheap to clone (the resolver is shared).
#[derive(Clone)]
pub struct Checker {
    auth: MessageAuthenticator,
    hostname: String,
}

impl Checker {
    /// Asks the DNS server at `resolver`, or the system's resolvers
    /// (`/etc/resolv.conf`) when `None`.
    pub fn new(hostname: &str, resolver: Option<SocketAddr>) -> Result<Checker, String> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        let auth = match resolver {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
                MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), opts)
            }
            None => MessageAuthenticator::new_system_conf(),
        }
        .map_err(|e| format!("the DNS resolver for mail checks: {e}"))?;
        Ok(Checker {
            auth,
            hostname: hostname.to_owned(),
        })
    }

    /// Checks `message` as received from `ip`, which said `helo` and
    /// `MAIL FROM:<from>`.
    pub async fn check(&self, message: &[u8], ip: IpAddr, helo: &str, from: &str) -> Verdict {
        match tokio::time::timeout(CHECK_BUDGET, self.run(message, ip, helo, from)).await {
            Ok(v) => v,
            Err(_) => Verdict {
                header: format!(
                    "Authentication-Results: {}; none (the DNS checks timed out)\r\n",
                    self.hostname
                ),
                reject: None,
            },
        }
    }

    async fn run(&self, message: &[u8], ip: IpAddr, helo: &str, from: &str) -> Verdict {
        let helo = if helo.is_empty() { "unknown" } else { helo };
        let spf = self
            .auth
            .verify_spf(SpfParameters::verify_mail_from(
                ip,
                helo,
                &self.hostname,
                from,
            ))
            .await;
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            let header = AuthenticationResults::new(&self.hostname)
                .with_spf_mailfrom_result(&spf, ip, from, helo);
            return Verdict {
                header: mail_auth::common::headers::HeaderWriter::to_header(&header),
                reject: None,
            };
        };
        let dkim = self.auth.verify_dkim(&msg).await;
        let arc = self.auth.verify_arc(&msg).await;
        let mail_from_domain = from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = self
            .auth
            .verify_dmarc(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf))
            .await;
        let header = AuthenticationResults::new(&self.hostname)
            .with_dkim_results(&dkim, msg.from())
            .with_spf_mailfrom_result(&spf, ip, from, helo)
            .with_arc_result(&arc, ip)
            .with_dmarc_result(&dmarc);
        // A DNS failure (temperror) on either side is never a refusal.
        let reject = (dmarc.policy() == Policy::Reject
            && matches!(dmarc.result(), DmarcResult::Fail(_)))
        .then(|| {
            Reply::new(
                550,
                "5.7.1",
                format!(
                    "Rejected: the DMARC policy of {} says to refuse mail that fails its checks",
                    dmarc.domain()
                ),
            )
        });
        Verdict {
            header: mail_auth::common::headers::HeaderWriter::to_header(&header),
            reject,
        }
    }
}
