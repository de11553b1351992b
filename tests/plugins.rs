//! Policy plugins end to end: real `.wasm` components dropped into the watched folder of a
//! running server. Hot load, config change, removal, isolation of faulty plugins, refusal of
//! bad files, and a hot swap under load.

mod common;

use common::server::{metric_value, TestServer};
use common::wasm::{plugin_wasm, python_plugin_wasm};
use common::{eventually, repo_root};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn stories() -> PathBuf {
    repo_root().join("models/stories260K")
}

/// Writes `bytes` as `dir/name` the way editors do: a temporary file, then a rename.
fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

fn put_plugin(dir: &Path, name: &str, plugin: &str) {
    put(
        dir,
        name,
        &std::fs::read(plugin_wasm(plugin)).expect("built plugin"),
    );
}

async fn plugins(server: &TestServer) -> Vec<Value> {
    let body: Value = server.get_json("/plugins").await;
    body["plugins"].as_array().cloned().unwrap_or_default()
}

/// Waits until `/plugins` shows `file` in `state` (or, with state "absent", not at all).
async fn wait_for(server: &TestServer, file: &str, state: &str) -> Value {
    let what = format!("{file} never became {state}");
    eventually(&what, Duration::from_secs(5), || async {
        let list = plugins(server).await;
        match list.iter().find(|p| p["file"] == file) {
            None if state == "absent" => Ok(Value::Null),
            Some(p) if p["state"] == state => Ok(p.clone()),
            _ => Err(format!("{list:?}")),
        }
    })
    .await
}

async fn generate_as(
    server: &TestServer,
    client: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = server
        .http
        .post(server.url("/generate"))
        .header("x-client-id", client)
        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("sent")
}

/// Sends `/generate` as `client` until it answers `status` (within 3 s).
async fn until_status(server: &TestServer, client: &str, status: u16, what: &str) {
    eventually(what, Duration::from_secs(3), || async {
        match generate_as(server, client, &[]).await.status().as_u16() {
            s if s == status => Ok(()),
            other => Err(format!("status {other}")),
        }
    })
    .await;
}

