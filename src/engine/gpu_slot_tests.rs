//! GPU slots end to end through the runner and the sweep, with a test-only stage kind that takes a
//! GPU slot, records which GPUs it was given and when, and sleeps: no GPU needed.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::{load_str, Overrides, Pipeline};
use super::runner::{Engine, EngineError, RunOptions, Status};
use super::slots::{GpuDemand, GpuPool, Want};
use super::sweep::run_sweep;
use super::{Contract, Stage, StageContext, StageError, StageOutput, StageParams, TypedStage};

/// One run of [`GpuSleep`]: the GPUs it was given, when it started and ended.
type Run = (Vec<usize>, Instant, Instant);

/// (tag, run) of every run of [`GpuSleep`], from every test in this binary.
static LOG: Mutex<Vec<(String, Run)>> = Mutex::new(Vec::new());

#[derive(serde::Deserialize)]
struct SleepParams {
    /// Tells one test's runs from another's in [`LOG`] (tests run at once).
    tag: String,
    /// Swept, so that every sweep point is its own artifact.
    #[allow(dead_code)]
    point: i64,
    ms: i64,
    device: String,
    fail: bool,
}
impl StageParams for SleepParams {}

struct GpuSleep;
impl TypedStage for GpuSleep {
    type Params = SleepParams;
    const KIND: &'static str = "gpu_sleep";
    const VERSION: u32 = 1;
    const DEFAULTS: &'static str = "tag = \"\"\npoint = 0\nms = 50\ndevice = \"gpu\"\nfail = false\n";
    const CONTRACT: Contract = Contract { needs: &[], writes: &["out.txt"] };
    fn gpus(p: &SleepParams) -> GpuDemand {
        match p.device.as_str() {
            "gpu" => GpuDemand::Slots { optional: false },
            _ => GpuDemand::None,
        }
    }
    fn run(ctx: &StageContext, p: &SleepParams) -> Result<StageOutput, StageError> {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(p.ms as u64));
        if p.fail {
            return Err(StageError::failed("asked to fail"));
        }
        std::fs::write(ctx.out.join("out.txt"), "done").map_err(|e| StageError::io("out.txt", e))?;
        LOG.lock().unwrap().push((p.tag.clone(), (ctx.gpus.to_vec(), start, Instant::now())));
        Ok(StageOutput::default())
    }
}

fn registry() -> Vec<Box<dyn Stage>> {
    vec![Box::new(GpuSleep)]
}

/// A one-stage pipeline in a fresh project; `extra` is appended (a sweep, an executor table).
fn pipeline(dir: &tempfile::TempDir, stage: &str, extra: &str, registry: &[Box<dyn Stage>]) -> Pipeline {
    let text = format!("[pipeline]\nname = \"p\"\n\n[stages.s]\nkind = \"gpu_sleep\"\n{stage}\n{extra}");
    load_str(&dir.path().join("p.toml"), &text, &Overrides::default(), registry).unwrap()
}

fn runs_of(tag: &str) -> Vec<Run> {
    LOG.lock().unwrap().iter().filter(|r| r.0 == tag).map(|r| r.1.clone()).collect()
}

/// The most runs that were ever in progress at once.
fn max_overlap(runs: &[Run]) -> usize {
    runs.iter().map(|(_, s, _)| runs.iter().filter(|(_, s2, e2)| s2 <= s && s < e2).count()).max().unwrap_or(0)
}

fn sweep_of_8(tag: &str, pool: Vec<usize>, jobs: usize) -> Vec<Run> {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let grid = "[sweep.grid]\n\"s.point\" = [1, 2, 3, 4, 5, 6, 7, 8]\n";
    let p = pipeline(&dir, &format!("tag = \"{tag}\"\nms = 120"), grid, &reg);
    let pool = Arc::new(GpuPool::new(pool, 1, 1));
    let report = run_sweep(&p, &reg, jobs, true, Some(pool)).unwrap();
    assert_eq!(report.status, "ok", "{report:?}");
    // Each point's run record names the GPU its stage was given.
    for pt in &report.points {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(format!("{}/run.json", pt.run_dir)).unwrap()).unwrap();
        let gpus = rec["stages"][0]["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), 1, "{rec}");
    }
    runs_of(tag)
}

