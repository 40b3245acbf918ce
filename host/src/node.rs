//! A raftwasm node: opens the data directory, starts Raft, the peer server
//! and the HTTP API, bootstraps or joins, and runs until shutdown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::ServerState;
use tokio::net::TcpListener;

use crate::api;
use crate::client::Client;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::proto::JoinRequest;
use crate::raft::batcher::Batcher;
use crate::raft::disk::Disk;
use crate::raft::early::EarlyReplication;
use crate::raft::log_store::LogStore;
use crate::raft::peer::{self, NetworkFactory};
use crate::raft::read_barrier::ReadBarrier;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{NodeId, NodeInfo, Raft};
use crate::runtime::{BUNDLED_GUEST, GuestRuntime, Limits};
use crate::service::Node;
use crate::service::write_queue::WriteQueue;
use crate::tasks::Tasks;
use crate::watch::WatchHub;

/// The two listening sockets of a node, bound before it starts so that tests
/// can bind port 0 and learn the real addresses.
#[derive(Debug)]
pub struct Listeners {
    /// The client HTTP API (`--http`).
    pub http: TcpListener,
    /// The peer port (`--raft`).
    pub raft: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    ///
    /// # Errors
    /// When an address is taken or invalid.
    pub async fn bind(config: &NodeConfig) -> anyhow::Result<Self> {
        let http = TcpListener::bind(&config.http)
            .await
            .with_context(|| format!("cannot listen on --http={}", config.http))?;
        let raft = TcpListener::bind(&config.raft)
            .await
            .with_context(|| format!("cannot listen on --raft={}", config.raft))?;
        Ok(Self { http, raft })
    }
}

