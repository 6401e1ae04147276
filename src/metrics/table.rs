//! Aligned plain-text table of one or more metric sets side by side (val/test, model/baselines).

use super::Metrics;

/// How one summary row reads its cell from a metric set.
type Cell = fn(&Metrics) -> String;

fn number(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.4}"))
}

/// One row per metric, one column per named metric set; the metric names come from the first set.
///
/// Below the metrics: the counts of queries and pairs, how many queries each per-query mean is over
/// (degenerate queries are excluded), and the classification threshold, so a reader can tell a
/// drop in NDCG from a change in what it was averaged over.
pub fn render_table(columns: &[(&str, &Metrics)]) -> String {
    let Some((_, first)) = columns.first() else {
        return String::new();
    };
    let mut rows: Vec<(String, Vec<String>)> = first
        .entries()
        .into_iter()
        .map(|(key, _)| {
            let cells = columns.iter().map(|(_, m)| number(m.get(&key))).collect();
            (key, cells)
        })
        .collect();
    let counts: [(&str, Cell); 6] = [
        ("queries", |m| m.queries.to_string()),
        ("pairs", |m| m.pairs.to_string()),
        ("queries in ndcg", |m| m.coverage.ndcg.to_string()),
        ("queries in map/mrr/p@k", |m| m.coverage.binary.to_string()),
        ("queries in spearman", |m| m.coverage.spearman.to_string()),
        ("threshold", |m| format!("{}", m.threshold)),
    ];
    for (name, cell) in counts {
        rows.push((name.to_string(), columns.iter().map(|(_, m)| cell(m)).collect()));
    }

    let key_width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max("metric".len());
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| rows.iter().map(|(_, cells)| cells[i].len()).chain([name.len()]).max().unwrap_or(0))
        .collect();

    let mut out = format!("{:<key_width$}", "metric");
    for ((name, _), w) in columns.iter().zip(&widths) {
        out.push_str(&format!("  {name:>w$}"));
    }
    out.push('\n');
    for (key, cells) in &rows {
        out.push_str(&format!("{key:<key_width$}"));
        for (cell, w) in cells.iter().zip(&widths) {
            out.push_str(&format!("  {cell:>w$}"));
        }
        out.push('\n');
    }
    out.push_str(
        "Per-query means leave out queries whose candidates all share the metric's target \
         (one candidate, all labels equal, zero ideal DCG); n/a: no query or pair to measure.\n",
    );
    out
}
