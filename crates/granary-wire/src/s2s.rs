//! What a server-to-server stream's stanzas must be before they go
//! anywhere (RFC 6120 §8.1.1.1, §8.1.2.1): both addresses present and
//! valid, `from` in a domain the stream has proven, `to` in ours; and the
//! move between `jabber:server` on the wire and `jabber:client` inside.

use crate::jid::Jid;
use crate::stanza::{Element, Node};
use crate::xmpp::{NS_CLIENT, NS_SERVER};

/// Why a stanza ends its stream: a stream error condition and a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub condition: &'static str,
    pub text: &'static str,
}

fn refused(condition: &'static str, text: &'static str) -> Refused {
    Refused { condition, text }
}

/// A stanza's checked addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressed {
    pub from: Jid,
    pub to: Jid,
}

/// The domain of an address, lowercased; `None` for what is no address.
pub fn domain_of(jid: &str) -> Option<String> {
    let bare = jid.split('/').next()?;
    let domain = bare.rsplit_once('@').map_or(bare, |(_, d)| d);
    (!domain.is_empty() && domain.len() <= 1023).then(|| domain.to_ascii_lowercase())
}

/// Checks a stanza that came in on a server stream which has proven the
/// domains `proven` says yes to, for the domains `ours` says yes to.
pub fn addressed(
    el: &Element,
    proven: impl Fn(&str) -> bool,
    ours: impl Fn(&str) -> bool,
) -> Result<Addressed, Refused> {
    if el.ns != NS_SERVER || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
        return Err(refused(
            "unsupported-stanza-type",
            "not a stanza this server takes",
        ));
    }
    let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) else {
        return Err(refused(
            "improper-addressing",
            "a stanza between servers names from and to",
        ));
    };
    let from = Jid::parse(from).map_err(|_| refused("jid-malformed", "an invalid from"))?;
    let to = Jid::parse(to).map_err(|_| refused("jid-malformed", "an invalid to"))?;
    if !proven(&from.domain) {
        return Err(refused(
            "invalid-from",
            "this stream has not proven that domain",
        ));
    }
    if !ours(&to.domain) {
        return Err(refused("host-unknown", "that domain is not served here"));
    }
    Ok(Addressed { from, to })
}

/// Moves a stanza, and the children that share its namespace (`<body>`,
/// `<error>`), from one namespace to another. What another namespace holds
/// is left as it is: a forwarded `<message xmlns='jabber:client'>` inside
/// `urn:xmpp:forward:0` stays a client message on the wire.
fn retarget(el: &mut Element, from_ns: &str, to_ns: &str) {
    if el.ns != from_ns {
        return;
    }
    el.ns = to_ns.to_owned();
    for child in el.children.iter_mut() {
        if let Node::Element(c) = child {
            retarget(c, from_ns, to_ns);
        }
    }
}

/// A stanza from a server stream as a client stream has it.
pub fn to_client(el: &mut Element) {
    retarget(el, NS_SERVER, NS_CLIENT)
}

/// A stanza from inside as it goes on a server stream.
pub fn to_server(el: &mut Element) {
    retarget(el, NS_CLIENT, NS_SERVER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::parse_element;

    fn el(xml: &str) -> Element {
        parse_element(xml.as_bytes(), NS_SERVER).unwrap()
    }

    #[test]
    fn only_proven_senders_to_our_users_pass() {
        let proven = |d: &str| d == "a.test";
        let ours = |d: &str| d == "b.test";
        let ok = addressed(
            &el("<message from='x@a.test/r' to='y@b.test'/>"),
            proven,
            ours,
        );
        assert_eq!(ok.unwrap().to.local.as_deref(), Some("y"));
        for (xml, condition) in [
            ("<message to='y@b.test'/>", "improper-addressing"),
            ("<message from='x@c.test' to='y@b.test'/>", "invalid-from"),
            ("<message from='x@b.test' to='y@b.test'/>", "invalid-from"),
            ("<message from='x@a.test' to='y@c.test'/>", "host-unknown"),
            (
                "<message from='x@a.test' to='y z@b.test'/>",
                "jid-malformed",
            ),
            ("<message from='@a.test' to='y@b.test'/>", "jid-malformed"),
            (
                "<foo from='x@a.test' to='y@b.test'/>",
                "unsupported-stanza-type",
            ),
        ] {
            assert_eq!(
                addressed(&el(xml), proven, ours).unwrap_err().condition,
                condition,
                "{xml}"
            );
        }
    }

    #[test]
    fn forwarded_stanzas_keep_their_own_namespace() {
        let xml = "<message><result xmlns='urn:xmpp:mam:2'><forwarded xmlns='urn:xmpp:forward:0'>\
                   <message xmlns='jabber:client'><body>x</body></message></forwarded></result></message>";
        let mut m = parse_element(xml.as_bytes(), NS_CLIENT).unwrap();
        to_server(&mut m);
        let out = m.to_xml(NS_SERVER);
        assert!(
            out.contains("<message xmlns='jabber:client'><body>x</body>"),
            "{out}"
        );
    }

    #[test]
    fn stanzas_move_between_namespaces_with_their_children() {
        let mut m = el("<message><body>hi</body><x xmlns='urn:other'><body/></x></message>");
        to_client(&mut m);
        assert_eq!(
            m.to_xml(NS_CLIENT),
            "<message><body>hi</body><x xmlns='urn:other'><body/></x></message>"
        );
        to_server(&mut m);
        assert_eq!(
            m,
            el("<message><body>hi</body><x xmlns='urn:other'><body/></x></message>")
        );
    }

    #[test]
    fn addresses_give_their_domain() {
        assert_eq!(
            domain_of("bob@Other.test/phone").as_deref(),
            Some("other.test")
        );
        assert_eq!(domain_of("other.test").as_deref(), Some("other.test"));
        assert_eq!(domain_of("@"), None);
    }
}
