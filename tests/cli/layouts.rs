//! Bring your own data: the `pairs` and `grouped` pipelines run to `analyze` on the committed layout
//! files, and a pairs file whose columns do not match the mapping fails naming the file, the line and
//! the column, leaving no artifact.

use crate::util::{repo, Project};

/// A project with one committed pipeline and the data files it reads.
fn project(pipeline: &str, files: &[&str]) -> Project {
    let p = Project::new();
    for f in files {
        std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    let name = format!("pipelines/{pipeline}.toml");
    std::fs::copy(repo().join(&name), p.path(&name)).unwrap();
    p
}

fn run_to_analyze(p: &Project, pipeline: &str) -> serde_json::Value {
    let file = format!("pipelines/{pipeline}.toml");
    let v = p.run_json(&["run", &file, "--set", "train.max_steps=8", "--set", "train.epochs=1", "--json"]);
    assert_eq!(v["status"], "ok", "{v}");
    let ids: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["load", "normalize", "split", "tokenize", "train", "evaluate", "analyze"]);
    let dir = |i: usize| std::path::PathBuf::from(v["stages"][i]["dir"].as_str().unwrap());
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(5).join("evaluation_metrics.json")).unwrap()).unwrap();
    for m in ["auc", "ndcg@10"] {
        assert!(metrics["test"][m].as_f64().is_some(), "{pipeline}: test {m} in {metrics}");
    }
    assert!(std::fs::read_to_string(dir(6).join("report.html")).unwrap().contains("<svg"));
    v
}

fn manifest(v: &serde_json::Value, i: usize) -> serde_json::Value {
    let dir = std::path::PathBuf::from(v["stages"][i]["dir"].as_str().unwrap());
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn pairs_pipeline_runs_to_analyze_with_the_files_binary_labels() {
    let p = project("pairs", &["pairs.tsv"]);
    let v = run_to_analyze(&p, "pairs");
    let tsv = std::fs::read_to_string(repo().join("data/pairs.tsv")).unwrap();
    let rows = tsv.lines().count() - 1;
    let positives = tsv.lines().skip(1).filter(|l| l.ends_with("\t1")).count();
    // Where the failure test below looks for a (missing) load artifact.
    assert!(v["stages"][0]["dir"].as_str().unwrap().contains("artifacts/load/"), "{v}");
    let load = manifest(&v, 0);
    assert_eq!(load["stats"]["layout"], "pairs", "{load}");
    assert_eq!(load["stats"]["rows"], rows);
    // The split keeps the file's labels: its positives are the file's.
    let split = &manifest(&v, 2)["stats"];
    let split_positives: u64 = ["train", "val", "test"].iter().map(|s| split[s]["positives"].as_u64().unwrap()).sum();
    assert_eq!(split_positives as usize, positives, "{split}");
}

#[test]
fn grouped_pipeline_runs_to_analyze() {
    let p = project("grouped", &["grouped.jsonl"]);
    let v = run_to_analyze(&p, "grouped");
    assert_eq!(manifest(&v, 0)["stats"]["layout"], "grouped");
}

#[test]
fn a_pairs_file_with_a_renamed_column_fails_naming_file_line_and_column() {
    let p = project("pairs", &["pairs.tsv"]);
    let tsv = std::fs::read_to_string(p.path("data/pairs.tsv")).unwrap();
    p.write("data/pairs.tsv", &tsv.replacen("is_relevant", "relevant", 1));
    let out = p.pipe(&["run", "pipelines/pairs.toml"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("data/pairs.tsv:1:"), "{out}");
    assert!(out.stderr.contains("missing column `is_relevant` (columns.label)"), "{out}");
    assert!(out.stderr.contains("qid, search_query, pid, product_text, relevant"), "{out}");
    assert_eq!(p.count_dir("artifacts/load"), 0, "no artifact: {}", p.tree());

    // A bad label on line 3.
    let mut lines: Vec<String> = tsv.lines().map(str::to_string).collect();
    lines[2] = format!("{}\t2", lines[2].rsplit_once('\t').unwrap().0);
    p.write("data/pairs.tsv", &(lines.join("\n") + "\n"));
    let out = p.pipe(&["run", "pipelines/pairs.toml"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("data/pairs.tsv:3:"), "{out}");
    assert!(
        out.stderr.contains("column `is_relevant` (columns.label)") && out.stderr.contains("expected 0 or 1"),
        "{out}"
    );
    assert_eq!(p.count_dir("artifacts/load"), 0, "no artifact: {}", p.tree());
}
