//! `[xmpp]`: what one chat session may send, and how this server talks
//! to other chat servers (federation, the `xmpp-s2s` listener).

use serde::Deserialize;

/// `[xmpp]` exactly as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXmpp {
    pub max_stanza_kib: Option<u64>,
    pub stanzas_per_second: Option<u32>,
    pub stanza_burst: Option<u32>,
    pub s2s_require_verified: Option<bool>,
    pub s2s_idle_secs: Option<u64>,
    pub s2s_resolver: Option<String>,
    pub s2s_ca: Option<std::path::PathBuf>,
    pub s2s_connections_per_domain: Option<u32>,
    pub s2s_stanzas_per_second: Option<u32>,
    pub s2s_allow_private_addresses: Option<bool>,
    pub push_servers: Option<Vec<String>>,
    pub upload_max_mib: Option<u64>,
    pub upload_expire_secs: Option<u64>,
    pub upload_quota_mib: Option<u64>,
    pub rooms_per_user: Option<u32>,
}

/// `[xmpp]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xmpp {
    /// The largest stanza a client may send; a larger one ends its stream.
    pub max_stanza_bytes: u64,
    /// Stanzas one session may send per second after its first
    /// `stanza_burst`; past that its stream ends (`policy-violation`).
    pub stanzas_per_second: u32,
    pub stanza_burst: u32,
    /// Accept only servers whose certificate verifies for their domain
    /// (SASL EXTERNAL); `false` also takes XEP-0220 dialback.
    pub s2s_require_verified: bool,
    /// A server-to-server stream quiet this long is closed.
    pub s2s_idle: std::time::Duration,
    /// The DNS server SRV records are asked of; `None`: `mail.resolver`,
    /// else the system's.
    pub s2s_resolver: Option<std::net::SocketAddr>,
    /// PEM certificates trusted for other servers besides the system's.
    pub s2s_ca: Option<std::path::PathBuf>,
    /// Streams at once from (and to) one other domain.
    pub s2s_connections_per_domain: u32,
    /// Stanzas per second one other domain may send, across its streams,
    /// after a burst of twice that; past it its streams end.
    pub s2s_stanzas_per_second: u32,
    /// Whether other servers may be at loopback, private or link-local
    /// addresses (a server on the home network; tests). Off by default:
    /// another domain's DNS is no way into the home network.
    pub s2s_allow_private_addresses: bool,
    /// The app servers (XEP-0357) chat grains send push notifications to,
    /// by their address (`p2.siacs.eu`); a client's registration for
    /// another is kept but not served. Empty: no notifications.
    pub push_servers: Vec<String>,
    /// Group chats (room grains) one user may create.
    pub rooms_per_user: u32,
    /// The largest file one upload may be (XEP-0363).
    pub upload_max_bytes: u64,
    /// How long a shared file is kept (and its address works).
    pub upload_expire_secs: u64,
    /// What one user's shared files may take in all.
    pub upload_quota_bytes: u64,
}

/// Push app servers: addresses, checked for what would break the list.
fn push_servers(raw: &[String]) -> Result<Vec<String>, (String, String)> {
    raw.iter()
        .map(|s| {
            let s = s.trim();
            let ok = !s.is_empty()
                && s.len() <= 1023
                && !s.contains(|c: char| c == ',' || c.is_whitespace() || c.is_control());
            match ok {
                true => Ok(s.to_owned()),
                false => Err((
                    "xmpp.push_servers".to_owned(),
                    format!("{s:?} is not a chat address (p2.siacs.eu)"),
                )),
            }
        })
        .collect()
}

impl Xmpp {
    pub fn resolve(raw: &RawXmpp) -> Result<Xmpp, (String, String)> {
        let positive = |key: &str, v: u64| -> Result<u64, (String, String)> {
            if v == 0 {
                return Err((format!("xmpp.{key}"), "must be more than 0".to_owned()));
            }
            Ok(v)
        };
        Ok(Xmpp {
            max_stanza_bytes: positive("max_stanza_kib", raw.max_stanza_kib.unwrap_or(256))?
                .min(16 << 10)
                << 10,
            stanzas_per_second: positive(
                "stanzas_per_second",
                raw.stanzas_per_second.unwrap_or(50_000) as u64,
            )? as u32,
            stanza_burst: positive("stanza_burst", raw.stanza_burst.unwrap_or(100_000) as u64)?
                as u32,
            s2s_require_verified: raw.s2s_require_verified.unwrap_or(false),
            s2s_idle: std::time::Duration::from_secs(positive(
                "s2s_idle_secs",
                raw.s2s_idle_secs.unwrap_or(600),
            )?),
            s2s_resolver: crate::mail::parse_resolver(raw.s2s_resolver.as_deref())
                .map_err(|e| ("xmpp.s2s_resolver".to_owned(), e))?,
            s2s_ca: raw.s2s_ca.clone(),
            s2s_connections_per_domain: positive(
                "s2s_connections_per_domain",
                raw.s2s_connections_per_domain.unwrap_or(4) as u64,
            )? as u32,
            s2s_stanzas_per_second: positive(
                "s2s_stanzas_per_second",
                raw.s2s_stanzas_per_second.unwrap_or(2000) as u64,
            )? as u32,
            s2s_allow_private_addresses: raw.s2s_allow_private_addresses.unwrap_or(false),
            push_servers: push_servers(raw.push_servers.as_deref().unwrap_or_default())?,
            upload_max_bytes: positive("upload_max_mib", raw.upload_max_mib.unwrap_or(16))?
                .min(1 << 20)
                << 20,
            upload_expire_secs: positive(
                "upload_expire_secs",
                raw.upload_expire_secs.unwrap_or(30 * 86_400),
            )?,
            upload_quota_bytes: positive("upload_quota_mib", raw.upload_quota_mib.unwrap_or(1024))?
                .min(1 << 30)
                << 20,
            rooms_per_user: raw.rooms_per_user.unwrap_or(20),
        })
    }

    /// What the chat grains get as their environment.
    pub fn grain_env(&self) -> Vec<String> {
        vec![
            format!("GRANARY_XMPP_MAX_STANZA={}", self.max_stanza_bytes),
            format!("GRANARY_XMPP_STANZA_RATE={}", self.stanzas_per_second),
            format!("GRANARY_XMPP_STANZA_BURST={}", self.stanza_burst),
            format!("GRANARY_XMPP_PUSH_SERVERS={}", self.push_servers.join(",")),
            format!("GRANARY_XMPP_UPLOAD_MAX_BYTES={}", self.upload_max_bytes),
            format!(
                "GRANARY_XMPP_UPLOAD_EXPIRE_SECS={}",
                self.upload_expire_secs
            ),
            format!(
                "GRANARY_XMPP_UPLOAD_QUOTA_BYTES={}",
                self.upload_quota_bytes
            ),
        ]
    }
}
