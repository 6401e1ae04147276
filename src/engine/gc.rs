//! `pipe gc`: remove artifacts that no kept run record references.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::key::dir_name;
use super::store::{dir_size, read_manifest, Store};

#[derive(Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub runs_removed: Vec<String>,
    pub artifacts_removed: Vec<String>,
    pub bytes_freed: u64,
    pub artifacts_kept: usize,
    pub dry_run: bool,
}

/// Every run record under `runs/` (sweeps nest deeper), as (pipeline, dir, parsed json).
pub fn run_records(store: &Store) -> Vec<(String, PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    let runs = store.root.join("runs");
    let Ok(rd) = std::fs::read_dir(&runs) else { return out };
    for p in rd.flatten() {
        let pipeline = p.file_name().to_string_lossy().to_string();
        let mut stack = vec![p.path()];
        while let Some(d) = stack.pop() {
            let rec = d.join("run.json");
            if let Some(v) = std::fs::read(&rec).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                out.push((pipeline.clone(), d.clone(), v));
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
    }
    out.sort_by(|a, b| {
        let ka = a.2.get("started").and_then(|v| v.as_str()).unwrap_or("");
        let kb = b.2.get("started").and_then(|v| v.as_str()).unwrap_or("");
        (a.0.as_str(), ka).cmp(&(b.0.as_str(), kb))
    });
    out
}

pub fn gc(store: &Store, keep_runs: Option<usize>, dry_run: bool) -> GcReport {
    let mut report = GcReport { dry_run, ..Default::default() };
    let records = run_records(store);
    let mut kept = Vec::new();
    let mut pipelines: Vec<&str> = records.iter().map(|r| r.0.as_str()).collect();
    pipelines.dedup();
    for p in pipelines {
        let mine: Vec<&(String, PathBuf, serde_json::Value)> = records.iter().filter(|r| r.0 == p).collect();
        let n = keep_runs.unwrap_or(usize::MAX).min(mine.len());
        let (old, new) = mine.split_at(mine.len() - n);
        for r in old {
            report.runs_removed.push(r.1.display().to_string());
            report.bytes_freed += dir_size(&r.1);
            if !dry_run {
                let _ = std::fs::remove_dir_all(&r.1);
            }
        }
        kept.extend(new.iter().copied());
    }
    let mut referenced: BTreeSet<(String, String)> = BTreeSet::new();
    for (_, _, v) in kept {
        for s in v.get("stages").and_then(|s| s.as_array()).into_iter().flatten() {
            if let (Some(kind), Some(key)) =
                (s.get("kind").and_then(|k| k.as_str()), s.get("key").and_then(|k| k.as_str()))
            {
                referenced.insert((kind.to_string(), dir_name(key).to_string()));
            }
        }
    }
    for (kind, dir) in store.artifacts() {
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let complete = matches!(read_manifest(&dir), Ok(Some(_)));
        if complete && referenced.contains(&(kind.clone(), name.clone())) {
            report.artifacts_kept += 1;
            continue;
        }
        // Never delete what another process is writing or reading under its key lock.
        let Ok(Some(_lock)) = store.try_lock(&kind, &name, "gc") else { continue };
        report.bytes_freed += dir_size(&dir);
        report.artifacts_removed.push(rel(&store.root, &dir));
        if !dry_run {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    report
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}
