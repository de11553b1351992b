#!/usr/bin/env bash
# The server under load, admission fully on against fully off, in one sitting, with wrk.
#
#   on:  plugin rate limiter (token-bucket, limits set out of reach) and prioritizer
#        (tiered-priority), bounded queue, metrics, request tracker
#   off: no plugins, built-in limiter off, unbounded queue, metrics off, tracker off
#
# Prints one table: /generate and /v1/chat/completions requests/s and p50/p99 latency at
# concurrency 1, 16 and 64 for both, with the on/off ratio of p50 (goal: at most 1.03); then
# /generate_stream at 64 concurrent streams on the "on" server, with time to first token and
# inter-token latency p50/p99 from its own histograms; then both servers' RSS after the run.
#
# Usage: bash bench/server.sh [SECONDS per measurement, default 8] [ROUNDS, default 2]
# CLLM_BIN names another cllm binary to measure (default target/release/cllm).
# Needs a release build (cargo build --release), the example plugins
# (bash plugins/build.sh target/wasm-plugins) and wrk (Debian's package). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-2}
bin=${CLLM_BIN:-target/release/cllm}
wasm=target/wasm-plugins
model=models/stories260K
template=tests/fixtures/chat_templates/chatml-smollm2.jinja
tokens=16
for f in "$bin" "$wasm/token_bucket.wasm" "$wasm/tiered_priority.wasm"; do
  [ -e "$f" ] || { echo "missing $f (see the usage notes at the top)" >&2; exit 2; }
done
command -v wrk >/dev/null || { echo "wrk not found (apt-get install wrk)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/plugins"
cp "$wasm/token_bucket.wasm" "$wasm/tiered_priority.wasm" "$work/plugins/"
echo '{"rate_per_sec": 1000000000, "burst": 1000000000}' >"$work/plugins/token_bucket.json"

start() { # name args... -> sets addr_<name>, pid_<name>
  local name=$1; shift
  "$bin" serve --model "$model" --port 0 --chat-template "$template" \
    --set request_queue.max_queue_size=100000 "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  local addr=""
  for _ in $(seq 300); do
    addr=$(grep -o 'listening on [0-9.:]*' "$work/$name.log" | awk '{print $3}' || true)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$work/$name.log" >&2; exit 1; }
  printf -v "addr_$name" '%s' "$addr"
  printf -v "pid_$name" '%s' "$pid"
}
start on --plugins-dir "$work/plugins" --set rate_limiter.max_requests=1000000000
start off --set rate_limiter.enabled=false --set request_queue.enabled=false \
  --set metrics.enabled=false --set tracker.enabled=false

lua() { # name json-body: a wrk script posting the body (with the x-tier header plugins read)
  printf '%s\n' 'wrk.method = "POST"' 'wrk.headers["Content-Type"] = "application/json"' \
    'wrk.headers["X-Tier"] = "gold"' "wrk.body = '$2'" >"$work/$1.lua"
}
lua generate '{"inputs": "Once upon a time", "parameters": {"max_new_tokens": '$tokens', "stop": ["never-seen"]}}'
lua chat '{"model": "stories260K", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": '$tokens', "temperature": 0, "stop": ["never-seen"]}'
lua stream '{"inputs": "Once upon a time", "parameters": {"max_new_tokens": 64, "stop": ["never-seen"]}}'

run() { # addr path script conc -> "p50_ms p99_ms rps"
  wrk -t"$(( $4 < 2 ? 1 : 2 ))" -c"$4" -d"${secs}s" --latency -s "$work/$3.lua" "http://$1$2" |
    awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /Requests\/sec/{rps=$2}
         function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; return v*1000 }
         END{printf "%.3f %.3f %.0f\n", ms(p50), ms(p99), rps}'
}
# Warm-up: both servers, both endpoints.
for s in on off; do
  a="addr_$s"
  run "${!a}" /generate generate 4 >/dev/null
  run "${!a}" /v1/chat/completions chat 4 >/dev/null
done

