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

    /// Run [`child_reaches_the_test_point`] in a child process (this test binary again) with
    /// `COIN_FAULT` set to `spec` (unset for `None`) and `calls` calls of the point; returns
    /// whether the child survived, after checking that an abort is an abort.
    #[cfg(unix)]
    fn child_survives(spec: Option<&str>, calls: u32) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let exe = std::env::current_exe().expect("the test binary");
        let mut cmd = std::process::Command::new(exe);
        cmd.args([
            "--exact",
            "store::fault::tests::child_reaches_the_test_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, calls.to_string())
        .env_remove(ENV);
        if let Some(s) = spec {
            cmd.env(ENV, s);
        }
        let out = cmd.output().expect("the test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            // libtest's own summary: the child test ran to its end (past every point).
            assert!(
                stdout.contains("1 passed"),
                "the child did not run the point: {stdout}"
            );
            true
        } else {
            assert_eq!(
                out.status.signal(),
                Some(6),
                "a selected point aborts (SIGABRT), it does not fail otherwise: {out:?}"
            );
            assert!(!stdout.contains("1 passed"), "{stdout}");
            false
        }
    }

    /// Set in the child process: how many times to reach the point.
    const CHILD: &str = "COIN_FAULT_TEST_CHILD";

    /// Does nothing unless run as the child of the tests below.
    #[test]
    fn child_reaches_the_test_point() {
        let Some(calls) = std::env::var(CHILD)
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return;
        };
        for _ in 0..calls {
            point("store.test.point");
        }
    }

    #[test]
    #[cfg(unix)]
    fn unselected_points_do_nothing() {
        assert!(child_survives(None, 3), "no COIN_FAULT");
        assert!(child_survives(Some("store.test.other"), 3), "another point");
        assert!(child_survives(Some(""), 3), "an empty spec");
        assert!(
            child_survives(Some("store.test.point:4"), 3),
            "the 4th hit of a point reached 3 times"
        );
    }

    #[test]
    #[cfg(unix)]
    fn a_selected_point_aborts_on_its_nth_hit() {
        assert!(!child_survives(Some("store.test.point"), 1), "first hit");
        assert!(!child_survives(Some("store.test.point:3"), 3), "third hit");
    }
}
