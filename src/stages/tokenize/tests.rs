use std::path::Path;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::engine::{Params, Stage, Upstream};
use crate::text::tokenizer::builtin_qwen3;

const HEADER: &str = "id,product_id,query,title,description,relevance,label\n";
const LONG_DESC: &str = "Not only do angles make joints stronger, they also provide more consistent, straight corners. Simpson Strong-Tie offers a wide variety of angles in various sizes and thicknesses to handle light-duty jobs or projects where a structural connection is needed.";

fn write_split(dir: &Path, train: &str, val: &str, test: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in [("train", train), ("val", val), ("test", test)] {
        std::fs::write(dir.join(format!("{name}.csv")), format!("{HEADER}{body}")).unwrap();
    }
}

fn params(extra: &str) -> Params {
    let mut t: toml::Table = Tokenize.defaults().parse().unwrap();
    let over: toml::Table = extra.parse().unwrap();
    t.extend(over);
    Params(t)
}

/// Run the stage over `split_dir` into a fresh output dir and return it.
fn run(
    root: &Path,
    split_dir: &Path,
    params: &Params,
    cancel: bool,
) -> Result<(tempfile::TempDir, StageOutput), StageError> {
    let out = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let upstream = vec![Upstream { id: "split".into(), kind: "split".into(), dir: split_dir.to_path_buf() }];
    let cancel = AtomicBool::new(cancel);
    let ctx = StageContext {
        id: "tokenize",
        params,
        root,
        out: out.path(),
        scratch: scratch.path(),
        upstream: &upstream,
        quiet: true,
        cancel: &cancel,
        gpus: &[],
    };
    Tokenize.check(params)?;
    let o = Tokenize.run(&ctx)?;
    Ok((out, o))
}

fn encoder(max_length: usize, max_description_tokens: usize) -> PromptEncoder {
    PromptEncoder::new(
        builtin_qwen3().unwrap(),
        PromptConfig { max_length, max_description_tokens, ..PromptConfig::default() },
    )
    .unwrap()
}

#[test]
fn defaults_parse_and_bad_values_are_refused() {
    let p = params("");
    let t: TokenizeParams = p.decode().unwrap();
    assert_eq!(t.tokenizer, "qwen3");
    assert_eq!(t.max_length, 512);
    assert_eq!(t.max_description_tokens, 350);
    assert_eq!(t.instruction, crate::text::DEFAULT_INSTRUCTION);
    assert!(Tokenize.check(&p).is_ok());
    assert_eq!(Tokenize.check(&params("max_length = 0")).unwrap_err().key, "max_length");
    assert_eq!(Tokenize.check(&params("max_description_tokens = -1")).unwrap_err().key, "max_description_tokens");
    assert_eq!(Tokenize.check(&params("tokenizer = \"hf:nope\"")).unwrap_err().key, "tokenizer");
}

#[test]
fn inputs_name_the_tokenizer() {
    let digest = crate::text::tokenizer::builtin_qwen3_digest();
    assert_eq!(Tokenize.inputs(&params("")), [ExternalInput::Remote(format!("builtin:qwen3:{digest}"))]);
    assert_eq!(digest.len(), 64);
    assert_eq!(
        Tokenize.inputs(&params("tokenizer = \"hf:Qwen/Qwen3-Reranker-0.6B@abc\"")),
        [ExternalInput::Remote("hf:Qwen/Qwen3-Reranker-0.6B@abc".into())]
    );
    assert_eq!(
        Tokenize.inputs(&params("tokenizer = \"hf:Qwen/Qwen3-Reranker-0.6B\"")),
        [ExternalInput::Remote("hf:Qwen/Qwen3-Reranker-0.6B@main".into())]
    );
    assert_eq!(
        Tokenize.inputs(&params("tokenizer = \"models/tokenizer.json.gz\"")),
        [ExternalInput::File("models/tokenizer.json.gz".into())]
    );
}

