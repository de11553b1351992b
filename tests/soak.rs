//! Soak: the server under 200 concurrent streaming clients for a while (30 s by default;
//! `CLLM_SOAK_SECS=300` for the long run), with random prompts, lengths, priorities and client
//! ids, one request in ten abandoned mid-stream, while the limiter's config and the prioritizer
//! are swapped underneath. Loopback only; it stops by itself.
//!
//! At the end: no answer but 200, 429 and 503 (the intended refusals); RSS within 5 % of its
//! value after warm-up; KV blocks in use and the queue back to 0; every request id accounted for
//! in the tracker (finished, cancelled, or failed with an admission refusal as the reason).

mod common;

use common::rng::Rng;

use common::server::{metric_value, sse_events, TestServer};
use common::wasm::plugin_wasm;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLIENTS: usize = 200;

const PROMPTS: [&str; 6] = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park. They",
    "One day, a bird",
    "Tom had a red ball.",
    "The sun was",
];

/// A number from this process's `/proc/self/status` (`VmRSS` in kB, `Threads`).
fn status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    status("VmRSS") * 1024
}

#[derive(Default)]
struct Tally {
    by_status: HashMap<u16, u64>,
    abandoned: u64,
    /// Anything that is neither an intended answer nor an abandoned stream, and any request
    /// the tracker does not account for.
    errors: Vec<String>,
    /// Final tracker states seen, by `state detail`.
    states: HashMap<String, u64>,
}

/// A finished request for the checker: its id and whether the client abandoned it.
type Done = (String, bool);

async fn client(
    server: Arc<TestServer>,
    n: usize,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
    done: tokio::sync::mpsc::UnboundedSender<Done>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((n as u64 + 1) * 0x2545_f491));
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let id = format!("soak-{n}-{i}");
        let prompt = PROMPTS[rng.below(PROMPTS.len() as u64) as usize];
        let tokens = 1 + rng.below(48);
        let tier = ["gold", "silver", "bronze"][rng.below(3) as usize];
        let abandon = rng.below(10) == 0;
        let body = json!({"inputs": prompt, "parameters": {"max_new_tokens": tokens, "do_sample": true, "seed": rng.next() % 1000}});
        let sent = server
            .http
            .post(server.url("/generate_stream"))
            .header("x-request-id", &id)
            .header("x-client-id", format!("client-{}", rng.below(50)))
            .header("x-tier", tier)
            .json(&body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                tally
                    .lock()
                    .expect("tally")
                    .errors
                    .push(format!("{id}: {e}"));
                continue;
            }
        };
        let status = response.status().as_u16();
        let mut abandoned = false;
        if status == 200 {
            if abandon {
                // Read one event, then go away.
                let _ = response.chunk().await;
                drop(response);
                abandoned = true;
            } else {
                let mut text = String::new();
                loop {
                    match response.chunk().await {
                        Ok(Some(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
                        Ok(None) => break,
                        Err(e) => {
                            text.push_str(&format!("[read error {e}]"));
                            break;
                        }
                    }
                }
                // Only the final event carries the text (the others have it null).
                let finished = sse_events(&text)
                    .iter()
                    .any(|event| event["generated_text"].is_string());
                if !finished {
                    let tail: String = text.chars().rev().take(300).collect();
                    let tail: String = tail.chars().rev().collect();
                    tally
                        .lock()
                        .expect("tally")
                        .errors
                        .push(format!("{id}: no final event: {tail}"));
                }
            }
        } else if status != 429 && status != 503 {
            let text = response.text().await.unwrap_or_default();
            tally
                .lock()
                .expect("tally")
                .errors
                .push(format!("{id}: {status} {text}"));
        }
        {
            let mut t = tally.lock().expect("tally");
            *t.by_status.entry(status).or_default() += 1;
            t.abandoned += u64::from(abandoned);
        }
        let _ = done.send((id, abandoned));
        if status != 200 {
            // Refused: back off, as a client honouring Retry-After would (a shorter while).
            tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        }
    }
}

