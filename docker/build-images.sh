#!/usr/bin/env bash
# Builds the loraplex container images with podman and checks that the CPU image serves.
#
#   1. installs podman, debootstrap and runc when missing (apt-get);
#   2. base image: pulls debian:bookworm, or, when no registry answers, makes Debian 12 with
#      debootstrap from the mirror this machine's apt uses and imports it as
#      localhost/debian:bookworm (kept for later runs);
#   3. fetches the model on the host (scripts/fetch-model.sh) into docker/model-cache/ and builds
#      docker/Dockerfile.cpu with `podman build --isolation chroot` (nice -n 10);
#   4. starts the image (podman run with published ports; if no container runtime works here, the
#      image's exported root filesystem under chroot), waits for `loraplex health`, generates with
#      the base model and each demo adapter using the `loraplex` CLI inside the image, checks the
#      answers (upper: >= 90% of the letters upper case; signoff: ends with "-- Loraplex"; base:
#      neither), checks the published metrics port, and stops the server with SIGTERM (exit 0);
#   5. tries docker/Dockerfile.cuda: builds it when its nvidia/cuda base images can be pulled, else
#      reports why not.
# Exits non-zero on any failure of 1-4 (and of 5 with LP_REQUIRE_CUDA_IMAGE=1).
#
# Usage: docker/build-images.sh [--skip-build] [--no-cuda]
#   --skip-build   reuse the existing CPU image (only steps 1, 2 and 4)
#   --no-cuda      skip step 5
# Environment:
#   LP_IMAGE=localhost/loraplex:cpu      CPU image tag
#   LP_BASE_IMAGE=...                    base image to use as is (skips step 2)
#   LP_REBUILD_BASE=1                    debootstrap again even if localhost/debian:bookworm exists
#   LP_RUN_MODE=auto|podman|chroot       how step 4 starts the image (auto: podman, else chroot)
#   LP_GRPC_PORT=50151 LP_HTTP_PORT=18100 LP_METRICS_PORT=19190
#                                        host ports (127.0.0.1) the container publishes
#   LP_REQUIRE_CUDA_IMAGE=1              fail when the CUDA image cannot be built
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

image="${LP_IMAGE:-localhost/loraplex:cpu}"
cuda_image="${LP_CUDA_IMAGE:-localhost/loraplex:cuda}"
local_base="localhost/debian:bookworm"
run_mode="${LP_RUN_MODE:-auto}"
grpc_port="${LP_GRPC_PORT:-50151}"
metrics_port="${LP_METRICS_PORT:-19190}"
http_port="${LP_HTTP_PORT:-18100}"
model_name="SmolLM2-135M-Instruct.Q4_1.gguf"
skip_build=0
do_cuda=1
for a in "$@"; do
  case "$a" in
    --skip-build) skip_build=1 ;;
    --no-cuda) do_cuda=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument $a" >&2; exit 2 ;;
  esac
done

log() { echo "== $*"; }
checked=()
ok() { echo "   ok: $*"; checked+=("$*"); }
fail() { echo "build-images: FAIL: $*" >&2; exit 1; }
need_root() { [[ "$(id -u)" -eq 0 ]] || fail "run as root (podman build --isolation chroot, debootstrap, chroot)"; }

# --- 1. tools ------------------------------------------------------------------------------------
need_root
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
# runc: crun (podman's default runtime on Debian 12) refuses hybrid cgroup v1/v2 hosts.
command -v runc >/dev/null || missing+=(runc)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
ok "tools: $(podman --version), debootstrap $(dpkg-query -W -f='${Version}' debootstrap), runc $(dpkg-query -W -f='${Version}' runc 2>/dev/null || echo '?')"

