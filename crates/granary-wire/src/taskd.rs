//! Server side of the legacy Taskwarrior 2.x "taskd" sync protocol, as spoken
//! by Debian 12's `task` 2.6.2, the wire format, read by the gateway (the first frame:
//! who is asking) and by the tasks grain; the sync itself is the grain's.
//!
//! # Wire format
//!
//! One TLS connection carries exactly one request and one reply. Each is a
//! frame: a 4-byte big-endian length that *includes* those 4 bytes, followed
//! by UTF-8 text in the libshared `Msg` format:
//!
//! ```text
//! name: value\n        (one line per header, sorted by name)
//! ...
//! \n                   (blank line)
//! payload\n            (the payload, then one more newline)
//! ```
//!
//! Parsing splits at the first `"\n\n"`; every header line is split at its
//! first `':'` and both halves are trimmed. The Taskwarrior client appends one
//! more `"\n"` to what it sends, so request payloads end in `"\n\n"`.
//!
//! A sync request carries `type: sync`, `protocol: v1`, `org`, `user`, `key`
//! (the credentials) and optionally `subtype: init` (`task sync init`). Its
//! payload is the client's backlog: one complete task JSON object per local
//! modification (oldest first, several lines may share a uuid), plus the sync
//! key the server handed out last time (absent on the very first sync). A
//! reply carries `code` and `status`; on 200 the payload is task JSON lines to
//! add/overwrite by uuid, then the new sync key; on 201 it is just the key.

use std::collections::BTreeMap;
use std::fmt;

/// Largest request accepted (bytes, including the 4-byte length).
pub const MAX_REQUEST: usize = 64 << 20;

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

/// Why a frame's announced length is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length is below 4, i.e. smaller than the length prefix.
    TooShort,
    /// The announced length (given) exceeds the limit.
    TooLarge(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort => {
                write!(
                    f,
                    "frame length is shorter than its own 4-byte length prefix"
                )
            }
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds the size limit"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The total length (including the 4 length bytes) a frame announces, checked
/// against `limit` BEFORE anything is allocated. Less than 4 → TooShort; more
/// than limit → TooLarge.
pub fn frame_len(prefix: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let announced = u64::from(u32::from_be_bytes(prefix));
    if announced < 4 {
        return Err(FrameError::TooShort);
    }
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    if announced > limit {
        return Err(FrameError::TooLarge(announced));
    }
    usize::try_from(announced).map_err(|_| FrameError::TooLarge(announced))
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// What libshared's `trim` removes by default.
const EDIBLE: &[char] = &[' ', '\t', '\n', '\x0c', '\r'];

/// A taskd protocol message: headers and a payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub headers: BTreeMap<String, String>,
    pub payload: String,
}

impl Message {
    /// Parses the bytes after the 4-byte length (UTF-8; split at the first
    /// "\n\n"; header lines split at the first ':' and both sides trimmed;
    /// blank/invalid header lines: error). Errors are a String meant for a 500
    /// status line.
    ///
    /// As in libshared `Msg::parse`, a later duplicate header overrides an
    /// earlier one, and an empty header block (body starting with "\n\n") is
    /// accepted as "no headers". The payload is everything after the first
    /// "\n\n", including any trailing newlines.
    pub fn parse(body: &[u8]) -> Result<Message, String> {
        let text = std::str::from_utf8(body)
            .map_err(|_| "Malformed message: not valid UTF-8".to_string())?;
        let Some(separator) = text.find("\n\n") else {
            return Err("Malformed message".to_string());
        };
        let mut headers = BTreeMap::new();
        let head = &text[..separator];
        if !head.is_empty() {
            for line in head.split('\n') {
                let Some(colon) = line.find(':') else {
                    return Err(format!("Malformed message header '{line}'"));
                };
                let name = line[..colon].trim_matches(EDIBLE).to_string();
                let value = line[colon + 1..].trim_matches(EDIBLE).to_string();
                headers.insert(name, value);
            }
        }
        Ok(Message {
            headers,
            payload: text[separator + 2..].to_string(),
        })
    }

    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The whole frame: 4-byte big-endian total length, then headers sorted by
    /// name as "name: value\n", a blank line, the payload, and a trailing "\n"
    /// as the real taskd writes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = String::new();
        for (name, value) in &self.headers {
            body.push_str(name);
            body.push_str(": ");
            body.push_str(value);
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.payload);
        body.push('\n');

        let total = body.len() + 4;
        let mut frame = Vec::with_capacity(total);
        frame.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(body.as_bytes());
        frame
    }
}

/// A reply with `code` and `status` headers and `payload`.
pub fn reply(code: u16, status: &str, payload: String) -> Message {
    let mut headers = BTreeMap::new();
    headers.insert("code".to_string(), code.to_string());
    headers.insert("status".to_string(), status.to_string());
    Message { headers, payload }
}

