//! load → normalize → split on small hand-made inputs and on the committed sample.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{params, s, upstream, Harness};
use crate::engine::{ExternalInput, Stage, StageError};
use crate::hub::HubSettings;
use crate::stages::load::{self, Load, LoadParams};
use crate::stages::normalize::Normalize;
use crate::stages::split::{self, Split, SplitParams};
use crate::stages::table::{self, Record};

const TRAIN: &[u8] = b"\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n\
2,100001,\"Simpson Strong-Tie 12-Gauge Angle\",\"angle bracket\",3\n\
3,100001,\"Simpson Strong-Tie 12-Gauge Angle\",\"l bracket\",2.5\n\
9,100002,\"Paslode 3 in. x 0.120-Gauge 30\xe5\xa1 Galvanized Nails\",\"deck  over\",2.33\n\
16,100005,\"Delta Vero 1-Handle Shower Faucet \"\"Trim\"\" Kit\",\"rain shower head\",1.67\n";

const DESCRIPTIONS: &[u8] = b"\"product_uid\",\"product_description\"\n\
100001,\"Not only do angles make joints stronger, they also provide more consistent, straight corners.\"\n\
100002,\"Boss\xe5\xa1 deck coating\"\n\
100003,\"a product nobody searched for\"\n";

fn kaggle(h: &Harness) {
    h.write("in/train.csv", TRAIN);
    h.write("in/product_descriptions.csv", DESCRIPTIONS);
}

fn load_params(path: &str, descriptions: &str) -> crate::engine::Params {
    params(&Load, &[("path", s(path)), ("descriptions", s(descriptions))])
}

#[test]
fn kaggle_csv_is_decoded_as_latin1_and_joined_with_descriptions() {
    let h = Harness::new();
    kaggle(&h);
    let (res, out) = h.run(&Load, "load", &load_params("in/train.csv", "in/product_descriptions.csv"), &[]);
    let output = res.unwrap();
    let rows = table::read_table(&out.join("table.csv")).unwrap();
    assert_eq!(rows.len(), 4);
    // 0xE5 0xA1 are the latin-1 characters å and ¡ (the Kaggle mojibake for a degree sign).
    assert_eq!(rows[2].title, "Paslode 3 in. x 0.120-Gauge 30å¡ Galvanized Nails");
    assert_eq!(rows[2].description, "Bosså¡ deck coating");
    assert_eq!(rows[3].title, "Delta Vero 1-Handle Shower Faucet \"Trim\" Kit");
    assert!(rows[0].description.starts_with("Not only do angles"));
    assert_eq!(rows[0].description, rows[1].description);
    assert_eq!(rows[3].description, "", "product 100005 has no description");
    assert_eq!(
        (rows[1].id.as_str(), rows[1].product_id.as_str(), rows[1].query.as_str(), rows[1].relevance),
        ("3", "100001", "l bracket", 2.5)
    );
    let st = &output.stats;
    assert_eq!(st["rows"], 4);
    assert_eq!(st["distinct_queries"], 4);
    assert_eq!(st["distinct_products"], 3);
    assert_eq!(st["rows_with_description"], 3);
    assert_eq!(st["format"], "csv");
    // The table itself is UTF-8.
    let text = String::from_utf8(std::fs::read(out.join("table.csv")).unwrap()).unwrap();
    assert!(text.contains("30å¡"));

    // Without descriptions every description is empty.
    let (res, out) = h.run(&Load, "load", &load_params("in/train.csv", ""), &[]);
    assert_eq!(res.unwrap().stats["rows_with_description"], 0);
    assert!(table::read_table(&out.join("table.csv")).unwrap().iter().all(|r| r.description.is_empty()));
}

#[test]
fn gzip_inputs_give_the_same_table_bytes() {
    let h = Harness::new();
    kaggle(&h);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, TRAIN).unwrap();
    h.write("in/train.csv.gz", gz.finish().unwrap());
    let (a, out_a) = h.run(&Load, "a", &load_params("in/train.csv", "in/product_descriptions.csv"), &[]);
    let (b, out_b) = h.run(&Load, "b", &load_params("in/train.csv.gz", "in/product_descriptions.csv"), &[]);
    a.unwrap();
    b.unwrap();
    let bytes_a = std::fs::read(out_a.join("table.csv")).unwrap();
    assert_eq!(bytes_a, std::fs::read(out_b.join("table.csv")).unwrap());
}

