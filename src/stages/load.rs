//! `load`: read the raw relevance data in whatever layout it comes in and write one [`Record`] table.
//!
//! Layouts: the Kaggle competition files (`train.csv`, latin-1, optionally joined with
//! `product_descriptions.csv`), and the `bstds/home_depot` records (`id, entity_id, name, query,
//! relevance, description`) as JSON Lines, a JSON array or Parquet, local or `hf://datasets/…`; and,
//! for anyone's own data, the `pairs` and `grouped` layouts of [`layouts`], which map their labels
//! onto the same [1, 3] relevance scale so that no later stage needs to know where the data came from.
//! Inputs are validated here, once, so every later stage can trust the table: a bad row fails the
//! run with file, line and what was expected rather than surfacing as a strange loss curve later.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use serde_json::Value;

use super::hub;
use super::table::{self, Record};
use crate::engine::{
    Contract, ExternalInput, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};
use crate::hub::HubSettings;

#[path = "load_layouts.rs"]
mod layouts;
pub use layouts::{Columns, LabelKind, Layout};

pub const KIND: &str = "load";
/// Bump when the table `load` writes for the same inputs changes meaning.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/load.toml");
/// Reads no upstream; writes the table.
pub const CONTRACT: Contract = Contract { needs: &[], writes: &[table::TABLE_FILE] };

pub struct Load;

/// The parameters of `stages/load.toml`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadParams {
    pub path: String,
    pub descriptions: String,
    pub format: String,
    pub encoding: String,
    pub revision: String,
    pub layout: String,
    pub label_kind: String,
    pub relevance_range: Vec<f64>,
    pub columns: Columns,
}

/// The input layouts `load` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Kaggle `train.csv` (+ `product_descriptions.csv`), or a comma-separated pairs table.
    Csv,
    /// A tab-separated pairs table (no quoting: TSV exports rarely escape quotes).
    Tsv,
    /// A JSON array of records, or JSON Lines when the file starts with `{`.
    Json,
    /// One JSON record per line.
    Jsonl,
    /// Records as Parquet columns.
    Parquet,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Json => "json",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }

    /// The format a file name implies (a trailing `.gz` is looked through).
    pub fn from_extension(path: &str) -> Option<Format> {
        let lower = path.to_ascii_lowercase();
        let base = lower.strip_suffix(".gz").unwrap_or(&lower);
        let ext = Path::new(base).extension()?.to_str()?;
        Some(match ext {
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            "json" => Format::Json,
            "jsonl" | "ndjson" => Format::Jsonl,
            "parquet" | "pq" => Format::Parquet,
            _ => return None,
        })
    }

    /// `format` wins over the extension; `""` means "from the extension".
    pub fn resolve(format: &str, path: &str) -> Result<Format, ParamError> {
        match format {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "json" => Ok(Format::Json),
            "jsonl" => Ok(Format::Jsonl),
            "parquet" => Ok(Format::Parquet),
            "" => Format::from_extension(path).ok_or_else(|| {
                ParamError::new(
                    "format",
                    format!(
                        "cannot tell the format of `{path}` from its extension \
                         (.csv, .tsv, .json, .jsonl, .ndjson, .parquet, optionally + .gz); \
                         set format = \"csv\" | \"tsv\" | \"json\" | \"jsonl\" | \"parquet\""
                    ),
                )
            }),
            other => Err(ParamError::new(
                "format",
                format!(
                    "unknown format `{other}`; expected \"\", \"csv\", \"tsv\", \"json\", \"jsonl\" or \"parquet\""
                ),
            )),
        }
    }
}

/// How CSV bytes become text. JSON and Parquet are UTF-8 by definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// ISO-8859-1: every byte is the code point of the same value, so decoding cannot fail and is
    /// lossless (the Kaggle files are latin-1 and not valid UTF-8).
    Latin1,
    Utf8,
}

impl Encoding {
    /// `"auto"` is latin-1 for the Kaggle files (which are latin-1) and UTF-8 for anything else.
    fn parse(s: &str, layout: Layout) -> Result<Encoding, ParamError> {
        match s {
            "latin-1" => Ok(Encoding::Latin1),
            "utf-8" => Ok(Encoding::Utf8),
            "auto" if layout == Layout::Auto => Ok(Encoding::Latin1),
            "auto" => Ok(Encoding::Utf8),
            other => Err(ParamError::new(
                "encoding",
                format!("unknown encoding `{other}`; expected \"auto\", \"latin-1\" or \"utf-8\""),
            )),
        }
    }
}

