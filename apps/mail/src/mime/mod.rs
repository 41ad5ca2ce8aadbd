//! What IMAP shows of a message's MIME structure, from `mail-parser`:
//! the part tree with byte ranges into the stored file ([`structure`]),
//! ENVELOPE and BODYSTRUCTURE as IMAP writes them, sections and BINARY
//! ([`section`]), and the text SEARCH and the junk filter read.
//!
//! Hostile messages are bounded: nesting past [`MAX_DEPTH`] and parts past
//! [`MAX_PARTS`] are shown as opaque parts (their bytes are still there
//! for BODY[]), so a message 1,000 levels deep or with 10,000 parts is
//! stored and fetched like any other.

mod envelope;
pub mod section;
pub mod structure;

pub use structure::{Part, PartKind, parse};

/// Nesting shown in BODYSTRUCTURE; deeper parts are opaque.
pub const MAX_DEPTH: usize = 64;
/// Parts shown in BODYSTRUCTURE; further parts are opaque.
pub const MAX_PARTS: usize = 20_000;

/// What the store keeps of a message besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct Analysed {
    pub envelope: String,
    pub bodystructure: String,
    pub body: String,
    /// The Date header as unix seconds; 0 when there is none.
    pub sent_date: i64,
    /// Words for the junk filter.
    pub tokens: Vec<String>,
}

/// Analyses a message once, when it is stored.
pub fn analyse(raw: &[u8]) -> Analysed {
    let parsed = mail_parser::MessageParser::default().parse(raw);
    let tree = structure::from_parsed(parsed.as_ref(), raw);
    let mut bodystructure = Vec::new();
    structure::write(&mut bodystructure, &tree, raw, true);
    let mut body = Vec::new();
    structure::write(&mut body, &tree, raw, false);
    let mut env = Vec::new();
    envelope::write(
        &mut env,
        parsed.as_ref().map(|m| &m.parts[..]).unwrap_or(&[]),
        0,
        raw,
    );
    Analysed {
        envelope: String::from_utf8_lossy(&env).into_owned(),
        bodystructure: String::from_utf8_lossy(&bodystructure).into_owned(),
        body: String::from_utf8_lossy(&body).into_owned(),
        sent_date: parsed
            .as_ref()
            .and_then(|m| m.date())
            .map(|d| d.to_timestamp())
            .unwrap_or(0),
        tokens: parsed.as_ref().map(tokens_of).unwrap_or_default(),
    }
}

/// Words for the junk filter, read from a stored message.
pub fn tokens(raw: &[u8]) -> Vec<String> {
    mail_parser::MessageParser::default()
        .parse(raw)
        .map(|m| tokens_of(&m))
        .unwrap_or_default()
}

/// The text a SEARCH TEXT or BODY looks in: decoded headers (TEXT) and
/// decoded text parts, lowercased.
pub fn search_text(raw: &[u8], with_headers: bool) -> String {
    let Some(m) = mail_parser::MessageParser::default().parse(raw) else {
        return String::from_utf8_lossy(raw).to_lowercase();
    };
    let mut text = String::new();
    if with_headers {
        for (name, value) in m.headers_raw() {
            text.push_str(name);
            text.push_str(": ");
            text.push_str(value);
            text.push('\n');
        }
        if let Some(s) = m.subject() {
            text.push_str(s);
            text.push('\n');
        }
    }
    for i in 0..m.text_body_count() {
        if let Some(t) = m.body_text(i) {
            text.push_str(&t);
            text.push('\n');
        }
    }
    for i in 0..m.html_body_count() {
        if let Some(t) = m.body_html(i) {
            text.push_str(&t);
            text.push('\n');
        }
    }
    text.to_lowercase()
}

/// Lowercase words of 3 to 24 letters from the subject, the sender's
/// domain and the text, each once, at most 2,000.
fn tokens_of(m: &mail_parser::Message<'_>) -> Vec<String> {
    let mut words = std::collections::BTreeSet::new();
    let mut add = |text: &str, prefix: &str| {
        for w in text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '$') {
            let n = w.chars().count();
            if (3..=24).contains(&n) && words.len() < 2000 {
                words.insert(format!("{prefix}{}", w.to_lowercase()));
            }
        }
    };
    if let Some(s) = m.subject() {
        add(s, "s:");
    }
    if let Some(from) = m.from().and_then(|a| a.first()).and_then(|a| a.address())
        && let Some((_, domain)) = from.rsplit_once('@')
    {
        add(domain, "f:");
    }
    for i in 0..m.text_body_count().min(4) {
        if let Some(t) = m.body_text(i) {
            add(&t, "");
        }
    }
    words.into_iter().collect()
}

#[cfg(test)]
mod tests;
