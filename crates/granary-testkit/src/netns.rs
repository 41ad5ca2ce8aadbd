//! Network namespaces for cluster tests: a bridge in the host's namespace
//! and, per node, a namespace joined to it by a veth pair, with an address
//! of its own on the bridge's /24. The test (and etcd, listening on the
//! bridge's address) stays in the host's namespace and reaches every
//! node over its link; nodes reach each other through the bridge, so a
//! node's link going down cuts it off as a pulled cable would.
//!
//! Everything made is named after this process and removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip (apt install iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A bridge and `n` namespaces on it; removed on drop.
pub struct Net {
    bridge: String,
    /// The bridge's address, in the host's namespace.
    pub host: Ipv4Addr,
    subnet: [u8; 3],
    namespaces: Vec<String>,
    veths: Vec<String>,
}

impl Net {
    /// Makes the bridge and `n` namespaces (at most 200).
    pub fn create(n: usize) -> Net {
        assert!(n <= 200, "at most 200 namespaces");
        let id = std::process::id() % 10_000;
        // A /24 no route of this host covers yet (another test's, or a
        // real network's).
        let routes = Command::new("ip")
            .args(["-4", "route", "show", "table", "all"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let (k, subnet) = loop {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let subnet = [10, 200 + (k % 50) as u8, (std::process::id() % 250) as u8];
            let prefix = format!("{}.{}.{}.", subnet[0], subnet[1], subnet[2]);
            if !routes.contains(&prefix) || k >= 500 {
                break (k, subnet);
            }
        };
        let mut net = Net {
            bridge: format!("grb{id}x{k}"),
            host: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1),
            subnet,
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        let made = net.make(n);
        if let Err(e) = made {
            panic!("cannot make the test's network namespaces (root needed): {e}");
        }
        net
    }

    fn make(&mut self, n: usize) -> Result<(), String> {
        let bridge = self.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", self.host), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("{bridge}n{i}");
            let (outside, inside) = (format!("{bridge}v{i}"), format!("{bridge}w{i}"));
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            self.veths.push(outside.clone());
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            let addr = format!("{}/24", self.ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Node `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, 10 + i as u8)
    }

    /// Takes node `i`'s link down or up (its veth's end on the bridge).
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.veths[i], state]).expect("set a link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // A namespace's end of its veth pair goes with it, and the other
        // end with that.
        for ns in &self.namespaces {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cannot remove network namespace {ns}: {e}");
            }
        }
        // A veth whose inner end never reached its namespace (a failure
        // part-way through `create`) is still here.
        for veth in &self.veths {
            let _ = ip(&["link", "del", veth]);
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("cannot remove bridge {}: {e}", self.bridge);
        }
    }
}