impl StageParams for LoadParams {
    fn validate(&self) -> Result<(), ParamError> {
        self.resolved().map(drop)
    }
}

/// What the parameters name, once checked.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    layout: Layout,
    format: Format,
    encoding: Encoding,
    labels: LabelKind,
}

impl LoadParams {
    /// The layout, format, encoding and labels the values name; validation is resolving them.
    fn resolved(&self) -> Result<Resolved, ParamError> {
        if self.path.trim().is_empty() {
            return Err(ParamError::new("path", "must name a file or an hf://datasets/… path"));
        }
        if self.revision.trim().is_empty() {
            return Err(ParamError::new("revision", "must not be empty; the default is \"main\""));
        }
        for (key, value) in [("path", &self.path), ("descriptions", &self.descriptions)] {
            if let Some(Err(message)) = hub::parse(value) {
                return Err(ParamError::new(key, message));
            }
        }
        let layout = Layout::parse(&self.layout)?;
        let format = Format::resolve(&self.format, &self.path)?;
        layout.check_format(format)?;
        let labels = LabelKind::parse(&self.label_kind, &self.relevance_range)?;
        if layout == Layout::Pairs {
            self.columns.validate()?;
        }
        Ok(Resolved { layout, format, encoding: Encoding::parse(&self.encoding, layout)?, labels })
    }

    /// Descriptions only apply to the Kaggle CSV layout; the other layouts carry their own.
    fn descriptions_for(&self, r: Resolved) -> Option<&str> {
        (r.layout == Layout::Auto && r.format == Format::Csv && !self.descriptions.is_empty())
            .then_some(self.descriptions.as_str())
    }

    fn input(&self, spec: &str) -> ExternalInput {
        if hub::parse(spec).is_some() {
            ExternalInput::Remote(format!("{spec}@{}", self.revision))
        } else {
            ExternalInput::File(spec.to_string())
        }
    }
}

impl TypedStage for Load {
    type Params = LoadParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn inputs(p: &LoadParams) -> Vec<ExternalInput> {
        let Ok(resolved) = p.resolved() else {
            return Vec::new();
        };
        let mut inputs = vec![p.input(&p.path)];
        if let Some(d) = p.descriptions_for(resolved) {
            inputs.push(p.input(d));
        }
        inputs
    }

    fn run(ctx: &StageContext, p: &LoadParams) -> Result<StageOutput, StageError> {
        let hub = HubSettings::from_env().with_progress(!ctx.quiet);
        let loaded = load(p, ctx.root, &hub, ctx.cancel)?;
        table::write_table(&ctx.out.join(table::TABLE_FILE), &loaded.records)?;
        Ok(StageOutput { stats: loaded.stats(p), ..Default::default() })
    }
}

/// The records `load` read, and how.
#[derive(Debug)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub format: Format,
    pub layout: Layout,
}

impl Loaded {
    fn stats(&self, p: &LoadParams) -> crate::engine::JsonMap {
        let queries: HashSet<&str> = self.records.iter().map(|r| r.query.as_str()).collect();
        let products: HashSet<&str> = self.records.iter().map(|r| r.product_id.as_str()).collect();
        let described = self.records.iter().filter(|r| !r.description.is_empty()).count();
        let mut s = crate::engine::JsonMap::new();
        s.insert("source".into(), p.path.clone().into());
        s.insert("format".into(), self.format.name().into());
        s.insert("layout".into(), self.layout.name().into());
        s.insert("rows".into(), self.records.len().into());
        s.insert("distinct_queries".into(), queries.len().into());
        s.insert("distinct_products".into(), products.len().into());
        s.insert("rows_with_description".into(), described.into());
        s
    }
}

