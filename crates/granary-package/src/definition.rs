//! The package definition: the TOML an app's author writes for
//! `granary pack build`. Parsed strictly: unknown fields are errors.

use std::path::{Path, PathBuf};

use granary_model::{Manifest, ManifestLimits};
use serde::Deserialize;

use crate::PackageError;

/// The definition format this build understands.
pub(crate) const FORMAT: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Must be 1.
    pub format: u32,
    pub app: AppSection,
    #[serde(default)]
    pub limits: ManifestLimits,
    #[serde(default)]
    pub files: Files,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    pub kind: String,
    pub version: String,
    #[serde(default)]
    pub title: String,
    #[serde(default = "yes")]
    pub per_user: bool,
    /// Grains made on demand, several per user (chat rooms).
    #[serde(default)]
    pub on_demand: bool,
    pub exec: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub services: Vec<String>,
    #[serde(default)]
    pub offers: Vec<String>,
    #[serde(default)]
    pub shares: Vec<String>,
    #[serde(default)]
    pub requests: Vec<String>,
    #[serde(default)]
    pub migrate: Vec<String>,
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
}

fn yes() -> bool {
    true
}

/// What goes into the image. Host paths are relative to the definition's
/// directory unless absolute.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    /// Programs copied to the same path in the image, with every shared
    /// library `ldd` reports and the loader.
    #[serde(default)]
    pub binaries: Vec<String>,
    /// Files a program loads at run time that ldd does not show (NSS and
    /// gconv modules, helper programs, `/bin/sh`), copied to the same path,
    /// with their libraries when they are ELF files. A directory is copied
    /// whole.
    #[serde(default)]
    pub runtime: Vec<String>,
    /// Files copied to another path in the image.
    #[serde(default)]
    pub copy: Vec<Copy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Copy {
    pub from: String,
    /// An absolute path inside the image.
    pub to: String,
    /// Also collect its shared libraries.
    #[serde(default)]
    pub with_libraries: bool,
}

/// What `granary pack init` writes.
pub const DEFINITION_TEMPLATE: &str = r#"# A Granary package definition: `granary pack build THIS_FILE -o app.gpkg`.
# Unknown keys are errors. Host paths are relative to this file's
# directory unless absolute.
format = 1

[app]
# The grain kind this app provides: 1-16 lowercase letters and digits.
kind = "KIND"
# Upgrades must raise it; any of [A-Za-z0-9._+-].
version = "0.1.0"
title = "TITLE"
# One grain per user.
per_user = true
# The program (a path inside the image) and its arguments.
exec = ["/bin/app"]
# Extra environment (PATH, HOME=/var and GRANARY_GRAIN are set already).
env = []
# Connection services it accepts ("http", "imap", "git", ...).
services = []
# Interfaces it offers other grains ("notify", "git.read", ...).
offers = []
# Of those, the ones an owner may grant to another user's grain too
# ("dav.calendar.read", ...); the rest stay within one user's grains.
shares = []
# Interfaces it may ask other grains for, once the owner grants them.
requests = []
# Run in the grain's sandbox before the app starts on data of another
# version; GRANARY_PREVIOUS_VERSION and GRANARY_APP_VERSION say which.
# migrate = ["/bin/app", "--migrate"]
# Stop the grain after this long idle (the host's default otherwise).
# idle_timeout_seconds = 120

[limits]
# memory_mib = 256
# pids = 64

[files]
# Programs copied to the same path, with their shared libraries and loader.
binaries = []
# Run-time files ldd cannot see: /bin/sh, NSS or gconv modules, helpers.
runtime = []
# Files placed elsewhere in the image.
# copy = [{ from = "target/release/app", to = "/bin/app" }]
"#;

impl Definition {
    pub fn parse(text: &str, path: &Path) -> Result<Definition, PackageError> {
        let err = |message: String| PackageError::Definition {
            path: path.display().to_string(),
            message,
        };
        let def: Definition = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        if def.format != FORMAT {
            return Err(err(format!(
                "format {} is not supported; this granary understands format {FORMAT}",
                def.format
            )));
        }
        // Checked the way the installed manifest will be.
        def.manifest("k0").map_err(|e| err(e.to_string()))?;
        Ok(def)
    }

    pub fn load(path: &Path) -> Result<Definition, PackageError> {
        let text = std::fs::read_to_string(path).map_err(crate::io(format!(
            "cannot read the package definition {}",
            path.display()
        )))?;
        Definition::parse(&text, path)
    }

    /// The manifest for a package signed as `app_id`.
    pub fn manifest(&self, app_id: &str) -> Result<Manifest, granary_model::ManifestError> {
        let a = &self.app;
        let m = Manifest {
            id: app_id.to_owned(),
            version: a.version.clone(),
            kind: a.kind.clone(),
            per_user: a.per_user,
            on_demand: a.on_demand,
            exec: a.exec.clone(),
            services: a.services.clone(),
            offers: a.offers.clone(),
            shares: a.shares.clone(),
            limits: self.limits.clone(),
            title: a.title.clone(),
            env: a.env.clone(),
            requests: a.requests.clone(),
            migrate: a.migrate.clone(),
            idle_timeout_seconds: a.idle_timeout_seconds,
            arches: Vec::new(),
        };
        Manifest::parse(&m.to_toml())
    }
}

/// A host path from the definition, relative to its directory.
pub(crate) fn host_path(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_needs_only_names_filled_in() {
        let text = DEFINITION_TEMPLATE
            .replace("\"KIND\"", "\"notes\"")
            .replace("TITLE", "Notes");
        let def = Definition::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(def.app.kind, "notes");
        let m = def.manifest("kabc").unwrap();
        assert_eq!(m.id, "kabc");
        assert_eq!(Manifest::parse(&m.to_toml()).unwrap(), m);
    }

    #[test]
    fn unknown_fields_and_formats_are_refused() {
        let good = DEFINITION_TEMPLATE
            .replace("\"KIND\"", "\"notes\"")
            .replace("TITLE", "Notes");
        for (text, expect) in [
            (
                good.replace("format = 1", "format = 2"),
                "format 2 is not supported",
            ),
            (
                good.replace("[limits]", "[limits]\nswap_mib = 1"),
                "unknown field",
            ),
            (format!("{good}\nsurprise = true"), "unknown field"),
            (
                good.replace("kind = \"notes\"", "kind = \"No\""),
                "grain kind",
            ),
        ] {
            let e = Definition::parse(&text, Path::new("d.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expect) && e.contains("d.toml"), "{expect}: {e}");
        }
    }
}