/// Runs a node until `shutdown` resolves.
///
/// # Errors
/// When the data directory, storage or listeners cannot be used, or a
/// `--guest` or `--tls-*` file is unusable.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let open = config.check_security(listeners.http.local_addr()?, listeners.raft.local_addr()?)?;
    for (flag, addr) in open {
        tracing::warn!(
            "INSECURE: --{flag}={addr} is reachable from other hosts and no cluster token is set \
             (--insecure): anyone who reaches it can change this cluster's members, guest and state"
        );
    }
    // TLS protects the token and the data in transit and lets peers verify
    // each other; the token still decides who may change the cluster.
    let tls = config.tls()?;
    std::fs::create_dir_all(&config.node)
        .with_context(|| format!("cannot create the data directory {}", config.node.display()))?;
    let disk = Disk::open(&config.node.join("db"))
        .with_context(|| format!("cannot open the database in {}", config.node.display()))?;
    let log_store = LogStore::open(&disk, &config.node.join("log"), config.log_sync)?;
    let id = match log_store.node_id()? {
        Some(id) => id,
        None => {
            let id = config.id.unwrap_or_else(random_id);
            log_store.save_node_id(id).await?;
            id
        }
    };
    let runtime = GuestRuntime::new(Limits::default(), Some(config.node.join("guests")))?;
    let bootstrap_guest = match &config.guest {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read --guest {}", path.display()))?;
            runtime
                .load(&bytes)
                .with_context(|| format!("--guest {} is not a usable guest", path.display()))?;
            bytes
        }
        None => BUNDLED_GUEST.to_vec(),
    };
    let mut state_machine =
        StateMachineStore::open(&disk, &config.node.join("snapshots"), runtime.clone())?;
    let state = state_machine.reader();
    let watch = Arc::new(WatchHub::new(config.watch_limits()));
    state_machine.record_changes(watch.clone());

    let addrs = NodeInfo {
        api_addr: listeners.http.local_addr()?.to_string(),
        raft_addr: listeners.raft.local_addr()?.to_string(),
    };
    let raft_config = openraft::Config {
        cluster_name: "raftwasm".into(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms * 2,
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
        max_in_snapshot_log_to_keep: config.keep_entries,
        ..Default::default()
    }
    .validate()
    .context("invalid Raft timing flags")?;
    let mut network = NetworkFactory::new(id, config.token.clone())
        .with_snapshot_chunk_bytes(config.snapshot_chunk_bytes);
    if let Some(tls) = &tls {
        network = network.with_tls(tls.peer_client.clone());
    }
    let early_network = network.clone();
    let raft = Raft::new(
        id,
        Arc::new(raft_config),
        network,
        log_store.clone(),
        state_machine,
    )
    .await?;

    // Every background task of the node runs on `tasks`; shutdown cancels
    // and awaits them all before the final flush.
    let tasks = Tasks::new();
    tasks.spawn_graceful(peer::serve(
        listeners.raft,
        raft.clone(),
        config.token.clone(),
        tls.as_ref().map(|tls| tls.peer_server.clone()),
        config.peer_limits(),
        tasks.cancelled().cancelled_owned(),
    ));

    let metrics = Arc::new(Metrics::new(
        state.apply_stats(),
        disk.flushes(),
        log_store.file().syncs(),
    ));
    if !config.no_early_replication {
        log_store.replicate_early(EarlyReplication::new(
            id,
            raft.clone(),
            early_network,
            tasks.clone(),
            metrics.early_appends(),
        ));
    }
    let app = Arc::new(Node {
        id,
        addrs: addrs.clone(),
        batcher: Batcher::start(
            raft.clone(),
            log_store.appends_flushed(),
            config.pipeline_depth,
            config.write_timeout(),
            metrics.clone(),
            &tasks,
        ),
        write_queue: WriteQueue::new(config.max_write_queue_bytes),
        reads: ReadBarrier::start(raft.clone(), &tasks),
        raft: raft.clone(),
        config: config.clone(),
        state,
        runtime,
        metrics,
        http: http_client(tls.as_ref())?,
        log: log_store,
        watch: watch.clone(),
    });
    tracing::info!(id, http = %addrs.api_addr, raft = %addrs.raft_addr, tls = tls.is_some(), dir = %config.node.display(), "node started");
    tasks.spawn(watch_role(app.clone()));
    tasks.spawn(flush_state(disk.clone()));

    let restored = config.node.join(crate::backup::restore::MARKER).exists();
    let initialized = raft.is_initialized().await?;
    if restored && !initialized && !config.bootstrap {
        anyhow::bail!(
            "{} was restored from a backup; start it with --bootstrap to found a new cluster \
             serving that state (other nodes then join it)",
            config.node.display()
        );
    }
    if initialized {
        tracing::info!("data directory holds a cluster member; rejoining as before");
    } else if config.bootstrap {
        tracing::info!("bootstrapping a new single-node cluster");
        match raft.initialize(BTreeMap::from([(id, addrs.clone())])).await {
            Ok(())
            | Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => {}
            Err(e) => return Err(e).context("bootstrapping the cluster"),
        }
    }
    if config.bootstrap {
        tasks.spawn(install_first_guest(app.clone(), bootstrap_guest));
    }
    if restored {
        tasks.spawn(finish_restore(app.clone()));
    }
    if let Some(join) = config.join.clone() {
        tasks.spawn(join_cluster(app.clone(), join));
    }

    tracing::info!("http server listening on {}", addrs.api_addr);
    crate::http_server::serve(
        listeners.http,
        api::router(app.clone()),
        config.http_limits(),
        tls.map(|tls| tls.http),
        // Watch streams never end on their own; they must end for the
        // connections to close.
        async move {
            shutdown.await;
            watch.close();
        },
    )
    .await;
    // The HTTP server has finished its requests; stop the background tasks
    // (they may be inside a write or a read barrier) and wait for them, so
    // nothing touches Raft or the database after the final flush.
    tasks.shutdown().await;
    let _ = raft.shutdown().await;
    disk.flush().await?;
    Ok(())
}

/// The client for this node's calls to other members; with TLS it trusts
/// `--tls-ca` only.
fn http_client(tls: Option<&crate::tls::Tls>) -> anyhow::Result<reqwest::Client> {
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(tls) = tls {
        client = client.use_preconfigured_tls(tls.http_client.clone());
    }
    Ok(client.build()?)
}

/// A random node id for a new data directory.
fn random_id() -> NodeId {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    // Small positive ids read better in logs and URLs.
    hasher.finish() % 1_000_000_000 + 1
}

