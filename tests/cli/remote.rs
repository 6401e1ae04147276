//! The remote artifact store, on a real S3 server (moto, see `tests/util/s3.rs`) and on `file://`:
//! a fresh clone fetches what another machine computed, a damaged remote object is refused, `kill -9`
//! mid-upload or mid-download leaves nothing a later run trusts, and credentials never leak.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::s3::{S3, SECRET};
use crate::util::{repo, Output, Project};

/// One remote for a test: a directory behind `file://`, or a bucket prefix on the moto server.
enum Remote {
    File(tempfile::TempDir),
    S3(S3),
}

const PREFIX: &str = "team/shared";

impl Remote {
    fn file() -> Remote {
        Remote::File(tempfile::tempdir().unwrap())
    }

    /// None when moto is unavailable (and not required): the caller skips.
    fn s3(bucket: &str) -> Option<Remote> {
        S3::start(bucket).map(Remote::S3)
    }

    fn url(&self) -> String {
        match self {
            Remote::File(d) => format!("file://{}/{PREFIX}", d.path().display()),
            Remote::S3(s) => format!("s3://{}/{PREFIX}", s.bucket),
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Remote::File(_) => vec![],
            Remote::S3(s) => s.env(),
        }
    }

    /// Every object under the prefix, relative to it.
    fn objects(&self) -> Vec<String> {
        match self {
            Remote::File(d) => {
                let root = d.path().join(PREFIX);
                let mut out = Vec::new();
                let mut stack = vec![root.clone()];
                while let Some(dir) = stack.pop() {
                    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        if e.path().is_dir() {
                            stack.push(e.path());
                        } else {
                            out.push(e.path().strip_prefix(&root).unwrap().to_string_lossy().to_string());
                        }
                    }
                }
                out.sort();
                out
            }
            Remote::S3(s) => {
                let mut keys: Vec<String> = s
                    .keys(&format!("{PREFIX}/"))
                    .into_iter()
                    .map(|k| k.trim_start_matches(&format!("{PREFIX}/")).to_string())
                    .collect();
                keys.sort();
                keys
            }
        }
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        match self {
            Remote::File(d) => std::fs::read(d.path().join(PREFIX).join(rel)).unwrap(),
            Remote::S3(s) => s.get(&format!("{PREFIX}/{rel}")),
        }
    }

    fn write(&self, rel: &str, bytes: &[u8]) {
        match self {
            Remote::File(d) => std::fs::write(d.path().join(PREFIX).join(rel), bytes).unwrap(),
            Remote::S3(s) => s.put(&format!("{PREFIX}/{rel}"), bytes),
        }
    }
}

fn run(p: &Project, remote: &Remote, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let url = remote.url();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--remote", url.as_str()]);
    let env = remote.env();
    let mut vars: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend_from_slice(extra);
    p.pipe_env(&all, &vars)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{out}"))
}

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

fn quickstart() -> Project {
    let p = Project::new();
    for f in ["train.csv", "product_descriptions.csv"] {
        std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
    }
    std::fs::copy(repo().join("pipelines/quickstart.toml"), p.path("pipelines/quickstart.toml")).unwrap();
    p
}

const QUICK: &[&str] = &[
    "run",
    "pipelines/quickstart.toml",
    "--set",
    "train.max_steps=12",
    "--set",
    "train.eval_every=4",
    "--set",
    "train.epochs=1",
    "--json",
];

