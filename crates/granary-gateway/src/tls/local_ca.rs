//! Granary's own certificate authority, made on first start, so that a fresh
//! install serves HTTPS that clients can verify by trusting one file.
//!
//! Layout of the directory (`DATA_DIR/tls`, mode 0700):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the CA certificate: what clients trust |
//! | `ca.key` | its private key (0600) |
//! | `ca.json` | the parameters it was made with, to sign with it again |
//! | `server.pem` | the server certificate followed by `ca.pem` |
//! | `server.key` | its private key (0600) |
//! | `server.json` | the names it covers and when it expires |
//!
//! The CA is name-constrained to the configured domain and loopback
//! addresses, so trusting `ca.pem` lets it vouch for nothing else. A changed
//! domain makes a new CA. The server certificate is reissued when the names
//! it must cover change or it has less than 30 days left.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
    SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::TlsError;

const CA_LIFETIME: Duration = Duration::days(3650);
const SERVER_LIFETIME: Duration = Duration::days(397);
const RENEW_BEFORE: Duration = Duration::days(30);

/// Host names under the domain that Granary's services answer on; each gets
/// its own SAN because some TLS clients do not match wildcards directly below
/// a single-label domain such as `localhost`.
pub use crate::services::SERVICE_HOSTS;

/// Where the files of a local CA are.
#[derive(Debug, Clone)]
pub struct LocalCaFiles {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct CaRecord {
    domain: String,
    common_name: String,
    serial: u64,
    not_before: i64,
    not_after: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ServerRecord {
    names: Vec<String>,
    not_after: i64,
}

/// Makes the CA and server certificate if missing, renews what needs it,
/// and returns where the files are. `owner` is the uid that must own `dir`.
///
/// `users` are the users whose subdomains (`<user>.<domain>`, their blogs)
/// the certificate names one by one when the domain is a single label
/// such as `localhost`: clients do not match `*.localhost`. Call it again
/// when users change; the gateway reloads changed files.
pub fn ensure(
    dir: &Path,
    domain: &str,
    users: &[String],
    owner: u32,
) -> Result<LocalCaFiles, TlsError> {
    // One issuer at a time: two users added at once must not interleave
    // writing the key and the certificate.
    static ISSUING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ISSUING.lock().unwrap_or_else(|e| e.into_inner());
    ensure_at(dir, domain, users, owner, OffsetDateTime::now_utc())
}

fn ensure_at(
    dir: &Path,
    domain: &str,
    users: &[String],
    owner: u32,
    now: OffsetDateTime,
) -> Result<LocalCaFiles, TlsError> {
    granary_files::ensure_private_dir(dir, owner)?;
    let files = LocalCaFiles {
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    let ca_json = dir.join("ca.json");
    let ca_key_path = dir.join("ca.key");

    let existing: Option<CaRecord> = read_json(&ca_json)?;
    let (record, ca_key, made_new_ca) = match existing {
        Some(record)
            if record.domain == domain
                && record.not_after - now.unix_timestamp() > RENEW_BEFORE.whole_seconds()
                && files.ca_cert.exists() =>
        {
            let pem = read_text(&ca_key_path, "reading CA key")?;
            let key = KeyPair::from_pem(&pem).map_err(|e| TlsError::File {
                op: "parsing CA key",
                path: ca_key_path.clone(),
                detail: e.to_string(),
            })?;
            (record, key, false)
        }
        previous => {
            if let Some(old) = previous {
                tracing::warn!(
                    old_domain = %old.domain,
                    new_domain = %domain,
                    "making a new local CA; clients must trust the new {}",
                    files.ca_cert.display()
                );
            }
            let (record, key, pem) = new_ca(domain, now)?;
            granary_files::write_atomic(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
            granary_files::write_atomic(&files.ca_cert, pem.as_bytes(), 0o644)?;
            write_json(&ca_json, &record)?;
            tracing::info!(ca = %files.ca_cert.display(), "made a local certificate authority");
            (record, key, true)
        }
    };

    let names = server_names(domain, users);
    let server_json = dir.join("server.json");
    let current: Option<ServerRecord> = read_json(&server_json)?;
    // Fresh: the names and lifetime recorded, and a key that belongs to the
    // certificate (a crash between writing the two is re-issued).
    let fresh = matches!(&current, Some(r) if r.names == names
        && r.not_after - now.unix_timestamp() > RENEW_BEFORE.whole_seconds())
        && super::load(&files.server_cert, &files.server_key).is_ok();
    if made_new_ca || !fresh || !files.server_cert.exists() || !files.server_key.exists() {
        let issuer = ca_params(&record)?.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let not_after = now + SERVER_LIFETIME;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, domain);
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::minutes(5);
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from(random_serial()?));
        let cert = params.signed_by(&key, &issuer, &ca_key)?;
        let ca_pem = read_text(&files.ca_cert, "reading CA certificate")?;
        let chain = format!("{}{}", cert.pem(), ca_pem);
        granary_files::write_atomic(&files.server_key, key.serialize_pem().as_bytes(), 0o600)?;
        granary_files::write_atomic(&files.server_cert, chain.as_bytes(), 0o644)?;
        write_json(
            &server_json,
            &ServerRecord {
                names,
                not_after: not_after.unix_timestamp(),
            },
        )?;
        tracing::info!(domain, "issued the server certificate from the local CA");
    }
    Ok(files)
}

/// A client certificate issued by the CA in `dir` (made by [`ensure`]):
/// what a Taskwarrior 2.6 client shows the `taskd` listener.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub key_pem: String,
    pub cert_pem: String,
    /// The certificate's DER: its SHA-256 is how the listener knows it.
    pub der: Vec<u8>,
    pub not_after: i64,
}

/// How long a client certificate is valid.
pub const CLIENT_LIFETIME: Duration = Duration::days(825);

/// Issues a client certificate named `common_name` (client
/// authentication only, no names the CA's constraints would judge).
pub fn issue_client(dir: &Path, common_name: &str) -> Result<ClientCertificate, TlsError> {
    let ca_json = dir.join("ca.json");
    let record: CaRecord = read_json(&ca_json)?.ok_or_else(|| TlsError::File {
        op: "reading CA record",
        path: ca_json.clone(),
        detail: "the local CA has not been made".to_owned(),
    })?;
    let ca_key_path = dir.join("ca.key");
    let pem = read_text(&ca_key_path, "reading CA key")?;
    let ca_key = KeyPair::from_pem(&pem).map_err(|e| TlsError::File {
        op: "parsing CA key",
        path: ca_key_path.clone(),
        detail: e.to_string(),
    })?;
    let issuer = ca_params(&record)?.self_signed(&ca_key)?;
    let now = OffsetDateTime::now_utc();
    let not_after = (now + CLIENT_LIFETIME).min(timestamp(record.not_after)?);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - Duration::minutes(5);
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from(random_serial()?));
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok(ClientCertificate {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
        der: cert.der().to_vec(),
        not_after: not_after.unix_timestamp(),
    })
}

