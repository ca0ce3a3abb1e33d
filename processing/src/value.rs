//! The values expressions compute: SQL's scalars plus JSON objects and
//! arrays, with SQL's NULL. Read from and written to JSON; kept in
//! checkpoints through [`Stored`].

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub enum Value {
    /// SQL NULL (also a missing field and JSON null).
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction (or beyond `i64`).
    Float(f64),
    /// Text.
    Str(Arc<str>),
    /// A JSON object or array.
    Json(Arc<serde_json::Value>),
}

/// [`Value`] as checkpoints keep it (postcard has no self-describing JSON).
#[derive(Serialize, Deserialize)]
enum Stored {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Json(String),
}

impl From<Stored> for Value {
    fn from(s: Stored) -> Value {
        match s {
            Stored::Null => Value::Null,
            Stored::Bool(b) => Value::Bool(b),
            Stored::Int(i) => Value::Int(i),
            Stored::Float(f) => Value::Float(f),
            Stored::Str(s) => Value::Str(s.into()),
            Stored::Json(s) => serde_json::from_str(&s)
                .map(|j| Value::from_json(&j))
                .unwrap_or(Value::Null),
        }
    }
}

impl From<Value> for Stored {
    fn from(v: Value) -> Stored {
        match v {
            Value::Null => Stored::Null,
            Value::Bool(b) => Stored::Bool(b),
            Value::Int(i) => Stored::Int(i),
            Value::Float(f) => Stored::Float(f),
            Value::Str(s) => Stored::Str(s.to_string()),
            Value::Json(j) => Stored::Json(j.to_string()),
        }
    }
}

impl Value {
    /// A value of a JSON document (objects and arrays stay JSON).
    pub fn from_json(j: &serde_json::Value) -> Value {
        match j {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(s.as_str().into()),
            other => Value::Json(Arc::new(other.clone())),
        }
    }

    /// The value in a JSON document (a number that is not finite is null).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
            Value::Json(j) => (**j).clone(),
        }
    }

    /// A string value.
    pub fn str(s: &str) -> Value {
        Value::Str(s.into())
    }

    /// Whether this is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Float(_) => "double",
            Value::Str(_) => "string",
            Value::Json(j) if j.is_array() => "array",
            Value::Json(_) => "object",
        }
    }

    /// The number as a double, if this is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The text a key or a message shows: strings as they are, others as JSON.
    pub fn text(&self) -> String {
        match self {
            Value::Str(s) => s.to_string(),
            other => other.to_json().to_string(),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Json(_) => 4,
        }
    }

    /// A total order (NULL first, then booleans, numbers, strings, JSON),
    /// for MIN, MAX and the order rows are emitted in.
    pub fn total_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (a @ (Value::Int(_) | Value::Float(_)), b @ (Value::Int(_) | Value::Float(_))) => {
                let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
                x.total_cmp(&y)
            }
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            (Value::Json(a), Value::Json(b)) => a.to_string().cmp(&b.to_string()),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

/// Grouping equality: same type and value (floats by their bits, so a key
/// with NaN still finds its group).
impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Json(a), Value::Json(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.rank().hash(state);
        match self {
            Value::Null => {}
            Value::Bool(b) => b.hash(state),
            Value::Int(i) => i.hash(state),
            Value::Float(f) => f.to_bits().hash(state),
            Value::Str(s) => s.hash(state),
            Value::Json(j) => j.to_string().hash(state),
        }
    }
}

/// A group's key: the values of the GROUP BY expressions (windows aside).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Key(pub Vec<Value>);

impl Key {
    /// The record key of the group's rows: one expression's text, or a
    /// JSON array of several.
    pub fn record_key(&self) -> Option<Vec<u8>> {
        match self.0.as_slice() {
            [] => None,
            [one] => Some(one.text().into_bytes()),
            many => Some(
                serde_json::Value::Array(many.iter().map(Value::to_json).collect())
                    .to_string()
                    .into_bytes(),
            ),
        }
    }

    /// An approximate size in memory, for the state limit.
    pub fn size(&self) -> usize {
        self.0.iter().map(value_size).sum::<usize>() + 24
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        for (a, b) in self.0.iter().zip(&other.0) {
            match a.total_cmp(b) {
                Ordering::Equal => match (a, b) {
                    // 1 and 1.0 sort together but are different groups.
                    (Value::Int(_), Value::Float(_)) => return Ordering::Less,
                    (Value::Float(_), Value::Int(_)) => return Ordering::Greater,
                    _ => {}
                },
                o => return o,
            }
        }
        self.0.len().cmp(&other.0.len())
    }
}

/// An approximate size of a value in memory.
pub fn value_size(v: &Value) -> usize {
    16 + match v {
        Value::Str(s) => s.len(),
        Value::Json(j) => j.to_string().len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_checkpoint_encoding() {
        let j: serde_json::Value =
            serde_json::json!({"a": 1, "b": [1.5, "x", null, true], "c": {"d": -3}});
        let v = Value::from_json(&j);
        assert_eq!(v.to_json(), j);
        let bytes =
            postcard::to_allocvec(&Key(vec![v.clone(), Value::Float(2.5)])).unwrap_or_default();
        let back: Key = postcard::from_bytes(&bytes).unwrap_or_default();
        assert_eq!(back, Key(vec![v, Value::Float(2.5)]));
    }

    #[test]
    fn keys_of_several_values_are_json_arrays() {
        let k = Key(vec![Value::str("dev-1"), Value::Int(3)]);
        assert_eq!(k.record_key(), Some(br#"["dev-1",3]"#.to_vec()));
        let k = Key(vec![Value::str("dev-1")]);
        assert_eq!(k.record_key(), Some(b"dev-1".to_vec()));
        assert_eq!(Key(vec![]).record_key(), None);
    }

    #[test]
    fn total_order_mixes_numbers_and_separates_types() {
        assert_eq!(Value::Int(1).total_cmp(&Value::Float(1.5)), Ordering::Less);
        assert_eq!(Value::Null.total_cmp(&Value::Int(-5)), Ordering::Less);
        assert_eq!(Value::str("a").total_cmp(&Value::Int(9)), Ordering::Greater);
        assert_ne!(Value::Int(1), Value::Float(1.0));
    }
}
