//! The Qwen3 reranker against Hugging Face transformers, plus checkpoint I/O.
//!
//! The expectations under `tests/fixtures/parity/` were computed by transformers (float32, eager
//! attention) with `tests/fixtures/parity/generate.py`; see its docstring for what each config
//! exercises. No Python is needed here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pipe::hub::HubSettings;
use pipe::model::{
    self, bce_with_logits, mse_on_probability, LoadOptions, ModelError, ModelFiles, ModelSource, Qwen3, Qwen3Config,
    Reranker, SaveOptions,
};

const YES: u32 = 9693;
const NO: u32 = 2152;
const CONFIGS: [&str; 2] = ["tied_mha", "untied_gqa"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn offline_hub(cache: &Path) -> HubSettings {
    HubSettings { endpoint: Some("http://127.0.0.1:9".into()), ..HubSettings::offline_at(cache) }
}

fn load_fixture(name: &str, dtype: DType, trainable: bool) -> Qwen3 {
    let source = ModelSource::Dir(fixtures().join(name));
    model::load(&source, &offline_hub(&fixtures()), &LoadOptions { dtype, device: Device::Cpu, trainable })
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"))
}

struct Batch {
    ids: Tensor,
    mask: Tensor,
    targets: Tensor,
}

fn batch() -> Batch {
    let t = candle_core::safetensors::load(fixtures().join("batch.safetensors"), &Device::Cpu).unwrap();
    Batch {
        ids: t["input_ids"].to_dtype(DType::U32).unwrap(),
        mask: t["attention_mask"].to_dtype(DType::U32).unwrap(),
        targets: t["targets"].clone(),
    }
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name).join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn logits_and_p_yes_match_transformers_on_every_fixture_config() {
    let b = batch();
    let lengths: Vec<f32> = vec1(&b.mask.sum(1).unwrap());
    assert!(lengths.iter().any(|l| *l < b.ids.dim(1).unwrap() as f32), "the fixture batch must contain padded rows");
    for name in CONFIGS {
        let r = Reranker::new(load_fixture(name, DType::F32, false), YES, NO).unwrap();
        let out = r.forward(&b.ids, &b.mask).unwrap();
        let exp = expected(name);
        for (what, got) in [("yes", &out.yes), ("no", &out.no), ("logit", &out.logit)] {
            let d = max_abs_diff(&vec1(got), &vec1(&exp[what]));
            assert!(d <= 1e-4, "{name}: {what} differs from transformers by {d}");
        }
        let scores = r.scores(&b.ids, &b.mask).unwrap();
        let p: Vec<f32> = scores.iter().map(|s| s.p_yes).collect();
        let d = max_abs_diff(&p, &vec1(&exp["p_yes"]));
        assert!(d <= 1e-4, "{name}: P(yes) differs from transformers by {d}");
        let p_t = vec1(&model::reranker::p_yes(&out.logit).unwrap());
        assert!(max_abs_diff(&p_t, &p) <= 1e-6);
    }
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    let b = batch();
    for name in CONFIGS {
        let exp = expected(name);
        let model = load_fixture(name, DType::F32, true);
        let r = Reranker::new(model, YES, NO).unwrap();
        let out = r.forward(&b.ids, &b.mask).unwrap();
        let loss = bce_with_logits(&out.logit, &b.targets).unwrap();
        let d = (scalar(&loss) - scalar(&exp["loss_bce"])).abs();
        assert!(d <= 1e-5, "{name}: BCE loss differs by {d}");
        let mse = mse_on_probability(&out.logit, &b.targets).unwrap();
        let d = (scalar(&mse) - scalar(&exp["loss_mse"])).abs();
        assert!(d <= 1e-5, "{name}: MSE loss differs by {d}");

        let grads = loss.backward().unwrap();
        let vars = r.model().vars();
        assert_eq!(vars.len(), r.model().config().param_shapes().len());
        let mut worst = (0.0f64, String::new());
        for (pname, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let ref_norm = scalar(&exp[&format!("grad_norm/{pname}")]) as f64;
            let ours = vec1(g);
            let rel_norm = (norm(&ours) - ref_norm).abs() / ref_norm.max(1e-12);
            assert!(rel_norm <= 1e-3, "{name}: |grad {pname}| off by {rel_norm:.2e} relative");
            let (got, want) = if let Some(full) = exp.get(&format!("grad/{pname}")) {
                (ours, vec1(full))
            } else {
                let rows = exp[&format!("grad_row_ids/{pname}")].to_dtype(DType::U32).unwrap();
                (vec1(&g.index_select(&rows, 0).unwrap()), vec1(&exp[&format!("grad_rows/{pname}")]))
            };
            let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let rel = norm(&diff) / norm(&want).max(1e-12);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let elem = max_abs_diff(&got, &want) / scale.max(1e-12);
            assert!(
                rel <= 1e-3 && elem <= 1e-3,
                "{name}: grad {pname}: relative error {rel:.2e} (elementwise {elem:.2e})"
            );
            if rel > worst.0 {
                worst = (rel, pname.clone());
            }
        }
        eprintln!("{name}: worst gradient relative error {:.2e} ({})", worst.0, worst.1);
    }
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() {
    let b = batch();
    for name in CONFIGS {
        let r = Reranker::new(load_fixture(name, DType::F32, true), YES, NO).unwrap();
        let out = r.forward(&b.ids, &b.mask).unwrap();
        let grads = bce_with_logits(&out.logit, &b.targets).unwrap().backward().unwrap();
        for (pname, var) in r.model().vars() {
            let g = grads.get(var.as_tensor()).expect("gradient present");
            let n = norm(&vec1(g));
            assert!(n > 0.0 && n.is_finite(), "{name}: {pname} has gradient norm {n}");
        }
    }
}

#[test]
fn frozen_models_hold_no_variables_and_trainable_ones_update_in_place() {
    let frozen = load_fixture("tied_mha", DType::F32, false);
    assert!(frozen.vars().is_empty());
    let trainable = frozen.clone().into_trainable().unwrap();
    let vars = trainable.vars();
    assert_eq!(vars.len(), frozen.params().len());
    // An optimizer's `Var::set` is seen by the model's forward pass (shared storage).
    let b = batch();
    let r = Reranker::new(trainable, YES, NO).unwrap();
    let before = r.scores(&b.ids, &b.mask).unwrap();
    let (_, norm_w) = vars.iter().find(|(n, _)| n == "model.norm.weight").unwrap();
    norm_w.set(&(norm_w.as_tensor() * 2.0).unwrap()).unwrap();
    let after = r.scores(&b.ids, &b.mask).unwrap();
    for (a, b) in before.iter().zip(&after) {
        assert!((a.logit * 2.0 - b.logit).abs() < 1e-4, "{} vs {}", a.logit, b.logit);
    }
}

#[test]
fn a_row_scores_the_same_alone_and_inside_a_left_padded_batch() {
    let b = batch();
    let r = Reranker::new(load_fixture("untied_gqa", DType::F32, false), YES, NO).unwrap();
    let in_batch = r.scores(&b.ids, &b.mask).unwrap();
    let mask_rows: Vec<Vec<u32>> = b.mask.to_vec2().unwrap();
    for (i, row) in mask_rows.iter().enumerate() {
        let start = row.iter().position(|m| *m == 1).unwrap();
        let ids = b.ids.narrow(0, i, 1).unwrap();
        let len = row.len() - start;
        let ids = ids.narrow(1, start, len).unwrap();
        let mask = Tensor::ones((1, len), DType::U32, &Device::Cpu).unwrap();
        let alone = r.scores(&ids, &mask).unwrap()[0];
        let d = (alone.logit - in_batch[i].logit).abs();
        assert!(d < 1e-4, "row {i}: {} alone vs {} padded", alone.logit, in_batch[i].logit);
    }
}

#[test]
fn a_fully_padded_row_gives_finite_outputs_and_gradients() {
    let b = batch();
    let ids = Tensor::cat(&[&b.ids, &b.ids.narrow(0, 0, 1).unwrap()], 0).unwrap();
    let zeros = Tensor::zeros((1, b.mask.dim(1).unwrap()), DType::U32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&b.mask, &zeros], 0).unwrap();
    for name in CONFIGS {
        let model = load_fixture(name, DType::F32, true);
        let h = model.forward(&ids, &mask).unwrap();
        assert!(vec1(&h).iter().all(|v| v.is_finite()), "{name}: non-finite hidden state");
        let r = Reranker::new(model, YES, NO).unwrap();
        let out = r.forward(&ids, &mask).unwrap();
        let logits = vec1(&out.logit);
        assert!(logits.iter().all(|v| v.is_finite()), "{name}: {logits:?}");
        // The real rows are unaffected by the extra row.
        let exp = vec1(&expected(name)["logit"]);
        assert!(max_abs_diff(&logits[..exp.len()], &exp) <= 1e-4);
        let targets = Tensor::cat(&[&b.targets, &Tensor::new(&[0.5f32], &Device::Cpu).unwrap()], 0).unwrap();
        let grads = bce_with_logits(&out.logit, &targets).unwrap().backward().unwrap();
        for (pname, var) in r.model().vars() {
            let g = vec1(grads.get(var.as_tensor()).unwrap());
            assert!(g.iter().all(|v| v.is_finite()), "{name}: NaN gradient in {pname}");
        }
    }
}

#[test]
fn right_padded_batches_are_rejected_by_the_reranker() {
    let r = Reranker::new(load_fixture("tied_mha", DType::F32, false), YES, NO).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
    let err = r.forward(&ids, &mask).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    let bad_id = Tensor::new(&[[1u32, 2, 151_669]], &Device::Cpu).unwrap();
    let ones = Tensor::ones((1, 3), DType::U32, &Device::Cpu).unwrap();
    assert!(r.forward(&bad_id, &ones).unwrap_err().to_string().contains("vocabulary"));
}

#[test]
fn bf16_inference_stays_close_to_the_f32_reference() {
    let b = batch();
    let r = Reranker::new(load_fixture("tied_mha", DType::BF16, false), YES, NO).unwrap();
    assert_eq!(r.model().dtype(), DType::BF16);
    let p: Vec<f32> = r.scores(&b.ids, &b.mask).unwrap().iter().map(|s| s.p_yes).collect();
    let d = max_abs_diff(&p, &vec1(&expected("tied_mha")["p_yes"]));
    assert!(d < 0.05, "bf16 P(yes) off by {d}");
}

fn all_params_bits(m: &Qwen3) -> Vec<(String, Vec<u8>)> {
    m.params()
        .iter()
        .map(|(n, t)| {
            let bytes: Vec<u8> = match t.dtype() {
                DType::F32 => vec1(t).iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
                DType::BF16 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_bits().to_le_bytes())
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (n.to_owned(), bytes)
        })
        .collect()
}

fn load_dir(dir: &Path, dtype: DType) -> Qwen3 {
    model::load(
        &ModelSource::Dir(dir.to_path_buf()),
        &offline_hub(dir),
        &LoadOptions { dtype, device: Device::Cpu, trainable: false },
    )
    .unwrap()
}

#[test]
fn save_then_load_is_bitwise_exact() {
    let tmp = tempfile::tempdir().unwrap();
    // bf16 as stored by transformers, kept bf16.
    for name in CONFIGS {
        let m = load_fixture(name, DType::BF16, false);
        let dir = tmp.path().join(name);
        model::save(&m, &dir, &SaveOptions::default()).unwrap();
        let back = load_dir(&dir, DType::BF16);
        assert_eq!(all_params_bits(&m), all_params_bits(&back), "{name}");
        assert_eq!(back.config().param_shapes(), m.config().param_shapes());
        // Like save_pretrained: lm_head.weight only when untied.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(dir.join("model.safetensors")).unwrap() };
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.contains(&"lm_head.weight".to_string()),
            !m.config().tie_word_embeddings,
            "{name}: lm_head.weight must be written only for untied models"
        );
    }
    // f32 random weights, trainable, round trip.
    let cfg = Qwen3Config::tiny(300, 16, 32, 2, 4, 2, 8, false);
    let m = model::random(&cfg, 11, DType::F32, &Device::Cpu, true).unwrap();
    let dir = tmp.path().join("random");
    model::save(&m, &dir, &SaveOptions::default()).unwrap();
    let back = load_dir(&dir, DType::F32);
    assert_eq!(all_params_bits(&m), all_params_bits(&back));
    let cfg_back = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(cfg_back.param_shapes(), cfg.param_shapes());
    assert_eq!(cfg_back.dtype.as_deref(), Some("float32"));
}

