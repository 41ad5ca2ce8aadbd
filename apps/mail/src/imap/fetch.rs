//! FETCH: flags, dates, sizes, ENVELOPE and BODYSTRUCTURE (cached when
//! the message was stored), BODY[section]<partial>, BINARY, MODSEQ.
//! Responses are made on the blocking pool in batches and written as they
//! are ready, so a large FETCH never holds a whole mailbox in memory.

use std::collections::HashMap;

use imap_codec::imap_types::command::FetchModifier;
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItemName, Section,
};
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::selected::{contains, uid_set};
use super::session::{Session, blocking, no};
use super::text::literal;
use crate::mime::section::{self, Spec};
use crate::mime::{self, Part};
use crate::store::{FlagChange, Msg, SEEN, Store, StoreError, flag_names};

/// Output gathered before it is written out.
const BATCH_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Item {
    Uid,
    Flags,
    InternalDate,
    Size,
    Envelope,
    BodyStructure,
    Body,
    ModSeq,
    Section {
        label: String,
        path: Vec<u32>,
        spec: Option<Spec>,
        partial: Option<(u32, u32)>,
    },
    Binary {
        label: String,
        path: Vec<u32>,
        partial: Option<(u32, u32)>,
    },
    BinarySize {
        label: String,
        path: Vec<u32>,
    },
    Rfc822,
    Rfc822Header,
    Rfc822Text,
}

fn path_text(path: &[u32]) -> String {
    path.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn section_item(section: &Option<Section<'_>>, partial: Option<(u32, u32)>) -> Item {
    let names = |v: &[imap_codec::imap_types::core::AString<'_>]| -> Vec<String> {
        v.iter()
            .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
            .collect()
    };
    let part = |p: &Option<imap_codec::imap_types::fetch::Part>| -> Vec<u32> {
        p.as_ref()
            .map(|p| p.0.as_ref().iter().map(|n| n.get()).collect())
            .unwrap_or_default()
    };
    let (path, spec, text) = match section {
        None => (Vec::new(), None, String::new()),
        Some(Section::Part(p)) => {
            let path: Vec<u32> = p.0.as_ref().iter().map(|n| n.get()).collect();
            let t = path_text(&path);
            (path, None, t)
        }
        Some(Section::Header(p)) => (part(p), Some(Spec::Header), "HEADER".to_owned()),
        Some(Section::HeaderFields(p, f)) => {
            let n = names(f.as_ref());
            let t = format!("HEADER.FIELDS ({})", n.join(" "));
            (
                part(p),
                Some(Spec::Fields {
                    names: n,
                    not: false,
                }),
                t,
            )
        }
        Some(Section::HeaderFieldsNot(p, f)) => {
            let n = names(f.as_ref());
            let t = format!("HEADER.FIELDS.NOT ({})", n.join(" "));
            (
                part(p),
                Some(Spec::Fields {
                    names: n,
                    not: true,
                }),
                t,
            )
        }
        Some(Section::Text(p)) => (part(p), Some(Spec::Text), "TEXT".to_owned()),
        Some(Section::Mime(p)) => (
            p.0.as_ref().iter().map(|n| n.get()).collect(),
            Some(Spec::Mime),
            "MIME".to_owned(),
        ),
    };
    let text = if !path.is_empty() && spec.is_some() {
        format!("{}.{}", path_text(&path), text)
    } else {
        text
    };
    let label = match partial {
        Some((origin, _)) => format!("BODY[{text}]<{origin}>"),
        None => format!("BODY[{text}]"),
    };
    Item::Section {
        label,
        path,
        spec,
        partial,
    }
}

/// The items asked for, and whether they set \Seen.
fn plan(names: &MacroOrMessageDataItemNames<'_>) -> (Vec<Item>, bool) {
    let list: Vec<MessageDataItemName<'_>> = match names {
        MacroOrMessageDataItemNames::Macro(m) => {
            let mut v = vec![
                MessageDataItemName::Flags,
                MessageDataItemName::InternalDate,
                MessageDataItemName::Rfc822Size,
            ];
            if matches!(m, Macro::All | Macro::Full) {
                v.push(MessageDataItemName::Envelope);
            }
            if matches!(m, Macro::Full) {
                v.push(MessageDataItemName::Body);
            }
            v
        }
        MacroOrMessageDataItemNames::MessageDataItemNames(v) => v.clone(),
    };
    let mut seen = false;
    let mut items = Vec::new();
    for n in &list {
        items.push(match n {
            MessageDataItemName::Uid => Item::Uid,
            MessageDataItemName::Flags => Item::Flags,
            MessageDataItemName::InternalDate => Item::InternalDate,
            MessageDataItemName::Rfc822Size => Item::Size,
            MessageDataItemName::Envelope => Item::Envelope,
            MessageDataItemName::BodyStructure => Item::BodyStructure,
            MessageDataItemName::Body => Item::Body,
            MessageDataItemName::ModSeq => Item::ModSeq,
            MessageDataItemName::Rfc822 => {
                seen = true;
                Item::Rfc822
            }
            MessageDataItemName::Rfc822Header => Item::Rfc822Header,
            MessageDataItemName::Rfc822Text => {
                seen = true;
                Item::Rfc822Text
            }
            MessageDataItemName::BodyExt {
                section,
                partial,
                peek,
            } => {
                seen |= !peek;
                section_item(section, partial.map(|(o, c)| (o, c.get())))
            }
            MessageDataItemName::Binary {
                section,
                partial,
                peek,
            } => {
                seen |= !peek;
                let path: Vec<u32> = section.iter().map(|n| n.get()).collect();
                let label = match partial {
                    Some((o, _)) => format!("BINARY[{}]<{o}>", path_text(&path)),
                    None => format!("BINARY[{}]", path_text(&path)),
                };
                Item::Binary {
                    label,
                    path,
                    partial: partial.map(|(o, c)| (o, c.get())),
                }
            }
            MessageDataItemName::BinarySize { section } => {
                let path: Vec<u32> = section.iter().map(|n| n.get()).collect();
                Item::BinarySize {
                    label: format!("BINARY.SIZE[{}]", path_text(&path)),
                    path,
                }
            }
        });
    }
    (items, seen)
}

