//! The `pairs` and `grouped` layouts of `load`: every format reads to the table later stages expect,
//! labels land on the [1, 3] scale so that split and the metrics keep them, and bad input fails with
//! the file, the line and the column.

use std::path::Path;
use std::sync::Arc;

use super::{params, s, upstream, Harness};
use crate::engine::{Params, Stage, StageError};
use crate::stages::load::Load;
use crate::stages::normalize::Normalize;
use crate::stages::split::Split;
use crate::stages::table::{self, Record};

/// The `[columns]` table: the defaults with some columns renamed.
fn columns(renamed: &[(&str, &str)]) -> toml::Value {
    let defaults: toml::Table = Load.defaults().parse().unwrap();
    let mut t = defaults["columns"].as_table().unwrap().clone();
    for (k, v) in renamed {
        assert!(t.insert(k.to_string(), s(v)).is_some(), "`{k}` is no column role");
    }
    toml::Value::Table(t)
}

fn pairs(path: &str, renamed: &[(&str, &str)], more: &[(&str, toml::Value)]) -> Params {
    let mut o = vec![("path", s(path)), ("layout", s("pairs")), ("columns", columns(renamed))];
    o.extend(more.iter().cloned());
    params(&Load, &o)
}

fn load_ok(h: &Harness, p: &Params) -> Vec<Record> {
    let (res, out) = h.run(&Load, "load", p, &[]);
    res.unwrap_or_else(|e| panic!("{e}"));
    table::read_table(&out.join("table.csv")).unwrap()
}

/// (query, title, description, relevance) of each record, for comparisons across formats.
fn shape(records: &[Record]) -> Vec<(String, String, String, f64)> {
    records.iter().map(|r| (r.query.clone(), r.title.clone(), r.description.clone(), r.relevance)).collect()
}

const TSV: &str = "qid\tsearch\tdoc\tpassage\ty\n\
                   1\tangle bracket\t100001\tSimpson \"Strong-Tie\" Angle\t1\n\
                   1\tangle bracket\t100002\tDeck nails\t0\n\
                   2\tl bracket\t100001\tSimpson \"Strong-Tie\" Angle\t1\n";

const TSV_COLUMNS: [(&str, &str); 5] =
    [("query", "search"), ("document", "passage"), ("label", "y"), ("query_id", "qid"), ("doc_id", "doc")];

fn expected_pairs() -> Vec<(String, String, String, f64)> {
    [
        ("angle bracket", "Simpson \"Strong-Tie\" Angle", 3.0),
        ("angle bracket", "Deck nails", 1.0),
        ("l bracket", "Simpson \"Strong-Tie\" Angle", 3.0),
    ]
    .iter()
    .map(|(q, t, r)| (q.to_string(), t.to_string(), String::new(), *r))
    .collect()
}

/// Parquet with the crate's low-level writer: columns search, passage (UTF-8) and y (INT64).
fn write_parquet(path: &Path) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY search (UTF8); REQUIRED BYTE_ARRAY passage (UTF8); REQUIRED INT64 y; }",
        )
        .unwrap(),
    );
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(path).unwrap(),
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut g = w.next_row_group().unwrap();
    let rows = expected_pairs();
    for pick in [0, 1] {
        let v: Vec<ByteArray> =
            rows.iter().map(|r| ByteArray::from(if pick == 0 { r.0.as_str() } else { r.1.as_str() })).collect();
        let mut col = g.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
        col.close().unwrap();
    }
    let labels: Vec<i64> = rows.iter().map(|r| i64::from(r.3 == 3.0)).collect();
    let mut col = g.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&labels, None, None).unwrap();
    col.close().unwrap();
    g.close().unwrap();
    w.close().unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

