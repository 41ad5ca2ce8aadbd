//! A Taskwarrior 2.6 request as the taskd listener and the tasks grain
//! read it: any bytes frame, parse and sync (against a log made by an
//! earlier sync of the first half) or are refused without panicking, and
//! whatever a sync appends is a log the next sync accepts.

#![no_main]

use granary_wire::taskd::{MAX_REQUEST, Message, check_request, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = frame_len([data[0], data[1], data[2], data[3]], MAX_REQUEST);
    }
    let Ok(message) = Message::parse(data) else {
        return;
    };
    // What we write reads back as the same message.
    let encoded = message.encode();
    if let Ok(back) = Message::parse(&encoded[4..]) {
        assert_eq!(back.headers, message.headers);
    }
    let _ = check_request(&message);
    let payload = message.payload.as_str();
    let mut half = payload.len() / 2;
    while !payload.is_char_boundary(half) {
        half -= 1;
    }
    let (first, second) = payload.split_at(half);
    let mut n = 0u32;
    let mut key = || {
        n += 1;
        format!("00000000-0000-4000-8000-{n:012}")
    };
    let Ok(one) = granary_tasks::taskd::sync(&[], first, false, &mut key) else {
        return;
    };
    let log = one.append;
    let _ = granary_tasks::taskd::sync(&log, second, false, &mut key);
});