async fn start_with_plugins(
    dir: &Path,
    tweak: impl FnOnce(&mut cllm::config::ServerConfig),
) -> TestServer {
    let dir = dir.to_path_buf();
    TestServer::start(&stories(), move |c| {
        c.plugins.dir = Some(dir);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_dropped_in_limits_within_a_second_and_config_changes_apply() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    // The built-in limit must not be what answers 429 here.
    let server = start_with_plugins(&dir, |c| c.rate_limiter.max_requests = 1_000_000).await;
    for _ in 0..5 {
        assert_eq!(
            generate_as(&server, "alice", &[]).await.status(),
            200,
            "built-in limit is generous"
        );
    }
    put(
        &dir,
        "limiter.json",
        br#"{"rate_per_sec": 0.01, "burst": 3}"#,
    );
    let dropped = Instant::now();
    put_plugin(&dir, "limiter.wasm", "token-bucket");
    let limited = loop {
        let r = generate_as(&server, "alice", &[]).await;
        if r.status() == 429 {
            break r;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(1),
            "no 429 within a second of the drop"
        );
    };
    assert!(dropped.elapsed() < Duration::from_secs(1));
    assert!(limited.headers().contains_key("retry-after"));
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error_type"], "rate_limited");
    assert!(
        body["error"]
            .as_str()
            .expect("msg")
            .contains("limiter.wasm"),
        "{body}"
    );
    assert_eq!(
        generate_as(&server, "bob", &[]).await.status(),
        200,
        "other clients keep their own bucket"
    );

    // A bigger burst in the sidecar config reloads the plugin (fresh buckets, new limit).
    put(
        &dir,
        "limiter.json",
        br#"{"rate_per_sec": 0.01, "burst": 50}"#,
    );
    until_status(&server, "alice", 200, "config change did not apply").await;
    for _ in 0..10 {
        assert_eq!(generate_as(&server, "alice", &[]).await.status(), 200);
    }
    let listed = wait_for(&server, "limiter.wasm", "active").await;
    assert_eq!(listed["kind"], "rate_limiter");
    assert_eq!(listed["world_version"], "0.2.0");
    assert_eq!(listed["sha256"].as_str().expect("sha").len(), 64);
    assert!(listed["calls"].as_u64().expect("calls") >= 10);

    // Deleting the file restores the built-in policy.
    std::fs::remove_file(dir.join("limiter.wasm")).expect("rm");
    wait_for(&server, "limiter.wasm", "absent").await;
    server.shutdown().await;
}

/// A server whose token-bucket plugin allows each client `tokens_per_minute` generated tokens.
async fn start_with_token_budget(
    tmp: &Path,
    tokens_per_minute: u32,
    tweak: impl FnOnce(&mut cllm::config::ServerConfig),
) -> TestServer {
    let dir = tmp.join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config =
        json!({"rate_per_sec": 1000, "burst": 1000, "tokens_per_minute": tokens_per_minute});
    put(&dir, "budget.json", config.to_string().as_bytes());
    put_plugin(&dir, "budget.wasm", "token-bucket");
    let server = start_with_plugins(&dir, tweak).await;
    wait_for(&server, "budget.wasm", "active").await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_is_charged_from_record_usage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_with_token_budget(tmp.path(), 5, |_| {}).await;
    // Each request generates 2 tokens: the third one finds the budget of 5 spent.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(generate_as(&server, "carol", &[]).await.status().as_u16());
    }
    assert_eq!(&statuses[..3], [200, 200, 200], "{statuses:?}");
    assert_eq!(statuses[3], 429, "{statuses:?}");
    server.shutdown().await;
}

/// Completion order of a low- and a high-tier request queued behind a running stream, on
/// TGI's routes or (`openai`) OpenAI's.
async fn tier_order(server: &TestServer, openai: bool) -> (Instant, Instant) {
    let (stream_path, path) = if openai {
        ("/v1/completions", "/v1/completions")
    } else {
        ("/generate_stream", "/generate")
    };
    let (blocker_body, body) = if openai {
        (
            json!({"prompt": "Once upon a time", "max_tokens": 25, "stream": true}),
            json!({"prompt": "Hi", "max_tokens": 3}),
        )
    } else {
        (
            json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 25}}),
            json!({"inputs": "Hi", "parameters": {"max_new_tokens": 3}}),
        )
    };
    let blocker = server
        .http
        .post(server.url(stream_path))
        .header("x-client-id", "blocker")
        .json(&blocker_body)
        .send()
        .await
        .expect("sent");
    assert_eq!(blocker.status(), 200);
    let send = |tier: &'static str, delay_ms: u64| {
        let (http, url, body) = (server.http.clone(), server.url(path), body.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let r = http
                .post(url)
                .header("x-tier", tier)
                .header("x-client-id", tier)
                .json(&body)
                .send()
                .await
                .expect("sent");
            assert_eq!(r.status(), 200);
            Instant::now()
        })
    };
    let bronze = send("bronze", 30);
    let gold = send("gold", 90);
    let order = (bronze.await.expect("bronze"), gold.await.expect("gold"));
    drop(blocker);
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_priority_reorders_the_queue_and_removal_restores_arrival_order() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put(
        &dir,
        "tiers.json",
        br#"{"tiers": {"gold": 100, "bronze": 0}, "default": 0}"#,
    );
    put_plugin(&dir, "tiers.wasm", "tiered-priority");
    let server = start_with_plugins(&dir, |c| {
        c.scheduler.max_running_sequences = 1;
        c.scheduler.debug_step_delay_ms = 15;
    })
    .await;
    wait_for(&server, "tiers.wasm", "active").await;
    let (bronze, gold) = tier_order(&server, false).await;
    assert!(gold < bronze, "gold, queued later, should be served first");
    std::fs::remove_file(dir.join("tiers.wasm")).expect("rm");
    wait_for(&server, "tiers.wasm", "absent").await;
    let (bronze, gold) = tier_order(&server, false).await;
    assert!(bronze < gold, "without the plugin, arrival order rules");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_health_verdict_appears_in_health() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "qh.wasm", "queue-health");
    let server = start_with_plugins(&dir, |_| {}).await;
    wait_for(&server, "qh.wasm", "active").await;
    let health = server.health().await;
    let checks = &health["components"]["policy"]["checks"];
    assert_eq!(checks[0]["plugin"], "qh.wasm", "{health}");
    assert_eq!(checks[0]["status"], "ok", "{health}");
    assert_eq!(health["status"], "ok");
    // A threshold every queue exceeds: the plugin says degraded, and so does /health (still 200).
    put(&dir, "qh.json", br#"{"queue_fraction": 0.0}"#);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = server
            .http
            .get(server.url("/health"))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
        let health: Value = r.json().await.expect("json");
        if health["status"] == "degraded" {
            let check = &health["components"]["policy"]["checks"][0];
            assert_eq!(check["status"], "degraded");
            assert!(!check["message"].as_str().expect("message").is_empty());
            break;
        }
        assert!(Instant::now() < deadline, "verdict never changed: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looping_trapping_and_memory_eating_plugins_are_cut_off() {
    for plugin in ["loop-forever", "trap", "grow-memory"] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("plugins");
        let server = start_with_plugins(&dir, |c| {
            c.plugins.max_consecutive_faults = 3;
            c.plugins.memory_limit_mb = 16;
        })
        .await;
        put_plugin(&dir, "bad.wasm", plugin);
        wait_for(&server, "bad.wasm", "active").await;
        for i in 0..4 {
            let started = Instant::now();
            let r = generate_as(&server, "victim", &[]).await;
            assert_eq!(
                r.status(),
                200,
                "{plugin}: fail-open lets request {i} through"
            );
            assert!(
                started.elapsed() < Duration::from_millis(1500),
                "{plugin}: request {i} took {:?}",
                started.elapsed()
            );
        }
        let listed = wait_for(&server, "bad.wasm", "disabled").await;
        assert!(
            listed["faults"].as_u64().expect("faults") >= 3,
            "{plugin}: {listed}"
        );
        let metrics = server.metrics().await;
        assert!(
            metrics.contains("cllm_plugin_faults_total{"),
            "{plugin}: faults not counted"
        );
        // Disabled, it is no longer called: requests are fast and fine.
        let started = Instant::now();
        assert_eq!(generate_as(&server, "victim", &[]).await.status(), 200);
        assert!(started.elapsed() < Duration::from_millis(500));
        // It stays disabled while nobody touches its file (the server's own reads of the
        // folder are no reason to load it again)...
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listed = wait_for(&server, "bad.wasm", "disabled").await;
        assert!(listed["faults"].as_u64() >= Some(3), "{plugin}: {listed}");
        // ... and writing the same file again is how an operator re-enables it: a fresh
        // instance.
        put_plugin(&dir, "bad.wasm", plugin);
        let listed = wait_for(&server, "bad.wasm", "active").await;
        assert_eq!(listed["faults"], 0, "{plugin}: {listed}");
        server.shutdown().await;
    }
}

/// A plugin's first call on a fresh instance (a Python interpreter setting itself up) can be
/// much slower than its warm calls: the load-time trial call has the instantiate deadline, not
/// the 5 ms call deadline, and the warm calls after it still have theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_call_passes_its_trial_and_later_calls_keep_the_call_deadline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    let server = start_with_plugins(&dir, |c| {
        assert_eq!(c.plugins.call_deadline_ms, 5, "the default call deadline");
    })
    .await;
    put_plugin(&dir, "slow.wasm", "slow-start");
    let listed = wait_for(&server, "slow.wasm", "active").await;
    assert_eq!(listed["faults"], 0, "{listed}");
    until_status(&server, "blocked", 429, "the warm plugin rejects `blocked`").await;
    assert_eq!(generate_as(&server, "someone", &[]).await.status(), 200);
    let listed = wait_for(&server, "slow.wasm", "active").await;
    assert_eq!(
        listed["faults"], 0,
        "warm calls are within the deadline: {listed}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_limiter_faults_answer_503_policy_unavailable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    let server = start_with_plugins(&dir, |c| {
        c.plugins.limiter_failure_mode = cllm::config::FailureMode::FailClosed;
        c.plugins.max_consecutive_faults = 100;
    })
    .await;
    put_plugin(&dir, "bad.wasm", "trap");
    wait_for(&server, "bad.wasm", "active").await;
    let r = generate_as(&server, "victim", &[]).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error_type"], "policy_unavailable");
    server.shutdown().await;
}

