//! Content-addressed object store: blake3 tensor and blob objects, the safetensors codec,
//! atomic file writes and locks. Core module: no terminal I/O, no ML engine.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod fsutil;
