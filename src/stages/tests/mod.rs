//! Stage-level tests: each stage run by hand over a temp dir, as the runner would run it.

mod analyze;
mod data_stages;
mod full_data;
mod layouts;
mod load_errors;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::engine::{Params, Stage, StageContext, StageError, StageOutput, Upstream};

/// A project root in a temp dir, and the means to run a stage in it.
pub struct Harness {
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Harness { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Write a file under the root, creating folders.
    pub fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Run `stage` as pipeline stage `id`; its output dir is `<root>/out/<id>` (emptied first).
    pub fn run(
        &self,
        stage: &dyn Stage,
        id: &str,
        params: &Params,
        upstream: &[Upstream],
    ) -> (Result<StageOutput, StageError>, PathBuf) {
        let out = self.root().join("out").join(id);
        let scratch = self.root().join("scratch").join(id);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&scratch).unwrap();
        let cancel = AtomicBool::new(false);
        let ctx = StageContext {
            id,
            params,
            root: self.root(),
            out: &out,
            scratch: &scratch,
            upstream,
            quiet: true,
            cancel: &cancel,
            gpus: &[],
        };
        (stage.run(&ctx), out)
    }
}

/// The stage's embedded defaults with some keys replaced (each key must exist: a typo fails loudly).
pub fn params(stage: &dyn Stage, overrides: &[(&str, toml::Value)]) -> Params {
    let mut table: toml::Table = stage.defaults().parse().expect("defaults parse");
    for (k, v) in overrides {
        let old = table.insert(k.to_string(), v.clone());
        assert!(old.is_some(), "`{k}` is not a parameter of {}", stage.kind());
    }
    let p = Params(table);
    stage.check(&p).unwrap_or_else(|e| panic!("{e}"));
    p
}

/// The full Home Depot data in ../shared as `load` parameters (path, descriptions), or `None` with a
/// printed note when it is absent (CI clones without it; these tests are `#[ignore]`d anyway).
pub fn full_data_load_params() -> Option<Params> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/home_depot");
    let train = dir.join("train.csv.gz");
    let descriptions = dir.join("product_descriptions_prefix_100001-101387.csv.gz");
    if !train.is_file() || !descriptions.is_file() {
        eprintln!("skipped: the full data is not at {} (see data/README.md)", dir.display());
        return None;
    }
    let load = crate::stages::load::Load;
    Some(params(&load, &[("path", s(train.to_str().unwrap())), ("descriptions", s(descriptions.to_str().unwrap()))]))
}

pub fn s(v: &str) -> toml::Value {
    toml::Value::String(v.to_string())
}

pub fn upstream(kind: &str, dir: &Path) -> Upstream {
    Upstream { id: kind.to_string(), kind: kind.to_string(), dir: dir.to_path_buf() }
}

/// Every contract names registered kinds, and a parameter-dependent upstream names a string
/// parameter of the kind's defaults: renaming the parameter must not silently switch the check off.
#[test]
fn contracts_name_registered_kinds_and_string_parameters() {
    let registry = crate::stages::registry();
    let kinds: Vec<&str> = registry.iter().map(|s| s.kind()).collect();
    for stage in &registry {
        let defaults: toml::Table = stage.defaults().parse().unwrap();
        for need in stage.contract().needs {
            for k in need.kinds {
                assert!(kinds.contains(k), "{} reads unknown kind {k}", stage.kind());
            }
            if let crate::engine::When::ParamIs { key, .. } = need.when {
                assert!(
                    defaults.get(key).is_some_and(|v| v.is_str()),
                    "{}: `{key}` is no string parameter",
                    stage.kind()
                );
            }
        }
        assert!(!stage.contract().writes.is_empty(), "{} declares no file", stage.kind());
    }
}

/// evaluate needs a train stage for the trained or base model only; any other model loads without one.
#[test]
fn evaluate_needs_train_only_for_the_models_train_makes() {
    let registry = crate::stages::registry();
    let pipeline = |model: &str| {
        let text = format!(
            "[pipeline]\nname = \"p\"\n[stages.load]\nkind = \"load\"\n[stages.split]\nkind = \"split\"\n\
             needs = [\"load\"]\n[stages.tok]\nkind = \"tokenize\"\nneeds = [\"split\"]\n\
             [stages.eval]\nkind = \"evaluate\"\nneeds = [\"tok\"]\nmodel = \"{model}\"\n"
        );
        crate::engine::config::load_str(Path::new("p.toml"), &text, &Default::default(), &registry)
    };
    assert!(pipeline("hf:Qwen/Qwen3-Reranker-0.6B").is_ok());
    assert!(pipeline("models/mine").is_ok());
    for model in ["trained", "base"] {
        let e = pipeline(model).unwrap_err();
        assert_eq!(e.key, "stages.eval.needs", "{e}");
        assert!(e.message.contains(&format!("kind `train` because `model = \"{model}\"`")), "{e}");
    }
}
