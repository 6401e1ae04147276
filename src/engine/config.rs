//! Pipeline files: parsed strictly, layered, validated against each stage kind's embedded defaults.
//!
//! Layers, lowest first: `stages/<kind>.toml` defaults → the pipeline file → `PIPE_<STAGE>__<PARAM>`
//! environment variables → `--set <stage>.<param>=<value>`. figment merges the layers and remembers
//! which layer every value came from, so an error can name the file (or variable, or flag) to fix. A
//! misspelt hyperparameter must never fall back silently to its default: unknown keys are errors.

use std::path::{Path, PathBuf};

use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};

use super::executor::ExecutorConfig;
use super::params::{ParamError, Params};
use super::slurm::{Resources, SlurmConfig};
use super::stage::{Need, Stage, When};

/// A configuration mistake. Always names where it is and, when it can, what to write instead.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file, variable or flag the offending value came from.
    pub origin: String,
    /// Dotted key path (`stages.split.seed`); empty for whole-file problems.
    pub key: String,
    pub message: String,
    pub hint: Option<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)?;
        } else {
            write!(f, "{}: `{}`: {}", self.origin, self.key, self.message)?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub(crate) fn new(origin: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { origin: origin.into(), key: key.into(), message: message.into(), hint: None }
    }
    pub(crate) fn hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }
}

/// One stage as the pipeline declares it, with parameters fully resolved.
#[derive(Debug, Clone)]
pub struct StageConfig {
    pub id: String,
    pub kind: String,
    pub needs: Vec<String>,
    pub params: Params,
    /// Why this build cannot run the stage as configured (device `cuda` without the `cuda`
    /// feature), found at load with the layer the value came from; [`Pipeline::check_runnable`]
    /// reports it for the commands that compute.
    pub unavailable: Option<ConfigError>,
    /// `[stages.<id>.resources]`: what the stage's Slurm job asks for; not part of the key.
    pub resources: Resources,
    /// `retries`: how often a failed Slurm job of this stage is resubmitted.
    pub retries: u32,
}

/// A resolved pipeline: what the runner executes and what the run record stores.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The pipeline file as the user named it (for messages).
    pub file: PathBuf,
    /// Relative paths in parameters resolve against this directory.
    pub root: PathBuf,
    /// The store.
    pub artifacts: PathBuf,
    /// `[pipeline] remote` (or `--remote`): a shared object store the runner fetches from and
    /// uploads to. Never part of a cache key: where an artifact is kept does not change its bytes.
    pub remote: Option<String>,
    /// In file order.
    pub stages: Vec<StageConfig>,
    /// `[sweep]` from the file plus multi-valued `--set`s; validated against the stages' defaults.
    pub sweep: Option<SweepSpec>,
    /// The original file text and the overrides, so sweep points can be resolved like the base.
    pub source_text: String,
    pub overrides: Overrides,
    /// `[executor]`: where stages compute. Not part of any key: it changes where, never what.
    pub executor: ExecutorConfig,
    /// The Slurm part of `[executor]`.
    pub slurm: SlurmConfig,
}

/// A parameter sweep: grid axes and/or random draws, each naming `<stage>.<param>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepSpec {
    /// Axes in file order (then `--set` order): every combination is one point.
    pub grid: Vec<(String, Vec<toml::Value>)>,
    pub random: Option<RandomSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RandomSpec {
    pub n: usize,
    pub seed: u64,
    pub params: Vec<(String, Dist)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    LogUniform(f64, f64),
    Uniform(f64, f64),
    Choice(Vec<toml::Value>),
}

impl Pipeline {
    pub fn stage(&self, id: &str) -> Option<&StageConfig> {
        self.stages.iter().find(|s| s.id == id)
    }

