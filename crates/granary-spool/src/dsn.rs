//! Delivery status notifications (RFC 3464): the bounce a sender gets when
//! a message could not be delivered.

use crate::entry::Envelope;

/// An RFC 5322 date for unix seconds (UTC).
pub(crate) fn rfc5322_date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc2822)
                .ok()
        })
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".to_owned())
}

/// Which notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Notice {
    /// The recipients will never get it.
    Failed,
    /// Still being retried, until `until` (unix seconds).
    Delayed { until: i64 },
}

/// A `multipart/report` for `failed` (address, `x.y.z reason`), quoting the
/// original `headers`.
pub(crate) fn build(
    hostname: &str,
    envelope: &Envelope,
    failed: &[(String, String)],
    headers: &[u8],
    now: i64,
    notice: Notice,
) -> Vec<u8> {
    let boundary = format!("{}/{}", envelope.id, hostname);
    let date = rfc5322_date(now);
    let mut m = String::new();
    let line = |m: &mut String, l: &str| {
        m.push_str(l);
        m.push_str("\r\n");
    };
    line(
        &mut m,
        &format!("From: Mail Delivery System <MAILER-DAEMON@{hostname}>"),
    );
    line(&mut m, &format!("To: <{}>", envelope.from));
    line(
        &mut m,
        match notice {
            Notice::Failed => "Subject: Undelivered Mail Returned to Sender",
            Notice::Delayed { .. } => "Subject: Delayed Mail (still being retried)",
        },
    );
    line(&mut m, &format!("Date: {date}"));
    line(
        &mut m,
        &format!(
            "Message-ID: <{}.{}@{hostname}>",
            envelope.id,
            match notice {
                Notice::Failed => "bounce",
                Notice::Delayed { .. } => "delay",
            }
        ),
    );
    line(&mut m, "Auto-Submitted: auto-replied");
    line(&mut m, "MIME-Version: 1.0");
    line(
        &mut m,
        &format!(
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""
        ),
    );
    line(&mut m, "");
    line(&mut m, "This is a MIME-encapsulated message.");
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: text/plain; charset=utf-8");
    line(&mut m, "");
    line(&mut m, &format!("This is the mail system at {hostname}."));
    line(&mut m, "");
    match notice {
        Notice::Failed => line(
            &mut m,
            "Your message could not be delivered to the recipients below.",
        ),
        Notice::Delayed { until } => line(
            &mut m,
            &format!(
                "Your message has not reached the recipients below yet. Nothing needs doing: \
                 it is retried until {}, and you will hear again only if it fails.",
                rfc5322_date(until)
            ),
        ),
    }
    line(&mut m, "");
    for (address, why) in failed {
        line(&mut m, &format!("<{address}>: {}", reason_text(why)));
    }
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: message/delivery-status");
    line(&mut m, "");
    line(&mut m, &format!("Reporting-MTA: dns; {hostname}"));
    line(&mut m, &format!("X-Granary-Queue-ID: {}", envelope.id));
    line(
        &mut m,
        &format!("Arrival-Date: {}", rfc5322_date(envelope.received_at)),
    );
    for (address, why) in failed {
        line(&mut m, "");
        line(&mut m, &format!("Final-Recipient: rfc822; {address}"));
        match notice {
            Notice::Failed => {
                line(&mut m, "Action: failed");
                line(&mut m, &format!("Status: {}", status_code(why)));
            }
            Notice::Delayed { until } => {
                line(&mut m, "Action: delayed");
                let code = status_code(why);
                let code = if code.starts_with('4') { code } else { "4.0.0" };
                line(&mut m, &format!("Status: {code}"));
                line(
                    &mut m,
                    &format!("Will-Retry-Until: {}", rfc5322_date(until)),
                );
            }
        }
        line(
            &mut m,
            &format!("Diagnostic-Code: x-granary; {}", reason_text(why)),
        );
    }
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: text/rfc822-headers");
    line(&mut m, "");
    let mut out = m.into_bytes();
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// `5.1.1` of `5.1.1 the mailbox no longer exists`; `5.0.0` when the
/// reason carries no code.
fn status_code(why: &str) -> &str {
    let code = why.split(' ').next().unwrap_or("");
    let ok = code.split('.').count() == 3
        && code
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if ok { code } else { "5.0.0" }
}

fn reason_text(why: &str) -> String {
    let text = if status_code(why) == "5.0.0" && !why.starts_with("5.0.0") {
        why
    } else {
        why.split_once(' ').map_or(why, |(_, t)| t)
    };
    // One line: no CR or LF from an error message may start a header.
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Recipient;

    #[test]
    fn a_bounce_names_each_recipient_with_its_status_and_quotes_the_headers() {
        let env = Envelope {
            id: "0011aabb22cc33dd".into(),
            from: "sender@remote.example".into(),
            recipients: vec![Recipient {
                address: "gone@example.org".into(),
                user: "gone".into(),
            }],
            received_at: 1_700_000_000,
            client: "192.0.2.1".into(),
            helo: "remote.example".into(),
            sender_verified: true,
        };
        let failed = vec![(
            "gone@example.org".to_owned(),
            "5.1.1 the mailbox no longer exists\r\nInjected: yes".to_owned(),
        )];
        let m = build(
            "mx.example.org",
            &env,
            &failed,
            b"Subject: hi\r\n",
            1_700_000_100,
            Notice::Failed,
        );
        let text = String::from_utf8(m).unwrap();
        let later = vec![(
            "slow@example.org".to_owned(),
            "4.4.1 connection refused".to_owned(),
        )];
        let delayed = String::from_utf8(build(
            "mx.example.org",
            &env,
            &later,
            b"Subject: hi\r\n",
            1_700_000_100,
            Notice::Delayed {
                until: 1_700_432_000,
            },
        ))
        .unwrap();
        assert!(
            delayed.contains("Subject: Delayed Mail (still being retried)\r\n"),
            "{delayed}"
        );
        assert!(
            delayed.contains(
                "Final-Recipient: rfc822; slow@example.org\r\nAction: delayed\r\nStatus: 4.4.1\r\nWill-Retry-Until: "
            ),
            "{delayed}"
        );
        assert!(text.contains("To: <sender@remote.example>\r\n"));
        assert!(text.contains(
            "Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\n"));
        assert!(!text.contains("\r\nInjected: yes"), "{text}");
        assert!(
            text.contains("Date: Tue, 14 Nov 2023 22:15:00 +0000"),
            "{text}"
        );
        assert!(text.ends_with("--\r\n"));
    }
}
