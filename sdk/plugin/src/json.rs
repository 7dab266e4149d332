//! Fields of JSON values, for plugins that filter, redact or route by them (feature `json`).
//!
//! A field path is either a JSON pointer (RFC 6901, `/user/address/city`, `/items/0`) or the
//! dotted shorthand `user.address.city` (no escaping; use a pointer for names with dots).

pub use serde_json::Value;

/// A parsed field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    pointer: String,
}

impl FieldPath {
    /// Parses `path` (a JSON pointer or the dotted form).
    pub fn parse(path: &str) -> Result<Self, String> {
        if path.is_empty() {
            return Err("empty field path".into());
        }
        let pointer = if path.starts_with('/') {
            path.to_string()
        } else {
            path.split('.')
                .map(|seg| {
                    if seg.is_empty() {
                        Err(format!("field path {path:?} has an empty segment"))
                    } else {
                        Ok(format!("/{}", seg.replace('~', "~0").replace('/', "~1")))
                    }
                })
                .collect::<Result<String, String>>()?
        };
        Ok(Self { pointer })
    }

    /// The JSON pointer form.
    pub fn pointer(&self) -> &str {
        &self.pointer
    }

    /// The field in `value`, if present.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        value.pointer(&self.pointer)
    }

    /// The field in `value`, mutably, if present.
    pub fn get_mut<'v>(&self, value: &'v mut Value) -> Option<&'v mut Value> {
        value.pointer_mut(&self.pointer)
    }

    /// Removes the field from `value`; whether it was there.
    pub fn remove(&self, value: &mut Value) -> bool {
        let (parent, last) = match self.pointer.rfind('/') {
            Some(i) => (&self.pointer[..i], &self.pointer[i + 1..]),
            None => return false,
        };
        let last = last.replace("~1", "/").replace("~0", "~");
        match value.pointer_mut(parent) {
            Some(Value::Object(map)) => map.remove(&last).is_some(),
            Some(Value::Array(items)) => match last.parse::<usize>() {
                Ok(i) if i < items.len() => {
                    items.remove(i);
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// Parses a record value as JSON.
pub fn parse(value: Option<&[u8]>) -> Result<Value, String> {
    let bytes = value.ok_or("record has no value (tombstone)")?;
    serde_json::from_slice(bytes).map_err(|e| format!("value is not JSON: {e}"))
}

/// Serialises `value` compactly.
pub fn to_vec(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A JSON scalar as text: strings without quotes, other values as JSON.
pub fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths() {
        let v: Value = serde_json::from_str(r#"{"a":{"b.c":1,"d":[10,20]},"x/y":2}"#).unwrap();
        assert_eq!(
            FieldPath::parse("a.d").unwrap().get(&v),
            Some(&serde_json::json!([10, 20]))
        );
        assert_eq!(
            FieldPath::parse("/a/d/1").unwrap().get(&v),
            Some(&serde_json::json!(20))
        );
        assert_eq!(
            FieldPath::parse("/a/b.c").unwrap().get(&v),
            Some(&serde_json::json!(1))
        );
        assert_eq!(
            FieldPath::parse("x/y").unwrap().get(&v),
            Some(&serde_json::json!(2))
        );
        assert!(FieldPath::parse("a..b").is_err());
        let mut v2 = v.clone();
        assert!(FieldPath::parse("a.d.0").unwrap().remove(&mut v2));
        assert!(FieldPath::parse("x/y").unwrap().remove(&mut v2));
        assert_eq!(v2, serde_json::json!({"a":{"b.c":1,"d":[20]}}));
    }
}
