//! `route`: sends each record to an output topic chosen by a JSON field or a header.
//! Parameters: README.md beside this crate.

use std::collections::HashMap;

use quiver_plugin::json::{self, FieldPath};
use quiver_plugin::{Config, OutputRecord, Record, Transform};

enum Source {
    Field(FieldPath),
    Header(String),
}

struct Route {
    source: Source,
    /// Value → topic; empty: the topic is `prefix` + the value itself.
    map: HashMap<String, String>,
    prefix: String,
    /// Topic for records without the field/header or with an unmapped value; `None` keeps
    /// them on the attachment's own output.
    default: Option<String>,
}

impl Transform for Route {
    fn init(config: &Config) -> Result<Self, String> {
        let source = match (config.get("field"), config.get("header")) {
            (Some(f), None) => Source::Field(FieldPath::parse(f)?),
            (None, Some(h)) => Source::Header(h.to_string()),
            _ => return Err("give exactly one of the parameters field and header".into()),
        };
        let mut map = HashMap::new();
        if let Some(m) = config.get("map") {
            for pair in m.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (value, topic) = pair
                    .split_once(':')
                    .ok_or(format!("map entry {pair:?} is not value:topic"))?;
                map.insert(value.to_string(), topic.to_string());
            }
        }
        Ok(Self {
            source,
            map,
            prefix: config.get("prefix").unwrap_or("").to_string(),
            default: config.get("default").map(str::to_string),
        })
    }

    fn transform(
        &mut self,
        record: &Record<'_>,
        out: &mut Vec<OutputRecord>,
    ) -> Result<(), String> {
        let selector = match &self.source {
            Source::Header(h) => record
                .headers
                .get(h)
                .flatten()
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            Source::Field(f) => {
                let doc = json::parse(record.value)?;
                f.get(&doc).map(json::as_text)
            }
        };
        let topic = match selector {
            Some(v) if self.map.is_empty() => Some(format!("{}{v}", self.prefix)),
            Some(v) => self.map.get(&v).cloned().or_else(|| self.default.clone()),
            None => self.default.clone(),
        };
        let mut o = OutputRecord::copy_of(record);
        o.topic = topic;
        out.push(o);
        Ok(())
    }
}

quiver_plugin::export_transform!(Route);
