//! iCalendar and vCard objects: checked on the way in (calcard's strict
//! parser, then the CalDAV/CardDAV rules on what one resource may hold),
//! matched against query filters, and expanded for time ranges.
//!
//! Recurrence (RRULE, RDATE, EXDATE, overridden instances, VTIMEZONE and
//! IANA TZIDs) is calcard's `expand_dates`. Filters work on our own reading
//! of the content lines, whose components are numbered in the order they
//! begin, as calcard numbers them, so an instance's `comp_id` names the
//! component it came from in both.

use calcard::common::timezone::Tz;
use calcard::icalendar::ICalendar;
use calcard::{Entry, Parser};

use crate::filter::{CardFilter, CompFilter, PropFilter, TimeRange};
use crate::store::{Kind, ObjectMeta};

/// The most instances one object is expanded to. Beyond it, an object's
/// span counts as unbounded (a superset), and queries see the instances up
/// to it.
pub const MAX_INSTANCES: usize = 20_000;

/// The most instances `expand` writes for one object, and the most bytes.
pub const MAX_EXPANDED: usize = 5_000;
pub const MAX_EXPANDED_BYTES: usize = 8 << 20;

/// Why an object is refused: the CalDAV/CardDAV precondition ("" for the
/// kind's valid-data one) and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub precondition: &'static str,
    pub reason: String,
}

fn invalid(precondition: &'static str, reason: impl Into<String>) -> Invalid {
    Invalid {
        precondition,
        reason: reason.into(),
    }
}

/// One content line, unfolded.
#[derive(Debug, Clone)]
pub struct Line {
    /// Upper-case, without a group prefix (vCard `item1.EMAIL` → `EMAIL`).
    pub name: String,
    /// (upper-case name, values).
    pub params: Vec<(String, Vec<String>)>,
    /// As written (escapes not undone).
    pub value: String,
    /// The line as it was (unfolded).
    pub raw: String,
}

impl Line {
    pub fn param(&self, name: &str) -> Option<&[String]> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The value with TEXT escapes undone.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.value.len());
        let mut chars = self.value.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n' | 'N') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// A component: its lines and its children (indices into the list).
#[derive(Debug, Clone, Default)]
pub struct Component {
    pub name: String,
    pub lines: Vec<Line>,
    pub children: Vec<usize>,
    pub parent: Option<usize>,
}

/// Unfolds content lines (RFC 5545 §3.1).
fn unfold(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for raw in text.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(rest) = raw.strip_prefix([' ', '\t'])
            && let Some(last) = out.last_mut()
        {
            last.push_str(rest);
            continue;
        }
        if !raw.is_empty() {
            out.push(raw.to_owned());
        }
    }
    out
}

/// Splits `NAME;P=v,"w":value`.
fn parse_line(raw: &str) -> Option<Line> {
    let mut in_quotes = false;
    let mut colon = None;
    for (i, c) in raw.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ':' if !in_quotes => {
                colon = Some(i);
                break;
            }
            _ => {}
        }
    }
    let colon = colon?;
    let (head, value) = (&raw[..colon], &raw[colon + 1..]);
    let mut parts = split_unquoted(head, ';').into_iter();
    let name = parts.next()?.trim().trim_start_matches('\u{feff}');
    let name = name.rsplit('.').next().unwrap_or(name).to_ascii_uppercase();
    if name.is_empty() {
        return None;
    }
    let params = parts
        .filter_map(|p| {
            let (n, v) = p.split_once('=')?;
            let values = split_unquoted(v, ',')
                .into_iter()
                .map(|s| s.trim_matches('"').to_owned())
                .collect();
            Some((n.trim().to_ascii_uppercase(), values))
        })
        .collect();
    Some(Line {
        name,
        params,
        value: value.to_owned(),
        raw: raw.to_owned(),
    })
}

fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// The components of a text, numbered in the order they begin (0 is the
/// outermost). Lines outside any component are ignored.
pub fn components(text: &str) -> Vec<Component> {
    let mut comps: Vec<Component> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    for raw in unfold(text) {
        let Some(line) = parse_line(&raw) else {
            continue;
        };
        match line.name.as_str() {
            "BEGIN" => {
                let idx = comps.len();
                let parent = stack.last().copied();
                comps.push(Component {
                    name: line.value.trim().to_ascii_uppercase(),
                    parent,
                    ..Component::default()
                });
                if let Some(p) = parent {
                    comps[p].children.push(idx);
                }
                stack.push(idx);
            }
            "END" => {
                stack.pop();
            }
            _ => {
                if let Some(&top) = stack.last() {
                    comps[top].lines.push(line);
                }
            }
        }
    }
    comps
}

