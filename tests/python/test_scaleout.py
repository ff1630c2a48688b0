"""Scale-out behind a real load balancer: three loraplex-server replicas behind nginx (Debian's
package) running docker/nginx.conf on loopback, 64 adapters in one shared --adapter-dir loaded on
demand. A bench run through nginx puts every adapter on exactly one replica (each replica's
per-adapter request counters show it), the HTTP API follows the same routing, and when a replica
is killed mid-run every request still succeeds after the client's retry and no adapter is lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List

import openai
import pytest

import loraplex

from conftest import (
    PEFT_DIR,
    REPO,
    ServerProcess,
    client_binary,
    start_server,
    stop_server,
)

ADAPTERS = [f"a{i:02d}" for i in range(64)]
# Small adapters of the stories260K fixtures, copied under 64 names.
SOURCES = ["qv", "all_linear", "rank1", "rslora", "layers", "regex", "fan_in_fan_out"]
REPLICAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adapter_requests(replica: ServerProcess) -> Dict[str, float]:
    """loraplex_adapter_requests_total by adapter, from the replica's /metrics."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    counts: Dict[str, float] = {}
    for m in re.finditer(
        r'^loraplex_adapter_requests_total\{adapter="([^"]+)"\} (\S+)$', text, re.M
    ):
        counts[m.group(1)] = float(m.group(2))
    return counts


def owners(replicas: List[ServerProcess]) -> Dict[str, List[int]]:
    """Which replicas served each adapter (metrics are copied every 250 ms: wait for them)."""
    time.sleep(0.6)
    seen: Dict[str, List[int]] = {}
    for i, r in enumerate(replicas):
        for name, n in adapter_requests(r).items():
            if n > 0:
                seen.setdefault(name, []).append(i)
    return seen