/// No two intervals on one GPU overlap, and the runs were spread and parallel.
fn assert_exclusive(runs: &[Run], gpus: usize) {
    assert_eq!(runs.len(), 8);
    assert!(runs.iter().all(|(g, _, _)| g.len() == 1 && g[0] < gpus), "{runs:?}");
    for g in 0..gpus {
        let mut on: Vec<(Instant, Instant)> =
            runs.iter().filter(|(given, _, _)| given.contains(&g)).map(|(_, s, e)| (*s, *e)).collect();
        on.sort();
        for w in on.windows(2) {
            assert!(w[1].0 >= w[0].1, "two stages on GPU {g} at once: {w:?}");
        }
    }
    let used: std::collections::BTreeSet<usize> = runs.iter().map(|(g, _, _)| g[0]).collect();
    assert!(used.len() > 1, "the points all ran on GPU {used:?}");
    assert!(max_overlap(runs) > 1, "the points did not run in parallel");
}

#[test]
fn a_sweep_on_four_gpus_never_gives_one_gpu_to_two_stages() {
    assert_exclusive(&sweep_of_8("four", vec![0, 1, 2, 3], 4), 4);
    // More jobs than GPUs: the extra points wait instead of doubling up.
    assert_exclusive(&sweep_of_8("four-by-eight", vec![0, 1, 2, 3], 8), 4);
}

#[test]
fn two_gpus_hold_at_most_two_stages_whatever_the_jobs() {
    let runs = sweep_of_8("two", vec![0, 1], 4);
    assert_eq!(runs.len(), 8);
    assert_eq!(max_overlap(&runs), 2, "four jobs, two GPUs: {runs:?}");
}

#[test]
fn an_artifact_made_on_gpu_3_is_reused_on_gpu_0() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let p = pipeline(&dir, "tag = \"reuse\"\nms = 1", "", &reg);
    let engine = Engine::new(&p, &reg).unwrap();
    let run = |gpus: Vec<usize>| {
        let opts = RunOptions { quiet: true, gpus: Some(Arc::new(GpuPool::new(gpus, 1, 1))), ..Default::default() };
        engine.run(&opts).unwrap().stages.remove(0)
    };
    let on3 = run(vec![3]);
    assert_eq!((on3.status, on3.gpus.clone()), (Status::Ran, vec![3]));
    let on0 = run(vec![0]);
    assert_eq!((on0.status, on0.key.clone()), (Status::Cached, on3.key.clone()), "{on0:?}");
    assert!(on0.gpus.is_empty(), "a cached stage is given no GPU");
    let manifest = engine.store.manifest("gpu_sleep", on3.key.as_deref().unwrap()).unwrap().unwrap();
    let inputs = serde_json::to_string(&manifest.key_inputs).unwrap();
    assert!(!inputs.contains("gpus"), "the GPUs are in the key: {inputs}");
}

#[test]
fn a_stage_without_a_gpu_never_waits_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let p = pipeline(&dir, "tag = \"cpu\"\nms = 1\ndevice = \"cpu\"", "", &reg);
    let pool = Arc::new(GpuPool::new(vec![0], 1, 1));
    let cancel = AtomicBool::new(false);
    let _busy = pool.acquire(Want::Any(1), &cancel, &mut |_| {}).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let opts = RunOptions { quiet: true, gpus: Some(pool.clone()), ..Default::default() };
            let rec = Engine::new(&p, &reg).unwrap().run(&opts).unwrap();
            tx.send(rec.stages[0].clone()).unwrap();
        });
        let rec = rx.recv_timeout(Duration::from_secs(20)).expect("the CPU stage waited for the busy GPU");
        assert_eq!((rec.status, rec.gpus), (Status::Ran, vec![]));
    });
}

#[test]
fn more_gpus_per_stage_than_the_run_has_is_a_config_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let p = pipeline(&dir, "tag = \"too-many\"", "[executor]\ngpus_per_stage = 2\n", &reg);
    let pool = Arc::new(GpuPool::new(vec![0], p.executor.gpus_per_stage, 1));
    let opts = RunOptions { quiet: true, gpus: Some(pool.clone()), ..Default::default() };
    let e = Engine::new(&p, &reg).unwrap().run(&opts).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, EngineError::Config(_)), "{msg}");
    assert!(msg.contains("`stages.s`: stage `s` (gpu_sleep) needs 2 GPU(s) but the run has 1 (GPUs 0)"), "{msg}");
    assert!(!dir.path().join("artifacts").exists(), "nothing ran, the store is untouched");
    // The same for a sweep, before any point runs.
    let p = pipeline(
        &dir,
        "tag = \"too-many\"",
        "[executor]\ngpus_per_stage = 2\n[sweep.grid]\n\"s.point\" = [1, 2]\n",
        &reg,
    );
    let e = run_sweep(&p, &reg, 2, true, Some(pool)).unwrap_err();
    assert!(matches!(e, EngineError::Config(_)), "{e}");
    assert!(runs_of("too-many").is_empty());
}

