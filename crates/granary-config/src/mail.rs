//! `[mail]`: the MX (`smtp` listener), the inbound spool, and the DNS
//! checks on arriving mail.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::resolve::parse_duration;

/// `[mail]` exactly as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMail {
    pub hostname: Option<String>,
    pub postmaster: Option<String>,
    pub resolver: Option<String>,
    pub max_message_mib: Option<u64>,
    pub max_message_kib: Option<u64>,
    pub max_recipients: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    pub max_messages_per_ip: Option<u32>,
    pub command_timeout: Option<String>,
    pub data_timeout: Option<String>,
    pub spool_lifetime: Option<String>,
    pub retry_first: Option<String>,
    pub retry_max: Option<String>,
    pub send_max_recipients: Option<u32>,
    pub send_per_hour: Option<u32>,
    pub queue_lifetime: Option<String>,
    pub outbound_port: Option<u16>,
    pub outbound_ca: Option<std::path::PathBuf>,
    pub mta_sts_mode: Option<String>,
    pub delay_warning: Option<String>,
    pub mta_sts_port: Option<u16>,
}

/// `[mail]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The name the MX gives in its greeting, in `Received` and as the
    /// `Authentication-Results` authserv-id. Default: the domain.
    pub hostname: String,
    /// The user who receives `postmaster@` and `abuse@` of every mail
    /// domain; `None`: those addresses are refused until one is set.
    pub postmaster: Option<String>,
    /// The DNS server SPF, DKIM, DMARC and ARC ask; `None`: the system's
    /// (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// The largest message accepted (SIZE), in bytes.
    pub max_message_bytes: u64,
    /// Recipients per message.
    pub max_recipients: u32,
    /// Open SMTP connections from one address at a time.
    pub max_connections_per_ip: u32,
    /// Messages accepted from one address per hour.
    pub max_messages_per_ip: u32,
    /// How long the MX waits for the next command (RFC 5321 §4.5.3.2: at
    /// least 5 minutes).
    pub command_timeout: Duration,
    /// How long a whole DATA or BDAT transfer may take.
    pub data_timeout: Duration,
    /// How long a message waits in the spool for a grain that cannot take
    /// it before it is bounced.
    pub spool_lifetime: Duration,
    /// The first retry after a failed delivery; each next one waits twice
    /// as long, up to `retry_max`.
    pub retry_first: Duration,
    pub retry_max: Duration,
    /// Recipients per message a user may submit.
    pub send_max_recipients: u32,
    /// Messages one user may submit per hour.
    pub send_per_hour: u32,
    /// How long mail for other domains is retried before it is bounced.
    pub queue_lifetime: Duration,
    /// The port other domains' mail servers take mail on (25; another
    /// only for tests or a private network).
    pub outbound_port: u16,
    /// PEM certificates trusted, besides the system's, when checking the
    /// certificates of servers mail is sent to.
    pub outbound_ca: Option<std::path::PathBuf>,
    /// The mode of the MTA-STS policy served for every mail domain.
    pub mta_sts_mode: String,
    /// After this long undelivered, the sender is told once that a
    /// message is delayed.
    pub delay_warning: Duration,
    /// The HTTPS port other domains' MTA-STS policies are fetched from
    /// (443; another only for tests).
    pub mta_sts_port: u16,
}