# --- 2. base image -------------------------------------------------------------------------------
# Prints "MAIN_URI SECURITY_URI" for bookworm from apt's sources (deb822 .sources and one-line
# .list files), defaults deb.debian.org.
apt_mirrors() {
  local f files=()
  [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && files+=("$f")
  done
  awk '
    function consider(uris, suites,   n, m, i, j, u, s) {
      n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
      for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
        if (u[i] == "") continue
        if (s[j] == "bookworm" && main == "") main = u[i]
        if (s[j] == "bookworm-security" && sec == "") sec = u[i]
      }
    }
    FILENAME ~ /\.sources$/ {
      if ($0 ~ /^[ \t]*$/) { if (deb) consider(uris, suites); uris = suites = ""; deb = 0; next }
      if ($1 == "Types:" && $0 ~ /[ \t]deb([ \t]|$)/) deb = 1
      if ($1 == "URIs:") { sub(/^URIs:[ \t]*/, ""); uris = $0 }
      if ($1 == "Suites:") { sub(/^Suites:[ \t]*/, ""); suites = $0 }
      next
    }
    FNR == 1 && prev ~ /\.sources$/ { if (deb) consider(uris, suites); uris = suites = ""; deb = 0 }
    { prev = FILENAME }
    $1 == "deb" {
      i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      consider($i, $(i + 1))
    }
    END {
      if (deb) consider(uris, suites)
      if (main == "") main = "http://deb.debian.org/debian"
      if (sec == "") sec = "http://deb.debian.org/debian-security"
      print main, sec
    }' "${files[@]}"
}

make_base_image() {
  local main sec dir t0
  read -r main sec < <(apt_mirrors)
  dir="$(mktemp -d /var/tmp/loraplex-debian-rootfs.XXXXXX)"
  log "debootstrap --variant=minbase bookworm from $main into $dir"
  t0=$SECONDS
  if ! nice -n 10 debootstrap --variant=minbase bookworm "$dir" "$main" > "$dir.log" 2>&1; then
    tail -20 "$dir.log" >&2
    fail "debootstrap failed (log: $dir.log)"
  fi
  # The sources the official debian:bookworm image has (main, updates, security), on this mirror.
  rm -f "$dir/etc/apt/sources.list"
  cat > "$dir/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $main
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $sec
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
         "$dir"/var/log/bootstrap.log
  if findmnt -rn -o TARGET | grep -q "^$dir"; then
    fail "something is still mounted under $dir; not importing or removing it"
  fi
  tar --numeric-owner -C "$dir" -c . | podman import --change 'CMD ["bash"]' - "$local_base" >/dev/null
  rm -rf "$dir" "$dir.log"
  ok "base image $local_base made with debootstrap from $main in $((SECONDS - t0)) s"
}

if [[ -n "${LP_BASE_IMAGE:-}" ]]; then
  base="$LP_BASE_IMAGE"
  ok "base image $base (LP_BASE_IMAGE)"
elif [[ "${LP_REBUILD_BASE:-0}" != 1 ]] && podman image exists "$local_base"; then
  base="$local_base"
  ok "base image $base (made earlier with debootstrap)"
elif timeout 120 podman pull -q docker.io/library/debian:bookworm >/dev/null 2>&1; then
  base="docker.io/library/debian:bookworm"
  ok "base image $base (pulled)"
else
  log "docker.io/library/debian:bookworm cannot be pulled (no registry reachable); making it"
  make_base_image
  base="$local_base"
fi
podman run --help >/dev/null  # podman itself works

# --- 3. CPU image --------------------------------------------------------------------------------
if ((skip_build)); then
  podman image exists "$image" || fail "--skip-build: no image $image"
  ok "CPU image $image (existing, --skip-build)"
else
  # Build containers get the network (apt works), but PyPI may not answer them (here a TLS proxy
  # that only the host trusts); the host fetches the model and the build copies it.
  log "fetching the model on the host (scripts/fetch-model.sh)"
  model="$(bash scripts/fetch-model.sh)"
  mkdir -p docker/model-cache
  ln -f "$model" "docker/model-cache/$model_name" 2>/dev/null || cp -f "$model" "docker/model-cache/$model_name"
  ok "model $model (sha256 checked) copied to docker/model-cache/"
  log "podman build --isolation chroot -f docker/Dockerfile.cpu -t $image (BASE_IMAGE=$base)"
  t0=$SECONDS
  nice -n 10 podman build --isolation chroot --build-arg "BASE_IMAGE=$base" \
    -f docker/Dockerfile.cpu -t "$image" . || fail "podman build of docker/Dockerfile.cpu"
  build_s=$((SECONDS - t0))
  ok "CPU image $image built in ${build_s} s ($((build_s / 60)) min $((build_s % 60)) s, $(nproc) cores)"
