//! The node's data plane state: the topic table and the operations on it. Knows nothing about
//! QUIC: `handlers` decode requests and call in here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dashmap::DashMap;
use quiver_proto::{ErrorCode, PartitionId, TopicName};

use crate::catalog::{Catalog, CatalogError};
use crate::chains::RunningChain;
use crate::partition::{Partition, PartitionError};
use crate::plugins::Registry;
use crate::topic_config::{ErrorPolicy, PARTITIONS_MAX, TopicConfig};

/// A partition's produce-side chain: the chain text it was started for, and its instances.
pub type PolicySlot = Arc<tokio::sync::Mutex<Option<(String, RunningChain)>>>;

/// A topic hosted by this node.
#[derive(Debug)]
pub struct Topic {
    /// Effective settings.
    pub config: TopicConfig,
    /// Partitions in index order; `None` for a partition this node holds no replica of
    /// (cluster mode).
    pub partitions: Vec<Option<Arc<Partition>>>,
}

impl Topic {
    /// The partitions this node hosts, with their index.
    pub fn hosted(&self) -> impl Iterator<Item = (u32, &Arc<Partition>)> {
        self.partitions
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as u32, p)))
    }
}

/// An admin operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    /// Protocol code.
    pub code: ErrorCode,
    /// Details.
    pub message: String,
}

impl AdminError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<CatalogError> for AdminError {
    fn from(e: CatalogError) -> Self {
        Self::new(ErrorCode::StorageError, e.to_string())
    }
}

impl From<PartitionError> for AdminError {
    fn from(e: PartitionError) -> Self {
        Self::new(e.code, e.message)
    }
}

/// Topics and partitions of one node.
#[derive(Debug)]
pub struct Broker {
    node_id: u32,
    logs_dir: PathBuf,
    catalog: Catalog,
    plugins: Registry,
    topics: DashMap<TopicName, Arc<Topic>>,
    topic_defaults: Vec<(String, String)>,
    /// Serialises create/delete so a name is never half created.
    admin: tokio::sync::Mutex<()>,
    /// Produce-side chains by (topic, partition), started at the first produce.
    policies: DashMap<(TopicName, u32), PolicySlot>,
    /// Cluster mode: the metadata's topics and their partition counts.
    cluster_topics: DashMap<String, u32>,
}

impl Broker {
    /// Opens the catalog and every partition under `data_dir`, removing partition directories
    /// of topics the catalog does not know (left by an interrupted delete).
    /// The plugin registry.
    pub fn plugins(&self) -> &Registry {
        &self.plugins
    }

