//! Every malformed pipeline exits 2, names the file (or flag/variable) and the key, and touches no artifact.

use crate::util::Project;

const BASE: &str = "[pipeline]\nname = \"p\"\n\n[stages.load]\nkind = \"load\"\npath = \"data/train.csv\"\ndescriptions = \"\"\n\n[stages.normalize]\nkind = \"normalize\"\nneeds = [\"load\"]\n\n[stages.split]\nkind = \"split\"\nneeds = [\"normalize\"]\n";

/// BASE up to a tokenize stage, and a tiny random-init train stage on the CPU.
const MODEL_STAGES: &str = "\n[stages.tokenize]\nkind = \"tokenize\"\nneeds = [\"split\"]\n\n[stages.train]\nkind = \"train\"\nneeds = [\"tokenize\"]\nmodel = \"random\"\ndevice = \"cpu\"\n";

/// (name, pipeline text, extra args, env, expected origin, expected key, expected text)
type Case = (
    &'static str,
    String,
    Vec<&'static str>,
    Vec<(&'static str, &'static str)>,
    &'static str,
    &'static str,
    &'static str,
);

fn cases() -> Vec<Case> {
    let f = "pipelines/bad.toml";
    vec![
        ("toml syntax", "[pipeline\nname = \"p\"".into(), vec![], vec![], "pipelines/bad.toml:1", "", "invalid TOML"),
        (
            "duplicate stage id",
            format!("{BASE}\n[stages.split]\nkind = \"split\"\n"),
            vec![],
            vec![],
            f,
            "",
            "duplicate",
        ),
        (
            "missing [pipeline]",
            BASE.replace("[pipeline]\nname = \"p\"\n", ""),
            vec![],
            vec![],
            f,
            "pipeline",
            "missing `[pipeline]`",
        ),
        ("missing name", BASE.replace("name = \"p\"\n", ""), vec![], vec![], f, "pipeline.name", "missing"),
        (
            "bad name",
            BASE.replace("name = \"p\"", "name = \"a/b\""),
            vec![],
            vec![],
            f,
            "pipeline.name",
            "not a valid name",
        ),
        (
            "unknown pipeline key",
            BASE.replace("name = \"p\"", "name = \"p\"\nartefacts = \"x\""),
            vec![],
            vec![],
            f,
            "pipeline.artefacts",
            "did you mean `artifacts`",
        ),
        (
            "unknown top-level",
            format!("{BASE}\n[stagez.x]\nkind = \"load\"\n"),
            vec![],
            vec![],
            f,
            "stagez",
            "did you mean `stages`",
        ),
        ("no stages", "[pipeline]\nname = \"p\"\n".into(), vec![], vec![], f, "stages", "no stages"),
        (
            "missing kind",
            BASE.replace("kind = \"normalize\"\n", ""),
            vec![],
            vec![],
            f,
            "stages.normalize.kind",
            "missing",
        ),
        (
            "unknown kind",
            BASE.replace("kind = \"normalize\"", "kind = \"normalise\""),
            vec![],
            vec![],
            f,
            "stages.normalize.kind",
            "did you mean `normalize`",
        ),
        (
            "unknown parameter",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\"]\nsed = 3"),
            vec![],
            vec![],
            f,
            "stages.split.sed",
            "did you mean `seed`",
        ),
        (
            "wrong type",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\"]\nseed = \"abc\""),
            vec![],
            vec![],
            f,
            "stages.split.seed",
            "expected an integer, found a string",
        ),
        (
            "float for integer",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\"]\nseed = 4.5"),
            vec![],
            vec![],
            f,
            "stages.split.seed",
            "expected an integer",
        ),
        (
            "bad value",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\"]\ntrain_ratio = 0.9"),
            vec![],
            vec![],
            f,
            "stages.split.",
            "sum",
        ),
        (
            "needs unknown stage",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalise\"]"),
            vec![],
            vec![],
            f,
            "stages.split.needs",
            "did you mean `normalize`",
        ),
        (
            "needs not an array",
            BASE.replace("needs = [\"normalize\"]", "needs = \"normalize\""),
            vec![],
            vec![],
            f,
            "stages.split.needs",
            "needs = [\"normalize\"]",
        ),
        (
            "cycle",
            BASE.replace("[stages.load]\nkind = \"load\"", "[stages.load]\nkind = \"load\"\nneeds = [\"split\"]"),
            vec![],
            vec![],
            f,
            "needs",
            "load → normalize → split → load",
        ),
        (
            "self cycle",
            BASE.replace("needs = [\"load\"]", "needs = [\"normalize\"]"),
            vec![],
            vec![],
            f,
            "stages.normalize.needs",
            "normalize → normalize",
        ),
        (
            "bad stage id",
            format!("{BASE}\n[stages.\"a b\"]\nkind = \"load\"\n"),
            vec![],
            vec![],
            f,
            "stages.a b",
            "not a valid stage id",
        ),
        (
            "--set unknown stage",
            BASE.into(),
            vec!["--set", "splt.seed=1"],
            vec![],
            "--set splt.seed=1",
            "stages.splt",
            "did you mean `split`",
        ),
        (
            "--set unknown param",
            BASE.into(),
            vec!["--set", "split.seeds=1"],
            vec![],
            "--set split.seeds=1",
            "stages.split.seeds",
            "did you mean `seed`",
        ),
        (
            "--set wrong type",
            BASE.into(),
            vec!["--set", "split.seed=abc"],
            vec![],
            "--set split.seed=abc",
            "stages.split.seed",
            "expected an integer",
        ),
        (
            "--set malformed",
            BASE.into(),
            vec!["--set", "seed"],
            vec![],
            "--set seed",
            "",
            "expected `<stage>.<param>=<value>`",
        ),
        (
            "env wrong type",
            BASE.into(),
            vec![],
            vec![("PIPE_SPLIT__SEED", "x")],
            "environment variable PIPE_SPLIT__SEED",
            "stages.split.seed",
            "expected an integer",
        ),
        (
            "env unknown stage",
            BASE.into(),
            vec![],
            vec![("PIPE_SPLITS__SEED", "1")],
            "environment variable PIPE_SPLITS__SEED",
            "stages.splits",
            "no such stage",
        ),
        (
            "evaluate of the trained model without a train upstream",
            format!(
                "{BASE}\n[stages.tokenize]\nkind = \"tokenize\"\nneeds = [\"split\"]\n\n\
                 [stages.eval]\nkind = \"evaluate\"\nneeds = [\"tokenize\", \"split\"]\n"
            ),
            vec![],
            vec![],
            f,
            "stages.eval.needs",
            "stage `eval` (evaluate) reads an upstream stage of kind `train` because `model = \"trained\"`",
        ),
        (
            "evaluate without a train upstream, the train stage in the pipeline",
            format!(
                "{BASE}{MODEL_STAGES}\n[stages.eval]\nkind = \"evaluate\"\nneeds = [\"tokenize\"]\nmodel = \"base\"\n"
            ),
            vec![],
            vec![],
            f,
            "stages.eval.needs",
            "write `needs = [\"tokenize\", \"train\"]`, or change `model`",
        ),
        (
            "analyze without its required upstreams",
            format!("{BASE}\n[stages.report]\nkind = \"analyze\"\nneeds = [\"split\"]\n"),
            vec![],
            vec![],
            f,
            "stages.report.needs",
            "reads an upstream stage of kind `evaluate`",
        ),
        (
            "two upstream tables",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\", \"load\"]"),
            vec![],
            vec![],
            f,
            "stages.split.needs",
            "kind `normalize` or `load`, but `needs` names 2: `normalize`, `load`",
        ),
        (
            "non-finite float",
            BASE.replace("needs = [\"normalize\"]", "needs = [\"normalize\"]\nrelevance_threshold = nan"),
            vec![],
            vec![],
            f,
            "stages.split.relevance_threshold",
            "finite",
        ),
    ]
}