impl Mail {
    /// Resolves `raw`; errors are `(key, reason)`.
    pub(crate) fn resolve(raw: &RawMail, domain: &str) -> Result<Mail, (String, String)> {
        let err = |key: &str, reason: String| (format!("mail.{key}"), reason);
        let time = |key: &str, v: &Option<String>, default: &str| {
            parse_duration(v.as_deref().unwrap_or(default)).map_err(|e| err(key, e.0))
        };
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(err(key, "must be more than zero".to_owned()))
            } else {
                Ok(v)
            }
        };
        let hostname = raw
            .hostname
            .clone()
            .unwrap_or_else(|| domain.to_owned())
            .to_ascii_lowercase();
        if hostname.is_empty()
            || hostname.len() > 253
            || !hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(err("hostname", format!("{hostname:?} is not a host name")));
        }
        let resolver = parse_resolver(raw.resolver.as_deref()).map_err(|e| err("resolver", e))?;
        let max_message_bytes = match (raw.max_message_kib, raw.max_message_mib) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "max_message_kib",
                    "give max_message_mib or max_message_kib, not both".to_owned(),
                ));
            }
            (Some(kib), None) => positive("max_message_kib", kib)? << 10,
            (None, mib) => positive("max_message_mib", mib.unwrap_or(50))?.min(1024) << 20,
        };
        let retry_first = time("retry_first", &raw.retry_first, "1m")?;
        let retry_max = time("retry_max", &raw.retry_max, "1h")?;
        if retry_max < retry_first {
            return Err(err(
                "retry_max",
                "must not be shorter than mail.retry_first".to_owned(),
            ));
        }
        Ok(Mail {
            hostname,
            postmaster: raw.postmaster.clone().filter(|p| !p.is_empty()),
            resolver,
            max_message_bytes,
            max_recipients: positive(
                "max_recipients",
                u64::from(raw.max_recipients.unwrap_or(100)),
            )? as u32,
            max_connections_per_ip: positive(
                "max_connections_per_ip",
                u64::from(raw.max_connections_per_ip.unwrap_or(20)),
            )? as u32,
            max_messages_per_ip: positive(
                "max_messages_per_ip",
                u64::from(raw.max_messages_per_ip.unwrap_or(500)),
            )? as u32,
            command_timeout: time("command_timeout", &raw.command_timeout, "5m")?,
            data_timeout: time("data_timeout", &raw.data_timeout, "10m")?,
            spool_lifetime: time("spool_lifetime", &raw.spool_lifetime, "5d")?,
            retry_first,
            retry_max,
            send_max_recipients: positive(
                "send_max_recipients",
                u64::from(raw.send_max_recipients.unwrap_or(100)),
            )? as u32,
            send_per_hour: positive("send_per_hour", u64::from(raw.send_per_hour.unwrap_or(200)))?
                as u32,
            queue_lifetime: time("queue_lifetime", &raw.queue_lifetime, "5d")?,
            outbound_port: positive("outbound_port", u64::from(raw.outbound_port.unwrap_or(25)))?
                as u16,
            outbound_ca: raw.outbound_ca.clone(),
            delay_warning: time("delay_warning", &raw.delay_warning, "4h")?,
            mta_sts_port: positive("mta_sts_port", u64::from(raw.mta_sts_port.unwrap_or(443)))?
                as u16,
            mta_sts_mode: match raw.mta_sts_mode.as_deref().unwrap_or("testing") {
                m @ ("testing" | "enforce" | "none") => m.to_owned(),
                other => {
                    return Err(err(
                        "mta_sts_mode",
                        format!("{other:?}: use \"testing\", \"enforce\" or \"none\""),
                    ));
                }
            },
        })
    }
}

/// A `resolver` setting: `None` (or `"system"`) for the system's, else a
/// DNS server's address (port 53 when not given).
pub(crate) fn parse_resolver(text: Option<&str>) -> Result<Option<SocketAddr>, String> {
    match text {
        None | Some("system") => Ok(None),
        Some(text) => text
            .parse::<SocketAddr>()
            .or_else(|_| {
                text.parse::<std::net::IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
            .map(Some)
            .map_err(|_| {
                format!(
                    "{text:?} is not a DNS server address like \"127.0.0.1:53\" (or \"system\")"
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_rfc_and_the_domain() {
        let m = Mail::resolve(&RawMail::default(), "example.org").unwrap();
        assert_eq!(m.hostname, "example.org");
        assert_eq!(m.command_timeout, Duration::from_secs(300));
        assert_eq!(m.spool_lifetime, Duration::from_secs(5 * 86_400));
        assert_eq!(m.max_message_bytes, 50 << 20);
        assert_eq!(m.resolver, None);
        assert_eq!((m.send_max_recipients, m.send_per_hour), (100, 200));
    }

    #[test]
    fn bad_values_name_their_key() {
        let raw = RawMail {
            resolver: Some("nameserver".into()),
            ..RawMail::default()
        };
        let (key, reason) = Mail::resolve(&raw, "example.org").unwrap_err();
        assert_eq!(key, "mail.resolver");
        assert!(reason.contains("DNS server"), "{reason}");
        let raw = RawMail {
            resolver: Some("127.0.0.1".into()),
            max_message_kib: Some(64),
            ..RawMail::default()
        };
        let m = Mail::resolve(&raw, "example.org").unwrap();
        assert_eq!(m.resolver, Some("127.0.0.1:53".parse().unwrap()));
        assert_eq!(m.max_message_bytes, 64 << 10);
    }
}
