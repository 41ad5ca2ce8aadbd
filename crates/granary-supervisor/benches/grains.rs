//! Grains, measured: what a user waits for and what a grain costs.
//!
//! Real grains (the static example app, `apps/hello`, in real jails: run as
//! root, as CI does), driven by the supervisor in this process:
//!
//! - cold start: a stopped grain → the first byte of the answer on a new
//!   connection (`ping` → `pong`), p50/p99;
//! - warm connection: the same on a running grain;
//! - host → grain Cap'n Proto call (`Ping.ping` on the object the grain
//!   offers, no membrane): latency p50/p99 and calls/s, sequential and with
//!   32 in flight;
//! - grain → grain through the membrane (alice/relay holds alice/hello's
//!   `ping` under a grant; timed inside the relay grain) against that
//!   direct call;
//! - memory: RSS of an idle running grain's processes (launcher, init, app),
//!   its cgroup's charge, and this host process's growth per running grain.
//!
//! ```sh
//! ./run-tests                                   # builds the static app first
//! cargo bench -p granary-supervisor --bench grains            # full
//! cargo bench -p granary-supervisor --bench grains -- --smoke # quick
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_grains::{AuthMethod, Identity, Peer};
use granary_schema::services_capnp::ping;
use granary_state::{HostUid, Store};
use granary_supervisor::{Supervisor, SupervisorConfig, SupervisorParams};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find(what: &str, candidates: &[PathBuf]) -> PathBuf {
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("{what} is missing ({candidates:?}); run ./run-tests first"))
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() - 1) * p / 100].as_secs_f64() * 1e6
}

