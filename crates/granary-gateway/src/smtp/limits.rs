//! What one sending address may hold of the MX: open connections at once
//! and messages per hour.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);
/// Addresses remembered before those outside the window are swept.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct PerIp {
    connections: Mutex<HashMap<IpAddr, u32>>,
    messages: Mutex<HashMap<IpAddr, (Instant, u32)>>,
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
        let m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&ip)
            .is_none_or(|(since, n)| since.elapsed() >= HOUR || *n < max)
    }

    /// Counts an accepted message from `ip`.
    pub(crate) fn sent(&self, ip: IpAddr) {
        let mut m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > MAX_KEYS {
            m.retain(|_, (since, _)| since.elapsed() < HOUR);
        }
        let e = m.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= HOUR {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
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
}
