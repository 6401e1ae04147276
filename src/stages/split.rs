//! `split`: a query-grouped, stratified train/val/test split with binary labels.
//!
//! Grouping by query keeps a test query unseen in training, which is what a search ranker faces.
//! Stratifying by each query's mean relevance keeps easy and hard queries in every split in the same
//! proportion. The shuffle uses the project's own [`SplitMix64`], so a seed means the same split
//! forever, whatever version of `rand` the build picks up.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::util::rng::SplitMix64;

use super::table::{self, Record, TableWriter};
use crate::engine::{
    Contract, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};

pub const KIND: &str = "split";
/// Bump when the same input and parameters would give a different split.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/split.toml");

/// The split names, in output order.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];
/// The file of each split in [`SPLITS`] (a labeled table, see [`table::read_labeled`]).
pub const FILES: [&str; 3] = [TRAIN_FILE, VAL_FILE, TEST_FILE];
pub const TRAIN_FILE: &str = "train.csv";
pub const VAL_FILE: &str = "val.csv";
pub const TEST_FILE: &str = "test.csv";

/// One table in — `normalize`'s, or `load`'s when the pipeline skips normalizing — three out.
pub const CONTRACT: Contract =
    Contract { needs: &[Need::always(&[super::normalize::KIND, super::load::KIND])], writes: &FILES };

/// The file of a split named in [`SPLITS`].
pub fn file_of(split: &str) -> Option<&'static str> {
    SPLITS.iter().position(|s| *s == split).map(|i| FILES[i])
}

/// Lower edges of the mean-relevance bins: [1,1.67), [1.67,2), [2,2.33), [2.33,3].
pub const BIN_EDGES: [f64; 3] = [1.67, 2.0, 2.33];

pub struct Split;

/// The parameters of `stages/split.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct SplitParams {
    pub train_ratio: f64,
    pub val_ratio: f64,
    pub test_ratio: f64,
    pub seed: i64,
    pub relevance_threshold: f64,
}

impl StageParams for SplitParams {
    fn validate(&self) -> Result<(), ParamError> {
        for (key, v) in
            [("train_ratio", self.train_ratio), ("val_ratio", self.val_ratio), ("test_ratio", self.test_ratio)]
        {
            if !(v > 0.0 && v < 1.0) {
                return Err(ParamError::new(key, format!("{v} is not in (0, 1)")));
            }
        }
        let sum = self.train_ratio + self.val_ratio + self.test_ratio;
        if (sum - 1.0).abs() > 1e-6 {
            return Err(ParamError::new(
                "train_ratio",
                format!(
                    "train_ratio + val_ratio + test_ratio = {} + {} + {} = {sum}; they must sum to 1",
                    self.train_ratio, self.val_ratio, self.test_ratio
                ),
            ));
        }
        if self.seed < 0 {
            return Err(ParamError::new("seed", format!("{} is negative; expected an integer >= 0", self.seed)));
        }
        if !(1.0..=3.0).contains(&self.relevance_threshold) {
            return Err(ParamError::new(
                "relevance_threshold",
                format!("{} is outside [1, 3], the range of relevance grades", self.relevance_threshold),
            ));
        }
        Ok(())
    }
}

/// The stratification bin of a query's mean relevance. The tiny slack keeps a mean that is 1.67 in
/// decimal but 1.6699999999999998 after summing floats in the 1.67 bin.
pub fn bin_of(mean: f64) -> usize {
    BIN_EDGES.iter().take_while(|&&edge| mean + 1e-9 >= edge).count()
}

