//! TensorBoard event files, written by hand: the format is small and no maintained Rust crate
//! writes it without pulling in a protobuf toolchain.
//!
//! A file is a sequence of TFRecords: `u64` little-endian length, masked CRC-32C of those 8 bytes,
//! the data, masked CRC-32C of the data. Each record's data is an `Event` protobuf:
//! `wall_time = 1 (double)`, `step = 2 (int64)`, `file_version = 3 (string)`, `summary = 5`
//! (`Summary { value = 1: Value { tag = 1 (string), simple_value = 2 (float) } }`). The first
//! record carries `file_version = "brain.Event:2"`. The file name, `events.out.tfevents.<secs>.
//! <host>.<pid>.<n>`, is what TensorBoard looks for. `tests/fixtures/tensorboard/read_events.py`
//! reads a file this module wrote with TensorBoard's own `EventAccumulator`.
//!
//! Each write goes straight to the file (no user-space buffer), so a TensorBoard watching the
//! scratch dir sees a running job's curves step by step. A resumed run rewrites the file keeping
//! only the records up to its checkpoint's step, then appends: no step appears twice.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::TrainError;

/// The first record's `file_version`.
pub const FILE_VERSION: &str = "brain.Event:2";
/// Every event file's name starts with this.
pub const PREFIX: &str = "events.out.tfevents.";

/// The Castagnoli CRC (CRC-32C, reflected polynomial 0x82F63B78) that TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masking, so that a CRC of data that itself holds CRCs is not degenerate.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One record's framing around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// One event as this module writes and reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    FileVersion(String),
    /// `(tag, value)` pairs of one summary.
    Scalars(Vec<(String, f32)>),
}

impl Event {
    /// The `Event` protobuf.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(0x09); // wall_time, fixed64
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            out.push(0x10); // step, varint (int64: two's complement as u64)
            varint(self.step as u64, &mut out);
        }
        match &self.kind {
            EventKind::FileVersion(v) => bytes_field(3, v.as_bytes(), &mut out),
            EventKind::Scalars(values) => {
                let mut summary = Vec::new();
                for (tag, value) in values {
                    let mut v = Vec::new();
                    bytes_field(1, tag.as_bytes(), &mut v);
                    v.push(0x15); // simple_value, fixed32
                    v.extend_from_slice(&value.to_le_bytes());
                    bytes_field(1, &v, &mut summary);
                }
                bytes_field(5, &summary, &mut out);
            }
        }
        out
    }

    /// Decodes what [`Event::encode`] writes (other fields are skipped).
    pub fn decode(data: &[u8]) -> Result<Event, String> {
        let mut ev = Event { wall_time: 0.0, step: 0, kind: EventKind::Scalars(Vec::new()) };
        for (field, value) in Fields::new(data) {
            match (field?, value) {
                (1, Wire::Fixed64(b)) => ev.wall_time = f64::from_le_bytes(b),
                (2, Wire::Varint(v)) => ev.step = v as i64,
                (3, Wire::Bytes(b)) => {
                    ev.kind = EventKind::FileVersion(String::from_utf8_lossy(b).into_owned());
                }
                (5, Wire::Bytes(summary)) => {
                    let mut values = Vec::new();
                    for (f, v) in Fields::new(summary) {
                        if let (1, Wire::Bytes(value)) = (f?, v) {
                            let (mut tag, mut x) = (String::new(), f32::NAN);
                            for (f, v) in Fields::new(value) {
                                match (f?, v) {
                                    (1, Wire::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                                    (2, Wire::Fixed32(b)) => x = f32::from_le_bytes(b),
                                    _ => {}
                                }
                            }
                            values.push((tag, x));
                        }
                    }
                    ev.kind = EventKind::Scalars(values);
                }
                _ => {}
            }
        }
        Ok(ev)
    }
}

enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// A protobuf field iterator; an error ends the iteration.
struct Fields<'a> {
    data: &'a [u8],
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(data: &'a [u8]) -> Self {
        Fields { data, failed: false }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.data.split_first()?;
            self.data = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (Result<u32, String>, Wire<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.data.is_empty() {
            return None;
        }
        let parsed = (|| {
            let key = self.varint()?;
            let wire = match key & 7 {
                0 => Wire::Varint(self.varint()?),
                1 => Wire::Fixed64(self.take(8)?.try_into().ok()?),
                2 => {
                    let n = self.varint()? as usize;
                    Wire::Bytes(self.take(n)?)
                }
                5 => Wire::Fixed32(self.take(4)?.try_into().ok()?),
                _ => return None,
            };
            Some(((key >> 3) as u32, wire))
        })();
        match parsed {
            Some((f, w)) => Some((Ok(f), w)),
            None => {
                self.failed = true;
                Some((Err("truncated or unsupported protobuf field".into()), Wire::Varint(0)))
            }
        }
    }
}

