//! Sweeps share what their points have in common, resume where they stopped, and compare across stores.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{Project, SAMPLE_PIPELINE};

fn record(path: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(format!("{path}/run.json")).unwrap()).unwrap()
}

fn stage_status(rec: &serde_json::Value, id: &str) -> String {
    rec["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["status"].as_str().unwrap().to_string()
}

#[test]
fn sweep_points_share_upstream_stages() {
    let p = Project::with_sample();
    let v = p.run_json(&["run", "pipelines/p.toml", "--set", "split.seed=1,2,3", "--json"]);
    assert_eq!(v["status"], "ok", "{v}");
    let points = v["points"].as_array().unwrap();
    let names: Vec<&str> = points.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["seed=1", "seed=2", "seed=3"]);
    let recs: Vec<serde_json::Value> = points.iter().map(|pt| record(pt["run_dir"].as_str().unwrap())).collect();
    let count = |id: &str, st: &str| recs.iter().filter(|r| stage_status(r, id) == st).count();
    assert_eq!((count("load", "ran"), count("load", "cached")), (1, 2));
    assert_eq!((count("normalize", "ran"), count("normalize", "cached")), (1, 2));
    assert_eq!(count("split", "ran"), 3);
    assert_eq!(recs[1]["sweep"]["values"]["split.seed"], 2);
    let page = std::fs::read_to_string(format!("{}/report.html", v["sweep_dir"].as_str().unwrap())).unwrap();
    assert!(page.contains("<h2>Sweep</h2>") && page.contains("split.seed"), "sweep report page");
    // The same sweep again: every point is already finished.
    let again = p.run_json(&["sweep", "pipelines/p.toml", "--set", "split.seed=1,2,3", "--json"]);
    assert!(again["points"].as_array().unwrap().iter().all(|p| p["status"] == "done"), "{again}");
    assert_eq!(again["sweep_dir"], v["sweep_dir"]);
}

#[test]
fn sweep_from_the_file_with_parallel_jobs() {
    let p = Project::with_sample();
    p.write(
        "pipelines/p.toml",
        &format!("{SAMPLE_PIPELINE}\n[sweep.grid]\n\"split.seed\" = [1, 2]\n\"normalize.lowercase\" = [true, false]\n"),
    );
    let v = p.run_json(&["run", "pipelines/p.toml", "--sweep", "--jobs", "2", "--json"]);
    assert_eq!(v["status"], "ok", "{v}");
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    let recs: Vec<serde_json::Value> = points.iter().map(|pt| record(pt["run_dir"].as_str().unwrap())).collect();
    let ran = |id: &str| recs.iter().filter(|r| stage_status(r, id) == "ran").count();
    assert_eq!(ran("load"), 1, "shared stage computed once even with two jobs");
    assert_eq!(ran("normalize"), 2);
    assert_eq!(ran("split"), 4);
}

