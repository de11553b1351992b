//! Faults from outside: the model folder deleted under a running server, and SIGTERM with 50
//! streams in flight. (The plugin folder removed and re-created is in `tests/plugins.rs`.)

mod common;

use common::process::ServeProcess;
use common::server::sse_events;
use serde_json::json;
use std::time::{Duration, Instant};

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
