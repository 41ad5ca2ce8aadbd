//! Reading receive-pack's report-status as it streams past: whether
//! unpacking the pushed objects succeeded (`unpack ok`), which its exit
//! status does not say (it exits 0 either way).

/// The report as far as seen, fed the answer's bytes in any pieces.
#[derive(Debug, Default)]
pub(crate) struct ReportWatch {
    /// Bytes of a packet not yet whole.
    partial: Vec<u8>,
    /// Whether the answer is multiplexed (side-band): known at its first
    /// packet.
    sideband: Option<bool>,
    /// The report's own packets: band 1's bytes when multiplexed.
    report: Vec<u8>,
    /// Something that is not a pkt-line was seen: stop watching.
    lost: bool,
    /// Still in the ref advertisement (which ends at its flush) that a
    /// stateful (SSH) receive-pack sends before the report.
    advertising: bool,
}

/// How much of the report is kept: its first line is all that is read.
const KEEP: usize = 4096;

impl ReportWatch {
    /// For a stateful receive-pack (SSH): its output starts with the ref
    /// advertisement, and the report follows it.
    pub(crate) fn after_advertisement() -> ReportWatch {
        ReportWatch {
            advertising: true,
            ..ReportWatch::default()
        }
    }

    /// Whether the answer is multiplexed, once known.
    pub(crate) fn sideband(&self) -> Option<bool> {
        self.sideband
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            // Whole packets straight from `bytes` when nothing is pending.
            let need = if self.partial.len() < 4 {
                4 - self.partial.len()
            } else {
                match packet_len(&self.partial[..4]) {
                    Some(0) => 0,
                    Some(n) if n >= 4 => n - self.partial.len(),
                    _ => {
                        self.lost = true;
                        return;
                    }
                }
            };
            let take = need.min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < 4 {
                continue;
            }
            match packet_len(&self.partial[..4]) {
                Some(0) => {
                    self.partial.clear();
                    self.advertising = false;
                }
                Some(n) if n > 4 && self.partial.len() == n => {
                    let packet = std::mem::take(&mut self.partial);
                    self.packet(&packet);
                }
                Some(n) if n > 4 => {}
                _ => self.lost = true,
            }
        }
    }

    fn packet(&mut self, packet: &[u8]) {
        if self.advertising {
            return;
        }
        let payload = &packet[4..];
        let multiplexed = *self.sideband.get_or_insert(matches!(payload[0], 1..=3));
        if self.report.len() >= KEEP {
            return;
        }
        if multiplexed {
            if payload[0] == 1 {
                self.report.extend_from_slice(&payload[1..]);
            }
        } else {
            self.report.extend_from_slice(packet);
        }
    }

    /// `Some(true)` for `unpack ok`, `Some(false)` for `unpack <error>`,
    /// `None` when the report did not say (yet).
    pub(crate) fn unpacked(&self) -> Option<bool> {
        let len = packet_len(self.report.get(..4)?)?;
        let line = self.report.get(4..len)?;
        let result = line.strip_prefix(b"unpack ")?;
        Some(result.strip_suffix(b"\n").unwrap_or(result) == b"ok")
    }
}

fn packet_len(head: &[u8]) -> Option<usize> {
    usize::from_str_radix(std::str::from_utf8(head).ok()?, 16).ok()
}

#[cfg(test)]
pub(crate) fn pkt(payload: &[u8]) -> Vec<u8> {
    let mut p = format!("{:04x}", payload.len() + 4).into_bytes();
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(answer: &[u8], piece: usize) -> ReportWatch {
        let mut w = ReportWatch::default();
        for chunk in answer.chunks(piece) {
            w.feed(chunk);
        }
        w
    }

    #[test]
    fn the_unpack_result_is_read_in_any_pieces() {
        let failed = [
            pkt(b"unpack index-pack abnormal exit\n"),
            pkt(b"ng refs/heads/main unpacker error\n"),
            b"0000".to_vec(),
        ]
        .concat();
        let ok = [pkt(b"unpack ok\n"), b"0000".to_vec()].concat();
        for piece in [1, 3, 7, 1000] {
            // Multiplexed: progress on band 2, the report on band 1.
            let answer = [
                pkt(b"\x02Resolving deltas\n"),
                pkt(&[&[1u8][..], &failed].concat()),
                b"0000".to_vec(),
            ]
            .concat();
            let w = watched(&answer, piece);
            assert_eq!(
                (w.unpacked(), w.sideband()),
                (Some(false), Some(true)),
                "{piece}"
            );
            let w = watched(
                &[pkt(&[&[1u8][..], &ok].concat()), b"0000".to_vec()].concat(),
                piece,
            );
            assert_eq!(w.unpacked(), Some(true));
            // Plain.
            let w = watched(&ok, piece);
            assert_eq!((w.unpacked(), w.sideband()), (Some(true), Some(false)));
        }
        assert_eq!(watched(b"not a packet", 4).unpacked(), None);
        // Over SSH the ref advertisement comes first.
        let advertised = [
            pkt(b"0000000000000000000000000000000000000000 capabilities^{}\0report-status side-band-64k\n"),
            b"0000".to_vec(),
            pkt(&[&[1u8][..], &[pkt(b"unpack ok\n"), b"0000".to_vec()].concat()].concat()),
            b"0000".to_vec(),
        ]
        .concat();
        let mut w = ReportWatch::after_advertisement();
        w.feed(&advertised);
        assert_eq!((w.unpacked(), w.sideband()), (Some(true), Some(true)));
    }
}
