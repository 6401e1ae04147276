//! The model card (`README.md`) of an exported model, with the Hugging Face front matter.
//!
//! Every number on the card is read from the store: the train artifact's manifest (parameters,
//! key, timings, device, pipe version), the newest run record that produced that artifact (the
//! pipeline and run), the manifests of the other stages of that run (data files and their content
//! hashes, rows per split, the prompt) and the analyze stage's `analysis.json` (test metrics, the
//! baselines, lifts with their paired intervals). Nothing is typed in by hand, so a card cannot
//! disagree with the run it describes; a fact the store does not hold is left out and the card
//! says so.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{ExportError, Format};
use crate::engine::gc::run_records;
use crate::engine::store::{read_manifest, Manifest, Store};
use crate::model::Qwen3Config;
use crate::text::prompt::{DEFAULT_INSTRUCTION, PREFIX, SUFFIX};

/// The store's records about one train artifact.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub train_dir: PathBuf,
    pub train: Manifest,
    /// The newest run record with a stage of this key; `None` when `pipe gc` removed them all.
    pub run_record: Option<PathBuf>,
    pub run: Option<Value>,
    /// The manifests of the run's other stages, in the record's order.
    pub stages: Vec<Manifest>,
    /// The analyze stage's `analysis.json`, when the run had one.
    pub analysis: Option<Value>,
}

impl Provenance {
    pub fn from_train_artifact(dir: &Path) -> Result<Self, ExportError> {
        let bad = |message: String| ExportError::Source { path: dir.to_path_buf(), message };
        let train = read_manifest(dir)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("has no manifest.json; it is not a finished artifact".into()))?;
        if train.kind != crate::stages::train::KIND {
            return Err(bad(format!("is a `{}` artifact; export needs a `train` one", train.kind)));
        }
        // artifacts/<kind>/<key>: the store is two levels up.
        let root = dir.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        let store = Store::new(&root);
        let has_train = |rec: &Value| {
            rec["stages"].as_array().is_some_and(|s| {
                s.iter().any(|st| st["kind"] == train.kind.as_str() && st["key"].as_str() == Some(train.key.as_str()))
            })
        };
        // Sorted by start time: the last match is the newest run.
        let found = run_records(&store).into_iter().rfind(|(_, _, rec)| has_train(rec));
        let (run_record, run) = match found {
            Some((_, d, rec)) => (Some(d.join("run.json")), Some(rec)),
            None => (None, None),
        };
        let mut stages = Vec::new();
        let mut analysis = None;
        if run.is_none() {
            // No run record (removed by `pipe gc`): the data stages are still found by content.
            stages = upstream_chain(&store, &train);
        }
        for st in run.as_ref().and_then(|r| r["stages"].as_array()).into_iter().flatten() {
            let (Some(kind), Some(key)) = (st["kind"].as_str(), st["key"].as_str()) else { continue };
            let adir = store.artifact_dir(kind, key);
            if let Ok(Some(m)) = read_manifest(&adir) {
                if kind == crate::stages::analyze::KIND && analysis.is_none() {
                    let p = adir.join(crate::stages::analyze::ANALYSIS_FILE);
                    analysis = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok());
                }
                stages.push(m);
            }
        }
        Ok(Self { train_dir: dir.to_path_buf(), train, run_record, run, stages, analysis })
    }

    /// For the `export` stage, which runs inside the pipeline (its run record is not written yet):
    /// the train artifact and the analyze artifact it was given, and every artifact upstream of
    /// them, found in the store by the output hashes their manifests name.
    pub fn from_upstream(train_dir: &Path, analyze_dir: Option<&Path>) -> Result<Self, ExportError> {
        let read = |dir: &Path| -> Result<Manifest, ExportError> {
            read_manifest(dir)
                .map_err(|e| ExportError::Source { path: dir.to_path_buf(), message: e.to_string() })?
                .ok_or_else(|| ExportError::Source { path: dir.to_path_buf(), message: "has no manifest.json".into() })
        };
        let train = read(train_dir)?;
        let root = train_dir.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        let store = Store::new(&root);
        let mut stages = upstream_chain(&store, &train);
        let mut analysis = None;
        if let Some(dir) = analyze_dir {
            let m = read(dir)?;
            for up in upstream_chain(&store, &m) {
                if !stages.iter().any(|s| s.key == up.key) && up.key != train.key {
                    stages.push(up);
                }
            }
            let p = dir.join(crate::stages::analyze::ANALYSIS_FILE);
            analysis = std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok());
            stages.push(m);
        }
        Ok(Self { train_dir: train_dir.to_path_buf(), train, run_record: None, run: None, stages, analysis })
    }

    /// The run's first stage of `kind`.
    pub fn stage(&self, kind: &str) -> Option<&Manifest> {
        self.stages.iter().find(|m| m.kind == kind)
    }

    /// The train stage's parameter `name` (dotted).
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.train.key_inputs.params.get(name)
    }

    /// `(repo, revision)` of a hub base model, from the train key's inputs (where the revision
    /// the run used is recorded).
    pub fn base_model(&self) -> Option<(String, String)> {
        let spec = self.param("model")?.as_str()?;
        if !spec.starts_with("hf:") {
            return None;
        }
        let pinned = self.train.key_inputs.inputs.keys().find_map(|k| k.strip_prefix("hf:"))?;
        let (repo, rev) = pinned.split_once('@')?;
        Some((repo.to_string(), rev.to_string()))
    }
}

