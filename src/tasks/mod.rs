//! Tasks: CoIN data formats, instruction templates, scorers, the LLM judge, CoIN-mini.
//! Core module: no terminal I/O, no ML engine.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
