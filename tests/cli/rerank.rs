//! `pipe rerank` end to end, offline, on the committed tiny models: the scores it prints are the ones
//! Hugging Face transformers computed for the same (query, document) prompts.

use crate::util::{repo, Project};

fn expected_logits(config: &str) -> Vec<f32> {
    let bytes = std::fs::read(repo().join(format!("tests/fixtures/parity/{config}/expected.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logit").unwrap();
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn rerank_scores_match_transformers_on_committed_models() {
    let p = Project::new();
    let fixtures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join("tests/fixtures/parity/fixtures.json")).unwrap()).unwrap();
    let pairs = fixtures["batch"]["pairs"].as_array().unwrap();
    for config in ["tied_mha", "untied_gqa"] {
        let model = repo().join(format!("tests/fixtures/parity/{config}")).display().to_string();
        let expected = expected_logits(config);
        for (i, pair) in pairs.iter().enumerate() {
            let v = p.run_json(&[
                "rerank",
                "--model",
                &model,
                "--tokenizer",
                "qwen3",
                "--query",
                pair["query"].as_str().unwrap(),
                "--doc",
                pair["document"].as_str().unwrap(),
                "--json",
            ]);
            let got = v["results"][0]["logit"].as_f64().unwrap();
            assert!(
                (got - expected[i] as f64).abs() < 1e-4,
                "{config} pair {i}: pipe {got} vs transformers {}",
                expected[i]
            );
            let p_yes = v["results"][0]["score"].as_f64().unwrap();
            assert!((p_yes - 1.0 / (1.0 + (-got).exp())).abs() < 1e-6);
        }
    }
}

#[test]
fn rerank_ranks_documents_and_keeps_input_order_in_json() {
    let p = Project::new();
    p.write(
        "docs.jsonl",
        "\"Behr Premium Textured DeckOver\"\n{\"doc\": \"Delta Vero 1-Handle Shower\"}\n{\"title\": \"Simpson Strong-Tie 12-Gauge Angle\", \"description\": \"Joints stronger\"}\n",
    );
    let model = repo().join("tests/fixtures/parity/untied_gqa").display().to_string();
    let v = p.run_json(&[
        "rerank",
        "--model",
        &model,
        "--tokenizer",
        "qwen3",
        "--query",
        "angle bracket",
        "--doc",
        "A plain doc",
        "--docs-file",
        "docs.jsonl",
        "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[3]["doc"], "Simpson Strong-Tie 12-Gauge Angle. Joints stronger");
    let mut by_rank: Vec<(i64, f64)> =
        results.iter().map(|r| (r["rank"].as_i64().unwrap(), r["score"].as_f64().unwrap())).collect();
    by_rank.sort_by_key(|r| r.0);
    assert_eq!(by_rank.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(by_rank.windows(2).all(|w| w[0].1 >= w[1].1), "ranks follow scores: {by_rank:?}");
    // Without a tokenizer next to the model, the error says what to pass.
    let out = p.pipe(&["rerank", "--model", &model, "--query", "q", "--doc", "d"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("--tokenizer"), "{out}");
    let out =
        p.pipe(&["rerank", "--model", &model, "--tokenizer", "qwen3", "--query", "q", "--docs-file", "nope.jsonl"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nope.jsonl"), "{out}");
}
