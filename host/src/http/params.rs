//! TGI request bodies and their validation into a [`ValidRequest`]: nothing downstream
//! checks a parameter again.

use crate::error::ApiError;
use crate::model::generation::GenerationParams;
use crate::model::rng::Rng;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::ModelTokenizer;
use serde::Deserialize;

/// `POST /generate` and `/generate_stream` body.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    /// TGI clients may send it; the endpoint decides streaming.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// TGI's `parameters`. Fields TGI clients send (often as null) are accepted; those cllm does
/// not implement are refused only when given a value that would change the result.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    pub max_new_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub do_sample: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub details: Option<bool>,
    pub priority: Option<i32>,
    pub return_full_text: Option<bool>,
    /// Keep only the last `truncate` prompt tokens.
    pub truncate: Option<usize>,
    /// Report the prompt tokens with their log-probabilities in `details.prefill`.
    pub decoder_input_details: Option<bool>,
    pub best_of: Option<u32>,
    pub typical_p: Option<f32>,
    pub watermark: Option<bool>,
    /// Report this many most likely alternatives per generated token (`top_tokens`).
    pub top_n_tokens: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub grammar: Option<serde_json::Value>,
    pub adapter_id: Option<String>,
}

/// Most stop sequences one request may give (`/info`'s `max_stop_sequences`).
pub const MAX_STOP_SEQUENCES: usize = 16;

/// Limits requests are validated against.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Prompt plus new tokens must fit in this.
    pub context: usize,
    /// Most prompt tokens one sequence may have (`scheduler.max_input_tokens`).
    pub max_input_tokens: usize,
    pub default_max_new_tokens: usize,
    pub max_new_tokens_limit: usize,
    /// Most alternatives per token a request may ask for (`top_n_tokens`, `logprobs`).
    pub max_logprobs: usize,
    /// Most choices one OpenAI request may ask for (`n`, times the prompts of a list).
    pub max_choices: usize,
}

/// A request that passed validation: tokenized, with every parameter in range.
#[derive(Debug)]
pub struct ValidRequest {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub params: GenerationParams,
    pub details: bool,
    pub return_full_text: bool,
    pub requested_priority: Option<i32>,
    /// Alternatives per generated token to report (0: none).
    pub top_n_tokens: usize,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Validation(message.into())
}

impl Parameters {
    fn refuse_unsupported(&self) -> Result<(), ApiError> {
        if let Some(p) = self.typical_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(invalid("parameters.typical_p must be in (0, 1]"));
            }
        }
        let unsupported = [
            ("best_of", self.best_of.is_some_and(|n| n > 1)),
            ("typical_p", self.typical_p.is_some_and(|p| p < 1.0)),
            ("watermark", self.watermark == Some(true)),
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "grammar",
                self.grammar.as_ref().is_some_and(|g| !g.is_null()),
            ),
            ("adapter_id", self.adapter_id.is_some()),
        ];
        match unsupported.iter().find(|(_, used)| *used) {
            Some((name, _)) => Err(invalid(format!("parameters.{name} is not supported"))),
            None => Ok(()),
        }
    }

    /// Sampling settings, TGI-style: any of temperature / top_k / top_p turns sampling on.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(invalid("parameters.temperature must be >= 0"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("parameters.top_p must be in (0, 1]"));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(invalid("parameters.top_k must be >= 0"));
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !repetition_penalty.is_finite() || repetition_penalty <= 0.0 {
            return Err(invalid("parameters.repetition_penalty must be > 0"));
        }
        let warped = (self.temperature.is_some() && temperature != 1.0)
            || self.top_k.is_some_and(|k| k > 0)
            || self.top_p.is_some_and(|p| p < 1.0);
        // As TGI decides: a warper (temperature, top_k, top_p) samples even with
        // `do_sample: false`, which TGI's Python client sends by default with every request.
        let do_sample = (self.do_sample == Some(true) || warped) && temperature > 0.0;
        Ok(SamplingParams {
            do_sample,
            temperature,
            top_k: top_k as usize,
            top_p,
            repetition_penalty,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: self.seed.unwrap_or_else(Rng::fresh_seed),
        })
    }
}

