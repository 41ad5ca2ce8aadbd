//! `[listen]`: the gateway's listeners, by name. Every protocol Granary
//! serves over its own port is one name here; a name's module in the
//! gateway serves it, and `ports.json` and `granary status` list whatever
//! is bound.

use std::net::SocketAddr;

/// One listener Granary knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKind {
    pub name: &'static str,
    /// Bound by default at this address; `None` when off unless configured.
    pub default: Option<&'static str>,
    /// What it serves, for messages and `granary config default`.
    pub serves: &'static str,
    /// Whether this build has a server for it; the others are names the
    /// config already reserves for what is coming.
    pub available: bool,
}

/// Every listener Granary knows, in the order `granary status` shows them.
pub const LISTENERS: &[ListenerKind] = &[
    ListenerKind {
        name: "https",
        default: Some("127.0.0.1:8443"),
        serves: "HTTPS: git over HTTP, blogs, the apps' web services",
        available: true,
    },
    ListenerKind {
        name: "ssh",
        default: Some("127.0.0.1:2222"),
        serves: "git over SSH",
        available: true,
    },
    ListenerKind {
        name: "smtp",
        default: Some("127.0.0.1:2525"),
        serves: "mail from other servers (MX, port 25)",
        available: true,
    },
    ListenerKind {
        name: "submission",
        default: Some("127.0.0.1:1587"),
        serves: "mail clients sending, STARTTLS (port 587)",
        available: true,
    },
    ListenerKind {
        name: "submissions",
        default: Some("127.0.0.1:1465"),
        serves: "mail clients sending, TLS (port 465)",
        available: true,
    },
    ListenerKind {
        name: "imap",
        default: Some("127.0.0.1:1143"),
        serves: "mail clients reading, STARTTLS (port 143)",
        available: true,
    },
    ListenerKind {
        name: "imaps",
        default: Some("127.0.0.1:1993"),
        serves: "mail clients reading, TLS (port 993)",
        available: true,
    },
    ListenerKind {
        name: "xmpp",
        default: Some("127.0.0.1:5222"),
        serves: "chat clients, STARTTLS (port 5222)",
        available: true,
    },
    ListenerKind {
        name: "xmpps",
        default: Some("127.0.0.1:5223"),
        serves: "chat clients, TLS (port 5223)",
        available: true,
    },
    ListenerKind {
        name: "xmpp-s2s",
        default: None,
        serves: "other chat servers, federation (port 5269)",
        available: true,
    },
    ListenerKind {
        name: "taskd",
        default: None,
        serves: "Taskwarrior 2.6 sync (port 53589)",
        available: true,
    },
    ListenerKind {
        name: "http",
        default: None,
        serves: "plain HTTP: ACME HTTP-01 challenges, and a redirect to HTTPS (port 80)",
        available: true,
    },
    ListenerKind {
        name: "metrics",
        default: Some("127.0.0.1:9464"),
        serves: "Prometheus metrics at /metrics, plain HTTP: keep it on loopback or a private network",
        available: true,
    },
];

/// The listeners to bind: name and address, in [`LISTENERS`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub listeners: Vec<(&'static str, SocketAddr)>,
}

impl Listen {
    /// The address of a listener, if it is on.
    pub fn get(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// From `[listen]`: `name = "address:port"`, or `"off"` to turn a
    /// default listener off. An error names the key and says what to do.
    pub fn resolve(
        raw: &std::collections::BTreeMap<String, String>,
    ) -> Result<Listen, (String, String)> {
        for name in raw.keys() {
            let known = LISTENERS.iter().find(|l| l.name == name);
            match known {
                None => {
                    let names: Vec<&str> = LISTENERS.iter().map(|l| l.name).collect();
                    return Err((
                        format!("listen.{name}"),
                        format!(
                            "unknown listener; Granary's listeners are {}",
                            names.join(", ")
                        ),
                    ));
                }
                Some(l) if !l.available && raw[name] != "off" => {
                    return Err((
                        format!("listen.{name}"),
                        format!(
                            "this version of Granary has no {name} server yet ({}); remove the line",
                            l.serves
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let mut listeners = Vec::new();
        for l in LISTENERS {
            let text = match raw.get(l.name) {
                Some(t) if t == "off" => continue,
                Some(t) => t.as_str(),
                None => match l.default {
                    Some(d) => d,
                    None => continue,
                },
            };
            let addr = text.parse::<SocketAddr>().map_err(|_| {
                (
                    format!("listen.{}", l.name),
                    format!(
                        "{text:?} is not an IP address and port; write for example \"127.0.0.1:{}\", \"[::]:{}\", \"127.0.0.1:0\", or \"off\"",
                        l.default.and_then(|d| d.rsplit(':').next()).unwrap_or("4000"),
                        l.default.and_then(|d| d.rsplit(':').next()).unwrap_or("4000"),
                    ),
                )
            })?;
            listeners.push((l.name, addr));
        }
        Ok(Listen { listeners })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn raw(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let l = Listen::resolve(&BTreeMap::new()).unwrap();
        assert_eq!(l.get("https"), Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(l.get("ssh"), Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!(l.get("smtp"), Some("127.0.0.1:2525".parse().unwrap()));
        assert_eq!(l.get("imaps"), Some("127.0.0.1:1993".parse().unwrap()));
        assert_eq!(l.get("submission"), Some("127.0.0.1:1587".parse().unwrap()));
        assert_eq!(l.get("xmpp"), Some("127.0.0.1:5222".parse().unwrap()));
        assert_eq!(l.get("xmpps"), Some("127.0.0.1:5223".parse().unwrap()));
        assert_eq!(l.get("taskd"), None);
        let l = Listen::resolve(&raw(&[("https", "[::1]:0"), ("ssh", "off")])).unwrap();
        assert_eq!(l.get("https"), Some("[::1]:0".parse().unwrap()));
        assert_eq!(l.get("ssh"), None);
    }

    #[test]
    fn errors_name_the_listener() {
        let (key, why) = Listen::resolve(&raw(&[("smpt", "x")])).unwrap_err();
        assert_eq!(key, "listen.smpt");
        assert!(why.contains("https, ssh, smtp"), "{why}");
        let (key, why) = Listen::resolve(&raw(&[("https", "localhost:443")])).unwrap_err();
        assert_eq!(key, "listen.https");
        assert!(why.contains("\"localhost:443\""), "{why}");
    }
}
