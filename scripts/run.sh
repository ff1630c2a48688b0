#!/usr/bin/env bash
# README's run command: installs the build dependencies, fetches SmolLM2-135M-Instruct, builds the
# release binaries and generates an answer to a real chat prompt on the CPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
model="$(bash scripts/fetch-model.sh)"
cmake -S . -B build-release -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build-release -j "$(nproc)" --target loraplex-generate
echo "== loraplex-generate on $model"
./build-release/client/loraplex-generate --model "$model" \
  --chat "${1:-Explain in two sentences what a LoRA adapter is.}" --max-tokens 96