#[test]
fn saving_casts_and_copies_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_fixture("untied_gqa", DType::F32, false);
    let tok = tmp.path().join("tokenizer.json.gz");
    {
        use std::io::Write;
        let mut gz =
            flate2::write::GzEncoder::new(std::fs::File::create(&tok).unwrap(), flate2::Compression::default());
        gz.write_all(b"{\"version\": \"1.0\"}").unwrap();
        gz.finish().unwrap();
    }
    let dir = tmp.path().join("out");
    model::save(&m, &dir, &SaveOptions { dtype: Some(DType::BF16), tokenizer: Some(tok), max_shard_bytes: None })
        .unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(), "{\"version\": \"1.0\"}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["dtype"], "bfloat16");
    // f32 weights that came from bf16 storage survive the cast back to bf16 exactly.
    let back = load_dir(&dir, DType::BF16);
    let orig = load_fixture("untied_gqa", DType::BF16, false);
    assert_eq!(all_params_bits(&orig), all_params_bits(&back));
    let files = model::resolve(&ModelSource::Dir(dir.clone()), &offline_hub(&dir)).unwrap();
    assert_eq!(files.tokenizer, Some(dir.join("tokenizer.json")));
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let tmp = tempfile::tempdir().unwrap();
    let b = batch();
    for name in CONFIGS {
        let m = load_fixture(name, DType::F32, false);
        let dir = tmp.path().join(name);
        // Big enough for any small tensor, smaller than the embedding: several shards.
        model::save(&m, &dir, &SaveOptions { dtype: None, tokenizer: None, max_shard_bytes: Some(64 * 1024) }).unwrap();
        assert!(!dir.join("model.safetensors").exists());
        let files = model::resolve(&ModelSource::Dir(dir.clone()), &offline_hub(&dir)).unwrap();
        assert!(files.weights.len() >= 2, "{name}: expected several shards");
        let back = load_dir(&dir, DType::F32);
        assert_eq!(all_params_bits(&m), all_params_bits(&back), "{name}");
        let r = Reranker::new(back, YES, NO).unwrap();
        let p: Vec<f32> = r.scores(&b.ids, &b.mask).unwrap().iter().map(|s| s.p_yes).collect();
        assert!(max_abs_diff(&p, &vec1(&expected(name)["p_yes"])) <= 1e-4);
        // Saving unsharded into the same dir removes the shards and the index.
        model::save(&m, &dir, &SaveOptions::default()).unwrap();
        let files = model::resolve(&ModelSource::Dir(dir.clone()), &offline_hub(&dir)).unwrap();
        assert_eq!(files.weights, vec![dir.join("model.safetensors")]);
    }
}

