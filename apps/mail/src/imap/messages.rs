//! Commands on the selected mailbox's messages: FETCH and SEARCH (their
//! own files), SORT, STORE, COPY, MOVE, EXPUNGE and UID EXPUNGE.

use imap_codec::imap_types::command::{CommandBody, StoreModifier};
use imap_codec::imap_types::flag::{StoreResponse, StoreType};
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::AsyncWrite;

use super::mailboxes::flag_bits;
use super::selected::{fetch_flags, uid_set};
use super::session::{Session, blocking, no};
use crate::store::{FlagChange, StoreError};

impl Session {
    /// Runs a command that needs a selected mailbox (the caller checked).
    pub(super) async fn selected_command<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &str,
        body: CommandBody<'_>,
        search_return: Option<Vec<String>>,
        writer: &mut W,
    ) -> std::io::Result<()> {
        match body {
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(
                    tag,
                    &sequence_set,
                    &macro_or_item_names,
                    uid,
                    &modifiers,
                    writer,
                )
                .await?;
                // EXPUNGE responses may not follow a FETCH by sequence
                // number (RFC 3501 §7.4.1).
                return self.finish(uid).await;
            }
            CommandBody::Search { criteria, uid, .. } => {
                self.search(tag, &criteria, uid, search_return).await;
            }
            CommandBody::Sort {
                sort_criteria,
                search_criteria,
                uid,
                ..
            } => {
                self.sort(tag, &sort_criteria, &search_criteria, uid).await;
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                let unchanged = modifiers
                    .iter()
                    .map(|m| match m {
                        StoreModifier::UnchangedSince(v) => *v,
                    })
                    .next();
                let change = match kind {
                    StoreType::Replace => FlagChange::Set,
                    StoreType::Add => FlagChange::Add,
                    StoreType::Remove => FlagChange::Remove,
                };
                let (bits, keywords) = flag_bits(&flags);
                let silent = response == StoreResponse::Silent;
                self.store_flags(
                    tag,
                    &sequence_set,
                    uid,
                    change,
                    bits,
                    keywords,
                    silent,
                    unchanged,
                )
                .await;
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => {
                let target = self.name_of(&mailbox);
                self.copy(tag, &sequence_set, uid, &target, false).await;
            }
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => {
                let target = self.name_of(&mailbox);
                self.copy(tag, &sequence_set, uid, &target, true).await;
            }
            CommandBody::Expunge => self.expunge(tag, None).await,
            CommandBody::ExpungeUid { sequence_set } => self.expunge(tag, Some(sequence_set)).await,
            _ => self.line(&format!("{tag} BAD Command not supported here\r\n")),
        }
        Ok(())
    }

    /// For FETCH: its responses went out already and only the tagged line
    /// waits; updates (when allowed) go before it.
    async fn finish(&mut self, expunges: bool) -> std::io::Result<()> {
        let tagged = std::mem::take(&mut self.out);
        self.sync(expunges).await;
        self.out.extend_from_slice(&tagged);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_flags(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        uid: bool,
        change: FlagChange,
        bits: u32,
        keywords: Vec<String>,
        silent: bool,
        unchanged: Option<u64>,
    ) {
        let sel = self.selected.as_ref().expect("selected");
        if sel.read_only {
            self.line(&format!(
                "{tag} NO [READ-ONLY] The mailbox is read-only\r\n"
            ));
            return;
        }
        if unchanged.is_some() {
            self.enabled.condstore = true;
        }
        let (mailbox, uids) = (sel.mailbox.id, sel.resolve(set, uid));
        let result = blocking(&self.store, move |s| {
            s.store_flags(mailbox, &uids, change, bits, &keywords, unchanged)
        })
        .await;
        let (changed, refused) = match result {
            Ok(r) => r,
            Err(e) => {
                self.line(&no(tag, &e));
                return;
            }
        };
        let condstore = self.enabled.condstore;
        let sel = self.selected.as_mut().expect("selected");
        let mut lines = Vec::new();
        for m in &changed {
            sel.own.insert((m.uid, m.modseq));
            if let Some(seq) = sel.seq_of(m.uid)
                && (!silent || unchanged.is_some())
            {
                lines.extend_from_slice(&fetch_flags(seq, m, condstore));
            }
        }
        let modified: Vec<u32> = refused
            .iter()
            .filter_map(|u| if uid { Some(*u) } else { sel.seq_of(*u) })
            .collect();
        self.out.extend_from_slice(&lines);
        if modified.is_empty() {
            self.ok(tag, "STORE completed");
        } else {
            self.line(&format!(
                "{tag} OK [MODIFIED {}] Some messages were changed by someone else\r\n",
                uid_set(&modified)
            ));
        }
    }

    async fn copy(&mut self, tag: &str, set: &SequenceSet, uid: bool, target: &str, remove: bool) {
        let sel = self.selected.as_ref().expect("selected");
        if remove && sel.read_only {
            self.line(&format!(
                "{tag} NO [READ-ONLY] The mailbox is read-only\r\n"
            ));
            return;
        }
        let (mailbox, uids) = (sel.mailbox.id, sel.resolve(set, uid));
        let verb = if remove { "MOVE" } else { "COPY" };
        if uids.is_empty() {
            self.ok(tag, &format!("{verb} completed (no messages)"));
            return;
        }
        let t = target.to_owned();
        match blocking(&self.store, move |s| s.copy(mailbox, &uids, &t, remove)).await {
            Ok((validity, pairs)) => {
                let from: Vec<u32> = pairs.iter().map(|p| p.0).collect();
                let to: Vec<u32> = pairs.iter().map(|p| p.1).collect();
                let code = format!("COPYUID {validity} {} {}", list(&from), list(&to));
                if remove {
                    self.line(&format!("* OK [{code}] Moved\r\n"));
                    self.report_expunged(&from);
                    self.ok(tag, "MOVE completed");
                } else {
                    self.line(&format!("{tag} OK [{code}] COPY completed\r\n"));
                }
            }
            Err(StoreError::NoMailbox(_)) => {
                self.line(&format!(
                    "{tag} NO [TRYCREATE] No mailbox named {target}\r\n"
                ));
            }
            Err(e) => self.line(&no(tag, &e)),
        }
    }

    async fn expunge(&mut self, tag: &str, only: Option<SequenceSet>) {
        let sel = self.selected.as_ref().expect("selected");
        if sel.read_only {
            self.line(&format!(
                "{tag} NO [READ-ONLY] The mailbox is read-only\r\n"
            ));
            return;
        }
        let mailbox = sel.mailbox.id;
        let only: Option<Vec<u32>> = only.map(|s| sel.resolve(&s, true));
        match blocking(&self.store, move |s| s.expunge(mailbox, only.as_deref())).await {
            Ok(gone) => {
                self.report_expunged(&gone);
                self.sync(true).await;
                self.ok(tag, "EXPUNGE completed");
            }
            Err(e) => self.line(&no(tag, &e)),
        }
    }

    /// EXPUNGE (or VANISHED) responses for messages this session removed.
    fn report_expunged(&mut self, uids: &[u32]) {
        let qresync = self.enabled.qresync;
        let sel = self.selected.as_mut().expect("selected");
        let shown: Vec<u32> = uids
            .iter()
            .copied()
            .filter(|u| sel.seq_of(*u).is_some())
            .collect();
        if shown.is_empty() {
            return;
        }
        if qresync {
            for u in &shown {
                sel.remove(*u);
            }
            let l = format!("* VANISHED {}\r\n", uid_set(&shown));
            self.out.extend_from_slice(l.as_bytes());
        } else {
            let mut lines = String::new();
            for u in &shown {
                if let Some(seq) = sel.remove(*u) {
                    lines.push_str(&format!("* {seq} EXPUNGE\r\n"));
                }
            }
            self.out.extend_from_slice(lines.as_bytes());
        }
    }
}

/// UIDs in the order given (COPYUID pairs them up by position).
fn list(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
