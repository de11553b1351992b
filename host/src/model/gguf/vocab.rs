//! A `tokenizers` tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata, the way
//! llama.cpp reads that vocabulary:
//! - `gpt2`: byte-level BPE from `tokens` and `merges`, the pre-tokenizer split picked by
//!   `tokenizer.ggml.pre`;
//! - `llama`: SentencePiece-style BPE: pieces merge in the order of the merged piece's score
//!   (highest first), spaces become `▁` (with a leading one when `add_space_prefix`), and
//!   characters outside the vocabulary fall back to `<0xXX>` byte tokens.
//!
//! Control (type 3) and user-defined (type 4) tokens are added tokens, matched in the text
//! before the model runs; control tokens are special (skipped when decoding without them).
//! The result is written as `tokenizer.json` text and read back through `tokenizers`, so the
//! tokenizer is exactly one a `tokenizer.json` could describe.

use super::metadata::{Metadata, Value};
use serde_json::{json, Value as Json};
use std::collections::HashMap;

/// Token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// Tokens that end generation wherever they are in a vocabulary (llama.cpp's list).
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<EOT>",
    "_<EOT>",
];

/// GPT-2's split: contractions, letters, digits, other symbols, whitespace.
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split (digits in runs of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split (every digit alone).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What the tokenizer needs besides itself.
pub struct Vocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation besides eos: `eot` and `eom` tokens, and the tokens spelled as
    /// one of [`END_OF_GENERATION`].
    pub stop_ids: Vec<u32>,
}

/// Builds the tokenizer. Errors are messages naming the key at fault.
pub fn build(meta: &Metadata) -> Result<Vocab, String> {
    let model = meta
        .str("tokenizer.ggml.model")?
        .ok_or("metadata key tokenizer.ggml.model is missing: the file has no tokenizer (give one with --tokenizer)")?;
    let tokens = meta
        .array("tokenizer.ggml.tokens", "a string", |v| {
            v.as_str().map(str::to_string)
        })?
        .ok_or("metadata key tokenizer.ggml.tokens is missing")?;
    if tokens.is_empty() {
        return Err("metadata key tokenizer.ggml.tokens is empty".into());
    }
    let types = meta
        .array("tokenizer.ggml.token_type", "an integer", Value::as_i64)?
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    if types.len() != tokens.len() {
        return Err(format!(
            "metadata key tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let id = |key: &str| -> Result<Option<u32>, String> {
        match meta.usize(key)? {
            Some(i) if i < tokens.len() => Ok(Some(i as u32)),
            Some(i) => Err(format!(
                "metadata key {key}: token id {i} is outside the vocabulary ({} tokens)",
                tokens.len()
            )),
            None => Ok(None),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let mut stop_ids: Vec<u32> = [
        id("tokenizer.ggml.eot_token_id")?,
        id("tokenizer.ggml.eom_token_id")?,
    ]
    .into_iter()
    .flatten()
    .collect();
    // Converters seldom write the eot/eom keys, and an instruct model's eos is often only one
    // of the tokens its turns end with (Qwen2.5 ends with <|im_end|> or <|endoftext|>, Llama 3
    // with <|eot_id|>, <|eom_id|> or <|end_of_text|>): like llama.cpp, every token spelled as
    // one of these ends generation too.
    for (i, token) in tokens.iter().enumerate() {
        if END_OF_GENERATION.contains(&token.as_str()) && !stop_ids.contains(&(i as u32)) {
            stop_ids.push(i as u32);
        }
    }

    let (json_model, normalizer, pre_tokenizer, decoder, default_bos) = match model {
        "gpt2" => {
            let merges = meta
                .array("tokenizer.ggml.merges", "a string", |v| v.as_str().map(str::to_string))?
                .ok_or("metadata key tokenizer.ggml.merges is missing (needed by a gpt2 vocabulary)")?;
            let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
            let (pre_tokenizer, ignore_merges) = gpt2_pre_tokenizer(pre)?;
            // Llama 3's tokenizer adds <|begin_of_text|> through its post-processor, which
            // older converters did not turn into `add_bos_token`: llama.cpp adds it for these
            // pre-tokenizers unless the file says otherwise.
            let default_bos = matches!(pre, "llama-bpe" | "llama3" | "llama-v3" | "falcon3");
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": ignore_merges,
                "vocab": vocab_map(&tokens),
                "merges": merges,
            });
            let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            (model, Json::Null, pre_tokenizer, decoder, default_bos)
        }
        "llama" => {
            let scores = meta
                .array("tokenizer.ggml.scores", "a number", Value::as_f64)?
                .ok_or("metadata key tokenizer.ggml.scores is missing (needed by a llama vocabulary)")?;
            if scores.len() != tokens.len() {
                return Err(format!(
                    "metadata key tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                ));
            }
            let prefix = meta.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": unk.map(|u| tokens[u as usize].clone()),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab_map(&tokens),
                "merges": spm_merges(&tokens, &types, &scores),
            });
            let mut normalizers = Vec::new();
            if prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                model,
                json!({"type": "Sequence", "normalizers": normalizers}),
                Json::Null,
                json!({"type": "Sequence", "decoders": decoders}),
                true,
            )
        }
        other => {
            return Err(format!(
                "metadata key tokenizer.ggml.model: vocabulary type {other:?} is not supported (gpt2, llama)"
            ))
        }
    };

    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_bos)
        && bos.is_some();
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut specials = serde_json::Map::new();
        let mut special = |id: u32| {
            let t = tokens[id as usize].clone();
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            json!({"SpecialToken": {"id": t, "type_id": 0}})
        };
        if let (true, Some(b)) = (add_bos, bos) {
            single.push(special(b));
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if let (true, Some(e)) = (add_eos, eos) {
            single.push(special(e));
        }
        let mut pair = single.clone();
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else if model == "gpt2" {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
    } else {
        Json::Null
    };

    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TYPE_CONTROL || t == TYPE_USER_DEFINED)
        .map(|(i, (token, &t))| {
            json!({
                "id": i,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                // An end-of-turn token stored as user-defined ends generation all the same
                // (see `END_OF_GENERATION`): special, as llama.cpp makes it, so its text is
                // not part of the answer.
                "special": t == TYPE_CONTROL || END_OF_GENERATION.contains(&token.as_str()),
            })
        })
        .collect();

    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": json_model,
    });
    let tokenizer: tokenizers::Tokenizer = document
        .to_string()
        .parse()
        .map_err(|e| format!("the vocabulary does not make a tokenizer: {e}"))?;
    Ok(Vocab {
        tokenizer,
        bos_token: name(bos),
        eos_token: name(eos),
        stop_ids,
    })
}

