//! `granary invite`: links that bring friends in.

use clap::Subcommand;

use super::Output;

/// `granary invite`.
#[derive(Debug, Subcommand)]
pub(crate) enum InviteCommand {
    /// Make an invite link: a new account, with --for a friend of USER's (they become
    /// each other's contacts), or with --group a member of a group chat. Prints the link
    /// (shown once) and its QR code's xmpp: URI
    Create {
        /// The user who invites: the friend is added to their contacts, and they to the friend's
        #[arg(long = "for", value_name = "USER")]
        inviter: Option<String>,
        /// A group chat (a room's name, as in NAME@rooms.<domain>): the friend becomes a member,
        /// is invited to it, and becomes the contact of its owner and members
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// How long the link works: 90s, 30m, 12h, 7d or 2w
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        expires: u64,
        /// How many accounts it may make
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        uses: u32,
    },
    /// Every invite: who made it, its uses, whether it is still valid (never the links)
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Stop an invite link working at once
    Revoke { id: i64 },
}

/// `90s`, `30m`, `12h`, `7d`, `2w` (a bare number is seconds) to seconds;
/// at most a year.
pub(crate) fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number and a unit (90s, 30m, 12h, 7d, 2w)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{text:?}: the unit is one of s, m, h, d, w")),
    };
    let secs = n.saturating_mul(scale);
    if secs == 0 || secs > 366 * 86_400 {
        return Err(format!("{text:?}: between 1 second and a year"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("400d").is_err());
        assert!(parse_duration("d").is_err());
    }
}
