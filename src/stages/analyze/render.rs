//! `report.md` and `report.html` from an [`Analysis`]: the same sections and tables in both; the
//! HTML adds the charts.

use super::{Analysis, Lift, QuerySlice, Scores, System};
use crate::report::plots::{self, BarChart, BoxChart, BoxRow, LineChart, Mark, PlotError, Series, Svg};
use crate::report::{Cell, Page, Table};

/// One piece of the report, rendered to both formats.
enum Block {
    H2(String),
    H3(String),
    P(String),
    Note(String),
    Table(Table),
    Plot(&'static str, Svg),
}

fn f(v: Option<f64>) -> Cell {
    Cell::Num(v.map_or("-".into(), |v| format!("{v:.4}")))
}

fn signed(v: Option<f64>) -> Cell {
    Cell::Num(v.map_or("-".into(), |v| format!("{v:+.4}")))
}

/// A value with its interval, when it has one.
fn with_ci(v: Option<f64>, ci: Option<&[f64; 2]>) -> Cell {
    match (v, ci) {
        (Some(v), Some([lo, hi])) => Cell::Num(format!("{v:.4} [{lo:.4}, {hi:.4}]")),
        _ => f(v),
    }
}

/// Whether a lift is real, in words: the reports say it where the interval contains 0.
fn significance(l: &Lift) -> &'static str {
    match l.significant {
        Some(true) => "significant",
        Some(false) => "not significant",
        None => "-",
    }
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn results_table(a: &Analysis, val: bool) -> Table {
    let ks: Vec<String> = {
        let mut k = a.params.k.clone();
        k.sort_unstable();
        k.dedup();
        k.iter().map(|k| format!("ndcg@{k}")).collect()
    };
    let mut header: Vec<&str> = vec!["system"];
    header.extend(ks.iter().map(String::as_str));
    header.extend(["map", "mrr", "auc", "f1@0.5", "f1 (val-tuned)", "accuracy"]);
    let mut t = Table::new(&header);
    for s in &a.systems {
        let scores: &Scores = match (val, &s.val) {
            (false, _) => &s.test,
            (true, Some(v)) => v,
            (true, None) => continue,
        };
        // Test values carry their interval where one was computed (the headline metrics).
        let cell = |k: &str| if val { f(scores.get(k)) } else { with_ci(scores.get(k), s.test_ci95.get(k)) };
        let mut row = vec![Cell::text(&s.label)];
        row.extend(ks.iter().map(|k| cell(k)));
        for k in ["map", "mrr", "auc", "f1"] {
            row.push(cell(k));
        }
        row.push(f(if val { None } else { s.tuned_f1 }));
        row.push(f(scores.get("accuracy")));
        if s.id == "model" {
            t.highlight.push(t.rows.len());
        }
        t.row(row);
    }
    t
}

fn query_slice_table(first: &str, a: &Analysis, rows: &[QuerySlice]) -> Table {
    let nd = format!("ndcg@{}", a.headline_k);
    let bm = format!("BM25 {nd}");
    let mut t = Table::new(&[first, "queries", "pairs", "positive", &nd, &bm, "lift", "map", "mrr", "auc", "accuracy"]);
    for s in rows {
        t.row(vec![
            Cell::text(&s.name),
            Cell::Num(s.queries.to_string()),
            Cell::Num(s.pairs.to_string()),
            Cell::Num(if s.pairs == 0 { "-".into() } else { pct(s.positives as f64 / s.pairs as f64) }),
            f(s.ndcg),
            f(s.bm25_ndcg),
            signed(s.ndcg.zip(s.bm25_ndcg).map(|(m, b)| m - b)),
            f(s.map),
            f(s.mrr),
            f(s.auc),
            f((s.pairs > 0).then_some(s.accuracy)),
        ]);
    }
    t
}

fn blocks(a: &Analysis) -> Result<Vec<Block>, PlotError> {
    let mut b = Vec::new();
    let d = &a.data;
    let nd = format!("ndcg@{}", a.headline_k);
    b.push(Block::P(format!(
        "Test: {} queries, {} pairs ({} relevant). Validation: {} queries, {} pairs. Every system below is \
         measured by the same code on exactly these pairs.",
        d.test_queries,
        d.test_pairs,
        pct(d.test_positive_rate),
        d.val_queries,
        d.val_pairs
    )));
    let lift_of = |base: &str, metric: &str| a.lifts.iter().find(|l| l.baseline == base && l.metric == metric);
    // "+0.0123, 95 % interval [-0.0040, +0.0290], not significant"
    let lift_text = |l: &Lift| {
        let mut t = l.lift.map_or("-".into(), |v| format!("{v:+.4}"));
        if let Some([lo, hi]) = l.ci95 {
            t.push_str(&format!(", 95 % interval [{lo:+.4}, {hi:+.4}], {}", significance(l)));
        }
        t
    };
    if let (Some(r), Some(bm)) = (lift_of("random", &nd), lift_of("bm25", &nd)) {
        b.push(Block::P(format!(
            "Model {nd} {} against BM25 {} ({}) and a random order {} ({}). A random order scores high here \
             because most candidates of a query are relevant: read every number against the baselines.",
            r.model.map_or("-".into(), |v| format!("{v:.4}")),
            bm.base.map_or("-".into(), |v| format!("{v:.4}")),
            lift_text(bm),
            r.base.map_or("-".into(), |v| format!("{v:.4}")),
            lift_text(r),
        )));
    }
    let within_noise: Vec<String> = a
        .lifts
        .iter()
        .filter(|l| l.significant == Some(false))
        .map(|l| {
            format!("{} over {}", l.metric, a.system(&l.baseline).map_or(l.baseline.as_str(), |s| s.label.as_str()))
        })
        .collect();
    if !within_noise.is_empty() {
        b.push(Block::P(format!(
            "Not significant (the 95 % interval of the lift contains 0): {}.",
            within_noise.join("; ")
        )));
    }

    b.push(Block::H2("Results on test".into()));
    b.push(Block::Table(results_table(a, false)));
    b.push(Block::Note(format!(
        "Per-query metrics are means over the queries where they are defined (a query whose candidates all \
         share one relevance or one label is left out). \"random (exact expectation)\" is computed in closed \
         form; the sampled row is the mean of {} seeded random scorings (test {nd} sd {}). f1@0.5 thresholds \
         the raw score, which is meaningless for BM25; \"f1 (val-tuned)\" uses the threshold that maximises \
         F1 on validation.",
        a.random_seeds.seeds,
        a.random_seeds.test_sd.get(&nd).map_or("-".into(), |v| format!("{v:.4}")),
    )));

    b.push(Block::H2("Lift over the baselines (test)".into()));
    let mut lt = Table::new(&[
        "baseline",
        "metric",
        "model",
        "baseline value",
        "lift",
        "95 % interval",
        "p",
        "significance",
        "share of headroom",
    ]);
    for l in &a.lifts {
        let label = a.system(&l.baseline).map_or(l.baseline.as_str(), |s| s.label.as_str());
        lt.row(vec![
            Cell::text(label),
            Cell::text(&l.metric),
            f(l.model),
            f(l.base),
            signed(l.lift),
            Cell::Num(l.ci95.map_or("-".into(), |[lo, hi]| format!("[{lo:+.4}, {hi:+.4}]"))),
            Cell::Num(l.p_value.map_or("-".into(), |p| format!("{p:.3}"))),
            Cell::text(significance(l)),
            f(l.headroom),
        ]);
    }
    b.push(Block::Table(lt));
    b.push(Block::Note(format!(
        "Lift = model − baseline; share of headroom = lift / (1 − baseline). Intervals: {} bootstrap \
         resamples of the test queries (seed {}), every system on the same resamples, so a lift's interval \
         is paired; p = how often the resampled lift falls on the other side of 0, doubled. A lift whose \
         interval contains 0 is not significant: the data cannot tell it from noise.",
        a.params.bootstrap_resamples, a.params.bootstrap_seed
    )));

    let metrics = [nd.as_str(), "map", "mrr", "auc"];
    let bars = BarChart {
        title: "Model vs baselines (test)".into(),
        groups: metrics.iter().map(|m| m.to_string()).collect(),
        series: a
            .systems
            .iter()
            .filter(|s| s.id != "random_sampled")
            .map(|s| (s.label.clone(), metrics.iter().map(|m| s.test.get(m)).collect()))
            .collect(),
        y_range: Some(0.0..1.0),
    };
    b.push(Block::Plot("baselines", plots::bar_chart(&bars)?));

    b.push(Block::H2("Curves (test)".into()));
    if a.curves.roc.is_empty() {
        b.push(Block::Note("No ROC or precision-recall curve: the test pairs all share one label.".into()));
    } else {
        let roc = LineChart {
            title: "ROC curve (test)".into(),
            x_label: "false positive rate".into(),
            y_label: "true positive rate".into(),
            x_range: Some(0.0..1.0),
            y_range: Some(0.0..1.0),
            series: a
                .curves
                .roc
                .iter()
                .map(|(n, p)| Series {
                    name: format!("{n} (AUC {})", auc_of(a, n)),
                    points: p.clone(),
                    mark: Mark::Line,
                })
                .collect(),
            references: vec![[(0.0, 0.0), (1.0, 1.0)]],
        };
        b.push(Block::Plot("roc", plots::line_chart(&roc)?));
        let r = a.curves.test_positive_rate;
        let pr = LineChart {
            title: "Precision-recall curve (test)".into(),
            x_label: "recall".into(),
            y_label: "precision".into(),
            x_range: Some(0.0..1.0),
            y_range: Some(0.0..1.0),
            series: a
                .curves
                .pr
                .iter()
                .map(|(n, p)| Series { name: n.clone(), points: p.clone(), mark: Mark::Line })
                .collect(),
            references: vec![[(0.0, r), (1.0, r)]],
        };
        b.push(Block::Plot("pr", plots::line_chart(&pr)?));
        b.push(Block::Note(format!("Dashed: chance (the diagonal; precision = the positive rate {}).", pct(r))));
    }

    b.push(Block::H2("Scores by relevance grade (test)".into()));
    let rows: Vec<BoxRow> = a.score_by_relevance.iter().filter_map(|(g, s)| BoxRow::of(format!("{g}"), s)).collect();
    let (lo, hi) = a
        .score_by_relevance
        .iter()
        .flat_map(|(_, s)| s.iter())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    let x_range = if lo >= 0.0 && hi <= 1.0 { Some(0.0..1.0) } else { None };
    let boxes = BoxChart {
        title: "Model score per relevance grade (test)".into(),
        x_label: "score".into(),
        x_range,
        rows,
        name: "score: 25th–75th percentile, median bar, 5th–95th whiskers, mean dot".into(),
    };
    b.push(Block::Plot("scores", plots::box_chart(&boxes)?));
    let mut rt = Table::new(&[
        "relevance",
        "pairs",
        "labelled relevant",
        "mean score",
        "predicted relevant",
        "accuracy",
        "mean rank",
    ]);
    for s in &a.slices.relevance {
        rt.row(vec![
            Cell::text(format!("{}", s.relevance)),
            Cell::Num(s.pairs.to_string()),
            Cell::Num(pct(s.positives as f64 / s.pairs as f64)),
            f(Some(s.mean_score)),
            Cell::Num(pct(s.predicted_positive)),
            f(Some(s.accuracy)),
            Cell::Num(format!("{:.2}", s.mean_rank)),
        ]);
    }
    b.push(Block::Table(rt));

    b.push(Block::H2("Training".into()));
    match &a.training {
        None => b.push(Block::P(
            "No train stage upstream (a zero-shot evaluation): there is no training log, so no loss curves.".into(),
        )),
        Some(log) if log.train.is_empty() && log.val.is_empty() => {
            b.push(Block::P("The train stage's log has no loss lines: no loss curves.".into()))
        }
        Some(log) => {
            let chart = LineChart {
                title: "Loss".into(),
                x_label: "step".into(),
                y_label: "loss".into(),
                x_range: None,
                y_range: None,
                series: vec![
                    Series { name: "train loss".into(), points: log.train.clone(), mark: Mark::Line },
                    Series {
                        name: "validation loss".into(),
                        points: log.val.iter().map(|v| (v.0, v.1)).collect(),
                        mark: Mark::LinePoints,
                    },
                ],
                references: vec![],
            };
            b.push(Block::Plot("loss", plots::line_chart(&chart)?));
            let mut t = Table::new(&["", "value"]);
            let last = |v: &[(f64, f64)]| v.last().map(|p| p.1);
            t.row(vec![Cell::text("train steps logged"), Cell::Num(log.train.len().to_string())]);
            t.row(vec![Cell::text("final train loss"), f(last(&log.train))]);
            let best = log.val.iter().min_by(|x, y| x.1.total_cmp(&y.1));
            t.row(vec![Cell::text("best validation loss"), f(best.map(|v| v.1))]);
            t.row(vec![Cell::text("at step"), Cell::Num(best.map_or("-".into(), |v| format!("{}", v.0)))]);
            t.row(vec![Cell::text("last validation AUC"), f(log.val.last().and_then(|v| v.2))]);
            t.row(vec![Cell::text("last validation ndcg@10"), f(log.val.last().and_then(|v| v.3))]);
            t.row(vec![Cell::text("mean samples/s"), f(log.samples_per_sec)]);
            b.push(Block::Table(t));
        }
    }

    b.push(Block::H2("Error slices (test)".into()));
    b.push(Block::H3("By query length (words)".into()));
    b.push(Block::Table(query_slice_table("query length", a, &a.slices.query_length)));
    b.push(Block::H3("Queries with digits or units".into()));
    b.push(Block::Table(query_slice_table("query", a, &a.slices.digits_units)));
    b.push(Block::H3("Frequent vs long-tail queries".into()));
    b.push(Block::Table(query_slice_table("frequency", a, &a.slices.frequency)));
    b.push(Block::Note(format!(
        "Test queries never occur in train (the split groups by query: {} of {} do), so frequency is per word: \
         frequent = every word occurs in at least {} train queries; long tail = some word in fewer; unseen \
         word = some word in none.",
        d.test_queries_seen_in_train, d.test_queries, a.params.frequent_min
    )));

    b.push(Block::H2("Calibration (test)".into()));
    let cal = &a.calibration;
    let points: Vec<(f64, f64)> = cal.bins.iter().filter_map(|x| x.mean_score.zip(x.positive_rate)).collect();
    let chart = LineChart {
        title: "Reliability: positive rate per score bin (test)".into(),
        x_label: "mean score in bin".into(),
        y_label: "share relevant".into(),
        x_range: Some(0.0..1.0),
        y_range: Some(0.0..1.0),
        series: vec![Series { name: "model".into(), points, mark: Mark::LinePoints }],
        references: vec![[(0.0, 0.0), (1.0, 1.0)]],
    };
    if cal.out_of_range == 0 {
        b.push(Block::Plot("calibration", plots::line_chart(&chart)?));
    }
    let mut ct = Table::new(&["score bin", "pairs", "mean score", "share relevant"]);
    for x in &cal.bins {
        ct.row(vec![
            Cell::text(format!("[{:.2}, {:.2}{}", x.lo, x.hi, if x.hi >= 1.0 { "]" } else { ")" })),
            Cell::Num(x.count.to_string()),
            f(x.mean_score),
            f(x.positive_rate),
        ]);
    }
    b.push(Block::Table(ct));
    b.push(Block::Note(format!(
        "Expected calibration error {:.4} (Σ pairs/N · |mean score − share relevant|).{}",
        cal.ece,
        if cal.out_of_range > 0 {
            format!(
                " {} scores lie outside [0, 1] and were put in the end bins; no reliability chart.",
                cal.out_of_range
            )
        } else {
            String::new()
        }
    )));

    b.push(Block::H2("Most confident errors (test)".into()));
    for (title, list) in [
        ("Irrelevant pairs scored highest (false positives)", &a.errors.false_positives),
        ("Relevant pairs scored lowest (false negatives)", &a.errors.false_negatives),
    ] {
        b.push(Block::H3(title.into()));
        if list.is_empty() {
            b.push(Block::Note(format!("None at threshold {}.", a.params.threshold)));
            continue;
        }
        let mut t = Table::new(&["query", "product", "title", "relevance", "score", "rank", "BM25"]);
        for e in list {
            t.row(vec![
                Cell::text(&e.query),
                Cell::text(&e.product_id),
                Cell::text(&e.title),
                Cell::Num(format!("{}", e.relevance)),
                f(Some(e.score)),
                Cell::Num(e.rank.to_string()),
                Cell::Num(format!("{:.2}", e.bm25)),
            ]);
        }
        b.push(Block::Table(t));
    }

    b.push(Block::H2("Notes".into()));
    let ev = &a.evaluate_check;
    b.push(Block::Note(if !ev.found {
        "The evaluate stage wrote no evaluation_metrics.json; the model's numbers here are recomputed from predictions.csv.".into()
    } else if ev.differences.is_empty() {
        format!("The model's numbers recomputed from predictions.csv agree with evaluation_metrics.json ({} values compared).", ev.compared)
    } else {
        format!(
            "The model's numbers recomputed here (with this stage's k/threshold/gain) differ from evaluation_metrics.json: {}.",
            ev.differences.join("; ")
        )
    }));
    if d.split_pairs_not_scored > 0 {
        b.push(Block::Note(format!(
            "{} val/test pairs of the split were not scored by the evaluate stage; all systems are measured on the scored pairs only.",
            d.split_pairs_not_scored
        )));
    }
    b.push(Block::Note(format!(
        "BM25: k1 = {}, b = {}, statistics from {} documents ({}; mean length {:.1} tokens), text lowercased and split \
         into letter/digit runs, no stemming.",
        a.params.bm25_k1,
        a.params.bm25_b,
        a.data.bm25_documents,
        if a.params.bm25_idf == "train" { "the train split's products" } else { "the scored candidates" },
        a.data.bm25_avgdl
    )));
    Ok(b)
}

fn auc_of(a: &Analysis, curve: &str) -> String {
    let id = if curve == "model" { "model" } else { "bm25" };
    a.system(id).and_then(|s: &System| s.test.get("auc")).map_or("-".into(), |v| format!("{v:.3}"))
}

/// `(report.md, report.html, number of charts)`.
pub fn render(a: &Analysis) -> Result<(String, String, usize), PlotError> {
    let title = format!("Analysis: {}", a.stage);
    let blocks = blocks(a)?;
    let mut md = format!("# {title}\n\n");
    let mut page = Page::new(&title);
    let mut plots = 0;
    for blk in &blocks {
        match blk {
            Block::H2(t) => {
                md.push_str(&format!("## {t}\n\n"));
                page.h2(t);
            }
            Block::H3(t) => {
                md.push_str(&format!("### {t}\n\n"));
                page.h3(t);
            }
            Block::P(t) => {
                md.push_str(&format!("{t}\n\n"));
                page.p(t);
            }
            Block::Note(t) => {
                md.push_str(&format!("*{t}*\n\n"));
                page.note(t);
            }
            Block::Table(t) => {
                md.push_str(&t.markdown());
                md.push('\n');
                page.table(t);
            }
            Block::Plot(id, svg) => {
                md.push_str(&format!("*Chart \"{}\": see report.html.*\n\n", svg.title));
                page.plot(id, svg);
                plots += 1;
            }
        }
    }
    Ok((md, page.finish(), plots))
}
