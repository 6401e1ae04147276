//! The mining rules on a handcrafted split, with BM25 and with a tiny Qwen3 reranker: a positive is
//! never mined, the rank window and the margin hold, and val/test pass through untouched.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::*;
use crate::engine::Stage;
use crate::stages::table::{write_labeled, Labeled, Record};
use crate::stages::tests::{params, s, upstream, Harness};

fn rec(id: &str, pid: &str, query: &str, title: &str, relevance: f64) -> Labeled {
    let record = Record {
        id: id.into(),
        product_id: pid.into(),
        query: query.into(),
        title: title.into(),
        description: String::new(),
        relevance,
    };
    Labeled { record, label: relevance >= 2.33 }
}

/// Train: three queries over bracket, pipe and screw products. Val and test: a bracket product
/// (`v1`, `t1`) that the BM25 of "angle bracket" would rank first if it were a candidate.
fn write_split(h: &Harness) -> PathBuf {
    let train = vec![
        rec("1", "p1", "angle bracket", "steel angle bracket", 3.0),
        rec("2", "p2", "angle bracket", "deck screws", 1.0),
        rec("3", "p3", "copper pipe", "copper pipe 1/2 in", 3.0),
        rec("4", "p4", "copper pipe", "pvc pipe elbow", 1.67),
        rec("5", "p5", "copper pipe", "copper pipe fitting", 2.67),
        rec("6", "p6", "deck screws", "exterior deck screws", 2.5),
        rec("7", "p7", "deck screws", "angle bracket angle bracket heavy", 1.33),
        rec("8", "p8", "deck screws", "wood screws", 2.0),
        rec("9", "p9", "angle grinder", "angle bracket", 1.0),
        rec("10", "p10", "garden hose", "garden hose reel", 3.0),
    ];
    let val = vec![rec("11", "v1", "bracket", "angle bracket angle bracket angle bracket", 3.0)];
    let test = vec![rec("12", "t1", "l bracket", "angle bracket corner angle bracket", 2.0)];
    let dir = h.root().join("split");
    std::fs::create_dir_all(&dir).unwrap();
    write_labeled(&dir.join("train.csv"), &train).unwrap();
    write_labeled(&dir.join("val.csv"), &val).unwrap();
    write_labeled(&dir.join("test.csv"), &test).unwrap();
    dir
}

/// A row of mine's train.csv.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    id: String,
    product_id: String,
    query: String,
    relevance: f64,
    label: u8,
    mined: u8,
}

fn read_out(path: &Path) -> Vec<Out> {
    let mut rdr = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = rdr.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, ["id", "product_id", "query", "title", "description", "relevance", "label", "mined"]);
    rdr.records()
        .map(|r| {
            let r = r.unwrap();
            Out {
                id: r[0].into(),
                product_id: r[1].into(),
                query: r[2].into(),
                relevance: r[5].parse().unwrap(),
                label: r[6].parse().unwrap(),
                mined: r[7].parse().unwrap(),
            }
        })
        .collect()
}

fn run_mine(h: &Harness, split: &Path, overrides: &[(&str, toml::Value)]) -> (StageOutput, Vec<Out>, PathBuf) {
    let (res, out) = h.run(&Mine, "mine", &params(&Mine, overrides), &[upstream("split", split)]);
    let output = res.unwrap_or_else(|e| panic!("{e}"));
    let rows = read_out(&out.join("train.csv"));
    (output, rows, out)
}

fn int(v: i64) -> toml::Value {
    toml::Value::Integer(v)
}

fn float(v: f64) -> toml::Value {
    toml::Value::Float(v)
}

/// Every (query, product) the split labelled in train.
fn labelled(rows: &[Out]) -> HashSet<(String, String)> {
    rows.iter().filter(|r| r.mined == 0).map(|r| (r.query.clone(), r.product_id.clone())).collect()
}

