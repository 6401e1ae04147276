//! Plan and run: keys in topological order, cached stages skipped, stale ones run into temp dirs and
//! committed atomically, and a run record written for `pipe compare`. Knows nothing about ML.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::config::{ConfigError, Pipeline};
use super::dirty::{self, Reason};
use super::graph::{self, Dag};
use super::hashing::StatCache;
use super::key::{dir_name, flatten_params, KeyInputs, UpstreamInput};
use super::remote::{Fetch, Remote, RemoteError};
use super::slots::{GpuPool, SlotGuard};
use super::stage::{ExternalInput, JsonMap, Stage, StageContext, StageError, Upstream};
use super::store::{Manifest, Store, StoreError, MANIFEST_SCHEMA};
use super::time;
use crate::util::fs::write_atomic;

/// Set by the Ctrl-C/SIGTERM handler; stages poll it through their context.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The temp dir of the stage now running, so the signal handler can remove it before exiting.
pub static CURRENT_TEMP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{0}")]
    Usage(String),
    /// `pipe exec` was started before the stage's upstream artifacts were in the store.
    #[error("{0}")]
    UpstreamMissing(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Cached,
    /// Downloaded from the remote store instead of computed.
    Fetched,
    Ran,
    Failed,
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Fetched => "fetched",
            Status::Ran => "ran",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// One stage's line in a run report and run record.
#[derive(Debug, Clone, Serialize)]
pub struct StageRecord {
    pub id: String,
    pub kind: String,
    pub status: Status,
    pub key: Option<String>,
    pub seconds: f64,
    pub dir: Option<String>,
    pub reason: Option<String>,
    pub params: BTreeMap<String, serde_json::Value>,
    pub metrics: JsonMap,
    /// The GPU ordinals the stage computed on (empty when it ran on the CPU or was cached).
    pub gpus: Vec<usize>,
    /// The Slurm job that computed the stage (only for `ran` stages of a Slurm run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<u64>,
    /// Something went wrong that did not fail the stage (an upload to the remote).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// `artifacts/runs/<pipeline>/<run-id>/run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub pipeline: String,
    pub run_id: String,
    pub run_dir: String,
    pub file: String,
    pub status: String,
    pub started: String,
    pub finished: Option<String>,
    pub tool_version: String,
    /// For a sweep point: the sweep id, the point's name and its values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<serde_json::Value>,
    pub stages: Vec<StageRecord>,
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub force: Vec<String>,
    pub until: Option<String>,
    pub dry_run: bool,
    pub quiet: bool,
    /// Where the run record goes (sweep points); default `runs/<pipeline>/<time>-<pid>`.
    pub run_dir: Option<PathBuf>,
    pub sweep: Option<serde_json::Value>,
    /// The process's GPU slots, shared by every run it makes at once (sweep points under
    /// `--jobs`); `None` hands stages no GPU and makes none wait.
    pub gpus: Option<Arc<GpuPool>>,
    /// Stages of this pipeline to run at once (independent branches); 0 or 1 runs them one by one.
    pub jobs: usize,
    /// Set when the stale stages were computed elsewhere (Slurm jobs): the run then only collects
    /// their artifacts from the store and computes nothing itself. Keyed by stage id.
    pub executed: Option<BTreeMap<String, Executed>>,
}

/// A stage some other process computed for this run (a Slurm job).
#[derive(Debug, Clone)]
pub struct Executed {
    pub job: u64,
    /// False when the job was submitted for another sweep point that shares the stage: this run
    /// then reports it `cached`, like a local sweep does.
    pub owner: bool,
    /// Why the job failed (naming the job and its log), if it did.
    pub failure: Option<String>,
    pub log: String,
    /// The job found the artifact already in the store (another run computed it meanwhile).
    pub found_cached: bool,
}

impl StageState {
    fn stale(s: &super::config::StageConfig, key: Option<String>, reasons: Vec<Reason>) -> Self {
        StageState { id: s.id.clone(), kind: s.kind.clone(), state: "stale", key, reasons, dir: None, in_remote: None }
    }
}

/// Fresh or stale, with reasons: what `pipe status` and `pipe why` print.
#[derive(Debug, Clone, Serialize)]
pub struct StageState {
    pub id: String,
    pub kind: String,
    pub state: &'static str,
    pub key: Option<String>,
    pub reasons: Vec<Reason>,
    #[serde(skip)]
    pub dir: Option<PathBuf>,
    /// With a remote: whether it holds this stale stage's artifact (`pipe pull` or `pipe run` fetches it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_remote: Option<bool>,
}

pub struct Engine<'a> {
    pub pipeline: &'a Pipeline,
    registry: &'a [Box<dyn Stage>],
    pub store: Store,
    stat: StatCache,
    pub dag: Dag,
    /// The pipeline's remote store, opened when it names one.
    pub remote: Option<Remote>,
}

/// A stage that completed in this run (or this status pass): what its dependents hash and read.
#[derive(Debug, Clone)]
struct Done {
    output_hash: String,
    dir: PathBuf,
}

impl StageRecord {
    fn new(s: &super::config::StageConfig) -> Self {
        StageRecord {
            id: s.id.clone(),
            kind: s.kind.clone(),
            status: Status::Skipped,
            key: None,
            seconds: 0.0,
            dir: None,
            reason: None,
            params: flatten_params(&s.params.0),
            metrics: JsonMap::new(),
            gpus: Vec::new(),
            slurm_job: None,
            warning: None,
        }
    }
}

