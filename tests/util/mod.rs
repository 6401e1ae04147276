//! A temp project with the committed sample, and a runner for the `pipe` binary that dumps the
//! command, its output and the tree when an expectation fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub mod s3;

pub const SAMPLE_PIPELINE: &str = r#"[pipeline]
name = "p"

[stages.load]
kind = "load"
path = "data/train.csv"
descriptions = "data/product_descriptions.csv"

[stages.normalize]
kind = "normalize"
needs = ["load"]

[stages.split]
kind = "split"
needs = ["normalize"]
"#;

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub cmd: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "$ {}\nexit {}\n--- stdout\n{}\n--- stderr\n{}", self.cmd, self.code, self.stdout, self.stderr)
    }
}

impl Output {
    /// Status lines with keys replaced, so snapshots survive key-schema-neutral changes of the data.
    pub fn masked_keys(&self) -> String {
        self.stdout
            .lines()
            .map(|l| {
                l.split(' ')
                    .map(|w| if w.len() == 20 && w.chars().all(|c| c.is_ascii_hexdigit()) { "<key>" } else { w })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        Project { dir }
    }

    /// A project with the committed Home Depot sample and the three data stages.
    pub fn with_sample() -> Self {
        let p = Project::new();
        for f in ["train.csv", "product_descriptions.csv"] {
            std::fs::copy(repo().join("data").join(f), p.path(&format!("data/{f}"))).unwrap();
        }
        p.write("pipelines/p.toml", SAMPLE_PIPELINE);
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn count_dir(&self, rel: &str) -> usize {
        std::fs::read_dir(self.path(rel)).map(|d| d.count()).unwrap_or(0)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipe"));
        c.args(args).current_dir(self.dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("PIPE_") || k.starts_with("HF_") {
                c.env_remove(k);
            }
        }
        c.env("HF_HUB_OFFLINE", "1").env("HF_HOME", self.path(".hf"));
        c
    }

    pub fn pipe_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.pipe_env_unset(args, env, &[])
    }

    /// Like [`Project::pipe_env`], with the variables in `unset` removed (even the defaults of
    /// [`Project::command`]).
    pub fn pipe_env_unset(&self, args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> Output {
        let mut c = self.command(args);
        for k in unset {
            c.env_remove(k);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            cmd: format!("pipe {}", args.join(" ")),
        }
    }

    pub fn pipe(&self, args: &[&str]) -> Output {
        self.pipe_env(args, &[])
    }

    pub fn ok_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = self.pipe_env(args, env);
        assert_eq!(out.code, 0, "{out}\n--- tree\n{}", self.tree());
        out
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        self.ok_env(args, &[])
    }

    pub fn run_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{out}"))
    }

    pub fn tree(&self) -> String {
        let mut out = String::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                out.push_str(&format!("{}\n", p.strip_prefix(self.dir.path()).unwrap_or(&p).display()));
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
        out
    }
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
