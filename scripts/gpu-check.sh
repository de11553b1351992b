#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU (the device tool), at most ~8
# minutes. Needs gpu/ from scripts/gpu-pack.sh (built on a machine with Rust) beside the
# working tree. Runs the GPU tests (each kernel against the CPU; every golden model on the
# GPU, batched and chunked), compares `cllm generate` on CPU and GPU for every model, runs the
# GPU bench (also without tensor cores, without dependent launches, with an f16 KV cache) and
# its per-phase profile of a decode step, and serves a 1.1B-shaped model under 1, 16 and 64
# concurrent greedy streams and 64 sampled ones. Prints one table at the end; logs go to $OUT
# (or /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG=${OUT:-/tmp/gpu-check}
mkdir -p "$LOG" gpu/run
RESULTS=$LOG/results.txt
: > "$RESULTS"
result() { printf '| %s | %s |\n' "$1" "$2" | tee -a "$RESULTS"; }
# The rows of a `cllm bench` table in FILE, each as a result labelled LABEL.
bench_rows() {
  python3 - "$1" "$2" <<'PY' | tee -a "$RESULTS"
import sys
for line in open(sys.argv[1]).read().splitlines():
    if line.startswith("| ") and "measurement" not in line and "---" not in line:
        print(f"| {sys.argv[2]}: " + line[2:])
PY
}
# The rows of the first profile section of FILE whose title starts with TITLE, as results.
profile_rows() {
  python3 - "$1" "$2" <<'PY' | tee -a "$RESULTS"
import sys
text = open(sys.argv[1]).read()
for section in text.split("\n\n"):
    if section.startswith(sys.argv[2]):
        title = section.splitlines()[0]
        for line in section.splitlines()[3:]:
            if line.startswith("| ") and "CUDA events" not in line:
                print(f"| profile, {title}: {line[2:]}")
        break
else:
    print(f"| profile ({sys.argv[2]}) | FAILED: " + (text.strip().splitlines() or ["no output"])[-1] + " |")
PY
}

tar -C gpu/run -xJf gpu/bin.tar.xz
tar -C gpu/run -xJf gpu/shared.tar.xz
BIN=$ROOT/gpu/run/bin
export CLLM_SHARED_DIR=$ROOT/gpu/run/shared
# The test binaries look for the repository where they were built.
BUILT_AT=$(cat gpu/built_at 2>/dev/null)
if [ -n "$BUILT_AT" ] && [ "$BUILT_AT" != "$ROOT" ] && [ ! -e "$BUILT_AT" ]; then
  mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$ROOT" "$BUILT_AT"
fi
[ -e target/debug/cllm ] || { mkdir -p target/debug && ln -s "$BIN/cllm" target/debug/cllm; }

# NVRTC: CUDA's own, or the nvidia-cuda-nvrtc wheel of the machine's Python.
NVRTC=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | head -1)
[ -n "$NVRTC" ] && export LD_LIBRARY_PATH=$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"
result "GPU" "$(head -1 "$LOG/gpu.txt")"
result "NVRTC" "${NVRTC:-not found}"

run_tests() {
  local name=$1
  ( cd "$ROOT" && CLLM_TEST_DEVICE=cuda timeout 240 "$BIN/$name" --test-threads 2 ) > "$LOG/test-$name.txt" 2>&1
  local rc=$?
  result "tests: $name (CLLM_TEST_DEVICE=cuda)" "$(grep -E '^test result' "$LOG/test-$name.txt" | tail -1) rc=$rc"
  grep -E '^test .* FAILED|panicked' "$LOG/test-$name.txt" | head -5
}
run_tests cuda
run_tests golden
run_tests gguf

# Greedy tokens, CPU against GPU, for every model.
for m in models/stories260K models/tiny-qwen2-f32 "$CLLM_SHARED_DIR"/models/tiny-llama-* \
  models/gguf/stories260K-f32.gguf models/gguf/tiny256-f32.gguf models/gguf/tiny256-f16.gguf \
  models/gguf/tiny256-bf16.gguf; do
  a=$("$BIN/cllm" generate --device cpu --json --max-new-tokens 24 --model "$m" "Once upon a time" 2>/dev/null)
  b=$("$BIN/cllm" generate --device cuda --json --max-new-tokens 24 --model "$m" "Once upon a time" 2>"$LOG/gen-err.txt")
  ids() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["output_ids"])' 2>/dev/null; }
  if [ -n "$a" ] && [ "$(echo "$a" | ids)" = "$(echo "$b" | ids)" ]; then v="same tokens"; else v="DIFFERENT: $(tail -2 "$LOG/gen-err.txt")"; fi
  result "generate cpu vs cuda: $(basename "$m")" "$v"
