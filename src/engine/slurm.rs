//! The Slurm executor: each stale stage becomes one `sbatch` job that runs `pipe exec` for that stage
//! against the shared store, chained to its upstream jobs with `--dependency=afterok:`.
//!
//! A downstream stage's cache key depends on its upstream's *output* hash, unknown when the jobs are
//! submitted, so a job does not carry a key: it names a stage of a pipeline (with the same overrides),
//! and `pipe exec` computes the key on the node once its upstream artifacts are in the store. What
//! identifies "the same computation" before anything ran is the stage's *plan id* (see
//! [`Engine::plan_ids`]): sweep points that share a stage share its job, and a later `pipe run` or
//! `pipe status` finds the job a detached run submitted.
//!
//! Slurm is driven through its command-line tools (`sbatch`, `squeue`, `scontrol`, `scancel`), as a
//! user would: no library binding, no accounting database needed.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::ConfigError;
use super::runner::{Engine, EngineError, Executed, RunOptions, RunRecord};
use crate::util::fs::write_atomic;

pub use super::executor::ExecutorKind;

/// The Slurm half of the `[executor]` table (the GPU-slot keys `gpus` and `gpus_per_stage` are
/// parsed by the slot scheduler and only tolerated here).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmConfig {
    pub kind: ExecutorKind,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Default `--time` of every job; a stage's `resources.time` overrides it.
    pub time: Option<String>,
    pub qos: Option<String>,
    /// Passed to `sbatch` verbatim, after everything pipe sets (so they can override it).
    pub extra_args: Vec<String>,
}

impl SlurmConfig {
    /// Its keys into an `[executor]` table as `pipe config` prints it (only those that are set).
    pub fn insert_keys(&self, t: &mut toml::Table) {
        for (k, v) in
            [("partition", &self.partition), ("account", &self.account), ("time", &self.time), ("qos", &self.qos)]
        {
            if let Some(v) = v {
                t.insert(k.into(), v.clone().into());
            }
        }
        if !self.extra_args.is_empty() {
            t.insert(
                "extra_args".into(),
                toml::Value::Array(self.extra_args.iter().map(|a| toml::Value::from(a.as_str())).collect()),
            );
        }
    }
}

/// `[stages.<id>.resources]`: what one stage's job asks Slurm for. Not part of the cache key: where a
/// stage runs does not change what it computes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Resources {
    pub gpus: u32,
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
}

const EXECUTOR_KEYS: &[&str] = &["kind", "partition", "account", "time", "qos", "extra_args"];
/// Keys of `[executor]` that belong to the GPU-slot scheduler.
const SLOT_KEYS: &[&str] = &["gpus", "gpus_per_stage", "stages_per_gpu"];
const RESOURCE_KEYS: &[&str] = &["gpus", "cpus", "mem", "time"];

fn err(origin: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { origin: origin.to_string(), key: key.to_string(), message: message.into(), hint: None }
}

fn string_at(origin: &str, key: &str, v: &toml::Value) -> Result<String, ConfigError> {
    v.as_str().map(str::to_string).ok_or_else(|| err(origin, key, format!("expected a string, found {v}")))
}

/// Slurm's time formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
fn valid_time(t: &str) -> bool {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    days.is_none_or(digits) && parts.iter().all(|p| digits(p)) && parts.len() <= 3
}

/// `--mem` sizes: a number with an optional K, M, G or T suffix (megabytes without one).
fn valid_mem(m: &str) -> bool {
    let num = m.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    !num.is_empty() && num.len() + 1 >= m.len() && num.chars().all(|c| c.is_ascii_digit())
}

fn time_at(origin: &str, key: &str, v: &toml::Value) -> Result<String, ConfigError> {
    let t = string_at(origin, key, v)?;
    if !valid_time(&t) {
        return Err(err(origin, key, format!("{t:?} is not a Slurm time limit"))
            .hint(Some("write minutes (`\"30\"`), `\"HH:MM:SS\"` or `\"D-HH:MM:SS\"`".into())));
    }
    Ok(t)
}

