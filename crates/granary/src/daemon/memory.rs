//! The daemon's heap: back near its resting size after a burst.
//!
//! glibc's malloc serves a block above its mmap threshold with its own
//! mapping, returned to the system on free, but it raises that threshold to
//! the size of the largest such block freed (up to 32 MiB). One argon2id
//! check allocates 19 MiB; after the first, every later one came from an
//! arena's heap instead, each busy thread used its own arena (up to eight
//! per CPU), and freed space inside those heaps is not returned. Fifty git
//! clones at once left the daemon at 273 MB from a start of 45 MB
//! (`cargo bench -p granary-e2e --bench fleet`). So:
//!
//! - the threshold is fixed at 256 KiB (which also stops it moving): big
//!   buffers are always their own mappings and go back when freed;
//! - after a burst of grain exits has ended, `malloc_trim` gives back the
//!   free pages left inside the arenas.
//!
//! Other allocators (FreeBSD's jemalloc, musl's) manage this themselves;
//! there these are no-ops.

#![allow(unsafe_code)] // mallopt and malloc_trim are libc calls; each block says why it is sound

use std::sync::Arc;
use std::time::Duration;

/// Sets the allocator up for a long-lived daemon; call before any thread
/// starts.
pub(super) fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; it is called
    // before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// How long without a grain exiting before memory is given back, and the
/// longest a steady trickle of exits can put that off.
const QUIET: Duration = Duration::from_secs(1);
const AT_MOST: Duration = Duration::from_secs(10);

/// Gives freed memory back after each burst of grain exits (idle stops
/// after a busy spell, mostly). Runs until the daemon stops.
pub(super) async fn trim_after_exits(exits: Arc<tokio::sync::Notify>) {
    loop {
        exits.notified().await;
        let deadline = tokio::time::Instant::now() + AT_MOST;
        while let Ok(()) = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + QUIET),
            exits.notified(),
        )
        .await
        {}
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let before = resident_kib();
        // SAFETY: malloc_trim takes malloc's own locks; any thread may call
        // it at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(
            before_kib = before,
            after_kib = resident_kib(),
            "gave freed memory back"
        );
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096) / 1024
}