/// Read and validate the input `p` describes; relative paths resolve against `root`.
pub fn load(p: &LoadParams, root: &Path, hub: &HubSettings, cancel: &AtomicBool) -> Result<Loaded, StageError> {
    let resolved = p.resolved()?;
    let Resolved { layout, format, encoding, labels } = resolved;
    let main = locate(&p.path, "path", &p.revision, root, hub)?;
    let mut records = match (layout, format) {
        (Layout::Pairs, _) => layouts::parse_pairs(&main, &p.path, format, encoding, &p.columns, labels, cancel)?,
        (Layout::Grouped, _) => layouts::parse_grouped(&read_bytes(&main)?, &p.path, cancel)?,
        (Layout::Auto, Format::Csv) => parse_kaggle(&read_bytes(&main)?, &p.path, encoding, cancel)?,
        (Layout::Auto, Format::Json | Format::Jsonl) => parse_json(&read_bytes(&main)?, &p.path, format, cancel)?,
        (Layout::Auto, Format::Parquet) => parse_parquet(&main, &p.path, cancel)?,
        (Layout::Auto, Format::Tsv) => unreachable!("resolved() rejects TSV for the Home Depot layouts"),
    };
    if records.is_empty() {
        return Err(StageError::Data { file: p.path.clone(), line: 1, message: "no records".into() });
    }
    if let Some(spec) = p.descriptions_for(resolved) {
        let file = locate(spec, "descriptions", &p.revision, root, hub)?;
        let wanted: HashSet<&str> = records.iter().map(|r| r.product_id.as_str()).collect();
        let descriptions = parse_descriptions(&read_bytes(&file)?, spec, encoding, &wanted)?;
        for r in &mut records {
            if let Some(d) = descriptions.get(&r.product_id) {
                r.description.clone_from(d);
            }
        }
    }
    Ok(Loaded { records, format, layout })
}

/// A local file for a `path`-like parameter: the file itself, or the hub file it names.
fn locate(spec: &str, key: &str, revision: &str, root: &Path, hub: &HubSettings) -> Result<PathBuf, StageError> {
    if let Some(parsed) = hub::parse(spec) {
        let parsed = parsed.map_err(|message| StageError::param(key, message))?;
        return hub::resolve(spec, &parsed, revision, key, hub);
    }
    let path = if Path::new(spec).is_absolute() { PathBuf::from(spec) } else { root.join(spec) };
    if !path.is_file() {
        return Err(StageError::param(key, format!("`{spec}`: no such file (looked at {})", path.display())));
    }
    Ok(path)
}

/// The whole file, gunzipped when it is gzip (told by its magic bytes, so a cached hub file
/// without a `.gz` name works too).
fn read_bytes(path: &Path) -> Result<Vec<u8>, StageError> {
    let raw = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(|e| StageError::io(path, e))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn data(file: &str, line: u64, message: impl Into<String>) -> StageError {
    StageError::Data { file: file.to_string(), line, message: message.into() }
}

fn poll(cancel: &AtomicBool, n: usize) -> Result<(), StageError> {
    if n.is_multiple_of(8192) && cancel.load(Ordering::Relaxed) {
        return Err(StageError::Cancelled);
    }
    Ok(())
}

fn check_relevance(value: f64, shown: &str) -> Result<f64, String> {
    if (1.0..=3.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("relevance `{shown}` is outside [1, 3]"))
    }
}

/// A CSV file read record by record, with the checks `csv` leaves out: every record has as many
/// fields as the header, and its quotes balance (an unclosed quote otherwise swallows the rest of
/// the file into one field without complaint).
struct CsvFile<'a> {
    name: &'a str,
    bytes: &'a [u8],
    encoding: Encoding,
    rdr: csv::Reader<&'a [u8]>,
    rec: csv::ByteRecord,
    header: Vec<String>,
    /// Whether `"` quotes fields (and so must balance).
    quoted: bool,
}

impl<'a> CsvFile<'a> {
    fn open(bytes: &'a [u8], name: &'a str, encoding: Encoding, expected: &[&str]) -> Result<Self, StageError> {
        Self::open_with(bytes, name, encoding, expected, false)
    }

