//! `tokenizer.json` through the `tokenizers` crate, with the special tokens the folder declares.

use super::config::TokenIds;
use super::error::{read_json, ModelError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
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
        let chat_template = match config.chat_template {
            Some(serde_json::Value::String(t)) => Some(t),
            // A list of named templates: take the default one.
            Some(serde_json::Value::Array(items)) => items.iter().find_map(|item| {
                (item.get("name")?.as_str()? == "default")
                    .then(|| item.get("template")?.as_str().map(str::to_string))?
            }),
            _ => None,
        };
        Ok(ModelTokenizer {
            inner,
            path,
            bos_token: config.bos_token.map(SpecialToken::into_text),
            eos_token: config.eos_token.map(SpecialToken::into_text),
            chat_template,
        })
    }

    /// Token ids of `text`, with the special tokens (e.g. BOS) the tokenizer adds itself.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids with their token strings, as `/encode` reports them.
    pub fn encode_with_tokens(&self, text: &str) -> Result<(Vec<u32>, Vec<String>)> {
        let encoding = self.inner.encode(text, true).map_err(|e| self.error(e))?;
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
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
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
