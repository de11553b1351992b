//! GGUF metadata values and typed access to them.

use std::collections::BTreeMap;

/// One metadata value, as stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an integer of any width (token types are i32, some writers use u32).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (f32, f64 or an integer).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The type name GGUF uses, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A file's metadata, with getters whose errors name the key and what was wrong.
#[derive(Debug, Default)]
pub struct Metadata {
    pub(super) values: BTreeMap<String, Value>,
}

/// A metadata lookup that failed: the message names the key.
pub type KeyError = String;

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// Every key and value, keys in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, KeyError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                format!(
                    "metadata key {key}: expected {what}, found {}",
                    v.type_name()
                )
            }),
        }
    }

    /// An optional non-negative integer.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, KeyError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|v| usize::try_from(v).ok())
        })
    }

    /// A required non-negative integer.
    pub fn required_usize(&self, key: &str) -> Result<usize, KeyError> {
        self.usize(key)?
            .ok_or_else(|| format!("metadata key {key} is missing"))
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, KeyError> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, KeyError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(format!(
                "metadata key {key}: expected a string, found {}",
                v.type_name()
            )),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, KeyError> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// An optional array, its elements converted by `f` (`what` names the element type).
    pub fn array<T>(
        &self,
        key: &str,
        what: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>, KeyError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    f(v).ok_or_else(|| {
                        format!(
                            "metadata key {key}: element {i}: expected {what}, found {}",
                            v.type_name()
                        )
                    })
                })
                .collect::<Result<Vec<T>, KeyError>>()
                .map(Some),
            Some(v) => Err(format!(
                "metadata key {key}: expected an array, found {}",
                v.type_name()
            )),
        }
    }
}
