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
out="$(cd "$out" && pwd)"
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

# Python plugins (plugins/python-*/app.py, world named in the folder's `world` file), with
# componentize-py: from PATH, or target/py-clients where .ci/run installs it. Without it they
# are skipped with a note (the tests that load them then skip, or fail under CI=true).
# A component is rebuilt only when its app.py or the WIT is newer (a build takes seconds).
cpy="$(command -v componentize-py || true)"
if [ -z "$cpy" ] && [ -x "$repo/target/py-clients/bin/componentize-py" ]; then
    cpy="$repo/target/py-clients/bin/componentize-py"
fi
for app in "$repo"/plugins/python-*/app.py; do
    [ -e "$app" ] || continue
    dir="$(dirname "$app")"
    name="$(basename "$dir" | tr - _)"
    wasm="$out/$name.wasm"
    if [ -z "$cpy" ]; then
        echo "skipping $name: componentize-py not found (pip install componentize-py==0.25.1)" >&2
        continue
    fi
    if [ "$wasm" -nt "$app" ] && [ "$wasm" -nt "$repo/wit/policy.wit" ]; then
        printf '%8d  %s (up to date)\n' "$(wc -c <"$wasm")" "$wasm"
        continue
    fi
    echo "building $dir (componentize-py)" >&2
    # Written aside and renamed: test binaries may run this script at the same time.
    tmp="$(mktemp "$out/.$name.XXXXXX")"
    (cd "$dir" && "$cpy" -q -d "$repo/wit/policy.wit" -w "$(cat world)" componentize app -o "$tmp")
    mv "$tmp" "$wasm"
    printf '%8d  %s\n' "$(wc -c <"$wasm")" "$wasm"
done
