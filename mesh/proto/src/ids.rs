//! Newtypes for the identifiers every layer shares, validated once at the edge.

use std::fmt;

/// Longest topic name accepted, in bytes (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

/// A validated topic name: 1..=249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// The character set keeps names safe as directory names on every file system.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than [`TOPIC_NAME_BYTES_MAX`].
    #[error("topic name is {0} bytes, more than the maximum of 249")]
    TooLong(usize),
    /// The name is `.` or `..`.
    #[error("topic name may not be '.' or '..'")]
    Reserved,
    /// The name holds a character outside `[A-Za-z0-9._-]`.
    #[error("topic name holds {0:?}; only ASCII letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
}

impl TopicName {
    /// Validates and wraps a topic name.
    pub fn new(name: impl Into<String>) -> Result<Self, TopicNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(TopicNameError::Empty);
        }
        if name.len() > TOPIC_NAME_BYTES_MAX {
            return Err(TopicNameError::TooLong(name.len()));
        }
        if name == "." || name == ".." {
            return Err(TopicNameError::Reserved);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(TopicNameError::BadChar(c));
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for TopicName {
    type Err = TopicNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Index of a partition within its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Position of a record in its partition's log. Offsets start at 0 and grow by one per record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The epoch of the partition leader that appended a batch; bumped on every leader change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LeaderEpoch(pub u32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(TopicName::new("orders.v1_eu-west").is_ok());
        assert_eq!(TopicName::new(""), Err(TopicNameError::Empty));
        assert_eq!(TopicName::new(".."), Err(TopicNameError::Reserved));
        assert_eq!(TopicName::new("a/b"), Err(TopicNameError::BadChar('/')));
        assert_eq!(
            TopicName::new("x".repeat(250)),
            Err(TopicNameError::TooLong(250))
        );
        assert!(TopicName::new("x".repeat(249)).is_ok());
    }
}
