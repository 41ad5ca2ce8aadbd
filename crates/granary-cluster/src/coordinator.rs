//! The cluster's records in etcd: init, join tokens, members, leases and
//! placement. Each call is one request or one transaction, so two nodes
//! racing see one winner and a clear error for the other.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    Alive, Arch, ClusterError, ClusterInfo, JoinTicket, NodeLease, NodeRecord, Placement,
    PlacementRecord, Refusal, now_unix,
};

type Result<T> = std::result::Result<T, ClusterError>;

/// A member and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub record: NodeRecord,
    /// `None`: the node holds no lease (down, or never started).
    pub alive: Option<Alive>,
    /// Seconds since etcd last saw the node renew its lease.
    pub lease_age_secs: Option<i64>,
    /// Grains placed on it.
    pub grains: usize,
}

impl NodeStatus {
    /// "up", "drained" (up, taking no new grains), "stopped" (cleanly,
    /// within the grace its grains are not failed over in; `resting` is
    /// [`Coordinator::resting`]) or "down".
    pub fn state(&self, resting: &[String]) -> &'static str {
        match (&self.alive, self.record.drained) {
            (None, _) if resting.contains(&self.record.name) => "stopped",
            (None, _) => "down",
            (Some(_), true) => "drained",
            (Some(_), false) => "up",
        }
    }
}

/// Where a grain another node owns is reached ([`Coordinator::route`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node: String,
    /// Its node link; `None` while the node is down.
    pub link: Option<String>,
    /// Its node key (hex), pinned on the link.
    pub key: String,
}

/// Where a grain runs, as one node sees it ([`Coordinator::locate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Nobody placed it yet.
    Unplaced,
    /// Placed on the node that asked.
    Here,
    /// Placed on another node, reached so.
    There(Route),
}

/// A connection to the etcd cluster that holds one Granary cluster.
#[derive(Clone)]
pub struct Coordinator {
    client: Client,
    prefix: String,
}

