//! A Hugging Face Llama-family model folder and the executor that runs it.

pub mod batching;
pub mod chat_template;
pub mod config;
pub mod cpu;
pub mod cuda;
mod draw;
pub mod driver;
pub mod error;
pub mod executor;
pub mod fault_injection;
pub mod generation;
pub mod gguf;
pub mod huge_buffer;
pub mod kv_cache;
pub mod llama;
pub mod logprobs;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod sampling;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

use config::{ModelConfig, TokenIds};
use error::{read_json, ModelError, Result};
use llama::ModelWeights;
use std::path::{Path, PathBuf};
use tokenizer::{GenerationConfig, ModelTokenizer};

/// A loaded model: shape, weights (memory-mapped), tokenizer and end-of-sequence ids.
pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    /// Shared with the HTTP edge, which tokenizes without touching the model.
    pub tokenizer: std::sync::Arc<ModelTokenizer>,
    /// Every id that ends generation: generation_config.json, config.json (or the GGUF's eos,
    /// eot and eom ids) and the tokenizer's eos token together.
    pub eos_token_ids: Vec<u32>,
}

impl Model {
    /// Loads the model at `path`: a Hugging Face folder, a `.gguf` file, or a folder holding
    /// exactly one `.gguf` file.
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with_tokenizer(path, None)
    }

    /// [`Model::load`], with the tokenizer (and chat template) from the `tokenizer.json`
    /// folder `tokenizer_dir` instead of the model's own, when given. A GGUF file's chat
    /// template still applies when that folder has none.
    pub fn load_with_tokenizer(path: &Path, tokenizer_dir: Option<&Path>) -> Result<Model> {
        match gguf::find(path)? {
            Some(file) => Self::load_gguf(&file, tokenizer_dir),
            None => Self::load_folder(path, tokenizer_dir),
        }
    }

    fn load_gguf(file: &Path, tokenizer_dir: Option<&Path>) -> Result<Model> {
        let opened = gguf::GgufModel::open(file)?;
        let weights = ModelWeights::load(&opened.store, &opened.config)?;
        let mut ends = opened.config.eos_token_ids.clone();
        let tokenizer = match tokenizer_dir {
            Some(dir) => ModelTokenizer::load(dir)?.with_fallback_template(opened.chat_template()),
            None => {
                let vocab = opened.vocab()?;
                ends.extend(vocab.stop_ids);
                ModelTokenizer::from_parts(
                    vocab.tokenizer,
                    file.to_path_buf(),
                    vocab.bos_token,
                    vocab.eos_token,
                    opened.chat_template(),
                )
            }
        };
        Ok(Model {
            dir: file.to_path_buf(),
            eos_token_ids: end_ids(ends, &tokenizer),
            config: opened.config,
            weights,
            tokenizer: std::sync::Arc::new(tokenizer),
        })
    }

    /// Loads the Hugging Face model folder `dir`.
    fn load_folder(dir: &Path, tokenizer_dir: Option<&Path>) -> Result<Model> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingFile(dir.to_path_buf(), "config.json"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let store = weights::SafetensorsStore::open(dir)?;
        let weights = ModelWeights::load(&store, &config)?;
        let tokenizer = ModelTokenizer::load(tokenizer_dir.unwrap_or(dir))?;

        let mut ends = Vec::new();
        let generation_path = dir.join("generation_config.json");
        if generation_path.is_file() {
            let generation: GenerationConfig = read_json(&generation_path)?;
            ends.extend(
                generation
                    .eos_token_id
                    .as_ref()
                    .map_or(vec![], TokenIds::to_vec),
            );
        }
        ends.extend(&config.eos_token_ids);
        Ok(Model {
            dir: dir.to_path_buf(),
            eos_token_ids: end_ids(ends, &tokenizer),
            config,
            weights,
            tokenizer: std::sync::Arc::new(tokenizer),
        })
    }

    /// The KV cache shape this model needs, stored as `dtype`.
    pub fn kv_layout(&self, dtype: kv_cache::KvDtype) -> kv_cache::KvLayout {
        kv_layout(&self.config, dtype)
    }
}

/// Every id that ends generation: `ids`, then the tokenizer's eos token, without repeats.
fn end_ids(mut ids: Vec<u32>, tokenizer: &ModelTokenizer) -> Vec<u32> {
    ids.extend(tokenizer.eos_token().and_then(|t| tokenizer.token_id(t)));
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

pub fn kv_layout(config: &ModelConfig, dtype: kv_cache::KvDtype) -> kv_cache::KvLayout {
    kv_cache::KvLayout {
        num_layers: config.num_hidden_layers,
        kv_dim: config.kv_dim(),
        dtype,
    }
}
