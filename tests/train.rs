//! The training loop on tiny random Qwen3 models: what changes, accumulation, clipping, resume,
//! the guards, overfitting — and the `train` stage through the `pipe` binary in temp projects
//! (through the engine, a real `kill -9` and resume, a NaN that fails the stage cleanly).

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use indicatif::ProgressBar;
use pipe::model::{self, Qwen3, Qwen3Config};
use pipe::text::TokenStore;
use pipe::train::data::MicroBatch;
use pipe::train::{self, Fault, Learner, LoraConfig, LossKind, Mode, RunEnv, TrainConfig, TrainData, TrainError};
use util::Project;

const YES: u32 = 5;
const NO: u32 = 7;

fn cfg_tiny(tied: bool) -> Qwen3Config {
    Qwen3Config::tiny(64, 16, 32, 2, 4, 2, 8, tied)
}

fn tiny(tied: bool, seed: u64) -> Qwen3 {
    model::random(&cfg_tiny(tied), seed, DType::F32, &Device::Cpu, false).unwrap()
}

/// A token store of `queries × per_query` prompts with ids in 8..64, lengths 4..12, relevance
/// 1..3 and labels from relevance, deterministic in `seed`.
fn store(queries: usize, per_query: usize, seed: u64) -> TokenStore {
    let mut s = TokenStore::default();
    s.offsets.push(0);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for q in 0..queries {
        for _ in 0..per_query {
            let len = 4 + (next() % 9) as usize;
            s.ids.extend((0..len).map(|_| 8 + (next() % 56) as u32));
            s.offsets.push(s.ids.len() as i64);
            let rel = [1.0f32, 1.67, 2.0, 2.33, 3.0][(next() % 5) as usize];
            s.relevance.push(rel);
            s.labels.push(u8::from(rel >= 2.33));
            s.query_ids.push(q as u32);
            s.pair_ids.push(s.pair_ids.len() as i64);
        }
    }
    s.queries = (0..queries).map(|q| format!("query {q}")).collect();
    s.validate().unwrap();
    s
}

fn config() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 4,
        grad_accum: 2,
        learning_rate: 1e-2,
        warmup_ratio: 0.2,
        checkpoint_every: 3,
        eval_batch_size: 8,
        bucket_batches: 2,
        ..TrainConfig::default()
    }
}

fn run(
    model: Qwen3,
    cfg: &TrainConfig,
    train: &TokenStore,
    val: &TokenStore,
    scratch: &Path,
) -> Result<train::Outcome, TrainError> {
    let cancel = AtomicBool::new(false);
    let env = RunEnv { scratch, cancel: &cancel, progress: ProgressBar::hidden(), quiet: true };
    train::train(model, YES, NO, DType::F32, cfg, &TrainData { train, val: Some(val), matching: None }, &env)
}