    /// `tab`: tab-separated without quoting, where a `"` is just a character.
    fn open_with(
        bytes: &'a [u8],
        name: &'a str,
        encoding: Encoding,
        expected: &[&str],
        tab: bool,
    ) -> Result<Self, StageError> {
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(data(name, 1, format!("empty file; expected a header line `{}`", expected.join(","))));
        }
        let rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(if tab { b'\t' } else { b',' })
            .quoting(!tab)
            .from_reader(bytes);
        let mut f =
            CsvFile { name, bytes, encoding, rdr, rec: csv::ByteRecord::new(), header: Vec::new(), quoted: !tab };
        if !f.next()? {
            return Err(data(name, 1, "empty file"));
        }
        f.header = (0..f.rec.len()).map(|i| f.text(i, 1).map(|s| s.trim().to_string())).collect::<Result<_, _>>()?;
        Ok(f)
    }

    /// Advance to the next record; `false` at the end of the file.
    fn next(&mut self) -> Result<bool, StageError> {
        let start = self.rdr.position().clone();
        match self.rdr.read_byte_record(&mut self.rec) {
            Ok(false) => Ok(false),
            Ok(true) => {
                let line = self.line();
                let begin = self.rec.position().map_or(start.byte(), |p| p.byte()) as usize;
                let end = self.rdr.position().byte() as usize;
                let quotes = self.bytes[begin..end].iter().filter(|&&b| b == b'"').count();
                if self.quoted && quotes % 2 == 1 {
                    return Err(data(
                        self.name,
                        line,
                        "unbalanced `\"`: a quoted field is not closed (or a stray quote in an unquoted field)",
                    ));
                }
                if !self.header.is_empty() && self.rec.len() != self.header.len() {
                    return Err(data(
                        self.name,
                        line,
                        format!(
                            "expected {} fields ({}), found {}; check the quoting and the commas",
                            self.header.len(),
                            self.header.join(", "),
                            self.rec.len()
                        ),
                    ));
                }
                Ok(true)
            }
            Err(e) => {
                let line = e.position().map_or(start.line(), |p| p.line());
                Err(data(self.name, line, format!("unreadable CSV: {e}")))
            }
        }
    }

    fn line(&self) -> u64 {
        self.rec.position().map_or(0, |p| p.line())
    }

    fn text(&self, i: usize, line: u64) -> Result<String, StageError> {
        let raw = &self.rec[i];
        match self.encoding {
            Encoding::Latin1 => Ok(encoding_rs::mem::decode_latin1(raw).into_owned()),
            Encoding::Utf8 => std::str::from_utf8(raw).map(str::to_string).map_err(|e| {
                data(
                    self.name,
                    line,
                    format!(
                        "field {} is not valid UTF-8 ({e}); if the file is latin-1 set encoding = \"latin-1\"",
                        i + 1
                    ),
                )
            }),
        }
    }

    /// The index of each wanted column, or an error naming the first missing one.
    fn columns<const N: usize>(&self, wanted: [&str; N]) -> Result<[usize; N], StageError> {
        let mut out = [0; N];
        for (slot, col) in out.iter_mut().zip(wanted) {
            *slot = self.header.iter().position(|h| h == col).ok_or_else(|| {
                data(
                    self.name,
                    1,
                    format!(
                        "missing column `{col}`; expected columns {} (found {})",
                        wanted.join(", "),
                        self.header.join(", ")
                    ),
                )
            })?;
        }
        Ok(out)
    }
}

const KAGGLE_COLUMNS: [&str; 5] = ["id", "product_uid", "product_title", "search_term", "relevance"];

/// The Kaggle `train.csv` layout.
pub fn parse_kaggle(
    bytes: &[u8],
    name: &str,
    encoding: Encoding,
    cancel: &AtomicBool,
) -> Result<Vec<Record>, StageError> {
    let mut csv = CsvFile::open(bytes, name, encoding, &KAGGLE_COLUMNS)?;
    let [id, uid, title, query, rel] = csv.columns(KAGGLE_COLUMNS)?;
    let mut records = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    while csv.next()? {
        poll(cancel, records.len())?;
        let line = csv.line();
        let rel_text = csv.text(rel, line)?;
        let relevance = rel_text
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("relevance `{rel_text}` is not a number; expected a number in [1, 3]"))
            .and_then(|v| check_relevance(v, &rel_text))
            .map_err(|m| data(name, line, m))?;
        let record = Record {
            id: csv.text(id, line)?,
            product_id: csv.text(uid, line)?,
            query: csv.text(query, line)?,
            title: csv.text(title, line)?,
            description: String::new(),
            relevance,
        };
        check_ids(&record, &mut seen, name, line)?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(data(name, 2, "no rows after the header"));
    }
    Ok(records)
}

