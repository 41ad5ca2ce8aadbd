//! IMAP before login, as the gateway reads it: CAPABILITY, ID, NOOP,
//! LOGOUT, STARTTLS, LOGIN (atoms, quoted strings and literals, LITERAL+)
//! and AUTHENTICATE PLAIN (with and without SASL-IR, `=` for an empty
//! response, `*` to cancel). Everything else is refused until login.
//!
//! Sans-IO: [`parse`] looks at the bytes received so far and says what
//! they are, or that it needs more, or that a synchronising literal waits
//! for the server's `+` before the client sends its data.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The longest command line (and literal) taken before login: names and
/// passwords are short.
pub const MAX_PRE_LOGIN: usize = 8 << 10;

/// A command before login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capability,
    Noop,
    Logout,
    StartTls,
    Id,
    Login {
        user: String,
        password: String,
    },
    /// AUTHENTICATE with its mechanism (uppercase) and the initial
    /// response: `None` without SASL-IR, `Some(empty)` for `=`.
    Authenticate {
        mechanism: String,
        initial: Option<Vec<u8>>,
    },
    /// A command that needs a login first (its name, uppercase).
    NeedsLogin(String),
}

/// What the bytes received so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command, using `consumed` bytes.
    Command {
        tag: String,
        command: Command,
        consumed: usize,
    },
    /// Not a whole command yet: read more.
    Incomplete,
    /// A synchronising literal starts at `at`: send `+` once for this
    /// offset, then read more.
    Continue { at: usize },
    /// Not a valid command; answer `tag BAD why` and drop `consumed`
    /// bytes. `close` when the connection cannot be kept in step.
    Bad {
        tag: String,
        why: &'static str,
        consumed: usize,
        close: bool,
    },
}

/// One argument: an atom or a string (quoted or literal), or a list.
#[derive(Debug)]
enum Arg {
    Atom(Vec<u8>),
    Str(Vec<u8>),
    List,
}

enum Step {
    Arg(Arg),
    End(usize),
    More,
    Continue(usize),
    Bad(&'static str),
}

/// The next argument at `*pos` (after the space before it).
fn next_arg(input: &[u8], pos: &mut usize) -> Step {
    if input.get(*pos) == Some(&b' ') {
        *pos += 1;
    }
    match input.get(*pos) {
        None => Step::More,
        Some(b'\r') => match input.get(*pos + 1) {
            None => Step::More,
            Some(b'\n') => Step::End(*pos + 2),
            Some(_) => Step::Bad("stray CR"),
        },
        Some(b'\n') => Step::End(*pos + 1),
        Some(b'"') => {
            let mut out = Vec::new();
            let mut i = *pos + 1;
            loop {
                match input.get(i) {
                    None => return Step::More,
                    Some(b'"') => {
                        *pos = i + 1;
                        return Step::Arg(Arg::Str(out));
                    }
                    Some(b'\\') => match input.get(i + 1) {
                        None => return Step::More,
                        Some(&c @ (b'"' | b'\\')) => {
                            out.push(c);
                            i += 2;
                        }
                        Some(_) => return Step::Bad("bad escape in a quoted string"),
                    },
                    Some(b'\r' | b'\n' | 0) => return Step::Bad("line break in a quoted string"),
                    Some(&c) => {
                        out.push(c);
                        i += 1;
                    }
                }
                if out.len() > MAX_PRE_LOGIN {
                    return Step::Bad("string too long");
                }
            }
        }
        Some(b'{') => {
            let Some(close) = input[*pos..].iter().position(|&b| b == b'}') else {
                return if input.len() - *pos > 24 {
                    Step::Bad("bad literal")
                } else {
                    Step::More
                };
            };
            let spec = &input[*pos + 1..*pos + close];
            let (digits, sync) = match spec.strip_suffix(b"+") {
                Some(d) => (d, false),
                None => (spec, true),
            };
            if digits.is_empty() || digits.len() > 6 || !digits.iter().all(u8::is_ascii_digit) {
                return Step::Bad("bad literal");
            }
            let n: usize = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(usize::MAX);
            if n > MAX_PRE_LOGIN {
                return Step::Bad("literal too long");
            }
            let crlf = *pos + close + 1;
            match input.get(crlf..crlf + 2) {
                None => return Step::More,
                Some(b"\r\n") => {}
                Some(_) => return Step::Bad("bad literal"),
            }
            let data = crlf + 2;
            match input.get(data..data + n) {
                Some(d) => {
                    *pos = data + n;
                    Step::Arg(Arg::Str(d.to_vec()))
                }
                None if sync => Step::Continue(data),
                None => Step::More,
            }
        }
        Some(b'(') => {
            // Only ID takes a list before login; its contents are ignored.
            let mut depth = 0usize;
            let mut i = *pos;
            while let Some(&c) = input.get(i) {
                match c {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            *pos = i + 1;
                            return Step::Arg(Arg::List);
                        }
                    }
                    b'\r' | b'\n' => return Step::Bad("unbalanced list"),
                    _ => {}
                }
                i += 1;
            }
            Step::More
        }
        Some(_) => {
            let start = *pos;
            let mut i = start;
            while let Some(&c) = input.get(i) {
                if matches!(c, b' ' | b'\r' | b'\n' | b'(' | b')' | b'{' | b'"')
                    || !(0x20..0x7f).contains(&c)
                {
                    break;
                }
                i += 1;
            }
            if i == input.len() {
                return Step::More;
            }
            if i == start {
                return Step::Bad("unexpected character");
            }
            *pos = i;
            Step::Arg(Arg::Atom(input[start..i].to_vec()))
        }
    }
}

