//! `[executor]`: where and with what the stages of a run compute: `local` (this process, on this
//! machine's GPUs) or `slurm` (one batch job per stage, keys of its own in [`super::slurm`]); the table is parsed here, apart from the stage parameters, so
//! that another kind adds its keys to [`KINDS`] and a variant to [`ExecutorKind`] without touching
//! the rest of the configuration.
//!
//! GPUs are named by the ordinals this process sees: with `CUDA_VISIBLE_DEVICES=2,3` the process
//! sees two GPUs, 0 and 1, whatever their physical numbers. The engine never opens a GPU; it only
//! counts them (through the environment, or a probe the caller passes in) and hands ordinals out
//! (see [`super::slots`]).

use super::config::{did_you_mean, ConfigError};

/// The executor kinds, by name, and the keys each accepts (besides `kind`). A kind's keys are
/// checked strictly, like stage parameters: a misspelt `gpus_per_stage` must not silently become 1.
pub const KINDS: &[(&str, ExecutorKind, &[&str])] = &[
    // The Slurm keys stay valid under `local`, and the slot keys under `slurm`: one file can be
    // switched between the two by `pipe run --executor` and keep meaning the same.
    ("local", ExecutorKind::Local, ALL_KEYS),
    ("slurm", ExecutorKind::Slurm, ALL_KEYS),
];

const ALL_KEYS: &[&str] =
    &["gpus", "gpus_per_stage", "stages_per_gpu", "partition", "account", "time", "qos", "extra_args"];

/// Pretends this many GPUs are visible (ordinals 0..N), whatever the build and the machine: how
/// the slot logic is exercised end to end on machines without GPUs. Stages still open what they
/// open; only the engine's bookkeeping is fooled.
pub const FAKE_GPUS_ENV: &str = "PIPE_FAKE_GPUS";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Stages run in this process; sweep points on its threads (`--jobs`).
    #[default]
    Local,
    /// Each stale stage is an `sbatch` job (see [`super::slurm`]).
    Slurm,
}

impl std::str::FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KINDS.iter().find(|(n, _, _)| *n == s).map(|(_, k, _)| *k).ok_or_else(|| {
            let known = KINDS.iter().map(|(n, _, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            format!("unknown executor kind `{s}`; known: {known}")
        })
    }
}

impl ExecutorKind {
    /// The `kind = "..."` spelling.
    pub fn name(self) -> &'static str {
        KINDS.iter().find(|(_, k, _)| *k == self).map(|(n, _, _)| *n).expect("every kind is in KINDS")
    }
}

/// The `[executor]` table, resolved. Absent keys take their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorConfig {
    pub kind: ExecutorKind,
    /// `gpus = [0, 1]`: the ordinals stages may be given; `None` means every GPU the process sees.
    pub gpus: Option<Vec<usize>>,
    /// GPUs each stage that computes on a GPU is given (it computes on the first; the others are
    /// reserved for it, so nothing else lands on them).
    pub gpus_per_stage: usize,
    /// Stages that may hold one GPU at once. 1 (the default) means no two compute stages ever share
    /// a GPU; 2 lets two small jobs share each one. This is the only way to share a GPU.
    pub stages_per_gpu: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig { kind: ExecutorKind::Local, gpus: None, gpus_per_stage: 1, stages_per_gpu: 1 }
    }
}

fn err(origin: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(origin, format!("executor.{key}"), message)
}

fn positive(origin: &str, key: &str, v: &toml::Value) -> Result<usize, ConfigError> {
    match v {
        toml::Value::Integer(n) if *n >= 1 => Ok(*n as usize),
        other => Err(err(origin, key, format!("expected an integer >= 1, found {other}"))),
    }
}