/// Parses `[executor]` (absent: the local executor).
pub fn parse_executor(origin: &str, v: Option<&toml::Value>) -> Result<SlurmConfig, ConfigError> {
    let mut cfg = SlurmConfig::default();
    let Some(v) = v else { return Ok(cfg) };
    let t = v.as_table().ok_or_else(|| err(origin, "executor", "expected a table `[executor]`"))?;
    for (k, v) in t {
        let key = format!("executor.{k}");
        match k.as_str() {
            "kind" => cfg.kind = string_at(origin, &key, v)?.parse().map_err(|m: String| err(origin, &key, m))?,
            "partition" => cfg.partition = Some(string_at(origin, &key, v)?),
            "account" => cfg.account = Some(string_at(origin, &key, v)?),
            "qos" => cfg.qos = Some(string_at(origin, &key, v)?),
            "time" => cfg.time = Some(time_at(origin, &key, v)?),
            "extra_args" => {
                cfg.extra_args = v
                    .as_array()
                    .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| {
                        err(origin, &key, "expected an array of strings")
                            .hint(Some("for example `extra_args = [\"--exclusive\"]`".into()))
                    })?
            }
            k if SLOT_KEYS.contains(&k) => {}
            _ => {
                let known = EXECUTOR_KEYS.iter().chain(SLOT_KEYS).copied();
                return Err(err(origin, &key, "unknown key").hint(super::config::did_you_mean(k, known)));
            }
        }
    }
    Ok(cfg)
}

/// Parses a stage's `resources` table and `retries` (both optional).
pub fn parse_stage_meta(origin: &str, id: &str, stage: &toml::Table) -> Result<(Resources, u32), ConfigError> {
    let mut r = Resources::default();
    if let Some(v) = stage.get("resources") {
        let prefix = format!("stages.{id}.resources");
        let t = v.as_table().ok_or_else(|| err(origin, &prefix, format!("expected a table `[{prefix}]`")))?;
        for (k, v) in t {
            let key = format!("{prefix}.{k}");
            let count = || match v.as_integer() {
                Some(n) if (0..=100_000).contains(&n) => Ok(n as u32),
                _ => Err(err(origin, &key, format!("expected a whole number >= 0, found {v}"))),
            };
            match k.as_str() {
                "gpus" => r.gpus = count()?,
                "cpus" => r.cpus = Some(count()?.max(1)),
                "mem" => {
                    let m = string_at(origin, &key, v)?;
                    if !valid_mem(&m) {
                        return Err(err(origin, &key, format!("{m:?} is not a memory size"))
                            .hint(Some("write e.g. `\"16G\"` or `\"500M\"`".into())));
                    }
                    r.mem = Some(m);
                }
                "time" => r.time = Some(time_at(origin, &key, v)?),
                _ => {
                    return Err(err(origin, &key, "unknown resource").hint(
                        super::config::did_you_mean(k, RESOURCE_KEYS.iter().copied())
                            .or_else(|| Some(format!("known resources: {}", RESOURCE_KEYS.join(", ")))),
                    ))
                }
            }
        }
    }
    let retries = match stage.get("retries") {
        None => 0,
        Some(toml::Value::Integer(n)) if (0..=100).contains(n) => *n as u32,
        Some(v) => {
            return Err(err(origin, &format!("stages.{id}.retries"), format!("expected a number 0..=100, found {v}")))
        }
    };
    Ok((r, retries))
}

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    // `cause`, not `source`: the message already says it, and anyhow would print it twice.
    #[error("cannot run `{tool}` ({cause}); is Slurm installed and on PATH? (try `bash scripts/slurm-local.sh up`)")]
    Spawn { tool: String, cause: std::io::Error },
    #[error("`{tool}` failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },
    #[error("sbatch printed {0:?} where a job id was expected")]
    BadJobId(String),
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// One job to submit: the stage it runs and what it waits for.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    /// `%j` is replaced by the job id (Slurm's own pattern).
    pub log: PathBuf,
    pub chdir: PathBuf,
    pub deps: Vec<u64>,
    pub resources: Resources,
    /// The command the job runs (the program first).
    pub command: Vec<String>,
}

