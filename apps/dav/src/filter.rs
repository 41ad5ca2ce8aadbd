//! REPORT bodies (untrusted) turned into what the queries need: CalDAV
//! comp/prop/param filters with text matches and time ranges (RFC 4791
//! §9.7), CardDAV filters (RFC 6352 §10.5), the properties asked for, and
//! `calendar-data`'s `expand` / `limit-recurrence-set`.

use crate::xml::{CALDAV, CARDDAV, DAV, Element};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collation {
    /// `i;ascii-casemap`: ASCII letters compare case-insensitively.
    AsciiCasemap,
    /// `i;octet`: bytes as they are.
    Octet,
    /// `i;unicode-casemap`: Unicode simple case folding (approximated by
    /// lowercasing).
    UnicodeCasemap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchType {
    Equals,
    Contains,
    StartsWith,
    EndsWith,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextMatch {
    pub text: String,
    pub collation: Collation,
    pub negate: bool,
    pub match_type: MatchType,
}

impl TextMatch {
    pub fn matches(&self, value: &str) -> bool {
        let fold = |s: &str| match self.collation {
            Collation::Octet => s.to_owned(),
            Collation::AsciiCasemap => s.to_ascii_lowercase(),
            Collation::UnicodeCasemap => s.to_lowercase(),
        };
        let (v, t) = (fold(value), fold(&self.text));
        let hit = match self.match_type {
            MatchType::Equals => v == t,
            MatchType::Contains => v.contains(&t),
            MatchType::StartsWith => v.starts_with(&t),
            MatchType::EndsWith => v.ends_with(&t),
        };
        hit != self.negate
    }
}

/// A half-open UTC interval in seconds; `None` is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamFilter {
    pub name: String,
    pub is_not_defined: bool,
    pub text: Option<TextMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropFilter {
    pub name: String,
    pub is_not_defined: bool,
    pub time_range: Option<TimeRange>,
    /// CalDAV has at most one; CardDAV any number, combined by `any`.
    pub texts: Vec<TextMatch>,
    pub params: Vec<ParamFilter>,
    /// CardDAV `test="anyof"` (default) across text-matches and params.
    pub any: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompFilter {
    pub name: String,
    pub is_not_defined: bool,
    pub time_range: Option<TimeRange>,
    pub props: Vec<PropFilter>,
    pub comps: Vec<CompFilter>,
}

/// A CardDAV `filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardFilter {
    /// `test="anyof"` (the default) or `allof`.
    pub any: bool,
    pub props: Vec<PropFilter>,
}

/// What `calendar-data` asks of the returned data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarData {
    AsIs,
    Expand(TimeRange),
    LimitRecurrence(TimeRange),
}

/// Why a REPORT body is refused: the precondition element, and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub ns: &'static str,
    pub precondition: &'static str,
    pub reason: String,
}

fn refuse(ns: &'static str, precondition: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        ns,
        precondition,
        reason: reason.into(),
    }
}

/// `20060104T000000Z` (UTC only, as RFC 4791 requires).
pub fn parse_utc(s: &str) -> Option<i64> {
    let s = s.trim();
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%SZ").ok()?;
    Some(t.and_utc().timestamp())
}

fn time_range(e: &Element) -> Result<TimeRange, Refusal> {
    let get = |name: &str| -> Result<Option<i64>, Refusal> {
        match e.attr(name) {
            None => Ok(None),
            Some(v) => parse_utc(v).map(Some).ok_or_else(|| {
                refuse(
                    CALDAV,
                    "valid-filter",
                    format!("{name}=\"{v}\" is not a UTC date-time"),
                )
            }),
        }
    };
    let r = TimeRange {
        start: get("start")?,
        end: get("end")?,
    };
    if r.start.is_none() && r.end.is_none() {
        return Err(refuse(
            CALDAV,
            "valid-filter",
            "time-range needs start or end",
        ));
    }
    if let (Some(s), Some(e)) = (r.start, r.end)
        && e <= s
    {
        return Err(refuse(
            CALDAV,
            "valid-filter",
            "time-range ends before it starts",
        ));
    }
    Ok(r)
}

