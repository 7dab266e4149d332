//! The `quiver` command line: the server (`serve`), client commands (`topic`, `produce`,
//! `consume`) and the load generator (`perf`).

mod client_cmds;
mod partition_cmds;
pub mod perf;
mod pipeline_cmds;
mod plugin_cmds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use quiver_client::{Client, ClientConfig};

use crate::config::BrokerConfig;
use crate::node::Node;

/// Quiver: an event streaming platform over QUIC.
#[derive(Debug, Parser)]
#[command(name = "quiver", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(client_cmds::TopicCommand),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(client_cmds::ClusterCommand),
    /// Move partition replicas and elect leaders (cluster mode).
    #[command(subcommand)]
    Partition(partition_cmds::PartitionCommand),
    /// Produce one record per line of standard input.
    Produce(client_cmds::ProduceArgs),
    /// Print records of a topic.
    Consume(client_cmds::ConsumeArgs),
    /// Deploy, list, describe and remove Wasm plugins.
    #[command(subcommand)]
    Plugin(plugin_cmds::PluginCommand),
    /// Create, inspect, pause, resume and delete pipelines (derived topics).
    #[command(subcommand)]
    Pipeline(pipeline_cmds::PipelineCommand),
    /// Load generator: throughput and latency next to the raw QUIC ceiling.
    #[command(subcommand)]
    Perf(perf::PerfCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Data directory (logs, catalog, generated TLS files).
    #[arg(long, env = "QUIVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML configuration file; command-line flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node id (unique in a cluster, from 1).
    #[arg(long)]
    node_id: Option<u32>,
    /// Peer addresses (host:port of other nodes' peer endpoints) to join through; gossip
    /// finds the other members. Alone (without --controller-voters) they make this node a
    /// broker joining a running cluster, one that does not vote for the controller.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<String>,
    /// Node ids of the controller voters (1, 3 or 5), the same on every voter; giving it
    /// (or --seeds) starts the node in cluster mode.
    #[arg(long, value_delimiter = ',')]
    controller_voters: Vec<u32>,
    /// UDP address of the peer endpoint [default: the --listen port + 1].
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// A development CA directory shared by the nodes of a development cluster on one
    /// machine (generated on first use) [default: the data directory's tls/].
    #[arg(long)]
    dev_ca_dir: Option<PathBuf>,
}

/// How client commands reach a node.
#[derive(Debug, Args, Clone)]
pub struct ConnectArgs {
    /// Node address, host:port.
    #[arg(long, env = "QUIVER_SERVER", default_value = "127.0.0.1:7400")]
    pub server: String,
    /// CA certificate (PEM) the node's certificate is signed by; a node without a configured
    /// certificate writes one to DATA_DIR/tls/ca.pem.
    #[arg(long, env = "QUIVER_CA", default_value = "quiver-data/tls/ca.pem")]
    pub ca: PathBuf,
    /// TLS server name, if not the host part of --server.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Give up connecting after this many ms (QUIC gets no reset from a dead node, so each
    /// attempt at one costs this long).
    #[arg(long, default_value_t = 3_000)]
    pub connect_timeout_ms: u64,
}

impl ConnectArgs {
    /// The client configuration these flags describe.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.server.clone(), self.ca.clone());
        c.server_name = self.server_name.clone();
        c.transport.connect_timeout_ms = self.connect_timeout_ms;
        c
    }

    /// Connects, with an error that says what to check.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        if !self.ca.exists() {
            anyhow::bail!(
                "CA file {} not found; pass --ca (or QUIVER_CA) with the ca.pem of the node's data directory",
                self.ca.display()
            );
        }
        Client::connect(self.client_config())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", self.server))
    }
}

/// Parses arguments, runs the command, and maps errors to a non-zero exit.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Serve(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(server: bool) {
    // openraft narrates every election and append at info; its warnings are what matter.
    let default = if server { "info,openraft=warn" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUIVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await.map(|()| ExitCode::SUCCESS),
        Command::Topic(cmd) => client_cmds::topic(cmd).await,
        Command::Cluster(cmd) => client_cmds::cluster(cmd).await,
        Command::Partition(cmd) => partition_cmds::partition(cmd).await,
        Command::Produce(args) => client_cmds::produce(args).await,
        Command::Consume(args) => client_cmds::consume(args).await,
        Command::Plugin(cmd) => plugin_cmds::plugin(cmd).await,
        Command::Pipeline(cmd) => pipeline_cmds::pipeline(cmd).await,
        Command::Perf(cmd) => perf::run(cmd).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::from_file(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(n) = args.node_id {
        config.node_id = n;
    }
    if !args.seeds.is_empty() {
        config.cluster.seeds = args.seeds;
    }
    if !args.controller_voters.is_empty() {
        config.cluster.controller_voters = args.controller_voters;
    }
    if args.peer_listen.is_some() {
        config.cluster.peer_listen = args.peer_listen;
    }
    if args.dev_ca_dir.is_some() {
        config.cluster.dev_ca_dir = args.dev_ca_dir;
    }
    let node = Node::start(config).await?;
    if let Some(ca) = node.ca_file() {
        tracing::info!(ca = %ca.display(), "clients trust this CA (--ca)");
    }
    // Printed on stdout so scripts (and tests) can wait for readiness and learn the port.
    println!("quiver listening on {}", node.local_addr());
    if let Some(c) = node.cluster() {
        println!("quiver peer endpoint on {}", c.peer_addr());
    }
    wait_for_signal().await?;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}
