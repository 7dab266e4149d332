//! Node configuration: a TOML file (`quiver serve --config FILE`) with command-line overrides.
//! Every field has a default, so an empty file (or none) is a working single node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use quiver_transport::TransportSettings;
use serde::Deserialize;

/// Settings of one node.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Node id (1 for a single node).
    pub node_id: u32,
    /// Where logs, the catalog and generated certificates live.
    pub data_dir: PathBuf,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Address given to clients in metadata; defaults to `listen`.
    pub advertised_addr: Option<String>,
    /// PEM certificate chain; with `tls_key`. When absent a development CA and certificate are
    /// generated in the data directory.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or IPs for the generated development certificate.
    pub tls_dev_names: Vec<String>,
    /// Largest request frame accepted, bytes.
    pub request_bytes_max: usize,
    /// Bytes of requests being read or handled at once across all connections; requests
    /// beyond it wait (flow control pushes back to the clients).
    pub in_flight_request_bytes_max: usize,
    /// Bytes of fetch responses being read or sent at once across all connections; fetches
    /// beyond it wait.
    pub in_flight_fetch_bytes_max: usize,
    /// Longest time a client may take to send a whole request, ms.
    pub request_read_ms_max: u64,
    /// Longest fetch long-poll, ms (a request asking longer is capped).
    pub fetch_wait_ms_max: u32,
    /// Largest fetch response, bytes (a request asking more is capped).
    pub fetch_bytes_max: u32,
    /// Largest transport-probe download, bytes.
    pub probe_bytes_max: u64,
    /// How often retention runs, ms.
    pub retention_check_interval_ms: u64,
    /// How long shutdown waits for in-flight requests, ms.
    pub shutdown_grace_ms: u64,
    /// Default settings for new topics, as `key = "value"` (see PROTOCOL.md, topic settings).
    pub topic_defaults: std::collections::BTreeMap<String, String>,
    /// QUIC transport tuning.
    pub transport: TransportConfig,
    /// Cluster mode (absent: the node runs alone).
    pub cluster: ClusterConfig,
}

/// Cluster settings. A node is in cluster mode when `controller_voters` or `seeds` is not
/// empty; with seeds alone it joins a running cluster as a broker that does not vote.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Node ids of the controller voters: 1, 3 or 5 nodes (the same list on every node).
    pub controller_voters: Vec<u32>,
    /// Peer addresses to start from; they must include the voters'.
    pub seeds: Vec<String>,
    /// UDP address of the peer endpoint (`quiver-peer/1`); default: the client port + 1.
    pub peer_listen: Option<SocketAddr>,
    /// Peer address given to other nodes; defaults to `peer_listen`.
    pub peer_advertised_addr: Option<String>,
    /// Directory of the development CA shared by the nodes of a development cluster (nodes
    /// generate their certificates from it); default: the node's own `tls` directory.
    pub dev_ca_dir: Option<PathBuf>,
    /// With `tls_cert`/`tls_key`: the CA that issued every node's certificate (peers
    /// authenticate each other against it).
    pub peer_ca: Option<PathBuf>,
    /// How often a broker heartbeats the active controller, ms.
    pub heartbeat_ms: u64,
    /// A broker that has not heartbeated for this long is fenced, ms.
    pub lease_ms: u64,
    /// Controller election timeout, ms (randomised between this and twice it).
    pub election_timeout_ms: u64,
    /// Gossip probe period, ms: a member is probed about this often, and one that stays
    /// unreachable is suspect after a period and down after four more (advisory only).
    pub gossip_probe_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            controller_voters: Vec::new(),
            seeds: Vec::new(),
            peer_listen: None,
            peer_advertised_addr: None,
            dev_ca_dir: None,
            peer_ca: None,
            heartbeat_ms: 500,
            lease_ms: 3_000,
            election_timeout_ms: 1_000,
            gossip_probe_ms: 1_000,
        }
    }
}

impl ClusterConfig {
    /// Whether the node runs in a cluster.
    pub fn enabled(&self) -> bool {
        !self.controller_voters.is_empty() || !self.seeds.is_empty()
    }

    /// The peer endpoint's address for a node listening for clients at `listen`.
    pub fn peer_listen(&self, listen: SocketAddr) -> SocketAddr {
        self.peer_listen.unwrap_or_else(|| {
            let mut a = listen;
            if a.port() != 0 {
                a.set_port(a.port().wrapping_add(1));
            }
            a
        })
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("quiver-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            advertised_addr: None,
            tls_cert: None,
            tls_key: None,
            tls_dev_names: Vec::new(),
            request_bytes_max: 64 << 20,
            in_flight_request_bytes_max: 256 << 20,
            in_flight_fetch_bytes_max: 256 << 20,
            request_read_ms_max: 30_000,
            fetch_wait_ms_max: 30_000,
            fetch_bytes_max: 64 << 20,
            probe_bytes_max: 16 << 30,
            retention_check_interval_ms: 300_000,
            shutdown_grace_ms: 10_000,
            topic_defaults: Default::default(),
            transport: TransportConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// QUIC knobs exposed in the config file; see `quiver_transport::TransportSettings`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Per-stream flow-control window, bytes.
    pub stream_receive_window_bytes: u64,
    /// Per-connection flow-control window, bytes.
    pub receive_window_bytes: u64,
    /// Per-connection send buffer, bytes.
    pub send_window_bytes: u64,
    /// Concurrent requests per connection.
    pub max_concurrent_bidi_streams: u32,
    /// Requested UDP socket buffers, bytes.
    pub udp_buffer_bytes: usize,
    /// Most client connections.
    pub max_connections: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        let d = TransportSettings::default();
        Self {
            stream_receive_window_bytes: d.stream_receive_window_bytes,
            receive_window_bytes: d.receive_window_bytes,
            send_window_bytes: d.send_window_bytes,
            max_concurrent_bidi_streams: d.max_concurrent_bidi_streams,
            udp_buffer_bytes: d.udp_buffer_bytes,
            max_connections: d.max_connections,
        }
    }
}

impl TransportConfig {
    /// The transport settings these knobs describe.
    pub fn settings(&self) -> TransportSettings {
        TransportSettings {
            stream_receive_window_bytes: self.stream_receive_window_bytes,
            receive_window_bytes: self.receive_window_bytes,
            send_window_bytes: self.send_window_bytes,
            max_concurrent_bidi_streams: self.max_concurrent_bidi_streams,
            udp_buffer_bytes: self.udp_buffer_bytes,
            max_connections: self.max_connections,
            ..TransportSettings::default()
        }
    }
}

impl BrokerConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: BrokerConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\n[topic_defaults]\n\"retention.ms\" = \"1000\"\n[transport]\nmax_connections = 5\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.transport.max_connections, 5);
        assert_eq!(c.topic_defaults["retention.ms"], "1000");
        assert!(toml::from_str::<BrokerConfig>("colour = 1").is_err());
    }
}