impl GenerateRequest {
    /// Checks every parameter and tokenizes the prompt. `streaming` requests report each
    /// token's log-probability, as TGI's stream events do.
    pub fn validate(
        self,
        tokenizer: &ModelTokenizer,
        limits: &Limits,
        streaming: bool,
    ) -> Result<ValidRequest, ApiError> {
        let p = &self.parameters;
        p.refuse_unsupported()?;
        // As TGI: the prompt's tokens go in `details.prefill`, which a stream has no place for.
        if streaming && p.decoder_input_details == Some(true) {
            return Err(invalid(
                "parameters.decoder_input_details is not supported when streaming tokens",
            ));
        }
        let top_n_tokens = p.top_n_tokens.unwrap_or(0) as usize;
        if top_n_tokens > limits.max_logprobs {
            return Err(invalid(format!(
                "parameters.top_n_tokens must be at most {}",
                limits.max_logprobs
            )));
        }
        // TGI reports details when either asks (the prefill lives in `details`).
        let details = p.details == Some(true) || p.decoder_input_details == Some(true);
        if self.inputs.is_empty() {
            return Err(invalid("inputs must not be empty"));
        }
        let sampling = p.sampling()?;
        let max_new_tokens = p
            .max_new_tokens
            .map_or(limits.default_max_new_tokens, |n| n as usize);
        if max_new_tokens == 0 {
            return Err(invalid("parameters.max_new_tokens must be at least 1"));
        }
        if max_new_tokens > limits.max_new_tokens_limit {
            return Err(invalid(format!(
                "parameters.max_new_tokens must be at most {}",
                limits.max_new_tokens_limit
            )));
        }
        let stop = p.stop.clone().unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(invalid("parameters.stop must not contain empty strings"));
        }
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(format!(
                "parameters.stop must have at most {MAX_STOP_SEQUENCES} sequences"
            )));
        }
        let mut prompt_ids = tokenizer
            .encode(&self.inputs, true)
            .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?;
        if let Some(keep) = p.truncate {
            if keep == 0 {
                return Err(invalid("parameters.truncate must be at least 1"));
            }
            let excess = prompt_ids.len().saturating_sub(keep);
            prompt_ids.drain(..excess);
        }
        if prompt_ids.is_empty() {
            return Err(invalid("inputs tokenize to no tokens"));
        }
        if prompt_ids.len() > limits.max_input_tokens {
            return Err(invalid(format!(
                "inputs must have at most {} tokens; given: {}",
                limits.max_input_tokens,
                prompt_ids.len()
            )));
        }
        if prompt_ids.len() + max_new_tokens > limits.context {
            return Err(invalid(format!(
                "inputs ({} tokens) + max_new_tokens ({max_new_tokens}) exceed the context of {} tokens",
                prompt_ids.len(),
                limits.context
            )));
        }
        Ok(ValidRequest {
            prompt: self.inputs,
            prompt_ids,
            params: GenerationParams {
                max_new_tokens,
                sampling,
                stop,
                ignore_eos: false,
                logprobs: (details || streaming || top_n_tokens > 0).then_some(top_n_tokens),
                // Only `/generate` reports them (`details.prefill`; asking turns details on).
                prompt_logprobs: p.decoder_input_details == Some(true) && !streaming,
            },
            details,
            return_full_text: p.return_full_text.unwrap_or(false),
            requested_priority: p.priority,
            top_n_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(parameters: serde_json::Value) -> SamplingParams {
        let p: Parameters = serde_json::from_value(parameters).expect("parameters");
        p.sampling().expect("valid")
    }

    /// TGI samples when asked to or when a warper is set, even beside `do_sample: false`
    /// (what TGI's Python client sends by default); temperature 0 is always greedy.
    #[test]
    fn do_sample_follows_tgi() {
        let cases = [
            (serde_json::json!({}), false),
            (serde_json::json!({"do_sample": true}), true),
            (serde_json::json!({"do_sample": false}), false),
            (
                serde_json::json!({"do_sample": false, "temperature": 0.7}),
                true,
            ),
            (serde_json::json!({"do_sample": false, "top_k": 5}), true),
            (serde_json::json!({"do_sample": false, "top_p": 0.9}), true),
            (
                serde_json::json!({"do_sample": false, "temperature": 1.0}),
                false,
            ),
            (
                serde_json::json!({"do_sample": true, "temperature": 0.0}),
                false,
            ),
        ];
        for (parameters, want) in cases {
            assert_eq!(sampling(parameters.clone()).do_sample, want, "{parameters}");
        }
    }
}