done

# Bench: 1.1B bf16, batch 1/8/32/64, against the device's copy bandwidth.
timeout 180 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda --batch 1,8,32,64 \
  --decode-tokens 128 > "$LOG/bench-1b.txt" 2>&1
cat "$LOG/bench-1b.txt"
bench_rows "$LOG/bench-1b.txt" "bench 1b bf16"

result "bench numerics" "$(grep -m1 -o 'numerics: .*  kv cache' "$LOG/bench-1b.txt" | sed 's/  kv cache$//')"

# The same bench with the products on the CUDA cores only, for the comparison.
CLLM_CUDA_TENSOR_CORES=0 timeout 150 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda \
  --batch 8,64 --decode-tokens 64 > "$LOG/bench-1b-cuda-cores.txt" 2>&1
bench_rows "$LOG/bench-1b-cuda-cores.txt" "bench 1b bf16, CLLM_CUDA_TENSOR_CORES=0"

# The same bench with every kernel waiting for the one before it to finish (no programmatic
# dependent launch), for the comparison.
CLLM_CUDA_PDL=0 timeout 150 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda \
  --batch 1,8 --decode-tokens 64 > "$LOG/bench-1b-no-pdl.txt" 2>&1
bench_rows "$LOG/bench-1b-no-pdl.txt" "bench 1b bf16, CLLM_CUDA_PDL=0"

# With an f16 KV cache (half of what attention reads), for the comparison.
timeout 150 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda --kv-cache-dtype f16 \
  --batch 1,64 --decode-tokens 64 > "$LOG/bench-1b-f16-kv.txt" 2>&1
bench_rows "$LOG/bench-1b-f16-kv.txt" "bench 1b bf16, --kv-cache-dtype f16"

# Where a batch-1 decode step's GPU time goes (CUDA events between phases, no graph).
timeout 120 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda --batch 0 \
  --decode-tokens 32 --profile > "$LOG/profile-1b.txt" 2>&1
profile_rows "$LOG/profile-1b.txt" "decode step ("

# The same for a decode step of 64 sequences (products on the tensor cores, attention of 64
# contexts).
timeout 150 "$BIN/cllm" bench --synthetic 1b --dtype bf16 --device cuda --batch 0 \
  --decode-tokens 16 --profile --profile-batch 64 > "$LOG/profile-1b-batch64.txt" 2>&1
profile_rows "$LOG/profile-1b-batch64.txt" "decode step, 64"

# Serve a 1.1B-shaped bf16 model (random weights, tiny-llama's 32000-token tokenizer) and
# stream to it from 1, 16 and 64 clients.
python3 scripts/make_random_model.py gpu/run/model-1b "$CLLM_SHARED_DIR/models/tiny-llama-f32" > "$LOG/make-model.txt" 2>&1 \
  || result "random 1.1B model" "FAILED: $(tail -1 "$LOG/make-model.txt")"
"$BIN/cllm" serve --device cuda --port 18080 --model gpu/run/model-1b \
  --set scheduler.max_running_sequences=64 > "$LOG/serve.txt" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do curl -sf localhost:18080/health/ready >/dev/null && break; sleep 0.5; done
curl -s localhost:18080/info > "$LOG/info.json"
result "serve: /info device" "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["device"]; print(d["kind"], d["name"], d["kv_cache_blocks"], "KV blocks,", d["kv_cache_bytes"] >> 20, "MiB, tensor cores", d["tensor_cores"], "dependent launch", d["dependent_launch"])' "$LOG/info.json" 2>&1)"
for c in 1 16 64; do
  python3 scripts/stream_load.py --url http://127.0.0.1:18080 --concurrency "$c" --requests $((c * 2)) \
    --max-new-tokens 128 2>>"$LOG/load-err.txt" | tee -a "$RESULTS"
done
# Sampled streams (the OpenAI clients' default temperature): their rows come back to the host,
# where each sequence samples between steps.
python3 scripts/stream_load.py --url http://127.0.0.1:18080 --concurrency 64 --requests 128 \
  --max-new-tokens 128 --temperature 1 2>>"$LOG/load-err.txt" | sed 's/^| serve:/| serve, temperature 1:/' | tee -a "$RESULTS"
kill $SERVER; wait $SERVER 2>/dev/null

result "wall time of the check" "${SECONDS} s"
echo
echo "=== GPU check ==="
echo "| check | result |"
echo "|---|---|"
cat "$RESULTS"
