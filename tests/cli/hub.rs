//! `hf:` ids of models and tokenizers resolve through the Hugging Face cache as the Python tooling
//! lays it out and configures it (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`), the
//! same for model loading and tokenizer loading. No test reaches the network: a download goes to
//! `HF_ENDPOINT=http://127.0.0.1:9`, where nothing listens.

use std::path::Path;

use candle_core::{DType, Device};
use pipe::model::{self, Qwen3Config, SaveOptions};

use crate::util::{repo, Output, Project};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const NOWHERE: &str = "http://127.0.0.1:9";

/// A tiny random reranker (the real Qwen3 vocabulary and tokenizer, so prompts encode) saved as
/// `acme/tiny` at [`COMMIT`] in the cache layout huggingface_hub writes: `refs/main` holds the
/// commit, the files are in `snapshots/<commit>/`.
fn cache_tiny_model(cache: &Path) {
    let cfg = Qwen3Config::tiny(151_669, 8, 16, 1, 2, 1, 4, true);
    let m = model::random(&cfg, 1, DType::F32, &Device::Cpu, false).unwrap();
    let base = cache.join("models--acme--tiny");
    let opts = SaveOptions {
        dtype: Some(DType::BF16),
        tokenizer: Some(repo().join("data/tokenizers/qwen3/tokenizer.json.gz")),
        ..Default::default()
    };
    model::save(&m, &base.join("snapshots").join(COMMIT), &opts).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), COMMIT).unwrap();
}

/// `pipe rerank` of one pair with `model` (its tokenizer is the one beside it in the cache).
fn rerank(p: &Project, model: &str, env: &[(&str, &str)], unset: &[&str]) -> Output {
    let args = ["rerank", "--model", model, "--query", "angle bracket", "--doc", "Simpson 12-Gauge Angle", "--json"];
    p.pipe_env_unset(&args, env, unset)
}

