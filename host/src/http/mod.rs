//! The HTTP edge: routes, per-request context (id, client), auth, and request metrics.
//! Handlers validate and admit requests; they never touch the model.

pub mod admin;
pub mod body;
mod chat;
pub mod connections;
mod generate;
pub mod openai;
pub mod params;
mod sse;
mod stream_end;

use crate::admission::auth::ApiKeys;
use crate::admission::{Admission, SequenceSpec, Ticket};
use crate::error::{ApiError, ErrorKind};
use crate::health::RecentRequests;
use crate::metrics::Metrics;
use crate::model::tokenizer::ModelTokenizer;
use crate::scheduler::Scheduler;
use crate::tracker::{RequestTracker, Stage};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use body::BodyLimits;
use params::Limits;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const CLIENT_ID: HeaderName = HeaderName::from_static("x-client-id");

/// Health thresholds, from the config.
#[derive(Clone, Debug)]
pub struct HealthSettings {
    pub stall_timeout: Duration,
    pub degraded_queue_fraction: f64,
}

/// Everything handlers share.
pub struct AppState {
    pub tokenizer: Arc<ModelTokenizer>,
    pub vocab_size: usize,
    pub limits: Limits,
    pub info: serde_json::Value,
    /// The name clients use for the model (`model` in OpenAI requests and `/v1/models`).
    pub served_model_name: String,
    /// When the server started, in Unix seconds (`created` of `/v1/models`).
    pub started_unix: u64,
    /// The chat template, or why there is none usable (the error for chat requests).
    pub chat_template: Result<crate::model::chat_template::ChatTemplate, String>,
    pub scheduler: Scheduler,
    /// Rate limit → priority → queue → scheduler, for every generation endpoint.
    pub admission: Arc<Admission>,
    /// Set when shutdown begins: `/health/ready` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
    pub keys: ApiKeys,
    pub tracker: Arc<RequestTracker>,
    pub metrics: Arc<Metrics>,
    pub recent: RecentRequests,
    pub health: HealthSettings,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (`http.body_read_timeout_ms`).
    pub body_read_timeout: Duration,
    /// Policy plugins, when a plugin folder is configured.
    pub plugins: Option<Arc<crate::plugins::PluginRegistry>>,
    /// What runs the model.
    pub device: crate::model::executor::DeviceInfo,
}

/// Who sent a request, and its id; put in request extensions by the middleware.
#[derive(Clone, Debug)]
pub struct RequestContext {
    pub request_id: String,
    pub client_id: String,
    pub endpoint: &'static str,
    pub received_at: Instant,
    /// The request headers plugins may see (names from `plugins.headers`).
    pub headers: Vec<(String, String)>,
}

impl RequestContext {
    /// What admission needs to decide on this request.
    pub fn ticket(&self, requested_priority: Option<i32>, sequences: Vec<SequenceSpec>) -> Ticket {
        Ticket {
            request_id: self.request_id.clone(),
            client_id: self.client_id.clone(),
            endpoint: self.endpoint,
            received_at: self.received_at,
            headers: self.headers.clone(),
            requested_priority,
            sequences,
        }
    }
}

/// Marks a streamed response, whose duration the stream itself records when it ends.
#[derive(Clone, Copy)]
struct Streamed;

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `path` is one of OpenAI's routes, whose errors take OpenAI's shape.
fn is_openai_path(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

impl AppState {
    /// Counts a finished request in the metrics and the recent-requests window.
    fn observe(&self, endpoint: &'static str, status: u16, took: Duration) {
        let labels = [
            ("endpoint", endpoint.to_string()),
            ("status", status.to_string()),
        ];
        self.metrics
            .counter("cllm_requests_total", &labels)
            .increment(1);
        self.metrics
            .histogram(
                "cllm_request_duration_seconds",
                &[("endpoint", endpoint.to_string())],
            )
            .record(took.as_secs_f64());
        if is_generation_endpoint(endpoint) {
            self.recent.record(took, status >= 500);
        }
    }

    /// Called by a stream when it ends (its last event sent, or its client gone).
    pub fn observe_stream_end(&self, ctx: &RequestContext, status: u16) {
        self.observe(ctx.endpoint, status, ctx.received_at.elapsed());
    }

    /// Checks an OpenAI request's `model` against the served name (absent means this one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(name) if name != self.served_model_name => {
                Err(ApiError::ModelNotFound(name.to_string()))
            }
            _ => Ok(()),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        // TGI answers health checks on `GET /` and `GET /ping` too (the Inference API's and
        // SageMaker's), with the same answer as `/health`.
        .route("/", post(generate::compat).get(admin::health))
        .route("/ping", get(admin::health))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*model}", get(openai::model))
        .route("/chat_tokenize", post(chat::chat_tokenize))
        .route("/tokenize", post(admin::tokenize))
        .route("/encode", post(admin::encode))
        .route("/decode", post(admin::decode))
        .route("/info", get(admin::info))
        .route("/health", get(admin::health))
        .route("/health/live", get(admin::live))
        .route("/health/ready", get(admin::ready))
        .route("/metrics", get(admin::metrics))
        .route("/requests/{id}", get(admin::request_record))
        .route("/plugins", get(admin::plugins))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        // axum's own 405 has an empty body; this one has the API's error shape (the edge
        // renders it in OpenAI's on /v1) and keeps axum's `Allow` header.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::MethodNotAllowed(method.to_string())
        })
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The endpoints that generate (and so pass admission).
fn is_generation_endpoint(endpoint: &str) -> bool {
    matches!(
        endpoint,
        "/" | "/generate" | "/generate_stream" | "/v1/completions" | "/v1/chat/completions"
    )
}

