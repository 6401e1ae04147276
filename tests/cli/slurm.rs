//! The Slurm executor against a real single-node cluster, started through `scripts/slurm-local.sh up
//! --no-install` (tests download nothing: CI installs Slurm with `scripts/slurm-local.sh up` first).
//! Without a cluster (Slurm not installed, not root) these tests skip loudly, unless
//! `PIPE_REQUIRE_SLURM=1` (CI) makes that a failure.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pipe::engine::key::KeyInputs;

use crate::util::{repo, Project, SAMPLE_PIPELINE};

/// Brings the cluster up once per test binary; false (after a loud message) when it cannot.
fn slurm_up() -> bool {
    static UP: OnceLock<Result<(), String>> = OnceLock::new();
    let up = UP.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/slurm-local.sh"))
            .args(["up", "--no-install"])
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("scripts/slurm-local.sh up exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr)))
        }
    });
    match up {
        Ok(()) => true,
        Err(why) if std::env::var("PIPE_REQUIRE_SLURM").as_deref() == Ok("1") => {
            panic!("PIPE_REQUIRE_SLURM=1 but the local Slurm cluster is not up: {why}")
        }
        Err(why) => {
            eprintln!(
                "\n==================== SKIPPED: no Slurm cluster ====================\n{why}\n\
                 (run `sudo bash scripts/slurm-local.sh up`; PIPE_REQUIRE_SLURM=1 makes this a failure)\n"
            );
            false
        }
    }
}