/// The `sbatch` command line for a job; pure, so that the mapping is tested without Slurm.
pub fn sbatch_args(cfg: &SlurmConfig, spec: &JobSpec) -> Vec<String> {
    let mut a = vec![
        "--parsable".to_string(),
        format!("--job-name={}", spec.name),
        format!("--output={}", spec.log.display()),
        // A requeued (preempted) job appends to its log instead of truncating the first attempt's.
        "--open-mode=append".to_string(),
        format!("--chdir={}", spec.chdir.display()),
        "--kill-on-invalid-dep=yes".to_string(),
    ];
    if !spec.deps.is_empty() {
        let ids: Vec<String> = spec.deps.iter().map(u64::to_string).collect();
        a.push(format!("--dependency=afterok:{}", ids.join(":")));
    }
    for (flag, v) in [("partition", &cfg.partition), ("account", &cfg.account), ("qos", &cfg.qos)] {
        if let Some(v) = v {
            a.push(format!("--{flag}={v}"));
        }
    }
    if let Some(t) = spec.resources.time.as_ref().or(cfg.time.as_ref()) {
        a.push(format!("--time={t}"));
    }
    if spec.resources.gpus > 0 {
        a.push(format!("--gres=gpu:{}", spec.resources.gpus));
    }
    if let Some(c) = spec.resources.cpus {
        a.push(format!("--cpus-per-task={c}"));
    }
    if let Some(m) = &spec.resources.mem {
        a.push(format!("--mem={m}"));
    }
    a.extend(cfg.extra_args.iter().cloned());
    a
}

/// The batch script: `exec`, so that `scancel`'s SIGTERM reaches pipe itself, whose handler removes
/// the stage's partial output and leaves its checkpoints for the next attempt.
pub fn batch_script(command: &[String]) -> String {
    let quoted: Vec<String> = command.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
    format!("#!/bin/sh\nexec {}\n", quoted.join(" "))
}

/// What Slurm says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub state: String,
    pub reason: String,
    pub exit_code: String,
}

/// States after which Slurm will still run the job (or is running it).
pub fn is_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SUSPENDED"
            | "STOPPED"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

/// Parses `scontrol show job -o` output: one job per line of `Key=Value` fields.
pub fn parse_scontrol(out: &str) -> HashMap<u64, JobInfo> {
    let mut jobs = HashMap::new();
    for line in out.lines() {
        let field =
            |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')));
        let Some(id) = field("JobId").and_then(|v| v.parse::<u64>().ok()) else { continue };
        jobs.insert(
            id,
            JobInfo {
                state: field("JobState").unwrap_or("UNKNOWN").to_string(),
                reason: field("Reason").unwrap_or("None").to_string(),
                exit_code: field("ExitCode").unwrap_or("").to_string(),
            },
        );
    }
    jobs
}

