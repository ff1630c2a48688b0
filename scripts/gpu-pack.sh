#!/usr/bin/env bash
# gpu-pack.sh BUILD_DIR PACK_DIR
#
# Packs what scripts/gpu-check.sh runs, prebuilt, for a GPU machine that has the CUDA driver and
# libraries but not the Debian packages the build needs (gRPC, Protobuf, Abseil, GoogleTest, Google
# Benchmark, ICU, RE2): the device tool's machines are such. BUILD_DIR is a release build with CUDA
# for that GPU's architecture (e.g. -DCMAKE_CUDA_ARCHITECTURES=90 for an H100/H200) in which the
# targets of gpu-check.sh are built. PACK_DIR/pack.tar.xz then holds
#   build/...   the binaries, at their paths inside BUILD_DIR,
#   lib/        every shared library they need that is neither glibc's nor CUDA's (the GPU machine
#               brings its own libcudart/libcublas/libcuda, matching its driver),
#   lib-std/    this machine's libstdc++ and libgcc_s, used there only when its own are older,
#   shared/     the stories260K model the tests read (LP_SHARED_DIR points there),
#   PACKED      where, when and from which commit the pack was made.
# Run there: LP_GPU_PREBUILT=PACK_DIR scripts/gpu-check.sh OUT_DIR [MODEL.gguf]
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BUILD_DIR PACK_DIR" >&2
  exit 2
fi
build="$(cd "$1" && pwd)"
mkdir -p "$2"
pack="$(cd "$2" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${LP_SHARED_DIR:-$root/../shared}"
# shellcheck source=gpu-targets.sh
source "$root/scripts/gpu-targets.sh"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/build" "$stage/lib" "$stage/lib-std" "$stage/shared/models"

bins=()
for t in "${LP_GPU_TARGETS[@]}"; do
  rel="${LP_GPU_TARGET_PATH[$t]}"
  [[ -x "$build/$rel" ]] || { echo "missing $build/$rel: build target $t first" >&2; exit 1; }
  mkdir -p "$stage/build/$(dirname "$rel")"
  cp "$build/$rel" "$stage/build/$rel"
  strip --strip-unneeded "$stage/build/$rel"
  bins+=("$build/$rel")
done

# Shared libraries: everything ldd resolves except the C library, the loader and CUDA's own.
skip_re='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libcuda|libcudart|libcublas|libcublasLt|libnvidia)'
for b in "${bins[@]}"; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$name" =~ $skip_re ]]; then continue; fi
  case "$name" in
    libstdc++.so.*|libgcc_s.so.*) cp -L "$path" "$stage/lib-std/$name" ;;
    *) cp -L "$path" "$stage/lib/$name" ;;
  esac
done

cp -r "$shared/models/stories260K" "$stage/shared/models/"
{
  echo "host: $(uname -n) $(. /etc/os-release && echo "$PRETTY_NAME"), glibc $(ldd --version | head -1 | awk '{print $NF}')"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD || echo ' (with uncommitted changes)')"
  echo "cuda architectures: $(grep -m1 '^CMAKE_CUDA_ARCHITECTURES' "$build/CMakeCache.txt" | cut -d= -f2)"
  echo "nvcc: $(grep -m1 '^CMAKE_CUDA_COMPILER_VERSION\|^CMAKE_CUDA_COMPILER:' "$build/CMakeCache.txt" | cut -d= -f2)"
} > "$stage/PACKED"
tar -C "$stage" -cf - . | xz -T0 -6 > "$pack/pack.tar.xz"
echo "packed $(du -h "$pack/pack.tar.xz" | cut -f1) into $pack/pack.tar.xz:"
cat "$stage/PACKED"
