//! Entry points for fuzzing the parsers that read untrusted bytes: request bodies, the server
//! config, a model's `config.json`, GGUF and safetensors headers, and the SSE events a stream
//! writes. `fuzz/` drives them with cargo-fuzz (nightly); `tests/fuzz_corpus.rs` replays the
//! committed corpus and mutations of it on stable, in CI. Each target returns normally for
//! any input; a panic, or a broken property it asserts, is a bug.

use crate::http::params::{GenerateRequest, Limits};
use crate::model::tokenizer::ModelTokenizer;
use std::path::Path;
use std::sync::OnceLock;

/// A fuzz target: returns normally for any input.
pub type Target = fn(&[u8]);

/// The targets by name (the corpus folders are named after them).
pub const TARGETS: &[(&str, Target)] = &[
    ("tgi_request", tgi_request),
    ("openai_request", openai_request),
    ("server_config", server_config),
    ("model_config", model_config),
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("sse_event", sse_event),
];

fn limits() -> Limits {
    Limits {
        context: 256,
        max_input_tokens: 255,
        default_max_new_tokens: 20,
        max_new_tokens_limit: 200,
        max_logprobs: 5,
        max_choices: 16,
    }
}

/// The bundled test model's tokenizer (`models/stories260K`), loaded once.
fn tokenizer() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        match ModelTokenizer::load(&dir) {
            Ok(t) => t,
            Err(e) => panic!("the fuzz targets need {}: {e}", dir.display()),
        }
    })
}

/// A TGI `/generate` body: parsed, then validated (tokenized, every parameter checked); a
/// valid request's prompt and limits must agree.
pub fn tgi_request(data: &[u8]) {
    let Ok(request) = crate::http::body::parse_json::<GenerateRequest>(data) else {
        return;
    };
    let limits = limits();
    let streaming = data.len().is_multiple_of(2);
    if let Ok(valid) = request.validate(tokenizer(), &limits, streaming) {
        let prompt = valid.prompt_ids.len();
        assert!(prompt >= 1 && prompt <= limits.max_input_tokens);
        assert!(prompt + valid.params.max_new_tokens <= limits.context);
    }
}

/// An OpenAI `/v1/completions` or `/v1/chat/completions` body, through both routes' checks.
pub fn openai_request(data: &[u8]) {
    let _ = crate::http::openai::check_body(data, &limits());
}

/// `cllm.yaml`: parsed and validated.
pub fn server_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::ServerConfig::from_yaml_str(text);
    }
}

/// A model folder's `config.json`: a config that loads has every dimension it needs.
pub fn model_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = Path::new("config.json");
        if let Ok(config) = crate::model::config::ModelConfig::from_json(text, path) {
            assert!(config.hidden_size > 0 && config.num_attention_heads > 0);
            assert!(config.vocab_size > 0 && config.max_position_embeddings > 0);
        }
    }
}

/// A GGUF file: header, metadata and tensor table; then the model config and the vocabulary
/// the metadata describes. Every tensor's data must lie within the file.
pub fn gguf(data: &[u8]) {
    use crate::model::gguf::{header, hparams, vocab};
    let Ok(parsed) = header::parse(data) else {
        return;
    };
    for info in parsed.tensors.values() {
        assert!(info.range.start <= info.range.end && info.range.end <= data.len());
    }
    let path = Path::new("fuzz.gguf");
    let _ = hparams::model_config(&parsed.metadata, &parsed.tensors, None, path);
    let _ = vocab::build(&parsed.metadata);
}

/// A safetensors file: its tensor index. Every tensor's bytes must lie within the file and
/// match its shape and type.
pub fn safetensors(data: &[u8]) {
    if let Ok(index) = crate::model::weights::index_safetensors(data) {
        for (_, (dtype, shape, range)) in index {
            assert!(range.start <= range.end && range.end <= data.len());
            let elems: usize = shape.iter().product();
            assert_eq!(range.len(), dtype.bytes_for(elems));
        }
    }
}

/// The SSE event a stream writes for a generated token whose text is `data` (lossy UTF-8):
/// however odd the text (newlines, CR, NUL, `data:` inside), the event must be one SSE event
/// whose data parses back to the same JSON.
pub fn sse_event(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let body = serde_json::json!({
        "index": 1,
        "token": { "id": 7, "text": text, "logprob": -0.5, "special": false },
        "generated_text": text,
        "details": null,
    });
    let wire = sse_wire(&body);
    assert!(wire.ends_with("\n\n"), "{wire:?}");
    let event = &wire[..wire.len() - 2];
    assert!(!event.contains("\n\n"), "one event: {wire:?}");
    let payload: Vec<&str> = event
        .split('\n')
        .map(|line| {
            line.strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
        })
        .collect::<Option<_>>()
        .unwrap_or_else(|| panic!("only data lines: {wire:?}"));
    let back: serde_json::Value = serde_json::from_str(&payload.join("\n")).expect("JSON");
    assert_eq!(back, body);
}

/// What a stream puts on the wire for one event carrying `body`, as the handlers build it
/// (`Event::data` of the JSON text) and axum's `Sse` writes it.
fn sse_wire(body: &serde_json::Value) -> String {
    use axum::response::sse::{Event, Sse};
    use axum::response::IntoResponse;
    let event: Result<Event, std::convert::Infallible> =
        Ok(Event::default().data(body.to_string()));
    let response = Sse::new(futures_util::stream::iter([event])).into_response();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    let bytes = runtime
        .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .expect("an in-memory body");
    String::from_utf8(bytes.to_vec()).expect("SSE is UTF-8")
}