fn tool(name: &str, args: &[String], stdin: Option<&str>) -> Result<String, SlurmError> {
    let mut cmd = Command::new(name);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|cause| SlurmError::Spawn { tool: name.into(), cause })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|cause| SlurmError::Spawn { tool: name.into(), cause })?;
    }
    let out = child.wait_with_output().map_err(|cause| SlurmError::Spawn { tool: name.into(), cause })?;
    if !out.status.success() {
        return Err(SlurmError::Tool {
            tool: format!("{name} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Submits one job; returns its id.
pub fn submit(cfg: &SlurmConfig, spec: &JobSpec) -> Result<u64, SlurmError> {
    let out = tool("sbatch", &sbatch_args(cfg, spec), Some(&batch_script(&spec.command)))?;
    // `--parsable` prints `id` or `id;cluster`.
    let first = out.trim().split(';').next().unwrap_or("");
    first.parse().map_err(|_| SlurmError::BadJobId(out.trim().to_string()))
}

/// The state of every job Slurm still knows (finished ones for `MinJobAge` seconds).
pub fn query() -> Result<HashMap<u64, JobInfo>, SlurmError> {
    Ok(parse_scontrol(&tool("scontrol", &["show".into(), "job".into(), "-o".into()], None)?))
}

pub fn cancel(ids: &[u64]) {
    if ids.is_empty() {
        return;
    }
    let args: Vec<String> = ids.iter().map(u64::to_string).collect();
    let _ = tool("scancel", &args, None);
}

/// Jobs the waiting `pipe run` submitted and that have not finished: what Ctrl-C cancels.
static IN_FLIGHT: Mutex<Vec<u64>> = Mutex::new(Vec::new());

/// Called from the interrupt handler: cancel this process's jobs. Returns their ids.
pub fn cancel_in_flight() -> Vec<u64> {
    let ids = IN_FLIGHT.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
    cancel(&ids);
    ids
}

fn set_in_flight(ids: Vec<u64>) {
    if let Ok(mut v) = IN_FLIGHT.lock() {
        *v = ids;
    }
}

/// `<store>/slurm/jobs/<plan id>.json`: the job that computes a plan id, so that `pipe status` and a
/// later `pipe run` find what a detached run submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job: u64,
    pub pipeline: String,
    pub stage: String,
    pub log: String,
    pub plan_id: String,
}

fn job_record_path(store: &Path, plan_id: &str) -> PathBuf {
    store.join("slurm").join("jobs").join(format!("{}.json", &plan_id[..plan_id.len().min(20)]))
}

pub fn read_job_record(store: &Path, plan_id: &str) -> Option<JobRecord> {
    let r: JobRecord = serde_json::from_slice(&std::fs::read(job_record_path(store, plan_id)).ok()?).ok()?;
    (r.plan_id == plan_id).then_some(r)
}

/// For `pipe status`: the Slurm job computing each stale stage, with its state, when Slurm is still
/// running it. Asks Slurm only when some stage has a job record.
pub fn active_jobs(engine: &Engine) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    let plan = engine.plan_ids();
    let recs: Vec<(String, JobRecord)> = engine
        .pipeline
        .stages
        .iter()
        .zip(&plan)
        .filter_map(|(s, pid)| {
            pid.as_ref().and_then(|p| read_job_record(&engine.store.root, p)).map(|r| (s.id.clone(), r))
        })
        .collect();
    if recs.is_empty() {
        return out;
    }
    let Ok(states) = query() else { return out };
    for (id, r) in recs {
        if let Some(info) = states.get(&r.job).filter(|i| is_active(&i.state)) {
            out.insert(id, (r.job, info.state.clone()));
        }
    }
    out
}

/// One pipeline to run through Slurm: a plain run, or one point of a sweep.
pub struct Target<'e, 'a> {
    pub engine: &'e Engine<'a>,
    pub opts: RunOptions,
}

/// How the driver was asked to run.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub detach: bool,
    pub quiet: bool,
    /// The `pipe` binary the jobs run: this one, which must be at the same path on every node.
    pub exe: PathBuf,
    /// The jobs' working directory.
    pub cwd: PathBuf,
    pub poll: Duration,
}

/// What a submission produced, per target: the run record when waited for.
pub struct Outcome {
    pub records: Vec<RunRecord>,
    /// Every job this invocation submitted or adopted, in submission order.
    pub jobs: Vec<SubmittedJob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubmittedJob {
    pub stage: String,
    pub job: u64,
    pub log: String,
    /// False when an earlier `pipe run` had already submitted it and it was still queued or running.
    pub submitted: bool,
    /// The target (sweep point) that owns the job; others that share the stage wait on it.
    #[serde(skip)]
    pub target: usize,
}

struct Job {
    target: usize,
    stage: usize,
    id: String,
    plan_id: String,
    deps: Vec<usize>,
    spec: JobSpec,
    retries: u32,
    attempts: u32,
    job: u64,
    adopted: bool,
    state: String,
    done: Option<Result<(), String>>,
    /// Cancelled by us (an upstream failed): its CANCELLED is not a failure of its own.
    cancelled_by_us: bool,
}

fn log_path(store: &Path, pipeline: &str, stage: &str, job: u64) -> PathBuf {
    store.join("slurm").join(pipeline).join(stage).join(format!("{job}.log"))
}

/// Submits the stale stages of every target as jobs (shared stages once), then, unless detached,
/// waits for them and writes each target's run record.
pub fn run(targets: &[Target], d: &DriverOptions) -> Result<Outcome, SlurmError> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut by_plan: HashMap<String, usize> = HashMap::new();
    // Per target: stage id → (job index, whether this target owns the job).
    let mut per_target: Vec<BTreeMap<String, (usize, bool)>> = vec![BTreeMap::new(); targets.len()];
    let mut states: Option<HashMap<u64, JobInfo>> = None;
    for (t, target) in targets.iter().enumerate() {
        let e = target.engine;
        let p = e.pipeline;
        p.check_runnable().map_err(EngineError::from)?;
        e.store.init().map_err(EngineError::from)?;
        e.store.sweep_temp();
        let wanted = e.wanted(target.opts.until.as_deref())?;
        if let Some(f) = target.opts.force.iter().find(|f| p.stage(f).is_none()) {
            return Err(EngineError::Usage(format!("no stage `{f}` in {}", p.file.display())).into());
        }
        let status = e.status(&target.opts.force);
        let plan = e.plan_ids();
        let mut stage_job: HashMap<usize, usize> = HashMap::new();
        for &i in &e.dag.order {
            let s = &p.stages[i];
            if !wanted[i] || status[i_pos(&status, &s.id)].state != "stale" {
                continue;
            }
            let Some(pid) = plan[i].clone() else {
                // An unreadable input: the local code path reports it as the stage's failure.
                continue;
            };
            if let Some(&j) = by_plan.get(&pid) {
                stage_job.insert(i, j);
                per_target[t].insert(s.id.clone(), (j, false));
                continue;
            }
            let deps: Vec<usize> = s.needs.iter().filter_map(|n| stage_job.get(&e.index_of(n)).copied()).collect();
            let mut command = vec![
                d.exe.display().to_string(),
                "exec".into(),
                "--pipeline".into(),
                std::fs::canonicalize(&p.file).unwrap_or_else(|_| p.file.clone()).display().to_string(),
                "--stage".into(),
                s.id.clone(),
            ];
            for set in &p.overrides.sets {
                command.push("--set".into());
                command.push(set.clone());
            }
            if target.opts.force.contains(&s.id) {
                command.push("--force".into());
            }
            if let Some(url) = &p.remote {
                command.push("--remote".into());
                command.push(url.clone());
            }
            let log = e.store.root.join("slurm").join(&p.name).join(&s.id).join("%j.log");
            command.push("--outcome".into());
            command.push(log.with_extension("json").display().to_string());
            let spec = JobSpec {
                name: format!("pipe:{}:{}", p.name, s.id),
                log,
                chdir: d.cwd.clone(),
                deps: Vec::new(),
                resources: s.resources.clone(),
                command,
            };
            let mut job = Job {
                target: t,
                stage: i,
                id: s.id.clone(),
                plan_id: pid.clone(),
                deps,
                spec,
                retries: s.retries,
                attempts: 0,
                job: 0,
                adopted: false,
                state: "PENDING".into(),
                done: None,
                cancelled_by_us: false,
            };
            // A job an earlier (detached) run submitted for the same computation, still queued or
            // running: wait for it rather than compute the stage twice.
            if let Some(r) = read_job_record(&e.store.root, &pid) {
                if states.is_none() {
                    states = Some(query()?);
                }
                if let Some(info) = states.as_ref().and_then(|s| s.get(&r.job)).filter(|i| is_active(&i.state)) {
                    job.job = r.job;
                    job.adopted = true;
                    job.attempts = 1;
                    job.state = info.state.clone();
                }
            }
            let j = jobs.len();
            jobs.push(job);
            by_plan.insert(pid, j);
            stage_job.insert(i, j);
            per_target[t].insert(s.id.clone(), (j, true));
        }
    }
    let width = jobs.iter().map(|j| j.id.len()).max().unwrap_or(4);
    for j in 0..jobs.len() {
        if !jobs[j].adopted {
            if let Err(e) = submit_job(&mut jobs, j, targets) {
                // Half a pipeline queued would run for nobody: take back what this run submitted.
                cancel(&jobs[..j].iter().filter(|x| !x.adopted).map(|x| x.job).collect::<Vec<_>>());
                return Err(e);
            }
        }
        let job = &jobs[j];
        let e = targets[job.target].engine;
        let log = log_path(&e.store.root, &e.pipeline.name, &job.id, job.job);
        let rec = JobRecord {
            job: job.job,
            pipeline: e.pipeline.name.clone(),
            stage: job.id.clone(),
            log: log.display().to_string(),
            plan_id: job.plan_id.clone(),
        };
        let path = job_record_path(&e.store.root, &job.plan_id);
        let _ = std::fs::create_dir_all(path.parent().expect("has parent"));
        write_atomic(&path, &serde_json::to_vec_pretty(&rec).expect("serializes"))
            .map_err(|cause| SlurmError::Io { path: path.clone(), cause })?;
        if !d.quiet {
            let verb = if job.adopted { "already queued as" } else { "submitted as" };
            eprintln!("  {:<width$}  {verb} slurm job {}  log {}", job.id, job.job, log.display());
        }
    }
    set_in_flight(jobs.iter().map(|j| j.job).collect());
    let submitted: Vec<SubmittedJob> = jobs
        .iter()
        .map(|j| {
            let e = targets[j.target].engine;
            SubmittedJob {
                stage: j.id.clone(),
                job: j.job,
                log: log_path(&e.store.root, &e.pipeline.name, &j.id, j.job).display().to_string(),
                submitted: !j.adopted,
                target: j.target,
            }
        })
        .collect();
    // The job ids beside each target's run record, for whoever looks at a detached run.
    for (t, target) in targets.iter().enumerate() {
        if let Some(dir) = &target.opts.run_dir {
            let mine: Vec<&SubmittedJob> = per_target[t].values().map(|(j, _)| &submitted[*j]).collect();
            let _ = std::fs::create_dir_all(dir);
            let _ = write_atomic(&dir.join("slurm.json"), &serde_json::to_vec_pretty(&mine).expect("serializes"));
        }
    }
    if d.detach {
        set_in_flight(Vec::new());
        return Ok(Outcome { records: Vec::new(), jobs: submitted });
    }
    wait(&mut jobs, targets, d)?;
    set_in_flight(Vec::new());
    let mut records = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let mut executed = BTreeMap::new();
        for (stage, (j, owner)) in &per_target[t] {
            let job = &jobs[*j];
            let e = targets[job.target].engine;
            let log = log_path(&e.store.root, &e.pipeline.name, &job.id, job.job);
            let failure = match &job.done {
                Some(Err(m)) if !job.cancelled_by_us => Some(format!("{m}; log {}", log.display())),
                _ => None,
            };
            executed.insert(
                stage.clone(),
                Executed {
                    job: job.job,
                    owner: *owner,
                    failure,
                    log: log.display().to_string(),
                    found_cached: read_outcome(&log.with_extension("json")).as_deref() == Some("cached"),
                },
            );
        }
        let mut opts = target.opts.clone();
        opts.executed = Some(executed);
        records.push(target.engine.run(&opts)?);
    }
    Ok(Outcome { records, jobs: submitted })
}

