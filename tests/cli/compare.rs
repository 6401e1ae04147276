//! `pipe compare` says whether a difference is real: intervals from each run's evaluate predictions,
//! paired differences against `--baseline`, ties within noise when sorting.

use pipe::metrics::{compute, Options, Prediction};

use crate::util::Project;

/// Query `q`'s candidate `c`: relevance, and a score that tracks it with `skill` plus noise.
fn pair(q: usize, c: usize, skill: f64, noise_seed: u64) -> (f64, f64) {
    let relevance = [1.0, 2.0, 2.33, 2.67, 3.0][(q * 7 + c * 3) % 5];
    let mut z = (q as u64 * 131 + c as u64 * 17 + noise_seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^= z >> 29;
    let noise = (z % 1000) as f64 / 1000.0;
    (relevance, skill * relevance / 3.0 + (1.0 - skill) * noise)
}

/// A store holding one run whose evaluate artifact has these test scores; returns its metrics.
fn write_run(p: &Project, store: &str, name: &str, skill: f64, seed: u64, product_offset: usize) {
    let key = format!("{:0<64}", format!("{name}key"));
    let mut csv = String::from("split,query,product_id,title,relevance,label,score,rank\n");
    let mut preds = Vec::new();
    for q in 0..40 {
        for c in 0..5 {
            let (relevance, score) = pair(q, c, skill, seed);
            let label = relevance >= 2.33;
            csv.push_str(&format!(
                "test,query {q},{},t,{relevance},{},{score},0\n",
                1000 + c + product_offset,
                label as u8
            ));
            preds.push(Prediction { query: format!("query {q}"), relevance, score, label: Some(label) });
        }
    }
    let m = compute(&preds, &Options::default()).unwrap();
    p.write(&format!("{store}/evaluate/{}/predictions.csv", &key[..20]), &csv);
    let record = serde_json::json!({
        "pipeline": "q", "run_id": name, "status": "ok", "started": format!("2026-01-01T00:00:00Z{name}"),
        "stages": [{
            "id": "evaluate", "kind": "evaluate", "key": key, "params": {"skill": skill},
            // Where it was written on another machine: only the store-relative lookup finds it.
            "dir": "/nonexistent/evaluate",
            "metrics": {"test": {"auc": m.auc, "ndcg@10": m.get("ndcg@10"), "map": m.map}}
        }]
    });
    p.write(&format!("{store}/runs/q/{name}/run.json"), &record.to_string());
}

#[test]
fn compare_with_a_baseline_shows_paired_intervals_and_ties() {
    let p = Project::new();
    write_run(&p, "artifacts", "weak", 0.2, 1, 0);
    write_run(&p, "artifacts", "strong", 0.8, 1, 0);
    // As weak, with other noise: within noise of it.
    write_run(&p, "artifacts", "weak-again", 0.2, 2, 0);
    // Scored other products: no paired interval against the others.
    write_run(&p, "artifacts", "other-pairs", 0.5, 3, 50);
    let args = ["compare", "artifacts", "--metrics", "test.auc,test.ndcg@10", "--baseline", "weak", "--sort", "auc"];
    let table = p.ok(&args).stdout;
    insta::assert_snapshot!("compare_baseline_table", table);
    assert!(table.contains("against weak"), "{table}");

    let v: serde_json::Value =
        serde_json::from_str(&p.ok(&[&args[..], &["--format", "json"]].concat()).stdout).unwrap();
    let u = &v["uncertainty"];
    assert_eq!(u["baseline"], "weak");
    let strong = &u["deltas"]["strong"]["evaluate.test.auc"];
    assert_eq!(strong["significant"], true, "{u}");
    assert!(strong["ci95"][0].as_f64().unwrap() > 0.0);
    let again = &u["deltas"]["weak-again"]["evaluate.test.auc"];
    assert_eq!(again["significant"], false, "{u}");
    assert!(u["deltas"]["other-pairs"]["evaluate.test.auc"]["ci95"].is_null(), "{u}");
    // Every run has its own interval, and it holds its value.
    for run in ["weak", "strong", "weak-again", "other-pairs"] {
        let ci = &u["intervals"][run]["evaluate.test.auc"];
        let value = v["runs"].as_array().unwrap().iter().find(|r| r["name"] == run).unwrap()["metrics"]
            ["evaluate.test.auc"]
            .as_f64()
            .unwrap();
        assert!(ci[0].as_f64().unwrap() <= value && value <= ci[1].as_f64().unwrap(), "{run}: {ci} vs {value}");
    }
    // Sorted by AUC, the strong run is first and nothing else is within noise of it.
    assert_eq!(v["runs"][0]["name"], "strong");
    assert_eq!(u["ties"], serde_json::json!([]), "{u}");

    insta::assert_snapshot!("compare_baseline_csv", p.ok(&[&args[..], &["--format", "csv"]].concat()).stdout);
    let out = p.pipe(&["compare", "artifacts", "--baseline", "nobody"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("--baseline nobody: no such run"), "{out}");
}

#[test]
fn sorting_marks_runs_within_noise_of_the_first() {
    let p = Project::new();
    write_run(&p, "artifacts", "weak", 0.2, 1, 0);
    write_run(&p, "artifacts", "weak-again", 0.2, 2, 0);
    write_run(&p, "artifacts", "strong", 0.8, 1, 0);
    let out = p.ok(&["compare", "artifacts", "--metrics", "test.auc", "--sort", "auc", "--format", "json"]).stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["runs"][0]["name"], "strong");
    assert_eq!(v["uncertainty"]["ties"], serde_json::json!([]));
    // Without the strong run, the two weak ones tie.
    let p2 = Project::new();
    write_run(&p2, "artifacts", "weak", 0.2, 1, 0);
    write_run(&p2, "artifacts", "weak-again", 0.2, 2, 0);
    let table = p2.ok(&["compare", "artifacts", "--metrics", "test.auc", "--sort", "auc"]).stdout;
    assert!(table.contains("≈ first"), "{table}");
    assert!(table.contains("tie: evaluate.test.auc within noise"), "{table}");
}
