//! The layouts of anyone's own ranking data: `pairs` (one query–document pair per row, any column
//! names, binary or graded labels) and `grouped` (FlagEmbedding's `{"query", "pos", "neg"}` records).
//!
//! Both become the same [`Record`] table as the Home Depot data, with the labels mapped onto its
//! [1, 3] relevance scale (binary 0 → 1 and 1 → 3; graded linearly from `relevance_range`), so split,
//! train, evaluate, analyze and the metrics need no branch of their own: the split's default threshold
//! (2.33) gives back the binary labels, the NDCG gains `relevance − 1` are 0 and 2 (NDCG does not change
//! when every gain is scaled, so this is NDCG with gains 0/1), and a query's mean relevance is
//! `1 + 2 × its positive rate`, which is what the split stratifies by.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::Deserialize;
use serde_json::Value;

use super::{data, for_each_json, open_parquet, poll, read_bytes, Cell, CsvFile, Encoding, Format};
use crate::engine::{ParamError, StageError};
use crate::stages::table::Record;

/// How the rows of `path` are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The Home Depot layouts, told apart by the format.
    Auto,
    Pairs,
    Grouped,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::Pairs => "pairs",
            Layout::Grouped => "grouped",
        }
    }

    pub(super) fn parse(s: &str) -> Result<Layout, ParamError> {
        match s {
            "auto" => Ok(Layout::Auto),
            "pairs" => Ok(Layout::Pairs),
            "grouped" => Ok(Layout::Grouped),
            other => Err(ParamError::new(
                "layout",
                format!("unknown layout `{other}`; expected \"auto\", \"pairs\" or \"grouped\""),
            )),
        }
    }

    /// Formats a layout cannot read fail at configuration time, before any stage runs.
    pub(super) fn check_format(self, format: Format) -> Result<(), ParamError> {
        match (self, format) {
            (Layout::Auto, Format::Tsv) => Err(ParamError::new(
                "format",
                "TSV is read only with layout = \"pairs\" (the Home Depot files are CSV, JSON or Parquet); \
                 set layout = \"pairs\" and its [columns]",
            )),
            (Layout::Grouped, Format::Csv | Format::Tsv | Format::Parquet) => Err(ParamError::new(
                "format",
                format!(
                    "layout = \"grouped\" reads JSON Lines records {{\"query\", \"pos\", \"neg\"}}, not {}; \
                     use layout = \"pairs\" for a table of pairs",
                    format.name()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What the label column of the pairs layout holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LabelKind {
    /// 0 or 1.
    Binary,
    /// A grade in `[lo, hi]`.
    Graded { lo: f64, hi: f64 },
}

impl LabelKind {
    pub(super) fn parse(kind: &str, range: &[f64]) -> Result<LabelKind, ParamError> {
        let &[lo, hi] = range else {
            return Err(ParamError::new(
                "relevance_range",
                format!("expected two numbers [lo, hi], found {} values", range.len()),
            ));
        };
        if lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less) {
            return Err(ParamError::new("relevance_range", format!("[{lo}, {hi}]: lo must be below hi")));
        }
        match kind {
            "binary" => Ok(LabelKind::Binary),
            "graded" => Ok(LabelKind::Graded { lo, hi }),
            other => Err(ParamError::new(
                "label_kind",
                format!("unknown label kind `{other}`; expected \"binary\" or \"graded\""),
            )),
        }
    }

    /// The table's relevance (on [1, 3]) of one label, or what is wrong with it.
    fn relevance(self, cell: Cell, column: &str) -> Result<f64, String> {
        let (value, shown) = match cell {
            Cell::Int(i) => (i as f64, i.to_string()),
            Cell::Float(f) => (f, f.to_string()),
            Cell::Str(s) => match s.trim().parse::<f64>() {
                Ok(v) => (v, s),
                Err(_) => {
                    return Err(format!(
                        "column `{column}` (columns.label): `{s}` is not a number; {}",
                        self.expected()
                    ))
                }
            },
            Cell::Missing => return Err(format!("missing column `{column}` (columns.label)")),
            Cell::Null => return Err(format!("column `{column}` (columns.label) is null; {}", self.expected())),
            Cell::Other(what) => {
                return Err(format!("column `{column}` (columns.label) is {what}; {}", self.expected()))
            }
        };
        match self {
            LabelKind::Binary if value == 0.0 => Ok(1.0),
            LabelKind::Binary if value == 1.0 => Ok(3.0),
            LabelKind::Graded { lo, hi } if (lo..=hi).contains(&value) => Ok(1.0 + 2.0 * (value - lo) / (hi - lo)),
            _ => Err(format!("column `{column}` (columns.label): label `{shown}` is invalid; {}", self.expected())),
        }
    }

    fn expected(self) -> String {
        match self {
            LabelKind::Binary => {
                "expected 0 or 1 (label_kind = \"binary\"; for graded labels set label_kind = \"graded\" and \
                 relevance_range)"
                    .into()
            }
            LabelKind::Graded { lo, hi } => format!("expected a number in relevance_range [{lo}, {hi}]"),
        }
    }
}

/// `[columns]` of `stages/load.toml`: which column holds each part of a pair.
#[derive(Debug, Clone, Deserialize)]
pub struct Columns {
    pub query: String,
    pub document: String,
    pub title: String,
    pub description: String,
    pub label: String,
    pub query_id: String,
    pub doc_id: String,
}

/// The parts of a pair, each with the column it is read from (`""` when not read).
struct Mapped<'a> {
    query: &'a str,
    title: &'a str,
    description: &'a str,
    label: &'a str,
    query_id: &'a str,
    doc_id: &'a str,
}

impl Columns {
    pub(super) fn validate(&self) -> Result<(), ParamError> {
        for (key, v) in [("columns.query", &self.query), ("columns.label", &self.label)] {
            if v.trim().is_empty() {
                return Err(ParamError::new(key, "must name the column that holds it"));
            }
        }
        if self.title.is_empty() && self.document.trim().is_empty() {
            return Err(ParamError::new(
                "columns.document",
                "must name the document column (or set columns.title, with an optional columns.description)",
            ));
        }
        if self.title.is_empty() && !self.description.is_empty() {
            return Err(ParamError::new(
                "columns.description",
                "is read only with columns.title (the document is then title + description); set columns.title",
            ));
        }
        Ok(())
    }

    fn mapped(&self) -> Mapped<'_> {
        let title_mode = !self.title.is_empty();
        Mapped {
            query: &self.query,
            title: if title_mode { &self.title } else { &self.document },
            description: if title_mode { &self.description } else { "" },
            label: &self.label,
            query_id: &self.query_id,
            doc_id: &self.doc_id,
        }
    }
}

impl Mapped<'_> {
    /// (parameter, column) of every column that is read.
    fn used(&self, title_key: &'static str) -> Vec<(&'static str, &str)> {
        [
            ("columns.query", self.query),
            (title_key, self.title),
            ("columns.description", self.description),
            ("columns.label", self.label),
            ("columns.query_id", self.query_id),
            ("columns.doc_id", self.doc_id),
        ]
        .into_iter()
        .filter(|(_, c)| !c.is_empty())
        .collect()
    }
}

/// Turns rows into records and checks what spans rows (a query id always names one query).
struct Builder<'a> {
    name: &'a str,
    labels: LabelKind,
    records: Vec<Record>,
    /// query id → (query text, line first seen).
    query_ids: HashMap<String, (String, u64)>,
}

