//! GGUF model files (llama.cpp's format): hyperparameters, tensors (memory-mapped, kept in
//! their stored type, quantized ones included), tokenizer and chat template, all from one
//! file.

pub mod header;
pub mod hparams;
pub mod metadata;
pub mod store;
pub mod vocab;

use super::config::ModelConfig;
use super::error::{ModelError, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::GgufStore;

/// An opened GGUF file.
pub struct GgufModel {
    pub config: ModelConfig,
    pub store: GgufStore,
    pub metadata: metadata::Metadata,
    pub version: u32,
}

/// Whether `path` names a GGUF model: a `.gguf` file, or a folder with no `config.json` that
/// holds exactly one `.gguf` file (that file is returned).
pub fn find(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_file()
            && p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            found.push(p);
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(ModelError::Gguf {
            path: path.to_path_buf(),
            message: format!("the folder holds {n} .gguf files; name one with --model"),
        }),
    }
}

impl GgufModel {
    /// Opens and checks `path`: header, metadata, tensor table, hyperparameters.
    pub fn open(path: &Path) -> Result<GgufModel> {
        let error = |message: String| ModelError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; a model file rewritten while served is outside what
        // any mmap loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let header = header::parse(&map).map_err(error)?;
        let mut store = GgufStore {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors: header.tensors,
            permuted_heads: None,
        };
        let rope_freqs = store.raw("rope_freqs.weight").map(|t| t.to_f32_vec());
        let config = hparams::model_config(&header.metadata, &store.tensors, rope_freqs, path)
            .map_err(error)?;
        // llama.cpp's converter permutes q/k rows for llama only (qwen2 keeps HF's layout).
        if config.model_type == "llama" {
            store.permuted_heads = Some((config.num_attention_heads, config.num_key_value_heads));
        }
        Ok(GgufModel {
            config,
            store,
            metadata: header.metadata,
            version: header.version,
        })
    }

    /// The tokenizer the file describes.
    pub fn vocab(&self) -> Result<vocab::Vocab> {
        vocab::build(&self.metadata).map_err(|message| ModelError::Gguf {
            path: self.store.path.clone(),
            message,
        })
    }

    /// `tokenizer.chat_template`, when the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.metadata
            .str("tokenizer.chat_template")
            .ok()
            .flatten()
            .map(str::to_string)
    }
}
