//! SEARCH (every key of RFC 3501, MODSEQ of RFC 7162), its ESEARCH form
//! (RFC 4731, IMAP4rev2) and SORT (RFC 5256). Header and body keys read
//! the stored message, decoded by `mail-parser`, only for the messages
//! the cheap keys leave.

use std::collections::HashMap;

use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::extensions::sort::{SortCriterion, SortKey};
use imap_codec::imap_types::search::SearchKey;

use super::selected::{contains, uid_set};
use super::session::{Session, blocking, no};
use crate::store::{ANSWERED, DELETED, DRAFT, FLAGGED, Msg, SEEN, Store};

/// What one message's evaluation may read, made on first use.
struct Ctx<'a> {
    store: &'a Store,
    m: &'a Msg,
    seq: u32,
    last_seq: u32,
    last_uid: u32,
    parsed: Option<Option<Parsed>>,
}

/// The decoded parts of a message header and body keys look at.
struct Parsed {
    /// Lowercased `name: value` pairs, decoded.
    headers: Vec<(String, String)>,
    body: String,
    sent: i64,
}

fn parse(raw: &[u8]) -> Parsed {
    let m = mail_parser::MessageParser::default().parse(raw);
    let mut headers = Vec::new();
    if let Some(m) = &m {
        for h in m.headers() {
            let name = h.name().to_ascii_lowercase();
            let value = match h.value() {
                mail_parser::HeaderValue::Address(a) => a
                    .iter()
                    .map(|x| format!("{} <{}>", x.name().unwrap_or(""), x.address().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(", "),
                v => v.as_text().map(str::to_owned).unwrap_or_default(),
            };
            headers.push((name, value.to_lowercase()));
        }
        for (name, value) in m.headers_raw() {
            headers.push((name.to_ascii_lowercase(), value.trim().to_lowercase()));
        }
    }
    Parsed {
        headers,
        body: crate::mime::search_text(raw, false),
        sent: m
            .as_ref()
            .and_then(|m| m.date())
            .map(|d| d.to_timestamp())
            .unwrap_or(0),
    }
}

impl Ctx<'_> {
    fn parsed(&mut self) -> Option<&Parsed> {
        if self.parsed.is_none() {
            self.parsed = Some(
                self.store
                    .read_blob(self.m.blob)
                    .ok()
                    .map(|raw| parse(&raw)),
            );
        }
        self.parsed.as_ref().and_then(|p| p.as_ref())
    }

    fn header_has(&mut self, field: &str, needle: &[u8]) -> bool {
        let needle = String::from_utf8_lossy(needle).to_lowercase();
        let field = field.to_ascii_lowercase();
        self.parsed().is_some_and(|p| {
            p.headers
                .iter()
                .any(|(n, v)| *n == field && (needle.is_empty() || v.contains(&needle)))
        })
    }

    fn text_has(&mut self, needle: &[u8], headers: bool) -> bool {
        let needle = String::from_utf8_lossy(needle).to_lowercase();
        self.parsed().is_some_and(|p| {
            p.body.contains(&needle)
                || (headers
                    && p.headers
                        .iter()
                        .any(|(n, v)| n.contains(&needle) || v.contains(&needle)))
        })
    }

    fn date(t: i64) -> chrono::NaiveDate {
        chrono::DateTime::from_timestamp(t, 0)
            .unwrap_or_default()
            .date_naive()
    }

    fn eval(&mut self, key: &SearchKey<'_>) -> bool {
        let m = self.m;
        let flag = |bit: u32| m.flags & bit != 0;
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.eval(k)),
            SearchKey::SequenceSet(set) => contains(set, self.seq, self.last_seq),
            SearchKey::Uid(set) => contains(set, m.uid, self.last_uid),
            SearchKey::All => true,
            SearchKey::Answered => flag(ANSWERED),
            SearchKey::Unanswered => !flag(ANSWERED),
            SearchKey::Deleted => flag(DELETED),
            SearchKey::Undeleted => !flag(DELETED),
            SearchKey::Draft => flag(DRAFT),
            SearchKey::Undraft => !flag(DRAFT),
            SearchKey::Flagged => flag(FLAGGED),
            SearchKey::Unflagged => !flag(FLAGGED),
            SearchKey::Seen | SearchKey::Old => flag(SEEN),
            SearchKey::Unseen => !flag(SEEN),
            // No message is \Recent here (see the README).
            SearchKey::New | SearchKey::Recent => false,
            SearchKey::Keyword(k) => m
                .keywords
                .split_whitespace()
                .any(|x| x.eq_ignore_ascii_case(k.as_ref())),
            SearchKey::Unkeyword(k) => !m
                .keywords
                .split_whitespace()
                .any(|x| x.eq_ignore_ascii_case(k.as_ref())),
            SearchKey::Larger(n) => m.size > *n,
            SearchKey::Smaller(n) => m.size < *n,
            SearchKey::Before(d) => Self::date(m.internaldate) < *d.as_ref(),
            SearchKey::On(d) => Self::date(m.internaldate) == *d.as_ref(),
            SearchKey::Since(d) => Self::date(m.internaldate) >= *d.as_ref(),
            SearchKey::SentBefore(d) => self
                .parsed()
                .is_some_and(|p| Self::date(p.sent) < *d.as_ref()),
            SearchKey::SentOn(d) => self
                .parsed()
                .is_some_and(|p| Self::date(p.sent) == *d.as_ref()),
            SearchKey::SentSince(d) => self
                .parsed()
                .is_some_and(|p| Self::date(p.sent) >= *d.as_ref()),
            SearchKey::From(s) => self.header_has("from", s.as_ref()),
            SearchKey::To(s) => self.header_has("to", s.as_ref()),
            SearchKey::Cc(s) => self.header_has("cc", s.as_ref()),
            SearchKey::Bcc(s) => self.header_has("bcc", s.as_ref()),
            SearchKey::Subject(s) => self.header_has("subject", s.as_ref()),
            SearchKey::Header(f, s) => {
                let field = String::from_utf8_lossy(f.as_ref()).into_owned();
                self.header_has(&field, s.as_ref())
            }
            SearchKey::Body(s) => self.text_has(s.as_ref(), false),
            SearchKey::Text(s) => self.text_has(s.as_ref(), true),
            SearchKey::Not(k) => !self.eval(k),
            SearchKey::Or(a, b) => self.eval(a) || self.eval(b),
            SearchKey::ModSequence { modseq, .. } => m.modseq >= *modseq,
        }
    }
}

