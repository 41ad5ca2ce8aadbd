//! Addresses (RFC 7622): `local@domain/resource`, checked for what a
//! server must refuse: empty or overlong parts, characters a localpart
//! may not hold, control characters anywhere.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Jid {
    /// Lowercased (the usernames Granary makes are ASCII).
    pub local: Option<String>,
    /// Lowercased.
    pub domain: String,
    pub resource: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid address: {0}")]
pub struct JidError(pub &'static str);

const LOCAL_FORBIDDEN: &[char] = &['"', '&', '\'', '/', ':', '<', '>', '@'];

impl Jid {
    pub fn parse(text: &str) -> Result<Jid, JidError> {
        if text.len() > 3071 {
            return Err(JidError("too long"));
        }
        // Characters XML cannot carry at all: an address holding one
        // could not be written into a stanza.
        if text.chars().any(|c| c == '\u{FFFE}' || c == '\u{FFFF}') {
            return Err(JidError("a character XML does not allow"));
        }
        let (rest, resource) = match text.split_once('/') {
            Some((r, res)) => (r, Some(res)),
            None => (text, None),
        };
        let (local, domain) = match rest.split_once('@') {
            Some((l, d)) => (Some(l), d),
            None => (None, rest),
        };
        if let Some(l) = local {
            if l.is_empty() || l.len() > 1023 {
                return Err(JidError("the localpart is empty or too long"));
            }
            if l.chars()
                .any(|c| c.is_control() || c.is_whitespace() || LOCAL_FORBIDDEN.contains(&c))
            {
                return Err(JidError("the localpart holds a character it may not"));
            }
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty()
            || domain.len() > 1023
            || domain
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || "@/\"&'<>".contains(c))
        {
            return Err(JidError("the domain is empty or malformed"));
        }
        if let Some(r) = resource
            && (r.is_empty() || r.len() > 1023 || r.chars().any(char::is_control))
        {
            return Err(JidError("the resource is empty or malformed"));
        }
        Ok(Jid {
            local: local.map(str::to_lowercase),
            domain: domain.to_lowercase(),
            resource: resource.map(str::to_owned),
        })
    }

    pub fn bare(&self) -> Jid {
        Jid {
            resource: None,
            ..self.clone()
        }
    }

    pub fn with_resource(&self, resource: &str) -> Jid {
        Jid {
            resource: Some(resource.to_owned()),
            ..self.clone()
        }
    }

    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }

    /// The bare address as text.
    pub fn bare_text(&self) -> String {
        self.bare().to_string()
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = &self.local {
            write!(f, "{l}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let j = Jid::parse("Alice@Example.org/phone/2").unwrap();
        assert_eq!(j.local.as_deref(), Some("alice"));
        assert_eq!(j.domain, "example.org");
        assert_eq!(j.resource.as_deref(), Some("phone/2"));
        assert_eq!(j.to_string(), "alice@example.org/phone/2");
        assert_eq!(j.bare_text(), "alice@example.org");
        assert_eq!(Jid::parse("example.org").unwrap().local, None);
        for bad in [
            "",
            "@x",
            "a@",
            "a b@x",
            "a@x/",
            "a<b@x",
            "a@x/\u{1}",
            "a@b c",
        ] {
            assert!(Jid::parse(bad).is_err(), "{bad:?}");
        }
    }
}
