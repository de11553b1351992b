//! OpenAI's routes and the gateway-facing parts over raw HTTP (the Python clients check the
//! rest in `clients.rs`): error shapes per API, TGI's compat route and its new details,
//! readiness while draining, vLLM-named metrics, and the Grafana dashboard against `/metrics`.

mod common;

use common::server::{metric_value, promtool_check, sse_events, TestServer};
use common::{eventually, fixture, repo_root};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

fn stories() -> PathBuf {
    repo_root().join("models/stories260K")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_errors_take_openai_shape_and_tgi_routes_keep_theirs() {
    let server = TestServer::start(&stories(), |c| c.http.max_body_bytes = 4096).await;
    let cases = [
        (
            json!({"model": "gpt-x", "prompt": "Hi"}),
            404,
            "model",
            "model_not_found",
        ),
        (
            json!({"prompt": "Hi", "temperature": 9}),
            400,
            "temperature",
            "invalid_value",
        ),
        (
            json!({"prompt": "Hi", "max_tokens": "many"}),
            400,
            "max_tokens",
            "invalid_value",
        ),
        (
            json!({"prompt": "Hi", "echo": true}),
            400,
            "echo",
            "invalid_value",
        ),
        (json!({"prompt": [99999]}), 400, "prompt", "invalid_value"),
        (json!({"max_tokens": 3}), 400, "prompt", "invalid_value"),
        // stories260K's context is 512 tokens.
        (
            json!({"prompt": "Hi", "max_tokens": 600}),
            400,
            "prompt",
            "context_length_exceeded",
        ),
        (
            json!({"prompt": "Hi", "logprobs": 21}),
            400,
            "logprobs",
            "invalid_value",
        ),
    ];
    for (body, status, param, code) in cases {
        let r = server.post("/v1/completions", body.clone()).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let err: Value = r.json().await.expect("json");
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
        assert_eq!(err["error"]["code"], code, "{body}: {err}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Malformed JSON, an oversized body and an unknown /v1 route: OpenAI's shape too.
    let r = server
        .http
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["type"],
        "invalid_request_error"
    );
    let big = json!({"prompt": "x".repeat(10_000)});
    let r = server.post("/v1/completions", big).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "body_too_large"
    );
    let r = server.post("/v1/embeddings", json!({})).await;
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.expect("json")["error"].is_object());
    // The same bad value on TGI's route: 422 in TGI's shape.
    let r = server
        .post(
            "/generate",
            json!({"inputs": "Hi", "parameters": {"temperature": "hot"}}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let err: Value = r.json().await.expect("json");
    assert_eq!(err["error_type"], "validation");
    assert!(
        err["error"]
            .as_str()
            .expect("text")
            .contains("parameters.temperature"),
        "{err}"
    );
    let metrics = server.metrics().await;
    assert!(
        metric_value(
            &metrics,
            r#"cllm_errors_total{endpoint="/v1/completions",error_type="model_not_found"}"#
        ) >= 1.0,
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_compat_route_streams_or_answers_and_reports_top_tokens_and_prefill() {
    let fx = fixture("stories260K").expect("bundled fixture");
    let case = &fx.golden.cases[0];
    // The prompt's last token comes in a chunk of its own, after every prompt log-probability
    // was already computed: the first token's pass must still report them.
    let chunk = case.input_ids.len() - 1;
    let server = TestServer::start(&fx.model_dir, |c| c.scheduler.prefill_chunk = chunk).await;
    let params = json!({"max_new_tokens": 6, "details": true, "top_n_tokens": 2,
                        "decoder_input_details": true});
    let r = server
        .post("/", json!({"inputs": case.prompt, "parameters": params}))
        .await;
    assert_eq!(r.status(), 200);
    // TGI answers the compat route with a one-element list.
    let body: Value = r.json().await.expect("json");
    let body = match body.as_array().map(Vec::as_slice) {
        Some([only]) => only.clone(),
        _ => panic!("expected a one-element list, got {body}"),
    };
    // As TGI for a text-generation model, the compat route returns the prompt too unless
    // `return_full_text` says otherwise.
    let text = body["generated_text"].as_str().expect("text");
    assert!(
        text.len() > case.prompt.len() && text.starts_with(&case.prompt),
        "{text}"
    );
    let details = &body["details"];
    let ids: Vec<u64> = details["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("id"))
        .collect();
    let golden: Vec<u64> = case.output_ids[..6].iter().map(|&i| i as u64).collect();
    assert_eq!(ids, golden);
    let prefill = details["prefill"].as_array().expect("prefill");
    let prefill_ids: Vec<u64> = prefill
        .iter()
        .map(|t| t["id"].as_u64().expect("id"))
        .collect();
    let input: Vec<u64> = case.input_ids.iter().map(|&i| i as u64).collect();
    assert_eq!(prefill_ids, input);
    assert!(prefill[0]["logprob"].is_null());
    assert!(prefill[1..]
        .iter()
        .all(|t| t["logprob"].as_f64().is_some_and(|l| l <= 0.0)));
    let top = details["top_tokens"].as_array().expect("top_tokens");
    assert_eq!(top.len(), 6);
    for (token, alternatives) in details["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .zip(top)
    {
        let alternatives = alternatives.as_array().expect("list");
        assert_eq!(alternatives.len(), 2);
        assert_eq!(
            alternatives[0]["id"], token["id"],
            "greedy takes the most likely"
        );
        assert_eq!(alternatives[0]["logprob"], token["logprob"]);
        assert!(alternatives[0]["logprob"].as_f64() >= alternatives[1]["logprob"].as_f64());
    }
    // "stream": true on the same route answers with SSE events.
    let r = server
        .post(
            "/",
            json!({"inputs": case.prompt, "stream": true, "parameters": {"max_new_tokens": 4}}),
        )
        .await;
    assert!(r.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/event-stream"));
    // A proxy in front (nginx) is told not to buffer the stream.
    assert_eq!(r.headers()["x-accel-buffering"], "no");
    let events = sse_events(&r.text().await.expect("body"));
    assert_eq!(events.len(), 4);
    assert!(events
        .iter()
        .all(|e| e["token"]["logprob"].as_f64().is_some()));
    // The last event's details, as TGI's StreamDetails: with the prompt's length.
    let details = &events[3]["details"];
    assert_eq!(details["generated_tokens"], 4);
    assert_eq!(details["input_length"], case.input_ids.len());
    let streamed = events[3]["generated_text"].as_str().expect("text");
    assert!(streamed.starts_with(&case.prompt), "{streamed}");
    let params = json!({"max_new_tokens": 4, "return_full_text": false});
    let r = server
        .post("/", json!({"inputs": case.prompt, "parameters": params}))
        .await;
    let body: Value = r.json().await.expect("json");
    let text = body[0]["generated_text"].as_str().expect("text");
    assert_eq!(text, &streamed[case.prompt.len()..]);
    // A prompt-token report has no place in a stream: refused, as TGI does.
    let params = json!({"max_new_tokens": 4, "decoder_input_details": true});
    let r = server
        .post(
            "/generate_stream",
            json!({"inputs": "Hi", "parameters": params}),
        )
        .await;
    assert_eq!(r.status(), 422);
    // `GET /` and `GET /ping` are health checks in TGI.
    for path in ["/", "/ping"] {
        let r = server.get(path).await;
        assert_eq!(r.status(), 200, "{path}");
        let body: Value = r.json().await.expect("json");
        assert!(body["components"].is_object(), "{path}: {body}");
    }
    // The fields of TGI's /info that its OpenAPI schema requires.
    let info = server.get_json("/info").await;
    for field in [
        "model_id",
        "model_sha",
        "model_dtype",
        "model_device_type",
        "model_pipeline_tag",
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
        "router",
        "version",
        "sha",
        "docker_label",
    ] {
        assert!(info.get(field).is_some(), "{field} in {info}");
    }
    server.shutdown().await;
}

/// A known path with the wrong method is 405 in its API's error shape, naming the method, with
/// the methods it takes in `Allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405_in_each_apis_shape() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let client = reqwest::Client::new();
    let r = client
        .get(server.url("/generate"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error_type"], "method_not_allowed");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("GET")));
    let r = client
        .delete(server.url("/v1/models"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

/// TGI's `/tokenize`: `/encode`'s ids, each with the text its byte offsets cover; a generate
/// body's `parameters` are accepted (`truncate` keeps the last tokens); `add_special_tokens:
/// false` leaves out the BOS token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tgi_tokenize_lists_tokens_with_their_offsets() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let text = "Once upon a time, there was a cat.";
    let listed = |body: Value| -> Vec<(u64, String, usize, usize)> {
        body.as_array()
            .unwrap_or_else(|| panic!("a list, got {body}"))
            .iter()
            .map(|t| {
                let n = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("{k} in {t}"));
                let text = t["text"].as_str().expect("text").to_string();
                (n("id"), text, n("start") as usize, n("stop") as usize)
            })
            .collect()
    };
    let r = server
        .post(
            "/tokenize",
            json!({"inputs": text, "parameters": {"max_new_tokens": 3}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let tokens = listed(r.json().await.expect("json"));
    let encoded: Value = server
        .post("/encode", json!({"inputs": text}))
        .await
        .json()
        .await
        .expect("json");
    let ids: Vec<u64> = tokens.iter().map(|t| t.0).collect();
    assert_eq!(json!(ids), encoded["ids"]);
    let mut previous_stop = 0;
    for (_, piece, start, stop) in &tokens {
        assert!(start <= stop && *stop <= text.len() && *start >= previous_stop.min(*start));
        assert_eq!(piece, &text[*start..*stop]);
        previous_stop = *stop;
    }
    assert_eq!(previous_stop, text.len(), "the last token ends the text");
    let r = server
        .post(
            "/tokenize",
            json!({"inputs": text, "add_special_tokens": false}),
        )
        .await;
    let plain = listed(r.json().await.expect("json"));
    assert_eq!(plain.len() + 1, tokens.len(), "no BOS");
    assert_eq!(plain[..], tokens[1..]);
    // `parameters.truncate` keeps the last tokens, as generation would.
    let r = server
        .post(
            "/tokenize",
            json!({"inputs": text, "parameters": {"truncate": 3}}),
        )
        .await;
    let last = listed(r.json().await.expect("json"));
    assert_eq!(last[..], tokens[tokens.len() - 3..]);
    let r = server
        .post(
            "/tokenize",
            json!({"inputs": text, "parameters": {"truncate": 0}}),
        )
        .await;
    assert_eq!(r.status(), 422, "as /generate refuses it");
    // Bad input keeps TGI's error shape.
    let r = server.post("/tokenize", json!({"text": text})).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error_type"], "validation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_503_while_draining_and_requests_still_finish() {
    let server = TestServer::start(&stories(), |c| c.http.shutdown_delay_ms = 1500).await;
    let ready = server.get_json("/health/ready").await;
    assert_eq!(ready["status"], "ready");
    let base = server.base.clone();
    let http = server.http.clone();
    let stopping = tokio::spawn(server.shutdown());
    let body = eventually("never not ready", Duration::from_secs(1), || async {
        let r = http
            .get(format!("{base}/health/ready"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match r.status().as_u16() {
            503 => Ok(r.json::<Value>().await.map_err(|e| e.to_string())?),
            other => Err(format!("status {other}")),
        }
    })
    .await;
    assert_eq!(body["status"], "draining");
    // Still serving during the shutdown delay.
    let r = http
        .post(format!("{base}/generate"))
        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    stopping.await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_compatible_metrics_are_opt_in() {
    let plain = TestServer::start(&stories(), |_| {}).await;
    assert!(!plain.metrics().await.contains("vllm:"));
    plain.shutdown().await;

    let server = TestServer::start(&stories(), |c| c.metrics.vllm_compatible = true).await;
    let r = server
        .post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 3}))
        .await;
    assert_eq!(r.status(), 200);
    let text = server.metrics().await;
    let label = r#"{model_name="stories260K"}"#;
    for name in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ] {
        assert!(
            text.contains(&format!("{name}{label}")),
            "{name} missing:\n{text}"
        );
    }
    let usage = metric_value(&text, &format!("vllm:kv_cache_usage_perc{label}"));
    assert!((0.0..=1.0).contains(&usage));
    let info = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .expect("cache_config_info");
    assert!(
        info.contains(r#"block_size="16""#) && info.contains("num_gpu_blocks=\""),
        "{info}"
    );
    assert!(info.ends_with(" 1"), "{info}");
    promtool_check(&text);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_leaves_is_counted() {
    let server = TestServer::start(&stories(), |c| c.scheduler.debug_step_delay_ms = 10).await;
    let mut r = server
        .post(
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 200, "stream": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.chunk().await.expect("a chunk");
    drop(r);
    let series = r#"cllm_requests_total{endpoint="/v1/completions",status="499"}"#;
    eventually(
        "the left stream was not counted",
        Duration::from_secs(3),
        || async {
            let v = metric_value(&server.metrics().await, series);
            if v == 1.0 {
                Ok(())
            } else {
                Err(format!("{series} = {v}"))
            }
        },
    )
    .await;
    server.shutdown().await;
}
