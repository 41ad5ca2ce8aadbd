use super::section::{self, Spec};
use super::*;

const NESTED: &[u8] = b"From: \"J\xc3\xb6rg\" <j@example.org>\r\nTo: a@example.org, Group: b@x.org;\r\n\
Subject: =?utf-8?q?caf=C3=A9?=\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <m1@example.org>\r\n\
Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n--XX\r\nContent-Type: message/rfc822\r\n\r\n\
Subject: inner\r\nContent-Type: multipart/alternative; boundary=\"YY\"\r\n\r\n--YY\r\nContent-Type: text/plain\r\n\r\n\
inner text\r\n--YY\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--YY--\r\n\r\n--XX\r\n\
Content-Type: application/pdf; name=\"a.pdf\"\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--XX--\r\nepilogue\r\n";

#[test]
fn bodystructure_of_a_nested_message() {
    let a = analyse(NESTED);
    assert_eq!(
        a.bodystructure,
        "((\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 9 1 NIL NIL NIL NIL)\
(\"message\" \"rfc822\" NIL NIL NIL \"7bit\" 167 (NIL \"inner\" NIL NIL NIL NIL NIL NIL NIL NIL) \
((\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 1 NIL NIL NIL NIL)\
(\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 8 1 NIL NIL NIL NIL) \"alternative\" (\"boundary\" \"YY\") NIL NIL NIL) 12 NIL NIL NIL NIL)\
(\"application\" \"pdf\" (\"name\" \"a.pdf\") NIL NIL \"base64\" 8 NIL (\"attachment\" (\"filename\" \"a.pdf\")) NIL NIL) \
\"mixed\" (\"boundary\" \"XX\") NIL NIL NIL)"
    );
    assert!(
        a.body.starts_with(
            "((\"text\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 9 1)"
        ),
        "{}",
        a.body
    );
}

#[test]
fn envelope_keeps_raw_words_and_encodes_names() {
    let a = analyse(NESTED);
    assert_eq!(
        a.envelope,
        "(\"Tue, 14 Nov 2023 22:13:20 +0000\" \"=?utf-8?q?caf=C3=A9?=\" \
((\"=?utf-8?b?SsO2cmc=?=\" NIL \"j\" \"example.org\")) ((\"=?utf-8?b?SsO2cmc=?=\" NIL \"j\" \"example.org\")) \
((\"=?utf-8?b?SsO2cmc=?=\" NIL \"j\" \"example.org\")) \
((NIL NIL \"a\" \"example.org\")(NIL NIL \"Group\" NIL)(NIL NIL \"b\" \"x.org\")(NIL NIL NIL NIL)) NIL NIL NIL \"<m1@example.org>\")"
    );
    assert_eq!(a.sent_date, 1_700_000_000);
}

#[test]
fn sections_name_the_right_bytes() {
    let tree = parse(NESTED);
    let get = |path: &[u32], spec: Option<Spec>| {
        section::body(NESTED, &tree, path, spec.as_ref()).map(|b| String::from_utf8(b).unwrap())
    };
    assert_eq!(get(&[1], None).unwrap(), "caf=C3=A9");
    assert_eq!(
        get(&[1], Some(Spec::Mime)).unwrap(),
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    );
    assert_eq!(get(&[2, 1], None).unwrap(), "inner text");
    assert_eq!(get(&[2, 2], None).unwrap(), "<b>x</b>");
    assert!(
        get(&[2], Some(Spec::Header))
            .unwrap()
            .starts_with("Subject: inner\r\n")
    );
    assert!(get(&[2], None).unwrap().starts_with("Subject: inner\r\n"));
    assert!(get(&[2], Some(Spec::Text)).unwrap().starts_with("--YY\r\n"));
    assert_eq!(
        get(
            &[],
            Some(Spec::Fields {
                names: vec!["subject".into(), "to".into()],
                not: false
            })
        )
        .unwrap(),
        "To: a@example.org, Group: b@x.org;\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n"
    );
    assert_eq!(get(&[9], None), None);
    assert_eq!(get(&[1], Some(Spec::Header)), None);
    assert_eq!(
        section::binary(NESTED, &tree, &[1]).unwrap(),
        "café".as_bytes()
    );
    assert_eq!(section::binary(NESTED, &tree, &[3]).unwrap(), b"%PDF-");
}

#[test]
fn hostile_messages_are_bounded() {
    // 1,000 levels of multipart.
    let mut m = String::from("Subject: deep\r\n");
    for i in 0..1000 {
        m.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    m.push_str("Content-Type: text/plain\r\n\r\nbottom\r\n");
    let a = analyse(m.as_bytes());
    assert!(a.bodystructure.len() < 100_000);
    // 10,000 parts.
    let mut m = String::from("Content-Type: multipart/mixed; boundary=\"z\"\r\n\r\n");
    for i in 0..10_000 {
        m.push_str(&format!(
            "--z\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n"
        ));
    }
    m.push_str("--z--\r\n");
    let a = analyse(m.as_bytes());
    assert!(a.bodystructure.matches("\"plain\"").count() >= 10_000 - 1);
    // Broken encodings, 8-bit headers, NUL bytes, no header at all.
    for raw in [
        &b"Subject: \xff\xfe bad\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64\x00\r\n"
            [..],
        b"",
        b"\x00\x00\x00",
        b"no colon line\r\n\r\nbody",
    ] {
        let a = analyse(raw);
        assert!(a.bodystructure.starts_with('('), "{}", a.bodystructure);
        assert!(a.envelope.starts_with('('), "{}", a.envelope);
        assert!(!a.envelope.contains('\0'));
    }
}
