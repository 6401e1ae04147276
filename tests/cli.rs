//! Integration tests: drive the `pipe` binary in temp projects, as a user would.

mod util;

use util::{Project, SAMPLE_PIPELINE};

fn statuses(v: &serde_json::Value) -> Vec<(String, String)> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect()
}

fn status_of(v: &serde_json::Value, id: &str) -> String {
    statuses(v).into_iter().find(|(i, _)| i == id).map(|(_, s)| s).unwrap_or_default()
}

#[test]
fn second_run_executes_no_stage() {
    let p = Project::with_sample();
    let first = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert_eq!(first["status"], "ok");
    assert!(statuses(&first).iter().all(|(_, s)| s == "ran"), "{first}");
    let second = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(statuses(&second).iter().all(|(_, s)| s == "cached"), "{second}");
    // Same keys and dirs both times; the run record exists and says so.
    assert_eq!(first["stages"][2]["key"], second["stages"][2]["key"]);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{}/run.json", second["run_dir"].as_str().unwrap())).unwrap())
            .unwrap();
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["stages"][0]["status"], "cached");
}

#[test]
fn changing_split_seed_reruns_split_only() {
    let p = Project::with_sample();
    p.run_json(&["run", "pipelines/p.toml", "--json"]);
    let v = p.run_json(&["run", "pipelines/p.toml", "--set", "split.seed=7", "--json"]);
    assert_eq!(status_of(&v, "load"), "cached");
    assert_eq!(status_of(&v, "normalize"), "cached");
    assert_eq!(status_of(&v, "split"), "ran");
    let reason = v["stages"][2]["reason"].as_str().unwrap();
    assert_eq!(reason, "param split.seed changed 42 → 7");
    // And back: the seed-42 artifact is still there.
    let back = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(statuses(&back).iter().all(|(_, s)| s == "cached"), "{back}");
}

#[test]
fn identical_upstream_output_leaves_downstream_cached() {
    // Everything already lowercase: turning lowercasing off changes normalize's key but not its bytes.
    let p = Project::new();
    p.write(
        "data/train.csv",
        "\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n\
         2,100001,\"simpson strong-tie 12-gauge angle\",\"angle bracket\",3\n\
         3,100001,\"simpson strong-tie 12-gauge angle\",\"l bracket\",2.5\n\
         9,100002,\"behr premium textured deckover\",\"deck over\",3\n\
         16,100005,\"delta vero 1-handle shower\",\"rain shower head\",2.33\n\
         17,100005,\"delta vero 1-handle shower\",\"shower only faucet\",2.67\n",
    );
    p.write(
        "pipelines/p.toml",
        &SAMPLE_PIPELINE.replace("descriptions = \"data/product_descriptions.csv\"", "descriptions = \"\""),
    );
    p.run_json(&["run", "pipelines/p.toml", "--json"]);
    let v = p.run_json(&["run", "pipelines/p.toml", "--set", "normalize.lowercase=false", "--json"]);
    assert_eq!(status_of(&v, "load"), "cached");
    assert_eq!(status_of(&v, "normalize"), "ran");
    assert_eq!(status_of(&v, "split"), "cached", "{v}");
}

#[test]
fn corrupt_input_fails_cleanly_and_resumes_after_the_fix() {
    let p = Project::with_sample();
    // A second, independent branch that reads its own file.
    let pipeline = format!(
        "{SAMPLE_PIPELINE}\n[stages.load_extra]\nkind = \"load\"\npath = \"data/extra.csv\"\ndescriptions = \"\"\n\n\
         [stages.normalize_extra]\nkind = \"normalize\"\nneeds = [\"load_extra\"]\n"
    );
    p.write("pipelines/p.toml", &pipeline);
    let good = "\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n\
                1,100001,\"Angle\",\"angle bracket\",3\n2,100002,\"Deck\",\"deck over\",2\n";
    p.write("data/extra.csv", good);
    p.run_json(&["run", "pipelines/p.toml", "--json"]);
    p.write("data/extra.csv", &good.replace("deck over\",2", "deck over\",seven"));
    let out = p.pipe(&["run", "pipelines/p.toml", "--json"]);
    assert_eq!(out.code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(status_of(&v, "load"), "cached");
    assert_eq!(status_of(&v, "split"), "cached");
    assert_eq!(status_of(&v, "load_extra"), "failed");
    assert_eq!(status_of(&v, "normalize_extra"), "skipped");
    let reason = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "load_extra").unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("extra.csv:3"), "the error names file and line: {reason}");
    assert!(out.stderr.contains("load_extra"), "{out}");
    // No artifact was committed for the failed key, and no temp dir is left behind.
    let key = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "load_extra").unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!p.path(&format!("artifacts/load/{}", &key[..20])).exists());
    assert_eq!(p.count_dir("artifacts/.tmp"), 0);
    // Fix it: the failed branch runs, everything else stays cached.
    p.write("data/extra.csv", &good.replace("deck over\",2", "deck over\",2.5"));
    let v = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert_eq!(status_of(&v, "load"), "cached");
    assert_eq!(status_of(&v, "load_extra"), "ran");
    assert_eq!(status_of(&v, "normalize_extra"), "ran");
}

