//! `POST /generate` (one JSON answer) and `POST /generate_stream` (SSE, one event per token),
//! in TGI's shapes.

use super::body::JsonBody;
use super::params::{GenerateRequest, ValidRequest};
use super::submit::{submit, Submission};
use super::{AppState, RequestContext};
use crate::error::ApiError;
use crate::scheduler::{Finish, SeqEvent};
use crate::tracker::Stage;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// One generated token as TGI reports it.
fn token_json(id: u32, text: &str, special: bool) -> Value {
    json!({ "id": id, "text": text, "logprob": null, "special": special })
}

fn details_json(finish: &Finish, seed: Option<u64>, tokens: Option<Vec<Value>>) -> Value {
    let mut details = json!({
        "finish_reason": finish.reason.as_str(),
        "generated_tokens": finish.generated_tokens,
        "seed": seed,
    });
    if let Some(tokens) = tokens {
        details["prefill"] = json!([]);
        details["tokens"] = Value::Array(tokens);
    }
    details
}

/// The seed to report: only sampled requests have one that matters.
fn reported_seed(valid: &ValidRequest) -> Option<u64> {
    let s = &valid.params.sampling;
    (!s.is_greedy()).then_some(s.seed)
}

fn full_text(valid: &ValidRequest, generated: &str) -> String {
    if valid.return_full_text {
        format!("{}{generated}", valid.prompt)
    } else {
        generated.to_string()
    }
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Json<Value>, ApiError> {
    let valid = request.validate(&state.tokenizer, &state.limits)?;
    let Submission { mut events, guard } = submit(&state, &ctx, &valid).await?;
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            SeqEvent::Scheduled => {}
            SeqEvent::Token {
                id,
                text,
                special,
                finish,
            } => {
                if valid.details {
                    tokens.push(token_json(id, &text, special));
                }
                if let Some(finish) = finish {
                    drop(guard);
                    super::policy::record_usage(
                        &state,
                        &ctx,
                        valid.prompt_ids.len(),
                        finish.generated_tokens,
                    );
                    let mut body =
                        json!({ "generated_text": full_text(&valid, &finish.generated_text) });
                    if valid.details {
                        body["details"] =
                            details_json(&finish, reported_seed(&valid), Some(tokens));
                    }
                    return Ok(Json(body));
                }
            }
            SeqEvent::Failed(message) => return Err(ApiError::Internal(message)),
        }
    }
    Err(ApiError::Internal(
        "scheduler stopped before the request finished".into(),
    ))
}

/// State carried from one SSE event to the next.
struct StreamState {
    submission: Submission,
    valid: ValidRequest,
    index: usize,
    done: bool,
    ctx: RequestContext,
    app: Arc<AppState>,
}

impl StreamState {
    /// The next SSE event, or None when the stream is over.
    async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            match self.submission.events.recv().await {
                Some(SeqEvent::Scheduled) => continue,
                Some(SeqEvent::Token {
                    id,
                    text,
                    special,
                    finish,
                }) => {
                    self.index += 1;
                    let mut body = json!({
                        "index": self.index,
                        "token": token_json(id, &text, special),
                        "generated_text": null,
                        "details": null,
                    });
                    if let Some(finish) = finish {
                        body["generated_text"] =
                            json!(full_text(&self.valid, &finish.generated_text));
                        body["details"] = details_json(&finish, reported_seed(&self.valid), None);
                        self.done = true;
                        self.app.observe_stream_end(&self.ctx, 200);
                        super::policy::record_usage(
                            &self.app,
                            &self.ctx,
                            self.valid.prompt_ids.len(),
                            finish.generated_tokens,
                        );
                    }
                    return Some(Event::default().data(body.to_string()));
                }
                Some(SeqEvent::Failed(message)) => {
                    self.app.tracker.record_with(
                        &self.ctx.request_id,
                        Stage::Failed,
                        message.clone(),
                    );
                    self.done = true;
                    let err = ApiError::Internal(message);
                    self.app.observe_stream_end(&self.ctx, 500);
                    return Some(Event::default().data(err.body().to_string()));
                }
                None => {
                    self.done = true;
                    let err = ApiError::Internal("generation stopped".into());
                    return Some(Event::default().data(err.body().to_string()));
                }
            }
        }
    }
}

pub async fn generate_stream(
    State(app): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let valid = request.validate(&app.tokenizer, &app.limits)?;
    let submission = submit(&app, &ctx, &valid).await?;
    let state = StreamState {
        submission,
        valid,
        index: 0,
        done: false,
        ctx,
        app,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok::<Event, Infallible>(event), state))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
