//! Figures and parameters shared by the benches (they include `tests/common` by `#[path]`):
//! the median and the "median [min–max]" text of a set of rounds, and the way every bench reads
//! its options, `--flag VALUE` / `--flag=VALUE` first, then an environment variable, then a
//! default (a smaller one under `--quick` / `PGFRONT_BENCH_QUICK=1`).
//!
//! Invariant: an option that is set but unreadable stops the bench with its flag and variable
//! named, never falls back to the default silently (a figure measured with the wrong setting
//! is worse than none).

use std::str::FromStr;

/// The median of `v` (the mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// "median [min–max]" of `v` with `prec` decimals; "—" when empty (every round aborted).
pub fn spread(v: &[f64], prec: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.prec$} [{lo:.prec$}–{hi:.prec$}]", median(v))
}

/// As many decimals as a figure of the size of `m` calls for: 0 from 100, 1 from 10, else 2.
pub fn decimals(m: f64) -> usize {
    if m.abs() >= 100.0 {
        0
    } else if m.abs() >= 10.0 {
        1
    } else {
        2
    }
}

/// `name` from the environment parsed, or `default` when unset or unreadable (the benches'
/// older knobs such as `BENCH_RUNS`, documented with their defaults).
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The bench's command line (what `cargo bench --bench X -- ARGS` passes) and its quick mode.
pub struct BenchArgs {
    args: Vec<String>,
    /// `--quick` or `PGFRONT_BENCH_QUICK` set (not "0"): the one-round smoke run.
    pub quick: bool,
}

impl BenchArgs {
    pub fn from_env() -> BenchArgs {
        let args: Vec<String> = std::env::args().collect();
        let quick = args.iter().any(|a| a == "--quick")
            || std::env::var("PGFRONT_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        BenchArgs { args, quick }
    }

    /// Whether cargo runs this as a bench (`cargo bench` passes `--bench`; `cargo test` does
    /// not, and a bench run by `cargo test --benches` must not take minutes).
    pub fn bench_requested(&self) -> bool {
        self.has("--bench")
    }

    /// Whether the bare `flag` is on the command line.
    pub fn has(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }

    /// The value of `flag` (`--flag VALUE` or `--flag=VALUE`), else of the variable `env`.
    pub fn get(&self, flag: &str, env: &str) -> Option<String> {
        let eq = format!("{flag}=");
        self.args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.args.get(i + 1).cloned())
            .or_else(|| self.args.iter().find_map(|a| a.strip_prefix(&eq).map(str::to_owned)))
            .or_else(|| std::env::var(env).ok())
    }

    /// A number from `flag`/`env`; `full` by default, `quick_default` in quick mode.
    pub fn num(&self, flag: &str, env: &str, full: u64, quick_default: u64) -> u64 {
        match self.get(flag, env) {
            Some(v) => v.parse().unwrap_or_else(|_| panic!("{flag} / {env}: not a number: {v}")),
            None if self.quick => quick_default,
            None => full,
        }
    }

    /// A comma-separated list from `flag`/`env`, blanks dropped.
    pub fn list(&self, flag: &str, env: &str) -> Option<Vec<String>> {
        self.get(flag, env).map(|l| l.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
    }
}

#[cfg(test)]
mod tests {
    // A bench (harness = false) built for test compiles this module without running it.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(spread(&[0.25, 0.5, 0.125], 2), "0.25 [0.12–0.50]");
        assert_eq!(spread(&[7.0], 0), "7 [7–7]");
        assert_eq!(spread(&[], 1), "—");
        assert_eq!((decimals(250.0), decimals(12.0), decimals(-3.0)), (0, 1, 2));
    }

    #[test]
    fn flags_then_environment() {
        let a = BenchArgs {
            args: ["bench", "--rounds", "3", "--modes=a,,b ", "--quick"].map(str::to_owned).to_vec(),
            quick: true,
        };
        assert_eq!(a.num("--rounds", "PGFRONT_TEST_UNSET_ROUNDS", 5, 1), 3);
        assert_eq!(a.num("--secs", "PGFRONT_TEST_UNSET_SECS", 10, 2), 2);
        assert_eq!(a.list("--modes", "PGFRONT_TEST_UNSET_MODES"), Some(vec!["a".to_owned(), "b".to_owned()]));
        assert!(a.has("--quick") && !a.bench_requested());
    }
}
