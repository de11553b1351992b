//! OpenAI response JSON: choices as they are generated (text, stop handling, log-probabilities),
//! whole responses, stream chunks and usage.

use super::holdback::Holdback;
use super::request::{Api, Job};
use crate::model::generation::FinishReason;
use crate::model::logprobs::TokenLogprobs;
use crate::model::tokenizer::ModelTokenizer;
use serde_json::{json, Value};

/// Names and times every response of one request shares.
pub struct Envelope {
    pub api: Api,
    /// `cmpl-…` or `chatcmpl-…`: the request id with the API's prefix.
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl Envelope {
    pub fn new(api: Api, request_id: &str, model: &str) -> Envelope {
        let prefix = match api {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        };
        Envelope {
            api,
            id: format!("{prefix}-{request_id}"),
            model: model.to_string(),
            created: crate::http::unix_now(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Completions, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The whole response of a non-streamed request.
    pub fn response(&self, choices: Vec<Value>, usage: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        })
    }

    /// One stream chunk; `usage` is `Some(null)` on ordinary chunks of a stream that ends with a
    /// usage chunk (as OpenAI sends them), `None` when usage was not asked for.
    pub fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

pub fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// OpenAI has two endings: `length` and `stop` (end-of-sequence token or stop sequence).
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
    }
}

/// One choice while it is generated.
pub struct Choice {
    pub index: usize,
    holdback: Holdback,
    /// Log-probabilities of tokens not yet reported, with the byte of the generated text each
    /// token's text starts at.
    logprobs: Vec<(u32, TokenLogprobs, usize)>,
    /// Bytes of text the tokens generated so far.
    generated_bytes: usize,
    /// Bytes of text reported so far.
    sent_bytes: usize,
    /// Characters of text reported so far (completions' `text_offset`).
    offset: usize,
    pub finish_reason: Option<&'static str>,
    /// The choice ended on a stop sequence, which its text leaves out.
    stopped_by_sequence: bool,
    /// Tokens the choice generated, known once it ends (its `usage` share).
    pub completion_tokens: usize,
}

/// One generated token as a choice takes it.
pub struct Generated<'a> {
    pub id: u32,
    pub text: &'a str,
    pub special: bool,
    pub logprobs: Option<TokenLogprobs>,
    /// The sequence's ending and generated-token count, when this token was its last.
    pub finish: Option<(FinishReason, usize)>,
}

/// What a choice has to report after a token: new text, log-probabilities, maybe its end.
pub struct Delta {
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

impl Choice {
    pub fn new(index: usize, job: &Job) -> Choice {
        Choice {
            index,
            holdback: Holdback::new(job.params.stop.clone()),
            logprobs: Vec::new(),
            generated_bytes: 0,
            sent_bytes: 0,
            offset: 0,
            finish_reason: None,
            stopped_by_sequence: false,
            completion_tokens: 0,
        }
    }

    /// Non-streamed: takes one generated token; `finish` is the sequence's ending when this
    /// token was its last. The text comes whole at the end; the token's own piece only places
    /// its log-probabilities in it.
    pub fn token(&mut self, token: Generated) {
        if let Some(lp) = token.logprobs.filter(|_| !token.special) {
            self.logprobs.push((token.id, lp, self.generated_bytes));
        }
        self.generated_bytes += token.text.len();
        if let Some((reason, generated)) = token.finish {
            self.stopped_by_sequence = reason == FinishReason::StopSequence;
            self.finish_reason = Some(finish_reason(reason));
            self.completion_tokens = generated;
        }
    }

    /// Streams: feeds a token and returns what to send now.
    pub fn stream_token(
        &mut self,
        tokenizer: &ModelTokenizer,
        job: &Job,
        token: Generated,
    ) -> Delta {
        let mut out = self.holdback.push(token.text);
        if token.finish.is_some() {
            out.push_str(&self.holdback.finish());
        }
        self.token(token);
        let logprobs = self.take_logprobs(tokenizer, job, &out);
        Delta {
            text: out,
            logprobs,
            finish_reason: self.finish_reason,
        }
    }