/// Endpoint label for metrics: the route, never the raw path (ids would explode cardinality).
fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/" => "/",
        "/generate" => "/generate",
        "/generate_stream" => "/generate_stream",
        "/tokenize" => "/tokenize",
        "/encode" => "/encode",
        "/decode" => "/decode",
        "/info" => "/info",
        "/health" | "/ping" => "/health",
        "/health/live" => "/health/live",
        "/health/ready" => "/health/ready",
        "/chat_tokenize" => "/chat_tokenize",
        "/v1/models" => "/v1/models",
        p if p.starts_with("/v1/models/") => "/v1/models/{model}",
        "/metrics" => "/metrics",
        "/plugins" => "/plugins",
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        p if p.starts_with("/requests/") => "/requests/{id}",
        _ => "other",
    }
}

/// Request id, auth, client id, logging and request metrics around every handler.
async fn edge(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let received_at = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| RequestTracker::is_valid_client_id(v))
        .map_or_else(RequestTracker::generate_id, str::to_string);
    let path = req.uri().path().to_string();
    // `GET /` (and `HEAD /`) is a health check, counted as one.
    let endpoint = match endpoint_of(&path) {
        "/" if req.method() != Method::POST => "/health",
        endpoint => endpoint,
    };
    let is_generation = is_generation_endpoint(endpoint);

    let response = match authenticate(&state, &req, &path) {
        Err(err) => err.into_response(),
        Ok(key_name) => {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip().to_string());
            let client_id = key_name
                .or_else(|| {
                    req.headers()
                        .get(&CLIENT_ID)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
                .or(peer)
                .unwrap_or_else(|| "unknown".into());
            if is_generation {
                state.tracker.record(&request_id, Stage::Received);
            }
            let headers = state.plugins.as_ref().map_or_else(Vec::new, |registry| {
                registry
                    .headers
                    .iter()
                    .filter_map(|name| {
                        let value = req.headers().get(name.as_str())?.to_str().ok()?;
                        Some((name.clone(), value.to_string()))
                    })
                    .collect()
            });
            let ctx = RequestContext {
                request_id: request_id.clone(),
                client_id,
                endpoint,
                received_at,
                headers,
            };
            req.extensions_mut().insert(ctx);
            req.extensions_mut().insert(BodyLimits {
                max_bytes: state.max_body_bytes,
                read_timeout: state.body_read_timeout,
            });
            let mut response = next.run(req).await;
            if response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().is_ok_and(|s| s.starts_with("text/event-stream")))
            {
                response.extensions_mut().insert(Streamed);
            }
            response
        }
    };
    let mut response = response;
    if is_openai_path(&path) {
        if let Some(err) = response.extensions().get::<ApiError>() {
            response = err.clone().into_openai_response();
        }
    }
    let status = response.status().as_u16();
    if let Some(kind) = response.extensions().get::<ErrorKind>() {
        let labels = [
            ("endpoint", endpoint.to_string()),
            ("error_type", kind.0.to_string()),
        ];
        state
            .metrics
            .counter("cllm_errors_total", &labels)
            .increment(1);
        if is_generation {
            state
                .tracker
                .record_with(&request_id, Stage::Failed, kind.0);
        }
    }
    if response.extensions().get::<Streamed>().is_none() {
        state.observe(endpoint, status, received_at.elapsed());
    }
    tracing::info!(
        request_id,
        endpoint,
        status,
        elapsed_ms = received_at.elapsed().as_millis() as u64,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The API key's name when auth is on and the path needs a key.
fn authenticate(state: &AppState, req: &Request, path: &str) -> Result<Option<String>, ApiError> {
    if !state.keys.enabled() || state.keys.is_open_path(path) {
        return Ok(None);
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state
        .keys
        .authenticate(header)
        .map(|name| Some(name.to_string()))
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
}