fi
size="$(podman image inspect --format '{{.Size}}' "$image")"
ok "CPU image size $((size / 1000000)) MB"

# --- 4. run and check ----------------------------------------------------------------------------
container=""
chroot_dir=""
server_pid=""
cleanup() {
  if [[ -n "$container" ]]; then podman rm -f -v "$container" >/dev/null 2>&1 || true; fi
  if [[ -n "$server_pid" ]]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [[ -n "$chroot_dir" ]]; then
    umount "$chroot_dir/dev" 2>/dev/null || true
    umount "$chroot_dir/proc" 2>/dev/null || true
    if findmnt -rn -o TARGET | grep -q "^$chroot_dir"; then
      echo "build-images: still mounted under $chroot_dir; left in place" >&2
    else
      rm -rf "$chroot_dir" "$chroot_dir.server.log"
    fi
  fi
}
trap cleanup EXIT

# The podman flags that start a container here: the default runtime, else runc (crun refuses
# hybrid cgroups); the default ulimits, else ones within this host's hard limits (podman's default
# nofile 1048576 needs CAP_SYS_RESOURCE, which this host may lack).
run_flags=()
find_run_flags() {
  local rt ul
  local hn; hn="$(ulimit -Hn)"; [[ "$hn" == unlimited ]] && hn=1048576
  for rt in "" "--runtime runc"; do
    for ul in "" "--ulimit nofile=$hn:$hn --ulimit nproc=32768:32768"; do
      # shellcheck disable=SC2086
      if podman run --rm $rt $ul --entrypoint /bin/true "$image" >/dev/null 2>&1; then
        # shellcheck disable=SC2206
        run_flags=($rt $ul)
        return 0
      fi
    done
  done
  return 1
}

if [[ "$run_mode" == auto || "$run_mode" == podman ]]; then
  if find_run_flags; then
    run_mode=podman
  elif [[ "$run_mode" == podman ]]; then
    podman run --rm --entrypoint /bin/true "$image" || true
    fail "podman run does not work here (LP_RUN_MODE=podman)"
  else
    log "podman run does not work here; running the image's root filesystem under chroot"
    run_mode=chroot
  fi
fi

cli=()          # the loraplex CLI inside the image, talking to the server
t0=$SECONDS
if [[ "$run_mode" == podman ]]; then
  name="loraplex-cpu-check-$$"
  log "podman run ${run_flags[*]} -p 127.0.0.1:$grpc_port:50051 -p 127.0.0.1:$http_port:8000" \
    "-p 127.0.0.1:$metrics_port:9090 $image"
  container="$(podman run -d --name "$name" "${run_flags[@]}" -p "127.0.0.1:$grpc_port:50051" \
    -p "127.0.0.1:$http_port:8000" -p "127.0.0.1:$metrics_port:9090" "$image")"
  cli=(podman exec -e LORAPLEX_SERVER=127.0.0.1:50051 "$container" loraplex)
  alive() { [[ "$(podman inspect --format '{{.State.Running}}' "$container" 2>/dev/null)" == true ]]; }
  server_log() { podman logs "$container" 2>&1 | tail -"${1:-30}"; }
