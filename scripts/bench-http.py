#!/usr/bin/env python3
"""The OpenAI HTTP API against gRPC on one server, in one run: the same greedy request (32 tokens,
adapter `upper`, ignore_eos) made one at a time through each, rounds interleaved so that a drift of
the machine hits both; prints medians of end-to-end (non-streaming) and time to first token
(streaming), and their ratio.

    python3 scripts/bench-http.py GRPC_PORT HTTP_PORT [ROUNDS]

against a server started with --http-listen and --adapter upper=adapters/examples/upper; needs
the `openai` package and the client of client/python (scripts/test-python.sh's venv has both:
build-python-venv/bin/python scripts/bench-http.py ...). docs/benchmarks.md, "HTTP API".
"""

import statistics
import sys
import time

import openai

import loraplex

grpc_port, http_port = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x", max_retries=0)
rpc = loraplex.Client(f"127.0.0.1:{grpc_port}")
PROMPT = "Give me one tip for sleeping better."
ARGS = dict(max_tokens=32)


def grpc_e2e() -> None:
    rpc.complete(PROMPT, adapter="upper", temperature=0.0, ignore_eos=True, **ARGS)


def http_e2e() -> None:
    oai.completions.create(
        model="upper", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}, **ARGS
    )


def grpc_ttft() -> float:
    t = time.perf_counter()
    stream = rpc.generate(PROMPT, adapter="upper", temperature=0.0, ignore_eos=True, **ARGS)
    next(stream)
    d = time.perf_counter() - t
    list(stream)
    return d


def http_ttft() -> float:
    t = time.perf_counter()
    stream = iter(
        oai.completions.create(
            model="upper",
            prompt=PROMPT,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            **ARGS,
        )
    )
    next(stream)
    d = time.perf_counter() - t
    list(stream)
    return d


def timed(f) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


grpc_e2e()
http_e2e()
res: dict = {"grpc e2e": [], "http e2e": [], "grpc ttft": [], "http ttft": []}
for _ in range(rounds):
    res["grpc e2e"] += [timed(grpc_e2e) for _ in range(10)]
    res["http e2e"] += [timed(http_e2e) for _ in range(10)]
    res["grpc ttft"] += [grpc_ttft() for _ in range(10)]
    res["http ttft"] += [http_ttft() for _ in range(10)]
med = {k: 1000 * statistics.median(v) for k, v in res.items()}
for k, v in med.items():
    print(f"{k:10s} median {v:7.1f} ms  (n {len(res[k])})")
print(f"http/grpc e2e {med['http e2e'] / med['grpc e2e']:.3f}")
print(f"http/grpc ttft {med['http ttft'] / med['grpc ttft']:.3f}")
