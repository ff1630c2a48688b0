#!/usr/bin/env bash
# Installs the Debian packages the build needs. Idempotent: does nothing when all are present.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t pkgs < <(grep -v '^\s*#' "$here/packages-debian.txt" | grep -v '^\s*$')
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Python may come from elsewhere (pyenv); only ask apt for python packages when no python3 exists.
if command -v python3 >/dev/null; then
  filtered=()
  for p in "${missing[@]}"; do
    # ...but the venv module, if that python3 lacks it (Debian's without python3-venv).
    if [[ "$p" == python3-venv ]] && ! python3 -c 'import ensurepip' 2>/dev/null; then
      filtered+=("$p")
      continue
    fi
    [[ "$p" == python3* ]] || filtered+=("$p")
  done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  # nginx is installed for the tests, which run their own; its package must not start the system
  # one (policy-rc.d answering 101 = "not allowed", as in container builds), which would also fail
  # the install where port 80 is taken.
  added_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    rc=$?
  if [[ -n "$added_policy" ]]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
  ((rc == 0)) || exit "$rc"
else
  echo "setup: all Debian packages present"
fi
