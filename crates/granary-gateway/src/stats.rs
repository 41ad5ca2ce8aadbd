//! What the gateway counts for `/metrics`: connections by protocol, HTTPS
//! answers by status class and the time to each answer's head (a
//! histogram). Lock-free on the request path (atomics); the connection
//! counts take a short lock once per connection.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Stats {
    connections: Mutex<BTreeMap<&'static str, u64>>,
    /// HTTPS answers by class: 1xx … 5xx.
    answers: [AtomicU64; 5],
    /// Answers per bucket (not cumulative; the last is above every bound).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the times, in microseconds.
    micros: AtomicU64,
}

impl Stats {
    /// One connection accepted on a listener of `protocol`.
    pub fn connection(&self, protocol: &'static str) {
        *self
            .connections
            .lock()
            .expect("not poisoned")
            .entry(protocol)
            .or_default() += 1;
    }

    /// One HTTPS answer with `status`, its head ready after `took`.
    pub fn answered(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.answers[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The counts in the Prometheus text format (0.0.4).
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP granary_connections_total Connections accepted, by listener protocol.\n\
             # TYPE granary_connections_total counter"
        );
        for (protocol, n) in self.connections.lock().expect("not poisoned").iter() {
            let _ = writeln!(
                out,
                "granary_connections_total{{protocol=\"{protocol}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP granary_https_requests_total HTTPS requests answered, by status class.\n\
             # TYPE granary_https_requests_total counter"
        );
        for (i, n) in self.answers.iter().enumerate() {
            let _ = writeln!(
                out,
                "granary_https_requests_total{{code=\"{}xx\"}} {}",
                i + 1,
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP granary_https_request_duration_seconds Time from a request to its answer's head.\n\
             # TYPE granary_https_request_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "granary_https_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "granary_https_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n\
             granary_https_request_duration_seconds_sum {}\n\
             granary_https_request_duration_seconds_count {cumulative}",
            self.micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fall_into_classes_and_cumulative_buckets() {
        let s = Stats::default();
        s.connection("imap");
        s.connection("imap");
        s.answered(200, Duration::from_micros(500));
        s.answered(404, Duration::from_millis(30));
        s.answered(503, Duration::from_secs(20));
        let mut out = String::new();
        s.render(&mut out);
        assert!(
            out.contains("granary_connections_total{protocol=\"imap\"} 2"),
            "{out}"
        );
        assert!(out.contains("granary_https_requests_total{code=\"4xx\"} 1"));
        assert!(out.contains("granary_https_request_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(out.contains("granary_https_request_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(out.contains("granary_https_request_duration_seconds_bucket{le=\"10\"} 2"));
        assert!(out.contains("granary_https_request_duration_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(out.contains("granary_https_request_duration_seconds_count 3"));
    }
}
