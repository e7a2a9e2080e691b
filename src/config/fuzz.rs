//! Hostile input for the configuration parser: arbitrary text, and the shipped examples
//! (`config/*.toml`) mutated, through `Config::parse`. The property is the same for all: no
//! panic, and either a `Config` that holds the resolved invariants or an error that renders.
//! Inputs that once failed are kept below as plain regression tests.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("fuzz.toml"), text)
}

/// Ok or a clean error: the error renders, the configuration keeps what `Config` promises.
fn check(text: &str) {
    match parse(text) {
        Ok(c) => {
            assert!(!c.clusters.is_empty() && !c.listeners.is_empty());
            for cl in &c.clusters {
                assert!(cl.namespace.starts_with('/') && cl.namespace.ends_with('/'), "{:?}", cl.namespace);
                assert!(!cl.endpoints.is_empty());
            }
            for l in &c.listeners {
                assert!(c.clusters.iter().any(|cl| cl.name == l.cluster), "{} has no cluster", l.name);
                assert!(l.maxconn > 0 && l.server_maxconn > 0 && !l.connect_timeout.is_zero());
            }
            // Every duration can be added to a clock reading: the tasks do so without checks.
            let now = tokio::time::Instant::now();
            let mut durations = Vec::new();
            for cl in &c.clusters {
                durations.extend([cl.etcd_timeout, cl.resync_interval, cl.confirm_interval]);
            }
            for l in &c.listeners {
                durations.extend([l.queue_timeout, l.connect_timeout, l.drain_grace]);
                durations.extend(l.tcp_keepalive);
            }
            for v in &c.vips {
                durations.extend([v.advert_interval, v.preempt_delay, v.garp_interval]);
                durations.extend([v.unhealthy_after, v.healthy_after]);
                durations.extend(v.garp_refresh);
                if let Election::Etcd { ttl, .. } = &v.election {
                    durations.push(*ttl);
                }
            }
            for d in durations {
                assert!(d <= file::MAX_DURATION && now.checked_add(d).is_some(), "{d:?}");
            }
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with("fuzz.toml"), "{s}");
        }
    }
}

/// The examples shipped in `config/`, read at test time so that a new example is fuzzed too.
fn examples() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .expect("config/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("example is readable");
            (p, text)
        })
        // The agent's example has its own parser (fuzzed below).
        .filter(|(_, text)| !agent::looks_like_agent(text))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no example in {}", dir.display());
    v
}

/// An agent configuration parsed from hostile text: Ok with its invariants, or an error that
/// renders on one line naming the file.
fn check_agent(text: &str) {
    match agent::AgentConfig::parse(Path::new("fuzz.toml"), text) {
        Ok(c) => {
            assert!(c.ttl.as_secs() >= 2 && !c.lsn_interval.is_zero());
            assert!(!c.postgres.interval.is_zero() && c.postgres.fast_interval <= c.postgres.interval);
            assert!(c.prefix().starts_with('/') && c.prefix().ends_with('/'));
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with("fuzz.toml") && s.lines().count() == 1, "{s}");
        }
    }
}