/// How often the state is flushed in the background. Applying never syncs:
/// the log holds every entry applied since the last flush, so this bounds
/// only how much a restart applies again.
const STATE_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Flushes the database (the state and `save_committed`'s record) every
/// [`STATE_FLUSH_INTERVAL`], off the async threads.
async fn flush_state(disk: Disk) {
    let mut every = tokio::time::interval(STATE_FLUSH_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let disk = disk.clone();
        match tokio::task::spawn_blocking(move || disk.flush_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot flush the state; trying again"),
            Err(error) => tracing::error!(%error, "the state flush failed; trying again"),
        }
    }
}

/// Logs role changes the way the walkthrough shows them, and counts leader
/// changes.
async fn watch_role(app: Arc<Node>) {
    let mut metrics = app.raft.metrics();
    let mut last = (ServerState::Learner, None);
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_leader)
        };
        if now != last {
            if now.1 != last.1 {
                app.metrics.leader_changed();
            }
            match now {
                (ServerState::Leader, _) => tracing::info!("became leader; write api enabled"),
                (state, Some(leader)) if leader != app.id => {
                    tracing::info!(
                        ?state,
                        leader,
                        "following leader {leader}; writes are refused here"
                    )
                }
                (state, _) => tracing::info!(?state, "role changed"),
            }
            last = now;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until openraft's metrics satisfy `done`, returning what it returns.
async fn wait_metrics<T>(
    app: &Node,
    mut done: impl FnMut(&openraft::RaftMetrics<NodeId, NodeInfo>) -> Option<T>,
) -> Option<T> {
    let mut metrics = app.raft.metrics();
    loop {
        if let Some(value) = done(&metrics.borrow_and_update()) {
            return Some(value);
        }
        metrics.changed().await.ok()?;
    }
}

/// On a node founded from a restored data directory: once it leads and has
/// applied its first entries, takes a snapshot of the restored state and
/// purges the log before it, so that a member that joins later receives
/// that snapshot instead of replaying a log that does not hold the
/// restored state. Then removes the marker, which lets members join.
async fn finish_restore(app: Arc<Node>) {
    let id = app.id;
    let Some(applied) = wait_metrics(&app, |m| {
        (m.current_leader == Some(id))
            .then_some(m.last_applied)
            .flatten()
            .map(|log_id| log_id.index)
    })
    .await
    else {
        return;
    };
    if let Err(error) = app.raft.trigger().snapshot().await {
        tracing::error!(%error, "cannot snapshot the restored state");
        return;
    }
    let covered =
        |log_id: Option<openraft::LogId<NodeId>>| log_id.is_some_and(|l| l.index >= applied);
    if wait_metrics(&app, |m| covered(m.snapshot).then_some(()))
        .await
        .is_none()
    {
        return;
    }
    if let Err(error) = app.raft.trigger().purge_log(applied).await {
        tracing::error!(%error, "cannot purge the log before the restored state's snapshot");
        return;
    }
    if wait_metrics(&app, |m| covered(m.purged).then_some(()))
        .await
        .is_none()
    {
        return;
    }
    let marker = app.config.node.join(crate::backup::restore::MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => tracing::info!(
            index = applied,
            "the restored state is snapshotted; other nodes may join"
        ),
        Err(error) => tracing::error!(%error, "cannot remove the restore marker"),
    }
}

/// On the bootstrapping node, once it leads: installs the first guest if the
/// cluster has none yet.
async fn install_first_guest(app: Arc<Node>, module: Vec<u8>) {
    let mut metrics = app.raft.metrics();
    loop {
        if app.state.active().is_some() {
            return;
        }
        let leader = metrics.borrow_and_update().current_leader == Some(app.id);
        if leader {
            match app.deploy(module.clone(), true).await {
                Ok(record) => {
                    tracing::info!(name = %record.name, version = %record.version, index = record.index, "installed the first guest");
                    return;
                }
                Err(error) => tracing::warn!(%error, "installing the first guest; retrying"),
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Asks the cluster at `join` to add this node, through the
/// [`Client`] (which follows the leader a not-leader answer names), and
/// retries until this node is a voter.
async fn join_cluster(app: Arc<Node>, join: String) {
    let request = JoinRequest {
        id: app.id,
        http: app.addrs.api_addr.clone(),
        raft: app.addrs.raft_addr.clone(),
    };
    // The leader answers once this node has caught up, which may take up
    // to its --join-timeout-ms.
    let timeout = app.config.join_timeout() + Duration::from_secs(30);
    let client = match Client::new(
        std::slice::from_ref(&join),
        app.config.token.clone(),
        app.config.tls_ca.as_deref(),
        timeout,
    ) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot join the cluster at --join={join}");
            return;
        }
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let is_voter = {
            let m = app.raft.metrics().borrow().clone();
            m.membership_config
                .membership()
                .voter_ids()
                .any(|id| id == app.id)
        };
        if is_voter {
            tracing::info!("this node is a voter of the cluster");
            return;
        }
        match client.join(&request).await {
            Ok(()) => {
                tracing::info!(%join, "joined the cluster");
                return;
            }
            Err(error) => tracing::warn!(%error, "join refused; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
