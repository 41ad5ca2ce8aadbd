//! The selected mailbox as one session sees it: message sequence numbers
//! to UIDs, and how far it has told its client about changes made by
//! other sessions and deliveries (a modseq). Several sessions on one
//! mailbox (a phone and a laptop) see each other through [`Selected::sync`].

use std::collections::HashSet;

use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

use crate::store::{Mailbox, Msg, flag_names};

pub struct Selected {
    pub mailbox: Mailbox,
    pub read_only: bool,
    /// UIDs in sequence order: sequence number n is `uids[n - 1]`.
    pub uids: Vec<u32>,
    /// The highest modseq this session has accounted for.
    pub modseq: u64,
    /// Changes this session made itself and already reported.
    pub own: HashSet<(u32, u64)>,
}

/// What a sync has to tell the client.
#[derive(Default)]
pub struct Updates {
    pub lines: Vec<u8>,
}

impl Selected {
    pub fn new(mailbox: Mailbox, read_only: bool, messages: &[Msg]) -> Selected {
        Selected {
            modseq: mailbox.highest_modseq,
            mailbox,
            read_only,
            uids: messages.iter().map(|m| m.uid).collect(),
            own: HashSet::new(),
        }
    }

    pub fn exists(&self) -> u32 {
        self.uids.len() as u32
    }

    /// The sequence number of `uid`, if this session shows it.
    pub fn seq_of(&self, uid: u32) -> Option<u32> {
        self.uids.binary_search(&uid).ok().map(|i| i as u32 + 1)
    }

    /// The UIDs a sequence set names: message numbers (`uid` false) or
    /// UIDs; `*` is the last. Numbers beyond the mailbox are left out.
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<u32> {
        let last = if uid {
            self.uids.last().copied().unwrap_or(0)
        } else {
            self.exists()
        };
        // Ranges merged first: `1:*,1:*,...` costs one pass over the
        // mailbox, not one per range.
        let mut out: Vec<u32> = Vec::new();
        for (a, b) in intervals(set, last) {
            if uid {
                let start = self.uids.partition_point(|&u| u < a);
                let end = self.uids.partition_point(|&u| u <= b);
                out.extend_from_slice(&self.uids[start..end]);
            } else {
                let (a, b) = (a.max(1) as usize, (b as usize).min(self.uids.len()));
                if a <= b {
                    out.extend_from_slice(&self.uids[a - 1..b]);
                }
            }
        }
        out
    }

    /// Removes `uid` from the view; its sequence number before.
    pub fn remove(&mut self, uid: u32) -> Option<u32> {
        let i = self.uids.binary_search(&uid).ok()?;
        self.uids.remove(i);
        Some(i as u32 + 1)
    }

    /// Brings the view up to date with `changed` messages and `expunged`
    /// UIDs since [`Selected::modseq`]: EXPUNGE (or VANISHED) responses,
    /// EXISTS for new messages, FETCH FLAGS for changed ones.
    pub fn apply(
        &mut self,
        highest: u64,
        changed: &[Msg],
        expunged: &[u32],
        qresync: bool,
        condstore: bool,
    ) -> Updates {
        let mut out = Vec::new();
        let gone: Vec<u32> = expunged
            .iter()
            .copied()
            .filter(|u| self.seq_of(*u).is_some())
            .collect();
        if qresync && !gone.is_empty() {
            out.extend_from_slice(format!("* VANISHED {}\r\n", uid_set(&gone)).as_bytes());
            for u in &gone {
                self.remove(*u);
            }
        } else {
            for u in &gone {
                if let Some(seq) = self.remove(*u) {
                    out.extend_from_slice(format!("* {seq} EXPUNGE\r\n").as_bytes());
                }
            }
        }
        let last = self.uids.last().copied().unwrap_or(0);
        let mut added = false;
        let mut flag_lines = Vec::new();
        for m in changed {
            if m.uid > last {
                self.uids.push(m.uid);
                added = true;
            } else if let Some(seq) = self.seq_of(m.uid) {
                if self.own.remove(&(m.uid, m.modseq)) {
                    continue;
                }
                flag_lines.push(fetch_flags(seq, m, condstore));
            }
        }
        if added {
            out.extend_from_slice(format!("* {} EXISTS\r\n", self.exists()).as_bytes());
        }
        for l in flag_lines {
            out.extend_from_slice(&l);
        }
        self.modseq = self.modseq.max(highest);
        self.own.retain(|(_, m)| *m > self.modseq);
        Updates { lines: out }
    }
}