impl ExecutorConfig {
    /// Parse the `[executor]` table of the file `origin` (absent: every default).
    pub fn parse(origin: &str, table: Option<&toml::Value>) -> Result<Self, ConfigError> {
        let mut cfg = ExecutorConfig::default();
        let Some(v) = table else { return Ok(cfg) };
        let t = v.as_table().ok_or_else(|| {
            ConfigError::new(origin, "executor", "expected a table: `[executor]` with `gpus = [0, 1]`, …")
        })?;
        let kind = match t.get("kind") {
            None => "local",
            Some(toml::Value::String(k)) => k.as_str(),
            Some(other) => return Err(err(origin, "kind", format!("expected a string, found {other}"))),
        };
        let names = || KINDS.iter().map(|(n, _, _)| *n);
        let Some((_, parsed, keys)) = KINDS.iter().find(|(n, _, _)| *n == kind) else {
            let known = names().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            return Err(err(origin, "kind", format!("unknown executor kind `{kind}`; known: {known}"))
                .hint(did_you_mean(kind, names()).or(Some("write `kind = \"local\"` or leave `kind` out".into()))));
        };
        for k in t.keys().filter(|k| *k != "kind") {
            if !keys.contains(&k.as_str()) {
                let hint = did_you_mean(k, keys.iter().copied())
                    .or_else(|| Some(format!("keys of the `{kind}` executor: kind, {}", keys.join(", "))));
                return Err(err(origin, k, format!("unknown key for the `{kind}` executor")).hint(hint));
            }
        }
        cfg.kind = *parsed;
        if let Some(v) = t.get("gpus") {
            let list = v.as_array().ok_or_else(|| {
                err(origin, "gpus", format!("expected a list of GPU ordinals such as `[0, 1]`, found {v}"))
            })?;
            let mut gpus = Vec::with_capacity(list.len());
            for (i, g) in list.iter().enumerate() {
                match g {
                    toml::Value::Integer(n) if *n >= 0 => gpus.push(*n as usize),
                    other => {
                        return Err(err(
                            origin,
                            &format!("gpus[{i}]"),
                            format!("expected a GPU ordinal (0, 1, …), found {other}"),
                        ))
                    }
                }
            }
            check_distinct(&gpus).map_err(|m| err(origin, "gpus", m))?;
            cfg.gpus = Some(gpus);
        }
        if let Some(v) = t.get("gpus_per_stage") {
            cfg.gpus_per_stage = positive(origin, "gpus_per_stage", v)?;
        }
        if let Some(v) = t.get("stages_per_gpu") {
            cfg.stages_per_gpu = positive(origin, "stages_per_gpu", v)?;
        }
        if let Some(g) = &cfg.gpus {
            // Knowable from the file alone, so said at load rather than when a stage asks.
            if !g.is_empty() && cfg.gpus_per_stage > g.len() {
                return Err(err(
                    origin,
                    "gpus_per_stage",
                    format!("{} GPUs per stage, but `gpus` lists only {}", cfg.gpus_per_stage, g.len()),
                ));
            }
        }
        Ok(cfg)
    }
}

impl ExecutorConfig {
    /// The table as `pipe config` prints it, every default filled in; [`ExecutorConfig::parse`]
    /// reads it back to the same value. Apart from [`super::config::Pipeline::to_toml`], which
    /// names what a run computes (sweep ids hash it): where it computes is not part of that.
    pub fn to_toml(&self, slurm: &super::slurm::SlurmConfig) -> String {
        let mut t = toml::Table::new();
        t.insert("kind".into(), self.kind.name().into());
        if let Some(g) = &self.gpus {
            t.insert("gpus".into(), toml::Value::Array(g.iter().map(|&n| toml::Value::Integer(n as i64)).collect()));
        }
        t.insert("gpus_per_stage".into(), toml::Value::Integer(self.gpus_per_stage as i64));
        t.insert("stages_per_gpu".into(), toml::Value::Integer(self.stages_per_gpu as i64));
        slurm.insert_keys(&mut t);
        let mut top = toml::Table::new();
        top.insert("executor".into(), toml::Value::Table(t));
        toml::to_string_pretty(&top).expect("toml tables serialize")
    }
}

/// A GPU listed twice would be handed to two stages as two slots: sharing is `stages_per_gpu`.
fn check_distinct(gpus: &[usize]) -> Result<(), String> {
    for (i, g) in gpus.iter().enumerate() {
        if gpus[..i].contains(g) {
            return Err(format!(
                "GPU {g} is listed twice; to let stages share a GPU set `stages_per_gpu` under `[executor]`"
            ));
        }
    }
    Ok(())
}

/// `--gpus 0,1,3`: ordinals, comma-separated. The message says what was wrong with which entry.
pub fn parse_gpu_list(raw: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in raw.split(',') {
        let p = part.trim();
        match p.parse::<usize>() {
            Ok(n) => out.push(n),
            Err(_) => {
                return Err(format!(
                    "`{p}` is not a GPU ordinal; expected comma-separated ordinals such as `--gpus 0,1,2,3`"
                ))
            }
        }
    }
    check_distinct(&out)?;
    Ok(out)
}

