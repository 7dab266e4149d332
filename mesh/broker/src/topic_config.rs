//! Topic settings: parsed and validated from the protocol's string pairs, stored in the catalog,
//! and turned into the log's configuration.

use std::collections::BTreeMap;

use quiver_log::LogConfig;
use quiver_proto::messages::{ChainStep, config_keys as keys, format_chain, parse_chain};
use serde::{Deserialize, Serialize};

/// Largest record a topic may allow, bytes (bounded by the request frame limit).
pub const MAX_RECORD_BYTES_CEILING: u64 = 32 << 20;
/// Most partitions one topic may have.
pub const PARTITIONS_MAX: u32 = 10_000;

/// When the log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlushPolicy {
    /// fsync before acknowledging each produce (concurrent produces share one fsync: group commit).
    Batch,
    /// Acknowledge after the append; fsync at least every `flush.interval.ms`.
    Interval,
}

/// Effective settings of one topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions.
    pub partitions: u32,
    /// `retention.ms`; `-1` keeps forever.
    pub retention_ms: i64,
    /// `retention.bytes`; `-1` is unlimited.
    pub retention_bytes: i64,
    /// `segment.bytes`.
    pub segment_bytes: u64,
    /// `segment.ms`.
    pub segment_ms: i64,
    /// `flush.policy`.
    pub flush_policy: FlushPolicy,
    /// `flush.interval.ms`.
    pub flush_interval_ms: u64,
    /// `max.record.bytes`.
    pub max_record_bytes: u64,
    /// `plugin.on.produce`: the produce-side chain in canonical text form; empty for none.
    #[serde(default)]
    pub on_produce: String,
    /// `plugin.on.error`.
    #[serde(default)]
    pub on_error: ErrorPolicy,
    /// `replication.factor`.
    #[serde(default = "one")]
    pub replication_factor: u16,
    /// `min.insync.replicas`.
    #[serde(default = "one")]
    pub min_insync_replicas: u16,
    /// The partitions this node holds a replica of, in cluster mode (`None`: all of them, a
    /// node alone). Not a setting: the catalog's record of the controller's placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosted: Option<Vec<u32>>,
    /// The controller's id of the topic (cluster mode): the log index of its creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<u64>,
    /// Per hosted partition, the metadata index this node had applied when it began hosting
    /// it (cluster mode). A replica is deleted for a placement that leaves this node out only
    /// once the node has applied past this index, so a node replaying an older part of the
    /// metadata log never deletes a replica it was given later.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub hosted_since: std::collections::BTreeMap<u32, u64>,
}

fn one() -> u16 {
    1
}

/// What a plugin attachment does with records its chain fails (and with a whole batch when a
/// plugin itself fails on it: trap, timeout, out of memory, invalid output).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorPolicy {
    /// Refuse the produce (the partition answers `plugin_failed`, naming the record).
    #[default]
    Fail,
    /// Drop the failed records and store the rest.
    Skip,
    /// Write the failed records, unchanged, to this topic with headers naming the plugin, the
    /// error and the source; store the rest.
    Dlq(String),
}

impl std::fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorPolicy::Fail => f.write_str("fail"),
            ErrorPolicy::Skip => f.write_str("skip"),
            ErrorPolicy::Dlq(t) => write!(f, "dlq:{t}"),
        }
    }
}

impl std::str::FromStr for ErrorPolicy {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        match v {
            "fail" => Ok(ErrorPolicy::Fail),
            "skip" => Ok(ErrorPolicy::Skip),
            _ => match v.strip_prefix("dlq:") {
                Some(t) => quiver_proto::TopicName::new(t)
                    .map(|_| ErrorPolicy::Dlq(t.to_string()))
                    .map_err(|e| format!("dlq topic {t:?}: {e}")),
                None => Err(format!(
                    "{v:?} is not an error policy; expected fail, skip or dlq:TOPIC"
                )),
            },
        }
    }
}

