//! Taskwarrior 2.6's sync (the taskd protocol) in the tasks grain: the
//! user's transaction log merged with each request, as taskserver does.
//! The wire format is `granary_wire::taskd`.
//!
//! # Server algorithm (taskserver `Daemon::handle_sync`)
//!
//! The server keeps, per user, an append-only transaction log (`tx.data`):
//! each line is either a task JSON object or a sync key. A sync:
//!
//! 1. `parse_payload`: non-empty payload lines starting with `{` are client
//!    tasks, any other non-empty line is the client's sync key (the last one
//!    wins).
//! 2. `find_branch_point`: no key → index 0; otherwise the index of the line
//!    equal to the key, or error 500 "Could not find the last sync
//!    transaction...".
//! 3. `extract_subset`: every task line at or after the branch point is the
//!    server subset — what other replicas uploaded since this client's last
//!    sync. All of it is returned to the client.
//! 4. For each client task, in order (each one is validated first):
//!    * if its uuid does not occur in the subset, the line is stored
//!      unchanged (and not echoed back);
//!    * otherwise, the first time that uuid is met, the task is merged:
//!      `find_common_ancestor` walks back from the branch point to the most
//!      recent line with that uuid (none → error 500); `get_client_mods` lists
//!      all client lines with the uuid, `get_server_mods` all log lines with
//!      it after the ancestor; `merge_sort` starts from the ancestor and walks
//!      both lists like a merge, each time taking the side whose next version
//!      has the smaller last-modification time (`modified`, else `end`, else
//!      `start`, else `entry`; on a tie the *server* version goes first, so
//!      the client's equal-time change is applied after it and wins). Each
//!      version is applied by `patch`: the attribute delta between that side's
//!      previous version (initially the ancestor) and this version is applied
//!      to the combined task (attributes that disappeared are removed, new or
//!      changed ones set), then `modified` is set to that version's
//!      modification time. The combined task is appended to the log and
//!      returned to the client. Later client lines with the same uuid are
//!      skipped (the merge already consumed them).
//! 5. If anything is to be appended, a fresh sync key is generated and
//!    appended after it; otherwise the newest key already in the log is
//!    reused.
//! 6. Reply payload: subset lines, merged tasks, key (each line ending in
//!    `'\n'`). Code 200 if the subset, merged tasks or appended lines are
//!    non-empty, otherwise 201 "No change".
//!
//! Like taskd, attributes are compared per attribute; annotations are
//! compared per annotation (taskd keeps each as its own `annotation_<epoch>`
//! attribute), so two replicas annotating the same task both keep their
//! annotations.

use std::collections::{BTreeMap, HashSet};

use granary_wire::taskd::SyncError;
use serde_json::{Map, Value};

/// taskd turns every thrown string into code 500 with the string as status.
fn fail(status: String) -> SyncError {
    SyncError { code: 500, status }
}

// ---------------------------------------------------------------------------
// Sync
// ---------------------------------------------------------------------------

/// Outcome of one sync request against a user's transaction log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// Lines to append to the log, in order (task JSON lines, then the new sync
    /// key line), empty when nothing changed.
    pub append: Vec<String>,
    /// 200 or 201
    pub code: u16,
    /// The reply payload (task JSON lines, then the sync key, each line ending
    /// in '\n').
    pub payload: String,
}

const NO_BRANCH: &str =
    "Could not find the last sync transaction. Did you skip the 'task sync init' requirement?";

/// What taskd's `Task::parseLegacy` throws for a line that is not a JSON
/// object.
const BAD_LINE: &str = "Unrecognized Taskwarrior file format or blank line in data.";

/// Attributes taskd types as "date" (`taskd_staticInitialize`).
const DATE_ATTRS: [&str; 8] = [
    "due",
    "end",
    "entry",
    "modified",
    "scheduled",
    "start",
    "until",
    "wait",
];

/// An attribute of a task as taskd sees it: plain attributes by name, and each
/// annotation as its own attribute keyed by its entry time (taskd's
/// `annotation_<epoch>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Attr(String),
    Anno(i64),
}

/// A task as a flat attribute map. Annotation values are the whole annotation
/// objects as received.
type Flat = BTreeMap<Key, Value>;

/// A parsed task line.
struct Parsed {
    flat: Flat,
    /// The `uuid` attribute if it is a string, else "".
    uuid: String,
}

fn is_task_line(line: &str) -> bool {
    line.as_bytes().first() == Some(&b'{')
}