    /// The log-probabilities to report with `text`, once some text goes out (or the choice
    /// ends): those of the tokens whose text starts within the text reported so far, so that
    /// they line up with it. The tokens of a stop sequence, which the text leaves out, are
    /// never reported (OpenAI's text never contains the stop sequence).
    fn take_logprobs(
        &mut self,
        tokenizer: &ModelTokenizer,
        job: &Job,
        text: &str,
    ) -> Option<Value> {
        self.sent_bytes += text.len();
        job.logprobs?;
        if text.is_empty() && self.finish_reason.is_none() {
            return None;
        }
        // Without a stop sequence the whole text goes out at the end: every token counts, an
        // unfinished character's included.
        let cut = if self.finish_reason.is_some() && !self.stopped_by_sequence {
            usize::MAX
        } else {
            self.sent_bytes
        };
        let reported = self.logprobs.iter().take_while(|e| e.2 < cut).count();
        let entries: Vec<(u32, TokenLogprobs)> = self
            .logprobs
            .drain(..reported)
            .map(|(id, lp, _)| (id, lp))
            .collect();
        if self.finish_reason.is_some() {
            self.logprobs.clear();
        }
        let value = logprobs_json(tokenizer, job.api, &entries, self.offset);
        self.offset += text.chars().count();
        Some(value)
    }

