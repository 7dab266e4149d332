//! The topic catalog: which topics exist and their settings, in a `sled` tree in the node's data
//! directory. Every change is flushed before it is acknowledged, so a created topic survives a
//! crash the moment the client hears "created".

use std::path::Path;

use quiver_proto::TopicName;

use crate::topic_config::TopicConfig;

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The embedded database failed.
    #[error("catalog database: {0}")]
    Db(#[from] sled::Error),
    /// A stored entry could not be decoded.
    #[error("catalog entry for {name:?} is unreadable: {reason}")]
    Corrupt {
        /// Key of the entry.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// Node-local metadata store.
#[derive(Debug, Clone)]
pub struct Catalog {
    db: sled::Db,
    topics: sled::Tree,
}

impl Catalog {
    /// Opens (creating) the catalog under `dir`.
    pub fn open(dir: &Path) -> Result<Self, CatalogError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let topics = db.open_tree("topics")?;
        Ok(Self { db, topics })
    }

    /// Another tree of the same database (flushed by [`Catalog::flush`]).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, CatalogError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<(), CatalogError> {
        self.db.flush()?;
        Ok(())
    }

    /// All topics with their settings.
    pub fn topics(&self) -> Result<Vec<(TopicName, TopicConfig)>, CatalogError> {
        let mut out = Vec::new();
        for item in self.topics.iter() {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let corrupt = |reason: String| CatalogError::Corrupt {
                name: name.clone(),
                reason,
            };
            let topic = TopicName::new(name.clone()).map_err(|e| corrupt(e.to_string()))?;
            let config: TopicConfig =
                serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
            out.push((topic, config));
        }
        Ok(out)
    }

    /// Records a topic durably. Returns false if it already existed (nothing changed).
    pub fn insert(&self, name: &TopicName, config: &TopicConfig) -> Result<bool, CatalogError> {
        let value = serde_json::to_vec(config).map_err(|e| CatalogError::Corrupt {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        let swapped =
            self.topics
                .compare_and_swap(name.as_str(), None as Option<&[u8]>, Some(value))?;
        self.db.flush()?;
        Ok(swapped.is_ok())
    }

    /// Replaces a known topic's settings durably.
    pub fn update(&self, name: &TopicName, config: &TopicConfig) -> Result<(), CatalogError> {
        let value = serde_json::to_vec(config).map_err(|e| CatalogError::Corrupt {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        self.topics.insert(name.as_str(), value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes a topic durably. Returns false if it did not exist.
    pub fn remove(&self, name: &TopicName) -> Result<bool, CatalogError> {
        let old = self.topics.remove(name.as_str())?;
        self.db.flush()?;
        Ok(old.is_some())
    }
}
