#!/usr/bin/env bash
# One command on a fresh machine: install, compile the bundled SmolLM2 to llmc IR, verify it,
# and generate a reply with the IR's reference interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p out
llmc compile smollm2 --target cpu --emit ir -o out/smollm2.llmc.ir --verbose
llmc ir out/smollm2.llmc.ir --summary
llmc interpret smollm2 --chat --prompt "What is the capital of France?" --max-tokens 24
