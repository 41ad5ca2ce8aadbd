use super::*;

/// Drives a session over `input` as the gateway does, accepting
/// recipients that start with "ok" and every sender and message; returns
/// the bytes written, the messages received, and whether STARTTLS began.
struct Run {
    out: String,
    messages: Vec<(Vec<u8>, bool)>,
    starttls_at: Option<usize>,
    closed: bool,
}

fn drive(session: &mut Session, input: &[u8]) -> Run {
    drive_with(session, input, &mut Vec::new())
}

/// [`drive`], keeping a message's bytes received so far in `current`
/// across calls.
fn drive_with(session: &mut Session, input: &[u8], current: &mut Vec<u8>) -> Run {
    let mut out = Vec::new();
    let mut messages = Vec::new();
    let mut pos = 0;
    let mut run_starttls = None;
    let mut closed = false;
    loop {
        let (used, event) = session.step(&input[pos..]);
        pos += used;
        match event {
            Event::NeedMore => break,
            Event::Reply(r) => r.write(&mut out),
            Event::StartTls(r) => {
                r.write(&mut out);
                run_starttls = Some(pos);
                break;
            }
            Event::Sender(s) => session.sender_verdict(&s, Ok(())).write(&mut out),
            Event::Recipient(r) => {
                let verdict = if r.starts_with("ok") {
                    Ok(())
                } else {
                    Err(Reply::new(550, "5.1.1", "No such user"))
                };
                session.recipient_verdict(&r, verdict).write(&mut out)
            }
            Event::Data(d) => current.extend_from_slice(&d),
            Event::MessageEnd { too_big } => {
                messages.push((std::mem::take(current), too_big));
                session.message_done();
                let r = if too_big {
                    Reply::new(552, "5.3.4", "Too big")
                } else {
                    Reply::new(250, "2.0.0", "Queued")
                };
                r.write(&mut out);
            }
            Event::Auth { login, password } => {
                let verdict = if login.starts_with("ok") && password.0 == "secret" {
                    Ok(login)
                } else {
                    Err(Reply::new(535, "5.7.8", "Invalid credentials"))
                };
                session.auth_verdict(verdict).write(&mut out)
            }
            Event::Close(r) => {
                r.write(&mut out);
                closed = true;
                break;
            }
        }
    }
    Run {
        out: String::from_utf8(out).unwrap(),
        messages,
        starttls_at: run_starttls,
        closed,
    }
}

fn session() -> Session {
    Session::new(Limits {
        hostname: "mx.example.org".into(),
        max_message_bytes: 1000,
        max_recipients: 3,
        starttls: true,
        submission: false,
    })
}

