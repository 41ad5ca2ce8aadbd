//! The doctor's look at the service host names and the listeners from
//! outside: does each host clients use (`git.`, `dav.`, `tasks.`,
//! `rooms.`) resolve to where the domain does, and does each listener
//! answer at the domain's own address, as a client out there would try?

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use granary_gateway::smtp::checks::Checker;

use super::doctor::{Finding, Level, ok};
use crate::daemon::DaemonInfo;

/// Hosts under the domain clients are told to use, the app that serves
/// each, and what for.
const HOSTS: [(&str, &str, &str); 4] = [
    ("git", "git", "git over HTTPS"),
    ("dav", "dav", "calendars and contacts"),
    ("tasks", "tasks", "Taskwarrior sync"),
    ("rooms", "room", "group chats"),
];

/// `DOMAIN` and the host of each installed app: resolved, and to the
/// domain's addresses; then each listener tried there.
pub(super) async fn service_hosts(
    info: &DaemonInfo,
    checker: &Checker,
    installed: &[String],
) -> Vec<Finding> {
    let domain = &info.domain;
    let mut out = Vec::new();
    let home = match checker.host_addresses(domain).await {
        Ok(ips) => ips,
        Err(e) => {
            out.push(Finding {
                area: "dns",
                name: format!("{domain} A/AAAA"),
                level: Level::Fail,
                detail: format!(
                    "the domain does not resolve ({}): nobody reaches the web home or its services",
                    super::doctor::problem(&e)
                ),
                fix: format!(
                    "add A (and AAAA) records for {domain} with this host's public addresses"
                ),
            });
            return out;
        }
    };
    let mut sorted = home.clone();
    sorted.sort();
    out.push(ok("dns", format!("{domain} A/AAAA"), list(&sorted)));
    for (host, app, what) in HOSTS {
        if !installed.iter().any(|k| k == app) {
            continue;
        }
        let name = format!("{host}.{domain}");
        let found = checker.host_addresses(&name).await.map(|mut ips| {
            ips.sort();
            ips
        });
        out.push(match found {
            Ok(ips) if ips == sorted => ok("dns", format!("{name} A/AAAA"), list(&ips)),
            Ok(ips) => Finding {
                area: "dns",
                name: format!("{name} A/AAAA"),
                level: Level::Warn,
                detail: format!("{} here, {} for {domain}", list(&ips), list(&sorted)),
                fix: format!("point {name} where {domain} points (a CNAME to {domain} does it)"),
            },
            Err(e) => Finding {
                area: "dns",
                name: format!("{name} A/AAAA"),
                level: Level::Warn,
                detail: format!(
                    "does not resolve ({}): clients of {what} cannot find this host",
                    super::doctor::problem(&e)
                ),
                fix: format!("publish: {name}. CNAME {domain}."),
            },
        });
    }
    out.extend(reachable(info, &home).await);
    out
}

/// Each listener, tried at the domain's first address of each family on
/// its port, all at once (3 s each at most).
async fn reachable(info: &DaemonInfo, home: &[IpAddr]) -> Vec<Finding> {
    let firsts: Vec<IpAddr> = [
        home.iter().find(|i| i.is_ipv4()),
        home.iter().find(|i| i.is_ipv6()),
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect();
    let mut tries = Vec::new();
    for (name, bound) in &info.listeners {
        // Metrics are for this host or its private network only.
        if name == "metrics" {
            continue;
        }
        let Ok(bound) = bound.parse::<SocketAddr>() else {
            continue;
        };
        for ip in &firsts {
            let at = SocketAddr::new(*ip, bound.port());
            let name = name.clone();
            tries.push(async move {
                let tried =
                    tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(at))
                        .await;
                match tried {
                    Ok(Ok(_)) if own_address(at.ip()) => ok(
                        "listeners",
                        format!("listen.{name} at {at}"),
                        "answers at the domain's address, which is this host's own: from outside, a firewall may still stand between".to_owned(),
                    ),
                    Ok(Ok(_)) => ok(
                        "listeners",
                        format!("listen.{name} at {at}"),
                        "answers at the domain's address".to_owned(),
                    ),
                    Ok(Err(e)) => unreachable(&name, at, bound, &e.to_string()),
                    Err(_) => unreachable(&name, at, bound, "no answer within 3 s"),
                }
            });
        }
    }
    futures::future::join_all(tries).await
}