fn cut(data: Vec<u8>, partial: Option<(u32, u32)>) -> Vec<u8> {
    match partial {
        None => data,
        Some((origin, count)) => {
            let start = (origin as usize).min(data.len());
            let end = start.saturating_add(count as usize).min(data.len());
            data[start..end].to_vec()
        }
    }
}

/// `14-Nov-2023 22:13:20 +0000`.
pub fn internaldate(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .format("%d-%b-%Y %H:%M:%S +0000")
        .to_string()
}

/// One message's FETCH response.
#[allow(clippy::too_many_arguments)]
fn respond(
    store: &Store,
    seq: u32,
    m: &Msg,
    items: &[Item],
    with_uid: bool,
    with_flags: bool,
    with_modseq: bool,
) -> Result<Vec<u8>, StoreError> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut raw: Option<Vec<u8>> = None;
    let mut tree: Option<Part> = None;
    let mut cached = None;
    let asked = |f: fn(&Item) -> bool| items.iter().any(f);
    if with_uid && !asked(|i| matches!(i, Item::Uid)) {
        parts.push(format!("UID {}", m.uid).into_bytes());
    }
    let flags_text = format!("FLAGS ({})", flag_names(m.flags, &m.keywords).join(" "));
    for item in items {
        let mut p = Vec::new();
        match item {
            Item::Uid => p.extend_from_slice(format!("UID {}", m.uid).as_bytes()),
            Item::Flags => p.extend_from_slice(flags_text.as_bytes()),
            Item::InternalDate => p.extend_from_slice(
                format!("INTERNALDATE \"{}\"", internaldate(m.internaldate)).as_bytes(),
            ),
            Item::Size => p.extend_from_slice(format!("RFC822.SIZE {}", m.size).as_bytes()),
            Item::ModSeq => p.extend_from_slice(format!("MODSEQ ({})", m.modseq).as_bytes()),
            Item::Envelope | Item::BodyStructure | Item::Body => {
                if cached.is_none() {
                    cached = Some(store.cached(m.blob)?);
                }
                let c = cached.as_ref().expect("just read");
                let (name, value) = match item {
                    Item::Envelope => ("ENVELOPE", &c.envelope),
                    Item::BodyStructure => ("BODYSTRUCTURE", &c.bodystructure),
                    _ => ("BODY", &c.body),
                };
                p.extend_from_slice(name.as_bytes());
                p.push(b' ');
                p.extend_from_slice(value.as_bytes());
            }
            _ => {
                if raw.is_none() {
                    raw = Some(store.read_blob(m.blob)?);
                }
                let bytes = raw.as_deref().expect("just read");
                let needs_tree = matches!(item, Item::Section { path, .. } | Item::Binary { path, .. } | Item::BinarySize { path, .. } if !path.is_empty())
                    || matches!(
                        item,
                        Item::Rfc822Header | Item::Rfc822Text | Item::Section { .. }
                    );
                if needs_tree && tree.is_none() {
                    tree = Some(mime::parse(bytes));
                }
                match item {
                    Item::Section {
                        label,
                        path,
                        spec,
                        partial,
                    } => {
                        let t = tree.as_ref().expect("parsed");
                        let data = section::body(bytes, t, path, spec.as_ref()).unwrap_or_default();
                        p.extend_from_slice(label.as_bytes());
                        p.push(b' ');
                        literal(&mut p, &cut(data, *partial), false);
                    }
                    Item::Binary {
                        label,
                        path,
                        partial,
                    } => {
                        let data = match tree.as_ref() {
                            Some(t) => {
                                section::binary(bytes, t, path).unwrap_or_else(|_| Vec::new())
                            }
                            None => bytes.to_vec(),
                        };
                        p.extend_from_slice(label.as_bytes());
                        p.push(b' ');
                        literal(&mut p, &cut(data, *partial), true);
                    }
                    Item::BinarySize { label, path } => {
                        let n = match tree.as_ref() {
                            Some(t) => section::binary(bytes, t, path)
                                .map(|d| d.len())
                                .unwrap_or(0),
                            None => bytes.len(),
                        };
                        p.extend_from_slice(format!("{label} {n}").as_bytes());
                    }
                    Item::Rfc822 => {
                        p.extend_from_slice(b"RFC822 ");
                        literal(&mut p, bytes, false);
                    }
                    Item::Rfc822Header | Item::Rfc822Text => {
                        let t = tree.as_ref().expect("parsed");
                        let (name, range) = if matches!(item, Item::Rfc822Header) {
                            ("RFC822.HEADER ", t.header.clone())
                        } else {
                            ("RFC822.TEXT ", t.body.clone())
                        };
                        p.extend_from_slice(name.as_bytes());
                        literal(&mut p, &bytes[range], false);
                    }
                    _ => {}
                }
            }
        }
        parts.push(p);
    }
    if with_flags && !asked(|i| matches!(i, Item::Flags)) {
        parts.push(flags_text.into_bytes());
    }
    if with_modseq && !asked(|i| matches!(i, Item::ModSeq)) {
        parts.push(format!("MODSEQ ({})", m.modseq).into_bytes());
    }
    let mut out = format!("* {seq} FETCH (").into_bytes();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b")\r\n");
    Ok(out)
}