/// Every artifact upstream of `m` (transitively), each found in the store as the artifact of that
/// kind whose output hash the downstream manifest recorded.
fn upstream_chain(store: &Store, m: &Manifest) -> Vec<Manifest> {
    let mut out: Vec<Manifest> = Vec::new();
    let mut queue: Vec<crate::engine::key::UpstreamInput> = m.key_inputs.upstream.clone();
    while let Some(u) = queue.pop() {
        let found = std::fs::read_dir(store.root.join(&u.kind))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_manifest(&e.path()).ok().flatten())
            .find(|c| c.output_hash == u.output);
        if let Some(c) = found {
            if !out.iter().any(|o| o.key == c.key) {
                queue.extend(c.key_inputs.upstream.clone());
                out.push(c);
            }
        }
    }
    out
}

/// Everything the card shows.
#[derive(Debug, Clone)]
pub struct Card {
    pub format: Format,
    pub architecture: String,
    pub model_config: Qwen3Config,
    pub yes_id: u32,
    pub no_id: u32,
    pub pad_token: String,
    pub pad_token_id: u32,
    pub license: Option<String>,
    pub provenance: Option<Provenance>,
}

/// How the card prints a metric: four decimals, the same everywhere, so a test can recompute it.
pub fn fmt_metric(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.4}"),
        None => "n/a".into(),
    }
}

fn fmt_ci(v: &Value) -> String {
    match (v.get(0).and_then(Value::as_f64), v.get(1).and_then(Value::as_f64)) {
        (Some(a), Some(b)) => format!("[{a:.4}, {b:.4}]"),
        _ => "".into(),
    }
}

