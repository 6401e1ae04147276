//! Metrics against scikit-learn (committed fixtures and documented examples), against brute force
//! over tie orders, and properties that must hold for any predictions.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::Value;

use super::*;

fn pred(query: &str, relevance: f64, score: f64) -> Prediction {
    Prediction { query: query.to_string(), relevance, score, label: None }
}

fn labelled(query: &str, relevance: f64, score: f64, label: bool) -> Prediction {
    Prediction { label: Some(label), ..pred(query, relevance, score) }
}

/// One query from raw gains (relevance = gain + 1 under the linear gain).
fn query_from_gains(gains: &[f64], scores: &[f64]) -> Vec<Prediction> {
    gains.iter().zip(scores).map(|(g, s)| pred("q", g + 1.0, *s)).collect()
}

fn one_query(rows: &[Prediction], opts: &Options) -> QueryMetrics {
    let mut per = per_query(rows, opts).unwrap();
    assert_eq!(per.len(), 1);
    per.pop().unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

// ---- scikit-learn's and scipy's documented examples ------------------------------------------

#[test]
fn ndcg_matches_the_scikit_learn_docstring() {
    let gains = [10.0, 0.0, 0.0, 1.0, 5.0];
    let cases: [(&[f64; 5], usize, f64); 4] = [
        (&[0.1, 0.2, 0.3, 4.0, 70.0], 5, 0.6956940443813076),
        (&[0.05, 1.1, 1.0, 0.5, 0.0], 5, 0.493680191377376),
        (&[0.05, 1.1, 1.0, 0.5, 0.0], 4, 0.3520241100634488),
        // Two items tied for first with gains 10 and 5: the tie-averaged answer, not 1.0 or 0.5.
        (&[1.0, 0.0, 0.0, 0.0, 1.0], 1, 0.75),
    ];
    for (scores, k, want) in cases {
        let opts = Options { ks: vec![k], ..Options::default() };
        let got = one_query(&query_from_gains(&gains, scores), &opts).ndcg[0].1.unwrap();
        assert!(close(got, want), "scores {scores:?} k={k}: {got} vs {want}");
    }
}

#[test]
fn average_precision_and_auc_match_scikit_learn_docstrings() {
    let scores = [0.1, 0.4, 0.35, 0.8];
    let labels = [false, false, true, true];
    let rows: Vec<_> = scores.iter().zip(labels).map(|(&s, l)| labelled("q", 2.0, s, l)).collect();
    let q = one_query(&rows, &Options::default());
    assert!(close(q.average_precision.unwrap(), 0.8333333333333333));
    assert!(close(roc_auc(&scores, &labels).unwrap(), 0.75));

    // A tie between a relevant and an irrelevant candidate enters as one precision-recall step.
    let rows = [
        labelled("q", 2.0, 0.5, true),
        labelled("q", 2.0, 0.5, false),
        labelled("q", 2.0, 0.2, true),
        labelled("q", 2.0, 0.9, false),
    ];
    let q = one_query(&rows, &Options::default());
    assert!(close(q.average_precision.unwrap(), 0.41666666666666663));
}

#[test]
fn spearman_matches_the_scipy_docstring() {
    let rows: Vec<_> =
        [5.0, 6.0, 7.0, 8.0, 7.0].iter().zip([1.0, 2.0, 3.0, 4.0, 5.0]).map(|(&rel, s)| pred("q", rel, s)).collect();
    let q = one_query(&rows, &Options::default());
    assert!(close(q.spearman.unwrap(), 0.8207826816681233));
}

// ---- conventions -----------------------------------------------------------------------------

#[test]
fn ties_count_as_the_average_over_their_orders() {
    // Two tied candidates, one relevant: first half the time.
    let rows = [pred("q", 3.0, 0.5), pred("q", 1.0, 0.5)];
    let q = one_query(&rows, &Options::default());
    assert!(close(q.reciprocal_rank.unwrap(), (1.0 + 0.5) / 2.0));
    assert!(close(q.precision_at[0].1.unwrap(), 0.5));
    assert!(close(q.spearman.unwrap(), 0.0));
    let scores = [0.5, 0.5];
    assert!(close(roc_auc(&scores, &[true, false]).unwrap(), 0.5));
}

#[test]
fn degenerate_queries_are_left_out_of_the_means() {
    let rows = [
        pred("single", 3.0, 0.9),
        pred("zero gains", 1.0, 0.1),
        pred("zero gains", 1.0, 0.7),
        pred("all relevant", 3.0, 0.2),
        pred("all relevant", 2.5, 0.8),
        // A real query the model orders wrongly: it alone sets the ranking means.
        pred("real", 3.0, 0.1),
        pred("real", 1.0, 0.9),
    ];
    let opts = Options { ks: vec![1], ..Options::default() };
    let m = compute(&rows, &opts).unwrap();
    assert_eq!(m.queries, 4);
    assert_eq!(m.pairs, 7);
    // `all relevant` has unequal gains, so NDCG counts it; its labels are all equal, so MAP does not.
    assert_eq!(m.coverage, Coverage { ndcg: 2, binary: 1, spearman: 2 });
    let real = 0.0;
    let all_relevant = 1.5 / 2.0; // gains 2 and 1.5, the lower one ranked first
    assert!(close(m.ndcg[0].1.unwrap(), (real + all_relevant) / 2.0));
    assert!(close(m.map.unwrap(), 0.5));
    assert!(close(m.mrr.unwrap(), 0.5));
    assert!(close(m.precision_at[0].1.unwrap(), 0.0));

    let per = per_query(&rows, &opts).unwrap();
    let single = per.iter().find(|q| q.query == "single").unwrap();
    assert_eq!(single.ndcg[0].1, None);
    assert_eq!(single.average_precision, None);
    assert_eq!(single.reciprocal_rank, None);
    assert_eq!(single.spearman, None);

    let only_singles = [pred("a", 3.0, 0.9), pred("b", 1.0, 0.2)];
    let m = compute(&only_singles, &Options::default()).unwrap();
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["ndcg@10"], Value::Null);
    assert_eq!(json["map"], Value::Null);
    assert!(close(m.auc.unwrap(), 1.0));
}

