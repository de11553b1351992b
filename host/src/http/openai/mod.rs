//! OpenAI's API: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.
//! Requests are validated into a [`request::Job`], admitted like every other generation
//! request, and answered whole or as a stream of chunks. Errors take OpenAI's shape (the edge
//! converts them for every `/v1/*` path).

mod holdback;
mod render;
mod request;
mod stream;

use super::body::{parse_json, RawBody};
use super::chat::{render_prompt, ChatMessage};
use super::params::Limits;
use super::{AppState, RequestContext};
use crate::admission::{Admitted, SequenceEvents};
use crate::error::{invalid_param, ApiError};
use crate::scheduler::SeqEvent;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use render::{usage_json, Choice, Envelope, Generated};
use request::{build_job, Api, ChatFields, Common, CompletionFields, Fields, Job, Prompt};
use serde_json::{json, Value};
use std::sync::Arc;

/// Both routes' body checks without a server, for the fuzz targets: the handlers' own
/// validation ([`completion_job`], [`chat_job`]) with any model name accepted, text prompts
/// standing in as one token per byte (a 256-token vocabulary), and chat messages as one token
/// each (rendering needs a template).
pub fn check_body(body: &[u8], limits: &Limits) -> Result<(), ApiError> {
    let any_model = |_: Option<&str>| Ok(());
    let bytes = |text: &str| Ok(text.bytes().map(u32::from).collect());
    let completion = completion_job(body, limits, 256, any_model, bytes);
    let chat = chat_job(body, limits, any_model, |messages| {
        Ok(vec![1; messages.len()])
    });
    completion.or(chat).map(drop)
}