#[test]
fn interrupted_sweep_reruns_only_unfinished_points() {
    // Large enough that split takes a moment in each point.
    let p = Project::new();
    let mut s = String::from("\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n");
    for i in 0..300_000 {
        s.push_str(&format!(
            "{i},{},\"Title {i}\",\"query {}\",{}\n",
            100000 + i % 5000,
            i % 30000,
            ["1", "2", "2.33", "3"][i % 4]
        ));
    }
    p.write("data/train.csv", &s);
    p.write(
        "pipelines/p.toml",
        &SAMPLE_PIPELINE.replace("descriptions = \"data/product_descriptions.csv\"", "descriptions = \"\""),
    );
    let args = ["sweep", "pipelines/p.toml", "--set", "split.seed=1,2,3", "--json"];
    let mut child = p.command(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let runs = p.path("artifacts/runs/p");
    let start = Instant::now();
    // Wait for point 2's record to appear, i.e. the sweep is inside its second point.
    loop {
        let second = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .any(|sweep| sweep.path().join("seed=2").join("run.json").exists());
        if second {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "sweep never reached point 2");
        assert!(child.try_wait().unwrap().is_none(), "sweep finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let v = p.run_json(&args);
    let st: Vec<&str> = v["points"].as_array().unwrap().iter().map(|p| p["status"].as_str().unwrap()).collect();
    assert_eq!(st, ["done", "ok", "ok"], "{v}");
}

fn mask(s: &str, p: &Project) -> String {
    let root = p.dir.path().display().to_string();
    let mut out = s.replace(&root, "<tmp>");
    // Sweep ids depend only on the pipeline, but keep snapshots independent of the key schema.
    while let Some(i) = out.find("sweep-") {
        out.replace_range(i..i + 18, "<sweep>");
    }
    out
}

#[test]
fn compare_lists_runs_from_two_stores_in_every_format() {
    let p = Project::with_sample();
    p.run_json(&["sweep", "pipelines/p.toml", "--set", "split.seed=1,2", "--json"]);
    // A second store somewhere else, as if copied from another machine.
    let copy =
        std::process::Command::new("cp").args(["-r", "artifacts", "elsewhere"]).current_dir(p.dir.path()).status();
    assert!(copy.unwrap().success());
    for (fmt, name) in
        [("table", "compare_table"), ("markdown", "compare_markdown"), ("csv", "compare_csv"), ("json", "compare_json")]
    {
        let out = p.ok(&["compare", "artifacts", "elsewhere", "--format", fmt]);
        insta::assert_snapshot!(name, mask(&out.stdout, &p));
    }
}

#[test]
fn compare_two_runs_shows_diff_and_best() {
    let p = Project::new();
    let rec = |lr: f64, ndcg: f64, loss: f64, secs: f64| {
        serde_json::json!({
            "pipeline": "q", "run_id": format!("run-lr{lr}"), "status": "ok", "started": format!("2026-01-01T00:00:0{}Z", (lr * 1e6) as i64),
            "stages": [
                {"id": "train", "kind": "train", "params": {"learning_rate": lr, "epochs": 3}, "metrics": {"val_loss": loss, "train_seconds": secs}},
                {"id": "evaluate", "kind": "evaluate", "params": {}, "metrics": {"test": {"ndcg@10": ndcg, "auc": ndcg - 0.2}, "val": {"ndcg@10": 0.5}}}
            ]
        })
    };
    p.write("a/run.json", &rec(5e-6, 0.93, 0.41, 120.0).to_string());
    p.write("b/run.json", &rec(1e-5, 0.95, 0.39, 118.5).to_string());
    insta::assert_snapshot!("compare_two_table", p.ok(&["compare", "a", "b"]).stdout);
    insta::assert_snapshot!(
        "compare_two_markdown_sorted",
        p.ok(&["compare", "a", "b", "--format", "markdown", "--sort", "val_loss"]).stdout
    );
    p.ok(&["compare", "a", "b", "--plot", "sweep.svg"]);
    let svg = std::fs::read_to_string(p.path("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg xmlns"), "a standalone SVG document");
    assert_eq!(svg.matches("<svg").count(), 1 + 4, "one chart per metric against the one varying parameter");
    assert!(svg.contains("evaluate.test.ndcg@10 against train.learning_rate"));
    let out = p.pipe(&["compare", "a", "--plot", "one.svg"]);
    assert_eq!(out.code, 2, "a single run varies nothing: {out}");
    assert!(out.stderr.contains("nothing to draw"), "{out}");
    let out = p.pipe(&["compare", "a", "b", "--metrics", "bogus"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unknown metric `bogus`"), "{out}");
    let out = p.pipe(&["compare", "nowhere"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("no run records"), "{out}");
}

#[test]
fn quickstart_sweep_over_a_train_parameter_shares_the_data_stages() {
    let p = Project::new();
    for f in ["train.csv", "product_descriptions.csv"] {
        std::fs::copy(crate::util::repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    std::fs::copy(crate::util::repo().join("pipelines/quickstart.toml"), p.path("pipelines/quickstart.toml")).unwrap();
    let v = p.run_json(&[
        "run",
        "pipelines/quickstart.toml",
        "--set",
        "train.learning_rate=1e-3,2e-3,3e-3",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.epochs=1",
        "--json",
    ]);
    assert_eq!(v["status"], "ok", "{v}");
    let recs: Vec<serde_json::Value> =
        v["points"].as_array().unwrap().iter().map(|pt| record(pt["run_dir"].as_str().unwrap())).collect();
    assert_eq!(recs.len(), 3);
    let count = |id: &str, st: &str| recs.iter().filter(|r| stage_status(r, id) == st).count();
    for shared in ["load", "normalize", "split", "tokenize"] {
        assert_eq!((count(shared, "ran"), count(shared, "cached")), (1, 2), "{shared} computed once");
    }
    for per_point in ["train", "evaluate", "analyze"] {
        assert_eq!(count(per_point, "ran"), 3, "{per_point} once per point");
    }
    // The points compare side by side, the learning rate being the one varying parameter.
    let table = p.ok(&["compare", v["sweep_dir"].as_str().unwrap(), "--format", "csv"]).stdout;
    let header = table.lines().next().unwrap();
    assert!(header.contains("train.learning_rate") && header.contains("evaluate.test.ndcg@10"), "{header}");
    assert_eq!(table.lines().count(), 4, "{table}");
}