/// Runs taskd's sync: `log` is the user's whole transaction log, oldest first
/// (each line a task JSON object or a sync-key UUID, without newline);
/// `payload` the request's payload; `init` whether it was `subtype: init`;
/// `new_key` makes a fresh UUID string when one is needed.
///
/// Errors: taskd reports every failure of a sync as code 500 with a specific
/// status text (it never uses 400 "Malformed data"), so all errors here are
/// 500: an unknown sync key, a client line that is not a JSON object
/// ("Unrecognized Taskwarrior file format or blank line in data."), a task
/// failing taskd's `Task::validate` (bad status, bad uuid, no description,
/// recurrence without due), a malformed annotation or date, or a missing
/// common ancestor. On error nothing must be appended.
pub fn sync(
    log: &[String],
    payload: &str,
    init: bool,
    new_key: impl FnOnce() -> String,
) -> Result<Synced, SyncError> {
    // taskd only logs the `init` subtype; `task sync init` differs on the
    // client side (it uploads every task and sends no key).
    let _ = init;

    // Daemon::parse_payload
    let mut client_lines: Vec<&str> = Vec::new();
    let mut sync_key = "";
    for line in payload.split('\n') {
        if line.is_empty() {
            continue;
        }
        if is_task_line(line) {
            client_lines.push(line);
        } else {
            sync_key = line;
        }
    }

    // Daemon::find_branch_point
    let branch = find_branch_point(log, sync_key)?;

    // Daemon::extract_subset: every task line from the branch point on.
    let mut index = LogIndex::new(log);
    let mut subset: Vec<usize> = Vec::new();
    let mut subset_uuids: HashSet<String> = HashSet::new();
    for (i, line) in log.iter().enumerate().skip(branch) {
        if !is_task_line(line) {
            continue;
        }
        let uuid = index
            .uuid(i)
            .map_err(|e| fail(format!("{e} at line {i}")))?
            .unwrap_or("")
            .to_string();
        subset.push(i);
        subset_uuids.insert(uuid);
    }

    // Parse the client's tasks (taskd's `Task (client_task)` and the parses in
    // get_client_mods); validation happens in order inside the loop below.
    let mut clients: Vec<Parsed> = Vec::with_capacity(client_lines.len());
    for line in &client_lines {
        clients.push(parse_task(line).map_err(fail)?);
    }

    let mut new_server: Vec<String> = Vec::new();
    let mut new_client: Vec<String> = Vec::new();
    let mut already_seen: HashSet<String> = HashSet::new();

    for (k, line) in client_lines.iter().enumerate() {
        let uuid = validate(&clients[k]).map_err(fail)?;

        if subset_uuids.contains(&uuid) {
            // Merging scans all client and server versions of the task, so
            // each uuid is merged once.
            if !already_seen.insert(uuid.clone()) {
                continue;
            }

            let ancestor_at = find_common_ancestor(&mut index, branch, &uuid)?;
            let ancestor = parse_task(&log[ancestor_at]).map_err(fail)?.flat;

            // Daemon::get_client_mods
            let client_mods: Vec<&Flat> = clients
                .iter()
                .filter(|c| c.uuid == uuid)
                .map(|c| &c.flat)
                .collect();

            // Daemon::get_server_mods
            let mut server_mods: Vec<Flat> = Vec::new();
            for (i, server_line) in log.iter().enumerate().skip(ancestor_at + 1) {
                if index.uuid(i).map_err(fail)? == Some(uuid.as_str()) {
                    server_mods.push(parse_task(server_line).map_err(fail)?.flat);
                }
            }

            let combined = compose(&merge_sort(&client_mods, &server_mods, ancestor));
            new_server.push(combined.clone());
            new_client.push(combined);
        } else {
            // Not changed on the server since the branch: stored as sent, not
            // returned to the client.
            new_server.push((*line).to_string());
        }
    }

    // New data → new key; otherwise the most recent key stays valid.
    let mut append: Vec<String> = Vec::new();
    let key = if new_server.is_empty() {
        log.iter()
            .rev()
            .find(|l| !l.is_empty() && !is_task_line(l))
            .cloned()
            .unwrap_or_default()
    } else {
        let key = new_key();
        append = new_server;
        append.push(key.clone());
        key
    };

    // Daemon::generate_payload (or just the key when there is nothing else).
    let mut out = String::new();
    for &i in &subset {
        out.push_str(&log[i]);
        out.push('\n');
    }
    for task in &new_client {
        out.push_str(task);
        out.push('\n');
    }
    out.push_str(&key);
    out.push('\n');

    let code = if !subset.is_empty() || !new_client.is_empty() || !append.is_empty() {
        200
    } else {
        201
    };

    Ok(Synced {
        append,
        code,
        payload: out,
    })
}

