//! Abuse limits: slow-loris headers and bodies, open requests per client, prompt length, and
//! `/metrics` label values that clients cannot multiply.

mod common;

use common::server::TestServer;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn stories() -> std::path::PathBuf {
    common::repo_root().join("models/stories260K")
}

/// Everything the server sends on `stream` until it closes it, or `None` if it is still open
/// after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

async fn connect(server: &TestServer) -> TcpStream {
    let addr = server.base.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("connect")
}

/// A client that sends half its headers and stops, one that opens a connection and sends
/// nothing, and 100 of them at once: each connection is closed after the header read timeout,
/// and well-behaved clients are served all the while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_at_the_header_read_timeout() {
    let server = TestServer::start(&stories(), |c| {
        c.http.header_read_timeout_ms = 300;
        c.rate_limiter.enabled = false;
    })
    .await;
    let mut slow = Vec::new();
    for i in 0..100 {
        let mut stream = connect(&server).await;
        if i % 2 == 0 {
            stream
                .write_all(b"POST /generate HTTP/1.1\r\nHost: cllm\r\nContent-Type: appl")
                .await
                .expect("half the headers");
        }
        slow.push(stream);
    }
    let started = Instant::now();
    // Served while the slow ones hang.
    let ok = server
        .post(
            "/generate",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(ok.status(), 200);
    for mut stream in slow {
        let closed = read_until_closed(&mut stream, Duration::from_secs(3)).await;
        assert!(
            closed.is_some(),
            "a slow connection was still open after 3 s"
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        took >= Duration::from_millis(250),
        "closed before the timeout: {took:?}"
    );

    // A keep-alive connection idle for longer than the timeout is closed too; one that keeps
    // sending requests in time is not.
    let mut stream = connect(&server).await;
    for _ in 0..3 {
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: cllm\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.expect("response");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(
        closed.is_some(),
        "an idle keep-alive connection stayed open"
    );
    server.shutdown().await;
}

/// A body that stops arriving is answered 408 `request_timeout` (TGI's shape on TGI routes,
/// OpenAI's on `/v1`) once the body read timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_gets_408() {
    let server = TestServer::start(&stories(), |c| c.http.body_read_timeout_ms = 300).await;
    for (path, shape) in [("/generate", "tgi"), ("/v1/completions", "openai")] {
        let mut stream = connect(&server).await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: cllm\r\nContent-Type: application/json\r\n\
             Content-Length: 200\r\n\r\n{{\"inputs\": \"Once"
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .expect("answered within 3 s")
            .expect("read");
        let took = started.elapsed();
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(took >= Duration::from_millis(250), "{took:?}");
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
            .unwrap_or_else(|e| panic!("JSON body ({e}): {text}"));
        if shape == "tgi" {
            assert_eq!(body["error_type"], "request_timeout", "{body}");
        } else {
            assert_eq!(body["error"]["code"], "request_timeout", "{body}");
        }
    }
    server.shutdown().await;
}

async fn stream_as(server: &TestServer, client: &str, path: &str) -> reqwest::Response {
    let body = if path == "/generate_stream" {
        json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 40}})
    } else {
        json!({"model": "stories260K", "stream": true, "max_tokens": 40,
               "prompt": "Once upon a time"})
    };
    server
        .http
        .post(server.url(path))
        .header("x-client-id", client)
        .json(&body)
        .send()
        .await
        .expect("sent")
}