fn logit(out: &Output) -> f64 {
    assert_eq!(out.code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["results"][0]["logit"].as_f64().unwrap_or_else(|| panic!("no logit: {out}"))
}

#[test]
fn a_cached_hub_model_loads_by_id_from_hf_hub_cache_or_hf_home_offline_or_not() {
    let p = Project::new();
    let shared = p.path("shared/hub");
    cache_tiny_model(&shared);
    let shared = shared.to_str().unwrap();
    // HF_HUB_CACHE wins over HF_HOME (the test default points HF_HOME at an empty directory);
    // online, a cached model needs no request (the endpoint would refuse it).
    let online = rerank(&p, "hf:acme/tiny", &[("HF_HUB_CACHE", shared), ("HF_ENDPOINT", NOWHERE)], &["HF_HUB_OFFLINE"]);
    let expected = logit(&online);
    let offline = rerank(&p, "hf:acme/tiny", &[("HF_HUB_CACHE", shared), ("HF_HUB_OFFLINE", "1")], &[]);
    assert_eq!(logit(&offline), expected);
    // A pinned commit is found in snapshots/ without a ref of its name.
    let pinned = rerank(&p, &format!("hf:acme/tiny@{COMMIT}"), &[("HF_HUB_CACHE", shared)], &[]);
    assert_eq!(logit(&pinned), expected);

    // Only HF_HOME: the cache is $HF_HOME/hub.
    let home = p.path("home");
    cache_tiny_model(&home.join("hub"));
    let home = home.to_str().unwrap();
    for offline in [None, Some("1")] {
        let mut env = vec![("HF_HOME", home), ("HF_ENDPOINT", NOWHERE)];
        env.extend(offline.map(|v| ("HF_HUB_OFFLINE", v)));
        assert_eq!(logit(&rerank(&p, "hf:acme/tiny", &env, &["HF_HUB_OFFLINE"])), expected, "{offline:?}");
    }

    // And where neither points at it, it is not found, and the error says what to do.
    let out = rerank(&p, "hf:acme/tiny", &[("HF_HUB_OFFLINE", "1")], &[]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("HF_HUB_OFFLINE is set") && out.stderr.contains("HF_HUB_CACHE"), "{out}");
    assert!(out.stderr.contains("--model path/to/"), "{out}");
}

#[test]
fn hf_hub_offline_is_true_only_for_the_values_python_accepts() {
    let p = Project::new();
    let cache = p.path("hub");
    let cache = cache.to_str().unwrap();
    for value in ["0", "off", "false", ""] {
        let out = rerank(
            &p,
            "hf:acme/absent",
            &[("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", value), ("HF_ENDPOINT", NOWHERE)],
            &[],
        );
        assert_eq!(out.code, 1, "{out}");
        assert!(out.stderr.contains(&format!("the download from {NOWHERE} failed")), "{value:?} is online: {out}");
        assert!(!out.stderr.contains("HF_HUB_OFFLINE is set"), "{value:?} is online: {out}");
    }
    for value in ["1", "ON", "yes", "True"] {
        let out = rerank(
            &p,
            "hf:acme/absent",
            &[("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", value), ("HF_ENDPOINT", NOWHERE)],
            &[],
        );
        assert_eq!(out.code, 1, "{out}");
        assert!(out.stderr.contains("HF_HUB_OFFLINE is set"), "{value:?} is offline: {out}");
    }
}

/// Three queries, enough rows for each split.
const TINY_TRAIN: &str = "\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n\
    1,100001,\"Simpson Strong-Tie 12-Gauge Angle\",\"angle bracket\",3\n\
    2,100001,\"Simpson Strong-Tie 12-Gauge Angle\",\"l bracket\",2.5\n\
    3,100002,\"Behr Premium Textured DeckOver\",\"deck over\",3\n\
    4,100005,\"Delta Vero 1-Handle Shower\",\"rain shower head\",2.33\n\
    5,100005,\"Delta Vero 1-Handle Shower\",\"shower only faucet\",1.67\n\
    6,100006,\"Whirlpool Gas Range\",\"gas stove\",3\n";

#[test]
fn the_tokenize_stage_finds_the_tokenizer_where_the_model_is() {
    let p = Project::new();
    let shared = p.path("shared/hub");
    cache_tiny_model(&shared);
    let shared = shared.to_str().unwrap();
    p.write("data/train.csv", TINY_TRAIN);
    p.write(
        "pipelines/p.toml",
        "[pipeline]\nname = \"p\"\n\n[stages.load]\nkind = \"load\"\npath = \"data/train.csv\"\ndescriptions = \"\"\n\n\
         [stages.split]\nkind = \"split\"\nneeds = [\"load\"]\ntrain_ratio = 0.34\nval_ratio = 0.33\ntest_ratio = 0.33\n\n\
         [stages.tokenize]\nkind = \"tokenize\"\nneeds = [\"split\"]\ntokenizer = \"hf:acme/tiny\"\nmax_length = 96\n",
    );
    let env = [("HF_HUB_CACHE", shared), ("HF_HUB_OFFLINE", "1")];
    let out = p.ok_env(&["run", "pipelines/p.toml", "--json"], &env);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let tok = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "tokenize").unwrap();
    assert_eq!(tok["status"], "ran", "{out}");
    let used = std::fs::read(Path::new(tok["dir"].as_str().unwrap()).join("tokenizer.json")).unwrap();
    let cached =
        std::fs::read(p.path(&format!("shared/hub/models--acme--tiny/snapshots/{COMMIT}/tokenizer.json"))).unwrap();
    assert!(used == cached, "the tokenize stage used another tokenizer than the cached model's");
    // The model loads from the same cache by the same id.
    logit(&rerank(&p, "hf:acme/tiny", &env, &[]));
    // Without the cache the stage fails and says how to fix it.
    let out = p.pipe_env(&["run", "pipelines/p.toml", "--force", "tokenize"], &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("HF_HUB_OFFLINE") && out.stderr.contains("point `tokenizer` at a local file"), "{out}");
}