fn i_pos(status: &[super::runner::StageState], id: &str) -> usize {
    status.iter().position(|s| s.id == id).expect("status lists every stage")
}

fn submit_job(jobs: &mut [Job], j: usize, targets: &[Target]) -> Result<(), SlurmError> {
    // Dependencies that already completed are satisfied: naming them again would fail once Slurm
    // forgets the job.
    let deps: Vec<u64> = jobs[j].deps.iter().filter(|&&k| jobs[k].done.is_none()).map(|&k| jobs[k].job).collect();
    let e = targets[jobs[j].target].engine;
    let job = &mut jobs[j];
    job.spec.deps = deps;
    let dir = job.spec.log.parent().expect("log has a dir").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|cause| SlurmError::Io { path: dir, cause })?;
    job.job = submit(&e.pipeline.slurm, &job.spec)?;
    job.attempts += 1;
    job.state = "PENDING".into();
    Ok(())
}

/// The status `pipe exec` reported for its stage (`ran` or `cached`), from the file `--outcome` names.
fn read_outcome(path: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["status"].as_str().map(str::to_string)
}

fn last_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    let line: String = line.chars().take(300).collect();
    Some(line)
}

/// Every job that (transitively) depends on job `j`, in submission order.
fn dependents(jobs: &[Job], j: usize) -> Vec<usize> {
    let mut hit = vec![false; jobs.len()];
    hit[j] = true;
    let mut out = Vec::new();
    for k in j + 1..jobs.len() {
        if jobs[k].deps.iter().any(|&d| hit[d]) {
            hit[k] = true;
            out.push(k);
        }
    }
    out
}