#[test]
fn status_explains_at_parameter_granularity() {
    let p = Project::with_sample();
    insta::assert_snapshot!("status_never_run", p.ok(&["status", "pipelines/p.toml"]).masked_keys());
    p.run_json(&["run", "pipelines/p.toml", "--json"]);
    insta::assert_snapshot!("status_fresh", p.ok(&["status", "pipelines/p.toml"]).masked_keys());
    insta::assert_snapshot!(
        "status_param_changed",
        p.ok(&[
            "status",
            "pipelines/p.toml",
            "--set",
            "split.seed=7",
            "--set",
            "split.train_ratio=0.8",
            "--set",
            "split.val_ratio=0.1",
            "--set",
            "split.test_ratio=0.1"
        ])
        .masked_keys()
    );
    insta::assert_snapshot!(
        "status_upstream_stale",
        p.ok(&["status", "pipelines/p.toml", "--set", "normalize.lowercase=false", "--set", "split.seed=1"])
            .masked_keys()
    );
    let mut train = std::fs::read(p.path("data/train.csv")).unwrap();
    train.extend_from_slice(b"999999,100001,\"Extra\",\"extra query\",2\n");
    std::fs::write(p.path("data/train.csv"), train).unwrap();
    insta::assert_snapshot!("status_input_changed", p.ok(&["status", "pipelines/p.toml"]).masked_keys());
    insta::assert_snapshot!("why_load", p.ok(&["why", "load", "pipelines/p.toml"]).stdout);
    let json: serde_json::Value =
        serde_json::from_str(&p.ok(&["status", "pipelines/p.toml", "--json"]).stdout).unwrap();
    assert_eq!(json["stages"][0]["state"], "stale");
    assert_eq!(json["stages"][0]["reasons"][0]["reason"], "input_changed");
    assert_eq!(json["stages"][0]["reasons"][0]["input"], "data/train.csv");
}

#[test]
fn env_and_set_layers_override_the_file_in_order() {
    let p = Project::with_sample();
    let cfg = p.ok_env(&["config", "pipelines/p.toml"], &[("PIPE_SPLIT__SEED", "5")]).stdout;
    assert!(cfg.contains("seed = 5"), "{cfg}");
    let cfg = p.ok_env(&["config", "pipelines/p.toml", "--set", "split.seed=6"], &[("PIPE_SPLIT__SEED", "5")]).stdout;
    assert!(cfg.contains("seed = 6"), "{cfg}");
    // The resolved config is itself a valid pipeline with the same keys (round trip).
    p.write("pipelines/resolved.toml", &cfg);
    let a: serde_json::Value = serde_json::from_str(
        &p.ok(&["run", "pipelines/p.toml", "--set", "split.seed=6", "--json", "--dry-run"]).stdout,
    )
    .unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&p.ok(&["run", "pipelines/resolved.toml", "--json", "--dry-run"]).stdout).unwrap();
    assert_eq!(a["stages"][0]["key"], b["stages"][0]["key"]);
}

