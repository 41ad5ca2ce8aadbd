//! Mailbox commands: SELECT and EXAMINE (with CONDSTORE and QRESYNC),
//! LIST and LSUB (with LIST-EXTENDED, LIST-STATUS, SPECIAL-USE), STATUS,
//! APPEND.

use imap_codec::imap_types::command::SelectParameter;
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::flag::Flag;
use imap_codec::imap_types::status::StatusDataItemName;

use super::MAX_APPEND;
use super::args::Arg;
use super::selected::{Selected, fetch_flags, in_intervals, intervals, uid_set};
use super::session::{Session, blocking, no};
use super::text;
use crate::store::{Mailbox, Status, StoreError, flag_names, system_flag};

/// The flags every mailbox offers, and keywords clients commonly set.
const FLAGS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft $Forwarded $Junk $NotJunk";

/// The longest LIST pattern matched (mailbox names are far shorter).
const MAX_PATTERN: usize = 1024;

/// `*` matches anything, `%` anything but the delimiter. One pass per
/// pattern byte over the name (no backtracking: `****x` costs what `*x`
/// does).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    if pattern.len() > MAX_PATTERN {
        return false;
    }
    // reach[j]: the pattern so far matches name[..j].
    let mut reach = vec![false; name.len() + 1];
    reach[0] = true;
    let mut next = vec![false; name.len() + 1];
    for &p in pattern {
        match p {
            b'*' | b'%' => {
                let mut any = false;
                for j in 0..=name.len() {
                    if p == b'%' && j > 0 && name[j - 1] == b'/' {
                        any = false;
                    }
                    any |= reach[j];
                    next[j] = any;
                }
            }
            c => {
                next[0] = false;
                for j in 1..=name.len() {
                    next[j] = reach[j - 1] && name[j - 1] == c;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.iter().any(|&r| r) {
            return false;
        }
    }
    reach[name.len()]
}

fn matches(pattern: &str, name: &str) -> bool {
    // INBOX is case-insensitive wherever it appears first.
    let fold = |s: &str| -> String {
        match s.get(..5) {
            Some(head) if head.eq_ignore_ascii_case("INBOX") => format!("INBOX{}", &s[5..]),
            _ => s.to_owned(),
        }
    };
    glob(fold(pattern).as_bytes(), fold(name).as_bytes())
}

impl Session {
    pub(super) async fn select(
        &mut self,
        tag: &str,
        name: &str,
        read_only: bool,
        params: &[SelectParameter],
    ) {
        // QRESYNC (RFC 7162) and IMAP4rev2 (RFC 9051) both want [CLOSED].
        if self.selected.take().is_some() && (self.enabled.qresync || self.enabled.rev2) {
            self.line("* OK [CLOSED] Previous mailbox closed\r\n");
        }
        let mut qresync = None;
        for p in params {
            match p {
                SelectParameter::CondStore => self.enabled.condstore = true,
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => {
                    if !self.enabled.qresync {
                        self.line(&format!(
                            "{tag} BAD QRESYNC is not enabled (ENABLE QRESYNC)\r\n"
                        ));
                        return;
                    }
                    qresync = Some((
                        uid_validity.get(),
                        mod_sequence_value.get(),
                        known_uids.clone(),
                    ));
                }
            }
        }
        let name = name.to_owned();
        // Everything the client is told comes from the one list of
        // messages, so a delivery or expunge between the reads cannot put
        // its sequence numbers out of step. The mailbox row is read first:
        // its HIGHESTMODSEQ may be older than the list (harmless: the
        // client asks for a little more next time), and UIDNEXT is raised
        // past the list's last UID.
        let loaded = blocking(&self.store, move |s| {
            let mb = s.mailbox(&name)?;
            let messages = s.messages(mb.id)?;
            Ok((mb, messages))
        })
        .await;
        let (mut mb, messages) = match loaded {
            Ok(l) => l,
            Err(e) => {
                self.line(&no(tag, &e));
                return;
            }
        };
        if let Some(last) = messages.last() {
            mb.uidnext = mb.uidnext.max(last.uid.saturating_add(1));
        }
        let unseen = messages
            .iter()
            .position(|m| m.flags & crate::store::SEEN == 0)
            .map(|i| i + 1);
        let sel = Selected::new(mb.clone(), read_only, &messages);
        self.line(&format!("* FLAGS ({FLAGS})\r\n"));
        if read_only {
            self.line("* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n");
        } else {
            self.line(&format!(
                "* OK [PERMANENTFLAGS ({FLAGS} \\*)] Flags permitted\r\n"
            ));
        }
        self.line(&format!("* {} EXISTS\r\n", messages.len()));
        if !self.enabled.rev2 {
            self.line("* 0 RECENT\r\n");
            if let Some(seq) = unseen {
                self.line(&format!("* OK [UNSEEN {seq}] First unseen\r\n"));
            }
        }
        self.line(&format!(
            "* OK [UIDVALIDITY {}] UIDs valid\r\n",
            mb.uidvalidity
        ));
        self.line(&format!(
            "* OK [UIDNEXT {}] Predicted next UID\r\n",
            mb.uidnext
        ));
        self.line(&format!(
            "* OK [HIGHESTMODSEQ {}] Highest\r\n",
            mb.highest_modseq
        ));
        if let Some((validity, since, known)) = qresync
            && validity == mb.uidvalidity
        {
            let id = mb.id;
            if let Ok((_, changed, expunged)) =
                blocking(&self.store, move |s| s.changes_since(id, since)).await
            {
                let last = mb.uidnext.saturating_sub(1);
                let known: Option<Vec<(u32, u32)>> = known.map(|k| intervals(&k, last));
                let vanished: Vec<u32> = expunged
                    .into_iter()
                    // Expunged after the list was read: the client is
                    // told on its next command, as for any expunge.
                    .filter(|u| sel.seq_of(*u).is_none())
                    .filter(|u| known.as_ref().is_none_or(|k| in_intervals(k, *u)))
                    .collect();
                if !vanished.is_empty() {
                    self.line(&format!("* VANISHED (EARLIER) {}\r\n", uid_set(&vanished)));
                }
                for m in &changed {
                    if let Some(seq) = sel.seq_of(m.uid) {
                        let l = fetch_flags(seq, m, true);
                        self.out.extend_from_slice(&l);
                    }
                }
            }
        }
        self.selected = Some(sel);
        let mode = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        let verb = if read_only { "EXAMINE" } else { "SELECT" };
        self.line(&format!("{tag} OK [{mode}] {verb} completed\r\n"));
    }

    fn status_items(&self, status: &Status, items: &[String]) -> String {
        let mut out = Vec::new();
        for i in items {
            let v = match i.as_str() {
                "MESSAGES" => status.messages as u64,
                "RECENT" => 0,
                "UIDNEXT" => status.uidnext as u64,
                "UIDVALIDITY" => status.uidvalidity as u64,
                "UNSEEN" => status.unseen as u64,
                "DELETED" => status.deleted as u64,
                "SIZE" => status.size,
                "HIGHESTMODSEQ" => status.highest_modseq,
                _ => continue,
            };
            out.push(format!("{i} {v}"));
        }
        out.join(" ")
    }

    fn status_line(&mut self, name: &str, status: &Status, items: &[String]) {
        let mut b = b"* STATUS ".to_vec();
        text::mailbox(&mut b, name, self.enabled.utf8);
        self.out.extend_from_slice(&b);
        let items = self.status_items(status, items);
        self.line(&format!(" ({items})\r\n"));
    }

    pub(super) async fn status(&mut self, tag: &str, name: &str, items: &[StatusDataItemName]) {
        let items: Vec<String> = items
            .iter()
            .map(|i| {
                match i {
                    StatusDataItemName::Messages => "MESSAGES",
                    StatusDataItemName::Recent => "RECENT",
                    StatusDataItemName::UidNext => "UIDNEXT",
                    StatusDataItemName::UidValidity => "UIDVALIDITY",
                    StatusDataItemName::Unseen => "UNSEEN",
                    StatusDataItemName::Deleted => "DELETED",
                    StatusDataItemName::DeletedStorage => "DELETED-STORAGE",
                    StatusDataItemName::Size => "SIZE",
                    StatusDataItemName::HighestModSeq => "HIGHESTMODSEQ",
                }
                .to_owned()
            })
            .collect();
        let n = name.to_owned();
        match blocking(&self.store, move |s| {
            let mb = s.mailbox(&n)?;
            s.status(mb.id)
        })
        .await
        {
            Ok(st) => {
                self.status_line(name, &st, &items);
                self.ok(tag, "STATUS completed");
            }
            Err(e) => self.line(&no(tag, &e)),
        }
    }

    /// LIST and LSUB, basic or extended.
    pub(super) async fn list(&mut self, tag: &str, lsub: bool, args: &[Arg]) {
        let mut i = 0;
        let mut only_subscribed = lsub;
        let mut only_special = false;
        if args.len() >= 3 && matches!(args[0], Arg::List(_)) {
            if let Arg::List(opts) = &args[0] {
                for o in opts {
                    if o.is_atom("SUBSCRIBED") {
                        only_subscribed = true;
                    } else if o.is_atom("SPECIAL-USE") {
                        only_special = true;
                    }
                }
            }
            i = 1;
        }
        let (Some(reference), Some(patterns)) = (args.get(i), args.get(i + 1)) else {
            self.line(&format!(
                "{tag} BAD LIST needs a reference and a mailbox pattern\r\n"
            ));
            return;
        };
        let reference = self.name_from(reference.bytes().unwrap_or(b""));
        let patterns: Vec<String> = match patterns {
            Arg::List(l) => l
                .iter()
                .filter_map(|p| p.bytes())
                .map(|p| self.name_from(p))
                .collect(),
            p => vec![self.name_from(p.bytes().unwrap_or(b""))],
        };
        let mut want_status: Option<Vec<String>> = None;
        let mut show_subscribed = only_subscribed;
        if let (Some(r), Some(Arg::List(opts))) = (args.get(i + 2), args.get(i + 3))
            && r.is_atom("RETURN")
        {
            let mut k = 0;
            while k < opts.len() {
                if opts[k].is_atom("SUBSCRIBED") {
                    show_subscribed = true;
                } else if opts[k].is_atom("STATUS")
                    && let Some(Arg::List(items)) = opts.get(k + 1)
                {
                    want_status = Some(
                        items
                            .iter()
                            .filter_map(|x| x.bytes())
                            .map(|x| String::from_utf8_lossy(x).to_ascii_uppercase())
                            .collect(),
                    );
                    k += 1;
                }
                k += 1;
            }
        }
        if patterns.len() == 1 && patterns[0].is_empty() {
            let word = if lsub { "LSUB" } else { "LIST" };
            self.line(&format!("* {word} (\\Noselect) \"/\" \"\"\r\n"));
            self.ok(tag, &format!("{word} completed"));
            return;
        }
        let boxes = match blocking(&self.store, |s| s.mailboxes()).await {
            Ok(b) => b,
            Err(e) => {
                self.line(&no(tag, &e));
                return;
            }
        };
        let statuses = match &want_status {
            Some(_) => {
                let ids: Vec<i64> = boxes.iter().map(|b| b.id).collect();
                blocking(&self.store, move |s| {
                    ids.iter()
                        .map(|id| s.status(*id))
                        .collect::<Result<Vec<_>, StoreError>>()
                })
                .await
                .ok()
            }
            None => None,
        };
        let word = if lsub { "LSUB" } else { "LIST" };
        for (idx, mb) in boxes.iter().enumerate() {
            let full_patterns: Vec<String> =
                patterns.iter().map(|p| format!("{reference}{p}")).collect();
            if !full_patterns.iter().any(|p| matches(p, &mb.name)) {
                continue;
            }
            if (only_subscribed && !mb.subscribed) || (only_special && mb.special_use.is_empty()) {
                continue;
            }
            let attrs = attributes(mb, &boxes, show_subscribed && !lsub);
            let mut b = format!("* {word} ({attrs}) \"/\" ").into_bytes();
            text::mailbox(&mut b, &mb.name, self.enabled.utf8);
            b.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(&b);
            if let (Some(items), Some(st)) =
                (&want_status, statuses.as_ref().and_then(|s| s.get(idx)))
            {
                let st = st.clone();
                self.status_line(&mb.name, &st, items);
            }
        }
        self.ok(tag, &format!("{word} completed"));
    }

    pub(super) async fn append(
        &mut self,
        tag: &str,
        name: &str,
        flags: &[Flag<'_>],
        date: Option<&DateTime>,
        message: LiteralOrLiteral8<'_>,
    ) {
        let data: Vec<u8> = match message {
            LiteralOrLiteral8::Literal(l) => l.data().to_vec(),
            LiteralOrLiteral8::Literal8(l) => l.data.to_vec(),
        };
        if data.len() as u64 > MAX_APPEND {
            self.line(&format!(
                "{tag} NO [TOOBIG] Messages are limited to {MAX_APPEND} bytes\r\n"
            ));
            return;
        }
        let (bits, keywords) = flag_bits(flags);
        let when = date.map(|d| d.as_ref().timestamp());
        let n = name.to_owned();
        match blocking(&self.store, move |s| {
            s.append(&n, bits, &keywords, when, &data)
        })
        .await
        {
            Ok((validity, uid)) => {
                self.sync(true).await;
                self.line(&format!(
                    "{tag} OK [APPENDUID {validity} {uid}] APPEND completed\r\n"
                ));
            }
            Err(StoreError::NoMailbox(_)) => {
                self.line(&format!("{tag} NO [TRYCREATE] No mailbox named {name}\r\n"));
            }
            Err(e) => self.line(&no(tag, &e)),
        }
    }
}

/// System flag bits and keywords of a flag list.
pub(super) fn flag_bits(flags: &[Flag<'_>]) -> (u32, Vec<String>) {
    let mut bits = 0;
    let mut keywords = Vec::new();
    for f in flags {
        let name = f.to_string();
        match system_flag(&name) {
            Some(b) => bits |= b,
            None if !name.starts_with('\\')
                && !keywords
                    .iter()
                    .any(|k: &String| k.eq_ignore_ascii_case(&name)) =>
            {
                keywords.push(name);
            }
            None => {}
        }
    }
    (bits, keywords)
}

fn attributes(mb: &Mailbox, all: &[Mailbox], subscribed: bool) -> String {
    let prefix = format!("{}/", mb.name);
    let children = all.iter().any(|o| o.name.starts_with(&prefix));
    let mut a = vec![
        if children {
            "\\HasChildren"
        } else {
            "\\HasNoChildren"
        }
        .to_owned(),
    ];
    if !mb.special_use.is_empty() {
        a.push(mb.special_use.clone());
    }
    if subscribed && mb.subscribed {
        a.push("\\Subscribed".to_owned());
    }
    a.join(" ")
}

#[allow(dead_code)]
fn _flag_names(flags: u32, keywords: &str) -> Vec<String> {
    flag_names(flags, keywords)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_patterns() {
        assert!(matches("*", "Archive/2026"));
        assert!(!matches("%", "Archive/2026"));
        assert!(matches("%/%", "Archive/2026"));
        assert!(matches("inbox", "INBOX"));
        assert!(matches("Arch*", "Archive"));
        assert!(!matches("Sent", "Sent/Old"));
        assert!(matches("%", "Sent"));
        assert!(matches("A%e", "Archive"));
        assert!(!matches("A%6", "Archive/2026"));
        assert!(matches("A*6", "Archive/2026"));
        assert!(matches("%/2026", "Archive/2026"));
        assert!(matches("", "") && !matches("", "x"));
        // A pattern that backtracking matching takes forever over.
        let name = "a".repeat(60);
        assert!(!matches(&format!("{}x", "*a".repeat(30)), &name));
        assert!(matches(&format!("{}a", "*".repeat(500)), &name));
    }
}
