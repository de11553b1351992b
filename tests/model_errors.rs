//! A broken model folder gives a clear error naming the file and the tensor, never a panic.
//! Each case copies the bundled stories260K model into a temporary folder and breaks one thing.

mod common;

use cllm::model::Model;
use common::repo_root;
use safetensors::tensor::{serialize, TensorView};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A copy of the bundled model in a fresh temporary folder.
fn model_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).expect("mkdir");
    let src = repo_root().join("models/stories260K");
    for entry in std::fs::read_dir(&src).expect("bundled model") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    (tmp, dir)
}

/// Rewrites `model.safetensors` after `edit` changes the list of (name, dtype, shape, bytes).
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read weights");
    let st = SafeTensors::deserialize(&bytes).expect("valid original");
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).expect("consistent view"),
            )
        })
        .collect();
    std::fs::write(&path, serialize(&views, None).expect("serialize")).expect("write");
}

fn load_error(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("model in {} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error {message:?} should mention {part:?}"
        );
    }
}

#[test]
fn missing_config_names_the_file() {
    let (_tmp, dir) = model_copy();
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    assert_mentions(&load_error(&dir), &["config.json", "missing"]);
}

#[test]
fn missing_weights_file_names_the_file() {
    let (_tmp, dir) = model_copy();
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    assert_mentions(&load_error(&dir), &["model.safetensors", "missing"]);
}

#[test]
fn missing_tokenizer_names_the_file() {
    let (_tmp, dir) = model_copy();
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    assert_mentions(&load_error(&dir), &["tokenizer.json", "missing"]);
}

#[test]
fn unsupported_model_type_is_named() {
    let (_tmp, dir) = model_copy();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replace("\"llama\"", "\"gpt_neox\"")).expect("write");
    assert_mentions(
        &load_error(&dir),
        &["config.json", "gpt_neox", "unsupported model_type"],
    );
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = model_copy();
    let victim = "model.layers.3.mlp.up_proj.weight";
    rewrite_weights(&dir, |t| t.retain(|(name, ..)| name != victim));
    assert_mentions(&load_error(&dir), &["missing tensor", victim]);
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let (_tmp, dir) = model_copy();
    let victim = "model.layers.0.self_attn.q_proj.weight";
    rewrite_weights(&dir, |t| {
        let entry = t
            .iter_mut()
            .find(|(name, ..)| name == victim)
            .expect("present");
        entry.2 = vec![32, 128];
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "model.safetensors",
            victim,
            "wrong shape",
            "[32, 128]",
            "[64, 64]",
        ],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let (_tmp, dir) = model_copy();
    let victim = "model.norm.weight";
    rewrite_weights(&dir, |t| {
        let entry = t
            .iter_mut()
            .find(|(name, ..)| name == victim)
            .expect("present");
        entry.1 = Dtype::I32;
    });
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", victim, "unsupported dtype", "I32"],
    );
}

#[test]
fn corrupt_header_is_reported() {
    let (_tmp, dir) = model_copy();
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..24].copy_from_slice(b"this is not json");
    std::fs::write(&path, bytes).expect("write");
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "corrupt safetensors"],
    );
}

#[test]
fn truncated_weights_are_reported() {
    let (_tmp, dir) = model_copy();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "corrupt safetensors"],
    );
}

#[test]
fn sharded_weights_load_like_one_file() {
    let (_tmp, dir) = model_copy();
    // Split the single file into two shards with an index, as HF does for large models.
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("valid");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: HashMap<String, TensorView> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).expect("tensor")))
            .collect();
        std::fs::write(dir.join(&file), serialize(&views, None).expect("serialize")).expect("w");
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("w");
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    let model = Model::load(&dir).expect("sharded model loads");
    assert_eq!(model.config.num_hidden_layers, 5);
}

// ---- GGUF files ----

use cllm::model::gguf::header::{parse, Header};
use cllm::model::gguf::metadata::Value;
use cllm::model::quant::QuantType;
use cllm::model::weights::DType;

/// A GGUF file's parts, editable: metadata, then tensors as (name, shape outermost first,
/// GGML type id, data).
struct GgufParts {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

fn type_id(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Bf16 => 30,
        DType::Quant(QuantType::Q4_0) => 2,
        DType::Quant(QuantType::Q4_1) => 3,
        DType::Quant(QuantType::Q5_0) => 6,
        DType::Quant(QuantType::Q5_1) => 7,
        DType::Quant(QuantType::Q8_0) => 8,
        DType::Quant(QuantType::Q4K) => 12,
        DType::Quant(QuantType::Q6K) => 14,
        DType::Quant(QuantType::Q2K) => 10,
        DType::Quant(QuantType::Q3K) => 11,
        DType::Quant(QuantType::Q5K) => 13,
        DType::Quant(QuantType::Iq4Nl) => 20,
        DType::Quant(QuantType::Iq4Xs) => 23,
    }
}

