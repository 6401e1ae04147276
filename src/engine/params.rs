//! Resolved stage parameters: a TOML table whose keys and types match the stage's defaults.

use serde::de::DeserializeOwned;

/// A stage's resolved parameters (defaults ← pipeline file ← `PIPE_*` ← `--set`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub toml::Table);

impl Params {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, toml::de::Error> {
        toml::Value::Table(self.0.clone()).try_into()
    }

    pub fn get(&self, key: &str) -> Option<&toml::Value> {
        let mut parts = key.split('.');
        let mut cur = self.0.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_table()?.get(p)?;
        }
        Some(cur)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_integer()
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }
}
