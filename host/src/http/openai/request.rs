//! OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) and their validation into
//! a [`Job`]: the sequences to run and how to render their answers. Unknown fields are
//! ignored; known fields cllm does not implement are refused, naming the field.

use crate::admission::SequenceSpec;
use crate::error::{invalid_param, ApiError};
use crate::http::params::{Limits, MAX_STOP_SEQUENCES};
use crate::model::generation::GenerationParams;
use crate::model::rng::Rng;
use crate::model::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

/// Fields both endpoints take. (`user`, `store`, `metadata`, `service_tier` and other fields
/// that do not change the result are ignored like unknown fields.)
#[derive(Deserialize, Debug, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's extension: keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// vLLM's extension: Hugging Face's repetition penalty.
    pub repetition_penalty: Option<f32>,
    pub n: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// cllm's extension: the queue priority, as TGI's `parameters.priority`.
    pub priority: Option<i32>,
    pub logit_bias: Option<Value>,
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `/v1/completions` fields beyond [`Common`].
#[derive(Deserialize, Debug)]
pub struct CompletionFields {
    pub prompt: Option<Prompt>,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

/// A completion prompt: text, texts, token ids, or lists of token ids.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `/v1/chat/completions` fields beyond [`Common`].
#[derive(Deserialize, Debug)]
pub struct ChatFields {
    pub messages: Option<Vec<super::super::chat::ChatMessage>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub audio: Option<Value>,
    pub modalities: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub reasoning_effort: Option<Value>,
}

/// Which OpenAI API a job answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// A validated OpenAI request: its prompts (tokenized), `n` choices per prompt, and how to
/// render the answer.
#[derive(Debug)]
pub struct Job {
    pub api: Api,
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub params: GenerationParams,
    /// Whether the request gave a seed (then choice `i` samples with `seed + i`).
    pub seeded: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Report log-probabilities, with this many alternatives per token.
    pub logprobs: Option<usize>,
    pub priority: Option<i32>,
}

impl Job {
    /// One sequence per choice: prompt-major, `n` per prompt (choice index = prompt × n + j).
    pub fn sequences(&self) -> Vec<SequenceSpec> {
        let base = self.params.sampling.seed;
        let mut out = Vec::with_capacity(self.choices());
        for prompt in &self.prompts {
            for _ in 0..self.n {
                let i = out.len() as u64;
                let mut params = self.params.clone();
                params.sampling.seed = match (self.seeded, i) {
                    (true, _) => base.wrapping_add(i),
                    (false, 0) => base,
                    (false, _) => Rng::fresh_seed(),
                };
                out.push(SequenceSpec {
                    prompt_ids: prompt.clone(),
                    params,
                });
            }
        }
        out
    }

    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// Refuses a known field that is set to something cllm would otherwise have to ignore.
fn refuse_if(used: bool, field: &str, what: &str) -> Result<(), ApiError> {
    if used {
        return Err(invalid_param(
            field,
            format!("`{field}` is not supported by cllm yet{what}"),
        ));
    }
    Ok(())
}

fn is_set(v: &Option<Value>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null())
}

fn nonempty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// An endpoint's own fields.
pub trait Fields: serde::de::DeserializeOwned {
    /// Refuses known fields that are set to something cllm does not implement.
    fn refuse_unsupported(&self, common: &Common) -> Result<(), ApiError>;
}

impl Fields for CompletionFields {
    fn refuse_unsupported(&self, common: &Common) -> Result<(), ApiError> {
        refuse_if(self.echo == Some(true), "echo", "")?;
        refuse_if(
            self.suffix.as_deref().is_some_and(|s| !s.is_empty()),
            "suffix",
            "",
        )?;
        refuse_if(
            self.best_of.is_some_and(|b| b > 1),
            "best_of",
            " (ask for `n` choices instead)",
        )?;
        refuse_if(nonempty(&common.logit_bias), "logit_bias", "")
    }
}

impl Fields for ChatFields {
    fn refuse_unsupported(&self, common: &Common) -> Result<(), ApiError> {
        let text_format = self
            .response_format
            .as_ref()
            .is_none_or(|f| f.is_null() || f.get("type").and_then(Value::as_str) == Some("text"));
        refuse_if(
            !text_format,
            "response_format",
            " (only {\"type\": \"text\"})",
        )?;
        refuse_if(nonempty(&self.tools), "tools", "")?;
        let no_tool_choice = match &self.tool_choice {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s == "none" || s == "auto",
            Some(_) => false,
        };
        refuse_if(!no_tool_choice, "tool_choice", "")?;
        refuse_if(nonempty(&self.functions), "functions", "")?;
        refuse_if(is_set(&self.function_call), "function_call", "")?;
        refuse_if(is_set(&self.audio), "audio", "")?;
        let text_only = match &self.modalities {
            None | Some(Value::Null) => true,
            Some(Value::Array(m)) => m.iter().all(|x| x.as_str() == Some("text")),
            Some(_) => false,
        };
        refuse_if(!text_only, "modalities", " (only [\"text\"])")?;
        refuse_if(is_set(&self.prediction), "prediction", "")?;
        refuse_if(is_set(&self.web_search_options), "web_search_options", "")?;
        refuse_if(is_set(&self.reasoning_effort), "reasoning_effort", "")?;
        refuse_if(nonempty(&common.logit_bias), "logit_bias", "")
    }
}

impl ChatFields {
    /// `logprobs: true` with `top_logprobs: k` → `Some(k)`.
    pub fn logprobs(&self, limits: &Limits) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.map(|k| k as usize);
        if let Some(k) = top {
            if k > limits.max_logprobs {
                return Err(invalid_param(
                    "top_logprobs",
                    format!("`top_logprobs` must be at most {}", limits.max_logprobs),
                ));
            }
            if self.logprobs != Some(true) && k > 0 {
                return Err(invalid_param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs` set to true",
                ));
            }
        }
        Ok((self.logprobs == Some(true)).then_some(top.unwrap_or(0)))
    }
}

/// The range checks and defaults common to both APIs. `max_new_default` is the default
/// `max_tokens` given the longest prompt.
pub fn build_job(
    api: Api,
    common: &Common,
    prompts: Vec<Vec<u32>>,
    logprobs: Option<usize>,
    limits: &Limits,
) -> Result<Job, ApiError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let prompt_field = if api == Api::Chat {
        "messages"
    } else {
        "prompt"
    };
    if prompts.iter().any(Vec::is_empty) {
        let field = prompt_field;
        return Err(invalid_param(field, format!("`{field}` must not be empty")));
    }
    // OpenAI's wording for the context errors, which some clients match on.
    let too_long = |message: String| ApiError::ContextLength {
        param: prompt_field.to_string(),
        message,
    };
    let what = prompt_field;
    if longest > limits.max_input_tokens {
        let message = if limits.max_input_tokens >= limits.context {
            format!(
                "This model's maximum context length is {} tokens. However, your {what} \
                 resulted in {longest} tokens. Please reduce the length of the {what}.",
                limits.context
            )
        } else {
            format!(
                "This server accepts at most {} prompt tokens. However, your {what} resulted \
                 in {longest} tokens. Please reduce the length of the {what}.",
                limits.max_input_tokens
            )
        };
        return Err(too_long(message));
    }
    let room = limits.context.saturating_sub(longest);
    let field = if common.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        Some(0) => {
            return Err(invalid_param(
                field,
                format!("`{field}` must be at least 1"),
            ))
        }
        Some(n) if n as usize > limits.max_new_tokens_limit => {
            return Err(invalid_param(
                field,
                format!("`{field}` must be at most {}", limits.max_new_tokens_limit),
            ))
        }
        Some(n) if n as usize > room => {
            return Err(too_long(format!(
                "This model's maximum context length is {} tokens. However, you requested {} \
                 tokens ({longest} in the {what}, {n} in the completion). Please reduce the \
                 length of the {what} or completion.",
                limits.context,
                longest + n as usize
            )))
        }
        Some(n) => n as usize,
        // OpenAI's default for completions; a chat reply may use the rest of the context.
        None if api == Api::Completions => 16.min(room),
        None => limits.max_new_tokens_limit.min(room),
    };
    if max_tokens == 0 {
        return Err(too_long(format!(
            "This model's maximum context length is {} tokens. However, your {what} resulted \
             in {longest} tokens, which leaves no room for the completion. Please reduce the \
             length of the {what}.",
            limits.context
        )));
    }
    let n = common.n.unwrap_or(1) as usize;
    let choices = n.saturating_mul(prompts.len());
    if n == 0 || choices > limits.max_choices {
        return Err(invalid_param(
            "n",
            format!(
                "`n` must be between 1 and {} (times the number of prompts)",
                limits.max_choices
            ),
        ));
    }
    let stop = match &common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(list)) => list.clone(),
    };
    if stop.len() > MAX_STOP_SEQUENCES || stop.iter().any(String::is_empty) {
        return Err(invalid_param(
            "stop",
            format!("`stop` must be at most {MAX_STOP_SEQUENCES} non-empty strings"),
        ));
    }
    let sampling = sampling(common)?;
    Ok(Job {
        api,
        prompts,
        n,
        params: GenerationParams {
            max_new_tokens: max_tokens,
            sampling,
            stop,
            ignore_eos: false,
            logprobs,
            prompt_logprobs: false,
        },
        seeded: common.seed.is_some(),
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        priority: common.priority,
    })
}

fn in_range(value: Option<f32>, field: &str, lo: f32, hi: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(v.is_finite() && v >= lo && v <= hi) => Err(invalid_param(
            field,
            format!("`{field}` must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// OpenAI's sampling: temperature 1 by default (sampling on), 0 means greedy.
fn sampling(common: &Common) -> Result<SamplingParams, ApiError> {
    in_range(common.temperature, "temperature", 0.0, 2.0)?;
    in_range(common.presence_penalty, "presence_penalty", -2.0, 2.0)?;
    in_range(common.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
    in_range(common.top_p, "top_p", 0.0, 1.0)?;
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(invalid_param(
                "top_k",
                format!("`top_k` must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let repetition_penalty = common.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(invalid_param(
            "repetition_penalty",
            "`repetition_penalty` must be > 0",
        ));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    // OpenAI takes `top_p: 0`, the smallest nucleus there is: the most likely token alone.
    let (top_k, top_p) = match common.top_p {
        Some(0.0) => (1, 1.0),
        p => (top_k, p.unwrap_or(1.0)),
    };
    Ok(SamplingParams {
        do_sample: temperature > 0.0,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        presence_penalty: common.presence_penalty.unwrap_or(0.0),
        frequency_penalty: common.frequency_penalty.unwrap_or(0.0),
        seed: common.seed.map_or_else(Rng::fresh_seed, |s| s as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            context: 100,
            max_input_tokens: 99,
            default_max_new_tokens: 10,
            max_new_tokens_limit: 50,
            max_logprobs: 20,
            max_choices: 8,
        }
    }

    fn common(json: serde_json::Value) -> Common {
        serde_json::from_value(json).unwrap()
    }

    fn param_of(result: Result<Job, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidParam { param, .. } | ApiError::ContextLength { param, .. }) => {
                param
            }
            other => panic!("expected an invalid param, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_openai() {
        let job = build_job(
            Api::Completions,
            &common(serde_json::json!({})),
            vec![vec![1, 2]],
            None,
            &limits(),
        )
        .unwrap();
        assert_eq!(job.params.max_new_tokens, 16);
        assert!(job.params.sampling.do_sample, "temperature 1 samples");
        let chat = build_job(
            Api::Chat,
            &common(serde_json::json!({"temperature": 0})),
            vec![vec![1; 90]],
            None,
            &limits(),
        )
        .unwrap();
        assert_eq!(chat.params.max_new_tokens, 10, "the rest of the context");
        assert!(chat.params.sampling.is_greedy());
        let job = |body| build_job(Api::Chat, &common(body), vec![vec![1; 60]], None, &limits());
        let nucleus = job(serde_json::json!({"top_p": 0})).unwrap();
        assert_eq!(nucleus.params.sampling.top_k, 1, "top_p 0 keeps one token");
        let long = job(serde_json::json!({"max_tokens": 45})).unwrap_err();
        assert!(matches!(long, ApiError::ContextLength { .. }), "{long:?}");
        assert!(
            long.to_string().contains("maximum context length is 100"),
            "{long}"
        );
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (serde_json::json!({"temperature": 3.0}), "temperature"),
            (serde_json::json!({"top_p": -0.1}), "top_p"),
            (serde_json::json!({"n": 9}), "n"),
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"max_tokens": 0}), "max_tokens"),
            (
                serde_json::json!({"max_completion_tokens": 51}),
                "max_completion_tokens",
            ),
            (serde_json::json!({"max_tokens": 99}), "max_tokens"),
            (
                serde_json::json!({"presence_penalty": -2.5}),
                "presence_penalty",
            ),
            (serde_json::json!({"stop": [""]}), "stop"),
        ];
        for (body, field) in cases {
            let result = build_job(
                Api::Completions,
                &common(body.clone()),
                vec![vec![1, 2]],
                None,
                &limits(),
            );
            assert_eq!(param_of(result), field, "{body}");
        }
    }

    #[test]
    fn choices_are_prompt_major_with_consecutive_seeds() {
        let c = common(serde_json::json!({"n": 2, "seed": 7}));
        let job = build_job(
            Api::Completions,
            &c,
            vec![vec![1], vec![2]],
            None,
            &limits(),
        )
        .unwrap();
        let seqs = job.sequences();
        let seeds: Vec<u64> = seqs.iter().map(|s| s.params.sampling.seed).collect();
        assert_eq!(seeds, [7, 8, 9, 10]);
        let prompts: Vec<u32> = seqs.iter().map(|s| s.prompt_ids[0]).collect();
        assert_eq!(prompts, [1, 1, 2, 2]);
        let too_many = common(serde_json::json!({"n": 5}));
        let result = build_job(
            Api::Completions,
            &too_many,
            vec![vec![1], vec![2]],
            None,
            &limits(),
        );
        assert_eq!(param_of(result), "n");
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let chat: ChatFields = serde_json::from_value(serde_json::json!({
            "response_format": {"type": "json_object"}}))
        .unwrap();
        let err = chat.refuse_unsupported(&Common::default()).unwrap_err();
        assert!(
            matches!(err, ApiError::InvalidParam { ref param, .. } if param == "response_format")
        );
        let harmless: ChatFields = serde_json::from_value(serde_json::json!({
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none"}))
        .unwrap();
        assert!(harmless.refuse_unsupported(&Common::default()).is_ok());
        let completion: CompletionFields =
            serde_json::from_value(serde_json::json!({"echo": true})).unwrap();
        assert!(completion.refuse_unsupported(&Common::default()).is_err());
        let bias = common(serde_json::json!({"logit_bias": {"50256": -100}}));
        let plain: CompletionFields = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(plain.refuse_unsupported(&bias).is_err());
    }
}