/// Looks at what the client sent so far (from the start of a command).
pub fn parse(input: &[u8]) -> Parsed {
    let line_end = input.iter().position(|&b| b == b'\n');
    let tag_end = input
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n');
    let Some(tag_end) = tag_end else {
        return if input.len() > MAX_PRE_LOGIN {
            bad_close("*", input.len())
        } else {
            Parsed::Incomplete
        };
    };
    let tag_bytes = &input[..tag_end];
    let tag_ok = !tag_bytes.is_empty()
        && tag_bytes.len() <= 64
        && tag_bytes
            .iter()
            .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
    let skip_line = |why| match line_end {
        Some(e) => Parsed::Bad {
            tag: if tag_ok {
                String::from_utf8_lossy(tag_bytes).into_owned()
            } else {
                "*".to_owned()
            },
            why,
            consumed: e + 1,
            close: false,
        },
        None if input.len() > MAX_PRE_LOGIN => bad_close("*", input.len()),
        None => Parsed::Incomplete,
    };
    if !tag_ok {
        return skip_line("invalid tag");
    }
    let tag = String::from_utf8_lossy(tag_bytes).into_owned();
    let mut pos = tag_end;
    let mut args: Vec<Arg> = Vec::new();
    let consumed = loop {
        match next_arg(input, &mut pos) {
            Step::Arg(a) => {
                if args.len() >= 8 {
                    return skip_line("too many arguments");
                }
                args.push(a);
            }
            Step::End(at) => break at,
            Step::More if input.len() > MAX_PRE_LOGIN * 3 => return bad_close(&tag, input.len()),
            Step::More => return Parsed::Incomplete,
            Step::Continue(at) => return Parsed::Continue { at },
            Step::Bad(why) => {
                // A literal we cannot take leaves the stream out of step.
                let close = why == "literal too long" || why == "bad literal";
                return match (close, line_end) {
                    (false, Some(e)) => Parsed::Bad {
                        tag,
                        why,
                        consumed: e + 1,
                        close: false,
                    },
                    // A bad argument with no end of line yet: wait for
                    // it, but not for ever.
                    (false, None) if input.len() > MAX_PRE_LOGIN * 3 => {
                        bad_close(&tag, input.len())
                    }
                    (false, None) => Parsed::Incomplete,
                    (true, _) => Parsed::Bad {
                        tag,
                        why,
                        consumed: input.len(),
                        close: true,
                    },
                };
            }
        }
    };
    let bad = |why| Parsed::Bad {
        tag: tag.clone(),
        why,
        consumed,
        close: false,
    };
    let mut it = args.into_iter();
    let Some(Arg::Atom(name)) = it.next() else {
        return bad("missing command");
    };
    let name = String::from_utf8_lossy(&name).to_ascii_uppercase();
    let rest: Vec<Arg> = it.collect();
    let no_args = |c: Command| -> Parsed {
        if rest.is_empty() {
            Parsed::Command {
                tag: tag.clone(),
                command: c,
                consumed,
            }
        } else {
            bad("unexpected arguments")
        }
    };
    let command = match name.as_str() {
        "CAPABILITY" => return no_args(Command::Capability),
        "NOOP" => return no_args(Command::Noop),
        "LOGOUT" => return no_args(Command::Logout),
        "STARTTLS" => return no_args(Command::StartTls),
        "ID" => match rest.as_slice() {
            [Arg::List] | [Arg::Atom(_)] => Command::Id,
            _ => return bad("ID takes a parameter list or NIL"),
        },
        "LOGIN" => match rest.as_slice() {
            [u, p] => {
                let text = |a: &Arg| match a {
                    Arg::Atom(b) | Arg::Str(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    Arg::List => None,
                };
                match (text(u), text(p)) {
                    (Some(user), Some(password)) => Command::Login { user, password },
                    _ => return bad("LOGIN takes a user name and a password"),
                }
            }
            _ => return bad("LOGIN takes a user name and a password"),
        },
        "AUTHENTICATE" => {
            let (mech, initial) = match rest.as_slice() {
                [Arg::Atom(m)] => (m, None),
                [Arg::Atom(m), Arg::Atom(ir)] => (m, Some(ir)),
                _ => return bad("AUTHENTICATE takes a mechanism and an optional initial response"),
            };
            let initial = match initial {
                None => None,
                Some(ir) if ir.as_slice() == b"=" => Some(Vec::new()),
                Some(ir) => match STANDARD.decode(ir) {
                    Ok(d) => Some(d),
                    Err(_) => return bad("the initial response is not base64"),
                },
            };
            Command::Authenticate {
                mechanism: String::from_utf8_lossy(mech).to_ascii_uppercase(),
                initial,
            }
        }
        other
            if other
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
        {
            Command::NeedsLogin(other.to_owned())
        }
        _ => return bad("unknown command"),
    };
    Parsed::Command {
        tag,
        command,
        consumed,
    }
}

fn bad_close(tag: &str, consumed: usize) -> Parsed {
    Parsed::Bad {
        tag: tag.to_owned(),
        why: "line too long",
        consumed,
        close: true,
    }
}

/// A SASL response that is not base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the response is not base64")]
pub struct NotBase64;

/// A client's answer to an AUTHENTICATE continuation (a line, CRLF
/// included): `Ok(None)` for `*` (cancel), else the decoded response.
pub fn sasl_response(line: &[u8]) -> Result<Option<Vec<u8>>, NotBase64> {
    let line = line.strip_suffix(b"\n").ok_or(NotBase64)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"*" {
        return Ok(None);
    }
    if line.is_empty() || line == b"=" {
        return Ok(Some(Vec::new()));
    }
    STANDARD.decode(line).map(Some).map_err(|_| NotBase64)
}

/// SASL PLAIN (RFC 4616): `authzid NUL authcid NUL password`. The
/// identity to log in as, and the password; an authzid other than the
/// authcid (acting for someone else) is refused.
pub fn sasl_plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|&b| b == 0);
    let authz = parts.next()?;
    let user = parts.next()?;
    let password = parts.next()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    if !authz.is_empty() && authz != user {
        return None;
    }
    let user = String::from_utf8(user.to_vec()).ok()?;
    let password = String::from_utf8(password.to_vec()).ok()?;
    Some((user, password))
}

