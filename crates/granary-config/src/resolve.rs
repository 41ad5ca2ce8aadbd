//! From [`RawConfig`] to [`Config`]: defaults filled in, paths made absolute
//! and checked, and errors that name the file, the key and the reason.

use crate::listen::Listen;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::raw::RawConfig;

/// What the process environment contributes, gathered by the caller so that
/// resolution is testable without touching the real environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// The working directory, for a relative `--home` and the default data dir.
    pub cwd: PathBuf,
    /// `--home` or `GRANARY_HOME`: overrides `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// `GRANARY_LOG`: overrides `log.level`.
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this came from; `None` for the built-in defaults.
    pub file: Option<PathBuf>,
    /// Absolute. Created by the daemon on start if missing.
    pub data_dir: PathBuf,
    pub domain: String,
    pub log_format: LogFormat,
    /// A tracing filter string; the binary parses it (and reports errors
    /// against `log.level`).
    pub log_level: String,
    pub listen: Listen,
    pub tls: TlsSource,
    pub storage: StorageBackend,
    /// Host uids (and gids) handed to grains, one each.
    /// `jail.uid_range`: the host uids grains are given.
    pub uid_range: granary_model::UidRange,
    /// The cgroup under which each grain gets its own.
    pub cgroup_parent: String,
    pub grains: Grains,
    pub packages: Packages,
    pub snapshots: Snapshots,
    pub backup: Backup,
    pub gateway: Gateway,
    pub mail: crate::mail::Mail,
    pub xmpp: crate::xmpp::Xmpp,
    /// `[cluster]`; `None`: one node on its own.
    pub cluster: Option<crate::cluster::Cluster>,
    /// `web.admins`: the users whose web home has the admin pages.
    pub web_admins: Vec<String>,
}

/// `[gateway]`: what a slow, silent or oversized client may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// From TCP accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// To read a request's head; also how long a kept-alive connection may
    /// sit idle between requests.
    pub header_timeout: Duration,
    /// How long open connections get to finish when the daemon stops.
    pub drain_timeout: Duration,
    /// The largest request head accepted (431 above it).
    pub max_header_bytes: usize,
    /// How long an unused connection to a grain is kept (it holds the
    /// grain awake meanwhile).
    pub upstream_idle: Duration,
}

/// `[backup]`: encrypted exports of every grain's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// age X25519 public keys (`age1...`) every chunk is encrypted to.
    pub recipients: Vec<String>,
    pub chunk_bytes: u64,
    /// Hex Ed25519 keys of other nodes whose backups this node restores.
    pub trust: Vec<String>,
    pub targets: Vec<BackupTarget>,
}

/// `[[backup.targets]]`: where scheduled backups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupTarget {
    pub name: String,
    pub place: BackupPlace,
    /// `None`: only when asked (`granary backup export --target NAME`).
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupPlace {
    /// A directory (removable media, a mount from elsewhere).
    Dir(PathBuf),
    /// Another node's `granary backup receive`: address and its node key.
    Remote { address: String, key: String },
}

/// `[snapshots]`: the automatic snapshot schedule and its retention grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshots {
    /// `None`: no automatic snapshots.
    pub interval: Option<Duration>,
    /// (period, how many periods keep their newest snapshot).
    pub keep: Vec<(Duration, usize)>,
    pub freeze_limit: Duration,
}

/// `[packages]`: what an app package may make the host do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packages {
    pub max_package_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub max_entries: u64,
}

/// `[grains]`: the supervisor's timings and bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grains {
    pub idle_timeout: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    pub crash_loop_crashes: u32,
    pub crash_window: Duration,
    pub shutdown_grace: Duration,
    pub call_timeout: Duration,
    pub audit_flush: Duration,
    pub max_message_bytes: u64,
    pub max_in_flight: u32,
    pub flood_cutoff: u64,
}

/// Why a text is not a duration; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(pub String);

