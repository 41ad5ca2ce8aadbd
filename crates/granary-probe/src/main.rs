//! `granary-probe`: run inside a grain, it tries to get out.
//!
//! Each check attempts one thing a compromised grain might do and compares
//! the outcome with what the sandbox promises: most must be blocked, a few
//! (writing its own dataset, logging, its host channel) must work. It prints
//! one JSON line per check and exits 0 only if every check met its
//! expectation. Linked statically (`+crt-static`) so an image holding nothing
//! but this binary can run it.
//!
//! `--hog N` spins N threads forever; `--cpu-share MS` spins for MS
//! milliseconds and prints the share of a CPU it got (the fairness test).
//! `--spew N` writes N bytes to stdout (the log-cap test).
//! `--stamp` prints the CLOCK_MONOTONIC time it started at (the spawn
//! benchmark). `granary-probe --true` exits at once (the spawn benchmark's payload);
//! `granary-probe --wait` instead prints `ready PID` and waits for a signal,
//! standing in for a long-running app.
//!
//! ```text
//! granary-probe [--other-dataset PATH] [--host-socket PATH] [--abstract NAME]
//!               [--host-pid PID] [--tmp-bytes N] [--pids N] [--memory-bytes N]
//! ```

#![allow(unsafe_code)] // every attack is a raw system call; each block says why it is sound here

use std::ffi::CString;
use std::io::{Read, Write};

struct Args {
    other_dataset: String,
    host_socket: String,
    abstract_name: String,
    host_pid: i32,
    tmp_bytes: u64,
    pids: u64,
    memory_bytes: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        other_dataset: "/nonexistent-other-dataset".into(),
        host_socket: "/nonexistent.sock".into(),
        abstract_name: "granary-probe-none".into(),
        host_pid: i32::MAX,
        tmp_bytes: 64 << 20,
        pids: 256,
        memory_bytes: 256 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--other-dataset" => args.other_dataset = value,
            "--host-socket" => args.host_socket = value,
            "--abstract" => args.abstract_name = value,
            "--host-pid" => args.host_pid = value.parse().unwrap_or(1),
            "--tmp-bytes" => args.tmp_bytes = value.parse().unwrap_or(args.tmp_bytes),
            "--pids" => args.pids = value.parse().unwrap_or(args.pids),
            "--memory-bytes" => args.memory_bytes = value.parse().unwrap_or(args.memory_bytes),
            other => eprintln!("granary-probe: ignoring unknown argument {other}"),
        }
    }
    args
}

/// What happened when a check ran.
enum Outcome {
    Blocked(String),
    Allowed(String),
}
use Outcome::{Allowed, Blocked};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn err_text() -> String {
    std::io::Error::last_os_error().to_string()
}

/// A syscall result: negative means blocked (with errno text).
fn sys(rc: i64) -> Outcome {
    if rc < 0 {
        Blocked(err_text())
    } else {
        Allowed(format!("returned {rc}"))
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|ch| match ch {
            '"' => "\\\"".chars().collect::<Vec<_>>(),
            '\\' => "\\\\".chars().collect(),
            '\n' => "\\n".chars().collect(),
            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

/// Runs `f` in a forked child and returns how the child ended: Ok(exit
/// code) or Err(signal).
fn in_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the probe is single-threaded; the child runs `f` and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = f();
        // SAFETY: leave the child without running the parent's cleanup.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}

fn open_read(path: &str) -> Outcome {
    match std::fs::read(path) {
        Ok(data) => Allowed(format!("read {} bytes", data.len())),
        Err(e) => Blocked(e.to_string()),
    }
}

fn create_file(path: &str) -> Outcome {
    match std::fs::write(path, b"x") {
        Ok(()) => Allowed("created".into()),
        Err(e) => Blocked(e.to_string()),
    }
}

fn connect_inet(addr: [u8; 4], port: u16, kind: libc::c_int) -> Outcome {
    // SAFETY: socket/connect with a properly initialised sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, kind, 0);
        if fd < 0 {
            return Blocked(format!("socket: {}", err_text()));
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = port.to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(addr);
        let rc = libc::connect(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let out = if rc == 0 && kind == libc::SOCK_DGRAM {
            // UDP connect succeeds without a route check on some kernels; sending decides.
            let r = libc::send(fd, b"q".as_ptr().cast(), 1, 0);
            if r < 0 {
                Blocked(format!("send: {}", err_text()))
            } else {
                Allowed("sent".into())
            }
        } else {
            sys(rc as i64)
        };
        libc::close(fd);
        out
    }
}

fn connect_unix(path: &[u8]) -> Outcome {
    // SAFETY: sockaddr_un filled within its bounds.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Blocked(format!("socket: {}", err_text()));
        }
        let mut sa: libc::sockaddr_un = std::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as u16;
        let n = path.len().min(sa.sun_path.len() - 1);
        for (i, b) in path[..n].iter().enumerate() {
            sa.sun_path[i] = *b as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>()
            + n
            + usize::from(path.first() != Some(&0))) as u32;
        let rc = libc::connect(fd, (&raw const sa).cast(), len);
        let out = sys(rc as i64);
        libc::close(fd);
        out
    }
}

/// statfs of a path: (filesystem type, total bytes).
fn statfs(path: &str) -> Result<(i64, u64), String> {
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c(path).as_ptr(), &mut st) != 0 {
            return Err(err_text());
        }
        Ok((st.f_type as i64, st.f_blocks as u64 * st.f_bsize as u64))
    }
}

