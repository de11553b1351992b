//! `POST /generate` (one JSON answer), `POST /generate_stream` (SSE, one event per token) and
//! TGI's compat route `POST /` (either, by the body's `stream` flag), in TGI's shapes.

use super::body::JsonBody;
use super::params::{GenerateRequest, ValidRequest};
use super::stream_end::StreamEnd;
use super::{AppState, RequestContext};
use crate::admission::{SequenceEvents, SequenceSpec};
use crate::error::ApiError;
use crate::model::logprobs::TokenLogprobs;
use crate::scheduler::{Finish, SeqEvent};
use crate::tracker::Stage;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// One generated token as TGI reports it.
fn token_json(id: u32, text: &str, logprob: Option<f32>, special: bool) -> Value {
    json!({ "id": id, "text": text, "logprob": logprob, "special": special })
}

/// A token's `top_tokens` entry: the most likely alternatives at its step.
fn top_tokens_json(state: &AppState, logprobs: Option<&TokenLogprobs>) -> Value {
    let top = logprobs.map_or(&[][..], |l| &l.top[..]);
    top.iter()
        .map(|&(id, logprob)| {
            let text = state.tokenizer.token_string(id);
            token_json(id, &text, Some(logprob), state.tokenizer.is_special(id))
        })
        .collect()
}

/// `details.prefill`: the prompt tokens, each (after the first) with its log-probability.
fn prefill_json(state: &AppState, valid: &ValidRequest, logprobs: &[f32]) -> Value {
    valid
        .prompt_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let text = state.tokenizer.token_string(id);
            let logprob = i.checked_sub(1).and_then(|j| logprobs.get(j)).copied();
            json!({ "id": id, "text": text, "logprob": logprob })
        })
        .collect()
}

fn details_json(finish: &Finish, seed: Option<u64>) -> Value {
    json!({
        "finish_reason": finish.reason.as_str(),
        "generated_tokens": finish.generated_tokens,
        "seed": seed,
    })
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

/// Validates and admits a TGI request: its one sequence's events.
async fn admit(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    request: GenerateRequest,
    streaming: bool,
) -> Result<(ValidRequest, SequenceEvents), ApiError> {
    let valid = request.validate(&state.tokenizer, &state.limits, streaming)?;
    let spec = SequenceSpec {
        prompt_ids: valid.prompt_ids.clone(),
        params: valid.params.clone(),
    };
    let ticket = ctx.ticket(valid.requested_priority, vec![spec]);
    let mut admitted = state.admission.admit(ticket).await?;
    let events = admitted
        .sequences
        .pop()
        .ok_or_else(|| ApiError::Internal("admission returned no sequence".into()))?;
    Ok((valid, events))
}

/// `POST /`: TGI's compat route, streaming when the body says `"stream": true`. Otherwise the
/// answer is `/generate`'s object inside a one-element list, as TGI sends it (the shape of
/// Hugging Face's hosted Inference API, which the `text_generation` client reads as
/// `payload[0]`). As in TGI for a text-generation model, `return_full_text` defaults to true
/// here (the prompt comes back before the generated text); Hugging Face's client leaves it
/// out unless its caller sets it.
pub async fn compat(
    state: State<Arc<AppState>>,
    ctx: Extension<RequestContext>,
    JsonBody(mut request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    request.parameters.return_full_text.get_or_insert(true);
    if request.stream == Some(true) {
        generate_stream(state, ctx, JsonBody(request)).await
    } else {
        let Json(body) = generate(state, ctx, JsonBody(request)).await?;
        Ok(Json(Value::Array(vec![body])).into_response())
    }
}

pub async fn generate(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Json<Value>, ApiError> {
    let (valid, mut events) = admit(&state, &ctx, request, false).await?;
    let mut tokens = Vec::new();
    let mut top_tokens = Vec::new();
    let mut prompt_logprobs = Vec::new();
    while let Some(event) = events.next().await {
        match event {
            SeqEvent::Scheduled => {}
            SeqEvent::PromptLogprobs(values) => prompt_logprobs = values,
            SeqEvent::Token {
                id,
                text,
                special,
                logprobs,
                finish,
            } => {
                if valid.details {
                    let logprob = logprobs.as_ref().map(|l| l.logprob);
                    tokens.push(token_json(id, &text, logprob, special));
                    if valid.top_n_tokens > 0 {
                        top_tokens.push(top_tokens_json(&state, logprobs.as_ref()));
                    }
                }
                if let Some(finish) = finish {
                    drop(events);
                    let mut body =
                        json!({ "generated_text": full_text(&valid, &finish.generated_text) });
                    if valid.details {
                        let mut details = details_json(&finish, reported_seed(&valid));
                        details["prefill"] = if valid.params.prompt_logprobs {
                            prefill_json(&state, &valid, &prompt_logprobs)
                        } else {
                            json!([])
                        };
                        details["tokens"] = Value::Array(tokens);
                        if valid.top_n_tokens > 0 {
                            details["top_tokens"] = Value::Array(top_tokens);
                        }
                        body["details"] = details;
                    }
                    return Ok(Json(body));
                }
            }
            SeqEvent::Failed(message) => return Err(ApiError::Generation(message)),
        }
    }
    Err(ApiError::stopped_early())
}

/// State carried from one SSE event to the next.
struct StreamState {
    /// Dropped as soon as the sequence ends, so its usage is recorded before the last event.
    events: Option<SequenceEvents>,
    valid: ValidRequest,
    index: usize,
    done: bool,
    end: StreamEnd,
}

impl StreamState {
    /// The next SSE event, or None when the stream is over.
    async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            let next = match self.events.as_mut() {
                Some(events) => events.next().await,
                None => None,
            };
            match next {
                Some(SeqEvent::Scheduled) | Some(SeqEvent::PromptLogprobs(_)) => continue,
                Some(SeqEvent::Token {
                    id,
                    text,
                    special,
                    logprobs,
                    finish,
                }) => {
                    self.index += 1;
                    let logprob = logprobs.as_ref().map(|l| l.logprob);
                    let mut body = json!({
                        "index": self.index,
                        "token": token_json(id, &text, logprob, special),
                        "generated_text": null,
                        "details": null,
                    });
                    if self.valid.top_n_tokens > 0 {
                        body["top_tokens"] = top_tokens_json(self.end.app(), logprobs.as_ref());
                    }
                    if let Some(finish) = finish {
                        body["generated_text"] =
                            json!(full_text(&self.valid, &finish.generated_text));
                        let mut details = details_json(&finish, reported_seed(&self.valid));
                        // TGI's stream details also carry the prompt's length.
                        details["input_length"] = json!(self.valid.prompt_ids.len());
                        body["details"] = details;
                        self.done = true;
                        self.events = None;
                        self.end.ended(200);
                    }
                    return Some(Event::default().data(body.to_string()));
                }
                Some(SeqEvent::Failed(message)) => {
                    let ctx = self.end.ctx();
                    let tracker = &self.end.app().tracker;
                    tracker.record_with(&ctx.request_id, Stage::Failed, message.clone());
                    self.done = true;
                    self.end.ended(500);
                    let err = ApiError::Generation(message);
                    return Some(Event::default().data(err.body().to_string()));
                }
                None => {
                    self.done = true;
                    self.end.ended(500);
                    let err = ApiError::stopped_early();
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
    let (valid, events) = admit(&app, &ctx, request, true).await?;
    let state = StreamState {
        events: Some(events),
        valid,
        index: 0,
        done: false,
        end: StreamEnd::new(app, ctx),
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await?;
        Some((Ok::<Event, Infallible>(event), state))
    });
    Ok(super::sse::sse_response(stream))
}
