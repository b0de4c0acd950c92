//! Connections to Redis: one server, or a Redis Cluster reached through seed
//! nodes. The backend sends every command over one multiplexed [`Conn`];
//! this module gives it the connections a blocking read and a subscription
//! need (a blocking command must never stall the shared connection), and
//! makes a write durable on replicas when asked to (WAIT, on the primary
//! that holds the key).
//!
//! On a cluster the client follows MOVED/ASK, refreshes its slot map after a
//! failover and retries; what still fails is a [`QueueError`] the caller
//! handles as any other Redis error (the ingest answers 503, the worker
//! tries again).

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, Pipeline, RedisFuture, RedisResult,
    TlsCertificates, Value,
};

use crate::queue::QueueError;

/// How long one command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-attempt bound on a cluster connection that carries blocking reads:
/// longer than any block the worker asks for.
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the queue lives, and when a write counts as stored. No `Debug`:
/// the connection infos carry the password.
#[derive(Clone)]
pub struct RedisTarget {
    /// The server, or the cluster's seed nodes (at least one).
    pub nodes: Vec<ConnectionInfo>,
    pub cluster: bool,
    /// PEM of the CA that signed the servers' certificates (rediss://);
    /// None: the system's trust store.
    pub ca: Option<Vec<u8>>,
    /// Accepted events are stored once this many replicas have them
    /// (WAIT); 0: once the primary has them.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    /// Hash slots the queue is spread over (`redis.shards`).
    pub shards: u32,
}

impl RedisTarget {
    /// One standalone server, no CA, no replicas waited for.
    pub fn single(target: impl redis::IntoConnectionInfo) -> RedisResult<RedisTarget> {
        Ok(RedisTarget {
            nodes: vec![target.into_connection_info()?],
            cluster: false,
            ca: None,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            shards: 1,
        })
    }
}

/// A connection commands go over: to one server, or to a cluster (routed
/// by key). Cheap to clone; clones share the socket(s).
#[derive(Clone)]
pub enum Conn {
    /// Reconnects by itself.
    Managed(ConnectionManager),
    /// One connection of its own (blocking reads).
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

// One per queue handle: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Clients {
    One(Client),
    Cluster {
        cluster: ClusterClient,
        /// One client per seed node, for the doorbell's subscription
        /// (PUBLISH on a cluster reaches subscribers on every node).
        nodes: Vec<Client>,
    },
}

/// The clients of one target and the shared connection.
pub struct Link {
    clients: Clients,
    conn: Conn,
    /// For writes that wait for replicas: WAIT blocks the connection it is
    /// sent on until the replicas answer, so it gets its own.
    durable: Option<Conn>,
    wait_replicas: u32,
    wait_timeout: Duration,
}

impl Link {
    /// Connects lazily: a Redis that is down at start is retried on use.
    pub fn open(target: RedisTarget) -> Result<Link, QueueError> {
        if target.nodes.is_empty() {
            return Err(QueueError::Redis(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no Redis node to connect to",
            ))));
        }
        // TLS (rediss://) runs on rustls.
        crate::install_crypto_provider();
        let client = |info: ConnectionInfo| match &target.ca {
            Some(root_cert) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert.clone()),
                },
            ),
            None => Client::open(info),
        };
        let (clients, conn, durable) = if target.cluster {
            let mut builder = ClusterClientBuilder::new(target.nodes.clone());
            if let Some(root_cert) = &target.ca {
                builder = builder.certs(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert.clone()),
                });
            }
            let cluster = builder.build()?;
            let nodes = target
                .nodes
                .iter()
                .cloned()
                .map(client)
                .collect::<RedisResult<Vec<_>>>()?;
            let connect = || {
                Conn::Cluster(
                    cluster.get_pending_async_connection_with_config(
                        ClusterConfig::new()
                            .set_response_timeout(RESPONSE_TIMEOUT)
                            .set_connection_timeout(CONNECT_TIMEOUT),
                    ),
                )
            };
            let conn = connect();
            let durable = (target.wait_replicas > 0).then(connect);
            (Clients::Cluster { cluster, nodes }, conn, durable)
        } else {
            let one = client(target.nodes[0].clone())?;
            let connect = || -> RedisResult<Conn> {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(1);
                Ok(Conn::Managed(one.get_connection_manager_lazy(config)?))
            };
            let conn = connect()?;
            let durable = (target.wait_replicas > 0).then(connect).transpose()?;
            (Clients::One(one), conn, durable)
        };
        Ok(Link {
            clients,
            conn,
            durable,
            wait_replicas: target.wait_replicas,
            wait_timeout: target.wait_timeout,
        })
    }

    /// The shared connection.
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A connection of its own, made now (to check a login, or to carry
    /// blocking reads).
    pub async fn own(&self) -> RedisResult<Conn> {
        match &self.clients {
            Clients::One(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_response_timeout(None)
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Clients::Cluster { cluster, .. } => Ok(Conn::Cluster(
                cluster
                    .get_async_connection_with_config(
                        ClusterConfig::new()
                            .set_response_timeout(BLOCKING_TIMEOUT)
                            .set_connection_timeout(CONNECT_TIMEOUT),
                    )
                    .await?,
            )),
        }
    }

    /// PING on a connection of its own: the server, or the first seed node
    /// that answers (a node's own error, e.g. a refused login, is the
    /// answer; a node that cannot be reached passes the turn to the next).
    pub async fn ping_a_node(&self) -> RedisResult<()> {
        let nodes = match &self.clients {
            Clients::One(client) => std::slice::from_ref(client),
            Clients::Cluster { nodes, .. } => nodes.as_slice(),
        };
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(CONNECT_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let mut last = Ok(());
        for client in nodes {
            last = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("PING").query_async::<()>(&mut conn).await
            }
            .await;
            match &last {
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() => {}
                _ => return last,
            }
        }
        last
    }

    /// A subscription to `channel`. `turn` picks the cluster node to
    /// subscribe at, so that a node that is gone is not tried forever.
    pub async fn subscribe(&self, channel: &str, turn: usize) -> RedisResult<redis::aio::PubSub> {
        let client = match &self.clients {
            Clients::One(client) => client,
            Clients::Cluster { nodes, .. } => &nodes[turn % nodes.len()],
        };
        let mut sub = client.get_async_pubsub().await?;
        sub.subscribe(channel).await?;
        Ok(sub)
    }

    /// Runs a write that must be stored before it is acknowledged: on its
    /// own connection, then WAIT for the configured replicas on the primary
    /// that holds `key`. Err when fewer replicas confirm in time (the write
    /// may still be on the primary: the caller must treat it as not stored,
    /// and a retry is safe).
    pub async fn durable_write<T>(
        &self,
        key: &str,
        write: impl AsyncFnOnce(&mut Conn) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let Some(durable) = &self.durable else {
            return write(&mut self.conn.clone()).await;
        };
        let mut conn = durable.clone();
        let out = write(&mut conn).await?;
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.wait_replicas)
            .arg(self.wait_timeout.as_millis().max(1) as u64);
        let acked: i64 = match &mut conn {
            Conn::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                redis::from_redis_value(c.route_command(wait, routing).await?)
                    .map_err(|e| QueueError::Corrupt(format!("WAIT reply: {e}")))?
            }
            other => wait.query_async(other).await?,
        };
        if acked < i64::from(self.wait_replicas) {
            return Err(QueueError::NotReplicated {
                wanted: self.wait_replicas,
                acked: acked.max(0) as u32,
                within: self.wait_timeout,
            });
        }
        Ok(out)
    }
}
