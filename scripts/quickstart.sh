#!/usr/bin/env bash
# One command on a fresh machine: install, compile the bundled SmolLM2 for this CPU, and chat
# with it through the runtime (no transformers, no compiler in the loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p out
llmc compile smollm2 --target cpu -o out/smollm2-cpu --verbose
llmc run out/smollm2-cpu --chat --prompt "What is the capital of France?" --max-tokens 48 --verbose
