//! `[xmpp]`: what one chat session may send.

use serde::Deserialize;

/// `[xmpp]` exactly as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXmpp {
    pub max_stanza_kib: Option<u64>,
    pub stanzas_per_second: Option<u32>,
    pub stanza_burst: Option<u32>,
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
        })
    }

    /// What the chat grains get as their environment.
    pub fn grain_env(&self) -> Vec<String> {
        vec![
            format!("GRANARY_XMPP_MAX_STANZA={}", self.max_stanza_bytes),
            format!("GRANARY_XMPP_STANZA_RATE={}", self.stanzas_per_second),
            format!("GRANARY_XMPP_STANZA_BURST={}", self.stanza_burst),
        ]
    }
}
