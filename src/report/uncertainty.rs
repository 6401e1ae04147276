//! Whether a difference in `pipe compare` is real: intervals of each run's test metrics, paired
//! differences against a baseline run, and ties within noise when sorting, all computed from the
//! runs' evaluate predictions with [`crate::metrics::bootstrap`].
//!
//! Why from predictions and not from the run records: an interval needs the per-query scores, and
//! a paired interval needs both runs to have scored the same pairs, which only the predictions
//! show. A run whose evaluate artifact is gone (collected, or a record copied without its store)
//! still compares; it just has no interval.

use std::collections::BTreeMap;
use std::path::Path;

use crate::engine::compare::{Comparison, Delta, Run};
use crate::engine::StageError;
use crate::metrics::bootstrap::{paired, resample, BootstrapOptions, Distribution, Sample};
use crate::metrics::{Gain, Options, Prediction};
use crate::stages::analyze::{read_scored, Part};

/// Why `--baseline` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UncertaintyError {
    #[error("--baseline {0}: no such run among those compared; give a run name from the `run` column")]
    UnknownBaseline(String),
    #[error("--baseline {name}: {count} runs have that name; give the path of its run directory")]
    AmbiguousBaseline { name: String, count: usize },
    #[error("{0}")]
    Read(#[from] StageError),
}

/// One evaluate stage's test predictions in one run, resampled.
struct Scored {
    /// The (query, product id) pairs scored, sorted: two runs pair up only when these are equal.
    pairs: Vec<(String, String)>,
    dist: Distribution,
}

/// The evaluate metric options a run used (its `k` and `gain`, else the defaults).
fn options(run: &Run, stage: &str) -> Options {
    let mut opts = Options::default();
    if let Some(ks) = run.params.get(&format!("{stage}.k")).and_then(|v| v.as_array()) {
        let ks: Vec<usize> = ks.iter().filter_map(|k| k.as_u64()).map(|k| k as usize).collect();
        if !ks.is_empty() {
            opts.ks = ks;
        }
    }
    if run.params.get(&format!("{stage}.gain")).and_then(|v| v.as_str()) == Some("exp") {
        opts.gain = Gain::Exp;
    }
    opts
}

fn scored(run: &Run, stage: &str, dir: &Path, boot: &BootstrapOptions) -> Result<Option<Scored>, StageError> {
    let path = dir.join(crate::stages::evaluate::PREDICTIONS);
    if boot.resamples == 0 || !path.is_file() {
        return Ok(None);
    }
    let test: Vec<_> = read_scored(&path)?.into_iter().filter(|p| p.part == Part::Test).collect();
    if test.is_empty() {
        return Ok(None);
    }
    let preds: Vec<Prediction> = test.iter().map(|p| p.prediction(p.score)).collect();
    let Ok(sample) = Sample::new(&preds, &options(run, stage)) else { return Ok(None) };
    let Ok(mut dist) = resample(&[&sample], boot) else { return Ok(None) };
    let mut pairs: Vec<(String, String)> = test.into_iter().map(|p| (p.query, p.product_id)).collect();
    pairs.sort();
    Ok(Some(Scored { pairs, dist: dist.remove(0) }))
}

/// Splits `<stage>.test.<metric>` into the stage id and the metric key.
fn test_metric(column: &str) -> Option<(&str, &str)> {
    let (stage, rest) = column.split_once('.')?;
    Some((stage, rest.strip_prefix("test.")?))
}

/// Finds `--baseline NAME` among the runs: by run name, or by the path of its run directory.
fn find_baseline(c: &Comparison, name: &str) -> Result<usize, UncertaintyError> {
    let by_name: Vec<usize> = (0..c.runs.len()).filter(|&i| c.runs[i].name == name).collect();
    match by_name.len() {
        1 => return Ok(by_name[0]),
        0 => {}
        count => return Err(UncertaintyError::AmbiguousBaseline { name: name.to_string(), count }),
    }
    let want = std::fs::canonicalize(name).ok();
    (0..c.runs.len())
        .find(|&i| want.is_some() && std::fs::canonicalize(&c.runs[i].run_dir).ok() == want)
        .ok_or_else(|| UncertaintyError::UnknownBaseline(name.to_string()))
}

/// Attaches intervals, the baseline's differences and the ties to `c`.
pub fn attach(c: &mut Comparison, baseline: Option<&str>, boot: &BootstrapOptions) -> Result<(), UncertaintyError> {
    let base = baseline.map(|b| find_baseline(c, b)).transpose()?;
    // Each run's evaluate stages, resampled once; the draws depend only on the queries, so two runs
    // that scored the same pairs were resampled on the same draws and pair up.
    let mut found: BTreeMap<(usize, String), Scored> = BTreeMap::new();
    let stages: Vec<&str> = c.metrics.iter().filter_map(|m| test_metric(m)).map(|(s, _)| s).collect();
    for (i, run) in c.runs.iter().enumerate() {
        for stage in &stages {
            if found.contains_key(&(i, stage.to_string())) {
                continue;
            }
            let Some((kind, dir)) = run.artifacts.get(*stage) else { continue };
            if kind != crate::stages::evaluate::KIND {
                continue;
            }
            if let Some(s) = scored(run, stage, dir, boot)? {
                found.insert((i, stage.to_string()), s);
            }
        }
    }
    let u = &mut c.uncertainty;
    u.level = boot.level;
    for ((i, stage), s) in &found {
        for m in &c.metrics {
            if let Some(ci) =
                test_metric(m).filter(|(st, _)| st == stage).and_then(|(_, k)| s.dist.interval(k, boot.level))
            {
                u.intervals.insert((*i, m.clone()), ci);
            }
        }
    }
    let difference = |a: usize, b: usize, m: &str| -> Option<Delta> {
        let diff = c.runs[a].metrics.get(m)? - c.runs[b].metrics.get(m)?;
        let mut d = Delta { diff, ci95: None, p_value: None };
        if let Some((stage, key)) = test_metric(m) {
            let (x, y) = (found.get(&(a, stage.to_string())), found.get(&(b, stage.to_string())));
            if let (Some(x), Some(y)) = (x, y) {
                if x.pairs == y.pairs {
                    if let Some(p) = paired(&x.dist, &y.dist, key, boot.level) {
                        d.ci95 = Some(p.ci95);
                        d.p_value = Some(p.p_value);
                    }
                }
            }
        }
        Some(d)
    };
    let mut deltas = BTreeMap::new();
    if let Some(b) = base {
        for i in (0..c.runs.len()).filter(|&i| i != b) {
            for m in &c.metrics {
                if let Some(d) = difference(i, b, m) {
                    deltas.insert((i, m.clone()), d);
                }
            }
        }
    }
    // A tie needs a paired interval against the first row; without one nothing is claimed.
    let ties = c.sorted_by.as_deref().and_then(|m| {
        let judged: Vec<(usize, bool)> = (1..c.runs.len())
            .filter_map(|i| difference(i, 0, m).and_then(|d| d.significant()).map(|sig| (i, !sig)))
            .collect();
        (!judged.is_empty()).then(|| judged.into_iter().filter(|&(_, tie)| tie).map(|(i, _)| i).collect())
    });
    let u = &mut c.uncertainty;
    u.baseline = base;
    u.deltas = deltas;
    u.ties = ties;
    Ok(())
}
