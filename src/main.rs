//! The `coin` binary: a thin shell around [`coin::cli::main`], which, for a command that runs
//! the model, first applies the resolved `[runtime]` thread counts to the process (candle reads
//! them only from its environment variables; set there once, before any thread exists).

/// mimalloc keeps freed pages for reuse: candle allocates a fresh buffer for every tensor op,
/// and with glibc's allocator large buffers went back to the kernel and faulted in again on the
/// next op (about a quarter of a small model's training step; docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coin::cli::main()
}
