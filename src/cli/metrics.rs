//! `pipe metrics`: scores any predictions CSV with the same ranking and classification metrics the
//! evaluate stage reports, so outside models' outputs compare with a pipeline's.

use std::path::PathBuf;

use super::common::print_json;
use super::Exit;
use crate::metrics;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub file: PathBuf,
    /// Cutoffs for NDCG@K and P@K.
    #[arg(long, value_delimiter = ',', default_value = "1,3,5,10")]
    pub k: Vec<usize>,
    /// Decision threshold on the score for accuracy/precision/recall/F1.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
    /// NDCG gain: `linear` (relevance − 1) or `exp` (2^(relevance − 1) − 1).
    #[arg(long, default_value = "linear")]
    pub gain: String,
    /// Validation predictions: calibrate RMSE and tune the threshold there, report on FILE.
    #[arg(long)]
    pub val: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<(), Exit> {
    let Args { file, k, threshold, gain, val, json } = args;
    let gain = match gain.as_str() {
        "linear" => metrics::Gain::Linear,
        "exp" => metrics::Gain::Exp,
        other => return Err(Exit::usage(anyhow::anyhow!("--gain {other}: expected `linear` or `exp`"))),
    };
    let opts = metrics::Options { ks: k, threshold, gain, ..Default::default() };
    let rows = metrics::read_predictions(&file).map_err(Exit::usage)?;
    match val {
        None => {
            let m = metrics::compute(&rows, &opts).map_err(Exit::usage)?;
            if json {
                print_json(&m);
            } else {
                print!("{}", metrics::render_table(&[(&file.display().to_string(), &m)]));
                println!(
                    "note: rmse is calibrated on these same rows (in-sample); pass --val VAL.csv for a held-out figure"
                );
            }
        }
        Some(v) => {
            let val_rows = metrics::read_predictions(&v).map_err(Exit::usage)?;
            let s = metrics::evaluate_split(&val_rows, &rows, &opts).map_err(Exit::usage)?;
            if json {
                print_json(&s.test);
            } else {
                print!("{}", metrics::render_table(&[("val", &s.val), ("test", &s.test)]));
                if let Some(t) = &s.tuned {
                    println!("threshold tuned on val: {:.4} (val F1 {:.4})", t.threshold, t.val_f1);
                }
            }
        }
    }
    Ok(())
}
