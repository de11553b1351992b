#!/usr/bin/env bash
# Decode speed, cllm against llama.cpp, in many short back-to-back pairs on one GGUF file.
#
#   bash bench/decode-pairs.sh MODEL.gguf [--depth 0|512] [--pairs 16] [--tokens 32] [--threads 2]
#
# Why a second method beside vs-llamacpp.sh: on the shared VMs these benchmarks run on, memory
# bandwidth switches between two levels (about 30 and 55 GB/s for two threads) every few
# seconds to minutes. A decode that reads 2 GB a token runs at one speed or the other depending
# on when it ran, so a 5-round median says mostly which engine drew more fast minutes. Here each
# pair is two short runs (a few seconds each, the order alternating), and a plain-read probe
# (two threads streaming 512 MiB, a fraction of a second) runs right before and right after
# every run. The probe values, pooled, are split into the two levels (the split that best
# separates them, Otsu's method); a run whose two probes fall in the same level counts for
# that level, others count only in the overall paired median; each level compares the engines'
# medians. Runs are sorted by the probe, never by their own speed, so a real difference between
# the engines is not split away. The level can still change inside a run between its probes.
#
# Needs bench/vs-llamacpp.sh's llama.cpp build ($CLLM_PEER_DIR, default target/peer), a C
# compiler (for the probe) and target/release/cllm (or $CLLM). Not part of CI.
set -euo pipefail

MODEL=${1:?usage: $0 MODEL.gguf [--depth 0|512] [--pairs N] [--tokens N] [--threads N]}
shift
DEPTH=0
PAIRS=16
TOKENS=32
THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --depth) DEPTH=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$PAIRS" -ge 1 ] 2>/dev/null || { echo "--pairs must be at least 1" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${CLLM_PEER_DIR:-$ROOT/target/peer}
BIN=$PEER/llama-build/bin
CLLM=${CLLM:-$ROOT/target/release/cllm}
for tool in "$BIN/llama-bench" "$BIN/llama-batched-bench" "$CLLM"; do
  [ -x "$tool" ] || { echo "missing $tool (run bench/vs-llamacpp.sh once, cargo build --release)" >&2; exit 1; }
done

PROBE=$PEER/bwprobe
if [ ! -x "$PROBE" ]; then
  cat > "$PROBE.c" <<'SRC'
