//! Endpoints around generation: tokenizer, info, health, metrics, request lifecycles.

use super::body::JsonBody;
use super::AppState;
use crate::error::ApiError;
use crate::health::{plugin_verdicts, scheduler_status, Status};
use crate::plugins::bindings::HealthSnapshot;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeRequest {
    inputs: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

pub async fn encode(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<EncodeRequest>,
) -> Result<Json<Value>, ApiError> {
    let ids = state
        .tokenizer
        .encode(&req.inputs, req.add_special_tokens)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let tokens: Vec<String> = ids
        .iter()
        .map(|&id| state.tokenizer.token_text(id).unwrap_or_default())
        .collect();
    Ok(Json(json!({ "ids": ids, "tokens": tokens })))
}

/// `POST /tokenize` body, as TGI takes it: a generate request. As in TGI,
/// `parameters.truncate` keeps the last so many tokens; the rest of `parameters` and `stream`
/// have no effect.
#[derive(Deserialize)]
pub struct TokenizeRequest {
    inputs: String,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    parameters: Option<TokenizeParameters>,
}

/// The part of a generate request's `parameters` that tokenizing uses.
#[derive(Deserialize)]
pub struct TokenizeParameters {
    #[serde(default)]
    truncate: Option<usize>,
}

/// `POST /tokenize`: TGI's token list, `[{"id", "text", "start", "stop"}]`, where `start..stop`
/// are the byte offsets of the token's text in `inputs` (empty for added special tokens).
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let (ids, offsets) = state
        .tokenizer
        .encode_with_offsets(&req.inputs, req.add_special_tokens)
        .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?;
    let mut spans = token_spans(&req.inputs, &ids, offsets);
    if let Some(keep) = req.parameters.and_then(|p| p.truncate) {
        if keep == 0 {
            return Err(ApiError::Validation(
                "parameters.truncate must be at least 1".into(),
            ));
        }
        spans.drain(..spans.len().saturating_sub(keep));
    }
    Ok(Json(Value::Array(spans)))
}

/// Each token as TGI lists it: id, the text it covers, and that text's byte offsets.
pub fn token_spans(text: &str, ids: &[u32], offsets: Vec<(usize, usize)>) -> Vec<Value> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, (start, stop))| {
            json!({
                "id": id,
                "text": text.get(start..stop).unwrap_or_default(),
                "start": start,
                "stop": stop,
            })
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeRequest {
    ids: Vec<u32>,
    #[serde(default = "yes")]
    skip_special_tokens: bool,
}

pub async fn decode(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DecodeRequest>,
) -> Result<Json<Value>, ApiError> {
    if let Some(bad) = req.ids.iter().find(|&&id| id as usize >= state.vocab_size) {
        return Err(ApiError::Validation(format!(
            "id {bad} is outside the vocabulary ({} tokens)",
            state.vocab_size
        )));
    }
    let text = state
        .tokenizer
        .decode(&req.ids, req.skip_special_tokens)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(json!({ "text": text })))
}

pub async fn info(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(state.info.clone())
}

pub async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness, for load balancers and Kubernetes: 200 while the model is loaded and the
/// scheduler runs, 503 once shutdown has begun (draining) or when the scheduler has stopped.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let draining = state.draining.load(Ordering::SeqCst);
    let running = state.scheduler.stats.alive.load(Ordering::Relaxed);
    let (code, status) = match (draining, running) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "scheduler_stopped"),
        (false, true) => (StatusCode::OK, "ready"),
    };
    (code, Json(json!({ "status": status }))).into_response()
}

/// The numbers health-check plugins judge from.
pub fn health_snapshot(state: &AppState) -> HealthSnapshot {
    let stats = &state.scheduler.stats;
    let queue = state.scheduler.queue.stats();
    let (rps, _, error_rate) = state.recent.rates();
    HealthSnapshot {
        queue_size: queue.size as u32,
        max_queue_size: queue.max_size.min(u32::MAX as usize) as u32,
        running_sequences: stats.running_sequences.load(Ordering::Relaxed) as u32,
        kv_blocks_used: stats.kv_blocks_used.load(Ordering::Relaxed) as u32,
        kv_blocks_total: stats.kv_blocks_total.load(Ordering::Relaxed) as u32,
        requests_per_second: rps,
        average_wait_ms: queue.average_wait.as_secs_f64() * 1e3,
        p99_time_to_first_token_ms: stats.p99_ttft_ms(),
        ms_since_last_step: stats.ms_since_last_tick(),
        error_rate,
    }
}