/// Last successful key per stage id: the baseline that `status` explains changes against.
fn state_path(store: &Store, pipeline: &str) -> PathBuf {
    store.root.join(".state").join(format!("{pipeline}.json"))
}

impl<'a> Engine<'a> {
    pub fn new(pipeline: &'a Pipeline, registry: &'a [Box<dyn Stage>]) -> Result<Self, EngineError> {
        let dag = graph::build(pipeline)?;
        let store = Store::new(&pipeline.artifacts);
        let stat = StatCache::open(&pipeline.artifacts);
        let remote = pipeline.remote.as_deref().map(Remote::open).transpose()?;
        Ok(Engine { pipeline, registry, store, stat, dag, remote })
    }

    fn stage_impl(&self, kind: &str) -> &dyn Stage {
        self.registry.iter().find(|s| s.kind() == kind).map(|b| b.as_ref()).expect("kind validated by config")
    }

    fn last_keys(&self) -> BTreeMap<String, String> {
        std::fs::read(state_path(&self.store, &self.pipeline.name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn remember_key(&self, id: &str, key: &str) {
        let path = state_path(&self.store, &self.pipeline.name);
        let name_key = blake3::hash(self.pipeline.name.as_bytes()).to_hex().to_string();
        let _lock = self.store.lock("state", &name_key, "state");
        let mut keys = self.last_keys();
        keys.insert(id.to_string(), key.to_string());
        let _ = write_atomic(&path, &serde_json::to_vec_pretty(&keys).expect("map serializes"));
    }

    /// Key inputs for stage `i`, given its upstream stages' output hashes (None if any is unknown).
    fn key_inputs(&self, i: usize, upstream: &HashMap<usize, Done>) -> Result<KeyInputs, String> {
        let s = &self.pipeline.stages[i];
        let imp = self.stage_impl(&s.kind);
        let mut k = KeyInputs::new(&s.kind, imp.version(), &imp.keyed_params(&s.params));
        for n in &s.needs {
            let j = self.index(n);
            if let Some(d) = upstream.get(&j) {
                k.upstream
                    .push(UpstreamInput { kind: self.pipeline.stages[j].kind.clone(), output: d.output_hash.clone() });
            }
        }
        k.upstream.sort();
        for input in imp.inputs(&s.params) {
            match input {
                ExternalInput::Remote(id) => {
                    k.inputs.insert(id.clone(), id);
                }
                ExternalInput::File(p) => {
                    let (rel, abs) = self.locate(&p);
                    let h = self.stat.hash(&rel, &abs).map_err(|e| format!("input {p}: {e}"))?;
                    k.inputs.insert(rel, h);
                }
                ExternalInput::Dir(p) => {
                    let (rel, abs) = self.locate(&p);
                    let mut files = Vec::new();
                    let mut stack = vec![abs.clone()];
                    while let Some(d) = stack.pop() {
                        let rd = std::fs::read_dir(&d).map_err(|e| format!("input {p}: {e}"))?;
                        for e in rd.flatten() {
                            let path = e.path();
                            if path.is_dir() {
                                stack.push(path);
                            } else {
                                files.push(path);
                            }
                        }
                    }
                    files.sort();
                    let mut h = blake3::Hasher::new();
                    for f in files {
                        let (frel, _) = self.locate(&f.to_string_lossy());
                        let fh = self.stat.hash(&frel, &f).map_err(|e| format!("input {}: {e}", f.display()))?;
                        h.update(frel.as_bytes());
                        h.update(b"\0");
                        h.update(fh.as_bytes());
                    }
                    k.inputs.insert(format!("{rel}/"), h.finalize().to_hex().to_string());
                }
            }
        }
        Ok(k)
    }

    /// (project-relative display path, absolute path) of an input path as written in a parameter.
    fn locate(&self, p: &str) -> (String, PathBuf) {
        let abs = if Path::new(p).is_absolute() { PathBuf::from(p) } else { self.pipeline.root.join(p) };
        let rel = abs
            .strip_prefix(&self.pipeline.root)
            .map(|r| r.to_string_lossy().replace('\\', "/"))
            .unwrap_or_else(|_| p.to_string());
        (rel, abs)
    }

    fn index(&self, id: &str) -> usize {
        self.pipeline.stages.iter().position(|s| s.id == id).expect("needs validated")
    }

    /// The position of stage `id` in the pipeline (an id from the pipeline's own `needs`).
    pub fn index_of(&self, id: &str) -> usize {
        self.index(id)
    }

    /// Which stages `--until` selects (all without it), after checking the ids exist.
    pub fn wanted(&self, until: Option<&str>) -> Result<Vec<bool>, EngineError> {
        let p = self.pipeline;
        let Some(u) = until else { return Ok(vec![true; p.stages.len()]) };
        if p.stage(u).is_none() {
            let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
            let hint = super::config::did_you_mean(u, ids.iter().copied()).unwrap_or_default();
            return Err(EngineError::Usage(format!("no stage `{u}` in {} {hint}", p.file.display())));
        }
        let mut w = vec![false; p.stages.len()];
        let mut stack = vec![self.index(u)];
        while let Some(i) = stack.pop() {
            if !w[i] {
                w[i] = true;
                stack.extend(p.stages[i].needs.iter().map(|n| self.index(n)));
            }
        }
        Ok(w)
    }

    /// Per stage, an id of the computation it asks for, known before anything runs: the key's inputs
    /// with each upstream *output* hash replaced by that upstream's plan id. Two stages with the same
    /// plan id (sweep points sharing a prefix) compute the same artifact. None when an input file
    /// cannot be read.
    pub fn plan_ids(&self) -> Vec<Option<String>> {
        let mut ids: Vec<Option<String>> = vec![None; self.pipeline.stages.len()];
        let mut planned: HashMap<usize, Done> = HashMap::new();
        for &i in &self.dag.order {
            let s = &self.pipeline.stages[i];
            if s.needs.iter().any(|n| ids[self.index(n)].is_none()) {
                continue;
            }
            if let Ok(k) = self.key_inputs(i, &planned) {
                let id = k.hash();
                planned.insert(i, Done { output_hash: format!("plan:{id}"), dir: PathBuf::new() });
                ids[i] = Some(id);
            }
        }
        ids
    }

    /// The artifacts of every stage stage `i` (transitively) needs, read from the store, in order.
    fn upstream_from_store(&self, i: usize) -> Result<HashMap<usize, Done>, String> {
        let mut need = vec![false; self.pipeline.stages.len()];
        let mut stack: Vec<usize> = self.pipeline.stages[i].needs.iter().map(|n| self.index(n)).collect();
        while let Some(j) = stack.pop() {
            if !need[j] {
                need[j] = true;
                stack.extend(self.pipeline.stages[j].needs.iter().map(|n| self.index(n)));
            }
        }
        let mut outputs = HashMap::new();
        for &j in self.dag.order.iter().filter(|&&j| need[j]) {
            let u = &self.pipeline.stages[j];
            let key = self.key_inputs(j, &outputs)?.hash();
            match self.store.manifest(&u.kind, &key) {
                Ok(Some(m)) => {
                    outputs.insert(j, Done { output_hash: m.output_hash, dir: self.store.artifact_dir(&u.kind, &key) });
                }
                _ => {
                    return Err(format!(
                        "upstream stage `{}` has no artifact {} in the store {}: it must complete first",
                        u.id,
                        self.store.artifact_dir(&u.kind, &key).display(),
                        self.store.root.display()
                    ))
                }
            }
        }
        Ok(outputs)
    }

    /// Whether stage `i`'s artifact is in the store (its upstream ones too).
    pub fn has_artifact(&self, i: usize) -> bool {
        let s = &self.pipeline.stages[i];
        self.upstream_from_store(i)
            .and_then(|up| self.key_inputs(i, &up))
            .is_ok_and(|k| self.store.manifest(&s.kind, &k.hash()).ok().flatten().is_some())
    }

    /// Run one stage whose upstream artifacts are already in the store — what a Slurm job does —
    /// through the same cache check, lock, temp dir and atomic publish as [`Engine::run`].
    pub fn run_stage(&self, id: &str, force: bool, quiet: bool) -> Result<StageRecord, EngineError> {
        let p = self.pipeline;
        p.check_runnable()?;
        let Some(s) = p.stage(id) else {
            let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
            let hint = super::config::did_you_mean(id, ids.iter().copied()).unwrap_or_default();
            return Err(EngineError::Usage(format!("no stage `{id}` in {} {hint}", p.file.display())));
        };
        let i = self.index(id);
        self.store.init()?;
        let mut outputs = self.upstream_from_store(i).map_err(EngineError::UpstreamMissing)?;
        let mut rec = StageRecord::new(s);
        let opts = RunOptions { force: if force { vec![id.to_string()] } else { vec![] }, quiet, ..Default::default() };
        self.run_one(i, &opts, &self.last_keys(), &mut outputs, &mut rec, true);
        self.stat.save();
        Ok(rec)
    }

    fn upstream_ids_of_kind(&self, i: usize, kind: &str) -> String {
        let ids: Vec<&str> = self.pipeline.stages[i]
            .needs
            .iter()
            .filter(|n| self.pipeline.stages[self.index(n)].kind == kind)
            .map(String::as_str)
            .collect();
        if ids.is_empty() {
            kind.to_string()
        } else {
            ids.join(", ")
        }
    }

    /// Why stage `i` is stale, given its current key inputs (upstream possibly incomplete).
    fn reasons(&self, i: usize, cur: &KeyInputs, last: &BTreeMap<String, String>, upstream_known: bool) -> Vec<Reason> {
        let s = &self.pipeline.stages[i];
        let Some(prev_key) = last.get(&s.id) else { return vec![Reason::NeverRun] };
        let prev = match self.store.manifest(&s.kind, prev_key) {
            Ok(Some(m)) => m,
            _ => {
                let mut r = vec![Reason::Missing { key: prev_key.clone() }];
                if !upstream_known {
                    return r;
                }
                if cur.hash() != *prev_key {
                    r.push(Reason::KeyChanged);
                }
                return r;
            }
        };
        let ids = |kind: &str| self.upstream_ids_of_kind(i, kind);
        let mut r = dirty::diff(&s.id, &prev.key_inputs, cur, &ids, upstream_known);
        if r.is_empty() && upstream_known {
            r.push(Reason::KeyChanged);
        }
        r
    }

    /// Fresh/stale for every stage, with reasons, without running anything.
    pub fn status(&self, force: &[String]) -> Vec<StageState> {
        let last = self.last_keys();
        let mut outputs: HashMap<usize, Done> = HashMap::new();
        let mut stale: Vec<bool> = vec![false; self.pipeline.stages.len()];
        let mut states = Vec::new();
        for &i in &self.dag.order {
            let s = &self.pipeline.stages[i];
            let stale_up: Vec<&String> = s.needs.iter().filter(|n| stale[self.index(n)]).collect();
            let cur = match self.key_inputs(i, &outputs) {
                Ok(k) => k,
                Err(e) => {
                    stale[i] = true;
                    states.push(StageState::stale(s, None, vec![Reason::InputUnreadable { message: e }]));
                    continue;
                }
            };
            if !stale_up.is_empty() {
                let mut reasons: Vec<Reason> =
                    stale_up.iter().map(|n| Reason::UpstreamStale { stage: n.to_string() }).collect();
                if !last.contains_key(&s.id) {
                    reasons.push(Reason::NeverRun);
                } else {
                    reasons.extend(
                        self.reasons(i, &cur, &last, false)
                            .into_iter()
                            .filter(|r| !matches!(r, Reason::Missing { .. })),
                    );
                }
                stale[i] = true;
                states.push(StageState::stale(s, None, reasons));
                continue;
            }
            let key = cur.hash();
            let manifest = self.store.manifest(&s.kind, &key).ok().flatten();
            let forced = force.contains(&s.id);
            match manifest {
                Some(m) if !forced => {
                    outputs.insert(i, Done { output_hash: m.output_hash, dir: self.store.artifact_dir(&s.kind, &key) });
                    states.push(StageState {
                        id: s.id.clone(),
                        kind: s.kind.clone(),
                        state: "fresh",
                        key: Some(key.clone()),
                        reasons: vec![],
                        dir: Some(self.store.artifact_dir(&s.kind, &key)),
                        in_remote: None,
                    });
                }
                _ => {
                    let reasons = if forced { vec![Reason::Forced] } else { self.reasons(i, &cur, &last, true) };
                    let mut state = StageState::stale(s, Some(key.clone()), reasons);
                    // A remote copy's output hash is as good as a local one for the keys downstream.
                    match self.remote.as_ref().filter(|_| !forced).map(|r| r.manifest(&s.kind, &key)) {
                        Some(Ok(Some(m))) => {
                            state.in_remote = Some(true);
                            outputs.insert(
                                i,
                                Done { output_hash: m.output_hash, dir: self.store.artifact_dir(&s.kind, &key) },
                            );
                        }
                        Some(Ok(None)) => {
                            state.in_remote = Some(false);
                            stale[i] = true;
                        }
                        Some(Err(e)) => {
                            eprintln!("pipe: warning: {e}");
                            stale[i] = true;
                        }
                        None => stale[i] = true,
                    }
                    states.push(state);
                }
            }
        }
        self.stat.save();
        states
    }

    /// Run the pipeline. Errors are engine failures (store unwritable); a failing stage is reported in
    /// the returned record with `status = "failed"`.
    pub fn run(&self, opts: &RunOptions) -> Result<RunRecord, EngineError> {
        let p = self.pipeline;
        // Before the store is touched: a stage this build cannot run would fail only after its
        // upstream stages had run.
        p.check_runnable()?;
        if let Some(pool) = &opts.gpus {
            self.check_gpus(pool)?;
        }
        for f in &opts.force {
            if p.stage(f).is_none() {
                let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
                let hint = super::config::did_you_mean(f, ids.iter().copied()).unwrap_or_default();
                return Err(EngineError::Usage(format!("no stage `{f}` in {} {hint}", p.file.display())));
            }
        }
        let wanted = self.wanted(opts.until.as_deref())?;
        if !opts.dry_run {
            self.store.init()?;
            let swept = self.store.sweep_temp();
            if swept > 0 && !opts.quiet {
                eprintln!("pipe: removed {swept} partial artifact(s) left by an interrupted run");
            }
        }
        let run_id = format!("{}-{}", time::compact_now(), std::process::id());
        let run_dir = opts.run_dir.clone().unwrap_or_else(|| self.store.root.join("runs").join(&p.name).join(&run_id));
        let mut record = RunRecord {
            pipeline: p.name.clone(),
            run_id: run_id.clone(),
            run_dir: run_dir.display().to_string(),
            file: p.file.display().to_string(),
            status: "running".into(),
            started: time::rfc3339_now(),
            finished: None,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            sweep: opts.sweep.clone(),
            stages: Vec::new(),
        };
        if !opts.dry_run {
            std::fs::create_dir_all(&run_dir).map_err(|e| StoreError::Io { path: run_dir.clone(), source: e })?;
            let _ = write_atomic(&run_dir.join("pipeline.toml"), p.to_toml().as_bytes());
            self.write_record(&run_dir, &record);
        }
        if !opts.quiet {
            eprintln!("pipe: {} ({} stages){}", p.name, p.stages.len(), if opts.dry_run { ", dry run" } else { "" });
        }
        let last = self.last_keys();
        let width = p.stages.iter().map(|s| s.id.len()).max().unwrap_or(4);
        let write = |record: &RunRecord| {
            if !opts.dry_run {
                self.write_record(&run_dir, record);
            }
        };
        if opts.jobs > 1 && !opts.dry_run {
            self.run_parallel(opts, &last, &wanted, width, &mut record, &write);
        } else {
            let mut outputs: HashMap<usize, Done> = HashMap::new();
            let mut done: HashMap<usize, Status> = HashMap::new();
            for &i in &self.dag.order {
                let rec = self.stage_record(i, opts, &last, &wanted, &done, &mut outputs);
                self.print_line(&rec, opts, width);
                done.insert(i, rec.status);
                record.stages.push(rec);
                write(&record);
            }
        }
        let failed = record.stages.iter().any(|s| s.status == Status::Failed);
        record.status = if failed { "failed" } else { "ok" }.into();
        record.finished = Some(time::rfc3339_now());
        if !opts.dry_run {
            self.write_record(&run_dir, &record);
            if let Some(remote) = &self.remote {
                super::remote::push_record(remote, &self.store, &run_dir, opts.quiet);
            }
        }
        self.stat.save();
        Ok(record)
    }

    /// See [`check_gpus`].
    pub fn check_gpus(&self, pool: &GpuPool) -> Result<(), ConfigError> {
        check_gpus(self.pipeline, self.registry, pool)
    }

    /// Waits for the GPUs stage `i` computes on, saying so on stderr when they are busy.
    fn gpu_slots<'p>(&self, i: usize, pool: &'p GpuPool, quiet: bool) -> Result<SlotGuard<'p>, String> {
        let s = &self.pipeline.stages[i];
        let want = pool.plan(self.stage_impl(&s.kind).gpus(&s.params)).map_err(|e| e.to_string())?;
        let mut waiting = |busy: usize| {
            if !quiet {
                eprintln!("  {}: waiting for a free GPU ({busy} busy)", s.id);
            }
        };
        pool.acquire(want, &INTERRUPTED, &mut waiting).map_err(|e| e.to_string())
    }

    /// Stage `i` run (or found cached, or skipped: not wanted, or an upstream that did not
    /// complete), given the stages finished before it.
    fn stage_record(
        &self,
        i: usize,
        opts: &RunOptions,
        last: &BTreeMap<String, String>,
        wanted: &[bool],
        done: &HashMap<usize, Status>,
        outputs: &mut HashMap<usize, Done>,
    ) -> StageRecord {
        let s = &self.pipeline.stages[i];
        let mut rec = StageRecord::new(s);
        let blocked = s
            .needs
            .iter()
            .find(|n| !matches!(done.get(&self.index(n)), Some(Status::Cached | Status::Fetched | Status::Ran)));
        if !wanted[i] {
            rec.reason = Some(format!("after --until {}", opts.until.as_deref().unwrap_or_default()));
        } else if let Some(b) = blocked {
            rec.reason = Some(format!("upstream {b} did not complete"));
        } else if let Some(executed) = &opts.executed {
            self.collect(i, opts, last, outputs, &mut rec, executed.get(&s.id));
        } else {
            self.run_one(i, opts, last, outputs, &mut rec, true);
        }
        rec
    }

    /// The stage's line on stderr.
    fn print_line(&self, rec: &StageRecord, opts: &RunOptions, width: usize) {
        if opts.quiet {
            return;
        }
        let what = match (&rec.status, opts.dry_run) {
            (Status::Ran, true) => "would run".to_string(),
            (st, _) => st.as_str().to_string(),
        };
        let detail = match rec.status {
            Status::Ran if opts.dry_run => rec.reason.clone().unwrap_or_default(),
            Status::Ran if !rec.gpus.is_empty() => format!(
                "{:.2}s  {}  (GPU {})",
                rec.seconds,
                rec.dir.as_deref().unwrap_or(""),
                super::executor::join(&rec.gpus)
            ),
            Status::Ran => format!("{:.2}s  {}", rec.seconds, rec.dir.as_deref().unwrap_or("")),
            Status::Cached => rec.dir.clone().unwrap_or_default(),
            Status::Fetched => format!("{:.2}s  {}", rec.seconds, rec.reason.as_deref().unwrap_or("")),
            Status::Failed | Status::Skipped => rec.reason.clone().unwrap_or_default(),
        };
        eprintln!("  {:<width$}  {:<9}  {}", rec.id, what, detail);
        if let Some(w) = &rec.warning {
            eprintln!("  {:<width$}  warning    {w}", "");
        }
    }

    /// `--jobs N` on one pipeline: up to N stages whose upstream stages have finished run at once, on
    /// threads (independent branches, such as two evaluations of one model). Stages start in
    /// dependency order as their upstreams finish; the record lists them in that order too.
    fn run_parallel(
        &self,
        opts: &RunOptions,
        last: &BTreeMap<String, String>,
        wanted: &[bool],
        width: usize,
        record: &mut RunRecord,
        write: &(dyn Fn(&RunRecord) + Sync),
    ) {
        struct Sched {
            started: Vec<bool>,
            done: HashMap<usize, Status>,
            outputs: HashMap<usize, Done>,
            recs: Vec<Option<StageRecord>>,
        }
        let n = self.pipeline.stages.len();
        let sched = Mutex::new(Sched {
            started: vec![false; n],
            done: HashMap::new(),
            outputs: HashMap::new(),
            recs: vec![None; n],
        });
        let finished = std::sync::Condvar::new();
        let template = record.clone();
        let in_order = |recs: &[Option<StageRecord>]| -> Vec<StageRecord> {
            self.dag.order.iter().filter_map(|&i| recs[i].clone()).collect()
        };
        let worker = || loop {
            let (i, done, mut outputs) = {
                let mut g = sched.lock().expect("scheduler lock");
                loop {
                    if g.started.iter().all(|s| *s) {
                        return;
                    }
                    // In a DAG, when nothing runs the first unstarted stage in order is ready, so
                    // this never waits forever.
                    let ready = self.dag.order.iter().copied().find(|&i| {
                        !g.started[i]
                            && self.pipeline.stages[i].needs.iter().all(|d| g.done.contains_key(&self.index(d)))
                    });
                    match ready {
                        Some(i) => {
                            g.started[i] = true;
                            break (i, g.done.clone(), g.outputs.clone());
                        }
                        None => g = finished.wait(g).expect("scheduler lock"),
                    }
                }
            };
            let rec = self.stage_record(i, opts, last, wanted, &done, &mut outputs);
            let mut g = sched.lock().expect("scheduler lock");
            if let Some(d) = outputs.remove(&i) {
                g.outputs.insert(i, d);
            }
            g.done.insert(i, rec.status);
            self.print_line(&rec, opts, width);
            g.recs[i] = Some(rec);
            let mut now = template.clone();
            now.stages = in_order(&g.recs);
            write(&now);
            finished.notify_all();
        };
        std::thread::scope(|s| {
            for _ in 0..opts.jobs.min(n) {
                s.spawn(worker);
            }
        });
        record.stages = in_order(&sched.into_inner().expect("scheduler lock").recs);
    }

    fn write_record(&self, run_dir: &Path, record: &RunRecord) {
        let _ = write_atomic(&run_dir.join("run.json"), &serde_json::to_vec_pretty(record).expect("record serializes"));
    }

    /// A stage of a run whose stale stages were computed by jobs: its artifact must be in the store
    /// now, unless its job failed.
    fn collect(
        &self,
        i: usize,
        opts: &RunOptions,
        last: &BTreeMap<String, String>,
        outputs: &mut HashMap<usize, Done>,
        rec: &mut StageRecord,
        executed: Option<&Executed>,
    ) {
        let s = &self.pipeline.stages[i];
        if let Some(x) = executed {
            if let Some(f) = &x.failure {
                rec.status = Status::Failed;
                rec.key = self.key_inputs(i, outputs).ok().map(|k| k.hash());
                rec.reason = Some(f.clone());
                rec.slurm_job = Some(x.job);
                return;
            }
        }
        self.run_one(i, opts, last, outputs, rec, false);
        match (rec.status, executed) {
            (Status::Cached, Some(x)) if x.found_cached => {
                rec.reason = Some(format!("found in the store by slurm job {}", x.job));
            }
            (Status::Cached, Some(x)) if x.owner => {
                rec.status = Status::Ran;
                rec.slurm_job = Some(x.job);
                let m = rec.key.as_deref().and_then(|k| self.store.manifest(&s.kind, k).ok().flatten());
                rec.seconds = m.map(|m| m.seconds).unwrap_or_default();
            }
            (Status::Failed, Some(x)) => {
                rec.slurm_job = Some(x.job);
                rec.reason = Some(format!(
                    "slurm job {} finished, but {}; log {}",
                    x.job,
                    rec.reason.as_deref().unwrap_or("left no artifact"),
                    x.log
                ));
            }
            _ => {}
        }
    }

    /// Cached, or computed here when `compute` (else a stale stage fails: it was to be computed
    /// elsewhere and was not).
    fn run_one(
        &self,
        i: usize,
        opts: &RunOptions,
        last: &BTreeMap<String, String>,
        outputs: &mut HashMap<usize, Done>,
        rec: &mut StageRecord,
        compute: bool,
    ) {
        let s = &self.pipeline.stages[i];
        let cur = match self.key_inputs(i, outputs) {
            Ok(k) => k,
            Err(e) => {
                rec.status = Status::Failed;
                rec.reason = Some(e);
                return;
            }
        };
        let key = cur.hash();
        rec.key = Some(key.clone());
        let dir = self.store.artifact_dir(&s.kind, &key);
        let forced = compute && opts.force.contains(&s.id);
        let cached = |rec: &mut StageRecord, outputs: &mut HashMap<usize, Done>, m: Manifest| {
            rec.status = Status::Cached;
            rec.dir = Some(dir.display().to_string());
            rec.metrics = m.metrics;
            outputs.insert(i, Done { output_hash: m.output_hash, dir: dir.clone() });
        };
        if !forced {
            if let Ok(Some(m)) = self.store.manifest(&s.kind, &key) {
                cached(rec, outputs, m);
                // A fully cached run should not rewrite the state file once per stage.
                if !opts.dry_run && last.get(&s.id) != Some(&key) {
                    self.remember_key(&s.id, &key);
                }
                return;
            }
        }
        let reasons = if forced { vec![Reason::Forced] } else { self.reasons(i, &cur, last, true) };
        rec.reason = Some(reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
        if !compute {
            rec.status = Status::Failed;
            rec.reason = Some(format!("its artifact {} is not in the store", dir.display()));
            return;
        }
        if opts.dry_run {
            rec.status = Status::Ran;
            return;
        }
        let who = format!("stage {} of {}", s.id, self.pipeline.name);
        let lock = match self.store.try_lock(&s.kind, &key, &who) {
            Ok(Some(l)) => Ok(l),
            Ok(None) => {
                if !opts.quiet {
                    let holder = self.store.lock_holder(&s.kind, &key);
                    let (pid, what) = holder.split_once(' ').unwrap_or((holder.as_str(), ""));
                    eprintln!("  {}: waiting for pid {pid} ({what}), which is computing the same artifact", s.id);
                }
                self.store.lock(&s.kind, &key, &who)
            }
            Err(e) => Err(e),
        };
        let _lock = match lock {
            Ok(l) => l,
            Err(e) => {
                rec.status = Status::Failed;
                rec.reason = Some(e.to_string());
                return;
            }
        };
        if !forced {
            if let Ok(Some(m)) = self.store.manifest(&s.kind, &key) {
                cached(rec, outputs, m);
                self.remember_key(&s.id, &key);
                return;
            }
        }
        if let (Some(remote), false) = (&self.remote, forced) {
            match super::remote::fetch_stage(remote, &self.store, &s.kind, &key, &s.id, opts.quiet) {
                Fetch::Absent => {}
                Fetch::Unavailable(warning) => rec.warning = Some(warning),
                Fetch::Fetched(m, secs) => {
                    cached(rec, outputs, *m);
                    rec.status = Status::Fetched;
                    rec.seconds = secs;
                    let why = rec.reason.take().unwrap_or_default();
                    rec.reason = Some(format!("fetched from {}: not in the local store ({why})", remote.url()));
                    self.remember_key(&s.id, &key);
                    return;
                }
                Fetch::Refused(e) => {
                    rec.status = Status::Failed;
                    rec.reason = Some(e);
                    return;
                }
            }
        }
        // After the store lock: a stage waiting for another process's artifact holds no GPU.
        let slots = match &opts.gpus {
            Some(pool) => match self.gpu_slots(i, pool, opts.quiet) {
                Ok(g) => Some(g),
                Err(e) => {
                    rec.status = Status::Failed;
                    rec.reason = Some(e);
                    return;
                }
            },
            None => None,
        };
        rec.gpus = slots.as_ref().map(SlotGuard::ordinals).unwrap_or_default();
        match self.execute(i, &key, cur, outputs, opts.quiet, &rec.gpus) {
            Ok((m, secs)) => {
                rec.status = Status::Ran;
                rec.seconds = secs;
                rec.dir = Some(dir.display().to_string());
                rec.metrics = m.metrics;
                outputs.insert(i, Done { output_hash: m.output_hash, dir: dir.clone() });
                self.remember_key(&s.id, &key);
                if let Some(remote) = &self.remote {
                    let retry = format!("pipe push {} {}", self.pipeline.file.display(), s.id);
                    let failed =
                        super::remote::upload_stage(remote, &self.store, &s.kind, &key, &s.id, &retry, opts.quiet);
                    // After a failed lookup, both warnings.
                    rec.warning = match (rec.warning.take(), failed) {
                        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                        (a, b) => a.or(b),
                    };
                }
            }
            Err((e, secs)) => {
                rec.status = Status::Failed;
                rec.seconds = secs;
                rec.reason = Some(e);
            }
        }
    }

    /// Run a stage into a temp dir and commit it. Any failure removes the temp dir.
    fn execute(
        &self,
        i: usize,
        key: &str,
        key_inputs: KeyInputs,
        outputs: &HashMap<usize, Done>,
        quiet: bool,
        gpus: &[usize],
    ) -> Result<(Manifest, f64), (String, f64)> {
        let s = &self.pipeline.stages[i];
        let imp = self.stage_impl(&s.kind);
        let start = Instant::now();
        let started = time::rfc3339_now();
        let tmp = {
            // Created and registered under the lock, and not at all once interrupted: the signal
            // handler ([`cleanup_on_interrupt`]) sets INTERRUPTED before it takes the lock, so a temp
            // dir is either in the list it removes or never made. (Registered after creating it,
            // a signal in between left the dir behind for the next run to sweep.)
            let mut running = CURRENT_TEMP.lock().expect("temp lock");
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(("interrupted".into(), 0.0));
            }
            let tmp = self.store.temp_dir(&s.kind, key).map_err(|e| (e.to_string(), 0.0))?;
            running.push(tmp.clone());
            tmp
        };
        let scratch = self.store.scratch_dir(&s.kind, key);
        let _ = std::fs::create_dir_all(&scratch);
        let forget = |t: &Path| CURRENT_TEMP.lock().expect("temp lock").retain(|p| p != t);
        let upstream: Vec<Upstream> = s
            .needs
            .iter()
            .map(|n| {
                let j = self.index(n);
                let u = &self.pipeline.stages[j];
                Upstream { id: u.id.clone(), kind: u.kind.clone(), dir: outputs[&j].dir.clone() }
            })
            .collect();
        let ctx = StageContext {
            id: &s.id,
            params: &s.params,
            root: &self.pipeline.root,
            out: &tmp,
            scratch: &scratch,
            upstream: &upstream,
            quiet,
            cancel: &INTERRUPTED,
            gpus,
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| imp.run(&ctx)));
        let secs = start.elapsed().as_secs_f64();
        let fail = |msg: String| {
            let _ = std::fs::remove_dir_all(&tmp);
            forget(&tmp);
            Err((msg, secs))
        };
        let out = match result {
            Ok(Ok(out)) => match imp.contract().writes.iter().find(|f| !tmp.join(f).exists()) {
                // Caught here, not by the consumer that would read it from a cached artifact later.
                Some(f) => {
                    return fail(format!(
                        "internal error: stage `{}` ({}) finished without writing `{f}`, which its kind declares",
                        s.id, s.kind
                    ))
                }
                None => out,
            },
            Ok(Err(StageError::Cancelled)) => return fail("interrupted".into()),
            Ok(Err(e)) => return fail(e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                return fail(format!("internal error (panic): {msg}"));
            }
        };
        let manifest = Manifest {
            schema: MANIFEST_SCHEMA,
            kind: s.kind.clone(),
            stage: s.id.clone(),
            key: key.to_string(),
            key_inputs,
            output_hash: String::new(),
            files: Vec::new(),
            started,
            finished: time::rfc3339_now(),
            seconds: secs,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            metrics: out.metrics,
            stats: out.stats,
        };
        let manifest = match self.store.seal(&tmp, manifest) {
            Ok(m) => m,
            Err(e) => return fail(format!("cannot store the artifact: {e}")),
        };
        // Renamed into the store under the lock: the handler would otherwise delete from a dir
        // that is mid-rename, or already in the store.
        let published = {
            let mut running = CURRENT_TEMP.lock().expect("temp lock");
            if INTERRUPTED.load(Ordering::SeqCst) {
                Err("interrupted".to_string())
            } else {
                let r = self.store.publish(&tmp, &manifest);
                if r.is_ok() {
                    running.retain(|p| p != &tmp);
                }
                r.map_err(|e| format!("cannot store the artifact: {e}"))
            }
        };
        match published {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&scratch);
                Ok((manifest, secs))
            }
            Err(e) => fail(e),
        }
    }
}

