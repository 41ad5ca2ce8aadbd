//! `granary-launcher`: applies one grain's sandbox plan and runs its app.
//!
//! Started by the daemon (fork+exec only) as root:
//!
//! ```text
//! granary-launcher --plan-json JSON [--parent-pid PID]
//! granary-launcher --plan FILE [--parent-pid PID]
//! granary-launcher --zygote --parent-pid PID    # Linux: serves launches on fd 3
//! ```
//!
//! The daemon starts one zygote and asks it for every grain (see
//! `granary_jail::linux::zygote`); `--plan` runs one grain by hand.
//!
//! It first clears its environment, closes every inherited descriptor but
//! stdout, stderr and the plan's `keep_fds`, and points stdin at /dev/null.
//! It exits with the app's status, or 125 with a `jail: ...` line on stderr
//! when the sandbox could not be built.

#![allow(unsafe_code)]

use std::process::ExitCode;

const EXIT_SETUP_FAILED: u8 = 125;

fn main() -> ExitCode {
    // Before anything else: nothing of the daemon's environment reaches the grain.
    let names: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for name in names {
        // SAFETY: the launcher is single-threaded; no other thread reads
        // the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("granary-launcher: {e}");
            ExitCode::from(EXIT_SETUP_FAILED)
        }
    }
}

#[cfg(target_os = "linux")]
fn run() -> Result<i32, String> {
    use granary_jail::{Plan, linux};

    let mut args = std::env::args().skip(1);
    let mut plan_text = None;
    let mut parent = None;
    let mut zygote = false;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--plan-json" => plan_text = Some(value()?),
            "--zygote" => zygote = true,
            "--plan" => {
                let path = value()?;
                plan_text = Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("reading plan {path}: {e}"))?,
                );
            }
            "--parent-pid" => {
                parent = Some(
                    value()?
                        .parse::<i32>()
                        .map_err(|e| format!("--parent-pid: {e}"))?,
                );
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: granary-launcher --plan-json JSON | --plan FILE [--parent-pid PID] | --zygote --parent-pid PID"
                ));
            }
        }
    }
    if zygote {
        let parent = parent.ok_or("--zygote needs --parent-pid")?;
        linux::zygote::serve(parent).map_err(|e| e.to_string())?;
        return Ok(0);
    }
    let plan_text = plan_text.ok_or("no plan given (--plan-json or --plan)")?;
    let plan: Plan = serde_json::from_str(&plan_text).map_err(|e| format!("invalid plan: {e}"))?;
    linux::die_with_parent(parent).map_err(|e| e.to_string())?;
    linux::close_inherited_fds(&plan.keep_fds).map_err(|e| e.to_string())?;
    linux::null_stdin().map_err(|e| e.to_string())?;
    linux::launch(&plan).map_err(|e| e.to_string())
}

#[cfg(target_os = "freebsd")]
fn run() -> Result<i32, String> {
    use granary_jail::{Plan, freebsd};

    let mut args = std::env::args().skip(1);
    let (Some(flag), Some(value)) = (args.next(), args.next()) else {
        return Err("usage: granary-launcher --plan-json JSON | --plan FILE".to_owned());
    };
    let text = match flag.as_str() {
        "--plan-json" => value,
        "--plan" => {
            std::fs::read_to_string(&value).map_err(|e| format!("reading plan {value}: {e}"))?
        }
        other => return Err(format!("unknown argument {other:?}")),
    };
    let plan: Plan = serde_json::from_str(&text).map_err(|e| format!("invalid plan: {e}"))?;
    freebsd::launch(&plan).map_err(|e| e.to_string())
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
fn run() -> Result<i32, String> {
    Err("this launcher supports Linux and FreeBSD only".to_owned())
}