/// Daemon::find_branch_point: index of the client's key in the log; 0 without
/// a key.
fn find_branch_point(log: &[String], key: &str) -> Result<usize, SyncError> {
    if key.is_empty() {
        return Ok(0);
    }
    log.iter()
        .position(|l| l.as_str() == key)
        .ok_or_else(|| fail(NO_BRANCH.to_string()))
}

/// Daemon::find_common_ancestor: starting at the branch point and going
/// backwards, the first line of the task. With no client key the branch point
/// is 0, so only the very first log line qualifies (as in taskd).
fn find_common_ancestor(
    index: &mut LogIndex<'_>,
    branch: usize,
    uuid: &str,
) -> Result<usize, SyncError> {
    let len = index.log.len();
    if len > 0 {
        let mut i = branch.min(len - 1);
        loop {
            if index.uuid(i).map_err(fail)? == Some(uuid) {
                return Ok(i);
            }
            if i == 0 {
                break;
            }
            i -= 1;
        }
    }
    Err(fail(format!(
        "ERROR: Could not find common ancestor for {uuid}. Did you skip the 'task sync init' requirement?"
    )))
}

/// Lazily computed uuids of log lines, so that scanning the log for a task
/// parses each line at most once.
struct LogIndex<'a> {
    log: &'a [String],
    /// `None`: not yet computed; `Some(None)`: not a task line.
    uuids: Vec<Option<Option<String>>>,
}

impl<'a> LogIndex<'a> {
    fn new(log: &'a [String]) -> Self {
        LogIndex {
            log,
            uuids: vec![None; log.len()],
        }
    }

    /// The uuid of line `i` if it is a task line ("" when it has none).
    fn uuid(&mut self, i: usize) -> Result<Option<&str>, String> {
        if self.uuids[i].is_none() {
            let line = &self.log[i];
            let uuid = if is_task_line(line) {
                Some(parse_task(line)?.uuid)
            } else {
                None
            };
            self.uuids[i] = Some(uuid);
        }
        Ok(self.uuids[i].as_ref().and_then(|u| u.as_deref()))
    }
}

/// Daemon::merge_sort: replays client (`left`) and server (`right`) versions
/// onto the ancestor in order of modification time; on equal times the server
/// version is applied first.
fn merge_sort(left: &[&Flat], right: &[Flat], ancestor: Flat) -> Flat {
    let mut combined = ancestor.clone();
    let mut prev_l: &Flat = &ancestor;
    let mut prev_r: &Flat = &ancestor;
    let (mut l, mut r) = (0usize, 0usize);

    while l < left.len() && r < right.len() {
        let mod_l = last_modification(left[l]);
        let mod_r = last_modification(&right[r]);
        if mod_l < mod_r {
            patch(&mut combined, prev_l, left[l]);
            set_modified(&mut combined, mod_l);
            prev_l = left[l];
            l += 1;
        } else {
            patch(&mut combined, prev_r, &right[r]);
            set_modified(&mut combined, mod_r);
            prev_r = &right[r];
            r += 1;
        }
    }
    while l < left.len() {
        let mod_l = last_modification(left[l]);
        patch(&mut combined, prev_l, left[l]);
        set_modified(&mut combined, mod_l);
        prev_l = left[l];
        l += 1;
    }
    while r < right.len() {
        let mod_r = last_modification(&right[r]);
        patch(&mut combined, prev_r, &right[r]);
        set_modified(&mut combined, mod_r);
        prev_r = &right[r];
        r += 1;
    }
    combined
}

/// Daemon::last_modification: `modified`, else `end`, else `start`, else
/// `entry` (0 if none; an empty or unreadable date also counts as 0, as
/// taskd's `strtoul` would give).
fn last_modification(task: &Flat) -> i64 {
    for name in ["modified", "end", "start", "entry"] {
        if let Some(value) = task.get(&Key::Attr(name.to_string())) {
            return epoch_of(value);
        }
    }
    0
}

fn set_modified(task: &mut Flat, when: i64) {
    task.insert(
        Key::Attr("modified".to_string()),
        Value::String(format_iso(when)),
    );
}

