//! Which automatic snapshots to keep: a retention grid ("every 15 minutes
//! keep 4, hourly keep 48, daily keep 30, monthly keep 6").
//!
//! Each rule keeps the newest snapshot in each of its `keep` most recent
//! periods that have one; a snapshot stays if any rule keeps it. Periods
//! are aligned to the Unix epoch, and a "month" is 30 days, so the periods
//! nest (15 min | 1 h | 1 day | 30 days): the newest snapshot of a bigger
//! period is the newest of one of its smaller ones. That makes pruning
//! after every snapshot give exactly what pruning the whole history once
//! would (the property the tests check). Manual snapshots are never
//! pruned.

use std::collections::{BTreeSet, HashSet};

use crate::Snapshot;

/// The prefix of snapshots the scheduler takes (and may prune).
pub const AUTO_PREFIX: &str = "auto-";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// (period in seconds, how many periods to keep).
    pub rules: Vec<(i64, usize)>,
}

impl Default for Grid {
    fn default() -> Grid {
        Grid {
            rules: vec![(900, 4), (3600, 48), (86_400, 30), (30 * 86_400, 6)],
        }
    }
}

impl Grid {
    /// The automatic snapshots to delete from `snapshots`.
    pub fn prune(&self, snapshots: &[Snapshot]) -> Vec<String> {
        let mut auto: Vec<&Snapshot> = snapshots
            .iter()
            .filter(|s| s.name.starts_with(AUTO_PREFIX))
            .collect();
        // Newest first; ties broken by name so the choice is stable.
        auto.sort_by(|a, b| (b.created, &b.name).cmp(&(a.created, &a.name)));
        let mut keep: HashSet<&str> = HashSet::new();
        for &(period, count) in &self.rules {
            if period <= 0 {
                continue;
            }
            let mut buckets = BTreeSet::new();
            for s in &auto {
                let bucket = s.created.div_euclid(period);
                if buckets.contains(&bucket) {
                    continue;
                }
                if buckets.len() == count {
                    break;
                }
                buckets.insert(bucket);
                keep.insert(&s.name);
            }
        }
        auto.iter()
            .filter(|s| !keep.contains(s.name.as_str()))
            .map(|s| s.name.clone())
            .collect()
    }

    /// The most snapshots the grid ever keeps.
    pub fn capacity(&self) -> usize {
        self.rules.iter().map(|(_, k)| k).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(t: i64) -> Snapshot {
        Snapshot {
            name: format!("auto-{t}"),
            created: t,
        }
    }

    #[test]
    fn keeps_the_newest_of_each_recent_period() {
        let grid = Grid {
            rules: vec![(10, 2), (100, 2)],
        };
        let all: Vec<Snapshot> = [1, 5, 12, 18, 25, 105, 150, 207].map(snap).to_vec();
        let mut deleted = grid.prune(&all);
        deleted.sort();
        // Tens: 207 (bucket 20), 150 (15). Hundreds: 207 (2), 150 (1).
        assert_eq!(
            deleted,
            [
                "auto-1", "auto-105", "auto-12", "auto-18", "auto-25", "auto-5"
            ]
        );
        // Manual snapshots are never pruned.
        let mut with_manual = all.clone();
        with_manual.push(Snapshot {
            name: "manual-3".to_owned(),
            created: 3,
        });
        assert!(!grid.prune(&with_manual).contains(&"manual-3".to_owned()));
    }

    /// Simulated months of snapshots every 15 minutes (with random gaps),
    /// pruned after each one: the result is always exactly what the grid
    /// says for the whole history, never above its capacity, and always
    /// holds the newest snapshot.
    #[test]
    fn pruning_as_you_go_equals_pruning_the_whole_history() {
        let grid = Grid::default();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut history: Vec<Snapshot> = Vec::new();
        let mut kept: Vec<Snapshot> = Vec::new();
        let start = 1_700_000_000i64;
        for step in 0..(200 * 96) {
            let t = start + step * 900 + (rand() % 60) as i64;
            if rand() % 10 == 0 {
                continue; // the host was off
            }
            let s = snap(t);
            history.push(s.clone());
            kept.push(s);
            let delete = grid.prune(&kept);
            kept.retain(|k| !delete.contains(&k.name));
            assert!(kept.len() <= grid.capacity());
            assert_eq!(kept.last().map(|k| k.created), Some(t), "newest kept");
            if step % 2000 == 0 {
                let once = grid.prune(&history);
                let mut expected: Vec<i64> = history
                    .iter()
                    .filter(|h| !once.contains(&h.name))
                    .map(|h| h.created)
                    .collect();
                let mut got: Vec<i64> = kept.iter().map(|k| k.created).collect();
                expected.sort();
                got.sort();
                assert_eq!(got, expected, "at step {step}");
                assert!(grid.prune(&kept).is_empty(), "idempotent");
            }
        }
        // After 200 days: 4 + 48 + 30 + 6 = 88 at most, and the monthly
        // rule reaches back five whole 30-day periods and more.
        assert!(kept.len() > 70, "{}", kept.len());
        let oldest = kept.iter().map(|k| k.created).min().unwrap();
        assert!(start + 200 * 86_400 - oldest > 120 * 86_400);
    }
}
