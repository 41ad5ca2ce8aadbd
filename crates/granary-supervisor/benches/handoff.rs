//! Which way should a whole-connection protocol (IMAP, submission, XMPP, an
//! SSH channel) reach its grain? Three ways, side by side in one run:
//!
//! - `direct`: the client's socket is served by the grain's thread itself
//!   (the floor: no hand-off at all);
//! - `fd (SCM_RIGHTS)`: the host passes the socket's other end to the grain
//!   over a unix socket, then stays out of the data path;
//! - `capnp bytes`: the host keeps the socket and carries the bytes in
//!   `ByteStream.write` calls over the grain's Cap'n Proto channel.
//!
//! The "grain" is an echo server on its own thread and runtime, as a real
//! grain is another process; the client is the main thread with blocking
//! sockets. It reports 1 KiB request/response latency (p50, p99) and bulk
//! echo throughput.
//!
//! ```sh
//! cargo bench -p granary-supervisor --bench handoff            # full
//! cargo bench -p granary-supervisor --bench handoff -- --smoke  # quick
//! ```

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdStream;
use std::time::{Duration, Instant};

use capnp::capability::Rc;
use capnp_rpc::{RpcSystem, rpc_twoparty_capnp::Side, twoparty};
use futures::AsyncReadExt as _;
use granary_schema::grain_capnp::{grain, handoff};
use granary_schema::stream_capnp::byte_stream;
use granary_supervisor::handoff::{ByteStreamWriter, pump_to, recv_fd, send_fd};
use tokio::sync::mpsc;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// The grain's side of a `capnp bytes` connection: echoes every write back
/// down the stream it was handed.
struct Echo {
    down: byte_stream::Client,
}

impl byte_stream::Server for Echo {
    async fn write(
        self: Rc<Self>,
        params: byte_stream::WriteParams,
        _: byte_stream::WriteResults,
    ) -> Result<(), capnp::Error> {
        let mut req = self.down.write_request();
        req.get().set_bytes(params.get()?.get_bytes()?);
        req.send().promise.await.map(drop)
    }
    async fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> Result<(), capnp::Error> {
        self.down.end_request().send().promise.await.map(drop)
    }
}

struct EchoGrain;

impl grain::Server for EchoGrain {
    async fn accept(
        self: Rc<Self>,
        params: grain::AcceptParams,
        mut results: grain::AcceptResults,
    ) -> Result<(), capnp::Error> {
        match params.get()?.get_handoff()?.which()? {
            handoff::Which::Stream(down) => {
                let upstream: byte_stream::Client = capnp_rpc::new_client(Echo { down: down? });
                results.get().set_upstream(upstream);
                Ok(())
            }
            handoff::Which::Socket(_) => Err(capnp::Error::failed(
                "this bench passes sockets separately".into(),
            )),
        }
    }
}

/// Pins the calling thread to one CPU: the client on CPU 0, the host and
/// the grain on CPU 1, so runs do not depend on where the scheduler puts
/// them.
fn pin(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn rpc_over(
    stream: StdStream,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side> {
    stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(stream).unwrap();
    let (reader, writer) = stream.compat().split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        Default::default(),
    );
    RpcSystem::new(Box::new(network), bootstrap)
}

async fn echo(sock: StdStream) {
    sock.set_nonblocking(true).unwrap();
    let sock = tokio::net::UnixStream::from_std(sock).unwrap();
    let (mut r, mut w) = sock.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
}

/// The grain: serves `Grain` on `rpc`, echoes sockets that arrive with
/// SCM_RIGHTS on `fds`, and sockets handed over directly on `direct`.
fn start_grain(rpc: StdStream, fds: StdStream, mut direct: mpsc::UnboundedReceiver<StdStream>) {
    let (fd_tx, mut fd_rx) = mpsc::unbounded_channel::<StdStream>();
    std::thread::spawn(move || {
        pin(1);
        while let Ok((_token, fd)) = recv_fd(&fds) {
            if fd_tx.send(StdStream::from(fd)).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let grain: grain::Client = capnp_rpc::new_client(EchoGrain);
            tokio::task::spawn_local(rpc_over(rpc, Side::Server, Some(grain.client)));
            loop {
                tokio::select! {
                    Some(sock) = fd_rx.recv() => { tokio::task::spawn_local(echo(sock)); }
                    Some(sock) = direct.recv() => { tokio::task::spawn_local(echo(sock)); }
                    else => break,
                }
            }
        });
    });
}