fn job_state(job: u64) -> String {
    let out = Command::new("scontrol").args(["show", "job", "-o", &job.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace().find_map(|w| w.strip_prefix("JobState=")).unwrap_or("UNKNOWN").to_string()
}

fn quickstart_project() -> Project {
    let p = Project::new();
    for f in ["train.csv", "product_descriptions.csv"] {
        std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    std::fs::copy(repo().join("pipelines/quickstart.toml"), p.path("pipelines/quickstart.toml")).unwrap();
    p
}

fn record(run_dir: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(format!("{run_dir}/run.json")).unwrap()).unwrap()
}

/// (point, stage, key) from each point's run record. train's output holds its timings
/// (`train_log.jsonl`), so no two trainings hash alike, local or not: downstream of train the keys
/// are compared with the train and evaluate output hashes masked in their key inputs (as the pinned
/// quickstart keys are), after checking that the manifest's inputs do give the key.
fn point_keys(v: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for pt in v["points"].as_array().unwrap() {
        let rec = record(pt["run_dir"].as_str().unwrap());
        for s in rec["stages"].as_array().unwrap() {
            let dir = std::path::Path::new(s["dir"].as_str().unwrap());
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let mut inputs: KeyInputs = serde_json::from_value(manifest["key_inputs"].clone()).unwrap();
            assert_eq!(inputs.hash(), s["key"].as_str().unwrap(), "the manifest's key inputs give the key");
            for u in &mut inputs.upstream {
                if u.kind == "train" || u.kind == "evaluate" {
                    u.output = "masked".into();
                }
            }
            out.push((pt["name"].as_str().unwrap().to_string(), s["id"].as_str().unwrap().to_string(), inputs.hash()));
        }
    }
    out
}

#[test]
fn resources_and_retries_stay_out_of_the_cache_key() {
    let p = Project::with_sample();
    let plain = p.run_json(&["run", "pipelines/p.toml", "--dry-run", "--json"]);
    p.write(
        "pipelines/p.toml",
        &format!(
            "{SAMPLE_PIPELINE}retries = 2\n\n[stages.split.resources]\ngpus = 1\ncpus = 4\nmem = \"8G\"\ntime = \"10:00\"\n\n\
             [executor]\nkind = \"local\"\npartition = \"gpu\"\ngpus_per_stage = 1\n"
        ),
    );
    let with = p.run_json(&["run", "pipelines/p.toml", "--dry-run", "--json"]);
    for i in 0..3 {
        assert_eq!(plain["stages"][i]["key"], with["stages"][i]["key"], "stage {i}");
    }
    p.write("pipelines/p.toml", &format!("{SAMPLE_PIPELINE}\n[stages.split.resources]\ngpu = 1\n"));
    let out = p.pipe(&["run", "pipelines/p.toml"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("stages.split.resources.gpu") && out.stderr.contains("did you mean `gpus`"), "{out}");
    p.write("pipelines/p.toml", SAMPLE_PIPELINE);
    let out = p.pipe(&["run", "pipelines/p.toml", "--detach"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("--detach needs the Slurm executor"), "{out}");
}

#[test]
fn quickstart_sweep_runs_as_slurm_jobs_with_the_local_keys() {
    if !slurm_up() {
        return;
    }
    let args = [
        "run",
        "pipelines/quickstart.toml",
        "--set",
        "train.learning_rate=1e-3,2e-3",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.epochs=1",
        "--json",
    ];
    let local = quickstart_project();
    let lv = local.run_json(&args);
    let cluster = quickstart_project();
    let mut slurm_args = args.to_vec();
    slurm_args.extend(["--executor", "slurm"]);
    let sv = cluster.run_json(&slurm_args);
    assert_eq!(sv["status"], "ok", "{sv}");
    // Every stage was computed by a job Slurm completed; shared stages by one job for both points.
    let mut jobs: Vec<(String, u64)> = Vec::new();
    for pt in sv["points"].as_array().unwrap() {
        let rec = record(pt["run_dir"].as_str().unwrap());
        for s in rec["stages"].as_array().unwrap() {
            if s["status"] == "ran" {
                let job = s["slurm_job"].as_u64().unwrap_or_else(|| panic!("a ran stage without slurm_job: {s}"));
                assert_eq!(pt["slurm_jobs"][s["id"].as_str().unwrap()], job, "{pt}");
                jobs.push((s["id"].as_str().unwrap().to_string(), job));
            } else {
                assert_eq!(s["status"], "cached", "{s}");
                assert!(s.get("slurm_job").is_none(), "a cached stage names no job: {s}");
            }
        }
    }
    let count = |id: &str| jobs.iter().filter(|(s, _)| s == id).count();
    for shared in ["load", "normalize", "split", "tokenize"] {
        assert_eq!(count(shared), 1, "{shared} is one job for both points: {jobs:?}");
    }
    for per_point in ["train", "evaluate", "analyze"] {
        assert_eq!(count(per_point), 2, "{per_point}: {jobs:?}");
    }
    for (stage, job) in &jobs {
        assert_eq!(job_state(*job), "COMPLETED", "job {job} ({stage})");
        let log = cluster.path(&format!("artifacts/slurm/quickstart/{stage}/{job}.log"));
        assert!(log.exists(), "{} missing", log.display());
    }
    assert_eq!(point_keys(&sv), point_keys(&lv), "the same keys as the local sweep");
    cluster.ok(&["verify", "--artifacts", "artifacts"]);
}

#[test]
fn cancelled_train_job_resumes_from_its_checkpoint() {
    if !slurm_up() {
        return;
    }
    let p = quickstart_project();
    let sets = ["--set", "train.max_steps=40", "--set", "train.epochs=1", "--set", "train.checkpoint_every=5"];
    // Up to train only: evaluate and analyze would add minutes and nothing to what is tested here.
    let mut args =
        vec!["run", "pipelines/quickstart.toml", "--until", "train", "--executor", "slurm", "--detach", "--json"];
    args.extend(sets);
    let v = p.run_json(&args);
    assert_eq!(v["status"], "submitted", "{v}");
    let job_of = |v: &serde_json::Value, stage: &str| {
        v["jobs"].as_array().unwrap().iter().find(|j| j["stage"] == stage).unwrap()["job"].as_u64().unwrap()
    };
    let train_job = job_of(&v, "train");
    // A second run while they are queued waits for the same jobs instead of submitting new ones.
    let again = p.run_json(&args);
    for j in again["jobs"].as_array().unwrap() {
        assert_eq!(j["submitted"], false, "{again}");
        assert_eq!(j["job"].as_u64(), Some(job_of(&v, j["stage"].as_str().unwrap())), "{again}");
    }
    // `pipe status` follows the detached jobs.
    let mut status_args = vec!["status", "pipelines/quickstart.toml"];
    status_args.extend(sets);
    let status = p.ok(&status_args).stdout;
    let line = status.lines().find(|l| l.starts_with("train")).unwrap();
    assert!(
        line.contains(&format!("pending (slurm job {train_job})"))
            || line.contains(&format!("running (slurm job {train_job})")),
        "{status}"
    );
    // Wait for the first checkpoint in the store's scratch dir, then cancel the job mid-training.
    let start = Instant::now();
    let ckpt = loop {
        let found = std::fs::read_dir(p.path("artifacts/.scratch"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("checkpoint.safetensors"))
            .find(|c| c.exists());
        if let Some(c) = found {
            break c;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint; train job {}", job_state(train_job));
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(ckpt.starts_with(p.path("artifacts")), "checkpoints live in the shared store: {}", ckpt.display());
    assert!(Command::new("scancel").arg(train_job.to_string()).status().unwrap().success());
    let start = Instant::now();
    while job_state(train_job) != "CANCELLED" {
        assert!(start.elapsed() < Duration::from_secs(60), "job {train_job} is {}", job_state(train_job));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ckpt.exists(), "the checkpoint survives the cancellation");
    let mut args = vec!["run", "pipelines/quickstart.toml", "--until", "train", "--executor", "slurm", "--json"];
    args.extend(sets);
    let v = p.run_json(&args);
    assert_eq!(v["status"], "ok", "{v}");
    let train = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "train").unwrap();
    assert_eq!(train["status"], "ran");
    let new_job = train["slurm_job"].as_u64().unwrap();
    assert_ne!(new_job, train_job);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(train["dir"].as_str().unwrap()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let resumed = manifest["stats"]["resumed_from_step"].as_u64().expect("train resumed");
    assert!(resumed >= 5, "resumed from step {resumed}, not from the start");
    let log = std::fs::read_to_string(p.path(&format!("artifacts/slurm/quickstart/train/{new_job}.log"))).unwrap();
    assert!(log.contains(&format!("resuming training from step {resumed}")), "{log}");
}

#[test]
fn a_failing_stage_names_its_job_and_log_after_its_retries() {
    if !slurm_up() {
        return;
    }
    let p = Project::with_sample();
    // Valid configuration, bad data: fails only when the job runs.
    let mut train = std::fs::read(p.path("data/train.csv")).unwrap();
    train.extend_from_slice(b"999999,100001,\"Extra\",\"extra query\",seven\n");
    std::fs::write(p.path("data/train.csv"), train).unwrap();
    p.write("pipelines/p.toml", &SAMPLE_PIPELINE.replace("[stages.normalize]", "retries = 1\n\n[stages.normalize]"));
    let out = p.pipe(&["run", "pipelines/p.toml", "--executor", "slurm", "--json"]);
    assert_eq!(out.code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let load = &v["stages"][0];
    assert_eq!(load["status"], "failed", "{v}");
    let job = load["slurm_job"].as_u64().unwrap();
    let log = p.path(&format!("artifacts/slurm/p/load/{job}.log"));
    let reason = load["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("slurm job {job} ended FAILED")), "{reason}");
    assert!(reason.contains(&log.display().to_string()), "{reason}");
    assert!(out.stderr.contains("stage `load`") && out.stderr.contains(&log.display().to_string()), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("train.csv") && text.contains("seven"), "the log says what went wrong: {text}");
    // retries = 1: two attempts, two logs.
    let logs = std::fs::read_dir(p.path("artifacts/slurm/p/load"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .count();
    assert_eq!(logs, 2);
    assert_eq!(v["stages"][1]["status"], "skipped");
    assert!(v["stages"][1].get("slurm_job").is_none());
}

#[test]
fn interrupting_a_waiting_run_cancels_its_jobs() {
    if !slurm_up() {
        return;
    }
    let p = Project::with_sample();
    // The executor from the file; jobs held back a minute so that none can finish first.
    p.write(
        "pipelines/p.toml",
        &format!("{SAMPLE_PIPELINE}\n[executor]\nkind = \"slurm\"\nextra_args = [\"--begin=now+60\"]\n"),
    );
    let mut child =
        p.command(&["run", "pipelines/p.toml"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while p.count_dir("artifacts/slurm/jobs") < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "jobs not submitted");
        assert!(child.try_wait().unwrap().is_none(), "pipe run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut jobs = Vec::new();
    for e in std::fs::read_dir(p.path("artifacts/slurm/jobs")).unwrap().flatten() {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        jobs.push(r["job"].as_u64().unwrap());
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled slurm job"), "{stderr}");
    for job in jobs {
        assert_eq!(job_state(job), "CANCELLED", "job {job}");
    }
}

#[test]
fn requeued_train_job_resumes_within_the_same_run() {
    if !slurm_up() {
        return;
    }
    let p = quickstart_project();
    let mut child = p
        .command(&[
            "run",
            "pipelines/quickstart.toml",
            "--until",
            "train",
            "--executor",
            "slurm",
            "--json",
            "--set",
            "train.max_steps=30",
            "--set",
            "train.epochs=1",
            "--set",
            "train.checkpoint_every=3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let train_job = loop {
        let has_ckpt = std::fs::read_dir(p.path("artifacts/.scratch"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("checkpoint.safetensors").exists());
        let logs: Vec<u64> = std::fs::read_dir(p.path("artifacts/slurm/quickstart/train"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.path().file_stem()?.to_str()?.parse().ok())
            .collect();
        if has_ckpt && !logs.is_empty() {
            break logs[0];
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no train checkpoint");
        assert!(child.try_wait().unwrap().is_none(), "pipe run ended early");
        std::thread::sleep(Duration::from_millis(100));
    };
    // What preemption with requeue does: the job is killed and queued again under the same id.
    assert!(Command::new("scontrol").args(["requeue", &train_job.to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    let train = v["stages"].as_array().unwrap().iter().find(|s| s["id"] == "train").unwrap();
    assert_eq!(train["slurm_job"].as_u64(), Some(train_job), "{v}");
    let log = std::fs::read_to_string(p.path(&format!("artifacts/slurm/quickstart/train/{train_job}.log"))).unwrap();
    assert!(log.contains("DUE TO JOB REQUEUE"), "{log}");
    assert!(log.contains("resuming training from step"), "the requeued attempt resumed: {log}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(train["dir"].as_str().unwrap()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(manifest["stats"]["resumed_from_step"].as_u64().is_some_and(|s| s >= 3), "{}", manifest["stats"]);
}

#[test]
fn slurm_jobs_use_the_runs_remote_store() {
    if !slurm_up() {
        return;
    }
    // `--remote` reaches the jobs: they upload what they compute, so a fresh project fetches it all.
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}/team", remote.path().display());
    let cluster = Project::with_sample();
    let v = cluster.run_json(&["run", "pipelines/p.toml", "--executor", "slurm", "--remote", &url, "--json"]);
    assert_eq!(v["status"], "ok", "{v}");
    for s in v["stages"].as_array().unwrap() {
        assert!(s["slurm_job"].as_u64().is_some(), "computed by a job: {s}");
        // The remote mirrors the local store's layout, `<kind>/<short key>/`.
        let local = std::path::Path::new(s["dir"].as_str().unwrap());
        let uploaded = remote.path().join("team").join(s["kind"].as_str().unwrap()).join(local.file_name().unwrap());
        assert!(uploaded.join("manifest.json").exists(), "the job uploaded {}: {v}", uploaded.display());
    }
    let fresh = Project::with_sample();
    let w = fresh.run_json(&["run", "pipelines/p.toml", "--remote", &url, "--json"]);
    let got: Vec<&str> = w["stages"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(got, ["fetched"; 3], "{w}");
    for (a, b) in v["stages"].as_array().unwrap().iter().zip(w["stages"].as_array().unwrap()) {
        assert_eq!(a["key"], b["key"]);
    }
}