/// A duration written as a number with a unit: `250ms`, `30s`, `2m`, `1h`,
/// `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        DurationError(format!(
            "{text:?} is not a duration like \"250ms\", \"30s\" or \"2m\""
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(DurationError(format!("{text:?} must be more than zero")));
    }
    Ok(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Granary's own certificate authority in `DATA_DIR/tls`.
    LocalCa,
    /// PEM files the admin provides (absolute paths, checked to exist).
    Files { cert: PathBuf, key: PathBuf },
    /// Certificates from an ACME CA, in `DATA_DIR/tls/acme`; the local CA
    /// serves until the first arrives.
    Acme(crate::acme::Acme),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// Directories under `DATA_DIR/grains`.
    Plain,
    /// One ZFS dataset per grain under `dataset`, with a `refquota`.
    Zfs { dataset: String, quota_bytes: u64 },
    /// One btrfs subvolume per grain under `DATA_DIR/grains` (which must
    /// be on btrfs), with a qgroup limit.
    Btrfs { quota_bytes: u64 },
}

impl StorageBackend {
    pub fn name(&self) -> &'static str {
        match self {
            StorageBackend::Plain => "plain",
            StorageBackend::Zfs { .. } => "zfs",
            StorageBackend::Btrfs { .. } => "btrfs",
        }
    }
}

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    /// The dotted key (`listen.https`), or `None` for a whole-file problem.
    pub key: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "config {}", file.display())?,
            None => f.write_str("built-in config")?,
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

pub const DEFAULT_DOMAIN: &str = "localhost";
pub const DEFAULT_DATA_DIR: &str = "granary-data";

impl Config {
    /// Reads and resolves `file`, or resolves the built-in defaults when there
    /// is no file.
    pub fn load(file: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let Some(file) = file else {
            return Config::resolve(RawConfig::default(), None, env);
        };
        let file = absolute(&env.cwd, file);
        let text = std::fs::read_to_string(&file).map_err(|e| ConfigError {
            file: Some(file.clone()),
            key: None,
            reason: format!("cannot read: {e}"),
        })?;
        let raw = RawConfig::parse(&text).map_err(|e| ConfigError {
            file: Some(file.clone()),
            key: None,
            reason: describe_toml_error(&text, &e),
        })?;
        Config::resolve(raw, Some(&file), env)
    }

    /// Fills in defaults and checks every value. `file` must be absolute when
    /// given; relative paths in it are taken relative to its directory.
    pub fn resolve(
        raw: RawConfig,
        file: Option<&Path>,
        env: &Environment,
    ) -> Result<Config, ConfigError> {
        let err = |key: &str, reason: String| ConfigError {
            file: file.map(Path::to_path_buf),
            key: Some(key.to_owned()),
            reason,
        };
        let file_dir = file
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| env.cwd.clone());

        let data_dir = match (&env.data_dir, &raw.data_dir) {
            (Some(over), _) => absolute(&env.cwd, over),
            (None, Some(dir)) => absolute(&file_dir, dir),
            (None, None) => env.cwd.join(DEFAULT_DATA_DIR),
        };

        let domain = raw.domain.unwrap_or_else(|| DEFAULT_DOMAIN.to_owned());
        check_domain(&domain).map_err(|reason| err("domain", reason))?;