#[test]
fn pairs_load_the_same_table_from_tsv_csv_jsonl_gz_and_parquet() {
    let h = Harness::new();
    h.write("p/pairs.tsv", TSV);
    let tsv = load_ok(&h, &pairs("p/pairs.tsv", &TSV_COLUMNS, &[]));
    assert_eq!(shape(&tsv), expected_pairs());
    // doc_id is the product id; the rows are numbered.
    assert_eq!(
        tsv.iter().map(|r| (r.id.as_str(), r.product_id.as_str())).collect::<Vec<_>>(),
        [("1", "100001"), ("2", "100002"), ("3", "100001")]
    );

    h.write(
        "p/pairs.csv",
        "search,passage,y\n\"angle bracket\",\"Simpson \"\"Strong-Tie\"\" Angle\",1\nangle bracket,Deck nails,0.0\nl bracket,\"Simpson \"\"Strong-Tie\"\" Angle\",1\n",
    );
    let csv = load_ok(&h, &pairs("p/pairs.csv", &[("query", "search"), ("document", "passage"), ("label", "y")], &[]));
    assert_eq!(shape(&csv), expected_pairs());
    // Without doc_id, a document is named by its text: the same text, the same product.
    assert_eq!(csv[0].product_id, csv[2].product_id);
    assert_ne!(csv[0].product_id, csv[1].product_id);
    assert!(csv[0].product_id.starts_with("doc-"), "{}", csv[0].product_id);

    let jsonl = "{\"search\": \"angle bracket\", \"passage\": \"Simpson \\\"Strong-Tie\\\" Angle\", \"y\": 1}\n\
                 {\"search\": \"angle bracket\", \"passage\": \"Deck nails\", \"y\": 0}\n\
                 {\"search\": \"l bracket\", \"passage\": \"Simpson \\\"Strong-Tie\\\" Angle\", \"y\": \"1\"}\n";
    h.write("p/pairs.jsonl.gz", gzip(jsonl.as_bytes()));
    let cols = [("query", "search"), ("document", "passage"), ("label", "y")];
    assert_eq!(shape(&load_ok(&h, &pairs("p/pairs.jsonl.gz", &cols, &[]))), expected_pairs());

    write_parquet(&h.root().join("p/pairs.parquet"));
    let parquet = load_ok(&h, &pairs("p/pairs.parquet", &cols, &[]));
    assert_eq!(shape(&parquet), expected_pairs());
    assert_eq!(parquet, csv, "the same pairs give the same table, ids included");
}

#[test]
fn graded_pairs_with_title_and_description_map_onto_one_to_three() {
    let h = Harness::new();
    h.write(
        "g.jsonl",
        "{\"q\": \"drill\", \"name\": \"Cordless Drill\", \"details\": \"18V\", \"grade\": 4}\n\
         {\"q\": \"drill\", \"name\": \"Hammer\", \"grade\": 0}\n\
         {\"q\": \"drill\", \"name\": \"Drill Bits\", \"details\": null, \"grade\": 1.5}\n",
    );
    let cols = [("query", "q"), ("title", "name"), ("description", "details"), ("label", "grade")];
    let more = [("label_kind", s("graded")), ("relevance_range", toml::Value::Array(vec![0.into(), 4.into()]))];
    let got = load_ok(&h, &pairs("g.jsonl", &cols, &more));
    assert_eq!(
        shape(&got),
        [
            ("drill".into(), "Cordless Drill".into(), "18V".into(), 3.0),
            ("drill".into(), "Hammer".into(), String::new(), 1.0),
            ("drill".into(), "Drill Bits".into(), String::new(), 1.75),
        ]
    );
}

