//! WebDAV request bodies (PROPFIND, PROPPATCH, MKCOL, REPORT): any bytes
//! parse or are refused without panicking, within the depth and size
//! bounds; what parses goes through every REPORT reader and is written
//! back as XML that parses again to the same tree.

#![no_main]

use granary_dav::{filter, xml};
use libfuzzer_sys::fuzz_target;

fn depth(e: &xml::Element) -> usize {
    1 + e.children.iter().map(depth).max().unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let Ok(e) = xml::parse(data) else { return };
    assert!(depth(&e) <= xml::MAX_DEPTH);
    let _ = filter::calendar_filter(&e);
    let _ = filter::card_filter(&e);
    let _ = filter::calendar_data(&e);
    let _ = filter::requested_props(&e);
    let _ = filter::nresults(&e);
    let again = xml::parse(e.to_xml().as_bytes()).expect("our own XML parses");
    assert_eq!(again.key(), e.key());
});