    /// Whether this build can run every stage. Not part of loading, so that a GPU pipeline can be
    /// inspected (`config`, `status`, `dag`) on a machine without CUDA; `run` and `sweep` call it
    /// before they touch the store.
    pub fn check_runnable(&self) -> Result<(), ConfigError> {
        match self.stages.iter().find_map(|s| s.unavailable.clone()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The resolved configuration as TOML: every default filled in, every override applied.
    pub fn to_toml(&self) -> String {
        let mut pipeline = toml::Table::new();
        pipeline.insert("name".into(), self.name.clone().into());
        let mut stages = toml::Table::new();
        for s in &self.stages {
            let mut t = toml::Table::new();
            t.insert("kind".into(), s.kind.clone().into());
            t.insert("needs".into(), toml::Value::Array(s.needs.iter().map(|n| n.clone().into()).collect()));
            for (k, v) in &s.params.0 {
                t.insert(k.clone(), v.clone());
            }
            stages.insert(s.id.clone(), toml::Value::Table(t));
        }
        let mut top = toml::Table::new();
        top.insert("pipeline".into(), toml::Value::Table(pipeline));
        top.insert("stages".into(), toml::Value::Table(stages));
        toml::to_string_pretty(&top).expect("toml tables serialize")
    }
}

/// Overrides from outside the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--set stage.param=value`, in command-line order.
    pub sets: Vec<String>,
    /// `PIPE_*` environment variables (name, value); pass `std::env::vars()` filtered, or a fixed list in tests.
    pub env: Vec<(String, String)>,
}

impl Overrides {
    pub fn from_env(sets: Vec<String>) -> Self {
        let env = std::env::vars().filter(|(k, _)| k.starts_with("PIPE_") && k.contains("__")).collect();
        Overrides { sets, env }
    }
}

/// A figment layer with a name we choose, so `find_metadata` tells us which file/flag a value came from.
struct Layer {
    meta: Metadata,
    dict: Dict,
}

impl Layer {
    fn new(name: String, source: Option<PathBuf>, table: &toml::Table) -> Self {
        let mut meta = Metadata::named(name);
        if let Some(p) = source {
            meta = meta.source(p.as_path());
        }
        let dict = match figment::value::Value::serialize(table) {
            Ok(figment::value::Value::Dict(_, d)) => d,
            _ => Dict::new(),
        };
        Layer { meta, dict }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.meta.clone()
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

const PIPELINE_KEYS: &[&str] = &["name", "artifacts", "root", "description", "remote"];
const TOP_KEYS: &[&str] = &["pipeline", "stages", "sweep", "executor"];
/// Keys of a stage table that say how and where it runs, not what it computes: kept out of the
/// parameters, and so out of the cache key.
const STAGE_META_KEYS: &[&str] = &["kind", "needs", "resources", "retries"];

/// The nearest candidate by edit distance, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// The parse-time view of the pipeline file: enough to know which stage kinds to load defaults for.
struct Skeleton {
    name: String,
    artifacts: String,
    root: Option<String>,
    remote: Option<String>,
    /// (id, kind, needs) in file order.
    stages: Vec<(String, String, Vec<String>)>,
    /// Per stage, in the same order: its resources and retries.
    meta: Vec<(Resources, u32)>,
    slurm: SlurmConfig,
    table: toml::Table,
}

fn parse_skeleton(file: &Path, text: &str, registry: &[Box<dyn Stage>]) -> Result<Skeleton, ConfigError> {
    let origin = file.display().to_string();
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let msg = e.message().to_string();
        let (line, col) = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                (line, col)
            })
            .unwrap_or((0, 0));
        let hint = if msg.contains("duplicate key") {
            Some("each stage id may appear only once in a pipeline".to_string())
        } else {
            None
        };
        ConfigError::new(format!("{origin}:{line}:{col}"), "", format!("invalid TOML: {msg}")).hint(hint)
    })?;

    for k in table.keys() {
        if !TOP_KEYS.contains(&k.as_str()) {
            let hint = did_you_mean(k, TOP_KEYS.iter().copied());
            return Err(ConfigError::new(
                &origin,
                k,
                "unknown top-level section; expected `[pipeline]`, `[stages.<id>]`, `[sweep]` or `[executor]`",
            )
            .hint(hint));
        }
    }
    let pipeline = match table.get("pipeline") {
        Some(toml::Value::Table(t)) => t,
        Some(v) => {
            return Err(ConfigError::new(&origin, "pipeline", format!("expected a table, found {}", type_name(v))))
        }
        None => {
            return Err(ConfigError::new(&origin, "pipeline", "missing `[pipeline]` section")
                .hint(Some("add `[pipeline]` with `name = \"...\"`".into())))
        }
    };
    for k in pipeline.keys() {
        if !PIPELINE_KEYS.contains(&k.as_str()) {
            return Err(ConfigError::new(&origin, format!("pipeline.{k}"), "unknown key")
                .hint(did_you_mean(k, PIPELINE_KEYS.iter().copied())));
        }
    }
    let get_str = |key: &str| -> Result<Option<String>, ConfigError> {
        match pipeline.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(ConfigError::new(
                &origin,
                format!("pipeline.{key}"),
                format!("expected a string, found {}", type_name(v)),
            )),
        }
    };
    let name = get_str("name")?.ok_or_else(|| {
        ConfigError::new(&origin, "pipeline.name", "missing")
            .hint(Some("add `name = \"my-pipeline\"` under `[pipeline]`".into()))
    })?;
    if !valid_name(&name) {
        return Err(ConfigError::new(
            &origin,
            "pipeline.name",
            format!("{name:?} is not a valid name: use letters, digits, `_` and `-`"),
        ));
    }
    let artifacts = get_str("artifacts")?.unwrap_or_else(|| "artifacts".into());
    let root = get_str("root")?;
    get_str("description")?;
    let remote = get_str("remote")?;
    if let Some(url) = &remote {
        super::remote::check_url(url).map_err(|e| {
            ConfigError::new(&origin, "pipeline.remote", e.to_string()).hint(Some(super::remote::URL_FORMS.into()))
        })?;
    }

    let stages_t = match table.get("stages") {
        Some(toml::Value::Table(t)) if !t.is_empty() => t,
        Some(toml::Value::Table(_)) | None => {
            return Err(ConfigError::new(&origin, "stages", "the pipeline has no stages")
                .hint(Some("add a stage: `[stages.load]` with `kind = \"load\"`".into())))
        }
        Some(v) => {
            return Err(ConfigError::new(
                &origin,
                "stages",
                format!("expected a table of stages, found {}", type_name(v)),
            ))
        }
    };
    let kinds: Vec<&str> = registry.iter().map(|s| s.kind()).collect();
    let mut stages = Vec::new();
    let mut meta = Vec::new();
    for (id, v) in stages_t {
        let key = format!("stages.{id}");
        if !valid_name(id) {
            return Err(ConfigError::new(
                &origin,
                &key,
                format!("{id:?} is not a valid stage id: use letters, digits, `_` and `-`"),
            ));
        }
        let t = v.as_table().ok_or_else(|| {
            ConfigError::new(&origin, &key, format!("expected a table `[stages.{id}]`, found {}", type_name(v)))
        })?;
        let kind = match t.get("kind") {
            Some(toml::Value::String(k)) => k.clone(),
            Some(v) => {
                return Err(ConfigError::new(
                    &origin,
                    format!("{key}.kind"),
                    format!("expected a string, found {}", type_name(v)),
                ))
            }
            None => {
                return Err(ConfigError::new(&origin, format!("{key}.kind"), "missing")
                    .hint(Some(format!("known kinds: {}", kinds.join(", ")))))
            }
        };
        if !kinds.contains(&kind.as_str()) {
            let hint = did_you_mean(&kind, kinds.iter().copied())
                .or_else(|| Some(format!("known kinds: {}", kinds.join(", "))));
            return Err(
                ConfigError::new(&origin, format!("{key}.kind"), format!("unknown stage kind `{kind}`")).hint(hint)
            );
        }
        let needs = match t.get("needs") {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => {
                a.iter().map(|n| n.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    ConfigError::new(&origin, format!("{key}.needs"), "expected an array of stage ids (strings)")
                })?
            }
            Some(toml::Value::String(s)) => {
                return Err(ConfigError::new(&origin, format!("{key}.needs"), "expected an array of stage ids")
                    .hint(Some(format!("write `needs = [{s:?}]`"))))
            }
            Some(v) => {
                return Err(ConfigError::new(
                    &origin,
                    format!("{key}.needs"),
                    format!("expected an array of stage ids, found {}", type_name(v)),
                ))
            }
        };
        stages.push((id.clone(), kind, needs));
        meta.push(super::slurm::parse_stage_meta(&origin, id, t)?);
    }
    let slurm = super::slurm::parse_executor(&origin, table.get("executor"))?;
    Ok(Skeleton { name, artifacts, root, remote, stages, meta, slurm, table })
}

