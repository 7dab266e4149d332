//! `quiver plugin deploy | list | describe | remove`: the node's plugin registry.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use quiver_proto::messages::PluginInfo;

use super::ConnectArgs;

/// Plugin registry commands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Validate a component and store it in the node's registry as NAME@VERSION.
    #[command(disable_version_flag = true)]
    Deploy(DeployArgs),
    /// List deployed plugins.
    List(ListArgs),
    /// Show every version of a plugin.
    Describe(DescribeArgs),
    /// Remove NAME@VERSION.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The component (a `.wasm` built for wasm32-wasip2 against wit/plugin.wit).
    file: PathBuf,
    /// Plugin name: 1-64 bytes of [a-z0-9_-].
    #[arg(long)]
    name: String,
    /// Semantic version, e.g. 1.0.0 (immutable once deployed).
    #[arg(long)]
    version: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Plugin name.
    name: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// NAME@VERSION.
    plugin: String,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The largest component the CLI sends (the node's `request_bytes_max` applies as well).
const COMPONENT_BYTES_MAX: u64 = 64 << 20;

fn print_row(p: &PluginInfo) {
    println!(
        "{}@{}\t{}\t{} bytes\tsha256 {}",
        p.name, p.version, p.kind, p.bytes, p.sha256
    );
}

/// Runs a plugin command.
pub async fn plugin(cmd: PluginCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PluginCommand::Deploy(a) => {
            let size = std::fs::metadata(&a.file)
                .with_context(|| format!("cannot read {}", a.file.display()))?
                .len();
            if size > COMPONENT_BYTES_MAX {
                anyhow::bail!(
                    "{} is {size} bytes, more than the {COMPONENT_BYTES_MAX} a deploy may carry",
                    a.file.display()
                );
            }
            let bytes = std::fs::read(&a.file)
                .with_context(|| format!("cannot read {}", a.file.display()))?;
            let client = a.connect.connect().await?;
            let (created, info) = client
                .deploy_plugin(&a.name, &a.version, bytes.into())
                .await?;
            if created {
                println!("deployed {}@{} ({})", info.name, info.version, info.kind);
            } else {
                println!(
                    "{}@{} was already deployed with these bytes",
                    info.name, info.version
                );
            }
            print_row(&info);
        }
        PluginCommand::List(a) => {
            let client = a.connect.connect().await?;
            for p in client.list_plugins("").await? {
                print_row(&p);
            }
        }
        PluginCommand::Describe(a) => {
            let client = a.connect.connect().await?;
            let versions = client.list_plugins(&a.name).await?;
            if versions.is_empty() {
                anyhow::bail!("plugin_not_found (60): no plugin {}", a.name);
            }
            println!("plugin {} ({})", a.name, versions[0].kind);
            println!("  version\tkind\tbytes\tdeployed\tsha256");
            for p in versions {
                let deployed = time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(p.deployed_ms) * 1_000_000,
                )
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(|| p.deployed_ms.to_string());
                println!(
                    "  {}\t{}\t{}\t{deployed}\t{}",
                    p.version, p.kind, p.bytes, p.sha256
                );
            }
        }
        PluginCommand::Remove(a) => {
            let (name, version) = a
                .plugin
                .split_once('@')
                .ok_or_else(|| anyhow::anyhow!("give the plugin as NAME@VERSION"))?;
            let client = a.connect.connect().await?;
            client.remove_plugin(name, version).await?;
            println!("removed {name}@{version}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
