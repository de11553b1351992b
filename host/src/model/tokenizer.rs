//! `tokenizer.json` through the `tokenizers` crate, with the special tokens the folder declares.

use super::config::TokenIds;
use super::error::{read_json, ModelError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A byte range `(start, end)` of the text a token came from.
pub type Span = (usize, usize);

/// Texts at least this long are tokenized off the async workers (see
/// [`crate::blocking::off_async_workers`]); shorter ones take microseconds.
const LONG_TEXT_BYTES: usize = 16 << 10;

pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Ids of the added tokens marked special (looked up per generated token).
    special_ids: std::collections::HashSet<u32>,
    /// Whether the vocabulary is byte-level BPE (GPT-2's byte-to-character mapping).
    byte_level: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

/// A special token in `tokenizer_config.json`: a plain string or `{"content": ...}`.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn into_text(self) -> String {
        match self {
            SpecialToken::Text(t) | SpecialToken::Added { content: t } => t,
        }
    }
}

#[derive(Deserialize, Debug, Default)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    chat_template: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug, Default)]
pub(crate) struct GenerationConfig {
    pub(crate) eos_token_id: Option<TokenIds>,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile(dir.to_path_buf(), "tokenizer.json"));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let chat_template = match chat_template_file(dir)? {
            Some(text) => Some(text),
            None => config.chat_template.as_ref().and_then(template_of),
        };
        Ok(Self::from_parts(
            inner,
            path,
            config.bos_token.map(SpecialToken::into_text),
            config.eos_token.map(SpecialToken::into_text),
            chat_template,
        ))
    }

    /// A tokenizer built elsewhere (from a GGUF file's vocabulary); `path` names its source
    /// in errors.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        path: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter_map(|(id, token)| token.special.then_some(id))
            .collect();
        let byte_level = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("\"ByteLevel\""));
        ModelTokenizer {
            inner,
            path,
            special_ids,
            byte_level,
            bos_token,
            eos_token,
            chat_template,
        }
    }

    /// The same tokenizer with `template` as its chat template when it has none.
    pub fn with_fallback_template(mut self, template: Option<String>) -> Self {
        if self.chat_template.is_none() {
            self.chat_template = template;
        }
        self
    }

    fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        let encode = || {
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| self.error(e))
        };
        // A long text takes milliseconds (a 1 MiB body, hundreds): not on an async worker.
        if text.len() >= LONG_TEXT_BYTES {
            crate::blocking::off_async_workers(encode)
        } else {
            encode()
        }
    }

    /// Token ids of `text`, with the special tokens (e.g. BOS) the tokenizer adds itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Ids with the byte range of the text each came from.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Span>)> {
        let encoding = self.encoding(text, add_special_tokens)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Ids with their token strings, as `/encode` reports them.
    pub fn encode_with_tokens(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let encoding = self.encoding(text, true)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_tokens().to_vec()))
    }

    /// Text of `ids`, special tokens left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    /// The vocabulary string of one token id.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is one of the tokenizer's special (added, special) tokens.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The bytes one token stands for on its own: byte-level BPE characters mapped back to
    /// bytes, SentencePiece's `▁` as a space and its `<0xHH>` byte tokens as that byte; special
    /// tokens as their text. What OpenAI's `logprobs` report per token.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return piece.into_bytes();
        }
        if self.byte_level {
            let table = byte_level_table();
            if let Some(bytes) = piece.chars().map(|c| table.get(&c).copied()).collect() {
                return bytes;
            }
            return piece.into_bytes();
        }
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                if hex.len() == 2 {
                    return vec![byte];
                }
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    /// [`Self::token_bytes`] as text (a lone partial character shows as U+FFFD).
    pub fn token_string(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    fn error(&self, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// GPT-2's byte-level alphabet, inverted: the character that stands for each byte → the byte.
/// Printable bytes stand for themselves; the other 68 are shifted to U+0100 onwards, in order.
fn byte_level_table() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
        let mut shifted = 0u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    shifted += 1;
                    char::from_u32(255 + shifted).unwrap_or('\u{FFFD}')
                };
                (c, b)
            })
            .collect()
    })
}

/// `chat_template` as `tokenizer_config.json` (or `chat_template.json`) holds it: a string, or a
/// list of named templates of which the one named `default` is used.
fn template_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(items) => items.iter().find_map(|item| {
            (item.get("name")?.as_str()? == "default")
                .then(|| item.get("template")?.as_str().map(str::to_string))?
        }),
        _ => None,
    }
}

/// A template saved on its own beside the tokenizer, as newer transformers versions do:
/// `chat_template.jinja` (the text), else `chat_template.json` (`{"chat_template": ...}`).
fn chat_template_file(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| ModelError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some(text));
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        let value: serde_json::Value = read_json(&json)?;
        return Ok(value.get("chat_template").and_then(template_of));
    }
    Ok(None)
}

/// Turns a growing list of generated ids into text pieces, holding back bytes that do not yet
/// form whole characters. Decoding a window of ids (not one id at a time) keeps the spaces that
/// SentencePiece-style tokenizers only render in context.
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &ModelTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let after = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            if let Some(piece) = after.get(before.len()..) {
                let piece = piece.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(piece);
            }
        }
        Ok(String::new())
    }

    /// Text still held back (an incomplete character at the very end), flushed as is.
    pub fn finish(&mut self, tokenizer: &ModelTokenizer) -> Result<String> {
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let after = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}
