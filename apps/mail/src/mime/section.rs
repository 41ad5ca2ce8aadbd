//! BODY[section] and BINARY[section] (RFC 3501 §6.4.5, RFC 3516): which
//! bytes of a stored message a section names.

use super::{Part, PartKind};

/// What follows the part numbers of a section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Header,
    /// HEADER.FIELDS, or HEADER.FIELDS.NOT with `not`.
    Fields {
        names: Vec<String>,
        not: bool,
    },
    Text,
    Mime,
}

/// Why a BINARY section has no content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryError {
    NoSuchPart,
    /// A transfer encoding this server cannot undo (RFC 3516 UNKNOWN-CTE).
    UnknownEncoding(String),
}

/// The part numbered `path` (`[1, 2]` is "1.2").
pub fn find<'a>(tree: &'a Part, path: &[u32]) -> Option<&'a Part> {
    let mut context = tree;
    let mut found = tree;
    for (i, &n) in path.iter().enumerate() {
        found = match &context.kind {
            PartKind::Multipart(children) => children.get((n as usize).checked_sub(1)?)?,
            _ if n == 1 => context,
            _ => return None,
        };
        if i + 1 < path.len() {
            context = match &found.kind {
                PartKind::Message(root, _) => root,
                PartKind::Multipart(_) => found,
                PartKind::Leaf => return None,
            };
        }
    }
    Some(found)
}

/// The bytes of BODY[path.spec]; `None` when there is no such section.
pub fn body(raw: &[u8], tree: &Part, path: &[u32], spec: Option<&Spec>) -> Option<Vec<u8>> {
    if path.is_empty() {
        return match spec {
            None => Some(raw.to_vec()),
            Some(Spec::Header) => Some(raw[tree.header.clone()].to_vec()),
            Some(Spec::Fields { names, not }) => {
                Some(fields(&raw[tree.header.clone()], names, *not))
            }
            Some(Spec::Text) => Some(raw[tree.body.clone()].to_vec()),
            Some(Spec::Mime) => None,
        };
    }
    let part = find(tree, path)?;
    match spec {
        None => Some(raw[part.body.clone()].to_vec()),
        Some(Spec::Mime) => Some(raw[part.header.clone()].to_vec()),
        Some(other) => {
            let PartKind::Message(root, _) = &part.kind else {
                return None;
            };
            Some(match other {
                Spec::Header => raw[root.header.clone()].to_vec(),
                Spec::Fields { names, not } => fields(&raw[root.header.clone()], names, *not),
                _ => raw[root.body.clone()].to_vec(),
            })
        }
    }
}

/// BINARY[path]: the part's content with its transfer encoding undone.
pub fn binary(raw: &[u8], tree: &Part, path: &[u32]) -> Result<Vec<u8>, BinaryError> {
    let part = if path.is_empty() {
        return Ok(raw.to_vec());
    } else {
        find(tree, path).ok_or(BinaryError::NoSuchPart)?
    };
    let data = &raw[part.body.clone()];
    if !matches!(part.kind, PartKind::Leaf) {
        return Ok(data.to_vec());
    }
    match part.mime.encoding.as_str() {
        "7bit" | "8bit" | "binary" | "" => Ok(data.to_vec()),
        "base64" => {
            let clean: Vec<u8> = data
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            Ok(mail_parser::decoders::base64::base64_decode(&clean).unwrap_or_default())
        }
        "quoted-printable" => Ok(
            mail_parser::decoders::quoted_printable::quoted_printable_decode(data)
                .unwrap_or_else(|| data.to_vec()),
        ),
        other => Err(BinaryError::UnknownEncoding(other.to_owned())),
    }
}

/// The header fields of `header` named (or, with `not`, not named) in
/// `names`, then the empty line.
pub fn fields(header: &[u8], names: &[String], not: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in header.split_inclusive(|&b| b == b'\n') {
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
            let name = line[..name_end].trim_ascii();
            let named = names
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name));
            keep = name_end > 0 && named != not;
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}
