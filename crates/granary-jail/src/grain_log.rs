//! A grain's stdout and stderr: pipes the host drains into a size-capped,
//! rotated log (`grain.log`, `grain.log.1`, ...), so a chatty or hostile
//! grain can neither fill the host's disk nor block on a full pipe.
//!
//! The log lives outside the grain's dataset, in a directory only the host
//! writes, so nothing the grain plants there can redirect the writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// Where and how much of one grain's output is kept.
#[derive(Debug, Clone)]
pub struct LogPolicy {
    pub dir: PathBuf,
    /// Largest size of one file before it rotates.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: u32,
}

impl LogPolicy {
    pub fn current(&self) -> PathBuf {
        self.dir.join("grain.log")
    }

    fn rotated(&self, n: u32) -> PathBuf {
        self.dir.join(format!("grain.log.{n}"))
    }

    /// grain.log -> grain.log.1 -> ... -> grain.log.KEEP (dropped).
    fn rotate(&self) -> io::Result<()> {
        let _ = fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            match fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.keep == 0 {
            return fs::remove_file(self.current());
        }
        fs::rename(self.current(), self.rotated(1))
    }

    fn open_current(&self) -> io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.current())?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    /// The newest `max_bytes` of the log, oldest first: what
    /// `granary grain logs` shows.
    pub fn tail(&self, max_bytes: u64) -> io::Result<Vec<u8>> {
        let mut parts = Vec::new();
        let mut total = 0u64;
        let files = std::iter::once(self.current()).chain((1..=self.keep).map(|n| self.rotated(n)));
        for path in files {
            if total >= max_bytes {
                break;
            }
            match fs::read(&path) {
                Ok(data) => {
                    let take = (max_bytes - total).min(data.len() as u64) as usize;
                    total += take as u64;
                    parts.push(data[data.len() - take..].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        parts.reverse();
        Ok(parts.concat())
    }
}

/// Drains `source` (the read end of the grain's stdout/stderr pipe) into
/// the log on its own thread until the grain closes it.
pub fn drain(source: File, policy: LogPolicy) -> io::Result<JoinHandle<io::Result<()>>> {
    drain_with_lines(source, None, policy)
}

/// [`drain`], and also the messages arriving on `lines` (a SOCK_SEQPACKET
/// socket whose other end the host keeps: each message one whole line, the
/// host's `Host.log` lines), on a thread of their own into the same log,
/// until the host closes its end.
pub fn drain_with_lines(
    source: File,
    lines: Option<std::os::fd::OwnedFd>,
    policy: LogPolicy,
) -> io::Result<JoinHandle<io::Result<()>>> {
    fs::create_dir_all(&policy.dir)?;
    let writer = std::sync::Arc::new(std::sync::Mutex::new(LogWriter::open(policy)?));
    if let Some(lines) = lines {
        let w = writer.clone();
        std::thread::Builder::new()
            .name("grain-log-lines".to_owned())
            .spawn(move || pump_lines(lines, &w))?;
    }
    std::thread::Builder::new()
        .name("grain-log".to_owned())
        .spawn(move || pump(source, &writer))
}

/// The current log file, rotated at its size cap.
struct LogWriter {
    policy: LogPolicy,
    file: File,
    len: u64,
}

impl LogWriter {
    fn open(policy: LogPolicy) -> io::Result<LogWriter> {
        let (file, len) = policy.open_current()?;
        Ok(LogWriter { policy, file, len })
    }

    fn write(&mut self, mut chunk: &[u8]) -> io::Result<()> {
        while !chunk.is_empty() {
            let room = self.policy.max_file_bytes.saturating_sub(self.len);
            if room == 0 {
                self.policy.rotate()?;
                (self.file, self.len) = self.policy.open_current()?;
                continue;
            }
            let take = chunk.len().min(room as usize);
            self.file.write_all(&chunk[..take])?;
            self.len += take as u64;
            chunk = &chunk[take..];
        }
        Ok(())
    }
}

type Shared = std::sync::Mutex<LogWriter>;

fn pump(mut source: impl Read, writer: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&buf[..n])?;
    }
}

fn pump_lines(lines: std::os::fd::OwnedFd, writer: &Shared) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 8192];
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which
        // outlives the call; the descriptor is owned and open.
        let n = unsafe { libc::recv(lines.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        match n {
            0 => return,
            n if n < 0 => {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            n => {
                let _ = writer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(&buf[..n as usize]);
            }
        }
    }
}

/// Reads the log of a grain that may be gone.
pub fn read_tail(dir: &Path, keep: u32, max_bytes: u64) -> io::Result<Vec<u8>> {
    LogPolicy {
        dir: dir.to_path_buf(),
        max_file_bytes: u64::MAX,
        keep,
    }
    .tail(max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(dir: &Path) -> LogPolicy {
        LogPolicy {
            dir: dir.join("logs/g1"),
            max_file_bytes: 1000,
            keep: 2,
        }
    }

    #[test]
    fn output_is_capped_and_rotated_keeping_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = policy(tmp.path());
        let (reader, mut writer) = std::io::pipe().unwrap();
        let pumping = drain(
            File::from(std::os::fd::OwnedFd::from(reader)),
            policy.clone(),
        )
        .unwrap();
        // 5500 bytes of numbered lines: more than the 3000 the policy keeps.
        // (The last rotation leaves 500 bytes in the current file.)
        let mut sent = Vec::new();
        for i in 0..550 {
            sent.extend_from_slice(format!("line {i:04}\n").as_bytes());
        }
        writer.write_all(&sent).unwrap();
        drop(writer);
        pumping.join().unwrap().unwrap();

        let mut names: Vec<String> = fs::read_dir(&policy.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["grain.log", "grain.log.1", "grain.log.2"]);
        for name in &names {
            assert!(fs::metadata(policy.dir.join(name)).unwrap().len() <= 1000);
        }
        // What is kept is exactly the newest bytes, in order.
        let kept = policy.tail(u64::MAX).unwrap();
        assert_eq!(kept.len(), 2500);
        assert_eq!(&kept[..], &sent[sent.len() - 2500..]);
        assert_eq!(
            read_tail(&policy.dir, 2, 100).unwrap(),
            &sent[sent.len() - 100..]
        );
    }

    #[test]
    fn tail_of_a_grain_that_never_logged_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(policy(tmp.path()).tail(100).unwrap().is_empty());
    }
}
