//! The table the data stages hand to each other, and the reader later stages use.
//!
//! One UTF-8 CSV file, header `id,product_id,query,title,description,relevance`, plus a `label` column
//! (`0`/`1`) in split outputs. The bytes are a pure function of the records: fields are quoted only
//! when they must be, lines end in `\n`, relevance is written in Rust's shortest round-trip form
//! (`3`, `2.33`). The cache compares upstream outputs by content hash (early cutoff), so a rerun
//! that yields the same records must yield the same file.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use crate::engine::StageError;

/// The columns every table has, in file order.
pub const COLUMNS: [&str; 6] = ["id", "product_id", "query", "title", "description", "relevance"];
/// The extra column of split outputs.
pub const LABEL: &str = "label";
/// The file name `load` and `normalize` write their table under.
pub const TABLE_FILE: &str = "table.csv";

/// One (query, product) pair with its human relevance grade.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub product_id: String,
    pub query: String,
    pub title: String,
    pub description: String,
    /// Mean rater grade in [1, 3].
    pub relevance: f64,
}

/// A record of a split output with its binary label (relevance ≥ the split's threshold).
#[derive(Debug, Clone, PartialEq)]
pub struct Labeled {
    pub record: Record,
    pub label: bool,
}

/// Streams records into a table file.
pub struct TableWriter<W: Write> {
    csv: csv::Writer<W>,
    labeled: bool,
    name: String,
    buf: String,
}

impl TableWriter<BufWriter<File>> {
    /// Create `path`; `labeled` adds the `label` column.
    pub fn create(path: &Path, labeled: bool) -> Result<Self, StageError> {
        let file = File::create(path).map_err(|e| StageError::io(path, e))?;
        Self::new(BufWriter::new(file), labeled, path.display().to_string())
    }
}

impl<W: Write> TableWriter<W> {
    /// Wrap any writer; `name` appears in I/O errors.
    pub fn new(inner: W, labeled: bool, name: String) -> Result<Self, StageError> {
        let csv = csv::WriterBuilder::new()
            .quote_style(csv::QuoteStyle::Necessary)
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(inner);
        let mut w = TableWriter { csv, labeled, name, buf: String::new() };
        let mut header: Vec<&str> = COLUMNS.to_vec();
        if labeled {
            header.push(LABEL);
        }
        w.csv.write_record(&header).map_err(|e| w.err(e))?;
        Ok(w)
    }

    /// Append one row. `label` must be given exactly when the table is labeled.
    pub fn write(&mut self, r: &Record, label: Option<bool>) -> Result<(), StageError> {
        if label.is_some() != self.labeled {
            return Err(StageError::failed(format!(
                "{}: label {} for a table {} a label column",
                self.name,
                if label.is_some() { "given" } else { "missing" },
                if self.labeled { "with" } else { "without" }
            )));
        }
        self.buf.clear();
        use std::fmt::Write as _;
        write!(self.buf, "{}", r.relevance).expect("writing to a String");
        let fields = [&r.id, &r.product_id, &r.query, &r.title, &r.description, &self.buf];
        for f in fields {
            self.csv.write_field(f.as_bytes()).map_err(|e| err(&self.name, e))?;
        }
        if let Some(l) = label {
            self.csv.write_field(if l { "1" } else { "0" }).map_err(|e| err(&self.name, e))?;
        }
        self.csv.write_record(None::<&[u8]>).map_err(|e| err(&self.name, e))
    }

    /// Flush and hand back the inner writer (durability is the store's job: it fsyncs on commit).
    pub fn finish(self) -> Result<W, StageError> {
        let name = self.name;
        let mut inner = self
            .csv
            .into_inner()
            .map_err(|e| StageError::Io { path: name.clone(), source: std::io::Error::other(e.to_string()) })?;
        inner.flush().map_err(|e| StageError::Io { path: name, source: e })?;
        Ok(inner)
    }

    fn err(&self, e: csv::Error) -> StageError {
        err(&self.name, e)
    }
}

fn err(name: &str, e: csv::Error) -> StageError {
    let source = match e.into_kind() {
        csv::ErrorKind::Io(io) => io,
        other => std::io::Error::other(format!("{other:?}")),
    };
    StageError::Io { path: name.to_string(), source }
}

/// Write an unlabeled table.
pub fn write_table(path: &Path, records: &[Record]) -> Result<(), StageError> {
    let mut w = TableWriter::create(path, false)?;
    for r in records {
        w.write(r, None)?;
    }
    w.finish().map(drop)
}

/// Write a labeled (split) table.
pub fn write_labeled(path: &Path, rows: &[Labeled]) -> Result<(), StageError> {
    let mut w = TableWriter::create(path, true)?;
    for r in rows {
        w.write(&r.record, Some(r.label))?;
    }
    w.finish().map(drop)
}

/// Streams rows out of a table file, labeled or not (told apart by the header).
pub struct TableReader {
    csv: csv::Reader<BufReader<File>>,
    labeled: bool,
    name: String,
    row: csv::StringRecord,
}