/// Which split (index into [`SPLITS`]) each record goes to.
///
/// Queries are sorted by text (so the result does not depend on row order), binned by mean
/// relevance, shuffled within each bin, and laid end to end by pair count: a query goes to the split
/// whose share of the bin's pairs contains the midpoint of the query's own pairs. That keeps each
/// split's share of pairs within about half a query of its ratio, per bin.
pub fn assign(records: &[Record], p: &SplitParams) -> Vec<usize> {
    let mut groups: HashMap<&str, (f64, usize)> = HashMap::new();
    for r in records {
        let g = groups.entry(r.query.as_str()).or_default();
        g.0 += r.relevance;
        g.1 += 1;
    }
    let mut queries: Vec<(&str, f64, usize)> = groups.into_iter().map(|(q, (sum, n))| (q, sum / n as f64, n)).collect();
    queries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut bins: [Vec<(&str, usize)>; 4] = Default::default();
    for (q, mean, n) in queries {
        bins[bin_of(mean)].push((q, n));
    }
    let mut rng = SplitMix64::new(p.seed as u64);
    let cut1 = p.train_ratio;
    let cut2 = p.train_ratio + p.val_ratio;
    let mut split_of: HashMap<&str, usize> = HashMap::new();
    for bin in &mut bins {
        rng.shuffle(bin);
        let total: usize = bin.iter().map(|(_, n)| n).sum();
        let mut before = 0usize;
        for &(q, n) in bin.iter() {
            let mid = (before as f64 + n as f64 / 2.0) / total as f64;
            let s = if mid < cut1 {
                0
            } else if mid < cut2 {
                1
            } else {
                2
            };
            split_of.insert(q, s);
            before += n;
        }
    }
    records.iter().map(|r| split_of[r.query.as_str()]).collect()
}

/// Counts for one split's manifest entry.
#[derive(Debug, Default)]
struct Tally<'a> {
    pairs: usize,
    positives: usize,
    queries: HashMap<&'a str, (f64, usize)>,
    histogram: BTreeMap<i64, usize>,
}

impl<'a> Tally<'a> {
    fn add(&mut self, r: &'a Record, label: bool) {
        self.pairs += 1;
        self.positives += usize::from(label);
        let g = self.queries.entry(&r.query).or_default();
        g.0 += r.relevance;
        g.1 += 1;
        // Grades are multiples of 1/12 at most; keying by thousandths sorts them numerically.
        *self.histogram.entry((r.relevance * 1000.0).round() as i64).or_default() += 1;
    }

    fn json(&self, total_pairs: usize) -> serde_json::Value {
        let mut m = JsonMap::new();
        m.insert("pairs".into(), self.pairs.into());
        m.insert("queries".into(), self.queries.len().into());
        m.insert("share_of_pairs".into(), ratio(self.pairs, total_pairs).into());
        m.insert("positives".into(), self.positives.into());
        m.insert("positive_rate".into(), ratio(self.positives, self.pairs).into());
        let mut bins = [0usize; 4];
        for (sum, n) in self.queries.values() {
            bins[bin_of(sum / *n as f64)] += 1;
        }
        m.insert("queries_per_relevance_bin".into(), serde_json::Value::from(bins.to_vec()));
        let hist: JsonMap =
            self.histogram.iter().map(|(k, v)| (format!("{}", *k as f64 / 1000.0), (*v).into())).collect();
        m.insert("relevance_histogram".into(), hist.into());
        m.into()
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl TypedStage for Split {
    type Params = SplitParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn run(ctx: &StageContext, p: &SplitParams) -> Result<StageOutput, StageError> {
        let input = ctx.upstream_of(&[super::normalize::KIND, super::load::KIND])?.dir.join(table::TABLE_FILE);
        let records = table::read_table(&input)?;
        ctx.check_cancel()?;
        let parts = assign(&records, p);
        let mut writers = Vec::new();
        for file in FILES {
            writers.push(TableWriter::create(&ctx.out.join(file), true)?);
        }
        let mut tallies: [Tally; 3] = Default::default();
        for (r, &s) in records.iter().zip(&parts) {
            let label = r.relevance >= p.relevance_threshold;
            writers[s].write(r, Some(label))?;
            tallies[s].add(r, label);
        }
        for w in writers {
            w.finish()?;
        }
        let queries: usize = tallies.iter().map(|t| t.queries.len()).sum();
        for (name, t) in SPLITS.iter().zip(&tallies) {
            if t.pairs == 0 {
                return Err(StageError::failed(format!(
                    "the `{name}` split is empty: {} pairs in {queries} queries are too few to split with \
                     ratios {}/{}/{}",
                    records.len(),
                    p.train_ratio,
                    p.val_ratio,
                    p.test_ratio
                )));
            }
        }
        let mut stats = JsonMap::new();
        stats.insert("pairs".into(), records.len().into());
        stats.insert("queries".into(), queries.into());
        for (name, t) in SPLITS.iter().zip(&tallies) {
            stats.insert((*name).into(), t.json(records.len()));
        }
        Ok(StageOutput { stats, ..Default::default() })
    }
}
