//! The daemon's log output: tracing events as text or JSON on stderr.

use std::io::IsTerminal;
use std::str::FromStr;

use anyhow::anyhow;
use granary_config::{Config, ConfigError, LogFormat};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Parses `log.level` (or `GRANARY_LOG`), reporting errors against the key.
pub(crate) fn check_filter(config: &Config) -> anyhow::Result<Targets> {
    Targets::from_str(&config.log_level).map_err(|e| {
        anyhow!(ConfigError {
            file: config.file.clone(),
            key: Some("log.level".to_owned()),
            reason: format!("{:?} is not a log filter: {e}", config.log_level),
        })
    })
}

pub(crate) fn install(config: &Config) -> anyhow::Result<()> {
    let filter = check_filter(config)?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
    .map_err(|e| anyhow!("cannot install the logger: {e}"))
}
