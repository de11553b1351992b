//! The fuzz targets (`cllm::fuzz_targets`) on stable Rust, as CI runs them: every input of the
//! committed corpus (`fuzz/corpus/<target>/`, grown by `cargo fuzz`), then mutations of those
//! inputs for a few seconds per target (`CLLM_FUZZ_SECS`, default 3). An input that panics is
//! written to `target/fuzz-failures/` and named in the failure, ready to add to the corpus.

mod common;

use common::rng::Rng;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = common::repo_root().join("fuzz/corpus").join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus file");
            (p, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

/// Runs `target` on `input`; on a panic, saves the input and names it in the error.
fn run_one(name: &str, target: fn(&[u8]), input: &[u8], origin: &str) -> Result<(), String> {
    let Err(panic) = std::panic::catch_unwind(|| target(input)) else {
        return Ok(());
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    let dir = common::repo_root().join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let hash = input.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&path, input).expect("save the failing input");
    Err(format!(
        "{name} panicked on {origin} ({message}); input saved to {}",
        path.display()
    ))
}

/// Bytes that tend to matter to parsers.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\n",
    b"\r\n",
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"-1",
    b"0",
    b"1e308",
    b"18446744073709551615",
    b"null",
    b"true",
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x00\x00\x00\x00\x00\x00\x00\x80",
    b"data:",
    b"\xe2\x80\xae",
    b"~",
    b"- ",
];

/// One to four random edits of `input`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.index(out.len() + 1)
        };
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.index(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.index(out.len());
                out[i] = rng.below(256) as u8;
            }
            2 => {
                let end = (at + 1 + rng.index(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 => {
                let piece = rng.pick(INTERESTING);
                out.splice(at..at, piece.iter().copied());
            }
            4 => out.truncate(at),
            5 if !other.is_empty() => {
                let from = rng.index(other.len());
                let end = (from + 1 + rng.index(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ if !out.is_empty() => {
                // Repeat a slice: long strings, deep nesting, many entries.
                let from = rng.index(out.len());
                let end = (from + 1 + rng.index(8)).min(out.len());
                let piece: Vec<u8> = out[from..end].repeat(1 + rng.index(64));
                out.splice(at..at, piece);
            }
            _ => out.push(rng.below(256) as u8),
        }
    }
    out
}

fn fuzz_target(name: &str, target: fn(&[u8])) -> Result<(usize, usize), String> {
    let inputs = corpus(name);
    assert!(!inputs.is_empty(), "fuzz/corpus/{name} is empty");
    for (path, bytes) in &inputs {
        run_one(name, target, bytes, &path.display().to_string())?;
    }
    let secs: u64 = std::env::var("CLLM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut rng = Rng(0x5eed ^ name.len() as u64);
    let mut runs = 0;
    while Instant::now() < deadline {
        let (_, base) = rng.pick(&inputs);
        let (_, other) = rng.pick(&inputs);
        let input = mutate(&mut rng, base, other);
        run_one(name, target, &input, &format!("mutation {runs}"))?;
        runs += 1;
    }
    Ok((inputs.len(), runs))
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    // Panics are caught and reported with their input; keep the default hook's noise out.
    std::panic::set_hook(Box::new(|_| {}));
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for &(name, target) in cllm::fuzz_targets::TARGETS {
        match fuzz_target(name, target) {
            Ok((corpus, runs)) => {
                report.push(format!("{name}: {corpus} corpus inputs, {runs} mutations"))
            }
            Err(failure) => failures.push(failure),
        }
    }
    let _ = std::panic::take_hook();
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
