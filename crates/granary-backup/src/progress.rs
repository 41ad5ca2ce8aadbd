//! Progress of long operations: bytes, rate and ETA, reported at most a
//! few times a second.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One progress report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub grain: String,
    /// `export`, `verify`, `restore`, `drill`.
    pub phase: String,
    pub bytes: u64,
    /// Expected bytes, when known (ETA needs it).
    pub total: Option<u64>,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub chunks: usize,
    pub resumed_chunks: usize,
    /// The last report of a step.
    pub done: bool,
}

impl Progress {
    /// `alice-hello export  12.0 MiB / 40.0 MiB  31.2 MiB/s  ETA 1s  (3 chunks, 2 resumed)`
    pub fn line(&self) -> String {
        let mut s = format!("{} {}  {}", self.grain, self.phase, mib(self.bytes));
        if let Some(t) = self.total {
            s.push_str(&format!(" / {}", mib(t.max(self.bytes))));
        }
        s.push_str(&format!("  {}/s", mib(self.bytes_per_second as u64)));
        if let Some(eta) = self.eta_seconds {
            s.push_str(&format!("  ETA {}s", eta.ceil() as u64));
        }
        if self.chunks > 0 {
            s.push_str(&format!("  ({} chunks", self.chunks));
            if self.resumed_chunks > 0 {
                s.push_str(&format!(", {} already there", self.resumed_chunks));
            }
            s.push(')');
        }
        s
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Counts bytes and decides when to report.
pub struct Meter {
    grain: String,
    phase: &'static str,
    total: Option<u64>,
    bytes: u64,
    chunks: usize,
    resumed: usize,
    started: Instant,
    last: Instant,
}

const EVERY: Duration = Duration::from_millis(250);

impl Meter {
    pub fn new(grain: &str, phase: &'static str, total: Option<u64>) -> Meter {
        let now = Instant::now();
        Meter {
            grain: grain.to_owned(),
            phase,
            total,
            bytes: 0,
            chunks: 0,
            resumed: 0,
            started: now,
            last: now,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.bytes += n;
    }

    pub fn chunks(&mut self, written: usize, resumed: usize) {
        self.chunks = written;
        self.resumed = resumed;
    }

    /// A report if the last one is old enough.
    pub fn tick(&mut self) -> Option<Progress> {
        (self.last.elapsed() >= EVERY).then(|| self.now(false))
    }

    pub fn now(&mut self, done: bool) -> Progress {
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let rate = self.bytes as f64 / secs;
        let eta = self
            .total
            .filter(|_| rate > 0.0)
            .map(|t| t.saturating_sub(self.bytes) as f64 / rate);
        Progress {
            grain: self.grain.clone(),
            phase: self.phase.to_owned(),
            bytes: self.bytes,
            total: self.total,
            bytes_per_second: rate,
            eta_seconds: eta,
            chunks: self.chunks,
            resumed_chunks: self.resumed,
            done,
        }
    }
}