#[test]
fn splits_round_trip_through_the_token_store() {
    let root = tempfile::tempdir().unwrap();
    let split = root.path().join("split");
    let train = format!(
        "2,100001,angle bracket,Simpson Strong-Tie 12-Gauge Angle,\"{LONG_DESC}\",3,1\n\
         3,100001,l bracket,Simpson Strong-Tie 12-Gauge Angle,,2.5,1\n\
         9,100002,deck over,\"BEHR Premium Textured DeckOver 1-gal. #SC-141 Tugboat\",,1.33,0\n\
         16,100005,angle bracket,\"Delta Vero 1-Handle Shower, \"\"Chrome\"\" 30°\",Smooth & sleek.,2,0\n\
         17,100006,rain shower head,Rain Shower Head,\"{}\",1,0\n",
        "very long description ".repeat(60)
    );
    let val = "4,100003,toliet seat,Toilet Seat,,2.67,1\n5,100004,toliet seat,Elongated Toilet Seat,,1,0\n";
    write_split(&split, &train, val, "");
    let p = params("max_length = 80\nmax_description_tokens = 20");
    let (out, output) = run(root.path(), &split, &p, false).unwrap();

    let enc = encoder(80, 20);
    let rows = [
        ("angle bracket", "Simpson Strong-Tie 12-Gauge Angle", LONG_DESC),
        ("l bracket", "Simpson Strong-Tie 12-Gauge Angle", ""),
        ("deck over", "BEHR Premium Textured DeckOver 1-gal. #SC-141 Tugboat", ""),
        ("angle bracket", "Delta Vero 1-Handle Shower, \"Chrome\" 30°", "Smooth & sleek."),
    ];
    let s = TokenStore::read(out.path(), "train").unwrap();
    assert_eq!(s.len(), 5);
    assert_eq!(s.labels, [1, 1, 0, 0, 0]);
    assert_eq!(s.relevance, [3.0, 2.5, 1.33, 2.0, 1.0]);
    assert_eq!(s.pair_ids, [2, 3, 9, 16, 17]);
    assert!(s.pair_keys.is_none());
    assert_eq!(s.queries, ["angle bracket", "l bracket", "deck over", "rain shower head"]);
    assert_eq!(s.query_ids, [0, 1, 2, 0, 3]);
    assert!(s.offsets.windows(2).all(|w| w[0] <= w[1]));
    for i in 0..s.len() {
        let ids = s.sequence(i);
        assert!(ids.len() <= 80, "pair {i} has {} tokens", ids.len());
        assert_eq!(&ids[..enc.prefix_ids().len()], enc.prefix_ids());
        assert!(ids.ends_with(enc.suffix_ids()));
    }
    // The stored ids are exactly what the prompt encoder makes of each row.
    for (i, (q, t, d)) in rows.iter().enumerate() {
        assert_eq!(s.sequence(i), enc.encode_pair(q, t, d).unwrap().ids, "row {i}");
    }
    // The last row's description is cut to 20 tokens and then the body to the budget.
    assert_eq!(s.sequence(4).len(), 80);
    assert_eq!(s.metadata["yes_id"], "9693");
    assert_eq!(s.metadata["no_id"], "2152");
    assert_eq!(s.metadata["max_length"], "80");

    let v = TokenStore::read(out.path(), "val").unwrap();
    assert_eq!(v.pair_ids, [4, 5]);
    assert_eq!(v.query_ids, [0, 0]);
    assert_eq!(v.relevance, [2.67, 1.0]);
    let t = TokenStore::read(out.path(), "test").unwrap();
    assert!(t.is_empty());

    // The tokenizer travels with the artifact.
    let tok = crate::text::tokenizer::from_json(&std::fs::read(out.path().join("tokenizer.json")).unwrap()).unwrap();
    assert_eq!(tok.token_to_id("yes"), Some(9693));

    let train_stats = &output.stats["splits"]["train"];
    assert_eq!(train_stats["pairs"], 5);
    assert_eq!(train_stats["queries"], 4);
    // LONG_DESC and the repeated one exceed 20 tokens.
    assert_eq!(train_stats["truncated_description"], 2);
    let cut = (0..5).filter(|&i| s.sequence(i).len() == 80).count();
    assert_eq!(train_stats["truncated_sequence"], cut as u64);
    assert!(cut >= 1);
    assert_eq!(train_stats["len_max"], 80);
    assert_eq!(output.stats["all"]["pairs"], 7);
    assert_eq!(output.stats["splits"]["test"]["pairs"], 0);
    assert_eq!(output.metrics["pairs"], 7);

    // Rerunning produces the same bytes (parallel encoding keeps row order; headers are sorted).
    let (again, _) = run(root.path(), &split, &p, false).unwrap();
    for f in ["train.safetensors", "train.queries.json", "val.safetensors", "test.safetensors"] {
        assert_eq!(std::fs::read(out.path().join(f)).unwrap(), std::fs::read(again.path().join(f)).unwrap(), "{f}");
    }
}

