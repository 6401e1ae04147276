//! `pipe metrics` on the committed scikit-learn fixtures: every metric of the test file, calibrated and
//! thresholds tuned on the val file, equals the generator's expectation within 1e-9.

use crate::util::{repo, Project};

#[test]
fn pipe_metrics_matches_the_sklearn_fixtures() {
    let p = Project::new();
    let dir = repo().join("tests/fixtures/metrics");
    let mut cases = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(case) = name.strip_suffix(".expected.json") else { continue };
        let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        let o = &expected["options"];
        let ks: Vec<String> = o["ks"].as_array().unwrap().iter().map(|k| k.to_string()).collect();
        let test = dir.join(format!("{case}.test.csv")).display().to_string();
        let val = dir.join(format!("{case}.val.csv")).display().to_string();
        let threshold = o["threshold"].to_string();
        let v = p.run_json(&[
            "metrics",
            &test,
            "--val",
            &val,
            "--k",
            &ks.join(","),
            "--threshold",
            &threshold,
            "--gain",
            o["gain"].as_str().unwrap(),
            "--json",
        ]);
        for (key, want) in expected["test"].as_object().unwrap() {
            let got = &v[key];
            match (want.as_f64(), got.as_f64()) {
                (Some(w), Some(g)) => assert!((w - g).abs() <= 1e-9, "{case}: {key}: pipe {g} vs sklearn {w}"),
                _ => assert_eq!(got, want, "{case}: {key}"),
            }
        }
        cases += 1;
    }
    assert!(cases >= 3, "fixture cases found: {cases}");
    let out = p.pipe(&["metrics", "missing.csv"]);
    assert_eq!(out.code, 2, "{out}");
}