#[test]
fn a_missing_shard_or_tensor_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_fixture("tied_mha", DType::F32, false);
    let dir = tmp.path().join("m");
    model::save(&m, &dir, &SaveOptions { max_shard_bytes: Some(64 * 1024), ..Default::default() }).unwrap();
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = model::resolve(&ModelSource::Dir(dir.clone()), &offline_hub(&dir)).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // A config that expects an lm_head the tied checkpoint lacks.
    let dir2 = tmp.path().join("m2");
    model::save(&m, &dir2, &SaveOptions::default()).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir2.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = false.into();
    std::fs::write(dir2.join("config.json"), cfg.to_string()).unwrap();
    let err = model::load(&ModelSource::Dir(dir2.clone()), &offline_hub(&dir2), &LoadOptions::default()).unwrap_err();
    assert!(matches!(&err, ModelError::MissingTensor { name, .. } if name == "lm_head.weight"), "{err}");
}

#[test]
fn both_config_layouts_in_the_fixtures_parse() {
    // tied_mha was written by transformers 5 (rope_parameters, dtype); untied_gqa was rewritten
    // by the fixture script into the 4.x layout (rope_theta, torch_dtype).
    let tied = Qwen3Config::from_file(&fixtures().join("tied_mha/config.json")).unwrap();
    let untied = Qwen3Config::from_file(&fixtures().join("untied_gqa/config.json")).unwrap();
    let raw_tied = std::fs::read_to_string(fixtures().join("tied_mha/config.json")).unwrap();
    let raw_untied = std::fs::read_to_string(fixtures().join("untied_gqa/config.json")).unwrap();
    assert!(raw_tied.contains("rope_parameters") && !raw_tied.contains("torch_dtype"));
    assert!(!raw_untied.contains("rope_parameters") && raw_untied.contains("torch_dtype"));
    assert_eq!(tied.rope_theta, 1_000_000.0);
    assert_eq!(untied.rope_theta, 10_000.0);
    assert_eq!(tied.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(untied.dtype.as_deref(), Some("bfloat16"));
    assert!(untied.attention_bias && !tied.attention_bias);
}

/// Lays out a model the way hf-hub / huggingface_hub cache it: blobs under `snapshots/<commit>/`,
/// the branch name resolved through `refs/<branch>`.
fn fake_hub_cache(cache: &Path, repo: &str, commit: &str, model_dir: &Path) {
    let base = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snap = base.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model_dir.join(f), snap.join(f)).unwrap();
    }
}