/// Parse `stage.param.sub=value`: the value is a TOML value when it parses as one, else a plain string.
fn parse_assignment(s: &str) -> Option<(Vec<String>, toml::Value)> {
    let (path, value) = s.split_once('=')?;
    let path: Vec<String> = path.trim().split('.').map(|p| p.trim().to_string()).collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((path, parse_scalar(value.trim())))
}

/// `7` → integer, `1e-5` → float, `true` → bool, `[1, 2]` → array, anything else → string.
pub fn parse_scalar(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn nest(path: &[String], value: toml::Value) -> toml::Table {
    let mut v = value;
    for p in path.iter().rev() {
        let mut t = toml::Table::new();
        t.insert(p.clone(), v);
        v = toml::Value::Table(t);
    }
    match v {
        toml::Value::Table(t) => t,
        _ => unreachable!("path is never empty"),
    }
}

/// Check `given` against the type of `default`, coercing integers to floats where a float is expected.
/// Returns the expected-type description on mismatch.
fn check_value(
    default: &toml::Value,
    given: &toml::Value,
    key: &str,
    origin_of: &dyn Fn(&str) -> String,
) -> Result<toml::Value, ConfigError> {
    use toml::Value as V;
    let mismatch = || {
        ConfigError::new(
            origin_of(key),
            key,
            format!("expected {}, found {} ({})", type_name(default), type_name(given), show(given)),
        )
    };
    match (default, given) {
        (V::Float(_), V::Integer(i)) => Ok(V::Float(*i as f64)),
        (V::Float(_), V::Float(f)) => {
            if f.is_finite() {
                Ok(V::Float(*f))
            } else {
                Err(ConfigError::new(origin_of(key), key, format!("expected a finite number, found {f}")))
            }
        }
        (V::Integer(_), V::Integer(_))
        | (V::String(_), V::String(_))
        | (V::Boolean(_), V::Boolean(_))
        | (V::Datetime(_), V::Datetime(_)) => Ok(given.clone()),
        (V::Array(d), V::Array(g)) => {
            let mut out = Vec::with_capacity(g.len());
            for (i, item) in g.iter().enumerate() {
                let k = format!("{key}[{i}]");
                out.push(match d.first() {
                    Some(proto) => check_value(proto, item, &k, origin_of)?,
                    None => item.clone(),
                });
            }
            Ok(V::Array(out))
        }
        (V::Table(d), V::Table(g)) => check_table(d, g, key, origin_of).map(V::Table),
        _ => Err(mismatch()),
    }
}

fn check_table(
    defaults: &toml::Table,
    given: &toml::Table,
    prefix: &str,
    origin_of: &dyn Fn(&str) -> String,
) -> Result<toml::Table, ConfigError> {
    let mut out = toml::Table::new();
    for (k, v) in given {
        let key = format!("{prefix}.{k}");
        match defaults.get(k) {
            Some(d) => {
                out.insert(k.clone(), check_value(d, v, &key, origin_of)?);
            }
            None => {
                let hint = did_you_mean(k, defaults.keys().map(String::as_str)).or_else(|| {
                    let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
                    Some(format!("known parameters here: {}", known.join(", ")))
                });
                return Err(ConfigError::new(origin_of(&key), key, "unknown parameter").hint(hint));
            }
        }
    }
    Ok(out)
}

/// Where the project root is: `[pipeline] root` relative to the file, else the file's directory, or its
/// parent when that directory is called `pipelines` (so `pipe run pipelines/x.toml` works from anywhere).
fn project_root(file: &Path, root: Option<&str>) -> PathBuf {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match root {
        Some(r) => {
            let p = dir.join(r);
            std::fs::canonicalize(&p).unwrap_or(p)
        }
        None if dir.file_name().is_some_and(|n| n == "pipelines") => dir.parent().map(Path::to_path_buf).unwrap_or(dir),
        None => dir,
    }
}

/// Read, layer and validate a pipeline file. Touches nothing on disk but the file itself.
pub fn load(file: &Path, overrides: &Overrides, registry: &[Box<dyn Stage>]) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file.display().to_string(), "", format!("cannot read the pipeline file: {e}")))?;
    load_str(file, &text, overrides, registry)
}

