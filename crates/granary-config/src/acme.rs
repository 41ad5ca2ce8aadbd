//! `[tls] acme = "<directory URL>"`: certificates from an ACME CA (RFC
//! 8555) instead of the local CA or the admin's files.

use std::path::{Path, PathBuf};

use crate::Listen;
use crate::raw::RawTls;

/// Where certificates come from and how the CA checks the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// The CA's directory URL (https).
    pub directory: String,
    /// `mailto:` addresses the CA may write to about the account.
    pub contact: Vec<String>,
    pub challenge: AcmeChallenge,
    /// A root certificate (PEM) to trust for the directory's own HTTPS;
    /// `None`: the system's roots.
    pub ca: Option<PathBuf>,
}

/// How the CA checks that a name is this host's (RFC 8555 section 8.3,
/// RFC 8737).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// A token under `/.well-known/acme-challenge/` on `listen.http`.
    Http01,
    /// A certificate made for the check, on `listen.https` by ALPN
    /// `acme-tls/1`.
    TlsAlpn01,
}

impl AcmeChallenge {
    pub fn name(self) -> &'static str {
        match self {
            AcmeChallenge::Http01 => "http-01",
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

type Failure = (&'static str, String);

impl Acme {
    /// `None` unless `tls.acme` is set; an error names the key.
    pub(crate) fn resolve(
        raw: &RawTls,
        listen: &Listen,
        file_dir: &Path,
    ) -> Result<Option<Acme>, Failure> {
        let Some(directory) = raw.acme.clone() else {
            for (key, set) in [
                ("tls.acme_contact", raw.acme_contact.is_some()),
                ("tls.acme_challenge", raw.acme_challenge.is_some()),
                ("tls.acme_ca", raw.acme_ca.is_some()),
            ] {
                if set {
                    return Err((key, "needs tls.acme, the CA's directory URL".to_owned()));
                }
            }
            return Ok(None);
        };
        if !directory.starts_with("https://") || directory.len() <= "https://".len() {
            return Err((
                "tls.acme",
                format!(
                    "{directory:?} is not an https:// URL (Let's Encrypt's is https://acme-v02.api.letsencrypt.org/directory)"
                ),
            ));
        }
        let contact = match &raw.acme_contact {
            None => Vec::new(),
            Some(c) => {
                let address = c.strip_prefix("mailto:").unwrap_or(c);
                let ok = address.split_once('@').is_some_and(|(local, host)| {
                    !local.is_empty() && host.contains('.') && !address.contains([' ', ',', '<'])
                });
                if !ok {
                    return Err((
                        "tls.acme_contact",
                        format!("{c:?} is not a mail address like admin@example.org"),
                    ));
                }
                vec![format!("mailto:{address}")]
            }
        };
        let challenge = match raw.acme_challenge.as_deref() {
            None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
            Some("http-01") => AcmeChallenge::Http01,
            Some(other) => {
                return Err((
                    "tls.acme_challenge",
                    format!("{other:?}: choose \"tls-alpn-01\" or \"http-01\""),
                ));
            }
        };
        let (needs, port) = match challenge {
            AcmeChallenge::Http01 => ("http", 80),
            AcmeChallenge::TlsAlpn01 => ("https", 443),
        };
        if listen.get(needs).is_none() {
            return Err((
                "tls.acme_challenge",
                format!(
                    "{} is answered on listen.{needs}, which is off: set it to the address the CA reaches as port {port}",
                    challenge.name()
                ),
            ));
        }
        let ca = match &raw.acme_ca {
            None => None,
            Some(p) => {
                let p = crate::resolve::absolute(file_dir, p);
                crate::resolve::check_readable_file(&p).map_err(|r| ("tls.acme_ca", r))?;
                Some(p)
            }
        };
        Ok(Some(Acme {
            directory,
            contact,
            challenge,
            ca,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(http: bool) -> Listen {
        let mut raw = std::collections::BTreeMap::new();
        if http {
            raw.insert("http".to_owned(), "127.0.0.1:0".to_owned());
        }
        Listen::resolve(&raw).unwrap()
    }

    fn raw(acme: &str) -> RawTls {
        RawTls {
            acme: Some(acme.to_owned()),
            ..RawTls::default()
        }
    }

    #[test]
    fn defaults_to_tls_alpn_on_the_https_listener() {
        let a = Acme::resolve(&raw("https://ca.test/dir"), &listen(false), Path::new("/"))
            .unwrap()
            .unwrap();
        assert_eq!(a.challenge, AcmeChallenge::TlsAlpn01);
        assert!(a.contact.is_empty() && a.ca.is_none());
    }

    #[test]
    fn http_01_needs_the_http_listener() {
        let mut r = raw("https://ca.test/dir");
        r.acme_challenge = Some("http-01".to_owned());
        let e = Acme::resolve(&r, &listen(false), Path::new("/")).unwrap_err();
        assert_eq!(e.0, "tls.acme_challenge");
        assert!(e.1.contains("listen.http"), "{}", e.1);
        let a = Acme::resolve(&r, &listen(true), Path::new("/"))
            .unwrap()
            .unwrap();
        assert_eq!(a.challenge, AcmeChallenge::Http01);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Acme::resolve(&raw("http://ca.test/dir"), &listen(true), Path::new("/"));
        assert_eq!(e.unwrap_err().0, "tls.acme");
        let mut r = raw("https://ca.test/dir");
        r.acme_contact = Some("nobody".to_owned());
        assert_eq!(
            Acme::resolve(&r, &listen(true), Path::new("/"))
                .unwrap_err()
                .0,
            "tls.acme_contact"
        );
        r.acme_contact = Some("mailto:admin@example.org".to_owned());
        let a = Acme::resolve(&r, &listen(true), Path::new("/"))
            .unwrap()
            .unwrap();
        assert_eq!(a.contact, ["mailto:admin@example.org"]);
        let only_contact = RawTls {
            acme_contact: Some("admin@example.org".to_owned()),
            ..RawTls::default()
        };
        assert_eq!(
            Acme::resolve(&only_contact, &listen(true), Path::new("/"))
                .unwrap_err()
                .0,
            "tls.acme_contact"
        );
    }
}