/// The host: for each socket it is given, calls `Grain.accept` with a
/// `ByteStream` that writes to the socket, and pumps the socket's bytes
/// into the returned upstream.
fn start_host(rpc: StdStream, mut conns: mpsc::UnboundedReceiver<StdStream>) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let mut system = rpc_over(rpc, Side::Client, None);
            let grain: grain::Client = system.bootstrap(Side::Server);
            tokio::task::spawn_local(system);
            while let Some(sock) = conns.recv().await {
                sock.set_nonblocking(true).unwrap();
                let (r, w) = tokio::net::UnixStream::from_std(sock).unwrap().into_split();
                let down: byte_stream::Client = capnp_rpc::new_client(ByteStreamWriter::new(w));
                let mut req = grain.accept_request();
                req.get().set_service("imap");
                req.get().init_handoff().set_stream(down);
                let grain_call = req.send().promise;
                tokio::task::spawn_local(async move {
                    let upstream = grain_call.await.and_then(|r| r.get()?.get_upstream());
                    match upstream {
                        Ok(up) => {
                            let _ = pump_to(r, up).await;
                        }
                        Err(e) => eprintln!("accept failed: {e}"),
                    }
                });
            }
        });
    });
}

fn latency(client: &mut StdStream, rounds: usize) -> (Duration, Duration) {
    let msg = [7u8; 1024];
    let mut back = [0u8; 1024];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let start = Instant::now();
        client.write_all(&msg).unwrap();
        client.read_exact(&mut back).unwrap();
        if i >= rounds / 10 {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn bulk(client: StdStream, bytes: usize) -> f64 {
    let mut writer = client.try_clone().unwrap();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        pin(0);
        let chunk = vec![1u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reader = client;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    sender.join().unwrap();
    assert_eq!(got, bytes, "echo lost bytes");
    bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (rounds, bulk_bytes) = if smoke {
        (200, 4 << 20)
    } else {
        (5000, 64 << 20)
    };

    pin(0);
    let (host_rpc, grain_rpc) = StdStream::pair().unwrap();
    let (host_fds, grain_fds) = StdStream::pair().unwrap();
    let (direct_tx, direct_rx) = mpsc::unbounded_channel();
    let (proxy_tx, proxy_rx) = mpsc::unbounded_channel();
    start_grain(grain_rpc, grain_fds, direct_rx);
    start_host(host_rpc, proxy_rx);

    let connect = |how: &str| -> StdStream {
        let (client, server) = StdStream::pair().unwrap();
        match how {
            "direct" => direct_tx.send(server).unwrap(),
            "fd (SCM_RIGHTS)" => {
                send_fd(&host_fds, 1, server.as_raw_fd()).unwrap();
            }
            _ => proxy_tx.send(server).unwrap(),
        }
        client
    };

    // Variants alternate over several rounds (this VM's two vCPUs are
    // noisy); each figure is the median over rounds.
    let repeats = if smoke { 1 } else { 5 };
    let variants = ["direct", "fd (SCM_RIGHTS)", "capnp bytes"];
    let mut p50s = vec![Vec::new(); variants.len()];
    let mut p99s = vec![Vec::new(); variants.len()];
    let mut bandwidths = vec![Vec::new(); variants.len()];
    for _ in 0..repeats {
        for (i, how) in variants.iter().enumerate() {
            let mut client = connect(how);
            let (p50, p99) = latency(&mut client, rounds);
            drop(client);
            p50s[i].push(p50.as_secs_f64() * 1e6);
            p99s[i].push(p99.as_secs_f64() * 1e6);
            bandwidths[i].push(bulk(connect(how), bulk_bytes));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "1 KiB request/response: {rounds} rounds; bulk echo: {} MiB; median of {repeats} alternating runs",
        bulk_bytes >> 20
    );
    println!(
        "{:<18} {:>10} {:>10} {:>12}",
        "hand-off", "p50 (µs)", "p99 (µs)", "bulk MiB/s"
    );
    let mut results = Vec::new();
    for (i, how) in variants.iter().enumerate() {
        let (p50, p99, bw) = (
            median(&mut p50s[i]),
            median(&mut p99s[i]),
            median(&mut bandwidths[i]),
        );
        println!("{how:<18} {p50:>10.1} {p99:>10.1} {bw:>12.0}");
        results.push((how, p50, bw));
    }
    let (_, direct_p50, direct_bw) = results[0];
    for (how, p50, bw) in &results[1..] {
        println!(
            "{how}: latency {:.2}x direct, throughput {:.2}x direct",
            p50 / direct_p50,
            bw / direct_bw
        );
    }
}