    /// Non-streamed: the finished choice's JSON. `generated_text` is the sequence's whole text.
    pub fn finished_json(
        &mut self,
        tokenizer: &ModelTokenizer,
        job: &Job,
        generated_text: &str,
    ) -> Value {
        let text = super::holdback::truncate_at_stop(generated_text, &job.params.stop).to_string();
        let logprobs = self.take_logprobs(tokenizer, job, &text);
        let finish_reason = self.finish_reason.unwrap_or("stop");
        match job.api {
            Api::Completions => json!({
                "index": self.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Api::Chat => json!({
                "index": self.index,
                "message": { "role": "assistant", "content": text },
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        }
    }

    /// The stream chunk's choice for `delta` (chat: `delta.content`; completions: `text`).
    pub fn delta_json(&self, api: Api, delta: Delta) -> Value {
        match api {
            Api::Completions => json!({
                "index": self.index,
                "text": delta.text,
                "logprobs": delta.logprobs,
                "finish_reason": delta.finish_reason,
            }),
            Api::Chat => json!({
                "index": self.index,
                "delta": if delta.text.is_empty() { json!({}) } else { json!({ "content": delta.text }) },
                "logprobs": delta.logprobs,
                "finish_reason": delta.finish_reason,
            }),
        }
    }
}

/// Log-probabilities of `entries` in the API's shape. Completions: `{tokens, token_logprobs,
/// top_logprobs, text_offset}` (each top dict holds the chosen token too); chat: `{content:
/// [{token, logprob, bytes, top_logprobs}]}`.
fn logprobs_json(
    tokenizer: &ModelTokenizer,
    api: Api,
    entries: &[(u32, TokenLogprobs)],
    start_offset: usize,
) -> Value {
    match api {
        Api::Completions => {
            let mut offset = start_offset;
            let mut tokens = Vec::with_capacity(entries.len());
            let mut token_logprobs = Vec::with_capacity(entries.len());
            let mut top_logprobs = Vec::with_capacity(entries.len());
            let mut text_offset = Vec::with_capacity(entries.len());
            for (id, lp) in entries {
                let token = tokenizer.token_string(*id);
                text_offset.push(offset);
                offset += token.chars().count();
                let mut top = serde_json::Map::new();
                for &(alt, logprob) in &lp.top {
                    top.insert(tokenizer.token_string(alt), json!(logprob));
                }
                top.entry(token.clone()).or_insert(json!(lp.logprob));
                tokens.push(json!(token));
                token_logprobs.push(json!(lp.logprob));
                top_logprobs.push(Value::Object(top));
            }
            json!({
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": text_offset,
            })
        }
        Api::Chat => {
            let entry = |id: u32, logprob: f32| {
                let bytes = tokenizer.token_bytes(id);
                json!({
                    "token": String::from_utf8_lossy(&bytes),
                    "logprob": logprob,
                    "bytes": bytes,
                })
            };
            let content: Vec<Value> = entries
                .iter()
                .map(|(id, lp)| {
                    let mut item = entry(*id, lp.logprob);
                    item["top_logprobs"] = lp.top.iter().map(|&(alt, l)| entry(alt, l)).collect();
                    item
                })
                .collect();
            json!({ "content": content, "refusal": null })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generation::GenerationParams;
    use std::path::Path;

    fn tokenizer() -> ModelTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        ModelTokenizer::load(&dir).expect("bundled tokenizer")
    }

    fn job(stop: &str, stream: bool) -> Job {
        Job {
            api: Api::Completions,
            prompts: vec![vec![1]],
            n: 1,
            params: GenerationParams {
                stop: vec![stop.to_string()],
                logprobs: Some(0),
                ..GenerationParams::default()
            },
            seeded: false,
            stream,
            include_usage: false,
            logprobs: Some(0),
            priority: None,
        }
    }

    /// The generated pieces in turn, the last ending the sequence on `reason`.
    fn tokens<'a>(pieces: &'a [&'a str], reason: FinishReason) -> Vec<Generated<'a>> {
        pieces
            .iter()
            .enumerate()
            .map(|(i, text)| Generated {
                id: 10 + i as u32,
                text,
                special: false,
                logprobs: Some(TokenLogprobs {
                    logprob: -0.5,
                    top: Vec::new(),
                }),
                finish: (i + 1 == pieces.len()).then_some((reason, pieces.len())),
            })
            .collect()
    }

    fn reported(logprobs: &Value) -> usize {
        logprobs["tokens"].as_array().map_or(0, Vec::len)
    }

    /// Tokens reported for `pieces`, whole and streamed, and the texts.
    fn run(pieces: &[&str], stop: &str, reason: FinishReason) -> [(usize, String); 2] {
        let tokenizer = tokenizer();
        let whole_job = job(stop, false);
        let mut choice = Choice::new(0, &whole_job);
        for token in tokens(pieces, reason) {
            choice.token(token);
        }
        let generated: String = pieces.concat();
        let body = choice.finished_json(&tokenizer, &whole_job, &generated);
        let whole = (
            reported(&body["logprobs"]),
            body["text"].as_str().unwrap_or_default().to_string(),
        );
        let stream_job = job(stop, true);
        let mut choice = Choice::new(0, &stream_job);
        let (mut count, mut text) = (0, String::new());
        for token in tokens(pieces, reason) {
            let delta = choice.stream_token(&tokenizer, &stream_job, token);
            count += delta.logprobs.as_ref().map_or(0, reported);
            text.push_str(&delta.text);
        }
        [whole, (count, text)]
    }

    #[test]
    fn a_stop_sequences_tokens_get_no_logprobs() {
        // The stop sequence starts where a token starts: that token is left out.
        let pieces = ["Hello", " wor", "ld!"];
        for (count, text) in run(&pieces, "ld", FinishReason::StopSequence) {
            assert_eq!((count, text.as_str()), (2, "Hello wor"));
        }
        // It starts inside a token: the token that runs into it is kept.
        for (count, text) in run(&pieces[..2], "or", FinishReason::StopSequence) {
            assert_eq!((count, text.as_str()), (2, "Hello w"));
        }
        // A character split over two tokens (the first adds no text): both are kept.
        let pieces = ["a", "", "\u{e9}", "b"];
        for (count, text) in run(&pieces, "b", FinishReason::StopSequence) {
            assert_eq!((count, text.as_str()), (3, "a\u{e9}"));
        }
        // Without a stop sequence every token is reported.
        for (count, text) in run(&pieces, "zz", FinishReason::Length) {
            assert_eq!((count, text.as_str()), (4, "a\u{e9}b"));
        }
    }
}