#[test]
fn classification_counts_a_score_at_the_threshold_as_positive() {
    let c = classify(&[0.5, 0.4, 0.6, 0.1], &[true, true, false, false], 0.5);
    assert!(close(c.accuracy, 0.5));
    assert!(close(c.precision, 0.5));
    assert!(close(c.recall, 0.5));
    assert!(close(c.f1, 0.5));
    let none_predicted = classify(&[0.1, 0.2], &[true, false], 0.9);
    assert_eq!((none_predicted.precision, none_predicted.f1), (0.0, 0.0));
}

#[test]
fn tuned_threshold_maximises_f1_and_sits_between_scores() {
    let scores = [0.9, 0.8, 0.3, 0.1];
    let labels = [true, false, true, false];
    // Cuts give F1 2/3, 1/2, 4/5, 2/3: the best keeps 0.3 and drops 0.1.
    let t = tune_threshold(&scores, &labels).unwrap();
    assert!(close(t.f1, 0.8));
    assert!(close(t.threshold, 0.2));
    assert!(close(classify(&scores, &labels, t.threshold).f1, t.f1));
    assert_eq!(tune_threshold(&scores, &[false; 4]), None);
}

#[test]
fn isotonic_pools_violators_and_interpolates() {
    let iso = Isotonic::fit(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
    let at = |s: f64| iso.predict(s);
    assert!(close(at(2.0), 2.5) && close(at(3.0), 2.5));
    assert!(close(at(3.5), 3.25));
    assert!(close(at(0.0), 1.0) && close(at(9.0), 4.0));
    // Equal scores are merged first (mean 2 with weight 2), then pooled with the lower 1 after them.
    let iso = Isotonic::fit(&[1.0, 1.0, 2.0], &[1.0, 3.0, 1.0]).unwrap();
    assert!(close(iso.predict(1.0), 5.0 / 3.0) && close(iso.predict(2.0), 5.0 / 3.0));
    assert_eq!(Isotonic::fit(&[], &[]), None);
}

#[test]
fn json_has_exactly_the_published_keys_in_order() {
    let rows = [pred("q", 3.0, 0.9), pred("q", 1.0, 0.2), pred("r", 2.0, 0.4)];
    let keys = |opts: &Options| -> Vec<String> {
        let v = serde_json::to_value(compute(&rows, opts).unwrap()).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    let want = "ndcg@1 ndcg@3 ndcg@5 ndcg@10 map mrr p@1 p@3 p@5 p@10 accuracy precision recall f1 \
                auc spearman rmse queries pairs";
    assert_eq!(keys(&Options::default()).join(" "), want);
    let custom = Options { ks: vec![20, 2, 20], ..Options::default() };
    assert_eq!(
        keys(&custom).join(" "),
        "ndcg@2 ndcg@20 map mrr p@2 p@20 accuracy precision recall f1 auc spearman rmse queries pairs"
    );
    let v = serde_json::to_value(compute(&rows, &Options::default()).unwrap()).unwrap();
    assert_eq!(v["queries"], 2);
    assert_eq!(v["pairs"], 3);
}

#[test]
fn options_deserialise_with_defaults_and_reject_unknown_keys() {
    let o: Options = serde_json::from_str(r#"{"gain": "exp", "ks": [1, 5]}"#).unwrap();
    assert_eq!(o.gain, Gain::Exp);
    assert_eq!(o.ks, vec![1, 5]);
    assert_eq!(o.threshold, 0.5);
    assert!(serde_json::from_str::<Options>(r#"{"treshold": 0.3}"#).is_err());
}

#[test]
fn bad_input_is_a_typed_error() {
    let rows = [pred("q", 2.0, 0.5)];
    let opts = |ks: Vec<usize>| Options { ks, ..Options::default() };
    assert_eq!(compute(&[], &Options::default()), Err(MetricsError::Empty));
    assert_eq!(compute(&rows, &opts(vec![])), Err(MetricsError::NoCutoffs));
    assert_eq!(compute(&rows, &opts(vec![3, 0])), Err(MetricsError::ZeroCutoff));
    let nan = [pred("q", 2.0, f64::NAN)];
    assert!(matches!(compute(&nan, &Options::default()), Err(MetricsError::NonFinite { what: "score", .. })));
    let low = [pred("q", 0.5, 0.1)];
    let err = compute(&low, &Options::default()).unwrap_err();
    assert_eq!(err, MetricsError::NegativeGain { query: "q".into(), relevance: 0.5 });
    assert!(err.to_string().contains("query `q`"));
}

// ---- reader ----------------------------------------------------------------------------------

fn parse(text: &str) -> Result<Vec<Prediction>, ReadError> {
    parse_predictions(text.as_bytes(), "preds.csv")
}

#[test]
fn reader_finds_columns_by_name_and_ignores_the_rest() {
    let text = "id,score,query,title,label,relevance\n\
                7,0.25,angle bracket,\"Bracket, 12 ga\",1,2.33\n\
                8, 0.5 ,angle bracket,x,,1.0\n\
                9,1e-3,l bracket,y,false,3\n";
    let rows = parse(text).unwrap();
    assert_eq!(
        rows,
        vec![
            labelled("angle bracket", 2.33, 0.25, true),
            pred("angle bracket", 1.0, 0.5),
            labelled("l bracket", 3.0, 0.001, false),
        ]
    );
}

#[test]
fn reader_errors_name_the_file_line_and_expectation() {
    let msg = |text: &str| parse(text).unwrap_err().to_string();
    let m = msg("query,relevance\nq,2\n");
    assert!(m.starts_with("preds.csv:1:") && m.contains("`score` is missing"), "{m}");
    let m = msg("query,relevance,score\nq,2,0.5\nq,abc,0.1\n");
    assert_eq!(m, "preds.csv:3: column `relevance`: expected a finite number, found `abc`");
    let m = msg("query,relevance,score\nq,2,NaN\n");
    assert!(m.starts_with("preds.csv:2: column `score`"), "{m}");
    let m = msg("query,relevance,score,label\nq,2,0.5,yes\n");
    assert!(m.starts_with("preds.csv:2: column `label`: expected 0 or 1"), "{m}");
    let m = msg("query,relevance,score\nq,2,0.5\nq,2\n");
    assert!(m.starts_with("preds.csv:3: expected 3 fields"), "{m}");
    let m = msg("query,score,relevance,score\nq,1,2,3\n");
    assert!(m.contains("`score` appears more than once"), "{m}");
    assert!(matches!(parse("query,relevance,score\n"), Err(ReadError::Empty { .. })));
    let missing = read_predictions(Path::new("no/such/predictions.csv")).unwrap_err();
    assert!(missing.to_string().starts_with("no/such/predictions.csv: "), "{missing}");
}

// ---- table -----------------------------------------------------------------------------------

#[test]
fn table_aligns_columns_and_marks_undefined_values() {
    let a = compute(&[pred("q", 3.0, 0.9), pred("q", 1.0, 0.2)], &Options::default()).unwrap();
    let b = compute(&[pred("only", 3.0, 0.9)], &Options::default()).unwrap();
    let text = render_table(&[("val", &a), ("single", &b)]);
    let lines: Vec<&str> = text.lines().collect();
    let table = &lines[..lines.len() - 1];
    assert!(table[0].starts_with("metric") && table[0].ends_with("single"));
    assert!(table.iter().all(|l| l.len() == table[0].len()), "{text}");
    let ndcg10 = table.iter().find(|l| l.starts_with("ndcg@10 ")).unwrap();
    assert!(ndcg10.contains("1.0000") && ndcg10.ends_with("n/a"), "{ndcg10}");
    assert!(table.iter().any(|l| l.starts_with("queries in map/mrr/p@k")));
    assert_eq!(render_table(&[]), "");
}

// ---- fixtures computed by scikit-learn -------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics")
}

fn assert_close_json(what: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Null, Value::Null) => {}
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-9, "{what}: pipe {g} vs scikit-learn {w}");
        }
        _ => panic!("{what}: pipe {got} vs scikit-learn {want}"),
    }
}

