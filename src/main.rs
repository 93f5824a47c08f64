//! The `coin` binary: a thin shell around [`coin::cli::main`].

/// mimalloc keeps freed pages for reuse: candle allocates a fresh buffer for every tensor op,
/// and with glibc's allocator large buffers went back to the kernel and faulted in again on the
/// next op (about a quarter of a small model's training step; docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coin::cli::main()
}