#[test]
fn grouped_records_give_a_positive_pair_per_pos_and_a_negative_per_neg() {
    let h = Harness::new();
    h.write(
        "g.jsonl",
        "{\"query\": \"angle bracket\", \"pos\": [\"Simpson Angle\"], \"neg\": [\"Deck nails\", \"Shower head\"], \"pos_scores\": [0.9], \"neg_scores\": [0.1, 0.2]}\n\
         \n\
         {\"query_id\": 7, \"query\": \"l bracket\", \"pos\": [\"Simpson Angle\", \"Corner brace\"], \"neg\": []}\n",
    );
    let p = params(&Load, &[("path", s("g.jsonl")), ("layout", s("grouped"))]);
    let (res, out) = h.run(&Load, "load", &p, &[]);
    assert_eq!(res.unwrap().stats["layout"], "grouped");
    let got = table::read_table(&out.join("table.csv")).unwrap();
    let rows: Vec<(&str, &str, f64)> = got.iter().map(|r| (r.query.as_str(), r.title.as_str(), r.relevance)).collect();
    assert_eq!(
        rows,
        [
            ("angle bracket", "Simpson Angle", 3.0),
            ("angle bracket", "Deck nails", 1.0),
            ("angle bracket", "Shower head", 1.0),
            ("l bracket", "Simpson Angle", 3.0),
            ("l bracket", "Corner brace", 3.0),
        ]
    );
    assert_eq!(got[0].product_id, got[3].product_id, "one text, one product");
    // The descriptions default does not apply to the grouped layout: only the data file is an input.
    assert_eq!(Load.inputs(&p).len(), 1);
}

/// Runs load → normalize → split on a committed layout file and returns (split labels by
/// (query, title), load's table).
fn split_committed(h: &Harness, p: &Params) -> (Vec<(String, String, bool)>, Vec<Record>) {
    let (res, load_dir) = h.run(&Load, "load", p, &[]);
    res.unwrap_or_else(|e| panic!("{e}"));
    let loaded = table::read_table(&load_dir.join("table.csv")).unwrap();
    let np = super::params(&Normalize, &[]);
    let (res, norm_dir) = h.run(&Normalize, "normalize", &np, &[upstream("load", &load_dir)]);
    res.unwrap();
    let sp = super::params(&Split, &[]);
    let (res, split_dir) = h.run(&Split, "split", &sp, &[upstream("normalize", &norm_dir)]);
    res.unwrap();
    let mut labels = Vec::new();
    for f in ["train.csv", "val.csv", "test.csv"] {
        for r in table::read_labeled(&split_dir.join(f)).unwrap() {
            labels.push((r.record.id.clone(), r.record.product_id.clone(), r.label));
        }
    }
    labels.sort();
    (labels, loaded)
}

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel).display().to_string()
}

#[test]
fn committed_layout_files_load_and_split_keeps_their_binary_labels() {
    let h = Harness::new();
    let tsv = std::fs::read_to_string(repo("data/pairs.tsv")).unwrap();
    let cols = [
        ("query", "search_query"),
        ("document", "product_text"),
        ("label", "is_relevant"),
        ("query_id", "qid"),
        ("doc_id", "pid"),
    ];
    let (labels, loaded) = split_committed(&h, &pairs(&repo("data/pairs.tsv"), &cols, &[]));
    // Every row of the file, in order, with its label kept through the split's threshold.
    let want: Vec<(String, String, bool)> = tsv
        .lines()
        .skip(1)
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split('\t').collect();
            ((i + 1).to_string(), f[2].to_string(), f[4] == "1")
        })
        .collect();
    assert_eq!(loaded.len(), want.len());
    let mut want = want;
    want.sort();
    assert_eq!(labels, want);
    assert!(labels.iter().any(|l| l.2) && labels.iter().any(|l| !l.2));

    // The gzipped JSON Lines copy carries the Kaggle grades: the same pairs as the sample rows.
    let cols =
        [("query", "q"), ("title", "name"), ("description", "details"), ("label", "grade"), ("doc_id", "product_uid")];
    let graded = load_ok(&h, &pairs(&repo("data/pairs.jsonl.gz"), &cols, &[("label_kind", s("graded"))]));
    let sample = load_ok(
        &h,
        &params(
            &Load,
            &[("path", s(&repo("data/train.csv"))), ("descriptions", s(&repo("data/product_descriptions.csv")))],
        ),
    );
    let key = |r: &Record| (r.query.clone(), r.product_id.clone(), r.title.clone(), r.description.clone(), r.relevance);
    let sample: Vec<_> = sample.iter().map(key).collect();
    assert_eq!(graded.len(), loaded.len());
    assert!(graded.iter().map(key).all(|k| sample.contains(&k)));

    // Grouped: one pair per listed document, positives first within each record.
    let text = std::fs::read_to_string(repo("data/grouped.jsonl")).unwrap();
    let docs: usize = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["pos"].as_array().unwrap().len() + v["neg"].as_array().unwrap().len()
        })
        .sum();
    let (labels, loaded) =
        split_committed(&h, &params(&Load, &[("path", s(&repo("data/grouped.jsonl"))), ("layout", s("grouped"))]));
    assert_eq!(loaded.len(), docs);
    let positives = loaded.iter().filter(|r| r.relevance == 3.0).count();
    assert_eq!(labels.iter().filter(|l| l.2).count(), positives);
}

