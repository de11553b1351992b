#!/usr/bin/env bash
# Builds cllm's example plugins (plugins/) and its test plugins (tests/plugins/) as WebAssembly
# components and copies every .wasm into one folder.
#
# Usage: plugins/build.sh [OUT_DIR]   (default: target/wasm-plugins/ under the repo root)
# Works from any directory.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/target/wasm-plugins}"
target=wasm32-wasip2

# The target ships as a rustup component; add it once.
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

mkdir -p "$out"
for workspace in "$repo/plugins" "$repo/tests/plugins"; do
    echo "building $workspace" >&2
    # Its own target folder, whatever CARGO_TARGET_DIR says: the .wasm files are copied from it.
    cargo build --release --target "$target" --manifest-path "$workspace/Cargo.toml" \
        --target-dir "$workspace/target"
    for wasm in "$workspace/target/$target/release/"*.wasm; do
        cp "$wasm" "$out/"
        printf '%8d  %s\n' "$(wc -c <"$wasm")" "$out/$(basename "$wasm")"
    done
done
