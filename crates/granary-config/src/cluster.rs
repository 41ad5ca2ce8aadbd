//! `[cluster]`: this node's place in a cluster of several. Without the
//! section Granary is one node, embedded, with no coordination service.

use std::time::Duration;

use serde::Deserialize;

/// `[cluster]` exactly as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub etcd: Option<Vec<String>>,
    pub etcd_ca: Option<std::path::PathBuf>,
    pub etcd_cert: Option<std::path::PathBuf>,
    pub etcd_key: Option<std::path::PathBuf>,
    pub node: Option<String>,
    pub address: Option<String>,
    pub arches: Option<Vec<String>>,
    pub max_grains: Option<u32>,
    pub lease_ttl: Option<String>,
    pub replicas: Option<u32>,
    pub replicate_interval: Option<String>,
    pub prefix: Option<String>,
}

/// `[cluster]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// etcd's client URLs (`https://host:2379`, or `http://` on a network
    /// only the nodes reach; all three members).
    pub etcd: Vec<String>,
    /// For `https://` endpoints: the CA that signed etcd's certificates,
    /// and this node's client certificate and key, if etcd asks for one.
    pub etcd_tls: Option<EtcdTlsFiles>,
    /// This node's name in the cluster: a DNS label, unique.
    pub node: String,
    /// Where other nodes reach this one's node link (`host:port`).
    pub address: String,
    /// The architectures this node runs app images for (`x86_64`,
    /// `aarch64`); default: the host's.
    pub arches: Vec<String>,
    /// How many grains this node may own.
    pub max_grains: u32,
    /// How long after its last renewal this node's lease lasts: when etcd
    /// counts a silent node as down. The node itself stops trusting the
    /// lease (and stops its grains) after half of it.
    pub lease_ttl: Duration,
    /// How many other nodes hold a copy of each grain's data (0: none).
    pub replicas: u32,
    /// How often those copies are brought up to date: the most data a
    /// dead node can lose.
    pub replicate_interval: Duration,
    /// The etcd key prefix this cluster's records live under.
    pub prefix: String,
}

/// Where a node's TLS material for etcd is (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    pub ca: std::path::PathBuf,
    /// Certificate and key, given together.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// The architecture app images are built for on this host, if any.
fn host_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "aarch64" => Some("aarch64"),
        "x86_64" => Some("x86_64"),
        _ => None,
    }
}