#[test]
fn utf8_encoding_reads_utf8_csv() {
    let h = Harness::new();
    h.write("t.csv", "id,product_uid,product_title,search_term,relevance\n1,7,Café ½ in.,café,2\n");
    let p = params(&Load, &[("path", s("t.csv")), ("descriptions", s("")), ("encoding", s("utf-8"))]);
    let (res, out) = h.run(&Load, "load", &p, &[]);
    res.unwrap();
    assert_eq!(table::read_table(&out.join("table.csv")).unwrap()[0].title, "Café ½ in.");
}

/// The `bstds/home_depot` layout as JSON Lines, JSON array and Parquet.
const JSONL: &str = r#"{"id": 2, "entity_id": 100001, "name": "Simpson Strong-Tie 12-Gauge Angle", "query": "angle bracket", "relevance": 3.0, "description": "Not only do angles make joints stronger"}
{"id": "3", "entity_id": "100001", "name": "Simpson Strong-Tie 12-Gauge Angle", "query": "l bracket", "relevance": 2.5, "description": "Not only do angles make joints stronger"}

{"id": 9, "entity_id": 100002, "name": "BEHR Premium Textured DeckOver", "query": "deck over", "relevance": 2.33, "description": null}
{"id": 16, "entity_id": 100005, "name": "Café ½ in.", "query": "rain shower head", "relevance": 2}
"#;

fn expected_records() -> Vec<Record> {
    let r = |id: &str, pid: &str, title: &str, query: &str, relevance: f64, description: &str| Record {
        id: id.into(),
        product_id: pid.into(),
        query: query.into(),
        title: title.into(),
        description: description.into(),
        relevance,
    };
    let angle = "Not only do angles make joints stronger";
    vec![
        r("2", "100001", "Simpson Strong-Tie 12-Gauge Angle", "angle bracket", 3.0, angle),
        r("3", "100001", "Simpson Strong-Tie 12-Gauge Angle", "l bracket", 2.5, angle),
        r("9", "100002", "BEHR Premium Textured DeckOver", "deck over", 2.33, ""),
        r("16", "100005", "Café ½ in.", "rain shower head", 2.0, ""),
    ]
}

fn json_array() -> String {
    let items: Vec<&str> = JSONL.lines().filter(|l| !l.trim().is_empty()).collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}

/// A Parquet file of the records with the parquet crate's low-level writer (no arrow).
fn write_parquet(path: &Path, rows: &[Record]) {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema {
                REQUIRED INT64 id;
                REQUIRED INT64 entity_id;
                REQUIRED BYTE_ARRAY name (UTF8);
                REQUIRED BYTE_ARRAY query (UTF8);
                REQUIRED DOUBLE relevance;
                OPTIONAL BYTE_ARRAY description (UTF8);
                OPTIONAL INT64 __index_level_0__;
            }",
        )
        .unwrap(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut g = w.next_row_group().unwrap();
    let ints = |f: fn(&Record) -> &String| rows.iter().map(|r| f(r).parse::<i64>().unwrap()).collect::<Vec<_>>();
    let strs = |f: fn(&Record) -> &String| rows.iter().map(|r| ByteArray::from(f(r).as_str())).collect::<Vec<_>>();
    let mut col = g.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&ints(|r| &r.id), None, None).unwrap();
    col.close().unwrap();
    let mut col = g.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&ints(|r| &r.product_id), None, None).unwrap();
    col.close().unwrap();
    for f in [(|r: &Record| &r.title) as fn(&Record) -> &String, |r: &Record| &r.query] {
        let mut col = g.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&strs(f), None, None).unwrap();
        col.close().unwrap();
    }
    let mut col = g.next_column().unwrap().unwrap();
    let rel: Vec<f64> = rows.iter().map(|r| r.relevance).collect();
    col.typed::<DoubleType>().write_batch(&rel, None, None).unwrap();
    col.close().unwrap();
    // Empty descriptions are stored as nulls, as pandas would.
    let mut col = g.next_column().unwrap().unwrap();
    let defs: Vec<i16> = rows.iter().map(|r| i16::from(!r.description.is_empty())).collect();
    let present: Vec<ByteArray> =
        rows.iter().filter(|r| !r.description.is_empty()).map(|r| ByteArray::from(r.description.as_str())).collect();
    col.typed::<ByteArrayType>().write_batch(&present, Some(&defs), None).unwrap();
    col.close().unwrap();
    let mut col = g.next_column().unwrap().unwrap();
    let idx: Vec<i64> = (0..rows.len() as i64).collect();
    col.typed::<Int64Type>().write_batch(&idx, Some(&vec![1; rows.len()]), None).unwrap();
    col.close().unwrap();
    g.close().unwrap();
    w.close().unwrap();
}