pub async fn plugins(State(state): State<Arc<AppState>>) -> Json<Value> {
    let list = state.plugins.as_ref().map(|r| r.list()).unwrap_or_default();
    let dir = state.plugins.as_ref().map(|r| r.dir.display().to_string());
    Json(json!({ "dir": dir, "plugins": list }))
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let cfg = &state.health;
    let stats = &state.scheduler.stats;
    let queue = state.scheduler.queue.stats();
    // Plugin calls run on the blocking pool: a health check may take up to its deadline.
    let verdicts = match state.plugins.clone() {
        Some(registry) => {
            let snapshot = health_snapshot(&state);
            tokio::task::spawn_blocking(move || plugin_verdicts(&registry, &snapshot))
                .await
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let plugin_status = verdicts
        .iter()
        .map(|(_, s, _)| *s)
        .max()
        .unwrap_or(Status::Ok);
    let has_work = queue.size > 0 || stats.running_sequences.load(Ordering::Relaxed) > 0;
    let (sched_status, sched_message) = scheduler_status(stats, has_work, cfg.stall_timeout);
    let queue_fraction = queue.size as f64 / queue.max_size.max(1) as f64;
    let queue_status = if queue_fraction >= cfg.degraded_queue_fraction {
        Status::Degraded
    } else {
        Status::Ok
    };
    let (executor_status, last_failure) = executor_verdict(stats, sched_status);
    let status = sched_status
        .max(queue_status)
        .max(plugin_status)
        .max(executor_status);
    let (rps, avg_response, error_rate) = state.recent.rates();
    let policy: Vec<Value> = verdicts
        .iter()
        .map(|(file, status, message)| json!({ "plugin": file, "status": status, "message": message }))
        .collect();
    let plugin_list = state.plugins.as_ref().map(|r| r.list()).unwrap_or_default();
    let body = json!({
        "healthy": status != Status::Unhealthy,
        "status": status,
        "components": {
            "scheduler": { "status": sched_status, "message": sched_message,
                           "ms_since_last_step": stats.ms_since_last_tick(),
                           "steps": stats.steps.load(Ordering::Relaxed) },
            "model_executor": { "status": executor_status, "backend": state.device.kind,
                                "device": state.device,
                                "failed_sequences": stats.failed_sequences.load(Ordering::Relaxed),
                                "last_failure": last_failure },
            "tokenizer": { "status": Status::Ok },
            "request_queue": { "status": queue_status, "size": queue.size, "max_size": queue.max_size },
            "policy": { "status": plugin_status, "checks": policy },
        },
        "plugins": plugin_list,
        "metrics": {
            "queue_size": queue.size,
            "average_wait_time": queue.average_wait.as_secs_f64(),
            "requests_per_second": rps,
            "average_response_time": avg_response,
            "error_rate": error_rate,
            "p99_time_to_first_token_ms": stats.p99_ttft_ms(),
            "running_sequences": stats.running_sequences.load(Ordering::Relaxed),
            "kv_cache_usage": stats.kv_usage(),
            "kv_blocks_used": stats.kv_blocks_used.load(Ordering::Relaxed),
            "kv_blocks_total": stats.kv_blocks_total.load(Ordering::Relaxed),
        },
        "dependencies": {
            "model": { "status": Status::Ok, "path": state.info["model_id"] },
            "tokenizer": { "status": Status::Ok },
        },
    });
    let code = if status == Status::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// How long a sequence the executor failed keeps `/health`'s executor `degraded`.
const FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// The executor's verdict: the scheduler's, or `degraded` for a minute after a sequence
/// failed; and the last failure as JSON (null when there was none).
fn executor_verdict(
    stats: &crate::scheduler::SchedulerStats,
    sched_status: Status,
) -> (Status, Value) {
    match stats.last_failure() {
        Some((ago, message)) => {
            let status = if ago < FAILURE_MEMORY {
                sched_status.max(Status::Degraded)
            } else {
                sched_status
            };
            let json = json!({ "message": message, "seconds_ago": ago.as_secs_f64() });
            (status, json)
        }
        None => (sched_status, Value::Null),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if !state.metrics.enabled() {
        let body = json!({
            "error": "metrics are disabled (metrics.enabled: false)",
            "error_type": "not_found",
        });
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let queue = state.scheduler.queue.stats();
    state
        .metrics
        .gauge("cllm_queue_size")
        .set(queue.size as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn request_record(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = state
        .tracker
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("request {id}")))?;
    serde_json::to_value(record)
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}
