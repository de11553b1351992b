//! Faults: a forward pass that fails for one sequence, the model folder deleted under a
//! running server, and SIGTERM with 50 streams in flight. (The plugin folder removed and
//! re-created, and a full disk under the compiled-plugin cache, are in `tests/plugins.rs`.)

mod common;

use common::process::ServeProcess;
use common::server::{metric_value, sse_events, TestServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const OTHERS_PROMPT: &str = "Once upon a time";
const OTHERS_TOKENS: u64 = 24;

/// A stream of the unpoisoned prompt: its final event.
async fn other_stream(server: &TestServer) -> Value {
    let response = server
        .post(
            "/generate_stream",
            json!({"inputs": OTHERS_PROMPT,
                   "parameters": {"max_new_tokens": OTHERS_TOKENS, "details": true}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.expect("stream");
    sse_events(&body).pop().expect("an event")
}

/// A forward pass that errors for one sequence (the executor's injected fault): that request
/// ends with a `generation` error in its API's shape (424 on TGI's routes, 500 on OpenAI's),
/// streams running beside it finish with the very text they get without the fault, its blocks
/// go back, and `/health` and `/metrics` report the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_pass_failing_for_one_sequence_fails_that_request_only() {
    let model = common::repo_root().join("models/stories260K");
    // A fault-free server first: the reference text, and a token the others never feed.
    let clean = TestServer::start(&model, |c| c.rate_limiter.enabled = false).await;
    let reference: Value = clean
        .post(
            "/generate",
            json!({"inputs": OTHERS_PROMPT,
                   "parameters": {"max_new_tokens": OTHERS_TOKENS, "details": true}}),
        )
        .await
        .json()
        .await
        .expect("json");
    let reference_text = reference["generated_text"]
        .as_str()
        .expect("text")
        .to_string();
    let generated: Vec<u64> = reference["details"]["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64())
        .collect();
    assert_eq!(generated.len() as u64, OTHERS_TOKENS, "{reference}");
    let mut fed = clean.encode(OTHERS_PROMPT).await;
    fed.extend(generated);
    let poison_text = " the zebra quarrelled";
    let poison = clean
        .encode(poison_text)
        .await
        .into_iter()
        .find(|id| !fed.contains(id))
        .expect("a token the other requests never feed");
    // How long the unpoisoned prompt runs greedily (EOS may end it before 200 tokens).
    let sibling: Value = clean
        .post(
            "/v1/completions",
            json!({"model": "stories260K", "prompt": OTHERS_PROMPT, "max_tokens": 200,
                   "temperature": 0}),
        )
        .await
        .json()
        .await
        .expect("json");
    let sibling_tokens = sibling["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage");
    assert!(
        sibling_tokens >= 60,
        "too short to tell waiting from not: {sibling}"
    );
    clean.shutdown().await;

    let server = TestServer::start(&model, |c| {
        c.rate_limiter.enabled = false;
        c.scheduler.debug_fail_on_token = Some(poison as u32);
        // Slow steps: the poisoned requests arrive while the others are mid-stream.
        c.scheduler.debug_step_delay_ms = 10;
    })
    .await;
    let server = std::sync::Arc::new(server);
    let others: Vec<_> = (0..4)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { other_stream(&server).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let poisoned = format!("{OTHERS_PROMPT}{poison_text}");

    let tgi = server
        .post(
            "/generate",
            json!({"inputs": poisoned, "parameters": {"max_new_tokens": 8}}),
        )
        .await;
    // TGI's status for a request that failed during generation.
    assert_eq!(tgi.status(), 424);
    let request_id = tgi.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let body: Value = tgi.json().await.expect("json");
    assert_eq!(body["error_type"], "generation", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("injected fault"),
        "{body}"
    );

    let openai = server
        .post(
            "/v1/completions",
            json!({"model": "stories260K", "prompt": poisoned, "max_tokens": 8}),
        )
        .await;
    assert_eq!(openai.status(), 500);
    let body: Value = openai.json().await.expect("json");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "generation", "{body}");

    let stream = server
        .post(
            "/generate_stream",
            json!({"inputs": poisoned, "parameters": {"max_new_tokens": 8}}),
        )
        .await;
    assert_eq!(stream.status(), 200, "the stream had begun");
    let events = sse_events(&stream.text().await.expect("stream"));
    let last = events.last().expect("an event");
    assert_eq!(last["error_type"], "generation", "{events:?}");

    for other in others {
        let last = other.await.expect("stream task");
        assert_eq!(last["generated_text"], reference_text.as_str(), "{last}");
        assert_eq!(last["details"]["generated_tokens"], OTHERS_TOKENS, "{last}");
    }

    let record = server.get_json(&format!("/requests/{request_id}")).await;
    assert_eq!(record["state"], "failed", "{record}");
    let health_response = server
        .http
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health_response.status(), 200, "degraded still serves");
    let health: Value = health_response.json().await.expect("json");
    let executor = &health["components"]["model_executor"];
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(executor["status"], "degraded", "{health}");
    assert_eq!(executor["failed_sequences"], 3, "{health}");
    assert!(
        executor["last_failure"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("injected fault"),
        "{health}"
    );
    let metrics = server.metrics().await;
    assert_eq!(metric_value(&metrics, "cllm_sequence_failures_total"), 3.0);
    assert_eq!(health["metrics"]["kv_blocks_used"], 0, "{health}");
    assert_eq!(health["metrics"]["running_sequences"], 0, "{health}");

    // A request of several prompts, one of them poisoned: the failed choice ends it at once
    // (its sibling, `sibling_tokens` steps of at least 10 ms, is cancelled rather than
    // awaited), and every block goes back.
    let started = Instant::now();
    let several = server
        .post(
            "/v1/completions",
            json!({"model": "stories260K", "prompt": [OTHERS_PROMPT, poisoned],
                   "max_tokens": 200, "temperature": 0}),
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(several.status(), 500);
    let sibling_time = Duration::from_millis(10 * sibling_tokens);
    assert!(
        waited < sibling_time / 2,
        "the failed choice waited {waited:?}; its sibling needs {sibling_time:?}"
    );
    let several_id = several.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    common::eventually(
        "the sibling is cancelled and its blocks freed",
        Duration::from_secs(5),
        || async {
            let health = server.get_json("/health").await;
            let metrics = &health["metrics"];
            if metrics["kv_blocks_used"] == 0 && metrics["running_sequences"] == 0 {
                Ok(())
            } else {
                Err(metrics.to_string())
            }
        },
    )
    .await;
    let record = server.get_json(&format!("/requests/{several_id}")).await;
    assert_eq!(record["state"], "failed", "{record}");

    // And the server goes on serving.
    let after = server
        .post(
            "/generate",
            json!({"inputs": OTHERS_PROMPT, "parameters": {"max_new_tokens": OTHERS_TOKENS}}),
        )
        .await;
    assert_eq!(after.status(), 200);
    let after: Value = after.json().await.expect("json");
    assert_eq!(after["generated_text"], reference_text.as_str());
    if let Ok(server) = std::sync::Arc::try_unwrap(server) {
        server.shutdown().await;
    }
}

/// The weights are read at start (mapped files stay readable after their names go): deleting
/// the model folder must not stop a running server from generating or make it unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_model_folder_after_load_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    let source = common::repo_root().join("models/stories260K");
    for entry in std::fs::read_dir(&source).expect("model folder") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, model.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let model_arg = model.display().to_string();
    let server = ServeProcess::start(tmp.path(), "server", &["--model", &model_arg]);
    let client = reqwest::Client::new();
    let generate = || async {
        client
            .post(server.url("/generate"))
            .json(&json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8}}))
            .send()
            .await
            .expect("sent")
    };
    let before: serde_json::Value = generate().await.json().await.expect("json");
    std::fs::remove_dir_all(&model).expect("rm -r model");
    let after = generate().await;
    assert_eq!(after.status(), 200);
    let after: serde_json::Value = after.json().await.expect("json");
    assert_eq!(before, after, "the same greedy text");
    let health = client
        .get(server.url("/health"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// SIGTERM with 50 streams in flight: every stream either ends with its final event (the short
/// ones) or is cut cleanly at the drain time (the long ones: the connection closes after whole
/// events), and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_fifty_streams_in_flight_drains_and_exits_zero() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut server = ServeProcess::start(
        tmp.path(),
        "server",
        &[
            "--set",
            "http.drain_timeout_ms=1000",
            "--set",
            "rate_limiter.enabled=false",
            // Slow steps, so that the streams are still running when the signal comes.
            "--set",
            "scheduler.debug_step_delay_ms=20",
        ],
    );
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for i in 0..50 {
        let tokens = if i % 2 == 0 { 5 } else { 400 };
        let request = client
            .post(server.url("/generate_stream"))
            .json(&json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens}}));
        streams.push(tokio::spawn(async move {
            let mut response = request.send().await.expect("sent");
            assert_eq!(response.status(), 200);
            let mut text = String::new();
            let mut cut = false;
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
                    Ok(None) => break,
                    Err(_) => {
                        cut = true;
                        break;
                    }
                }
            }
            (text, cut)
        }));
    }
    // Every stream has started before the signal.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate(Duration::from_secs(15));
        (status, server)
    })
    .await
    .expect("terminate");
    let (status, server) = status;
    let took = signalled.elapsed();
    let status = status.unwrap_or_else(|| panic!("still running after 15 s:\n{}", server.log()));
    assert!(status.success(), "exit {status:?}:\n{}", server.log());
    assert!(
        took < Duration::from_secs(5),
        "drained in {took:?} (drain time 1 s)"
    );
    let (mut finished, mut cut) = (0, 0);
    for stream in streams {
        let (text, was_cut) = stream.await.expect("stream task");
        // Every event that arrived is a whole SSE event.
        for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
            assert!(event.starts_with("data:"), "a torn event: {event:?}");
        }
        // The final event alone carries the text (the others have `"generated_text": null`).
        let last_has_text = sse_events(&text)
            .iter()
            .any(|event| event["generated_text"].is_string());
        if last_has_text {
            finished += 1;
        } else {
            assert!(was_cut || !text.is_empty(), "a stream that got nothing");
            cut += 1;
        }
    }
    common::say(&format!(
        "SIGTERM: {finished} streams finished, {cut} cut, exit in {took:?}"
    ));
    assert_eq!(finished + cut, 50);
    assert!(
        finished > 0,
        "the short streams finished within the drain time"
    );
    assert!(
        cut > 0,
        "the long streams (400 tokens at 20 ms a step) outlast the 1 s drain"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}
