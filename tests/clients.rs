//! The clients people use, unmodified, against a live cllm on 127.0.0.1:0: OpenAI's `openai`
//! Python package and Hugging Face's `huggingface_hub.InferenceClient` (TGI's client). The
//! checks themselves are Python scripts in `tests/python/`, run with the virtual environment
//! `.ci/run` installs (`target/py-clients`, or `$CLLM_PY_CLIENTS`).

mod common;

use common::server::TestServer;
use common::{fixture, repo_root, require};
use serde_json::json;
use std::path::PathBuf;

/// The Python interpreter of the clients' virtual environment, or a visible skip (a failure
/// under CI, where `.ci/run` installs it).
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("CLLM_PY_CLIENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/py-clients"));
    let python = venv.join("bin/python");
    require(
        python.is_file(),
        &format!(
            "the Python clients (openai, huggingface_hub) in {}; `bash .ci/run` installs them",
            venv.display()
        ),
    )
    .then_some(python)
}

/// The golden cases with the text the greedy tokens decode to.
fn golden_cases(count: usize, tokens: usize) -> Vec<serde_json::Value> {
    let fx = fixture("stories260K").expect("bundled fixture");
    let model = cllm::model::tokenizer::ModelTokenizer::load(&fx.model_dir).expect("tokenizer");
    fx.golden
        .cases
        .iter()
        .take(count)
        .map(|case| {
            let ids = &case.output_ids[..tokens];
            json!({
                "prompt": case.prompt,
                "input_ids": case.input_ids,
                "output_ids": ids,
                "text": model.decode(ids, true).expect("decode"),
            })
        })
        .collect()
}

/// Runs `script` with a config file holding `config`; fails the test with its output.
fn run_script(python: &PathBuf, script: &str, config: serde_json::Value) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let out = std::process::Command::new(python)
        .arg(repo_root().join("tests/python").join(script))
        .arg(&path)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    common::say(&format!("{script}: {}", stdout.trim().replace('\n', "; ")));
}

/// [`run_script`] off the async workers (the server under test runs on them).
async fn run_script_beside(python: PathBuf, script: &'static str, config: serde_json::Value) {
    tokio::task::spawn_blocking(move || run_script(&python, script, config))
        .await
        .expect("script task");
}

fn chatml_template() -> PathBuf {
    repo_root().join("tests/fixtures/chat_templates/chatml-smollm2.jinja")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_completions_chat_streaming_and_errors() {
    let Some(python) = python() else { return };
    let burst = 20;
    let server = TestServer::start(&repo_root().join("models/stories260K"), |c| {
        c.model.chat_template = Some(chatml_template());
        // Each check is its own client. A long window: the rate-limit check spends its client's
        // burst and nothing refills.
        c.rate_limiter.max_requests = burst;
        c.rate_limiter.time_window_ms = 600_000;
    })
    .await;
    // Every other check runs as one client each; only the rate-limit check shares an id.
    let config = json!({
        "base_url": server.base,
        "mode": "main",
        "model": "stories260K",
        "cases": golden_cases(5, 64),
        "client_burst": burst,
    });
    run_script_beside(python, "openai_checks.py", config).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_sees_authentication_errors() {
    let Some(python) = python() else { return };
    let server = TestServer::start(&repo_root().join("models/stories260K"), |c| {
        c.model.chat_template = Some(chatml_template());
        c.auth.enabled = true;
        c.auth.api_keys = vec![cllm::config::ApiKeyEntry {
            name: "tester".into(),
            key: "sk-test-123".into(),
        }];
    })
    .await;
    let config = json!({
        "base_url": server.base, "mode": "auth", "model": "stories260K", "api_key": "sk-test-123",
    });
    run_script_beside(python, "openai_checks.py", config).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_inference_client_gets_golden_tokens() {
    let Some(python) = python() else { return };
    let server = TestServer::start(&repo_root().join("models/stories260K"), |_| {}).await;
    let config = json!({ "base_url": server.base, "cases": golden_cases(3, 32) });
    run_script_beside(python, "tgi_checks.py", config).await;
    server.shutdown().await;
}

/// The real instruct model from its GGUF file: chat template, tokenizer and weights all from
/// the file, through the openai client, against transformers' golden conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_chats_with_smollm2_gguf_like_hf() {
    let Some(python) = python() else { return };
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let path = common::shared_dir().map(|d| d.join("golden/smollm2-135m-instruct-chat.json"));
    let path = path.filter(|p| p.is_file());
    if !require(
        path.is_some(),
        "../shared/golden/smollm2-135m-instruct-chat.json",
    ) {
        return;
    }
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path.expect("checked above")).expect("golden reads"),
    )
    .expect("golden parses");
    let server = TestServer::start(&model, |c| {
        // Quantized weights run on the CPU only, whatever device the tests run on.
        c.model.device = cllm::model::executor::DeviceChoice::Cpu;
        c.model.threads = 2;
        c.scheduler.kv_cache_mb = 64;
    })
    .await;
    let config = json!({
        "base_url": server.base,
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "cases": golden["cases"],
    });
    run_script_beside(python, "smollm2_chat_checks.py", config).await;
    server.shutdown().await;
}
