//! Why a stage must run: typed reasons, rendered at parameter granularity.
//!
//! The key says *that* something changed; the key inputs kept in the previous artifact's manifest say
//! *what*. Comparing the two gives lines like `param split.seed changed 42 → 7`.

use serde::Serialize;

use super::key::KeyInputs;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    NeverRun,
    Forced,
    ParamChanged {
        param: String,
        old: String,
        new: String,
    },
    ParamAdded {
        param: String,
        new: String,
    },
    ParamRemoved {
        param: String,
        old: String,
    },
    InputChanged {
        input: String,
    },
    InputAdded {
        input: String,
    },
    InputRemoved {
        input: String,
    },
    /// An input could not be read (missing file, permissions): the stage cannot be keyed.
    InputUnreadable {
        message: String,
    },
    UpstreamChanged {
        stage: String,
    },
    UpstreamStale {
        stage: String,
    },
    Version {
        old: u32,
        new: u32,
    },
    Schema {
        old: u32,
        new: u32,
    },
    /// The previous artifact for this stage was removed (gc, or by hand) and must be rebuilt.
    Missing {
        key: String,
    },
    /// The key changed in a way the recorded inputs cannot explain (an older store layout).
    KeyChanged,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::Forced => write!(f, "forced with --force"),
            Reason::ParamChanged { param, old, new } => write!(f, "param {param} changed {old} → {new}"),
            Reason::ParamAdded { param, new } => write!(f, "param {param} added: {new}"),
            Reason::ParamRemoved { param, old } => write!(f, "param {param} removed (was {old})"),
            Reason::InputChanged { input } => write!(f, "input {input} changed"),
            Reason::InputAdded { input } => write!(f, "input {input} added"),
            Reason::InputRemoved { input } => write!(f, "input {input} no longer used"),
            Reason::InputUnreadable { message } => write!(f, "{message}"),
            Reason::UpstreamChanged { stage } => write!(f, "upstream {stage} output changed"),
            Reason::UpstreamStale { stage } => write!(f, "upstream {stage} is stale"),
            Reason::Version { old, new } => write!(f, "implementation version {old} → {new}"),
            Reason::Schema { old, new } => write!(f, "cache key schema {old} → {new}"),
            Reason::Missing { key } => {
                write!(f, "artifact {} is no longer in the store (removed by gc?)", super::key::dir_name(key))
            }
            Reason::KeyChanged => write!(f, "cache key changed"),
        }
    }
}

fn show(v: &serde_json::Value) -> String {
    v.to_string()
}

/// What differs between the previous key inputs and the current ones. `upstream_ids` maps an upstream
/// kind to the stage ids (in this pipeline) of that kind, for readable lines. When `include_upstream`
/// is false (upstream not yet known), upstream differences are left to the caller.
pub fn diff(
    stage: &str,
    prev: &KeyInputs,
    cur: &KeyInputs,
    upstream_ids: &dyn Fn(&str) -> String,
    include_upstream: bool,
) -> Vec<Reason> {
    let mut out = Vec::new();
    if prev.schema != cur.schema {
        out.push(Reason::Schema { old: prev.schema, new: cur.schema });
    }
    if prev.version != cur.version {
        out.push(Reason::Version { old: prev.version, new: cur.version });
    }
    for (k, new) in &cur.params {
        match prev.params.get(k) {
            None => out.push(Reason::ParamAdded { param: format!("{stage}.{k}"), new: show(new) }),
            Some(old) if old != new => {
                out.push(Reason::ParamChanged { param: format!("{stage}.{k}"), old: show(old), new: show(new) })
            }
            _ => {}
        }
    }
    for (k, old) in &prev.params {
        if !cur.params.contains_key(k) {
            out.push(Reason::ParamRemoved { param: format!("{stage}.{k}"), old: show(old) });
        }
    }
    for (k, h) in &cur.inputs {
        match prev.inputs.get(k) {
            None => out.push(Reason::InputAdded { input: k.clone() }),
            Some(old) if old != h => out.push(Reason::InputChanged { input: k.clone() }),
            _ => {}
        }
    }
    for k in prev.inputs.keys() {
        if !cur.inputs.contains_key(k) {
            out.push(Reason::InputRemoved { input: k.clone() });
        }
    }
    if include_upstream {
        for u in &cur.upstream {
            if !prev.upstream.contains(u) {
                let stage = upstream_ids(&u.kind);
                let r = Reason::UpstreamChanged { stage };
                if !out.contains(&r) {
                    out.push(r);
                }
            }
        }
    }
    out
}
