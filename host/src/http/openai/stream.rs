//! Streamed OpenAI answers: SSE chunks (`chat.completion.chunk` with a first `role` delta, or
//! `text_completion`), the choices of one request interleaved as their tokens come, an optional
//! usage chunk, and `data: [DONE]`. Text goes through each choice's stop-sequence holdback, so
//! the deltas join to exactly the non-streamed text.

use super::render::{usage_json, Choice, Delta, Envelope, Generated};
use super::request::{Api, Job};
use crate::admission::{Admitted, SequenceEvents};
use crate::error::ApiError;
use crate::http::stream_end::StreamEnd;
use crate::http::{AppState, RequestContext};
use crate::scheduler::SeqEvent;
use crate::tracker::Stage;
use axum::response::sse::Event;
use axum::response::Response;
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

/// One sequence's events tagged with its choice index. A sequence's stream is dropped (and its
/// usage counted) as soon as its last event is out.
fn tagged(index: usize, events: SequenceEvents) -> BoxStream<'static, (usize, SeqEvent)> {
    futures_util::stream::unfold(Some(events), move |events| async move {
        let mut events = events?;
        let event = events.next().await?;
        let ended = matches!(
            event,
            SeqEvent::Failed(_)
                | SeqEvent::Token {
                    finish: Some(_),
                    ..
                }
        );
        Some(((index, event), (!ended).then_some(events)))
    })
    .boxed()
}

struct ChunkStream {
    merged: SelectAll<BoxStream<'static, (usize, SeqEvent)>>,
    job: Job,
    envelope: Envelope,
    choices: Vec<Choice>,
    /// Events ready to send, in order.
    ready: VecDeque<Event>,
    started: bool,
    finished: usize,
    done: bool,
    end: StreamEnd,
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

impl ChunkStream {
    /// `Some(null)` on every chunk when a usage chunk will close the stream (OpenAI's shape).
    fn usage_slot(&self) -> Option<Value> {
        self.job.include_usage.then_some(Value::Null)
    }

    fn push_chunk(&mut self, choice: Value) {
        let chunk = self.envelope.chunk(vec![choice], self.usage_slot());
        self.ready.push_back(data(&chunk));
    }

    /// Chat streams open with each choice's role.
    fn start(&mut self) {
        self.started = true;
        if self.job.api != Api::Chat {
            return;
        }
        for index in 0..self.choices.len() {
            self.push_chunk(json!({
                "index": index,
                "delta": { "role": "assistant", "content": "" },
                "logprobs": null,
                "finish_reason": null,
            }));
        }
    }

    fn on_token(&mut self, index: usize, event: SeqEvent) {
        let SeqEvent::Token {
            id,
            text,
            special,
            logprobs,
            finish,
        } = event
        else {
            return;
        };
        let Some(choice) = self.choices.get_mut(index) else {
            return;
        };
        let end = finish.as_ref().map(|f| (f.reason, f.generated_tokens));
        let tokenizer = &self.end.app().tokenizer;
        let token = Generated {
            id,
            text: &text,
            special,
            logprobs,
            finish: end,
        };
        let delta = choice.stream_token(tokenizer, &self.job, token);
        let finish_reason = delta.finish_reason;
        let has_content = !delta.text.is_empty() || delta.logprobs.is_some();
        match (self.job.api, finish_reason) {
            // Chat ends with its own chunk: an empty delta and the finish reason.
            (Api::Chat, Some(reason)) => {
                if has_content {
                    let content = choice.delta_json(
                        Api::Chat,
                        Delta {
                            finish_reason: None,
                            ..delta
                        },
                    );
                    self.push_chunk(content);
                }
                let last = json!({
                    "index": index, "delta": {}, "logprobs": null, "finish_reason": reason,
                });
                self.push_chunk(last);
            }
            (api, reason) if has_content || reason.is_some() => {
                let value = choice.delta_json(api, delta);
                self.push_chunk(value);
            }
            _ => {}
        }
        if finish_reason.is_some() {
            self.finished += 1;
            if self.finished == self.choices.len() {
                self.close(200);
            }
        }
    }

    /// Ends the stream: the usage chunk (when asked for), then `[DONE]`.
    fn close(&mut self, status: u16) {
        if self.job.include_usage && status == 200 {
            let prompt_tokens = self.job.prompts.iter().map(Vec::len).sum();
            let completion_tokens = self.choices.iter().map(|c| c.completion_tokens).sum();
            let usage = usage_json(prompt_tokens, completion_tokens);
            let chunk = self.envelope.chunk(Vec::new(), Some(usage));
            self.ready.push_back(data(&chunk));
        }
        self.ready.push_back(Event::default().data("[DONE]"));
        self.done = true;
        self.end.ended(status);
    }

    fn fail(&mut self, err: ApiError) {
        let ctx = self.end.ctx();
        let app = self.end.app();
        app.tracker
            .record_with(&ctx.request_id, Stage::Failed, err.to_string());
        self.ready.push_back(data(&err.openai_body()));
        // Whatever else runs for this request is cancelled when the stream is dropped.
        self.merged = SelectAll::new();
        self.close(500);
    }

    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            if !self.started {
                self.start();
                continue;
            }
            match self.merged.next().await {
                Some((_, SeqEvent::Scheduled | SeqEvent::PromptLogprobs(_))) => {}
                Some((index, event @ SeqEvent::Token { .. })) => self.on_token(index, event),
                Some((_, SeqEvent::Failed(message))) => self.fail(ApiError::Generation(message)),
                None => self.fail(ApiError::IncompleteGeneration(
                    "the scheduler stopped before every choice finished".into(),
                )),
            }
        }
    }
}

/// The SSE response for an admitted, streamed job.
pub fn respond(
    state: Arc<AppState>,
    ctx: RequestContext,
    job: Job,
    envelope: Envelope,
    admitted: Admitted,
) -> Response {
    let merged = futures_util::stream::select_all(
        admitted
            .sequences
            .into_iter()
            .enumerate()
            .map(|(index, events)| tagged(index, events)),
    );
    let choices = (0..job.choices()).map(|i| Choice::new(i, &job)).collect();
    let stream = ChunkStream {
        merged,
        job,
        envelope,
        choices,
        ready: VecDeque::new(),
        started: false,
        finished: 0,
        done: false,
        end: StreamEnd::new(state, ctx),
    };
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok::<Event, Infallible>(event), stream))
    });
    crate::http::sse::sse_response(body)
}
