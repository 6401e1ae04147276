use std::process::ExitCode;

/// Tokenization (and much of the data handling) allocates many small short-lived buffers on rayon
/// threads, where glibc's malloc spends about half the tokenize stage's time; mimalloc halves its
/// CPU time (see benches/tokenize.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let registry = pipe::stages::registry();
    pipe::cli::main_with(&registry)
}
