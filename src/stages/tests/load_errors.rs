//! Every kind of bad input fails `load` with the file, the 1-based line and what was expected.

use super::{params, s, Harness};
use crate::engine::StageError;
use crate::stages::load::Load;

const HEADER: &str = "\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n";

fn csv(rows: &str) -> Vec<u8> {
    format!("{HEADER}{rows}").into_bytes()
}

/// (file name, contents, expected line, a phrase the message must contain)
fn cases() -> Vec<(&'static str, Vec<u8>, u64, &'static str)> {
    let ok = "1,100001,\"Angle\",\"angle bracket\",3\n";
    vec![
        (
            "missing_column.csv",
            b"\"id\",\"product_uid\",\"product_title\",\"search_term\"\n1,2,\"t\",\"q\"\n".to_vec(),
            1,
            "missing column `relevance`",
        ),
        ("not_a_number.csv", csv(&format!("{ok}2,100001,\"Angle\",\"l bracket\",high\n")), 3, "is not a number"),
        ("too_high.csv", csv("1,100001,\"Angle\",\"angle bracket\",3.5\n"), 2, "outside [1, 3]"),
        ("too_low.csv", csv("1,100001,\"Angle\",\"angle bracket\",0.5\n"), 2, "outside [1, 3]"),
        ("nan.csv", csv("1,100001,\"Angle\",\"angle bracket\",NaN\n"), 2, "outside [1, 3]"),
        (
            "unclosed_quote_mid.csv",
            csv(&format!("{ok}2,100001,\"Angle,\"l bracket\",2\n3,100002,\"Bolt\",\"bolt\",2\n")),
            3,
            "unbalanced",
        ),
        ("unclosed_quote_end.csv", csv(&format!("{ok}2,100001,\"Angle\",\"l bracket\",\"2\n")), 3, "unbalanced"),
        ("stray_quote.csv", csv(&format!("{ok}2,100001,\"Angle\",\"l\",2\n3,100001,An\"gle,\"x\",2\n")), 4, "unbalanced"),
        ("too_few_fields.csv", csv(&format!("{ok}2,100001,\"Angle\",2\n")), 3, "expected 5 fields"),
        ("duplicate_id.csv", csv(&format!("{ok}{ok}")), 3, "duplicate id `1` (first on line 2)"),
        ("empty.csv", Vec::new(), 1, "empty file"),
        ("header_only.csv", csv(""), 2, "no rows"),
        ("bad_utf8.csv", csv(&format!("{ok}2,100001,\"Angle\",\"l bracket\",2\n")).into_iter().chain(*b"3,1,\"\xe5\",\"q\",2\n").collect(), 4, "not valid UTF-8"),
        (
            "bad_utf8.jsonl",
            b"{\"id\":1,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\",\"relevance\":2}\n{\"id\":2,\"entity_id\":2,\"name\":\"\xe5\",\"query\":\"q\",\"relevance\":2}\n".to_vec(),
            2,
            "invalid UTF-8",
        ),
        (
            "broken.jsonl",
            b"{\"id\":1,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\",\"relevance\":2}\n\n{\"id\":2,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\" \"relevance\":2}\n".to_vec(),
            3,
            "invalid JSON",
        ),
        (
            "missing_field.jsonl",
            b"{\"id\":1,\"entity_id\":2,\"name\":\"n\",\"relevance\":2}\n".to_vec(),
            1,
            "missing field `query`",
        ),
        (
            "relevance_string.json",
            b"[\n {\"id\":1,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\",\"relevance\":2},\n {\"id\":2,\"entity_id\":2,\n  \"name\":\"n\",\"query\":\"q\",\"relevance\":\"very\"}\n]".to_vec(),
            3,
            "relevance `very` is not a number",
        ),
        (
            "not_objects.json",
            b"[\n {\"id\":1,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\",\"relevance\":2},\n 7\n]".to_vec(),
            3,
            "expected a JSON object",
        ),
        (
            "unclosed_array.json",
            b"[\n {\"id\":1,\"entity_id\":2,\"name\":\"n\",\"query\":\"q\",\"relevance\":2},\n".to_vec(),
            3,
            "not closed",
        ),
        ("empty.jsonl", b"\n \n".to_vec(), 1, "empty file"),
        ("not_parquet.parquet", b"PAR1 this is not parquet".to_vec(), 1, "not a readable Parquet file"),
    ]
}

#[test]
fn each_bad_input_names_file_and_line() {
    let h = Harness::new();
    for (name, bytes, line, phrase) in cases() {
        let rel = format!("bad/{name}");
        h.write(&rel, &bytes);
        let mut overrides = vec![("path", s(&rel)), ("descriptions", s(""))];
        if name.ends_with(".csv") && name.contains("utf8") {
            overrides.push(("encoding", s("utf-8")));
        }
        let (res, out) = h.run(&Load, "load", &params(&Load, &overrides), &[]);
        let err = res.expect_err(name);
        match &err {
            StageError::Data { file, line: got, message } => {
                assert_eq!(file, &rel, "{name}: {err}");
                assert_eq!(*got, line, "{name}: {err}");
                assert!(message.contains(phrase), "{name}: `{message}` lacks `{phrase}`");
            }
            other => panic!("{name}: expected a data error, got {other:?}"),
        }
        assert!(!out.join("table.csv").exists(), "{name}: a table was written");
    }
}

#[test]
fn bad_description_files_are_named_too() {
    let h = Harness::new();
    h.write("t.csv", csv("1,100001,\"Angle\",\"angle bracket\",3\n"));
    let cases: [(&str, &[u8], u64, &str); 3] = [
        ("d1.csv", b"\"product_uid\",\"text\"\n100001,\"x\"\n", 1, "missing column `product_description`"),
        (
            "d2.csv",
            b"\"product_uid\",\"product_description\"\n100001,\"x\"\n100001,\"y\"\n",
            3,
            "duplicate product_uid",
        ),
        ("d3.csv", b"\"product_uid\",\"product_description\"\n100001,\"x\n", 2, "unbalanced"),
    ];
    for (name, bytes, line, phrase) in cases {
        h.write(name, bytes);
        let (res, _) = h.run(&Load, "load", &params(&Load, &[("path", s("t.csv")), ("descriptions", s(name))]), &[]);
        match res {
            Err(StageError::Data { file, line: got, message }) => {
                assert_eq!((file.as_str(), got), (name, line), "{message}");
                assert!(message.contains(phrase), "{name}: {message}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}