/// The DNS names the server certificate covers.
fn server_names(domain: &str, users: &[String]) -> Vec<String> {
    let mut names = vec![domain.to_owned(), format!("*.{domain}")];
    names.extend(SERVICE_HOSTS.iter().map(|h| format!("{h}.{domain}")));
    if !domain.contains('.') {
        let mut users = users.to_vec();
        users.sort();
        names.extend(users.iter().map(|u| format!("{u}.{domain}")));
    }
    names
}

fn san(name: &str) -> Result<SanType, TlsError> {
    Ok(SanType::DnsName(name.try_into()?))
}

fn new_ca(domain: &str, now: OffsetDateTime) -> Result<(CaRecord, KeyPair, String), TlsError> {
    let record = CaRecord {
        domain: domain.to_owned(),
        common_name: format!("Granary local CA for {domain} ({})", now.unix_timestamp()),
        serial: random_serial()?,
        not_before: (now - Duration::minutes(5)).unix_timestamp(),
        not_after: (now + CA_LIFETIME).unix_timestamp(),
    };
    let key = KeyPair::generate()?;
    let cert = ca_params(&record)?.self_signed(&key)?;
    Ok((record, key, cert.pem()))
}

/// The CA's parameters, rebuilt exactly from its record, so that a
/// certificate signed with it names the same issuer as `ca.pem`.
fn ca_params(record: &CaRecord) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, record.common_name.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Granary");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::DnsName(record.domain.clone()),
            GeneralSubtree::IpAddress(CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
            GeneralSubtree::IpAddress(CidrSubnet::V6(Ipv6Addr::LOCALHOST.octets(), [0xff; 16])),
        ],
        excluded_subtrees: vec![],
    });
    params.serial_number = Some(SerialNumber::from(record.serial));
    params.not_before = timestamp(record.not_before)?;
    params.not_after = timestamp(record.not_after)?;
    Ok(params)
}