#[test]
fn gpus_per_stage_hands_out_distinct_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let p = pipeline(&dir, "tag = \"pair\"\nms = 1", "[executor]\ngpus_per_stage = 2\n", &reg);
    let pool = Arc::new(GpuPool::new(vec![1, 2, 3], p.executor.gpus_per_stage, 1));
    let opts = RunOptions { quiet: true, gpus: Some(pool), ..Default::default() };
    let rec = Engine::new(&p, &reg).unwrap().run(&opts).unwrap();
    assert_eq!(rec.stages[0].gpus, vec![1, 2]);
    assert_eq!(runs_of("pair")[0].0, vec![1, 2], "the stage sees what the record says");
}

/// Three stages: `a` and `b` independent, `c` after both; `extra` goes into `a`.
fn diamond(dir: &tempfile::TempDir, tag: &str, a_extra: &str, reg: &[Box<dyn Stage>]) -> Pipeline {
    let text = format!(
        "[pipeline]\nname = \"d\"\n\n[stages.a]\nkind = \"gpu_sleep\"\ntag = \"{tag}-a\"\nms = 150\n{a_extra}\n\n\
         [stages.b]\nkind = \"gpu_sleep\"\ntag = \"{tag}-b\"\nms = 150\n\n\
         [stages.c]\nkind = \"gpu_sleep\"\nneeds = [\"a\", \"b\"]\ntag = \"{tag}-c\"\nms = 1\n"
    );
    load_str(&dir.path().join("d.toml"), &text, &Overrides::default(), reg).unwrap()
}

fn run_diamond(tag: &str, a_extra: &str, gpus: Vec<usize>) -> super::runner::RunRecord {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    let p = diamond(&dir, tag, a_extra, &reg);
    let opts =
        RunOptions { quiet: true, jobs: 2, gpus: Some(Arc::new(GpuPool::new(gpus, 1, 1))), ..Default::default() };
    Engine::new(&p, &reg).unwrap().run(&opts).unwrap()
}

#[test]
fn independent_branches_run_at_once_on_their_own_gpus() {
    let record = run_diamond("branches", "", vec![0, 1]);
    let ids: Vec<&str> = record.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"], "the record keeps dependency order");
    assert!(record.stages.iter().all(|s| s.status == Status::Ran), "{record:?}");
    let (a, b, c) = (&runs_of("branches-a")[0], &runs_of("branches-b")[0], &runs_of("branches-c")[0]);
    assert!(a.1 < b.2 && b.1 < a.2, "a and b did not overlap");
    assert_ne!(a.0, b.0, "a and b on one GPU at once");
    assert!(c.1 >= a.2 && c.1 >= b.2, "c started before its upstream stages ended");
    assert_eq!(record.stages[0].gpus, a.0);
}

#[test]
fn independent_branches_wait_for_the_one_gpu() {
    run_diamond("one-gpu", "", vec![0]);
    let (a, b) = (&runs_of("one-gpu-a")[0], &runs_of("one-gpu-b")[0]);
    assert!(a.2 <= b.1 || b.2 <= a.1, "two stages on GPU 0 at once: {a:?} {b:?}");
}

#[test]
fn a_failed_branch_skips_its_dependents_and_not_the_other_branch() {
    let record = run_diamond("fail", "fail = true", vec![0, 1]);
    let status: Vec<(&str, Status)> = record.stages.iter().map(|s| (s.id.as_str(), s.status)).collect();
    assert_eq!(status, [("a", Status::Failed), ("b", Status::Ran), ("c", Status::Skipped)]);
    assert_eq!(record.stages[2].reason.as_deref(), Some("upstream a did not complete"));
    assert_eq!(record.status, "failed");
}