/// The capabilities in a greeting `* OK [CAPABILITY ...] text` (what the
/// mail grain offers a logged-in client).
pub fn greeting_capabilities(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("* OK [CAPABILITY ")?;
    let end = rest.find(']')?;
    let caps = &rest[..end];
    caps.bytes()
        .all(|b| b.is_ascii_graphic() || b == b' ')
        .then(|| caps.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(input: &[u8]) -> (String, Command, usize) {
        match parse(input) {
            Parsed::Command {
                tag,
                command,
                consumed,
            } => (tag, command, consumed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn logins_in_every_string_form() {
        let (tag, c, n) = command(b"a1 LOGIN alice \"p\\\"w d\"\r\nrest");
        assert_eq!(tag, "a1");
        assert_eq!(
            c,
            Command::Login {
                user: "alice".into(),
                password: "p\"w d".into()
            }
        );
        assert_eq!(n, 25);
        // A synchronising literal waits for the server's "+".
        let input = b"a2 login {5}\r\n";
        assert_eq!(parse(input), Parsed::Continue { at: 14 });
        let input = b"a2 login {5}\r\nalice {3+}\r\npwd\r\n";
        assert_eq!(
            command(input).1,
            Command::Login {
                user: "alice".into(),
                password: "pwd".into()
            }
        );
        assert_eq!(
            parse(b"a2 login {5}\r\nalice {3+}\r\npw"),
            Parsed::Incomplete
        );
    }

    #[test]
    fn authenticate_plain_with_and_without_initial_response() {
        let (_, c, _) = command(b"a AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\r\n");
        let Command::Authenticate { mechanism, initial } = c else {
            panic!()
        };
        assert_eq!(mechanism, "PLAIN");
        assert_eq!(
            sasl_plain(&initial.unwrap()),
            Some(("alice".into(), "secret".into()))
        );
        let (_, c, _) = command(b"a authenticate plain\r\n");
        assert_eq!(
            c,
            Command::Authenticate {
                mechanism: "PLAIN".into(),
                initial: None
            }
        );
        let (_, c, _) = command(b"a AUTHENTICATE PLAIN =\r\n");
        assert_eq!(
            c,
            Command::Authenticate {
                mechanism: "PLAIN".into(),
                initial: Some(Vec::new())
            }
        );
        assert_eq!(sasl_response(b"*\r\n"), Ok(None));
        assert_eq!(
            sasl_response(b"AGFsaWNlAHNlY3JldA==\r\n").unwrap().unwrap(),
            b"\0alice\0secret"
        );
        assert_eq!(sasl_plain(b"bob\0alice\0secret"), None);
    }

    #[test]
    fn other_commands_and_bad_input() {
        assert_eq!(command(b"x CAPABILITY\r\n").1, Command::Capability);
        assert_eq!(command(b"x STARTTLS\r\nNOOP\r\n").2, 12);
        assert_eq!(
            command(b"x ID (\"name\" \"Thunderbird\")\r\n").1,
            Command::Id
        );
        assert_eq!(
            command(b"x SELECT INBOX\r\n").1,
            Command::NeedsLogin("SELECT".into())
        );
        assert!(matches!(
            parse(b"x LOGIN onlyone\r\n"),
            Parsed::Bad {
                consumed: 17,
                close: false,
                ..
            }
        ));
        assert!(matches!(
            parse(b"x LOGIN {99999999}\r\n"),
            Parsed::Bad { close: true, .. }
        ));
        assert!(matches!(parse(b"* NOOP\r\n"), Parsed::Bad { tag, .. } if tag == "*"));
        assert_eq!(parse(b"x NOO"), Parsed::Incomplete);
        let long = vec![b'a'; MAX_PRE_LOGIN + 10];
        assert!(matches!(parse(&long), Parsed::Bad { close: true, .. }));
        // A bad argument whose line never ends is not buffered for ever.
        let mut open = b"x LOGIN \"".to_vec();
        open.resize(MAX_PRE_LOGIN * 3 + 10, b'a');
        assert!(matches!(parse(&open), Parsed::Bad { close: true, .. }));
        assert_eq!(parse(&open[..MAX_PRE_LOGIN * 2]), Parsed::Incomplete);
        assert_eq!(
            greeting_capabilities(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n").as_deref(),
            Some("IMAP4rev1 IDLE")
        );
    }
}