fn timestamp(secs: i64) -> Result<OffsetDateTime, TlsError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| TlsError::File {
        op: "reading CA record",
        path: PathBuf::from("ca.json"),
        detail: e.to_string(),
    })
}

fn random_serial() -> Result<u64, TlsError> {
    // A throwaway key's bytes would do, but ring's RNG is what we have; 63
    // bits keep the DER integer positive.
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 8];
    default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Config(rustls::Error::FailedToGetRandomBytes))?;
    Ok(u64::from_be_bytes(bytes) >> 1)
}

fn read_text(path: &Path, op: &'static str) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|e| TlsError::File {
        op,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TlsError::File {
                op: "parsing",
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::File {
            op: "reading",
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TlsError> {
    let mut text = serde_json::to_vec_pretty(value).expect("records serialise");
    text.push(b'\n');
    Ok(granary_files::write_atomic(path, &text, 0o644)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_label_domains_name_each_user() {
        let users = ["bob".to_owned(), "alice".to_owned()];
        let names = server_names("localhost", &users);
        assert!(names.contains(&"alice.localhost".to_owned()));
        assert!(names.contains(&"bob.localhost".to_owned()));
        // A real domain's wildcard covers them; the list stays private.
        let names = server_names("example.org", &users);
        assert!(!names.iter().any(|n| n.starts_with("alice")));
    }
    use std::os::unix::fs::MetadataExt;

    fn owner(dir: &Path) -> u32 {
        fs::metadata(dir).unwrap().uid()
    }

    #[test]
    fn first_start_makes_ca_and_server_cert_then_reuses_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let me = owner(tmp.path());
        let files = ensure(&dir, "example.org", &[], me).unwrap();
        let ca = fs::read(&files.ca_cert).unwrap();
        let server = fs::read(&files.server_cert).unwrap();
        assert_eq!(
            fs::metadata(dir.join("ca.key")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&files.server_key).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);

        ensure(&dir, "example.org", &[], me).unwrap();
        assert_eq!(fs::read(&files.ca_cert).unwrap(), ca, "CA must be kept");
        assert_eq!(
            fs::read(&files.server_cert).unwrap(),
            server,
            "fresh cert must be kept"
        );

        // The server config loads what was written.
        crate::tls::server_config(&files.server_cert, &files.server_key, None).unwrap();
    }

    #[test]
    fn server_cert_is_renewed_near_expiry_with_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let me = owner(tmp.path());
        let now = OffsetDateTime::now_utc();
        let files = ensure_at(&dir, "example.org", &[], me, now).unwrap();
        let ca = fs::read(&files.ca_cert).unwrap();
        let server = fs::read(&files.server_cert).unwrap();
        let later = now + SERVER_LIFETIME - Duration::days(10);
        ensure_at(&dir, "example.org", &[], me, later).unwrap();
        assert_eq!(fs::read(&files.ca_cert).unwrap(), ca);
        assert_ne!(fs::read(&files.server_cert).unwrap(), server);
    }

    #[test]
    fn a_new_domain_makes_a_new_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let me = owner(tmp.path());
        let files = ensure(&dir, "example.org", &[], me).unwrap();
        let ca = fs::read(&files.ca_cert).unwrap();
        ensure(&dir, "example.net", &[], me).unwrap();
        assert_ne!(fs::read(&files.ca_cert).unwrap(), ca);
    }

    #[test]
    fn names_cover_the_domain_and_service_hosts() {
        let names = server_names("localhost", &[]);
        assert!(names.contains(&"localhost".to_owned()));
        assert!(names.contains(&"*.localhost".to_owned()));
        assert!(names.contains(&"git.localhost".to_owned()));
    }
}