/// The final state of request `id` in the tracker, once it has one it should have (an abandoned
/// stream's cancellation reaches the tracker a moment after the client left); an error after 3 s.
async fn final_state(server: &TestServer, id: &str, abandoned: bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let record: Value = server.get_json(&format!("/requests/{id}")).await;
        let state = record["state"].as_str().unwrap_or("missing").to_string();
        let detail = record["events"]
            .as_array()
            .and_then(|e| e.last())
            .and_then(|e| e["detail"].as_str())
            .unwrap_or("")
            .to_string();
        let ok = match state.as_str() {
            // An abandoned stream may have been generated in full before the server saw the
            // client go (the last tokens sit in socket buffers): finished is fine then too.
            "finished" | "cancelled" => true,
            "failed" => ["rate_limited", "queue_full", "queue_timeout"].contains(&detail.as_str()),
            _ => false,
        };
        if ok {
            return Ok(format!("{state} {detail}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{id} (abandoned: {abandoned}) ended as {state} {detail:?}: {record}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks every finished request's final state in the tracker, a few at a time, as they end.
async fn checker(
    server: Arc<TestServer>,
    mut done: tokio::sync::mpsc::UnboundedReceiver<Done>,
    tally: Arc<Mutex<Tally>>,
) -> u64 {
    let permits = Arc::new(tokio::sync::Semaphore::new(32));
    let mut checks = tokio::task::JoinSet::new();
    let mut checked = 0;
    while let Some((id, abandoned)) = done.recv().await {
        let permit = permits.clone().acquire_owned().await.expect("semaphore");
        let (server, tally) = (server.clone(), tally.clone());
        checks.spawn(async move {
            let verdict = final_state(&server, &id, abandoned).await;
            drop(permit);
            let mut t = tally.lock().expect("tally");
            match verdict {
                Ok(state) => *t.states.entry(state).or_default() += 1,
                Err(e) => t.errors.push(e),
            }
        });
        checked += 1;
        while checks.try_join_next().is_some() {}
    }
    while checks.join_next().await.is_some() {}
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streaming_clients_with_swaps_and_disconnects() {
    let secs: u64 = std::env::var("CLLM_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let limiter = std::fs::read(plugin_wasm("token-bucket")).expect("token-bucket");
    let prioritizer = std::fs::read(plugin_wasm("tiered-priority")).expect("tiered-priority");
    std::fs::write(
        dir.join("limiter.json"),
        br#"{"rate_per_sec": 8, "burst": 10}"#,
    )
    .expect("json");
    std::fs::write(dir.join("limiter.wasm"), &limiter).expect("wasm");
    std::fs::write(dir.join("tiers.wasm"), &prioritizer).expect("wasm");
    let server = Arc::new(
        TestServer::start(&common::repo_root().join("models/stories260K"), |c| {
            c.plugins.dir = Some(dir.clone());
            c.rate_limiter.max_requests = 1_000_000;
            c.request_queue.max_queue_size = 128;
            c.request_queue.max_wait_time_ms = 2_000;
            // Large enough that a request is still there when the checker looks (a moment
            // after it ends), small enough to fill up during the warm-up: the tracker's memory
            // is bounded by it, and RSS is compared after warm-up.
            c.tracker.capacity = 2_000;
        })
        .await,
    );
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let check = tokio::spawn(checker(server.clone(), done_rx, tally.clone()));
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let done = done_tx.clone();
        tasks.push(tokio::spawn(client(
            server.clone(),
            n,
            until,
            tally.clone(),
            done,
        )));
    }
    drop(done_tx);
    // Swaps: the limiter's config every 2 s, the prioritizer removed and put back every 3 s.
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (dir, swaps) = (dir.clone(), swaps.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            let swapping = std::env::var("CLLM_SOAK_NO_SWAPS").is_err();
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                k += 1;
                if !swapping {
                    continue;
                }
                if k.is_multiple_of(2) {
                    let rate = [8, 5, 12][(k / 2 % 3) as usize];
                    let json = format!(r#"{{"rate_per_sec": {rate}, "burst": 10}}"#);
                    let _ = std::fs::write(dir.join(".limiter.json.tmp"), json);
                    let _ =
                        std::fs::rename(dir.join(".limiter.json.tmp"), dir.join("limiter.json"));
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
                if k.is_multiple_of(3) {
                    let path = dir.join("tiers.wasm");
                    if path.exists() {
                        let _ = std::fs::remove_file(&path);
                    } else {
                        let _ = std::fs::write(dir.join(".tiers.tmp"), &prioritizer);
                        let _ = std::fs::rename(dir.join(".tiers.tmp"), &path);
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // RSS after warm-up: half way in (the tracker and the windows of recent requests have
    // filled by then).
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    let warm_rss = rss();
    let warm_threads = status("Threads");
    for task in tasks {
        task.await.expect("client task");
    }
    swapper.await.expect("swapper");
    let checked = check.await.expect("checker");
    let end_rss = rss();
    let end_threads = status("Threads");

    // Everything drains: no sequence holds KV blocks, nothing waits.
    let settled = common::eventually("the server settles", Duration::from_secs(20), || async {
        let text = server.metrics().await;
        let running = metric_value(&text, "cllm_running_sequences");
        let queued = metric_value(&text, "cllm_queue_size");
        let kv = metric_value(&text, "cllm_kv_cache_usage_ratio");
        if running == 0.0 && queued == 0.0 && kv == 0.0 {
            Ok(text)
        } else {
            Err(format!("running {running}, queued {queued}, kv usage {kv}"))
        }
    })
    .await;

    let tally = tally.lock().expect("tally");
    let total: u64 = tally.by_status.values().sum();
    common::say(&format!(
        "soak {secs} s: {total} requests {:?}, {} abandoned, {} swaps, RSS {:.1} MB after warm-up -> {:.1} MB at the end, threads {warm_threads} -> {end_threads}",
        tally.by_status,
        tally.abandoned,
        swaps.load(Ordering::Relaxed),
        warm_rss as f64 / 1e6,
        end_rss as f64 / 1e6
    ));
    assert!(
        tally.errors.is_empty(),
        "{} errors, e.g. {:?}",
        tally.errors.len(),
        &tally.errors[..tally.errors.len().min(5)]
    );
    assert!(
        tally.by_status.get(&200).copied().unwrap_or(0) > 100,
        "{:?}",
        tally.by_status
    );
    assert!(tally.abandoned > 10, "some streams were abandoned");
    assert!(swaps.load(Ordering::Relaxed) >= secs / 2, "swaps happened");
    assert!(
        (end_rss as f64) <= warm_rss as f64 * 1.05 && (end_rss as f64) >= warm_rss as f64 * 0.95,
        "RSS moved more than 5 %: {warm_rss} -> {end_rss}"
    );
    let _ = settled;

    // Every request was in the tracker, in a final state it should be in.
    assert_eq!(checked, total, "every request checked");
    common::say(&format!("tracker final states: {:?}", tally.states));
}
