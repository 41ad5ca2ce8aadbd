//! The SMTP session (the MX, or submission with AUTH): any bytes, cut anywhere, never panic; message
//! data handed out never exceeds the size limit; the session never asks
//! for more input while it has input it has not looked at.

#![no_main]

use granary_wire::smtp::headers::{fields, own_auth_results, remove_ranges};
use granary_wire::smtp::{Event, Limits, Reply, Session};
use libfuzzer_sys::fuzz_target;

const MAX: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    // The cut's low bit picks the listener: submission or the MX.
    let submission = cut & 1 == 1;
    let cut = usize::from(cut >> 1).max(1);
    let mut s = Session::new(Limits {
        hostname: "mx.example.org".into(),
        max_message_bytes: MAX,
        max_recipients: 5,
        starttls: true,
        submission,
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut message = 0u64;
    'feed: for chunk in data.chunks(cut) {
        pending.extend_from_slice(chunk);
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 100_000, "no progress");
            let (used, event) = s.step(&pending);
            assert!(used <= pending.len());
            pending.drain(..used);
            match event {
                Event::NeedMore => break,
                Event::Reply(r) => assert!(r.code >= 200 && r.code < 600),
                Event::StartTls(_) => {
                    // What followed in clear is dropped.
                    pending.clear();
                    s.tls_started();
                    break;
                }
                Event::Sender(f) => {
                    let _ = s.sender_verdict(&f, Ok(()));
                }
                Event::Recipient(r) => {
                    let v = if r.len() % 2 == 0 { Ok(()) } else { Err(Reply::new(550, "5.1.1", "no")) };
                    let _ = s.recipient_verdict(&r, v);
                }
                Event::Data(d) => {
                    message += d.len() as u64;
                    assert!(message <= MAX, "data past the limit was handed out");
                }
                Event::MessageEnd { .. } => {
                    message = 0;
                    s.message_done();
                }
                Event::Auth { login, .. } => {
                    assert!(submission && s.tls(), "AUTH only on submission under TLS");
                    let v = if login.len() % 2 == 0 { Ok(login) } else { Err(Reply::new(535, "5.7.8", "no")) };
                    let _ = s.auth_verdict(v);
                }
                Event::Close(_) => break 'feed,
            }
        }
    }
    let ranges = own_auth_results(data, "mx.example.org");
    let mut copy = data.to_vec();
    remove_ranges(&mut copy, &ranges);
    assert!(copy.len() <= data.len());
    let _ = fields(data);
});