#[test]
fn select_keeps_the_window_and_drops_by_margin() {
    // Ranks by score: c0 (9), c3 (8), c1 (5), c4 (5, tie broken by index), c2 (1).
    let scores = [9.0, 5.0, 1.0, 8.0, 5.0];
    // No margin filter: the window [1, 3) is ranks 1 and 2.
    let s = select(&scores, 100.0, 5, 1, 3, 0.0);
    assert_eq!(s, Selection { picked: vec![3, 1], dropped_margin: 0 });
    // The lowest positive scores 8.5: with margin 0, c0 (9) is dropped, c3 (8) kept.
    let s = select(&scores, 8.5, 2, 0, 5, 0.0);
    assert_eq!(s, Selection { picked: vec![3, 1], dropped_margin: 1 });
    // Margin 1: the ceiling is 7.5, so c3 (8) goes too.
    let s = select(&scores, 8.5, 2, 0, 5, 1.0);
    assert_eq!(s, Selection { picked: vec![1, 4], dropped_margin: 2 });
    // A score equal to the ceiling is kept (score <= positive - margin).
    assert_eq!(select(&scores, 6.0, 1, 0, 5, 1.0).picked, vec![1]);
    // The window ends before n are found: fewer are picked, nothing past range_max.
    assert_eq!(select(&scores, 100.0, 4, 3, 4, 0.0).picked, vec![4]);
    assert!(select(&scores, 100.0, 2, 5, 9, 0.0).picked.is_empty());
}

