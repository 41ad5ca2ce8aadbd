//! The calendars-and-contacts grain (`apps/dav`): WebDAV (RFC 4918) with
//! CalDAV (RFC 4791) and CardDAV (RFC 6352) over the owner's collections,
//! sync-collection (RFC 6578), and collections shared with other users'
//! grains through grants (`share`). The parsers of untrusted bytes (`xml`,
//! `filter`, `paths`, `ical`) are public for the fuzz targets.

pub mod dav;
pub mod filter;
pub mod http;
pub mod ical;
pub mod paths;
pub mod props;
pub mod share;
pub mod store;
pub mod xml;