/// `* n FETCH (UID u FLAGS (...) [MODSEQ (m)])`.
pub fn fetch_flags(seq: u32, m: &Msg, condstore: bool) -> Vec<u8> {
    let mut l = format!(
        "* {seq} FETCH (UID {} FLAGS ({})",
        m.uid,
        flag_names(m.flags, &m.keywords).join(" ")
    );
    if condstore {
        l.push_str(&format!(" MODSEQ ({})", m.modseq));
    }
    l.push_str(")\r\n");
    l.into_bytes()
}

/// `1:3,7,9:10` for sorted UIDs.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Whether `n` is in `set`, `*` being `star`.
pub fn contains(set: &SequenceSet, n: u32, star: u32) -> bool {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => star,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(x) => v(x) == n,
        Sequence::Range(x, y) => (v(x).min(v(y))..=v(x).max(v(y))).contains(&n),
    })
}

/// A sequence set as sorted, disjoint, inclusive intervals, `*` being
/// `star`.
pub fn intervals(set: &SequenceSet, star: u32) -> Vec<(u32, u32)> {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => star,
    };
    let mut all: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|s| match s {
            Sequence::Single(x) => (v(x), v(x)),
            Sequence::Range(x, y) => (v(x).min(v(y)), v(x).max(v(y))),
        })
        .collect();
    all.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Whether `n` is in `intervals` (from [`intervals`]).
pub fn in_intervals(intervals: &[(u32, u32)], n: u32) -> bool {
    let i = intervals.partition_point(|&(a, _)| a <= n);
    i > 0 && intervals[i - 1].1 >= n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(uid: u32, modseq: u64) -> Msg {
        Msg {
            uid,
            blob: 1,
            modseq,
            flags: 1,
            keywords: String::new(),
            internaldate: 0,
            size: 1,
        }
    }

    fn mailbox() -> Mailbox {
        Mailbox {
            id: 1,
            name: "INBOX".into(),
            special_use: String::new(),
            uidvalidity: 7,
            uidnext: 10,
            highest_modseq: 5,
            subscribed: true,
        }
    }

    #[test]
    fn sequence_sets_are_merged_before_use() {
        use imap_codec::imap_types::sequence::SequenceSet;
        let set = SequenceSet::try_from("5:3,1,2,9:*,10,4").unwrap();
        assert_eq!(intervals(&set, 12), vec![(1, 5), (9, 12)]);
        assert!(in_intervals(&[(1, 5), (9, 12)], 9));
        assert!(!in_intervals(&[(1, 5), (9, 12)], 6));
        assert!(!in_intervals(&[], 1));
        let sel = Selected::new(
            mailbox(),
            false,
            &(1..=50).map(|u| msg(u, 1)).collect::<Vec<_>>(),
        );
        let many = std::iter::repeat_n("1:*", 2000)
            .collect::<Vec<_>>()
            .join(",");
        let set = SequenceSet::try_from(many.as_str()).unwrap();
        assert_eq!(sel.resolve(&set, true).len(), 50);
        assert_eq!(sel.resolve(&set, false).len(), 50);
    }

    #[test]
    fn other_sessions_changes_arrive_in_order() {
        let mut s = Selected::new(mailbox(), false, &[msg(2, 1), msg(4, 2), msg(6, 3)]);
        let u = s.apply(9, &[msg(4, 7), msg(8, 8)], &[2], false, true);
        assert_eq!(
            String::from_utf8(u.lines).unwrap(),
            "* 1 EXPUNGE\r\n* 3 EXISTS\r\n* 1 FETCH (UID 4 FLAGS (\\Seen) MODSEQ (7))\r\n"
        );
        assert_eq!(s.uids, [4, 6, 8]);
        assert_eq!(s.modseq, 9);
        let u = s.apply(10, &[], &[6, 8], true, false);
        assert_eq!(String::from_utf8(u.lines).unwrap(), "* VANISHED 6,8\r\n");
    }

    #[test]
    fn sets_resolve_against_the_view() {
        let s = Selected::new(mailbox(), false, &[msg(2, 1), msg(4, 2), msg(6, 3)]);
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        assert_eq!(s.resolve(&set("2:*"), false), [4, 6]);
        assert_eq!(s.resolve(&set("*:2"), false), [4, 6]);
        assert_eq!(s.resolve(&set("3:5"), true), [4]);
        // RFC 3501 §6.4.8: n:* always takes in the last UID.
        assert_eq!(s.resolve(&set("7:*"), true), [6]);
        assert_eq!(s.resolve(&set("5"), false), [] as [u32; 0]);
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
    }
}