/// [`load`] over text already read (tests, and `pipe show --resolved` round trips).
pub fn load_str(
    file: &Path,
    text: &str,
    overrides: &Overrides,
    registry: &[Box<dyn Stage>],
) -> Result<Pipeline, ConfigError> {
    let origin = file.display().to_string();
    let sk = parse_skeleton(file, text, registry)?;
    let stage_of = |kind: &str| registry.iter().find(|s| s.kind() == kind).expect("kind checked");

    // Defaults layer per stage id, named after the embedded file it came from.
    let mut fig = Figment::new();
    let mut defaults_by_id = Vec::new();
    for (id, kind, _) in &sk.stages {
        let defaults: toml::Table = stage_of(kind).defaults().parse().map_err(|e: toml::de::Error| {
            ConfigError::new(
                format!("stages/{kind}.toml"),
                "",
                format!("embedded defaults do not parse: {}", e.message()),
            )
        })?;
        let mut t = toml::Table::new();
        t.insert(id.clone(), toml::Value::Table(defaults.clone()));
        let mut top = toml::Table::new();
        top.insert("stages".into(), toml::Value::Table(t));
        fig = fig.merge(Layer::new(format!("stages/{kind}.toml (defaults)"), None, &top));
        defaults_by_id.push(defaults);
    }
    let executor = ExecutorConfig::parse(&origin, sk.table.get("executor"))?;
    let mut file_layer = sk.table.clone();
    file_layer.remove("pipeline");
    file_layer.remove("sweep");
    file_layer.remove("executor");
    if let Some(toml::Value::Table(st)) = file_layer.get_mut("stages") {
        for (_, v) in st.iter_mut() {
            if let toml::Value::Table(t) = v {
                for k in STAGE_META_KEYS {
                    t.remove(*k);
                }
            }
        }
    }
    fig = fig.merge(Layer::new(origin.clone(), Some(file.to_path_buf()), &file_layer));

    let ids: Vec<&str> = sk.stages.iter().map(|(id, _, _)| id.as_str()).collect();
    let env_id = |id: &str| id.to_ascii_uppercase().replace('-', "_");
    let mut env = overrides.env.clone();
    env.sort();
    for (var, value) in &env {
        let Some(rest) = var.strip_prefix("PIPE_") else { continue };
        let Some((stage, param)) = rest.split_once("__") else { continue };
        let Some(id) = ids.iter().find(|id| env_id(id) == stage) else {
            let env_ids: Vec<String> = ids.iter().map(|i| env_id(i)).collect();
            let hint = did_you_mean(stage, env_ids.iter().map(String::as_str))
                .or_else(|| Some(format!("stages in this pipeline: {}", ids.join(", "))));
            return Err(ConfigError::new(
                format!("environment variable {var}"),
                format!("stages.{}", stage.to_ascii_lowercase()),
                "no such stage in this pipeline",
            )
            .hint(hint));
        };
        let mut path = vec![id.to_string()];
        path.extend(param.split("__").map(str::to_ascii_lowercase));
        let mut top = toml::Table::new();
        top.insert("stages".into(), toml::Value::Table(nest(&path, parse_scalar(value))));
        fig = fig.merge(Layer::new(format!("environment variable {var}"), None, &top));
    }
    let mut multi: Vec<(String, String, Vec<toml::Value>)> = Vec::new();
    for set in &overrides.sets {
        if let Some((path, values)) = parse_multi(set) {
            multi.push((set.clone(), path.join("."), values));
            continue;
        }
        let Some((path, value)) = parse_assignment(set) else {
            return Err(ConfigError::new(format!("--set {set}"), "", "expected `<stage>.<param>=<value>`")
                .hint(Some("for example `--set split.seed=7`".into())));
        };
        if !ids.contains(&path[0].as_str()) {
            let hint = did_you_mean(&path[0], ids.iter().copied())
                .or_else(|| Some(format!("stages in this pipeline: {}", ids.join(", "))));
            return Err(ConfigError::new(
                format!("--set {set}"),
                format!("stages.{}", path[0]),
                "no such stage in this pipeline",
            )
            .hint(hint));
        }
        let mut top = toml::Table::new();
        top.insert("stages".into(), toml::Value::Table(nest(&path, value)));
        fig = fig.merge(Layer::new(format!("--set {set}"), None, &top));
    }

    let merged: toml::Table =
        fig.extract().map_err(|e| ConfigError::new(&origin, "", format!("cannot merge configuration layers: {e}")))?;
    let origin_of =
        |key: &str| -> String { fig.find_metadata(key).map(|m| m.name.to_string()).unwrap_or_else(|| origin.clone()) };
    let empty = toml::Table::new();
    let merged_stages = merged.get("stages").and_then(|v| v.as_table()).unwrap_or(&empty);

    let mut stages = Vec::new();
    for (((id, kind, needs), defaults), (resources, retries)) in sk.stages.iter().zip(&defaults_by_id).zip(&sk.meta) {
        let given = merged_stages.get(id).and_then(|v| v.as_table()).unwrap_or(&empty);
        let checked = check_table(defaults, given, &format!("stages.{id}"), &origin_of)?;
        let mut params = defaults.clone();
        for (k, v) in checked {
            params.insert(k, v);
        }
        let params = Params(params);
        let imp = stage_of(kind);
        let param_error = |e: ParamError, what: &str| {
            let key = if e.key.is_empty() { format!("stages.{id}") } else { format!("stages.{id}.{}", e.key) };
            ConfigError::new(origin_of(&key), key, format!("{what}{}", e.message))
        };
        imp.check(&params).map_err(|e| param_error(e, ""))?;
        for n in needs {
            if !ids.contains(&n.as_str()) {
                let hint = did_you_mean(n, ids.iter().copied());
                return Err(
                    ConfigError::new(&origin, format!("stages.{id}.needs"), format!("unknown stage `{n}`")).hint(hint)
                );
            }
        }
        let unavailable =
            imp.available(&params).err().map(|e| param_error(e, &format!("stage `{id}` cannot run in this build: ")));
        stages.push(StageConfig {
            id: id.clone(),
            kind: kind.clone(),
            needs: needs.clone(),
            params,
            unavailable,
            resources: resources.clone(),
            retries: *retries,
        });
    }
    let mut sweep = match sk.table.get("sweep") {
        Some(v) => Some(parse_sweep(&origin, v, &stages, registry)?),
        None => None,
    };
    for (set, path, values) in multi {
        let spec = sweep.get_or_insert_with(SweepSpec::default);
        let checked = check_axis(&format!("--set {set}"), &path, &path, &values, &stages, registry)?;
        spec.grid.retain(|(k, _)| *k != path);
        spec.grid.push((path, checked));
    }
    let root = project_root(file, sk.root.as_deref());
    let artifacts = root.join(&sk.artifacts);
    let pipeline = Pipeline {
        name: sk.name,
        file: file.to_path_buf(),
        root,
        artifacts,
        remote: sk.remote,
        stages,
        sweep,
        source_text: text.to_string(),
        overrides: overrides.clone(),
        executor,
        slurm: sk.slurm,
    };
    // A cycle first: a stage that needs itself is missing its real upstream too, and the cycle is
    // the mistake to report.
    super::graph::build(&pipeline)?;
    for s in &pipeline.stages {
        check_needs(&origin, s, &pipeline.stages, stage_of(&s.kind).contract().needs)?;
    }
    Ok(pipeline)
}