fn check_ids(r: &Record, seen: &mut HashMap<String, u64>, name: &str, line: u64) -> Result<(), StageError> {
    if r.id.trim().is_empty() {
        return Err(data(name, line, "empty id"));
    }
    if r.product_id.trim().is_empty() {
        return Err(data(name, line, "empty product id"));
    }
    if let Some(first) = seen.insert(r.id.clone(), line) {
        return Err(data(name, line, format!("duplicate id `{}` (first on line {first})", r.id)));
    }
    Ok(())
}

/// `product_descriptions.csv`, keeping only the products in `wanted` (the full file is ~100 MB).
fn parse_descriptions(
    bytes: &[u8],
    name: &str,
    encoding: Encoding,
    wanted: &HashSet<&str>,
) -> Result<HashMap<String, String>, StageError> {
    const COLS: [&str; 2] = ["product_uid", "product_description"];
    let mut csv = CsvFile::open(bytes, name, encoding, &COLS)?;
    let [uid, desc] = csv.columns(COLS)?;
    let mut out = HashMap::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    while csv.next()? {
        let line = csv.line();
        let id = csv.text(uid, line)?;
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(data(name, line, format!("duplicate product_uid `{id}` (first on line {first})")));
        }
        if wanted.contains(id.as_str()) {
            let d = csv.text(desc, line)?;
            out.insert(id, d);
        }
    }
    Ok(out)
}

/// A field of a JSON or Parquet record, reduced to what a [`Record`] needs.
enum Cell {
    Missing,
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Other(&'static str),
}

impl Cell {
    fn of_json(v: Option<&Value>) -> Cell {
        match v {
            None => Cell::Missing,
            Some(Value::Null) => Cell::Null,
            Some(Value::String(s)) => Cell::Str(s.clone()),
            Some(Value::Number(n)) => n.as_i64().map_or_else(|| Cell::Float(n.as_f64().unwrap_or(f64::NAN)), Cell::Int),
            Some(Value::Bool(_)) => Cell::Other("a boolean"),
            Some(Value::Array(_)) => Cell::Other("an array"),
            Some(Value::Object(_)) => Cell::Other("an object"),
        }
    }

    fn of_parquet(f: Option<&parquet::record::Field>) -> Cell {
        use parquet::record::Field as F;
        match f {
            None => Cell::Missing,
            Some(F::Null) => Cell::Null,
            Some(F::Str(s)) => Cell::Str(s.clone()),
            Some(F::Byte(v)) => Cell::Int((*v).into()),
            Some(F::Short(v)) => Cell::Int((*v).into()),
            Some(F::Int(v)) => Cell::Int((*v).into()),
            Some(F::Long(v)) => Cell::Int(*v),
            Some(F::UByte(v)) => Cell::Int((*v).into()),
            Some(F::UShort(v)) => Cell::Int((*v).into()),
            Some(F::UInt(v)) => Cell::Int((*v).into()),
            Some(F::ULong(v)) => i64::try_from(*v).map_or(Cell::Other("a huge integer"), Cell::Int),
            Some(F::Float(v)) => Cell::Float((*v).into()),
            Some(F::Double(v)) => Cell::Float(*v),
            Some(F::Float16(v)) => Cell::Float(v.to_f64()),
            Some(F::Bytes(b)) => {
                std::str::from_utf8(b.data()).map_or(Cell::Other("binary (not UTF-8)"), |s| Cell::Str(s.to_string()))
            }
            Some(_) => Cell::Other("a non-scalar value"),
        }
    }

    /// An identifier: a string, or an integer written in decimal.
    fn id(self, field: &str) -> Result<String, String> {
        match self {
            Cell::Str(s) if !s.trim().is_empty() => Ok(s),
            Cell::Int(i) => Ok(i.to_string()),
            Cell::Missing => Err(format!("missing field `{field}`")),
            Cell::Str(_) | Cell::Null => Err(format!("field `{field}` is empty; expected a string or an integer")),
            Cell::Float(f) => Err(format!("field `{field}` is {f}; expected a string or an integer")),
            Cell::Other(what) => Err(format!("field `{field}` is {what}; expected a string or an integer")),
        }
    }

