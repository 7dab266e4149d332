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
    /// Print what a plugin's instances logged (from the node's __plugin_logs topic).
    Logs(LogsArgs),
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// NAME, or NAME@VERSION for one version.
    plugin: String,
    /// Keep waiting for new lines.
    #[arg(long)]
    follow: bool,
    /// One JSON object per line, as stored.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connect: ConnectArgs,
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
            for p in &versions {
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
            println!("  since the node started:");
            println!("  version\tattached\tbatches\tin\tout\tdropped\tfailed\terrors\tguest_ms");
            for p in &versions {
                println!(
                    "  {}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.1}",
                    p.version,
                    p.attached,
                    p.batches,
                    p.records_in,
                    p.records_out,
                    p.records_dropped,
                    p.records_failed,
                    p.errors,
                    p.guest_us as f64 / 1000.0
                );
            }
        }
        PluginCommand::Logs(a) => logs(a).await?,
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

/// `quiver plugin logs`: reads the log topic, keeping the lines of one plugin (or version).
async fn logs(a: LogsArgs) -> anyhow::Result<()> {
    use quiver_client::{Consumer, ConsumerConfig, SeekTo};
    use std::io::Write;
    let topic = crate::plugins::PLUGIN_LOGS_TOPIC;
    let wanted = |key: &[u8]| {
        let key = String::from_utf8_lossy(key);
        if a.plugin.contains('@') {
            key == a.plugin
        } else {
            key.split_once('@').is_some_and(|(n, _)| n == a.plugin)
        }
    };
    let client = a.connect.connect().await?;
    // No line yet means no topic yet: with --follow, wait for it.
    loop {
        match client.partition_count(topic).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(quiver_proto::ErrorCode::UnknownTopicOrPartition) => {
                if !a.follow {
                    client.close().await;
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut consumer =
        Consumer::new(client.clone(), topic, None, ConsumerConfig::default()).await?;
    consumer.seek_all(SeekTo::Earliest).await?;
    let end = client
        .list_offset(topic, 0, quiver_proto::messages::LATEST_TIMESTAMP)
        .await?
        .unwrap_or(0);
    let stdout = std::io::stdout();
    loop {
        if !a.follow && consumer.position(0).is_some_and(|p| p >= end) {
            break;
        }
        let records = consumer.poll().await?;
        let mut out = stdout.lock();
        for r in records {
            if !a.follow && r.offset >= end {
                continue;
            }
            if !r.key.as_deref().is_some_and(wanted) {
                continue;
            }
            let Some(v) = r.value.as_deref() else {
                continue;
            };
            if a.json {
                out.write_all(v)?;
                out.write_all(b"\n")?;
                continue;
            }
            let e: serde_json::Value = match serde_json::from_slice(v) {
                Ok(e) => e,
                Err(_) => continue,
            };
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            let when = time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(e["ts_ms"].as_i64().unwrap_or(0)) * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
            let mut line = format!(
                "{when} {:<5} {} [{}] {}",
                s("level"),
                s("plugin"),
                s("context"),
                s("message")
            );
            if let Some(fields) = e["fields"].as_object() {
                for (k, v) in fields {
                    line.push_str(&format!(" {k}={}", v.as_str().unwrap_or_default()));
                }
            }
            if s("source") != "log" {
                line.push_str(&format!(" ({})", s("source")));
            }
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    client.close().await;
    Ok(())
}

/// Builds a chain from repeated `--plugin NAME[@VERSION]` and `--param K=V` flags. With one
/// plugin every parameter is its own; with several, a parameter names its step as
/// `NAME.K=V` (or `INDEX.K=V`, counting steps from 1, when a plugin appears twice).
pub fn chain_from_flags(
    plugins: &[String],
    params: &[String],
) -> anyhow::Result<Vec<quiver_proto::messages::ChainStep>> {
    use quiver_proto::messages::{CHAIN_STEPS_MAX, ChainStep};
    if plugins.is_empty() {
        if !params.is_empty() {
            anyhow::bail!("--param needs a --plugin to configure");
        }
        return Ok(Vec::new());
    }
    if plugins.len() > CHAIN_STEPS_MAX {
        anyhow::bail!("a chain has at most {CHAIN_STEPS_MAX} plugins");
    }
    let mut steps = Vec::with_capacity(plugins.len());
    for p in plugins {
        let (name, version) = match p.split_once('@') {
            Some((n, v)) => (n, v),
            None => (p.as_str(), ""),
        };
        crate::plugins::check_name(name).map_err(|e| anyhow::anyhow!("--plugin {p:?}: {e}"))?;
        if !version.is_empty() || p.contains('@') {
            crate::plugins::check_version(version)
                .map_err(|e| anyhow::anyhow!("--plugin {p:?}: {e}"))?;
        }
        steps.push(ChainStep {
            plugin: name.to_string(),
            version: version.to_string(),
            params: Vec::new(),
        });
    }
    for kv in params {
        let (key, value) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param {kv:?}: expected KEY=VALUE"))?;
        let (step, key) = if steps.len() == 1 {
            (0, key)
        } else {
            let (target, key) = key.split_once('.').ok_or_else(|| {
                anyhow::anyhow!(
                    "--param {kv:?}: with several plugins, name the step: NAME.KEY=VALUE or INDEX.KEY=VALUE"
                )
            })?;
            let by_index = target
                .parse::<usize>()
                .ok()
                .filter(|i| (1..=steps.len()).contains(i))
                .map(|i| i - 1);
            let by_name: Vec<usize> = (0..steps.len())
                .filter(|i| steps[*i].plugin == target)
                .collect();
            let step = match (by_index, by_name.as_slice()) {
                (Some(i), _) => i,
                (None, [i]) => *i,
                (None, []) => anyhow::bail!("--param {kv:?}: no step {target:?} in the chain"),
                (None, _) => anyhow::bail!(
                    "--param {kv:?}: {target} appears more than once; name the step by its position (1-{})",
                    steps.len()
                ),
            };
            (step, key)
        };
        if key.is_empty() {
            anyhow::bail!("--param {kv:?}: empty key");
        }
        steps[step]
            .params
            .push((key.to_string(), value.to_string()));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::chain_from_flags;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_make_chains() {
        let one =
            chain_from_flags(&s(&["filter-json@1.0.0"]), &s(&["field=a.b", "value=x=y"])).unwrap();
        assert_eq!(one[0].plugin, "filter-json");
        assert_eq!(one[0].version, "1.0.0");
        assert_eq!(
            one[0].params,
            vec![
                ("field".into(), "a.b".into()),
                ("value".into(), "x=y".into())
            ]
        );
        let two = chain_from_flags(
            &s(&["sample", "redact", "sample"]),
            &s(&["redact.fields=ssn", "1.every=10", "3.every=2"]),
        )
        .unwrap();
        assert_eq!(two[1].params, vec![("fields".into(), "ssn".into())]);
        assert_eq!(two[0].params, vec![("every".into(), "10".into())]);
        assert_eq!(two[2].params, vec![("every".into(), "2".into())]);
        for (plugins, params) in [
            (s(&[]), s(&["a=b"])),
            (s(&["Bad"]), s(&[])),
            (s(&["p@1"]), s(&[])),
            (s(&["p@"]), s(&[])),
            (s(&["p"]), s(&["novalue"])),
            (s(&["p", "q"]), s(&["k=v"])),
            (s(&["p", "q"]), s(&["r.k=v"])),
            (s(&["p", "p"]), s(&["p.k=v"])),
            (s(&["p"]), s(&["=v"])),
        ] {
            assert!(
                chain_from_flags(&plugins, &params).is_err(),
                "{plugins:?} {params:?}"
            );
        }
    }
}