/// NDCG on the mapped binary relevance (1 and 3) is NDCG with gains 0 and 1, for both gain forms.
#[test]
fn binary_relevance_one_and_three_gives_ndcg_with_gains_zero_and_one() {
    use crate::metrics::{per_query, Gain, Options, Prediction};
    let labels = [(1, 0.9), (0, 0.8), (1, 0.1), (0, 0.5), (0, 0.4), (1, 0.45)];
    let rows = |one: f64| -> Vec<Prediction> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &(l, score))| Prediction {
                query: format!("q{}", i % 2),
                relevance: if l == 1 { one } else { 1.0 },
                score,
                label: Some(l == 1),
            })
            .collect()
    };
    for gain in [Gain::Linear, Gain::Exp] {
        let opts = Options { gain, ..Options::default() };
        let mapped = per_query(&rows(3.0), &opts).unwrap();
        // Relevance 2 is gain 1 under both forms: the 0/1 reference.
        let reference = per_query(&rows(2.0), &opts).unwrap();
        for (a, b) in mapped.iter().zip(&reference) {
            for (x, y) in a.ndcg.iter().zip(&b.ndcg) {
                assert!((x.1.unwrap() - y.1.unwrap()).abs() < 1e-12, "{gain:?}: {x:?} vs {y:?}");
            }
        }
    }
}

fn data_error(h: &Harness, p: &Params) -> (String, u64, String) {
    let (res, out) = h.run(&Load, "load", p, &[]);
    assert!(!out.join("table.csv").exists(), "a table was written");
    match res {
        Err(StageError::Data { file, line, message }) => (file, line, message),
        other => panic!("expected a data error, got {other:?}"),
    }
}

#[test]
fn a_renamed_column_and_a_bad_label_name_file_line_and_column() {
    let h = Harness::new();
    h.write("p/pairs.tsv", TSV);
    // The file calls the label `y`; the mapping still says `label`.
    let (file, line, msg) = data_error(&h, &pairs("p/pairs.tsv", &[("query", "search"), ("document", "passage")], &[]));
    assert_eq!((file.as_str(), line), ("p/pairs.tsv", 1), "{msg}");
    assert!(msg.contains("missing column `label` (columns.label)"), "{msg}");
    assert!(msg.contains("qid, search, doc, passage, y"), "{msg}");

    h.write("p/bad.tsv", format!("{TSV}3\tdrill\t100003\tHammer\t2\n"));
    let (file, line, msg) = data_error(&h, &pairs("p/bad.tsv", &TSV_COLUMNS, &[]));
    assert_eq!((file.as_str(), line), ("p/bad.tsv", 5), "{msg}");
    assert!(
        msg.contains("column `y` (columns.label)") && msg.contains("`2`") && msg.contains("expected 0 or 1"),
        "{msg}"
    );

    // Graded: outside the range, and not a number.
    let graded = [("label_kind", s("graded")), ("relevance_range", toml::Value::Array(vec![0.into(), 1.into()]))];
    let (_, line, msg) = data_error(&h, &pairs("p/bad.tsv", &TSV_COLUMNS, &graded));
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("relevance_range [0, 1]"), "{msg}");
    h.write("p/nan.tsv", format!("{TSV}3\tdrill\t100003\tHammer\tyes\n"));
    let (_, line, msg) = data_error(&h, &pairs("p/nan.tsv", &TSV_COLUMNS, &[]));
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("`yes` is not a number"), "{msg}");

    // JSON Lines: a record without the mapped field names the fields it has.
    h.write(
        "p/p.jsonl",
        "{\"search\": \"a\", \"passage\": \"b\", \"y\": 1}\n{\"search\": \"a\", \"text\": \"c\", \"y\": 0}\n",
    );
    let (_, line, msg) =
        data_error(&h, &pairs("p/p.jsonl", &[("query", "search"), ("document", "passage"), ("label", "y")], &[]));
    assert_eq!(line, 2, "{msg}");
    assert!(msg.contains("missing column `passage` (columns.document)") && msg.contains("search, text, y"), "{msg}");

    // A query id that names two queries.
    h.write("p/qid.tsv", format!("{TSV}1\tdrill\t100003\tHammer\t0\n"));
    let (_, line, msg) = data_error(&h, &pairs("p/qid.tsv", &TSV_COLUMNS, &[]));
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("query id `1`") && msg.contains("line 2"), "{msg}");
}

