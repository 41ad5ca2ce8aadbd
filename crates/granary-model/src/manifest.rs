//! An app's manifest (`granary-app.toml`): what the app is, which grain kind
//! it claims, what it serves and how to run it. The unsigned development
//! install reads it from a directory; signed packages carry the same type.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::GrainKind;

/// The file name of a manifest inside an app directory or package.
pub const MANIFEST_FILE: &str = "granary-app.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Reverse-DNS style id, e.g. `org.granary.hello`.
    pub id: String,
    /// The app's version: 1 to 64 of `[A-Za-z0-9._+-]`, not starting with
    /// '.' (it names a directory on the host).
    pub version: String,
    /// The grain kind this app claims: one installed app per kind.
    pub kind: String,
    /// One grain per user (`true`), or a single shared grain (`false`).
    #[serde(default = "yes")]
    pub per_user: bool,
    /// Grains of this kind are made when something asks for one (a chat
    /// room when someone first joins it), several per user, each named by
    /// an instance; none is made for every user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
    /// The program inside the image and its arguments; `exec[0]` is an
    /// absolute path inside `image/`.
    pub exec: Vec<String>,
    /// Connection services the app accepts (`"http"`, `"imap"`, ...).
    #[serde(default)]
    pub services: Vec<String>,
    /// Interfaces (descriptor prefixes) it offers other grains, e.g.
    /// `"git.read"`, `"notify"`.
    #[serde(default)]
    pub offers: Vec<String>,
    /// Offered interfaces the owner may also grant to another user's grain
    /// (a calendar shared with a friend); every one must be in `offers`.
    /// Anything else is granted only between one user's own grains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<String>,
    /// Resource limits; host defaults where absent.
    #[serde(default)]
    pub limits: ManifestLimits,
    /// A one-line name for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub title: String,
    /// `KEY=value` pairs added to the app's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Interfaces (descriptor prefixes) the app may ask other grains for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<String>,
    /// A command in the image run in the grain's sandbox, with its dataset,
    /// before the app starts on data last used by another version (or
    /// none): `GRANARY_PREVIOUS_VERSION` and `GRANARY_APP_VERSION` say which.
    /// A non-zero exit fails the start (and rolls an upgrade back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrate: Vec<String>,
    /// Stop the grain after this many idle seconds instead of the host's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// The architectures a package carries an image for, one
    /// `image-<arch>/` tree each, sorted (`granary pack build --target`
    /// writes it). Empty for one `image/`, whose architecture is its
    /// program's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arches: Vec<String>,
}

/// The architectures app images are built for, as manifests and
/// `[cluster].arches` name them.
pub const ARCHES: [&str; 2] = ["x86_64", "aarch64"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{MANIFEST_FILE}: {0}")]
pub struct ManifestError(String);

fn short_name(what: &str, s: &str, extra: &[u8]) -> Result<(), ManifestError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManifestError(format!(
            "{what} {s:?} must be 1 to 64 of a-z, 0-9 and {:?}",
            String::from_utf8_lossy(extra)
        )))
    }
}

