//! Time blake3 (rayon, all threads) over a file read in 64 MiB chunks, without storing it: the
//! reference speed `bench/store.sh` compares coin's ingest with. Not part of the `coin` binary.
//!
//! ```text
//! cargo run --release --example blake3_bench -- FILE
//! ```
//!
//! Prints `{"bytes", "seconds", "hash"}` (pretty-printed JSON) on stdout.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn run(path: &PathBuf) -> std::io::Result<serde_json::Value> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; len.clamp(1, 64 * 1024 * 1024) as usize];
    let mut h = blake3::Hasher::new();
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = f.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        h.update_rayon(&buf[..n]);
        total += n as u64;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "bytes": total, "seconds": seconds, "hash": h.finalize().to_hex().as_str(),
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file] = args.as_slice() else {
        eprintln!("usage: blake3_bench FILE");
        return ExitCode::from(2);
    };
    let path = PathBuf::from(file);
    match run(&path).and_then(|v| Ok(serde_json::to_string_pretty(&v)?)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: could not hash '{}': {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