#[test]
fn bm25_mining_never_returns_a_positive_and_leaves_val_and_test_alone() {
    let h = Harness::new();
    let split = write_split(&h);
    // The margin filter off, the window wide: every candidate may be mined.
    let (output, rows, out) = run_mine(&h, &split, &[("margin", float(-1e9))]);
    // The split's rows come first, unchanged and in order, with mined = 0.
    let original = crate::stages::table::read_labeled(&split.join("train.csv")).unwrap();
    assert_eq!(rows.len(), original.len() + output.metrics["mined"].as_u64().unwrap() as usize);
    for (o, r) in rows.iter().zip(&original) {
        assert_eq!(
            (o.id.as_str(), o.product_id.as_str(), o.mined),
            (r.record.id.as_str(), r.record.product_id.as_str(), 0)
        );
    }
    let known = labelled(&rows);
    let mined: Vec<&Out> = rows.iter().filter(|r| r.mined == 1).collect();
    assert!(!mined.is_empty());
    let train_queries: HashSet<&str> = original.iter().map(|r| r.record.query.as_str()).collect();
    let train_products: HashSet<&str> = original.iter().map(|r| r.record.product_id.as_str()).collect();
    for m in &mined {
        assert!(!known.contains(&(m.query.clone(), m.product_id.clone())), "{m:?} is labelled for its query");
        assert_eq!((m.label, m.relevance), (0, 1.0), "{m:?}");
        assert!(train_queries.contains(m.query.as_str()), "{m:?} is no train query");
        assert!(train_products.contains(m.product_id.as_str()), "{m:?}: only train products are candidates");
    }
    // Queries without a positive (`angle grinder`) get nothing; the others at most 7, each product once.
    let mut per_query: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in &mined {
        per_query.entry(&m.query).or_default().push(&m.product_id);
    }
    assert!(!per_query.contains_key("angle grinder"));
    for (q, pids) in &per_query {
        assert!(pids.len() <= 7);
        assert_eq!(pids.iter().collect::<HashSet<_>>().len(), pids.len(), "{q}: a product mined twice");
    }
    // 10 products; `angle bracket` has 2 labelled (1 positive), `copper pipe` 3 (2), `deck screws` 3
    // (1), `garden hose` 1 (1): 8 + 7 + 7 + 9 candidates, 7 taken from each.
    assert_eq!(output.metrics["mined"], 28);
    assert_eq!(output.metrics["dropped_positive"], 5);
    assert_eq!(output.metrics["queries"], 5);
    assert_eq!(output.stats["queries_without_positive"], 1);
    // Fresh integer ids after the largest.
    let ids: Vec<i64> = mined.iter().map(|m| m.id.parse().unwrap()).collect();
    assert_eq!(ids, (11..11 + 28).collect::<Vec<i64>>());
    // Val and test byte for byte.
    for f in ["val.csv", "test.csv"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(split.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn bm25_mining_respects_the_rank_window() {
    let h = Harness::new();
    let split = write_split(&h);
    // The window [1, 3): the second and third ranked candidates, never the first or the fourth.
    let (_, rows, _) = run_mine(
        &h,
        &split,
        &[("margin", float(-1e9)), ("negatives_per_query", int(2)), ("range_min", int(1)), ("range_max", int(3))],
    );
    let original = crate::stages::table::read_labeled(&split.join("train.csv")).unwrap();
    let corpus =
        train_corpus(&original.iter().map(|l| Row { record: l.record.clone(), label: l.label }).collect::<Vec<_>>());
    let bm = Bm25Scorer::fit(&corpus, 1.2, 0.75);
    let known = labelled(&rows);
    for q in ["angle bracket", "copper pipe", "deck screws"] {
        let cands: Vec<&Doc> =
            corpus.iter().filter(|d| !known.contains(&(q.to_string(), d.product_id.clone()))).collect();
        let scores: Vec<f64> = cands.iter().map(|d| bm.index.bm25().score(&tokenize(q), &doc_tokens(d))).collect();
        let mut order: Vec<usize> = (0..cands.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let want: Vec<&str> = order[1..3].iter().map(|&i| cands[i].product_id.as_str()).collect();
        let got: Vec<&str> =
            rows.iter().filter(|r| r.mined == 1 && r.query == q).map(|r| r.product_id.as_str()).collect();
        assert_eq!(got, want, "{q}");
    }
}

#[test]
fn bm25_mining_drops_candidates_within_the_margin_of_the_weakest_positive() {
    let h = Harness::new();
    let split = write_split(&h);
    // With margin 0, `angle bracket`'s candidates that outscore its positive p1 ("steel angle
    // bracket") — p7 (both words twice) and p9 (both words, shorter) — are dropped as likely false
    // negatives.
    let (output, rows, _) = run_mine(&h, &split, &[]);
    let got: HashSet<&str> =
        rows.iter().filter(|r| r.mined == 1 && r.query == "angle bracket").map(|r| r.product_id.as_str()).collect();
    assert!(!got.contains("p7") && !got.contains("p9"), "{got:?}");
    assert!(output.metrics["dropped_margin"].as_u64().unwrap() >= 2, "{:?}", output.metrics);
    // Without the filter both are mined.
    let (off, rows, _) = run_mine(&h, &split, &[("margin", float(-1e9))]);
    let got: HashSet<&str> =
        rows.iter().filter(|r| r.mined == 1 && r.query == "angle bracket").map(|r| r.product_id.as_str()).collect();
    assert!(got.contains("p7") && got.contains("p9"), "{got:?}");
    assert_eq!(off.metrics["dropped_margin"], 0);
    // Every mined negative scores at most the weakest positive minus the margin (here 0.5).
    let (_, rows, _) = run_mine(&h, &split, &[("margin", float(0.5))]);
    let original = crate::stages::table::read_labeled(&split.join("train.csv")).unwrap();
    let lrows: Vec<Row> = original.iter().map(|l| Row { record: l.record.clone(), label: l.label }).collect();
    let corpus = train_corpus(&lrows);
    let bm = Bm25Scorer::fit(&corpus, 1.2, 0.75);
    let doc = |pid: &str| corpus.iter().find(|d| d.product_id == pid).unwrap();
    for m in rows.iter().filter(|r| r.mined == 1) {
        let weakest = lrows
            .iter()
            .filter(|r| r.label && r.record.query == m.query)
            .map(|r| bm.index.bm25().score(&tokenize(&m.query), &doc_tokens(doc(&r.record.product_id))))
            .fold(f64::INFINITY, f64::min);
        let s = bm.index.bm25().score(&tokenize(&m.query), &doc_tokens(doc(&m.product_id)));
        assert!(s <= weakest - 0.5, "{m:?}: {s} > {weakest} - 0.5");
    }
}

#[test]
fn a_corpus_file_supplies_the_candidates_and_a_bad_one_names_file_and_line() {
    let h = Harness::new();
    let split = write_split(&h);
    h.write(
        "corpus.csv",
        "product_id,title,description\nc1,angle bracket zinc,\nc2,garden hose nozzle,brass\np1,steel angle bracket,\n",
    );
    let (output, rows, _) = run_mine(&h, &split, &[("corpus", s("corpus.csv")), ("margin", float(-1e9))]);
    let mined: HashSet<&str> = rows.iter().filter(|r| r.mined == 1).map(|r| r.product_id.as_str()).collect();
    assert_eq!(mined, HashSet::from(["c1", "c2", "p1"]));
    // p1 is `angle bracket`'s positive: never mined for it.
    assert!(!rows.iter().any(|r| r.mined == 1 && r.query == "angle bracket" && r.product_id == "p1"));
    assert_eq!(output.stats["corpus_documents"], 3);
    h.write("bad.csv", "id,name\n1,x\n");
    let (res, _) = h.run(&Mine, "mine", &params(&Mine, &[("corpus", s("bad.csv"))]), &[upstream("split", &split)]);
    let e = res.unwrap_err().to_string();
    assert!(e.starts_with("bad.csv:1:") && e.contains("product_id and title"), "{e}");
    let (res, _) = h.run(&Mine, "mine", &params(&Mine, &[("corpus", s("nope.csv"))]), &[upstream("split", &split)]);
    let e = res.unwrap_err().to_string();
    assert!(e.contains("parameter `corpus`") && e.contains("nope.csv is not a file"), "{e}");
}

#[test]
fn negatives_per_query_caps_each_query() {
    let h = Harness::new();
    let split = write_split(&h);
    let count = |n: i64| {
        let (o, rows, _) = run_mine(&h, &split, &[("margin", float(-1e9)), ("negatives_per_query", int(n))]);
        let mut per: HashMap<String, usize> = HashMap::new();
        for r in rows.iter().filter(|r| r.mined == 1) {
            *per.entry(r.query.clone()).or_default() += 1;
        }
        (o.metrics["mined"].as_u64().unwrap(), per)
    };
    let (one, per) = count(1);
    assert_eq!(one, 4);
    assert!(per.values().all(|&c| c == 1));
    let (three, per) = count(3);
    assert_eq!(three, 12);
    assert!(per.values().all(|&c| c == 3));
}

#[test]
fn bad_parameters_name_the_key_and_the_fix() {
    let check = |overrides: &[(&str, toml::Value)]| {
        let mut t: toml::Table = Mine.defaults().parse().unwrap();
        for (k, v) in overrides {
            t.insert(k.to_string(), v.clone());
        }
        Mine.check(&crate::engine::Params(t)).unwrap_err()
    };
    let e = check(&[("miner", s("dense"))]);
    assert_eq!(e.key, "miner");
    let e = check(&[("range_min", int(10)), ("range_max", int(12))]);
    assert_eq!(e.key, "range_max");
    assert!(e.message.contains("raise range_max to at least 17"), "{e}");
    let e = check(&[("miner", s("model"))]);
    assert_eq!(e.key, "model");
    assert!(e.message.contains("local model directory"), "{e}");
    assert_eq!(check(&[("negatives_per_query", int(0))]).key, "negatives_per_query");
    assert_eq!(check(&[("range_min", int(-1))]).key, "range_min");
    assert_eq!(check(&[("margin", float(f64::NAN))]).key, "margin");
}

#[test]
fn tokenize_reads_a_mine_stage_and_exactly_one_of_split_or_mine() {
    let registry = crate::stages::registry();
    let pipeline = |tok_needs: &str| {
        let text = format!(
            "[pipeline]\nname = \"p\"\n[stages.load]\nkind = \"load\"\n[stages.split]\nkind = \"split\"\n\
             needs = [\"load\"]\n[stages.mine]\nkind = \"mine\"\nneeds = [\"split\"]\n\
             [stages.tok]\nkind = \"tokenize\"\nneeds = {tok_needs}\n"
        );
        crate::engine::config::load_str(Path::new("p.toml"), &text, &Default::default(), &registry)
    };
    assert!(pipeline("[\"mine\"]").is_ok());
    let e = pipeline("[\"split\", \"mine\"]").unwrap_err();
    assert_eq!(e.key, "stages.tok.needs", "{e}");
}

#[test]
fn the_bm25_key_ignores_the_model_parameters() {
    let keyed = |o: &[(&str, toml::Value)]| Mine.keyed_params(&params(&Mine, o));
    assert_eq!(keyed(&[]), keyed(&[("device", s("cpu")), ("batch_size", int(4))]));
    assert!(!keyed(&[]).contains_key("model"));
    assert_ne!(keyed(&[]), keyed(&[("negatives_per_query", int(3))]));
    let model = [("miner", s("model")), ("model", s("m"))];
    assert_eq!(keyed(&model)["device"].as_str(), Some("auto"));
    assert_eq!(Mine.gpus(&params(&Mine, &[])), GpuDemand::None);
}

/// A tiny random Qwen3 with the real tokenizer's vocabulary, saved as a model directory.
fn tiny_model(dir: &Path) {
    let cfg = crate::model::Qwen3Config::tiny(151_669, 16, 32, 1, 2, 1, 8, true);
    let m = crate::model::random(&cfg, 7, candle_core::DType::F32, &candle_core::Device::Cpu, false).unwrap();
    crate::model::save(&m, dir, &Default::default()).unwrap();
}

#[test]
fn the_model_miner_scores_like_pipe_rerank_and_keeps_the_rules() {
    let h = Harness::new();
    let split = write_split(&h);
    tiny_model(&h.root().join("tiny"));
    let base = [
        ("miner", s("model")),
        ("model", s("tiny")),
        ("device", s("cpu")),
        ("prefilter", int(0)),
        ("batch_size", int(3)),
        ("max_length", int(96)),
    ];
    let mut o = base.to_vec();
    o.extend([("margin", float(-1e9)), ("negatives_per_query", int(2)), ("range_min", int(1)), ("range_max", int(3))]);
    let (output, rows, out) = run_mine(&h, &split, &o);
    assert_eq!(output.metrics["mined"], 8, "{:?}", output.metrics);
    let known = labelled(&rows);
    // The expected picks from scores computed here, one query at a time, through the same encoder
    // and scorer `pipe rerank` uses: ranks 1 and 2 of the query's unlabelled train products.
    let original: Vec<Row> = crate::stages::table::read_labeled(&split.join("train.csv"))
        .unwrap()
        .into_iter()
        .map(|l| Row { record: l.record, label: l.label })
        .collect();
    let corpus = train_corpus(&original);
    let tok = crate::text::load_tokenizer("qwen3", h.root()).unwrap();
    let enc = PromptEncoder::new(
        tok,
        PromptConfig {
            instruction: crate::text::DEFAULT_INSTRUCTION.into(),
            max_length: 96,
            max_description_tokens: 350,
        },
    )
    .unwrap();
    let yn = enc.yes_no();
    let files = crate::model::resolve(&ModelSource::Dir(h.root().join("tiny")), &Default::default()).unwrap();
    let rr = crate::model::seqcls::load_reranker(&files, &LoadOptions::default(), yn.yes, yn.no).unwrap();
    for q in ["angle bracket", "copper pipe", "deck screws", "garden hose"] {
        let cands: Vec<&Doc> =
            corpus.iter().filter(|d| !known.contains(&(q.to_string(), d.product_id.clone()))).collect();
        let ids: Vec<Vec<u32>> =
            cands.iter().map(|d| enc.encode_pair(q, &d.title, &d.description).unwrap().ids).collect();
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let sc = crate::model::score::score_all(&rr, &seqs, 1, &candle_core::Device::Cpu, |_| true).unwrap().unwrap();
        let scores: Vec<f64> = sc.iter().map(|s| f64::from(s.p_yes)).collect();
        let want: Vec<&str> =
            select(&scores, f64::INFINITY, 2, 1, 3, 0.0).picked.iter().map(|&i| cands[i].product_id.as_str()).collect();
        let got: Vec<&str> =
            rows.iter().filter(|r| r.mined == 1 && r.query == q).map(|r| r.product_id.as_str()).collect();
        assert_eq!(got, want, "{q}");
    }
    for f in ["val.csv", "test.csv"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(split.join(f)).unwrap(), "{f}");
    }
    // The margin is in P(yes): with margin 1 the ceiling (lowest positive's P(yes) - 1) is below 0,
    // under every candidate's P(yes), so every candidate in the window is dropped.
    let mut o = base.to_vec();
    o.push(("margin", float(1.0)));
    let (output, _, _) = run_mine(&h, &split, &o);
    assert_eq!(output.metrics["mined"], 0);
    assert!(output.metrics["dropped_margin"].as_u64().unwrap() > 0);
}
