"""Makes the GGUF fixtures of the quantized types the tiny256 golden files do not cover, and
their reference: gguf-py's own dequantization of every tensor, summarised.

usage: python make_quant_fixtures.py LLAMA_QUANTIZE
  (a python with gguf==0.19.0 and numpy, e.g. bench/vs-llamacpp.sh's target/peer/venv, and
  the llama-quantize that script builds: target/peer/llama-build/bin/llama-quantize)

Writes models/gguf/tiny256-{q2_k,q3_k_m,iq4_xs,iq4_nl}.gguf (`llama-quantize
tiny256-f32.gguf OUT TYPE 2`, llama.cpp's default type choices kept) and
tests/golden/gguf-dequant.json. For each tensor of each file: its type and shape, and of its
values in storage order (as gguf-py dequantizes them, float32): the float64 sum, the float64
sum of value * (index % 251 + 1) (which moves when an element lands in the wrong place), and
32 sampled (index, value) pairs.
"""
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "models/gguf/tiny256-f32.gguf"
TYPES = ["Q2_K", "Q3_K_M", "IQ4_XS", "IQ4_NL"]


def digest(values: np.ndarray) -> dict:
    flat = values.astype(np.float32).reshape(-1)
    n = flat.size
    idx = np.arange(n, dtype=np.int64)
    weights = (idx % 251 + 1).astype(np.float64)
    picks = sorted({(k * 104729 + 13) % n for k in range(32)})
    return {
        "elements": int(n),
        "sum": float(flat.astype(np.float64).sum()),
        "weighted_sum": float((flat.astype(np.float64) * weights).sum()),
        "samples": [[int(i), float(flat[i])] for i in picks],
    }


def main() -> None:
    quantize = sys.argv[1]
    files = {}
    for t in TYPES:
        name = f"tiny256-{t.lower()}"
        out = ROOT / f"models/gguf/{name}.gguf"
        subprocess.run([quantize, str(SRC), str(out), t, "2"], check=True, capture_output=True)
        reader = gguf.GGUFReader(out)
        tensors = {}
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            entry = {"type": tensor.tensor_type.name, "shape": [int(x) for x in tensor.shape]}
            entry.update(digest(values))
            tensors[tensor.name] = entry
        files[name] = {
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
            "llama_quantize_type": t,
            "tensors": tensors,
        }
    golden = {
        "what": "gguf-py's dequantization of every tensor of the llama-quantize fixtures",
        "made_by": "scripts/make_quant_fixtures.py",
        "gguf_py": importlib.metadata.version("gguf"),
        "weighted_sum": "sum of value * (index % 251 + 1), index in storage order",
        "files": files,
    }
    (ROOT / "tests/golden/gguf-dequant.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