def bench(target: str, out: Path, *args: str, max_tokens: int = 16) -> "subprocess.Popen[bytes]":
    cmd = [
        str(client_binary()),
        "bench",
        "--server",
        target,
        "--adapters",
        ",".join(ADAPTERS),
        "--popularity",
        "distinct",
        "--prompt-tokens",
        "16",
        "--max-tokens",
        str(max_tokens),
        # Every request measured: a warm-up request's failure or retry would not be counted.
        "--warmup",
        "0",
        "--quiet",
        "--out",
        str(out),
        *args,
    ]
    env = dict(os.environ)
    if "TSAN_OPTIONS" in env:
        # A TSan-built CLI is a gRPC client over Debian's uninstrumented gRPC core, whose own
        # handoffs TSan would report (tests/e2e/tsan_client_options.cc); the servers are what the
        # TSan stage checks here.
        env["TSAN_OPTIONS"] = "report_bugs=0"
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def bench_results(proc: "subprocess.Popen[bytes]", out: Path, timeout: float = 300) -> Dict:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode(errors="replace")
    with (out / "results.json").open() as f:
        results: Dict = json.load(f)
    return results


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict]:
    root = tmp_path_factory.mktemp("scaleout")
    shared = root / "adapters"
    for i, name in enumerate(ADAPTERS):
        shutil.copytree(PEFT_DIR / SOURCES[i % len(SOURCES)], shared / name)
    replicas = []
    for i in range(REPLICAS):
        work = root / f"replica-{i}"
        work.mkdir()
        replicas.append(
            start_server(
                work,
                [f"--adapter-dir={shared}", "--load-on-demand", f"--state-dir={work / 'state'}"],
                fixture_adapters=False,
            )
        )
    grpc_port, http_port = free_port(), free_port()
    conf = (REPO / "docker" / "nginx.conf").read_text()
    for i, r in enumerate(replicas):
        conf = conf.replace(f"replica-{i}:50051", f"127.0.0.1:{r.grpc_port}")
        conf = conf.replace(f"replica-{i}:8000", f"127.0.0.1:{r.http_port}")
    assert "replica-" not in re.sub(r"#.*", "", conf), "docker/nginx.conf names other replicas"
    conf = conf.replace("listen 50051 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{http_port};")
    nginx_dir = root / "nginx"
    nginx_dir.mkdir()
    # Everything nginx writes goes under nginx_dir, so that it runs without root too (its
    # compiled-in temp folders are under /var/lib/nginx).
    temp = "".join(
        f"  {kind}_temp_path {nginx_dir / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    assert conf.count("\nhttp {\n") == 1
    conf = conf.replace("\nhttp {\n", "\nhttp {\n" + temp)
    (nginx_dir / "nginx.conf").write_text(conf)
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = subprocess.Popen(
        [
            nginx_bin,
            "-p",
            str(nginx_dir),
            "-c",
            str(nginx_dir / "nginx.conf"),
            "-e",
            str(nginx_dir / "error.log"),
            "-g",
            f"daemon off; pid {nginx_dir / 'nginx.pid'}; error_log {nginx_dir / 'error.log'};",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        assert nginx.poll() is None, (nginx_dir / "error.log").read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", grpc_port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.1)
    state = {
        "replicas": replicas,
        "grpc": f"127.0.0.1:{grpc_port}",
        "http": f"http://127.0.0.1:{http_port}",
        "root": root,
        "killed": set(),
    }
    yield state
    nginx.terminate()
    nginx.wait(timeout=30)
    for i, r in enumerate(replicas):
        if i not in state["killed"]:
            stop_server(r)


def test_each_adapter_stays_on_one_replica(cluster: Dict) -> None:
    out = cluster["root"] / "bench-affinity"
    results = bench_results(
        bench(cluster["grpc"], out, "--concurrency", "12", "--requests", "256"), out
    )
    assert results["errors"] == 0, results["error_examples"]
    assert results["completed"] == 256
    served = owners(cluster["replicas"])
    assert sorted(served) == ADAPTERS, "every adapter was requested and served"
    split = {name: where for name, where in served.items() if len(where) != 1}
    assert not split, f"adapters served by several replicas: {split}"
    per_replica = [sum(1 for w in served.values() if w == [i]) for i in range(REPLICAS)]
    assert all(n > 0 for n in per_replica), per_replica

    # The OpenAI API through nginx, with the header: each adapter's requests on one replica too.
    # (nginx builds a hash ring per upstream from its servers' addresses, so the HTTP ring is not
    # the gRPC ring: docker/nginx.conf.)
    client = openai.OpenAI(base_url=f"{cluster['http']}/v1", api_key="unused", max_retries=0)
    before = [adapter_requests(r) for r in cluster["replicas"]]
    for name in ADAPTERS[:16] * 3:
        got = client.completions.create(
            model=name,
            prompt="Once upon a time",
            max_tokens=4,
            temperature=0,
            extra_headers={"x-loraplex-adapter": name},
        )
        assert got.system_fingerprint.startswith(f"loraplex:{name}@")
    time.sleep(0.6)
    after = [adapter_requests(r) for r in cluster["replicas"]]
    for name in ADAPTERS[:16]:
        grew = {i: after[i].get(name, 0) - before[i].get(name, 0) for i in range(REPLICAS)}
        assert sorted(grew.values()) == [0, 0, 3], f"{name}: HTTP requests per replica {grew}"


def test_a_killed_replica_loses_no_request_and_no_adapter(cluster: Dict) -> None:
    replicas: List[ServerProcess] = cluster["replicas"]
    out = cluster["root"] / "bench-kill"
    # Long outputs, so that the kill finds streams half way through on the victim (about a
    # third of the 24 in flight), which only the client's retry can save.
    run = bench(
        cluster["grpc"],
        out,
        "--concurrency",
        "24",
        "--duration",
        "8",
        "--retries",
        "5",
        max_tokens=200,
    )
    time.sleep(3)
    # The replica holding the most adapters, so that the most streams are cut.
    served = owners(replicas)
    victim = max(range(REPLICAS), key=lambda i: sum(1 for w in served.values() if i in w))
    # Kill it while it is generating (a sequence running past its first token).
    with loraplex.Client(replicas[victim].grpc_target) as victim_rpc:
        deadline = time.monotonic() + 10
        while victim_rpc.engine_stats().running < 2:
            assert time.monotonic() < deadline, "the victim got no traffic"
    replicas[victim].process.send_signal(signal.SIGKILL)
    replicas[victim].process.wait(timeout=30)
    cluster["killed"].add(victim)
    results = bench_results(run, out)
    assert results["errors"] == 0, results["error_examples"]
    assert results["completed"] > 0
    held = sum(1 for w in served.values() if victim in w)
    print(f"victim {victim} held {held} adapters; completed {results['completed']}")
    assert results["retries"] > 0, "the kill cut no stream: the test did not test retries"
    print(f"retried attempts after the kill: {results['retries']} {results['retried_by_code']}")

    # Every adapter, those the victim held included, still answers through nginx.
    out = cluster["root"] / "bench-after"
    after = bench_results(
        bench(cluster["grpc"], out, "--concurrency", "8", "--requests", "64"), out
    )
    assert after["errors"] == 0, after["error_examples"]
    assert after["completed"] == 64
    served = owners([r for i, r in enumerate(replicas) if i != victim])
    assert sorted(served) == ADAPTERS, "an adapter was lost with the replica"