#[test]
fn mutated_agent_example_never_panics() {
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
    let example = std::fs::read_to_string(&path).expect("config/agent.toml");
    check_agent(&example);
    let config = RunnerConfig { cases: cases(1000), failure_persistence: None, ..RunnerConfig::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(mutation(), 1..6), |muts| {
        let mut t = example.clone();
        for m in &muts {
            t = apply(&t, m);
        }
        check_agent(&t);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Pieces of TOML and of the values pgfront expects, so mutations reach past the tokenizer
/// into validation.
const TOKENS: &[&str] = &[
    "[[cluster]]\n",
    "[[listener]]\n",
    "[[vip]]\n",
    "[admin]\n",
    "[cluster]\n",
    "=",
    "\"",
    "'",
    "\"\"\"",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "#",
    "\n",
    "\\",
    "\\u0000",
    "0",
    "-1",
    "4294967296",
    "18446744073709551616",
    "1e400",
    "nan",
    "inf",
    "true",
    "\"0s\"",
    "\"1ns\"",
    "\"18446744073709551615s\"",
    "\"9999999999999999999999h\"",
    "\"584942417355y\"",
    "\"366d\"",
    "\"16MB\"",
    "\"99999999999EiB\"",
    "\"\"",
    "\"main\"",
    "\"replica\"",
    "\"read-only\"",
    "\"etcd\"",
    "\"v2\"",
    "\"http://[::1]:2379\"",
    "\"https://h:0\"",
    "\"http://u:p@h:1\"",
    "\"http://h:99999\"",
    "\"0.0.0.0:5432\"",
    "\"[::]:0\"",
    "\"10.0.0.10/33\"",
    "\"::1/128\"",
    "\"/dev/null\"",
    "\"/dev/zero\"",
    "\"\u{e9}\u{1F600}\"",
    "1979-05-27T07:32:00Z",
    "name = ",
    "password = ",
    "version = 2\n",
    "auth_pass = \"123456789\"\n",
    "election = \"etcd\"\n",
    "etcd_cluster = \"main\"\n",
    "vrid = 0\n",
    "backlog = 2147483648\n",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Delete `len` bytes at `at` (positions are taken modulo the text's length).
    Delete {
        at: usize,
        len: usize,
    },
    Insert {
        at: usize,
        piece: String,
    },
    /// Replace what follows the `=` of some line.
    Value {
        line: usize,
        piece: String,
    },
    DuplicateLine {
        line: usize,
    },
    SwapLines {
        a: usize,
        b: usize,
    },
    Truncate {
        at: usize,
    },
}

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(TOKENS).prop_map(str::to_owned),
        1 => any::<String>(),
        1 => "[ -~\n]{0,12}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), piece()).prop_map(|(at, piece)| Mutation::Insert { at, piece }),
        (any::<usize>(), piece()).prop_map(|(line, piece)| Mutation::Value { line, piece }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// A char boundary of `s` derived from `at`.
fn boundary(s: &str, at: usize) -> usize {
    floor_char_boundary(s, at % (s.len() + 1))
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut s = text.to_owned();
    let mut lines = |f: &mut dyn FnMut(&mut Vec<String>)| {
        let mut v: Vec<String> = s.split('\n').map(str::to_owned).collect();
        f(&mut v);
        s = v.join("\n");
    };
    match m {
        Mutation::Delete { at, len } => {
            let a = boundary(text, *at);
            let b = floor_char_boundary(text, a + len);
            s.replace_range(a..b.max(a), "");
        }
        Mutation::Insert { at, piece } => s.insert_str(boundary(text, *at), piece),
        Mutation::Value { line, piece } => lines(&mut |v| {
            let with_value: Vec<usize> = (0..v.len()).filter(|&i| v[i].contains('=')).collect();
            if let Some(&i) = with_value.get(line % with_value.len().max(1)) {
                let key = v[i].split('=').next().unwrap_or_default().to_owned();
                v[i] = format!("{key}= {piece}");
            }
        }),
        Mutation::DuplicateLine { line } => lines(&mut |v| {
            let i = line % v.len();
            let l = v[i].clone();
            v.insert(i, l);
        }),
        Mutation::SwapLines { a, b } => lines(&mut |v| {
            let n = v.len();
            v.swap(a % n, b % n);
        }),
        Mutation::Truncate { at } => s.truncate(boundary(text, *at)),
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        check(&text);
        check_agent(&text);
    }

    #[test]
    fn toml_shaped_text_never_panics(text in "([a-z_]{1,10} = |\\[\\[?[a-z]{1,8}\\]\\]?\n|[\"'\\[\\]{},.=#:/0-9a-z \n-]){0,60}") {
        check(&text);
    }
}

/// `PGFRONT_FUZZ_CASES=200000` for a longer hunt; the suite's default is a few thousand.
fn cases(default: u32) -> u32 {
    std::env::var("PGFRONT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn mutated_examples_never_panic() {
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    let ex = examples();
    let config = RunnerConfig { cases: cases(4000), failure_persistence: None, ..RunnerConfig::default() };
    let mut runner = TestRunner::new(config);
    let (ok, parse_err, invalid) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    let strategy = (any::<usize>(), proptest::collection::vec(mutation(), 1..6));
    let result = runner.run(&strategy, |(which, muts)| {
        let mut t = ex[which % ex.len()].1.clone();
        for m in &muts {
            t = apply(&t, m);
        }
        check(&t);
        let n = match parse(&t) {
            Ok(_) => &ok,
            Err(ConfigError::Parse { .. } | ConfigError::Syntax { .. }) => &parse_err,
            Err(_) => &invalid,
        };
        n.set(n.get() + 1);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (ok, parse_err, invalid) = (ok.get(), parse_err.get(), invalid.get());
    eprintln!("mutated examples: {ok} valid, {parse_err} parse errors, {invalid} validation errors");
    // Not vacuous: the mutations reach the tokenizer, serde and the validation.
    assert!(ok > 0 && parse_err > 0 && invalid > 0, "{ok} {parse_err} {invalid}");
}

#[test]
fn every_example_is_valid_and_the_mutator_keeps_it_unchanged_without_mutations() {
    for (path, text) in examples() {
        Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(apply(&text, &Mutation::SwapLines { a: 3, b: 3 }), text);
    }
}

/// Deep nesting is the classic way to overflow a recursive-descent parser's stack.
#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [1_000, 100_000] {
        for (open, close) in [("[", "]"), ("{a=", "}")] {
            let text = format!("{MINIMAL_HEAD}x = {}1{}\n", open.repeat(depth), close.repeat(depth));
            check(&text);
        }
        check(&"[".repeat(depth));
        check(&format!("{}=1", "a.".repeat(depth)));
    }
}

const MINIMAL_HEAD: &str = "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://h:1\"]\n";

/// Seen in `proxy/session.rs` (`Instant::now() + queue_timeout` in every client task) and then
/// checked by the property of `check`, which finds it again within the default case count when
/// the bound is removed: humantime accepts up to 2^64 s, and adding that to an `Instant` panics.
#[test]
fn regression_durations_that_overflow_a_clock_are_refused() {
    let listener = "[[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:5432\"\n";
    for field in ["queue_timeout", "drain_grace", "connect_timeout", "tcp_keepalive"] {
        for value in ["18446744073709551615s", "584942417355y", "366d"] {
            let text = format!("{MINIMAL_HEAD}{listener}{field} = \"{value}\"\n");
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains("longer than a year") || e.contains("too large"), "{e}");
        }
        parse(&format!("{MINIMAL_HEAD}{listener}{field} = \"365d\"\n")).unwrap();
    }
}
