//! How this grain runs git: where repositories live, the configuration
//! every git gets, and the small commands the grain runs itself.

pub(crate) const REPOS: &str = "/var/repos";
pub(crate) const BACKEND: &str = "/usr/lib/git-core/git-http-backend";
const GIT: &str = "/usr/bin/git";

/// A ref as `git rev-parse` may take it: no options, no revision syntax
/// beyond `^{commit}` that we add.
pub(crate) fn valid_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 200
        && !r.starts_with('-')
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        && !r.contains("..")
}

/// Configuration every git this grain runs gets (as `GIT_CONFIG_*`, which
/// git treats as command-line configuration).
///
/// The memory settings keep git within the grain's memory limit however
/// big the files: blobs over `core.bigFileThreshold` are streamed rather
/// than held whole (when unpacked, hashed, packed and sent) and never
/// delta-compressed; pushes are kept as the packs they arrived in
/// (`receive.unpackLimit`), so a clone copies their compressed data as is;
/// the delta search, its cache and the mapped pack windows are bounded,
/// with one thread.
const GIT_CONFIG: &[(&str, &str)] = &[
    ("safe.directory", "*"),
    ("core.bigFileThreshold", "16m"),
    ("core.packedGitWindowSize", "16m"),
    ("core.packedGitLimit", "64m"),
    ("core.deltaBaseCacheLimit", "16m"),
    ("pack.windowMemory", "32m"),
    ("pack.deltaCacheSize", "16m"),
    ("pack.threads", "1"),
    ("receive.unpackLimit", "1"),
    ("transfer.unpackLimit", "1"),
];

/// Sets [`GIT_CONFIG`] and `extra` on `cmd`.
pub(crate) fn configure(cmd: &mut tokio::process::Command, extra: &[(&str, &str)]) {
    let all: Vec<&(&str, &str)> = GIT_CONFIG.iter().chain(extra).collect();
    cmd.env("GIT_CONFIG_COUNT", all.len().to_string());
    for (i, (key, value)) in all.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), key)
            .env(format!("GIT_CONFIG_VALUE_{i}"), value);
    }
}

pub(crate) fn git_command(dir: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(GIT);
    cmd.arg("-C")
        .arg(dir)
        .env_clear()
        .env("HOME", "/tmp")
        .env("PATH", "/usr/bin:/bin");
    configure(&mut cmd, &[]);
    cmd
}

pub(crate) async fn git_out(dir: &str, args: &[&str]) -> Result<Vec<u8>, capnp::Error> {
    let out = git_command(dir)
        .args(args)
        .output()
        .await
        .map_err(|e| capnp::Error::failed(format!("git: {e}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(capnp::Error::failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// The grain's owner, from the id the host gave it (`<owner>-git`).
pub(crate) fn owner() -> String {
    std::env::var("GRANARY_GRAIN")
        .ok()
        .and_then(|id| id.rsplit_once('-').map(|(owner, _)| owner.to_owned()))
        .unwrap_or_default()
}

/// Makes the bare repository `dir` unless it exists; whether it made it.
pub(crate) async fn create_repo(dir: &str) -> Result<bool, String> {
    if std::path::Path::new(dir).exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(REPOS).map_err(|e| format!("{REPOS}: {e}"))?;
    git_out(
        REPOS,
        &["init", "--bare", "--quiet", "--initial-branch=main", dir],
    )
    .await
    .map_err(|e| e.extra)?;
    Ok(true)
}
