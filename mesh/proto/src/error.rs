//! Error codes carried in responses. Every code is documented in PROTOCOL.md; codes are never
//! reused for a different meaning.

/// A protocol error code (`u16` on the wire). `0` means success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Success.
    None,
    /// An unexpected server-side failure; the message says more.
    Unknown,
    /// The request frame or body could not be decoded.
    InvalidRequest,
    /// The request names an API this server does not implement.
    UnsupportedApi,
    /// The request's API version is not supported.
    UnsupportedVersion,
    /// A frame's length prefix exceeds the server's limit.
    FrameTooLarge,
    /// The topic or partition does not exist.
    UnknownTopicOrPartition,
    /// A topic with this name already exists.
    TopicAlreadyExists,
    /// The topic name is not valid.
    InvalidTopic,
    /// The partition count is not valid.
    InvalidPartitions,
    /// A topic setting is not valid.
    InvalidConfig,
    /// The replication factor is 0 or larger than the number of live brokers.
    InvalidReplicationFactor,
    /// A replica list is empty, repeats a broker, names a broker that is not registered, or
    /// would leave a partition no in-sync replica.
    InvalidReplicaAssignment,
    /// A batch failed its CRC check.
    CorruptBatch,
    /// A batch is structurally invalid (bad header, records, timestamps or attributes).
    InvalidBatch,
    /// A record is larger than the topic's `max_record_bytes`, or a batch larger than allowed.
    RecordTooLarge,
    /// The fetch offset is outside the partition's log.
    OffsetOutOfRange,
    /// The request did not complete within its timeout.
    RequestTimedOut,
    /// The broker could not read or write its storage.
    StorageError,
    /// The broker is shutting down and refuses new work.
    ShuttingDown,
    /// This broker is not the partition's leader (cluster mode).
    NotLeader,
    /// Fewer in-sync replicas than the topic requires (cluster mode).
    NotEnoughReplicas,
    /// The server is at a limit (connections, in-flight requests); retry later.
    Busy,
    /// No plugin deployed under that name (and version).
    PluginNotFound,
    /// name@version is deployed with different bytes (versions are immutable).
    PluginExists,
    /// The component is not a valid plugin (not a component, neither world, unknown imports).
    InvalidPlugin,
    /// A plugin failed on this data (trap, timeout, out of memory, invalid output, init
    /// refused its parameters, or a record it failed under the `fail` policy).
    PluginFailed,
    /// The plugin version is attached (a topic policy, a pipeline or an open fetch chain).
    PluginInUse,
    /// No pipeline with that name.
    PipelineNotFound,
    /// A pipeline with that name exists.
    PipelineExists,
    /// The peer is not the active controller (peer protocol); the answer names the leader
    /// when it is known.
    NotController,
    /// The request names an older incarnation of the broker (its broker epoch was replaced).
    StaleBrokerEpoch,
    /// The operation needs a cluster (the node runs alone).
    NotInCluster,
    /// The election would not change the leader (the preferred replica leads already, or an
    /// unclean election for a partition that has a leader).
    ElectionNotNeeded,
    /// No replica can be elected by the rule asked for (none live, or the preferred replica
    /// not in sync).
    EligibleLeadersNotAvailable,
    /// A cancellation, but the partition is not being reassigned.
    NoReassignmentInProgress,
    /// A code this client does not know (from a newer server).
    Unrecognized(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::None => 0,
            ErrorCode::Unknown => 1,
            ErrorCode::InvalidRequest => 2,
            ErrorCode::UnsupportedApi => 3,
            ErrorCode::UnsupportedVersion => 4,
            ErrorCode::FrameTooLarge => 5,
            ErrorCode::UnknownTopicOrPartition => 10,
            ErrorCode::TopicAlreadyExists => 11,
            ErrorCode::InvalidTopic => 12,
            ErrorCode::InvalidPartitions => 13,
            ErrorCode::InvalidConfig => 14,
            ErrorCode::InvalidReplicationFactor => 15,
            ErrorCode::InvalidReplicaAssignment => 16,
            ErrorCode::CorruptBatch => 20,
            ErrorCode::InvalidBatch => 21,
            ErrorCode::RecordTooLarge => 22,
            ErrorCode::OffsetOutOfRange => 30,
            ErrorCode::RequestTimedOut => 40,
            ErrorCode::StorageError => 41,
            ErrorCode::ShuttingDown => 42,
            ErrorCode::Busy => 43,
            ErrorCode::NotLeader => 50,
            ErrorCode::NotEnoughReplicas => 51,
            ErrorCode::PluginNotFound => 60,
            ErrorCode::PluginExists => 61,
            ErrorCode::InvalidPlugin => 62,
            ErrorCode::PluginFailed => 63,
            ErrorCode::PluginInUse => 64,
            ErrorCode::PipelineNotFound => 70,
            ErrorCode::PipelineExists => 71,
            ErrorCode::NotController => 80,
            ErrorCode::StaleBrokerEpoch => 81,
            ErrorCode::NotInCluster => 82,
            ErrorCode::ElectionNotNeeded => 83,
            ErrorCode::EligibleLeadersNotAvailable => 84,
            ErrorCode::NoReassignmentInProgress => 85,
            ErrorCode::Unrecognized(c) => c,
        }
    }

    /// The code for a wire value.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => ErrorCode::None,
            1 => ErrorCode::Unknown,
            2 => ErrorCode::InvalidRequest,
            3 => ErrorCode::UnsupportedApi,
            4 => ErrorCode::UnsupportedVersion,
            5 => ErrorCode::FrameTooLarge,
            10 => ErrorCode::UnknownTopicOrPartition,
            11 => ErrorCode::TopicAlreadyExists,
            12 => ErrorCode::InvalidTopic,
            13 => ErrorCode::InvalidPartitions,
            14 => ErrorCode::InvalidConfig,
            15 => ErrorCode::InvalidReplicationFactor,
            16 => ErrorCode::InvalidReplicaAssignment,
            20 => ErrorCode::CorruptBatch,
            21 => ErrorCode::InvalidBatch,
            22 => ErrorCode::RecordTooLarge,
            30 => ErrorCode::OffsetOutOfRange,
            40 => ErrorCode::RequestTimedOut,
            41 => ErrorCode::StorageError,
            42 => ErrorCode::ShuttingDown,
            43 => ErrorCode::Busy,
            50 => ErrorCode::NotLeader,
            51 => ErrorCode::NotEnoughReplicas,
            60 => ErrorCode::PluginNotFound,
            61 => ErrorCode::PluginExists,
            62 => ErrorCode::InvalidPlugin,
            63 => ErrorCode::PluginFailed,
            64 => ErrorCode::PluginInUse,
            70 => ErrorCode::PipelineNotFound,
            71 => ErrorCode::PipelineExists,
            80 => ErrorCode::NotController,
            81 => ErrorCode::StaleBrokerEpoch,
            82 => ErrorCode::NotInCluster,
            83 => ErrorCode::ElectionNotNeeded,
            84 => ErrorCode::EligibleLeadersNotAvailable,
            85 => ErrorCode::NoReassignmentInProgress,
            c => ErrorCode::Unrecognized(c),
        }
    }

    /// A stable snake_case name, as printed by the CLI.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::Unknown => "unknown",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedApi => "unsupported_api",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownTopicOrPartition => "unknown_topic_or_partition",
            ErrorCode::TopicAlreadyExists => "topic_already_exists",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::InvalidPartitions => "invalid_partitions",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::InvalidReplicationFactor => "invalid_replication_factor",
            ErrorCode::InvalidReplicaAssignment => "invalid_replica_assignment",
            ErrorCode::CorruptBatch => "corrupt_batch",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::RecordTooLarge => "record_too_large",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::RequestTimedOut => "request_timed_out",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Busy => "busy",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::NotEnoughReplicas => "not_enough_replicas",
            ErrorCode::PluginNotFound => "plugin_not_found",
            ErrorCode::PluginExists => "plugin_exists",
            ErrorCode::InvalidPlugin => "invalid_plugin",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::PluginInUse => "plugin_in_use",
            ErrorCode::PipelineNotFound => "pipeline_not_found",
            ErrorCode::PipelineExists => "pipeline_exists",
            ErrorCode::NotController => "not_controller",
            ErrorCode::StaleBrokerEpoch => "stale_broker_epoch",
            ErrorCode::NotInCluster => "not_in_cluster",
            ErrorCode::ElectionNotNeeded => "election_not_needed",
            ErrorCode::EligibleLeadersNotAvailable => "eligible_leaders_not_available",
            ErrorCode::NoReassignmentInProgress => "no_reassignment_in_progress",
            ErrorCode::Unrecognized(_) => "unrecognized",
        }
    }

    /// Whether a client may safely retry the same request after this error.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::RequestTimedOut
                | ErrorCode::NotLeader
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::NotController
                | ErrorCode::Busy
                | ErrorCode::ShuttingDown
        )
    }

    /// Every defined code, for documentation tests.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedApi,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownTopicOrPartition,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidTopic,
        ErrorCode::InvalidPartitions,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidReplicationFactor,
        ErrorCode::InvalidReplicaAssignment,
        ErrorCode::CorruptBatch,
        ErrorCode::InvalidBatch,
        ErrorCode::RecordTooLarge,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::RequestTimedOut,
        ErrorCode::StorageError,
        ErrorCode::ShuttingDown,
        ErrorCode::Busy,
        ErrorCode::NotLeader,
        ErrorCode::NotEnoughReplicas,
        ErrorCode::PluginNotFound,
        ErrorCode::PluginExists,
        ErrorCode::InvalidPlugin,
        ErrorCode::PluginFailed,
        ErrorCode::PluginInUse,
        ErrorCode::PipelineNotFound,
        ErrorCode::PipelineExists,
        ErrorCode::NotController,
        ErrorCode::StaleBrokerEpoch,
        ErrorCode::NotInCluster,
        ErrorCode::ElectionNotNeeded,
        ErrorCode::EligibleLeadersNotAvailable,
        ErrorCode::NoReassignmentInProgress,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), c);
            assert!(seen.insert(c.code()), "duplicate code {}", c.code());
        }
        assert_eq!(ErrorCode::from_code(9999), ErrorCode::Unrecognized(9999));
    }

    #[test]
    fn protocol_md_documents_every_code() {
        let doc = include_str!("../../../PROTOCOL.md");
        for &c in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", c.code(), c.name());
            assert!(doc.contains(&row), "PROTOCOL.md lacks the row {row:?}");
        }
    }
}