/* GB/s of two threads each summing its half of a 512 MiB buffer (huge pages where the kernel
   gives them), the best of three passes. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#define LEN ((size_t)512 << 20)
static const unsigned long long *buf;
static volatile unsigned long long sink;
static void *half(void *arg) {
  size_t n = LEN / 16, i0 = (size_t)arg * n;
  unsigned long long s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = i0; i < i0 + n; i += 4) {
    s0 += buf[i]; s1 += buf[i + 1]; s2 += buf[i + 2]; s3 += buf[i + 3];
  }
  sink = s0 + s1 + s2 + s3;
  return 0;
}
int main(void) {
  void *m = mmap(0, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return 1;
  madvise(m, LEN, MADV_HUGEPAGE);
  memset(m, 1, LEN);
  buf = m;
  double best = 0;
  for (int pass = 0; pass < 3; pass++) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pthread_t t;
    pthread_create(&t, 0, half, (void *)1);
    half((void *)0);
    pthread_join(t, 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double gbs = LEN / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9) / 1e9;
    if (gbs > best) best = gbs;
  }
  printf("%.1f\n", best);
  return 0;
}
SRC
  cc -O2 -march=native -pthread -o "$PROBE" "$PROBE.c"
fi

llama() {
  if [ "$DEPTH" = 0 ]; then
    "$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$TOKENS" -r 1 -o json 2>/dev/null |
      python3 -c "import json,sys; print(json.load(sys.stdin)[0]['avg_ts'])"
  else
    "$BIN/llama-batched-bench" -m "$MODEL" -t "$THREADS" -npp "$DEPTH" -ntg "$TOKENS" -npl 1 \
      -c $((DEPTH + TOKENS + 16)) 2>/dev/null |
      awk -F'|' -v d="$DEPTH" '$2 + 0 == d {gsub(/ /,"",$9); print $9}'
  fi
}
cllm() {
  "$CLLM" bench --model "$MODEL" --device cpu --threads "$THREADS" --batch 0 \
    --prompt-tokens "$DEPTH" --decode-tokens "$TOKENS" --json 2>/dev/null |
    python3 -c "import json,sys; print(json.load(sys.stdin)['decode_tokens_per_s'])"
}

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
# One line per run: engine, probe before (GB/s), tokens/s, probe after (GB/s).
run() {
  local b t a
  b=$("$PROBE"); t=$("$1"); a=$("$PROBE")
  # A peer run that printed no rate (a changed output format, a crash) stops here, not later.
  [ -n "$t" ] || { echo "$1 printed no tokens/s" >&2; exit 1; }
  echo "$1 $b $t $a"
}
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then run llama; run cllm; else run cllm; run llama; fi |
    tee -a "$RESULTS" |
    awk -v i="$i" '{printf "pair %d: %-5s %6.1f tokens/s (probe %.1f / %.1f GB/s)\n", i, $1, $3, $2, $4}' >&2
done

python3 - "$RESULTS" "$MODEL" "$DEPTH" "$TOKENS" "$THREADS" <<'PY'
import statistics, sys

runs = [line.split() for line in open(sys.argv[1]) if line.strip()]
runs = [(e, float(b), float(t), float(a)) for e, b, t, a in runs]
probes = sorted(v for _, b, _, a in runs for v in (b, a))


def split(values):
    """The threshold that best separates sorted values into two groups (Otsu)."""
    best, cut = -1.0, values[0]
    for i in range(1, len(values)):
        lo, hi = values[:i], values[i:]
        between = len(lo) * len(hi) * (statistics.mean(lo) - statistics.mean(hi)) ** 2
        if between > best:
            best, cut = between, (values[i - 1] + values[i]) / 2
    return cut


cut = split(probes)
lo, hi = [v for v in probes if v < cut], [v for v in probes if v >= cut]
model, depth, tokens, threads = sys.argv[2:6]
print(f"\n{model}: decode of {tokens} tokens after {depth}, {threads} threads, {len(runs) // 2} pairs")
# Two levels only where they are far apart; otherwise the split would cut through noise.
if lo and hi and statistics.mean(hi) > 1.25 * statistics.mean(lo):
    print(f"probe levels: {statistics.mean(lo):.1f} and {statistics.mean(hi):.1f} GB/s, split at {cut:.1f}\n")
    levels = (("slow", lambda b, a: b < cut and a < cut), ("fast", lambda b, a: b >= cut and a >= cut))
else:
    print(f"probe: one level, {statistics.mean(probes):.1f} GB/s ({probes[0]:.1f}-{probes[-1]:.1f})\n")
    levels = (("one", lambda b, a: True),)
print("| bandwidth level | llama.cpp: runs, median tok/s | cllm: runs, median tok/s | cllm / llama.cpp |")
print("|---|---|---|---|")
for name, inside in levels:
    got = {e: [t for e2, b, t, a in runs if e2 == e and inside(b, a)] for e in ("llama", "cllm")}
    show = lambda xs: f"{len(xs)}, {statistics.median(xs):.1f}" if xs else "0, -"
    both = got["llama"] and got["cllm"]
    ratio = f"{statistics.median(got['cllm']) / statistics.median(got['llama']):.2f}" if both else "-"
    print(f"| {name} | {show(got['llama'])} | {show(got['cllm'])} | {ratio} |")
speed = {e: {i // 2: t for i, (e2, _, t, _) in enumerate(runs) if e2 == e} for e in ("llama", "cllm")}
ratios = [speed["cllm"][p] / speed["llama"][p] for p in speed["llama"] if p in speed["cllm"]]
median = lambda e: statistics.median(speed[e].values())
print(f"| all runs | median {median('llama'):.1f} | median {median('cllm'):.1f} | paired median {statistics.median(ratios):.2f} |")
PY
