//! The `coin` binary: a thin shell around [`coin::cli::main`].

fn main() -> std::process::ExitCode {
    coin::cli::main()
}
