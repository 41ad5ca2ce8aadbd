//! TLS 1.3 between nodes with raw public keys (RFC 7250): each node
//! presents its Ed25519 node key, and each end accepts only the keys it
//! pins. No certificates, CAs or host names to get wrong. Backups to
//! another node (`remote`) and the cluster's node links both use it.

use std::sync::Arc;

use granary_package::{PublicKey, SigningKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};

use crate::BackupError;

/// DER of an Ed25519 SubjectPublicKeyInfo: this prefix, then the key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn spki(key: &PublicKey) -> Vec<u8> {
    [&ED25519_SPKI_PREFIX[..], &key.0].concat()
}

fn key_of(spki: &[u8]) -> Option<PublicKey> {
    let rest = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let key: [u8; 32] = rest.try_into().ok()?;
    Some(PublicKey(key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified(key: &SigningKey) -> Result<Arc<rustls::sign::CertifiedKey>, BackupError> {
    let der = PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into());
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| BackupError::Config(format!("the node key cannot be used for TLS: {e}")))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![CertificateDer::from(spki(&key.public()))],
        signing,
    )))
}

fn tls_error(e: rustls::Error) -> BackupError {
    BackupError::Config(format!("TLS setup: {e}"))
}

type Accept = Arc<dyn Fn(&PublicKey) -> bool + Send + Sync>;

/// Checks a peer's raw key against the keys we accept.
struct Pinned {
    accept: Accept,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned").finish_non_exhaustive()
    }
}

impl Pinned {
    fn new(accept: Accept) -> Pinned {
        Pinned {
            accept,
            algorithms: provider().signature_verification_algorithms,
        }
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match key_of(presented.as_ref()) {
            Some(k) if (self.accept)(&k) => Ok(()),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn signature(
        &self,
        message: &[u8],
        key: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(key.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used between nodes".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not used between nodes".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// A server that presents `key` and accepts a client only if `accept`
/// says yes to the key it presents (asked at every handshake, so the set
/// may change).
pub fn server_config(
    key: &SigningKey,
    accept: impl Fn(&PublicKey) -> bool + Send + Sync + 'static,
) -> Result<rustls::ServerConfig, BackupError> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(Arc::new(Pinned::new(Arc::new(accept))))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified(key)?),
        )))
}

/// A client that presents `key` and accepts only a server presenting
/// `server_key`.
pub fn client_config(
    key: &SigningKey,
    server_key: PublicKey,
) -> Result<rustls::ClientConfig, BackupError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(Arc::new(move |k| {
            *k == server_key
        }))))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified(key)?),
        )))
}

/// The key the other end presented, once the handshake is done.
pub fn peer_key(conn: &rustls::CommonState) -> Option<PublicKey> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| key_of(c.as_ref()))
}

/// The server name a client gives: unused (keys are pinned), but TLS
/// needs one.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("granary-node").expect("a valid name")
}