/// Every stage's GPU demand against the pool, before anything runs: asking for more GPUs than the
/// run has is a configuration error naming the stage, not a stage that waits forever.
pub fn check_gpus(pipeline: &Pipeline, registry: &[Box<dyn Stage>], pool: &GpuPool) -> Result<(), ConfigError> {
    for s in &pipeline.stages {
        let imp = registry.iter().find(|r| r.kind() == s.kind).expect("kind validated by config");
        if let Err(e) = pool.plan(imp.gpus(&s.params)) {
            return Err(ConfigError::new(
                pipeline.file.display().to_string(),
                format!("stages.{}", s.id),
                format!("stage `{}` ({}) {e}", s.id, s.kind),
            )
            .hint(Some(
                "pass more GPUs with `--gpus` or `[executor] gpus`, lower `[executor] gpus_per_stage`, or compute \
                 on the CPU"
                    .into(),
            )));
        }
    }
    Ok(())
}

/// Remove the running stages' temp dirs (called from the signal handler).
pub fn cleanup_on_interrupt() -> Vec<PathBuf> {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let tmps = CURRENT_TEMP.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
    for t in &tmps {
        let _ = std::fs::remove_dir_all(t);
    }
    tmps
}

/// Human summary line of a record, for stderr.
pub fn summary(record: &RunRecord) -> String {
    let count = |st: Status| record.stages.iter().filter(|s| s.status == st).count();
    let mut w = Vec::new();
    let _ = write!(
        w,
        "pipe: {} — {} ran, {} cached, {}{} failed, {} skipped; run record {}",
        record.status,
        count(Status::Ran),
        count(Status::Cached),
        match count(Status::Fetched) {
            0 => String::new(),
            n => format!("{n} fetched, "),
        },
        count(Status::Failed),
        count(Status::Skipped),
        record.run_dir
    );
    String::from_utf8(w).expect("utf8")
}