        let log_format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(err(
                    "log.format",
                    format!("{other:?} is not a log format; use \"text\" or \"json\""),
                ));
            }
        };
        let log_level = env
            .log_level
            .clone()
            .or(raw.log.level)
            .unwrap_or_else(|| "info".to_owned());

        let listen = Listen::resolve(&raw.listen).map_err(|(key, reason)| err(&key, reason))?;

        let acme = crate::acme::Acme::resolve(&raw.tls, &listen, &file_dir)
            .map_err(|(key, reason)| err(key, reason))?;
        let tls = match (raw.tls.cert, raw.tls.key) {
            (None, None) => acme.map_or(TlsSource::LocalCa, TlsSource::Acme),
            (Some(_), Some(_)) if acme.is_some() => {
                return Err(err(
                    "tls.acme",
                    "set either tls.acme or tls.cert and tls.key, not both".to_owned(),
                ));
            }
            (Some(cert), Some(key)) => {
                let cert = absolute(&file_dir, &cert);
                let key = absolute(&file_dir, &key);
                check_readable_file(&cert).map_err(|r| err("tls.cert", r))?;
                check_readable_file(&key).map_err(|r| err("tls.key", r))?;
                TlsSource::Files { cert, key }
            }
            (Some(_), None) => {
                return Err(err(
                    "tls.key",
                    "missing: tls.cert is set, so tls.key must name its private key".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(err(
                    "tls.cert",
                    "missing: tls.key is set, so tls.cert must name the certificate chain"
                        .to_owned(),
                ));
            }
        };

        let quota = || -> Result<u64, ConfigError> {
            match raw.storage.quota_mib.unwrap_or(10 * 1024) {
                0 => Err(err(
                    "storage.quota_mib",
                    "must be more than zero".to_owned(),
                )),
                mib => Ok(mib << 20),
            }
        };
        let storage = match raw.storage.backend.as_deref() {
            None | Some("plain") => StorageBackend::Plain,
            Some("zfs") => StorageBackend::Zfs {
                dataset: raw.storage.zfs_dataset.clone().ok_or_else(|| {
                    err(
                        "storage.zfs_dataset",
                        "storage.backend = \"zfs\" needs the parent dataset, e.g. zfs_dataset = \"tank/granary\"".to_owned(),
                    )
                })?,
                quota_bytes: quota()?,
            },
            Some("btrfs") => StorageBackend::Btrfs {
                quota_bytes: quota()?,
            },
            Some(other) => {
                return Err(err(
                    "storage.backend",
                    format!(
                        "{other:?} is not a storage backend; use \"plain\", \"zfs\" or \"btrfs\""
                    ),
                ));
            }
        };

        let uid_range = granary_model::UidRange::parse(
            raw.jail
                .uid_range
                .as_deref()
                .unwrap_or("1500000000+1000000"),
        )
        .map_err(|reason| err("jail.uid_range", reason.0))?;

        let cgroup_parent = raw
            .jail
            .cgroup_parent
            .clone()
            .unwrap_or_else(|| "granary".to_owned());
        if !granary_model::valid_resource_name(&cgroup_parent) {
            return Err(err(
                "jail.cgroup_parent",
                format!(
                    "{cgroup_parent:?} must be 1 to 64 of a-z, 0-9 and '-', not starting with '-'"
                ),
            ));
        }
        let g = &raw.grains;
        let duration = |key: &'static str, v: &Option<String>, default: &str| {
            parse_duration(v.as_deref().unwrap_or(default)).map_err(|reason| err(key, reason.0))
        };
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err(err(key, "must be more than zero".to_owned()))
            } else {
                Ok(v)
            }
        };
        let grains = Grains {
            idle_timeout: duration("grains.idle_timeout", &g.idle_timeout, "120s")?,
            restart_backoff: duration("grains.restart_backoff", &g.restart_backoff, "500ms")?,
            restart_backoff_max: duration(
                "grains.restart_backoff_max",
                &g.restart_backoff_max,
                "60s",
            )?,
            crash_loop_crashes: positive(
                "grains.crash_loop_crashes",
                u64::from(g.crash_loop_crashes.unwrap_or(5)),
            )? as u32,
            crash_window: duration("grains.crash_window", &g.crash_window, "120s")?,
            shutdown_grace: duration("grains.shutdown_grace", &g.shutdown_grace, "5s")?,
            call_timeout: duration("grains.call_timeout", &g.call_timeout, "30s")?,
            audit_flush: duration("grains.audit_flush", &g.audit_flush, "60s")?,
            max_message_bytes: positive(
                "grains.max_message_kib",
                g.max_message_kib.unwrap_or(8192),
            )? * 1024,
            max_in_flight: positive(
                "grains.max_in_flight",
                u64::from(g.max_in_flight.unwrap_or(128)),
            )? as u32,
            flood_cutoff: positive("grains.flood_cutoff", g.flood_cutoff.unwrap_or(10_000))?,
        };

        let pk = &raw.packages;
        let packages = Packages {
            max_package_bytes: positive(
                "packages.max_package_mib",
                pk.max_package_mib.unwrap_or(512),
            )? << 20,
            max_unpacked_bytes: positive(
                "packages.max_unpacked_mib",
                pk.max_unpacked_mib.unwrap_or(2048),
            )? << 20,
            max_entries: positive("packages.max_entries", pk.max_entries.unwrap_or(100_000))?,
        };

        let sn = &raw.snapshots;
        let interval = match sn.interval.as_deref().unwrap_or("15m") {
            "off" => None,
            text => Some(parse_duration(text).map_err(|r| err("snapshots.interval", r.0))?),
        };
        let default_keep = ["15m:4", "1h:48", "1d:30", "30d:6"]
            .map(str::to_owned)
            .to_vec();
        let mut keep = Vec::new();
        for rule in sn.keep.as_ref().unwrap_or(&default_keep) {
            let parsed = rule.split_once(':').and_then(|(p, n)| {
                Some((
                    // parse_duration refuses zero.
                    parse_duration(p).ok()?,
                    n.parse::<usize>().ok().filter(|n| *n > 0)?,
                ))
            });
            keep.push(parsed.ok_or_else(|| {
                err(
                    "snapshots.keep",
                    format!("{rule:?} is not PERIOD:COUNT, e.g. \"1h:48\" or \"30d:6\""),
                )
            })?);
        }
        let snapshots = Snapshots {
            interval,
            keep,
            freeze_limit: parse_duration(sn.freeze_limit.as_deref().unwrap_or("5s"))
                .map_err(|r| err("snapshots.freeze_limit", r.0))?,
        };

        let gw = &raw.gateway;
        let time = |key: &str, value: &Option<String>, default: &str| {
            parse_duration(value.as_deref().unwrap_or(default)).map_err(|r| err(key, r.0))
        };
        let gateway = Gateway {
            handshake_timeout: time("gateway.handshake_timeout", &gw.handshake_timeout, "10s")?,
            header_timeout: time("gateway.header_timeout", &gw.header_timeout, "30s")?,
            drain_timeout: time("gateway.drain_timeout", &gw.drain_timeout, "10s")?,
            upstream_idle: time("gateway.upstream_idle", &gw.upstream_idle, "30s")?,
            max_header_bytes: (positive("gateway.max_header_kib", gw.max_header_kib.unwrap_or(64))?
                .min(1024)
                << 10) as usize,
        };
        let bk = &raw.backup;
        let hex_key = |k: &str| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit());
        let trust = bk.trust.clone().unwrap_or_default();
        if let Some(bad) = trust.iter().find(|k| !hex_key(k)) {
            return Err(err(
                "backup.trust",
                format!("{bad:?} is not a node key (64 hex digits, from `granary backup key`)"),
            ));
        }
        let mut targets = Vec::new();
        for t in &bk.targets {
            let key = format!("backup.targets {:?}", t.name);
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 32
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
            if !name_ok || targets.iter().any(|x: &BackupTarget| x.name == t.name) {
                return Err(err(
                    "backup.targets.name",
                    format!(
                        "{:?} must be unique, 1 to 32 of A-Z, a-z, 0-9, '-' and '_'",
                        t.name
                    ),
                ));
            }
            let place = match (&t.dir, &t.remote, &t.remote_key) {
                (Some(dir), None, None) => BackupPlace::Dir(absolute(&file_dir, dir)),
                (None, Some(address), Some(k)) if hex_key(k) => BackupPlace::Remote {
                    address: address.clone(),
                    key: k.to_ascii_lowercase(),
                },
                (None, Some(_), _) => {
                    return Err(err(
                        &key,
                        "a remote target needs remote_key: the receiving node's key (64 hex digits) that `granary backup receive` prints".to_owned(),
                    ));
                }
                _ => {
                    return Err(err(
                        &key,
                        "give either dir = \"/path\" or remote = \"host:port\" with remote_key"
                            .to_owned(),
                    ));
                }
            };
            let interval = match t.interval.as_deref().unwrap_or("1d") {
                "off" => None,
                text => Some(parse_duration(text).map_err(|r| err(&key, r.0))?),
            };
            targets.push(BackupTarget {
                name: t.name.clone(),
                place,
                interval,
            });
        }
        let backup = Backup {
            recipients: bk.recipients.clone().unwrap_or_default(),
            chunk_bytes: positive("backup.chunk_mib", bk.chunk_mib.unwrap_or(32))?.min(1024) << 20,
            trust,
            targets,
        };

        let mail = crate::mail::Mail::resolve(&raw.mail, &domain)
            .map_err(|(key, reason)| err(&key, reason))?;

        let xmpp =
            crate::xmpp::Xmpp::resolve(&raw.xmpp).map_err(|(key, reason)| err(&key, reason))?;

        let mut web_admins = Vec::new();
        for name in raw.web.admins.iter().flatten() {
            granary_model::UserName::existing(name)
                .map_err(|e| err("web.admins", format!("{name:?}: {e}")))?;
            web_admins.push(name.clone());
        }

        let mut cluster = crate::cluster::Cluster::resolve(raw.cluster.as_ref())
            .map_err(|(key, reason)| err(&key, reason))?;
        // TLS files, like tls.cert, are relative to the config file.
        if let Some(tls) = cluster.as_mut().and_then(|c| c.etcd_tls.as_mut()) {
            tls.ca = absolute(&file_dir, &tls.ca);
            check_readable_file(&tls.ca).map_err(|r| err("cluster.etcd_ca", r))?;
            if let Some((cert, key)) = &mut tls.client {
                *cert = absolute(&file_dir, cert);
                *key = absolute(&file_dir, key);
                check_readable_file(cert).map_err(|r| err("cluster.etcd_cert", r))?;
                check_readable_file(key).map_err(|r| err("cluster.etcd_key", r))?;
            }
        }

        if let (TlsSource::Acme(_), Some(_)) = (&tls, &cluster) {
            // Each node would order for the same names, and the CA's
            // checks reach whichever node DNS names: not yet.
            return Err(err(
                "tls.acme",
                "not yet with [cluster]: give every node the same tls.cert and tls.key".to_owned(),
            ));
        }
        if matches!(tls, TlsSource::Acme(_)) && !domain.contains('.') {
            return Err(err(
                "tls.acme",
                format!(
                    "a public CA issues no certificate for {domain:?}: set domain to a name the world resolves to this host"
                ),
            ));
        }
        Ok(Config {
            web_admins,
            mail,
            xmpp,
            cluster,
            gateway,
            backup,
            snapshots,
            packages,
            grains,
            cgroup_parent,
            file: file.map(Path::to_path_buf),
            data_dir,
            domain,
            log_format,
            log_level,
            listen,
            tls,
            storage,
            uid_range,
        })
    }

    /// `DATA_DIR/run`: sockets, the lock file and `ports.json`.
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }
    /// The admin socket the CLI talks to the daemon through.
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir().join("admin.sock")
    }
    /// Held (flock) by the running daemon; holds its pid.
    pub fn lock_file(&self) -> PathBuf {
        self.run_dir().join("granary.lock")
    }
    /// The addresses the daemon actually bound.
    pub fn ports_file(&self) -> PathBuf {
        self.run_dir().join("ports.json")
    }
    /// The SQLite state database.
    pub fn state_db(&self) -> PathBuf {
        self.data_dir.join("state").join("granary.db")
    }
    /// The local CA and the certificates it issued.
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }
}

