# Sourced by the serving benchmarks (bench-serving.sh, bench-s3-s5.sh): makes the rank-16 PEFT
# folder they upload and starts loraplex-server on MODEL in the background, its port file, state and
# log under OUT, killed when the script exits. Sets `server` (the pid) and exports LORAPLEX_SERVER
# for the `loraplex` client. Needs `b` (the build dir), `out` and `model`; extra arguments go to the
# server. The weights: --dtype LP_DTYPE (default native, the server's default).
start_bench_server() {
  python3 tools/make_random_adapter.py "$out/r16" --rank 16 --dtype f32 --model "$model" >/dev/null
  "$b/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$out/port" \
    --state_dir "$out/state" --max_running 64 --dtype "${LP_DTYPE:-native}" "$@" >"$out/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do [[ -s "$out/port" ]] && break; sleep 0.1; done
  [[ -s "$out/port" ]] || { echo "loraplex-server did not start; see $out/server.log" >&2; exit 1; }
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$out/port")"
}
