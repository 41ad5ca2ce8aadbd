//! The spool against a recording stand-in for `Grains` (the end-to-end
//! tests drive the real daemon and real mail grains).

use std::sync::Mutex as StdMutex;

use granary_grains::mail::{MailDelivery, MailStatus};
use granary_grains::{
    Connection, GrainError, GrainId, GrainStatus, Grains, GrainsFuture, Identity, Peer, Problem,
    Snapshot, SnapshotTaken, Start,
};

use super::*;

/// Records deliveries; refuses the users in `busy` for now.
#[derive(Default)]
struct Recorder {
    delivered: StdMutex<Vec<(String, String, Vec<u8>)>>,
    busy: StdMutex<Vec<String>>,
}

fn refuse<T: Send + 'static>(grain: &GrainId) -> GrainsFuture<T> {
    let e = GrainError::new(grain, Problem::Host("not part of this test".into()));
    Box::pin(async move { Err(e) })
}

impl Grains for Recorder {
    fn connect(&self, g: &GrainId, _: &str, _: Identity, _: Peer) -> GrainsFuture<Connection> {
        refuse(g)
    }
    fn start(&self, g: &GrainId, _: Start) -> GrainsFuture<()> {
        refuse(g)
    }
    fn stop(&self, g: &GrainId) -> GrainsFuture<bool> {
        refuse(g)
    }
    fn status(&self, g: &GrainId) -> GrainsFuture<GrainStatus> {
        refuse(g)
    }
    fn list(&self) -> GrainsFuture<Vec<GrainStatus>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn logs(&self, g: &GrainId, _: u64) -> GrainsFuture<Vec<u8>> {
        refuse(g)
    }
    fn snapshot(&self, g: &GrainId, _: &str) -> GrainsFuture<SnapshotTaken> {
        refuse(g)
    }
    fn snapshots(&self, g: &GrainId) -> GrainsFuture<Vec<Snapshot>> {
        refuse(g)
    }
    fn prune(&self, g: &GrainId) -> GrainsFuture<Vec<String>> {
        refuse(g)
    }
    fn rollback(&self, g: &GrainId, _: &str) -> GrainsFuture<bool> {
        refuse(g)
    }
    fn hold(&self, g: &GrainId, _: &str) -> GrainsFuture<()> {
        refuse(g)
    }
    fn release(&self, g: &GrainId) -> GrainsFuture<()> {
        refuse(g)
    }
    fn forget(&self, g: &GrainId) -> GrainsFuture<()> {
        refuse(g)
    }
    fn grant_revoked(&self, _: i64) -> GrainsFuture<()> {
        Box::pin(async { Ok(()) })
    }
    fn deliver_mail(&self, g: &GrainId, mut mail: MailDelivery) -> GrainsFuture<()> {
        use std::io::Read;
        let user = g.to_string().trim_end_matches("-mail").to_owned();
        if user == "gone" {
            let e = GrainError::new(g, Problem::NoSuchGrain);
            return Box::pin(async move { Err(e) });
        }
        if self.busy.lock().unwrap().contains(&user) {
            let e = GrainError::new(g, Problem::Busy("storage full".into()));
            return Box::pin(async move { Err(e) });
        }
        let mut bytes = Vec::new();
        mail.message.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, mail.size);
        self.delivered.lock().unwrap().push((user, mail.id, bytes));
        Box::pin(async { Ok(()) })
    }
    fn mail_status(&self, g: &GrainId) -> GrainsFuture<MailStatus> {
        refuse(g)
    }
}

fn settings() -> SpoolSettings {
    SpoolSettings {
        lifetime: Duration::from_secs(3600),
        retry_first: Duration::from_secs(1),
        retry_max: Duration::from_secs(1),
        hostname: "mx.example.org".into(),
        delay_warning: None,
    }
}

fn envelope(from: &str, users: &[&str]) -> Envelope {
    Envelope {
        id: Spool::new_id(),
        from: from.into(),
        recipients: users
            .iter()
            .map(|u| Recipient {
                address: format!("{u}@example.org"),
                user: (*u).into(),
            })
            .collect(),
        received_at: unix_now(),
        client: "192.0.2.1".into(),
        helo: "client.example".into(),
        sender_verified: true,
    }
}

fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_committed_message_survives_a_restart_and_reaches_every_grain_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    let mut inc = spool.incoming();
    inc.write(b"Subject: hi\r\n\r\nbody\r\n").await.unwrap();
    let message = inc.finish().await.unwrap();
    let env = envelope("a@remote.example", &["alice", "bob"]);
    let id = env.id.clone();
    spool
        .commit(env, b"Received: x\r\n".to_vec(), message)
        .await
        .unwrap();
    // A commit cut short leaves a hidden file that is never delivered.
    std::fs::write(dir.path().join("spool/queue/.deadbeef.tmp"), b"half").unwrap();
    drop(spool);

    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    assert!(!dir.path().join("spool/queue/.deadbeef.tmp").exists());
    assert_eq!(spool.list().len(), 1);
    let grains = Arc::new(Recorder::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let d = Deliverer::new(
        spool.clone(),
        grains.clone(),
        Arc::new(|_| Box::pin(async { None })),
    );
    let run = tokio::spawn(d.run(async {
        let _ = stopped.await;
    }));
    until("both delivered", || spool.list().is_empty()).await;
    let got = grains.delivered.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    for (_, gid, bytes) in &got {
        assert_eq!(gid, &id);
        assert_eq!(bytes, b"Received: x\r\nSubject: hi\r\n\r\nbody\r\n");
    }
    assert!(!dir.path().join(format!("spool/queue/{id}.msg")).exists());
    let _ = stop.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn a_busy_grain_is_retried_and_the_others_are_not_given_it_twice() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    let grains = Arc::new(Recorder::default());
    grains.busy.lock().unwrap().push("bob".into());
    spool
        .commit(
            envelope("a@remote.example", &["alice", "bob"]),
            Vec::new(),
            b"m\r\n".to_vec(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let d = Deliverer::new(
        spool.clone(),
        grains.clone(),
        Arc::new(|_| Box::pin(async { None })),
    );
    let run = tokio::spawn(d.run(async {
        let _ = stopped.await;
    }));
    until("a failed attempt", || {
        spool.list().first().is_some_and(|m| m.attempts >= 1)
    })
    .await;
    let listed = &spool.list()[0];
    assert_eq!(listed.recipients[0].state, "delivered");
    assert_eq!(listed.recipients[1].state, "waiting");
    assert!(
        listed
            .last_error
            .as_deref()
            .unwrap()
            .contains("storage full")
    );
    grains.busy.lock().unwrap().clear();
    until("bob delivered", || spool.list().is_empty()).await;
    let users: Vec<String> = grains
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.0.clone())
        .collect();
    assert_eq!(users, ["alice", "bob"]);
    let _ = stop.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn a_recipient_that_is_gone_bounces_to_a_local_sender_and_to_a_remote_one_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    let grains = Arc::new(Recorder::default());
    spool
        .commit(
            envelope("alice@example.org", &["gone"]),
            Vec::new(),
            b"Subject: s\r\n\r\nb\r\n".to_vec(),
        )
        .await
        .unwrap();
    spool
        .commit(
            envelope("x@remote.example", &["gone"]),
            Vec::new(),
            b"Subject: t\r\n\r\nb\r\n".to_vec(),
        )
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let local: LocalUser = Arc::new(|a: String| {
        Box::pin(async move { (a == "alice@example.org").then(|| "alice".to_owned()) })
    });
    let d = Deliverer::new(spool.clone(), grains.clone(), local);
    let run = tokio::spawn(d.run(async {
        let _ = stopped.await;
    }));
    until("the bounce reaches alice", || {
        !grains.delivered.lock().unwrap().is_empty()
    })
    .await;
    until("the spool is empty", || spool.list().is_empty()).await;
    let (user, _, bounce) = grains.delivered.lock().unwrap()[0].clone();
    assert_eq!(user, "alice");
    let bounce = String::from_utf8(bounce).unwrap();
    assert!(bounce.contains("Status: 5.1.1"), "{bounce}");
    assert!(bounce.contains("Subject: s"), "{bounce}");
    let remote: Vec<_> = std::fs::read_dir(dir.path().join("spool/bounces"))
        .unwrap()
        .collect();
    assert_eq!(remote.len(), 1);
    let _ = stop.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn a_big_message_spills_to_disk_and_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    let mut inc = spool.incoming();
    let chunk = vec![b'x'; 300_000];
    for _ in 0..10 {
        inc.write(&chunk).await.unwrap();
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/incoming"))
            .unwrap()
            .count(),
        1
    );
    let all = inc.finish().await.unwrap();
    assert_eq!(all.len(), 3_000_000);
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool/incoming"))
            .unwrap()
            .count(),
        0
    );
}