#[test]
fn hub_ids_resolve_from_the_local_cache_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    fake_hub_cache(tmp.path(), "acme/tiny-reranker", commit, &fixtures().join("tied_mha"));
    // offline: only the cache may answer.
    let hub = offline_hub(tmp.path());
    let src: ModelSource = "hf:acme/tiny-reranker".parse().unwrap();
    let files: ModelFiles = model::resolve(&src, &hub).unwrap();
    assert!(files.config.starts_with(tmp.path()));
    let m = model::load(&src, &hub, &LoadOptions::default()).unwrap();
    assert_eq!(m.config().vocab_size, 151_669);
    // A pinned commit resolves through snapshots/ even without a ref of that name.
    let pinned: ModelSource = format!("hf:acme/tiny-reranker@{commit}").parse().unwrap();
    assert!(model::resolve(&pinned, &hub).is_ok());
}

#[test]
fn an_uncached_hub_id_offline_says_how_to_use_a_local_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let src: ModelSource = "hf:acme/not-cached@v2".parse().unwrap();
    let err = model::resolve(&src, &offline_hub(tmp.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Hub { .. }), "{msg}");
    assert!(msg.contains("acme/not-cached@v2") && msg.contains("--model"), "{msg}");
    // Online mode against an endpoint where nothing listens fails the same way, not with a panic.
    let hub = HubSettings { offline: false, ..offline_hub(tmp.path()) };
    let err = model::resolve(&src, &hub).unwrap_err();
    assert!(matches!(err, ModelError::Hub { .. }), "{err}");
}