declare -A p50 p99 rps
for r in $(seq "$rounds"); do
  for ep in /generate:generate /v1/chat/completions:chat; do
    path=${ep%%:*} script=${ep##*:}
    for c in 1 16 64; do
      for s in on off; do # interleaved: each pair taken back to back
        a="addr_$s"
        read -r a50 a99 ar < <(run "${!a}" "$path" "$script" "$c")
        key="$path|$c|$s"
        p50[$key]="${p50[$key]:-} $a50" p99[$key]="${p99[$key]:-} $a99" rps[$key]="${rps[$key]:-} $ar"
      done
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
echo
echo "$rounds rounds of ${secs}s per cell, medians; latency in ms; $tokens generated tokens per request"
echo
echo "| endpoint | conc | on req/s | on p50 | on p99 | off req/s | off p50 | off p99 | p50 on/off |"
echo "|---|---|---|---|---|---|---|---|---|"
for path in /generate /v1/chat/completions; do
  for c in 1 16 64; do
    on50=$(echo "${p50[$path|$c|on]}" | median) off50=$(echo "${p50[$path|$c|off]}" | median)
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %.3f |\n" "$path" "$c" \
      "$(echo "${rps[$path|$c|on]}" | median)" "$on50" "$(echo "${p99[$path|$c|on]}" | median)" \
      "$(echo "${rps[$path|$c|off]}" | median)" "$off50" "$(echo "${p99[$path|$c|off]}" | median)" \
      "$(awk -v a="$on50" -v b="$off50" 'BEGIN{print a/b}')"
  done
done

# Streaming at 64 concurrent streams on the "on" server; TTFT and ITL from its histograms
# (the difference of two scrapes, quantiles interpolated within buckets).
before=$(curl -s "http://$addr_on/metrics")
stream=$(run "$addr_on" /generate_stream stream 64)
after=$(curl -s "http://$addr_on/metrics")
quantiles() { # metric -> "p50_ms p99_ms"
  python3 - "$1" <(echo "$before") <(echo "$after") <<'PY'
import re, sys
name, a, b = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read()
def buckets(text):
    out = {}
    for le, v in re.findall(name + r'_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)', text):
        out[float("inf") if le == "+Inf" else float(le)] = out.get(le, 0) + float(v)
    return out
x, y = buckets(a), buckets(b)
d = sorted((le, y[le] - x.get(le, 0)) for le in y)
total = d[-1][1] if d else 0
def q(p):
    if total == 0:
        return float("nan")
    want, prev_le, prev_n = p * total, 0.0, 0.0
    for le, n in d:
        if n >= want:
            if le == float("inf"):
                return prev_le * 1000
            return (prev_le + (le - prev_le) * (want - prev_n) / max(n - prev_n, 1e-9)) * 1000
        prev_le, prev_n = le, n
    return prev_le * 1000
print(f"{q(0.5):.2f} {q(0.99):.2f}")
PY
}
read -r t50 t99 < <(quantiles cllm_time_to_first_token_seconds)
read -r i50 i99 < <(quantiles cllm_inter_token_latency_seconds)
read -r s50 s99 srps < <(echo "$stream")
echo
echo "| /generate_stream, 64 streams (on) | p50 ms | p99 ms |"
echo "|---|---|---|"
echo "| whole stream (64 tokens), $srps streams/s | $s50 | $s99 |"
echo "| time to first token | $t50 | $t99 |"
echo "| inter-token latency | $i50 | $i99 |"

rss() { awk '/VmRSS/{printf "%.1f", $2/1024}' "/proc/$1/status"; }
served() { # server -> requests wrk completed on it (sum over the table's cells)
  local total=0 path c v
  for path in /generate /v1/chat/completions; do
    for c in 1 16 64; do
      for v in ${rps[$path|$c|$1]}; do total=$((total + v * secs)); done
    done
  done
  echo "$total"
}
on_rss=$(rss "$pid_on") off_rss=$(rss "$pid_off")
echo
echo "| RSS after the run | on | off | on - off |"
echo "|---|---|---|---|"
echo "| requests served (wrk, timed cells) | $(served on) | $(served off) | |"
awk -v a="$on_rss" -v b="$off_rss" 'BEGIN{printf "| RSS (MB) | %s | %s | %.1f |\n", a, b, a - b}'