/// `cllm_plugin_decisions_total` for one plugin, decision and mode (labels in any order).
fn decisions(metrics: &str, plugin: &str, decision: &str, mode: &str) -> f64 {
    let want = [
        format!("plugin=\"{plugin}\""),
        format!("decision=\"{decision}\""),
        format!("mode=\"{mode}\""),
    ];
    metrics
        .lines()
        .find(|l| {
            l.starts_with("cllm_plugin_decisions_total{") && want.iter().all(|w| l.contains(w))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `plugins.shadow`: a deny-all limiter in shadow mode lets every request through and counts
/// each would-be rejection; a shadow prioritizer is called and counted; a trapping shadow
/// limiter fails nothing even with
/// `limiter_failure_mode: fail_closed`; the same deny-all file under a name not in the list
/// enforces (429), and its rejections are counted as enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_plugins_count_their_verdicts_without_enforcing_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    let server = start_with_plugins(&dir, |c| {
        c.plugins.shadow = vec!["deny.wasm".into(), "broken".into(), "tiers".into()];
        c.plugins.limiter_failure_mode = cllm::config::FailureMode::FailClosed;
        c.plugins.max_consecutive_faults = 1000;
    })
    .await;
    put_plugin(&dir, "deny.wasm", "deny_all");
    put_plugin(&dir, "broken.wasm", "trap");
    let view = wait_for(&server, "deny.wasm", "shadow").await;
    assert_eq!(view["kind"], "rate_limiter", "{view}");
    wait_for(&server, "broken.wasm", "shadow").await;
    put_plugin(&dir, "tiers.wasm", "tiered_priority");
    wait_for(&server, "tiers.wasm", "shadow").await;
    for i in 0..5 {
        let r = generate_as(&server, &format!("client-{i}"), &[]).await;
        assert_eq!(r.status(), 200, "shadow verdicts are not enforced");
    }
    let metrics = server.metrics().await;
    assert_eq!(
        decisions(&metrics, "deny.wasm", "reject", "shadow"),
        5.0,
        "{metrics}"
    );
    assert_eq!(decisions(&metrics, "deny.wasm", "reject", "enforce"), 0.0);
    assert_eq!(decisions(&metrics, "tiers.wasm", "priority", "shadow"), 5.0);
    assert!(
        metric_value(
            &metrics,
            "cllm_plugin_faults_total{plugin=\"broken.wasm\",kind=\"rate_limiter\",fault=\"trap\"}"
        ) >= 5.0,
        "the shadow plugin's faults are still counted: {metrics}"
    );

    put_plugin(&dir, "enforced.wasm", "deny_all");
    wait_for(&server, "enforced.wasm", "active").await;
    let r = generate_as(&server, "client-x", &[]).await;
    assert_eq!(r.status(), 429);
    let metrics = server.metrics().await;
    assert_eq!(
        decisions(&metrics, "enforced.wasm", "reject", "enforce"),
        1.0
    );
    assert_eq!(
        decisions(&metrics, "deny.wasm", "reject", "shadow"),
        6.0,
        "shadow plugins see every request, refused ones too"
    );
    server.shutdown().await;
}

/// Compiled plugins are kept on disk: a restarted server loads the plugin from the cache
/// (`cllm_plugin_compile_cache_total{result="hit"}`) and it works; a corrupt entry (garbage,
/// or one flipped bit) is compiled again (`result="error"`), the plugin still loads, and the
/// rewritten entry serves the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_on_disk_across_restarts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "limiter.wasm", "deny-all");
    let cache = |m: &str, result: &str| {
        metric_value(
            m,
            &format!("cllm_plugin_compile_cache_total{{result=\"{result}\"}}"),
        )
    };
    // Starts a server on the folder, checks the plugin works, returns its metrics text.
    let run = || async {
        let server = start_with_plugins(&dir, |_| {}).await;
        wait_for(&server, "limiter.wasm", "active").await;
        assert_eq!(generate_as(&server, "c", &[]).await.status(), 429);
        let metrics = server.metrics().await;
        server.shutdown().await;
        metrics
    };
    let first = run().await;
    assert_eq!((cache(&first, "miss"), cache(&first, "hit")), (1.0, 0.0));
    let entries: Vec<PathBuf> = std::fs::read_dir(dir.join(".cache"))
        .expect("the cache folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");

    let second = run().await;
    assert_eq!((cache(&second, "miss"), cache(&second, "hit")), (0.0, 1.0));

    std::fs::write(&entries[0], b"not machine code").expect("corrupt the entry");
    let third = run().await;
    assert_eq!((cache(&third, "error"), cache(&third, "hit")), (1.0, 0.0));
    let fourth = run().await;
    assert_eq!(cache(&fourth, "hit"), 1.0, "the entry was rewritten");

    // Damage that keeps wasmtime's header intact (a bit flipped in the code, as a torn write
    // or a bad disk leaves it) is caught by the entry's checksum, not run.
    let mut entry = std::fs::read(&entries[0]).expect("read the entry");
    let middle = entry.len() / 2;
    entry[middle] ^= 0x40;
    std::fs::write(&entries[0], &entry).expect("damage the entry");
    let fifth = run().await;
    assert_eq!((cache(&fifth, "error"), cache(&fifth, "hit")), (1.0, 0.0));
    let sixth = run().await;
    assert_eq!(cache(&sixth, "hit"), 1.0, "the entry was rewritten again");
}

