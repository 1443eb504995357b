#!/usr/bin/env bash
# Build llama.cpp's own server (llama-server, continuous batching with --parallel) from the
# llama.cpp sources that llama-cpp-python's sdist vendors, for benchmarks/serve.py. Not part
# of CI or the install. Usage: benchmarks/build_llama_server.sh [OUT_DIR]  (default
# build/llama-server); prints the path of the binary. CPU only, native instructions.
# --no-binary is limited to llama-cpp-python: with :all: pip would also build its build
# backends (scikit-build-core, hatchling, ...) from source just to read the sdist's metadata.
set -euo pipefail
OUT=${1:-build/llama-server}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ ! -d "$OUT/src" ]; then
  $PY -m pip download --quiet --no-binary llama-cpp-python --no-deps --dest "$OUT/sdist" llama-cpp-python
  mkdir -p "$OUT/src"
  tar -xzf "$OUT"/sdist/llama_cpp_python-*.tar.gz -C "$OUT/src" --strip-components=1
fi
SRC="$OUT/src/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "no vendored llama.cpp in the sdist ($SRC)" >&2; exit 1; }
cmake -S "$SRC" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log" >&2; exit 1; }
cmake --build "$OUT/build" --target llama-server -j "${JOBS:-2}" >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log" >&2; exit 1; }
ls "$OUT/build/bin/llama-server"