pub(crate) fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

pub(crate) fn check_readable_file(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(format!("{} is not a regular file", path.display())),
            Err(e) => Err(format!("cannot stat {}: {e}", path.display())),
        },
        Err(e) => Err(format!("cannot open {}: {e}", path.display())),
    }
}

/// A lowercase DNS name: labels of a-z, 0-9 and '-', no leading or trailing
/// '-', at most 63 octets each and 253 in all.
fn check_domain(domain: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{domain:?} is not a valid domain name: {why}"));
    if domain.is_empty() || domain.len() > 253 {
        return bad("it must be 1 to 253 characters long");
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated part must be 1 to 63 characters long");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad("use lowercase letters, digits, '-' and '.' only");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a part may not start or end with '-'");
        }
    }
    Ok(())
}

/// toml's own message plus the offending line, so the admin sees where.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line_no}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_CONFIG_TOML;

    fn env() -> Environment {
        Environment {
            cwd: PathBuf::from("/srv/here"),
            ..Environment::default()
        }
    }

    fn resolve_text(text: &str) -> Result<Config, ConfigError> {
        let raw = RawConfig::parse(text).map_err(|e| ConfigError {
            file: None,
            key: None,
            reason: describe_toml_error(text, &e),
        })?;
        Config::resolve(raw, Some(Path::new("/etc/granary/granary.toml")), &env())
    }

    #[test]
    fn no_file_gives_the_embedded_defaults() {
        let config = Config::load(None, &env()).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/here/granary-data"));
        assert_eq!(config.domain, "localhost");
        assert_eq!(
            config.listen.get("https"),
            Some("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(config.tls, TlsSource::LocalCa);
        assert_eq!(config.storage, StorageBackend::Plain);
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, "info");
        assert_eq!(
            config.admin_socket(),
            PathBuf::from("/srv/here/granary-data/run/admin.sock")
        );
    }

    #[test]
    fn the_commented_default_file_is_exactly_the_defaults() {
        let from_file =
            Config::resolve(RawConfig::parse(DEFAULT_CONFIG_TOML).unwrap(), None, &env()).unwrap();
        assert_eq!(from_file, Config::load(None, &env()).unwrap());
    }

    #[test]
    fn home_override_beats_the_file_and_relative_paths_follow_the_file() {
        let config = resolve_text("data_dir = \"data\"").unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/etc/granary/data"));
        let mut env = env();
        env.data_dir = Some(PathBuf::from("elsewhere"));
        let raw = RawConfig::parse("data_dir = \"data\"").unwrap();
        let config = Config::resolve(raw, None, &env).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/here/elsewhere"));
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line_number() {
        let err = resolve_text("domain = \"example.org\"\n[gateway]\nhttp = \"x\"\n").unwrap_err();
        assert!(err.reason.starts_with("line 3:"), "{err}");
        assert!(err.reason.contains("unknown field `http`"), "{err}");
        // Listener names are checked too, and the error names the key.
        let err = resolve_text("[listen]\ngopher = \"x\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen.gopher"));
        assert!(err.reason.contains("unknown listener"), "{err}");
        let err = resolve_text("colour = 1").unwrap_err();
        assert!(err.reason.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn errors_name_file_and_key() {
        let err = resolve_text("[listen]\nhttps = \"localhost:443\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen.https"));
        let shown = err.to_string();
        assert!(
            shown.starts_with("config /etc/granary/granary.toml: listen.https: \"localhost:443\""),
            "{shown}"
        );

        let err = resolve_text("domain = \"Example.org\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("domain"));
        let err = resolve_text("[log]\nformat = \"xml\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("log.format"));
        let err = resolve_text("[storage]\nbackend = \"nfs\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("storage.backend"));
        let err = resolve_text("[tls]\ncert = \"a.pem\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls.key"));
        let err =
            resolve_text("[tls]\ncert = \"/nonexistent/a.pem\"\nkey = \"/nonexistent/b.pem\"")
                .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls.cert"));
        assert!(err.reason.contains("/nonexistent/a.pem"), "{err}");
    }

    #[test]
    fn uid_range_is_parsed_and_checked() {
        let config = resolve_text("[jail]\nuid_range = \"2000000000+5000\"").unwrap();
        assert_eq!(
            config.uid_range,
            granary_model::UidRange {
                start: 2_000_000_000,
                count: 5000
            }
        );
        assert_eq!(
            Config::load(None, &env()).unwrap().uid_range.start,
            1_500_000_000
        );
        for bad in [
            "1000-2000",
            "0+100",
            "4294967000+1000",
            "x+1",
            "2000000000+0",
        ] {
            let err = resolve_text(&format!("[jail]\nuid_range = \"{bad}\"")).unwrap_err();
            assert_eq!(err.key.as_deref(), Some("jail.uid_range"), "{bad}: {err}");
        }
    }

    #[test]
    fn port_zero_and_ipv6_are_accepted() {
        let config = resolve_text("[listen]\nhttps = \"[::1]:0\"").unwrap();
        assert_eq!(config.listen.get("https"), Some("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn tls_files_resolve_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        std::fs::write(dir.path().join("key.pem"), "x").unwrap();
        let file = dir.path().join("granary.toml");
        std::fs::write(&file, "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n").unwrap();
        let config = Config::load(Some(&file), &env()).unwrap();
        assert_eq!(
            config.tls,
            TlsSource::Files {
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
            }
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load(Some(Path::new("/nonexistent/granary.toml")), &env()).unwrap_err();
        assert_eq!(err.key, None);
        assert!(
            err.to_string()
                .starts_with("config /nonexistent/granary.toml: cannot read")
        );
    }

    #[test]
    fn domain_rules() {
        for ok in ["localhost", "example.org", "a-b.example", "x1.y2"] {
            check_domain(ok).unwrap();
        }
        for bad in [
            "",
            "Example.org",
            "a..b",
            "-a.org",
            "a-.org",
            "a_b.org",
            "é.org",
        ] {
            assert!(check_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn grains_timings_are_parsed_and_checked() {
        let config = resolve_text("[grains]\nidle_timeout = \"750ms\"\nmax_in_flight = 8").unwrap();
        assert_eq!(config.grains.idle_timeout, Duration::from_millis(750));
        assert_eq!(config.grains.max_in_flight, 8);
        assert_eq!(config.grains.restart_backoff, Duration::from_millis(500));
        assert_eq!(config.grains.max_message_bytes, 8 << 20);
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for (bad, key) in [
            ("idle_timeout = \"soon\"", "grains.idle_timeout"),
            ("shutdown_grace = \"0s\"", "grains.shutdown_grace"),
            ("max_in_flight = 0", "grains.max_in_flight"),
        ] {
            let err = resolve_text(&format!("[grains]\n{bad}")).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{bad}: {err}");
        }
    }

    #[test]
    fn storage_backends_and_their_keys() {
        let zfs =
            resolve_text("[storage]\nbackend = \"zfs\"\nzfs_dataset = \"tank/g\"\nquota_mib = 8")
                .unwrap();
        assert_eq!(
            zfs.storage,
            StorageBackend::Zfs {
                dataset: "tank/g".to_owned(),
                quota_bytes: 8 << 20
            }
        );
        let btrfs = resolve_text("[storage]\nbackend = \"btrfs\"").unwrap();
        assert_eq!(
            btrfs.storage,
            StorageBackend::Btrfs {
                quota_bytes: 10 << 30
            }
        );
        let err = resolve_text("[storage]\nbackend = \"zfs\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("storage.zfs_dataset"), "{err}");
        let err = resolve_text("[storage]\nbackend = \"ext4\"").unwrap_err();
        assert!(
            err.to_string().contains("\"plain\", \"zfs\" or \"btrfs\""),
            "{err}"
        );
    }
}