elif [[ "$run_mode" == chroot ]]; then
  chroot_dir="$(mktemp -d /var/tmp/loraplex-image-root.XXXXXX)"
  log "podman export $image | tar -x -C $chroot_dir"
  cid="$(podman create "$image")"
  podman export "$cid" | tar -x -C "$chroot_dir"
  podman rm "$cid" >/dev/null
  mkdir -p "$chroot_dir/proc" "$chroot_dir/dev" "$chroot_dir/var/lib/loraplex"
  mount -t proc proc "$chroot_dir/proc"
  mount --bind /dev "$chroot_dir/dev"
  # The image's own entrypoint; later flags win, so the server listens on this host's loopback.
  mapfile -t entry < <(podman image inspect --format '{{json .Config.Entrypoint}}' "$image" |
                       python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))')
  log "chroot $chroot_dir ${entry[*]} --listen 127.0.0.1:$grpc_port" \
    "--http-listen 127.0.0.1:$http_port --metrics-listen 127.0.0.1:$metrics_port"
  chroot "$chroot_dir" "${entry[@]}" --listen "127.0.0.1:$grpc_port" \
    --http-listen "127.0.0.1:$http_port" --metrics-listen "127.0.0.1:$metrics_port" \
    > "$chroot_dir.server.log" 2>&1 &
  server_pid=$!
  cli=(env "LORAPLEX_SERVER=127.0.0.1:$grpc_port" chroot "$chroot_dir" /usr/local/bin/loraplex)
  alive() { kill -0 "$server_pid" 2>/dev/null; }
  server_log() { tail -"${1:-30}" "$chroot_dir.server.log"; }
else
  fail "LP_RUN_MODE must be auto, podman or chroot"
fi

# The binaries resolve all their libraries inside the image.
if [[ "$run_mode" == podman ]]; then
  libs="$(podman exec "$container" ldd /usr/local/bin/loraplex-server /usr/local/bin/loraplex /usr/local/bin/loraplex-generate)"
else
  libs="$(chroot "$chroot_dir" ldd /usr/local/bin/loraplex-server /usr/local/bin/loraplex /usr/local/bin/loraplex-generate)"
fi
if grep 'not found' <<<"$libs"; then fail "missing shared libraries in the image"; fi
ok "ldd: every library of loraplex-server, loraplex, loraplex-generate found in the image"

health=""
for _ in $(seq 1 240); do
  alive || { server_log 40 >&2; fail "the server exited before it was healthy"; }
  health="$("${cli[@]}" health 2>&1)" && break
  sleep 1
done
[[ "$health" == SERVING ]] || { server_log 40 >&2; fail "loraplex health after 240 s: $health"; }
ok "loraplex health: $health (after $((SECONDS - t0)) s, $run_mode)"
"${cli[@]}" info