/// `rate_limiter.max_concurrent_per_client: 2`: a client's third open request is refused
/// with 429 and Retry-After (streamed or not, either API), other clients are not affected,
/// and a slot comes back when a stream ends or its client goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_hold_only_so_many_open_requests() {
    let server = TestServer::start(&stories(), |c| {
        c.rate_limiter.max_concurrent_per_client = 2;
        // Slow steps keep the streams open while the test looks.
        c.scheduler.debug_step_delay_ms = 20;
    })
    .await;
    let first = stream_as(&server, "alice", "/generate_stream").await;
    let second = stream_as(&server, "alice", "/v1/completions").await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let third = stream_as(&server, "alice", "/generate_stream").await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body: Value = third.json().await.expect("json");
    assert_eq!(body["error_type"], "rate_limited", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("at most 2 per client"),
        "{body}"
    );
    let openai = stream_as(&server, "alice", "/v1/completions").await;
    assert_eq!(openai.status(), 429);
    let body: Value = openai.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    let whole = server
        .http
        .post(server.url("/generate"))
        .header("x-client-id", "alice")
        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(whole.status(), 429, "whole answers count too");

    let other = stream_as(&server, "bob", "/generate_stream").await;
    assert_eq!(other.status(), 200, "another client is not affected");

    // The first stream runs to its end; the second's client goes away mid-stream.
    let text = first.text().await.expect("first stream");
    assert!(text.contains("generated_text"), "{text}");
    drop(second);
    common::eventually(
        "alice's slots come back",
        Duration::from_secs(5),
        || async {
            let a = stream_as(&server, "alice", "/generate_stream").await;
            let b = stream_as(&server, "alice", "/generate_stream").await;
            match (a.status().as_u16(), b.status().as_u16()) {
                (200, 200) => Ok(()),
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
    drop(other);
    server.shutdown().await;
}

/// `scheduler.max_input_tokens`: a longer prompt is refused before admission, in each API's
/// shape, and `/info` reports the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_longer_than_max_input_tokens_are_refused() {
    let server = TestServer::start(&stories(), |c| c.scheduler.max_input_tokens = Some(8)).await;
    let info = server.get_json("/info").await;
    assert_eq!(info["max_input_tokens"], 8, "{info}");
    let long = "Once upon a time there was a little girl who liked to play";
    assert!(server.encode(long).await.len() > 8);
    let tgi = server
        .post(
            "/generate",
            json!({"inputs": long, "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(tgi.status(), 422);
    let body: Value = tgi.json().await.expect("json");
    assert_eq!(body["error_type"], "validation", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("at most 8 tokens"),
        "{body}"
    );
    let openai = server
        .post(
            "/v1/completions",
            json!({"model": "stories260K", "prompt": long, "max_tokens": 2}),
        )
        .await;
    assert_eq!(openai.status(), 400);
    let body: Value = openai.json().await.expect("json");
    assert_eq!(body["error"]["param"], "prompt", "{body}");
    let short = server
        .post(
            "/generate",
            json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(short.status(), 200);
    server.shutdown().await;
}

/// The label values on `/metrics` lines: `name{k="v",...}` → every `v`.
fn label_values(metrics: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.split_once('}'))
        else {
            continue;
        };
        for pair in labels.0.split("\",") {
            if let Some((_, v)) = pair.split_once("=\"") {
                values.insert(v.trim_end_matches('"').to_string());
            }
        }
    }
    values
}

fn series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

/// Clients cannot multiply `/metrics` series: 300 client ids, unknown paths, request ids and
/// model names in the path leave the set of series as one round of them did, and none of
/// those values appears as a label value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_multiply_metrics_label_values() {
    let server = TestServer::start(&stories(), |c| c.rate_limiter.max_requests = 100_000).await;
    let round = |tag: &'static str, n: usize| {
        let server = &server;
        async move {
            for i in 0..n {
                let id = format!("{tag}-client-{i}");
                let r = server
                    .http
                    .post(server.url("/generate"))
                    .header("x-client-id", &id)
                    .header("x-request-id", format!("{tag}-req-{i}"))
                    .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}))
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(r.status(), 200);
                for path in [
                    format!("/{tag}-path-{i}"),
                    format!("/requests/{tag}-req-{i}"),
                    format!("/v1/models/{tag}-model-{i}"),
                ] {
                    let r = server
                        .http
                        .get(server.url(&path))
                        .send()
                        .await
                        .expect("sent");
                    assert!(r.status().as_u16() < 500, "{path}: {}", r.status());
                }
            }
        }
    };
    round("warm", 5).await;
    // The first scrape adds /metrics's own series.
    server.metrics().await;
    let before = series(&server.metrics().await);
    round("flood", 300).await;
    let metrics = server.metrics().await;
    let after = series(&metrics);
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.is_empty(), "new series: {new:?}");
    let leaked: Vec<_> = label_values(&metrics)
        .into_iter()
        .filter(|v| v.contains("flood-") || v.contains("warm-"))
        .collect();
    assert!(leaked.is_empty(), "client-chosen label values: {leaked:?}");
    server.shutdown().await;
}