/// The GPUs this process can see, and how that was decided (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    pub count: usize,
    pub source: String,
}

impl Visible {
    /// `PIPE_FAKE_GPUS`, else `CUDA_VISIBLE_DEVICES` (its entries by position, as CUDA numbers
    /// them for the process), else `probe()`: the CUDA driver's device count in a `cuda` build, 0
    /// otherwise. `env` is the environment lookup, a parameter so tests need not mutate the process's.
    pub fn detect(env: &dyn Fn(&str) -> Option<String>, probe: &dyn Fn() -> Option<usize>) -> Result<Self, String> {
        if let Some(v) = env(FAKE_GPUS_ENV) {
            let n = v
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("{FAKE_GPUS_ENV}={v}: expected a number of GPUs to pretend to have"))?;
            return Ok(Visible { count: n, source: format!("{FAKE_GPUS_ENV}={v}") });
        }
        if let Some(v) = env("CUDA_VISIBLE_DEVICES") {
            let count = v.split(',').filter(|e| !e.trim().is_empty()).count();
            return Ok(Visible { count, source: format!("CUDA_VISIBLE_DEVICES={v}") });
        }
        Ok(match probe() {
            Some(n) => Visible { count: n, source: format!("the CUDA driver reports {n}") },
            None => Visible { count: 0, source: "this pipe is built without CUDA".into() },
        })
    }

    /// The process's environment with `probe`.
    pub fn from_env(probe: &dyn Fn() -> Option<usize>) -> Result<Self, String> {
        Self::detect(&|k| std::env::var(k).ok(), probe)
    }

    fn describe(&self) -> String {
        match self.count {
            0 => format!("this process sees no GPU ({})", self.source),
            n => format!("this process sees GPUs 0..{} ({})", n - 1, self.source),
        }
    }
}

/// Where the GPU list came from, for errors: the flag, or the file's key.
#[derive(Debug, Clone)]
pub enum GpuOrigin {
    Flag,
    File(String),
    Visible,
}

/// The ordinals a run may hand out: `--gpus` beats `[executor] gpus`, which beats every visible GPU.
/// Every listed ordinal must be visible: a GPU that does not exist would only fail once a stage opens it.
pub fn resolve_gpus(
    cfg: &ExecutorConfig,
    file: &str,
    flag: Option<&[usize]>,
    visible: &Visible,
) -> Result<(Vec<usize>, GpuOrigin), ConfigError> {
    let (list, origin) = match (flag, &cfg.gpus) {
        (Some(f), _) => (f.to_vec(), GpuOrigin::Flag),
        (None, Some(g)) => (g.clone(), GpuOrigin::File(file.to_string())),
        (None, None) => return Ok(((0..visible.count).collect(), GpuOrigin::Visible)),
    };
    if let Some(bad) = list.iter().find(|g| **g >= visible.count) {
        let (o, key) = match &origin {
            GpuOrigin::Flag => (format!("--gpus {}", join(&list)), String::new()),
            _ => (file.to_string(), "executor.gpus".to_string()),
        };
        return Err(ConfigError::new(o, key, format!("GPU {bad} is not visible: {}", visible.describe())).hint(Some(
            format!(
                "name GPUs by the ordinals the process sees{}",
                if visible.count > 0 { format!(" (0 to {})", visible.count - 1) } else { String::new() }
            ),
        )));
    }
    Ok((list, origin))
}