/// Polls until every job finished, resubmitting failed ones that have retries left. On a terminal
/// a live line shows the jobs still queued or running, with a line per job that ends; elsewhere
/// (logs, CI) a line per state change.
fn wait(jobs: &mut [Job], targets: &[Target], d: &DriverOptions) -> Result<(), SlurmError> {
    use std::io::IsTerminal;
    let live = !d.quiet && std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let width = jobs.iter().map(|j| j.id.len()).max().unwrap_or(4);
    let mut shown: Vec<String> = vec![String::new(); jobs.len()];
    while jobs.iter().any(|j| j.done.is_none()) {
        let states = query()?;
        for j in 0..jobs.len() {
            if jobs[j].done.is_some() {
                continue;
            }
            let e = targets[jobs[j].target].engine;
            let info = match states.get(&jobs[j].job) {
                Some(i) => i.clone(),
                // Forgotten by Slurm (MinJobAge passed): the store says whether it finished.
                None if e.has_artifact(jobs[j].stage) => {
                    JobInfo { state: "COMPLETED".into(), reason: "None".into(), exit_code: "0:0".into() }
                }
                None => JobInfo {
                    state: "UNKNOWN".into(),
                    reason: "Slurm no longer knows the job".into(),
                    exit_code: String::new(),
                },
            };
            jobs[j].state = info.state.clone();
            let line = format!("{} (slurm job {})", info.state, jobs[j].job);
            if shown[j] != line && !d.quiet && (!live || !is_active(&info.state)) {
                if live {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("  {:<width$}  {line}", jobs[j].id);
            }
            shown[j] = line;
            if is_active(&info.state) {
                continue;
            }
            if info.state == "COMPLETED" {
                jobs[j].done = Some(Ok(()));
                continue;
            }
            let log = log_path(&e.store.root, &e.pipeline.name, &jobs[j].id, jobs[j].job);
            let mut what = format!(
                "slurm job {} ended {} (exit code {}, reason {})",
                jobs[j].job, info.state, info.exit_code, info.reason
            );
            // The job's own last word (pipe exec's error line), so the cause shows without opening the log.
            if let Some(last) = last_line(&log) {
                what.push_str(&format!(": {last}"));
            }
            if jobs[j].cancelled_by_us {
                jobs[j].done = Some(Err(what));
                continue;
            }
            let downstream = dependents(jobs, j);
            if jobs[j].attempts <= jobs[j].retries {
                if !d.quiet {
                    eprintln!(
                        "  {:<width$}  {what}; retrying ({} of {}); log {}",
                        jobs[j].id,
                        jobs[j].attempts,
                        jobs[j].retries,
                        log.display()
                    );
                }
                // Slurm cancels the dependents of a failed job (--kill-on-invalid-dep); resubmit
                // them behind the new attempt.
                let old: Vec<u64> = downstream.iter().map(|&k| jobs[k].job).collect();
                cancel(&old);
                submit_job(jobs, j, targets)?;
                for k in downstream {
                    submit_job(jobs, k, targets)?;
                }
                set_in_flight(jobs.iter().filter(|j| j.done.is_none()).map(|j| j.job).collect());
                continue;
            }
            jobs[j].done = Some(Err(what));
            let ids: Vec<u64> = downstream.iter().filter(|&&k| jobs[k].done.is_none()).map(|&k| jobs[k].job).collect();
            for &k in &downstream {
                jobs[k].cancelled_by_us = true;
            }
            cancel(&ids);
        }
        if live && jobs.iter().any(|j| j.done.is_none()) {
            let waiting: Vec<String> =
                jobs.iter().filter(|j| j.done.is_none()).map(|j| format!("{} {}", j.id, j.state)).collect();
            let secs = start.elapsed().as_secs();
            let line = format!("  [{}:{:02}] {}", secs / 60, secs % 60, waiting.join(", "));
            eprint!("\r\x1b[2K{}", line.chars().take(120).collect::<String>());
        }
        if jobs.iter().any(|j| j.done.is_none()) {
            std::thread::sleep(d.poll);
        }
    }
    if live {
        eprint!("\r\x1b[2K");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resources: Resources, deps: Vec<u64>) -> JobSpec {
        JobSpec {
            name: "pipe:q:train".into(),
            log: PathBuf::from("/s/slurm/q/train/%j.log"),
            chdir: PathBuf::from("/w"),
            deps,
            resources,
            command: vec!["/bin/pipe".into(), "exec".into()],
        }
    }

    #[test]
    fn sbatch_args_map_config_and_resources() {
        let cfg = SlurmConfig {
            kind: ExecutorKind::Slurm,
            partition: Some("gpu".into()),
            account: Some("ml".into()),
            time: Some("1:00:00".into()),
            qos: None,
            extra_args: vec!["--exclusive".into()],
        };
        let r = Resources { gpus: 2, cpus: Some(8), mem: Some("32G".into()), time: Some("2-00:00:00".into()) };
        let a = sbatch_args(&cfg, &spec(r, vec![3, 4]));
        for want in [
            "--parsable",
            "--job-name=pipe:q:train",
            "--output=/s/slurm/q/train/%j.log",
            "--kill-on-invalid-dep=yes",
            "--dependency=afterok:3:4",
            "--partition=gpu",
            "--account=ml",
            "--time=2-00:00:00",
            "--gres=gpu:2",
            "--cpus-per-task=8",
            "--mem=32G",
        ] {
            assert!(a.contains(&want.to_string()), "{want} missing from {a:?}");
        }
        assert_eq!(a.last().unwrap(), "--exclusive", "extra args come last, so they can override");
        assert!(!a.iter().any(|x| x.starts_with("--qos")));
        // No GPUs asked: no --gres at all (a CPU partition has no gpu gres); the executor's time applies.
        let a = sbatch_args(&cfg, &spec(Resources::default(), vec![]));
        assert!(!a.iter().any(|x| x.starts_with("--gres") || x.starts_with("--dependency")), "{a:?}");
        assert!(a.contains(&"--time=1:00:00".to_string()));
    }

    #[test]
    fn batch_script_quotes_every_argument() {
        let s = batch_script(&["/bin/pipe".into(), "--set".into(), "load.path=it's here.csv".into()]);
        assert_eq!(s, "#!/bin/sh\nexec '/bin/pipe' '--set' 'load.path=it'\\''s here.csv'\n");
    }

    #[test]
    fn scontrol_lines_parse_into_states() {
        let out = "JobId=12 JobName=pipe:q:train UserId=root(0) JobState=RUNNING Reason=None ExitCode=0:0\n\
                   JobId=13 JobName=pipe:q:evaluate JobState=CANCELLED Reason=DependencyNeverSatisfied ExitCode=0:0\n\
                   JobId=14 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0\n";
        let j = parse_scontrol(out);
        assert_eq!(j[&12].state, "RUNNING");
        assert!(is_active(&j[&12].state));
        assert_eq!(j[&13].reason, "DependencyNeverSatisfied");
        assert_eq!(j[&14].exit_code, "1:0");
        assert!(!is_active("FAILED") && !is_active("COMPLETED") && !is_active("TIMEOUT"));
    }

    #[test]
    fn executor_and_resources_parse_strictly() {
        let t: toml::Table = toml::from_str(
            "kind = \"slurm\"\npartition = \"gpu\"\ntime = \"04:00:00\"\ngpus = [0, 1]\nextra_args = [\"--x\"]\n",
        )
        .unwrap();
        let cfg = parse_executor("p.toml", Some(&toml::Value::Table(t))).unwrap();
        assert_eq!(cfg.kind, ExecutorKind::Slurm);
        assert_eq!(cfg.partition.as_deref(), Some("gpu"));
        assert_eq!(cfg.extra_args, ["--x"]);
        let bad: toml::Table = toml::from_str("kind = \"slurm\"\npartiton = \"gpu\"\n").unwrap();
        let e = parse_executor("p.toml", Some(&toml::Value::Table(bad))).unwrap_err();
        assert_eq!(e.key, "executor.partiton");
        assert!(e.hint.unwrap().contains("partition"));
        let bad: toml::Table = toml::from_str("kind = \"k8s\"\n").unwrap();
        assert!(parse_executor("p.toml", Some(&toml::Value::Table(bad))).unwrap_err().message.contains("k8s"));

        let st: toml::Table =
            toml::from_str("retries = 2\n[resources]\ngpus = 1\ncpus = 4\nmem = \"16G\"\ntime = \"30\"\n").unwrap();
        let (r, retries) = parse_stage_meta("p.toml", "train", &st).unwrap();
        assert_eq!(
            (r.gpus, r.cpus, r.mem.as_deref(), r.time.as_deref(), retries),
            (1, Some(4), Some("16G"), Some("30"), 2)
        );
        for (text, key) in [
            ("[resources]\nmem = \"lots\"\n", "stages.train.resources.mem"),
            ("[resources]\ntime = \"an hour\"\n", "stages.train.resources.time"),
            ("[resources]\ngpu = 1\n", "stages.train.resources.gpu"),
            ("retries = -1\n", "stages.train.retries"),
        ] {
            let st: toml::Table = toml::from_str(text).unwrap();
            assert_eq!(parse_stage_meta("p.toml", "train", &st).unwrap_err().key, key, "{text}");
        }
    }
}