#[test]
fn malformed_pipelines_exit_2_naming_file_and_key() {
    let cases = cases();
    assert!(cases.len() >= 15);
    for (name, text, extra, env, origin, key, expect) in cases {
        let p = Project::new();
        p.write("pipelines/bad.toml", &text);
        for cmd in ["run", "status"] {
            let mut args = vec![cmd, "pipelines/bad.toml"];
            args.extend(extra.iter().copied());
            let out = p.pipe_env(&args, &env);
            assert_eq!(out.code, 2, "case `{name}`:\n{out}");
            let first = out.stderr.lines().next().unwrap_or("");
            assert!(
                first.starts_with(&format!("error: {origin}")),
                "case `{name}`: origin `{origin}` not first:\n{out}"
            );
            if !key.is_empty() {
                assert!(out.stderr.contains(&format!("`{key}")), "case `{name}`: key `{key}` not named:\n{out}");
            }
            assert!(out.stderr.contains(expect), "case `{name}`: `{expect}` missing:\n{out}");
            assert!(!p.path("artifacts").exists(), "case `{name}`: a config error touched the store");
        }
    }
}

/// A compute stage on a device this build lacks is refused by the commands that compute, before the
/// stages ahead of it run; the pipeline stays valid for the commands that only look at it.
#[test]
fn cuda_in_a_build_without_cuda_exits_2_before_anything_runs() {
    if cfg!(feature = "cuda") {
        eprintln!("skipped: this build has CUDA");
        return;
    }
    let p = Project::with_sample();
    let file = "pipelines/gpu.toml";
    p.write(file, &format!("{BASE}{MODEL_STAGES}").replace("device = \"cpu\"", "device = \"cuda\""));
    p.write("pipelines/cpu.toml", &format!("{BASE}{MODEL_STAGES}"));
    let cases: [(&str, Vec<&str>); 5] = [
        (file, vec!["run", file]),
        (file, vec!["run", file, "--dry-run"]),
        (file, vec!["run", file, "--json", "--until", "train"]),
        ("--set train.device=cuda:1", vec!["run", "pipelines/cpu.toml", "--set", "train.device=cuda:1"]),
        // A sweep point on the GPU fails the whole sweep before its first point runs; the origin is
        // the point's own assignment.
        ("--set train.device=\"cuda\"", vec!["run", "pipelines/cpu.toml", "--set", "train.device=cpu,cuda"]),
    ];
    for (origin, args) in cases {
        let out = p.pipe(&args);
        assert_eq!(out.code, 2, "{out}");
        let first = out.stderr.lines().next().unwrap_or("");
        assert!(first.starts_with(&format!("error: {origin}: `stages.train.device`")), "{out}");
        assert!(out.stderr.contains("stage `train` cannot run in this build"), "{out}");
        assert!(out.stderr.contains("--features cuda"), "the message says how to fix it:\n{out}");
        assert!(!p.path("artifacts").exists(), "{out}");
    }
    for cmd in ["config", "dag", "status"] {
        p.ok(&[cmd, file]);
    }
}
