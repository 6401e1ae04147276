//! Hashing throughput of the engine's file hasher (the one cache keys use), on a 1 GiB file.
//! Run: `cargo bench --bench hash` (PIPE_BENCH_HASH_MB overrides the size in MiB).

use std::io::Write;
use std::time::Instant;

fn main() {
    let mb: usize = std::env::var("PIPE_BENCH_HASH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("big.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
        let mut block = vec![0u8; 1 << 20];
        for i in 0..mb {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (i.wrapping_mul(31).wrapping_add(j.wrapping_mul(7))) as u8;
            }
            f.write_all(&block).expect("write");
        }
    }
    // Warm the page cache, then take the best of three (the cache is what a re-run of `pipe status` sees).
    let _ = pipe::engine::hashing::hash_file(&path).expect("hash");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let h = pipe::engine::hashing::hash_file(&path).expect("hash");
        std::hint::black_box(h);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gb = mb as f64 / 1024.0;
    println!(
        "hash: {mb} MiB in {best:.3} s = {:.2} GiB/s (best of 3, warm page cache, {} threads)",
        gb / best,
        rayon::current_num_threads()
    );
}