fn uses_modseq(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(k) => k.as_ref().iter().any(uses_modseq),
        SearchKey::Not(k) => uses_modseq(k),
        SearchKey::Or(a, b) => uses_modseq(a) || uses_modseq(b),
        _ => false,
    }
}

/// The messages of the view matching `keys`: (sequence number, message).
fn run(
    store: &Store,
    view: &[u32],
    rows: &HashMap<u32, Msg>,
    keys: &[SearchKey<'_>],
) -> Vec<(u32, Msg)> {
    let last_uid = view.last().copied().unwrap_or(0);
    let mut out = Vec::new();
    for (i, uid) in view.iter().enumerate() {
        let Some(m) = rows.get(uid) else { continue };
        let mut ctx = Ctx {
            store,
            m,
            seq: i as u32 + 1,
            last_seq: view.len() as u32,
            last_uid,
            parsed: None,
        };
        if keys.iter().all(|k| ctx.eval(k)) {
            out.push((i as u32 + 1, m.clone()));
        }
    }
    out
}

/// RFC 5256 base subject, roughly: without `Re:`/`Fwd:` prefixes,
/// `[list]` tags and a trailing `(fwd)`, lowercased.
fn base_subject(s: &str) -> String {
    let mut s = s.trim().to_lowercase();
    loop {
        let before = s.clone();
        for p in ["re:", "fw:", "fwd:", "aw:", "sv:"] {
            if let Some(rest) = s.strip_prefix(p) {
                s = rest.trim_start().to_owned();
            }
        }
        if s.starts_with('[')
            && let Some(end) = s.find(']')
            && end + 1 < s.len()
        {
            s = s[end + 1..].trim_start().to_owned();
        }
        if let Some(rest) = s.strip_suffix("(fwd)") {
            s = rest.trim_end().to_owned();
        }
        if s == before {
            return s;
        }
    }
}

impl Session {
    async fn matching(
        &mut self,
        tag: &str,
        keys: Vec<SearchKey<'static>>,
    ) -> Option<Vec<(u32, Msg)>> {
        let sel = self.selected.as_ref()?;
        let (mailbox, view) = (sel.mailbox.id, sel.uids.clone());
        match blocking(&self.store, move |s| {
            let rows: HashMap<u32, Msg> = s
                .messages(mailbox)?
                .into_iter()
                .map(|m| (m.uid, m))
                .collect();
            Ok(run(s, &view, &rows, &keys))
        })
        .await
        {
            Ok(found) => Some(found),
            Err(e) => {
                self.line(&no(tag, &e));
                None
            }
        }
    }

    pub(super) async fn search(
        &mut self,
        tag: &str,
        criteria: &Vec1<SearchKey<'_>>,
        uid: bool,
        returns: Option<Vec<String>>,
    ) {
        use imap_codec::imap_types::IntoStatic;
        let keys: Vec<SearchKey<'static>> = criteria
            .as_ref()
            .iter()
            .map(|k| k.clone().into_static())
            .collect();
        let modseq = keys.iter().any(uses_modseq);
        if modseq {
            self.enabled.condstore = true;
        }
        let Some(found) = self.matching(tag, keys).await else {
            return;
        };
        let numbers: Vec<u32> = found
            .iter()
            .map(|(seq, m)| if uid { m.uid } else { *seq })
            .collect();
        let highest = found.iter().map(|(_, m)| m.modseq).max();
        if returns.is_some() || self.enabled.rev2 {
            let mut opts = returns.unwrap_or_default();
            if opts.is_empty() {
                opts.push("ALL".to_owned());
            }
            let mut line = format!("* ESEARCH (TAG \"{tag}\")");
            if uid {
                line.push_str(" UID");
            }
            for o in &opts {
                match o.as_str() {
                    "MIN" if !numbers.is_empty() => line.push_str(&format!(" MIN {}", numbers[0])),
                    "MAX" if !numbers.is_empty() => {
                        line.push_str(&format!(" MAX {}", numbers[numbers.len() - 1]))
                    }
                    "COUNT" => line.push_str(&format!(" COUNT {}", numbers.len())),
                    "ALL" if !numbers.is_empty() => {
                        line.push_str(&format!(" ALL {}", uid_set(&numbers)))
                    }
                    _ => {}
                }
            }
            if modseq && let Some(h) = highest {
                line.push_str(&format!(" MODSEQ {h}"));
            }
            self.line(&format!("{line}\r\n"));
        } else {
            let mut line = String::from("* SEARCH");
            for n in &numbers {
                line.push_str(&format!(" {n}"));
            }
            if modseq && let Some(h) = highest {
                line.push_str(&format!(" (MODSEQ {h})"));
            }
            self.line(&format!("{line}\r\n"));
        }
        self.ok(tag, "SEARCH completed");
    }

    pub(super) async fn sort(
        &mut self,
        tag: &str,
        criteria: &Vec1<SortCriterion>,
        search: &Vec1<SearchKey<'_>>,
        uid: bool,
    ) {
        use imap_codec::imap_types::IntoStatic;
        let keys: Vec<SearchKey<'static>> = search
            .as_ref()
            .iter()
            .map(|k| k.clone().into_static())
            .collect();
        let Some(found) = self.matching(tag, keys).await else {
            return;
        };
        let criteria: Vec<(bool, SortKey)> = criteria
            .as_ref()
            .iter()
            .map(|c| (c.reverse, c.key.clone()))
            .collect();
        let sorted = blocking(&self.store, move |s| {
            let mut keyed: Vec<(Vec<SortValue>, u32, u32)> = Vec::new();
            for (seq, m) in &found {
                let parsed = s.read_blob(m.blob).ok().map(|raw| parse(&raw));
                let field = |name: &str| -> String {
                    parsed
                        .as_ref()
                        .and_then(|p| {
                            p.headers
                                .iter()
                                .find(|(n, _)| n == name)
                                .map(|(_, v)| v.clone())
                        })
                        .unwrap_or_default()
                };
                let mut values = Vec::new();
                for (_, key) in &criteria {
                    values.push(match key {
                        SortKey::Arrival => SortValue::Num(m.internaldate),
                        SortKey::Date => SortValue::Num(
                            parsed
                                .as_ref()
                                .map(|p| p.sent)
                                .filter(|t| *t != 0)
                                .unwrap_or(m.internaldate),
                        ),
                        SortKey::Size => SortValue::Num(m.size as i64),
                        SortKey::Subject => SortValue::Text(base_subject(&field("subject"))),
                        SortKey::From | SortKey::DisplayFrom => {
                            SortValue::Text(first_mailbox(&field("from")))
                        }
                        SortKey::To | SortKey::DisplayTo => {
                            SortValue::Text(first_mailbox(&field("to")))
                        }
                        SortKey::Cc => SortValue::Text(first_mailbox(&field("cc"))),
                    });
                }
                keyed.push((values, *seq, m.uid));
            }
            keyed.sort_by(|a, b| {
                for (i, (reverse, _)) in criteria.iter().enumerate() {
                    let o = a.0[i].cmp(&b.0[i]);
                    let o = if *reverse { o.reverse() } else { o };
                    if o != std::cmp::Ordering::Equal {
                        return o;
                    }
                }
                a.1.cmp(&b.1)
            });
            Ok(keyed
                .into_iter()
                .map(|(_, seq, u)| if uid { u } else { seq })
                .collect::<Vec<u32>>())
        })
        .await;
        match sorted {
            Ok(list) => {
                let mut line = String::from("* SORT");
                for n in list {
                    line.push_str(&format!(" {n}"));
                }
                self.line(&format!("{line}\r\n"));
                self.ok(tag, "SORT completed");
            }
            Err(e) => self.line(&no(tag, &e)),
        }
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Num(i64),
    Text(String),
}

/// The mailbox (local part) of the first address of a decoded header
/// value `Name <box@host>, ...`.
fn first_mailbox(value: &str) -> String {
    let first = value.split(',').next().unwrap_or("");
    let addr = match (first.find('<'), first.find('>')) {
        (Some(a), Some(b)) if a < b => &first[a + 1..b],
        _ => first.trim(),
    };
    addr.split('@').next().unwrap_or("").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_subjects_drop_reply_and_list_prefixes() {
        assert_eq!(base_subject("Re: [dev] Fwd: Hello (fwd)"), "hello");
        assert_eq!(base_subject("Meeting"), "meeting");
        assert_eq!(first_mailbox("alice <a@x.org>, b <b@y.org>"), "a");
    }
}