/// Check a stage's `needs` against what its kind reads: every required upstream kind present, none
/// twice. Before anything runs, so a pipeline that forgot an upstream does not fail after the
/// stages before it have spent their time.
fn check_needs(origin: &str, s: &StageConfig, stages: &[StageConfig], contract: &[Need]) -> Result<(), ConfigError> {
    let key = format!("stages.{}.needs", s.id);
    let kind_of = |id: &str| stages.iter().find(|t| t.id == id).map(|t| t.kind.as_str()).unwrap_or_default();
    let quoted = |v: &[String]| v.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    for need in contract {
        let kinds = need.kinds.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" or ");
        let found: Vec<&String> = s.needs.iter().filter(|n| need.kinds.contains(&kind_of(n))).collect();
        if found.len() > 1 {
            let names = found.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            return Err(ConfigError::new(
                origin,
                key,
                format!(
                    "stage `{}` ({}) reads one upstream stage of kind {kinds}, but `needs` names {}: {names}",
                    s.id,
                    s.kind,
                    found.len()
                ),
            )
            .hint(Some("keep exactly one of them in `needs`".into())));
        }
        if !found.is_empty() || !need.required(&s.params) {
            continue;
        }
        let because = match need.when {
            When::ParamIs { key: param, .. } => {
                let value = s.params.get(param).map(|v| v.to_string()).unwrap_or_default();
                format!(" because `{param} = {value}`")
            }
            _ => String::new(),
        };
        let candidates: Vec<&StageConfig> =
            stages.iter().filter(|t| need.kinds.contains(&t.kind.as_str()) && t.id != s.id).collect();
        let mut hint = match candidates.as_slice() {
            [one] => {
                let mut with = s.needs.clone();
                with.push(one.id.clone());
                format!("write `needs = [{}]`", quoted(&with))
            }
            [] => format!("add a stage of kind {kinds} to the pipeline and name it in `needs`"),
            many => format!(
                "add one of {} to `needs`",
                many.iter().map(|t| format!("`{}`", t.id)).collect::<Vec<_>>().join(", ")
            ),
        };
        if let When::ParamIs { key: param, .. } = need.when {
            hint.push_str(&format!(", or change `{param}`"));
        }
        return Err(ConfigError::new(
            origin,
            key,
            format!(
                "stage `{}` ({}) reads an upstream stage of kind {kinds}{because}, but none is in `needs = [{}]`",
                s.id,
                s.kind,
                quoted(&s.needs)
            ),
        )
        .hint(Some(hint)));
    }
    Ok(())
}

