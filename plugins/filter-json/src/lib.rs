//! `filter-json`: keeps records whose JSON value has a field matching a condition.
//! Parameters and semantics: README.md beside this crate.

use std::cmp::Ordering;

use quiver_plugin::json::{self, FieldPath, Value};
use quiver_plugin::{Config, Filter, Record, Verdict};

enum Op {
    Eq(Value),
    Ne(Value),
    Lt(Value),
    Gt(Value),
    Exists,
    Regex(regex::Regex),
}

/// What to do with a record whose value is not JSON.
#[derive(Clone, Copy)]
enum OnInvalid {
    Fail,
    Drop,
    Keep,
}

struct FilterJson {
    field: FieldPath,
    op: Op,
    on_invalid: OnInvalid,
}

/// The parameter as JSON when it parses (`42`, `true`, `"x"`), else as a string.
fn literal(s: &str) -> Value {
    serde_json_from(s).unwrap_or_else(|| Value::String(s.to_string()))
}

fn serde_json_from(s: &str) -> Option<Value> {
    json::parse(Some(s.as_bytes())).ok()
}

/// Numbers compare as numbers, strings as strings; anything else does not compare.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Equality with numbers compared by value (so `1` equals `1.0`).
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => compare(a, b) == Some(Ordering::Equal),
        _ => a == b,
    }
}

impl Filter for FilterJson {
    fn init(config: &Config) -> Result<Self, String> {
        let field = FieldPath::parse(config.get("field").ok_or("missing parameter: field")?)?;
        let op = config
            .get("op")
            .ok_or("missing parameter: op (eq, ne, lt, gt, exists, regex)")?;
        let value = || {
            config
                .get("value")
                .ok_or(format!("op {op} needs parameter: value"))
        };
        let op = match op {
            "eq" => Op::Eq(literal(value()?)),
            "ne" => Op::Ne(literal(value()?)),
            "lt" => Op::Lt(literal(value()?)),
            "gt" => Op::Gt(literal(value()?)),
            "exists" => Op::Exists,
            "regex" => Op::Regex(
                regex::Regex::new(value()?)
                    .map_err(|e| format!("value is not a valid regex: {e}"))?,
            ),
            other => {
                return Err(format!(
                    "unknown op {other:?}: use eq, ne, lt, gt, exists or regex"
                ));
            }
        };
        let on_invalid = match config.get("on-invalid").unwrap_or("fail") {
            "fail" => OnInvalid::Fail,
            "drop" => OnInvalid::Drop,
            "keep" => OnInvalid::Keep,
            other => {
                return Err(format!(
                    "on-invalid must be fail, drop or keep, not {other:?}"
                ));
            }
        };
        Ok(Self {
            field,
            op,
            on_invalid,
        })
    }

    fn filter(&mut self, record: &Record<'_>) -> Verdict {
        let field = match self.field.extract(record.value) {
            Ok(v) => v,
            Err(e) => {
                return match self.on_invalid {
                    OnInvalid::Fail => Verdict::Fail(e),
                    OnInvalid::Drop => Verdict::Drop,
                    OnInvalid::Keep => Verdict::Keep,
                };
            }
        };
        let keep = match (&self.op, field.as_ref()) {
            (Op::Exists, f) => f.is_some(),
            // A missing field equals nothing, so `ne` keeps it (README).
            (Op::Ne(_), None) => true,
            (_, None) => false,
            (Op::Eq(v), Some(f)) => equal(f, v),
            (Op::Ne(v), Some(f)) => !equal(f, v),
            (Op::Lt(v), Some(f)) => compare(f, v) == Some(Ordering::Less),
            (Op::Gt(v), Some(f)) => compare(f, v) == Some(Ordering::Greater),
            (Op::Regex(re), Some(f)) => re.is_match(&json::as_text(f)),
        };
        Verdict::keep_if(keep)
    }
}

quiver_plugin::export_filter!(FilterJson);
