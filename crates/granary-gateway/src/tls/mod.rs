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

/// A server config from a PEM certificate chain and private key, offering
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
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
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        op: "reading private key",
        path: key.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