/// A full disk under the compiled-plugin cache (every file the process writes capped at
/// 128 KiB, under the size of a compiled entry): plugins still load and hot-swap, compiled in
/// memory (`result="error"`), no partial entry is left behind, and once there is room again
/// the next start fills the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_compile_cache_changes_only_the_cache() {
    use common::process::ServeProcess;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "limiter.wasm", "deny-all");
    let dir_arg = dir.display().to_string();
    let args = ["--plugins-dir", dir_arg.as_str()];
    let client = reqwest::Client::new();
    let cache_total = |server: &ServeProcess, result: &'static str| {
        let request = client.get(server.url("/metrics"));
        async move {
            let text = request
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text");
            let series = format!("cllm_plugin_compile_cache_total{{result=\"{result}\"}}");
            metric_value(&text, &series)
        }
    };
    let status_of_generate = |server: &ServeProcess| {
        let request = client
            .post(server.url("/generate"))
            .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}));
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    let cache_files = || -> Vec<String> {
        std::fs::read_dir(dir.join(".cache"))
            .map(|entries| {
                let names = entries.flatten().map(|e| e.file_name());
                names.map(|n| n.to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default()
    };

    let full = ServeProcess::start_with_file_limit(tmp.path(), "full", &args, 128);
    assert_eq!(status_of_generate(&full).await, 429, "deny-all loaded");
    assert_eq!(cache_total(&full, "error").await, 1.0);
    // A hot swap while the disk is full.
    put_plugin(&dir, "limiter.wasm", "allow-all");
    eventually("allow-all loaded", Duration::from_secs(5), || async {
        match status_of_generate(&full).await {
            200 => Ok(()),
            other => Err(format!("status {other}")),
        }
    })
    .await;
    assert_eq!(cache_total(&full, "error").await, 2.0);
    assert_eq!(cache_files(), Vec::<String>::new(), "nothing half-written");
    let log = full.log();
    assert!(
        log.contains("cannot write the compiled plugin cache"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    drop(full);

    let roomy = ServeProcess::start(tmp.path(), "roomy", &args);
    assert_eq!(status_of_generate(&roomy).await, 200);
    assert_eq!(cache_total(&roomy, "miss").await, 1.0);
    let files = cache_files();
    assert!(
        files.len() == 1 && files[0].ends_with(".cwasm"),
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_refused_and_the_previous_policy_stays() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "policy.wasm", "deny-all");
    let server = start_with_plugins(&dir, |_| {}).await;
    let listed = wait_for(&server, "policy.wasm", "active").await;
    assert_eq!(listed["world_version"], "0.2.0", "{listed}");
    assert_eq!(generate_as(&server, "dave", &[]).await.status(), 429);
    let allow = std::fs::read(plugin_wasm("allow-all")).expect("allow-all");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "corrupt",
            b"\0asm this is not a component at all".to_vec(),
            "not a valid",
        ),
        (
            "truncated",
            allow[..allow.len() / 2].to_vec(),
            "not a valid",
        ),
        (
            "wrong world",
            std::fs::read(plugin_wasm("wrong-world")).expect("wrong-world"),
            "none of cllm's worlds",
        ),
        (
            "two worlds",
            std::fs::read(plugin_wasm("two-worlds")).expect("two-worlds"),
            "exports several cllm:policy interfaces",
        ),
        (
            "future major",
            std::fs::read(plugin_wasm("future-major")).expect("future-major"),
            "unsupported version",
        ),
        (
            "foreign import",
            std::fs::read(plugin_wasm("foreign-import")).expect("foreign-import"),
            "imports cllm-test:foreign/vault, which cllm does not offer",
        ),
    ];
    let refused = r#"cllm_plugin_reloads_total{plugin="policy.wasm",result="refused"}"#;
    for (done, (what, bytes, reason)) in cases.into_iter().enumerate() {
        put(&dir, "policy.wasm", &bytes);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Two cases share a reason, so the listing alone cannot tell this refusal from the
        // last one: wait for this one to be counted (it is counted before it is listed).
        // Each refusal is counted exactly once, by plugin.
        while metric_value(&server.metrics().await, refused) < (done + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "{what}: never counted as refused"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            metric_value(&server.metrics().await, refused),
            (done + 1) as f64,
            "{what}: counted once"
        );
        let listed = loop {
            let list = plugins(&server).await;
            let entry = list
                .iter()
                .find(|p| p["file"] == "policy.wasm")
                .cloned()
                .expect("listed");
            if entry["reason"].as_str().is_some_and(|r| r.contains(reason)) {
                break entry;
            }
            assert!(Instant::now() < deadline, "{what}: never refused: {entry}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            listed["state"], "active",
            "{what}: the previous policy stays active: {listed}"
        );
        assert_eq!(
            generate_as(&server, "dave", &[]).await.status(),
            429,
            "{what}: deny-all still applies"
        );
    }
    // A new file renamed into place is picked up, once.
    let loaded = r#"cllm_plugin_reloads_total{plugin="renamed.wasm",result="loaded"}"#;
    let before = metric_value(&server.metrics().await, loaded);
    put(&dir, "renamed.wasm", &allow);
    let listed = wait_for(&server, "renamed.wasm", "active").await;
    assert_eq!(
        listed["world_version"], "0.1.0",
        "0.1.0 plugins still load: {listed}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric_value(&server.metrics().await, loaded) - before,
        1.0,
        "renamed file loaded exactly once"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_no_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let allow = std::fs::read(plugin_wasm("allow-all")).expect("allow-all");
    let deny = std::fs::read(plugin_wasm("deny-all")).expect("deny-all");
    put(&dir, "swap.wasm", &allow);
    let server = start_with_plugins(&dir, |c| {
        c.rate_limiter.enabled = false;
        c.scheduler.max_running_sequences = 64;
    })
    .await;
    wait_for(&server, "swap.wasm", "active").await;
    // The clients keep sending until the last swap is written, so every swap lands under load
    // however fast the requests are answered.
    let swapping = Arc::new(AtomicBool::new(true));
    let swapper = {
        let (dir, swapping) = (dir.clone(), swapping.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                put(&dir, "swap.wasm", if i % 2 == 0 { &deny } else { &allow });
            }
            // Time to load the last one while requests still flow.
            tokio::time::sleep(Duration::from_millis(200)).await;
            swapping.store(false, Ordering::Relaxed);
        })
    };
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (http, url) = (server.http.clone(), server.url("/generate"));
            let swapping = swapping.clone();
            tokio::spawn(async move {
                let mut counts = [0u32; 3]; // 200, 429, other
                while swapping.load(Ordering::Relaxed) {
                    let r = http
                        .post(&url)
                        .header("x-client-id", format!("worker-{w}"))
                        .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 1}}))
                        .send()
                        .await
                        .expect("sent");
                    match r.status().as_u16() {
                        200 => counts[0] += 1,
                        429 => {
                            let body: Value = r.json().await.expect("json");
                            assert!(
                                body["error"].as_str().expect("msg").contains("deny-all"),
                                "{body}"
                            );
                            counts[1] += 1;
                        }
                        _ => counts[2] += 1,
                    }
                }
                counts
            })
        })
        .collect();
    let mut total = [0u32; 3];
    for w in workers {
        let c = w.await.expect("worker");
        for i in 0..3 {
            total[i] += c[i];
        }
    }
    swapper.await.expect("swapper");
    assert_eq!(total[2], 0, "responses other than 200/429: {total:?}");
    // Both policies were in force while requests flowed (the swaps overlap the load).
    assert!(total[0] > 0 && total[1] > 0, "{total:?}");
    // The server answered and counted exactly what the clients saw: nothing lost, nothing extra.
    let metrics = server.metrics().await;
    let answered = |status: u16| {
        metric_value(
            &metrics,
            &format!(r#"cllm_requests_total{{endpoint="/generate",status="{status}"}}"#),
        )
    };
    assert_eq!(
        (answered(200), answered(429)),
        (f64::from(total[0]), f64::from(total[1])),
        "{total:?}"
    );
    // The swaps were loaded while the load ran (close ones may coalesce in the quiet period).
    let loaded = r#"cllm_plugin_reloads_total{plugin="swap.wasm",result="loaded"}"#;
    assert!(metric_value(&metrics, loaded) >= 2.0, "{metrics}");
    server.shutdown().await;
}

