//! The real server on 127.0.0.1:0 with real models: golden tokens over HTTP, streaming,
//! admission (429, 503 queue_full / queue_timeout, priority), cancellation, ids, errors, metrics.

mod common;

use common::server::{metric_value, sse_events, TestServer};
use common::{eventually, fixture, repo_root, Fixture};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn stories() -> std::path::PathBuf {
    repo_root().join("models/stories260K")
}

async fn greedy_ids(server: &TestServer, prompt: &str, max_new_tokens: usize) -> Vec<u32> {
    let r = server
        .post(
            "/generate",
            json!({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["details"]["tokens"]
        .as_array()
        .expect("details.tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("id") as u32)
        .collect()
}

/// Golden tokens for every case, first alone, then while 16 sampled requests run beside them.
async fn check_golden_over_http(fx: &Fixture) {
    let server = TestServer::start(&fx.model_dir, |_| {}).await;
    let n = fx.golden.max_new_tokens;
    for case in &fx.golden.cases {
        assert_eq!(
            greedy_ids(&server, &case.prompt, n).await,
            case.output_ids,
            "{} alone",
            fx.name
        );
    }
    let noise: Vec<_> = (0..16)
        .map(|i| {
            let (http, url) = (server.http.clone(), server.url("/generate"));
            tokio::spawn(async move {
                let body = json!({"inputs": format!("Tom had {i} apples"),
                    "parameters": {"max_new_tokens": 40, "temperature": 0.8, "seed": i}});
                http.post(url)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent")
                    .status()
            })
        })
        .collect();
    let golden: Vec<_> = fx
        .golden
        .cases
        .iter()
        .map(|case| greedy_ids(&server, &case.prompt, n))
        .collect();
    let results = futures_util::future::join_all(golden).await;
    for (case, ids) in fx.golden.cases.iter().zip(results) {
        assert_eq!(
            ids, case.output_ids,
            "{} under load: {:?}",
            fx.name, case.prompt
        );
    }
    for task in noise {
        assert_eq!(task.await.expect("task"), 200);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_matches_golden_stories260k() {
    let fx = fixture("stories260K").expect("bundled fixture");
    check_golden_over_http(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_matches_golden_tiny_llama_f32() {
    let Some(fx) = fixture("tiny-llama-f32") else {
        return;
    };
    check_golden_over_http(&fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delivers_golden_tokens_as_they_come() {
    let fx = fixture("stories260K").expect("bundled fixture");
    let server = TestServer::start(&fx.model_dir, |c| c.scheduler.debug_step_delay_ms = 10).await;
    let case = &fx.golden.cases[0];
    let start = Instant::now();
    let mut response = server
        .post(
            "/generate_stream",
            json!({"inputs": case.prompt, "parameters": {"max_new_tokens": 30}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    let mut first_event_at = None;
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        body.push_str(&String::from_utf8_lossy(&chunk));
        if first_event_at.is_none() && body.contains("data:") {
            first_event_at = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let events = sse_events(&body);
    assert_eq!(events.len(), 30);
    let ids: Vec<u32> = events
        .iter()
        .map(|e| e["token"]["id"].as_u64().expect("id") as u32)
        .collect();
    assert_eq!(ids, case.output_ids[..30]);
    assert!(events[0]["generated_text"].is_null());
    let last = events.last().expect("last");
    assert_eq!(last["details"]["finish_reason"], "length");
    assert!(last["generated_text"]
        .as_str()
        .expect("text")
        .starts_with(", there was"));
    // 30 steps of >= 10 ms: the first token must arrive well before the end.
    let first = first_event_at.expect("an event");
    assert!(
        first + Duration::from_millis(150) < total,
        "first {first:?}, total {total:?}"
    );
    // A streamed greedy token's log-probability comes with the executor's greedy choice (on a
    // GPU, from the device); asking for an alternative brings the whole row back to the host,
    // which computes it there: both must agree.
    let response = server
        .post(
            "/generate",
            json!({"inputs": case.prompt,
                   "parameters": {"max_new_tokens": 30, "details": true, "top_n_tokens": 1}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("json");
    let tokens = answer["details"]["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 30);
    for (i, (streamed, from_row)) in events.iter().zip(tokens).enumerate() {
        assert_eq!(streamed["token"]["id"], from_row["id"], "token {i}");
        let (a, b) = (
            streamed["token"]["logprob"]
                .as_f64()
                .expect("streamed logprob"),
            from_row["logprob"].as_f64().expect("logprob"),
        );
        assert!(
            (a - b).abs() < 1e-4,
            "token {i}: logprob {a} streamed, {b} from the row"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_gives_429_with_retry_after_per_client() {
    let server = TestServer::start(&stories(), |c| {
        c.rate_limiter.max_requests = 2;
        c.rate_limiter.time_window_ms = 60_000;
    })
    .await;
    let send = |client: &'static str| {
        let (http, url) = (server.http.clone(), server.url("/generate"));
        async move {
            http.post(url)
                .header("x-client-id", client)
                .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}))
                .send()
                .await
                .expect("sent")
        }
    };
    assert_eq!(send("alice").await.status(), 200);
    assert_eq!(send("alice").await.status(), 200);
    let limited = send("alice").await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error_type"], "rate_limited");
    assert_eq!(
        send("bob").await.status(),
        200,
        "other clients are not limited"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_503_queue_full_and_long_wait_is_503_queue_timeout() {
    let server = TestServer::start(&stories(), |c| {
        c.scheduler.max_running_sequences = 1;
        c.scheduler.debug_step_delay_ms = 20;
        c.request_queue.max_queue_size = 1;
        c.request_queue.max_wait_time_ms = 400;
    })
    .await;
    // A: runs for ~60 steps x 20 ms.
    let a = server
        .post(
            "/generate_stream",
            json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 60}}),
        )
        .await;
    assert_eq!(a.status(), 200);
    // B waits in the one queue slot; C finds the queue full.
    let b = {
        let (http, url) = (server.http.clone(), server.url("/generate"));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http
                .post(url)
                .json(&json!({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
                .send()
                .await
                .expect("sent");
            (
                r.status(),
                r.json::<Value>().await.expect("json"),
                started.elapsed(),
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = server
        .post(
            "/generate",
            json!({"inputs": "Hey", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(c.status(), 503);
    assert!(c.headers().contains_key("retry-after"));
    let body: Value = c.json().await.expect("json");
    assert_eq!(body["error_type"], "queue_full");
    let (status, body, waited) = b.await.expect("task");
    assert_eq!(status, 503);
    assert_eq!(body["error_type"], "queue_timeout");
    assert!(
        waited >= Duration::from_millis(350),
        "timed out after {waited:?}"
    );
    drop(a);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_queued_later_is_served_first() {
    let server = TestServer::start(&stories(), |c| {
        c.scheduler.max_running_sequences = 1;
        c.scheduler.debug_step_delay_ms = 15;
    })
    .await;
    let blocker = server
        .post(
            "/generate_stream",
            json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 30}}),
        )
        .await;
    assert_eq!(blocker.status(), 200);
    let send = |priority: i32, delay_ms: u64| {
        let (http, url) = (server.http.clone(), server.url("/generate"));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let body =
                json!({"inputs": "Hi", "parameters": {"max_new_tokens": 3, "priority": priority}});
            let r = http.post(url).json(&body).send().await.expect("sent");
            assert_eq!(r.status(), 200);
            Instant::now()
        })
    };
    let low = send(0, 30);
    let high = send(10, 90);
    let (low_done, high_done) = (low.await.expect("low"), high.await.expect("high"));
    assert!(
        high_done < low_done,
        "the priority-10 request should finish first"
    );
    drop(blocker);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_is_cancelled_and_frees_its_kv_blocks() {
    let server = TestServer::start(&stories(), |c| c.scheduler.debug_step_delay_ms = 10).await;
    let mut stream = server
        .post(
            "/generate_stream",
            json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 300}}),
        )
        .await;
    let rid = stream.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let mut seen = String::new();
    while sse_events(&seen).len() < 3 {
        let chunk = stream.chunk().await.expect("chunk").expect("more");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let busy = server.health().await;
    assert!(busy["metrics"]["kv_blocks_used"].as_u64().expect("used") > 0);
    drop(stream);
    // Another request is unaffected.
    assert_eq!(
        greedy_ids(&server, "Once upon a time", 5).await,
        [432, 383, 286, 261, 376]
    );
    eventually("blocks freed", Duration::from_secs(5), || async {
        let h = server.health().await;
        let idle = h["metrics"]["kv_blocks_used"] == 0 && h["metrics"]["running_sequences"] == 0;
        if idle {
            Ok(())
        } else {
            Err(h.to_string())
        }
    })
    .await;
    let record: Value = server.get_json(&format!("/requests/{rid}")).await;
    assert_eq!(record["state"], "cancelled", "{record}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_round_trips_and_lifecycle_is_recorded_in_order() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let r = server
        .http
        .post(server.url("/generate"))
        .header("x-request-id", "test-req-42")
        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 3}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.headers()["x-request-id"], "test-req-42");
    let generated = server
        .http
        .get(server.url("/health/live"))
        .send()
        .await
        .expect("live");
    assert_eq!(
        generated.headers()["x-request-id"].len(),
        32,
        "an id is generated when none is given"
    );
    // The lifecycle's last event is recorded as the response body ends, which can trail the
    // client's read of it by a moment on a loaded machine: wait for it (up to 2 s).
    let mut record: Value = server.get_json("/requests/test-req-42").await;
    for _ in 0..100 {
        let events = record["events"].as_array().map_or(0, |e| e.len());
        if events >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        record = server.get_json("/requests/test-req-42").await;
    }
    let stages: Vec<&str> = record["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["stage"].as_str().expect("stage"))
        .collect();
    assert_eq!(
        stages,
        ["received", "queued", "scheduled", "first_token", "finished"]
    );
    let times: Vec<f64> = record["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["at_ms"].as_f64().expect("t"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let missing = server
        .http
        .get(server.url("/requests/nope"))
        .send()
        .await
        .expect("sent");
    assert_eq!(missing.status(), 404);
    server.shutdown().await;
}

async fn expect_error(r: reqwest::Response, status: u16, error_type: &str) {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.expect("json error body");
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_row_has_its_status_and_type() {
    let server = TestServer::start(&stories(), |c| c.http.max_body_bytes = 4096).await;
    let raw = |body: String| {
        let (http, url) = (server.http.clone(), server.url("/generate"));
        async move {
            http.post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("sent")
        }
    };
    expect_error(raw("{not json".into()).await, 400, "malformed_json").await;
    expect_error(
        raw(format!("{{\"inputs\": \"{}\"}}", "a".repeat(5000))).await,
        413,
        "body_too_large",
    )
    .await;
    let cases = [
        json!({"inputs": ""}),
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 600}}),
        json!({"inputs": "Hi", "parameters": {"temperature": -1.0}}),
        json!({"inputs": "Hi", "parameters": {"top_p": 1.5}}),
        json!({"inputs": "Hi", "parameters": {"top_p": 0.0}}),
        json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "surprise": 1}),
        json!({"inputs": "Hi", "parameters": {"bogus": 1}}),
        json!({"inputs": 5}),
    ];
    for body in cases {
        expect_error(
            server.post("/generate", body.clone()).await,
            422,
            "validation",
        )
        .await;
        expect_error(
            server.post("/generate_stream", body).await,
            422,
            "validation",
        )
        .await;
    }
    expect_error(
        server
            .http
            .get(server.url("/nowhere"))
            .send()
            .await
            .expect("sent"),
        404,
        "not_found",
    )
    .await;
    // The server still serves after all that.
    assert_eq!(greedy_ids(&server, "Once upon a time", 2).await, [432, 383]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_everything_but_open_paths() {
    let server = TestServer::start(&stories(), |c| {
        c.auth.enabled = true;
        c.auth.api_keys = vec![cllm::config::ApiKeyEntry {
            name: "ops".into(),
            key: "s3cret-key".into(),
        }];
    })
    .await;
    let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}});
    let url = server.url("/generate");
    expect_error(
        server
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("sent"),
        401,
        "unauthorized",
    )
    .await;
    let wrong = server
        .http
        .post(&url)
        .bearer_auth("nope")
        .json(&body)
        .send()
        .await
        .expect("sent");
    expect_error(wrong, 401, "unauthorized").await;
    let ok = server
        .http
        .post(&url)
        .bearer_auth("s3cret-key")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200);
    for open in ["/health/live", "/metrics"] {
        assert_eq!(
            server
                .http
                .get(server.url(open))
                .send()
                .await
                .expect("sent")
                .status(),
            200,
            "{open}"
        );
    }
    assert_eq!(
        server
            .http
            .get(server.url("/health"))
            .send()
            .await
            .expect("sent")
            .status(),
        401
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let ok_series = r#"cllm_requests_total{endpoint="/generate",status="200"}"#;
    let before = metric_value(&server.metrics().await, ok_series);
    greedy_ids(&server, "Once upon a time", 4).await;
    greedy_ids(&server, "Once upon a time", 4).await;
    let _ = server.post("/generate", json!({"inputs": ""})).await;
    let text = server.metrics().await;
    assert_eq!(metric_value(&text, ok_series) - before, 2.0);
    assert!(metric_value(&text, "cllm_generated_tokens_total") >= 8.0);
    assert_eq!(
        metric_value(
            &text,
            r#"cllm_errors_total{endpoint="/generate",error_type="validation"}"#
        ),
        1.0
    );
    for name in [
        "cllm_request_duration_seconds_bucket",
        "cllm_time_to_first_token_seconds_bucket",
        "cllm_inter_token_latency_seconds_bucket",
        "cllm_queue_wait_seconds_bucket",
        "cllm_batch_size_bucket",
        "cllm_kv_cache_usage_ratio",
        "cllm_running_sequences",
        "cllm_queue_size",
        "cllm_prompt_tokens_total",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    common::server::promtool_check(&text);
    server.shutdown().await;
}

#[test]
fn sigterm_during_a_stream_lets_it_finish() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = common::cllm()
        .args([
            "serve",
            "--port",
            "0",
            "--set",
            "scheduler.debug_step_delay_ms=20",
            "--model",
        ])
        .arg(stories())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts cllm serve");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("log") > 0,
            "server exited early"
        );
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    let body = r#"{"inputs": "Once upon a time", "parameters": {"max_new_tokens": 40}}"#;
    write!(conn, "POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("send");
    let mut first = [0u8; 256];
    let n = conn.read(&mut first).expect("first bytes");
    assert!(n > 0);
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut rest = String::new();
    conn.read_to_string(&mut rest).expect("rest of the stream");
    let all = String::from_utf8_lossy(&first[..n]).to_string() + &rest;
    assert!(
        all.contains("\"finish_reason\":\"length\""),
        "stream cut short: {all}"
    );
    let status = child.wait().expect("exit");
    assert!(status.success(), "exit status {status}");
}

/// The generated ids of a greedy request.
async fn greedy_text_ids(
    server: &TestServer,
    prompt: &str,
    max_new_tokens: usize,
) -> (Vec<u32>, String) {
    let r = server
        .http
        .post(server.url("/generate"))
        .json(&json!({"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": true}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let body: Value = r.json().await.expect("json");
    let ids = body["details"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("id") as u32)
        .collect();
    (ids, rid)
}

/// `scheduler.kv_cache_dtype: f16` stores blocks of half the bytes: the same `kv_cache_mb`
/// holds twice the blocks (on the CPU: a GPU's cache is sized from its free memory), `/info`
/// and `/metrics` say so, and greedy generation on it gives the tokens the f32 cache gives (a
/// broken conversion would not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_f16_kv_cache_holds_twice_the_blocks_and_generates_the_same_tokens() {
    use cllm::model::kv_cache::KvDtype;
    if common::test_device() != cllm::model::executor::DeviceChoice::Cpu {
        eprintln!("CPU ONLY: a GPU's KV cache is sized from device memory, not kv_cache_mb");
        return;
    }
    let prompt = "Once upon a time, there was a little girl named Lily. She loved to";
    let mut runs = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let server = TestServer::start(&stories(), |c| {
            // 5 MiB is a whole number of this model's blocks (20 KiB in f32).
            c.scheduler.kv_cache_mb = 5;
            c.scheduler.kv_cache_dtype = dtype;
        })
        .await;
        let device = server.get_json("/info").await["device"].clone();
        let metrics = server.metrics().await;
        let (ids, _) = greedy_text_ids(&server, prompt, 48).await;
        server.shutdown().await;
        runs.push((device, metrics, ids));
    }
    let [(d32, _, ids32), (d16, m16, ids16)] = &runs[..] else {
        unreachable!("two runs")
    };
    assert_eq!(d32["kv_cache_dtype"], "f32", "{d32}");
    assert_eq!(d16["kv_cache_dtype"], "f16", "{d16}");
    let blocks = |d: &Value| d["kv_cache_blocks"].as_u64().expect("blocks");
    let bytes = |d: &Value| d["kv_cache_bytes"].as_u64().expect("bytes");
    assert_eq!(blocks(d16), 2 * blocks(d32), "{d32} {d16}");
    assert_eq!(bytes(d16), bytes(d32), "the same memory either way");
    assert_eq!(
        metric_value(m16, "cllm_kv_cache_blocks"),
        blocks(d16) as f64
    );
    assert_eq!(ids32.len(), 48);
    assert_eq!(ids16, ids32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempted_sequences_resume_with_the_same_tokens() {
    // 33 blocks of 16 tokens: the least the scheduler allows for a 512-token context. Two
    // prompts of ~250 tokens fit side by side, but not once both cross token 256.
    let server = TestServer::start(&stories(), |c| c.scheduler.kv_cache_blocks = Some(33)).await;
    let mut prompts = Vec::new();
    for (i, sentence) in [
        "Tom and Lily went to the park. ",
        "The little dog ran to the big tree. ",
    ]
    .iter()
    .enumerate()
    {
        let mut text = format!("Story {i}: ");
        loop {
            if server.encode(&text).await.len() >= 236 {
                break;
            }
            text.push_str(sentence);
        }
        prompts.push(text);
    }
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(greedy_text_ids(&server, p, 40).await.0);
    }
    let together =
        futures_util::future::join_all(prompts.iter().map(|p| greedy_text_ids(&server, p, 40)))
            .await;
    let mut preempted = false;
    for ((ids, rid), alone) in together.iter().zip(&solo) {
        assert_eq!(
            ids, alone,
            "batching and preemption must not change greedy tokens"
        );
        let record: Value = server.get_json(&format!("/requests/{rid}")).await;
        preempted |= record["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["stage"] == "preempted");
    }
    // Both sequences must cross token 256 for the cache to run short; greedy decoding makes
    // that a fixed property of these prompts, checked here so the test cannot pass vacuously.
    let lengths: Vec<usize> = solo.iter().map(Vec::len).collect();
    assert!(lengths.iter().all(|&n| n >= 30), "{lengths:?}");
    assert!(
        preempted,
        "both sequences crossed token 256 in a 33-block cache: one must have been preempted"
    );
    // Stats are published by the scheduler loop: give it a moment to catch up.
    eventually("blocks returned", Duration::from_secs(5), || async {
        let h = server.health().await;
        if h["metrics"]["kv_blocks_used"] == 0 {
            Ok(())
        } else {
            Err(h.to_string())
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_scheduler_makes_health_unhealthy_with_503() {
    let server = TestServer::start(&stories(), |c| {
        c.scheduler.debug_step_delay_ms = 1500;
        c.health.stall_timeout_ms = 300;
    })
    .await;
    assert_eq!(
        server
            .http
            .get(server.url("/health"))
            .send()
            .await
            .expect("h")
            .status(),
        200
    );
    let stuck = {
        let (http, url) = (server.http.clone(), server.url("/generate"));
        tokio::spawn(async move {
            let body = json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}});
            http.post(url)
                .json(&body)
                .send()
                .await
                .expect("sent")
                .status()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = server
            .http
            .get(server.url("/health"))
            .send()
            .await
            .expect("health");
        if r.status() == 503 {
            let body: Value = r.json().await.expect("json");
            assert_eq!(body["status"], "unhealthy");
            assert_eq!(body["healthy"], false);
            assert!(body["components"]["scheduler"]["message"]
                .as_str()
                .expect("msg")
                .contains("stalled"));
            break;
        }
        assert!(Instant::now() < deadline, "health never turned unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Liveness does not depend on the scheduler.
    assert_eq!(
        server
            .http
            .get(server.url("/health/live"))
            .send()
            .await
            .expect("live")
            .status(),
        200
    );
    assert_eq!(stuck.await.expect("task"), 200);
    server.shutdown().await;
}

/// `/info`, `/health` (component `model_executor`) and `/metrics` report the device and the
/// KV cache the scheduler really has (the CPU here; the GPU when `CLLM_TEST_DEVICE=cuda`).
#[tokio::test]
async fn info_health_and_metrics_report_the_device() {
    let fx = fixture("stories260K").expect("in the repository");
    let server = TestServer::start(&fx.model_dir, |_| {}).await;
    let info = server.get_json("/info").await;
    let health = server.health().await;
    let metrics = server.metrics().await;
    let kind = info["backend"].as_str().expect("backend").to_string();
    // TGI's fields that clients read to learn what the server is.
    assert_eq!(info["model_pipeline_tag"], "text-generation");
    assert_eq!(info["max_best_of"], 1);
    assert!(info["max_input_tokens"].as_u64() < info["max_total_tokens"].as_u64());
    let on_gpu = matches!(
        common::test_device(),
        cllm::model::executor::DeviceChoice::Cuda(_)
    );
    let expected = if on_gpu { "cuda" } else { "cpu" };
    assert_eq!(kind, expected, "{info}");
    let device = &info["device"];
    assert_eq!(device["kind"], expected);
    let blocks = device["kv_cache_blocks"].as_u64().expect("kv blocks");
    assert_eq!(info["kv_cache_blocks"].as_u64(), Some(blocks));
    assert_eq!(
        health["metrics"]["kv_blocks_total"].as_u64(),
        Some(blocks),
        "/info reports the blocks the scheduler really has"
    );
    let executor = &health["components"]["model_executor"];
    assert_eq!(executor["backend"], expected);
    assert_eq!(executor["device"]["kv_cache_blocks"].as_u64(), Some(blocks));
    assert!(
        metrics.contains(&format!("cllm_device_info{{kind=\"{expected}\"")),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "cllm_kv_cache_blocks"),
        blocks as f64
    );
    if expected == "cuda" {
        assert!(
            device["memory_total_bytes"].as_u64().unwrap_or(0) > 0,
            "{device}"
        );
        assert!(metrics.contains("cllm_device_memory_total_bytes"));
        // Compute capability 9.0 and later (the emulator's sm_90): kernels launched as
        // programmatic dependent launches, unless turned off.
        let name = device["name"].as_str().unwrap_or("");
        let major = name
            .rsplit_once("(sm_")
            .and_then(|(_, arch)| arch.trim_end_matches(')').parse::<u32>().ok())
            .map(|arch| arch / 10);
        if major.is_some_and(|m| m >= 9) && std::env::var("CLLM_CUDA_PDL").as_deref() != Ok("0") {
            assert_eq!(device["dependent_launch"], true, "{device}");
        }
    } else {
        assert_eq!(device["tensor_cores"], false, "{device}");
        assert_eq!(device["dependent_launch"], false, "{device}");
    }
    assert!(device["tensor_cores"].is_boolean(), "{device}");
    assert!(device["dependent_launch"].is_boolean(), "{device}");
    server.shutdown().await;
}

/// Tokenizing a near-1 MiB body takes a long time; it must not stall the async worker that
/// received it. One worker thread: a ticker task on it keeps ticking while `/encode` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_long_prompt_is_tokenized_without_stalling_the_async_worker() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                worst = worst.max(t.elapsed());
            }
            worst
        })
    };
    let text = "Once upon a time, a little fox ran to the river. ".repeat(18_000);
    let started = Instant::now();
    let response = server.post("/encode", json!({"inputs": text})).await;
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert!(
        body["ids"].as_array().map_or(0, Vec::len) > 100_000,
        "tokenized"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = ticker.await.expect("ticker");
    assert!(
        took > Duration::from_millis(200),
        "the test needs a slow tokenization to mean anything: {took:?}"
    );
    assert!(
        worst < took / 3,
        "the worker stalled {worst:?} while /encode took {took:?}"
    );
    server.shutdown().await;
}

/// `metrics.enabled: false` means what it says: nothing is served at `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_metrics_are_not_served() {
    let server = TestServer::start(&stories(), |c| c.metrics.enabled = false).await;
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json error");
    assert_eq!(body["error_type"], "not_found", "{body}");
    server.shutdown().await;
}

/// CI has no GPU: the server on the CUDA emulator (tests/cuda_emulator): the device report,
/// golden tokens streamed as they come, and a dropped stream freeing its blocks. (Golden tokens
/// in batches and chunks run on the emulator in golden.rs; these few keep the CPU free for the
/// timing-sensitive tests beside them.)
#[test]
fn server_runs_on_the_cuda_emulator() {
    let tests = [
        "info_health_and_metrics_report_the_device",
        "stream_delivers_golden_tokens_as_they_come",
        "dropped_stream_is_cancelled_and_frees_its_kv_blocks",
    ];
    common::emulated_gpu::rerun_on_emulated_gpu(&tests, tests.len(), "forward");
}