/// Parses and checks a chain's text form (names and versions well formed).
pub fn check_chain_text(text: &str) -> Result<Vec<ChainStep>, String> {
    let chain = parse_chain(text)?;
    for s in &chain {
        crate::plugins::check_name(&s.plugin)?;
        if !s.version.is_empty() {
            crate::plugins::check_version(&s.version)?;
        }
    }
    Ok(chain)
}

impl TopicConfig {
    /// Server defaults for a topic with `partitions` partitions.
    pub fn defaults(partitions: u32) -> Self {
        Self {
            partitions,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            flush_policy: FlushPolicy::Interval,
            flush_interval_ms: 1000,
            max_record_bytes: 4 << 20,
            on_produce: String::new(),
            on_error: ErrorPolicy::Fail,
            replication_factor: 1,
            min_insync_replicas: 1,
            hosted: None,
            topic_id: None,
            hosted_since: Default::default(),
        }
    }

    /// The partitions this node hosts.
    pub fn hosted_partitions(&self) -> impl Iterator<Item = u32> + '_ {
        let all = self.hosted.is_none().then_some(0..self.partitions);
        all.into_iter()
            .flatten()
            .chain(self.hosted.iter().flatten().copied())
    }

    /// Checks settings that depend on each other, after [`apply`](Self::apply).
    pub fn check(&self) -> Result<(), String> {
        if self.min_insync_replicas > self.replication_factor {
            return Err(format!(
                "min.insync.replicas {} exceeds replication.factor {}",
                self.min_insync_replicas, self.replication_factor
            ));
        }
        Ok(())
    }

    /// The produce-side chain (empty for none).
    pub fn produce_chain(&self) -> Vec<ChainStep> {
        // Checked when set; a catalog edited by hand that no longer parses runs no chain
        // rather than failing every produce.
        parse_chain(&self.on_produce).unwrap_or_default()
    }

    /// Applies `key=value` settings on top of `self`, validating each.
    pub fn apply(&mut self, configs: &[(String, String)]) -> Result<(), String> {
        for (k, v) in configs {
            let int = |v: &str| -> Result<i64, String> {
                v.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{k}: {v:?} is not an integer"))
            };
            match k.as_str() {
                keys::RETENTION_MS => self.retention_ms = at_least(k, int(v)?, -1)?,
                keys::RETENTION_BYTES => self.retention_bytes = at_least(k, int(v)?, -1)?,
                keys::SEGMENT_BYTES => {
                    self.segment_bytes = within(k, int(v)?, 1024, 1 << 31)? as u64;
                }
                keys::SEGMENT_MS => self.segment_ms = at_least(k, int(v)?, 1)?,
                keys::FLUSH_POLICY => {
                    self.flush_policy = match v.as_str() {
                        "batch" => FlushPolicy::Batch,
                        "interval" => FlushPolicy::Interval,
                        other => {
                            return Err(format!(
                                "{k}: {other:?} is not a policy; expected batch or interval"
                            ));
                        }
                    }
                }
                keys::FLUSH_INTERVAL_MS => {
                    self.flush_interval_ms = within(k, int(v)?, 1, 3_600_000)? as u64;
                }
                keys::MAX_RECORD_BYTES => {
                    self.max_record_bytes =
                        within(k, int(v)?, 1, MAX_RECORD_BYTES_CEILING as i64)? as u64;
                }
                keys::PLUGIN_ON_PRODUCE => {
                    let chain = check_chain_text(v).map_err(|e| format!("{k}: {e}"))?;
                    self.on_produce = format_chain(&chain);
                }
                keys::PLUGIN_ON_ERROR => {
                    self.on_error = v.parse().map_err(|e| format!("{k}: {e}"))?;
                }
                keys::REPLICATION_FACTOR => {
                    self.replication_factor = within(k, int(v)?, 1, 16)? as u16;
                }
                keys::MIN_INSYNC_REPLICAS => {
                    self.min_insync_replicas = within(k, int(v)?, 1, 16)? as u16;
                }
                other => {
                    return Err(format!(
                        "unknown setting {other:?}; known: {}",
                        keys::ALL.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every setting as string pairs, in documentation order.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let policy = match self.flush_policy {
            FlushPolicy::Batch => "batch",
            FlushPolicy::Interval => "interval",
        };
        let pairs: BTreeMap<&str, String> = [
            (keys::RETENTION_MS, self.retention_ms.to_string()),
            (keys::RETENTION_BYTES, self.retention_bytes.to_string()),
            (keys::SEGMENT_BYTES, self.segment_bytes.to_string()),
            (keys::SEGMENT_MS, self.segment_ms.to_string()),
            (keys::FLUSH_POLICY, policy.to_string()),
            (keys::FLUSH_INTERVAL_MS, self.flush_interval_ms.to_string()),
            (keys::MAX_RECORD_BYTES, self.max_record_bytes.to_string()),
            (keys::PLUGIN_ON_PRODUCE, self.on_produce.clone()),
            (keys::PLUGIN_ON_ERROR, self.on_error.to_string()),
            (
                keys::REPLICATION_FACTOR,
                self.replication_factor.to_string(),
            ),
            (
                keys::MIN_INSYNC_REPLICAS,
                self.min_insync_replicas.to_string(),
            ),
        ]
        .into_iter()
        .collect();
        keys::ALL
            .iter()
            .filter_map(|k| pairs.get(k).map(|v| ((*k).to_string(), v.clone())))
            .collect()
    }

    /// The log configuration for one partition of this topic.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            retention_ms: (self.retention_ms >= 0).then_some(self.retention_ms),
            retention_bytes: u64::try_from(self.retention_bytes).ok(),
            ..LogConfig::default()
        }
    }
}

fn at_least(k: &str, v: i64, min: i64) -> Result<i64, String> {
    if v < min {
        return Err(format!("{k}: {v} is below the minimum of {min}"));
    }
    Ok(v)
}

fn within(k: &str, v: i64, min: i64, max: i64) -> Result<i64, String> {
    if v < min || v > max {
        return Err(format!("{k}: {v} is outside {min}..={max}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn apply_and_render() {
        let mut c = TopicConfig::defaults(3);
        c.apply(&pairs(&[
            ("retention.ms", "60000"),
            ("flush.policy", "batch"),
            ("max.record.bytes", "2097152"),
            (
                "plugin.on.produce",
                "redact@1.0.0   fields=ssn|filter-json field=a op=exists",
            ),
            ("plugin.on.error", "dlq:bad-records"),
        ]))
        .unwrap();
        assert_eq!(
            c.on_produce,
            "redact@1.0.0 fields=ssn | filter-json field=a op=exists"
        );
        assert_eq!(c.produce_chain().len(), 2);
        assert_eq!(c.on_error, ErrorPolicy::Dlq("bad-records".into()));
        assert_eq!(c.retention_ms, 60_000);
        assert_eq!(c.flush_policy, FlushPolicy::Batch);
        let rendered = c.to_pairs();
        assert_eq!(rendered.len(), keys::ALL.len());
        let mut back = TopicConfig::defaults(3);
        back.apply(&rendered).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = TopicConfig::defaults(1);
        for bad in [
            ("retention.ms", "soon"),
            ("retention.ms", "-5"),
            ("segment.bytes", "10"),
            ("flush.policy", "sometimes"),
            ("max.record.bytes", "999999999999"),
            ("colour", "blue"),
            ("plugin.on.produce", "Bad-Name"),
            ("plugin.on.produce", "redact@1"),
            ("plugin.on.produce", "redact |"),
            ("plugin.on.error", "ignore"),
            ("plugin.on.error", "dlq:"),
            ("plugin.on.error", "dlq:bad name"),
            ("replication.factor", "0"),
            ("min.insync.replicas", "17"),
        ] {
            assert!(c.apply(&pairs(&[bad])).is_err(), "{bad:?} accepted");
        }
    }
}
