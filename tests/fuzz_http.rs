//! Generated request bodies against every POST endpoint of a running server: valid requests
//! mutated field by field (wrong types, missing and unknown fields, huge and negative numbers,
//! deep nesting, long strings, broken JSON, random bytes). 10,000 of them by default
//! (`CLLM_FUZZ_BODIES` to change). Every answer must be below 500, and every error a JSON
//! object in its API's shape: TGI's `{"error": string, "error_type": string}`, OpenAI's
//! `{"error": {"message": string, "type": string, ...}}` on `/v1`. The server must still answer
//! a plain request afterwards.

mod common;

use common::rng::Rng;

use common::server::TestServer;
use serde_json::{json, Map, Value};

/// The POST endpoints with one valid body each.
fn endpoints() -> Vec<(&'static str, Value)> {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    vec![
        (
            "/generate",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
        ),
        (
            "/generate_stream",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
        ),
        (
            "/",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": false}),
        ),
        ("/encode", json!({"inputs": "Hi there"})),
        ("/decode", json!({"ids": [1, 2, 3]})),
        ("/chat_tokenize", json!({"messages": messages})),
        (
            "/v1/completions",
            json!({"model": "stories260K", "prompt": "Hi", "max_tokens": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories260K", "messages": messages, "max_tokens": 2}),
        ),
    ]
}

/// A value of some other kind, or an edge value of the same kind.
fn odd_value(rng: &mut Rng) -> Value {
    match rng.index(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(-0.5),
        8 => json!(""),
        9 => json!("x".repeat(rng.index(5000))),
        10 => json!([]),
        11 => json!([1, "two", null, [3]]),
        12 => json!({}),
        13 => json!({"nested": {"deeper": [{"deepest": null}]}}),
        14 => json!("\u{0}\u{202e}\u{1F600}"),
        _ => json!(rng.next() % 100_000),
    }
}

/// Replaces, removes or adds one field somewhere in `value` (recursing into objects/arrays).
fn mutate(rng: &mut Rng, value: &mut Value, depth: usize) {
    match value {
        Value::Object(map) if !map.is_empty() && depth < 4 => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.index(5) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(format!("unknown_{}", rng.index(100)), odd_value(rng));
                }
                2 | 3 => {
                    if let Some(inner) = map.get_mut(&key) {
                        mutate(rng, inner, depth + 1);
                    }
                }
                _ => {
                    map.insert(key, odd_value(rng));
                }
            }
        }
        Value::Array(items) if !items.is_empty() && depth < 4 => {
            let i = rng.index(items.len());
            if rng.index(2) == 0 {
                mutate(rng, &mut items[i], depth + 1);
            } else {
                items[i] = odd_value(rng);
            }
        }
        other => *other = odd_value(rng),
    }
}

/// The raw bytes of one generated body for the endpoint whose valid body is `valid`.
fn body(rng: &mut Rng, valid: &Value) -> Vec<u8> {
    match rng.index(20) {
        // Not JSON at all, or broken JSON.
        0 => (0..rng.index(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let text = valid.to_string();
            text.as_bytes()[..rng.index(text.len().max(1))].to_vec()
        }
        2 => b"[]".to_vec(),
        3 => "[".repeat(1 + rng.index(3000)).into_bytes(),
        _ => {
            let mut value = valid.clone();
            for _ in 0..1 + rng.index(3) {
                mutate(rng, &mut value, 0);
            }
            // Keep generation short when a mutation leaves the body valid.
            if let Some(Value::Object(p)) = value.get_mut("parameters") {
                cap(p, "max_new_tokens");
            }
            if let Value::Object(map) = &mut value {
                cap(map, "max_tokens");
                cap(map, "n");
            }
            value.to_string().into_bytes()
        }
    }
}

/// Lowers a sane positive count to at most 3 (odd values are left for validation to refuse).
fn cap(map: &mut Map<String, Value>, key: &str) {
    if let Some(n) = map.get(key).and_then(Value::as_u64) {
        if (1..1000).contains(&n) {
            map.insert(key.to_string(), json!(n.min(3)));
        }
    }
}

/// Whether `body` is an error in the shape of the API `path` belongs to.
fn error_shape_ok(path: &str, body: &Value) -> bool {
    if path.starts_with("/v1/") {
        body["error"]["message"].is_string() && body["error"]["type"].is_string()
    } else {
        body["error"].is_string() && body["error_type"].is_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_bodies_get_no_5xx_and_errors_in_their_apis_shape() {
    let bodies: usize = std::env::var("CLLM_FUZZ_BODIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let server = std::sync::Arc::new(
        TestServer::start(&common::repo_root().join("models/stories260K"), |c| {
            c.rate_limiter.enabled = false;
        })
        .await,
    );
    let endpoints = std::sync::Arc::new(endpoints());
    let workers = 8;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (server, endpoints) = (server.clone(), endpoints.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x853c_49e6_748f_ea9b ^ ((w as u64 + 1) << 17));
            let mut failures = Vec::new();
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            for _ in 0..bodies / workers {
                let (path, valid) = rng.pick(&endpoints).clone();
                let raw = body(&mut rng, &valid);
                let content_type = if rng.index(20) == 0 {
                    "text/plain"
                } else {
                    "application/json"
                };
                let response = server
                    .http
                    .post(server.url(path))
                    .header("content-type", content_type)
                    .body(raw.clone())
                    .send()
                    .await
                    .expect("the server answers");
                let status = response.status().as_u16();
                *statuses.entry(status).or_default() += 1;
                let text = response.text().await.unwrap_or_default();
                let shown = || String::from_utf8_lossy(&raw[..raw.len().min(300)]).into_owned();
                if status >= 500 {
                    failures.push(format!("{path} {status}: {text} <- {}", shown()));
                } else if status >= 400 {
                    let ok = serde_json::from_str::<Value>(&text)
                        .is_ok_and(|body| error_shape_ok(path, &body));
                    if !ok {
                        failures.push(format!(
                            "{path} {status} bad error shape: {text} <- {}",
                            shown()
                        ));
                    }
                }
            }
            (failures, statuses)
        }));
    }
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        let (f, s) = task.await.expect("worker");
        failures.extend(f);
        for (k, v) in s {
            *statuses.entry(k).or_default() += v;
        }
    }
    common::say(&format!("fuzz: {bodies} bodies, statuses {statuses:?}"));
    assert!(
        failures.is_empty(),
        "{} failures, e.g.:\n{}",
        failures.len(),
        failures[..failures.len().min(8)].join("\n")
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "some bodies were valid"
    );
    assert!(
        statuses.keys().any(|&s| s == 400 || s == 422),
        "{statuses:?}"
    );
    // Still serving.
    let response = server
        .post(
            "/generate",
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(response.status(), 200);
}
