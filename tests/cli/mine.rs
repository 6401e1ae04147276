//! Hard-negative mining end to end: `pipelines/mine.toml` (the quickstart with a `mine` stage between
//! split and tokenize and `train.loss = "group_ce"`) runs to `analyze` on the committed sample, and
//! changing `negatives_per_query` reruns `mine` and what follows it only.

use crate::util::{repo, Project};

fn project() -> Project {
    let p = Project::new();
    for f in ["train.csv", "product_descriptions.csv"] {
        std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    std::fs::copy(repo().join("pipelines/mine.toml"), p.path("pipelines/mine.toml")).unwrap();
    p
}

fn status<'a>(v: &'a serde_json::Value, id: &str) -> &'a str {
    v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()["status"].as_str().unwrap()
}

fn dir(v: &serde_json::Value, id: &str) -> std::path::PathBuf {
    let s = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap();
    std::path::PathBuf::from(s["dir"].as_str().unwrap())
}

fn manifest(v: &serde_json::Value, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir(v, id).join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn mine_pipeline_runs_to_analyze_and_negatives_per_query_reruns_mine_and_downstream_only() {
    let p = project();
    let short = ["--set", "train.max_steps=6", "--set", "train.epochs=1", "--json"];
    let mut args = vec!["run", "pipelines/mine.toml"];
    args.extend(short);
    let v = p.run_json(&args);
    assert_eq!(v["status"], "ok", "{v}");
    let ids: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["load", "normalize", "split", "mine", "tokenize", "train", "evaluate", "analyze"]);
    assert!(std::fs::read_to_string(dir(&v, "analyze").join("report.html")).unwrap().contains("<svg"));

    // The manifest counts what was mined and dropped; train.csv holds exactly that many mined rows.
    let m = manifest(&v, "mine");
    let mined = m["metrics"]["mined"].as_u64().unwrap();
    assert!(mined > 0, "{m}");
    assert!(m["metrics"]["dropped_margin"].as_u64().is_some(), "{m}");
    assert!(m["metrics"]["dropped_positive"].as_u64().unwrap() > 0, "{m}");
    let train = std::fs::read_to_string(dir(&v, "mine").join("train.csv")).unwrap();
    assert!(train.starts_with("id,product_id,query,title,description,relevance,label,mined\n"));
    let mut rdr = csv::Reader::from_reader(train.as_bytes());
    let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
    assert_eq!(rows.iter().filter(|r| &r[7] == "1").count() as u64, mined);
    let split_train = std::fs::read_to_string(dir(&v, "split").join("train.csv")).unwrap();
    assert_eq!(rows.iter().filter(|r| &r[7] == "0").count(), split_train.lines().count() - 1);
    // Not more than 7 per query, and val/test are the split's, byte for byte.
    let mut per_query = std::collections::HashMap::<String, usize>::new();
    for r in rows.iter().filter(|r| &r[7] == "1") {
        *per_query.entry(r[2].to_string()).or_default() += 1;
    }
    assert!(per_query.values().all(|&n| n <= 7), "{per_query:?}");
    for f in ["val.csv", "test.csv"] {
        assert_eq!(std::fs::read(dir(&v, "mine").join(f)).unwrap(), std::fs::read(dir(&v, "split").join(f)).unwrap());
    }
    // Tokenize read mine's train.csv: its train store holds the mined rows too.
    let tok = manifest(&v, "tokenize");
    assert_eq!(tok["stats"]["splits"]["train"]["pairs"].as_u64().unwrap() as usize, rows.len(), "{tok}");

    // Fewer negatives: load, normalize and split are cached; mine and everything after it rerun.
    let mut args = vec!["run", "pipelines/mine.toml", "--set", "mine.negatives_per_query=3"];
    args.extend(short);
    let w = p.run_json(&args);
    assert_eq!(w["status"], "ok", "{w}");
    for id in ["load", "normalize", "split"] {
        assert_eq!(status(&w, id), "cached", "{id}: {w}");
    }
    for id in ["mine", "tokenize", "train", "evaluate", "analyze"] {
        assert_eq!(status(&w, id), "ran", "{id}: {w}");
    }
    let reason = w["stages"][3]["reason"].as_str().unwrap();
    assert_eq!(reason, "param mine.negatives_per_query changed 7 → 3");
    let fewer = manifest(&w, "mine")["metrics"]["mined"].as_u64().unwrap();
    assert!(fewer < mined, "{fewer} vs {mined}");
}