impl Manifest {
    /// The manifest as TOML; parses back to the same value.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest always serialises")
    }

    /// Parses and checks a manifest. Errors name the field.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ManifestError(e.to_string()))?;
        short_name("id", &m.id, b".-")?;
        if m.id.starts_with('.') {
            return Err(ManifestError(format!(
                "id {:?} must not start with '.'",
                m.id
            )));
        }
        // The version names a directory on the host: no separators, no
        // leading dot (so never "." or "..").
        let version_ok = !m.version.is_empty()
            && m.version.len() <= 64
            && !m.version.starts_with('.')
            && m.version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
        if !version_ok {
            return Err(ManifestError(format!(
                "version {:?} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', '+' and '-', not starting with '.'",
                m.version
            )));
        }
        GrainKind::new(&m.kind).map_err(|e| ManifestError(e.to_string()))?;
        match m.exec.first() {
            Some(p) if p.starts_with('/') && !p.split('/').any(|c| c == "..") => {}
            _ => {
                return Err(ManifestError(
                    "exec must start with an absolute path inside the image, e.g. [\"/bin/app\"]"
                        .to_owned(),
                ));
            }
        }
        for s in &m.services {
            short_name("service", s, b"-")?;
        }
        for o in &m.offers {
            short_name("offered interface", o, b".-")?;
        }
        if let Some(s) = m.shares.iter().find(|s| !m.offers.contains(s)) {
            return Err(ManifestError(format!(
                "shares lists {s}, which is not in offers"
            )));
        }
        if let Some(p) = m.migrate.first()
            && (!p.starts_with('/') || p.split('/').any(|c| c == ".."))
        {
            return Err(ManifestError(
                "migrate must start with an absolute path inside the image".to_owned(),
            ));
        }
        if m.idle_timeout_seconds == Some(0) {
            return Err(ManifestError(
                "idle_timeout_seconds must be more than zero".to_owned(),
            ));
        }
        for r in &m.requests {
            short_name("requested interface", r, b".-")?;
        }
        for e in &m.env {
            let ok = e.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            }) && !e.contains('\0');
            if !ok {
                return Err(ManifestError(format!("env entry {e:?} must be KEY=value")));
            }
        }
        if let Some(a) = m.arches.iter().find(|a| !ARCHES.contains(&a.as_str())) {
            return Err(ManifestError(format!(
                "arches lists {a:?}; images are built for {}",
                ARCHES.join(", ")
            )));
        }
        if !m.arches.is_sorted_by(|a, b| a < b) {
            return Err(ManifestError(
                "arches must be sorted, each named once".to_owned(),
            ));
        }
        if !m.per_user {
            return Err(ManifestError(
                "per_user = false (shared grains) is not supported yet".to_owned(),
            ));
        }
        Ok(m)
    }

    pub fn grain_kind(&self) -> GrainKind {
        GrainKind::new(&self.kind).expect("checked in parse")
    }

    /// Whether `descriptor` (`<interface>[:<argument>]`) names an interface
    /// this app offers.
    pub fn offers(&self, descriptor: &str) -> bool {
        let interface = descriptor.split(':').next().unwrap_or("");
        self.offers.iter().any(|o| o == interface)
    }

    /// Whether `descriptor`'s interface may be granted to another user's
    /// grain (`shares`).
    pub fn shares(&self, descriptor: &str) -> bool {
        let interface = descriptor.split(':').next().unwrap_or("");
        self.shares.iter().any(|o| o == interface)
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (kind {})", self.id, self.version, self.kind)
    }
}

/// Orders versions: split at `.`, `-`, `+` and `_`, numeric parts
/// compared as numbers, others as text; more parts is newer when the rest
/// is equal (`1.10 > 1.9`, `2.0.1 > 2.0`).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let parts =
        |v: &str| -> Vec<String> { v.split(['.', '-', '+', '_']).map(str::to_owned).collect() };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let ord = if numeric(x) && numeric(y) {
            // Any length: fewer digits (without leading zeros) is smaller.
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        } else {
            x.cmp(y)
        };
        if ord != Equal {
            return ord;
        }
    }
    // One is a prefix of the other: extra zeros change nothing ("1.0" =
    // "1.0.0"), extra numbers make it newer, and an extra word is a
    // pre-release ("1.0-rc1" < "1.0").
    let (rest, sign) = if pa.len() > pb.len() {
        (&pa[pb.len()..], Greater)
    } else {
        (&pb[pa.len()..], Less)
    };
    match rest
        .iter()
        .find(|p| !(numeric(p) && p.bytes().all(|b| b == b'0')))
    {
        None => Equal,
        Some(p) if numeric(p) => sign,
        Some(_) => sign.reverse(),
    }
}