/// Run the quickstart with a remote, then in a fresh project with an empty store: every stage is
/// fetched, none runs, the keys are the same and `pipe verify` is clean.
fn fresh_clone_fetches_everything(remote: Remote) {
    let a = quickstart();
    let out = run(&a, &remote, QUICK, &[]);
    assert_eq!(out.code, 0, "{out}");
    let first = json(&out);
    assert!(statuses(&first).iter().all(|(_, s)| s == "ran"), "{first}");
    let objects = remote.objects();
    assert_eq!(
        objects.iter().filter(|o| o.ends_with("/manifest.json") && !o.starts_with("runs/")).count(),
        7,
        "{objects:?}"
    );
    assert!(objects.iter().any(|o| o.starts_with("runs/quickstart/") && o.ends_with("run.json")), "{objects:?}");

    let b = quickstart();
    assert!(!b.path("artifacts").exists());
    // Status asks the remote only when told to, and then sees every stage there.
    let mut status_args = QUICK.to_vec();
    status_args[0] = "status";
    let status = json(&run(&b, &remote, &status_args, &[]));
    assert!(
        status["stages"].as_array().unwrap().iter().all(|s| s["state"] == "stale" && s["in_remote"] == true),
        "{status}"
    );
    let out = run(&b, &remote, QUICK, &[]);
    assert_eq!(out.code, 0, "{out}");
    let second = json(&out);
    assert!(statuses(&second).iter().all(|(_, s)| s == "fetched"), "{second}");
    for (x, y) in first["stages"].as_array().unwrap().iter().zip(second["stages"].as_array().unwrap()) {
        assert_eq!(x["key"], y["key"]);
        let reason = y["reason"].as_str().unwrap();
        assert!(reason.starts_with(&format!("fetched from {}: not in the local store", remote.url())), "{reason}");
    }
    b.ok(&["verify", "--artifacts", "artifacts"]);
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(second["run_dir"].as_str().unwrap()).join("run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["stages"][4]["status"], "fetched");
    // A third run is all local hits.
    let third = b.run_json(QUICK);
    assert!(statuses(&third).iter().all(|(_, s)| s == "cached"), "{third}");
    // Both machines' runs are in the remote, for `pipe compare --remote`.
    let cmp = run(&b, &remote, &["compare", "--format", "json", "--resamples", "0"], &[]);
    assert_eq!(cmp.code, 0, "{cmp}");
    let cmp = json(&cmp);
    assert_eq!(cmp["runs"].as_array().map(Vec::len), Some(2), "{cmp}");
}

#[test]
fn file_remote_fresh_clone_fetches_every_stage() {
    fresh_clone_fetches_everything(Remote::file());
}

#[test]
fn s3_remote_fresh_clone_fetches_every_stage() {
    if let Some(r) = Remote::s3("fresh") {
        fresh_clone_fetches_everything(r);
    }
}

/// Flip one byte of one remote file: the fetch is refused naming the object, the expected and actual
/// hash and the fix; nothing is published for the key. `pipe push --force` from a good copy repairs it.
fn tampered_object_is_refused(remote: Remote) {
    let a = Project::with_sample();
    let first = json(&run(&a, &remote, &["run", "pipelines/p.toml", "--json"], &[]));
    let key = first["stages"][2]["key"].as_str().unwrap().to_string();
    let rel = format!("split/{}/test.csv", &key[..20]);
    let mut bytes = remote.read(&rel);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    remote.write(&rel, &bytes);

    let b = Project::with_sample();
    let out = run(&b, &remote, &["run", "pipelines/p.toml", "--json"], &[]);
    assert_eq!(out.code, 1, "{out}");
    let v = json(&out);
    assert_eq!(status_of(&v, "load"), "fetched", "{v}");
    assert_eq!(status_of(&v, "split"), "failed", "{v}");
    let reason = v["stages"][2]["reason"].as_str().unwrap();
    let object = format!("{}/{rel}", remote.url());
    assert!(reason.contains(&object), "names the object {object}: {reason}");
    assert!(reason.contains("blake3") && reason.contains("the manifest says"), "{reason}");
    assert!(reason.contains("pipe push PIPELINE --force split"), "says how to repair: {reason}");
    assert!(out.stderr.contains(&object), "{out}");
    assert!(!b.path(&format!("artifacts/split/{}", &key[..20])).exists(), "nothing published for the key");
    assert_eq!(b.count_dir("artifacts/.tmp"), 0);

    let push = run(&a, &remote, &["push", "pipelines/p.toml", "split", "--force", "--json"], &[]);
    assert_eq!(push.code, 0, "{push}");
    assert_eq!(json(&push)["stages"][0]["status"], "uploaded");
    let v = json(&run(&b, &remote, &["run", "pipelines/p.toml", "--json"], &[]));
    assert_eq!(status_of(&v, "split"), "fetched", "{v}");
    b.ok(&["verify", "--artifacts", "artifacts"]);
}

#[test]
fn file_remote_tampered_object_is_refused() {
    tampered_object_is_refused(Remote::file());
}

#[test]
fn s3_remote_tampered_object_is_refused() {
    if let Some(r) = Remote::s3("tamper") {
        tampered_object_is_refused(r);
    }
}

/// A `pipe run` in the background whose stderr lines are collected as they come.
fn spawn(p: &Project, remote: &Remote, delay_ms: &str) -> (Child, Arc<Mutex<Vec<String>>>) {
    let url = remote.url();
    let mut c = p.command(&["run", "pipelines/p.toml", "--remote", &url]);
    for (k, v) in remote.env() {
        c.env(k, v);
    }
    c.env("PIPE_TEST_TRANSFER_DELAY_MS", delay_ms);
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    (child, lines)
}

fn wait_for(what: &str, child: &mut Child, lines: &Mutex<Vec<String>>, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {what}:\n{}",
            lines.lock().unwrap().join("\n")
        );
        assert!(start.elapsed() < Duration::from_secs(120), "never saw {what}:\n{}", lines.lock().unwrap().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` while split uploads: the remote has some of its files but no manifest, so a fresh
/// clone computes split (fetching only the complete stages), completes, and its upload replaces the
/// partial files.
fn kill_during_upload(remote: Remote) {
    let a = Project::with_sample();
    let (mut child, lines) = spawn(&a, &remote, "1500");
    wait_for("split uploading", &mut child, &lines, || {
        lines.lock().unwrap().iter().any(|l| l.contains("split: uploading"))
            && remote.objects().iter().any(|o| o.starts_with("split/"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let objects = remote.objects();
    let split: Vec<&String> = objects.iter().filter(|o| o.starts_with("split/")).collect();
    assert!(!split.is_empty() && !split.iter().any(|o| o.ends_with("manifest.json")), "{objects:?}");

    let b = Project::with_sample();
    let status = json(&run(&b, &remote, &["status", "pipelines/p.toml", "--json"], &[]));
    assert_eq!(status["stages"][2]["in_remote"], false, "{status}");
    let out = run(&b, &remote, &["run", "pipelines/p.toml", "--json"], &[]);
    assert_eq!(out.code, 0, "{out}");
    let v = json(&out);
    assert_eq!(
        statuses(&v),
        [("load", "fetched"), ("normalize", "fetched"), ("split", "ran")].map(|(a, b)| (a.into(), b.into()))
    );
    b.ok(&["verify", "--artifacts", "artifacts"]);
    // The clone's upload of split replaced the partial files: a third machine fetches everything, and
    // the killed machine, which still has split locally, finds nothing left to push.
    let c = Project::with_sample();
    let v = json(&run(&c, &remote, &["run", "pipelines/p.toml", "--json"], &[]));
    assert!(statuses(&v).iter().all(|(_, s)| s == "fetched"), "{v}");
    c.ok(&["verify", "--artifacts", "artifacts"]);
    let push = json(&run(&a, &remote, &["push", "pipelines/p.toml", "--json"], &[]));
    assert!(push["stages"].as_array().unwrap().iter().all(|s| s["status"] == "present"), "{push}");
}

#[test]
fn file_remote_kill_9_during_upload_leaves_nothing_trusted() {
    kill_during_upload(Remote::file());
}

#[test]
fn s3_remote_kill_9_during_upload_leaves_nothing_trusted() {
    if let Some(r) = Remote::s3("upkill") {
        kill_during_upload(r);
    }
}

fn tmp_entries(p: &Project) -> Vec<PathBuf> {
    std::fs::read_dir(p.path("artifacts/.tmp")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// `kill -9` while split downloads: only a temp dir is left, the store has no split artifact, and the
/// next run sweeps the temp dir, fetches split whole and verifies clean.
fn kill_during_download(remote: Remote) {
    let a = Project::with_sample();
    let first = json(&run(&a, &remote, &["run", "pipelines/p.toml", "--json"], &[]));
    let key = first["stages"][2]["key"].as_str().unwrap().to_string();
    let b = Project::with_sample();
    let (mut child, lines) = spawn(&b, &remote, "1500");
    wait_for("split downloading", &mut child, &lines, || {
        tmp_entries(&b).iter().any(|t| {
            t.file_name().unwrap().to_string_lossy().starts_with("split-")
                && std::fs::read_dir(t).map(|d| d.count()).unwrap_or(0) > 0
        })
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lines.lock().unwrap().iter().any(|l| l.contains("split: fetching")), "{:?}", lines.lock().unwrap());
    assert!(!b.path(&format!("artifacts/split/{}", &key[..20])).exists(), "no split artifact after the kill");
    assert!(!tmp_entries(&b).is_empty());
    let status = json(&b.ok(&["status", "pipelines/p.toml", "--json"]));
    assert_eq!(status["stages"][2]["state"], "stale", "{status}");

    let out = run(&b, &remote, &["run", "pipelines/p.toml"], &[]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stderr.contains("removed 1 partial artifact"), "{out}");
    assert!(out.stderr.contains("split      fetched") || out.stderr.contains("fetched from"), "{out}");
    assert!(tmp_entries(&b).is_empty(), "{:?}", tmp_entries(&b));
    let v = b.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(statuses(&v).iter().all(|(_, s)| s == "cached"), "{v}");
    b.ok(&["verify", "--artifacts", "artifacts"]);
}

#[test]
fn file_remote_kill_9_during_download_leaves_nothing_trusted() {
    kill_during_download(Remote::file());
}

#[test]
fn s3_remote_kill_9_during_download_leaves_nothing_trusted() {
    if let Some(r) = Remote::s3("downkill") {
        kill_during_download(r);
    }
}

/// Every file under `dir`, as text, for grepping.
fn all_text(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    out
}

#[test]
fn s3_credentials_never_reach_output_records_or_errors() {
    let Some(remote) = Remote::s3("creds") else { return };
    let p = Project::with_sample();
    let ok = run(&p, &remote, &["run", "pipelines/p.toml"], &[]);
    assert_eq!(ok.code, 0, "{ok}");
    // An unreachable endpoint, with the secret also written into the URL's user info.
    let dead = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let url_with_secret = format!("s3://someone:{SECRET}@creds/{PREFIX}");
    let mut env = remote.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", dead));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let failed_lookup =
        p.pipe_env(&["run", "pipelines/p.toml", "--force", "split", "--remote", &url_with_secret, "--json"], &env);
    assert_eq!(failed_lookup.code, 0, "an upload failure is a warning: {failed_lookup}");
    let v = json(&failed_lookup);
    let warning = v["stages"][2]["warning"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(warning.contains("pipe push pipelines/p.toml split"), "says how to retry: {warning}");
    let fresh = Project::with_sample();
    let pull = fresh.pipe_env(&["pull", "pipelines/p.toml", "load", "--remote", &url_with_secret], &env);
    assert_eq!(pull.code, 1, "{pull}");
    assert!(pull.stderr.contains("s3://creds/team/shared/load/"), "the lookup error names the object: {pull}");
    let status = fresh.pipe_env(&["status", "pipelines/p.toml", "--remote", &url_with_secret], &env);
    for out in [&ok, &failed_lookup, &pull, &status] {
        assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET), "the secret leaked:\n{out}");
    }
    assert!(failed_lookup.stdout.contains("s3://creds/team/shared"), "the URL is shown without its user info");
    let records = all_text(&p.path("artifacts/runs"));
    assert!(records.contains("\"stages\""), "the run records were read");
    assert!(!records.contains(SECRET), "the secret is in a run record");
    assert!(!all_text(&p.path("artifacts")).contains(SECRET));
}

#[test]
fn a_bad_remote_url_is_a_configuration_error_before_anything_runs() {
    let p = Project::with_sample();
    let text = std::fs::read_to_string(p.path("pipelines/p.toml")).unwrap();
    p.write("pipelines/p.toml", &text.replace("name = \"p\"", "name = \"p\"\nremote = \"ftp://host/x\""));
    let out = p.pipe(&["run", "pipelines/p.toml"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("pipelines/p.toml: `pipeline.remote`: remote `ftp:…`: unsupported scheme `ftp`"),
        "{out}"
    );
    assert!(out.stderr.contains("hint: write `s3://bucket/prefix`"), "{out}");
    assert!(!p.path("artifacts").exists(), "nothing ran");
    p.write("pipelines/p.toml", &text);
    let out = p.pipe(&["push", "pipelines/p.toml", "--remote", "s3://"]);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("--remote: remote `s3://`: names no bucket"), "{out}");
}