pub fn join(gpus: &[usize]) -> String {
    gpus.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ExecutorConfig, ConfigError> {
        let t: toml::Table = text.parse().unwrap();
        ExecutorConfig::parse("p.toml", t.get("executor"))
    }

    #[test]
    fn defaults_and_keys() {
        assert_eq!(parse("").unwrap(), ExecutorConfig::default());
        let c = parse("[executor]\nkind = \"local\"\ngpus = [2, 0]\ngpus_per_stage = 2\nstages_per_gpu = 3\n").unwrap();
        assert_eq!((c.gpus.clone(), c.gpus_per_stage, c.stages_per_gpu), (Some(vec![2, 0]), 2, 3));
        // What `pipe config` prints reads back the same.
        for cfg in [c, ExecutorConfig::default()] {
            assert_eq!(parse(&cfg.to_toml(&Default::default())).unwrap(), cfg, "{}", cfg.to_toml(&Default::default()));
        }
    }

    #[test]
    fn mistakes_name_the_file_and_key() {
        let e = parse("[executor]\nkind = \"slurmm\"\n").unwrap_err().to_string();
        assert!(e.starts_with("p.toml: `executor.kind`: unknown executor kind `slurmm`"), "{e}");
        let e = parse("[executor]\ngpu_per_stage = 2\n").unwrap_err().to_string();
        assert!(
            e.contains("`executor.gpu_per_stage`: unknown key") && e.contains("did you mean `gpus_per_stage`?"),
            "{e}"
        );
        let e = parse("[executor]\ngpus = [0, \"a\"]\n").unwrap_err().to_string();
        assert!(e.contains("`executor.gpus[1]`: expected a GPU ordinal"), "{e}");
        let e = parse("[executor]\ngpus = [1, 1]\n").unwrap_err().to_string();
        assert!(e.contains("GPU 1 is listed twice") && e.contains("stages_per_gpu"), "{e}");
        let e = parse("[executor]\ngpus = [0]\ngpus_per_stage = 2\n").unwrap_err().to_string();
        assert!(e.contains("`executor.gpus_per_stage`: 2 GPUs per stage, but `gpus` lists only 1"), "{e}");
        let e = parse("[executor]\ngpus_per_stage = 0\n").unwrap_err().to_string();
        assert!(e.contains("expected an integer >= 1, found 0"), "{e}");
    }

    #[test]
    fn gpu_flag_parses_ordinals() {
        assert_eq!(parse_gpu_list("0,1, 3").unwrap(), vec![0, 1, 3]);
        assert!(parse_gpu_list("a,b").unwrap_err().contains("`a` is not a GPU ordinal"));
        assert!(parse_gpu_list("0,,1").is_err());
        assert!(parse_gpu_list("-1").is_err());
        assert!(parse_gpu_list("2,2").unwrap_err().contains("listed twice"));
    }

    #[test]
    fn visible_gpus_follow_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let probe4 = || Some(4);
        let v = Visible::detect(&env(&[("CUDA_VISIBLE_DEVICES", "5,7")]), &probe4).unwrap();
        assert_eq!(v.count, 2, "entries by position, not the probe");
        assert_eq!(Visible::detect(&env(&[("CUDA_VISIBLE_DEVICES", "")]), &probe4).unwrap().count, 0);
        let fake = env(&[(FAKE_GPUS_ENV, "3"), ("CUDA_VISIBLE_DEVICES", "0")]);
        assert_eq!(Visible::detect(&fake, &probe4).unwrap().count, 3);
        assert_eq!(Visible::detect(&env(&[]), &probe4).unwrap().count, 4);
        assert_eq!(Visible::detect(&env(&[]), &|| None).unwrap().count, 0);
        assert!(Visible::detect(&env(&[(FAKE_GPUS_ENV, "x")]), &probe4).is_err());
    }

    #[test]
    fn resolved_gpus_must_be_visible() {
        let two = Visible { count: 2, source: "CUDA_VISIBLE_DEVICES=4,5".into() };
        let cfg = ExecutorConfig { gpus: Some(vec![1]), ..Default::default() };
        assert_eq!(resolve_gpus(&ExecutorConfig::default(), "p.toml", None, &two).unwrap().0, vec![0, 1]);
        assert_eq!(resolve_gpus(&cfg, "p.toml", None, &two).unwrap().0, vec![1]);
        assert_eq!(resolve_gpus(&cfg, "p.toml", Some(&[0]), &two).unwrap().0, vec![0], "the flag wins");
        let e = resolve_gpus(&cfg, "p.toml", Some(&[0, 2]), &two).unwrap_err().to_string();
        assert!(
            e.starts_with("--gpus 0,2: GPU 2 is not visible: this process sees GPUs 0..1 (CUDA_VISIBLE_DEVICES=4,5)"),
            "{e}"
        );
        let cfg = ExecutorConfig { gpus: Some(vec![3]), ..Default::default() };
        let e = resolve_gpus(&cfg, "p.toml", None, &two).unwrap_err().to_string();
        assert!(e.starts_with("p.toml: `executor.gpus`: GPU 3 is not visible"), "{e}");
    }
}
