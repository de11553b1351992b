#!/usr/bin/env bash
# Builds the CUDA emulator: OUT/libcuda.so.1 (and libcuda.so), the driver entry points of
# runtime.cpp with every kernel of kernels/*.cu compiled for the CPU. See README.md.
# Usage: build.sh OUT
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
CXX="${CXX:-c++}"
# Up to date: nothing it is built from is newer than the library.
if [ -f "$out/libcuda.so.1" ] && [ -z "$(find "$here" "$root/kernels" -newer "$out/libcuda.so.1" -type f)" ]; then
  echo "$out/libcuda.so.1"
  exit 0
fi
flags=(-std=c++17 -O2 -fPIC -g -fno-strict-aliasing -ffp-contract=off -fvisibility=hidden -I "$here" -w)

objects=("$out/runtime.o")
"$CXX" "${flags[@]}" -c "$here/runtime.cpp" -o "$out/runtime.o"
for cu in "$root"/kernels/*.cu; do
  name="$(basename "$cu" .cu)"
  src="$out/kernels_$name.cpp"
  reg="$out/kernels_$name.inc"
  {
    echo '#include "emu.h"'
    echo "#include \"$root/kernels/common.cuh\""
    echo "#include \"$cu\""
    echo "#include \"$reg\""
  } >"$src"
  # First pass: find the file's kernels (its extern "C" functions, unmangled), then compile
  # again with each registered under its name.
  : >"$reg"
  "$CXX" "${flags[@]}" -c "$src" -o "$out/kernels_$name.o"
  nm -g --defined-only "$out/kernels_$name.o" | awk '$2 == "T" && $3 !~ /^_Z/ { print "EMU_KERNEL(" $3 ")" }' >"$reg"
  if [ ! -s "$reg" ]; then
    echo "cuda emulator: no kernels found in $cu" >&2
    exit 1
  fi
  "$CXX" "${flags[@]}" -c "$src" -o "$out/kernels_$name.o"
  objects+=("$out/kernels_$name.o")
done
"$CXX" -shared -o "$out/libcuda.so.1" "${objects[@]}" -Wl,-soname,libcuda.so.1
ln -sf libcuda.so.1 "$out/libcuda.so"
echo "$out/libcuda.so.1"