/// A system call the seccomp filter must refuse (EPERM) or the kernel
/// must lack (ENOSYS): any other error means it reached the kernel.
fn refused_call(rc: i64) -> Outcome {
    match (rc, errno()) {
        (0.., _) => Allowed(format!("returned {rc}")),
        (_, libc::EPERM | libc::ENOSYS) => Blocked(err_text()),
        _ => Allowed(format!("reached the kernel: {}", err_text())),
    }
}

const PROC_SUPER_MAGIC: i64 = 0x9fa0;
const SYSFS_MAGIC: i64 = 0x6265_6572;
const TMPFS_MAGIC: i64 = 0x0102_1994;

type Check<'a> = (&'static str, bool, Box<dyn FnOnce() -> Outcome + 'a>);

fn checks<'a>(a: &'a Args) -> Vec<Check<'a>> {
    let mut list: Vec<Check<'a>> = Vec::new();
    let mut blocked =
        |name: &'static str, f: Box<dyn FnOnce() -> Outcome + 'a>| list.push((name, false, f));
    // ---- files of others and of the host
    blocked(
        "read another grain's dataset by host path",
        Box::new(move || open_read(&format!("{}/secret", a.other_dataset))),
    );
    blocked(
        "read another grain's dataset through /proc/1/root",
        Box::new(move || open_read(&format!("/proc/1/root{}/secret", a.other_dataset))),
    );
    blocked(
        "read the host's /etc/shadow",
        Box::new(|| open_read("/etc/shadow")),
    );
    blocked(
        "see the host's /sys",
        Box::new(|| open_read("/sys/kernel/notes")),
    );
    blocked(
        "read /proc/kcore (masked)",
        Box::new(|| match std::fs::read("/proc/kcore") {
            Ok(d) if d.is_empty() => Blocked("masked: empty".into()),
            Ok(d) => Allowed(format!("{} bytes", d.len())),
            Err(e) => Blocked(e.to_string()),
        }),
    );
    blocked(
        "write /proc/sysrq-trigger",
        Box::new(|| create_file("/proc/sysrq-trigger")),
    );
    blocked(
        "read host memory details in /proc",
        Box::new(|| open_read("/proc/meminfo")),
    );
    blocked(
        "read the kernel command line",
        Box::new(|| open_read("/proc/cmdline")),
    );
    blocked(
        "write a sysctl",
        Box::new(|| create_file("/proc/sys/kernel/hostname")),
    );
    blocked(
        "write the app image",
        Box::new(|| create_file("/bin/planted")),
    );
    blocked(
        "write the root directory",
        Box::new(|| create_file("/planted")),
    );
    blocked("write /dev", Box::new(|| create_file("/dev/planted")));
    blocked(
        "fill /tmp past its limit",
        Box::new(move || {
            let mut f = match std::fs::File::create("/tmp/fill") {
                Ok(f) => f,
                Err(e) => return Blocked(e.to_string()),
            };
            let chunk = vec![7u8; 1 << 20];
            let mut written = 0u64;
            let limit = a.tmp_bytes + (8 << 20);
            while written < limit {
                if let Err(e) = f.write_all(&chunk) {
                    let _ = std::fs::remove_file("/tmp/fill");
                    return Blocked(format!("{e} after {} MiB", written >> 20));
                }
                written += chunk.len() as u64;
            }
            let _ = std::fs::remove_file("/tmp/fill");
            Allowed(format!("wrote {} MiB", written >> 20))
        }),
    );
    blocked(
        "setuid bit honoured on /var",
        Box::new(|| {
            // SAFETY: statvfs fills the zeroed struct.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: a valid path and a zeroed statvfs for the kernel to fill.
            let rc = unsafe { libc::statvfs(c("/var").as_ptr(), &mut st) };
            if rc != 0 {
                return Blocked(err_text());
            }
            if st.f_flag & libc::ST_NOSUID != 0 {
                Blocked("/var is mounted nosuid".into())
            } else {
                Allowed("/var honours setuid".into())
            }
        }),
    );
    blocked(
        "mknod a device",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: mknod with a valid path; expected to fail.
                libc::mknod(
                    c("/tmp/sda").as_ptr(),
                    libc::S_IFBLK | 0o600,
                    libc::makedev(8, 0),
                )
            } as i64)
        }),
    );
    // ---- network
    blocked(
        "TCP to 127.0.0.1",
        Box::new(|| connect_inet([127, 0, 0, 1], 8443, libc::SOCK_STREAM)),
    );
    blocked(
        "TCP to a LAN address",
        Box::new(|| connect_inet([192, 0, 2, 1], 80, libc::SOCK_STREAM)),
    );
    blocked(
        "DNS over UDP",
        Box::new(|| connect_inet([192, 0, 2, 53], 53, libc::SOCK_DGRAM)),
    );
    blocked(
        "connect to a host abstract unix socket",
        Box::new(move || {
            let mut name = vec![0u8];
            name.extend_from_slice(a.abstract_name.as_bytes());
            connect_unix(&name)
        }),
    );
    blocked(
        "connect to a host path unix socket",
        Box::new(move || connect_unix(a.host_socket.as_bytes())),
    );
    blocked(
        "raw socket",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: plain socket call.
                libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)
            } as i64)
        }),
    );
    blocked(
        "packet socket",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: plain socket call.
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
            } as i64)
        }),
    );
    blocked(
        "netlink socket",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: plain socket call.
                libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0)
            } as i64)
        }),
    );
    blocked(
        "network interfaces besides lo",
        Box::new(|| {
            // By index (SIOCGIFNAME), which needs no /proc or netlink.
            let names: Vec<String> = (1..=64)
                .filter_map(|i| {
                    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                    // SAFETY: the buffer holds IF_NAMESIZE bytes.
                    let name = unsafe { libc::if_indextoname(i, buf.as_mut_ptr()) };
                    (!name.is_null()).then(|| {
                        buf.iter()
                            .take_while(|c| **c != 0)
                            .map(|c| *c as u8 as char)
                            .collect()
                    })
                })
                .collect();
            if names.iter().all(|n| n == "lo") {
                Blocked(format!("only {names:?}"))
            } else {
                Allowed(format!("{names:?}"))
            }
        }),
    );
    // ---- other processes
    blocked(
        "ptrace pid 1",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: ptrace attach attempt; expected to fail.
                libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0)
            })
        }),
    );
    blocked(
        "ptrace a sibling",
        Box::new(|| {
            // SAFETY: fork a child that sleeps, try to trace it, then kill it.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::pause();
                    libc::_exit(0);
                }
                let out = sys(libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0));
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
                out
            }
        }),
    );
    blocked(
        "process_vm_readv of pid 1",
        Box::new(|| {
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: 8,
            };
            let remote = libc::iovec {
                iov_base: 0x400000 as *mut libc::c_void,
                iov_len: 8,
            };
            // SAFETY: iovecs describe our own buffer and a remote address.
            sys(unsafe { libc::process_vm_readv(1, &local, 1, &remote, 1, 0) } as i64)
        }),
    );
    blocked(
        "process_vm_readv of a sibling",
        Box::new(|| {
            // SAFETY: fork a child that waits, read from it, then kill it.
            unsafe {
                let pid = libc::fork();
                if pid == 0 {
                    libc::pause();
                    libc::_exit(0);
                }
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let remote = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let out = sys(libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) as i64);
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
                out
            }
        }),
    );
    blocked(
        "fsconfig",
        Box::new(|| {
            // SAFETY: raw syscall on an invalid descriptor; the filter answers first.
            sys(unsafe { libc::syscall(libc::SYS_fsconfig, -1, 0, 0, 0, 0) })
        }),
    );
    blocked(
        "kill(-1) reaches another process",
        Box::new(|| {
            // SIGCONT is harmless to anything it might reach. kill(-1) skips
            // init and ourselves; in the grain's pid namespace nothing is left.
            // SAFETY: plain kill.
            sys(unsafe { libc::kill(-1, libc::SIGCONT) } as i64)
        }),
    );
    blocked(
        "signal a host process",
        Box::new(move || {
            sys(unsafe {
                // SAFETY: signal 0 only checks reachability.
                libc::kill(a.host_pid, 0)
            } as i64)
        }),
    );
    blocked(
        "see host processes in /proc",
        Box::new(|| {
            let pids: Vec<u32> = std::fs::read_dir("/proc")
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            if pids.iter().all(|p| *p < 64) {
                Blocked(format!("only {pids:?}"))
            } else {
                Allowed(format!("{pids:?}"))
            }
        }),
    );
    // ---- what the mounts say about the host
    blocked(
        "read a mount table (mountinfo, mounts, mountstats)",
        Box::new(|| {
            let tables = [
                "/proc/self/mountinfo",
                "/proc/self/mounts",
                "/proc/self/mountstats",
                "/proc/mounts",
                "/proc/1/mountinfo",
                "/etc/mtab",
            ];
            match tables.iter().find(|t| std::fs::read(t).is_ok()) {
                Some(t) => Allowed(format!("read {t}")),
                None => Blocked(format!("none of {tables:?} is readable")),
            }
        }),
    );
    blocked(
        "find a procfs or sysfs mounted",
        Box::new(|| {
            let mut places: Vec<String> = std::fs::read_dir("/")
                .map(|d| {
                    d.filter_map(|e| Some(format!("/{}", e.ok()?.file_name().to_str()?)))
                        .collect()
                })
                .unwrap_or_default();
            places.extend(["/proc".to_owned(), "/sys".to_owned()]);
            for place in &places {
                if let Ok((kind, _)) = statfs(place)
                    && (kind == PROC_SUPER_MAGIC || kind == SYSFS_MAGIC)
                {
                    return Allowed(format!("{place} is type {kind:#x}"));
                }
            }
            Blocked(format!("none among {places:?}"))
        }),
    );
    blocked(
        "ask statmount or listmount",
        Box::new(|| {
            // 457 and 458 on every architecture (the unified numbers).
            // SAFETY: null arguments; the call must not get that far.
            let a = unsafe { libc::syscall(457, 0usize, 0usize, 0usize, 0usize) };
            if let Allowed(d) = refused_call(a as i64) {
                return Allowed(format!("statmount {d}"));
            }
            // SAFETY: as above.
            let b = unsafe { libc::syscall(458, 0usize, 0usize, 0usize, 0usize) };
            refused_call(b as i64)
        }),
    );
    blocked(
        "learn the filesystem's device or UUID by ioctl",
        Box::new(|| {
            // _IOR(0x15, 0, struct fsuuid2) and _IOR(0x15, 1, struct fs_sysfs_path).
            const GETFSUUID: libc::c_ulong = 0x8011_1500;
            const GETFSSYSFSPATH: libc::c_ulong = 0x8081_1501;
            for path in ["/var", "/", "/tmp", "/dev"] {
                let Ok(f) = std::fs::File::open(path) else {
                    continue;
                };
                for (name, request) in [("uuid", GETFSUUID), ("sysfs path", GETFSSYSFSPATH)] {
                    let mut buf = [0u8; 256];
                    // SAFETY: the buffer is larger than either reply.
                    let rc = unsafe {
                        libc::ioctl(
                            std::os::fd::AsRawFd::as_raw_fd(&f),
                            request,
                            buf.as_mut_ptr(),
                        )
                    };
                    if rc == 0 {
                        let len = usize::from(buf[0]).min(buf.len() - 1);
                        let hex: String =
                            buf[1..1 + len].iter().map(|b| format!("{b:02x}")).collect();
                        return Allowed(format!("{name} of {path}: {hex}"));
                    }
                }
            }
            Blocked(err_text())
        }),
    );
    let tmp_bytes = a.tmp_bytes;
    blocked(
        "a tmpfs sized by the host's memory (/, /dev, /tmp)",
        Box::new(move || {
            for (path, cap) in [("/", 1u64 << 20), ("/dev", 64 << 10), ("/tmp", tmp_bytes)] {
                match statfs(path) {
                    Ok((TMPFS_MAGIC, size)) if size <= cap => {}
                    Ok((kind, size)) => {
                        return Allowed(format!("{path}: type {kind:#x}, {size} bytes"));
                    }
                    Err(e) => return Allowed(format!("{path}: {e}")),
                }
            }
            Blocked("each is a tmpfs of its own fixed size".into())
        }),
    );
    // ---- namespaces and mounts
    blocked(
        "mount a tmpfs",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: mount attempt with valid strings.
                libc::mount(
                    c("none").as_ptr(),
                    c("/tmp").as_ptr(),
                    c("tmpfs").as_ptr(),
                    0,
                    std::ptr::null(),
                )
            } as i64)
        }),
    );
    blocked(
        "umount /proc",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: umount attempt.
                libc::umount2(c("/proc").as_ptr(), libc::MNT_DETACH)
            } as i64)
        }),
    );
    blocked(
        "pivot_root",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: raw syscall with valid strings.
                libc::syscall(libc::SYS_pivot_root, c("/tmp").as_ptr(), c("/tmp").as_ptr())
            })
        }),
    );
    blocked(
        "chroot",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: chroot attempt.
                libc::chroot(c("/tmp").as_ptr())
            } as i64)
        }),
    );
    blocked(
        "fsopen",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: raw syscall with a valid string.
                libc::syscall(libc::SYS_fsopen, c("tmpfs").as_ptr(), 0)
            })
        }),
    );
    blocked(
        "open_tree",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: raw syscall with a valid string.
                libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c("/var").as_ptr(), 1)
            })
        }),
    );
    blocked(
        "unshare a user namespace",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: unshare attempt.
                libc::unshare(libc::CLONE_NEWUSER)
            } as i64)
        }),
    );
    blocked(
        "unshare a mount namespace",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: unshare attempt.
                libc::unshare(libc::CLONE_NEWNS)
            } as i64)
        }),
    );
    blocked(
        "setns into pid 1's net namespace",
        Box::new(|| {
            let Ok(f) = std::fs::File::open("/proc/1/ns/net") else {
                return Blocked(err_text());
            };
            // SAFETY: setns with a descriptor we hold.
            sys(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), 0) } as i64)
        }),
    );
    blocked(
        "clone with CLONE_NEWNET",
        Box::new(|| {
            // SAFETY: fork-like raw clone; a child (if any) exits at once.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong,
                    0,
                    0,
                    0,
                    0,
                )
            };
            if rc == 0 {
                // SAFETY: the clone child leaves at once without unwinding.
                unsafe { libc::_exit(0) }
            }
            if rc > 0 {
                // SAFETY: reaping the child created just above.
                unsafe { libc::waitpid(rc as i32, std::ptr::null_mut(), 0) };
            }
            sys(rc)
        }),
    );
    blocked(
        "clone3 (answers ENOSYS)",
        Box::new(|| {
            // SAFETY: clone3 with a null argument; the filter answers first.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
            if rc < 0 && errno() == libc::ENOSYS {
                Blocked("ENOSYS".into())
            } else {
                Allowed(format!("rc {rc}, {}", err_text()))
            }
        }),
    );
    // ---- kernel interfaces
    blocked(
        "keyctl",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: KEYCTL_GET_KEYRING_ID of the session keyring.
                libc::syscall(libc::SYS_keyctl, 0, -3, 0)
            })
        }),
    );
    blocked(
        "bpf",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: bpf with a null attribute; expected to fail.
                libc::syscall(libc::SYS_bpf, 0, 0, 0)
            })
        }),
    );
    blocked(
        "perf_event_open",
        Box::new(|| {
            let mut attr = [0u8; 128];
            attr[4..8].copy_from_slice(&128u32.to_ne_bytes());
            // SAFETY: a zeroed attribute of the declared size.
            sys(unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) })
        }),
    );
    blocked(
        "userfaultfd",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: plain syscall.
                libc::syscall(libc::SYS_userfaultfd, 0)
            })
        }),
    );
    blocked(
        "io_uring_setup",
        Box::new(|| {
            let mut params = [0u8; 120];
            // SAFETY: a zeroed params struct.
            sys(unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) })
        }),
    );
    blocked(
        "open_by_handle_at",
        Box::new(|| {
            let mut handle = [0u8; 16];
            handle[0] = 8;
            // SAFETY: a small handle buffer; expected to fail.
            sys(unsafe {
                libc::syscall(
                    libc::SYS_open_by_handle_at,
                    libc::AT_FDCWD,
                    handle.as_mut_ptr(),
                    0,
                )
            })
        }),
    );
    #[cfg(target_arch = "x86_64")]
    blocked(
        "modify_ldt",
        Box::new(|| {
            let mut buf = [0u8; 16];
            // SAFETY: read the LDT into a small buffer.
            sys(unsafe { libc::syscall(libc::SYS_modify_ldt, 0, buf.as_mut_ptr(), 16) })
        }),
    );
    blocked(
        "personality change",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: ask for a non-Linux persona; expected to fail.
                libc::personality(0x0006)
            } as i64)
        }),
    );
    #[cfg(target_arch = "x86_64")]
    blocked(
        "32-bit syscall ABI (int 0x80)",
        Box::new(|| {
            match in_child(|| {
                let mut ret: i64 = 20; // getpid on i386
                // SAFETY: a legacy-ABI system call; the seccomp filter kills us.
                unsafe { std::arch::asm!("int 0x80", inout("rax") ret) };
                if ret > 0 { 0 } else { 1 }
            }) {
                Err(sig) if sig == libc::SIGSYS => Blocked("killed by SIGSYS".into()),
                Err(sig) => Blocked(format!("killed by signal {sig}")),
                Ok(code) => Allowed(format!("child exited {code}")),
            }
        }),
    );
    blocked(
        "TIOCSTI",
        Box::new(|| {
            let ch = b'x';
            // SAFETY: ioctl on stdin with a pointer to one byte.
            sys(unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) } as i64)
        }),
    );
    blocked(
        "settimeofday",
        Box::new(|| {
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            // SAFETY: valid timeval; expected to fail.
            sys(unsafe { libc::settimeofday(&tv, std::ptr::null()) } as i64)
        }),
    );
    blocked(
        "clock_settime",
        Box::new(|| {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid timespec; expected to fail.
            sys(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } as i64)
        }),
    );
    blocked(
        "reboot",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: asks to disable Ctrl-Alt-Del, harmless even if it worked.
                libc::reboot(libc::RB_DISABLE_CAD)
            } as i64)
        }),
    );
    blocked(
        "sethostname",
        Box::new(|| {
            sys(unsafe {
                // SAFETY: valid buffer and length.
                libc::sethostname(b"pwned".as_ptr().cast(), 5)
            } as i64)
        }),
    );
    blocked(
        "hold any capability",
        Box::new(|| {
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Default, Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let mut header = Header {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let mut data = [Data::default(); 2];
            // SAFETY: capget fills two Data structs for version 3.
            if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
                return Allowed(format!("capget failed: {}", err_text()));
            }
            let held = data
                .iter()
                .any(|d| d.effective | d.permitted | d.inheritable != 0);
            // The bounding set, one capability at a time until the kernel
            // says the number is past its last.
            let mut bounding = Vec::new();
            for cap in 0..64 {
                // SAFETY: PR_CAPBSET_READ takes a capability number.
                match unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } {
                    1 => bounding.push(cap),
                    0 => {}
                    _ => break,
                }
            }
            if !held && bounding.is_empty() {
                Blocked("effective, permitted, inheritable and bounding sets are empty".into())
            } else {
                Allowed(format!(
                    "sets {:?}, bounding {bounding:?}",
                    data.map(|d| (d.effective, d.permitted, d.inheritable))
                ))
            }
        }),
    );
    blocked(
        "run without no_new_privs and seccomp",
        Box::new(|| {
            // SAFETY: prctl queries with no pointers.
            let (nnp, sc) = unsafe {
                (
                    libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
                    libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0),
                )
            };
            if nnp == 1 && sc == 2 {
                Blocked("no_new_privs 1, seccomp 2 (filter)".into())
            } else {
                Allowed(format!("no_new_privs {nnp}, seccomp {sc}"))
            }
        }),
    );
    blocked(
        "run as root",
        Box::new(|| {
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            if uid == 0 {
                Allowed("uid 0".into())
            } else {
                Blocked(format!("uid {uid}"))
            }
        }),
    );
    blocked(
        "inherit unexpected descriptors",
        Box::new(|| {
            // Every number up to the descriptor limit, asked directly.
            // SAFETY: F_GETFD on a number only asks whether it is open.
            let fds: Vec<i32> = (0..4096)
                .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
                .collect();
            // 0-2 and the host channel on 3.
            if fds.iter().all(|fd| *fd <= 3) {
                Blocked(format!("only {fds:?}"))
            } else {
                Allowed(format!("{fds:?}"))
            }
        }),
    );
    // ---- resource exhaustion
    let pids = a.pids;
    blocked(
        "fork bomb past pids.max",
        Box::new(move || {
            let mut children = Vec::new();
            let mut outcome = Allowed(format!("forked {} without a refusal", pids + 16));
            for _ in 0..pids + 16 {
                // SAFETY: children pause until killed below.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: the child waits for its SIGKILL and never returns.
                    unsafe {
                        libc::pause();
                        libc::_exit(0)
                    }
                }
                if pid < 0 {
                    outcome = Blocked(format!(
                        "fork refused after {} children: {}",
                        children.len(),
                        err_text()
                    ));
                    break;
                }
                children.push(pid);
            }
            for pid in &children {
                // SAFETY: killing and reaping our own children.
                unsafe {
                    libc::kill(*pid, libc::SIGKILL);
                    libc::waitpid(*pid, std::ptr::null_mut(), 0);
                }
            }
            outcome
        }),
    );
    let memory = a.memory_bytes;
    blocked(
        "memory bomb past memory.max",
        Box::new(move || {
            match in_child(|| {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                let target = memory * 2;
                let mut total = 0u64;
                while total < target {
                    hoard.push(vec![1u8; 4 << 20]);
                    total += 4 << 20;
                }
                0
            }) {
                Err(sig) => Blocked(format!("OOM-killed (signal {sig})")),
                Ok(code) => Allowed(format!("allocated twice the limit, exit {code}")),
            }
        }),
    );
    // ---- what must work
    let mut allowed =
        |name: &'static str, f: Box<dyn FnOnce() -> Outcome + 'a>| list.push((name, true, f));
    allowed(
        "write and read back its own /var",
        Box::new(|| {
            if let Err(e) = std::fs::write("/var/probe-ok", b"mine") {
                return Blocked(e.to_string());
            }
            match std::fs::read("/var/probe-ok") {
                Ok(d) if d == b"mine" => Allowed("round trip".into()),
                Ok(_) => Blocked("mismatch".into()),
                Err(e) => Blocked(e.to_string()),
            }
        }),
    );
    allowed(
        "read its own image",
        Box::new(
            || match std::fs::read(std::env::args().next().unwrap_or_default()) {
                Ok(d) => Allowed(format!("{} bytes", d.len())),
                Err(e) => Blocked(e.to_string()),
            },
        ),
    );
    allowed("write /tmp", Box::new(|| create_file("/tmp/scratch")));
    allowed(
        "fork and wait",
        Box::new(|| match in_child(|| 7) {
            Ok(7) => Allowed("child exited 7".into()),
            other => Blocked(format!("{other:?}")),
        }),
    );
    allowed(
        "threads",
        Box::new(|| match std::thread::spawn(|| 5).join() {
            Ok(5) => Allowed("joined".into()),
            _ => Blocked("thread failed".into()),
        }),
    );
    allowed(
        "hostname is the grain's own",
        Box::new(|| {
            // SAFETY: uname fills the zeroed struct.
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::uname(&mut u) } != 0 {
                return Blocked(err_text());
            }
            let name: String = u
                .nodename
                .iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as u8 as char)
                .collect();
            if name == "grain" {
                Allowed(name)
            } else {
                Blocked(name)
            }
        }),
    );
    allowed(
        "plant a symlink to the host's /etc/shadow in its own /var",
        Box::new(
            || match std::os::unix::fs::symlink("/etc/shadow", "/var/planted-link") {
                Ok(()) => Allowed("planted; the host must never follow it".into()),
                Err(e) => Blocked(e.to_string()),
            },
        ),
    );
    allowed(
        "talk over the host channel on fd 3",
        Box::new(|| {
            // SAFETY: fd 3 is the socket the host passed; we borrow it.
            let mut chan = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(3) };
            let result = chan.write_all(b"ping\n").and_then(|()| {
                let mut buf = [0u8; 5];
                chan.read_exact(&mut buf).map(|()| buf)
            });
            std::mem::forget(chan);
            match result {
                Ok(b) if &b == b"pong\n" => Allowed("ping/pong".into()),
                Ok(b) => Blocked(format!("{b:?}")),
                Err(e) => Blocked(e.to_string()),
            }
        }),
    );
    list
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--stamp") {
        // The spawn benchmark's payload: when did the app start running?
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        println!("{}", ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128);
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--true") {
        // What the spawn benchmark runs: nothing at all.
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--hog") {
        // A CPU hog: more spinning threads than there are CPUs, forever.
        let threads: usize = std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(8);
        println!("hogging with {threads} threads");
        for _ in 0..threads {
            std::thread::spawn(|| {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            });
        }
        loop {
            std::thread::park();
        }
    }
    if std::env::args().nth(1).as_deref() == Some("--cpu-share") {
        // Spins for the given wall-clock milliseconds and prints the share of
        // one CPU it actually got.
        let ms: u64 = std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        let wall = std::time::Instant::now();
        let cpu = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime fills `ts`.
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
        };
        let start = cpu(libc::CLOCK_PROCESS_CPUTIME_ID);
        let mut x = 0u64;
        while wall.elapsed() < std::time::Duration::from_millis(ms) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = cpu(libc::CLOCK_PROCESS_CPUTIME_ID) - start;
        println!("cpu-share {:.3}", used / wall.elapsed().as_secs_f64());
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--spew") {
        // Writes N bytes of log lines to stdout and exits.
        let total: usize = std::env::args()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1 << 20);
        let line = b"the grain is very chatty today\n";
        let mut out = std::io::stdout().lock();
        let mut written = 0;
        while written < total {
            let _ = out.write_all(line);
            written += line.len();
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--subvol") {
        // Tries to make a btrfs subvolume inside /var (which would escape
        // the grain's qgroup quota): BTRFS_IOC_SUBVOL_CREATE.
        #[repr(C)]
        struct VolArgs {
            fd: i64,
            name: [u8; 4088],
        }
        let mut args = VolArgs {
            fd: 0,
            name: [0; 4088],
        };
        args.name[..3].copy_from_slice(b"sub");
        let dir = std::fs::File::open("/var").expect("open /var");
        const BTRFS_IOC_SUBVOL_CREATE: libc::c_ulong = 0x5000_940e;
        // SAFETY: the request's argument is a btrfs_ioctl_vol_args, which
        // `args` lays out; the descriptor is open.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                BTRFS_IOC_SUBVOL_CREATE,
                &mut args,
            )
        };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        println!(
            "subvol {} errno {}",
            if r == 0 { "created" } else { "refused" },
            if r == 0 { 0 } else { errno }
        );
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--fill") {
        // The quota attack: write 1 MiB chunks to a file until the
        // filesystem refuses, then report how far it got and why.
        let path = std::env::args()
            .nth(2)
            .unwrap_or_else(|| "/var/fill".to_owned());
        let chunk = vec![0x5au8; 1 << 20];
        let mut written: u64 = 0;
        let result = std::fs::File::create(&path).and_then(|mut f| {
            loop {
                f.write_all(&chunk).and_then(|()| f.sync_all())?;
                written += chunk.len() as u64;
                if written >= 1 << 30 {
                    return Ok(());
                }
            }
        });
        match result {
            Ok(()) => println!("filled {written} no-limit"),
            Err(e) => println!("filled {written} errno {}", e.raw_os_error().unwrap_or(0)),
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--wait") {
        // Stand-in for a long-running app: say so, then wait for a signal.
        println!("ready {}", std::process::id());
        loop {
            // SAFETY: pause only waits; the default SIGTERM action ends the process.
            unsafe { libc::pause() };
        }
    }
    let args = parse_args();
    let mut failures = 0;
    let mut total = 0;
    let stdout = std::io::stdout();
    for (name, expect_allowed, check) in checks(&args) {
        let (allowed, detail) = match check() {
            Allowed(d) => (true, d),
            Blocked(d) => (false, d),
        };
        let ok = allowed == expect_allowed;
        total += 1;
        if !ok {
            failures += 1;
        }
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "{{\"check\":\"{}\",\"expected\":\"{}\",\"ok\":{ok},\"detail\":\"{}\"}}",
            json_escape(name),
            if expect_allowed { "allowed" } else { "blocked" },
            json_escape(&detail)
        );
        let _ = out.flush();
    }
    println!("{{\"summary\":true,\"checks\":{total},\"failures\":{failures}}}");
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