fn vocab_map(tokens: &[String]) -> Json {
    let mut map = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // A duplicate keeps its first id, as llama.cpp's token-to-id map does.
        map.entry(t.clone()).or_insert(json!(i));
    }
    Json::Object(map)
}

/// The pre-tokenizer for a `gpt2` vocabulary's `tokenizer.ggml.pre`, and whether whole words
/// found in the vocabulary skip the merges (as Llama 3's tokenizer does).
fn gpt2_pre_tokenizer(pre: &str) -> Result<(Json, bool), String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let sequence = |items: Vec<Json>| json!({"type": "Sequence", "pretokenizers": items});
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" | "olmo" | "jais" | "poro-chat" => {
            (byte_level(true), false)
        }
        "smollm" | "starcoder" | "refact" => (
            sequence(vec![
                json!({"type": "Digits", "individual_digits": true}),
                split(GPT2_SPLIT),
                byte_level(false),
            ]),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" => {
            (sequence(vec![split(LLAMA3_SPLIT), byte_level(false)]), true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => {
            (sequence(vec![split(QWEN2_SPLIT), byte_level(false)]), false)
        }
        other => {
            return Err(format!(
                "metadata key tokenizer.ggml.pre: pre-tokenizer {other:?} is not supported (default, gpt2, smollm, starcoder, llama-bpe, qwen2 and their aliases)"
            ))
        }
    })
}

/// SentencePiece BPE as merges: every way to split a normal piece into two pieces of the
/// vocabulary is a merge, ranked by the merged piece's score (highest first, ties by id).
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f64]) -> Vec<[String; 2]> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TYPE_NORMAL || types[*i] == TYPE_USER_DEFINED)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TYPE_NORMAL || types[id] == TYPE_BYTE {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (index.get(left), index.get(right)) {
                merges.push((scores[id], id, l.max(r), left, right));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges
        .into_iter()
        .map(|(_, _, _, l, r)| [l.to_string(), r.to_string()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A byte-level BPE vocabulary as a Llama 3 GGUF file stores it, with `extra` keys.
    fn llama3_meta(extra: &[(&str, Value)]) -> Metadata {
        let strings = |items: &[&str]| {
            Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
        };
        let tokens = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "a",
            "b",
            "ab",
            "<|eot_id|>",
        ];
        let mut values = BTreeMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String("llama-bpe".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&tokens)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array([3, 3, 1, 1, 1, 3].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.merges".to_string(), strings(&["a b"])),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
        ]);
        for (key, value) in extra {
            values.insert(key.to_string(), value.clone());
        }
        Metadata { values }
    }

    fn ids(vocab: &Vocab, text: &str) -> Vec<u32> {
        let encoding = vocab.tokenizer.encode(text, true).expect("encodes");
        encoding.get_ids().to_vec()
    }

    #[test]
    fn llama3_files_without_add_bos_get_bos_as_in_llama_cpp() {
        let vocab = build(&llama3_meta(&[])).expect("builds");
        assert_eq!(ids(&vocab, "ab"), [0, 4]);
        let key = ("tokenizer.ggml.add_bos_token", Value::Bool(false));
        let vocab = build(&llama3_meta(&[key])).expect("builds");
        assert_eq!(ids(&vocab, "ab"), [4]);
    }

    #[test]
    fn end_of_turn_tokens_stop_generation_without_eot_keys() {
        let vocab = build(&llama3_meta(&[])).expect("builds");
        assert_eq!(vocab.stop_ids, [1, 5]);
        let key = ("tokenizer.ggml.eot_token_id", Value::U32(5));
        let vocab = build(&llama3_meta(&[key])).expect("builds");
        assert_eq!(vocab.stop_ids, [5, 1]);
    }
}