fn summary(name: &str, mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let (p50, p99) = (percentile(&times, 50), percentile(&times, 99));
    println!(
        "{name:<46} p50 {:>9.1} us   p99 {:>9.1} us   (n={})",
        p50,
        p99,
        times.len()
    );
    (p50, p99)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

async fn ping_over_connection(sup: &Supervisor, grain: &str) -> Duration {
    let start = Instant::now();
    let conn = sup
        .connect(
            grain,
            "hello",
            Identity::new("alice", AuthMethod::Admin, 0),
            Peer::new("bench", "bench"),
        )
        .await
        .expect("connect");
    let (read, mut write) = conn.stream.into_split();
    write.write_all(b"ping\n").await.unwrap();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    let took = start.elapsed();
    assert_eq!(line, "pong");
    took
}

async fn ask(sup: &Supervisor, grain: &str, line: &str) -> String {
    let conn = sup
        .connect(
            grain,
            "hello",
            Identity::new("alice", AuthMethod::Admin, 0),
            Peer::new("bench", "bench"),
        )
        .await
        .expect("connect");
    let (read, mut write) = conn.stream.into_split();
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(read).lines();
    lines.next_line().await.unwrap().unwrap()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    assert!(
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false),
        "the grains benchmark runs real jails and needs root"
    );
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let launcher = find(
        "granary-launcher",
        &[
            root().join("target/release/granary-launcher"),
            root().join("target/debug/granary-launcher"),
        ],
    );
    let hello = find(
        "the static example app",
        &[
            root().join(format!("target/{triple}/release/granary-hello")),
            root().join(format!("target/{triple}/debug/granary-hello")),
        ],
    );
    println!(
        "launcher {}\napp      {}",
        launcher.display(),
        hello.display()
    );

    let dir = tempfile::Builder::new()
        .prefix("granary-bench-grains-")
        .tempdir()
        .unwrap();
    let apps = dir.path().join("apps");
    for kind in ["hello", "relay"] {
        let image = apps.join(kind).join("1").join("image");
        std::fs::create_dir_all(image.join("bin")).unwrap();
        std::fs::copy(&hello, image.join("bin/granary-hello")).unwrap();
    }
    for d in [
        dir.path().to_path_buf(),
        apps.clone(),
        apps.join("hello"),
        apps.join("relay"),
    ] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let store = Arc::new(Store::open(&dir.path().join("state.db")).unwrap());
    let manifest = |kind: &str| {
        format!(
            "id = \"bench.{kind}\"\nversion = \"1\"\nkind = \"{kind}\"\nexec = [\"/bin/granary-hello\"]\nservices = [\"hello\"]\noffers = [\"ping\", \"notify\"]\n"
        )
    };
    for kind in ["hello", "relay"] {
        store
            .install_app(
                kind,
                &format!("bench.{kind}"),
                "1",
                &manifest(kind),
                true,
                "bench",
            )
            .unwrap();
    }
    let grains_count: u32 = if smoke { 3 } else { 20 };
    let users: Vec<String> = (0..grains_count).map(|i| format!("u{i}")).collect();
    store
        .add_user(
            &granary_model::UserName::new("alice").unwrap(),
            "x",
            "bench",
        )
        .unwrap();
    for u in &users {
        store
            .add_user(&granary_model::UserName::new(u).unwrap(), "x", "bench")
            .unwrap();
    }
    store
        .ensure_grains(
            HostUid::FirstFreeIn(granary_model::UidRange {
                start: 1_700_000_000,
                count: 1000,
            }),
            "bench",
        )
        .unwrap();
    store
        .add_grant("alice-relay", "alice-hello", "ping", "bench")
        .unwrap();
    let grains_dir = dir.path().join("grains");
    let datasets = Arc::new(granary_datasets::Plain::new(&grains_dir).unwrap());
    let params = SupervisorParams {
        store,
        datasets,
        start_gate: None,
        remote_grants: None,
        jail: granary_jail::JailConfig {
            data_root: grains_dir,
            uid_range: granary_jail::UidRange {
                start: 1_700_000_000,
                count: 1000,
            },
            cgroup: granary_jail::JailConfig::detect_cgroup(),
            cgroup_parent: "granary-bench-grains".to_owned(),
        },
        launcher,
        apps_dir: apps,
        config: SupervisorConfig {
            snapshot_interval: None,
            ..SupervisorConfig::default()
        },
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let sup = Supervisor::new(params).unwrap();
        let rounds = if smoke { 5 } else { 60 };
        let calls = if smoke { 200 } else { 5000 };

        // Cold and warm starts.
        let _ = ping_over_connection(&sup, "alice-hello").await; // page cache, cgroup parents
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for _ in 0..rounds {
            sup.stop("alice-hello").await.unwrap();
            cold.push(ping_over_connection(&sup, "alice-hello").await);
            warm.push(ping_over_connection(&sup, "alice-hello").await);
        }
        println!();
        let (cold_p50, _) = summary("cold start: stopped grain -> first answer", cold);
        summary("warm: new connection -> first answer", warm);

        // Host -> grain direct calls.
        let direct: ping::Client = capnp::capability::FromClientHook::new(
            sup.host_capability("alice-hello", "ping").await.unwrap().hook,
        );
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            direct.ping_request().send().promise.await.unwrap();
            times.push(start.elapsed());
        }
        let (direct_p50, _) = summary("host -> grain capnp call (direct)", times.clone());
        let total: Duration = times.iter().sum();
        println!(
            "{:<46} {:>9.0} calls/s sequential",
            "",
            calls as f64 / total.as_secs_f64()
        );
        let start = Instant::now();
        let window = 32;
        let mut in_flight = futures::stream::FuturesUnordered::new();
        use futures::StreamExt;
        for _ in 0..calls {
            in_flight.push(direct.ping_request().send().promise);
            if in_flight.len() >= window {
                in_flight.next().await.unwrap().unwrap();
            }
        }
        while let Some(r) = in_flight.next().await {
            r.unwrap();
        }
        println!(
            "{:<46} {:>9.0} calls/s with {window} in flight",
            "",
            calls as f64 / start.elapsed().as_secs_f64()
        );

        // Grain -> host (one hop) and grain -> grain through the membrane
        // (two hops and the grant check), both timed inside the relay.
        let in_grain = |answer: String| -> (f64, f64) {
            let field = |name: &str| -> f64 {
                answer
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected answer {answer:?}"))
            };
            (field("p50_us="), field("p99_us="))
        };
        // Alternate the two in rounds so drift on a shared VM hits both;
        // report the median of the rounds.
        assert_eq!(ask(&sup, "alice-relay", "hold ping").await, "ok");
        let rounds_calls = calls / 5;
        let (mut host_rounds, mut membrane_rounds) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            host_rounds.push(in_grain(
                ask(&sup, "alice-relay", &format!("benchhost {rounds_calls}")).await,
            ));
            membrane_rounds.push(in_grain(
                ask(&sup, "alice-relay", &format!("bench {rounds_calls}")).await,
            ));
        }
        let median = |v: &mut Vec<(f64, f64)>| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v[v.len() / 2]
        };
        let (h50, h99) = median(&mut host_rounds);
        let (m50, m99) = median(&mut membrane_rounds);
        println!(
            "{:<46} p50 {h50:>9.1} us   p99 {h99:>9.1} us   (median of 5 x {rounds_calls})",
            "grain -> host capnp call (Host.info)"
        );
        println!(
            "{:<46} p50 {m50:>9.1} us   p99 {m99:>9.1} us   (median of 5 x {rounds_calls})",
            "grain -> grain through the membrane"
        );
        println!("{:<46} {:>9.0} calls/s sequential", "", 1e6 / m50);

        // Memory.
        let before = rss_kib(std::process::id());
        let mut pids = Vec::new();
        for u in &users {
            let grain = format!("{u}-hello");
            ping_over_connection(&sup, &grain).await;
            pids.push((grain.clone(), sup.launcher_pid(&grain).unwrap()));
        }
        let after = rss_kib(std::process::id());
        let (grain, launcher) = &pids[0];
        let init = children(*launcher);
        let app: Vec<u32> = init.iter().flat_map(|p| children(*p)).collect();
        let cg = granary_jail::JailConfig::detect_cgroup();
        let charged = match &cg {
            Some(granary_jail::CgroupDriver::V1 { root }) => std::fs::read_to_string(
                root.join("memory/granary-bench-grains").join(grain).join("memory.usage_in_bytes"),
            )
            .ok(),
            Some(granary_jail::CgroupDriver::V2 { root }) => std::fs::read_to_string(
                root.join("granary-bench-grains").join(grain).join("memory.current"),
            )
            .ok(),
            None => None,
        }
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or("unknown".to_owned(), |b| format!("{} KiB", b / 1024));
        println!();
        println!(
            "idle grain RSS: app {} KiB, init {} KiB, launcher {} KiB; cgroup charge {charged}",
            app.iter().map(|p| rss_kib(*p)).sum::<u64>(),
            init.iter().map(|p| rss_kib(*p)).sum::<u64>(),
            rss_kib(*launcher),
        );
        println!(
            "host process growth with {} more running grains: {} KiB ({:.0} KiB per grain)",
            users.len(),
            after.saturating_sub(before),
            after.saturating_sub(before) as f64 / users.len() as f64
        );
        println!();
        println!(
            "cold start p50 {:.2} ms (goal < 10 ms: {})",
            cold_p50 / 1000.0,
            if cold_p50 < 10_000.0 { "met" } else { "MISSED" }
        );
        let ratio = m50 / h50;
        println!(
            "membrane (grain -> grain) / direct (grain -> host) call p50: {ratio:.2}x (goal <= 2x: {}); / host -> grain: {:.2}x",
            if ratio <= 2.0 { "met" } else { "MISSED" },
            m50 / direct_p50
        );
        sup.shutdown().await;
    });
    let _ = std::io::stdout().flush();
}
