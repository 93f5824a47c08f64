//! Fault injection for crash tests: [`point`] aborts the process (no unwinding, no cleanup,
//! like a `kill -9` at that line) when the environment variable `COIN_FAULT` names it.
//!
//! `COIN_FAULT=name` aborts the first time `point("name")` is reached; `COIN_FAULT=name:N`
//! the N-th time (N ≥ 1). Without `COIN_FAULT` a point costs one atomic load.
//! Points of the store are listed in docs/on-disk-format.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable read once per process.
pub const ENV: &str = "COIN_FAULT";

static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn parse(spec: &str) -> Option<(String, u64)> {
    let spec = spec.trim();
    if spec.is_empty() {
        return None;
    }
    match spec.rsplit_once(':') {
        Some((name, n)) => match n.parse::<u64>() {
            Ok(n) if n >= 1 => Some((name.to_string(), n)),
            _ => Some((spec.to_string(), 1)),
        },
        None => Some((spec.to_string(), 1)),
    }
}

/// A named crash point: aborts the process here when `COIN_FAULT` selects it.
pub fn point(name: &str) {
    let spec = SPEC.get_or_init(|| std::env::var(ENV).ok().and_then(|s| parse(&s)));
    if let Some((target, nth)) = spec {
        if target == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("a.b"), Some(("a.b".into(), 1)));
        assert_eq!(parse("a.b:3"), Some(("a.b".into(), 3)));
        assert_eq!(parse("a.b:0"), Some(("a.b:0".into(), 1)));
        assert_eq!(parse("a:b"), Some(("a:b".into(), 1)));
    }

    #[test]
    fn unselected_points_do_nothing() {
        // The test process has no COIN_FAULT naming this point.
        point("store.test.never-selected");
    }
}