/// Whether `ip` is one of this host's own addresses (binding to it works).
fn own_address(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn unreachable(name: &str, at: SocketAddr, bound: SocketAddr, why: &str) -> Finding {
    // A bind that cannot take the address tried: an IPv4 wildcard and an
    // IPv6 address (or the other way), or another address of its own.
    let unspecified_other_family = bound.ip().is_unspecified() && bound.is_ipv4() != at.is_ipv4();
    let other_address = !bound.ip().is_unspecified() && bound.ip() != at.ip();
    let fix = if unspecified_other_family || (other_address && !bound.ip().is_loopback()) {
        format!(
            "listen.{name} is bound to {bound}, which does not take {}: bind it to {} (or remove the domain's {} record)",
            at.ip(),
            if at.is_ipv6() {
                format!("[::]:{}", bound.port())
            } else {
                format!("0.0.0.0:{}", bound.port())
            },
            if at.is_ipv6() { "AAAA" } else { "A" }
        )
    } else if bound.ip().is_loopback() && !at.ip().is_loopback() {
        format!(
            "listen.{name} is bound to {bound}: bind it to {} (or this host's address)",
            if at.is_ipv6() {
                format!("[::]:{}", bound.port())
            } else {
                format!("0.0.0.0:{}", bound.port())
            }
        )
    } else if !own_address(at.ip()) {
        format!(
            "behind NAT the router may not loop connections back: check from outside; otherwise open port {} in the firewall or forward it on the router",
            bound.port()
        )
    } else {
        format!("open port {} to this host in the firewall", bound.port())
    };
    Finding {
        area: "listeners",
        name: format!("listen.{name} at {at}"),
        level: Level::Warn,
        detail: format!("not reachable from this host at the domain's address ({why})"),
        fix,
    }
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How far another node's clock may be from ours before the doctor warns:
/// leases, the shared log's times, TOTP codes (30-s steps) and the
/// certificates' dates all assume the nodes agree on the time.
const CLOCK_SKEW_MS: u64 = 2_000;

/// Each live node's clock against this one's, over the node link.
pub(super) async fn peer_clocks(member: &crate::daemon::cluster::Member) -> Vec<Finding> {
    let listed = tokio::time::timeout(PEER_CLOCK_WAIT, member.coordinator.nodes()).await;
    let nodes = match listed {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(e)) => {
            return vec![Finding {
                area: "clock",
                name: "other nodes' clocks".to_owned(),
                level: Level::Warn,
                detail: format!("cannot list the nodes: {e}"),
                fix: "granary status shows whether etcd answers".to_owned(),
            }];
        }
        Err(_) => {
            return vec![Finding {
                area: "clock",
                name: "other nodes' clocks".to_owned(),
                level: Level::Warn,
                detail: format!("etcd did not list the nodes within {PEER_CLOCK_WAIT:?}"),
                fix: "granary status shows whether etcd answers".to_owned(),
            }];
        }
    };
    // All at once, each within a few seconds: a node that holds its lease
    // but does not answer costs the doctor no more than that.
    let asks = nodes
        .iter()
        .filter(|n| n.record.name != member.node)
        .filter_map(|n| {
            let alive = n.alive.as_ref()?;
            let link = match alive.link.is_empty() {
                true => n.record.address.clone(),
                false => alive.link.clone(),
            };
            Some(async move {
                let name = format!("clock of node {}", n.record.name);
                let asked = tokio::time::timeout(
                    PEER_CLOCK_WAIT,
                    granary_cluster::link::clock_offset(&link, &n.record.key, &member.key),
                )
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {PEER_CLOCK_WAIT:?}")));
                match asked {
                    Ok((offset, round_trip)) => clock_finding(name, offset, round_trip),
                    Err(e) => Finding {
                        area: "clock",
                        name,
                        level: Level::Warn,
                        detail: format!("cannot ask it: {e}"),
                        fix: "the nodes must reach each other's link address".to_owned(),
                    },
                }
            })
        });
    futures::future::join_all(asks).await
}

/// How long the doctor waits for another node's clock.
const PEER_CLOCK_WAIT: Duration = Duration::from_secs(3);

/// A node `offset` ms ahead of this one (behind when negative), measured
/// over a `round_trip` of that many ms.
fn clock_finding(name: String, offset: i64, round_trip: u64) -> Finding {
    let how = match offset {
        0 => "in step with this node".to_owned(),
        o if o > 0 => format!("{o} ms ahead of this node"),
        o => format!("{} ms behind this node", -o),
    };
    let detail = format!("{how} (± {} ms)", round_trip.div_ceil(2));
    // Only what is surely off counts: the error is half the round trip.
    if offset.unsigned_abs() > CLOCK_SKEW_MS + round_trip.div_ceil(2) {
        Finding {
            area: "clock",
            name,
            level: Level::Warn,
            detail,
            fix: "run an NTP client (apt install chrony) on every node: leases, sign-in codes and certificates need the nodes to agree on the time".to_owned(),
        }
    } else {
        ok("clock", name, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clock_surely_off_is_a_warning() {
        let f = clock_finding("n2".into(), 120, 4);
        assert_eq!(
            (f.level, f.detail.as_str()),
            (Level::Ok, "120 ms ahead of this node (± 2 ms)")
        );
        let f = clock_finding("n2".into(), -5_000, 10);
        assert_eq!(f.level, Level::Warn);
        assert_eq!(f.detail, "5000 ms behind this node (± 5 ms)");
        // 2.5 s off, but measured over 2 s: it could be 1.5 s.
        assert_eq!(clock_finding("n2".into(), 2_500, 2_000).level, Level::Ok);
    }
}