/// Checks a capability descriptor: `<interface>[:<argument>]`, where the
/// interface is dotted lowercase words and the argument 1 to 128 of
/// `[A-Za-z0-9._-]`.
pub fn check_descriptor(descriptor: &str) -> Result<(), DescriptorError> {
    let (interface, argument) = match descriptor.split_once(':') {
        Some((i, a)) => (i, Some(a)),
        None => (descriptor, None),
    };
    let iface_ok = !interface.is_empty()
        && interface.len() <= 64
        && interface
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let arg_ok = argument.is_none_or(|a| {
        !a.is_empty()
            && a.len() <= 128
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    });
    if iface_ok && arg_ok {
        Ok(())
    } else {
        Err(DescriptorError {
            descriptor: descriptor.to_owned(),
        })
    }
}

/// A capability descriptor that is not `<interface>[:<argument>]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capability {descriptor:?} must be <interface>[:<argument>], e.g. git.read:site")]
pub struct DescriptorError {
    pub descriptor: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "org.granary.hello"
version = "0.1.0"
kind = "hello"
exec = ["/bin/hello", "--quiet"]
services = ["hello"]
offers = ["notify"]
[limits]
memory_mib = 64
"#;

    #[test]
    fn parses_a_manifest_and_its_defaults() {
        let m = Manifest::parse(GOOD).unwrap();
        assert!(m.per_user);
        assert_eq!(m.exec, ["/bin/hello", "--quiet"]);
        assert_eq!(m.limits.memory_mib, Some(64));
        assert!(m.offers("notify:site"));
        assert!(m.offers("notify"));
        assert!(!m.offers("git.read:site"));
        assert_eq!(m.to_string(), "org.granary.hello 0.1.0 (kind hello)");
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let cases = [
            (
                GOOD.replace("\"hello\"\nexec", "\"Hello\"\nexec"),
                "grain kind",
            ),
            (GOOD.replace("/bin/hello\"", "bin/hello\""), "exec"),
            (GOOD.replace("/bin/hello\"", "/../x\""), "exec"),
            (GOOD.replace("0.1.0", "0 1"), "version"),
            (GOOD.replace("0.1.0", ".."), "version"),
            (GOOD.replace("0.1.0", "../../etc"), "version"),
            (GOOD.replace("0.1.0", "/etc"), "version"),
            (
                GOOD.replace("[\"notify\"]", "[\"No!\"]"),
                "offered interface",
            ),
            (format!("{GOOD}\nsurprise = 1"), "unknown field"),
            (
                GOOD.replace("[limits]", "arches = [\"riscv64\"]\n[limits]"),
                "arches lists \"riscv64\"",
            ),
            (
                GOOD.replace("[limits]", "arches = [\"x86_64\", \"x86_64\"]\n[limits]"),
                "each named once",
            ),
            (GOOD.replace("id = ", "#"), "missing field `id`"),
        ];
        for (text, expect) in cases {
            let e = Manifest::parse(&text).unwrap_err().to_string();
            assert!(e.contains(expect), "{expect}: {e}");
        }
    }

    #[test]
    fn versions_order_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("1.10", "1.9"), Greater);
        assert_eq!(compare_versions("2.0", "2.0.1"), Less);
        assert_eq!(compare_versions("2.39.2-1", "2.39.2-1"), Equal);
        assert_eq!(compare_versions("2.39.2-2", "2.39.2-1"), Greater);
        assert_eq!(compare_versions("1.0", "1.0.0"), Equal);
        assert_eq!(compare_versions("1.0-rc1", "1.0"), Less);
        assert_eq!(compare_versions("1.0", "1.0-rc1"), Greater);
        assert_eq!(
            compare_versions("99999999999999999999999", "99999999999999999999998"),
            Greater
        );
    }

    #[test]
    fn descriptors() {
        for ok in ["notify", "git.read:site", "mail.deliver", "notify:a_b-c.d"] {
            check_descriptor(ok).unwrap();
        }
        for bad in ["", ":x", "Git.read", "git.read:", "git.read:a/b", "x:y z"] {
            assert!(check_descriptor(bad).is_err(), "{bad}");
        }
    }
}