fn text_match(e: &Element, ns: &'static str) -> Result<TextMatch, Refusal> {
    let default = if ns == CARDDAV {
        Collation::UnicodeCasemap
    } else {
        Collation::AsciiCasemap
    };
    let collation = match e.attr("collation") {
        None => default,
        Some("i;ascii-casemap") => Collation::AsciiCasemap,
        Some("i;octet") => Collation::Octet,
        Some("i;unicode-casemap") => Collation::UnicodeCasemap,
        Some(other) => {
            return Err(refuse(
                ns,
                "supported-collation",
                format!("collation {other} is not supported"),
            ));
        }
    };
    let match_type = match e.attr("match-type") {
        // Both default to a substring match.
        None => MatchType::Contains,
        Some("equals") => MatchType::Equals,
        Some("contains") => MatchType::Contains,
        Some("starts-with") => MatchType::StartsWith,
        Some("ends-with") => MatchType::EndsWith,
        Some(other) => {
            return Err(refuse(
                ns,
                "valid-filter",
                format!("match-type {other} is unknown"),
            ));
        }
    };
    Ok(TextMatch {
        text: e.text.clone(),
        collation,
        negate: matches!(e.attr("negate-condition"), Some("yes")),
        match_type,
    })
}

fn name_of(e: &Element, ns: &'static str) -> Result<String, Refusal> {
    e.attr("name")
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .map(str::to_ascii_uppercase)
        .ok_or_else(|| refuse(ns, "valid-filter", format!("{} without a name", e.name)))
}

fn param_filter(e: &Element, ns: &'static str) -> Result<ParamFilter, Refusal> {
    let mut f = ParamFilter {
        name: name_of(e, ns)?,
        is_not_defined: false,
        text: None,
    };
    for c in &e.children {
        match (c.ns.as_str(), c.name.as_str()) {
            (n, "is-not-defined") if n == ns => f.is_not_defined = true,
            (n, "text-match") if n == ns => f.text = Some(text_match(c, ns)?),
            _ => {}
        }
    }
    Ok(f)
}

fn prop_filter(e: &Element, ns: &'static str) -> Result<PropFilter, Refusal> {
    let mut f = PropFilter {
        name: name_of(e, ns)?,
        is_not_defined: false,
        time_range: None,
        texts: Vec::new(),
        params: Vec::new(),
        any: e.attr("test") != Some("allof"),
    };
    for c in &e.children {
        match (c.ns.as_str(), c.name.as_str()) {
            (n, "is-not-defined") if n == ns => f.is_not_defined = true,
            (n, "time-range") if n == ns && ns == CALDAV => f.time_range = Some(time_range(c)?),
            (n, "text-match") if n == ns => f.texts.push(text_match(c, ns)?),
            (n, "param-filter") if n == ns => f.params.push(param_filter(c, ns)?),
            _ => {}
        }
    }
    Ok(f)
}

fn comp_filter(e: &Element) -> Result<CompFilter, Refusal> {
    let mut f = CompFilter {
        name: name_of(e, CALDAV)?,
        is_not_defined: false,
        time_range: None,
        props: Vec::new(),
        comps: Vec::new(),
    };
    for c in &e.children {
        if c.ns != CALDAV {
            continue;
        }
        match c.name.as_str() {
            "is-not-defined" => f.is_not_defined = true,
            "time-range" => f.time_range = Some(time_range(c)?),
            "prop-filter" => f.props.push(prop_filter(c, CALDAV)?),
            "comp-filter" => f.comps.push(comp_filter(c)?),
            _ => {}
        }
    }
    Ok(f)
}

/// The top comp-filter of a calendar-query (must name VCALENDAR).
pub fn calendar_filter(report: &Element) -> Result<Option<CompFilter>, Refusal> {
    let Some(filter) = report.child(CALDAV, "filter") else {
        return Err(refuse(
            CALDAV,
            "valid-filter",
            "calendar-query needs a filter",
        ));
    };
    let Some(top) = filter.child(CALDAV, "comp-filter") else {
        return Ok(None);
    };
    let f = comp_filter(top)?;
    if f.name != "VCALENDAR" {
        return Err(refuse(
            CALDAV,
            "valid-filter",
            "the top comp-filter must name VCALENDAR",
        ));
    }
    Ok(Some(f))
}