#[test]
fn random_init_is_deterministic_and_follows_the_hf_recipe() {
    let cfg = Qwen3Config::tiny(97, 16, 24, 2, 4, 1, 8, true);
    let a = model::random(&cfg, 3, DType::F32, &Device::Cpu, false).unwrap();
    let b = model::random(&cfg, 3, DType::F32, &Device::Cpu, false).unwrap();
    let c = model::random(&cfg, 4, DType::F32, &Device::Cpu, false).unwrap();
    assert_eq!(all_params_bits(&a), all_params_bits(&b));
    assert_ne!(all_params_bits(&a), all_params_bits(&c));
    for (name, t) in a.params().iter() {
        let v = vec1(t);
        if t.rank() == 1 {
            assert!(v.iter().all(|x| *x == 1.0), "{name} must start at 1");
        } else {
            let sd = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            assert!((sd - 0.02).abs() < 0.004, "{name}: std {sd}");
        }
    }
    // A random model trains: its reranker loss has gradients everywhere.
    let m = a.into_trainable().unwrap();
    let r = Reranker::new(m, 5, 7).unwrap();
    let ids = Tensor::new(&[[0u32, 3, 9, 4], [0, 0, 1, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [0, 0, 1, 1]], &Device::Cpu).unwrap();
    let out = r.forward(&ids, &mask).unwrap();
    let y = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
    let grads = bce_with_logits(&out.logit, &y).unwrap().backward().unwrap();
    for (n, v) in r.model().vars() {
        assert!(norm(&vec1(grads.get(v.as_tensor()).unwrap())) > 0.0, "{n}");
    }
}

/// Writes models SAVED BY pipe plus pipe's scores, for `generate.py check` (transformers) to
/// verify by hand:
///
/// ```text
/// PIPE_PARITY_EXPORT_DIR=/tmp/pipe-export cargo test --test model_parity -- --ignored export
/// python tests/fixtures/parity/generate.py check --model /tmp/pipe-export/f32 \
///     --scores /tmp/pipe-export/f32/pipe_scores.json
/// ```
///
/// The model is pipe's own random init of a config unlike the fixtures, moved by one SGD step on
/// the reranker loss (so it is a trained-by-pipe model), saved in f32 and in bf16.
#[test]
#[ignore = "writes files for the manual transformers check; needs PIPE_PARITY_EXPORT_DIR"]
fn export_pipe_model_for_the_transformers_check() {
    let out = PathBuf::from(std::env::var("PIPE_PARITY_EXPORT_DIR").expect("set PIPE_PARITY_EXPORT_DIR"));
    let b = batch();
    let mut cfg = Qwen3Config::tiny(151_669, 16, 40, 3, 4, 2, 8, true);
    cfg.rope_theta = 50_000.0;
    cfg.initializer_range = 0.3;
    let m = model::random(&cfg, 2024, DType::F32, &Device::Cpu, true).unwrap();
    let r = Reranker::new(m, YES, NO).unwrap();
    let out_logits = r.forward(&b.ids, &b.mask).unwrap();
    let grads = bce_with_logits(&out_logits.logit, &b.targets).unwrap().backward().unwrap();
    for (_, v) in r.model().vars() {
        let g = grads.get(v.as_tensor()).unwrap();
        v.set(&(v.as_tensor() - (g * 0.05).unwrap()).unwrap()).unwrap();
    }
    for (tag, dtype) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let dir = out.join(tag);
        model::save(r.model(), &dir, &SaveOptions { dtype: Some(dtype), ..Default::default() }).unwrap();
        // Score with what was saved, read back the way `pipe rerank` will (f32 compute).
        let back = Reranker::new(load_dir(&dir, DType::F32), YES, NO).unwrap();
        let scores = back.scores(&b.ids, &b.mask).unwrap();
        let json = serde_json::json!({
            "input_ids": b.ids.to_vec2::<u32>().unwrap(),
            "attention_mask": b.mask.to_vec2::<u32>().unwrap(),
            "yes_id": YES,
            "no_id": NO,
            "logit": scores.iter().map(|s| s.logit).collect::<Vec<_>>(),
            "p_yes": scores.iter().map(|s| s.p_yes).collect::<Vec<_>>(),
        });
        std::fs::write(dir.join("pipe_scores.json"), json.to_string()).unwrap();
        eprintln!("wrote {}", dir.display());
    }
}

