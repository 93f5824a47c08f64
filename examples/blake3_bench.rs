//! The reference costs `bench/store.sh` compares coin's commit and checkout with (the durable
//! floor). Not part of the `coin` binary.
//!
//! ```text
//! cargo run --release --example blake3_bench -- FILE [--write BYTES DIR]...
//! ```
//!
//! Hashes FILE with blake3 twice: from a memory map with all threads (`update_mmap_rayon`) and
//! read in 64 MiB chunks, each hashed with all threads. Each `--write BYTES DIR` then times
//! writing BYTES (random, from memory) to a new file in DIR plus its fsync, and deletes the file.
//! Prints `{"bytes", "hash_mmap_s", "hash_read_s", "hash", "writes": [{"bytes", "seconds"}]}`
//! (pretty-printed JSON) on stdout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

fn hash_read(path: &PathBuf) -> std::io::Result<(u64, f64, String)> {
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
    Ok((total, seconds, h.finalize().to_hex().to_string()))
}

fn hash_mmap(path: &PathBuf) -> std::io::Result<(f64, String)> {
    let start = Instant::now();
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)?;
    let hash = h.finalize().to_hex().to_string();
    Ok((start.elapsed().as_secs_f64(), hash))
}

/// Write `bytes` of random data (generated before the clock starts) to a new file in `dir`,
/// fsync it, return the seconds; the file is removed afterwards. A plain create + write +
/// fsync on purpose: this scratch file is the floor coin's atomic writes are compared with.
#[allow(clippy::disallowed_methods)]
fn write_fsync(bytes: u64, dir: &Path) -> std::io::Result<f64> {
    let mut data = vec![0u8; bytes as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let path = dir.join(format!(".blake3-bench-{}", std::process::id()));
    let start = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    f.write_all(&data)?;
    f.sync_all()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(seconds)
}

fn run(path: &PathBuf, writes: &[(u64, PathBuf)]) -> std::io::Result<serde_json::Value> {
    let (bytes, hash_read_s, hash) = hash_read(path)?;
    let (hash_mmap_s, hash2) = hash_mmap(path)?;
    if hash != hash2 {
        return Err(std::io::Error::other("the two hashes of the file differ"));
    }
    let mut out = Vec::new();
    for (n, dir) in writes {
        let seconds = write_fsync(*n, dir)?;
        out.push(serde_json::json!({"bytes": n, "seconds": seconds}));
    }
    Ok(serde_json::json!({
        "bytes": bytes, "hash_mmap_s": hash_mmap_s, "hash_read_s": hash_read_s,
        "hash": hash, "writes": out,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!("usage: blake3_bench FILE [--write BYTES DIR]...");
        ExitCode::from(2)
    };
    let Some((file, mut rest)) = args.split_first() else {
        return usage();
    };
    let mut writes = Vec::new();
    while let [flag, bytes, dir, tail @ ..] = rest {
        let Ok(n) = bytes.parse::<u64>() else {
            return usage();
        };
        if flag != "--write" {
            return usage();
        }
        writes.push((n, PathBuf::from(dir)));
        rest = tail;
    }
    if !rest.is_empty() {
        return usage();
    }
    let path = PathBuf::from(file);
    match run(&path, &writes).and_then(|v| Ok(serde_json::to_string_pretty(&v)?)) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: could not measure '{}': {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