    fn text(self, field: &str, required: bool) -> Result<String, String> {
        match self {
            Cell::Str(s) => Ok(s),
            Cell::Missing | Cell::Null if !required => Ok(String::new()),
            Cell::Missing => Err(format!("missing field `{field}`")),
            Cell::Null => Err(format!("field `{field}` is null; expected a string")),
            Cell::Int(i) => Err(format!("field `{field}` is the number {i}; expected a string")),
            Cell::Float(f) => Err(format!("field `{field}` is the number {f}; expected a string")),
            Cell::Other(what) => Err(format!("field `{field}` is {what}; expected a string")),
        }
    }

    fn relevance(self) -> Result<f64, String> {
        match self {
            Cell::Int(i) => check_relevance(i as f64, &i.to_string()),
            Cell::Float(f) => check_relevance(f, &f.to_string()),
            Cell::Str(s) => match s.trim().parse::<f64>() {
                Ok(v) => check_relevance(v, &s),
                Err(_) => Err(format!("relevance `{s}` is not a number; expected a number in [1, 3]")),
            },
            Cell::Missing => Err("missing field `relevance`".into()),
            Cell::Null => Err("relevance is null; expected a number in [1, 3]".into()),
            Cell::Other(what) => Err(format!("relevance is {what}; expected a number in [1, 3]")),
        }
    }
}

/// The fields of a `bstds/home_depot` record.
const RECORD_FIELDS: [&str; 6] = ["id", "entity_id", "name", "query", "relevance", "description"];

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Build a record of the `bstds/home_depot` layout from a field lookup.
fn record_of(mut get: impl FnMut(&str) -> Cell) -> Result<Record, String> {
    Ok(Record {
        id: get("id").id("id")?,
        product_id: get("entity_id").id("entity_id")?,
        title: get("name").text("name", true)?,
        query: get("query").text("query", true)?,
        description: get("description").text("description", false)?,
        relevance: get("relevance").relevance()?,
    })
}

/// JSON Lines, or a JSON array of records (a `.json` file that starts with `{` is read as lines).
pub fn parse_json(bytes: &[u8], name: &str, format: Format, cancel: &AtomicBool) -> Result<Vec<Record>, StageError> {
    let mut records = Vec::new();
    let mut seen = HashMap::new();
    for_each_json(bytes, name, format, |line, value| {
        poll(cancel, records.len())?;
        let Value::Object(map) = value else {
            return Err(data(
                name,
                line,
                "expected a JSON object with id, entity_id, name, query, relevance, description",
            ));
        };
        let record = record_of(|k| Cell::of_json(map.get(k))).map_err(|m| data(name, line, m))?;
        check_ids(&record, &mut seen, name, line)?;
        records.push(record);
        Ok(())
    })?;
    Ok(records)
}

/// Each value of a JSON array or of JSON Lines, with the line it starts on.
fn for_each_json(
    bytes: &[u8],
    name: &str,
    format: Format,
    mut push: impl FnMut(u64, Value) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64;
        data(name, line, format!("invalid UTF-8 ({e}); JSON input must be UTF-8"))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.trim_start().chars().next();
    let Some(first) = first else {
        return Err(data(name, 1, "empty file; expected JSON records"));
    };
    match (format, first) {
        (Format::Json, '[') => {
            for item in JsonArray::new(text, name)? {
                let (line, value) = item?;
                push(line, value)?;
            }
        }
        (Format::Jsonl | Format::Json, '{') => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let n = i as u64 + 1;
                let value: Value =
                    serde_json::from_str(line).map_err(|e| data(name, n, format!("invalid JSON: {e}")))?;
                push(n, value)?;
            }
        }
        (Format::Jsonl, _) => return Err(data(name, 1, "expected one JSON object per line (JSON Lines)")),
        _ => return Err(data(name, 1, "expected a JSON array of records or JSON Lines")),
    }
    Ok(())
}

/// The elements of a top-level JSON array, each with the line it starts on, parsed one at a time
/// so an error in a 30 MB file still points at its line.
struct JsonArray<'a> {
    text: &'a str,
    name: &'a str,
    pos: usize,
    line: u64,
    counted: usize,
    done: bool,
}