#[test]
fn dry_run_until_and_force() {
    let p = Project::with_sample();
    let v = p.run_json(&["run", "pipelines/p.toml", "--until", "normalize", "--json"]);
    assert_eq!(status_of(&v, "normalize"), "ran");
    assert_eq!(status_of(&v, "split"), "skipped");
    let dry = p.run_json(&["run", "pipelines/p.toml", "--dry-run", "--json"]);
    assert_eq!(status_of(&dry, "split"), "ran");
    assert_eq!(p.count_dir("artifacts/split"), 0, "dry run writes nothing");
    let v = p.run_json(&["run", "pipelines/p.toml", "--force", "load", "--json"]);
    assert_eq!(status_of(&v, "load"), "ran");
    // Forced load produced identical bytes: early cutoff keeps normalize cached.
    assert_eq!(status_of(&v, "normalize"), "cached");
    let out = p.pipe(&["run", "pipelines/p.toml", "--force", "lod"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("did you mean `load`"), "{out}");
}

#[test]
fn verify_reports_tampered_artifacts() {
    let p = Project::with_sample();
    let v = p.run_json(&["run", "pipelines/p.toml", "--json"]);
    p.ok(&["verify", "--artifacts", "artifacts"]);
    let dir = v["stages"][2]["dir"].as_str().unwrap().to_string();
    let f = std::path::Path::new(&dir).join("test.csv");
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let out = p.pipe(&["verify", "--artifacts", "artifacts"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stdout.contains("test.csv: content changed"), "{out}");
}

#[test]
fn gc_removes_what_no_kept_run_references() {
    let p = Project::with_sample();
    let a = p.run_json(&["run", "pipelines/p.toml", "--set", "split.seed=1", "--json"]);
    let b = p.run_json(&["run", "pipelines/p.toml", "--set", "split.seed=2", "--json"]);
    let old_split = a["stages"][2]["dir"].as_str().unwrap().to_string();
    let new_split = b["stages"][2]["dir"].as_str().unwrap().to_string();
    let dry = p.ok(&["gc", "--artifacts", "artifacts", "--keep-runs", "1", "--dry-run"]);
    assert!(dry.stdout.contains("would remove"), "{dry}");
    assert!(std::path::Path::new(&old_split).exists());
    let out: serde_json::Value =
        serde_json::from_str(&p.ok(&["gc", "--artifacts", "artifacts", "--keep-runs", "1", "--json"]).stdout).unwrap();
    assert_eq!(out["runs_removed"].as_array().unwrap().len(), 1);
    assert_eq!(out["artifacts_removed"].as_array().unwrap().len(), 1, "{out}");
    assert!(out["bytes_freed"].as_u64().unwrap() > 0);
    assert!(!std::path::Path::new(&old_split).exists());
    assert!(std::path::Path::new(&new_split).exists());
    // The cached stages of the kept run are still cached.
    let v = p.run_json(&["run", "pipelines/p.toml", "--set", "split.seed=2", "--json"]);
    assert!(statuses(&v).iter().all(|(_, s)| s == "cached"), "{v}");
}

#[test]
fn show_and_dag() {
    let p = Project::with_sample();
    let out = p.pipe(&["show", "split", "pipelines/p.toml"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("has no current artifact") && out.stderr.contains("is stale"), "{out}");
    p.run_json(&["run", "pipelines/p.toml", "--json"]);
    let out = p.ok(&["show", "split", "pipelines/p.toml"]);
    assert!(out.stdout.contains("\"kind\": \"split\""), "{out}");
    assert!(out.stdout.contains("train.csv"));
    insta::assert_snapshot!("dag_text", p.ok(&["dag", "pipelines/p.toml"]).stdout);
    insta::assert_snapshot!("dag_dot", p.ok(&["dag", "pipelines/p.toml", "--dot"]).stdout);
}

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/compare.rs"]
mod compare;
#[path = "cli/crash.rs"]
mod crash;
#[path = "cli/docs.rs"]
mod docs;
#[path = "cli/gpus.rs"]
mod gpus;
#[path = "cli/hub.rs"]
mod hub;
#[path = "cli/layouts.rs"]
mod layouts;
#[path = "cli/malformed.rs"]
mod malformed;
#[path = "cli/metrics.rs"]
mod metrics;
#[path = "cli/mine.rs"]
mod mine;
#[path = "cli/quickstart.rs"]
mod quickstart;
#[path = "cli/remote.rs"]
mod remote;
#[path = "cli/rerank.rs"]
mod rerank;
#[path = "cli/slurm.rs"]
mod slurm;
#[path = "cli/sweep.rs"]
mod sweep;
