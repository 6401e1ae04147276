//! Resolved stage parameters: a TOML table whose keys and types match the stage's defaults, and the
//! one way stages read them — decoded into a typed struct and validated once.

use serde::de::DeserializeOwned;

/// A stage's resolved parameters (defaults ← pipeline file ← `PIPE_*` ← `--set`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub toml::Table);

/// A parameter value the stage rejects. The key is data, relative to the stage (`lora.r`, `k[2]`),
/// so the engine can name `stages.<id>.lora.r` and the layer it came from without reading the
/// message; the message says what is wrong and, where it can, what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{key}`: {message}")]
pub struct ParamError {
    /// Dotted path inside the stage's parameters; empty for the table as a whole.
    pub key: String,
    pub message: String,
}

impl ParamError {
    pub fn new(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        ParamError { key: key.into(), message: message.to_string() }
    }

    /// The same error seen from an enclosing table: `r` inside `lora` becomes `lora.r`.
    pub fn within(mut self, table: &str) -> Self {
        self.key = if self.key.is_empty() { table.to_string() } else { format!("{table}.{}", self.key) };
        self
    }
}

/// A stage's typed parameters: the value checks that types cannot express, made once.
pub trait StageParams: DeserializeOwned {
    /// Ranges, enum values, relations between keys. Runs when the pipeline is loaded and again
    /// before the stage runs, so a stage never computes with values it would reject.
    fn validate(&self) -> Result<(), ParamError> {
        Ok(())
    }
}

impl Params {
    /// Decode into a typed struct. The types were already checked against the defaults when the
    /// pipeline was loaded, so a failure here is a struct that disagrees with `stages/<kind>.toml`
    /// or a value out of the field's range; either way the key comes back as data.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ParamError> {
        serde_path_to_error::deserialize(toml::Value::Table(self.0.clone())).map_err(|e| {
            let mut key = String::new();
            for segment in e.path().iter() {
                use serde_path_to_error::Segment;
                match segment {
                    Segment::Seq { index } => key.push_str(&format!("[{index}]")),
                    Segment::Map { key: k } | Segment::Enum { variant: k } => {
                        if !key.is_empty() {
                            key.push('.');
                        }
                        key.push_str(k);
                    }
                    Segment::Unknown => {}
                }
            }
            ParamError::new(key, e.inner())
        })
    }

    pub fn get(&self, key: &str) -> Option<&toml::Value> {
        let mut parts = key.split('.');
        let mut cur = self.0.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_table()?.get(p)?;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        r: u8,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        k: Vec<u8>,
        lora: Inner,
    }

    fn params(text: &str) -> Params {
        Params(text.parse().unwrap())
    }

    #[test]
    fn decode_errors_carry_the_key_path() {
        let e = params("k = [1]\n[lora]\nr = 300").decode::<Outer>().unwrap_err();
        assert_eq!(e.key, "lora.r");
        let e = params("k = [1, -2]\n[lora]\nr = 3").decode::<Outer>().unwrap_err();
        assert_eq!(e.key, "k[1]");
        let e = params("k = [1]\nx = 1\n[lora]\nr = 3").decode::<Outer>().unwrap_err();
        assert_eq!(e.key, "x");
        assert!(e.message.contains("unknown field `x`"), "{e}");
        assert!(params("k = [1]\n[lora]\nr = 3").decode::<Outer>().is_ok());
    }

    #[test]
    fn within_prefixes_the_key() {
        assert_eq!(ParamError::new("r", "bad").within("lora").key, "lora.r");
        assert_eq!(ParamError::new("", "bad").within("lora").key, "lora");
    }
}