fn values(m: &Qwen3) -> BTreeMap<String, Vec<f32>> {
    m.params()
        .iter()
        .map(|(k, t)| (k.to_string(), t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn lora(dropout: f32) -> Mode {
    Mode::Lora(LoraConfig { r: 4, alpha: 8.0, dropout, target_modules: vec!["q_proj".into(), "v_proj".into()] })
}

#[test]
fn full_finetuning_changes_every_parameter_tensor() {
    for tied in [true, false] {
        let start = tiny(tied, 1);
        let before = values(&start);
        let dir = tempfile::tempdir().unwrap();
        let out = run(start, &config(), &store(6, 4, 1), &store(3, 4, 2), dir.path()).unwrap();
        let after = values(&out.model);
        assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
        for (name, b) in &before {
            assert!(max_diff(b, &after[name]) > 0.0, "tied={tied}: `{name}` did not change");
        }
        assert_eq!(out.summary.steps, 2 * 3); // 24 rows / 4 = 6 micro-batches → 3 steps per epoch
        assert_eq!(out.summary.validations.len(), 2);
    }
}

#[test]
fn frozen_embeddings_stay_put() {
    let start = tiny(true, 1);
    let before = values(&start);
    let cfg = TrainConfig { freeze_embeddings: true, ..config() };
    let dir = tempfile::tempdir().unwrap();
    let out = run(start, &cfg, &store(6, 4, 1), &store(3, 4, 2), dir.path()).unwrap();
    let after = values(&out.model);
    assert_eq!(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]);
    assert_ne!(before["model.norm.weight"], after["model.norm.weight"]);
}

#[test]
fn lora_trains_only_adapters_and_export_merges_them() {
    let start = tiny(true, 3);
    let before = values(&start);
    let cfg = TrainConfig { mode: lora(0.05), weight_decay: 0.1, ..config() };
    let mut learner = Learner::new(start, YES, NO, &cfg, DType::F32).unwrap();
    let names = learner.trainable();
    assert_eq!(names.len(), 2 * 2 * 2, "{names:?}"); // layers × (q, v) × (A, B)
    assert!(names.iter().all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")), "{names:?}");
    let data = store(6, 4, 4);
    for step in 0..4u64 {
        let micro = MicroBatch::pointwise((0..8).map(|r| (r + step as usize * 3) % data.len()).collect(), 8);
        learner.accumulate(&data, &micro, 8, step, false).unwrap();
        learner.apply(1e-2).unwrap();
    }
    // The base weights inside the learner never moved.
    for (name, t) in learner.model().params().iter() {
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), before[name], "{name}");
    }
    let masters = learner.masters().unwrap();
    let exported = values(&learner.export(None, DType::F32).unwrap());
    let scale = 8.0 / 4.0;
    for (name, base) in &before {
        let module = name.trim_end_matches(".weight");
        match masters.get(&format!("{module}.lora_A.weight")) {
            None => assert_eq!(&exported[name], base, "`{name}` has no adapter and must export unchanged"),
            Some(a) => {
                let b = &masters[&format!("{module}.lora_B.weight")];
                assert!(b.data.iter().any(|&x| x != 0.0), "B of {module} never trained");
                let (out_f, r) = (b.shape[0], b.shape[1]);
                let in_f = a.shape[1];
                let mut want = base.clone();
                for o in 0..out_f {
                    for i in 0..in_f {
                        let ba: f32 = (0..r).map(|k| b.data[o * r + k] * a.data[k * in_f + i]).sum();
                        want[o * in_f + i] += scale * ba;
                    }
                }
                assert!(max_diff(&exported[name], &want) < 1e-6, "{name}");
                assert!(max_diff(&exported[name], base) > 0.0, "{name} should differ from the base");
            }
        }
    }
}

/// The gradients of 4 micro-batches of 2, accumulated, equal one batch of 8 (mean loss over 8).
#[test]
fn accumulating_2x4_gives_the_gradient_of_one_batch_of_8() {
    let data = store(4, 4, 9);
    let rows: Vec<usize> = vec![0, 3, 5, 6, 9, 10, 12, 15];
    for loss in [LossKind::Bce, LossKind::Mse] {
        let cfg = TrainConfig { loss, ..config() };
        let mut big = Learner::new(tiny(true, 5), YES, NO, &cfg, DType::F32).unwrap();
        big.accumulate(&data, &MicroBatch::pointwise(rows.clone(), 8), 8, 0, false).unwrap();
        let mut small = Learner::new(tiny(true, 5), YES, NO, &cfg, DType::F32).unwrap();
        let mut total = 0.0;
        for (k, pair) in rows.chunks(2).enumerate() {
            total +=
                small.accumulate(&data, &MicroBatch::pointwise(pair.to_vec(), 2), 8, k as u64, false).unwrap().loss;
        }
        let (gb, gs) = (big.gradients().unwrap(), small.gradients().unwrap());
        let mut nonzero = 0;
        for (name, g) in &gb {
            let d = max_diff(g, &gs[name]);
            assert!(d <= 1e-5, "{loss:?} {name}: max diff {d}");
            nonzero += usize::from(g.iter().any(|&x| x != 0.0));
        }
        assert_eq!(nonzero, gb.len(), "every parameter gets a gradient");
        // And the summed micro-batch losses are the mean over the 8 rows.
        let mut again = Learner::new(tiny(true, 5), YES, NO, &cfg, DType::F32).unwrap();
        let one = again.accumulate(&data, &MicroBatch::pointwise(rows.clone(), 8), 8, 0, false).unwrap().loss;
        assert!((one - total).abs() < 1e-6, "{one} vs {total}");
    }
}

/// After one step Adam's first moment is 0.1 · clipped gradient: the clip factor is exactly
/// max_norm / ‖g‖, so the clipped gradient has norm max_norm.
#[test]
fn clipping_scales_the_global_norm_to_the_limit() {
    let data = store(4, 4, 11);
    let micro = MicroBatch::pointwise((0..8).collect(), 8);
    let mut probe = Learner::new(tiny(false, 2), YES, NO, &config(), DType::F32).unwrap();
    probe.accumulate(&data, &micro, 8, 0, false).unwrap();
    let norm = probe.gradients().unwrap().values().flatten().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let limit = norm / 4.0;
    let cfg = TrainConfig { max_grad_norm: limit, ..config() };
    let mut l = Learner::new(tiny(false, 2), YES, NO, &cfg, DType::F32).unwrap();
    l.accumulate(&data, &micro, 8, 0, false).unwrap();
    let report = l.apply(1e-3).unwrap();
    assert!((report.grad_norm - norm).abs() < 1e-6 * norm, "{} vs {norm}", report.grad_norm);
    let state = l.state_tensors().unwrap();
    let clipped: f64 = state
        .iter()
        .filter(|(k, _)| k.starts_with("m/"))
        .flat_map(|(_, t)| &t.data)
        .map(|&m| (m as f64 / 0.1).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((clipped - limit).abs() < 1e-4 * limit, "clipped norm {clipped} vs limit {limit}");
}

#[test]
fn loss_falls_when_overfitting_one_fixed_batch() {
    let data = store(2, 4, 21);
    for (loss, mode) in [
        (LossKind::Bce, Mode::Full),
        (LossKind::Mse, Mode::Full),
        (LossKind::Pairwise, Mode::Full),
        (LossKind::Bce, lora(0.0)),
    ] {
        let cfg = TrainConfig { loss, mode: mode.clone(), ..config() };
        let mut l = Learner::new(tiny(true, 4), YES, NO, &cfg, DType::F32).unwrap();
        let rows: Vec<usize> = (0..8).collect();
        let units = if loss == LossKind::Pairwise { pipe::train::data::pairs(&data, &rows).len() } else { 8 };
        let micro = MicroBatch::pointwise(rows, units);
        let mut losses = Vec::new();
        // With LoRA the head rows stay frozen, and for a random model ‖w_yes − w_no‖ is tiny, so
        // |logit| ≤ ‖norm(h)‖·‖w_yes − w_no‖ ≈ 0.45 bounds how far BCE can fall (to ≈ 0.49); the
        // adapters must still reach that floor and separate the batch perfectly.
        let bar = if matches!(mode, Mode::Full) { 0.3 } else { 0.75 };
        for step in 0..40 {
            losses.push(l.accumulate(&data, &micro, units, step, false).unwrap().loss);
            l.apply(1e-2).unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < bar * first, "{loss:?} {mode:?}: loss {first} → {last}");
        if loss == LossKind::Bce {
            let logits = l.logits(&data, &micro.rows, 8).unwrap();
            for (&r, x) in micro.rows.iter().zip(&logits) {
                assert_eq!(*x > 0.0, data.labels[r] == 1, "{mode:?}: row {r} logit {x}");
            }
        }
    }
}

#[test]
fn group_losses_fall_when_overfitting_one_fixed_batch() {
    // 4 queries of 6 candidates; group_ce on groups of 4 (short groups padded), lambda on whole queries.
    let data = store(4, 6, 23);
    for loss in [LossKind::GroupCe, LossKind::Lambda] {
        let lists = pipe::train::data::eval_lists(&data, loss, 4);
        assert!(lists.len() >= 3, "{loss:?}: the fixture needs several lists, got {}", lists.len());
        if loss == LossKind::GroupCe {
            assert!(lists.iter().any(|l| l.len() < 4), "the fixture must pad a group");
        }
        let micro = MicroBatch::listwise(&lists);
        let cfg = TrainConfig { loss, group_size: 4, ..config() };
        let mut l = Learner::new(tiny(true, 4), YES, NO, &cfg, DType::F32).unwrap();
        let mut losses = Vec::new();
        for step in 0..40 {
            losses.push(l.accumulate(&data, &micro, micro.units, step, false).unwrap().loss);
            l.apply(1e-2).unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < 0.3 * first, "{loss:?}: loss {first} → {last}");
        if loss == LossKind::GroupCe {
            // Learned means ranked: every group's positive now scores above its negatives.
            let logits = l.logits(&data, &micro.rows, 8).unwrap();
            for list in &micro.lists {
                assert!(list[1..].iter().all(|&n| logits[list[0]] > logits[n]), "{list:?}: {logits:?}");
            }
        }
    }
}

#[test]
fn group_losses_resume_with_the_same_groups_and_order() {
    let (train_data, val) = (store(8, 5, 33), store(3, 5, 34));
    for loss in [LossKind::GroupCe, LossKind::Lambda] {
        // batch_size counts groups or queries; at least 6 steps so that step 5 is mid-run.
        let batch_size = if loss == LossKind::Lambda { 1 } else { 2 };
        let cfg = TrainConfig { loss, group_size: 3, batch_size, eval_every: 2, ..config() };
        let whole_dir = tempfile::tempdir().unwrap();
        let whole = run(tiny(true, 6), &cfg, &train_data, &val, whole_dir.path()).unwrap();
        assert!(whole.summary.steps >= 6, "{loss:?}: {} steps", whole.summary.steps);

        let dir = tempfile::tempdir().unwrap();
        let faulty = TrainConfig { fault: Some(Fault::StopAfter(5)), ..cfg.clone() };
        let err = run(tiny(true, 6), &faulty, &train_data, &val, dir.path()).err().expect("the fault stops the run");
        assert!(matches!(err, TrainError::Injected(5)), "{err}");
        let resumed = run(tiny(true, 6), &cfg, &train_data, &val, dir.path()).unwrap();
        assert_eq!(resumed.summary.resumed_from, Some(5), "{loss:?}");
        assert_same_weights(&resumed.model, &whole.model, 1e-6);
        let log = log_without_timing(&whole.log);
        assert_eq!(log_without_timing(&resumed.log), log, "{loss:?}");
        if loss == LossKind::GroupCe {
            // The step-0 line counts the groups and the queries that had none.
            let items = pipe::train::data::Items::new(&train_data, loss, 3);
            assert_eq!(log[0]["step"], 0);
            assert_eq!(log[0]["groups"], items.len());
            assert_eq!(log[0]["queries_skipped_no_positive"], items.skipped_no_positive);
            assert_eq!(whole.summary.skipped_no_positive, items.skipped_no_positive);
            assert!(items.skipped_no_positive > 0, "the fixture must have a query without a positive");
        }
        // Another seed draws other groups and another order, so the weights differ.
        let other_dir = tempfile::tempdir().unwrap();
        let other =
            run(tiny(true, 6), &TrainConfig { seed: 7, ..cfg.clone() }, &train_data, &val, other_dir.path()).unwrap();
        let (a, b) = (values(&other.model), values(&whole.model));
        assert!(a.iter().any(|(k, v)| max_diff(v, &b[k]) > 1e-6), "{loss:?}: the seed must matter");
    }
}

fn assert_same_weights(a: &Qwen3, b: &Qwen3, tol: f32) {
    let (va, vb) = (values(a), values(b));
    for (name, x) in &va {
        let d = max_diff(x, &vb[name]);
        assert!(d <= tol, "`{name}` differs by {d}");
    }
}

/// Log lines without their timing fields, which differ between runs.
fn log_without_timing(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !k.ends_with("_per_sec"));
            v
        })
        .collect()
}

