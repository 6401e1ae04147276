//! Cache keys: every input that can change a stage's output, named in one struct, encoded canonically.
//!
//! The key is blake3 over a canonical JSON encoding of [`KeyInputs`]: object keys sorted, floats in
//! their shortest round-trip form (so `1e-5` and `0.00001` hash the same), integers promoted to floats
//! where the stage's default is a float (done by config), no mtimes, no absolute paths. The full inputs
//! are kept in the manifest beside the hash, only to explain a miss (`pipe status`, `pipe why`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bump when the layout of [`KeyInputs`] or its encoding changes: every key changes with it.
pub const KEY_SCHEMA: u32 = 1;

/// Characters of the hex hash used as the artifact directory name (80 bits).
pub const DIR_CHARS: usize = 20;

/// Everything hashed into a stage's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub schema: u32,
    pub kind: String,
    /// The stage module's implementation version.
    pub version: u32,
    /// Resolved parameters, flattened to dotted keys.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Content hash of each upstream output, by upstream *kind* and id-independent position: renaming a
    /// stage id does not invalidate its dependents.
    pub upstream: Vec<UpstreamInput>,
    /// External inputs: project-relative path (or remote id) → blake3 of the content (or the id itself).
    pub inputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UpstreamInput {
    pub kind: String,
    pub output: String,
}

/// Flatten a TOML table into dotted keys with JSON values (stable, order-free).
pub fn flatten_params(t: &toml::Table) -> BTreeMap<String, serde_json::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), to_json(other));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in t {
        walk(k, v, &mut out);
    }
    out
}

fn to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        // -0.0 and 0.0 mean the same parameter value.
        toml::Value::Float(f) => J::from(if *f == 0.0 { 0.0 } else { *f }),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => J::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// Canonical JSON: keys sorted at every level, no whitespace, floats in shortest round-trip form.
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match v {
        J::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let body: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", serde_json::to_string(k).expect("string"), canonical_json(&m[*k])))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        J::Array(a) => format!("[{}]", a.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        other => serde_json::to_string(other).expect("scalar"),
    }
}

impl KeyInputs {
    pub fn new(kind: &str, version: u32, params: &toml::Table) -> Self {
        KeyInputs {
            schema: KEY_SCHEMA,
            kind: kind.to_string(),
            version,
            params: flatten_params(params),
            upstream: Vec::new(),
            inputs: BTreeMap::new(),
        }
    }

    /// The full 64-hex-digit key.
    pub fn hash(&self) -> String {
        let mut up = self.upstream.clone();
        up.sort();
        let mut me = self.clone();
        me.upstream = up;
        let value = serde_json::to_value(&me).expect("key inputs serialize");
        let mut h = blake3::Hasher::new();
        h.update(b"pipe-stage-key\0");
        h.update(canonical_json(&value).as_bytes());
        h.finalize().to_hex().to_string()
    }
}

/// The directory name for a key.
pub fn dir_name(key: &str) -> &str {
    &key[..DIR_CHARS.min(key.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(params: &str) -> KeyInputs {
        let t: toml::Table = params.parse().unwrap();
        let mut k = KeyInputs::new("split", 1, &t);
        k.inputs.insert("data/train.csv".into(), "ab".repeat(32));
        k.upstream.push(UpstreamInput { kind: "normalize".into(), output: "cd".repeat(32) });
        k
    }

    #[test]
    fn golden_key_is_pinned() {
        // If this changes, every user's cache is invalidated: bump KEY_SCHEMA deliberately instead.
        let k = inputs("seed = 42\ntrain_ratio = 0.7\nname = \"x\"\n[init]\nlayers = [1, 2]\n");
        assert_eq!(k.hash(), "16e73fbe7e9c801395d3a4a99bb412a899041a611f4e697fa1e3b56d31c3c7aa");
        let encoded = canonical_json(&serde_json::to_value(&k).unwrap());
        assert_eq!(
            encoded,
            format!(
                r#"{{"inputs":{{"data/train.csv":"{}"}},"kind":"split","params":{{"init.layers":[1,2],"name":"x","seed":42,"train_ratio":0.7}},"schema":1,"upstream":[{{"kind":"normalize","output":"{}"}}],"version":1}}"#,
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
    }

    #[test]
    fn float_spellings_hash_the_same() {
        assert_eq!(inputs("lr = 1e-5").hash(), inputs("lr = 0.00001").hash());
        assert_eq!(inputs("lr = 0.0").hash(), inputs("lr = -0.0").hash());
        assert_ne!(inputs("lr = 1e-5").hash(), inputs("lr = 2e-5").hash());
    }

    #[test]
    fn order_does_not_matter() {
        let a = inputs("a = 1\nb = 2\n[t]\nx = 1\ny = 2");
        let b = inputs("b = 2\na = 1\n[t]\ny = 2\nx = 1");
        assert_eq!(a.hash(), b.hash());
        let mut c = a.clone();
        c.upstream.insert(0, UpstreamInput { kind: "load".into(), output: "ef".repeat(32) });
        let mut d = a.clone();
        d.upstream.push(UpstreamInput { kind: "load".into(), output: "ef".repeat(32) });
        assert_eq!(c.hash(), d.hash());
        let mut e = a.clone();
        e.inputs.insert("a.csv".into(), "00".into());
        let mut f = a.clone();
        f.inputs = [("a.csv".to_string(), "00".to_string())].into_iter().chain(a.inputs.clone()).collect();
        assert_eq!(e.hash(), f.hash());
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = inputs("seed = 1");
        let mut v = base.clone();
        v.version = 2;
        assert_ne!(base.hash(), v.hash());
        let mut k = base.clone();
        k.kind = "load".into();
        assert_ne!(base.hash(), k.hash());
        let mut i = base.clone();
        i.inputs.insert("data/train.csv".into(), "00".repeat(32));
        assert_ne!(base.hash(), i.hash());
        let mut u = base.clone();
        u.upstream[0].output = "00".repeat(32);
        assert_ne!(base.hash(), u.hash());
        assert_ne!(base.hash(), inputs("seed = 2").hash());
        assert_ne!(inputs("seed = 1").hash(), inputs("seed = \"1\"").hash());
    }

    #[test]
    fn canonical_json_sorts_and_strips() {
        let v: serde_json::Value = serde_json::from_str(r#"{"b": [1, {"z": 1, "a": 2}], "a": 1e-5}"#).unwrap();
        assert_eq!(canonical_json(&v), r#"{"a":0.00001,"b":[1,{"a":2,"z":1}]}"#);
    }
}
