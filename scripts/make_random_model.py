"""Writes a Hugging Face Llama folder with TinyLlama-1.1B's shapes and random bf16 weights,
with the tokenizer of another Llama folder (32000 tokens): a model to serve for load tests
on a machine where nothing can be downloaded.

usage: python3 make_random_model.py OUT_DIR TOKENIZER_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

out, tok = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
h, inter, layers, heads, kv_heads, vocab = 2048, 5632, 22, 32, 4, 32000
d = h // heads
config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": h,
    "intermediate_size": inter,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "vocab_size": vocab,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
(out / "config.json").write_text(json.dumps(config, indent=1))
gen = torch.Generator().manual_seed(0)


def rand(*shape):
    return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)


tensors = {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h)}
tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
for i in range(layers):
    p = f"model.layers.{i}"
    tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors[f"{p}.self_attn.q_proj.weight"] = rand(heads * d, h)
    tensors[f"{p}.self_attn.k_proj.weight"] = rand(kv_heads * d, h)
    tensors[f"{p}.self_attn.v_proj.weight"] = rand(kv_heads * d, h)
    tensors[f"{p}.self_attn.o_proj.weight"] = rand(h, heads * d)
    tensors[f"{p}.mlp.gate_proj.weight"] = rand(inter, h)
    tensors[f"{p}.mlp.up_proj.weight"] = rand(inter, h)
    tensors[f"{p}.mlp.down_proj.weight"] = rand(h, inter)
save_file(tensors, str(out / "model.safetensors"))
for name in ["tokenizer.json", "tokenizer_config.json"]:
    if (tok / name).exists():
        shutil.copy(tok / name, out / name)
print(f"wrote {out}")