impl<'a> JsonArray<'a> {
    fn new(text: &'a str, name: &'a str) -> Result<Self, StageError> {
        let mut a = JsonArray { text, name, pos: 0, line: 1, counted: 0, done: false };
        a.skip_ws();
        debug_assert_eq!(a.peek(), Some(b'['));
        a.pos += 1;
        a.skip_ws();
        if a.peek() == Some(b']') {
            a.pos += 1;
            a.finish()?;
        }
        Ok(a)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        let b = self.text.as_bytes();
        while self.pos < b.len() && b[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    /// The line `self.pos` is on; positions only move forward, so counting stays linear.
    fn line_here(&mut self) -> u64 {
        let b = &self.text.as_bytes()[self.counted..self.pos];
        self.line += b.iter().filter(|&&c| c == b'\n').count() as u64;
        self.counted = self.pos;
        self.line
    }

    fn finish(&mut self) -> Result<(), StageError> {
        self.done = true;
        self.skip_ws();
        if self.pos < self.text.len() {
            let line = self.line_here();
            return Err(data(self.name, line, "unexpected text after the closing `]`"));
        }
        Ok(())
    }

    fn item(&mut self) -> Result<(u64, Value), StageError> {
        let line = self.line_here();
        let mut stream = serde_json::Deserializer::from_str(&self.text[self.pos..]).into_iter::<Value>();
        let value = match stream.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return Err(data(self.name, line + e.line() as u64 - 1, format!("invalid JSON: {e}")));
            }
            None => return Err(data(self.name, line, "unexpected end of file; the array is not closed")),
        };
        self.pos += stream.byte_offset();
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.skip_ws();
            }
            Some(b']') => {
                self.pos += 1;
                self.finish()?;
            }
            _ => {
                let at = self.line_here();
                return Err(data(self.name, at, "expected `,` or `]` after a record"));
            }
        }
        Ok((line, value))
    }
}

impl Iterator for JsonArray<'_> {
    type Item = Result<(u64, Value), StageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.item();
        if item.is_err() {
            self.done = true;
        }
        Some(item)
    }
}

/// Records stored as Parquet. `line` in errors is the 1-based row number.
pub fn parse_parquet(path: &Path, name: &str, cancel: &AtomicBool) -> Result<Vec<Record>, StageError> {
    use parquet::file::reader::FileReader;

    let reader = open_parquet(path, name)?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    // Where each of RECORD_FIELDS sits in a row; only `description` may be absent.
    let mut index = [None; RECORD_FIELDS.len()];
    for (slot, field) in index.iter_mut().zip(RECORD_FIELDS) {
        *slot = names.iter().position(|n| n == field);
        if slot.is_none() && field != "description" {
            return Err(data(
                name,
                1,
                format!(
                    "missing column `{field}`; expected columns {} (found {})",
                    RECORD_FIELDS.join(", "),
                    names.join(", ")
                ),
            ));
        }
    }
    let rows = reader.get_row_iter(None).map_err(|e| data(name, 1, format!("unreadable Parquet: {e}")))?;
    let mut records = Vec::new();
    let mut seen = HashMap::new();
    for (i, row) in rows.enumerate() {
        let line = i as u64 + 1;
        poll(cancel, i)?;
        let row = row.map_err(|e| data(name, line, format!("unreadable Parquet row: {e}")))?;
        let fields = row.into_columns();
        let record = record_of(|k| {
            let at = RECORD_FIELDS.iter().position(|f| *f == k).and_then(|i| index[i]);
            Cell::of_parquet(at.and_then(|j| fields.get(j)).map(|(_, f)| f))
        })
        .map_err(|m| data(name, line, m))?;
        check_ids(&record, &mut seen, name, line)?;
        records.push(record);
    }
    Ok(records)
}

/// A Parquet file, gunzipped first when it is gzip.
fn open_parquet(path: &Path, name: &str) -> Result<parquet::file::reader::SerializedFileReader<File>, StageError> {
    let open = || File::open(path).map_err(|e| StageError::io(path, e));
    let mut magic = [0u8; 2];
    let gz = open()?.read_exact(&mut magic).is_ok() && magic == GZIP_MAGIC;
    let file = if gz {
        // The Parquet reader needs to seek, so a gzipped file goes through an anonymous temp file.
        let mut tmp = tempfile::tempfile().map_err(|e| StageError::io(path, e))?;
        std::io::copy(&mut flate2::read::MultiGzDecoder::new(open()?), &mut tmp)
            .map_err(|e| StageError::io(path, e))?;
        tmp
    } else {
        open()?
    };
    parquet::file::reader::SerializedFileReader::new(file)
        .map_err(|e| data(name, 1, format!("not a readable Parquet file: {e}")))
}
