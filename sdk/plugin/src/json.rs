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

    /// The field of a JSON record value, parsing only what it must: the document is checked
    /// whole (as [`parse`] does, with the same errors), but only the field itself is built;
    /// everything else is skipped without allocating. Several times faster than [`parse`]
    /// followed by [`get`](Self::get), with the same answer (a repeated key: the last wins).
    pub fn extract(&self, value: Option<&[u8]>) -> Result<Option<Value>, String> {
        use serde::de::DeserializeSeed;
        let bytes = value.ok_or("record has no value (tombstone)")?;
        let segments: Vec<String> = self
            .pointer
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let found = Find { path: &segments }
            .deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| format!("value is not JSON: {e}"))?;
        Ok(found)
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

/// Follows a path through a document being parsed; `None` when the field is absent.
struct Find<'a> {
    path: &'a [String],
}

impl<'de> serde::de::DeserializeSeed<'de> for Find<'_> {
    type Value = Option<Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.path.is_empty() {
            return serde::Deserialize::deserialize(d).map(Some);
        }
        d.deserialize_any(self)
    }
}

/// Whether a map key equals a name, without allocating for the key.
struct KeyIs<'a>(&'a str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// An array index as JSON pointers define it: decimal, no sign, no leading zero.
fn index_of(segment: &str) -> Option<usize> {
    if segment.starts_with('+') || (segment.len() > 1 && segment.starts_with('0')) {
        return None;
    }
    segment.parse().ok()
}

impl<'de> serde::de::Visitor<'de> for Find<'_> {
    type Value = Option<Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(hit) = map.next_key_seed(KeyIs(&self.path[0]))? {
            if hit {
                found = map.next_value_seed(Find {
                    path: &self.path[1..],
                })?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let wanted = index_of(&self.path[0]);
        let mut found = None;
        let mut i = 0usize;
        loop {
            if Some(i) == wanted {
                match seq.next_element_seed(Find {
                    path: &self.path[1..],
                })? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
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
        // extract agrees with parse + get, on present and absent fields and on bad input.
        let doc = br#"{"a":{"b.c":1,"d":[10,20,{"e":"x"}]},"x/y":2,"a2":[],"dup":1,"dup":2}"#;
        for path in [
            "a.d",
            "/a/d/1",
            "/a/b.c",
            "x/y",
            "/a/d/2/e",
            "/a/d/3",
            "/a/d/01",
            "/a/d/+1",
            "nope",
            "a.b.c",
            "a2.0",
            "dup",
            "/a/d/2/e/f",
        ] {
            let p = FieldPath::parse(path).unwrap();
            let whole = parse(Some(doc)).unwrap();
            assert_eq!(
                p.extract(Some(doc)).unwrap().as_ref(),
                p.get(&whole),
                "{path}"
            );
        }
        let p = FieldPath::parse("a").unwrap();
        for bad in [&b"{"[..], b"not json", b"{\"a\":1} x", b"", b"{\"a\":1,}"] {
            assert!(
                p.extract(Some(bad)).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(parse(Some(bad)).is_err());
        }
        assert!(p.extract(None).is_err());
        assert_eq!(p.extract(Some(b"[1]")).unwrap(), None);
        assert_eq!(p.extract(Some(b"7")).unwrap(), None);
        let mut v2 = v.clone();
        assert!(FieldPath::parse("a.d.0").unwrap().remove(&mut v2));
        assert!(FieldPath::parse("x/y").unwrap().remove(&mut v2));
        assert_eq!(v2, serde_json::json!({"a":{"b.c":1,"d":[20]}}));
    }
}