#[test]
fn lora_adapters_hook_into_linear_layers_and_receive_gradients() {
    use candle_core::Var;
    use pipe::model::LoraAdapter;
    let cfg = Qwen3Config::tiny(50, 16, 24, 2, 4, 2, 8, false);
    let base = model::random(&cfg, 5, DType::F32, &Device::Cpu, false).unwrap();
    let ids = Tensor::new(&[[0u32, 3, 9, 4], [0, 0, 1, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [0, 0, 1, 1]], &Device::Cpu).unwrap();
    let base_logits = vec1(&Reranker::new(base.clone(), 5, 7).unwrap().forward(&ids, &mask).unwrap().logit);

    let a = Var::randn(0f32, 0.5, (2, 16), &Device::Cpu).unwrap();
    let b = Var::randn(0f32, 0.5, (32, 2), &Device::Cpu).unwrap(); // q_proj: 4 heads x 8
    let mut adapted = base.clone();
    assert!(adapted.linear_mut("model.layers.9.self_attn.q_proj").is_none());
    adapted.linear_mut("model.layers.1.self_attn.q_proj").unwrap().lora =
        Some(LoraAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 1.0 });
    // The base weights stay frozen: only the adapter is trainable.
    assert!(adapted.vars().is_empty());
    let r = Reranker::new(adapted, 5, 7).unwrap();
    let out = r.forward(&ids, &mask).unwrap();
    assert!(max_abs_diff(&vec1(&out.logit), &base_logits) > 1e-4, "the adapter must change the output");
    let y = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
    let grads = bce_with_logits(&out.logit, &y).unwrap().backward().unwrap();
    for v in [&a, &b] {
        assert!(norm(&vec1(grads.get(v.as_tensor()).unwrap())) > 0.0);
    }
    // Inference views keep the adapter.
    let frozen = r.scores(&ids, &mask).unwrap();
    let logits: Vec<f32> = frozen.iter().map(|s| s.logit).collect();
    assert!(max_abs_diff(&logits, &vec1(&out.logit)) < 1e-6);
    let trainable = r.model().clone().into_trainable().unwrap();
    let again = Reranker::new(trainable, 5, 7).unwrap().forward(&ids, &mask).unwrap();
    assert!(max_abs_diff(&vec1(&again.logit), &vec1(&out.logit)) < 1e-6);
}