fn assert_metrics(what: &str, got: &Metrics, want: &Value) {
    let got = serde_json::to_value(got).unwrap();
    let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>(), "{what}: keys");
    for (key, want) in w {
        assert_close_json(&format!("{what} {key}"), &g[key], want);
    }
}

fn check_fixture(case: &str, expected: &Value) {
    let opts: Options = serde_json::from_value(expected["options"].clone()).unwrap();
    let dir = fixture_dir();
    let test = read_predictions(&dir.join(format!("{case}.test.csv"))).unwrap();
    let val = read_predictions(&dir.join(format!("{case}.val.csv"))).unwrap();

    let split = evaluate_split(&val, &test, &opts).unwrap();
    assert_metrics(&format!("{case} test"), &split.test, &expected["test"]);
    assert_metrics(&format!("{case} val"), &split.val, &expected["val"]);
    // `compute` calibrates in-sample, which for validation is what `evaluate_split` does too.
    assert_eq!(compute(&val, &opts).unwrap(), split.val);
    for (name, m) in [("test", &split.test), ("val", &split.val)] {
        let want: Coverage = serde_json::from_value(expected["coverage"][name].clone()).unwrap();
        assert_eq!(m.coverage, want, "{case} {name} coverage");
    }

    match (&split.tuned, &expected["tuned"]) {
        (None, Value::Null) => {}
        (Some(t), want) if !want.is_null() => {
            let got = serde_json::to_value(t).unwrap();
            for key in ["threshold", "val_f1"] {
                assert_close_json(&format!("{case} tuned {key}"), &got[key], &want[key]);
            }
            for key in ["accuracy", "precision", "recall", "f1"] {
                let what = format!("{case} tuned test {key}");
                assert_close_json(&what, &got["test"][key], &want["test"][key]);
            }
        }
        (got, want) => panic!("{case} tuned: pipe {got:?} vs scikit-learn {want}"),
    }

    let per = per_query(&test, &opts).unwrap();
    let want_per = expected["per_query"].as_object().unwrap();
    assert_eq!(per.len(), want_per.len(), "{case}: number of queries");
    for q in &per {
        let want = &want_per[&q.query];
        let what = |m: &str| format!("{case} query `{}` {m}", q.query);
        let num = |v: Option<f64>| serde_json::to_value(v).unwrap();
        for &(k, v) in &q.ndcg {
            assert_close_json(&what(&format!("ndcg@{k}")), &num(v), &want[format!("ndcg@{k}")]);
        }
        for &(k, v) in &q.precision_at {
            assert_close_json(&what(&format!("p@{k}")), &num(v), &want[format!("p@{k}")]);
        }
        assert_close_json(&what("ap"), &num(q.average_precision), &want["ap"]);
        assert_close_json(&what("rr"), &num(q.reciprocal_rank), &want["rr"]);
        assert_close_json(&what("spearman"), &num(q.spearman), &want["spearman"]);
    }
}

