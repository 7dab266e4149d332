//! `quiver pipeline create | list | status | pause | resume | delete`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use quiver_proto::messages::{PipelineInfo, PipelineSpec, format_chain};

use super::ConnectArgs;

/// Pipeline commands.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Create a pipeline: records of the input topic, through the plugins, to the outputs.
    Create(CreateArgs),
    /// List pipelines.
    List(ConnectOnly),
    /// Show a pipeline's progress per input partition.
    Status(NameArgs),
    /// Pause a pipeline at a batch boundary.
    Pause(NameArgs),
    /// Resume a paused (or failed) pipeline.
    Resume(NameArgs),
    /// Delete a pipeline and its progress (its output stays).
    Delete(NameArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Pipeline name: 1-64 bytes of [a-z0-9_-].
    name: String,
    /// Input topic.
    #[arg(long)]
    from: String,
    /// Output topics, comma separated; records a plugin does not route go to the first.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// A deployed plugin, NAME[@VERSION]; repeat for a chain, applied in order.
    #[arg(long = "plugin", value_name = "NAME[@VERSION]", required = true)]
    plugins: Vec<String>,
    /// A plugin parameter, KEY=VALUE (NAME.KEY=VALUE with several plugins).
    #[arg(long = "param", value_name = "KEY=VALUE")]
    params: Vec<String>,
    /// Records the chain fails: fail (stop the partition, see `status`), skip, or dlq:TOPIC.
    #[arg(long, default_value = "fail", value_name = "fail|skip|dlq:TOPIC")]
    on_error: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// Pipeline name.
    name: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ConnectOnly {
    #[command(flatten)]
    connect: ConnectArgs,
}

fn lag(p: &PipelineInfo) -> u64 {
    p.partitions
        .iter()
        .map(|q| q.high_watermark.saturating_sub(q.committed))
        .sum()
}

/// Runs a pipeline command.
pub async fn pipeline(cmd: PipelineCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PipelineCommand::Create(a) => {
            let chain = super::plugin_cmds::chain_from_flags(&a.plugins, &a.params)?;
            a.on_error
                .parse::<crate::topic_config::ErrorPolicy>()
                .map_err(|e| anyhow::anyhow!("--on-error: {e}"))?;
            let client = a.connect.connect().await?;
            client
                .create_pipeline(&PipelineSpec {
                    name: a.name.clone(),
                    from: a.from,
                    to: a.to,
                    chain: format_chain(&chain),
                    on_error: a.on_error,
                })
                .await?;
            println!("created pipeline {}", a.name);
        }
        PipelineCommand::List(a) => {
            let client = a.connect.connect().await?;
            for p in client.list_pipelines("").await? {
                println!(
                    "{}\t{} -> {}\t{}\tlag {}\t{}",
                    p.spec.name,
                    p.spec.from,
                    p.spec.to.join(","),
                    if p.paused { "paused" } else { "running" },
                    lag(&p),
                    p.spec.chain
                );
            }
        }
        PipelineCommand::Status(a) => {
            let client = a.connect.connect().await?;
            let p = client.list_pipelines(&a.name).await?.pop().ok_or_else(|| {
                anyhow::anyhow!("pipeline_not_found (70): no pipeline {}", a.name)
            })?;
            println!("pipeline {}", p.spec.name);
            println!("  from {} to {}", p.spec.from, p.spec.to.join(","));
            println!("  chain {}", p.spec.chain);
            println!("  on error {}", p.spec.on_error);
            println!("  lag {}", lag(&p));
            println!("  partition\tcommitted\thigh-watermark\tlag\tin\tout\tfailed\tstate");
            for q in &p.partitions {
                println!(
                    "  {}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    q.partition,
                    q.committed,
                    q.high_watermark,
                    q.high_watermark.saturating_sub(q.committed),
                    q.records_in,
                    q.records_out,
                    q.records_failed,
                    q.state
                );
            }
        }
        PipelineCommand::Pause(a) => {
            a.connect
                .connect()
                .await?
                .pause_pipeline(&a.name, true)
                .await?;
            println!("paused pipeline {}", a.name);
        }
        PipelineCommand::Resume(a) => {
            a.connect
                .connect()
                .await?
                .pause_pipeline(&a.name, false)
                .await?;
            println!("resumed pipeline {}", a.name);
        }
        PipelineCommand::Delete(a) => {
            a.connect.connect().await?.delete_pipeline(&a.name).await?;
            println!("deleted pipeline {}", a.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