/// `stage.param=a,b,c` with two or more values is a grid axis. A value that parses whole as TOML
/// (`"a,b"` quoted, `[1, 2]`) is one value; so is a string with spaces (an instruction, say).
fn parse_multi(s: &str) -> Option<(Vec<String>, Vec<toml::Value>)> {
    let (path, raw) = s.split_once('=')?;
    let raw = raw.trim();
    if !raw.contains(',') || raw.parse::<toml::Value>().is_ok() || format!("v = {raw}").parse::<toml::Table>().is_ok() {
        return None;
    }
    let parts: Vec<&str> = raw.split(',').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty() || p.contains(char::is_whitespace)) {
        return None;
    }
    let path: Vec<String> = path.trim().split('.').map(|p| p.trim().to_string()).collect();
    if path.len() < 2 {
        return None;
    }
    Some((path, parts.iter().map(|p| parse_scalar(p)).collect()))
}

/// The default value at `stage.param[.sub…]`, with errors that name the sweep key.
fn default_at(
    origin: &str,
    key: &str,
    path: &str,
    stages: &[StageConfig],
    registry: &[Box<dyn Stage>],
) -> Result<toml::Value, ConfigError> {
    let parts: Vec<&str> = path.split('.').collect();
    let ids: Vec<&str> = stages.iter().map(|s| s.id.as_str()).collect();
    if parts.len() < 2 {
        return Err(ConfigError::new(origin, key, "expected `<stage>.<param>`")
            .hint(Some("for example `\"train.learning_rate\" = [1e-5, 2e-5]`".into())));
    }
    let Some(stage) = stages.iter().find(|s| s.id == parts[0]) else {
        return Err(ConfigError::new(origin, key, format!("no stage `{}` in this pipeline", parts[0]))
            .hint(did_you_mean(parts[0], ids.iter().copied())));
    };
    let imp = registry.iter().find(|s| s.kind() == stage.kind).expect("kind checked");
    let defaults: toml::Table = imp.defaults().parse().unwrap_or_default();
    let mut cur = &defaults;
    for (i, p) in parts[1..].iter().enumerate() {
        match cur.get(*p) {
            Some(toml::Value::Table(t)) if i + 2 < parts.len() => cur = t,
            Some(v) if i + 2 == parts.len() => return Ok(v.clone()),
            _ => {
                return Err(ConfigError::new(
                    origin,
                    key,
                    format!("stage `{}` ({}) has no parameter `{}`", parts[0], stage.kind, parts[1..].join(".")),
                )
                .hint(did_you_mean(p, cur.keys().map(String::as_str))));
            }
        }
    }
    unreachable!("loop returns")
}

