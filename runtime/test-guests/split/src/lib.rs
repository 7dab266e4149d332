//! Reference transform for tests: each record becomes one record per comma-separated part of
//! its value (so `""` becomes none), keeping key and headers; a `route` header sends the
//! outputs to that topic. A value of `FAIL` fails the record.

use quiver_plugin::{Config, OutputRecord, Record, Transform};

struct Split;

impl Transform for Split {
    fn init(_: &Config) -> Result<Self, String> {
        Ok(Split)
    }

    fn transform(
        &mut self,
        record: &Record<'_>,
        out: &mut Vec<OutputRecord>,
    ) -> Result<(), String> {
        let value = record.value.unwrap_or_default();
        if value == b"FAIL" {
            return Err(format!(
                "cannot split the record at offset {}",
                record.offset
            ));
        }
        let route = record
            .headers
            .get("route")
            .flatten()
            .map(|t| String::from_utf8_lossy(t).into_owned());
        for part in value.split(|b| *b == b',').filter(|p| !p.is_empty()) {
            let mut o = OutputRecord::copy_of(record);
            o.value = Some(part.to_vec());
            o.topic = route.clone();
            out.push(o);
        }
        Ok(())
    }
}

quiver_plugin::export_transform!(Split);
