//! `redact`: masks or removes fields of JSON values. Parameters: README.md beside this crate.

use quiver_plugin::json::{self, FieldPath, Value};
use quiver_plugin::{Config, OutputRecord, Record, Transform};

struct Redact {
    fields: Vec<FieldPath>,
    /// `None`: remove the field; `Some(m)`: replace its value with `m`.
    mask: Option<Value>,
}

impl Transform for Redact {
    fn init(config: &Config) -> Result<Self, String> {
        let fields = config
            .get("fields")
            .ok_or("missing parameter: fields (comma-separated field paths)")?
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(FieldPath::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if fields.is_empty() {
            return Err("fields names no field".into());
        }
        let mask = match config.get("mode").unwrap_or("mask") {
            "mask" => Some(Value::String(
                config.get("mask").unwrap_or("***").to_string(),
            )),
            "drop" => None,
            other => return Err(format!("mode must be mask or drop, not {other:?}")),
        };
        Ok(Self { fields, mask })
    }

    fn transform(
        &mut self,
        record: &Record<'_>,
        out: &mut Vec<OutputRecord>,
    ) -> Result<(), String> {
        let mut doc = json::parse(record.value)?;
        for f in &self.fields {
            match &self.mask {
                Some(mask) => {
                    if let Some(v) = f.get_mut(&mut doc) {
                        *v = mask.clone();
                    }
                }
                None => {
                    f.remove(&mut doc);
                }
            }
        }
        let mut o = OutputRecord::copy_of(record);
        o.value = Some(json::to_vec(&doc));
        out.push(o);
        Ok(())
    }
}

quiver_plugin::export_transform!(Redact);
