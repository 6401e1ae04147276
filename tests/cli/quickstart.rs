//! The quickstart end to end — load → normalize → split → tokenize → train → evaluate → analyze on the
//! committed sample — produces a report.html that loads in headless Chromium without console errors and
//! with every plot drawn. Training is cut to a few steps here (`--set train.max_steps`); the full
//! quickstart is what the README's first command runs.

use std::time::Duration;

use crate::util::{repo, Project};

#[test]
fn quickstart_report_renders_every_plot_in_chromium() {
    let p = Project::new();
    for f in ["train.csv", "product_descriptions.csv"] {
        std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    std::fs::copy(repo().join("pipelines/quickstart.toml"), p.path("pipelines/quickstart.toml")).unwrap();
    let v = p.run_json(&[
        "run",
        "pipelines/quickstart.toml",
        "--set",
        "train.max_steps=12",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.epochs=1",
        "--json",
    ]);
    assert_eq!(v["status"], "ok", "{v}");
    let ids: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["load", "normalize", "split", "tokenize", "train", "evaluate", "analyze"]);
    let analyze = std::path::PathBuf::from(v["stages"][6]["dir"].as_str().unwrap());
    let html = analyze.join("report.html");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg"), "the report has inline SVG plots");
    let evaluate = std::path::PathBuf::from(v["stages"][5]["dir"].as_str().unwrap());
    for f in ["predictions.csv", "evaluation_metrics.json", "relevance_analysis.csv"] {
        assert!(evaluate.join(f).exists(), "evaluate wrote {f}");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(evaluate.join("evaluation_metrics.json")).unwrap()).unwrap();
    assert!(metrics["test"]["auc"].as_f64().is_some() && metrics["val"]["ndcg@10"].as_f64().is_some());
    if std::env::var("PIPE_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("PIPE_SKIP_BROWSER=1: not opening the report in Chromium");
        return;
    }
    let check = pipe::report::browser::check(&html, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("headless Chromium (install the Debian package `chromium`): {e}"));
    assert!(check.problems().is_empty(), "{:?}\n{}", check.problems(), check.verdict_text);
    // Loss curves included: the quickstart has a train stage upstream of analyze.
    assert!(check.verdict_text.starts_with("plots-ok"), "{}", check.verdict_text);
}