#[test]
fn textual_ids_keep_a_side_file() {
    let root = tempfile::tempdir().unwrap();
    let split = root.path().join("split");
    write_split(&split, "a-1,p,q1,T1,,3,1\nb-2,p,q2,T2,,1,0\n", "", "");
    let (out, _) = run(root.path(), &split, &params(""), false).unwrap();
    let s = TokenStore::read(out.path(), "train").unwrap();
    assert_eq!(s.pair_ids, [0, 1]);
    assert_eq!(s.pair_keys.as_deref(), Some(&["a-1".to_string(), "b-2".to_string()][..]));
    assert_eq!(s.pair_key(1), "b-2");
}

#[test]
fn bad_rows_point_at_file_and_line() {
    let root = tempfile::tempdir().unwrap();
    let split = root.path().join("split");
    write_split(&split, "1,p,q,T,,3,1\n2,p,q,T,,high,1\n", "", "");
    match run(root.path(), &split, &params(""), false) {
        Err(StageError::Data { file, line, message }) => {
            assert!(file.ends_with("train.csv"), "{file}");
            assert_eq!(line, 3);
            assert!(message.contains("field 6"), "{message}");
        }
        other => panic!("expected a data error, got {:?}", other.map(|_| ())),
    }
    write_split(&split, "1,p,q,T,,3,1\n", "2,p,q,T,,3,2\n", "");
    match run(root.path(), &split, &params(""), false) {
        Err(StageError::Data { file, line, message }) => {
            assert!(file.ends_with("val.csv"), "{file}");
            assert_eq!(line, 2);
            assert!(message.contains("label"), "{message}");
        }
        other => panic!("expected a data error, got {:?}", other.map(|_| ())),
    }
    std::fs::remove_file(split.join("test.csv")).unwrap();
    write_split(&split, "1,p,q,T,,3,1\n", "", "");
    std::fs::remove_file(split.join("test.csv")).unwrap();
    assert!(matches!(run(root.path(), &split, &params(""), false), Err(StageError::Io { .. })));
}

#[test]
fn cancel_and_parameter_errors() {
    let root = tempfile::tempdir().unwrap();
    let split = root.path().join("split");
    write_split(&split, "1,p,q,T,,3,1\n", "", "");
    assert!(matches!(run(root.path(), &split, &params(""), true), Err(StageError::Cancelled)));
    match run(root.path(), &split, &params("max_length = 40"), false) {
        Err(StageError::Param { key, message }) => {
            assert_eq!(key, "max_length");
            assert!(message.contains("48"), "{message}");
        }
        other => panic!("expected a parameter error, got {:?}", other.map(|_| ())),
    }
    match run(root.path(), &split, &params("tokenizer = \"no/such/tokenizer.json\""), false) {
        Err(StageError::Param { key, message }) => {
            assert_eq!(key, "tokenizer");
            assert!(message.contains("no/such/tokenizer.json"), "{message}");
        }
        other => panic!("expected a parameter error, got {:?}", other.map(|_| ())),
    }
    std::fs::create_dir(root.path().join("model")).unwrap();
    match run(root.path(), &split, &params("tokenizer = \"model\""), false) {
        Err(StageError::Param { key, message }) => {
            assert_eq!(key, "tokenizer");
            assert!(message.contains("directory"), "{message}");
        }
        other => panic!("expected a parameter error, got {:?}", other.map(|_| ())),
    }
    // A local tokenizer file is used as given.
    std::fs::write(
        root.path().join("tok.json"),
        crate::text::TokenizerSource::BuiltinQwen3.read_json(root.path()).unwrap(),
    )
    .unwrap();
    let (out, o) = run(root.path(), &split, &params("tokenizer = \"tok.json\""), false).unwrap();
    assert_eq!(o.stats["tokenizer"], "tok.json");
    assert_eq!(
        TokenStore::read(out.path(), "train").unwrap().sequence(0),
        encoder(512, 350).encode_pair("q", "T", "").unwrap().ids
    );
}