/// Every record of an event file, CRCs checked. A torn last record (the writer died mid-write)
/// ends the list without an error, as TensorBoard's reader treats it.
pub fn read_events(path: &Path) -> Result<Vec<Event>, TrainError> {
    let data = fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bad =
        |at: usize, what: &str| TrainError::io(path, std::io::Error::other(format!("record at byte {at}: {what}")));
    let mut out = Vec::new();
    let mut at = 0;
    while at + 12 <= data.len() {
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err(bad(at, "length CRC mismatch"));
        }
        let start = at + 12;
        if start + len + 4 > data.len() {
            break;
        }
        let body = &data[start..start + len];
        let crc = u32::from_le_bytes(data[start + len..start + len + 4].try_into().expect("4 bytes"));
        if crc != masked_crc(body) {
            return Err(bad(at, "data CRC mismatch"));
        }
        out.push(Event::decode(body).map_err(|e| bad(at, &e))?);
        at = start + len + 4;
    }
    Ok(out)
}

/// Event files in `dir`, sorted by name.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(PREFIX)))
        .collect();
    v.sort();
    v
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Appends scalar events to one event file in a directory.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Opens the run's event file in `dir`. `resume_from: Some(step)` keeps the existing file's
    /// records up to `step` (rewritten atomically under the same name) and appends after them;
    /// `None` starts a new file and removes older ones, which belong to an abandoned attempt.
    pub fn open(dir: &Path, resume_from: Option<u64>) -> Result<Self, TrainError> {
        fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let existing = event_files(dir);
        if let (Some(step), Some(path)) = (resume_from, existing.last()) {
            if let Ok(events) = read_events(path) {
                let kept: Vec<u8> =
                    events.iter().filter(|e| e.step <= step as i64).flat_map(|e| frame(&e.encode())).collect();
                crate::util::fs::write_atomic(path, &kept).map_err(|e| TrainError::io(path, e))?;
                for old in &existing[..existing.len() - 1] {
                    let _ = fs::remove_file(old);
                }
                let file = OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io(path, e))?;
                return Ok(Self { path: path.clone(), file });
            }
        }
        for old in existing {
            let _ = fs::remove_file(old);
        }
        let secs = now() as u64;
        let path = dir.join(format!("{PREFIX}{secs}.{}.{}.0", hostname(), std::process::id()));
        let file = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut w = Self { path, file };
        w.write(&Event { wall_time: now(), step: 0, kind: EventKind::FileVersion(FILE_VERSION.into()) })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, e: &Event) -> Result<(), TrainError> {
        self.file.write_all(&frame(&e.encode())).map_err(|err| TrainError::io(&self.path, err))
    }

    /// One event holding the given scalars at `step`, stamped now. Non-finite values are kept
    /// (TensorBoard shows them), so a diverging loss is visible in the curve.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), TrainError> {
        let values = values.iter().map(|(t, v)| (t.to_string(), *v as f32)).collect();
        self.write(&Event { wall_time: now(), step: step as i64, kind: EventKind::Scalars(values) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn events_round_trip_through_the_framing() {
        let events = vec![
            Event { wall_time: 1.5, step: 0, kind: EventKind::FileVersion(FILE_VERSION.into()) },
            Event { wall_time: 2.25, step: 300, kind: EventKind::Scalars(vec![("train/loss".into(), 0.5)]) },
            Event {
                wall_time: 3.0,
                step: 1 << 40,
                kind: EventKind::Scalars(vec![("a".into(), -1.0), ("val/ndcg@10".into(), f32::INFINITY)]),
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.out.tfevents.1.h.1.0");
        let bytes: Vec<u8> = events.iter().flat_map(|e| frame(&e.encode())).collect();
        fs::write(&p, &bytes).unwrap();
        assert_eq!(read_events(&p).unwrap(), events);
        // A torn tail is dropped, a flipped bit is an error.
        fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_events(&p).unwrap().len(), 2);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        fs::write(&p, &bad).unwrap();
        assert!(read_events(&p).is_err());
    }

    #[test]
    fn resuming_keeps_steps_up_to_the_checkpoint_and_appends_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::open(dir.path(), None).unwrap();
        for s in 1..=5 {
            w.scalars(s, &[("train/loss", s as f64)]).unwrap();
        }
        drop(w);
        let mut w = EventWriter::open(dir.path(), Some(3)).unwrap();
        for s in 4..=6 {
            w.scalars(s, &[("train/loss", 10.0 * s as f64)]).unwrap();
        }
        let files = event_files(dir.path());
        assert_eq!(files.len(), 1);
        let events = read_events(&files[0]).unwrap();
        assert_eq!(events[0].kind, EventKind::FileVersion(FILE_VERSION.into()));
        let steps: Vec<i64> = events[1..].iter().map(|e| e.step).collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(events[4].kind, EventKind::Scalars(vec![("train/loss".into(), 40.0)]));
        // A fresh start replaces the old file.
        drop(w);
        let w = EventWriter::open(dir.path(), None).unwrap();
        assert_eq!(event_files(dir.path()), vec![w.path().to_path_buf()]);
        assert_eq!(read_events(w.path()).unwrap().len(), 1);
    }
}