#[test]
fn record_layouts_jsonl_json_array_and_parquet_load_the_same_table() {
    let h = Harness::new();
    h.write("r/records.jsonl", JSONL);
    h.write("r/records.json", json_array());
    h.write("r/lines.json", JSONL); // `.json` holding JSON Lines, as some hub datasets do
    write_parquet(&h.root().join("r/records.parquet"), &expected_records());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &std::fs::read(h.root().join("r/records.parquet")).unwrap()).unwrap();
    h.write("r/records.parquet.gz", gz.finish().unwrap());

    let mut tables = Vec::new();
    for (file, format) in [
        ("r/records.jsonl", "jsonl"),
        ("r/records.json", "json"),
        ("r/lines.json", "json"),
        ("r/records.parquet", "parquet"),
        ("r/records.parquet.gz", "parquet"),
    ] {
        // The default `descriptions` is ignored for record layouts: they carry their own.
        let p = params(&Load, &[("path", s(file))]);
        let (res, out) = h.run(&Load, "load", &p, &[]);
        let output = res.unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(output.stats["format"], format, "{file}");
        assert_eq!(output.stats["rows_with_description"], 2, "{file}");
        assert_eq!(table::read_table(&out.join("table.csv")).unwrap(), expected_records(), "{file}");
        tables.push(std::fs::read(out.join("table.csv")).unwrap());
        assert_eq!(Load.inputs(&p), vec![ExternalInput::File(file.to_string())], "{file}");
    }
    assert!(tables.windows(2).all(|w| w[0] == w[1]));

    // `format` overrides the extension.
    h.write("r/records.txt", JSONL);
    let p = params(&Load, &[("path", s("r/records.txt")), ("format", s("jsonl"))]);
    assert_eq!(table::read_table(&h.run(&Load, "load", &p, &[]).1.join("table.csv")).unwrap().len(), 4);
}

#[test]
fn hub_paths_resolve_offline_from_a_hand_built_cache() {
    let h = Harness::new();
    let commit = "4f7bd1f0c2a3e9d85b6a1c0e7d2f3a4b5c6d7e8f";
    let repo = h.root().join("hf/datasets--bstds--home_depot");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit).join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("train.jsonl"), JSONL).unwrap();

    let spec = "hf://datasets/bstds/home_depot/data/train.jsonl";
    let p: LoadParams = params(&Load, &[("path", s(spec))]).decode().unwrap();
    let hub = HubSettings::offline_at(h.root().join("hf"));
    let cancel = AtomicBool::new(false);
    let loaded = load::load(&p, h.root(), &hub, &cancel).unwrap();
    assert_eq!(loaded.records, expected_records());

    // The revision is the remote input's identity: a pinned commit is found in `snapshots/` too.
    let pinned = params(&Load, &[("path", s(spec)), ("revision", s(commit))]);
    assert_eq!(Load.inputs(&pinned), vec![ExternalInput::Remote(format!("{spec}@{commit}"))]);
    let p: LoadParams = pinned.decode().unwrap();
    assert_eq!(load::load(&p, h.root(), &hub, &cancel).unwrap().records.len(), 4);

    // A file that is not cached, offline: a clear error that says how to use a local file.
    let p: LoadParams =
        params(&Load, &[("path", s("hf://datasets/bstds/home_depot/data/other.parquet"))]).decode().unwrap();
    let e = load::load(&p, h.root(), &hub, &cancel).unwrap_err();
    assert!(matches!(&e, StageError::Param { key, .. } if key == "path"), "{e}");
    assert!(e.to_string().contains("not in the Hugging Face cache"), "{e}");
}

