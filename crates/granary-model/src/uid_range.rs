//! The host uids grains run as: one range, set once in the config
//! (`jail.uid_range`), handed out one uid per grain.

use serde::{Deserialize, Serialize};

/// `start..start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    pub start: u32,
    pub count: u32,
}

/// Host uids Granary hands to grains, one each: far above the ranges
/// Debian's `adduser` and `/etc/subuid` allocate (100000 + 65536 per user).
pub const DEFAULT_UID_RANGE: UidRange = UidRange {
    start: 1_500_000_000,
    count: 1_000_000,
};

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.start && u64::from(uid) < u64::from(self.start) + u64::from(self.count)
    }

    fn overlaps(&self, start: u64, count: u64) -> bool {
        let (a0, a1) = (
            u64::from(self.start),
            u64::from(self.start) + u64::from(self.count),
        );
        start < a1 && a0 < start.saturating_add(count)
    }

    /// `1500000000+1000000`, as the config writes it (`jail.uid_range`).
    pub fn parse(text: &str) -> Result<UidRange, UidRangeError> {
        let bad = || {
            UidRangeError(format!(
                "{text:?} is not a uid range; write START+COUNT, e.g. \"{DEFAULT_UID_RANGE}\""
            ))
        };
        let (start, count) = text.split_once('+').ok_or_else(bad)?;
        let start: u32 = start.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 || u64::from(start) + u64::from(count) > u64::from(u32::MAX) {
            return Err(UidRangeError(format!(
                "{text:?} is empty or runs past the largest uid"
            )));
        }
        if start < 65_536 {
            return Err(UidRangeError(format!(
                "{text:?} starts below 65536, among ordinary users and system accounts; choose a range far above them"
            )));
        }
        Ok(UidRange { start, count })
    }

    /// Refuses a range that overlaps a user or group in `passwd`/`group`
    /// text or a subordinate range in `subuid`/`subgid` text: grains must
    /// never share a uid with anything else on the host.
    pub fn check_free(&self, passwd: &str, subordinate: &str) -> Result<(), UidRangeError> {
        if self.count == 0 || u64::from(self.start) + u64::from(self.count) > u64::from(u32::MAX) {
            return Err(UidRangeError(format!(
                "uid range {}+{} is empty or runs past the largest uid",
                self.start, self.count
            )));
        }
        for line in passwd.lines().filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split(':').collect();
            if let Some(Ok(id)) = fields.get(2).map(|f| f.parse::<u64>())
                && self.overlaps(id, 1)
            {
                return Err(UidRangeError(format!(
                    "uid range {}+{} contains id {id} of {:?} in /etc/passwd or /etc/group; choose another range",
                    self.start, self.count, fields[0]
                )));
            }
        }
        for line in subordinate.lines().filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split(':').collect();
            if let (Some(Ok(start)), Some(Ok(count))) = (
                fields.get(1).map(|f| f.parse::<u64>()),
                fields.get(2).map(|f| f.parse::<u64>()),
            ) && self.overlaps(start, count)
            {
                return Err(UidRangeError(format!(
                    "uid range {}+{} overlaps the subordinate range {start}+{count} of {:?} in /etc/subuid or /etc/subgid; choose another range",
                    self.start, self.count, fields[0]
                )));
            }
        }
        Ok(())
    }
}

/// Why a uid range is not usable; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UidRangeError(pub String);

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{}", self.start, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_config_writes() {
        assert_eq!(
            UidRange::parse("1500000000+1000000").unwrap(),
            DEFAULT_UID_RANGE
        );
        assert_eq!(DEFAULT_UID_RANGE.to_string(), "1500000000+1000000");
        for bad in ["", "1+", "100000", "100000+0", "1000+10", "4294967000+1000"] {
            assert!(UidRange::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn must_not_overlap_host_users_or_subordinate_ranges() {
        let range = UidRange {
            start: 100_000,
            count: 1000,
        };
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        range.check_free(passwd, "").unwrap();
        let err = range
            .check_free("odd:x:100500:1::/:/bin/false\n", "")
            .unwrap_err();
        assert!(err.to_string().contains("\"odd\""), "{err}");
        let err = range
            .check_free(passwd, "alice:100000:65536\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("subordinate range 100000+65536"),
            "{err}"
        );
        range.check_free(passwd, "alice:165536:65536\n").unwrap();
        assert!(
            UidRange {
                start: u32::MAX - 1,
                count: 10
            }
            .check_free("", "")
            .is_err()
        );
        assert!(range.contains(100_999) && !range.contains(101_000));
    }
}
