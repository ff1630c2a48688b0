#!/usr/bin/env bash
# The Python tests (tests/python) against a real loraplex-server: makes a venv, installs pytest,
# openai, kubernetes-validate, pyyaml and the client package client/python into it, and runs
# pytest. Fails when a test fails or when pytest collects none (its exit status 5).
#
#   LP_SERVER_BIN    the server binary (default: ${LP_BUILD_PREFIX}release/server/loraplex-server)
#   LP_BUILD_PREFIX  as in scripts/test.sh (default build-); the venv is ${LP_BUILD_PREFIX}python-venv
#   LP_PYTHON_VENV   another venv folder
#   LP_SHARED_DIR: see tests/python/conftest.py
# Arguments go to pytest (e.g. -k upload). Re-runs reuse the venv and reinstall client/python only
# when its sources or the protos changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${LP_BUILD_PREFIX:-build-}"
# Paths given relative to where the script is called from.
server_bin="$(realpath -m -- "${LP_SERVER_BIN:-$root/${prefix}release/server/loraplex-server}")"
venv="$(realpath -m -- "${LP_PYTHON_VENV:-$root/${prefix}python-venv}")"
cd "$root"

if [[ ! -x "$server_bin" ]]; then
  echo "test-python.sh: no server binary at $server_bin (build it, or set LP_SERVER_BIN)" >&2
  exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    { echo "test-python.sh: python3 >= 3.9 is needed" >&2; exit 1; }
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check -q)

if ! "$py" -c 'import pytest, openai, kubernetes_validate, yaml' 2>/dev/null; then
  "${pip[@]}" install pytest openai kubernetes-validate pyyaml
fi

# What the installed client was built from: the package's sources and the protos.
sources_hash() {
  find client/python proto/loraplex/v1 \( -name build -o -name dist -o -name '*.egg-info' \) -prune \
    -o -type f \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name '*.proto' \
    -o -name py.typed \) ! -name '*_pb2.py' ! -name '*_pb2_grpc.py' -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}
stamp="$venv/.loraplex-client-sources"
want="$(sources_hash)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]] || ! "$py" -c 'import loraplex.client' 2>/dev/null
then
  "${pip[@]}" install ./client/python  # pip reinstalls a local folder every time
  echo "$want" >"$stamp"
fi

# The cache goes into the venv, not into the source tree.
LP_SERVER_BIN="$server_bin" "$py" -m pytest -q -o cache_dir="$venv/pytest-cache" tests/python "$@"
