//! How much a grain's dataset uses, for the web home: the storage's own
//! account where it keeps one (ZFS: used and refquota), else the files
//! measured (cached for a while: walking a tree is slow).

use granary_datasets::Space;

use super::{Ctx, blocking, state_failure};

/// How long a dataset's measured size is shown before it is measured again.
const USAGE_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// Bytes under `dir` (blocks actually used), counting at most 1,000,000
/// entries; what a dataset uses where the storage has no figure for it.
fn tree_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let (mut total, mut seen, mut stack) = (0u64, 0u32, vec![dir.to_path_buf()]);
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > 1_000_000 {
                return total;
            }
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// A grain's (used bytes, quota, last backup) for its owner's page.
pub(super) async fn grain(
    ctx: &Ctx,
    grain: &str,
    space: Option<Space>,
) -> Result<(u64, Option<u64>, i64), capnp::Error> {
    let cached = match space {
        Some(s) => Some(s.used),
        None => ctx
            .usage
            .borrow()
            .get(grain)
            .filter(|(at, _)| at.elapsed() < USAGE_FOR)
            .map(|(_, b)| *b),
    };
    let (store, datasets, gid) = (ctx.store.clone(), ctx.datasets.clone(), grain.to_owned());
    let (used, backup) = blocking(move || {
        let used = match cached {
            Some(b) => b,
            None => tree_bytes(&datasets.path(&gid)),
        };
        let backup = store.last_backup(&gid).map_err(state_failure)?;
        Ok((used, backup.unwrap_or(0)))
    })
    .await?;
    if cached.is_none() {
        ctx.usage
            .borrow_mut()
            .insert(grain.to_owned(), (std::time::Instant::now(), used));
    }
    Ok((used, space.and_then(|s| s.quota), backup))
}