/// How a node speaks TLS to etcd (`https://` endpoints): the CA that
/// signed etcd's server certificates, and the client certificate etcd
/// asks for (`--client-cert-auth`), all PEM. TLS 1.2 or 1.3 (rustls).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    /// The client certificate (chain) and its private key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Connects to any of `endpoints` (`http://host:port`, or
    /// `https://host:port` with `tls`); records live under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&EtcdTls>,
    ) -> Result<Coordinator> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            // The connect timeout covers TCP only: a peer that accepts
            // and never finishes the handshake must not hang us.
            let mut config = etcd_client::TlsOptions::new()
                .timeout(Duration::from_secs(3))
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.client {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(ClusterError::etcd("connecting"))?;
        Ok(Coordinator {
            client,
            prefix: prefix.to_owned(),
        })
    }

    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    pub(crate) fn c(&self) -> crate::etcd::Etcd {
        crate::etcd::Etcd(self.client.clone())
    }

    /// Makes this etcd hold a new cluster. Runs once: a second init is
    /// refused and changes nothing.
    pub async fn init(&self) -> Result<ClusterInfo> {
        let info = ClusterInfo {
            id: hex(&random::<16>()),
            created_unix: now_unix(),
        };
        let key = self.key("cluster");
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), to_json(&info), None)]);
        let resp = self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("init"))?;
        if resp.succeeded() {
            return Ok(info);
        }
        Err(ClusterError::AlreadyInitialised(self.info().await?.id))
    }

    /// The cluster this etcd holds.
    pub async fn info(&self) -> Result<ClusterInfo> {
        let key = self.key("cluster");
        let resp = self
            .c()
            .get(key.as_str(), None)
            .await
            .map_err(ClusterError::etcd("reading the cluster"))?;
        match resp.kvs().first() {
            Some(kv) => from_json(&key, kv.value()),
            None => Err(ClusterError::NotInitialised),
        }
    }

    /// A single-use join token, valid for `ttl`. Only its SHA-256 is
    /// stored, under a lease, so an unused one disappears by itself.
    pub async fn issue_token(&self, ttl: Duration) -> Result<String> {
        self.info().await?;
        let token = format!("gjoin-{}", hex(&random::<32>()));
        let c = self.c();
        let lease = c
            .lease_grant(ttl.as_secs().max(1) as i64)
            .await
            .map_err(ClusterError::etcd("granting the token's lease"))?;
        let ticket = JoinTicket {
            created_unix: now_unix(),
            expires_unix: now_unix() + lease.ttl(),
        };
        c.put(
            self.key(&format!("join/{}", token_hash(&token))),
            to_json(&ticket),
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .map_err(ClusterError::etcd("storing the join token"))?;
        Ok(token)
    }

    /// How many join tokens are issued and neither used nor expired.
    pub async fn pending_tokens(&self) -> Result<usize> {
        Ok(self.list::<JoinTicket>("join/").await?.len())
    }

    /// Uses `token` to make `record` a member, in one transaction: the
    /// token is deleted and the node created, or nothing happens. Returns
    /// the record as stored, with the time of joining.
    pub async fn join(&self, token: &str, record: &NodeRecord) -> Result<NodeRecord> {
        let record = &NodeRecord {
            joined_unix: now_unix(),
            ..record.clone()
        };
        if !crate::valid_node_name(&record.name) {
            return Err(ClusterError::BadName(record.name.clone()));
        }
        self.info().await?;
        let ticket = self.key(&format!("join/{}", token_hash(token.trim())));
        let node = self.key(&format!("nodes/{}", record.name));
        let txn = Txn::new()
            .when([
                Compare::version(ticket.as_str(), CompareOp::Greater, 0),
                Compare::version(node.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::delete(ticket.as_str(), None),
                TxnOp::put(node.as_str(), to_json(record), None),
            ])
            .or_else([TxnOp::get(ticket.as_str(), None)]);
        let resp = self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("joining"))?;
        if resp.succeeded() {
            return Ok(record.clone());
        }
        let token_there = resp.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Get(g) => !g.kvs().is_empty(),
            _ => false,
        });
        match token_there {
            true => Err(ClusterError::NameTaken(record.name.clone())),
            // A retried join whose first try went through finds its own
            // record, and the token used.
            false if self.node(&record.name).await?.as_ref() == Some(record) => Ok(record.clone()),
            false => Err(ClusterError::BadToken),
        }
    }

    /// One member's record.
    pub async fn node(&self, name: &str) -> Result<Option<NodeRecord>> {
        self.record(&format!("nodes/{name}"), "reading a node")
            .await
    }

    /// The record at `rest` (under the prefix), if there is one.
    async fn record<T: DeserializeOwned>(
        &self,
        rest: &str,
        doing: &'static str,
    ) -> Result<Option<T>> {
        let key = self.key(rest);
        let resp = self
            .c()
            .get(key.as_str(), None)
            .await
            .map_err(ClusterError::etcd(doing))?;
        resp.kvs()
            .first()
            .map(|kv| from_json(&key, kv.value()))
            .transpose()
    }

    /// Every member, with its lease and its grains, by name.
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let records: Vec<NodeRecord> = self
            .list("nodes/")
            .await?
            .into_iter()
            .map(|(_, r, _)| r)
            .collect();
        let alive: Vec<(String, Alive, i64)> = self.list("alive/").await?;
        let placements = self.placements().await?;
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let alive = alive
                .iter()
                .find(|(k, _, _)| *k == record.name)
                .map(|(_, a, _)| a.clone());
            let lease_age_secs = match &alive {
                Some(a) => self.lease_age(a.lease).await?,
                None => None,
            };
            let grains = placements.iter().filter(|p| p.node == record.name).count();
            out.push(NodeStatus {
                record,
                alive,
                lease_age_secs,
                grains,
            });
        }
        Ok(out)
    }

    async fn lease_age(&self, lease: i64) -> Result<Option<i64>> {
        match self.c().lease_time_to_live(lease).await {
            Ok(r) if r.ttl() > 0 => Ok(Some(r.granted_ttl() - r.ttl())),
            Ok(_) => Ok(None),
            Err(e) => Err(ClusterError::etcd("reading a lease")(e)),
        }
    }

    /// Removes a member that is not running. Its grains' placements are
    /// dropped only with `force` (their data stays on its disks); returns
    /// the grains whose placement was dropped.
    pub async fn remove_node(&self, name: &str, force: bool) -> Result<Vec<String>> {
        let node = self.key(&format!("nodes/{name}"));
        let alive = self.key(&format!("alive/{name}"));
        if self.node(name).await?.is_none() {
            return Err(ClusterError::NoSuchNode(name.to_owned()));
        }
        let prefix = self.key("placement/");
        let read = self
            .c()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(ClusterError::etcd("listing placements"))?;
        let read_revision = revision(read.header())?;
        let owned: Vec<Placement> = read
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                placement(&key[prefix.len()..], &key, kv.value(), kv.mod_revision())
            })
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.node == name)
            .collect();
        if !owned.is_empty() && !force {
            return Err(ClusterError::NodeHasGrains {
                node: name.to_owned(),
                count: owned.len(),
            });
        }
        // No placement written since the read: none could have been made
        // on this node (or moved away) in between.
        let when = vec![
            Compare::version(node.as_str(), CompareOp::Greater, 0),
            Compare::version(alive.as_str(), CompareOp::Equal, 0),
            Compare::mod_revision(prefix.as_str(), CompareOp::Less, read_revision + 1)
                .with_prefix(),
        ];
        let mut then = vec![TxnOp::delete(node.as_str(), None)];
        for p in &owned {
            let k = self.key(&format!("placement/{}", p.grain));
            then.push(TxnOp::delete(k.as_str(), None));
        }
        let resp = self
            .c()
            .txn(Txn::new().when(when).and_then(then))
            .await
            .map_err(ClusterError::etcd("removing a node"))?;
        if resp.succeeded() {
            return Ok(owned.into_iter().map(|p| p.grain).collect());
        }
        // Something moved under us: say what.
        if self
            .list::<Alive>("alive/")
            .await?
            .iter()
            .any(|(k, _, _)| k == name)
        {
            return Err(ClusterError::NodeAlive(name.to_owned()));
        }
        Err(ClusterError::Changed(format!(
            "placements changed while node {name} was being removed; run the command again"
        )))
    }

    /// Marks a node drained (it takes no new grains) or not. The flag
    /// lives in its record, so it survives the node's restart.
    pub async fn set_drained(&self, name: &str, drained: bool) -> Result<()> {
        let key = self.key(&format!("nodes/{name}"));
        loop {
            let (mut record, at) = self.record_at(name).await?;
            record.drained = drained;
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, at)])
                .and_then([TxnOp::put(key.as_str(), to_json(&record), None)]);
            if self
                .c()
                .txn(txn)
                .await
                .map_err(ClusterError::etcd("draining"))?
                .succeeded()
            {
                return Ok(());
            }
        }
    }

    /// Takes the lease of member `node` (its daemon starting, its node link
    /// at `link`): the lease is granted, `alive/<node>` written under it,
    /// and renewals begin. A
    /// lease left by this node's previous run (it crashed) is revoked
    /// first; the caller holds the node's data-dir lock, so that run is
    /// gone.
    pub async fn hold_lease(
        &self,
        node: &str,
        ttl: Duration,
        free_bytes: u64,
        link: &str,
    ) -> Result<NodeLease> {
        self.await_previous_lease(node).await?;
        let (id, granted, sent) = self.grant_alive(node, ttl, free_bytes, link).await?;
        Ok(NodeLease::start(
            self.client.clone(),
            node.to_owned(),
            id,
            granted,
            sent,
        ))
    }

    /// Takes a new lease in place of `lease` once etcd has said it is
    /// gone (the node was cut off longer than its TTL): the node is a
    /// live member again. Other nodes may have taken its grains
    /// meanwhile; its start gate sees that in their placements.
    pub async fn retake_lease(
        &self,
        lease: &NodeLease,
        ttl: Duration,
        free_bytes: u64,
        link: &str,
    ) -> Result<()> {
        if lease.is_released() {
            return Err(ClusterError::Changed(
                "this node's lease was released: it is stopping".to_owned(),
            ));
        }
        let (id, granted, sent) = self
            .grant_alive(lease.node(), ttl, free_bytes, link)
            .await?;
        // Released while the grant was under way: give it back.
        if !lease.replace(id, granted, sent) {
            let _ = self.c().lease_revoke(id).await;
            return Err(ClusterError::Changed(
                "this node's lease was released: it is stopping".to_owned(),
            ));
        }
        Ok(())
    }

    /// Grants a lease and writes `alive/<node>` under it, only while the
    /// node is a member and no other lease holds its `alive` record; clears
    /// the node's rest mark in the same transaction. The lease id, its
    /// granted TTL and when the grant was asked.
    async fn grant_alive(
        &self,
        node: &str,
        ttl: Duration,
        free_bytes: u64,
        link: &str,
    ) -> Result<(i64, Duration, Instant)> {
        let record = self.key(&format!("nodes/{node}"));
        let alive_key = self.key(&format!("alive/{node}"));
        let rest_key = self.key(&format!("rest/{node}"));
        let c = self.c();
        let sent = Instant::now();
        let grant = c
            .lease_grant(ttl.as_secs().max(1) as i64)
            .await
            .map_err(ClusterError::etcd("granting the node lease"))?;
        let alive = Alive {
            lease: grant.id(),
            started_unix: now_unix(),
            free_bytes,
            link: link.to_owned(),
        };
        let txn = Txn::new()
            .when([
                Compare::version(record.as_str(), CompareOp::Greater, 0),
                Compare::version(alive_key.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    alive_key.as_str(),
                    to_json(&alive),
                    Some(PutOptions::new().with_lease(grant.id())),
                ),
                TxnOp::delete(rest_key.as_str(), None),
            ]);
        let resp = c
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("writing alive"))?;
        if !resp.succeeded() {
            let _ = c.lease_revoke(grant.id()).await;
            return match self.node(node).await? {
                None => Err(ClusterError::NoSuchNode(node.to_owned())),
                Some(_) => Err(ClusterError::LeaseHeld(node.to_owned())),
            };
        }
        Ok((grant.id(), Duration::from_secs(grant.ttl() as u64), sent))
    }

    /// Marks `node` as stopped on purpose (`rest/<node>`, for
    /// [`crate::REST_GRACE`]) before its daemon releases its lease on a clean
    /// stop: its grains are not failed over while the mark lasts, so a
    /// restart or an upgrade does not move them. A node that stays away
    /// longer is failed over as a dead one would be.
    pub async fn rest(&self, node: &str) -> Result<()> {
        let c = self.c();
        let grant = c
            .lease_grant(crate::REST_GRACE.as_secs() as i64)
            .await
            .map_err(ClusterError::etcd("granting the rest mark's lease"))?;
        c.put(
            self.key(&format!("rest/{node}")),
            to_json(&now_unix()),
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .map_err(ClusterError::etcd("marking this node at rest"))?;
        Ok(())
    }

    /// The nodes stopped on purpose within [`crate::REST_GRACE`].
    pub async fn resting(&self) -> Result<Vec<String>> {
        Ok(self
            .list::<i64>("rest/")
            .await?
            .into_iter()
            .map(|(node, _, _)| node)
            .collect())
    }

    /// Updates the free space `lease`'s node reports, if the lease still
    /// holds its `alive` record.
    pub async fn report(&self, lease: &NodeLease, free_bytes: u64) -> Result<()> {
        let key = self.key(&format!("alive/{}", lease.node()));
        let resp = self
            .c()
            .get(key.as_str(), None)
            .await
            .map_err(ClusterError::etcd("reading alive"))?;
        let Some(kv) = resp.kvs().first() else {
            return Err(ClusterError::LeaseLost(lease.node().to_owned()));
        };
        let mut alive: Alive = from_json(&key, kv.value())?;
        alive.free_bytes = free_bytes;
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease.id())])
            .and_then([TxnOp::put(
                key.as_str(),
                to_json(&alive),
                Some(PutOptions::new().with_lease(lease.id())),
            )]);
        match self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("reporting"))?
            .succeeded()
        {
            true => Ok(()),
            false => Err(ClusterError::LeaseLost(lease.node().to_owned())),
        }
    }

    /// Waits until no lease holds `alive/<node>`. A lease left by this
    /// node's previous run (it crashed) expires within its TTL, since
    /// nobody renews it; one still renewed after that belongs to another
    /// running process with this node's name (a copied data dir), and is
    /// never taken from it.
    async fn await_previous_lease(&self, node: &str) -> Result<()> {
        let started = Instant::now();
        let mut said = false;
        loop {
            let Some(old) = self
                .record::<Alive>(&format!("alive/{node}"), "reading the previous lease")
                .await?
            else {
                return Ok(());
            };
            let left = self
                .c()
                .lease_time_to_live(old.lease)
                .await
                .map_err(ClusterError::etcd("reading the previous lease"))?;
            let granted = Duration::from_secs(left.granted_ttl().max(1) as u64);
            if started.elapsed() > granted + Duration::from_secs(2) {
                return Err(ClusterError::LeaseHeld(node.to_owned()));
            }
            if !said {
                said = true;
                tracing::info!(
                    node,
                    lease = old.lease,
                    left_secs = left.ttl(),
                    "waiting for the lease of this node's previous run to expire"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node keys (hex) and names of members that hold a live lease:
    /// whom a node link accepts. Two reads, whatever the number of grains.
    pub async fn live_member_keys(&self) -> Result<Vec<(String, String)>> {
        let records: Vec<NodeRecord> = self
            .list("nodes/")
            .await?
            .into_iter()
            .map(|(_, r, _)| r)
            .collect();
        let alive: Vec<String> = self
            .list::<Alive>("alive/")
            .await?
            .into_iter()
            .map(|(name, _, _)| name)
            .collect();
        Ok(records
            .into_iter()
            .filter(|r| alive.contains(&r.name))
            .map(|r| (r.key, r.name))
            .collect())
    }

    /// Resolves at the first change to any node's `alive` record (a node
    /// starting, stopping or dying) after the call, or with an error when
    /// the watch cannot be made or breaks.
    pub async fn alive_changed(&self) -> Result<()> {
        let prefix = self.key("alive/");
        let mut client = self.client.clone();
        let mut stream = client
            .watch(
                prefix.as_str(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .map_err(ClusterError::etcd("watching alive records"))?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) if !resp.events().is_empty() => return Ok(()),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(ClusterError::Changed("the etcd watch ended".to_owned()));
                }
                Err(e) => return Err(ClusterError::etcd("watching alive records")(e)),
            }
        }
    }

    /// Where connections to `grain` go when a node other than `me` owns it:
    /// the owner's name, its node link address (from its `alive` record;
    /// `None` when it is down) and its node key. `None` when the grain is
    /// placed on `me` or nowhere (which [`Coordinator::locate`] tells
    /// apart).
    pub async fn route(&self, grain: &str, me: &str) -> Result<Option<Route>> {
        Ok(match self.locate(grain, me).await? {
            Located::There(route) => Some(route),
            Located::Unplaced | Located::Here => None,
        })
    }

    /// Where `grain` runs as node `me` sees it. Two reads: the placement,
    /// then (placed elsewhere) the owner's records in one transaction.
    pub async fn locate(&self, grain: &str, me: &str) -> Result<Located> {
        let Some(placed) = self.placement(grain).await? else {
            return Ok(Located::Unplaced);
        };
        if placed.node == me {
            return Ok(Located::Here);
        }
        let record_key = self.key(&format!("nodes/{}", placed.node));
        let alive_key = self.key(&format!("alive/{}", placed.node));
        let (record, alive) = self
            .read_two(&record_key, &alive_key, "reading the owner node")
            .await?;
        let Some(kv) = record.kvs().first() else {
            return Err(ClusterError::NoSuchNode(placed.node));
        };
        let record: NodeRecord = from_json(&record_key, kv.value())?;
        let link = match alive.kvs().first() {
            Some(kv) => {
                let a: Alive = from_json(&alive_key, kv.value())?;
                Some(if a.link.is_empty() {
                    record.address.clone()
                } else {
                    a.link
                })
            }
            None => None,
        };
        Ok(Located::There(Route {
            node: placed.node,
            link,
            key: record.key,
        }))
    }

    /// Where a grain is placed.
    pub async fn placement(&self, grain: &str) -> Result<Option<Placement>> {
        let key = self.key(&format!("placement/{grain}"));
        let resp = self
            .c()
            .get(key.as_str(), None)
            .await
            .map_err(ClusterError::etcd("reading a placement"))?;
        resp.kvs()
            .first()
            .map(|kv| placement(grain, &key, kv.value(), kv.mod_revision()))
            .transpose()
    }

    /// Every placement, by grain.
    pub async fn placements(&self) -> Result<Vec<Placement>> {
        Ok(self
            .list::<PlacementRecord>("placement/")
            .await?
            .into_iter()
            .map(|(grain, r, epoch)| Placement {
                grain,
                node: r.node,
                epoch,
                placed_unix: r.placed_unix,
            })
            .collect())
    }

    /// Places a new grain of an app built for `arches` on the node with
    /// the most room ([`crate::choose_node`]).
    pub async fn place(&self, grain: &str, arches: &[Arch]) -> Result<Placement> {
        if let Some(p) = self.placement(grain).await? {
            return Err(ClusterError::AlreadyPlaced {
                grain: grain.to_owned(),
                node: p.node,
                epoch: p.epoch,
            });
        }
        let node = self.choose(grain, arches).await?;
        self.place_on(grain, &node).await
    }

    /// The node a new grain of an app built for `arches` should go to
    /// ([`crate::choose_node`] over the live node list), without placing
    /// it; [`ClusterError::NoRoom`] with each node's reason when none fits.
    pub async fn choose(&self, grain: &str, arches: &[Arch]) -> Result<String> {
        let nodes = self.nodes().await?;
        crate::choose_node(arches, &nodes)
            .map(str::to_owned)
            .map_err(|why| ClusterError::NoRoom {
                grain: grain.to_owned(),
                why,
            })
    }

    /// Node `name`'s record and the revision it was last written at (what a
    /// transaction that depends on it compares).
    async fn record_at(&self, name: &str) -> Result<(NodeRecord, i64)> {
        let key = self.key(&format!("nodes/{name}"));
        let resp = self
            .c()
            .get(key.as_str(), None)
            .await
            .map_err(ClusterError::etcd("reading a node"))?;
        let Some(kv) = resp.kvs().first() else {
            return Err(ClusterError::NoSuchNode(name.to_owned()));
        };
        Ok((from_json(&key, kv.value())?, kv.mod_revision()))
    }

    /// Places a new grain on `node`, which must hold its lease and not be
    /// drained (both checked in the placing transaction). Fails if the
    /// grain is placed already.
    pub async fn place_on(&self, grain: &str, node: &str) -> Result<Placement> {
        let key = self.key(&format!("placement/{grain}"));
        let alive = self.key(&format!("alive/{node}"));
        let member = self.key(&format!("nodes/{node}"));
        let (node_record, at) = self.record_at(node).await?;
        if node_record.drained {
            return Err(ClusterError::NoRoom {
                grain: grain.to_owned(),
                why: format!(
                    "{node}: drained (granary node undrain {node} lets it take new grains)"
                ),
            });
        }
        let record = PlacementRecord {
            node: node.to_owned(),
            placed_unix: now_unix(),
        };
        let txn = Txn::new()
            .when([
                Compare::version(key.as_str(), CompareOp::Equal, 0),
                Compare::version(alive.as_str(), CompareOp::Greater, 0),
                Compare::mod_revision(member.as_str(), CompareOp::Equal, at),
            ])
            .and_then([TxnOp::put(key.as_str(), to_json(&record), None)]);
        let resp = self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("placing a grain"))?;
        if resp.succeeded() {
            return Ok(Placement {
                grain: grain.to_owned(),
                node: node.to_owned(),
                epoch: revision(resp.header())?,
                placed_unix: record.placed_unix,
            });
        }
        match self.placement(grain).await? {
            // A retried placement whose first try went through.
            Some(p) if p.node == node && p.placed_unix == record.placed_unix => Ok(p),
            Some(p) => Err(ClusterError::AlreadyPlaced {
                grain: grain.to_owned(),
                node: p.node,
                epoch: p.epoch,
            }),
            None => Err(ClusterError::NoRoom {
                grain: grain.to_owned(),
                why: format!("{node}: down, or its record changed (drained?)"),
            }),
        }
    }

    /// Moves a grain's placement from what `from` says to `to`, only if
    /// nobody placed it since `from` was read (compare-and-swap on its
    /// epoch), and, to another node, only while that node is not drained
    /// (its record compared too). The new placement has a new, larger
    /// epoch; to the same node, that only fences off older writes.
    pub async fn switch(&self, from: &Placement, to: &str) -> Result<Placement> {
        let key = self.key(&format!("placement/{}", from.grain));
        let alive = self.key(&format!("alive/{to}"));
        let record = PlacementRecord {
            node: to.to_owned(),
            placed_unix: now_unix(),
        };
        let mut when = vec![
            Compare::mod_revision(key.as_str(), CompareOp::Equal, from.epoch),
            Compare::version(alive.as_str(), CompareOp::Greater, 0),
        ];
        if from.node != to {
            let (node, at) = self.record_at(to).await?;
            if node.drained {
                return Err(ClusterError::NoRoom {
                    grain: from.grain.clone(),
                    why: format!("{to}: drained"),
                });
            }
            let member = self.key(&format!("nodes/{to}"));
            when.push(Compare::mod_revision(member.as_str(), CompareOp::Equal, at));
        }
        let txn =
            Txn::new()
                .when(when)
                .and_then([TxnOp::put(key.as_str(), to_json(&record), None)]);
        let resp = self
            .c()
            .txn(txn)
            .await
            .map_err(ClusterError::etcd("switching a placement"))?;
        if resp.succeeded() {
            return Ok(Placement {
                grain: from.grain.clone(),
                node: to.to_owned(),
                epoch: revision(resp.header())?,
                placed_unix: record.placed_unix,
            });
        }
        match self.placement(&from.grain).await? {
            Some(p) if p.epoch == from.epoch => Err(ClusterError::NoRoom {
                grain: from.grain.clone(),
                why: format!("{to}: down, or drained meanwhile"),
            }),
            _ => Err(ClusterError::Conflict {
                grain: from.grain.clone(),
                expected: from.epoch,
            }),
        }
    }

    /// Whether this node may start `grain` now ([`crate::may_start`]),
    /// from one consistent read of its placement and of this node's
    /// `alive` record: the lease must be live as the node sees it and
    /// still be the one etcd has for it. `Ok(Ok(epoch))`: start, after
    /// writing `epoch` into the dataset.
    pub async fn start_permit(
        &self,
        grain: &str,
        lease: &NodeLease,
        dataset_epoch: Option<i64>,
    ) -> Result<std::result::Result<i64, Refusal>> {
        let key = self.key(&format!("placement/{grain}"));
        let alive = self.key(&format!("alive/{}", lease.node()));
        let (p, a) = self.read_two(&key, &alive, "checking a start").await?;
        let placed = p
            .kvs()
            .first()
            .map(|kv| placement(grain, &key, kv.value(), kv.mod_revision()))
            .transpose()?;
        let ours = match a.kvs().first() {
            Some(kv) => from_json::<Alive>(&alive, kv.value())?.lease == lease.id(),
            None => false,
        };
        Ok(crate::may_start(
            lease.node(),
            placed.as_ref(),
            ours && lease.is_live(),
            dataset_epoch,
        ))
    }

    /// Two keys read at one revision (one transaction).
    async fn read_two(
        &self,
        first: &str,
        second: &str,
        doing: &'static str,
    ) -> Result<(etcd_client::GetResponse, etcd_client::GetResponse)> {
        let txn = Txn::new().and_then([TxnOp::get(first, None), TxnOp::get(second, None)]);
        let resp = self.c().txn(txn).await.map_err(ClusterError::etcd(doing))?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        match (gets.next(), gets.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(ClusterError::Changed(
                "etcd answered a two-read transaction with fewer reads".to_owned(),
            )),
        }
    }

    /// Every record under `dir`, as (the rest of its key, its value, its
    /// mod revision).
    pub(crate) async fn list<T: DeserializeOwned>(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, T, i64)>> {
        let prefix = self.key(dir);
        let resp = self
            .c()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(ClusterError::etcd("listing"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let rest = key[prefix.len()..].to_owned();
                Ok((rest, from_json(&key, kv.value())?, kv.mod_revision()))
            })
            .collect()
    }
}

fn placement(grain: &str, key: &str, value: &[u8], epoch: i64) -> Result<Placement> {
    let r: PlacementRecord = from_json(key, value)?;
    Ok(Placement {
        grain: grain.to_owned(),
        node: r.node,
        epoch,
        placed_unix: r.placed_unix,
    })
}

/// The store's revision an answer was made at: for a transaction with
/// one put, that put's revision.
fn revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64> {
    match header.map(|h| h.revision()) {
        Some(r) if r > 0 => Ok(r),
        _ => Err(ClusterError::Changed(
            "etcd answered without a revision".to_owned(),
        )),
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn from_json<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Damaged {
        key: key.to_owned(),
        why: e.to_string(),
    })
}

/// What is stored of a join token: its SHA-256, hex.
fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the kernel's random source");
    b
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}