fn check_axis(
    origin: &str,
    key: &str,
    path: &str,
    values: &[toml::Value],
    stages: &[StageConfig],
    registry: &[Box<dyn Stage>],
) -> Result<Vec<toml::Value>, ConfigError> {
    let default = default_at(origin, key, path, stages, registry)?;
    if values.is_empty() {
        return Err(ConfigError::new(origin, key, "empty list of values").hint(Some("give at least one value".into())));
    }
    let o = origin.to_string();
    let origin_of = move |_: &str| o.clone();
    values.iter().map(|v| check_value(&default, v, key, &origin_of)).collect()
}

fn parse_sweep(
    origin: &str,
    v: &toml::Value,
    stages: &[StageConfig],
    registry: &[Box<dyn Stage>],
) -> Result<SweepSpec, ConfigError> {
    let t = v
        .as_table()
        .ok_or_else(|| ConfigError::new(origin, "sweep", "expected a table: `[sweep.grid]` or `[sweep.random]`"))?;
    let mut spec = SweepSpec::default();
    for k in t.keys() {
        if k != "grid" && k != "random" {
            return Err(
                ConfigError::new(origin, format!("sweep.{k}"), "unknown key").hint(did_you_mean(k, ["grid", "random"]))
            );
        }
    }
    if let Some(g) = t.get("grid") {
        let g = g.as_table().ok_or_else(|| {
            ConfigError::new(origin, "sweep.grid", "expected a table of `\"<stage>.<param>\" = [values]`")
        })?;
        for (path, vals) in g {
            let key = format!("sweep.grid.{path}");
            let vals = vals.as_array().ok_or_else(|| {
                ConfigError::new(origin, &key, format!("expected a list of values, found {}", type_name(vals)))
                    .hint(Some(format!("write `\"{path}\" = [{}]`", show(vals))))
            })?;
            spec.grid.push((path.clone(), check_axis(origin, &key, path, vals, stages, registry)?));
        }
    }
    if let Some(r) = t.get("random") {
        let r = r.as_table().ok_or_else(|| ConfigError::new(origin, "sweep.random", "expected a table"))?;
        let n = match r.get("n") {
            Some(toml::Value::Integer(n)) if *n > 0 => *n as usize,
            Some(v) => {
                return Err(ConfigError::new(
                    origin,
                    "sweep.random.n",
                    format!("expected a positive integer, found {}", show(v)),
                ))
            }
            None => return Err(ConfigError::new(origin, "sweep.random.n", "missing: how many points to draw")),
        };
        let seed = match r.get("seed") {
            Some(toml::Value::Integer(s)) if *s >= 0 => *s as u64,
            Some(v) => {
                return Err(ConfigError::new(
                    origin,
                    "sweep.random.seed",
                    format!("expected an integer >= 0, found {}", show(v)),
                ))
            }
            None => 0,
        };
        let mut params = Vec::new();
        for (path, d) in r {
            if path == "n" || path == "seed" {
                continue;
            }
            let key = format!("sweep.random.{path}");
            let default = default_at(origin, &key, path, stages, registry)?;
            let dist = parse_dist(origin, &key, d)?;
            let numeric = matches!(default, toml::Value::Float(_) | toml::Value::Integer(_));
            match &dist {
                Dist::Choice(vals) => {
                    check_axis(origin, &key, path, vals, stages, registry)?;
                }
                _ if !numeric => {
                    return Err(ConfigError::new(
                        origin,
                        &key,
                        format!("a numeric distribution for a parameter that takes {}", type_name(&default)),
                    )
                    .hint(Some("use `{ choice = [...] }`".into())))
                }
                _ => {}
            }
            params.push((path.clone(), dist));
        }
        if params.is_empty() {
            return Err(ConfigError::new(origin, "sweep.random", "no parameters to draw")
                .hint(Some("add e.g. `\"train.learning_rate\" = { log_uniform = [1e-6, 1e-4] }`".into())));
        }
        spec.random = Some(RandomSpec { n, seed, params });
    }
    if spec.grid.is_empty() && spec.random.is_none() {
        return Err(ConfigError::new(origin, "sweep", "the sweep has no parameters"));
    }
    Ok(spec)
}

