//! The cluster's records against a real three-member etcd on loopback.

use std::time::{Duration, Instant};

use granary_cluster::{
    Arch, ClusterError, Coordinator, DEFAULT_PREFIX, EtcdTls, LeaseState, NodeRecord, Refusal,
};
use granary_testkit::etcd::Etcd;

fn record(name: &str, arches: &[Arch]) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        arches: arches.to_vec(),
        address: format!("127.0.0.1:{}", 7000 + name.len()),
        key: "00".repeat(32),
        max_grains: 100,
        drained: false,
        joined_unix: 0,
    }
}

/// Polls `check` until it holds or `deadline` passes.
async fn until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn joined(c: &Coordinator, name: &str, arches: &[Arch]) {
    let token = c.issue_token(Duration::from_secs(60)).await.unwrap();
    c.join(&token, &record(name, arches)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_once_and_join_tokens_are_single_use() {
    let etcd = Etcd::start(3);
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, None)
        .await
        .unwrap();
    assert!(matches!(c.info().await, Err(ClusterError::NotInitialised)));
    assert!(matches!(
        c.issue_token(Duration::from_secs(60)).await,
        Err(ClusterError::NotInitialised)
    ));
    let info = c.init().await.unwrap();
    assert_eq!(info.id.len(), 32);
    match c.init().await {
        Err(ClusterError::AlreadyInitialised(id)) => assert_eq!(id, info.id),
        other => panic!("a second init: {:?}", other.err()),
    }

    let token = c.issue_token(Duration::from_secs(60)).await.unwrap();
    c.join(&token, &record("n1", &[Arch::X86_64]))
        .await
        .unwrap();
    // Used once: gone, whatever name comes with it.
    assert!(matches!(
        c.join(&token, &record("n2", &[Arch::X86_64])).await,
        Err(ClusterError::BadToken)
    ));
    assert!(matches!(
        c.join("gjoin-00", &record("n2", &[Arch::X86_64])).await,
        Err(ClusterError::BadToken)
    ));
    // A taken name leaves the token usable.
    let token = c.issue_token(Duration::from_secs(60)).await.unwrap();
    assert!(matches!(
        c.join(&token, &record("n1", &[Arch::X86_64])).await,
        Err(ClusterError::NameTaken(n)) if n == "n1"
    ));
    assert!(matches!(
        c.join(&token, &record("N 2", &[Arch::X86_64])).await,
        Err(ClusterError::BadName(_))
    ));
    c.join(&token, &record("n2", &[Arch::X86_64]))
        .await
        .unwrap();
    // An unused token expires by itself.
    let short = c.issue_token(Duration::from_secs(1)).await.unwrap();
    assert_eq!(c.pending_tokens().await.unwrap(), 1);
    until(
        "an unused token to expire",
        Duration::from_secs(10),
        async || c.pending_tokens().await.unwrap() == 0,
    )
    .await;
    assert!(matches!(
        c.join(&short, &record("n3", &[Arch::X86_64])).await,
        Err(ClusterError::BadToken)
    ));
    // The token itself is not in etcd, only its hash.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoints().join(","),
            "get",
            "--prefix",
            DEFAULT_PREFIX,
        ])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("/granary/nodes/n2"), "{dump}");
    assert!(
        !dump.contains(token.trim_start_matches("gjoin-")),
        "a join token stored in clear"
    );

    let names: Vec<String> = c
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.record.name)
        .collect();
    assert_eq!(names, ["n1", "n2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_show_who_is_up_and_a_dead_node_drops_out_after_its_ttl() {
    let etcd = Etcd::start(3);
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, None)
        .await
        .unwrap();
    c.init().await.unwrap();
    assert!(matches!(
        c.hold_lease("ghost", Duration::from_secs(2), 0, "").await,
        Err(ClusterError::NoSuchNode(_))
    ));
    joined(&c, "n1", &[Arch::X86_64]).await;
    joined(&c, "n2", &[Arch::X86_64]).await;

    let l1 = c
        .hold_lease("n1", Duration::from_secs(2), 1 << 30, "")
        .await
        .unwrap();
    let l2 = c
        .hold_lease("n2", Duration::from_secs(2), 1 << 30, "")
        .await
        .unwrap();
    assert_eq!(l1.state(), LeaseState::Live);
    let nodes = c.nodes().await.unwrap();
    assert!(nodes.iter().all(|n| n.alive.is_some()), "{nodes:?}");
    assert!(
        nodes
            .iter()
            .all(|n| n.lease_age_secs.is_some_and(|a| a <= 2)),
        "{nodes:?}"
    );

    // Renewals keep it: after three TTLs' worth of them (one every TTL/6)
    // it is still there.
    let r0 = l1.renewals();
    until(
        "three TTLs of renewals",
        Duration::from_secs(15),
        async || l1.renewals() >= r0 + 18,
    )
    .await;
    assert_eq!(l1.state(), LeaseState::Live);
    assert!(c.nodes().await.unwrap().iter().all(|n| n.alive.is_some()));

    // A live node cannot be removed.
    assert!(matches!(
        c.remove_node("n1", false).await,
        Err(ClusterError::NodeAlive(_))
    ));

    // n2 dies without a word (its renewals stop): it drops out within
    // about its TTL, and n1 does not.
    drop(l2);
    let died = Instant::now();
    until(
        "n2's alive record to expire",
        Duration::from_secs(10),
        async || {
            let nodes = c.nodes().await.unwrap();
            nodes
                .iter()
                .any(|n| n.record.name == "n2" && n.alive.is_none())
        },
    )
    .await;
    assert!(
        died.elapsed() >= Duration::from_secs(1),
        "expired in {:?}",
        died.elapsed()
    );
    assert!(
        c.nodes()
            .await
            .unwrap()
            .iter()
            .any(|n| n.record.name == "n1" && n.alive.is_some())
    );

    // Another process calling itself n1 while n1 renews its lease does not
    // take it (a copied data dir): it waits out one TTL and gives up.
    match c
        .hold_lease("n1", Duration::from_secs(2), 1 << 30, "")
        .await
    {
        Err(ClusterError::LeaseHeld(n)) => assert_eq!(n, "n1"),
        other => panic!("took a lease someone renews: {:?}", other.err()),
    }
    assert!(l1.is_live());
    // A restarted n1 whose previous run died (its renewals stopped) gets
    // the record back once the old lease expires.
    drop(l1);
    let again = c
        .hold_lease("n1", Duration::from_secs(2), 1 << 30, "")
        .await
        .unwrap();
    assert!(again.is_live());
    // A lease etcd revokes is reported lost, never live again.
    let revoked = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoints().join(",")])
        .args(["lease", "revoke", &format!("{:x}", again.id())])
        .output()
        .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    tokio::time::timeout(Duration::from_secs(5), again.lost())
        .await
        .expect("the revoked lease reported lost");
    assert_eq!(again.state(), LeaseState::Lost);
    let again = c
        .hold_lease("n1", Duration::from_secs(2), 1 << 30, "")
        .await
        .unwrap();

    // Removal: a down node goes; its record is gone.
    c.remove_node("n2", false).await.unwrap();
    assert!(matches!(
        c.remove_node("n2", false).await,
        Err(ClusterError::NoSuchNode(_))
    ));
    // A clean stop releases at once.
    again.release().await.unwrap();
    assert!(c.nodes().await.unwrap().iter().all(|n| n.alive.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_is_fenced_by_epochs() {
    let etcd = Etcd::start(3);
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, None)
        .await
        .unwrap();
    c.init().await.unwrap();
    joined(&c, "n1", &[Arch::X86_64]).await;
    joined(&c, "n2", &[Arch::X86_64]).await;
    joined(&c, "pi", &[Arch::Aarch64]).await;
    let l1 = c
        .hold_lease("n1", Duration::from_secs(5), 10 << 30, "")
        .await
        .unwrap();
    let l2 = c
        .hold_lease("n2", Duration::from_secs(5), 20 << 30, "")
        .await
        .unwrap();
    let lpi = c
        .hold_lease("pi", Duration::from_secs(5), 900 << 30, "")
        .await
        .unwrap();

    // Most room that can run it: n2 for x86_64, though the Pi has more.
    let p = c.place("alice-git", &[Arch::X86_64]).await.unwrap();
    assert_eq!(p.node, "n2");
    assert!(p.epoch > 0);
    assert_eq!(c.placement("alice-git").await.unwrap(), Some(p.clone()));
    let pi_app = c.place("alice-blog", &[Arch::Aarch64]).await.unwrap();
    assert_eq!(pi_app.node, "pi");
    assert!(matches!(
        c.place("alice-git", &[Arch::X86_64]).await,
        Err(ClusterError::AlreadyPlaced { node, .. }) if node == "n2"
    ));

    // Only the owner may start it, and only with data no newer.
    assert_eq!(
        c.start_permit("alice-git", &l2, None).await.unwrap(),
        Ok(p.epoch)
    );
    assert_eq!(
        c.start_permit("alice-git", &l1, None).await.unwrap(),
        Err(Refusal::OwnedBy {
            node: "n2".into(),
            epoch: p.epoch
        })
    );
    assert_eq!(
        c.start_permit("bob-git", &l2, None).await.unwrap(),
        Err(Refusal::NotPlaced)
    );

    // A move: compare-and-swap from the epoch read, to a new epoch.
    let moved = c.switch(&p, "n1").await.unwrap();
    assert_eq!(moved.node, "n1");
    assert!(moved.epoch > p.epoch);
    // The stale reader loses: its epoch is gone.
    assert!(
        matches!(c.switch(&p, "n2").await, Err(ClusterError::Conflict { expected, .. }) if expected == p.epoch)
    );
    // n2, which still thinks it owns the grain, may not start it; n1 may,
    // but not on a dataset a later placement wrote.
    assert!(matches!(
        c.start_permit("alice-git", &l2, Some(p.epoch))
            .await
            .unwrap(),
        Err(Refusal::OwnedBy { .. })
    ));
    assert_eq!(
        c.start_permit("alice-git", &l1, Some(p.epoch))
            .await
            .unwrap(),
        Ok(moved.epoch)
    );
    assert_eq!(
        c.start_permit("alice-git", &l1, Some(moved.epoch + 5))
            .await
            .unwrap(),
        Err(Refusal::DatasetNewer {
            dataset: moved.epoch + 5,
            placement: moved.epoch
        })
    );

    // Connections go to the owner: none from the owner itself, the owner's
    // link and pinned key from anyone else.
    assert_eq!(c.route("alice-git", "n1").await.unwrap(), None);
    assert_eq!(c.route("nobody-git", "n2").await.unwrap(), None);
    let route = c.route("alice-git", "n2").await.unwrap().unwrap();
    assert_eq!(route.node, "n1");
    assert_eq!(
        route.link.as_deref(),
        Some("127.0.0.1:7002"),
        "its record's address when alive has no link"
    );
    assert_eq!(route.key, "00".repeat(32));

    // A drained node takes nothing new, and the flag is in its record.
    c.set_drained("n1", true).await.unwrap();
    assert!(c.node("n1").await.unwrap().unwrap().drained);
    assert_eq!(
        c.place("carol-git", &[Arch::X86_64]).await.unwrap().node,
        "n2"
    );
    c.set_drained("n2", true).await.unwrap();
    match c.place("dave-git", &[Arch::X86_64]).await {
        Err(ClusterError::NoRoom { why, .. }) => {
            assert!(
                why.contains("n1: drained") && why.contains("pi: runs only aarch64"),
                "{why}"
            )
        }
        other => panic!("placed on a drained node: {other:?}"),
    }
    c.set_drained("n1", false).await.unwrap();
    assert_eq!(
        c.place("dave-git", &[Arch::X86_64]).await.unwrap().node,
        "n1"
    );

    // No move to a drained node, nor to one that is down.
    c.set_drained("pi", true).await.unwrap();
    assert!(matches!(
        c.switch(&moved, "pi").await,
        Err(ClusterError::NoRoom { why, .. }) if why.contains("drained")
    ));
    c.set_drained("pi", false).await.unwrap();
    let pi_state = c.placement("alice-blog").await.unwrap().unwrap();
    lpi.release().await.unwrap();
    assert!(matches!(
        c.switch(&moved, "pi").await,
        Err(ClusterError::NoRoom { .. })
    ));
    // A node with grains is not removed without --force.
    assert!(matches!(
        c.remove_node("pi", false).await,
        Err(ClusterError::NodeHasGrains { count: 1, .. })
    ));
    assert_eq!(
        c.remove_node("pi", true).await.unwrap(),
        vec![pi_state.grain]
    );
    assert_eq!(c.placement("alice-blog").await.unwrap(), None);
    drop((l1, l2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_lost_changes_nothing_two_lapse_every_lease() {
    let mut etcd = Etcd::start(3);
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, None)
        .await
        .unwrap();
    c.init().await.unwrap();
    joined(&c, "n1", &[Arch::X86_64]).await;
    let lease = c
        .hold_lease("n1", Duration::from_secs(3), 1 << 30, "")
        .await
        .unwrap();
    let p = c.place("alice-git", &[Arch::X86_64]).await.unwrap();

    etcd.kill(0);
    let r0 = lease.renewals();
    until(
        "two TTLs of renewals with one member down",
        Duration::from_secs(20),
        async || lease.renewals() >= r0 + 12,
    )
    .await;
    assert!(lease.is_live(), "one member of three down cost the lease");
    // Every request still gets through (some are first sent to the dead
    // member and retried).
    for _ in 0..30 {
        assert_eq!(
            c.start_permit("alice-git", &lease, None).await.unwrap(),
            Ok(p.epoch)
        );
    }

    // Quorum lost: renewals fail, and within TTL/2 (plus one renewal
    // period) the node stops trusting its lease, before etcd could
    // have handed its grains to anyone.
    etcd.kill(1);
    let lost = Instant::now();
    until(
        "the lease to lapse without quorum",
        Duration::from_secs(10),
        async || lease.state() != LeaseState::Live,
    )
    .await;
    assert!(
        lost.elapsed() < Duration::from_secs(3),
        "lapsed only after {:?}",
        lost.elapsed()
    );
    // No start: either etcd cannot answer, or it answers that the lease
    // is not live.
    match c.start_permit("alice-git", &lease, None).await {
        Err(ClusterError::Etcd { .. }) => {}
        Ok(refused) => assert_eq!(refused, Err(Refusal::LeaseNotLive)),
        Err(e) => panic!("{e}"),
    }
}

/// The shared records' log: entries taken in turn, read back in order
/// across pages, watched, and kept apart per cluster prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_log_takes_one_entry_per_number_and_keeps_stores_equal() {
    let etcd = Etcd::start(3);
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, None)
        .await
        .unwrap();
    assert!(c.log_after(0).await.unwrap().is_empty());
    assert!(c.log_append(0, b"first").await.unwrap());
    // Number 1 is taken: another node's entry there is refused...
    assert!(!c.log_append(0, b"second").await.unwrap());
    // ...but the same entry again (a retry whose answer was lost) is ours.
    assert!(c.log_append(0, b"first").await.unwrap());
    // More entries than one page holds come back whole and in order.
    for n in 1..300u64 {
        assert!(c.log_append(n, format!("e{n}").as_bytes()).await.unwrap());
    }
    let all = c.log_after(0).await.unwrap();
    assert_eq!(all.len(), 300);
    assert!(all.iter().enumerate().all(|(i, (n, _))| *n == i as u64 + 1));
    assert_eq!(all[299].1, b"e299");
    assert_eq!(c.log_after(298).await.unwrap().len(), 2);

    // Another cluster's log, under another prefix, is its own, and the
    // watch sees an append.
    let other = Coordinator::connect(&etcd.endpoints(), "/other/", None)
        .await
        .unwrap();
    let mut watch = other.watch_log().await.unwrap();
    assert!(other.log_after(0).await.unwrap().is_empty());
    assert!(other.log_append(0, b"theirs").await.unwrap());
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("the watch saw the append")
        .unwrap();
    assert_eq!(other.log_after(0).await.unwrap(), [(1, b"theirs".to_vec())]);
    assert_eq!(c.log_after(299).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_over_tls_takes_only_clients_with_a_certificate_from_its_ca() {
    let etcd = Etcd::start_tls(1);
    let files = etcd.tls.as_ref().unwrap();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let good = EtcdTls {
        ca: read(&files.ca),
        client: Some((read(&files.client_cert), read(&files.client_key))),
    };
    let c = Coordinator::connect(&etcd.endpoints(), DEFAULT_PREFIX, Some(&good))
        .await
        .unwrap();
    let info = c.init().await.unwrap();
    assert_eq!(c.info().await.unwrap().id, info.id);

    // Refused, each one: no client certificate; a server certificate the
    // given CA did not sign; plain HTTP to the TLS port.
    let no_cert = EtcdTls {
        client: None,
        ..good.clone()
    };
    let other_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        EtcdTls {
            ca: p.self_signed(&key).unwrap().pem().into_bytes(),
            ..good.clone()
        }
    };
    let plain = etcd
        .endpoints()
        .iter()
        .map(|u| u.replacen("https://", "http://", 1))
        .collect::<Vec<_>>();
    for (what, endpoints, tls) in [
        ("no client certificate", etcd.endpoints(), Some(&no_cert)),
        ("another CA", etcd.endpoints(), Some(&other_ca)),
        ("plain HTTP", plain, None),
    ] {
        let answer = match Coordinator::connect(&endpoints, DEFAULT_PREFIX, tls).await {
            Ok(c) => c.info().await.map(drop),
            Err(e) => Err(e),
        };
        assert!(
            matches!(answer, Err(ClusterError::Etcd { .. })),
            "{what}: {answer:?}"
        );
    }
}
