//! Sweeps: every point is an ordinary run with its own run record; stages that points share have the
//! same key and so run once. The sweep id is a hash of what the sweep computes, so rerunning an
//! interrupted sweep finds its own directory and runs only the points without a finished record.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::config::{self, Dist, Pipeline, SweepSpec};
use super::key::canonical_json;
use super::runner::{self, Engine, EngineError, RunOptions};
use super::slots::GpuPool;
use super::stage::Stage;
use crate::util::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `learning_rate=1e-05,r=8`: the swept parameters (stage prefix only where names clash).
    pub name: String,
    pub values: Vec<(String, toml::Value)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PointResult {
    pub name: String,
    pub values: serde_json::Map<String, serde_json::Value>,
    /// ok | failed | done (finished in an earlier invocation)
    pub status: String,
    pub run_dir: String,
    pub error: Option<String>,
    /// Stage id → the Slurm job that computed it for this point (Slurm executor only).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub slurm_jobs: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub pipeline: String,
    pub sweep_id: String,
    pub sweep_dir: String,
    pub status: String,
    pub points: Vec<PointResult>,
}

/// Python-like float text (`1e-05`, `0.001`), so point names read like the values users type.
pub fn fmt_value(v: &toml::Value) -> String {
    match v {
        toml::Value::Float(f) => {
            let a = f.abs();
            if a != 0.0 && !(1e-4..1e16).contains(&a) {
                let s = format!("{f:e}");
                let (m, e) = s.split_once('e').expect("exp form");
                let e: i32 = e.parse().expect("exponent");
                format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
            } else if f.fract() == 0.0 {
                format!("{f:.1}")
            } else {
                format!("{f}")
            }
        }
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The grid's cartesian product (first axis slowest), times the random draws if any.
pub fn points(spec: &SweepSpec, is_int: &dyn Fn(&str) -> bool) -> Vec<Point> {
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for (k, vals) in &spec.grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                vals.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    if let Some(r) = &spec.random {
        // The project's own generator, so a sweep seed draws the same points after any upgrade.
        let mut rng = SplitMix64::new(r.seed);
        let mut draws = Vec::new();
        for _ in 0..r.n {
            let mut d = Vec::new();
            for (k, dist) in &r.params {
                let v = match dist {
                    Dist::LogUniform(lo, hi) => {
                        let x = (lo.ln() + rng.next_f64() * (hi.ln() - lo.ln())).exp();
                        toml::Value::Float(round_sig(x))
                    }
                    Dist::Uniform(lo, hi) if is_int(k) => {
                        toml::Value::Integer((lo + rng.next_f64() * (hi - lo + 1.0)).floor().min(*hi) as i64)
                    }
                    Dist::Uniform(lo, hi) => toml::Value::Float(round_sig(lo + rng.next_f64() * (hi - lo))),
                    Dist::Choice(c) => c[(rng.next_u64() % c.len() as u64) as usize].clone(),
                };
                let v = match (v, is_int(k)) {
                    (toml::Value::Float(f), true) => toml::Value::Integer(f.round() as i64),
                    (v, _) => v,
                };
                d.push((k.clone(), v));
            }
            draws.push(d);
        }
        combos = combos
            .into_iter()
            .flat_map(|c| draws.iter().map(move |d| c.iter().cloned().chain(d.iter().cloned()).collect()))
            .collect();
    }
    let keys: Vec<String> = combos.first().map(|c| c.iter().map(|(k, _)| k.clone()).collect()).unwrap_or_default();
    let short = |k: &str| -> String {
        let param = k.split_once('.').map(|(_, p)| p).unwrap_or(k);
        let clash = keys.iter().filter(|o| o.split_once('.').map(|(_, p)| p) == Some(param)).count() > 1;
        if clash {
            k.to_string()
        } else {
            param.to_string()
        }
    };
    let mut seen = std::collections::HashSet::new();
    combos
        .into_iter()
        .map(|values| {
            let name =
                values.iter().map(|(k, v)| format!("{}={}", short(k), fmt_value(v))).collect::<Vec<_>>().join(",");
            Point { name, values }
        })
        .filter(|p| seen.insert(p.name.clone()))
        .collect()
}

/// Four significant digits: drawn values that print and hash stably.
fn round_sig(x: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let mag = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * mag).round() / mag
}

fn value_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn sweep_id(base: &Pipeline, pts: &[Point]) -> String {
    let desc = serde_json::json!({
        "pipeline": base.to_toml(),
        "points": pts.iter().map(|p| p.values.iter().map(|(k, v)| (k.clone(), value_json(v))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
    });
    format!("sweep-{}", &blake3::hash(canonical_json(&desc).as_bytes()).to_hex()[..12])
}

fn finished(run_dir: &Path) -> bool {
    std::fs::read(run_dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["status"] == "ok")
}

/// A sweep with every point resolved into its own pipeline.
struct Resolved {
    id: String,
    sweep_dir: std::path::PathBuf,
    points: Vec<Point>,
    pipelines: Vec<Pipeline>,
}

/// `gpus`: checked against each point's GPU demand here, so a point asking for more GPUs than the
/// pool has fails the sweep before anything runs.
fn resolve(base: &Pipeline, registry: &[Box<dyn Stage>], gpus: Option<&Arc<GpuPool>>) -> Result<Resolved, EngineError> {
    let spec =
        base.sweep.clone().ok_or_else(|| EngineError::Usage(format!("{} defines no sweep", base.file.display())))?;
    let is_int = |k: &str| -> bool {
        let (id, param) = k.split_once('.').unwrap_or((k, ""));
        base.stage(id).and_then(|s| s.params.get(param)).is_some_and(|v| v.is_integer())
    };
    let pts = points(&spec, &is_int);
    let id = sweep_id(base, &pts);
    let sweep_dir = base.artifacts.join("runs").join(&base.name).join(&id);
    // Resolve every point first: a bad value fails the sweep before anything runs.
    let mut pipelines = Vec::new();
    for pt in &pts {
        let mut ov = base.overrides.clone();
        ov.sets
            .retain(|s| !spec.grid.iter().any(|(k, _)| s.split_once('=').map(|(p, _)| p.trim()) == Some(k.as_str())));
        ov.sets.extend(pt.values.iter().map(|(k, v)| format!("{k}={}", toml_inline(v))));
        let mut p = config::load_str(&base.file, &base.source_text, &ov, registry)?;
        p.check_runnable()?;
        if let Some(pool) = gpus {
            runner::check_gpus(&p, registry, pool)?;
        }
        p.sweep = None;
        // `--remote` is applied to the base after loading; every point shares it.
        p.remote = base.remote.clone();
        pipelines.push(p);
    }
    Ok(Resolved { id, sweep_dir, points: pts, pipelines })
}

fn point_values(pt: &Point) -> serde_json::Map<String, serde_json::Value> {
    pt.values.iter().map(|(k, v)| (k.clone(), value_json(v))).collect()
}

/// Run every point of the base pipeline's sweep. `jobs` > 1 runs points on parallel threads; shared
/// stages are still computed once (the per-key store lock makes the others wait, then hit the cache),
/// and the points' compute stages share `gpus`, one pool, so each gets GPUs of its own.
pub fn run_sweep(
    base: &Pipeline,
    registry: &[Box<dyn Stage>],
    jobs: usize,
    quiet: bool,
    gpus: Option<Arc<GpuPool>>,
) -> Result<SweepReport, EngineError> {
    let Resolved { id, sweep_dir, points: pts, pipelines } = resolve(base, registry, gpus.as_ref())?;
    if !quiet {
        eprintln!("pipe: sweep {id}: {} point(s) → {}", pts.len(), sweep_dir.display());
    }
    let results: Mutex<Vec<Option<PointResult>>> = Mutex::new(vec![None; pts.len()]);
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= pts.len() || runner::INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        let pt = &pts[i];
        let run_dir = sweep_dir.join(&pt.name);
        let values = point_values(pt);
        let mut res = PointResult {
            name: pt.name.clone(),
            values: values.clone(),
            status: "done".into(),
            run_dir: run_dir.display().to_string(),
            error: None,
            slurm_jobs: Default::default(),
        };
        if finished(&run_dir) {
            if !quiet {
                eprintln!("pipe: point {}/{} {} already finished", i + 1, pts.len(), pt.name);
            }
        } else {
            if !quiet {
                eprintln!("pipe: point {}/{} {}", i + 1, pts.len(), pt.name);
            }
            let opts = RunOptions {
                quiet,
                run_dir: Some(run_dir.clone()),
                sweep: Some(serde_json::json!({"id": id, "point": pt.name, "values": values})),
                gpus: gpus.clone(),
                ..Default::default()
            };
            match Engine::new(&pipelines[i], registry).and_then(|e| e.run(&opts)) {
                Ok(r) => {
                    res.status = if r.status == "ok" { "ok".into() } else { "failed".into() };
                    if r.status != "ok" {
                        res.error = r
                            .stages
                            .iter()
                            .find(|s| s.reason.is_some() && s.status == runner::Status::Failed)
                            .and_then(|s| s.reason.clone());
                    }
                }
                Err(e) => {
                    res.status = "failed".into();
                    res.error = Some(e.to_string());
                }
            }
        }
        results.lock().expect("results")[i] = Some(res);
    };
    if jobs <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 0..jobs.min(pts.len()) {
                s.spawn(work);
            }
        });
    }
    let points: Vec<PointResult> = results.into_inner().expect("results").into_iter().flatten().collect();
    let ok = points.len() == pts.len() && points.iter().all(|p| p.status != "failed");
    Ok(SweepReport {
        pipeline: base.name.clone(),
        sweep_id: id,
        sweep_dir: sweep_dir.display().to_string(),
        status: if ok { "ok" } else { "failed" }.into(),
        points,
    })
}

