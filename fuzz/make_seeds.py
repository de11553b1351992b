#!/usr/bin/env python3
"""Writes the hand-made seed inputs of fuzz/corpus/ (cargo fuzz adds its finds beside them).
Run from the repository root: python3 fuzz/make_seeds.py"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, "seed-" + name), "wb") as f:
        f.write(data)


# TGI bodies.
tgi = {
    "plain": {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8}},
    "sampling": {"inputs": "Hi", "parameters": {"do_sample": True, "temperature": 0.7, "top_k": 5,
                                                "top_p": 0.9, "seed": 3, "max_new_tokens": 4,
                                                "repetition_penalty": 1.1, "stop": ["."]}},
    "details": {"inputs": "Tom", "parameters": {"details": True, "decoder_input_details": True,
                                                "top_n_tokens": 3, "truncate": 4,
                                                "return_full_text": True}, "stream": False},
    "empty": {"inputs": ""},
    "bad-type": {"inputs": 5, "parameters": {"max_new_tokens": "many"}},
}
for name, body in tgi.items():
    put("tgi_request", name, json.dumps(body))

# OpenAI bodies.
openai = {
    "completion": {"model": "m", "prompt": "Once upon a time", "max_tokens": 5, "n": 2,
                   "logprobs": 2, "stop": ["\n"], "seed": 1, "temperature": 0.5},
    "completion-ids": {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 3, "stream": True,
                       "stream_options": {"include_usage": True}},
    "chat": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}],
             "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 2,
             "presence_penalty": 0.1, "priority": 2},
    "chat-unsupported": {"messages": [{"role": "user", "content": "x"}], "tools": [],
                         "logit_bias": {"5": 1}},
}
for name, body in openai.items():
    put("openai_request", name, json.dumps(body))

# The server config: the documented example, and a small one.
with open(os.path.join(os.path.dirname(ROOT), "..", "cllm.example.yaml"), "rb") as f:
    put("server_config", "example", f.read())
put("server_config", "small",
    "http:\n  port: 0\nscheduler:\n  max_input_tokens: 8\nrate_limiter:\n"
    "  max_concurrent_per_client: 2\nplugins:\n  dir: /tmp/p\n  shadow: [a.wasm]\n")

# Model configs.
with open(os.path.join(os.path.dirname(ROOT), "..", "models", "stories260K", "config.json"), "rb") as f:
    put("model_config", "stories260K", f.read())
put("model_config", "qwen2", json.dumps({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}))


# GGUF: a tiny llama with a vocabulary and two tensors.
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, payload):
    return gguf_string(key) + struct.pack("<I", vtype) + payload


U32, F32, STRING, ARRAY = 4, 6, 8, 9


def gguf_file(version=3, alignment=32, tensors_type=0):
    vocab = ["<unk>", "<s>", "</s>", "a", "b", "ab", "\u2581a"]
    kvs = [
        gguf_kv("general.architecture", STRING, gguf_string("llama")),
        gguf_kv("general.alignment", U32, struct.pack("<I", alignment)),
        gguf_kv("llama.context_length", U32, struct.pack("<I", 64)),
        gguf_kv("llama.embedding_length", U32, struct.pack("<I", 8)),
        gguf_kv("llama.feed_forward_length", U32, struct.pack("<I", 16)),
        gguf_kv("llama.block_count", U32, struct.pack("<I", 1)),
        gguf_kv("llama.attention.head_count", U32, struct.pack("<I", 2)),
        gguf_kv("llama.attention.head_count_kv", U32, struct.pack("<I", 1)),
        gguf_kv("llama.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", 1e-5)),
        gguf_kv("tokenizer.ggml.model", STRING, gguf_string("llama")),
        gguf_kv("tokenizer.ggml.tokens", ARRAY,
                struct.pack("<IQ", STRING, len(vocab)) + b"".join(gguf_string(t) for t in vocab)),
        gguf_kv("tokenizer.ggml.scores", ARRAY,
                struct.pack("<IQ", F32, len(vocab)) + b"".join(struct.pack("<f", -i) for i in range(len(vocab)))),
        gguf_kv("tokenizer.ggml.token_type", ARRAY,
                struct.pack("<IQ", 5, len(vocab)) + b"".join(struct.pack("<i", 1) for _ in vocab)),
        gguf_kv("tokenizer.ggml.bos_token_id", U32, struct.pack("<I", 1)),
        gguf_kv("tokenizer.ggml.eos_token_id", U32, struct.pack("<I", 2)),
    ]
    # (name, dims innermost first, ggml type, bytes)
    tensors = [
        ("token_embd.weight", [8, len(vocab)], tensors_type, 4 * 8 * len(vocab)),
        ("output_norm.weight", [8], 0, 32),
    ]
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    offset = 0
    for name, dims, ggml_type, size in tensors:
        head += gguf_string(name) + struct.pack("<I", len(dims))
        head += b"".join(struct.pack("<Q", d) for d in dims)
        head += struct.pack("<IQ", ggml_type, offset)
        offset += size
        offset += (-offset) % alignment
    head += b"\0" * ((-len(head)) % alignment)
    return head + b"\x01" * offset


put("gguf", "llama-f32-v3", gguf_file())
put("gguf", "llama-f32-v2", gguf_file(version=2))
put("gguf", "align-64", gguf_file(alignment=64))
put("gguf", "truncated", gguf_file()[:-20])


# safetensors: a header and data that tile exactly.
def safetensors_file(tensors):
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, size in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += bytes((i * 7) % 251 for i in range(size))
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


put("safetensors", "f32", safetensors_file([("a", "F32", [2, 3], 24), ("b", "F32", [], 4)]))
put("safetensors", "mixed", safetensors_file([("w", "BF16", [4], 8), ("x", "F16", [1, 2], 4),
                                             ("e", "F32", [0, 5], 0)]))
put("safetensors", "i8", safetensors_file([("q", "I8", [3], 3)]))

# Token texts for the SSE writer.
for name, text in {"plain": "Once", "newlines": "a\nb\r\nc\rd\n\n", "data": "data: x\n\nevent: y",
                   "controls": "\0\x1b[31m\u2028\u2029", "unicode": "\u00e9\U0001f600\ufffd"}.items():
    put("sse_event", name, text)