#[test]
fn a_pipelined_transaction_gets_every_reply_in_order() {
    let mut s = session();
    let r = drive(
        &mut s,
        b"EHLO client.example\r\nMAIL FROM:<a@remote.example> BODY=8BITMIME\r\nRCPT TO:<ok1@example.org>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n",
    );
    assert!(
        r.out
            .starts_with("250-mx.example.org Hello\r\n250-PIPELINING\r\n"),
        "{}",
        r.out
    );
    for cap in [
        "8BITMIME",
        "SMTPUTF8",
        "SIZE 1000",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
    ] {
        assert!(r.out.contains(cap), "{cap} in {}", r.out);
    }
    assert!(r.out.ends_with("250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n550 5.1.1 No such user\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n"), "{}", r.out);
    let r = drive(&mut s, b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n");
    assert_eq!(
        r.messages,
        vec![(b"Subject: x\r\n\r\n.dot\r\n".to_vec(), false)]
    );
    assert_eq!(r.out, "250 2.0.0 Queued\r\n221 2.0.0 Bye\r\n");
    assert!(r.closed);
}

#[test]
fn data_split_at_every_byte_is_the_same_message() {
    let body = b"Subject: split\r\n\r\nline\r\n.\r\n";
    for cut in 0..body.len() {
        let mut s = session();
        drive(
            &mut s,
            b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<ok@example.org>\r\nDATA\r\n",
        );
        let mut current = Vec::new();
        let mut got = drive_with(&mut s, &body[..cut], &mut current).messages;
        got.extend(drive_with(&mut s, &body[cut..], &mut current).messages);
        assert_eq!(got.len(), 1, "cut at {cut}");
        assert_eq!(got[0].0, b"Subject: split\r\n\r\nline\r\n", "cut at {cut}");
    }
}

#[test]
fn bdat_chunks_pipelined_with_their_commands() {
    let mut s = session();
    let r = drive(
        &mut s,
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<ok@example.org>\r\nBDAT 5\r\nHelloBDAT 9 LAST\r\n, world\r\n",
    );
    assert!(
        r.out
            .ends_with("250 2.0.0 5 octets received\r\n250 2.0.0 Queued\r\n"),
        "{}",
        r.out
    );
    assert_eq!(r.messages, vec![(b"Hello, world\r\n".to_vec(), false)]);
}

#[test]
fn starttls_stops_at_its_own_line() {
    let mut s = session();
    let input = b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n";
    let r = drive(&mut s, input);
    assert!(
        r.out.ends_with("220 2.0.0 Ready to start TLS\r\n"),
        "{}",
        r.out
    );
    // The NOOP after it was never looked at: the driver drops it.
    assert_eq!(&input[r.starttls_at.unwrap()..], b"NOOP\r\n");
    s.tls_started();
    let r = drive(&mut s, b"MAIL FROM:<a@b.example>\r\nEHLO c\r\n");
    assert!(
        r.out.starts_with("503 5.5.1 Say EHLO first\r\n"),
        "{}",
        r.out
    );
    assert!(!r.out.contains("STARTTLS"), "{}", r.out);
    let r = drive(&mut s, b"STARTTLS\r\n");
    assert_eq!(r.out, "503 5.5.1 TLS is already active\r\n");
}

#[test]
fn limits_are_enforced_with_the_right_codes() {
    let mut s = session();
    let r = drive(&mut s, b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=5000\r\n");
    assert!(
        r.out
            .ends_with("552 5.3.4 Message too big: this server takes at most 1000 bytes\r\n"),
        "{}",
        r.out
    );
    let r = drive(
        &mut s,
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<ok1@x.example>\r\nRCPT TO:<ok2@x.example>\r\nRCPT TO:<ok3@x.example>\r\nRCPT TO:<ok4@x.example>\r\n",
    );
    assert!(
        r.out.ends_with("452 4.5.3 Too many recipients\r\n"),
        "{}",
        r.out
    );
    let mut big = b"DATA\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 5000));
    big.extend_from_slice(b"\r\n.\r\n");
    let r = drive(&mut s, &big);
    assert_eq!(r.messages.len(), 1);
    assert!(r.messages[0].1, "too big");
    assert!(r.messages[0].0.len() <= 1000);
    assert!(r.out.ends_with("552 5.3.4 Too big\r\n"), "{}", r.out);
}

#[test]
fn bad_commands_are_refused_then_the_session_ends() {
    let mut s = session();
    let r = drive(
        &mut s,
        b"DATA\r\nRCPT TO:<x@y.example>\r\nAUTH PLAIN AGFAAGI=\r\n",
    );
    assert_eq!(
        r.out,
        "503 5.5.1 Need MAIL before DATA\r\n503 5.5.1 Need MAIL before RCPT\r\n503 5.5.1 AUTH is not offered on the MX; use the submission port\r\n"
    );
    let mut long = vec![b'A'; 10_000];
    long.extend_from_slice(b"\r\n");
    let r = drive(&mut s, &long);
    assert_eq!(r.out, "500 5.5.2 Line too long\r\n");
    let r = drive(&mut s, &b"XYZZY\r\n".repeat(20));
    assert!(r.closed);
    assert!(
        r.out.ends_with("421 4.7.0 Too many errors, closing\r\n"),
        "{}",
        r.out
    );
}

#[test]
fn the_data_line_ends_a_line_so_an_empty_message_ends_and_a_first_dot_is_unstuffed() {
    let mut s = session();
    let r = drive(
        &mut s,
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<ok@x.example>\r\nDATA\r\n.\r\n\
MAIL FROM:<a@b.example>\r\nRCPT TO:<ok@x.example>\r\nDATA\r\n..x\r\ny\r\n.\r\n",
    );
    assert_eq!(r.messages.len(), 2, "{}", r.out);
    assert_eq!(r.messages[0].0, b"");
    assert_eq!(r.messages[1].0, b".x\r\ny\r\n");
}

#[test]
fn a_refused_chunk_is_thrown_away_not_added_to_the_next_message() {
    let mut s = session();
    let r = drive(
        &mut s,
        b"EHLO c.example\r\nBDAT 5\r\nhelloMAIL FROM:<a@b.example>\r\nRCPT TO:<ok@x.example>\r\n\
BDAT 3 LAST\r\nabc",
    );
    assert!(
        r.out.contains("503 5.5.1 Need MAIL before BDAT"),
        "{}",
        r.out
    );
    assert_eq!(r.messages.len(), 1, "{}", r.out);
    assert_eq!(r.messages[0].0, b"abc");
}

#[test]
fn bare_postmaster_is_a_recipient() {
    let mut s = session();
    drive(&mut s, b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n");
    let (_, event) = s.step(b"RCPT TO:<PostMaster>\r\n");
    assert!(
        matches!(event, Event::Recipient(ref r) if r == "postmaster"),
        "{event:?}"
    );
    s.recipient_verdict("postmaster", Ok(()));
    let (_, event) = s.step(b"RCPT TO: <postmaster>\r\n");
    assert!(
        matches!(event, Event::Recipient(ref r) if r == "postmaster"),
        "{event:?}"
    );
    let mut s = session();
    let (_, event) = s.step(b"RCPT TO:<postmaster>\r\n");
    assert!(
        matches!(event, Event::Reply(_)),
        "needs MAIL first: {event:?}"
    );
}

fn submission() -> Session {
    Session::new(Limits {
        hostname: "mail.example.org".into(),
        max_message_bytes: 1000,
        max_recipients: 3,
        starttls: true,
        submission: true,
    })
}

fn b64(s: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn submission_offers_auth_only_under_tls_and_mail_needs_it() {
    let mut s = submission();
    let r = drive(
        &mut s,
        format!(
            "EHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<ok@example.org>\r\n",
            b64(b"\0ok\0secret")
        )
        .as_bytes(),
    );
    assert!(!r.out.contains("AUTH"), "{}", r.out.lines().next().unwrap());
    assert!(r.out.contains("250 STARTTLS\r\n"), "{}", r.out);
    assert!(r.out.contains("538 5.7.11 "), "{}", r.out);
    assert!(
        r.out.ends_with("530 5.7.0 Authentication required\r\n"),
        "{}",
        r.out
    );
    s.tls_started();
    let r = drive(
        &mut s,
        format!(
            "EHLO c\r\nMAIL FROM:<ok@example.org>\r\nAUTH PLAIN {}\r\nEHLO c\r\n\
MAIL FROM:<ok@example.org> AUTH=<>\r\nRCPT TO:<ok@x.example>\r\nDATA\r\nhi\r\n.\r\n",
            b64(b"\0ok\0secret")
        )
        .as_bytes(),
    );
    assert!(r.out.contains("250 AUTH PLAIN LOGIN\r\n"), "{}", r.out);
    assert!(r.out.contains("530 5.7.0"), "{}", r.out);
    assert!(
        r.out.contains("235 2.7.0 Authentication successful\r\n"),
        "{}",
        r.out
    );
    assert_eq!(s.user(), Some("ok"));
    assert_eq!(r.messages.len(), 1, "{}", r.out);
    // Logged in, EHLO no longer offers AUTH, and a second AUTH is refused.
    let r = drive(&mut s, b"EHLO c\r\nAUTH LOGIN\r\n");
    assert!(!r.out.contains("AUTH PLAIN"), "{}", r.out);
    assert!(
        r.out.ends_with("503 5.5.1 Already authenticated\r\n"),
        "{}",
        r.out
    );
}

#[test]
fn auth_login_and_plain_without_initial_response_and_cancel() {
    let mut s = submission();
    s.tls_started();
    let r = drive(
        &mut s,
        format!(
            "EHLO c\r\nAUTH LOGIN\r\n{}\r\n*\r\nAUTH PLAIN\r\n{}\r\nAUTH LOGIN {}\r\n{}\r\n",
            b64(b"ok"),
            b64(b"\0ok\0wrong"),
            b64(b"okay"),
            b64(b"secret"),
        )
        .as_bytes(),
    );
    assert!(
        r.out.contains("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n501 5.0.0 Authentication cancelled\r\n334 \r\n535 5.7.8 Invalid credentials\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0"),
        "{}",
        r.out
    );
    assert_eq!(s.user(), Some("okay"));
    let mut s = submission();
    s.tls_started();
    let r = drive(&mut s, b"EHLO c\r\nAUTH CRAM-MD5\r\nAUTH PLAIN !!!\r\n");
    assert!(r.out.contains("504 5.5.4"), "{}", r.out);
    assert!(r.out.contains("501 5.5.2"), "{}", r.out);
}

#[test]
fn three_failed_logins_end_the_session() {
    let mut s = submission();
    s.tls_started();
    let bad = format!("AUTH PLAIN {}\r\n", b64(b"\0ok\0nope"));
    let r = drive(&mut s, format!("EHLO c\r\n{}", bad.repeat(4)).as_bytes());
    assert!(r.closed);
    assert_eq!(r.out.matches("535 5.7.8").count(), 3, "{}", r.out);
    assert!(
        r.out
            .ends_with("421 4.7.0 Too many failed logins, closing\r\n"),
        "{}",
        r.out
    );
}

#[test]
fn the_mx_never_offers_or_takes_auth() {
    let mut s = session();
    s.tls_started();
    let r = drive(
        &mut s,
        format!("EHLO c\r\nAUTH PLAIN {}\r\n", b64(b"\0ok\0secret")).as_bytes(),
    );
    assert!(!r.out.contains("AUTH PLAIN"), "{}", r.out);
    assert!(
        r.out.contains("503 5.5.1 AUTH is not offered on the MX"),
        "{}",
        r.out
    );
    assert_eq!(s.user(), None);
}