fn chat_template() -> PathBuf {
    repo_root().join("tests/fixtures/chat_templates/llama3-style.jinja")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_and_prioritizer_plugins_apply_to_the_openai_routes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put(
        &dir,
        "limiter.json",
        br#"{"rate_per_sec": 0.01, "burst": 2}"#,
    );
    put_plugin(&dir, "limiter.wasm", "token-bucket");
    put(
        &dir,
        "tiers.json",
        br#"{"tiers": {"gold": 100, "bronze": 0}, "default": 0}"#,
    );
    put_plugin(&dir, "tiers.wasm", "tiered-priority");
    let server = start_with_plugins(&dir, |c| {
        c.model.chat_template = Some(chat_template());
        c.scheduler.max_running_sequences = 1;
        c.scheduler.debug_step_delay_ms = 15;
    })
    .await;
    wait_for(&server, "limiter.wasm", "active").await;
    wait_for(&server, "tiers.wasm", "active").await;
    let chat = |client: &'static str| {
        server
            .http
            .post(server.url("/v1/chat/completions"))
            .header("x-client-id", client)
            .json(&json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}))
            .send()
    };
    assert_eq!(chat("dave").await.expect("sent").status(), 200);
    assert_eq!(chat("dave").await.expect("sent").status(), 200);
    let limited = chat("dave").await.expect("sent");
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let body: Value = limited.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("limiter.wasm"));

    // Priority: behind a running stream, a gold request sent later finishes first.
    let (bronze, gold) = tier_order(&server, true).await;
    assert!(gold < bronze, "gold, queued later, should be served first");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_openai_stream_is_still_charged_through_record_usage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server =
        start_with_token_budget(tmp.path(), 10, |c| c.scheduler.debug_step_delay_ms = 10).await;
    let mut stream = server
        .http
        .post(server.url("/v1/completions"))
        .header("x-client-id", "erin")
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 200, "stream": true}))
        .send()
        .await
        .expect("sent");
    assert_eq!(stream.status(), 200);
    // Read until well past the budget of 10 tokens, then hang up.
    let mut body = String::new();
    while body.matches("\"text\"").count() < 15 {
        let chunk = stream.chunk().await.expect("chunk").expect("more");
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(stream);
    until_status(&server, "erin", 429, "the hung-up stream was not charged").await;
    assert_eq!(generate_as(&server, "frank", &[]).await.status(), 200);
    server.shutdown().await;
}

/// Every `cllm_*` series a dashboard expression names.
fn dashboard_metrics(dashboard: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("cllm_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let text = std::fs::read_to_string(repo_root().join("dashboards/cllm.json")).expect("read");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON parses");
    let names = dashboard_metrics(&dashboard);
    assert!(names.len() >= 15, "{names:?}");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put(
        &dir,
        "limiter.json",
        br#"{"rate_per_sec": 0.01, "burst": 3}"#,
    );
    put_plugin(&dir, "limiter.wasm", "token-bucket");
    put_plugin(&dir, "faulty.wasm", "trap");
    let server = start_with_plugins(&dir, |_| {}).await;
    wait_for(&server, "limiter.wasm", "active").await;
    wait_for(&server, "faulty.wasm", "active").await;
    // Traffic that moves every series: answers, an error, a rate limit, plugin calls and faults.
    for _ in 0..4 {
        generate_as(&server, "gina", &[]).await;
    }
    let r = server.post("/generate", json!({"inputs": ""})).await;
    assert_eq!(r.status(), 422);
    let metrics = server.metrics().await;
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !metrics.lines().any(|l| l.starts_with(name.as_str())))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n{metrics}"
    );
    server.shutdown().await;
}

