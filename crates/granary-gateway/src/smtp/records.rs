//! The DNS records a mail domain needs for this host, and the MTA-STS
//! policy (RFC 8461) the gateway serves at `mta-sts.<domain>`.

use serde::Serialize;

use super::dkim::KeyInfo;

/// One record, as a zone file line has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsRecord {
    /// Fully qualified, with the final dot.
    pub name: String,
    /// `MX`, `TXT`, `SRV` or `CNAME`.
    pub kind: &'static str,
    /// As written after the type (TXT unquoted).
    pub value: String,
    /// What it is for, for people.
    pub purpose: String,
}

/// The SRV records chat clients and other servers find `domain`'s XMPP
/// service by (RFC 6120 §3.2.1, XEP-0368 for direct TLS), served by
/// `host`; a port `None` is published as "not offered" (target ".").
pub fn xmpp_records(
    domain: &str,
    host: &str,
    client: Option<u16>,
    client_tls: Option<u16>,
    server: Option<u16>,
) -> Vec<DnsRecord> {
    [
        ("_xmpp-client._tcp", client, "chat clients (STARTTLS)"),
        (
            "_xmpps-client._tcp",
            client_tls,
            "chat clients (direct TLS, XEP-0368)",
        ),
        (
            "_xmpp-server._tcp",
            server,
            "other chat servers (federation)",
        ),
    ]
    .into_iter()
    .map(|(service, port, what)| DnsRecord {
        name: format!("{service}.{}.", domain.trim_end_matches('.')),
        kind: "SRV",
        value: match port {
            Some(p) => format!("0 1 {p} {}.", host.trim_end_matches('.')),
            None => "0 0 0 .".to_owned(),
        },
        purpose: format!("{what} find the server"),
    })
    .collect()
}

impl DnsRecord {
    /// The zone-file line; TXT values quoted and cut into strings of at
    /// most 255 bytes (RFC 1035 §3.3.14), as long DKIM keys need.
    pub fn zone_line(&self) -> String {
        let value = if self.kind == "TXT" {
            self.value
                .as_bytes()
                .chunks(255)
                .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            self.value.clone()
        };
        format!("{}\t3600\tIN\t{}\t{}", self.name, self.kind, value)
    }
}

/// The ports clients reach this host's mail listeners on (`None`: off).
#[derive(Debug, Clone, Copy, Default)]
pub struct MailPorts {
    pub submission: Option<u16>,
    pub submissions: Option<u16>,
    pub imap: Option<u16>,
    pub imaps: Option<u16>,
}

/// The MTA-STS policy (RFC 8461 §3.2) in `mode`: `testing` (the default,
/// as long as the certificate may not be one the world trusts: a failure
/// is reported, never fatal to mail), `enforce` or `none`.
pub fn mta_sts_policy(hostname: &str, mode: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {hostname}\r\nmax_age: 86400\r\n")
}

/// The policy's id: changes whenever the policy does.
fn policy_id(policy: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, policy.as_bytes());
    hex::encode(&digest.as_ref()[..8])
}