#[test]
fn inputs_name_both_kaggle_files_and_check_rejects_bad_values() {
    let p = params(&Load, &[]);
    assert_eq!(
        Load.inputs(&p),
        vec![ExternalInput::File("data/train.csv".into()), ExternalInput::File("data/product_descriptions.csv".into())]
    );
    let mut bad = p.clone();
    bad.0.insert("format".into(), s("xlsx"));
    assert_eq!(Load.check(&bad).unwrap_err().key, "format");
    let mut bad = p.clone();
    bad.0.insert("path".into(), s("data/train.xlsx"));
    assert_eq!(Load.check(&bad).unwrap_err().key, "format");
    let mut bad = p.clone();
    bad.0.insert("encoding".into(), s("cp1252"));
    assert_eq!(Load.check(&bad).unwrap_err().key, "encoding");
    let mut bad = p.clone();
    bad.0.insert("descriptions".into(), s("hf://models/x/y"));
    assert_eq!(Load.check(&bad).unwrap_err().key, "descriptions");
    let mut bad = p;
    bad.0.insert("path".into(), s("missing.csv"));
    let h = Harness::new();
    let (res, _) = h.run(&Load, "load", &bad, &[]);
    assert!(matches!(res, Err(StageError::Param { key, .. }) if key == "path"));
}

#[test]
fn normalize_changes_only_spelling_and_counts_changed_rows() {
    let h = Harness::new();
    kaggle(&h);
    let (res, load_out) = h.run(&Load, "load", &load_params("in/train.csv", "in/product_descriptions.csv"), &[]);
    res.unwrap();
    let up = [upstream("load", &load_out)];
    let (res, out) = h.run(&Normalize, "normalize", &params(&Normalize, &[]), &up);
    let stats = res.unwrap().stats;
    let default_bytes = std::fs::read(out.join("table.csv")).unwrap();
    let before = table::read_table(&load_out.join("table.csv")).unwrap();
    let after = table::read_table(&out.join("table.csv")).unwrap();
    assert_eq!(after[2].query, "deck over");
    assert_eq!(after[2].title, "paslode 3 in. x 0.120-gauge 30å¡ galvanized nails");
    assert_eq!(after[3].title, "delta vero 1-handle shower faucet \"trim\" kit");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.id, &b.product_id, b.relevance), (&a.id, &a.product_id, a.relevance));
    }
    // Only "deck  over" has a query to fix; every title has capitals; 3 of 4 rows have a description
    // with a capital letter.
    assert_eq!(stats["rows"], 4);
    assert_eq!(stats["changed_rows"]["query"], 1);
    assert_eq!(stats["changed_rows"]["title"], 4);
    assert_eq!(stats["changed_rows"]["description"], 3);

    // Without lowercasing, case stays and only the whitespace fix remains.
    let (res, out) = h.run(&Normalize, "n2", &params(&Normalize, &[("lowercase", toml::Value::Boolean(false))]), &up);
    let stats = res.unwrap().stats;
    assert_eq!(stats["changed_rows"]["title"], 0);
    assert_eq!(table::read_table(&out.join("table.csv")).unwrap()[3].title, before[3].title);

    // Latin-1 text is already NFC, so switching the form off yields identical bytes (early cutoff).
    let (res, out_none) = h.run(&Normalize, "n3", &params(&Normalize, &[("unicode", s("none"))]), &up);
    res.unwrap();
    assert_eq!(default_bytes, std::fs::read(out_none.join("table.csv")).unwrap());

    let mut bad = params(&Normalize, &[]);
    bad.0.insert("unicode".into(), s("nfd"));
    assert_eq!(Normalize.check(&bad).unwrap_err().key, "unicode");
    let (res, _) = h.run(&Normalize, "n4", &params(&Normalize, &[]), &[]);
    assert!(matches!(res, Err(StageError::Upstream(_))));
}

/// A synthetic table: `queries` queries with 1–9 pairs each and varied grades.
fn synthetic(queries: usize) -> Vec<Record> {
    let grades = [1.0, 1.33, 1.67, 2.0, 2.33, 2.67, 3.0];
    let mut out = Vec::new();
    let mut rng = crate::util::rng::SplitMix64::new(7);
    for q in 0..queries {
        let n = 1 + rng.below(9) as usize;
        let base = rng.below(grades.len() as u64) as usize;
        for k in 0..n {
            let g = grades[(base + rng.below(3) as usize).min(grades.len() - 1)];
            out.push(Record {
                id: format!("{q}-{k}"),
                product_id: format!("{}", 100000 + rng.below(500)),
                query: format!("query {q}"),
                title: format!("title {q} {k}"),
                description: String::new(),
                relevance: g,
            });
        }
    }
    out
}

fn split_params(seed: i64) -> SplitParams {
    params(&Split, &[("seed", toml::Value::Integer(seed))]).decode().unwrap()
}

