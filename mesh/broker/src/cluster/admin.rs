//! The node's side of the metadata in cluster mode: client admin requests that go through the
//! controller (topic creation and deletion), answers from the node's copy of the metadata
//! (Metadata, ClusterStatus), and the reconciler that makes the local partitions follow the
//! controller's placement and leadership.

use std::sync::Arc;

use quiver_proto::messages::{
    BrokerInfo, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, ElectLeadersRequest, ElectLeadersResponse, ElectionType,
    ListTopicsResponse, MetadataRequest, MetadataResponse, PartitionMetadata, PartitionResult,
    ReassignPartitionsRequest, ReassignPartitionsResponse, Status, TopicListing, TopicMetadata,
    TopicResult,
};
use quiver_proto::{ErrorCode, TopicName};

use super::Cluster;
use super::state::{Command, Outcome};
use crate::broker::Broker;
use crate::partition::Role;
use crate::pipelines::Pipelines;
use crate::topic_config::TopicConfig;
use quiver_cluster::NodeId;
use quiver_cluster::replication::LeaderAndIsr;

/// A partition the metadata places on this node.
struct Placed {
    partition: u32,
    state: LeaderAndIsr,
    leader_addr: String,
    replicas: Vec<NodeId>,
}

fn outcome_status(r: Result<Outcome, super::WriteError>) -> Status {
    match r {
        Ok(Outcome::Done | Outcome::Unchanged | Outcome::Registered { .. }) => Status::ok(),
        Ok(Outcome::Refused { code, message }) => Status::err(ErrorCode::from_code(code), message),
        Err(e) => Status::err(e.code, e.message),
    }
}

/// Metadata from this node's copy: live brokers and every partition's leader and epoch
/// (leader 0: the partition has no leader now).
pub fn metadata(cluster: &Cluster, req: MetadataRequest) -> MetadataResponse {
    cluster.read(|a| {
        let control = &a.metadata.control;
        let brokers = control
            .brokers()
            .iter()
            .filter(|(_, b)| !b.fenced)
            .map(|(id, b)| BrokerInfo {
                node_id: *id,
                addr: b.addr.clone(),
            })
            .collect();
        let describe = |name: String| {
            let parts: Option<Vec<PartitionMetadata>> = control
                .topics()
                .find(|(n, _)| *n == name)
                .map(|(_, parts)| {
                    parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| PartitionMetadata {
                            partition: i as u32,
                            leader: p.state().leader.unwrap_or(0),
                            leader_epoch: p.state().epoch,
                        })
                        .collect()
                });
            match parts {
                Some(partitions) => TopicMetadata {
                    name,
                    status: Status::ok(),
                    partitions,
                },
                None => TopicMetadata {
                    status: Status::err(
                        ErrorCode::UnknownTopicOrPartition,
                        format!("unknown topic {name}"),
                    ),
                    name,
                    partitions: Vec::new(),
                },
            }
        };
        let names = req
            .topics
            .unwrap_or_else(|| control.topics().map(|(n, _)| n.to_string()).collect());
        MetadataResponse {
            brokers,
            topics: names.into_iter().map(describe).collect(),
        }
    })
}

/// Every topic of the cluster's metadata (not only those hosted here), sorted by name, with
/// the node's own internal topics.
pub fn list_topics(cluster: &Cluster, broker: &Broker) -> ListTopicsResponse {
    let mut topics: Vec<TopicListing> = cluster.read(|a| {
        a.metadata
            .control
            .topics()
            .map(|(n, p)| TopicListing {
                name: n.to_string(),
                partitions: p.len() as u32,
            })
            .collect()
    });
    for (name, t) in broker.topics() {
        if node_local(name.as_str()) {
            topics.push(TopicListing {
                name: name.to_string(),
                partitions: t.config.partitions,
            });
        }
    }
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    ListTopicsResponse { topics }
}

/// Creates topics through the controller: settings are resolved here, placement is the
/// controller's. Answered once committed and applied on this node.
pub async fn create_topics(
    cluster: &Cluster,
    broker: &Broker,
    req: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let status = match broker.resolve_new_topic(&t.name, t.partitions, &t.configs) {
            Err(e) => Status::err(e.code, e.message),
            Ok((name, config)) => {
                let command = Command::CreateTopic {
                    name: name.to_string(),
                    partitions: config.partitions,
                    replication: config.replication_factor,
                    configs: config.to_pairs().into_iter().collect(),
                };
                outcome_status(cluster.write(command).await)
            }
        };
        results.push(TopicResult {
            name: t.name,
            status,
        });
    }
    CreateTopicsResponse { results }
}