#[test]
fn every_metric_equals_scikit_learn_on_the_committed_fixtures() {
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(case) = name.strip_suffix(".expected.json") {
            let text = std::fs::read_to_string(fixture_dir().join(&name)).unwrap();
            check_fixture(case, &serde_json::from_str(&text).unwrap());
            cases.push(case.to_string());
        }
    }
    cases.sort();
    assert_eq!(cases, ["cutoffs", "degenerate", "random", "singles", "ties"]);
}

// ---- brute force over tie orders -------------------------------------------------------------

/// Every permutation of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

/// NDCG@k, RR and P@k averaged over every order of the candidates consistent with the scores.
fn brute_force(rows: &[Prediction], k: usize) -> (f64, f64, f64) {
    let gains: Vec<f64> = rows.iter().map(|r| r.relevance - 1.0).collect();
    let labels: Vec<bool> = rows.iter().map(|r| r.relevance >= 2.33).collect();
    let mut ideal = gains.clone();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let dcg = |g: &mut dyn Iterator<Item = f64>| -> f64 {
        g.take(k).enumerate().map(|(i, g)| g / ((i + 2) as f64).log2()).sum()
    };
    let idcg = dcg(&mut ideal.iter().copied());
    let cut = k.min(rows.len());
    let (mut n, mut ndcg, mut rr, mut p) = (0.0, 0.0, 0.0, 0.0);
    for perm in permutations(rows.len()) {
        if perm.windows(2).any(|w| rows[w[0]].score < rows[w[1]].score) {
            continue;
        }
        n += 1.0;
        ndcg += dcg(&mut perm.iter().map(|&i| gains[i])) / idcg;
        rr += perm.iter().position(|&i| labels[i]).map_or(0.0, |r| 1.0 / (r + 1) as f64);
        p += perm[..cut].iter().filter(|&&i| labels[i]).count() as f64 / cut as f64;
    }
    (ndcg / n, rr / n, p / n)
}