#[test]
fn split_is_grouped_stratified_close_to_the_ratios_and_deterministic() {
    let records = synthetic(2000);
    let parts = split::assign(&records, &split_params(42));
    let mut home: HashMap<&str, usize> = HashMap::new();
    for (r, &s) in records.iter().zip(&parts) {
        assert_eq!(*home.entry(&r.query).or_insert(s), s, "query {} is in two splits", r.query);
    }
    let total = records.len() as f64;
    for (s, want) in [(0, 0.70), (1, 0.15), (2, 0.15)] {
        let got = parts.iter().filter(|&&p| p == s).count() as f64 / total;
        assert!((got - want).abs() < 0.01, "split {s}: share {got}, want {want}");
    }
    // Every relevance bin is split in the same proportions.
    let mut groups: HashMap<&str, (f64, usize, usize)> = HashMap::new();
    for (r, &s) in records.iter().zip(&parts) {
        let g = groups.entry(&r.query).or_insert((0.0, 0, s));
        g.0 += r.relevance;
        g.1 += 1;
    }
    for bin in 0..4 {
        let in_bin: Vec<_> = groups.values().filter(|g| split::bin_of(g.0 / g.1 as f64) == bin).collect();
        let pairs: usize = in_bin.iter().map(|g| g.1).sum();
        assert!(pairs > 500, "bin {bin} has {pairs} pairs");
        let train: usize = in_bin.iter().filter(|g| g.2 == 0).map(|g| g.1).sum();
        assert!((train as f64 / pairs as f64 - 0.70).abs() < 0.02, "bin {bin}");
    }
    // Same seed → same split, regardless of row order; another seed → another split.
    assert_eq!(split::assign(&records, &split_params(42)), parts);
    let mut reversed = records.clone();
    reversed.reverse();
    let mut rev_parts = split::assign(&reversed, &split_params(42));
    rev_parts.reverse();
    assert_eq!(rev_parts, parts);
    let other = split::assign(&records, &split_params(7));
    let moved = other.iter().zip(&parts).filter(|(a, b)| a != b).count();
    assert!(moved > records.len() / 10, "seed 7 moved only {moved} pairs");
}

#[test]
fn split_stage_writes_labeled_files_and_stats() {
    let h = Harness::new();
    let records = synthetic(300);
    std::fs::create_dir_all(h.root().join("norm")).unwrap();
    table::write_table(&h.root().join("norm/table.csv"), &records).unwrap();
    let up = [upstream("normalize", &h.root().join("norm"))];
    let (res, out) = h.run(&Split, "split", &params(&Split, &[]), &up);
    let stats = res.unwrap().stats;
    let mut seen = HashSet::new();
    let mut pairs = 0;
    for name in split::SPLITS {
        let rows = table::read_labeled(&out.join(format!("{name}.csv"))).unwrap();
        let queries: HashSet<&str> = rows.iter().map(|r| r.record.query.as_str()).collect();
        assert!(queries.iter().all(|q| seen.insert(q.to_string())), "a {name} query is in another split");
        for r in &rows {
            assert_eq!(r.label, r.record.relevance >= 2.33, "{:?}", r.record);
        }
        let positives = rows.iter().filter(|r| r.label).count();
        assert_eq!(stats[name]["pairs"], rows.len());
        assert_eq!(stats[name]["queries"], queries.len());
        assert_eq!(stats[name]["positives"], positives);
        let hist = stats[name]["relevance_histogram"].as_object().unwrap();
        assert_eq!(hist.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), rows.len() as u64);
        pairs += rows.len();
    }
    assert_eq!(pairs, records.len());
    assert_eq!(stats["pairs"], records.len());

    // Byte-identical on a rerun; the threshold moves labels exactly at its value.
    let first = std::fs::read(out.join("train.csv")).unwrap();
    let (res, out) = h.run(&Split, "split", &params(&Split, &[]), &up);
    res.unwrap();
    assert_eq!(std::fs::read(out.join("train.csv")).unwrap(), first);
    let p = params(&Split, &[("relevance_threshold", toml::Value::Float(3.0))]);
    let (res, out) = h.run(&Split, "split3", &p, &up);
    res.unwrap();
    let rows = table::read_labeled(&out.join("train.csv")).unwrap();
    assert!(rows.iter().any(|r| r.record.relevance == 2.67 && !r.label));
    assert!(rows.iter().all(|r| r.label == (r.record.relevance == 3.0)));
}