/// Keeps copies in memory, or refuses them.
#[derive(Default)]
struct MemoryMirror {
    copies: StdMutex<Vec<(&'static str, String, Vec<u8>)>>,
    refuse: std::sync::atomic::AtomicBool,
}

impl Mirror for MemoryMirror {
    fn copy(&self, spool: &'static str, id: String, bytes: Vec<u8>) -> MirrorFuture<'_> {
        Box::pin(async move {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("no node is up".to_owned());
            }
            self.copies.lock().unwrap().push((spool, id, bytes));
            Ok(())
        })
    }
}

#[tokio::test]
async fn on_a_cluster_a_message_is_copied_before_its_commit_and_kept_until_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    let mirror = Arc::new(MemoryMirror::default());
    spool.mirror_to("spool", mirror.clone());
    spool.keep_delivered(true);
    let removed = Arc::new(StdMutex::new(Vec::<String>::new()));
    let r = removed.clone();
    spool.on_remove(move |id| r.lock().unwrap().push(id.to_owned()));

    // No node takes the copy: no commit, no file, nothing to deliver.
    mirror
        .refuse
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let env = envelope("a@remote.example", &["alice"]);
    let refused = env.id.clone();
    let e = spool
        .commit(env, Vec::new(), b"m\r\n".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(e, SpoolError::NotMirrored(_)), "{e}");
    assert!(spool.list().is_empty());
    assert!(
        !dir.path()
            .join(format!("spool/queue/{refused}.msg"))
            .exists()
    );

    // Taken: the copy is the entry's file, byte for byte.
    mirror
        .refuse
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let env = envelope("a@remote.example", &["alice", "bob"]);
    let id = env.id.clone();
    spool
        .commit(env, b"Received: x\r\n".to_vec(), b"m\r\n".to_vec())
        .await
        .unwrap();
    let file = dir.path().join(format!("spool/queue/{id}.msg"));
    let copies = mirror.copies.lock().unwrap().clone();
    assert_eq!(copies.len(), 1);
    assert_eq!((copies[0].0, copies[0].1.as_str()), ("spool", id.as_str()));
    assert_eq!(copies[0].2, std::fs::read(&file).unwrap());

    // Delivered: kept, settled, out of the list, until forgotten.
    let grains = Arc::new(Recorder::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let d = Deliverer::new(
        spool.clone(),
        grains.clone(),
        Arc::new(|_| Box::pin(async { None })),
    );
    let run = tokio::spawn(d.run(async {
        let _ = stopped.await;
    }));
    until("settled", || !spool.settled().is_empty()).await;
    assert!(spool.list().is_empty());
    assert!(file.exists());
    let settled = spool.settled();
    assert_eq!(settled[0].id, id);
    assert_eq!(settled[0].delivered, ["alice", "bob"]);
    // Settled survives a restart.
    let reopened = Spool::open(&dir.path().join("spool"), uid(), settings()).unwrap();
    assert_eq!(reopened.settled().len(), 1);
    drop(reopened);

    // A failover lost it from bob's grain: bob's is given it again, under
    // the same id; alice's is not.
    spool.redeliver(&id, &["bob".to_owned()], 150).unwrap();
    until("settled again", || !spool.settled().is_empty()).await;
    assert_eq!(spool.settled()[0].redelivered_for, Some(150));
    let got = grains.delivered.lock().unwrap().clone();
    let to: Vec<(&str, &str)> = got
        .iter()
        .map(|(u, i, _)| (u.as_str(), i.as_str()))
        .collect();
    assert_eq!(
        to,
        [
            ("alice", id.as_str()),
            ("bob", id.as_str()),
            ("bob", id.as_str())
        ]
    );

    spool.forget(&id).unwrap();
    assert!(!file.exists());
    assert!(spool.settled().is_empty());
    assert_eq!(*removed.lock().unwrap(), [id.as_str()]);

    // Another node's copy is adopted under its own id and delivered.
    let other = tempfile::tempdir().unwrap();
    let theirs = Spool::open(&other.path().join("spool"), uid(), settings()).unwrap();
    let env = envelope("a@remote.example", &["carol"]);
    let their_id = env.id.clone();
    theirs
        .commit(env, Vec::new(), b"c\r\n".to_vec())
        .await
        .unwrap();
    let copy = dir.path().join("copy.msg");
    std::fs::copy(
        other.path().join(format!("spool/queue/{their_id}.msg")),
        &copy,
    )
    .unwrap();
    assert_eq!(spool.adopt(&copy).await.unwrap(), Some(their_id.clone()));
    assert!(!copy.exists());
    until("carol's delivered", || {
        grains
            .delivered
            .lock()
            .unwrap()
            .iter()
            .any(|(u, i, _)| u == "carol" && *i == their_id)
    })
    .await;
    // Copied on again from here.
    assert_eq!(mirror.copies.lock().unwrap().len(), 2);
    let _ = stop.send(());
    run.await.unwrap();
}