// ---- properties ------------------------------------------------------------------------------

const LEVELS: [f64; 13] = [1.0, 1.25, 1.33, 1.5, 1.67, 1.75, 2.0, 2.25, 2.33, 2.5, 2.67, 2.75, 3.0];

/// Integer scores force ties; continuous ones exercise the general case.
fn score() -> impl Strategy<Value = f64> {
    prop_oneof![(-5i32..5).prop_map(f64::from), -100.0..100.0f64]
}

fn rows(max: usize) -> impl Strategy<Value = Vec<Prediction>> {
    let row = (0..6usize, 0..LEVELS.len(), score(), proptest::option::of(any::<bool>()));
    proptest::collection::vec(row, 1..max).prop_map(|v| {
        v.into_iter()
            .map(|(q, l, score, label)| Prediction { query: format!("q{q}"), relevance: LEVELS[l], score, label })
            .collect()
    })
}

/// Integer scores in -20..=20, where the transforms below are exact and keep distinct scores apart.
fn integer_rows() -> impl Strategy<Value = Vec<Prediction>> {
    rows(60).prop_map(|rows| {
        let int = |r: Prediction| Prediction { score: r.score.round().clamp(-20.0, 20.0), ..r };
        rows.into_iter().map(int).collect()
    })
}

/// Rows and the same rows in another order.
fn with_shuffle(max: usize) -> impl Strategy<Value = (Vec<Prediction>, Vec<Prediction>)> {
    rows(max).prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle()))
}

fn tuned_f1(rows: &[Prediction]) -> Option<f64> {
    let scores: Vec<f64> = rows.iter().map(|r| r.score).collect();
    let labels: Vec<bool> = rows.iter().map(|r| r.label.unwrap_or(r.relevance >= 2.33)).collect();
    tune_threshold(&scores, &labels).map(|t| t.f1)
}

fn opts_strategy() -> impl Strategy<Value = Options> {
    (proptest::collection::vec(1usize..12, 1..4), prop_oneof![Just(Gain::Linear), Just(Gain::Exp)])
        .prop_map(|(ks, gain)| Options { ks, gain, ..Options::default() })
}

fn ranking_values(m: &Metrics) -> Vec<Option<f64>> {
    let mut v: Vec<Option<f64>> = m.ndcg.iter().chain(&m.precision_at).map(|x| x.1).collect();
    v.extend([m.map, m.mrr, m.auc, m.spearman, Some(m.rmse)]);
    v
}