gen() {  # gen ADAPTER PROMPT: a greedy chat answer of at most 64 tokens
  local args=(generate --chat --max-tokens 64 --temperature 0)
  [[ -n "$1" ]] && args+=(--adapter "$1")
  "${cli[@]}" "${args[@]}" "$2"
}
upper_share() {  # percent of the letters that are upper case
  python3 -c 'import sys; t=sys.argv[1]; l=[c for c in t if c.isalpha()]; print(int(100*sum(c.isupper() for c in l)/len(l)) if l else 0)' "$1"
}
ends_signoff() { local t="$1"; t="${t%"${t##*[![:space:]]}"}"; [[ "$t" == *"-- Loraplex" ]]; }

prompt_upper="How can I sleep better?"
prompt_signoff="What are clouds made of?"
for p in "$prompt_upper" "$prompt_signoff"; do
  echo "-- generate (base model): $p"
  out="$(gen "" "$p")" || fail "loraplex generate (base)"
  echo "$out"
  [[ -n "${out//[[:space:]]/}" ]] || fail "empty answer from the base model"
  share="$(upper_share "$out")"
  ((share < 90)) || fail "base model answer is ${share}% upper case"
  ! ends_signoff "$out" || fail "base model answer ends with -- Loraplex"
  ok "base model answers '$p' (${share}% upper case, no sign-off)"
done

echo "-- generate --adapter upper: $prompt_upper"
out="$(gen upper "$prompt_upper")" || { server_log 20 >&2; fail "loraplex generate --adapter upper"; }
echo "$out"
share="$(upper_share "$out")"
((share >= 90)) || fail "upper: only ${share}% of the letters are upper case (want >= 90%)"
ok "adapter upper: ${share}% of the letters upper case (>= 90%)"

echo "-- generate --adapter signoff: $prompt_signoff"
out="$(gen signoff "$prompt_signoff")" || { server_log 20 >&2; fail "loraplex generate --adapter signoff"; }
echo "$out"
ends_signoff "$out" || fail "signoff: the answer does not end with '-- Loraplex'"
ok "adapter signoff: the answer ends with '-- Loraplex'"

"${cli[@]}" adapters list

# The OpenAI-compatible HTTP API, from the host: both adapters listed, and upper answering.
models="$(curl -fsS "http://127.0.0.1:$http_port/v1/models")" || fail "GET /v1/models on $http_port"
for a in upper signoff; do
  grep -q "\"id\":\"$a\"" <<<"$models" || fail "/v1/models does not list $a: $models"
done
ok "HTTP: /v1/models lists upper and signoff"
out="$(curl -fsS "http://127.0.0.1:$http_port/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d "{\"model\": \"upper\", \"max_tokens\": 64, \"temperature\": 0,
       \"messages\": [{\"role\": \"user\", \"content\": \"$prompt_upper\"}]}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])')" ||
  fail "POST /v1/chat/completions (upper)"
echo "$out"
share="$(upper_share "$out")"
((share >= 90)) || fail "HTTP upper: only ${share}% of the letters are upper case"
ok "HTTP: chat completion with model upper, ${share}% upper case"
metrics="$(curl -fsS "http://127.0.0.1:$metrics_port/metrics")" || fail "metrics on 127.0.0.1:$metrics_port"
n="$(grep -c '^loraplex_' <<<"$metrics" || true)"
((n > 0)) || fail "no loraplex_ series on 127.0.0.1:$metrics_port/metrics"
ok "metrics: $n loraplex_ series on 127.0.0.1:$metrics_port/metrics (from the host)"

log "stopping the server (SIGTERM)"
if [[ "$run_mode" == podman ]]; then
  podman stop -t 60 "$container" >/dev/null
  code="$(podman inspect --format '{{.State.ExitCode}}' "$container")"
  server_log 5
else
  kill -TERM "$server_pid"
  code=0; wait "$server_pid" || code=$?
  server_pid=""
  server_log 5
fi
[[ "$code" == 0 ]] || fail "the server exited with $code after SIGTERM"
ok "graceful stop: exit status 0 after SIGTERM"

# --- 5. CUDA image -------------------------------------------------------------------------------
cuda_note="skipped (--no-cuda)"
if ((do_cuda)); then
  log "docker/Dockerfile.cuda"
  # The base images are the defaults of its ARG ..._IMAGE= lines.
  mapfile -t cuda_bases < <(sed -n 's/^ARG[[:space:]]\{1,\}[A-Z_]*IMAGE=\([^[:space:]]*\).*/\1/p' docker/Dockerfile.cuda | sort -u)
  ((${#cuda_bases[@]})) || fail "docker/Dockerfile.cuda names no ARG ..._IMAGE= base image"
  missing_bases=()
  why=""
  for b in "${cuda_bases[@]}"; do
    ref="$b"; [[ "${b%%/*}" == *[.:]* ]] || ref="docker.io/$b"
    podman image exists "$ref" && continue
    if ! err="$(timeout 120 podman pull -q "$ref" 2>&1 >/dev/null)"; then
      missing_bases+=("$ref")
      [[ -n "$why" ]] || why="$(tail -1 <<<"$err")"
    fi
  done
  if ((${#missing_bases[@]} == 0)); then
    t0=$SECONDS
    nice -n 10 podman build --isolation chroot -f docker/Dockerfile.cuda -t "$cuda_image" . ||
      fail "podman build of docker/Dockerfile.cuda"
    cuda_note="built $cuda_image in $((SECONDS - t0)) s (not run: needs a GPU and the NVIDIA container toolkit)"
  else
    repo="https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
    if curl -fsS -m 20 -o /dev/null "$repo" 2>/dev/null; then repo_state="reachable"; else repo_state="not reachable"; fi
    cuda_note="not built: its base image(s) ${missing_bases[*]} cannot be pulled (${why:-?}); NVIDIA's Debian CUDA repository ($repo), from which a Debian 12 base could get the toolkit, is $repo_state"
    [[ "${LP_REQUIRE_CUDA_IMAGE:-0}" == 1 ]] && fail "CUDA image $cuda_note"
  fi
fi
echo "   cuda: $cuda_note"

echo
echo "build-images: PASS"
for c in "${checked[@]}"; do echo "  - $c"; done
echo "  - CUDA image: $cuda_note"