/// The sweep through Slurm: every unfinished point's stale stages become jobs, a stage that points
/// share (same plan id) one job. Waits unless `d.detach`; the report is then of the submission.
pub fn run_sweep_slurm(
    base: &Pipeline,
    registry: &[Box<dyn Stage>],
    d: &super::slurm::DriverOptions,
) -> Result<(SweepReport, Vec<super::slurm::SubmittedJob>), super::slurm::SlurmError> {
    let Resolved { id, sweep_dir, points: pts, pipelines } = resolve(base, registry, None)?;
    if !d.quiet {
        eprintln!("pipe: sweep {id}: {} point(s) → {} (Slurm)", pts.len(), sweep_dir.display());
    }
    let engines = pipelines.iter().map(|p| Engine::new(p, registry)).collect::<Result<Vec<_>, _>>()?;
    let mut todo = Vec::new();
    let mut targets = Vec::new();
    for (i, pt) in pts.iter().enumerate() {
        let run_dir = sweep_dir.join(&pt.name);
        if finished(&run_dir) {
            continue;
        }
        let opts = RunOptions {
            quiet: true,
            run_dir: Some(run_dir),
            sweep: Some(serde_json::json!({"id": id, "point": pt.name, "values": point_values(pt)})),
            ..Default::default()
        };
        todo.push(i);
        targets.push(super::slurm::Target { engine: &engines[i], opts });
    }
    let outcome = super::slurm::run(&targets, d)?;
    let mut points = Vec::new();
    for (i, pt) in pts.iter().enumerate() {
        let run_dir = sweep_dir.join(&pt.name);
        let mut res = PointResult {
            name: pt.name.clone(),
            values: point_values(pt),
            status: "done".into(),
            run_dir: run_dir.display().to_string(),
            error: None,
            slurm_jobs: Default::default(),
        };
        if let Some(t) = todo.iter().position(|&x| x == i) {
            if d.detach {
                res.status = "submitted".into();
                res.slurm_jobs =
                    outcome.jobs.iter().filter(|j| j.target == t).map(|j| (j.stage.clone(), j.job)).collect();
            } else {
                let r = &outcome.records[t];
                res.status = if r.status == "ok" { "ok".into() } else { "failed".into() };
                res.error =
                    r.stages.iter().find(|s| s.status == super::runner::Status::Failed).and_then(|s| s.reason.clone());
                res.slurm_jobs = r.stages.iter().filter_map(|s| s.slurm_job.map(|j| (s.id.clone(), j))).collect();
            }
        }
        points.push(res);
    }
    let ok = points.iter().all(|p| p.status != "failed");
    let status = if d.detach {
        "submitted"
    } else if ok {
        "ok"
    } else {
        "failed"
    };
    let report = SweepReport {
        pipeline: base.name.clone(),
        sweep_id: id,
        sweep_dir: sweep_dir.display().to_string(),
        status: status.into(),
        points,
    };
    Ok((report, outcome.jobs))
}