/// The structural checks calcard's lenient parser skips (its strict mode
/// refuses every nested BEGIN in 0.3.14): every line a content line,
/// BEGIN and END matched, one top-level component and nothing after it.
fn check_lines(text: &str) -> Result<(), Invalid> {
    let mut stack: Vec<String> = Vec::new();
    let mut tops = 0;
    for raw in unfold(text) {
        if raw.trim().is_empty() {
            continue;
        }
        let Some(line) = parse_line(&raw) else {
            return Err(invalid("", format!("not a content line: {raw:.80}")));
        };
        match line.name.as_str() {
            "BEGIN" => {
                if stack.is_empty() {
                    tops += 1;
                    if tops > 1 {
                        return Err(invalid("", "more than one object in one resource"));
                    }
                }
                if stack.len() >= 16 {
                    return Err(invalid("", "components nested too deeply"));
                }
                stack.push(line.value.trim().to_ascii_uppercase());
            }
            "END" => match stack.pop() {
                Some(open) if open == line.value.trim().to_ascii_uppercase() => {}
                Some(open) => {
                    return Err(invalid(
                        "",
                        format!("END:{} where END:{open} was expected", line.value.trim()),
                    ));
                }
                None => return Err(invalid("", "END without BEGIN")),
            },
            _ if stack.is_empty() => {
                return Err(invalid(
                    "",
                    format!("a line outside any component: {raw:.80}"),
                ));
            }
            _ => {}
        }
    }
    match stack.last() {
        Some(open) => Err(invalid("", format!("BEGIN:{open} is never ended"))),
        None if tops == 0 => Err(invalid("", "no object")),
        None => Ok(()),
    }
}

/// The text calcard expands, with its departures from RFC 5545 worked
/// around (no BEGIN or END is added or dropped, so components keep their
/// numbers):
/// - SEQUENCE is left out: calcard pairs an override with its master's
///   instance by (SEQUENCE, RECURRENCE-ID), so an override with a newer
///   SEQUENCE (the usual case) would leave the instance in twice;
/// - a VEVENT starting at a DATE-TIME with neither DTEND nor DURATION gets
///   `DURATION:PT0S` (RFC 5545 §3.6.1: it takes no time; calcard would run
///   it to 23:59:59);
/// - an RRULE's UTC `UNTIL` is moved by the offset of DTSTART's zone, as
///   calcard compares it with local wall time (the last instance of an
///   event east of UTC would be lost).
fn for_expansion(text: &str, comps: &[Component]) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut stack: Vec<usize> = Vec::new();
    let mut next = 0usize;
    for raw in unfold(text) {
        let Some(line) = parse_line(&raw) else {
            continue;
        };
        let current = stack.last().and_then(|&i| comps.get(i));
        let scheduling = current.is_some_and(|c| SCHEDULING.contains(&c.name.as_str()));
        match line.name.as_str() {
            "BEGIN" => {
                out.push_str(&raw);
                out.push_str("\r\n");
                if let Some(c) = comps.get(next)
                    && c.name == "VEVENT"
                    && needs_zero_duration(c)
                {
                    out.push_str("DURATION:PT0S\r\n");
                }
                stack.push(next);
                next += 1;
                continue;
            }
            "END" => {
                stack.pop();
            }
            "SEQUENCE" if scheduling => continue,
            "RRULE" if scheduling => {
                let tz = current.and_then(|c| {
                    let start = c.lines.iter().find(|l| l.name == "DTSTART")?;
                    start
                        .param("TZID")?
                        .first()?
                        .trim_start_matches('/')
                        .parse::<chrono_tz::Tz>()
                        .ok()
                });
                if let Some(tz) = tz {
                    out.push_str(&format!("RRULE:{}\r\n", shift_until(&line.value, tz)));
                    continue;
                }
            }
            _ => {}
        }
        out.push_str(&raw);
        out.push_str("\r\n");
    }
    out
}

fn needs_zero_duration(c: &Component) -> bool {
    let Some(start) = c.lines.iter().find(|l| l.name == "DTSTART") else {
        return false;
    };
    let date_only = start
        .param("VALUE")
        .is_some_and(|v| v.iter().any(|x| x.eq_ignore_ascii_case("DATE")))
        || !start.value.contains('T');
    !date_only
        && !c
            .lines
            .iter()
            .any(|l| l.name == "DTEND" || l.name == "DURATION")
}

