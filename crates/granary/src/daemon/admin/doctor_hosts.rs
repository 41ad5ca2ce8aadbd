//! The doctor's look at the service host names and the listeners from
//! outside: does each host clients use (`git.`, `dav.`, `tasks.`,
//! `rooms.`) resolve to where the domain does, and does each listener
//! answer at the domain's own address, as a client out there would try?

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use granary_gateway::smtp::checks::Checker;

use super::doctor::{Finding, Level, ok};
use crate::daemon::DaemonInfo;

/// Hosts under the domain clients are told to use, and what for.
const HOSTS: [(&str, &str); 4] = [
    ("git", "git over HTTPS"),
    ("dav", "calendars and contacts"),
    ("tasks", "Taskwarrior sync"),
    ("rooms", "group chats"),
];

/// `DOMAIN` and each service host: resolved, and to the domain's addresses.
pub(super) async fn service_hosts(info: &DaemonInfo, checker: &Checker) -> Vec<Finding> {
    let domain = &info.domain;
    let mut out = Vec::new();
    let mut home = match checker.host_addresses(domain).await {
        Ok(ips) => ips,
        Err(_) => {
            out.push(Finding {
                area: "dns",
                name: format!("{domain} A/AAAA"),
                level: Level::Fail,
                detail: "the domain does not resolve: nobody reaches the web home or its services"
                    .to_owned(),
                fix: format!(
                    "add A (and AAAA) records for {domain} with this host's public addresses"
                ),
            });
            return out;
        }
    };
    home.sort();
    out.push(ok("dns", format!("{domain} A/AAAA"), list(&home)));
    for (host, what) in HOSTS {
        let name = format!("{host}.{domain}");
        let found = checker.host_addresses(&name).await.map(|mut ips| {
            ips.sort();
            ips
        });
        out.push(match found {
            Ok(ips) if ips == home => ok("dns", format!("{name} A/AAAA"), list(&ips)),
            Ok(ips) => Finding {
                area: "dns",
                name: format!("{name} A/AAAA"),
                level: Level::Warn,
                detail: format!("{} here, {} for {domain}", list(&ips), list(&home)),
                fix: format!("point {name} where {domain} points (a CNAME to {domain} does it)"),
            },
            Err(_) => Finding {
                area: "dns",
                name: format!("{name} A/AAAA"),
                level: Level::Warn,
                detail: format!("does not resolve: clients of {what} cannot find this host"),
                fix: format!("publish: {name}. CNAME {domain}."),
            },
        });
    }
    out.extend(reachable(info, &home).await);
    out
}

/// Each listener, tried at the domain's first address on its port.
async fn reachable(info: &DaemonInfo, home: &[IpAddr]) -> Vec<Finding> {
    let Some(ip) = home.first().copied() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, bound) in &info.listeners {
        // The metrics and plain HTTP listeners are not for clients out there.
        if name == "metrics" {
            continue;
        }
        let Ok(bound) = bound.parse::<SocketAddr>() else {
            continue;
        };
        let at = SocketAddr::new(ip, bound.port());
        let tried =
            tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(at)).await;
        out.push(match tried {
            Ok(Ok(_)) => ok(
                "listeners",
                format!("listen.{name} at {at}"),
                "answers at the domain's address".to_owned(),
            ),
            Ok(Err(e)) => unreachable(name, at, bound, &e.to_string()),
            Err(_) => unreachable(name, at, bound, "no answer within 3 s"),
        });
    }
    out
}

fn unreachable(name: &str, at: SocketAddr, bound: SocketAddr, why: &str) -> Finding {
    let fix = if bound.ip().is_loopback() && !at.ip().is_loopback() {
        format!(
            "listen.{name} is bound to {bound}: bind it to 0.0.0.0:{} (or this host's address)",
            bound.port()
        )
    } else {
        format!(
            "open port {} to this host in the firewall, or forward it on the router",
            bound.port()
        )
    };
    Finding {
        area: "listeners",
        name: format!("listen.{name} at {at}"),
        level: Level::Warn,
        detail: format!("not reachable from here at the domain's address ({why})"),
        fix,
    }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
