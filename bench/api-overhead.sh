#!/usr/bin/env bash
# Added latency of /v1/chat/completions (template rendering included) against /generate for the
# same prompt and the same number of generated tokens, measured in one sitting with wrk.
# Usage: bash bench/api-overhead.sh [ROUNDS] [SECONDS] [CONCURRENCY] [TOKENS]
# Needs a release build (cargo build --release) and wrk (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-6}
conc=${3:-1}
bin=target/release/cllm
template=tests/fixtures/chat_templates/chatml-smollm2.jinja
log=$(mktemp)
"$bin" serve --model models/stories260K --port 0 --chat-template "$template" \
  --set rate_limiter.max_requests=100000000 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log" /tmp/cllm-bench-*.lua' EXIT
for _ in $(seq 100); do
  addr=$(grep -o 'listening on [0-9.:]*' "$log" | awk '{print $3}' || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
base="http://$addr"
messages='[{"role": "user", "content": "Tell me a story about a cat."}]'
# The chat prompt as the template renders it, sent to /generate as its input: the same text.
prompt=$(curl -s "$base/chat_tokenize" -H 'content-type: application/json' \
  -d "{\"messages\": $messages}" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["templated_text"]))')
tokens=${4:-16}
cat >/tmp/cllm-bench-generate.lua <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{"inputs": $prompt, "parameters": {"max_new_tokens": $tokens, "stop": ["never-seen"]}}]==]
LUA
cat >/tmp/cllm-bench-chat.lua <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{"model": "stories260K", "messages": $messages, "max_tokens": $tokens, "temperature": 0, "stop": ["never-seen"]}]==]
LUA
# Both must generate $tokens tokens (no early end-of-sequence): checked once before timing.
python3 - "$base" /tmp/cllm-bench-generate.lua /tmp/cllm-bench-chat.lua <<'PY'
import json, re, sys, urllib.request
base, gen, chat = sys.argv[1:]
def body(path):
    return json.loads(re.search(r"\[==\[(.*)\]==\]", open(path).read(), re.S).group(1))
def post(path, data):
    req = urllib.request.Request(base + path, json.dumps(data).encode(), {"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
g = body(gen); g["parameters"]["details"] = True
d = post("/generate", g)["details"]
c = post("/v1/chat/completions", body(chat))
print(f"/generate: {d['generated_tokens']} tokens ({d['finish_reason']}); "
      f"/v1/chat/completions: {c['usage']['completion_tokens']} tokens ({c['choices'][0]['finish_reason']}), "
      f"prompt {c['usage']['prompt_tokens']} tokens")
PY
run() { # endpoint script -> "p50_ms p99_ms rps"
  wrk -t1 -c"$conc" -d"${secs}s" --latency -s "/tmp/cllm-bench-$2.lua" "$base$1" |
    awk '/^ +50%/{p50=$2} /^ +99%/{p99=$2} /Requests\/sec/{rps=$2}
         function ms(v){ if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; return v*1000 }
         END{printf "%.3f %.3f %s\n", ms(p50), ms(p99), rps}'
}
run /generate generate >/dev/null # warm-up
printf "%-6s %-28s %-28s %s\n" round "/generate p50 p99 (ms) req/s" "/v1/chat p50 p99 (ms) req/s" "p50 ratio"
for r in $(seq "$rounds"); do
  g=$(run /generate generate)
  c=$(run /v1/chat/completions chat)
  ratio=$(echo "$g $c" | awk '{printf "%.3f", $4/$1}')
  printf "%-6s %-28s %-28s %s\n" "$r" "$g" "$c" "$ratio"
done
