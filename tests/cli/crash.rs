//! Crash safety and concurrency: `kill -9` mid-stage, and two `pipe run`s on one store.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{Project, SAMPLE_PIPELINE};

/// A train.csv big enough that loading it takes a noticeable moment.
fn big_project(rows: usize) -> Project {
    let p = Project::new();
    let mut s = String::from("\"id\",\"product_uid\",\"product_title\",\"search_term\",\"relevance\"\n");
    for i in 0..rows {
        s.push_str(&format!(
            "{i},{},\"Product Title Number {i} With Some Words 1/2 in. x 10 ft.\",\"query {}\",{}\n",
            100000 + i % 5000,
            i % 20000,
            ["1", "1.67", "2", "2.33", "3"][i % 5]
        ));
    }
    p.write("data/train.csv", &s);
    p.write(
        "pipelines/p.toml",
        &SAMPLE_PIPELINE.replace("descriptions = \"data/product_descriptions.csv\"", "descriptions = \"\""),
    );
    p
}

fn tmp_entries(p: &Project) -> Vec<String> {
    std::fs::read_dir(p.path("artifacts/.tmp"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn kill_9_mid_stage_leaves_nothing_that_looks_complete() {
    let mut rows = 400_000;
    for _attempt in 0..3 {
        let p = big_project(rows);
        let mut child = p
            .command(&["run", "pipelines/p.toml", "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until a stage is writing into its temp dir, then kill without warning.
        let start = Instant::now();
        let mut seen = false;
        while start.elapsed() < Duration::from_secs(60) {
            if !tmp_entries(&p).is_empty() {
                seen = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !seen {
            let _ = child.kill();
            let _ = child.wait();
            rows *= 3;
            continue;
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let partial = tmp_entries(&p);
        assert!(!partial.is_empty(), "the kill should have left a temp dir behind");
        // Nothing under the store proper may look complete without having finished.
        for kind in ["load", "normalize", "split"] {
            for e in std::fs::read_dir(p.path(&format!("artifacts/{kind}"))).into_iter().flatten().flatten() {
                let m = e.path().join("manifest.json");
                assert!(m.exists(), "{} is in the store without a manifest", e.path().display());
            }
        }
        let status: serde_json::Value =
            serde_json::from_str(&p.ok(&["status", "pipelines/p.toml", "--json"]).stdout).unwrap();
        assert!(status["stages"].as_array().unwrap().iter().any(|s| s["state"] == "stale"));
        // The next run sweeps the partial output and completes.
        let out = p.ok(&["run", "pipelines/p.toml"]);
        assert!(out.stderr.contains("removed 1 partial artifact"), "{out}");
        let status: serde_json::Value =
            serde_json::from_str(&p.ok(&["status", "pipelines/p.toml", "--json"]).stdout).unwrap();
        assert!(status["stages"].as_array().unwrap().iter().all(|s| s["state"] == "fresh"), "{status}");
        assert!(tmp_entries(&p).is_empty(), "{:?}", tmp_entries(&p));
        p.ok(&["verify", "--artifacts", "artifacts"]);
        return;
    }
    panic!("never caught the run in the middle of a stage");
}

#[test]
fn concurrent_runs_compute_each_stage_once() {
    let p = big_project(150_000);
    let spawn = || {
        p.command(&["run", "pipelines/p.toml", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let va: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    for i in 0..3 {
        let sa = va["stages"][i]["status"].as_str().unwrap();
        let sb = vb["stages"][i]["status"].as_str().unwrap();
        let ran = [sa, sb].iter().filter(|s| **s == "ran").count();
        let cached = [sa, sb].iter().filter(|s| **s == "cached").count();
        assert_eq!((ran, cached), (1, 1), "stage {i}: {sa} / {sb}");
        assert_eq!(va["stages"][i]["key"], vb["stages"][i]["key"]);
    }
    p.ok(&["verify", "--artifacts", "artifacts"]);
}

#[test]
fn sigterm_removes_the_running_stage_temp_dir() {
    let p = big_project(400_000);
    let mut child = p
        .command(&["run", "pipelines/p.toml", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while tmp_entries(&p).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no stage started");
        assert!(child.try_wait().unwrap().is_none(), "run finished before it could be interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert!(tmp_entries(&p).is_empty(), "the handler removed the partial output: {:?}", tmp_entries(&p));
    p.ok(&["run", "pipelines/p.toml", "--quiet"]);
}
