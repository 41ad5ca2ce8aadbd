//! The local CA's certificate follows the users: with a single-label
//! domain such as `localhost` it names each user's subdomain (clients do
//! not match `*.localhost`), so it is re-issued when users come and go. The
//! gateway picks the new files up by itself.

use std::path::PathBuf;
use std::sync::Arc;

use granary_state::Store;

/// Re-issues the certificate for the users there are now, when the local
/// CA issues it (`local_ca` is its directory); a failure is logged.
pub(crate) async fn refresh(store: &Arc<Store>, local_ca: Option<PathBuf>, domain: &str) {
    let Some(dir) = local_ca else {
        return;
    };
    let (store, domain) = (store.clone(), domain.to_owned());
    let owner = nix::unistd::geteuid().as_raw();
    let done = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let users: Vec<String> = store.list_users()?.into_iter().map(|u| u.name).collect();
        granary_gateway::tls::local_ca::ensure(&dir, &domain, &users, owner)?;
        Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot refresh the local CA's certificate")
        }
        Err(e) => tracing::warn!(error = %e, "cannot refresh the local CA's certificate"),
    }
}
