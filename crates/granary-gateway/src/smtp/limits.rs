//! What one sender may hold of the SMTP listeners: open connections at
//! once per client address, and messages per hour per client address (the
//! MX) or per user (submission). IPv6 clients count by their /64, which
//! is what one subscriber gets.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);
/// Keys remembered before those outside the window are swept.
const MAX_KEYS: usize = 100_000;

/// The address a client counts as: itself, or its /64 for IPv6.
pub(crate) fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Events per key in the current hour.
#[derive(Debug)]
pub(crate) struct Hourly<K> {
    counts: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K> Default for Hourly<K> {
    fn default() -> Self {
        Hourly {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq> Hourly<K> {
    /// Whether `key` is under `max` this hour.
    pub(crate) fn may(&self, key: &K, max: u32) -> bool {
        let m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key)
            .is_none_or(|(since, n)| since.elapsed() >= HOUR || *n < max)
    }

    /// Counts `n` events of `key`.
    pub(crate) fn count(&self, key: K, n: u32) {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > MAX_KEYS {
            m.retain(|_, (since, _)| since.elapsed() < HOUR);
        }
        let e = m.entry(key).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= HOUR {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(n);
    }
}

#[derive(Debug, Default)]
pub(crate) struct PerIp {
    connections: Mutex<HashMap<IpAddr, u32>>,
    messages: Hourly<IpAddr>,
}

/// One open connection of an address; counted until dropped.
pub(crate) struct ConnectionSlot {
    limits: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self
            .limits
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

impl PerIp {
    /// A slot for one more connection from `ip`, unless it has `max` open.
    pub(crate) fn connect(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<ConnectionSlot> {
        let ip = bucket(ip);
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let n = c.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Whether `ip` may send another message this hour.
    pub(crate) fn may_send(&self, ip: IpAddr, max: u32) -> bool {
        self.messages.may(&bucket(ip), max)
    }

    /// Counts an accepted message from `ip`.
    pub(crate) fn sent(&self, ip: IpAddr) {
        self.messages.count(bucket(ip), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_until_dropped_and_messages_per_hour() {
        let l = Arc::new(PerIp::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let a = l.connect(ip, 2).unwrap();
        let _b = l.connect(ip, 2).unwrap();
        assert!(l.connect(ip, 2).is_none());
        drop(a);
        assert!(l.connect(ip, 2).is_some());
        assert!(l.may_send(ip, 2));
        l.sent(ip);
        l.sent(ip);
        assert!(!l.may_send(ip, 2));
        assert!(l.may_send("192.0.2.8".parse().unwrap(), 2));
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let l = Arc::new(PerIp::default());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _a = l.connect(a, 1).unwrap();
        assert!(l.connect(b, 1).is_none(), "same /64");
        assert!(l.connect(other, 1).is_some());
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(bucket(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let users: Hourly<String> = Hourly::default();
        users.count("alice".into(), 3);
        assert!(!users.may(&"alice".into(), 3));
        assert!(users.may(&"bob".into(), 3));
    }
}
