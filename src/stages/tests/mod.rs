//! Stage-level tests: each stage run by hand over a temp dir, as the runner would run it.

mod analyze;
mod data_stages;
mod full_data;
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
