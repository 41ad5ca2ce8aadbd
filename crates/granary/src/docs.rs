//! Man pages and shell completions, generated from the same clap definition
//! that parses the command line, so they cannot disagree with it.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use crate::cli::Cli;

pub(crate) fn completions(shell: clap_complete::Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "granary", &mut std::io::stdout());
}

/// Writes `granary.1` and one page per subcommand (`granary-user-add.1`, ...).
pub(crate) fn man_pages(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    clap_mangen::generate_to(Cli::command(), out)
        .with_context(|| format!("cannot write man pages into {}", out.display()))?;
    Ok(())
}