/// Every record `domain` needs for mail handled by `hostname`, and, when
/// `dav` names the calendars-and-contacts host and its HTTPS port, the
/// records CalDAV and CardDAV clients discover it by (RFC 6764).
pub fn records(
    domain: &str,
    hostname: &str,
    mta_sts_mode: &str,
    keys: &[KeyInfo],
    ports: MailPorts,
    dav: Option<(&str, u16)>,
) -> Vec<DnsRecord> {
    let d = format!("{domain}.");
    let host = format!("{hostname}.");
    let mut out = vec![
        DnsRecord {
            name: d.clone(),
            kind: "MX",
            value: format!("10 {host}"),
            purpose: format!("mail for {domain} comes to {hostname}"),
        },
        DnsRecord {
            name: d.clone(),
            kind: "TXT",
            value: "v=spf1 mx -all".to_owned(),
            purpose: "SPF: only the domain's MX hosts send its mail".to_owned(),
        },
    ];
    if hostname != domain {
        // Bounces go out with an empty MAIL FROM, so SPF checks the HELO
        // name: this host's own name needs a record too.
        out.push(DnsRecord {
            name: host.clone(),
            kind: "TXT",
            value: "v=spf1 a -all".to_owned(),
            purpose: format!("SPF for {hostname} itself (bounces are checked by it)"),
        });
    }
    for k in keys {
        out.push(DnsRecord {
            name: format!("{}._domainkey.{d}", k.selector),
            kind: "TXT",
            value: k.record(),
            purpose: format!(
                "DKIM {} key{}",
                k.algorithm.tag(),
                if k.signing {
                    " (signing)"
                } else if k.pending {
                    " (new: publish it, then granary mail dkim activate DOMAIN)"
                } else {
                    " (retired from signing; keep until mail signed with it is delivered)"
                }
            ),
        });
    }
    out.push(DnsRecord {
        name: format!("_dmarc.{d}"),
        kind: "TXT",
        value: format!("v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"),
        purpose: "DMARC: mail failing SPF and DKIM alignment goes to spam; reports to postmaster"
            .to_owned(),
    });
    out.push(DnsRecord {
        name: format!("_mta-sts.{d}"),
        kind: "TXT",
        value: format!(
            "v=STSv1; id={}",
            policy_id(&mta_sts_policy(hostname, mta_sts_mode))
        ),
        purpose: "MTA-STS: senders fetch the policy from mta-sts.DOMAIN".to_owned(),
    });
    if hostname != format!("mta-sts.{domain}") {
        out.push(DnsRecord {
            name: format!("mta-sts.{d}"),
            kind: "CNAME",
            value: host.clone(),
            purpose: "MTA-STS: the gateway serves the policy over HTTPS".to_owned(),
        });
    }
    out.push(DnsRecord {
        name: format!("_smtp._tls.{d}"),
        kind: "TXT",
        value: format!("v=TLSRPTv1; rua=mailto:postmaster@{domain}"),
        purpose: "TLS-RPT: reports of TLS failures to postmaster".to_owned(),
    });
    for (service, port, what) in [
        ("_submissions._tcp", ports.submissions, "sending, TLS"),
        ("_submission._tcp", ports.submission, "sending, STARTTLS"),
        ("_imaps._tcp", ports.imaps, "reading, TLS"),
        ("_imap._tcp", ports.imap, "reading, STARTTLS"),
    ] {
        out.push(DnsRecord {
            name: format!("{service}.{d}"),
            kind: "SRV",
            // RFC 6186: target "." says the service is not offered.
            value: match port {
                Some(p) => format!("0 1 {p} {host}"),
                None => "0 0 0 .".to_owned(),
            },
            purpose: format!("mail clients find the server for {what} (RFC 6186)"),
        });
    }
    if let Some((host, port)) = dav {
        for (service, what) in [
            ("_caldavs._tcp", "calendar"),
            ("_carddavs._tcp", "contacts"),
        ] {
            out.push(DnsRecord {
                name: format!("{service}.{d}"),
                kind: "SRV",
                value: format!("0 1 {port} {host}."),
                purpose: format!("{what} clients find the server (RFC 6764)"),
            });
            out.push(DnsRecord {
                name: format!("{service}.{d}"),
                kind: "TXT",
                value: "path=/".to_owned(),
                purpose: format!("{what} clients start at the root, which names their principal"),
            });
        }
        for service in ["_caldav._tcp", "_carddav._tcp"] {
            out.push(DnsRecord {
                name: format!("{service}.{d}"),
                kind: "SRV",
                value: "0 0 0 .".to_owned(),
                purpose: "no calendars or contacts without TLS (RFC 6764: target \".\")".to_owned(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::dkim::Algorithm;

    #[test]
    fn every_record_a_domain_needs() {
        let keys = vec![KeyInfo {
            selector: "rsa-1".into(),
            algorithm: Algorithm::Rsa,
            created_at: 0,
            signing: true,
            pending: false,
            public_key: "A".repeat(400),
        }];
        let ports = MailPorts {
            submissions: Some(465),
            imaps: Some(993),
            ..MailPorts::default()
        };
        let r = records(
            "example.org",
            "mail.example.org",
            "testing",
            &keys,
            ports,
            Some(("dav.example.org", 443)),
        );
        let lines: Vec<String> = r.iter().map(DnsRecord::zone_line).collect();
        let text = lines.join("\n");
        assert!(
            text.contains("example.org.\t3600\tIN\tMX\t10 mail.example.org."),
            "{text}"
        );
        assert!(text.contains("\"v=spf1 mx -all\""), "{text}");
        let dkim = lines
            .iter()
            .find(|l| l.starts_with("rsa-1._domainkey"))
            .unwrap();
        assert_eq!(dkim.matches('"').count(), 4, "split in two strings: {dkim}");
        assert!(text.contains("_dmarc.example.org."), "{text}");
        assert!(
            text.contains("_mta-sts.example.org.\t3600\tIN\tTXT\t\"v=STSv1; id="),
            "{text}"
        );
        assert!(
            text.contains(
                "_submissions._tcp.example.org.\t3600\tIN\tSRV\t0 1 465 mail.example.org."
            )
        );
        assert!(text.contains("_submission._tcp.example.org.\t3600\tIN\tSRV\t0 0 0 ."));
        assert!(
            text.contains("_caldavs._tcp.example.org.\t3600\tIN\tSRV\t0 1 443 dav.example.org."),
            "{text}"
        );
        assert!(
            text.contains("_carddavs._tcp.example.org.\t3600\tIN\tTXT\t\"path=/\""),
            "{text}"
        );
        assert!(
            text.contains("_caldav._tcp.example.org.\t3600\tIN\tSRV\t0 0 0 ."),
            "{text}"
        );
        assert!(text.contains("_smtp._tls.example.org."));
    }
}
