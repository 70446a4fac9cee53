//! Replays the fuzzers' inputs through the same entry points the fuzz targets call
//! (`teleport_net::fuzzing`), deterministically, in `cargo test`:
//! - `fuzz/seeds/<target>/`: valid inputs, made by `fuzzing::seeds`; each must be accepted.
//!   `TELEPORT_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_corpus` rewrites them.
//! - `fuzz/corpus/<target>/`: the minimized corpus the fuzzers built (`scripts/fuzz.sh`).
//! - `fuzz/regressions/<target>/`: inputs that once made a target fail, kept once fixed (none
//!   so far: the runs in BENCHMARKS.md found nothing); the fuzzers start from them too.
//!
//! Every input must return (a panic fails the test), give the same outcome twice,
//! and what it parses must survive a write and a re-read.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use teleport_net::fuzzing::{self, Accepted, CLIENT_NODE, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// (file name, contents) of every file in `fuzz/<kind>/<target>`, sorted by name;
/// none if the directory is missing (the callers check the counts they need).
fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, fs::read(&path).expect("readable input"))
        })
        .collect();
    files.sort();
    files
}

/// Runs `input` through `target`'s entry point and checks what is knowable: an
/// accepted handshake is the one client our cookie lets in, a term read is the term
/// its own encoding reads as, and the same input gives the same outcome twice.
/// Returns the outcome, printed, for the callers' own expectations.
fn replay(target: &str, input: &[u8], what: &str) -> String {
    match target {
        "handshake" => {
            // The client's proof covers its node name: with our cookie, only that name gets in.
            if let Ok(Accepted::Server(name)) = fuzzing::handshake(input) {
                assert_eq!(name, CLIENT_NODE, "{what}: accepted another client");
            }
        }
        "frames" => fuzzing::frames(input)
            .terms
            .iter()
            .for_each(|term| common::assert_round_trip(term, what)),
        "etf_read" => {
            if let Ok(value) = fuzzing::etf_read(input) {
                common::assert_round_trip(&value, what);
            }
        }
        other => panic!("unknown target {other}"),
    }
    let first = outcome(target, input);
    assert_eq!(first, outcome(target, input), "{what}: not deterministic");
    first
}

fn outcome(target: &str, input: &[u8]) -> String {
    match target {
        "handshake" => format!("{:?}", fuzzing::handshake(input).map_err(|e| e.reason())),
        "frames" => format!("{:?}", fuzzing::frames(input)),
        _ => format!("{:?}", fuzzing::etf_read(input)),
    }
}

#[test]
fn seeds_are_accepted_and_committed() {
    let write = std::env::var_os("TELEPORT_WRITE_FUZZ_SEEDS").is_some();
    for target in TARGETS {
        let seeds = fuzzing::seeds(target);
        assert!(seeds.len() >= 2, "{target}: too few seeds");
        for (name, bytes) in &seeds {
            let what = format!("seed {target}/{name}");
            let outcome = replay(target, bytes, &what);
            match target {
                "handshake" => assert!(
                    outcome == format!("Ok({:?})", Accepted::Server(CLIENT_NODE.into()))
                        || outcome == format!("Ok({:?})", Accepted::Client),
                    "{what}: {outcome}"
                ),
                "frames" => assert!(fuzzing::frames(bytes).end.is_ok(), "{what}: {outcome}"),
                _ => assert!(outcome.starts_with("Ok("), "{what}: {outcome}"),
            }
            let path = fuzz_dir().join("seeds").join(target).join(name);
            if write {
                fs::create_dir_all(path.parent().expect("seed directory")).expect("seed directory");
                fs::write(&path, bytes).expect("seed written");
            }
            let committed = fs::read(&path).unwrap_or_default();
            assert!(
                committed == *bytes,
                "{}: differs from fuzzing::seeds; rerun with TELEPORT_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
        let committed = inputs("seeds", target).len();
        assert_eq!(committed, seeds.len(), "{target}: stale files in fuzz/seeds");
    }
    // Both sides of the handshake are seeded, and the frames seed carries terms.
    let handshake: Vec<String> = fuzzing::seeds("handshake")
        .iter()
        .map(|(_, bytes)| outcome("handshake", bytes))
        .collect();
    assert!(handshake.iter().any(|o| o.contains("Server")) && handshake.iter().any(|o| o.contains("Client")));
    let most = fuzzing::seeds("frames")
        .iter()
        .map(|(_, b)| fuzzing::frames(b).terms.len())
        .max();
    assert!(most >= Some(10), "{most:?}");
}

#[test]
fn corpus_replays() {
    for target in TARGETS {
        let corpus = inputs("corpus", target);
        assert!(
            corpus.len() >= 10,
            "{target}: corpus has only {} files",
            corpus.len()
        );
        let mut classes = std::collections::BTreeMap::new();
        for (name, bytes) in &corpus {
            let outcome = replay(target, bytes, &format!("corpus {target}/{name}"));
            *classes.entry(outcome_class(&outcome)).or_insert(0) += 1;
        }
        for (name, bytes) in inputs("regressions", target) {
            replay(target, &bytes, &format!("regression {target}/{name}"));
        }
        println!("{target}: {} corpus inputs: {classes:?}", corpus.len());
        // The corpus reaches past the first checks: inputs end in many different ways,
        // and (for the term parsers, whose seeds the fuzzer mutates into new valid terms)
        // some get all the way through.
        assert!(classes.len() >= 5, "{target}: {classes:?}");
        if target != "handshake" {
            assert!(classes.contains_key("accepted"), "{target}: {classes:?}");
        }
    }
}

/// "accepted", or the kind of error (its variant name, and a frame error's name).
fn outcome_class(outcome: &str) -> String {
    if outcome.starts_with("Ok(") || outcome.contains("end: Ok") {
        return "accepted".to_string();
    }
    let error = outcome.rsplit("Err(").next().unwrap_or(outcome);
    let error = error.trim_start_matches('"');
    if let Some(name) = error.strip_prefix("bad_frame: ") {
        let name: String = name
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return format!("bad_frame: {name}");
    }
    error
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ' '))
        .next()
        .unwrap_or("")
        .split(" at byte")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}
