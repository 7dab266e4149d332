//! `quiver partition`: moving replicas and asking for leader elections (cluster mode).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use quiver_proto::messages::ElectionType;

use super::ConnectArgs;

/// Partition operations.
#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move a partition to new replicas while it keeps serving; the new replicas copy the
    /// log, and the old ones leave once every new one is in sync.
    Reassign(ReassignArgs),
    /// Elect a partition's leader: the preferred replica, or (unclean) any live replica of
    /// a partition without a leader.
    Elect(ElectArgs),
}

#[derive(Debug, Args)]
pub struct ReassignArgs {
    /// TOPIC/PARTITION, e.g. `payments/0`.
    #[arg(value_parser = parse_topic_partition)]
    target: (String, u32),
    /// The new replicas by node id; the first is the preferred leader.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "cancel",
        conflicts_with = "cancel"
    )]
    replicas: Vec<u32>,
    /// Cancel the move in progress: back to the replicas before it.
    #[arg(long)]
    cancel: bool,
    /// Wait until the move has completed (the replicas are the new ones).
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 300)]
    wait_timeout_s: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ElectArgs {
    /// TOPIC/PARTITION, e.g. `payments/0`.
    #[arg(value_parser = parse_topic_partition)]
    target: (String, u32),
    /// Move leadership back to the first replica (it must be live and in sync).
    #[arg(long, conflicts_with = "unclean", required_unless_present = "unclean")]
    preferred: bool,
    /// For a partition without a leader: make the first live replica leader even if it is
    /// not in sync. Records only the old in-sync replicas held are LOST.
    #[arg(long)]
    unclean: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn parse_topic_partition(s: &str) -> Result<(String, u32), String> {
    let (topic, p) = s
        .rsplit_once('/')
        .ok_or_else(|| format!("{s:?}: expected TOPIC/PARTITION, e.g. payments/0"))?;
    if topic.is_empty() {
        return Err(format!("{s:?}: the topic is empty"));
    }
    let p = p
        .parse()
        .map_err(|_| format!("{s:?}: {p:?} is not a partition number"))?;
    Ok((topic.to_string(), p))
}

fn ids(v: &[u32]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs a `partition` subcommand.
pub async fn partition(cmd: PartitionCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PartitionCommand::Reassign(a) => {
            let (topic, p) = &a.target;
            let client = a.connect.connect().await?;
            let replicas = (!a.cancel).then(|| a.replicas.clone());
            client.reassign_partition(topic, *p, replicas).await?;
            if a.cancel {
                println!("{topic}/{p}: reassignment cancelled");
            } else {
                println!("{topic}/{p}: moving to replicas {}", ids(&a.replicas));
            }
            if !a.wait {
                return Ok(ExitCode::SUCCESS);
            }
            let deadline = Instant::now() + Duration::from_secs(a.wait_timeout_s);
            loop {
                let s = client.cluster_status().await?;
                let part = s
                    .partitions
                    .iter()
                    .find(|x| x.topic == *topic && x.partition == *p);
                if let Some(x) = part
                    && x.adding.is_empty()
                    && x.removing.is_empty()
                {
                    println!(
                        "{topic}/{p}: replicas {}, leader {}, ISR {}",
                        ids(&x.replicas),
                        x.leader,
                        ids(&x.isr)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "{topic}/{p}: still moving after {} s (adding {}, removing {})",
                        a.wait_timeout_s,
                        part.map(|x| ids(&x.adding)).unwrap_or_default(),
                        part.map(|x| ids(&x.removing)).unwrap_or_default()
                    );
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        PartitionCommand::Elect(a) => {
            let (topic, p) = &a.target;
            let client = a.connect.connect().await?;
            let election = if a.unclean {
                ElectionType::Unclean
            } else {
                ElectionType::Preferred
            };
            client.elect_leader(topic, *p, election).await?;
            let s = client.cluster_status().await?;
            match s
                .partitions
                .iter()
                .find(|x| x.topic == *topic && x.partition == *p)
            {
                Some(x) => println!(
                    "{topic}/{p}: leader {} in epoch {}, ISR {}",
                    x.leader,
                    x.leader_epoch,
                    ids(&x.isr)
                ),
                None => println!("{topic}/{p}: elected"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_partition_arguments() {
        assert_eq!(parse_topic_partition("a/b/3"), Ok(("a/b".into(), 3)));
        assert!(parse_topic_partition("payments").is_err());
        assert!(parse_topic_partition("/0").is_err());
        assert!(parse_topic_partition("payments/x").is_err());
        assert!(parse_topic_partition("payments/-1").is_err());
    }
}
