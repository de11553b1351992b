#!/usr/bin/env bash
# Builds here what scripts/gpu-check.sh runs on a GPU machine, into gpu/ (git-ignored):
#   gpu/bin.tar.xz     the release `cllm` and the cuda, golden and gguf test binaries, stripped
#   gpu/shared.tar.xz  ../shared's models (those the repository does not ship) and golden files
# Then, with the device tool:  run command="bash scripts/gpu-check.sh" carry=["gpu"]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${CLLM_SHARED_DIR:-../shared}
rm -rf gpu && mkdir -p gpu/stage/bin
cargo build --release
cargo test --no-run --test cuda --test golden --test gguf --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "gpu/stage/bin/$name"; done
cp target/release/cllm gpu/stage/bin/cllm
strip gpu/stage/bin/*
tar -C gpu/stage -cf - bin | xz -6 -T2 > gpu/bin.tar.xz
# Models the repository ships travel with the working tree; the rest come from ../shared.
mkdir -p gpu/stage/shared/models
cp -r "$SHARED/golden" gpu/stage/shared/golden
for m in "$SHARED"/models/*/; do
  name=$(basename "$m")
  [ -e "models/$name" ] || cp -r "$m" "gpu/stage/shared/models/$name"
done
tar -C gpu/stage -cf - shared | xz -9 -T2 > gpu/shared.tar.xz
rm -rf gpu/stage
# The test binaries find the repository (and the cllm binary) at the path they were built in.
pwd > gpu/built_at
du -ch gpu/*.tar.xz