#[test]
fn split_labels_at_the_threshold_and_checks_params() {
    let h = Harness::new();
    // 40 single-pair queries: enough for every split to get some.
    let grades = [2.33, 2.32, 2.25, 2.5];
    let records: Vec<Record> = (0..40)
        .map(|i| Record {
            id: i.to_string(),
            product_id: "1".into(),
            query: format!("q{i}"),
            title: "t".into(),
            description: String::new(),
            relevance: grades[i % 4],
        })
        .collect();
    std::fs::create_dir_all(h.root().join("load")).unwrap();
    table::write_table(&h.root().join("load/table.csv"), &records).unwrap();
    let (res, out) = h.run(&Split, "split", &params(&Split, &[]), &[upstream("load", &h.root().join("load"))]);
    res.unwrap();
    for name in split::SPLITS {
        for r in table::read_labeled(&out.join(format!("{name}.csv"))).unwrap() {
            let want = r.record.relevance == 2.33 || r.record.relevance == 2.5;
            assert_eq!(r.label, want, "relevance {}", r.record.relevance);
        }
    }

    let check = |k: &str, v: toml::Value| {
        let mut p = params(&Split, &[]);
        p.0.insert(k.into(), v);
        Split.check(&p).err().map(|e| e.key)
    };
    assert_eq!(check("train_ratio", toml::Value::Float(0.8)), Some("train_ratio".into()));
    assert_eq!(check("val_ratio", toml::Value::Float(0.0)), Some("val_ratio".into()));
    assert_eq!(check("test_ratio", toml::Value::Float(1.0)), Some("test_ratio".into()));
    assert_eq!(check("seed", toml::Value::Integer(-1)), Some("seed".into()));
    assert_eq!(check("relevance_threshold", toml::Value::Float(3.5)), Some("relevance_threshold".into()));
    assert_eq!(check("train_ratio", toml::Value::Float(0.7000000001)), None);

    // Too few queries to fill every split: a clear failure, not an empty file.
    table::write_table(&h.root().join("load/table.csv"), &records[..2]).unwrap();
    let (res, _) = h.run(&Split, "split", &params(&Split, &[]), &[upstream("load", &h.root().join("load"))]);
    assert!(matches!(&res, Err(StageError::Failed(m)) if m.contains("empty")), "{res:?}");
}

#[test]
fn splitmix64_matches_the_reference_and_bins_have_the_documented_edges() {
    // Reference outputs of Vigna's splitmix64.c seeded with 0.
    let mut r = crate::util::rng::SplitMix64::new(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    let mut counts = [0usize; 3];
    for _ in 0..30_000 {
        counts[r.below(3) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    let bins: Vec<usize> =
        [1.0, 1.66, 1.67, (1.67 * 3.0) / 3.0, 1.99, 2.0, 2.32, 2.33, 3.0].iter().map(|&m| split::bin_of(m)).collect();
    assert_eq!(bins, [0, 0, 1, 1, 1, 2, 2, 3, 3]);
    assert_eq!(split::bin_of((1.67 + 1.67 + 1.67) / 3.0), 1);
}

/// The committed sample goes through all three stages.
#[test]
fn committed_sample_runs_through_load_normalize_split() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let h = Harness::new();
    let p = load_params(
        root.join("data/train.csv").to_str().unwrap(),
        root.join("data/product_descriptions.csv").to_str().unwrap(),
    );
    let (res, load_out) = h.run(&Load, "load", &p, &[]);
    let stats = res.unwrap().stats;
    let rows = stats["rows"].as_u64().unwrap();
    assert!((1500..=2000).contains(&rows), "{rows} rows");
    assert!(stats["rows_with_description"].as_u64().unwrap() * 2 >= rows - 50);
    let loaded = table::read_table(&load_out.join("table.csv")).unwrap();
    assert!(loaded.iter().any(|r| r.title.contains('å')), "the sample keeps some latin-1 bytes");

    let (res, norm_out) = h.run(&Normalize, "normalize", &params(&Normalize, &[]), &[upstream("load", &load_out)]);
    res.unwrap();
    let (res, _) = h.run(&Split, "split", &params(&Split, &[]), &[upstream("normalize", &norm_out)]);
    let stats = res.unwrap().stats;
    for name in split::SPLITS {
        assert!(stats[name]["queries"].as_u64().unwrap() >= 20, "{name}: {}", stats[name]);
    }
}