/// An addressbook-query's filter (none: every card).
pub fn card_filter(report: &Element) -> Result<CardFilter, Refusal> {
    let Some(filter) = report.child(CARDDAV, "filter") else {
        return Ok(CardFilter {
            any: true,
            props: Vec::new(),
        });
    };
    let mut props = Vec::new();
    for c in filter.children_named(CARDDAV, "prop-filter") {
        props.push(prop_filter(c, CARDDAV)?);
    }
    Ok(CardFilter {
        any: filter.attr("test") != Some("allof"),
        props,
    })
}

/// The properties a REPORT or PROPFIND asks for, as (namespace, name),
/// with the `calendar-data` element if asked (its options).
pub fn requested_props(parent: &Element) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(p) = parent.child(DAV, "prop") {
        for c in &p.children {
            // Each once, however often it is asked for.
            let key = (c.ns.clone(), c.name.clone());
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }
    out
}

/// `calendar-data`'s `expand` or `limit-recurrence-set`, if any.
pub fn calendar_data(parent: &Element) -> Result<CalendarData, Refusal> {
    let Some(cd) = parent
        .child(DAV, "prop")
        .and_then(|p| p.child(CALDAV, "calendar-data"))
    else {
        return Ok(CalendarData::AsIs);
    };
    if let Some(e) = cd.child(CALDAV, "expand") {
        let r = time_range(e)?;
        if r.start.is_none() || r.end.is_none() {
            return Err(refuse(CALDAV, "valid-filter", "expand needs start and end"));
        }
        return Ok(CalendarData::Expand(r));
    }
    if let Some(e) = cd.child(CALDAV, "limit-recurrence-set") {
        return Ok(CalendarData::LimitRecurrence(time_range(e)?));
    }
    Ok(CalendarData::AsIs)
}

/// `<D:limit><D:nresults>N</D:nresults></D:limit>` (or CardDAV's).
pub fn nresults(report: &Element) -> Option<usize> {
    for ns in [DAV, CARDDAV] {
        if let Some(n) = report
            .child(ns, "limit")
            .and_then(|l| l.child(ns, "nresults"))
        {
            return n.text.trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_calendar_query() {
        let body = br#"<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
          <D:prop><D:getetag/><C:calendar-data><C:expand start="20240101T000000Z" end="20240201T000000Z"/></C:calendar-data></D:prop>
          <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">
            <C:time-range start="20240101T000000Z" end="20240201T000000Z"/>
            <C:prop-filter name="SUMMARY"><C:text-match collation="i;octet" negate-condition="yes">x</C:text-match></C:prop-filter>
            <C:prop-filter name="ATTENDEE"><C:param-filter name="PARTSTAT"><C:is-not-defined/></C:param-filter></C:prop-filter>
          </C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"#;
        let e = crate::xml::parse(body).unwrap();
        let f = calendar_filter(&e).unwrap().unwrap();
        let ev = &f.comps[0];
        assert_eq!(ev.name, "VEVENT");
        assert_eq!(ev.time_range.unwrap().start, Some(1704067200));
        assert!(ev.props[0].texts[0].negate);
        assert!(ev.props[1].params[0].is_not_defined);
        assert!(matches!(
            calendar_data(&e).unwrap(),
            CalendarData::Expand(_)
        ));
        let bad = br#"<C:calendar-query xmlns:C="urn:ietf:params:xml:ns:caldav"><C:filter><C:comp-filter name="VCALENDAR"><C:prop-filter name="X"><C:text-match collation="i;klingon">a</C:text-match></C:prop-filter></C:comp-filter></C:filter></C:calendar-query>"#;
        let e = crate::xml::parse(bad).unwrap();
        assert_eq!(
            calendar_filter(&e).unwrap_err().precondition,
            "supported-collation"
        );
    }

    #[test]
    fn text_matches_follow_collations() {
        let t = |text: &str, collation, negate| TextMatch {
            text: text.into(),
            collation,
            negate,
            match_type: MatchType::Contains,
        };
        assert!(t("MEET", Collation::AsciiCasemap, false).matches("team meeting"));
        assert!(!t("MEET", Collation::Octet, false).matches("team meeting"));
        assert!(t("MEET", Collation::Octet, true).matches("team meeting"));
        assert!(t("ÄRGER", Collation::UnicodeCasemap, false).matches("viel ärger"));
    }
}