impl TableReader {
    /// Open `path` and check its header is exactly the table's columns (optionally plus `label`).
    pub fn open(path: &Path) -> Result<Self, StageError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| StageError::io(path, e))?;
        let mut csv = csv::ReaderBuilder::new().has_headers(true).from_reader(BufReader::new(file));
        let header = csv.headers().map_err(|e| data_err(&name, e))?.clone();
        let labeled = if header.iter().eq(COLUMNS) {
            false
        } else if header.iter().eq(COLUMNS.iter().copied().chain([LABEL])) {
            true
        } else {
            return Err(StageError::Data {
                file: name,
                line: 1,
                message: format!(
                    "expected the header `{}` (optionally with `,{LABEL}`), found `{}`",
                    COLUMNS.join(","),
                    header.iter().collect::<Vec<_>>().join(",")
                ),
            });
        };
        Ok(TableReader { csv, labeled, name, row: csv::StringRecord::new() })
    }

    /// Whether the table has a `label` column (split outputs do).
    pub fn has_labels(&self) -> bool {
        self.labeled
    }

    fn next_row(&mut self) -> Result<Option<(Record, Option<bool>)>, StageError> {
        if !self.csv.read_record(&mut self.row).map_err(|e| data_err(&self.name, e))? {
            return Ok(None);
        }
        let line = self.row.position().map_or(0, |p| p.line());
        let bad = |message: String| StageError::Data { file: self.name.clone(), line, message };
        let f = &self.row;
        let relevance: f64 = f[5].parse().map_err(|_| bad(format!("relevance `{}` is not a number", &f[5])))?;
        let label = if self.labeled {
            match &f[6] {
                "0" => Some(false),
                "1" => Some(true),
                other => return Err(bad(format!("label `{other}`: expected 0 or 1"))),
            }
        } else {
            None
        };
        let record = Record {
            id: f[0].to_string(),
            product_id: f[1].to_string(),
            query: f[2].to_string(),
            title: f[3].to_string(),
            description: f[4].to_string(),
            relevance,
        };
        Ok(Some((record, label)))
    }
}

impl Iterator for TableReader {
    type Item = Result<(Record, Option<bool>), StageError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row().transpose()
    }
}

fn data_err(name: &str, e: csv::Error) -> StageError {
    let line = e.position().map_or(1, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => StageError::Io { path: name.to_string(), source },
        kind => StageError::Data {
            file: name.to_string(),
            line,
            message: match kind {
                csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                    format!("expected {expected_len} fields, found {len}")
                }
                csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8: {err}"),
                other => format!("{other:?}"),
            },
        },
    }
}

/// Every record of a table (a `label` column, if present, is ignored).
pub fn read_table(path: &Path) -> Result<Vec<Record>, StageError> {
    TableReader::open(path)?.map(|r| r.map(|(rec, _)| rec)).collect()
}

/// Every row of a split output; an error if the table has no `label` column.
pub fn read_labeled(path: &Path) -> Result<Vec<Labeled>, StageError> {
    let reader = TableReader::open(path)?;
    if !reader.has_labels() {
        return Err(StageError::Data {
            file: path.display().to_string(),
            line: 1,
            message: format!("expected a `{LABEL}` column: this is not a split output"),
        });
    }
    reader.map(|r| r.map(|(record, label)| Labeled { record, label: label.unwrap_or(false) })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, query: &str, relevance: f64) -> Record {
        Record {
            id: id.into(),
            product_id: format!("p{id}"),
            query: query.into(),
            title: "Simpson Strong-Tie 12-Gauge \"Angle\", 1/2 in.".into(),
            description: "line one\nline two, with å".into(),
            relevance,
        }
    }

    #[test]
    fn round_trips_records_and_labels_with_deterministic_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            Labeled { record: rec("1", "angle bracket", 3.0), label: true },
            Labeled { record: rec("2", " l bracket ", 2.33), label: false },
        ];
        let a = dir.path().join("a.csv");
        let b = dir.path().join("b.csv");
        write_labeled(&a, &rows).unwrap();
        write_labeled(&b, &rows).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap());
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("id,product_id,query,title,description,relevance,label\n1,p1,"));
        assert!(text.contains(",3,1\n"), "{text}");
        assert!(text.contains(",2.33,0\n"), "{text}");
        assert!(!text.contains('\r'));
        assert_eq!(read_labeled(&a).unwrap(), rows);
        // The label column is dropped by the plain reader, and required by the labeled one.
        assert_eq!(read_table(&a).unwrap()[1], rows[1].record);
        let plain = dir.path().join("plain.csv");
        write_table(&plain, &[rows[0].record.clone()]).unwrap();
        assert!(!TableReader::open(&plain).unwrap().has_labels());
        assert!(matches!(read_labeled(&plain), Err(StageError::Data { line: 1, .. })));
    }

    #[test]
    fn rejects_foreign_headers_and_bad_values_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "id,query\n1,a\n").unwrap();
        let e = read_table(&p).unwrap_err();
        assert!(matches!(&e, StageError::Data { line: 1, message, .. } if message.contains("expected the header")));
        std::fs::write(&p, "id,product_id,query,title,description,relevance\n1,2,q,t,d,3\n2,2,q,t,d,x\n").unwrap();
        let e = read_table(&p).unwrap_err();
        assert!(matches!(&e, StageError::Data { line: 3, .. }), "{e}");
    }
}
