//! SPF, DKIM, DMARC and ARC on arriving mail (`mail-auth`), through the
//! configured DNS resolver. The verdict becomes this host's
//! `Authentication-Results` header; a DMARC `p=reject` failure is refused.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use granary_wire::smtp::Reply;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, MX, MessageAuthenticator, Parameters,
    RecordSet, ResolverCache, Txt,
};

/// Why a DNS lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsProblem {
    /// NXDOMAIN: the name does not exist (permanent).
    NoSuchDomain,
    /// The name exists without records of that type.
    NoRecords,
    /// The lookup failed (timeout, SERVFAIL): try later.
    Failed(String),
}

fn dns_problem(e: mail_auth::Error) -> DnsProblem {
    use mail_auth::hickory_resolver::proto::op::ResponseCode;
    match e {
        mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(ResponseCode::NXDomain)) => {
            DnsProblem::NoSuchDomain
        }
        mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_)) => DnsProblem::NoRecords,
        other => DnsProblem::Failed(other.to_string()),
    }
}

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
    /// SPF passed for the envelope sender: a bounce to it reaches whoever
    /// really sent the message, not someone whose address was forged.
    pub sender_verified: bool,
}

/// Answers kept per kind of record.
const CACHED_ANSWERS: usize = 4096;

/// DNS answers the checks looked up, kept for their TTL (`mail-auth`
/// leaves caching to its caller; without this, every message asked for
/// the same SPF and DMARC records again).
struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = self.entries.lock().expect("not poisoned");
        let (value, until) = entries.get(name)?;
        (*until > Instant::now()).then(|| value.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries
            .lock()
            .expect("not poisoned")
            .remove(name)
            .map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let mut entries = self.entries.lock().expect("not poisoned");
        if entries.len() >= CACHED_ANSWERS {
            let now = Instant::now();
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CACHED_ANSWERS {
                entries.clear();
            }
        }
        entries.insert(key, (value, valid_until));
    }
}

#[derive(Default)]
struct Caches {
    txt: TtlCache<Box<str>, Txt>,
    mx: TtlCache<Box<str>, RecordSet<MX>>,
    ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

type Cached<'a, P> = Parameters<
    'a,
    P,
    TtlCache<Box<str>, Txt>,
    TtlCache<Box<str>, RecordSet<MX>>,
    TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    TtlCache<IpAddr, RecordSet<Box<str>>>,
>;

/// Runs the checks. Cheap to clone (the resolver and the caches are
/// shared).
#[derive(Clone)]
pub struct Checker {
    auth: MessageAuthenticator,
    hostname: String,
    caches: Arc<Caches>,
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
            caches: Arc::default(),
        })
    }

    fn cached<P>(&self, params: P) -> Cached<'_, P> {
        let c = &*self.caches;
        Parameters::new(params)
            .with_txt_cache(&c.txt)
            .with_mx_cache(&c.mx)
            .with_ipv4_cache(&c.ipv4)
            .with_ipv6_cache(&c.ipv6)
            .with_ptr_cache(&c.ptr)
    }

    /// Where mail for `domain` goes (RFC 5321 §5.1): its MX hosts in
    /// preference order; the domain itself when it has no MX; an empty
    /// list for a null MX (RFC 7505: it takes no mail).
    pub async fn mail_exchangers(&self, domain: &str) -> Result<Vec<String>, DnsProblem> {
        match self.auth.mx_lookup(domain, Some(&self.caches.mx)).await {
            Ok(set) => {
                let mut hosts = Vec::new();
                for mx in set.rrset.iter() {
                    for host in mx.exchanges.iter() {
                        let host = host.trim_end_matches('.');
                        if host.is_empty() {
                            if set.rrset.len() == 1 && mx.exchanges.len() == 1 {
                                return Ok(Vec::new());
                            }
                            continue;
                        }
                        hosts.push(host.to_ascii_lowercase());
                    }
                }
                if hosts.is_empty() {
                    hosts.push(domain.to_ascii_lowercase());
                }
                Ok(hosts)
            }
            Err(e) => match dns_problem(e) {
                DnsProblem::NoRecords => Ok(vec![domain.to_ascii_lowercase()]),
                other => Err(other),
            },
        }
    }

    /// The records of `kind` (`MX`, `TXT`, `SRV`, `CNAME`, `A`, `AAAA`)
    /// at `name`, each as a zone file writes its value (a TXT's strings
    /// joined), uncached: what `granary doctor` compares with what it
    /// expects.
    pub async fn lookup(&self, name: &str, kind: &str) -> Result<Vec<String>, DnsProblem> {
        use mail_auth::hickory_resolver::proto::rr::{RData, RecordType};
        let kind: RecordType = kind
            .parse()
            .map_err(|_| DnsProblem::Failed(format!("{kind} is not a record type")))?;
        let fqdn = if name.ends_with('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        };
        let lookup = self
            .auth
            .resolver()
            .lookup(fqdn.as_str(), kind)
            .await
            .map_err(|e| dns_problem(e.into()))?;
        Ok(lookup
            .answers()
            .iter()
            .filter(|r| r.record_type() == kind)
            .map(|r| match &r.data {
                RData::TXT(txt) => txt
                    .txt_data
                    .iter()
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<String>(),
                other => other.to_string(),
            })
            .collect())
    }

    /// The addresses of `host`: IPv6 first, then IPv4.
    pub async fn host_addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsProblem> {
        let mut out = Vec::new();
        let mut last = DnsProblem::NoRecords;
        match self.auth.ipv6_lookup(host, Some(&self.caches.ipv6)).await {
            Ok(set) => out.extend(set.rrset.iter().map(|ip| IpAddr::V6(*ip))),
            Err(e) => last = dns_problem(e),
        }
        match self.auth.ipv4_lookup(host, Some(&self.caches.ipv4)).await {
            Ok(set) => out.extend(set.rrset.iter().map(|ip| IpAddr::V4(*ip))),
            Err(e) => {
                if out.is_empty() {
                    last = match (last, dns_problem(e)) {
                        (DnsProblem::Failed(f), _) | (_, DnsProblem::Failed(f)) => {
                            DnsProblem::Failed(f)
                        }
                        (DnsProblem::NoSuchDomain, _) | (_, DnsProblem::NoSuchDomain) => {
                            DnsProblem::NoSuchDomain
                        }
                        _ => DnsProblem::NoRecords,
                    };
                }
            }
        }
        if out.is_empty() { Err(last) } else { Ok(out) }
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
                sender_verified: false,
            },
        }
    }

    async fn run(&self, message: &[u8], ip: IpAddr, helo: &str, from: &str) -> Verdict {
        let helo = if helo.is_empty() { "unknown" } else { helo };
        let spf = self
            .auth
            .verify_spf(self.cached(SpfParameters::verify_mail_from(
                ip,
                helo,
                &self.hostname,
                from,
            )))
            .await;
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            let header = AuthenticationResults::new(&self.hostname)
                .with_spf_mailfrom_result(&spf, ip, from, helo);
            return Verdict {
                header: mail_auth::common::headers::HeaderWriter::to_header(&header),
                reject: None,
                sender_verified: spf.result() == mail_auth::SpfResult::Pass,
            };
        };
        let dkim = self.auth.verify_dkim(self.cached(&msg)).await;
        let arc = self.auth.verify_arc(self.cached(&msg)).await;
        let mail_from_domain = from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = self
            .auth
            .verify_dmarc(self.cached(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf)))
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
            sender_verified: spf.result() == mail_auth::SpfResult::Pass,
        }
    }
}