/// Daemon::patch: applies the delta between `from` and `to` to `base`:
/// attributes only in `from` are removed, attributes only in `to` or with a
/// different value are set.
fn patch(base: &mut Flat, from: &Flat, to: &Flat) {
    for key in from.keys() {
        if !to.contains_key(key) {
            base.remove(key);
        }
    }
    for (key, value) in to {
        if from.get(key) != Some(value) {
            base.insert(key.clone(), value.clone());
        }
    }
}

/// Serialises a merged task: plain attributes (empty strings omitted, as
/// taskd's `composeJSON` never writes them) and the annotations in entry-time
/// order, as one JSON object with sorted keys.
fn compose(task: &Flat) -> String {
    let mut object = Map::new();
    let mut annotations = Vec::new();
    for (key, value) in task {
        match key {
            Key::Attr(name) => {
                if value.as_str() == Some("") {
                    continue;
                }
                object.insert(name.clone(), value.clone());
            }
            Key::Anno(_) => annotations.push(value.clone()),
        }
    }
    if !annotations.is_empty() {
        object.insert("annotations".to_string(), Value::Array(annotations));
    }
    Value::Object(object).to_string()
}

/// Task::parse / Task::parseJSON, reduced to what matters here: the line must
/// be a JSON object; annotations must have a string `entry` (a valid date)
/// and `description`; taskd's date attributes must hold valid dates.
fn parse_task(line: &str) -> Result<Parsed, String> {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
        return Err(BAD_LINE.to_string());
    };
    let uuid = object
        .get("uuid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();

    let mut flat = Flat::new();
    for (name, value) in object {
        if name == "annotations" {
            let Value::Array(items) = value else {
                return Err(format!("Annotation is missing an entry date: {line}"));
            };
            for item in items {
                let entry = match item.get("entry") {
                    Some(Value::String(entry)) => entry.clone(),
                    _ => return Err(format!("Annotation is missing an entry date: {line}")),
                };
                if !matches!(item.get("description"), Some(Value::String(_))) {
                    return Err(format!("Annotation is missing a description: {line}"));
                }
                let when = parse_date(&entry).ok_or_else(|| bad_date(&entry))?;
                // std::map::insert keeps the first of equal keys.
                flat.entry(Key::Anno(when)).or_insert(item);
            }
        } else {
            if DATE_ATTRS.contains(&name.as_str()) {
                check_date(&value)?;
            }
            flat.insert(Key::Attr(name), value);
        }
    }
    Ok(Parsed { flat, uuid })
}

fn attr<'a>(task: &'a Flat, name: &str) -> Option<&'a Value> {
    task.get(&Key::Attr(name.to_string()))
}

/// The text taskd would hold for a value (strings as is, others as JSON).
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The checks of taskd's `Task::validate` that can fail, in its order;
/// returns the task's uuid.
fn validate(task: &Parsed) -> Result<String, String> {
    let flat = &task.flat;

    if let Some(status) = attr(flat, "status").map(text_of)
        && let Some(first) = status.chars().next()
        && !matches!(first, 'p' | 'c' | 'd' | 'r' | 'w')
    {
        return Err(format!("The status '{status}' is not valid."));
    }

    // taskd would invent a uuid for its own check but store the line without
    // one; we refuse such a line instead.
    let missing = || "A task must have a 'uuid'.".to_string();
    match attr(flat, "uuid") {
        None => return Err(missing()),
        Some(Value::String(uuid)) if uuid.is_empty() => return Err(missing()),
        Some(Value::String(uuid)) if is_uuid(uuid) => {}
        Some(Value::String(uuid)) => return Err(format!("Not a valid UUID '{uuid}'.")),
        Some(other) => return Err(format!("Not a valid UUID '{other}'.")),
    }

    match attr(flat, "description").map(text_of) {
        None => return Err("A task must have a description.".to_string()),
        Some(description) if description.is_empty() => {
            return Err("Cannot add a task that is blank.".to_string());
        }
        Some(_) => {}
    }

    if attr(flat, "recur").is_some()
        && attr(flat, "due")
            .map(text_of)
            .is_none_or(|due| due.is_empty())
    {
        return Err("A recurring task must also have a 'due' date.".to_string());
    }

    Ok(task.uuid.clone())
}

/// libshared `Lexer::isUUID`: at least 8 characters of the pattern
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits of either case).
fn is_uuid(s: &str) -> bool {
    const PATTERN: &[u8] = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";
    let bytes = s.as_bytes();
    if bytes.len() < 8 || bytes.len() > PATTERN.len() {
        return false;
    }
    bytes.iter().zip(PATTERN).all(|(&c, &p)| {
        if p == b'x' {
            c.is_ascii_hexdigit()
        } else {
            c == p
        }
    })
}