// ---------------------------------------------------------------------------
// Request checking
// ---------------------------------------------------------------------------

/// The credentials of a sync request (`taskd.credentials = org/user/key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub org: String,
    pub user: String,
    pub key: String,
    /// `subtype: init` (`task sync init`). taskd only logs it.
    pub init: bool,
}

/// An error reply: the `code` and `status` headers to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncError {
    pub code: u16,
    pub status: String,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.status)
    }
}

impl std::error::Error for SyncError {}

/// taskd turns every thrown string into code 500 with the string as status.
fn fail(status: String) -> SyncError {
    SyncError { code: 500, status }
}

fn header_or_empty<'m>(msg: &'m Message, name: &str) -> &'m str {
    msg.header(name).unwrap_or("")
}

/// Checks a request before sync: `type` must be `sync`, the credentials must
/// be present and `protocol` must be `v1`.
///
/// * `type: statistics` is answered by taskd (after authentication) with 200
///   and server statistics; we do not offer statistics and answer 502 "Not
///   implemented" instead.
/// * Any other type (or none): taskd throws 500 → 500 "Syntax error in
///   request".
/// * Missing/empty org, user or key: taskd's `Database::authenticate` fails
///   (directory or config lookup) → 430 "Access denied". The caller must
///   still authenticate the returned credentials (430 / 431) itself; taskd
///   authenticates *before* checking the protocol, so a caller wanting the
///   exact precedence should authenticate before acting on a protocol error.
/// * `protocol` other than `v1`: `taskd_requireHeader` throws → 500 "ERROR:
///   Message protocol should be 'v1'".
pub fn check_request(msg: &Message) -> Result<Credentials, SyncError> {
    match header_or_empty(msg, "type") {
        "sync" => {}
        "statistics" => {
            return Err(SyncError {
                code: 502,
                status: "Not implemented".to_string(),
            });
        }
        _ => {
            return Err(SyncError {
                code: 500,
                status: "Syntax error in request".to_string(),
            });
        }
    }
    let org = header_or_empty(msg, "org");
    let user = header_or_empty(msg, "user");
    let key = header_or_empty(msg, "key");
    if org.is_empty() || user.is_empty() || key.is_empty() {
        return Err(SyncError {
            code: 430,
            status: "Access denied".to_string(),
        });
    }
    if header_or_empty(msg, "protocol") != "v1" {
        return Err(fail("ERROR: Message protocol should be 'v1'".to_string()));
    }
    Ok(Credentials {
        org: org.to_string(),
        user: user.to_string(),
        key: key.to_string(),
        init: header_or_empty(msg, "subtype") == "init",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "11111111-1111-4111-8111-111111111111";
    const K2: &str = "22222222-2222-4222-8222-222222222222";
    const U: &str = "a0000000-0000-4000-8000-000000000001";
    const T0: &str = "20261203T100000Z";

    fn task_line(uuid: &str, description: &str, modified: &str) -> String {
        format!(
            "{{\"description\":\"{description}\",\"entry\":\"{T0}\",\"modified\":\"{modified}\",\"status\":\"pending\",\"uuid\":\"{uuid}\"}}"
        )
    }

    #[test]
    fn frame_len_limits() {
        assert_eq!(
            frame_len((1u32 << 31).to_be_bytes(), MAX_REQUEST),
            Err(FrameError::TooLarge(1 << 31))
        );
        assert_eq!(
            frame_len([0xff; 4], MAX_REQUEST),
            Err(FrameError::TooLarge(u64::from(u32::MAX)))
        );
        assert_eq!(
            frame_len([0, 0, 0, 0], MAX_REQUEST),
            Err(FrameError::TooShort)
        );
        assert_eq!(
            frame_len([0, 0, 0, 3], MAX_REQUEST),
            Err(FrameError::TooShort)
        );
        assert_eq!(frame_len([0, 0, 0, 4], MAX_REQUEST), Ok(4));
        assert_eq!(frame_len([0, 0, 1, 0], 256), Ok(256));
        assert_eq!(frame_len([0, 0, 1, 1], 256), Err(FrameError::TooLarge(257)));
        let exact = u32::try_from(MAX_REQUEST).unwrap().to_be_bytes();
        assert_eq!(frame_len(exact, MAX_REQUEST), Ok(MAX_REQUEST));
        assert!(!FrameError::TooShort.to_string().is_empty());
    }

    #[test]
    fn encode_exact_bytes() {
        let bytes = reply(200, "Ok", "K\n".to_string()).encode();
        assert_eq!(&bytes[..4], &29u32.to_be_bytes());
        assert_eq!(&bytes[4..], b"code: 200\nstatus: Ok\n\nK\n\n");
    }

    #[test]
    fn parse_encode_round_trip() {
        let mut m = reply(201, "No change", format!("{K1}\n"));
        m.headers
            .insert("client".to_string(), "granary".to_string());
        let bytes = m.encode();
        let n = frame_len([bytes[0], bytes[1], bytes[2], bytes[3]], MAX_REQUEST).unwrap();
        assert_eq!(n, bytes.len());
        let back = Message::parse(&bytes[4..]).unwrap();
        assert_eq!(back.headers, m.headers);
        assert_eq!(back.header("code"), Some("201"));
        assert_eq!(back.header("status"), Some("No change"));
        assert_eq!(back.header("nope"), None);
        // taskd's serialize adds one newline after the payload.
        assert_eq!(back.payload, format!("{K1}\n\n"));
        // Headers come out sorted.
        let text = String::from_utf8(bytes[4..].to_vec()).unwrap();
        assert!(text.starts_with("client: granary\ncode: 201\nstatus: No change\n\n"));
    }

    #[test]
    fn parse_client_request() {
        let body = format!(
            "client: task 2.6.2\nkey: {K2}\norg: Public\nprotocol: v1\ntype: sync\nuser: alice\n\n{}\n{K1}\n\n",
            task_line(U, "x", T0)
        );
        let m = Message::parse(body.as_bytes()).unwrap();
        assert_eq!(m.header("client"), Some("task 2.6.2"));
        assert_eq!(m.payload, format!("{}\n{K1}\n\n", task_line(U, "x", T0)));
        let c = check_request(&m).unwrap();
        assert_eq!(
            c,
            Credentials {
                org: "Public".to_string(),
                user: "alice".to_string(),
                key: K2.to_string(),
                init: false,
            }
        );
    }

    #[test]
    fn parse_trims_and_splits_at_first_colon() {
        let m =
            Message::parse(b"  type :  sync \r\ninfo: host:53589\n\npay: load\n\nmore").unwrap();
        assert_eq!(m.header("type"), Some("sync"));
        assert_eq!(m.header("info"), Some("host:53589"));
        assert_eq!(m.payload, "pay: load\n\nmore");
        // Later duplicates win, like std::map assignment.
        let m = Message::parse(b"a: 1\na: 2\n\n").unwrap();
        assert_eq!(m.header("a"), Some("2"));
        assert_eq!(m.payload, "");
        // No headers at all is accepted, as in libshared.
        let m = Message::parse(b"\n\nx").unwrap();
        assert!(m.headers.is_empty());
        assert_eq!(m.payload, "x");
    }

    #[test]
    fn parse_errors() {
        assert_eq!(
            Message::parse(b"type: sync\n").unwrap_err(),
            "Malformed message"
        );
        assert_eq!(
            Message::parse(b"type: sync\nbogus\n\n").unwrap_err(),
            "Malformed message header 'bogus'"
        );
        assert_eq!(
            Message::parse(b"\ntype: sync\n\n").unwrap_err(),
            "Malformed message header ''"
        );
        assert!(Message::parse(b"type: \xff\n\n").is_err());
    }

    // --- request checks ----------------------------------------------------

    fn request(pairs: &[(&str, &str)]) -> Message {
        let mut m = Message::default();
        for (k, v) in pairs {
            m.headers.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn check_request_cases() {
        let good = [
            ("type", "sync"),
            ("protocol", "v1"),
            ("org", "Public"),
            ("user", "alice"),
            ("key", K1),
            ("subtype", "init"),
        ];
        let c = check_request(&request(&good)).unwrap();
        assert!(c.init);
        assert_eq!(c.org, "Public");

        let e = check_request(&request(&[("type", "statistics")])).unwrap_err();
        assert_eq!((e.code, e.status.as_str()), (502, "Not implemented"));

        let e = check_request(&request(&[("type", "frobnicate")])).unwrap_err();
        assert_eq!(
            (e.code, e.status.as_str()),
            (500, "Syntax error in request")
        );
        let e = check_request(&request(&[])).unwrap_err();
        assert_eq!(e.code, 500);

        let e = check_request(&request(&good[..4])).unwrap_err();
        assert_eq!((e.code, e.status.as_str()), (430, "Access denied"));
        let e = check_request(&request(&[
            ("type", "sync"),
            ("protocol", "v1"),
            ("org", "Public"),
            ("user", ""),
            ("key", K1),
        ]))
        .unwrap_err();
        assert_eq!(e.code, 430);

        let e = check_request(&request(&[
            ("type", "sync"),
            ("protocol", "v2"),
            ("org", "Public"),
            ("user", "alice"),
            ("key", K1),
        ]))
        .unwrap_err();
        assert_eq!(
            (e.code, e.status.as_str()),
            (500, "ERROR: Message protocol should be 'v1'")
        );
    }

    // --- sync --------------------------------------------------------------
}