// ---------------------------------------------------------------------------------------------
// The seq-cls export against transformers' AutoModelForSequenceClassification
// (tests/fixtures/export/make_seqcls.py, run by hand).

/// `untied_gqa` with the committed Qwen3 tokenizer beside it, as a model directory.
fn causal_dir_with_tokenizer(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("untied_gqa").join(f), dir.join(f)).unwrap();
    }
    let gz = std::fs::File::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizers/qwen3/tokenizer.json.gz"))
        .unwrap();
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut json).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
}

#[test]
fn seq_cls_export_scores_like_transformers_and_like_the_causal_model() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/export");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(here.join("expected.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let causal_dir = tmp.path().join("causal");
    causal_dir_with_tokenizer(&causal_dir);
    let out = tmp.path().join("seqcls");
    let req = pipe::export::Request {
        src: causal_dir.clone(),
        format: pipe::export::Format::SeqCls,
        out: out.clone(),
        force: false,
        license: None,
        dtype: Some(DType::F32),
    };
    pipe::export::export(&req).unwrap();

    // pipe writes today the very export transformers loaded.
    let hash = blake3::hash(&std::fs::read(out.join("model.safetensors")).unwrap()).to_hex().to_string();
    assert_eq!(hash, expected["model_safetensors_blake3"], "the exported weights changed");
    let config = |p: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert_eq!(config(&out.join("config.json")), config(&here.join("seqcls_config.json")));

    // pipe's prompts are the ids transformers' tokenizer gave for the same Home Depot pairs.
    let tokenizer = pipe::text::tokenizer::builtin_qwen3().unwrap();
    let prompts =
        pipe::text::PromptConfig { max_length: 100_000, max_description_tokens: 100_000, ..Default::default() };
    let encoder = pipe::text::PromptEncoder::new(tokenizer, prompts).unwrap();
    let rows = expected["rows"].as_array().unwrap();
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap();
            let e = encoder.encode_pair(s("query"), s("title"), s("description")).unwrap();
            let want: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(e.ids, want, "prompt ids of {r}");
            e.ids
        })
        .collect();
    let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();

    let want: Vec<f64> =
        expected["seqcls_logits_single"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let opts = LoadOptions::default();
    let files = model::resolve(&ModelSource::Dir(out.clone()), &HubSettings::default()).unwrap();
    let seq = model::seqcls::load_reranker(&files, &opts, 9693, 2152).unwrap();
    assert!(seq.is_seq_cls());
    let files = model::resolve(&ModelSource::Dir(causal_dir), &HubSettings::default()).unwrap();
    let causal = model::seqcls::load_reranker(&files, &opts, 9693, 2152).unwrap();
    assert!(!causal.is_seq_cls());
    for (name, r) in [("seq-cls", &seq), ("causal", &causal)] {
        // Batches of 4, left-padded: padding must not move the score either.
        let got = model::score::score_all(r, &seqs, 4, &Device::Cpu, |_| true).unwrap().unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g.logit as f64 - w).abs() < 1e-4, "{name} prompt {i}: pipe {} vs transformers {w}", g.logit);
        }
    }
}