// ---------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------

fn bad_date(text: &str) -> String {
    format!("'{text}' is not a valid date in the '' format.")
}

/// A date attribute must be empty, a readable date string or an integer epoch.
fn check_date(value: &Value) -> Result<(), String> {
    match value {
        Value::String(s) if s.is_empty() => Ok(()),
        Value::String(s) => parse_date(s).map(|_| ()).ok_or_else(|| bad_date(s)),
        Value::Number(n) if n.as_i64().is_some() => Ok(()),
        other => Err(bad_date(&other.to_string())),
    }
}

/// Seconds since the epoch of a date value; 0 when empty or unreadable.
fn epoch_of(value: &Value) -> i64 {
    match value {
        Value::String(s) => parse_date(s).unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn digits(s: Option<&str>) -> Option<i64> {
    let s = s?;
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Parses the date forms Taskwarrior uses: "20261203T101500Z" (what 2.6
/// writes), "2026-12-03T10:15:00Z" and a plain epoch number. A missing "Z"
/// is read as UTC too.
fn parse_date(s: &str) -> Option<i64> {
    if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        return s.parse().ok();
    }
    let core = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = core.split_once('T')?;
    let db = date.as_bytes();
    let (year, month, day) = match db.len() {
        8 => (
            digits(date.get(0..4))?,
            digits(date.get(4..6))?,
            digits(date.get(6..8))?,
        ),
        10 if db[4] == b'-' && db[7] == b'-' => (
            digits(date.get(0..4))?,
            digits(date.get(5..7))?,
            digits(date.get(8..10))?,
        ),
        _ => return None,
    };
    let tb = time.as_bytes();
    let (hour, minute, second) = match tb.len() {
        6 => (
            digits(time.get(0..2))?,
            digits(time.get(2..4))?,
            digits(time.get(4..6))?,
        ),
        8 if tb[2] == b':' && tb[5] == b':' => (
            digits(time.get(0..2))?,
            digits(time.get(3..5))?,
            digits(time.get(6..8))?,
        ),
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 => {
            if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 {
                29
            } else {
                28
            }
        }
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Taskwarrior's ISO form, "YYYYMMDDTHHMMSSZ" (libshared `Datetime::toISO`).
fn format_iso(epoch: i64) -> String {
    let (year, month, day) = civil_from_days(epoch.div_euclid(86_400));
    let secs = epoch.rem_euclid(86_400);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const K1: &str = "11111111-1111-4111-8111-111111111111";
    const K2: &str = "22222222-2222-4222-8222-222222222222";
    const K3: &str = "33333333-3333-4333-8333-333333333333";
    const U: &str = "a0000000-0000-4000-8000-000000000001";
    const U2: &str = "a0000000-0000-4000-8000-000000000002";
    const U3: &str = "a0000000-0000-4000-8000-000000000003";
    const U4: &str = "a0000000-0000-4000-8000-000000000004";
    const T0: &str = "20261203T100000Z";
    const T1: &str = "20261203T101500Z";
    const T2: &str = "20261203T103000Z";
    const T3: &str = "20261203T104500Z";
    const DUE: &str = "20261224T000000Z";

    fn no_key() -> String {
        panic!("no new sync key expected")
    }

    fn task_line(uuid: &str, description: &str, modified: &str) -> String {
        json!({
            "uuid": uuid,
            "description": description,
            "status": "pending",
            "entry": T0,
            "modified": modified,
        })
        .to_string()
    }

    fn base() -> Value {
        json!({
            "uuid": U,
            "description": "orig",
            "status": "pending",
            "entry": T0,
            "modified": T0,
            "due": DUE,
        })
    }

    fn with(mut v: Value, key: &str, value: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.to_string(), value);
        v
    }

    fn without(mut v: Value, key: &str) -> Value {
        v.as_object_mut().unwrap().remove(key);
        v
    }

    /// The log holds the ancestor, K1, then `server` uploaded by another
    /// replica, K2; the client last synced at K1 and now sends `client`.
    fn conflict(server: &Value, client: &Value) -> String {
        let s = server.to_string();
        let log = vec![
            base().to_string(),
            K1.to_string(),
            s.clone(),
            K2.to_string(),
        ];
        let payload = format!("{client}\n{K1}\n\n");
        let r = sync(&log, &payload, false, || K3.to_string()).unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.append.len(), 2);
        assert_eq!(r.append[1], K3);
        assert_eq!(r.payload, format!("{s}\n{}\n{K3}\n", r.append[0]));
        r.append[0].clone()
    }

    fn merged(server: Value, client: Value) -> Value {
        serde_json::from_str(&conflict(&server, &client)).unwrap()
    }

    // --- framing -----------------------------------------------------------

    #[test]
    fn first_sync_stores_and_returns_only_key() {
        let t1 = task_line(U, "one", T0);
        let t2 = task_line(U2, "two", T0);
        let payload = format!("{t1}\n{t2}\n\n");
        for init in [false, true] {
            let r = sync(&[], &payload, init, || K1.to_string()).unwrap();
            assert_eq!(r.code, 200);
            assert_eq!(r.append, vec![t1.clone(), t2.clone(), K1.to_string()]);
            assert_eq!(r.payload, format!("{K1}\n"));
        }
    }

    #[test]
    fn stored_lines_are_byte_for_byte() {
        let line = format!(
            "{{\"uuid\": \"{U}\",   \"description\":\"caf\\u00e9 \\\"x\\\"\", \"entry\":\"{T0}\"}}"
        );
        let r = sync(&[], &format!("{line}\n"), false, || K1.to_string()).unwrap();
        assert_eq!(r.append, vec![line, K1.to_string()]);
    }

    #[test]
    fn second_replica_initial_sync_receives_everything() {
        let t1 = task_line(U, "one", T0);
        let t2 = task_line(U2, "two", T0);
        let log = vec![t1.clone(), t2.clone(), K1.to_string()];

        let r = sync(&log, "", false, no_key).unwrap();
        assert_eq!(r.code, 200);
        assert!(r.append.is_empty());
        assert_eq!(r.payload, format!("{t1}\n{t2}\n{K1}\n"));

        // With a task of its own it also gets a new key.
        let t3 = task_line(U3, "three", T1);
        let r = sync(&log, &format!("{t3}\n\n"), true, || K2.to_string()).unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.append, vec![t3, K2.to_string()]);
        assert_eq!(r.payload, format!("{t1}\n{t2}\n{K2}\n"));
    }

    #[test]
    fn incremental_sync_returns_only_newer_lines() {
        let t1 = task_line(U, "one", T0);
        let t2 = task_line(U2, "two", T0);
        let t3 = task_line(U3, "three", T1);
        let log = vec![t1, t2, K1.to_string(), t3.clone(), K2.to_string()];

        // Nothing to upload: newer task comes back, key unchanged.
        let r = sync(&log, &format!("{K1}\n\n"), false, no_key).unwrap();
        assert_eq!(r.code, 200);
        assert!(r.append.is_empty());
        assert_eq!(r.payload, format!("{t3}\n{K2}\n"));

        // Uploading an unrelated task: stored, not echoed, new key.
        let t4 = task_line(U4, "four", T2);
        let r = sync(&log, &format!("{K1}\n{t4}\n\n"), false, || K3.to_string()).unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.append, vec![t4, K3.to_string()]);
        assert_eq!(r.payload, format!("{t3}\n{K3}\n"));
    }

    #[test]
    fn no_change_is_201() {
        let log = vec![task_line(U, "one", T0), K1.to_string()];
        let r = sync(&log, &format!("{K1}\n\n"), false, no_key).unwrap();
        assert_eq!(
            r,
            Synced {
                append: vec![],
                code: 201,
                payload: format!("{K1}\n"),
            }
        );

        // Empty log, empty request: 201 with an empty key line.
        let r = sync(&[], "\n", false, no_key).unwrap();
        assert_eq!(r.code, 201);
        assert_eq!(r.payload, "\n");
    }

    #[test]
    fn unknown_key_is_refused() {
        let log = vec![task_line(U, "one", T0), K1.to_string()];
        // The key is checked before the client's lines are.
        let e = sync(&log, "{broken\nnot-a-known-key\n", false, no_key).unwrap_err();
        assert_eq!(e.code, 500);
        assert_eq!(e.status, NO_BRANCH);
    }

    #[test]
    fn malformed_lines_are_refused() {
        let cases = [
            ("{broken".to_string(), BAD_LINE.to_string()),
            (
                json!({"uuid": U}).to_string(),
                "A task must have a description.".to_string(),
            ),
            (
                json!({"uuid": U, "description": ""}).to_string(),
                "Cannot add a task that is blank.".to_string(),
            ),
            (
                json!({"uuid": "xyz", "description": "d"}).to_string(),
                "Not a valid UUID 'xyz'.".to_string(),
            ),
            (
                json!({"description": "d"}).to_string(),
                "A task must have a 'uuid'.".to_string(),
            ),
            (
                json!({"uuid": U, "description": "d", "status": "bogus"}).to_string(),
                "The status 'bogus' is not valid.".to_string(),
            ),
            (
                json!({"uuid": U, "description": "d", "recur": "weekly"}).to_string(),
                "A recurring task must also have a 'due' date.".to_string(),
            ),
            (
                json!({"uuid": U, "description": "d", "modified": "soon"}).to_string(),
                "'soon' is not a valid date in the '' format.".to_string(),
            ),
            (
                json!({"uuid": U, "description": "d", "annotations": [{"description": "x"}]})
                    .to_string(),
                format!(
                    "Annotation is missing an entry date: {}",
                    json!({"uuid": U, "description": "d", "annotations": [{"description": "x"}]})
                ),
            ),
        ];
        for (line, status) in cases {
            // A good line first: the request fails as a whole.
            let payload = format!("{}\n{line}\n", task_line(U2, "fine", T0));
            let e = sync(&[], &payload, false, no_key).unwrap_err();
            assert_eq!(e, SyncError { code: 500, status }, "line {line}");
        }
        // A JSON value that is not an object.
        let e = sync(&[], "{}x\n", false, no_key).unwrap_err();
        assert_eq!(e.status, BAD_LINE);
    }

    #[test]
    fn merge_keeps_changes_to_different_attributes() {
        let s = with(with(base(), "priority", json!("H")), "modified", json!(T1));
        let c = with(
            with(base(), "project", json!("home")),
            "modified",
            json!(T2),
        );
        let expected = with(
            with(
                with(base(), "priority", json!("H")),
                "project",
                json!("home"),
            ),
            "modified",
            json!(T2),
        );
        let line = conflict(&s, &c);
        assert_eq!(line, expected.to_string());
        assert_eq!(merged(s, c), expected);
    }

    #[test]
    fn merge_same_attribute_later_modification_wins() {
        // Client later.
        let s = with(
            with(base(), "description", json!("server")),
            "modified",
            json!(T1),
        );
        let c = with(
            with(base(), "description", json!("client")),
            "modified",
            json!(T2),
        );
        let m = merged(s, c);
        assert_eq!(m["description"], "client");
        assert_eq!(m["modified"], T2);

        // Server later.
        let s = with(
            with(base(), "description", json!("server")),
            "modified",
            json!(T2),
        );
        let c = with(
            with(base(), "description", json!("client")),
            "modified",
            json!(T1),
        );
        let m = merged(s, c);
        assert_eq!(m["description"], "server");
        assert_eq!(m["modified"], T2);
    }

    #[test]
    fn merge_tie_applies_server_first_so_client_wins() {
        let s = with(
            with(base(), "description", json!("server")),
            "modified",
            json!(T1),
        );
        let c = with(
            with(base(), "description", json!("client")),
            "modified",
            json!(T1),
        );
        let m = merged(s, c);
        assert_eq!(m["description"], "client");
        assert_eq!(m["modified"], T1);
    }

    #[test]
    fn merge_attribute_deletion() {
        // Client removes `due`, server changes something else.
        let s = with(with(base(), "priority", json!("H")), "modified", json!(T1));
        let c = with(without(base(), "due"), "modified", json!(T2));
        let m = merged(s, c);
        assert_eq!(
            m,
            with(
                with(without(base(), "due"), "priority", json!("H")),
                "modified",
                json!(T2)
            )
        );

        // Server removes `due`, client changes something else earlier.
        let s = with(without(base(), "due"), "modified", json!(T2));
        let c = with(with(base(), "priority", json!("L")), "modified", json!(T1));
        let m = merged(s, c);
        assert_eq!(
            m,
            with(
                with(without(base(), "due"), "priority", json!("L")),
                "modified",
                json!(T2)
            )
        );
    }

    #[test]
    fn merge_keeps_annotations_from_both_sides() {
        let sa = json!({"entry": T1, "description": "from server"});
        let ca = json!({"entry": T2, "description": "from client"});
        let s = with(
            with(base(), "annotations", json!([sa.clone()])),
            "modified",
            json!(T1),
        );
        let c = with(
            with(base(), "annotations", json!([ca.clone()])),
            "modified",
            json!(T2),
        );
        let m = merged(s, c);
        assert_eq!(
            m,
            with(
                with(base(), "annotations", json!([sa, ca])),
                "modified",
                json!(T2)
            )
        );
    }

    #[test]
    fn merge_replays_several_client_versions_once() {
        let a = base().to_string();
        let s = with(with(base(), "priority", json!("H")), "modified", json!(T2));
        let c1 = with(
            with(base(), "project", json!("home")),
            "modified",
            json!(T1),
        );
        let c2 = with(
            with(base(), "project", json!("work")),
            "modified",
            json!(T3),
        );
        let log = vec![a, K1.to_string(), s.to_string(), K2.to_string()];
        let payload = format!("{K1}\n{c1}\n{c2}\n\n");
        let r = sync(&log, &payload, false, || K3.to_string()).unwrap();
        assert_eq!(r.code, 200);
        assert_eq!(r.append.len(), 2, "one merged line and the key");
        let m: Value = serde_json::from_str(&r.append[0]).unwrap();
        assert_eq!(
            m,
            with(
                with(
                    with(base(), "priority", json!("H")),
                    "project",
                    json!("work")
                ),
                "modified",
                json!(T3)
            )
        );
        assert_eq!(r.payload, format!("{s}\n{}\n{K3}\n", r.append[0]));
    }

    #[test]
    fn merge_without_common_ancestor_fails_like_taskd() {
        // No key: the branch point is 0, so only the first log line can be
        // the ancestor.
        let log = vec![
            task_line(U2, "other", T0),
            K1.to_string(),
            base().to_string(),
            K2.to_string(),
        ];
        let c = with(
            with(base(), "description", json!("x")),
            "modified",
            json!(T1),
        );
        let e = sync(&log, &format!("{c}\n"), true, no_key).unwrap_err();
        assert_eq!(e.code, 500);
        assert_eq!(
            e.status,
            format!(
                "ERROR: Could not find common ancestor for {U}. Did you skip the 'task sync init' requirement?"
            )
        );

        // When the task is the first line, the initial upload merges.
        let log = vec![base().to_string(), K1.to_string()];
        let r = sync(&log, &format!("{c}\n"), true, || K2.to_string()).unwrap();
        assert_eq!(r.code, 200);
        let m: Value = serde_json::from_str(&r.append[0]).unwrap();
        assert_eq!(m, c);
        assert_eq!(r.payload, format!("{}\n{}\n{K2}\n", base(), r.append[0]));
    }

    #[test]
    fn modification_time_fallbacks() {
        let mut t = Flat::new();
        assert_eq!(last_modification(&t), 0);
        t.insert(Key::Attr("entry".into()), json!("20000101T000000Z"));
        assert_eq!(last_modification(&t), 946_684_800);
        t.insert(Key::Attr("start".into()), json!("20000101T000001Z"));
        assert_eq!(last_modification(&t), 946_684_801);
        t.insert(Key::Attr("end".into()), json!("20000101T000002Z"));
        assert_eq!(last_modification(&t), 946_684_802);
        t.insert(Key::Attr("modified".into()), json!("20000101T000003Z"));
        assert_eq!(last_modification(&t), 946_684_803);
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("20000101T000000Z"), Some(946_684_800));
        assert_eq!(parse_date("2000-01-01T00:00:00Z"), Some(946_684_800));
        assert_eq!(parse_date("946684800"), Some(946_684_800));
        assert_eq!(format_iso(946_684_800), "20000101T000000Z");
        assert_eq!(format_iso(0), "19700101T000000Z");
        assert_eq!(parse_date("20230229T000000Z"), None);
        assert_eq!(parse_date("20261303T000000Z"), None);
        assert_eq!(parse_date("20261203T240000Z"), None);
        assert_eq!(parse_date("garbage"), None);
        assert_eq!(parse_date(""), None);
        assert_eq!(parse_date("2026é203T101500Z"), None);
        for s in [T0, T1, T2, T3, DUE, "20240229T235959Z", "19691231T235959Z"] {
            assert_eq!(format_iso(parse_date(s).unwrap()), s);
        }
        assert!(parse_date(T1).unwrap() < parse_date(T2).unwrap());
    }

    #[test]
    fn uuids() {
        assert!(is_uuid(U));
        assert!(is_uuid("A0000000-0000-4000-8000-00000000000F"));
        assert!(is_uuid("a0000000"));
        assert!(!is_uuid("a000000"));
        assert!(!is_uuid("a0000000-zzzz"));
        assert!(!is_uuid(&format!("{U}0")));
    }
}
