//! What the gateway does for ACME (RFC 8555): it answers the CA's checks
//! while the daemon orders a certificate, and keeps what `granary status`,
//! the doctor and `/metrics` show of each certificate.
//!
//! - **HTTP-01**: `GET /.well-known/acme-challenge/<token>` on the plain
//!   HTTP listener ([`crate::http`]) answers the token's key authorization.
//! - **TLS-ALPN-01** (RFC 8737): a handshake on the HTTPS listener that
//!   offers only ALPN `acme-tls/1` gets a self-signed certificate for the
//!   name asked (SNI) carrying the key authorization's SHA-256 in the
//!   critical `acmeIdentifier` extension, and the connection ends there.
//!
//! Answers exist only while an order waits for them; a name or token
//! nobody is ordering gets nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::TlsError;

/// The ALPN protocol of TLS-ALPN-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path prefix of HTTP-01.
pub const HTTP_CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// One ACME-managed certificate as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateStatus {
    /// The CA's directory URL.
    pub directory: String,
    /// `http-01` or `tls-alpn-01`.
    pub challenge: &'static str,
    /// The names it is for (the first is the domain).
    pub names: Vec<String>,
    /// Expiry (Unix seconds) of the certificate served; `None`: none from
    /// the CA yet (the local CA's serves meanwhile).
    pub not_after: Option<i64>,
    /// When it is renewed (two thirds of its lifetime).
    pub renew_at: Option<i64>,
    /// The last order that succeeded.
    pub issued_at: Option<i64>,
    /// The last failure, while it stands (cleared by a success).
    pub error: Option<String>,
    /// Failures in a row.
    pub failures: u32,
    /// When the next attempt is due.
    pub next_attempt: Option<i64>,
    /// Users whose subdomains did not fit (100 names at most).
    pub left_out: u32,
    /// Orders finished since the start.
    pub orders: u64,
    /// The last renewal request an order answered.
    pub answered: u64,
}

/// Challenge answers and certificate status, shared by the daemon's ACME
/// task and the listeners.
pub struct Acme {
    http: RwLock<HashMap<String, String>>,
    alpn: Arc<AlpnAnswers>,
    alpn_config: Arc<rustls::ServerConfig>,
    status: Mutex<Option<CertificateStatus>>,
    /// Asks the ACME task to look again now (`granary certificates
    /// renew`).
    pub wake: tokio::sync::Notify,
    /// Renewals asked for so far (`granary certificates renew`).
    requested: AtomicU64,
    /// Orders that ended with a certificate, and that failed.
    pub issued: AtomicU64,
    pub failed: AtomicU64,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct AlpnAnswers(RwLock<HashMap<String, Arc<CertifiedKey>>>);

impl ResolvesServerCert for AlpnAnswers {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.read().expect("not poisoned").get(&name).cloned()
    }
}

impl Acme {
    pub fn new() -> Result<Acme, TlsError> {
        let alpn: Arc<AlpnAnswers> = Arc::default();
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            // RFC 8737 section 4: TLS 1.2 or later; rustls has nothing older.
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(alpn.clone());
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Ok(Acme {
            http: RwLock::default(),
            alpn,
            alpn_config: Arc::new(config),
            status: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            requested: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Whether a client hello is a TLS-ALPN-01 check: `acme-tls/1` is the
    /// only protocol it offers (RFC 8737 section 3).
    pub fn is_alpn_check(hello: &ClientHello<'_>) -> bool {
        hello.alpn().is_some_and(|mut offered| {
            offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
        })
    }

    /// The configuration that answers TLS-ALPN-01 checks.
    pub fn alpn_config(&self) -> Arc<rustls::ServerConfig> {
        self.alpn_config.clone()
    }

    /// The key authorization for an HTTP-01 token being checked.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        self.http.read().expect("not poisoned").get(token).cloned()
    }

    /// Answers HTTP-01 for `token` until [`Acme::clear`].
    pub fn answer_http(&self, token: &str, key_authorization: &str) {
        self.http
            .write()
            .expect("not poisoned")
            .insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Answers TLS-ALPN-01 for `name` with a certificate carrying
    /// `digest` (SHA-256 of the key authorization) until [`Acme::clear`].
    pub fn answer_alpn(&self, name: &str, digest: &[u8]) -> Result<(), TlsError> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .custom_extensions
            .push(rcgen::CustomExtension::new_acme_identifier(digest));
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = crate::tls::provider().key_provider.load_private_key(der)?;
        let certified = CertifiedKey::new(vec![cert.der().clone()], signing);
        self.alpn
            .0
            .write()
            .expect("not poisoned")
            .insert(name.to_ascii_lowercase(), Arc::new(certified));
        Ok(())
    }

    /// Drops every answer: the order they were for is over.
    pub fn clear(&self) {
        self.http.write().expect("not poisoned").clear();
        self.alpn.0.write().expect("not poisoned").clear();
    }

    /// The managed certificate's status; `None` without `tls.acme`.
    pub fn status(&self) -> Option<CertificateStatus> {
        self.status.lock().expect("not poisoned").clone()
    }

    pub fn set_status(&self, status: CertificateStatus) {
        *self.status.lock().expect("not poisoned") = Some(status);
    }

    /// Asks for a new certificate now, ignoring freshness and backoff
    /// (`granary certificates renew`); the request's number, which the
    /// status's `answered` reaches once an order answered it.
    pub fn renew_now(&self) -> u64 {
        let n = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        n
    }

    /// Renewals asked for so far.
    pub fn requested(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// Counts an order's outcome for `/metrics`.
    pub fn count(&self, ok: bool) {
        let counter = if ok { &self.issued } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_exist_only_while_ordered() {
        let acme = Acme::new().unwrap();
        assert_eq!(acme.http_answer("tok"), None);
        acme.answer_http("tok", "tok.thumb");
        assert_eq!(acme.http_answer("tok").as_deref(), Some("tok.thumb"));
        acme.answer_alpn("Git.Example.org", &[7; 32]).unwrap();
        assert!(acme.alpn.0.read().unwrap().contains_key("git.example.org"));
        acme.clear();
        assert_eq!(acme.http_answer("tok"), None);
        assert!(acme.alpn.0.read().unwrap().is_empty());
    }
}
