//! Tokenize throughput on the full Home Depot train set (74,067 pairs): pipe's prompt encoder, the
//! same code the tokenize stage runs (rayon over chunks of pairs), timed from strings to prompt ids.
//!
//! Run through `benches/tokenize.sh`, which also runs the Python `tokenizers` side
//! (`benches/tokenize_python.py`) on the same prompts and checks that both produce identical ids.
//!
//! `cargo bench --bench tokenize -- [--data DIR] [--ids FILE] [--repeat N]`
//! DIR defaults to ../shared/data/home_depot; FILE receives every prompt's ids (u32 LE, each
//! sequence preceded by its length) for the comparison.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

/// The same allocator as the `pipe` binary (src/main.rs), so that this measures what the stage does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use pipe::text::tokenizer::builtin_qwen3;
use pipe::text::{PromptConfig, PromptEncoder};

struct Pair {
    query: String,
    title: String,
    description: String,
}

/// Latin-1 bytes → text, byte for byte like Python's `latin-1` codec (not windows-1252).
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

fn gz_csv(path: &Path) -> csv::Reader<Box<dyn Read>> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r: Box<dyn Read> = Box::new(BufReader::new(flate2::read::GzDecoder::new(f)));
    csv::ReaderBuilder::new().from_reader(r)
}

fn load(dir: &Path) -> Vec<Pair> {
    let mut descs = std::collections::HashMap::new();
    let mut rdr = gz_csv(&dir.join("product_descriptions_prefix_100001-101387.csv.gz"));
    for rec in rdr.byte_records() {
        let rec = rec.unwrap();
        descs.insert(latin1(&rec[0]), latin1(&rec[1]));
    }
    let mut rdr = gz_csv(&dir.join("train.csv.gz"));
    let h = rdr.byte_headers().unwrap().clone();
    let col = |name: &str| h.iter().position(|c| c == name.as_bytes()).unwrap();
    let (uid, title, query) = (col("product_uid"), col("product_title"), col("search_term"));
    rdr.byte_records()
        .map(|rec| {
            let rec = rec.unwrap();
            Pair {
                query: latin1(&rec[query]),
                title: latin1(&rec[title]),
                description: descs.get(&latin1(&rec[uid])).cloned().unwrap_or_default(),
            }
        })
        .collect()
}

/// CPU seconds used by this process so far (user + system), from /proc; 0 where there is none.
/// Reported beside wall time because the machine may be shared: CPU time is what load hides least.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split(' ').map(|x| x.parse().unwrap_or(0.0)).collect();
    if f.len() < 13 {
        return 0.0;
    }
    (f[11] + f[12]) / 100.0 // USER_HZ is 100 on Linux
}

/// Encode every pair `repeat` times (chunks of 256 on the rayon pool, like the stage); best time.
fn time_runs(label: &str, encoder: &PromptEncoder, pairs: &[Pair], repeat: usize) -> (f64, Vec<Vec<u32>>) {
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for run in 1..=repeat {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        out = pairs
            .par_chunks(256)
            .flat_map_iter(|chunk| {
                chunk.iter().map(|p| encoder.encode_pair(&p.query, &p.title, &p.description).unwrap().ids)
            })
            .collect();
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        best = best.min(secs);
        println!(
            "{label} run {run}: {secs:.3} s, {:.0} pairs/s (cpu {cpu:.2} s, {:.0} pairs per cpu-second)",
            pairs.len() as f64 / secs,
            pairs.len() as f64 / cpu
        );
    }
    (best, out)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut data = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/home_depot"));
    let mut ids_out = None;
    let mut repeat = 3usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => data = PathBuf::from(args.next().expect("--data DIR")),
            "--ids" => ids_out = Some(PathBuf::from(args.next().expect("--ids FILE"))),
            "--repeat" => repeat = args.next().expect("--repeat N").parse().expect("a number"),
            _ => {} // cargo passes --bench
        }
    }
    if !data.join("train.csv.gz").exists() {
        println!("skipped: {} not found (the full Home Depot data lives in ../shared)", data.display());
        return;
    }
    let pairs = load(&data);
    let with_desc = pairs.iter().filter(|p| !p.description.is_empty()).count();
    let encoder = PromptEncoder::new(builtin_qwen3().unwrap(), PromptConfig::default()).unwrap();
    println!("rust: {} pairs ({with_desc} with a description), {} threads", pairs.len(), rayon::current_num_threads());

    // The encoder as the tokenize stage uses it, and the same without reusing the instruction's ids
    // (every body encoded whole, like the Python side does).
    let plain = encoder.clone().without_shortcut();
    println!("rust: instruction shortcut available: {}", encoder.uses_shortcut());
    let (best, out) = time_runs("rust", &encoder, &pairs, repeat);
    let (best_plain, out_plain) = time_runs("rust (whole bodies)", &plain, &pairs, repeat);
    assert!(out == out_plain, "the shortcut changed some ids");
    let tokens: usize = out.iter().map(Vec::len).sum();
    println!("rust tokens: {tokens}");
    println!("RESULT rust_pairs_per_s={:.1}", pairs.len() as f64 / best);
    println!("RESULT rust_whole_bodies_pairs_per_s={:.1}", pairs.len() as f64 / best_plain);

    if let Some(path) = ids_out {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for ids in &out {
            w.write_all(&(ids.len() as u32).to_le_bytes()).unwrap();
            for id in ids {
                w.write_all(&id.to_le_bytes()).unwrap();
            }
        }
        w.flush().unwrap();
    }
}