    /// The catalog (topics, plugins and pipelines in sled).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub async fn open(
        node_id: u32,
        data_dir: &Path,
        topic_defaults: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let logs_dir = data_dir.join("topics");
        std::fs::create_dir_all(&logs_dir)?;
        let catalog = Catalog::open(&data_dir.join("catalog"))?;
        let plugins = Registry::open(data_dir, &catalog)?;
        let topic_defaults: Vec<(String, String)> = topic_defaults
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Check the defaults once so a bad config file fails at start, not at first create.
        TopicConfig::defaults(1)
            .apply(&topic_defaults)
            .map_err(|e| anyhow::anyhow!("topic_defaults: {e}"))?;
        let broker = Self {
            node_id,
            logs_dir,
            catalog,
            plugins,
            topics: DashMap::new(),
            topic_defaults,
            admin: tokio::sync::Mutex::new(()),
            policies: DashMap::new(),
            cluster_topics: DashMap::new(),
        };
        let known = broker.catalog.topics()?;
        for (name, config) in &known {
            let topic = broker.open_topic(name, config).await?;
            broker.topics.insert(name.clone(), topic);
        }
        broker.remove_orphans(&known)?;
        Ok(broker)
    }

    fn partition_dir(&self, topic: &TopicName, p: u32) -> PathBuf {
        self.logs_dir.join(format!("{topic}-{p}"))
    }

    /// Tidies the topics directory at start: removes `*.deleted` directories (a topic delete
    /// that was interrupted after its rename), and moves any other directory the catalog does
    /// not know to `<name>.orphaned` with a warning. Data the node cannot account for is never
    /// deleted, and never adopted by a new topic of the same name.
    fn remove_orphans(&self, known: &[(TopicName, TopicConfig)]) -> anyhow::Result<()> {
        let keep: std::collections::HashSet<PathBuf> = known
            .iter()
            .flat_map(|(n, c)| c.hosted_partitions().map(move |p| self.partition_dir(n, p)))
            .collect();
        for entry in std::fs::read_dir(&self.logs_dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".deleted") {
                tracing::info!(path = %path.display(), "removing the rest of a deleted partition");
                std::fs::remove_dir_all(&path)?;
            } else if !keep.contains(&path) && !name.contains(".orphaned") {
                let aside = (0..)
                    .map(|n| match n {
                        0 => path.with_file_name(format!("{name}.orphaned")),
                        n => path.with_file_name(format!("{name}.orphaned.{n}")),
                    })
                    .find(|p| !p.exists())
                    .unwrap_or_else(|| path.with_file_name(format!("{name}.orphaned.last")));
                tracing::warn!(path = %path.display(), moved_to = %aside.display(), "partition directory of an unknown topic moved aside");
                std::fs::rename(&path, &aside)?;
            }
        }
        Ok(())
    }

    async fn open_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<Arc<Topic>, PartitionError> {
        let mut partitions = vec![None; config.partitions as usize];
        for p in config.hosted_partitions() {
            let dir = self.partition_dir(name, p);
            partitions[p as usize] =
                Some(Partition::open(name.clone(), PartitionId(p), dir, config).await?);
        }
        Ok(Arc::new(Topic {
            config: config.clone(),
            partitions,
        }))
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        let name = TopicName::new(name).ok()?;
        self.topics.get(&name).map(|t| t.clone())
    }

    /// A partition by topic name and index, or the error to report.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, PartitionError> {
        self.topic(topic)
            .and_then(|t| t.partitions.get(partition as usize).cloned().flatten())
            .ok_or_else(|| PartitionError {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("unknown topic or partition {topic}/{partition}"),
            })
    }

    /// A partition this node leads, for client produce, fetch and offset requests; a follower
    /// answers `not_leader`.
    pub fn leader_partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<Partition>, PartitionError> {
        let p = match self.partition(topic, partition) {
            Ok(p) => p,
            // In a cluster: a partition of the metadata this node holds no replica of (or not
            // yet): another node leads it.
            Err(e)
                if self
                    .cluster_topics
                    .get(topic)
                    .is_some_and(|n| partition < *n) =>
            {
                return Err(PartitionError {
                    code: ErrorCode::NotLeader,
                    message: format!(
                        "node {} holds no replica of {topic}/{partition}; refresh metadata ({e})",
                        self.node_id
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        p.check_leader()?;
        Ok(p)
    }

    /// The topics of the cluster metadata and their partition counts (cluster mode; set by
    /// the reconciler), so requests for partitions hosted elsewhere get `not_leader`.
    pub fn set_cluster_topics(&self, topics: impl IntoIterator<Item = (String, u32)>) {
        let topics: std::collections::HashMap<String, u32> = topics.into_iter().collect();
        self.cluster_topics.retain(|k, _| topics.contains_key(k));
        for (k, v) in topics {
            self.cluster_topics.insert(k, v);
        }
    }

    /// All topics, sorted by name.
    pub fn topics(&self) -> Vec<(TopicName, Arc<Topic>)> {
        let mut v: Vec<_> = self
            .topics
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Checks a new topic's name, partition count and settings (on top of the node defaults)
    /// and returns its effective settings.
    pub fn resolve_new_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<(TopicName, TopicConfig), AdminError> {
        let name = TopicName::new(name)
            .map_err(|e| AdminError::new(ErrorCode::InvalidTopic, e.to_string()))?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(AdminError::new(
                ErrorCode::InvalidPartitions,
                format!("partitions must be 1..={PARTITIONS_MAX}, got {partitions}"),
            ));
        }
        let mut config = TopicConfig::defaults(partitions);
        config
            .apply(&self.topic_defaults)
            .and_then(|_| config.apply(configs))
            .and_then(|_| config.check())
            .map_err(|e| AdminError::new(ErrorCode::InvalidConfig, e))?;
        self.check_policy(&name, &config)?;
        Ok((name, config))
    }

    /// Hosts the partitions `config.hosted` names of a topic the controller placed (cluster
    /// mode): creates the topic locally, opens partitions newly placed here and deletes the
    /// replicas it no longer names. Idempotent.
    pub async fn host_topic(
        &self,
        name: &TopicName,
        config: &TopicConfig,
    ) -> Result<(), AdminError> {
        let _guard = self.admin.lock().await;
        let existing = self.topics.get(name).map(|t| t.clone());
        match existing {
            None => {
                if !self.catalog.insert(name, config)? {
                    self.catalog.update(name, config)?;
                }
                let topic = self.open_topic(name, config).await?;
                self.topics.insert(name.clone(), topic);
                tracing::info!(topic = %name, hosted = ?config.hosted, "hosting topic");
            }
            Some(t) if t.config.hosted != config.hosted => {
                let mut partitions = t.partitions.clone();
                partitions.resize(config.partitions as usize, None);
                for p in config.hosted_partitions() {
                    if partitions[p as usize].is_none() {
                        let dir = self.partition_dir(name, p);
                        partitions[p as usize] =
                            Some(Partition::open(name.clone(), PartitionId(p), dir, config).await?);
                    }
                }
                // Replicas moved off this node: out of the table first, then their files (a
                // crash in between leaves a directory the next start moves aside).
                let hosted: Vec<u32> = config.hosted_partitions().collect();
                let mut removed = Vec::new();
                for (p, slot) in partitions.iter_mut().enumerate() {
                    if slot.is_some() && !hosted.contains(&(p as u32)) {
                        removed.extend(slot.take());
                    }
                }
                self.catalog.update(name, config)?;
                self.topics.insert(
                    name.clone(),
                    Arc::new(Topic {
                        config: config.clone(),
                        partitions,
                    }),
                );
                for p in removed {
                    p.begin_delete();
                    p.close().await;
                    let gone = match p.mark_deleted().await {
                        Ok(()) => p.remove_files().await,
                        Err(e) => Err(e),
                    };
                    match gone {
                        Ok(()) => {
                            tracing::info!(topic = %name, partition = p.id().0, "replica removed from this node")
                        }
                        Err(e) => {
                            tracing::warn!(topic = %name, partition = p.id().0, error = %e, "could not remove a replica moved away; tidied at the next start")
                        }
                    }
                }
                tracing::info!(topic = %name, hosted = ?config.hosted, "hosted partitions changed");
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Creates a topic with `partitions` partitions and settings on top of the node defaults.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(String, String)],
    ) -> Result<(), AdminError> {
        let (name, config) = self.resolve_new_topic(name, partitions, configs)?;
        if config.replication_factor > 1 {
            return Err(AdminError::new(
                ErrorCode::InvalidReplicationFactor,
                format!(
                    "replication.factor {} needs a cluster; this node runs alone",
                    config.replication_factor
                ),
            ));
        }
        let _guard = self.admin.lock().await;
        if self.topics.contains_key(&name) || !self.catalog.insert(&name, &config)? {
            return Err(AdminError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name} already exists"),
            ));
        }
        match self.open_topic(&name, &config).await {
            Ok(topic) => {
                self.topics.insert(name.clone(), topic);
                tracing::info!(topic = %name, partitions, "topic created");
                Ok(())
            }
            Err(e) => {
                // Roll back so the name is usable again.
                let _ = self.catalog.remove(&name);
                Err(e.into())
            }
        }
    }

    /// Checks a topic's plugin policy against what is deployed: every step names a deployed
    /// plugin (and version), and a dead-letter topic exists and is another topic.
    fn check_policy(&self, name: &TopicName, config: &TopicConfig) -> Result<(), AdminError> {
        for step in config.produce_chain() {
            self.plugins
                .deployed_version(&step)
                .map_err(|(code, message)| AdminError::new(code, message))?;
        }
        if let ErrorPolicy::Dlq(dlq) = &config.on_error {
            if dlq == name.as_str() {
                return Err(AdminError::new(
                    ErrorCode::InvalidConfig,
                    format!("plugin.on.error: {name} cannot be its own dead-letter topic"),
                ));
            }
            if self.topic(dlq).is_none() {
                return Err(AdminError::new(
                    ErrorCode::InvalidConfig,
                    format!(
                        "plugin.on.error: dead-letter topic {dlq} does not exist; create it first"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Changes settings of a live topic: `set` applies values, `reset` restores defaults.
    /// Only [`config_keys::ALTERABLE`](quiver_proto::messages::config_keys::ALTERABLE) keys.
    /// A changed produce-side chain takes effect at the next produced batch of each partition
    /// (with new instances: keyed state starts empty).
    pub async fn alter_topic(
        &self,
        name: &str,
        set: &[(String, String)],
        reset: &[String],
    ) -> Result<(), AdminError> {
        use quiver_proto::messages::config_keys as keys;
        let unknown = || {
            AdminError::new(
                ErrorCode::UnknownTopicOrPartition,
                format!("unknown topic {name}"),
            )
        };
        let topic_name = TopicName::new(name).map_err(|_| unknown())?;
        for k in set.iter().map(|(k, _)| k).chain(reset) {
            if !keys::ALTERABLE.contains(&k.as_str()) {
                return Err(AdminError::new(
                    ErrorCode::InvalidConfig,
                    format!(
                        "{k} cannot be changed on a live topic; alterable: {}",
                        keys::ALTERABLE.join(", ")
                    ),
                ));
            }
        }
        let _guard = self.admin.lock().await;
        let topic = self.topic(name).ok_or_else(unknown)?;
        let mut config = topic.config.clone();
        let defaults = TopicConfig::defaults(config.partitions);
        for k in reset {
            match k.as_str() {
                keys::PLUGIN_ON_PRODUCE => config.on_produce = defaults.on_produce.clone(),
                keys::PLUGIN_ON_ERROR => config.on_error = defaults.on_error.clone(),
                _ => {}
            }
        }
        config
            .apply(set)
            .map_err(|e| AdminError::new(ErrorCode::InvalidConfig, e))?;
        self.check_policy(&topic_name, &config)?;
        self.catalog.update(&topic_name, &config)?;
        if config.on_produce != topic.config.on_produce {
            // The old chain's instances go (and with them its attachments); the new one starts
            // at the next produce.
            self.policies.retain(|(t, _), _| *t != topic_name);
        }
        self.topics.insert(
            topic_name.clone(),
            Arc::new(Topic {
                config,
                partitions: topic.partitions.clone(),
            }),
        );
        tracing::info!(topic = %topic_name, "topic settings changed");
        Ok(())
    }

    /// Drops produce-side chains that are idle (no produce running them) and run `key`
    /// (`name@version`), releasing their attachment; they restart at the next produce.
    pub fn release_idle_policies(&self, key: &str) {
        self.policies.retain(|_, slot| match slot.try_lock() {
            Ok(g) => !g.as_ref().is_some_and(|(_, c)| c.keys().any(|k| k == key)),
            Err(_) => true,
        });
    }

    /// The produce-side chain slot of a partition.
    pub fn policy_slot(&self, topic: &TopicName, partition: u32) -> PolicySlot {
        self.policies
            .entry((topic.clone(), partition))
            .or_default()
            .clone()
    }

    /// A topic whose produce-side policy uses `name@version` (naming it, or naming `name`
    /// without a version while `version` is the highest deployed), or whose dead-letter
    /// The first found, for the error message.
    pub fn policy_using(&self, name: &str, version: &str) -> Option<TopicName> {
        self.topics().into_iter().find_map(|(t, topic)| {
            let uses = topic.config.produce_chain().iter().any(|s| {
                s.plugin == name
                    && (s.version == version
                        || (s.version.is_empty()
                            && self.plugins.deployed_version(s).is_ok_and(|v| v == version)))
            });
            uses.then_some(t)
        })
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<(), AdminError> {
        let unknown = || {
            AdminError::new(
                ErrorCode::UnknownTopicOrPartition,
                format!("unknown topic {name}"),
            )
        };
        let name = TopicName::new(name).map_err(|_| unknown())?;
        let _guard = self.admin.lock().await;
        if let Some(user) = self.topics().into_iter().find_map(|(t, topic)| {
            (topic.config.on_error == ErrorPolicy::Dlq(name.to_string())).then_some(t)
        }) {
            return Err(AdminError::new(
                ErrorCode::InvalidConfig,
                format!("{name} is the dead-letter topic of {user}; change that policy first"),
            ));
        }
        let Some((_, topic)) = self.topics.remove(&name) else {
            return Err(unknown());
        };
        self.policies.retain(|(t, _), _| *t != name);
        // Close and rename every partition first, then forget the topic: a crash in between
        // leaves either the topic with (some) empty partitions, or `*.deleted` directories
        // that the next start removes — never old data under a live name.
        //
        // The delete always rolls forward once the topic left the table: a partition that
        // cannot be renamed or removed now is logged and tidied at the next start (its
        // directory is then unknown to the catalog and moved aside, or `*.deleted` and removed).
        for (_, p) in topic.hosted() {
            p.begin_delete();
            p.close().await;
            if let Err(e) = p.mark_deleted().await {
                tracing::error!(topic = %name, partition = p.id().0, error = %e, "could not rename a deleted partition; it is moved aside at the next start");
            }
        }
        self.catalog.remove(&name)?;
        for (_, p) in topic.hosted() {
            if let Err(e) = p.remove_files().await {
                tracing::warn!(topic = %name, partition = p.id().0, error = %e, "could not remove a deleted partition; removed at the next start");
            }
        }
        tracing::info!(topic = %name, "topic deleted");
        Ok(())
    }

    /// Runs retention on every partition. Blocking: call from a blocking thread.
    pub fn enforce_retention_blocking(&self) {
        for (_, topic) in self.topics() {
            for (_, p) in topic.hosted() {
                if let Err(e) = p.enforce_retention_blocking() {
                    tracing::warn!(topic = %p.topic(), partition = p.id().0, error = %e, "retention failed");
                }
            }
        }
    }

    /// Stops every partition's appender after flushing.
    pub async fn close(&self) {
        for (_, topic) in self.topics() {
            for (_, p) in topic.hosted() {
                p.close().await;
            }
        }
    }
}
