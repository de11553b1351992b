//! A Hugging Face Llama-family model folder and the executor that runs it.

pub mod chat_template;
pub mod config;
pub mod cpu;
pub mod driver;
pub mod error;
pub mod generation;
pub mod huge_buffer;
pub mod kv_cache;
pub mod llama;
pub mod logprobs;
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
    /// Every id that ends generation: generation_config.json, config.json and the tokenizer's
    /// eos token together.
    pub eos_token_ids: Vec<u32>,
}

impl Model {
    /// Loads the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Model> {
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
        let tokenizer = ModelTokenizer::load(dir)?;

        let mut eos_token_ids = Vec::new();
        let generation_path = dir.join("generation_config.json");
        if generation_path.is_file() {
            let generation: GenerationConfig = read_json(&generation_path)?;
            eos_token_ids.extend(
                generation
                    .eos_token_id
                    .as_ref()
                    .map_or(vec![], TokenIds::to_vec),
            );
        }
        eos_token_ids.extend(&config.eos_token_ids);
        eos_token_ids.extend(tokenizer.eos_token().and_then(|t| tokenizer.token_id(t)));
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));

        Ok(Model {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer: std::sync::Arc::new(tokenizer),
            eos_token_ids,
        })
    }

    /// The KV cache shape this model needs.
    pub fn kv_layout(&self) -> kv_cache::KvLayout {
        kv_layout(&self.config)
    }
}

pub fn kv_layout(config: &ModelConfig) -> kv_cache::KvLayout {
    kv_cache::KvLayout {
        num_layers: config.num_hidden_layers,
        kv_dim: config.kv_dim(),
    }
}