fn parse_dist(origin: &str, key: &str, d: &toml::Value) -> Result<Dist, ConfigError> {
    let kinds = ["log_uniform", "uniform", "choice"];
    let bad = |msg: String| {
        ConfigError::new(origin, key, msg)
            .hint(Some("use `{ log_uniform = [lo, hi] }`, `{ uniform = [lo, hi] }` or `{ choice = [a, b, …] }`".into()))
    };
    let t = d
        .as_table()
        .filter(|t| t.len() == 1)
        .ok_or_else(|| bad(format!("expected one distribution, found {}", show(d))))?;
    let (name, arg) = t.iter().next().expect("len 1");
    let range = || -> Result<(f64, f64), ConfigError> {
        let a = arg.as_array().filter(|a| a.len() == 2).ok_or_else(|| bad(format!("`{name}` takes [lo, hi]")))?;
        let num = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
        match (num(&a[0]), num(&a[1])) {
            (Some(lo), Some(hi)) if lo < hi && lo.is_finite() && hi.is_finite() => Ok((lo, hi)),
            _ => Err(bad(format!("`{name}` needs two finite numbers lo < hi, found {}", show(arg)))),
        }
    };
    match name.as_str() {
        "log_uniform" => {
            let (lo, hi) = range()?;
            if lo <= 0.0 {
                return Err(bad(format!("`log_uniform` needs 0 < lo, found {lo}")));
            }
            Ok(Dist::LogUniform(lo, hi))
        }
        "uniform" => range().map(|(lo, hi)| Dist::Uniform(lo, hi)),
        "choice" => match arg.as_array() {
            Some(a) if !a.is_empty() => Ok(Dist::Choice(a.clone())),
            _ => Err(bad("`choice` needs a non-empty list".into())),
        },
        other => Err(bad(format!("unknown distribution `{other}`")).hint(did_you_mean(other, kinds))),
    }
}