impl Session {
    pub(super) async fn fetch<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        names: &MacroOrMessageDataItemNames<'_>,
        uid: bool,
        modifiers: &[FetchModifier],
        writer: &mut W,
    ) -> std::io::Result<()> {
        let (items, sets_seen) = plan(names);
        let mut changed_since = None;
        let mut vanished = false;
        for m in modifiers {
            match m {
                FetchModifier::ChangedSince(v) => changed_since = Some(v.get()),
                FetchModifier::Vanished => vanished = true,
            }
        }
        if vanished && !(uid && self.enabled.qresync && changed_since.is_some()) {
            self.line(&format!(
                "{tag} BAD VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE\r\n"
            ));
            return Ok(());
        }
        if changed_since.is_some() {
            self.enabled.condstore = true;
        }
        let sel = self.selected.as_ref().expect("checked by the caller");
        let (mailbox, read_only) = (sel.mailbox.id, sel.read_only);
        let uids = sel.resolve(set, uid);
        if vanished
            && let Some(since) = changed_since
            && let Ok((mb, _, expunged)) =
                blocking(&self.store, move |s| s.changes_since(mailbox, since)).await
        {
            let star = mb.uidnext.saturating_sub(1);
            let gone: Vec<u32> = expunged
                .into_iter()
                .filter(|u| contains(set, *u, star))
                .collect();
            if !gone.is_empty() {
                self.line(&format!("* VANISHED (EARLIER) {}\r\n", uid_set(&gone)));
            }
        }
        let mut newly_seen: Vec<u32> = Vec::new();
        if sets_seen && !read_only && !uids.is_empty() {
            let u = uids.clone();
            match blocking(&self.store, move |s| {
                s.store_flags(mailbox, &u, FlagChange::Add, SEEN, &[], None)
            })
            .await
            {
                Ok((changed, _)) => {
                    let sel = self.selected.as_mut().expect("selected");
                    for c in &changed {
                        sel.own.insert((c.uid, c.modseq));
                        newly_seen.push(c.uid);
                    }
                }
                Err(e) => {
                    self.line(&no(tag, &e));
                    return Ok(());
                }
            }
        }
        let rows: HashMap<u32, Msg> =
            match blocking(&self.store, move |s| s.messages(mailbox)).await {
                Ok(r) => r.into_iter().map(|m| (m.uid, m)).collect(),
                Err(e) => {
                    self.line(&no(tag, &e));
                    return Ok(());
                }
            };
        let sel = self.selected.as_ref().expect("selected");
        let mut todo: Vec<(u32, Msg)> = uids
            .iter()
            .filter_map(|u| Some((sel.seq_of(*u)?, rows.get(u)?.clone())))
            .filter(|(_, m)| changed_since.is_none_or(|c| m.modseq > c))
            .collect();
        let condstore = self.enabled.condstore;
        let with_modseq = changed_since.is_some()
            || (condstore && items.iter().any(|i| matches!(i, Item::Flags)));
        writer.write_all(&std::mem::take(&mut self.out)).await?;
        while !todo.is_empty() {
            let batch: Vec<(u32, Msg)> = {
                let mut size = 0usize;
                let mut n = 0;
                for (_, m) in &todo {
                    size += m.size as usize;
                    n += 1;
                    if size > BATCH_BYTES || n >= 200 {
                        break;
                    }
                }
                todo.drain(..n).collect()
            };
            let items = items.clone();
            let seen = newly_seen.clone();
            let made = blocking(&self.store, move |s| {
                let mut out = Vec::new();
                for (seq, m) in &batch {
                    let flags = seen.contains(&m.uid);
                    match respond(s, *seq, m, &items, uid, flags, with_modseq) {
                        Ok(r) => out.extend_from_slice(&r),
                        // A message expunged meanwhile by another session.
                        Err(StoreError::Io { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            })
            .await;
            match made {
                Ok(bytes) => writer.write_all(&bytes).await?,
                Err(e) => {
                    self.line(&no(tag, &e));
                    return Ok(());
                }
            }
        }
        self.ok(tag, "FETCH completed");
        Ok(())
    }
}
