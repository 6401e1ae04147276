//! `--gpus` and `[executor]` on the command line: good lists are accepted, bad ones exit 2 before
//! anything runs, naming the flag or the file and key. (Slot assignment itself is tested in the
//! engine with a stage kind that takes GPUs: `src/engine/gpu_slot_tests.rs`.)

use crate::util::{Project, SAMPLE_PIPELINE};

/// The GPUs a test process sees: exactly what `env` says, never the machine's.
const NO_CUDA_ENV: &[&str] = &["CUDA_VISIBLE_DEVICES", "PIPE_FAKE_GPUS"];

#[test]
fn gpus_flag_is_accepted_and_recorded() {
    let p = Project::with_sample();
    let out = p.pipe_env_unset(
        &["run", "pipelines/p.toml", "--gpus", "0,1,2,3", "--json"],
        &[("PIPE_FAKE_GPUS", "4")],
        NO_CUDA_ENV,
    );
    assert_eq!(out.code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    // CPU stages take no GPU, and say so.
    for s in v["stages"].as_array().unwrap() {
        assert_eq!(s["gpus"], serde_json::json!([]), "{s}");
    }
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{}/run.json", v["run_dir"].as_str().unwrap())).unwrap())
            .unwrap();
    assert_eq!(rec["stages"][0]["gpus"], serde_json::json!([]));
    // A sweep takes the flag too.
    let out = p.pipe_env_unset(
        &["sweep", "pipelines/p.toml", "--set", "split.seed=1,2", "--jobs", "2", "--gpus", "1,3", "--json"],
        &[("PIPE_FAKE_GPUS", "4")],
        NO_CUDA_ENV,
    );
    assert_eq!(out.code, 0, "{out}");
}

#[test]
fn bad_gpu_lists_exit_2_before_anything_runs() {
    let p = Project::with_sample();
    let fake4 = [("PIPE_FAKE_GPUS", "4")];
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--gpus", "a,b"], &fake4, "error: --gpus a,b: `a` is not a GPU ordinal; expected comma-separated ordinals"),
        (&["--gpus", "0,0"], &fake4, "error: --gpus 0,0: GPU 0 is listed twice"),
        (
            &["--gpus", "0,4"],
            &fake4,
            "error: --gpus 0,4: GPU 4 is not visible: this process sees GPUs 0..3 (PIPE_FAKE_GPUS=4)",
        ),
        (
            &["--gpus", "2"],
            &[("CUDA_VISIBLE_DEVICES", "5,7")],
            "error: --gpus 2: GPU 2 is not visible: this process sees GPUs 0..1 (CUDA_VISIBLE_DEVICES=5,7)",
        ),
        (&["--gpus", "0"], &[], "error: --gpus 0: GPU 0 is not visible: this process sees no GPU"),
    ];
    for (flag, env, expected) in cases {
        for cmd in [&["run", "pipelines/p.toml"][..], &["sweep", "pipelines/p.toml", "--set", "split.seed=1,2"]] {
            let args: Vec<&str> = cmd.iter().chain(flag.iter()).copied().collect();
            let out = p.pipe_env_unset(&args, env, NO_CUDA_ENV);
            assert_eq!(out.code, 2, "{out}");
            assert!(out.stderr.contains(expected), "{out}\nexpected: {expected}");
        }
    }
    assert!(!p.path("artifacts").exists(), "a usage error touches no artifact");
    // CUDA_VISIBLE_DEVICES numbers the process's GPUs by position: 1 is the second entry, visible.
    let out =
        p.pipe_env_unset(&["run", "pipelines/p.toml", "--gpus", "1"], &[("CUDA_VISIBLE_DEVICES", "5,7")], NO_CUDA_ENV);
    assert_eq!(out.code, 0, "{out}");
}

#[test]
fn executor_table_mistakes_name_the_file_and_key() {
    let p = Project::with_sample();
    let cases = [
        ("[executor]\nkind = \"slurmm\"\n", "pipelines/p.toml: `executor.kind`: unknown executor kind `slurmm`"),
        ("[executor]\ngpus_per_stag = 2\n", "pipelines/p.toml: `executor.gpus_per_stag`: unknown key"),
        (
            "[executor]\ngpus = [9]\n",
            "pipelines/p.toml: `executor.gpus`: GPU 9 is not visible: this process sees GPUs 0..3",
        ),
        ("[executor]\ngpus = \"0,1\"\n", "pipelines/p.toml: `executor.gpus`: expected a list of GPU ordinals"),
    ];
    for (table, expected) in cases {
        p.write("pipelines/p.toml", &format!("{SAMPLE_PIPELINE}\n{table}"));
        let out = p.pipe_env_unset(&["run", "pipelines/p.toml"], &[("PIPE_FAKE_GPUS", "4")], NO_CUDA_ENV);
        assert_eq!(out.code, 2, "{out}");
        assert!(out.stderr.contains(expected), "{out}\nexpected: {expected}");
    }
    // A valid table: `pipe config` shows it with its defaults, `--gpus` beats it, and the run goes through.
    p.write("pipelines/p.toml", &format!("{SAMPLE_PIPELINE}\n[executor]\nkind = \"local\"\ngpus = [9]\n"));
    let cfg = p.ok(&["config", "pipelines/p.toml"]).stdout;
    assert!(
        cfg.contains("[executor]\nkind = \"local\"\ngpus = [9]\ngpus_per_stage = 1\nstages_per_gpu = 1\n"),
        "{cfg}"
    );
    let out = p.pipe_env_unset(&["run", "pipelines/p.toml", "--gpus", "0"], &[("PIPE_FAKE_GPUS", "4")], NO_CUDA_ENV);
    assert_eq!(out.code, 0, "{out}");
}

#[test]
fn jobs_on_one_pipeline_runs_independent_stages_and_keeps_the_keys() {
    let branches =
        format!("{SAMPLE_PIPELINE}\n[stages.split_b]\nkind = \"split\"\nneeds = [\"normalize\"]\nseed = 7\n");
    let parallel = Project::with_sample();
    parallel.write("pipelines/p.toml", &branches);
    let v = parallel.run_json(&["run", "pipelines/p.toml", "--jobs", "2", "--json"]);
    let serial = Project::with_sample();
    serial.write("pipelines/p.toml", &branches);
    let w = serial.run_json(&["run", "pipelines/p.toml", "--json"]);
    let rows = |v: &serde_json::Value| -> Vec<(String, String, String)> {
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].to_string(), s["status"].to_string(), s["key"].to_string()))
            .collect()
    };
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(rows(&v), rows(&w), "same stages, order, statuses and keys with --jobs 2 as without");
    assert_eq!(rows(&v).len(), 4);
    let again = parallel.run_json(&["run", "pipelines/p.toml", "--jobs", "2", "--json"]);
    assert!(again["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{again}");
}