/// Markdown table cells must not contain a raw `|`.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl Card {
    fn base(&self) -> Option<(String, String)> {
        self.provenance.as_ref().and_then(Provenance::base_model)
    }

    /// The license: given, else Apache-2.0 for a Qwen base (the Qwen3 models' license), else
    /// `other` (the user must state it before publishing).
    pub fn license(&self) -> String {
        if let Some(l) = &self.license {
            return l.clone();
        }
        match self.base() {
            Some((repo, _)) if repo.starts_with("Qwen/") => "apache-2.0".into(),
            _ => "other".into(),
        }
    }

    fn instruction(&self) -> String {
        self.provenance
            .as_ref()
            .and_then(|p| p.stage(crate::stages::tokenize::KIND))
            .and_then(|m| m.key_inputs.params.get("instruction"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_INSTRUCTION)
            .to_string()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        self.front_matter(&mut s);
        let title = match self.format {
            Format::Causal => "Qwen3 reranker (causal LM)",
            Format::SeqCls => "Qwen3 reranker (sequence classification)",
        };
        let _ = writeln!(s, "# {title}\n");
        let _ = writeln!(
            s,
            "A Qwen3 cross-encoder reranker trained and exported by `pipe` as `{}` (`--format {}`). \
             It scores a (query, document) prompt by the logit of \"yes\" minus the logit of \"no\" at the \
             last prompt token (token ids {} and {}); P(relevant) = sigmoid(logit).\n",
            self.architecture,
            self.format.as_str(),
            self.yes_id,
            self.no_id
        );
        if self.format == Format::SeqCls {
            let _ = writeln!(
                s,
                "This is the single-logit form: `score.weight` = `W_yes − W_no` (the two rows of the LM head{}), \
                 shape [1, {}], no LM head. `pad_token_id` = {} (`{}`); the prompt never ends in it, so the \
                 last-non-pad-token pooling of transformers reads the prompt's last token with either padding side.\n",
                if self.model_config.tie_word_embeddings { ", tied to the embedding" } else { "" },
                self.model_config.hidden_size,
                self.pad_token_id,
                self.pad_token
            );
        }
        self.provenance_sections(&mut s);
        self.usage(&mut s);
        s
    }

    fn front_matter(&self, s: &mut String) {
        let _ = writeln!(s, "---");
        let _ = writeln!(s, "license: {}", self.license());
        if let Some((repo, _)) = self.base() {
            let _ = writeln!(s, "base_model: {repo}");
            let _ = writeln!(s, "base_model_relation: finetune");
        }
        let tag = match self.format {
            Format::Causal => "text-ranking",
            Format::SeqCls => "text-classification",
        };
        let _ = writeln!(s, "pipeline_tag: {tag}");
        let _ = writeln!(s, "library_name: transformers");
        let _ = writeln!(s, "tags:");
        let mut tags = vec!["reranker", "qwen3", "text-ranking", "pipe"];
        if self.format == Format::SeqCls {
            tags.push("cross-encoder");
        }
        for t in tags {
            let _ = writeln!(s, "- {t}");
        }
        let _ = writeln!(s, "---\n");
    }

    fn provenance_sections(&self, s: &mut String) {
        let Some(p) = &self.provenance else {
            let _ = writeln!(
                s,
                "## Provenance\n\nExported from a model directory, not from a `pipe` train artifact: the store holds \
                 no record of how it was trained, so this card has no data, parameter or metric section.\n"
            );
            return;
        };
        let t = &p.train;
        let _ = writeln!(s, "## Base model\n");
        match (p.base_model(), p.param("model").and_then(Value::as_str)) {
            (Some((repo, rev)), _) => {
                let _ = writeln!(s, "- base model: [{repo}](https://huggingface.co/{repo}), revision `{rev}`");
            }
            (None, Some("random")) => {
                let _ = writeln!(
                    s,
                    "- base model: none; trained from a random initialisation of the shape in the `init.*` parameters"
                );
            }
            (None, Some(other)) => {
                let _ = writeln!(s, "- base model: local directory `{other}`");
                for (k, v) in &t.key_inputs.inputs {
                    if k != v {
                        let _ = writeln!(s, "  - `{k}`: blake3 `{v}`");
                    }
                }
            }
            (None, None) => {}
        }
        let _ = writeln!(
            s,
            "- fine-tuning: `{}` mode, stored as {}\n",
            p.param("mode").and_then(Value::as_str).unwrap_or("?"),
            self.model_config.dtype.as_deref().unwrap_or("float32")
        );

        let _ = writeln!(s, "## Training data\n");
        match p.stage(crate::stages::load::KIND) {
            Some(load) => {
                for (name, v) in [("path", "source"), ("descriptions", "descriptions")] {
                    if let Some(x) = load.key_inputs.params.get(name).and_then(Value::as_str).filter(|x| !x.is_empty())
                    {
                        let _ = writeln!(s, "- {v}: `{x}`");
                    }
                }
                for (k, v) in &load.key_inputs.inputs {
                    if k == v {
                        let _ = writeln!(s, "- input `{k}`");
                    } else {
                        let _ = writeln!(s, "- content hash of `{k}`: blake3 `{v}`");
                    }
                }
                if let Some(rows) = load.stats.get("rows") {
                    let _ = writeln!(s, "- rows loaded: {rows}");
                }
                let _ = writeln!(s, "- load artifact: `{}`", load.key);
            }
            None => {
                let _ = writeln!(s, "- no run record names the data this model was trained on");
            }
        }
        if let Some(split) = p.stage(crate::stages::split::KIND) {
            let _ = writeln!(s, "\n| split | pairs | queries |\n| --- | --- | --- |");
            for part in ["train", "val", "test"] {
                let st = &split.stats.get(part).cloned().unwrap_or(Value::Null);
                let _ = writeln!(s, "| {part} | {} | {} |", st["pairs"], st["queries"]);
            }
            let _ = writeln!(
                s,
                "\nQuery-grouped split (no query in two splits), seed {}, label = relevance ≥ {}.",
                split.key_inputs.params.get("seed").cloned().unwrap_or(Value::Null),
                split.key_inputs.params.get("relevance_threshold").cloned().unwrap_or(Value::Null)
            );
        }
        let _ = writeln!(s);

        let _ = writeln!(s, "## Training parameters\n\n| parameter | value |\n| --- | --- |");
        for (k, v) in &t.key_inputs.params {
            let _ = writeln!(s, "| `{k}` | `{}` |", cell(&v.to_string()));
        }
        let _ = writeln!(s);

        self.metrics_section(s, p);

        let _ = writeln!(s, "## Training run\n");
        let m = |k: &str| t.metrics.get(k).cloned().unwrap_or(Value::Null);
        let st = |k: &str| t.stats.get(k).cloned().unwrap_or(Value::Null);
        let _ =
            writeln!(s, "- training time: {} s (`train_seconds`), {} optimizer steps", m("train_seconds"), m("steps"));
        let _ = writeln!(
            s,
            "- hardware: {}, device `{}`, compute dtype `{}`",
            st("hardware").as_str().unwrap_or("not recorded"),
            st("device").as_str().unwrap_or("?"),
            st("dtype").as_str().unwrap_or("?")
        );
        let _ = writeln!(s, "- throughput: {} samples/s", m("samples_per_sec"));
        let _ = writeln!(
            s,
            "- best validation (step {}): val_loss {}, val_auc {}, val_ndcg@10 {}",
            m("best_step"),
            fmt_metric(&m("val_loss")),
            fmt_metric(&m("val_auc")),
            fmt_metric(&m("val_ndcg@10"))
        );
        let _ = writeln!(s, "- started {}, finished {}", t.started, t.finished);
        let _ = writeln!(s, "- pipe version: {}", t.tool_version);
        let _ = writeln!(s, "- train stage key: `{}`", t.key);
        if let Some(run) = &p.run {
            let _ = writeln!(
                s,
                "- pipeline: `{}`, run `{}` (file `{}`)",
                run["pipeline"].as_str().unwrap_or("?"),
                run["run_id"].as_str().unwrap_or("?"),
                run["file"].as_str().unwrap_or("?")
            );
            if let Some(last) = run["stages"].as_array().and_then(|a| a.last()) {
                let _ = writeln!(
                    s,
                    "- pipeline key (its last stage, `{}`): `{}`",
                    last["id"].as_str().unwrap_or("?"),
                    last["key"].as_str().unwrap_or("?")
                );
            }
        }
        let _ = writeln!(s, "- training curves: TensorBoard event files in `runs/` (`tensorboard --logdir runs`)\n");
    }

    fn metrics_section(&self, s: &mut String, p: &Provenance) {
        let _ = writeln!(s, "## Test metrics\n");
        let Some(a) = &p.analysis else {
            match p.stage(crate::stages::evaluate::KIND).and_then(|m| m.metrics.get("test")) {
                Some(test) => {
                    let _ = writeln!(s, "From the evaluate stage (the run had no analyze stage, so no baselines):\n");
                    let _ = writeln!(s, "| metric | value |\n| --- | --- |");
                    for k in ["ndcg@10", "map", "mrr", "auc"] {
                        let _ = writeln!(s, "| {k} | {} |", fmt_metric(&test[k]));
                    }
                    let _ = writeln!(s);
                }
                None => {
                    let _ = writeln!(s, "No evaluate or analyze stage ran on this model in a recorded run.\n");
                }
            }
            return;
        };
        let k = a["headline_k"].as_u64().unwrap_or(10);
        let cols = [format!("ndcg@{k}"), "map".into(), "mrr".into(), "auc".into()];
        let _ = writeln!(
            s,
            "On the test split ({} queries, {} pairs), with 95 % bootstrap intervals over queries:\n",
            a["data"]["test_queries"], a["data"]["test_pairs"]
        );
        let _ = writeln!(s, "| system | {} |", cols.join(" | "));
        let _ = writeln!(s, "| --- |{}", " --- |".repeat(cols.len()));
        for sys in a["systems"].as_array().into_iter().flatten() {
            let vals: Vec<String> = cols
                .iter()
                .map(|c| {
                    let ci = fmt_ci(&sys["test_ci95"][c.as_str()]);
                    let v = fmt_metric(&sys["test"][c.as_str()]);
                    if ci.is_empty() {
                        v
                    } else {
                        format!("{v} {ci}")
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "| {} (`{}`) | {} |",
                cell(sys["label"].as_str().unwrap_or("")),
                sys["id"].as_str().unwrap_or(""),
                vals.join(" | ")
            );
        }
        let _ = writeln!(s, "\nLifts of the model over each baseline (model − baseline, paired 95 % interval; n.s. where it contains 0):\n");
        let _ = writeln!(s, "| baseline | metric | model | baseline | lift | 95 % interval | |\n| --- | --- | --- | --- | --- | --- | --- |");
        for l in a["lifts"].as_array().into_iter().flatten() {
            let sig = match l["significant"].as_bool() {
                Some(true) => "",
                Some(false) => "n.s.",
                None => "",
            };
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {} | {} | {sig} |",
                l["baseline"].as_str().unwrap_or(""),
                l["metric"].as_str().unwrap_or(""),
                fmt_metric(&l["model"]),
                fmt_metric(&l["base"]),
                fmt_metric(&l["lift"]),
                fmt_ci(&l["ci95"])
            );
        }
        let _ = writeln!(s);
    }

    fn usage(&self, s: &mut String) {
        let instruction = self.instruction();
        let _ = writeln!(s, "## Prompt format\n");
        let _ = writeln!(
            s,
            "Every (query, document) pair is one prompt, exactly as in training (`PREFIX + body + SUFFIX`, no special \
             tokens added, left padding):\n"
        );
        let _ = writeln!(s, "```python");
        let _ = writeln!(s, "PREFIX = {}", py_str(PREFIX));
        let _ = writeln!(s, "SUFFIX = {}", py_str(SUFFIX));
        let _ = writeln!(s, "INSTRUCTION = {}", py_str(&instruction));
        let _ = writeln!(s, "def prompt(query, document):");
        let _ = writeln!(s, "    return PREFIX + f\"<Instruct>: {{INSTRUCTION}}\\n<Query>: {{query}}\\n<Document>: {{document}}\" + SUFFIX");
        let _ = writeln!(s, "```\n");
        let _ = writeln!(
            s,
            "For a product, `document` is `title + \". \" + description` (the title alone without a description)."
        );
        if let Some(t) = self.provenance.as_ref().and_then(|p| p.stage(crate::stages::tokenize::KIND)) {
            let p = |k: &str| t.key_inputs.params.get(k).cloned().unwrap_or(Value::Null);
            let _ = writeln!(
                s,
                "In training the description was cut to `max_description_tokens` = {} tokens and the whole prompt to \
                 `max_length` = {} tokens (the tokenize stage's parameters); score with the same limits for the same \
                 numbers.",
                p("max_description_tokens"),
                p("max_length")
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "## How to load it\n");
        match self.format {
            Format::SeqCls => {
                let _ = writeln!(s, "**transformers**:\n\n```python\nimport torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\ntok = AutoTokenizer.from_pretrained(\"MODEL_DIR\", padding_side=\"left\")\nmodel = AutoModelForSequenceClassification.from_pretrained(\"MODEL_DIR\").eval()\nbatch = tok([prompt(q, d) for q, d in pairs], padding=True, return_tensors=\"pt\", add_special_tokens=False)\nwith torch.no_grad():\n    logits = model(**batch).logits[:, 0]   # yes − no\nscores = torch.sigmoid(logits)\n```\n");
                let _ = writeln!(s, "**sentence-transformers** (`CrossEncoder`; the pair is the prompt cut before `<Document>`, which the Qwen3 tokenizer joins without adding tokens):\n\n```python\nfrom sentence_transformers import CrossEncoder\nmodel = CrossEncoder(\"MODEL_DIR\")\nscores = model.predict([(PREFIX + f\"<Instruct>: {{INSTRUCTION}}\\n<Query>: {{q}}\\n\", f\"<Document>: {{d}}\" + SUFFIX) for q, d in pairs])\n```\n");
                let _ = writeln!(s, "**vLLM** (score task):\n\n```python\nfrom vllm import LLM\nllm = LLM(model=\"MODEL_DIR\", task=\"score\")\nout = llm.score(PREFIX + f\"<Instruct>: {{INSTRUCTION}}\\n<Query>: {{query}}\\n\", [f\"<Document>: {{d}}\" + SUFFIX for d in docs])\nscores = [o.outputs.score for o in out]\n```\n");
            }
            Format::Causal => {
                let _ = writeln!(s, "**transformers** (score = logit(yes) − logit(no) at the last position):\n\n```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\ntok = AutoTokenizer.from_pretrained(\"MODEL_DIR\", padding_side=\"left\")\nmodel = AutoModelForCausalLM.from_pretrained(\"MODEL_DIR\").eval()\nbatch = tok([prompt(q, d) for q, d in pairs], padding=True, return_tensors=\"pt\", add_special_tokens=False)\nwith torch.no_grad():\n    last = model(**batch).logits[:, -1, :]\nlogits = last[:, {}] - last[:, {}]\nscores = torch.sigmoid(logits)\n```\n", self.yes_id, self.no_id);
                let _ = writeln!(s, "**sentence-transformers** `CrossEncoder` and **vLLM**'s score task take the single-logit form: export it with `pipe export SRC --format seq-cls --out DIR` (same scores), or, for vLLM, load this directory with `hf_overrides={{\"architectures\": [\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": [\"no\", \"yes\"], \"is_original_qwen3_reranker\": True}}`.\n");
            }
        }
        let _ = writeln!(s, "**pipe**: `pipe rerank --model MODEL_DIR --query Q --doc D…` (either form).");
    }
}

/// A Python string literal (JSON's escapes are valid Python).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}