impl<'a> Builder<'a> {
    fn new(name: &'a str, labels: LabelKind) -> Self {
        Builder { name, labels, records: Vec::new(), query_ids: HashMap::new() }
    }

    fn check_query_id(&mut self, line: u64, id: String, query: &str) -> Result<(), StageError> {
        match self.query_ids.get(&id) {
            Some((q, first)) if q != query => Err(data(
                self.name,
                line,
                format!("query id `{id}` names the query `{query}` here but `{q}` on line {first}; each query id must name one query"),
            )),
            Some(_) => Ok(()),
            None => {
                self.query_ids.insert(id, (query.to_string(), line));
                Ok(())
            }
        }
    }

    fn push(&mut self, query: String, title: String, description: String, product_id: Option<String>, relevance: f64) {
        let product_id = product_id.unwrap_or_else(|| doc_hash(&title, &description));
        let id = (self.records.len() + 1).to_string();
        self.records.push(Record { id, product_id, query, title, description, relevance });
    }

    /// One pairs row; `get` looks a column up, `fields` lists the ones the row has (for errors).
    fn pair(
        &mut self,
        line: u64,
        m: &Mapped,
        title_key: &str,
        mut get: impl FnMut(&str) -> Cell,
        fields: &dyn Fn() -> String,
    ) -> Result<(), StageError> {
        let name = self.name;
        let text = |cell: Cell, column: &str, key: &str, required: bool| -> Result<String, StageError> {
            if matches!(cell, Cell::Missing) && required {
                return Err(data(
                    name,
                    line,
                    format!("missing column `{column}` ({key}); the record has {}", fields()),
                ));
            }
            let t = cell.text(column, required).map_err(|m| data(name, line, format!("{m} ({key})")))?;
            if required && t.trim().is_empty() {
                return Err(data(name, line, format!("column `{column}` ({key}) is empty; expected text")));
            }
            Ok(t)
        };
        let query = text(get(m.query), m.query, "columns.query", true)?;
        let title = text(get(m.title), m.title, title_key, true)?;
        let description = if m.description.is_empty() {
            String::new()
        } else {
            text(get(m.description), m.description, "columns.description", false)?
        };
        let relevance = self.labels.relevance(get(m.label), m.label).map_err(|msg| data(name, line, msg))?;
        let ident = |cell: Cell, column: &str, key: &str| match cell {
            Cell::Missing => {
                Err(data(name, line, format!("missing column `{column}` ({key}); the record has {}", fields())))
            }
            c => c.id(column).map_err(|msg| data(name, line, format!("{msg} ({key})"))),
        };
        if !m.query_id.is_empty() {
            let id = ident(get(m.query_id), m.query_id, "columns.query_id")?;
            self.check_query_id(line, id, &query)?;
        }
        let doc_id = if m.doc_id.is_empty() { None } else { Some(ident(get(m.doc_id), m.doc_id, "columns.doc_id")?) };
        self.push(query, title, description, doc_id, relevance);
        Ok(())
    }
}

