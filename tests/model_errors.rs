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
