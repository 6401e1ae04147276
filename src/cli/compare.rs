//! `pipe compare`: puts finished runs side by side as a table (or Markdown, CSV, JSON), optionally with a
//! chart of each metric against each swept parameter. Reads run records and, for intervals, the runs'
//! evaluate predictions; runs nothing.

use std::path::PathBuf;

use super::Exit;
use crate::engine::compare;
use crate::engine::remote::Remote;
use crate::metrics::bootstrap::BootstrapOptions;
use crate::report::uncertainty;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(required_unless_present = "remote")]
    pub paths: Vec<PathBuf>,
    /// Also compare every run record under `<URL>/runs/` of a remote store (uploaded by `pipe run`
    /// and `pipe push` with a remote). Intervals need the evaluate artifacts: `pipe pull` them.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// Sort rows by this metric (best first).
    #[arg(long)]
    pub sort: Option<String>,
    /// Metric columns, comma-separated (suffixes of `<stage>.<metric>` names).
    #[arg(long, value_delimiter = ',')]
    pub metrics: Option<Vec<String>>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Also draw each metric against each swept numeric parameter into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Show every other run's difference from this one (a run name, or its run directory), with a
    /// paired 95 % interval where both scored the same test pairs.
    #[arg(long, value_name = "RUN")]
    pub baseline: Option<String>,
    /// Bootstrap resamples behind the intervals (0: no intervals, the fastest).
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Seed of the bootstrap draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Format {
    Table,
    Markdown,
    Csv,
    Json,
}

pub fn run(args: Args) -> Result<(), Exit> {
    let Args { mut paths, remote, sort, metrics, format, plot, baseline, resamples, seed } = args;
    // Remote records are read from a local copy, labelled with the remote's URL.
    let copy = tempfile::tempdir().map_err(Exit::failed)?;
    let remote_url = match &remote {
        Some(url) => {
            let r = Remote::open(url).map_err(|e| Exit::usage(anyhow::anyhow!(e)))?;
            if r.pull_runs(copy.path()).map_err(Exit::failed)? == 0 {
                return Err(Exit::usage(anyhow::anyhow!("{}/runs: no run records there", r.url())));
            }
            paths.push(copy.path().join("runs"));
            Some(r.url().to_string())
        }
        None => None,
    };
    let mut runs = compare::find_runs(&paths).map_err(Exit::usage)?;
    if let Some(url) = &remote_url {
        let local = copy.path().display().to_string();
        for r in &mut runs {
            r.root = r.root.replace(&local, url);
            r.run_dir = r.run_dir.replace(&local, url);
        }
    }
    let mut c = compare::build(runs, metrics.as_deref(), sort.as_deref(), paths.len()).map_err(Exit::usage)?;
    if resamples > 0 || baseline.is_some() {
        let boot = BootstrapOptions { resamples, seed, level: 0.95 };
        uncertainty::attach(&mut c, baseline.as_deref(), &boot).map_err(|e| match e {
            uncertainty::UncertaintyError::Read(_) => Exit::failed(e),
            _ => Exit::usage(e),
        })?;
    }
    let f = match format {
        Format::Table => compare::Format::Table,
        Format::Markdown => compare::Format::Markdown,
        Format::Csv => compare::Format::Csv,
        Format::Json => compare::Format::Json,
    };
    print!("{}", c.render(f));
    if let Some(path) = plot {
        let charts = crate::report::sweep::sweep_charts(&c);
        if charts.is_empty() {
            return Err(Exit::usage(anyhow::anyhow!(
                "--plot {}: nothing to draw: no numeric parameter varies between these runs, or they have no metrics",
                path.display()
            )));
        }
        std::fs::write(&path, crate::report::sweep::stacked_svg(&charts))
            .map_err(|e| Exit::failed(anyhow::anyhow!("{}: {e}", path.display())))?;
        eprintln!("pipe: {} chart(s) written to {}", charts.len(), path.display());
    }
    Ok(())
}
