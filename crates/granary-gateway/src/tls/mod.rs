//! TLS for every listener: rustls with the ring provider, TLS 1.2 and 1.3
//! only (rustls implements nothing older).

pub mod local_ca;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {op} {path}: {detail}")]
    File {
        op: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("tls: {0}")]
    Files(#[from] granary_files::FileError),
    #[error("tls: issuing certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("tls: building server config: {0}")]
    Config(#[from] rustls::Error),
}

/// A verifier that checks the handshake's signatures but takes any
/// certificate, as a client (opportunistic SMTP, server-to-server chat)
/// or as a server asking for a client certificate (server-to-server
/// chat): whether the certificate verifies for the name that matters is
/// checked after the handshake, by the caller. As a server, the `bool`
/// says whether a client must show one (taskd on a cluster) or may (chat).
#[derive(Debug)]
pub(crate) struct AnyCertificate(
    pub(crate) Arc<rustls::crypto::CryptoProvider>,
    pub(crate) bool,
);

impl AnyCertificate {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for AnyCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.1
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The crypto provider every TLS endpoint uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key from PEM files, checked to belong
/// together.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| TlsError::File {
            op: "reading certificate chain",
            path: cert.to_path_buf(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::File {
            op: "reading certificate chain",
            path: cert.to_path_buf(),
            detail: "no CERTIFICATE block found".to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        op: "reading private key",
        path: key.to_path_buf(),
        detail: e.to_string(),
    })?;
    let signing = provider().key_provider.load_private_key(key_der)?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    // The key must belong to the first certificate.
    certified.keys_match().map_err(|e| TlsError::File {
        op: "matching key and certificate",
        path: key.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(Arc::new(certified))
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate and key files, read again when either changes (checked
/// at most once a second, on a handshake): a replaced certificate is served
/// without a restart. A broken replacement is logged and the old one kept.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: std::sync::RwLock<(
        Arc<rustls::sign::CertifiedKey>,
        Option<std::time::SystemTime>,
        Option<std::time::SystemTime>,
    )>,
    checked: std::sync::Mutex<std::time::Instant>,
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<ReloadingCert, TlsError> {
        let (cert_time, key_time) = (modified(cert), modified(key));
        Ok(ReloadingCert {
            current: std::sync::RwLock::new((load(cert, key)?, cert_time, key_time)),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            checked: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    fn refresh(&self) {
        {
            let mut checked = self.checked.lock().expect("not poisoned");
            if checked.elapsed() < std::time::Duration::from_secs(1) {
                return;
            }
            *checked = std::time::Instant::now();
        }
        let (cert_time, key_time) = (modified(&self.cert), modified(&self.key));
        {
            let current = self.current.read().expect("not poisoned");
            if current.1 == cert_time && current.2 == key_time {
                return;
            }
        }
        match load(&self.cert, &self.key) {
            Ok(new) => {
                *self.current.write().expect("not poisoned") = (new, cert_time, key_time);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Half-written files look like this too: keep serving the
                // old certificate and try again on a later handshake.
                tracing::warn!(error = %e, "the changed TLS certificate cannot be used yet; keeping the old one");
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.refresh();
        Some(self.current.read().expect("not poisoned").0.clone())
    }
}

/// The default certificate, and a certificate per custom domain found in
/// `<domains>/<name>/cert.pem` and `key.pem` (loaded on the first
/// handshake for that name, reloaded when the files change).
#[derive(Debug)]
pub struct Certificates {
    default: ReloadingCert,
    domains: Option<PathBuf>,
    loaded: std::sync::RwLock<std::collections::HashMap<String, Arc<ReloadingCert>>>,
}

impl Certificates {
    fn for_domain(&self, name: &str) -> Option<Arc<ReloadingCert>> {
        let dir = self.domains.as_ref()?;
        // A plain host name only: it becomes a directory name.
        let ok = !name.is_empty()
            && name.len() <= 253
            && !name.starts_with('.')
            && !name.contains("..")
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            return None;
        }
        if let Some(c) = self.loaded.read().expect("not poisoned").get(name) {
            return Some(c.clone());
        }
        let (cert, key) = (
            dir.join(name).join("cert.pem"),
            dir.join(name).join("key.pem"),
        );
        if !cert.exists() {
            return None;
        }
        match ReloadingCert::new(&cert, &key) {
            Ok(c) => {
                let c = Arc::new(c);
                self.loaded
                    .write()
                    .expect("not poisoned")
                    .insert(name.to_owned(), c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(domain = name, error = %e, "cannot use the domain's certificate");
                None
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for Certificates {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let domain = hello
            .server_name()
            .map(str::to_ascii_lowercase)
            .and_then(|n| self.for_domain(&n));
        match domain {
            Some(c) => c.resolve(hello),
            None => self.default.resolve(hello),
        }
    }
}

/// A server config from a PEM certificate chain and private key (reloaded
/// when the files change), plus per-domain certificates under `domains`,
/// offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    cert: &Path,
    key: &Path,
    domains: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = Certificates {
        default: ReloadingCert::new(cert, key)?,
        domains: domains.map(Path::to_path_buf),
        loaded: std::sync::RwLock::default(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `base`'s certificates, with clients required to show a certificate the
/// CA in `ca` (PEM) issued: the taskd listener's configuration.
pub fn with_client_auth(base: &ServerConfig, ca: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let file_error = |e: &dyn std::fmt::Display| TlsError::File {
        op: "reading client CA",
        path: ca.to_path_buf(),
        detail: e.to_string(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_error(&e))? {
        roots.add(cert.map_err(|e| file_error(&e))?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| file_error(&e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(base.cert_resolver.clone());
    Ok(Arc::new(config))
}

/// `base`'s certificates, with clients required to show a certificate
/// whose key signs the handshake, whoever issued it: the caller decides by
/// the certificate itself (taskd on a cluster looks it up among those
/// issued).
pub fn with_any_client_certificate(base: &ServerConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = AnyCertificate(provider(), true);
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(base.cert_resolver.clone());
    Ok(Arc::new(config))
}

/// Connects to our own listener at `addr` as a client asking for `name`
/// (SNI) would, and checks that the certificate served verifies for that
/// name against the system's roots and `extra_ca` (the local CA): what
/// `granary doctor` reports for each name clients use.
pub async fn check_served(
    addr: std::net::SocketAddr,
    name: &str,
    extra_ca: Option<&Path>,
) -> Result<Option<i64>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = extra_ca {
        let certs =
            CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = rustls_pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name}: {e}"))?;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map(|tls| {
                // When the leaf served stops being valid.
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| granary_wire::x509::not_after(leaf))
            })
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), connect)
        .await
        .map_err(|_| format!("no TLS handshake with {addr} in 10 s"))?
}