/// A document without an id is named by its text, so the same text is the same product everywhere.
fn doc_hash(title: &str, description: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(title.as_bytes());
    h.update(b"\x1f");
    h.update(description.as_bytes());
    format!("doc-{}", &h.finalize().to_hex()[..16])
}

fn missing_columns(name: &str, used: &[(&str, &str)], found: &[String]) -> Result<(), StageError> {
    for (key, column) in used {
        if !found.iter().any(|f| f == column) {
            return Err(data(
                name,
                1,
                format!(
                    "missing column `{column}` ({key}); the file has the columns {}; set {key} to one of them",
                    found.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The pairs layout in any of its formats.
pub(super) fn parse_pairs(
    path: &Path,
    name: &str,
    format: Format,
    encoding: Encoding,
    columns: &Columns,
    labels: LabelKind,
    cancel: &AtomicBool,
) -> Result<Vec<Record>, StageError> {
    let m = columns.mapped();
    let title_key = if columns.title.is_empty() { "columns.document" } else { "columns.title" };
    let used = m.used(title_key);
    let mut b = Builder::new(name, labels);
    match format {
        Format::Csv | Format::Tsv => {
            let bytes = read_bytes(path)?;
            let expected: Vec<&str> = used.iter().map(|(_, c)| *c).collect();
            let mut csv = CsvFile::open_with(&bytes, name, encoding, &expected, format == Format::Tsv)?;
            missing_columns(name, &used, &csv.header)?;
            let index: Vec<usize> =
                used.iter().map(|(_, c)| csv.header.iter().position(|h| h == c).expect("checked above")).collect();
            while csv.next()? {
                poll(cancel, b.records.len())?;
                let line = csv.line();
                let values: Vec<String> = index.iter().map(|&i| csv.text(i, line)).collect::<Result<_, _>>()?;
                let get = |col: &str| {
                    used.iter().position(|(_, c)| *c == col).map_or(Cell::Missing, |i| Cell::Str(values[i].clone()))
                };
                b.pair(line, &m, title_key, get, &|| csv.header.join(", "))?;
            }
            if b.records.is_empty() {
                return Err(data(name, 2, "no rows after the header"));
            }
        }
        Format::Json | Format::Jsonl => {
            let bytes = read_bytes(path)?;
            for_each_json(&bytes, name, format, |line, value| {
                poll(cancel, b.records.len())?;
                let Value::Object(map) = value else {
                    return Err(data(
                        name,
                        line,
                        format!("expected a JSON object with the fields {}", used_list(&used)),
                    ));
                };
                let fields = || format!("the fields {}", map.keys().cloned().collect::<Vec<_>>().join(", "));
                b.pair(line, &m, title_key, |k| Cell::of_json(map.get(k)), &fields)
            })?;
        }
        Format::Parquet => {
            use parquet::file::reader::FileReader;
            let reader = open_parquet(path, name)?;
            let schema = reader.metadata().file_metadata().schema_descr_ptr();
            let names: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
            missing_columns(name, &used, &names)?;
            let rows = reader.get_row_iter(None).map_err(|e| data(name, 1, format!("unreadable Parquet: {e}")))?;
            for (i, row) in rows.enumerate() {
                let line = i as u64 + 1;
                poll(cancel, i)?;
                let row = row.map_err(|e| data(name, line, format!("unreadable Parquet row: {e}")))?;
                let fields = row.into_columns();
                let get = |k: &str| Cell::of_parquet(fields.iter().find(|(n, _)| n == k).map(|(_, f)| f));
                b.pair(line, &m, title_key, get, &|| names.join(", "))?;
            }
        }
    }
    Ok(b.records)
}

fn used_list(used: &[(&str, &str)]) -> String {
    used.iter().map(|(_, c)| *c).collect::<Vec<_>>().join(", ")
}

/// The grouped layout: one JSON record per query, each positive a pair labelled 1 (relevance 3), each
/// negative a pair labelled 0 (relevance 1). `pos_scores`/`neg_scores` (teacher scores for
/// distillation) are checked for shape but not used: no stage trains on them yet.
pub(super) fn parse_grouped(bytes: &[u8], name: &str, cancel: &AtomicBool) -> Result<Vec<Record>, StageError> {
    const EXPECTED: &str = "expected a JSON object {\"query\": str, \"pos\": [str], \"neg\": [str]} \
                            (optional \"query_id\", \"pos_scores\", \"neg_scores\")";
    let mut b = Builder::new(name, LabelKind::Binary);
    for_each_json(bytes, name, Format::Jsonl, |line, value| {
        poll(cancel, b.records.len())?;
        let err = |m: String| data(name, line, m);
        let Value::Object(map) = value else {
            return Err(err(EXPECTED.into()));
        };
        let query = match map.get("query") {
            Some(Value::String(q)) if !q.trim().is_empty() => q.clone(),
            Some(Value::String(_)) => return Err(err("field `query` is empty; expected text".into())),
            None => return Err(err(format!("missing field `query`; {EXPECTED}"))),
            Some(other) => return Err(err(format!("field `query` is {}; expected a string", kind_of(other)))),
        };
        let docs = |field: &str| -> Result<Vec<String>, StageError> {
            let Some(v) = map.get(field) else {
                return Err(err(format!("missing field `{field}`; {EXPECTED} (an empty list is allowed)")));
            };
            let Value::Array(items) = v else {
                return Err(err(format!("field `{field}` is {}; expected a list of strings", kind_of(v))));
            };
            items
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                    Value::String(_) => Err(err(format!("`{field}[{i}]` is empty; expected a document's text"))),
                    other => Err(err(format!("`{field}[{i}]` is {}; expected a string", kind_of(other)))),
                })
                .collect()
        };
        let (pos, neg) = (docs("pos")?, docs("neg")?);
        if pos.is_empty() && neg.is_empty() {
            return Err(err("`pos` and `neg` are both empty; a record needs at least one document".into()));
        }
        for (field, list) in [("pos_scores", &pos), ("neg_scores", &neg)] {
            match map.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Array(s)) if s.len() == list.len() && s.iter().all(Value::is_number) => {}
                Some(_) => {
                    return Err(err(format!(
                        "field `{field}` must be a list of {} numbers, one per entry of `{}`",
                        list.len(),
                        &field[..3]
                    )))
                }
            }
        }
        if let Some(d) = pos.iter().find(|d| neg.contains(d)) {
            return Err(err(format!("the document `{d}` is in both `pos` and `neg`")));
        }
        if let Some(id) = map.get("query_id") {
            let id = Cell::of_json(Some(id)).id("query_id").map_err(err)?;
            b.check_query_id(line, id, &query)?;
        }
        for (list, relevance) in [(pos, 3.0), (neg, 1.0)] {
            for d in list {
                b.push(query.clone(), d, String::new(), None, relevance);
            }
        }
        Ok(())
    })?;
    Ok(b.records)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