#[test]
fn bad_grouped_records_name_their_line() {
    let h = Harness::new();
    let good = "{\"query\": \"a\", \"pos\": [\"x\"], \"neg\": [\"y\"]}\n";
    let cases = [
        ("{\"query\": \"a\", \"pos\": \"x\", \"neg\": []}", "field `pos` is a string; expected a list of strings"),
        ("{\"query\": \"a\", \"pos\": [\"x\"]}", "missing field `neg`"),
        ("{\"pos\": [\"x\"], \"neg\": []}", "missing field `query`"),
        ("{\"query\": \"a\", \"pos\": [\"x\", 3], \"neg\": []}", "`pos[1]` is a number"),
        ("{\"query\": \"a\", \"pos\": [\"x\"], \"neg\": [\"x\"]}", "in both `pos` and `neg`"),
        ("{\"query\": \"a\", \"pos\": [], \"neg\": []}", "both empty"),
        (
            "{\"query\": \"a\", \"pos\": [\"x\"], \"neg\": [], \"pos_scores\": [1, 2]}",
            "`pos_scores` must be a list of 1 numbers",
        ),
        ("[1, 2]", "expected a JSON object"),
    ];
    for (i, (bad, phrase)) in cases.iter().enumerate() {
        let name = format!("g{i}.jsonl");
        h.write(&name, format!("{good}{bad}\n"));
        let (file, line, msg) = data_error(&h, &params(&Load, &[("path", s(&name)), ("layout", s("grouped"))]));
        assert_eq!((file.as_str(), line), (name.as_str(), 2), "{msg}");
        assert!(msg.contains(phrase), "{bad}: `{msg}` lacks `{phrase}`");
    }
}

#[test]
fn layout_parameters_are_checked_before_anything_runs() {
    let check = |o: &[(&str, toml::Value)]| {
        let mut table: toml::Table = Load.defaults().parse().unwrap();
        for (k, v) in o {
            table.insert(k.to_string(), v.clone());
        }
        Load.check(&Params(table)).map(drop).unwrap_err().to_string()
    };
    assert!(check(&[("layout", s("rows"))]).contains("unknown layout `rows`"));
    assert!(check(&[("path", s("x.tsv"))]).contains("TSV is read only with layout = \"pairs\""));
    assert!(check(&[("path", s("x.csv")), ("layout", s("grouped"))]).contains("reads JSON Lines"));
    assert!(check(&[("label_kind", s("ordinal"))]).contains("unknown label kind"));
    let range = |a: i64, b: i64| toml::Value::Array(vec![a.into(), b.into()]);
    assert!(check(&[("relevance_range", range(3, 1))]).contains("lo must be below hi"));
    let e = check(&[("layout", s("pairs")), ("columns", columns(&[("label", "")]))]);
    assert!(e.contains("columns.label"), "{e}");
    let e = check(&[("layout", s("pairs")), ("columns", columns(&[("description", "d")]))]);
    assert!(e.contains("columns.description"), "{e}");
}