/// A value as `--set` accepts it back (strings quoted so commas and spaces survive).
fn toml_inline(v: &toml::Value) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_a_cartesian_product_with_readable_names() {
        let spec = SweepSpec {
            grid: vec![
                ("train.learning_rate".into(), vec![toml::Value::Float(5e-6), toml::Value::Float(1e-5)]),
                ("train.r".into(), vec![toml::Value::Integer(8), toml::Value::Integer(16)]),
            ],
            random: None,
        };
        let pts = points(&spec, &|_| false);
        let names: Vec<&str> = pts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "learning_rate=5e-06,r=8",
                "learning_rate=5e-06,r=16",
                "learning_rate=1e-05,r=8",
                "learning_rate=1e-05,r=16"
            ]
        );
    }

    #[test]
    fn random_draws_are_seeded_and_in_range() {
        let spec = SweepSpec {
            grid: vec![],
            random: Some(config::RandomSpec {
                n: 20,
                seed: 3,
                params: vec![
                    ("train.learning_rate".into(), Dist::LogUniform(1e-6, 1e-4)),
                    ("train.r".into(), Dist::Uniform(4.0, 8.0)),
                    ("train.loss".into(), Dist::Choice(vec!["bce".into(), "mse".into()])),
                ],
            }),
        };
        let is_int = |k: &str| k == "train.r";
        let a = points(&spec, &is_int);
        assert_eq!(a, points(&spec, &is_int));
        assert!(a.len() > 15, "distinct draws");
        for p in &a {
            let lr = p.values[0].1.as_float().unwrap();
            assert!((1e-6..=1e-4).contains(&lr));
            let r = p.values[1].1.as_integer().unwrap();
            assert!((4..=8).contains(&r));
            assert!(["bce", "mse"].contains(&p.values[2].1.as_str().unwrap()));
        }
    }

    #[test]
    fn clashing_param_names_keep_the_stage() {
        let spec = SweepSpec {
            grid: vec![
                ("a.seed".into(), vec![toml::Value::Integer(1)]),
                ("b.seed".into(), vec![toml::Value::Integer(2)]),
            ],
            random: None,
        };
        assert_eq!(points(&spec, &|_| true)[0].name, "a.seed=1,b.seed=2");
    }

    #[test]
    fn float_formatting_reads_like_python() {
        assert_eq!(fmt_value(&toml::Value::Float(1e-5)), "1e-05");
        assert_eq!(fmt_value(&toml::Value::Float(0.001)), "0.001");
        assert_eq!(fmt_value(&toml::Value::Float(2.0)), "2.0");
        assert_eq!(fmt_value(&toml::Value::Float(2.5e-6)), "2.5e-06");
    }
}
