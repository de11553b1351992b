"""Streams /generate_stream requests to a running cllm from N concurrent clients and prints
one table row: time to first token p50/p99, per-stream and aggregate tokens/s.

usage: python3 stream_load.py --url http://127.0.0.1:8080 --concurrency 16 --requests 32
       [--max-new-tokens 128] [--temperature 1.0]
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("--url", required=True)
ap.add_argument("--concurrency", type=int, default=1)
ap.add_argument("--requests", type=int, default=8)
ap.add_argument("--max-new-tokens", type=int, default=128)
ap.add_argument("--temperature", type=float, default=0.0,
                help="0: greedy (the default); above 0: sampling at that temperature")
args = ap.parse_args()
url = urllib.parse.urlparse(args.url)
words = "the quick brown fox jumps over the lazy dog while a small cat watches".split()
lock = threading.Lock()
ttfts, rates, tokens_total, errors = [], [], [0], [0]
next_request = [0]


def one(i):
    prompt = " ".join(words[(i + k) % len(words)] for k in range(96))
    params = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        params.update(do_sample=True, temperature=args.temperature, seed=i)
    body = json.dumps({"inputs": prompt, "parameters": params})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        with lock:
            errors[0] += 1
        return
    first, n = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if "token" in event:
            n += 1
            if first is None:
                first = time.perf_counter() - start
    took = time.perf_counter() - start
    conn.close()
    with lock:
        if first is not None:
            ttfts.append(first)
            if n > 1 and took > first:
                rates.append((n - 1) / (took - first))
        tokens_total[0] += n


def worker():
    while True:
        with lock:
            i = next_request[0]
            if i >= args.requests:
                return
            next_request[0] += 1
        try:
            one(i)
        except OSError as e:
            with lock:
                errors[0] += 1
            print(f"request {i}: {e}", file=sys.stderr)


start = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


print(
    f"| serve: {args.concurrency} concurrent streams ({args.requests} requests, "
    f"{args.max_new_tokens} new tokens) | TTFT p50 {pct(ttfts, 0.5) * 1e3:.1f} ms, "
    f"p99 {pct(ttfts, 0.99) * 1e3:.1f} ms; per stream {statistics.median(rates) if rates else 0:.1f} tok/s; "
    f"aggregate {tokens_total[0] / wall:.1f} tok/s; errors {errors[0]} |"
)
