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

/// The crypto provider every TLS endpoint uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
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

/// A server config from a PEM certificate chain and private key (reloaded
/// when the files change), offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let resolver = ReloadingCert::new(cert, key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
