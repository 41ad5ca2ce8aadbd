//! The grain's room: how much of its dataset (`/var`, with its quota) is
//! free, and what a user is told when a push does not fit.

/// Free and total bytes of the grain's dataset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Space {
    pub(crate) free: u64,
    pub(crate) total: u64,
}

/// The dataset's room now (its quota, where the backend has one, shows as
/// its size).
pub(crate) fn space() -> Option<Space> {
    let s = nix::sys::statvfs::statvfs("/var").ok()?;
    let unit = s.fragment_size();
    Some(Space {
        free: s.blocks_available() * unit,
        total: s.blocks() * unit,
    })
}

/// What to tell the user when a push failed, if it failed for lack of room:
/// it wrote (about) as much as there was free when it began.
pub(crate) fn push_did_not_fit(before: Space, received: u64) -> Option<String> {
    // index-pack writes what it receives, plus an index; a push that failed
    // having received less than the free room failed for another reason.
    if received + (1 << 20) < before.free {
        return None;
    }
    let mib = |b: u64| b.div_ceil(1 << 20);
    Some(format!(
        "granary: this push did not fit: your git storage had {} MiB free of {} MiB. \
         Remove repositories or history you no longer need, or ask your admin for more room \
         (storage.quota_mib), then push again.",
        mib(before.free),
        mib(before.total)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_push_as_big_as_the_free_room_is_blamed_on_it() {
        let before = Space {
            free: 10 << 20,
            total: 300 << 20,
        };
        assert!(push_did_not_fit(before, 2 << 20).is_none());
        let said = push_did_not_fit(before, 10 << 20).unwrap();
        assert!(said.contains("10 MiB free of 300 MiB"), "{said}");
    }
}