/// Deletes topics through the controller; every replica deletes its data when it applies the
/// change.
pub async fn delete_topics(
    cluster: &Cluster,
    pipelines: &Pipelines,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut results = Vec::with_capacity(req.names.len());
    for name in req.names {
        let status = if let Some(p) = pipelines.using_topic(&name) {
            Status::err(
                ErrorCode::InvalidConfig,
                format!("{name} is used by pipeline {p}; delete the pipeline first"),
            )
        } else {
            outcome_status(
                cluster
                    .write(Command::DeleteTopic { name: name.clone() })
                    .await,
            )
        };
        results.push(TopicResult { name, status });
    }
    DeleteTopicsResponse { results }
}

/// Starts (or cancels) partition moves through the controller; each result says whether the
/// controller committed the start of the move.
pub async fn reassign_partitions(
    cluster: &Cluster,
    req: ReassignPartitionsRequest,
) -> ReassignPartitionsResponse {
    let mut results = Vec::with_capacity(req.partitions.len());
    for p in req.partitions {
        let command = Command::Reassign {
            topic: p.topic.clone(),
            partition: p.partition,
            replicas: p.replicas,
        };
        results.push(PartitionResult {
            topic: p.topic,
            partition: p.partition,
            status: outcome_status(cluster.write(command).await),
        });
    }
    ReassignPartitionsResponse { results }
}

/// An operator's leader elections through the controller.
pub async fn elect_leaders(cluster: &Cluster, req: ElectLeadersRequest) -> ElectLeadersResponse {
    let mut results = Vec::with_capacity(req.partitions.len());
    for (topic, partition) in req.partitions {
        let command = Command::Elect {
            topic: topic.clone(),
            partition,
            unclean: req.election == ElectionType::Unclean,
        };
        results.push(PartitionResult {
            topic,
            partition,
            status: outcome_status(cluster.write(command).await),
        });
    }
    ElectLeadersResponse { results }
}

/// Internal topics a node keeps for itself (its plugin logs), not placed by the controller.
fn node_local(name: &str) -> bool {
    name.starts_with("__")
}

