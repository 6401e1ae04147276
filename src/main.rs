use std::process::ExitCode;

fn main() -> ExitCode {
    let registry = pipe::stages::registry();
    pipe::cli::main_with(&registry)
}
