//! Errors raised while loading a model folder. Every message names the file (and tensor) at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model folder {0}: file {1} is missing")]
    MissingFile(PathBuf, &'static str),
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: unsupported model_type {model_type:?} (supported: llama, mistral, qwen2)")]
    UnsupportedModelType { path: PathBuf, model_type: String },
    #[error("{path}: invalid config: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error("{path}: corrupt safetensors file: {message}")]
    CorruptSafetensors { path: PathBuf, message: String },
    #[error("{path}: tensor {tensor}: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("model folder {dir}: missing tensor {tensor}")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor}: wrong shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor {tensor}: mixed dtypes in one model ({dtype} vs {model_dtype})")]
    MixedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
        model_dtype: String,
    },
    #[error("{path}: GGUF: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("{path}: cannot load tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Reads a JSON file into `T`, naming the file in any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