/// Makes the local partitions follow the metadata: hosts what the controller placed here,
/// sets each hosted partition's role (leader, follower, offline), and deletes topics the
/// metadata no longer has. Runs until the node stops.
///
/// Deleting is safe only on metadata at least as new as any this node acted on before: a
/// node replaying its log after a restart passes through older states, in which a replica it
/// was given later (and may be the last in-sync copy of) is absent. So every pass first
/// records its index durably (`reconciled-index`), and until the replay has reached the index
/// recorded before the restart, nothing is deleted.
pub async fn reconcile(cluster: Arc<Cluster>, broker: Arc<Broker>) {
    let me = cluster.node_id();
    let mut changes = cluster.changes();
    let mut isolation = cluster.isolation();
    let floor = load_index(cluster.reconciled_path());
    let mut recorded = if floor == u64::MAX { 0 } else { floor };
    loop {
        type Wanted = (String, TopicConfig, Vec<Placed>);
        // What the metadata says, copied out of the lock.
        let (applied, wanted, wanted_counts): (u64, Vec<Wanted>, Vec<(String, u32)>) =
            cluster.read(|a| {
                let applied = a.last_applied.map_or(0, |l| l.index);
                let counts = a
                    .metadata
                    .control
                    .topics()
                    .map(|(n, p)| (n.to_string(), p.len() as u32))
                    .collect();
                let wanted = a
                    .metadata
                    .control
                    .topics()
                    .map(|(name, parts)| {
                        let placed: Vec<Placed> = parts
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.replicas().contains(&me))
                            .map(|(i, p)| {
                                let s = p.state().clone();
                                let addr = s
                                    .leader
                                    .and_then(|l| a.metadata.peer_addrs.get(&l).cloned())
                                    .unwrap_or_default();
                                Placed {
                                    partition: i as u32,
                                    state: s,
                                    leader_addr: addr,
                                    replicas: p.replicas().to_vec(),
                                }
                            })
                            .collect();
                        // A topic placed elsewhere only is kept too: replicas moved away from
                        // here are deleted below.
                        let mut config = TopicConfig::defaults(parts.len() as u32);
                        let pairs: Vec<(String, String)> = a
                            .metadata
                            .configs
                            .get(name)
                            .map(|c| c.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default();
                        if let Err(e) = config.apply(&pairs) {
                            tracing::warn!(topic = name, error = %e, "settings from the controller refused; using defaults");
                        }
                        config.topic_id = a.metadata.topic_ids.get(name).copied();
                        (name.to_string(), config, placed)
                    })
                    .collect();
                (applied, wanted, counts)
            });
        if applied > recorded {
            let path = cluster.reconciled_path().to_path_buf();
            match tokio::task::spawn_blocking(move || store_index(&path, applied)).await {
                Ok(Ok(())) => recorded = applied,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot record the reconciled metadata index")
                }
                Err(e) => tracing::warn!(error = %e, "cannot record the reconciled metadata index"),
            }
        }
        // Acting on this copy only once it is recorded, and deleting only once it is as new
        // as what was acted on before a restart.
        let may_delete = applied >= floor && recorded >= applied;
        // Local topics whose id the metadata no longer has: deleted (or deleted and created
        // again) while this node was away. Only once this copy has applied past the topic's
        // creation, so a copy still replaying its log never deletes anything.
        let ids: std::collections::BTreeMap<&str, Option<u64>> = wanted
            .iter()
            .map(|(n, c, _)| (n.as_str(), c.topic_id))
            .collect();
        for (name, topic) in broker.topics() {
            if node_local(name.as_str()) {
                continue;
            }
            // A topic from before the node joined a cluster has no id: left alone.
            let Some(local_id) = topic.config.topic_id else {
                continue;
            };
            let current = ids.get(name.as_str()).copied().flatten();
            if current != Some(local_id) && applied >= local_id && may_delete {
                match broker.delete_topic(name.as_str()).await {
                    Ok(()) => {
                        tracing::info!(topic = %name, id = local_id, "deleted: no longer in the metadata")
                    }
                    Err(e) => tracing::warn!(topic = %name, error = %e, "cannot delete"),
                }
            }
        }
        broker.set_cluster_topics(wanted_counts.clone());
        let replicas = cluster.replicas();
        replicas.retain(|t, p| {
            wanted
                .iter()
                .any(|(n, _, placed)| n == t && placed.iter().any(|x| x.partition == p))
        });
        for (name, mut config, placed) in wanted {
            let Ok(topic) = TopicName::new(&name) else {
                continue;
            };
            let local = broker.topic(&name);
            if placed.is_empty() && local.is_none() {
                continue;
            }
            // A local topic of that name that is not this one (from before the node joined a
            // cluster, without an id): left alone, not adopted.
            if let Some(t) = &local
                && t.config.topic_id != config.topic_id
            {
                tracing::warn!(topic = %name, local_id = ?t.config.topic_id, id = ?config.topic_id, "a local topic has the name of a cluster topic; left alone");
                continue;
            }
            // Hosted: what is placed here, and replicas moved away that this copy of the
            // metadata is too old to judge (still replaying the log after a restart).
            let mut hosted: Vec<u32> = placed.iter().map(|x| x.partition).collect();
            let mut since = local
                .as_ref()
                .map(|t| t.config.hosted_since.clone())
                .unwrap_or_default();
            let mut kept = Vec::new();
            if let Some(t) = &local {
                for (p, _) in t.hosted() {
                    if !hosted.contains(&p)
                        && (!may_delete || applied < since.get(&p).copied().unwrap_or(0))
                    {
                        hosted.push(p);
                        kept.push(p);
                    }
                }
            }
            since.retain(|p, _| hosted.contains(p));
            for p in &hosted {
                since.entry(*p).or_insert(applied);
            }
            hosted.sort_unstable();
            if hosted.is_empty() {
                // Every replica here moved away.
                match broker.delete_topic(&name).await {
                    Ok(()) => tracing::info!(topic = %name, "no replica left on this node"),
                    Err(e) => {
                        tracing::warn!(topic = %name, error = %e, "cannot remove a topic whose replicas moved away")
                    }
                }
                continue;
            }
            config.hosted = Some(hosted);
            config.hosted_since = since;
            if let Err(e) = broker.host_topic(&topic, &config).await {
                tracing::warn!(topic = %name, error = %e, "cannot host placed partitions");
                continue;
            }
            for x in placed {
                if let Ok(part) = broker.partition(&name, x.partition) {
                    replicas.update(
                        &cluster,
                        &part,
                        x.state,
                        x.leader_addr,
                        &x.replicas,
                        usize::from(config.min_insync_replicas),
                    );
                }
            }
            for p in kept {
                if let Ok(part) = broker.partition(&name, p) {
                    let epoch = match part.role() {
                        Role::Leader { epoch }
                        | Role::Follower { epoch, .. }
                        | Role::Offline { epoch } => epoch,
                    };
                    part.set_role(Role::Offline { epoch });
                }
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = isolation.changed() => if r.is_err() { return },
        }
    }
}

/// The index recorded in `path`, 0 if none (a node that never reconciled).
fn load_index(path: &std::path::Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(t) => t.trim().parse().unwrap_or_else(|_| {
            // Unreadable: assume the worst, delete nothing until restarted with a good file.
            tracing::warn!(path = %path.display(), "reconciled index unreadable; deleting nothing");
            u64::MAX
        }),
        Err(_) => 0,
    }
}

/// Replaces the index in `path` (temporary file, fsync, rename).
fn store_index(path: &std::path::Path, index: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, format!("{index}\n").as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}