#[test]
fn stopping_at_a_step_and_resuming_equals_an_uninterrupted_run() {
    let (train_data, val) = (store(8, 4, 31), store(3, 4, 32));
    for mode in [Mode::Full, lora(0.1)] {
        let cfg =
            TrainConfig { mode: mode.clone(), eval_every: 2, best_metric: pipe::train::BestMetric::ValAuc, ..config() };
        let whole_dir = tempfile::tempdir().unwrap();
        let whole = run(tiny(true, 6), &cfg, &train_data, &val, whole_dir.path()).unwrap();
        assert_eq!(whole.summary.resumed_from, None);

        // Stop right after step 5 (between checkpoints 3 and 6, in the second epoch's first step
        // but one), then run again in the same scratch dir.
        let dir = tempfile::tempdir().unwrap();
        let faulty = TrainConfig { fault: Some(Fault::StopAfter(5)), ..cfg.clone() };
        let err = run(tiny(true, 6), &faulty, &train_data, &val, dir.path()).err().expect("the fault stops the run");
        assert!(matches!(err, TrainError::Injected(5)), "{err}");
        assert!(dir.path().join("checkpoint.safetensors").is_file());
        let resumed = run(tiny(true, 6), &cfg, &train_data, &val, dir.path()).unwrap();
        assert_eq!(resumed.summary.resumed_from, Some(5), "{mode:?}");
        assert_eq!(resumed.summary.steps, whole.summary.steps);
        assert_same_weights(&resumed.model, &whole.model, 1e-6);
        assert_eq!(resumed.summary.best.map(|b| b.step), whole.summary.best.map(|b| b.step));
        assert_eq!(log_without_timing(&resumed.log), log_without_timing(&whole.log), "{mode:?}");
    }
}

#[test]
fn a_nan_loss_fails_with_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { fault: Some(Fault::NanLoss(5)), checkpoint_every: 2, ..config() };
    let err = run(tiny(true, 1), &cfg, &store(8, 4, 1), &store(2, 4, 2), dir.path()).err().expect("NaN must fail");
    match &err {
        TrainError::NonFinite { step, what, last_checkpoint, .. } => {
            assert_eq!((*step, *what, *last_checkpoint), (5, "loss", Some(4)));
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("step 5") && text.contains("checkpoint (step 4)"), "{text}");
    let (_, state): (BTreeMap<String, train::checkpoint::HostTensor>, serde_json::Value) =
        train::checkpoint::read(&dir.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(state["step"], 4);
    // Without the fault the next run resumes from there and finishes.
    let ok =
        run(tiny(true, 1), &TrainConfig { fault: None, ..cfg }, &store(8, 4, 1), &store(2, 4, 2), dir.path()).unwrap();
    assert_eq!(ok.summary.resumed_from, Some(4));
}

#[test]
fn the_log_records_the_schedule_and_validations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig { eval_every: 2, ..config() };
    let out = run(tiny(true, 1), &cfg, &store(6, 4, 1), &store(3, 4, 2), dir.path()).unwrap();
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out.log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let vals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("val_loss").is_some()).collect();
    assert_eq!(steps.len(), 6);
    let schedule = pipe::train::Schedule::new(1e-2, 0.2, 6);
    for (k, l) in steps.iter().enumerate() {
        assert_eq!(l["step"], k as u64 + 1);
        assert!((l["lr"].as_f64().unwrap() - schedule.lr(k as u64)).abs() < 1e-15);
        for key in ["epoch", "loss", "grad_norm", "samples_per_sec", "tokens_per_sec"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key} in {l}");
        }
    }
    // Steps 2, 4, 6 (every 2) — 3 and 6 are also the epoch ends: 3 and 6 once each.
    let at: Vec<u64> = vals.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(at, vec![2, 3, 4, 6]);
    for v in vals {
        assert!(v["val_auc"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{v}");
        assert!(v["val_ndcg@10"].as_f64().is_some(), "{v}");
    }
}

#[test]
fn early_stopping_ends_training_after_patience_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    // A learning rate of 0 never improves the validation loss after the first validation.
    let cfg = TrainConfig { learning_rate: 0.0, eval_every: 1, early_stopping: 2, epochs: 5, ..config() };
    let out = run(tiny(true, 1), &cfg, &store(6, 4, 1), &store(3, 4, 2), dir.path()).unwrap();
    assert!(out.summary.stopped_early);
    assert_eq!(out.summary.steps, 3);
    assert_eq!(out.summary.best.unwrap().step, 1);
}

// ---------------------------------------------------------------------------------------------
// Through the binary.

/// A small Home-Depot-shaped CSV: 30 queries × 4 products, with descriptions.
fn small_project() -> Project {
    let p = Project::new();
    let mut train = String::from("\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n");
    let mut desc = String::from("\"product_uid\",\"product_description\"\n");
    let words = ["angle", "bracket", "deck", "shower", "faucet", "paint", "drill", "lamp", "hose", "tile"];
    for q in 0..30 {
        for k in 0..4 {
            let id = q * 4 + k;
            let uid = 100_000 + id;
            let title = format!("{} {} {} model {id}", words[(q + k) % 10], words[(q * 3 + k) % 10], words[k % 10]);
            let rel = ["1", "1.67", "2.33", "3"][(q + k) % 4];
            train.push_str(&format!("{id},{uid},\"{title}\",\"{} {}\",{rel}\n", words[q % 10], words[(q + 1) % 10]));
            desc.push_str(&format!("{uid},\"A sturdy {title} for home use.\"\n"));
        }
    }
    p.write("data/train.csv", &train);
    p.write("data/product_descriptions.csv", &desc);
    p.write(
        "pipelines/p.toml",
        &format!(
            "{}{}",
            util::SAMPLE_PIPELINE,
            r#"
[stages.tokenize]
kind = "tokenize"
needs = ["split"]
max_length = 96

[stages.train]
kind = "train"
needs = ["tokenize"]
model = "random"
device = "cpu"
epochs = 2
batch_size = 4
grad_accum = 2
learning_rate = 1e-3
checkpoint_every = 1
eval_every = 4

[stages.train.init]
hidden_size = 16
intermediate_size = 32
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 8
"#
        ),
    );
    p
}

fn artifact_dirs(p: &Project, kind: &str) -> Vec<PathBuf> {
    std::fs::read_dir(p.path(&format!("artifacts/{kind}")))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default()
}

