//! MTA-STS policies (RFC 8461 §3.2), as fetched from another domain's
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt`: untrusted text,
//! parsed strictly, bounded.

/// The largest policy taken (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY: usize = 64 << 10;
/// The longest a policy may be kept: a year (RFC 8461 §3.2).
pub const MAX_AGE: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only over TLS with a verified certificate to a listed MX.
    Enforce,
    /// Deliver anyway; failures are only reported.
    Testing,
    /// No policy.
    None,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns: `mx.example.org`, or `*.example.org` for one label.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Whether `host` (an MX host name) matches one of the patterns.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// Parses a policy body: `key: value` lines (CRLF or LF), `version:
/// STSv1`, a `mode`, a `max_age`, and at least one `mx` unless the mode is
/// `none`. Unknown keys are ignored (RFC 8461 §3.2).
pub fn parse(body: &[u8]) -> Result<Policy, &'static str> {
    if body.len() > MAX_POLICY {
        return Err("policy too long");
    }
    let text = std::str::from_utf8(body).map_err(|_| "policy not UTF-8")?;
    let (mut version, mut mode, mut max_age) = (None, None, None);
    let mut mx = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.split_once(':').ok_or("a line without a colon")?;
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    _ => return Err("an unknown mode"),
                })
            }
            "max_age" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("max_age is not a number");
                }
                // Past a year (or past u64) is a year.
                max_age = Some(value.parse::<u64>().unwrap_or(MAX_AGE).min(MAX_AGE));
            }
            "mx" => {
                let pattern = value.trim_end_matches('.').to_ascii_lowercase();
                let host = pattern.strip_prefix("*.").unwrap_or(&pattern);
                if host.is_empty()
                    || host.len() > 253
                    || !host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err("an mx that is not a host name");
                }
                if mx.len() >= 100 {
                    return Err("too many mx lines");
                }
                mx.push(pattern);
            }
            _ => {}
        }
    }
    if version != Some("STSv1") {
        return Err("not an STSv1 policy");
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx");
    }
    Ok(Policy { mode, mx, max_age })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_strictly_and_match_mx_hosts() {
        let p = parse(
            b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.backup.example.com\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("mx1.backup.example.com"));
        assert!(!p.allows("a.b.backup.example.com"));
        assert!(!p.allows("backup.example.com"));
        assert!(!p.allows("evil.example.com"));
        let lf = parse(
            b"version: STSv1\nmode: testing\nmx: a.example\nmax_age: 99999999999\nextra: ok\n",
        )
        .unwrap();
        assert_eq!(lf.max_age, MAX_AGE);
        assert!(
            parse(b"mode: enforce\nmx: a\nmax_age: 1\n").is_err(),
            "no version"
        );
        assert!(
            parse(b"version: STSv1\nmode: enforce\nmax_age: 1\n").is_err(),
            "no mx"
        );
        assert!(parse(b"version: STSv1\nmode: none\nmax_age: 1\n").is_ok());
        assert!(parse(b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n").is_err());
        assert!(parse(b"version: STSv1\nmode: enforce\nmx: a b\nmax_age: 1\n").is_err());
        assert!(parse(&vec![b'a'; MAX_POLICY + 1]).is_err());
    }
}