/// `/generate` as `client` with request id `id`: (status, body).
async fn generate_with_id(server: &TestServer, client: &str, id: &str) -> (u16, Value) {
    let response = generate_as(server, client, &[("x-request-id", id)]).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A plugin that prints and uses nothing else of WASI is called inline on the request's async
/// worker (`inline_calls: true`); a plugin importing files or sockets goes to the blocking
/// pool (false). Printing inline works under load (the log gets every line, nothing panics),
/// and sleeping inline is still cut off as a fault at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printing_plugins_are_called_inline_on_the_async_workers() {
    use common::process::ServeProcess;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "printer.wasm", "printer");
    put_plugin(&dir, "probe.wasm", "wasi-probe");
    let dir_arg = dir.display().to_string();
    let server = ServeProcess::start(
        tmp.path(),
        "server",
        &[
            "--plugins-dir",
            &dir_arg,
            "--set",
            "rate_limiter.max_requests=1000000",
        ],
    );
    let client = reqwest::Client::new();
    let listed: Value = client
        .get(server.url("/plugins"))
        .send()
        .await
        .expect("plugins")
        .json()
        .await
        .expect("json");
    let inline = |file: &str| {
        let plugins = listed["plugins"].as_array().expect("plugins");
        let plugin = plugins.iter().find(|p| p["file"] == file).expect("listed");
        plugin["inline_calls"].as_bool()
    };
    assert_eq!(inline("printer.wasm"), Some(true), "{listed}");
    assert_eq!(inline("probe.wasm"), Some(false), "{listed}");
    // The probe plugin goes: every call of the printer is inline now.
    std::fs::remove_file(dir.join("probe.wasm")).expect("rm");
    eventually("the probe unloads", Duration::from_secs(5), || async {
        let text = client
            .get(server.url("/plugins"))
            .send()
            .await
            .expect("plugins");
        let text = text.text().await.expect("text");
        if text.contains("probe.wasm") {
            Err(text)
        } else {
            Ok(())
        }
    })
    .await;

    let send = |id: String| {
        let request = client
            .post(server.url("/generate"))
            .header("x-request-id", id)
            .json(&json!({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}));
        async move { request.send().await.expect("sent").status().as_u16() }
    };
    // Twelve at once: 36 lines stay within the log's burst of 50 lines a plugin.
    let answers =
        futures_util::future::join_all((0..12).map(|i| send(format!("inline-{i}")))).await;
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    let started = Instant::now();
    assert_eq!(send("inline-probe-sleep".into()).await, 200, "fail open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(send("inline-after".into()).await, 200);
    let log = eventually("every line logged", Duration::from_secs(5), || async {
        let log = server.log();
        let all = (0..12).all(|i| {
            log.contains(&format!("printer check inline-{i} "))
                && log.contains(&format!("printer stderr inline-{i} "))
                && log.contains(&format!("printer usage inline-{i} "))
        });
        if all {
            Ok(log)
        } else {
            Err("lines missing".to_string())
        }
    })
    .await;
    assert!(log.contains("printer check inline-after"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_plugins_print_and_read_clocks_and_randomness_but_reach_nothing_else() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "probe.wasm", "wasi-probe");
    let server = start_with_plugins(&dir, |c| c.rate_limiter.max_requests = 1_000_000).await;
    wait_for(&server, "probe.wasm", "active").await;

    // What the plugin sees, in its rejection reason.
    let (status, body) = generate_with_id(&server, "eve", "t1-probe-env").await;
    assert_eq!(status, 429, "{body}");
    let reason = body["error"].as_str().unwrap_or_default().to_string();
    for expected in [
        "env=0 ",
        "args=0 ",
        "fs=denied ",
        "net=denied ",
        "mono=advances ",
    ] {
        assert!(reason.contains(expected), "{expected:?} in {reason}");
    }
    let field = |name: &str| -> Vec<u64> {
        reason
            .split_whitespace()
            .filter_map(|w| w.strip_prefix(&format!("{name}=")))
            .filter_map(|v| {
                v.trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .ok()
            })
            .collect()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let wall = field("wall");
    assert!(
        wall.len() == 1 && wall[0].abs_diff(now) < 60,
        "the wall clock is the host's: {wall:?} vs {now}"
    );
    let rand = field("rand");
    assert!(
        rand.len() == 2 && rand[0] != rand[1],
        "randomness: {rand:?}"
    );

    // Printing from a plugin is fine on the request path (it runs off the async workers).
    for i in 0..20 {
        let (status, body) = generate_with_id(&server, "eve", &format!("t1-print-{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let server = &server;
    let faults = |fault: &str| {
        let series = format!(
            r#"cllm_plugin_faults_total{{plugin="probe.wasm",kind="rate_limiter",fault="{fault}"}}"#
        );
        async move { metric_value(&server.metrics().await, &series) }
    };
    assert_eq!(faults("trap").await, 0.0, "printing is no fault");

    // exit() is a fault (and the limiter fails open); sleeping is cut off at once.
    let (status, _) = generate_with_id(server, "eve", "t1-probe-exit").await;
    assert_eq!(status, 200, "fail open");
    assert_eq!(faults("trap").await, 1.0, "exit is a fault");
    let started = Instant::now();
    let (status, _) = generate_with_id(server, "eve", "t1-probe-sleep").await;
    assert_eq!(status, 200, "fail open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a sleeping plugin is cut off, not waited for: {:?}",
        started.elapsed()
    );
    assert_eq!(faults("trap").await, 2.0, "sleeping is a fault");
    // The plugin is rebuilt and serves again.
    let (status, _) = generate_with_id(server, "eve", "t1-probe-env").await;
    assert_eq!(status, 429, "a fresh instance answers");

    // A server that refuses filesystem and socket imports outright refuses this plugin (it uses
    // std::fs and std::net), naming the import.
    let strict_dir = tmp.path().join("strict");
    std::fs::create_dir_all(&strict_dir).expect("mkdir");
    put_plugin(&strict_dir, "probe.wasm", "wasi-probe");
    let strict = start_with_plugins(&strict_dir, |c| {
        c.plugins.refused_imports = vec!["wasi:filesystem".into(), "wasi:sockets".into()];
    })
    .await;
    let listed = wait_for(&strict, "probe.wasm", "refused").await;
    let reason = listed["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("wasi:filesystem/types@") && reason.contains("plugins.refused_imports"),
        "{reason}"
    );
    strict.shutdown().await;
}

/// A limiter that allowed a request which a later limiter refused still hears how it ended:
/// failed, nothing generated (every allowing `check` has its `record-usage`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limiter_that_allowed_a_refused_request_records_it_as_failed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    // Limiters run in file-name order: the probe allows first, then deny-all refuses.
    put_plugin(&dir, "a-usage.wasm", "usage-probe");
    put_plugin(&dir, "z-deny.wasm", "deny-all");
    let server = start_with_plugins(&dir, |_| {}).await;
    wait_for(&server, "a-usage.wasm", "active").await;
    wait_for(&server, "z-deny.wasm", "active").await;
    let (status, body) = generate_with_id(&server, "grace", "refused-later").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("deny-all"),
        "{body}"
    );
    let (status, body) = generate_with_id(&server, "grace", "probe-usage").await;
    assert_eq!(status, 429, "{body}");
    // The load-time trial's record, then the refused request's.
    let reason = body["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains(" failed=2 ") && reason.contains(" tokens=0 "),
        "{reason}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_usage_reports_every_ending_with_its_outcome() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "usage.wasm", "usage-probe");
    let server = start_with_plugins(&dir, |c| {
        c.rate_limiter.max_requests = 1_000_000;
        c.request_queue.max_wait_time_ms = 200;
        c.scheduler.max_running_sequences = 1;
        c.scheduler.debug_step_delay_ms = 20;
    })
    .await;
    wait_for(&server, "usage.wasm", "active").await;
    let report = || async {
        let (status, body) = generate_with_id(&server, "frank", "probe-usage").await;
        assert_eq!(status, 429, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        // "rate limit exceeded: REASON (usage.wasm)"
        let reason = error.split_once(": ").map_or(error, |(_, r)| r);
        reason.trim_end_matches(" (usage.wasm)").to_string()
    };
    // The load-time trial request was checked and recorded (failed, nothing generated).
    let first = report().await;
    assert!(
        first.starts_with("finished=0 stopped=0 cancelled=0 failed=1 timed-out=0 tokens=0 api=tgi"),
        "{first}"
    );

    // Finished: max_new_tokens reached.
    let finished = server
        .post(
            "/generate",
            json!({"inputs": "Once", "parameters": {"max_new_tokens": 3}}),
        )
        .await;
    assert_eq!(finished.status(), 200);
    // Stopped: a stop sequence that the first token always matches (every token has a char).
    let body: Value = server
        .post(
            "/generate",
            json!({"inputs": "Once", "parameters": {"max_new_tokens": 30, "details": true, "stop": [" ", "a", "e", "o", "."]}}),
        )
        .await
        .json()
        .await
        .expect("json");
    let stopped = body["details"]["finish_reason"] == "stop_sequence";
    // Cancelled: a stream dropped after its first event.
    let mut stream = server
        .http
        .post(server.url("/generate_stream"))
        .json(&json!({"inputs": "Once", "parameters": {"max_new_tokens": 200}}))
        .send()
        .await
        .expect("stream");
    let _first = stream.chunk().await.expect("first chunk");
    // Timed out: one sequence runs at a time, and the stream holds it past the queue wait.
    let waited = server
        .post(
            "/generate",
            json!({"inputs": "Once", "parameters": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(waited.status(), 503, "queue timeout");
    drop(stream);
    let expected_stopped = if stopped { 1 } else { 0 };
    let report_now = eventually("usage recorded", Duration::from_secs(5), || async {
        let r = report().await;
        if r.contains(" cancelled=1 ") && r.contains(" timed-out=1 ") {
            Ok(r)
        } else {
            Err(r)
        }
    })
    .await;
    assert!(
        report_now.starts_with(&format!(
            "finished={} stopped={expected_stopped} cancelled=1 failed=1 timed-out=1 tokens=",
            2 - expected_stopped
        )),
        "{report_now} (stop sequence hit: {stopped})"
    );
    assert!(
        report_now.ends_with("api=tgi model=stories260K"),
        "{report_now}"
    );
    // The OpenAI route says so.
    let openai = server
        .http
        .post(server.url("/v1/completions"))
        .header("x-request-id", "oa-probe-usage")
        .json(&json!({"model": "stories260K", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .expect("sent");
    assert_eq!(openai.status(), 429);
    let text = openai.text().await.expect("body");
    assert!(text.contains("api=openai model=stories260K"), "{text}");
    server.shutdown().await;
}

/// A throwaway `redis-server` on a free loopback port (no persistence); killed on drop.
struct Redis {
    port: u16,
    child: std::process::Child,
}

impl Redis {
    /// Starts one on `port` (0: any free port); `None` when redis-server is not installed
    /// (a visible skip, or a failure under CI).
    fn start(port: u16) -> Option<Redis> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !common::require(installed, "redis-server (Debian's redis-server package)") {
            return None;
        }
        let port = if port != 0 {
            port
        } else {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis { port, child })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server with the shared-limit example plugin (config `limits`) on `redis_url`.
async fn shared_limit_server(dir: &Path, limits: &str, redis_url: &str) -> TestServer {
    std::fs::create_dir_all(dir).expect("mkdir");
    put(dir, "shared_limit.json", limits.as_bytes());
    put_plugin(dir, "shared_limit.wasm", "shared-limit");
    let url = redis_url.to_string();
    let server = start_with_plugins(dir, move |c| {
        c.rate_limiter.max_requests = 1_000_000;
        c.plugins.shared_state.redis_url = Some(url);
        // Loopback Redis answers in well under a millisecond; leave room on a busy CI box.
        c.plugins.call_deadline_ms = 50;
        c.plugins.shared_state.timeout_ms = 20;
    })
    .await;
    wait_for(&server, "shared_limit.wasm", "active").await;
    server
}

async fn generate_tokens(server: &TestServer, client: &str, tokens: u32) -> reqwest::Response {
    server
        .http
        .post(server.url("/generate"))
        .header("x-client-id", client)
        .json(&json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens}}))
        .send()
        .await
        .expect("sent")
}

/// `/generate` as `client` asking for `tokens` tokens, to a server process at `url`.
async fn generate_at(url: &str, client: &str, tokens: u32) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .header("x-client-id", client)
        .json(&json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens}}))
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Two `cllm serve` processes with the shared-limit plugin and one Redis: a client sending to
/// both alternately gets its limit admitted once, not once per replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_request_and_token_limits_through_redis() {
    let Some(redis) = Redis::start(0) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let limits = r#"{"window_ms": 600000, "max_requests": 3, "max_tokens": 6, "key_prefix": "t2"}"#;
    let replica = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        put(&dir, "shared_limit.json", limits.as_bytes());
        put_plugin(&dir, "shared_limit.wasm", "shared-limit");
        let redis_url = format!("plugins.shared_state.redis_url={}", redis.url());
        let dir_arg = dir.display().to_string();
        common::process::ServeProcess::start(
            tmp.path(),
            name,
            &[
                "--plugins-dir",
                &dir_arg,
                "--set",
                &redis_url,
                // Loopback Redis answers in well under a millisecond; leave room on a busy box.
                "--set",
                "plugins.call_deadline_ms=50",
                "--set",
                "plugins.shared_state.timeout_ms=20",
                "--set",
                "rate_limiter.max_requests=1000000",
            ],
        )
    };
    let (a, b) = (replica("a"), replica("b"));
    let (a_url, b_url) = (a.url("/generate"), b.url("/generate"));
    // The plugin loads before the server listens (the folder is read at start).
    let plugins: Value = reqwest::get(a.url("/plugins"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(plugins["plugins"][0]["state"], "active", "{plugins}");

    // Requests: three in all, across both replicas; the fourth is refused by either.
    for (i, url) in [&a_url, &b_url, &a_url].into_iter().enumerate() {
        let (status, body) = generate_at(url, "yan", 1).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    for url in [&b_url, &a_url] {
        let (status, body) = generate_at(url, "yan", 1).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("3 requests per 600000 ms"), "{body}");
    }
    // Another client is counted apart.
    assert_eq!(generate_at(&b_url, "zoe", 4).await.0, 200);
    // Tokens: zoe's 4 generated on b count on a too, once recorded (after the response).
    assert_eq!(generate_at(&a_url, "zoe", 4).await.0, 200);
    eventually(
        "zoe's tokens reach the limit",
        Duration::from_secs(5),
        || async {
            match generate_at(&a_url, "zoe", 1).await {
                (429, body) if body.contains("6 generated tokens per 600000 ms") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let metrics = reqwest::get(a.url("/metrics"))
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(metric_value(&metrics, r#"cllm_shared_state_calls_total{store="redis"}"#) >= 6.0);
    assert!(
        !metrics.contains("cllm_shared_state_errors_total"),
        "no store errors"
    );
    for process in [&a, &b] {
        assert!(!process.log().contains("panicked"), "{}", process.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_open_is_counted_and_counting_resumes_when_it_returns() {
    let Some(redis) = Redis::start(0) else {
        return;
    };
    let port = redis.port;
    let tmp = tempfile::tempdir().expect("tmp");
    let limits = r#"{"window_ms": 600000, "max_requests": 2, "key_prefix": "t3"}"#;
    let server = shared_limit_server(&tmp.path().join("p"), limits, &redis.url()).await;
    assert_eq!(generate_tokens(&server, "ann", 1).await.status(), 200);
    drop(redis);
    // Redis is gone: every request passes (fail_open), and every failed call is counted.
    for i in 0..4 {
        let status = generate_tokens(&server, "ann", 1).await.status();
        assert_eq!(status, 200, "request {i} during the outage");
    }
    let errors = |metrics: &str| -> f64 {
        ["connect", "io", "timeout", "unavailable"]
            .iter()
            .map(|r| {
                metric_value(
                    metrics,
                    &format!(r#"cllm_shared_state_errors_total{{reason="{r}"}}"#),
                )
            })
            .sum()
    };
    assert!(
        errors(&server.metrics().await) >= 4.0,
        "{}",
        server.metrics().await
    );
    // Redis returns (empty): within the reconnect interval counting starts again from 0.
    let _back = Redis::start(port).expect("restarts");
    eventually("counting resumes", Duration::from_secs(5), || async {
        match generate_tokens(&server, "ann", 1).await.status().as_u16() {
            429 => Ok(()),
            other => Err(format!("status {other}")),
        }
    })
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_loads_and_limits_like_a_rust_one() {
    let Some(wasm) = python_plugin_wasm("python-allowlist") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put(
        &dir,
        "allowlist.json",
        br#"{"allow": ["alice"], "reason": "python says no"}"#,
    );
    put(&dir, "allowlist.wasm", &std::fs::read(&wasm).expect("read"));
    let started = Instant::now();
    let server = start_with_plugins(&dir, |c| c.rate_limiter.max_requests = 1_000_000).await;
    // An 18 MB component: compiling it takes seconds (once; the compile cache keeps it).
    let listed = eventually(
        "the Python plugin loads",
        Duration::from_secs(120),
        || async {
            let list = plugins(&server).await;
            match list.iter().find(|p| p["file"] == "allowlist.wasm") {
                Some(p) if p["state"] == "active" => Ok(p.clone()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    common::say(&format!(
        "python-allowlist: {} bytes, active {:.1} s after start",
        std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0),
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(listed["world_version"], "0.2.0", "{listed}");
    assert_eq!(generate_as(&server, "alice", &[]).await.status(), 200);
    let refused = generate_as(&server, "bob", &[]).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.expect("json");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("python says no (bob)"), "{error}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"cllm_plugin_decisions_total{plugin="allowlist.wasm",decision="reject",mode="enforce"}"#
        ),
        1.0,
        "{metrics}"
    );
    server.shutdown().await;
    // A restart loads it from the compile cache, and its first instantiation (slower from a
    // cached image) is not held to the 5 ms call deadline.
    let server = start_with_plugins(&dir, |c| c.rate_limiter.max_requests = 1_000_000).await;
    wait_for(&server, "allowlist.wasm", "active").await;
    let cache = r#"cllm_plugin_compile_cache_total{result="hit"}"#;
    assert_eq!(metric_value(&server.metrics().await, cache), 1.0);
    assert_eq!(generate_as(&server, "alice", &[]).await.status(), 200);
    assert_eq!(generate_as(&server, "bob", &[]).await.status(), 429);
    // Swapped: a new config applies (the plugin is reloaded with it)...
    put(&dir, "allowlist.json", br#"{"allow": ["bob"]}"#);
    until_status(&server, "bob", 200, "the new allow list never applied").await;
    assert_eq!(generate_as(&server, "alice", &[]).await.status(), 429);
    // ...and removed: the built-in policy is back.
    std::fs::remove_file(dir.join("allowlist.wasm")).expect("rm");
    wait_for(&server, "allowlist.wasm", "absent").await;
    assert_eq!(generate_as(&server, "alice", &[]).await.status(), 200);
    server.shutdown().await;
}

/// The plugin folder removed while watched (its plugins go, the built-in policy is back), then
/// created again: a plugin dropped into the new folder loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_folder_removed_and_created_again_is_watched_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    put_plugin(&dir, "policy.wasm", "deny-all");
    let server = start_with_plugins(&dir, |c| c.rate_limiter.max_requests = 1_000_000).await;
    wait_for(&server, "policy.wasm", "active").await;
    assert_eq!(generate_as(&server, "ivy", &[]).await.status(), 429);
    std::fs::remove_dir_all(&dir).expect("rm -r");
    wait_for(&server, "policy.wasm", "absent").await;
    assert_eq!(generate_as(&server, "ivy", &[]).await.status(), 200);
    std::fs::create_dir_all(&dir).expect("mkdir again");
    put_plugin(&dir, "again.wasm", "deny-all");
    eventually(
        "a plugin in the re-created folder loads",
        Duration::from_secs(10),
        || async {
            let list = plugins(&server).await;
            match list.iter().find(|p| p["file"] == "again.wasm") {
                Some(p) if p["state"] == "active" => Ok(()),
                _ => Err(format!("{list:?}")),
            }
        },
    )
    .await;
    assert_eq!(generate_as(&server, "ivy", &[]).await.status(), 429);
    server.shutdown().await;
}