/// Directory names are short keys; show them relative to the store in messages.
pub fn short(key: &str) -> &str {
    dir_name(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{load_str, Overrides};
    use crate::engine::{Contract, StageOutput, StageParams, TypedStage};

    #[derive(serde::Deserialize)]
    struct NoParams {}
    impl StageParams for NoParams {}

    /// Declares a file it never writes.
    struct Forgetful;
    impl TypedStage for Forgetful {
        type Params = NoParams;
        const KIND: &'static str = "forgetful";
        const VERSION: u32 = 1;
        const DEFAULTS: &'static str = "";
        const CONTRACT: Contract = Contract { needs: &[], writes: &["out.txt"] };
        fn run(_ctx: &StageContext, _p: &NoParams) -> Result<StageOutput, StageError> {
            Ok(StageOutput::default())
        }
    }

    #[test]
    fn a_stage_that_skips_a_declared_file_fails_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[pipeline]\nname = \"p\"\n\n[stages.f]\nkind = \"forgetful\"\n";
        let registry: Vec<Box<dyn Stage>> = vec![Box::new(Forgetful)];
        let p = load_str(&dir.path().join("p.toml"), text, &Overrides::default(), &registry).unwrap();
        let engine = Engine::new(&p, &registry).unwrap();
        let record = engine.run(&RunOptions { quiet: true, ..Default::default() }).unwrap();
        let f = &record.stages[0];
        assert_eq!(f.status, Status::Failed);
        let reason = f.reason.as_deref().unwrap();
        assert!(reason.contains("stage `f` (forgetful) finished without writing `out.txt`"), "{reason}");
        assert!(engine.store.manifest("forgetful", f.key.as_deref().unwrap()).unwrap().is_none());
    }
}
