//! The predictions file: a CSV with columns `query,relevance,score` and an optional `label`, so that
//! predictions from any model, ours or not, are scored by the same code.

use std::io::Read;
use std::path::Path;

use super::Prediction;

const REQUIRED: [&str; 3] = ["query", "relevance", "score"];

/// Why a predictions file could not be read. Every variant names the file, and the line when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "{path}:1: expected a header with columns query, relevance, score (and optionally label); \
         `{column}` is missing (found: {found})"
    )]
    MissingColumn { path: String, column: &'static str, found: String },
    #[error("{path}:1: column `{column}` appears more than once in the header")]
    DuplicateColumn { path: String, column: String },
    #[error("{path}:{line}: column `{column}`: expected {expected}, found `{value}`")]
    BadValue { path: String, line: u64, column: &'static str, expected: &'static str, value: String },
    #[error("{path}:{line}: {message}")]
    Malformed { path: String, line: u64, message: String },
    #[error("{path}: no predictions after the header; expected at least one row")]
    Empty { path: String },
}

/// Read a predictions file from disk.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, ReadError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| ReadError::Io { path: name.clone(), source })?;
    parse_predictions(std::io::BufReader::new(file), &name)
}

fn csv_error(path: &str, err: csv::Error) -> ReadError {
    let line = err.position().map_or(0, |p| p.line());
    match err.into_kind() {
        csv::ErrorKind::Io(source) => ReadError::Io { path: path.to_string(), source },
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => ReadError::Malformed {
            path: path.to_string(),
            line,
            message: format!("expected {expected_len} fields like the header, found {len}"),
        },
        csv::ErrorKind::Utf8 { .. } => {
            ReadError::Malformed { path: path.to_string(), line, message: "expected UTF-8 text".to_string() }
        }
        other => ReadError::Malformed { path: path.to_string(), line, message: format!("{other:?}") },
    }
}

fn parse_label(text: &str) -> Option<Option<bool>> {
    match text.to_ascii_lowercase().as_str() {
        "" => Some(None),
        "1" | "1.0" | "true" => Some(Some(true)),
        "0" | "0.0" | "false" => Some(Some(false)),
        _ => None,
    }
}

/// Parse predictions from any reader; `path` only labels errors.
///
/// Columns are found by header name, in any order; other columns are ignored, so the evaluate
/// stage's `predictions.csv` (with product ids, titles, ranks) reads directly. Fields are trimmed.
/// An empty `label` falls back to the relevance rule of [`super::Options::positive_relevance`].
pub fn parse_predictions(reader: impl Read, path: &str) -> Result<Vec<Prediction>, ReadError> {
    let mut csv = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(reader);
    let header = csv.headers().map_err(|e| csv_error(path, e))?.clone();
    let names: Vec<&str> = header.iter().collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) && (REQUIRED.contains(name) || *name == "label") {
            return Err(ReadError::DuplicateColumn { path: path.to_string(), column: name.to_string() });
        }
    }
    let find = |column: &'static str| names.iter().position(|&n| n == column);
    let mut cols = [0usize; 3];
    for (slot, column) in cols.iter_mut().zip(REQUIRED) {
        *slot = find(column).ok_or_else(|| ReadError::MissingColumn {
            path: path.to_string(),
            column,
            found: names.join(","),
        })?;
    }
    let [q_col, rel_col, score_col] = cols;
    let label_col = find("label");

    let mut rows = Vec::new();
    for record in csv.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(0, |p| p.line());
        let bad = |column: &'static str, expected: &'static str, value: &str| ReadError::BadValue {
            path: path.to_string(),
            line,
            column,
            expected,
            value: value.to_string(),
        };
        let number = |column: &'static str, idx: usize| -> Result<f64, ReadError> {
            let text = &record[idx];
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(bad(column, "a finite number", text)),
            }
        };
        let query = &record[q_col];
        if query.is_empty() {
            return Err(bad("query", "a non-empty query", query));
        }
        let relevance = number("relevance", rel_col)?;
        let score = number("score", score_col)?;
        let label = match label_col {
            Some(i) => {
                parse_label(&record[i]).ok_or_else(|| bad("label", "0 or 1 (or true/false, or empty)", &record[i]))?
            }
            None => None,
        };
        rows.push(Prediction { query: query.to_string(), relevance, score, label });
    }
    if rows.is_empty() {
        return Err(ReadError::Empty { path: path.to_string() });
    }
    Ok(rows)
}