fn scratch_checkpoint(p: &Project) -> Option<PathBuf> {
    std::fs::read_dir(p.path("artifacts/.scratch"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("checkpoint.safetensors"))
        .find(|c| c.is_file())
}

fn trained_model(p: &Project) -> Qwen3 {
    let dirs = artifact_dirs(p, "train");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = dirs[0].join("model");
    assert!(dir.join("tokenizer.json").is_file());
    assert!(dirs[0].join("train_log.jsonl").is_file());
    model::load(&model::ModelSource::Dir(dir), &pipe::hub::HubSettings::from_env(), &model::LoadOptions::default())
        .unwrap()
}

#[test]
fn the_train_stage_runs_through_the_engine_and_its_model_loads_back() {
    let p = small_project();
    let v = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    let train_stage = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "train").unwrap().clone();
    assert_eq!(train_stage["status"], "ran", "{v}");
    let m = trained_model(&p);
    assert_eq!(m.config().hidden_size, 16);
    assert_eq!(m.config().vocab_size, 151_669);
    // The manifest carries the metrics `pipe compare` and analyze read.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(artifact_dirs(&p, "train")[0].join("manifest.json")).unwrap()).unwrap();
    for k in ["val_loss", "val_auc", "val_ndcg@10", "train_seconds", "samples_per_sec", "steps", "best_step"] {
        assert!(manifest["metrics"][k].is_number(), "metric {k} missing: {}", manifest["metrics"]);
    }
    // Success removes the scratch dir; a second run is cached.
    assert!(scratch_checkpoint(&p).is_none());
    let again = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(again["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{again}");

    // The token-matching loss finds the query and document in the real prompts and is logged.
    let matched = p.run_json(&["run", "pipelines/p.toml", "--set", "train.match_loss=1.0", "--json"]);
    let status =
        |id: &str| matched["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["status"].clone();
    assert_eq!((status("tokenize"), status("train")), ("cached".into(), "ran".into()), "{matched}");
    let dir = artifact_dirs(&p, "train")
        .into_iter()
        .find(|d| std::fs::read_to_string(d.join("train_log.jsonl")).is_ok_and(|l| l.contains("match_loss")));
    let log = log_without_timing(&dir.expect("a train artifact with match_loss").join("train_log.jsonl"));
    let steps: Vec<f64> = log.iter().filter_map(|l| l.get("match_loss").and_then(|v| v.as_f64())).collect();
    assert!(!steps.is_empty() && steps.iter().all(|m| *m > 0.0 && m.is_finite()), "{steps:?}");
}

#[test]
fn a_nan_loss_fails_the_stage_cleanly_through_the_binary() {
    let p = small_project();
    let out = p.pipe_env(&["run", "pipelines/p.toml"], &[("PIPE_TRAIN_FAULT", "nan_loss@3")]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("step 3") && out.stderr.contains("not finite"), "{out}");
    assert!(artifact_dirs(&p, "train").is_empty(), "no artifact may be stored");
    let ckpt = scratch_checkpoint(&p).expect("the last good checkpoint is kept");
    let (_, state): (BTreeMap<String, train::checkpoint::HostTensor>, serde_json::Value) =
        train::checkpoint::read(&ckpt).unwrap();
    assert_eq!(state["step"], 2);
}

/// Stops the pipeline mid-training twice — SIGABRT right after step 5, and SIGKILL as soon as a
/// first checkpoint exists — reruns it each time and compares the weights with an uninterrupted
/// run in another project.
#[test]
fn kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run() {
    let whole = small_project();
    whole.ok(&["run", "pipelines/p.toml", "--quiet"]);
    let reference = trained_model(&whole);

    // Deterministic variant: abort (SIGABRT, no cleanup) right after step 5.
    let p = small_project();
    let out = p.pipe_env(&["run", "pipelines/p.toml", "--quiet"], &[("PIPE_TRAIN_FAULT", "abort@5")]);
    assert_ne!(out.code, 0, "{out}");
    assert!(scratch_checkpoint(&p).is_some());
    let out = p.ok(&["run", "pipelines/p.toml"]);
    assert!(out.stderr.contains("resuming training from step 5"), "{out}");
    assert_same_weights(&trained_model(&p), &reference, 1e-6);
    assert_same_event_steps(&p, &whole);

    // A real kill -9 at whatever step the run has reached.
    let p = small_project();
    let mut child =
        p.command(&["run", "pipelines/p.toml", "--quiet"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_secs(120) {
        if scratch_checkpoint(&p).is_some() {
            child.kill().unwrap(); // SIGKILL
            killed = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.wait();
    if !killed {
        eprintln!("note: the run finished before it could be killed; only the abort variant was checked");
        return;
    }
    let out = p.ok(&["run", "pipelines/p.toml"]);
    assert!(out.stderr.contains("resuming training from step"), "{out}");
    assert_same_weights(&trained_model(&p), &reference, 1e-6);
    assert_same_event_steps(&p, &whole);
}

/// The resumed run's TensorBoard file in its artifact has each (tag, step) once, the same ones as
/// the uninterrupted run's.
fn assert_same_event_steps(p: &Project, whole: &Project) {
    let keys = |p: &Project| -> Vec<(String, i64)> {
        let dir = artifact_dirs(p, "train").pop().unwrap().join("tensorboard");
        event_scalars(&dir).into_iter().map(|(t, s, _)| (t, s)).collect()
    };
    let got = keys(p);
    let unique: std::collections::BTreeSet<_> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "a (tag, step) appears twice: {got:?}");
    assert_eq!(got, keys(whole));
}

/// `recompute` changes how gradients are computed, not what: a run that dies (as one that ran out
/// of memory would) resumes from its checkpoint with recomputation switched on and ends with the
/// weights of an uninterrupted run, and switching it back reuses the artifact instead of retraining.
#[test]
fn switching_recompute_on_resumes_the_same_run_and_keeps_the_cache() {
    let whole = small_project();
    whole.ok(&["run", "pipelines/p.toml", "--quiet"]);
    let reference = trained_model(&whole);

    let p = small_project();
    let out = p.pipe_env(&["run", "pipelines/p.toml", "--quiet"], &[("PIPE_TRAIN_FAULT", "stop@4")]);
    assert_eq!(out.code, 1, "{out}");
    let out = p.ok(&["run", "pipelines/p.toml", "--set", "train.recompute=true"]);
    assert!(out.stderr.contains("resuming training from step 4"), "{out}");
    assert_same_weights(&trained_model(&p), &reference, 1e-6);
    for value in ["false", "true"] {
        let again = p.run_json(&["run", "pipelines/p.toml", "--json", "--set", &format!("train.recompute={value}")]);
        assert!(again["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{value}: {again}");
    }
    // The artifact's key is the one the plain pipeline computes.
    let dirs = artifact_dirs(&p, "train");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_eq!(dirs[0].file_name(), artifact_dirs(&whole, "train")[0].file_name());
}

/// The GPU's optimizer path (f32 tensors, tensor ops, scattered embedding rows) run on the CPU
/// gives the weights of the host path: the two implementations check each other.
#[test]
fn tensor_and_host_optimizer_backends_agree() {
    use pipe::train::OptimizerBackend;
    let (train_data, val) = (store(6, 4, 41), store(2, 4, 42));
    for (mode, tied) in [(Mode::Full, true), (Mode::Full, false), (lora(0.1), true)] {
        let mut out = Vec::new();
        for backend in [OptimizerBackend::Host, OptimizerBackend::Tensor] {
            let cfg = TrainConfig { mode: mode.clone(), backend, ..config() };
            let dir = tempfile::tempdir().unwrap();
            out.push(run(tiny(tied, 8), &cfg, &train_data, &val, dir.path()).unwrap());
        }
        assert_same_weights(&out[0].model, &out[1].model, 2e-5);
        assert_eq!(out[0].summary.steps, out[1].summary.steps);
    }
    // bf16 compute: the device backend accumulates widened gradients without aliasing them.
    let cancel = AtomicBool::new(false);
    let mut out = Vec::new();
    for backend in [OptimizerBackend::Host, OptimizerBackend::Tensor] {
        let cfg = TrainConfig { backend, ..config() };
        let dir = tempfile::tempdir().unwrap();
        let env = RunEnv { scratch: dir.path(), cancel: &cancel, progress: ProgressBar::hidden(), quiet: true };
        let data = TrainData { train: &train_data, val: Some(&val), matching: None };
        let Ok(o) = train::train(tiny(true, 8), YES, NO, DType::BF16, &cfg, &data, &env) else { panic!("bf16 run") };
        out.push(o);
    }
    assert_same_weights(&out[0].model, &out[1].model, 1e-5);
}

/// bf16 and f16 compute keep f32 master weights (values a 16-bit float cannot hold) and still
/// learn; f16 goes through the dynamic loss scaler.
#[test]
fn mixed_precision_trains_with_f32_masters() {
    let data = store(2, 4, 21);
    for dtype in [DType::BF16, DType::F16] {
        let mut l = Learner::new(tiny(true, 4), YES, NO, &config(), dtype).unwrap();
        assert_eq!(l.model().dtype(), dtype);
        assert_eq!(l.loss_scaler().is_some(), dtype == DType::F16);
        let micro = MicroBatch::pointwise((0..8).collect(), 8);
        let mut losses = Vec::new();
        for step in 0..30 {
            losses.push(l.accumulate(&data, &micro, 8, step, false).unwrap().loss);
            assert!(!l.apply(1e-2).unwrap().skipped, "{dtype:?} step {step} overflowed");
        }
        assert!(losses[29] < 0.5 * losses[0], "{dtype:?}: {} → {}", losses[0], losses[29]);
        let masters = l.masters().unwrap();
        let w = &masters["model.layers.0.mlp.up_proj.weight"].data;
        let off_grid = w
            .iter()
            .filter(|&&x| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_f32() != x,
                _ => half::f16::from_f32(x).to_f32() != x,
            })
            .count();
        assert!(off_grid > w.len() / 2, "{dtype:?}: masters look rounded to 16 bits ({off_grid}/{})", w.len());
        let exported = l.export(None, dtype).unwrap();
        assert_eq!(exported.dtype(), dtype);
    }
}

/// pipe's AdamW and clipping replay torch.optim.AdamW + clip_grad_norm_ (fixture written by
/// tests/fixtures/train/adamw_torch.py): two weight-decay groups, a changing learning rate, some
/// steps clipped.
#[test]
fn adamw_and_clipping_match_torch() {
    use pipe::train::optim::{adamw_dense, clip_factor, sum_squares, StepScalars};
    let text = std::fs::read_to_string(util::repo().join("tests/fixtures/train/adamw_torch.json")).unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vec = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let mut p: Vec<Vec<f32>> = fx["init"].as_array().unwrap().iter().map(vec).collect();
    let mut m: Vec<Vec<f32>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
    let mut v = m.clone();
    let wd: Vec<f64> = fx["weight_decay"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let mut clipped = 0;
    for (t, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let grads: Vec<Vec<f32>> = step["grads"].as_array().unwrap().iter().map(vec).collect();
        let norm = grads.iter().map(|g| sum_squares(g)).sum::<f64>().sqrt();
        let want_norm = step["norm"].as_f64().unwrap();
        assert!((norm - want_norm).abs() < 1e-5 * want_norm, "step {t}: norm {norm} vs {want_norm}");
        let coef = clip_factor(norm, 1.0);
        clipped += usize::from(coef < 1.0);
        for i in 0..p.len() {
            let s = StepScalars::new(&Default::default(), step["lr"].as_f64().unwrap(), wd[i], t as u64 + 1, coef);
            adamw_dense(&mut p[i], &mut m[i], &mut v[i], &grads[i], &s);
            let d = max_diff(&p[i], &vec(&step["params"][i]));
            assert!(d < 1e-6, "step {t} param {i}: max diff {d}");
        }
    }
    assert!((2..6).contains(&clipped), "the fixture should mix clipped and unclipped steps ({clipped})");
    for i in 0..p.len() {
        assert!(max_diff(&m[i], &vec(&fx["exp_avg"][i])) < 1e-7);
        assert!(max_diff(&v[i], &vec(&fx["exp_avg_sq"][i])) < 1e-7);
    }
}

/// Recomputing activations layer by layer changes how gradients are computed, not their values:
/// for full fine-tuning (tied and untied heads, frozen embeddings) and LoRA with dropout (each
/// layer replays the masks it drew), accumulated over two micro-batches, the gradients are the
/// same bit for bit, every one of them non-zero (but LoRA's A, zero while B is); whole runs end
/// with the same weights.
#[test]
fn recomputing_activations_gives_the_same_gradients_and_weights() {
    let data = store(4, 4, 13);
    let cases = [
        (Mode::Full, true, false),
        (Mode::Full, false, false),
        (Mode::Full, true, true),
        (lora(0.2), true, false),
        (lora(0.2), false, false),
    ];
    for (mode, tied, freeze) in cases {
        let mut grads = Vec::new();
        for recompute in [false, true] {
            let cfg = TrainConfig { mode: mode.clone(), freeze_embeddings: freeze, recompute, ..config() };
            let mut l = Learner::new(tiny(tied, 21), YES, NO, &cfg, DType::F32).unwrap();
            let mut loss = 0.0;
            for (k, rows) in [vec![0, 3, 5, 6], vec![9, 10, 12, 15]].into_iter().enumerate() {
                loss += l.accumulate(&data, &MicroBatch::pointwise(rows, 4), 8, k as u64, false).unwrap().loss;
            }
            grads.push((loss, l.gradients().unwrap()));
        }
        let what = format!("{mode:?} tied={tied} freeze={freeze}");
        assert_eq!(grads[0].0, grads[1].0, "{what}: loss");
        assert_eq!(grads[0].1.keys().collect::<Vec<_>>(), grads[1].1.keys().collect::<Vec<_>>());
        for (name, g) in &grads[0].1 {
            // LoRA's B starts at zero, so A's first gradient is zero whatever the path.
            if !name.contains("lora_A") {
                assert!(g.iter().any(|&x| x != 0.0), "{what}: `{name}` has no gradient");
            }
            assert_eq!(max_diff(g, &grads[1].1[name]), 0.0, "{what}: `{name}` differs with recomputation");
        }
    }
    let (train_data, val) = (store(6, 4, 43), store(2, 4, 44));
    let mut out = Vec::new();
    for recompute in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainConfig { mode: lora(0.1), recompute, ..config() };
        out.push(run(tiny(true, 9), &cfg, &train_data, &val, dir.path()).unwrap());
    }
    assert_same_weights(&out[0].model, &out[1].model, 0.0);
}

/// Prompts shaped like the reranker's: prefix [1, 2], query marker [3, 4], query, document
/// marker [3, 6], document, suffix [2]; about half of each document's tokens come from its query.
fn marked_store(n: usize, seed: u64) -> (TokenStore, train::Matching) {
    let mut s = TokenStore::default();
    s.offsets.push(0);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..n {
        let query: Vec<u32> = (0..3).map(|_| 8 + (next() % 56) as u32).collect();
        let doc: Vec<u32> = (0..4)
            .map(|_| if next() % 2 == 0 { query[(next() % 3) as usize] } else { 8 + (next() % 56) as u32 })
            .collect();
        s.ids.extend([1, 2, 3, 4]);
        s.ids.extend(&query);
        s.ids.extend([3, 6]);
        s.ids.extend(&doc);
        s.ids.push(2);
        s.offsets.push(s.ids.len() as i64);
        let overlap = doc.iter().filter(|t| query.contains(t)).count();
        s.relevance.push(1.0 + overlap as f32 / 2.0);
        s.labels.push(u8::from(overlap >= 2));
        s.query_ids.push(i as u32);
        s.pair_ids.push(i as i64);
    }
    s.queries = (0..n).map(|q| format!("query {q}")).collect();
    s.validate().unwrap();
    (s, train::Matching::new(vec![3, 4], vec![3, 6], 2, 1).unwrap())
}

#[test]
fn the_match_loss_is_learned_and_kept_out_of_the_reported_loss() {
    let (data, matching) = marked_store(16, 3);
    let rows: Vec<usize> = (0..16).collect();
    let micro = MicroBatch::pointwise(rows.clone(), 16);
    let plain_cfg = config();
    let cfg = TrainConfig { match_loss: 1.0, ..config() };
    let mut plain = Learner::new(tiny(true, 5), YES, NO, &plain_cfg, DType::F32).unwrap();
    let mut l = Learner::new(tiny(true, 5), YES, NO, &cfg, DType::F32).unwrap();
    l.set_matching(matching.clone());

    // Same weights, same batch: the reported loss is the relevance loss alone, and the match
    // loss is the per-prompt mean BCE of the head read at each document token.
    let a = plain.accumulate(&data, &micro, 16, 0, false).unwrap();
    let b = l.accumulate(&data, &micro, 16, 0, false).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
    assert_eq!(a.match_loss, 0.0);
    assert!(b.match_loss > 0.1, "{}", b.match_loss);
    // ...and it adds a gradient: the two learners' updates differ.
    plain.apply(1e-2).unwrap();
    l.apply(1e-2).unwrap();
    let (pa, pb) = (values(plain.model()), values(l.model()));
    assert!(pa.iter().any(|(k, v)| max_diff(v, &pb[k]) > 0.0));

    let mut losses = vec![b.match_loss];
    for step in 1..40 {
        losses.push(l.accumulate(&data, &micro, 16, step, false).unwrap().match_loss);
        l.apply(1e-2).unwrap();
    }
    let last = *losses.last().unwrap();
    assert!(last < 0.5 * losses[0], "match loss {} → {last}", losses[0]);
}

#[test]
fn the_match_loss_works_with_every_loss() {
    // The match loss reads the yes/no logit as a column of a [rows, tokens] view; every loss must
    // accept it (group_ce's gather once refused the non-contiguous view on the full data).
    let (mut data, matching) = marked_store(16, 11);
    for (i, q) in data.query_ids.iter_mut().enumerate() {
        *q = (i / 4) as u32; // 4 queries of 4 candidates, so lists and pairs exist
    }
    data.queries = (0..4).map(|q| format!("query {q}")).collect();
    for (i, l) in data.labels.iter_mut().enumerate() {
        *l = u8::from(i % 4 == 0); // one positive per query
    }
    data.validate().unwrap();
    for loss in [LossKind::Bce, LossKind::Mse, LossKind::Pairwise, LossKind::GroupCe, LossKind::Lambda] {
        let micro = match loss {
            LossKind::GroupCe | LossKind::Lambda => {
                MicroBatch::listwise(&pipe::train::data::eval_lists(&data, loss, 3))
            }
            _ => MicroBatch::pointwise((0..16).collect(), 16),
        };
        let plain_cfg = TrainConfig { loss, group_size: 3, ..config() };
        let cfg = TrainConfig { match_loss: 1.0, ..plain_cfg.clone() };
        let mut plain = Learner::new(tiny(true, 5), YES, NO, &plain_cfg, DType::F32).unwrap();
        let mut l = Learner::new(tiny(true, 5), YES, NO, &cfg, DType::F32).unwrap();
        l.set_matching(matching.clone());
        let a = plain.accumulate(&data, &micro, micro.units, 0, false).unwrap();
        let b = l.accumulate(&data, &micro, micro.units, 0, false).unwrap_or_else(|e| panic!("{loss:?}: {e}"));
        assert!((a.loss - b.loss).abs() < 1e-5, "{loss:?}: {} vs {}", a.loss, b.loss);
        assert!(a.loss > 0.0 && b.match_loss > 0.1, "{loss:?}: {} {}", a.loss, b.match_loss);
        // ...and it is learned alongside every objective.
        let mut losses = vec![b.match_loss];
        l.apply(1e-2).unwrap();
        for step in 1..40 {
            losses.push(l.accumulate(&data, &micro, micro.units, step, false).unwrap().match_loss);
            l.apply(1e-2).unwrap();
        }
        let last = *losses.last().unwrap();
        eprintln!("{loss:?}: match loss {} → {last}", losses[0]);
        assert!(last < 0.5 * losses[0], "{loss:?}: match loss {} → {last}", losses[0]);
    }
}

#[test]
fn the_log_has_the_match_loss_only_when_it_is_on() {
    let (train_data, matching) = marked_store(16, 7);
    let (val, _) = marked_store(8, 8);
    let cancel = AtomicBool::new(false);
    for weight in [0.0, 0.5] {
        let dir = tempfile::tempdir().unwrap();
        let env = RunEnv { scratch: dir.path(), cancel: &cancel, progress: ProgressBar::hidden(), quiet: true };
        let cfg = TrainConfig { match_loss: weight, ..config() };
        let data = TrainData { train: &train_data, val: Some(&val), matching: Some(&matching) };
        let out = train::train(tiny(true, 1), YES, NO, DType::F32, &cfg, &data, &env).unwrap();
        for line in log_without_timing(&out.log).iter().filter(|l| l.get("loss").is_some()) {
            let m = line.get("match_loss").and_then(|v| v.as_f64());
            assert_eq!(m.is_some_and(|v| v > 0.0), weight > 0.0, "{line}");
        }
    }
    let cfg = TrainConfig { match_loss: 1.0, ..config() };
    let dir = tempfile::tempdir().unwrap();
    let env = RunEnv { scratch: dir.path(), cancel: &cancel, progress: ProgressBar::hidden(), quiet: true };
    let data = TrainData { train: &train_data, val: Some(&val), matching: None };
    let Err(err) = train::train(tiny(true, 1), YES, NO, DType::F32, &cfg, &data, &env) else {
        panic!("match_loss without markers must fail")
    };
    assert!(err.to_string().contains("match_loss"), "{err}");
}

/// Full fine-tuning differentiates the decoder layers by hand (`pipe::model::backward`); the
/// accumulated gradient of every trainable tensor must be autograd's, with tied and untied heads,
/// frozen embeddings, recomputation, the match loss, and in bf16.
#[test]
fn the_hand_written_layer_backward_gives_autograds_gradients() {
    let (data, matching) = marked_store(8, 3);
    let cases = [
        (true, false, false, 0.0, DType::F32, 2e-5),
        (false, false, false, 0.0, DType::F32, 2e-5),
        (true, true, true, 0.0, DType::F32, 2e-5),
        (true, false, true, 1.0, DType::F32, 2e-5),
        (false, false, false, 0.0, DType::BF16, 4e-2),
    ];
    for (tied, freeze, recompute, match_loss, dtype, tol) in cases {
        let what = format!("tied={tied} freeze={freeze} recompute={recompute} match_loss={match_loss} {dtype:?}");
        let cfg = TrainConfig { freeze_embeddings: freeze, recompute, match_loss, ..config() };
        let mut grads = Vec::new();
        for autograd in [true, false] {
            let mut l = Learner::new(tiny(tied, 23), YES, NO, &cfg, dtype).unwrap();
            l.set_autograd_layers(autograd);
            if match_loss > 0.0 {
                l.set_matching(matching.clone());
            }
            let mut loss = 0.0;
            for (k, rows) in [vec![0, 3, 5, 6], vec![1, 2, 4, 7]].into_iter().enumerate() {
                loss += l.accumulate(&data, &MicroBatch::pointwise(rows, 4), 8, k as u64, false).unwrap().loss;
            }
            grads.push((loss, l.gradients().unwrap()));
        }
        assert_eq!(grads[0].0, grads[1].0, "{what}: the loss (same forward)");
        assert_eq!(grads[0].1.keys().collect::<Vec<_>>(), grads[1].1.keys().collect::<Vec<_>>());
        for (name, reference) in &grads[0].1 {
            let scale = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            if freeze && name == "model.embed_tokens.weight" {
                continue;
            }
            assert!(scale > 0.0, "{what}: autograd gave `{name}` no gradient");
            let d = max_diff(reference, &grads[1].1[name]);
            assert!(d <= tol * scale, "{what}: `{name}` differs by {d} (scale {scale})");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TensorBoard event files.

/// Tags whose values are timings, which differ between runs.
fn is_timing(tag: &str) -> bool {
    tag.ends_with("_per_sec")
}

/// Every scalar of the run's one event file as (tag, step, value), in file order.
fn event_scalars(events_dir: &Path) -> Vec<(String, i64, f32)> {
    let files = train::tensorboard::event_files(events_dir);
    assert_eq!(files.len(), 1, "one event file per run: {files:?}");
    let events = train::tensorboard::read_events(&files[0]).unwrap();
    assert_eq!(
        events[0].kind,
        train::tensorboard::EventKind::FileVersion(train::tensorboard::FILE_VERSION.into()),
        "the first record names the file version"
    );
    let mut out = Vec::new();
    for e in &events[1..] {
        let train::tensorboard::EventKind::Scalars(values) = &e.kind else { panic!("a second file_version record") };
        out.extend(values.iter().map(|(t, v)| (t.clone(), e.step, *v)));
    }
    out
}

/// The config the committed TensorBoard fixture was written with (see `event_fixture_run`).
fn fixture_config() -> TrainConfig {
    TrainConfig { eval_every: 2, ..config() }
}

fn event_fixture_run(dir: &Path) -> train::Outcome {
    run(tiny(true, 6), &fixture_config(), &store(8, 4, 31), &store(3, 4, 32), dir).unwrap()
}

#[test]
fn a_resumed_run_has_every_step_once_in_its_event_file() {
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = event_fixture_run(whole_dir.path());
    let expected: Vec<(String, i64, f32)> = event_scalars(&whole.events);

    // Stop after step 5 (checkpointed there), then play a process that kept going and died at
    // step 7 without a checkpoint: its steps 6 and 7 are in the event file, not in the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let faulty = TrainConfig { fault: Some(Fault::StopAfter(5)), ..fixture_config() };
    let err = run(tiny(true, 6), &faulty, &store(8, 4, 31), &store(3, 4, 32), dir.path()).err().unwrap();
    assert!(matches!(err, TrainError::Injected(5)), "{err}");
    let events_dir = dir.path().join(train::trainer::EVENTS);
    let file = train::tensorboard::event_files(&events_dir).pop().expect("written while training");
    let mut bytes = std::fs::read(&file).unwrap();
    for step in [6, 7] {
        let e = train::tensorboard::Event {
            wall_time: 0.0,
            step,
            kind: train::tensorboard::EventKind::Scalars(vec![("train/loss".into(), 99.0)]),
        };
        bytes.extend(train::tensorboard::frame(&e.encode()));
    }
    std::fs::write(&file, bytes).unwrap();

    let resumed = event_fixture_run(dir.path());
    assert_eq!(resumed.summary.resumed_from, Some(5));
    let got = event_scalars(&resumed.events);
    let mut seen = std::collections::BTreeSet::new();
    for (tag, step, _) in &got {
        assert!(seen.insert((tag.clone(), *step)), "`{tag}` at step {step} twice");
    }
    assert_eq!(got.len(), expected.len());
    for ((tag, step, v), (etag, estep, ev)) in got.iter().zip(&expected) {
        assert_eq!((tag, step), (etag, estep));
        if !is_timing(tag) {
            assert!((v - ev).abs() <= 1e-6 * ev.abs().max(1.0), "{tag}@{step}: {v} vs {ev}");
        }
    }
}

/// `tests/fixtures/tensorboard/`: an event file this code wrote for `event_fixture_run`, and what
/// TensorBoard's own reader found in it (`read_events.py`, run by hand). pipe must still write the
/// same tags at the same steps with the same values, byte for byte in the same encoding.
#[test]
fn pipe_writes_what_tensorboard_read_from_the_fixture() {
    let fixtures = util::repo().join("tests/fixtures/tensorboard");
    if std::env::var_os("PIPE_WRITE_TENSORBOARD_FIXTURE").is_some() {
        let dir = tempfile::tempdir().unwrap();
        let out = event_fixture_run(dir.path());
        let src = train::tensorboard::event_files(&out.events).pop().unwrap();
        for old in train::tensorboard::event_files(&fixtures) {
            std::fs::remove_file(old).unwrap();
        }
        std::fs::create_dir_all(&fixtures).unwrap();
        std::fs::copy(&src, fixtures.join(src.file_name().unwrap())).unwrap();
        return;
    }
    let read: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("scalars.json")).unwrap()).unwrap();
    let committed = train::tensorboard::event_files(&fixtures).pop().expect("the committed event file");

    // pipe's reader agrees with TensorBoard's on the committed file.
    let mine = event_scalars(&fixtures);
    let tb: Vec<(String, i64, f32)> = read["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(tag, pts)| {
            pts.as_array()
                .unwrap()
                .iter()
                .map(move |p| (tag.clone(), p["step"].as_i64().unwrap(), p["value"].as_f64().unwrap() as f32))
        })
        .collect();
    let mut sorted = mine.clone();
    sorted.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    assert_eq!(sorted, tb, "pipe's reader and TensorBoard's disagree on the committed file");
    assert_eq!(read["file_version"], train::tensorboard::FILE_VERSION);

    // The writer's encoding of those events is the committed bytes.
    let events = train::tensorboard::read_events(&committed).unwrap();
    let encoded: Vec<u8> = events.iter().flat_map(|e| train::tensorboard::frame(&e.encode())).collect();
    assert_eq!(encoded, std::fs::read(&committed).unwrap(), "the encoding changed");

    // The same run today writes the same tags, steps and (timings aside) values.
    let dir = tempfile::tempdir().unwrap();
    let now = event_scalars(&event_fixture_run(dir.path()).events);
    assert_eq!(now.len(), mine.len(), "{now:?}");
    for ((tag, step, v), (etag, estep, ev)) in now.iter().zip(&mine) {
        assert_eq!((tag, step), (etag, estep));
        if !is_timing(tag) {
            assert!((v - ev).abs() <= 1e-5 * ev.abs().max(1.0), "{tag}@{step}: {v} vs {ev}");
        }
    }
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/samples_per_sec",
        "val/loss",
        "val/auc",
        "val/ndcg@10",
    ] {
        assert!(now.iter().any(|(t, _, _)| t == tag), "no `{tag}`");
    }
}

// ---------------------------------------------------------------------------------------------
// `pipe export` of a trained model: the card against the store, rerank on both forms.

#[test]
fn export_writes_a_card_from_the_store_and_both_forms_rerank_alike() {
    let p = small_project();
    let mut text = std::fs::read_to_string(p.path("pipelines/p.toml")).unwrap();
    text.push_str(
        "\n[stages.evaluate]\nkind = \"evaluate\"\nneeds = [\"train\", \"tokenize\", \"split\"]\ndevice = \"cpu\"\n\
         \n[stages.analyze]\nkind = \"analyze\"\nneeds = [\"evaluate\", \"split\", \"train\"]\n\
         \n[stages.export]\nkind = \"export\"\nneeds = [\"train\", \"analyze\"]\n",
    );
    p.write("pipelines/p.toml", &text);
    p.ok(&["run", "pipelines/p.toml", "--quiet"]);
    let train_dir = artifact_dirs(&p, "train").pop().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(train_dir.join("manifest.json")).unwrap()).unwrap();
    // The trained artifact carries its TensorBoard file.
    assert_eq!(train::tensorboard::event_files(&train_dir.join("tensorboard")).len(), 1);

    let td = train_dir.display().to_string();
    p.ok(&["export", &td, "--format", "seq-cls", "--out", "out/seq"]);
    p.ok(&["export", &td, "--format", "causal", "--out", "out/causal"]);
    assert_eq!(p.pipe(&["export", &td, "--format", "causal", "--out", "out/causal"]).code, 2, "exists: needs --force");

    // Rerank on the export equals rerank on the causal model.
    let rerank = |m: &str| {
        let out = p.ok(&[
            "rerank",
            "--model",
            m,
            "--device",
            "cpu",
            "--json",
            "--query",
            "angle bracket",
            "--doc",
            "deck bracket model 3",
            "--doc",
            "shower faucet lamp model 7",
            "--doc",
            "angle bracket deck model 1",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["results"].as_array().unwrap().iter().map(|r| r["logit"].as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let (a, b) = (rerank("out/causal"), rerank("out/seq"));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "causal {a:?} vs seq-cls {b:?}");
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p.path("out/seq/config.json")).unwrap())
            .unwrap()["architectures"][0],
        "Qwen3ForSequenceClassification"
    );

    // The export stage wrote the same model and a card from its upstream artifacts.
    let stage_dir = artifact_dirs(&p, "export").pop().expect("the export stage's artifact");
    let stage_model = std::fs::read(stage_dir.join("model/model.safetensors")).unwrap();
    assert_eq!(stage_model, std::fs::read(p.path("out/seq/model.safetensors")).unwrap());
    let stage_card = std::fs::read_to_string(stage_dir.join("model/README.md")).unwrap();

    // The card: front matter, then every figure as the manifests and the run record hold it.
    let card = std::fs::read_to_string(p.path("out/seq/README.md")).unwrap();
    let (front, body) = card.strip_prefix("---\n").unwrap().split_once("\n---\n").unwrap();
    let field = |k: &str| front.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).map(str::to_string);
    assert_eq!(field("pipeline_tag").as_deref(), Some("text-classification"));
    assert_eq!(field("license").as_deref(), Some("other"), "a random base has no known license");
    assert_eq!(field("library_name").as_deref(), Some("transformers"));
    assert!(front.contains("tags:\n- reranker"), "{front}");
    assert!(field("base_model").is_none(), "trained from random: no base model");
    let causal_card = std::fs::read_to_string(p.path("out/causal/README.md")).unwrap();
    assert!(causal_card.contains("pipeline_tag: text-ranking"));

    for (k, v) in manifest["key_inputs"]["params"].as_object().unwrap() {
        let row = format!("| `{k}` | `{}` |", v.to_string().replace('|', "\\|"));
        assert!(body.contains(&row) && stage_card.contains(&row), "parameter row {row} missing");
    }
    assert!(body.contains(manifest["key"].as_str().unwrap()), "train key");
    assert!(body.contains(&format!("pipe version: {}", manifest["tool_version"].as_str().unwrap())));
    assert!(body.contains(&format!("training time: {} s", manifest["metrics"]["train_seconds"])));
    assert!(body.contains(&format!("device `{}`", manifest["stats"]["device"].as_str().unwrap())));
    let hardware = manifest["stats"]["hardware"].as_str().unwrap();
    assert!(hardware.contains("threads"), "the CPU and its threads: {hardware}");
    assert!(body.contains(&format!("- hardware: {hardware}, device")), "{body}");

    let runs = std::fs::read_dir(p.path("artifacts/runs/p")).unwrap().flatten().collect::<Vec<_>>();
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs[0].path().join("run.json")).unwrap()).unwrap();
    assert!(body.contains(&format!("run `{}`", run["run_id"].as_str().unwrap())));
    let stage = |kind: &str| -> serde_json::Value {
        let s = run["stages"].as_array().unwrap().iter().find(|s| s["kind"] == kind).unwrap();
        let dir = p.path(&format!("artifacts/{kind}/{}", &s["key"].as_str().unwrap()[..20]));
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let load = stage("load");
    for (file, hash) in load["key_inputs"]["inputs"].as_object().unwrap() {
        let line = format!("content hash of `{file}`: blake3 `{}`", hash.as_str().unwrap());
        assert!(body.contains(&line) && stage_card.contains(&line), "{line}");
    }
    let split = stage("split");
    for part in ["train", "val", "test"] {
        let s = &split["stats"][part];
        let row = format!("| {part} | {} | {} |", s["pairs"], s["queries"]);
        assert!(body.contains(&row) && stage_card.contains(&row), "{part} rows");
    }
    let analyze = stage("analyze");
    let analysis: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.path(&format!("artifacts/analyze/{}/analysis.json", &analyze["key"].as_str().unwrap()[..20])))
            .unwrap(),
    )
    .unwrap();
    let f4 = |v: &serde_json::Value| format!("{:.4}", v.as_f64().unwrap());
    let model = analysis["systems"].as_array().unwrap().iter().find(|s| s["id"] == "model").unwrap();
    let auc_ci = &model["test_ci95"]["auc"];
    assert!(
        body.contains(&format!("{} [{}, {}]", f4(&model["test"]["auc"]), f4(&auc_ci[0]), f4(&auc_ci[1]))),
        "model test AUC with its interval"
    );
    let lifts = analysis["lifts"].as_array().unwrap();
    assert!(!lifts.is_empty());
    for l in lifts {
        let row = format!(
            "| `{}` | {} | {} | {} | {} |",
            l["baseline"].as_str().unwrap(),
            l["metric"].as_str().unwrap(),
            f4(&l["model"]),
            f4(&l["base"]),
            f4(&l["lift"])
        );
        assert!(body.contains(&row) && stage_card.contains(&row), "lift row {row}");
    }
    assert!(body.contains("<Instruct>: {INSTRUCTION}\\n<Query>: {query}\\n<Document>: {document}"), "prompt format");
    let tok = stage("tokenize");
    let limit = |k: &str| format!("`{k}` = {} tokens", tok["key_inputs"]["params"][k]);
    assert!(body.contains(&limit("max_length")) && body.contains(&limit("max_description_tokens")), "prompt limits");
    for how in ["AutoModelForSequenceClassification", "CrossEncoder", "from vllm import LLM"] {
        assert!(body.contains(how), "{how}");
    }
}
