//! iCalendar and vCard objects a client PUTs, and request paths: any bytes
//! are checked without panicking; an accepted calendar object can be
//! matched, expanded and limited, and its expansion parses again.

#![no_main]

use granary_dav::filter::{CompFilter, TimeRange};
use granary_dav::store::Kind;
use granary_dav::{ical, paths};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        let _ = paths::resolve(path, "alice");
    }
    let all = vec!["VEVENT".to_owned(), "VTODO".to_owned(), "VJOURNAL".to_owned()];
    let _ = ical::ingest(Kind::AddressBook, data, &[]);
    let Ok(meta) = ical::ingest(Kind::Calendar, data, &all) else { return };
    assert!(!meta.uid.is_empty());
    let text = std::str::from_utf8(data).expect("accepted objects are UTF-8");
    let range = TimeRange {
        start: Some(1_704_067_200),
        end: Some(1_735_689_600),
    };
    let filter = CompFilter {
        name: "VCALENDAR".into(),
        is_not_defined: false,
        time_range: None,
        props: vec![],
        comps: vec![CompFilter {
            name: meta.component.clone(),
            is_not_defined: false,
            time_range: Some(range),
            props: vec![],
            comps: vec![],
        }],
    };
    let _ = ical::calendar_matches(text, &filter);
    let _ = ical::limit_recurrence(text, range);
    let _ = ical::busy(text, range);
    let expanded = ical::expand(text, range);
    assert!(expanded.starts_with("BEGIN:VCALENDAR"));
});