/// `UNTIL=<utc>Z` moved to the zone's wall time at that instant (still
/// written with Z, as calcard reads it).
fn shift_until(rule: &str, tz: chrono_tz::Tz) -> String {
    use chrono::{Offset, TimeZone};
    rule.split(';')
        .map(|part| {
            let Some(v) = part
                .strip_prefix("UNTIL=")
                .or_else(|| part.strip_prefix("until="))
            else {
                return part.to_owned();
            };
            let Some(t) = crate::filter::parse_utc(v) else {
                return part.to_owned();
            };
            let Some(at) = chrono::DateTime::from_timestamp(t, 0) else {
                return part.to_owned();
            };
            let offset = tz
                .offset_from_utc_datetime(&at.naive_utc())
                .fix()
                .local_minus_utc();
            format!("UNTIL={}", utc(t + i64::from(offset)))
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The most time-of-day candidates one RRULE may ask for (BYHOUR ×
/// BYMINUTE × BYSECOND): calcard builds them all for each period before it
/// counts instances, so a rule listing every second of the day would take
/// gigabytes.
const MAX_TIMES_PER_PERIOD: usize = 1000;

fn check_rrules(comps: &[Component]) -> Result<(), Invalid> {
    for c in comps {
        for l in c.lines.iter().filter(|l| l.name == "RRULE") {
            let count = |key: &str| {
                l.value
                    .split(';')
                    .find_map(|p| {
                        let (k, v) = p.split_once('=')?;
                        k.eq_ignore_ascii_case(key).then(|| v.split(',').count())
                    })
                    .unwrap_or(1)
            };
            let times = count("BYHOUR") * count("BYMINUTE") * count("BYSECOND");
            if times > MAX_TIMES_PER_PERIOD {
                return Err(invalid(
                    "",
                    format!(
                        "an RRULE with {times} times of day per period (at most {MAX_TIMES_PER_PERIOD})"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// calcard's reading of a checked object (`comps` its components).
fn calendar(text: &str, comps: &[Component]) -> Result<ICalendar, Invalid> {
    check_rrules(comps)?;
    let prepared = for_expansion(text, comps);
    let mut parser = Parser::new(&prepared);
    let ical = match parser.entry() {
        Entry::ICalendar(c) => c,
        Entry::VCard(_) => return Err(invalid("", "a vCard, not an iCalendar object")),
        Entry::InvalidLine(l) => return Err(invalid("", format!("invalid line: {l:.80}"))),
        Entry::UnexpectedComponentEnd { expected, found } => {
            return Err(invalid(
                "",
                format!(
                    "END:{} where END:{} was expected",
                    found.as_str(),
                    expected.as_str()
                ),
            ));
        }
        Entry::UnterminatedComponent(c) => {
            return Err(invalid("", format!("BEGIN:{c} is never ended")));
        }
        Entry::TooManyComponents => return Err(invalid("", "too many components")),
        Entry::Eof => return Err(invalid("", "no iCalendar object")),
        _ => return Err(invalid("", "not an iCalendar object")),
    };
    match parser.entry() {
        Entry::Eof => Ok(ical),
        _ => Err(invalid("", "more than one object in one resource")),
    }
}

const SCHEDULING: &[&str] = &["VEVENT", "VTODO", "VJOURNAL", "VFREEBUSY"];

/// Checks an object for a collection of `kind` accepting `components`, and
/// says what the index needs of it.
pub fn ingest(
    kind: Kind,
    data: &[u8],
    components_allowed: &[String],
) -> Result<ObjectMeta, Invalid> {
    let text = std::str::from_utf8(data).map_err(|_| invalid("", "not UTF-8"))?;
    match kind {
        Kind::Calendar => ingest_calendar(text, components_allowed),
        Kind::AddressBook => ingest_card(text),
    }
}

fn ingest_calendar(text: &str, allowed: &[String]) -> Result<ObjectMeta, Invalid> {
    check_lines(text)?;
    let comps = components(text);
    let ical = calendar(text, &comps)?;
    let Some(top) = comps.first().filter(|c| c.name == "VCALENDAR") else {
        return Err(invalid("", "the object is not a VCALENDAR"));
    };
    let mut kind: Option<&str> = None;
    let mut uid: Option<String> = None;
    for &child in &top.children {
        let c = &comps[child];
        if c.name == "VTIMEZONE" {
            continue;
        }
        if !SCHEDULING.contains(&c.name.as_str()) && !c.name.starts_with("X-") {
            continue;
        }
        match kind {
            None => kind = Some(&c.name),
            Some(k) if k != c.name => {
                return Err(invalid(
                    "valid-calendar-object-resource",
                    format!("both {k} and {} in one resource", c.name),
                ));
            }
            _ => {}
        }
        let this = c
            .lines
            .iter()
            .find(|l| l.name == "UID")
            .map(|l| l.value.trim().to_owned())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                invalid(
                    "valid-calendar-object-resource",
                    format!("a {} without a UID", c.name),
                )
            })?;
        match &uid {
            None => uid = Some(this),
            Some(u) if *u != this => {
                return Err(invalid(
                    "valid-calendar-object-resource",
                    "components with different UIDs in one resource",
                ));
            }
            _ => {}
        }
    }
    let (Some(kind), Some(uid)) = (kind, uid) else {
        return Err(invalid(
            "valid-calendar-object-resource",
            "no VEVENT, VTODO or VJOURNAL in the object",
        ));
    };
    if !allowed.iter().any(|a| a == kind) {
        return Err(invalid(
            "supported-calendar-component",
            format!("this calendar does not take {kind}"),
        ));
    }
    if uid.len() > 1024 {
        return Err(invalid(
            "valid-calendar-object-resource",
            "the UID is too long",
        ));
    }
    let (start, end, single) = span(&ical, &comps);
    Ok(ObjectMeta {
        uid,
        component: kind.to_owned(),
        start,
        end,
        single: single && kind == "VEVENT",
    })
}

/// The span of every instance, for the index: `None` where unbounded (an
/// RRULE without COUNT or UNTIL, more instances than we expand, a to-do
/// without dates); and whether it is exactly one instance, whose span the
/// index then holds exactly.
fn span(ical: &ICalendar, comps: &[Component]) -> (Option<i64>, Option<i64>, bool) {
    let expanded = ical.expand_dates(Tz::UTC, MAX_INSTANCES);
    let unbounded = expanded.events.len() >= MAX_INSTANCES
        || comps
            .iter()
            .filter(|c| SCHEDULING.contains(&c.name.as_str()))
            .any(|c| {
                c.lines.iter().any(|l| {
                    l.name == "RRULE" && {
                        let v = l.value.to_ascii_uppercase();
                        !v.contains("COUNT=") && !v.contains("UNTIL=")
                    }
                })
            });
    let has_undated_todo = comps.iter().any(|c| {
        c.name == "VTODO"
            && !c
                .lines
                .iter()
                .any(|l| matches!(l.name.as_str(), "DTSTART" | "DUE"))
    });
    if expanded.events.is_empty() || has_undated_todo || !expanded.errors.is_empty() {
        return (None, None, false);
    }
    let scheduling = comps
        .iter()
        .filter(|c| SCHEDULING.contains(&c.name.as_str()))
        .count();
    if expanded.events.len() == 1 && scheduling == 1 && !unbounded {
        let (s, t) = expanded.events[0].timestamps();
        return (Some(s), Some(t.max(s)), true);
    }
    let mut lo = i64::MAX;
    let mut hi = i64::MIN;
    for e in &expanded.events {
        let (s, t) = e.timestamps();
        lo = lo.min(s);
        hi = hi.max(t.max(s));
    }
    // A day either way, so the index stays a superset however the
    // expansion rounds.
    (
        Some(lo - 86_400),
        (!unbounded).then_some(hi + 86_400),
        false,
    )
}

fn ingest_card(text: &str) -> Result<ObjectMeta, Invalid> {
    check_lines(text)?;
    let mut parser = Parser::new(text);
    match parser.entry() {
        Entry::VCard(_) => {}
        Entry::ICalendar(_) => return Err(invalid("", "an iCalendar object, not a vCard")),
        Entry::InvalidLine(l) => return Err(invalid("", format!("invalid line: {l:.80}"))),
        _ => return Err(invalid("", "not a vCard")),
    }
    if !matches!(parser.entry(), Entry::Eof) {
        return Err(invalid("", "more than one vCard in one resource"));
    }
    let comps = components(text);
    let card = comps
        .first()
        .filter(|c| c.name == "VCARD")
        .ok_or_else(|| invalid("", "not a vCard"))?;
    let version = card.lines.iter().find(|l| l.name == "VERSION");
    if !version.is_some_and(|v| matches!(v.value.trim(), "3.0" | "4.0")) {
        return Err(invalid("supported-address-data", "vCard 3.0 or 4.0 only"));
    }
    let uid = card
        .lines
        .iter()
        .find(|l| l.name == "UID")
        .map(|l| l.value.trim().to_owned())
        .filter(|u| !u.is_empty() && u.len() <= 1024)
        .ok_or_else(|| invalid("", "a vCard without a UID"))?;
    Ok(ObjectMeta {
        uid,
        component: "VCARD".into(),
        start: None,
        end: None,
        single: false,
    })
}

/// The time range a calendar-query's filter puts on its component, if
/// any (to narrow the candidates by the index).
pub fn outer_range(f: &CompFilter) -> Option<TimeRange> {
    f.comps
        .iter()
        .find(|c| !c.is_not_defined)
        .and_then(|c| c.time_range)
}

/// Whether the filter is only a time range on one component type (the
/// common query), which the index answers exactly for single instances.
pub fn only_time_range(f: &CompFilter) -> Option<(&str, TimeRange)> {
    if f.time_range.is_some() || !f.props.is_empty() || f.comps.len() != 1 {
        return None;
    }
    let c = &f.comps[0];
    (!c.is_not_defined && c.props.is_empty() && c.comps.is_empty())
        .then_some(())
        .and_then(|()| c.time_range.map(|r| (c.name.as_str(), r)))
}

/// Whether an object of this component type can match the filter at all.
pub fn component_may_match(component: &str, f: &CompFilter) -> bool {
    f.comps
        .iter()
        .all(|c| c.is_not_defined || c.name == component || c.name == "VTIMEZONE")
}

/// Instances of the calendar as (component index, start, end), UTC
/// (`comps` its components, read once by the caller).
fn instances(text: &str, comps: &[Component]) -> Vec<(usize, i64, i64)> {
    let prepared = for_expansion(text, comps);
    let mut parser = Parser::new(&prepared);
    let Entry::ICalendar(ical) = parser.entry() else {
        return Vec::new();
    };
    ical.expand_dates(Tz::UTC, MAX_INSTANCES)
        .events
        .iter()
        .map(|e| {
            let (s, t) = e.timestamps();
            (e.comp_id as usize, s, t)
        })
        .collect()
}

/// RFC 4791 §9.9: an instance [s, e) overlaps a range.
pub fn overlaps(s: i64, e: i64, r: &TimeRange) -> bool {
    let (rs, re) = (r.start.unwrap_or(i64::MIN), r.end.unwrap_or(i64::MAX));
    if e > s {
        rs < e && re > s
    } else {
        // Zero duration: the instant itself.
        rs <= s && re > s
    }
}

struct Ctx<'a> {
    comps: &'a [Component],
    instances: Vec<(usize, i64, i64)>,
}

/// Whether a calendar object matches a calendar-query filter (the
/// VCALENDAR comp-filter).
pub fn calendar_matches(text: &str, f: &CompFilter) -> bool {
    let comps = components(text);
    if comps.first().is_none_or(|c| c.name != "VCALENDAR") {
        return false;
    }
    let needs_time = uses_time(f);
    let ctx = Ctx {
        comps: &comps,
        instances: if needs_time {
            instances(text, &comps)
        } else {
            Vec::new()
        },
    };
    comp_matches(&ctx, 0, f)
}

fn uses_time(f: &CompFilter) -> bool {
    f.time_range.is_some()
        || f.props.iter().any(|p| p.time_range.is_some())
        || f.comps.iter().any(uses_time)
}

fn comp_matches(ctx: &Ctx<'_>, idx: usize, f: &CompFilter) -> bool {
    let c = &ctx.comps[idx];
    if let Some(r) = &f.time_range {
        let undated_todo = c.name == "VTODO"
            && !c
                .lines
                .iter()
                .any(|l| matches!(l.name.as_str(), "DTSTART" | "DUE" | "COMPLETED" | "CREATED"));
        let hit = if c.name == "VALARM" {
            alarm_in_range(ctx, idx, r)
        } else if undated_todo {
            // RFC 4791 §9.9: a to-do with no dates is in every range.
            true
        } else {
            ctx.instances
                .iter()
                .any(|(id, s, e)| *id == idx && overlaps(*s, *e, r))
        };
        if !hit {
            return false;
        }
    }
    for pf in &f.props {
        if !prop_matches(&c.lines, pf, ctx) {
            return false;
        }
    }
    for sub in &f.comps {
        let mut children = c
            .children
            .iter()
            .copied()
            .filter(|&i| ctx.comps[i].name == sub.name);
        let ok = if sub.is_not_defined {
            children.next().is_none()
        } else {
            children.any(|i| comp_matches(ctx, i, sub))
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A VALARM's trigger times for the instances of its parent.
fn alarm_in_range(ctx: &Ctx<'_>, idx: usize, r: &TimeRange) -> bool {
    let c = &ctx.comps[idx];
    let Some(parent) = c.parent else {
        return false;
    };
    let Some(trigger) = c.lines.iter().find(|l| l.name == "TRIGGER") else {
        return false;
    };
    if let Some(t) = crate::filter::parse_utc(&trigger.value) {
        return overlaps(t, t, r);
    }
    let Some(offset) = parse_duration(trigger.value.trim()) else {
        return false;
    };
    let from_end = trigger
        .param("RELATED")
        .is_some_and(|v| v.iter().any(|x| x.eq_ignore_ascii_case("END")));
    ctx.instances
        .iter()
        .filter(|(id, _, _)| *id == parent)
        .any(|(_, s, e)| {
            let Some(t) = (if from_end { *e } else { *s }).checked_add(offset) else {
                return false;
            };
            overlaps(t, t, r)
        })
}

/// An RFC 5545 duration in seconds (`-PT15M`, `P1D`, `P2W`).
pub fn parse_duration(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'-' => (-1, &s[1..]),
        b'+' => (1, &s[1..]),
        _ => (1, s),
    };
    let rest = rest.strip_prefix('P')?;
    let mut total = 0i64;
    let mut num = String::new();
    let mut in_time = false;
    for c in rest.chars() {
        match c {
            'T' => in_time = true,
            '0'..='9' => num.push(c),
            _ => {
                let n: i64 = num.parse().ok()?;
                num.clear();
                let unit = match (c, in_time) {
                    ('W', false) => 604_800,
                    ('D', false) => 86_400,
                    ('H', true) => 3_600,
                    ('M', true) => 60,
                    ('S', true) => 1,
                    _ => return None,
                };
                total = total.checked_add(n.checked_mul(unit)?)?;
            }
        }
    }
    num.is_empty().then_some(sign * total)
}

fn prop_matches(lines: &[Line], pf: &PropFilter, ctx: &Ctx<'_>) -> bool {
    let mut named = lines.iter().filter(|l| l.name == pf.name);
    if pf.is_not_defined {
        return named.next().is_none();
    }
    named.any(|l| {
        if let Some(r) = &pf.time_range {
            let t = line_time(l);
            if !t.is_some_and(|t| overlaps(t, t, r)) {
                return false;
            }
        }
        let _ = ctx;
        pf.texts.iter().all(|t| t.matches(&l.text()))
            && pf.params.iter().all(|p| param_matches(l, p))
    })
}

/// RFC 4791 §9.7.3 / RFC 6352 §10.5.2: a param-filter on one line.
fn param_matches(l: &Line, p: &crate::filter::ParamFilter) -> bool {
    let values = l.param(&p.name);
    if p.is_not_defined {
        return values.is_none();
    }
    match (values, &p.text) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(vs), Some(t)) => vs.iter().any(|v| t.matches(v)),
    }
}

/// A DATE-TIME or DATE property value as UTC seconds (TZIDs resolved with
/// the IANA database; unknown ones and floating times read as UTC).
pub fn line_time(l: &Line) -> Option<i64> {
    let v = l.value.trim();
    if let Some(t) = crate::filter::parse_utc(v) {
        return Some(t);
    }
    let naive = chrono::NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%S")
        .ok()
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(v, "%Y%m%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    let tz: Option<chrono_tz::Tz> = l
        .param("TZID")
        .and_then(|v| v.first())
        .and_then(|n| n.trim_start_matches('/').parse().ok());
    match tz {
        Some(tz) => naive
            .and_local_timezone(tz)
            .earliest()
            .map(|t| t.timestamp()),
        None => Some(naive.and_utc().timestamp()),
    }
}

/// Whether a vCard matches an addressbook-query filter.
pub fn card_matches(text: &str, f: &CardFilter) -> bool {
    let comps = components(text);
    let Some(card) = comps.first() else {
        return false;
    };
    let one = |pf: &PropFilter| -> bool {
        let mut named = card.lines.iter().filter(|l| l.name == pf.name);
        if pf.is_not_defined {
            return named.next().is_none();
        }
        named.any(|l| {
            let mut tests = pf
                .texts
                .iter()
                .map(|t| t.matches(&l.text()))
                .chain(pf.params.iter().map(|p| param_matches(l, p)))
                .peekable();
            if tests.peek().is_none() {
                return true;
            }
            if pf.any {
                tests.any(|b| b)
            } else {
                tests.all(|b| b)
            }
        })
    };
    if f.props.is_empty() {
        return true;
    }
    if f.any {
        f.props.iter().any(one)
    } else {
        f.props.iter().all(one)
    }
}

fn utc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_default()
}

fn write_component(comps: &[Component], idx: usize, skip: &[&str], out: &mut String) {
    let c = &comps[idx];
    out.push_str(&format!("BEGIN:{}\r\n", c.name));
    for l in &c.lines {
        if !skip.contains(&l.name.as_str()) {
            out.push_str(&l.raw);
            out.push_str("\r\n");
        }
    }
    for &child in &c.children {
        write_component(comps, child, &[], out);
    }
    out.push_str(&format!("END:{}\r\n", c.name));
}

/// RFC 4791 §9.6.5: the instances in `range` as separate components in
/// UTC, each with a RECURRENCE-ID when the object recurs; no VTIMEZONE.
pub fn expand(text: &str, range: TimeRange) -> String {
    let comps = components(text);
    if comps.first().is_none_or(|c| c.name != "VCALENDAR") {
        return text.to_owned();
    }
    let recurring = comps.iter().any(|c| {
        c.lines
            .iter()
            .any(|l| matches!(l.name.as_str(), "RRULE" | "RDATE" | "RECURRENCE-ID"))
    });
    let mut out = String::from("BEGIN:VCALENDAR\r\n");
    for l in &comps[0].lines {
        out.push_str(&l.raw);
        out.push_str("\r\n");
    }
    let mut all = instances(text, &comps);
    all.sort_by_key(|(_, s, _)| *s);
    let mut written = 0;
    for (idx, s, e) in all {
        if !overlaps(s, e, &range) || idx >= comps.len() {
            continue;
        }
        // A bound on what one object can make of a wide range.
        written += 1;
        if written > MAX_EXPANDED || out.len() > MAX_EXPANDED_BYTES {
            break;
        }
        let c = &comps[idx];
        let is_todo = c.name == "VTODO";
        out.push_str(&format!("BEGIN:{}\r\n", c.name));
        for l in &c.lines {
            if !matches!(
                l.name.as_str(),
                "DTSTART"
                    | "DTEND"
                    | "DURATION"
                    | "DUE"
                    | "RRULE"
                    | "RDATE"
                    | "EXDATE"
                    | "RECURRENCE-ID"
            ) {
                out.push_str(&l.raw);
                out.push_str("\r\n");
            }
        }
        out.push_str(&format!("DTSTART:{}\r\n", utc(s)));
        if e > s {
            out.push_str(&format!(
                "{}:{}\r\n",
                if is_todo { "DUE" } else { "DTEND" },
                utc(e)
            ));
        }
        if recurring {
            let rid = c
                .lines
                .iter()
                .find(|l| l.name == "RECURRENCE-ID")
                .and_then(line_time)
                .unwrap_or(s);
            out.push_str(&format!("RECURRENCE-ID:{}\r\n", utc(rid)));
        }
        for &child in &c.children {
            write_component(&comps, child, &[], &mut out);
        }
        out.push_str(&format!("END:{}\r\n", c.name));
    }
    out.push_str("END:VCALENDAR\r\n");
    out
}

/// RFC 4791 §9.6.6: the master component and only the overridden
/// instances that fall in `range`.
pub fn limit_recurrence(text: &str, range: TimeRange) -> String {
    let comps = components(text);
    if comps.first().is_none_or(|c| c.name != "VCALENDAR") {
        return text.to_owned();
    }
    let inst = instances(text, &comps);
    let mut out = String::from("BEGIN:VCALENDAR\r\n");
    for l in &comps[0].lines {
        out.push_str(&l.raw);
        out.push_str("\r\n");
    }
    for &child in &comps[0].children {
        let c = &comps[child];
        let overridden = c.lines.iter().any(|l| l.name == "RECURRENCE-ID");
        if overridden
            && !inst
                .iter()
                .any(|(id, s, e)| *id == child && overlaps(*s, *e, &range))
        {
            continue;
        }
        write_component(&comps, child, &[], &mut out);
    }
    out.push_str("END:VCALENDAR\r\n");
    out
}

/// Busy periods of a calendar object inside `range`: (start, end, FBTYPE).
pub fn busy(text: &str, range: TimeRange) -> Vec<(i64, i64, &'static str)> {
    let comps = components(text);
    let mut out = Vec::new();
    for (idx, s, e) in instances(text, &comps) {
        let Some(c) = comps.get(idx) else { continue };
        if c.name != "VEVENT" || e <= s || !overlaps(s, e, &range) {
            continue;
        }
        let value = |n: &str| {
            c.lines
                .iter()
                .find(|l| l.name == n)
                .map(|l| l.value.trim().to_ascii_uppercase())
        };
        if value("TRANSP").as_deref() == Some("TRANSPARENT")
            || value("STATUS").as_deref() == Some("CANCELLED")
        {
            continue;
        }
        let kind = if value("STATUS").as_deref() == Some("TENTATIVE") {
            "BUSY-TENTATIVE"
        } else {
            "BUSY"
        };
        let (rs, re) = (range.start.unwrap_or(s), range.end.unwrap_or(e));
        out.push((s.max(rs), e.min(re), kind));
    }
    out
}

/// A VFREEBUSY answering a free-busy-query, with overlapping periods of
/// the same type merged.
pub fn freebusy_calendar(start: i64, end: i64, busy: &mut [(i64, i64, &'static str)]) -> String {
    busy.sort();
    let mut merged: Vec<(i64, i64, &str)> = Vec::new();
    for &(s, e, k) in busy.iter() {
        match merged.last_mut() {
            Some(last) if last.2 == k && s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e, k)),
        }
    }
    let mut out = String::from(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Granary//DAV//EN\r\nBEGIN:VFREEBUSY\r\n",
    );
    out.push_str(&format!(
        "DTSTAMP:{}\r\nDTSTART:{}\r\nDTEND:{}\r\n",
        utc(chrono::Utc::now().timestamp()),
        utc(start),
        utc(end)
    ));
    for (s, e, k) in merged {
        out.push_str(&format!("FREEBUSY;FBTYPE={k}:{}/{}\r\n", utc(s), utc(e)));
    }
    out.push_str("END:VFREEBUSY\r\nEND:VCALENDAR\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Collation, MatchType, TextMatch};

    const WEEKLY: &str = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:test\r\n\
BEGIN:VTIMEZONE\r\nTZID:Europe/Berlin\r\nBEGIN:STANDARD\r\nDTSTART:19701025T030000\r\nTZOFFSETFROM:+0200\r\nTZOFFSETTO:+0100\r\nRRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU\r\nEND:STANDARD\r\nBEGIN:DAYLIGHT\r\nDTSTART:19700329T020000\r\nTZOFFSETFROM:+0100\r\nTZOFFSETTO:+0200\r\nRRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU\r\nEND:DAYLIGHT\r\nEND:VTIMEZONE\r\n\
BEGIN:VEVENT\r\nUID:weekly\r\nDTSTAMP:20240101T000000Z\r\nDTSTART;TZID=Europe/Berlin:20240105T100000\r\nDTEND;TZID=Europe/Berlin:20240105T110000\r\nRRULE:FREQ=WEEKLY;COUNT=10\r\nEXDATE;TZID=Europe/Berlin:20240112T100000\r\nSUMMARY:Standup\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:weekly\r\nDTSTAMP:20240101T000000Z\r\nRECURRENCE-ID;TZID=Europe/Berlin:20240119T100000\r\nDTSTART;TZID=Europe/Berlin:20240120T150000\r\nDTEND;TZID=Europe/Berlin:20240120T160000\r\nSUMMARY:Standup (moved)\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";

    fn all() -> Vec<String> {
        vec!["VEVENT".into(), "VTODO".into()]
    }

    #[test]
    fn ingests_and_spans_a_recurring_event() {
        let m = ingest(Kind::Calendar, WEEKLY.as_bytes(), &all()).unwrap();
        assert_eq!(m.uid, "weekly");
        assert_eq!(m.component, "VEVENT");
        assert!(m.start.is_some() && m.end.is_some());
        let mut inst = instances(WEEKLY, &components(WEEKLY));
        inst.sort_by_key(|i| i.1);
        // 10 occurrences, one excluded.
        assert_eq!(inst.len(), 9);
        // 2024-01-05 10:00 Berlin is 09:00 UTC.
        assert_eq!(inst[0].1, 1704445200);
        // The moved one is on the 20th at 15:00 Berlin (14:00 UTC).
        assert!(inst.iter().any(|i| i.1 == 1705759200));
    }

    #[test]
    fn refuses_bad_objects() {
        let two_uids = WEEKLY.replace(
            "UID:weekly\r\nDTSTAMP:20240101T000000Z\r\nRECURRENCE",
            "UID:other\r\nDTSTAMP:20240101T000000Z\r\nRECURRENCE",
        );
        assert_eq!(
            ingest(Kind::Calendar, two_uids.as_bytes(), &all())
                .unwrap_err()
                .precondition,
            "valid-calendar-object-resource"
        );
        assert!(
            ingest(
                Kind::Calendar,
                b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\n",
                &all()
            )
            .is_err()
        );
        assert!(ingest(Kind::Calendar, b"garbage", &all()).is_err());
        assert_eq!(
            ingest(Kind::Calendar, WEEKLY.as_bytes(), &["VTODO".into()])
                .unwrap_err()
                .precondition,
            "supported-calendar-component"
        );
        assert!(
            ingest(
                Kind::AddressBook,
                b"BEGIN:VCARD\r\nVERSION:4.0\r\nFN:x\r\nEND:VCARD\r\n",
                &[]
            )
            .is_err()
        );
        assert!(
            ingest(
                Kind::AddressBook,
                b"BEGIN:VCARD\r\nVERSION:4.0\r\nUID:a\r\nFN:x\r\nEND:VCARD\r\n",
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn time_ranges_see_instances_exdates_and_overrides() {
        let q = |start: &str, end: &str| CompFilter {
            name: "VCALENDAR".into(),
            is_not_defined: false,
            time_range: None,
            props: vec![],
            comps: vec![CompFilter {
                name: "VEVENT".into(),
                is_not_defined: false,
                time_range: Some(TimeRange {
                    start: crate::filter::parse_utc(start),
                    end: crate::filter::parse_utc(end),
                }),
                props: vec![],
                comps: vec![],
            }],
        };
        // The excluded week.
        assert!(!calendar_matches(
            WEEKLY,
            &q("20240112T000000Z", "20240113T000000Z")
        ));
        // The overridden one moved off its day, onto the next.
        assert!(!calendar_matches(
            WEEKLY,
            &q("20240119T000000Z", "20240120T000000Z")
        ));
        assert!(calendar_matches(
            WEEKLY,
            &q("20240120T000000Z", "20240121T000000Z")
        ));
        // A later week.
        assert!(calendar_matches(
            WEEKLY,
            &q("20240301T000000Z", "20240302T000000Z")
        ));
        // After the last of ten.
        assert!(!calendar_matches(
            WEEKLY,
            &q("20240401T000000Z", "20240501T000000Z")
        ));
        let expanded = expand(
            WEEKLY,
            TimeRange {
                start: crate::filter::parse_utc("20240101T000000Z"),
                end: crate::filter::parse_utc("20240201T000000Z"),
            },
        );
        assert_eq!(expanded.matches("BEGIN:VEVENT").count(), 3, "{expanded}");
        assert!(!expanded.contains("VTIMEZONE"));
        assert!(expanded.contains("RECURRENCE-ID:20240119T090000Z"));
        // limit-recurrence-set keeps the master and only overrides in range.
        let march = TimeRange {
            start: crate::filter::parse_utc("20240301T000000Z"),
            end: crate::filter::parse_utc("20240401T000000Z"),
        };
        let limited = limit_recurrence(WEEKLY, march);
        assert!(limited.contains("SUMMARY:Standup\r\n"), "{limited}");
        assert!(!limited.contains("moved"), "{limited}");
    }

    fn starts(text: &str) -> Vec<i64> {
        let mut v: Vec<i64> = instances(text, &components(text))
            .iter()
            .map(|i| i.1)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn calcard_departures_are_worked_around() {
        // An override with a newer SEQUENCE replaces its instance, once.
        let seq = "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:s\r\nSEQUENCE:0\r\nDTSTART:20240101T100000Z\r\nDURATION:PT1H\r\nRRULE:FREQ=DAILY;COUNT=3\r\nEND:VEVENT\r\nBEGIN:VEVENT\r\nUID:s\r\nSEQUENCE:2\r\nRECURRENCE-ID:20240102T100000Z\r\nDTSTART:20240102T150000Z\r\nDURATION:PT1H\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        assert_eq!(starts(seq), vec![1704103200, 1704207600, 1704276000]);
        // UNTIL in UTC east of UTC: the last instance (10:00 Berlin is
        // 09:00Z, exactly UNTIL) is kept.
        let until = "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:u\r\nDTSTART;TZID=Europe/Berlin:20240101T100000\r\nDURATION:PT1H\r\nRRULE:FREQ=DAILY;UNTIL=20240103T090000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        assert_eq!(starts(until).len(), 3);
        // No end: an instant, not the rest of the day.
        let instant = "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:i\r\nDTSTART:20240101T100000Z\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
        let i = instances(instant, &components(instant));
        assert_eq!((i[0].1, i[0].2), (1704103200, 1704103200));
        // A rule asking for every second of the day is refused.
        let hostile = format!(
            "BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nUID:h\r\nDTSTART:20240101T000000Z\r\nRRULE:FREQ=YEARLY;BYHOUR={};BYMINUTE={};BYSECOND={}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
            (0..24).map(|n| n.to_string()).collect::<Vec<_>>().join(","),
            (0..60).map(|n| n.to_string()).collect::<Vec<_>>().join(","),
            (0..60).map(|n| n.to_string()).collect::<Vec<_>>().join(",")
        );
        assert!(ingest(Kind::Calendar, hostile.as_bytes(), &all()).is_err());
    }

    #[test]
    fn text_and_param_filters() {
        let f = CompFilter {
            name: "VCALENDAR".into(),
            is_not_defined: false,
            time_range: None,
            props: vec![],
            comps: vec![CompFilter {
                name: "VEVENT".into(),
                is_not_defined: false,
                time_range: None,
                props: vec![PropFilter {
                    name: "SUMMARY".into(),
                    is_not_defined: false,
                    time_range: None,
                    texts: vec![TextMatch {
                        text: "moved".into(),
                        collation: Collation::AsciiCasemap,
                        negate: false,
                        match_type: MatchType::Contains,
                    }],
                    params: vec![],
                    any: true,
                }],
                comps: vec![],
            }],
        };
        assert!(calendar_matches(WEEKLY, &f));
        assert_eq!(parse_duration("-PT15M"), Some(-900));
        assert_eq!(parse_duration("P1DT1H"), Some(90000));
    }
}