/// The bundled tiny256 F32 file, taken apart.
fn tiny256_parts() -> GgufParts {
    let bytes = std::fs::read(repo_root().join("models/gguf/tiny256-f32.gguf")).expect("fixture");
    let Header {
        version,
        metadata,
        tensors,
    } = parse(&bytes).expect("fixture parses");
    GgufParts {
        version,
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        tensors: tensors
            .into_iter()
            .map(|(name, t)| (name, t.shape, type_id(t.dtype), bytes[t.range].to_vec()))
            .collect(),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, with_type: bool) {
    let (ty, body): (u32, Vec<u8>) = match v {
        Value::U8(x) => (0, vec![*x]),
        Value::I8(x) => (1, vec![*x as u8]),
        Value::U16(x) => (2, x.to_le_bytes().to_vec()),
        Value::I16(x) => (3, x.to_le_bytes().to_vec()),
        Value::U32(x) => (4, x.to_le_bytes().to_vec()),
        Value::I32(x) => (5, x.to_le_bytes().to_vec()),
        Value::F32(x) => (6, x.to_le_bytes().to_vec()),
        Value::Bool(x) => (7, vec![u8::from(*x)]),
        Value::String(s) => {
            let mut b = (s.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(s.as_bytes());
            (8, b)
        }
        Value::Array(items) => {
            let mut b = Vec::new();
            let mut elem_type = Vec::new();
            if let Some(first) = items.first() {
                put_value(&mut elem_type, first, true);
            }
            let elem = elem_type
                .get(..4)
                .map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(&mut b, item, false);
            }
            (9, b)
        }
        Value::U64(x) => (10, x.to_le_bytes().to_vec()),
        Value::I64(x) => (11, x.to_le_bytes().to_vec()),
        Value::F64(x) => (12, x.to_le_bytes().to_vec()),
    };
    if with_type {
        out.extend_from_slice(&ty.to_le_bytes());
    }
    out.extend_from_slice(&body);
}

fn write_gguf(parts: &GgufParts) -> Vec<u8> {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&parts.version.to_le_bytes());
    out.extend_from_slice(&(parts.tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(parts.metadata.len() as u64).to_le_bytes());
    for (key, value) in &parts.metadata {
        string(&mut out, key);
        put_value(&mut out, value, true);
    }
    let mut offset = 0u64;
    for (name, shape, ty, data) in &parts.tensors {
        string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, _, data) in &parts.tensors {
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}

/// Writes `bytes` as a `.gguf` file in a temporary folder and returns its load error.
fn gguf_error(bytes: &[u8]) -> (String, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("broken.gguf");
    std::fs::write(&path, bytes).expect("write");
    (load_error(&path), path.display().to_string())
}

#[test]
fn rewritten_gguf_still_loads() {
    // The writer below is faithful: an unedited round trip loads and tokenizes.
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("same.gguf");
    std::fs::write(&path, write_gguf(&tiny256_parts())).expect("write");
    let model = Model::load(&path).expect("round trip loads");
    assert_eq!(model.config.num_hidden_layers, 2);
    assert_eq!(
        model.tokenizer.encode("Once upon", true).expect("encodes")[0],
        1
    );
}

#[test]
fn gguf_bad_magic() {
    let mut bytes = write_gguf(&tiny256_parts());
    bytes[..4].copy_from_slice(b"GGML");
    let (message, path) = gguf_error(&bytes);
    assert_mentions(&message, &[&path, "bad magic", "not a GGUF file"]);
}

#[test]
fn gguf_unsupported_version() {
    let mut parts = tiny256_parts();
    parts.version = 1;
    let (message, path) = gguf_error(&write_gguf(&parts));
    assert_mentions(
        &message,
        &[&path, "unsupported GGUF version 1", "supported: 2, 3"],
    );
}

#[test]
fn gguf_truncated_metadata() {
    let bytes = write_gguf(&tiny256_parts());
    // Inside the metadata: the vocabulary arrays are long.
    let (message, path) = gguf_error(&bytes[..2000]);
    assert_mentions(&message, &[&path, "metadata key", "truncated"]);
}

#[test]
fn gguf_tensor_data_past_the_end() {
    let parts = tiny256_parts();
    let last = parts.tensors.last().expect("tensors").0.clone();
    let bytes = write_gguf(&parts);
    let (message, path) = gguf_error(&bytes[..bytes.len() - 100]);
    assert_mentions(
        &message,
        &[&path, &format!("tensor {last}"), "past the end of the file"],
    );
}

#[test]
fn gguf_unknown_tensor_type() {
    let mut parts = tiny256_parts();
    let t = &mut parts.tensors[3];
    t.2 = 16; // IQ2_XXS
    let name = t.0.clone();
    let (message, path) = gguf_error(&write_gguf(&parts));
    assert_mentions(
        &message,
        &[
            &path,
            &format!("tensor {name}"),
            "unsupported tensor type IQ2_XXS",
            "Q4_K",
        ],
    );
    let mut parts = tiny256_parts();
    parts.tensors[0].2 = 99;
    let (message, _) = gguf_error(&write_gguf(&parts));
    assert_mentions(&message, &["unknown type id 99"]);
}

#[test]
fn gguf_missing_tensor() {
    let mut parts = tiny256_parts();
    parts.tensors.retain(|t| t.0 != "blk.1.ffn_up.weight");
    let (message, path) = gguf_error(&write_gguf(&parts));
    assert_mentions(&message, &[&path, "missing tensor blk.1.ffn_up.weight"]);
}

#[test]
fn gguf_unknown_architecture() {
    let mut parts = tiny256_parts();
    for (key, value) in &mut parts.metadata {
        if key == "general.architecture" {
            *value = Value::String("gpt2".into());
        }
    }
    let (message, path) = gguf_error(&write_gguf(&parts));
    assert_mentions(
        &message,
        &[&path, "unsupported architecture \"gpt2\"", "llama"],
    );
}

#[test]
fn gguf_wrong_metadata_type_and_missing_key() {
    let mut parts = tiny256_parts();
    for (key, value) in &mut parts.metadata {
        if key == "llama.block_count" {
            *value = Value::String("two".into());
        }
    }
    let (message, _) = gguf_error(&write_gguf(&parts));
    assert_mentions(
        &message,
        &[
            "llama.block_count",
            "expected a non-negative integer",
            "string",
        ],
    );
    let mut parts = tiny256_parts();
    parts
        .metadata
        .retain(|(k, _)| k != "llama.embedding_length");
    let (message, _) = gguf_error(&write_gguf(&parts));
    assert_mentions(&message, &["llama.embedding_length is missing"]);
}