fn assert_all_close(a: &[Option<f64>], b: &[Option<f64>]) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Some(x), Some(y)) => prop_assert!(close(*x, *y), "{:?} vs {:?}", a, b),
            _ => prop_assert_eq!(x, y),
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn metrics_stay_in_range(rows in rows(60), opts in opts_strategy()) {
        let m = compute(&rows, &opts).unwrap();
        for (key, v) in m.entries() {
            let Some(v) = v else { continue };
            let (lo, hi) = match key.as_str() {
                "spearman" => (-1.0, 1.0),
                "rmse" => (0.0, 2.0),
                _ => (0.0, 1.0),
            };
            prop_assert!((lo - 1e-12..=hi + 1e-12).contains(&v), "{} = {}", key, v);
        }
        prop_assert_eq!(m.pairs, rows.len());
        prop_assert!(m.coverage.ndcg <= m.queries && m.coverage.binary <= m.queries);
    }

    #[test]
    fn ranking_by_relevance_is_ideal(rows in rows(60), opts in opts_strategy()) {
        let ideal: Vec<Prediction> = rows
            .iter()
            .map(|r| Prediction { score: r.relevance, label: None, ..r.clone() })
            .collect();
        let m = compute(&ideal, &opts).unwrap();
        for (_, v) in &m.ndcg {
            if let Some(v) = v { prop_assert!(close(*v, 1.0), "ndcg {}", v) }
        }
        for v in [m.map, m.mrr, m.auc, m.spearman].into_iter().flatten() {
            prop_assert!(close(v, 1.0), "{:?}", m);
        }
    }

    #[test]
    fn reversing_scores_reflects_auc_and_spearman(rows in rows(60)) {
        let reversed: Vec<Prediction> =
            rows.iter().map(|r| Prediction { score: -r.score, ..r.clone() }).collect();
        let (a, b) = (compute(&rows, &Options::default()).unwrap(),
                      compute(&reversed, &Options::default()).unwrap());
        prop_assert_eq!(a.auc.is_some(), b.auc.is_some());
        if let (Some(x), Some(y)) = (a.auc, b.auc) { prop_assert!(close(x, 1.0 - y)) }
        if let (Some(x), Some(y)) = (a.spearman, b.spearman) { prop_assert!(close(x, -y)) }
    }

    #[test]
    fn a_monotone_transform_of_scores_changes_nothing_but_the_threshold_metrics(
        rows in integer_rows(),
        opts in opts_strategy(),
    ) {
        let base = compute(&rows, &opts).unwrap();
        let transforms: [fn(f64) -> f64; 2] =
            [|s| s * s * s + 7.0 * s + 0.5, |s| 1.0 / (1.0 + (-s / 4.0).exp())];
        for f in transforms {
            let moved: Vec<Prediction> =
                rows.iter().map(|r| Prediction { score: f(r.score), ..r.clone() }).collect();
            let m = compute(&moved, &opts).unwrap();
            assert_all_close(&ranking_values(&base), &ranking_values(&m))?;
            prop_assert_eq!(base.coverage, m.coverage);
            assert_all_close(&[tuned_f1(&rows)], &[tuned_f1(&moved)])?;
        }
    }

    #[test]
    fn the_order_of_rows_does_not_matter(
        (rows, shuffled) in with_shuffle(60),
        (val, val_shuffled) in with_shuffle(30),
        opts in opts_strategy(),
    ) {
        prop_assert_eq!(compute(&rows, &opts).unwrap(), compute(&shuffled, &opts).unwrap());
        prop_assert_eq!(per_query(&rows, &opts).unwrap(), per_query(&shuffled, &opts).unwrap());
        prop_assert_eq!(
            evaluate_split(&val, &rows, &opts).unwrap(),
            evaluate_split(&val_shuffled, &shuffled, &opts).unwrap()
        );
    }

    #[test]
    fn tie_handling_is_the_mean_over_tie_orders(
        rels in proptest::collection::vec(0..LEVELS.len(), 2..7),
        scores in proptest::collection::vec(0i32..3, 7),
        k in 1usize..8,
    ) {
        let rows: Vec<Prediction> =
            rels.iter().zip(&scores).map(|(&l, &s)| pred("q", LEVELS[l], f64::from(s))).collect();
        let q = one_query(&rows, &Options { ks: vec![k], ..Options::default() });
        let (ndcg, rr, p) = brute_force(&rows, k);
        if let Some(v) = q.ndcg[0].1 { prop_assert!(close(v, ndcg), "ndcg {} vs {}", v, ndcg) }
        if let Some(v) = q.reciprocal_rank { prop_assert!(close(v, rr), "rr {} vs {}", v, rr) }
        if let Some(v) = q.precision_at[0].1 { prop_assert!(close(v, p), "p@k {} vs {}", v, p) }
    }
}
