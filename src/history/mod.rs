//! Checkpoint history on git (git2): commits, coin refs, notes, manifests, revisions, diff.
//! Core module: no terminal I/O, no ML engine.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