/// The prompts of a completion request, text ones tokenized by `encode` (token-id prompts
/// are checked against a vocabulary of `vocab_size`).
fn completion_prompts(
    prompt: Option<Prompt>,
    vocab_size: usize,
    encode: impl Fn(&str) -> Result<Vec<u32>, ApiError>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let prompts = match prompt {
        None => return Err(invalid_param("prompt", "`prompt` is required")),
        Some(Prompt::Text(text)) => vec![encode(&text)?],
        Some(Prompt::Texts(texts)) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Some(Prompt::Ids(ids)) => vec![ids],
        Some(Prompt::IdLists(lists)) => lists,
    };
    if prompts.is_empty() {
        return Err(invalid_param(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    if let Some(bad) = prompts
        .iter()
        .flatten()
        .find(|&&id| id as usize >= vocab_size)
    {
        return Err(invalid_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary ({vocab_size} tokens)"),
        ));
    }
    Ok(prompts)
}

/// The fields both APIs share and the endpoint's own, the `model` field vetted by
/// `check_model`, and fields cllm does not support refused.
fn parse_request<F: Fields>(
    body: &[u8],
    check_model: impl Fn(Option<&str>) -> Result<(), ApiError>,
) -> Result<(Common, F), ApiError> {
    let common: Common = parse_json(body)?;
    check_model(common.model.as_deref())?;
    let fields: F = parse_json(body)?;
    fields.refuse_unsupported(&common)?;
    Ok((common, fields))
}

/// A `/v1/completions` body, validated into its job; `encode` tokenizes text prompts.
fn completion_job(
    body: &[u8],
    limits: &Limits,
    vocab_size: usize,
    check_model: impl Fn(Option<&str>) -> Result<(), ApiError>,
    encode: impl Fn(&str) -> Result<Vec<u32>, ApiError>,
) -> Result<Job, ApiError> {
    let (common, fields) = parse_request::<CompletionFields>(body, check_model)?;
    let logprobs = fields.logprobs.map(|k| k as usize);
    if logprobs.is_some_and(|k| k > limits.max_logprobs) {
        return Err(invalid_param(
            "logprobs",
            format!("`logprobs` must be at most {}", limits.max_logprobs),
        ));
    }
    let prompts = completion_prompts(fields.prompt, vocab_size, encode)?;
    build_job(Api::Completions, &common, prompts, logprobs, limits)
}

/// A `/v1/chat/completions` body, validated into its job; `prompt_ids` renders and
/// tokenizes the messages.
fn chat_job(
    body: &[u8],
    limits: &Limits,
    check_model: impl Fn(Option<&str>) -> Result<(), ApiError>,
    prompt_ids: impl Fn(&[ChatMessage]) -> Result<Vec<u32>, ApiError>,
) -> Result<Job, ApiError> {
    let (common, fields) = parse_request::<ChatFields>(body, check_model)?;
    let logprobs = fields.logprobs(limits)?;
    let messages = fields
        .messages
        .ok_or_else(|| invalid_param("messages", "`messages` is required"))?;
    let ids = prompt_ids(&messages)?;
    build_job(Api::Chat, &common, vec![ids], logprobs, limits)
}

/// The served model's tokenizer, for the prompts of a request.
fn encode(state: &AppState, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    state
        .tokenizer
        .encode(text, special)
        .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let job = completion_job(
        &body,
        &state.limits,
        state.vocab_size,
        |model| state.check_model(model),
        |text| encode(&state, text, true),
    )?;
    answer(state, ctx, job).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let job = chat_job(
        &body,
        &state.limits,
        |model| state.check_model(model),
        |messages| encode(&state, &render_prompt(&state, messages)?, false),
    )?;
    answer(state, ctx, job).await
}

/// Admits `job` and answers it whole or streamed.
async fn answer(state: Arc<AppState>, ctx: RequestContext, job: Job) -> Result<Response, ApiError> {
    let ticket = ctx.ticket(job.priority, job.sequences());
    let admitted = state.admission.admit(ticket).await?;
    let envelope = Envelope::new(job.api, &ctx.request_id, &state.served_model_name);
    if job.stream {
        return Ok(stream::respond(state, ctx, job, envelope, admitted));
    }
    whole(&state, &job, &envelope, admitted)
        .await
        .map(|body| Json(body).into_response())
}

/// Runs one choice to its end: its JSON and how many tokens it generated.
async fn run_choice(
    state: &AppState,
    job: &Job,
    index: usize,
    mut events: SequenceEvents,
) -> Result<(Value, usize), ApiError> {
    let mut choice = Choice::new(index, job);
    while let Some(event) = events.next().await {
        match event {
            SeqEvent::Scheduled | SeqEvent::PromptLogprobs(_) => {}
            SeqEvent::Token {
                id,
                text,
                special,
                logprobs,
                finish,
            } => {
                choice.token(Generated {
                    id,
                    text: &text,
                    special,
                    logprobs,
                    finish: finish.as_ref().map(|f| (f.reason, f.generated_tokens)),
                });
                if let Some(finish) = finish {
                    let value = choice.finished_json(&state.tokenizer, job, &finish.generated_text);
                    return Ok((value, choice.completion_tokens));
                }
            }
            SeqEvent::Failed(message) => return Err(ApiError::Generation(message)),
        }
    }
    Err(ApiError::stopped_early())
}

/// The non-streamed response: every choice run concurrently to its end. The first choice
/// that fails ends the request: the others are dropped at once, which cancels their
/// sequences, rather than generated to their end for a response that is an error anyway.
async fn whole(
    state: &AppState,
    job: &Job,
    envelope: &Envelope,
    admitted: Admitted,
) -> Result<Value, ApiError> {
    let runs = admitted
        .sequences
        .into_iter()
        .enumerate()
        .map(|(index, events)| run_choice(state, job, index, events));
    let mut choices = Vec::with_capacity(job.choices());
    let mut completion_tokens = 0;
    for (choice, generated) in futures_util::future::try_join_all(runs).await? {
        completion_tokens += generated;
        choices.push(choice);
    }
    let prompt_tokens = job.prompts.iter().map(Vec::len).sum();
    Ok(envelope.response(choices, usage_json(prompt_tokens, completion_tokens)))
}

fn model_json(state: &AppState) -> Value {
    json!({
        "id": state.served_model_name,
        "object": "model",
        "created": state.started_unix,
        "owned_by": "cllm",
        "root": state.served_model_name,
        "max_model_len": state.limits.context,
    })
}

/// `GET /v1/models`: the one model this server serves.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_json(&state)] }))
}

/// `GET /v1/models/{model}`.
pub async fn model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.check_model(Some(&name))?;
    Ok(Json(model_json(&state)))
}