/// Artifacts computed before a remote was configured go up with `pipe push` (with the run record),
/// and `pipe pull` brings them into a fresh clone without running anything.
#[test]
fn file_remote_push_and_pull_by_hand() {
    let remote = Remote::file();
    let a = Project::with_sample();
    a.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(remote.objects().is_empty());
    let push = json(&run(&a, &remote, &["push", "pipelines/p.toml", "--json"], &[]));
    assert!(push["stages"].as_array().unwrap().iter().all(|s| s["status"] == "uploaded"), "{push}");
    assert_eq!(push["runs_uploaded"], 1, "{push}");
    let again = json(&run(&a, &remote, &["push", "pipelines/p.toml", "--json"], &[]));
    assert!(again["stages"].as_array().unwrap().iter().all(|s| s["status"] == "present"), "{again}");
    assert_eq!(again["runs_uploaded"], 0, "{again}");

    let b = Project::with_sample();
    let pull = json(&run(&b, &remote, &["pull", "pipelines/p.toml", "--json"], &[]));
    assert!(pull["stages"].as_array().unwrap().iter().all(|s| s["status"] == "fetched"), "{pull}");
    assert!(!b.path("artifacts/runs").read_dir().is_ok_and(|mut d| d.next().is_some()), "pull runs nothing");
    b.ok(&["verify", "--artifacts", "artifacts"]);
    let v = b.run_json(&["run", "pipelines/p.toml", "--json"]);
    assert!(statuses(&v).iter().all(|(_, s)| s == "cached"), "{v}");
    let out = run(&b, &remote, &["pull", "pipelines/p.toml", "nosuch"], &[]);
    assert_eq!(out.code, 2, "{out}");
}