impl Cluster {
    /// `None` when the section is absent.
    pub fn resolve(raw: Option<&RawCluster>) -> Result<Option<Cluster>, (String, String)> {
        let Some(raw) = raw else { return Ok(None) };
        let key = |k: &str| format!("cluster.{k}");
        let etcd = raw.etcd.clone().unwrap_or_default();
        if etcd.is_empty() {
            return Err((key("etcd"), "list etcd's client URLs, e.g. [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]".into()));
        }
        let tls = etcd[0].starts_with("https://");
        for url in &etcd {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return Err((
                    key("etcd"),
                    format!("{url:?} is not an etcd client URL (https://host:port)"),
                ));
            }
            if url.starts_with("https://") != tls {
                return Err((
                    key("etcd"),
                    "all of etcd's URLs are https:// or all are http://, not a mix".into(),
                ));
            }
        }
        let etcd_tls = match (tls, &raw.etcd_ca) {
            (true, None) => {
                return Err((
                    key("etcd_ca"),
                    "https:// etcd needs the CA that signed its certificates (a PEM file)".into(),
                ));
            }
            (false, Some(_)) => {
                return Err((
                    key("etcd_ca"),
                    "given, but etcd's URLs are http://: make them https://".into(),
                ));
            }
            (false, None) => {
                if raw.etcd_cert.is_some() || raw.etcd_key.is_some() {
                    return Err((
                        key("etcd_cert"),
                        "a client certificate is for https:// etcd".into(),
                    ));
                }
                None
            }
            (true, Some(ca)) => Some(EtcdTlsFiles {
                ca: ca.clone(),
                client: match (&raw.etcd_cert, &raw.etcd_key) {
                    (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err((key("etcd_key"), "the client certificate's key".into()));
                    }
                    (None, Some(_)) => {
                        return Err((
                            key("etcd_cert"),
                            "the certificate that goes with etcd_key".into(),
                        ));
                    }
                },
            }),
        };
        let node = raw.node.clone().ok_or_else(|| {
            (
                key("node"),
                "give this node a name (a DNS label, e.g. \"n1\")".to_owned(),
            )
        })?;
        if !granary_model::valid_node_name(&node) {
            return Err((
                key("node"),
                format!(
                    "{node:?} is not a node name: 1-63 of a-z, 0-9 and '-', starting with a letter"
                ),
            ));
        }
        let address = raw
            .address
            .clone()
            .unwrap_or_else(|| format!("{node}:7443"));
        let arches = match (&raw.arches, host_arch()) {
            (Some(a), _) => a.clone(),
            (None, Some(host)) => vec![host.to_owned()],
            (None, None) => {
                return Err((
                    key("arches"),
                    format!(
                        "this host is {}, which Granary builds no images for; name the architectures it runs",
                        std::env::consts::ARCH
                    ),
                ));
            }
        };
        if arches.is_empty() {
            return Err((key("arches"), "name at least one architecture".into()));
        }
        for a in &arches {
            if a != "x86_64" && a != "aarch64" {
                return Err((
                    key("arches"),
                    format!("{a:?}: Granary builds images for \"x86_64\" and \"aarch64\""),
                ));
            }
        }
        let duration = |k: &str, v: &Option<String>, default: &str| {
            crate::parse_duration(v.as_deref().unwrap_or(default)).map_err(|e| (key(k), e.0))
        };
        let lease_ttl = duration("lease_ttl", &raw.lease_ttl, "10s")?;
        if lease_ttl < Duration::from_secs(2) {
            return Err((
                key("lease_ttl"),
                "at least 2s: the node renews at a third of it".into(),
            ));
        }
        let prefix = raw.prefix.clone().unwrap_or_else(|| "/granary/".to_owned());
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err((
                key("prefix"),
                format!("{prefix:?}: a key prefix starts and ends with '/'"),
            ));
        }
        Ok(Some(Cluster {
            etcd,
            etcd_tls,
            node,
            address,
            arches,
            max_grains: raw.max_grains.unwrap_or(1000).max(1),
            lease_ttl,
            replicas: raw.replicas.unwrap_or(1),
            replicate_interval: duration("replicate_interval", &raw.replicate_interval, "1m")?,
            prefix,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_key() {
        assert_eq!(Cluster::resolve(None), Ok(None));
        let raw = RawCluster {
            etcd: Some(vec!["http://127.0.0.1:2379".into()]),
            node: Some("n1".into()),
            ..RawCluster::default()
        };
        let c = Cluster::resolve(Some(&raw)).unwrap().unwrap();
        assert_eq!(c.address, "n1:7443");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.replicate_interval, Duration::from_secs(60));
        assert_eq!(c.replicas, 1);
        assert_eq!(c.prefix, "/granary/");
        assert_eq!(c.arches, [host_arch().unwrap()]);
        let bad = |f: &dyn Fn(&mut RawCluster)| {
            let mut r = raw.clone();
            f(&mut r);
            Cluster::resolve(Some(&r)).unwrap_err().0
        };
        assert_eq!(bad(&|r| r.etcd = None), "cluster.etcd");
        assert_eq!(
            bad(&|r| r.etcd = Some(vec!["127.0.0.1:2379".into()])),
            "cluster.etcd"
        );
        // TLS: https:// needs the CA; no mixing; cert and key together.
        let https = |r: &mut RawCluster| r.etcd = Some(vec!["https://10.0.0.1:2379".into()]);
        assert_eq!(bad(&https), "cluster.etcd_ca");
        assert_eq!(
            bad(&|r| r.etcd = Some(vec![
                "https://10.0.0.1:2379".into(),
                "http://10.0.0.2:2379".into()
            ])),
            "cluster.etcd"
        );
        assert_eq!(
            bad(&|r| r.etcd_ca = Some("ca.pem".into())),
            "cluster.etcd_ca"
        );
        assert_eq!(
            bad(&|r| r.etcd_cert = Some("n1.pem".into())),
            "cluster.etcd_cert"
        );
        assert_eq!(
            bad(&|r| {
                https(r);
                r.etcd_ca = Some("ca.pem".into());
                r.etcd_cert = Some("n1.pem".into());
            }),
            "cluster.etcd_key"
        );
        let mut r = raw.clone();
        https(&mut r);
        r.etcd_ca = Some("ca.pem".into());
        r.etcd_cert = Some("n1.pem".into());
        r.etcd_key = Some("n1.key".into());
        let tls = Cluster::resolve(Some(&r))
            .unwrap()
            .unwrap()
            .etcd_tls
            .unwrap();
        assert_eq!(tls.ca, std::path::Path::new("ca.pem"));
        assert_eq!(tls.client, Some(("n1.pem".into(), "n1.key".into())));
        assert_eq!(bad(&|r| r.node = None), "cluster.node");
        assert_eq!(bad(&|r| r.node = Some("Node 1".into())), "cluster.node");
        assert_eq!(
            bad(&|r| r.arches = Some(vec!["riscv64".into()])),
            "cluster.arches"
        );
        assert_eq!(
            bad(&|r| r.lease_ttl = Some("1s".into())),
            "cluster.lease_ttl"
        );
        assert_eq!(
            bad(&|r| r.prefix = Some("granary".into())),
            "cluster.prefix"
        );
    }
}
