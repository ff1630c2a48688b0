#!/usr/bin/env python3
"""Closed-loop load generator for llama.cpp's llama-server, the counterpart of `loraplex bench`
in scripts/bench-vs-llamacpp.sh. Standard library only (threads + http.client).

CONCURRENCY threads each keep one request in flight until REQUESTS have been sent in all. A request
is POST /completion with a prompt of PROMPT random token ids (ids 3..vocab-1, as `loraplex bench`
draws them), "n_predict": MAX_TOKENS, "ignore_eos": true, "temperature": 0 (greedy),
"cache_prompt": false, streamed (server-sent events) so the time to the first token is measured at
the client as `loraplex bench` measures it. With --adapters N, request i selects adapter i % N via
the per-request "lora": [{"id": i % N, "scale": 1.0}] field (the server started with N --lora files
and --lora-init-without-apply; the global scales are set to 0 first, so a request without the field
runs the base model and one with it runs its one adapter).

Prints one JSON object: output tokens / wall time from the first send to the last completion
(output_tokens_per_s), the TTFT and end-to-end latency percentiles, and the server's own timings.

  tools/llamacpp_load.py --port 8080 --concurrency 32 --requests 64 [--adapters 32]
      [--prompt 128] [--max-tokens 128] [--seed 0] [--out FILE]
  tools/llamacpp_load.py --port 8080 --check-adapters 32   # does each adapter change the logits?
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values):
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "mean": sum(values) / len(values) if values else None}


def vocab_size(host, port, fallback):
    """n_vocab from GET /v1/models (llama-server's model metadata), else the fallback."""
    try:
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("GET", "/v1/models")
        body = json.loads(c.getresponse().read())
        c.close()
        for m in body.get("data", []):
            n = (m.get("meta") or {}).get("n_vocab")
            if n:
                return int(n)
    except (OSError, ValueError, http.client.HTTPException):
        pass
    return fallback


def zero_adapter_scales(host, port, timeout):
    """Sets every loaded adapter's global scale to 0 (POST /lora-adapters) and returns the list.

    --lora-init-without-apply only keeps the adapters out of the context at start-up: their global
    scale stays 1.0, and a request without a "lora" field gets the global list, i.e. every adapter
    at once. With the scales at 0 such a request runs the base model alone, and one that names
    {"id": i, "scale": 1.0} runs adapter i alone (the server zeroes the ids it does not name)."""
    def call(method, body=None):
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            c.request(method, "/lora-adapters", body=None if body is None else json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"{method} /lora-adapters: HTTP {r.status}: {data[:300]!r}")
            return json.loads(data)
        finally:
            c.close()
    listed = call("GET")
    if any(x.get("scale", 0) != 0 for x in listed):
        call("POST", [{"id": x["id"], "scale": 0.0} for x in listed])
        listed = call("GET")
        if any(x.get("scale", 0) != 0 for x in listed):
            raise RuntimeError(f"adapter scales still non-zero after POST /lora-adapters: {listed}")
    return listed


def complete(conn, body, stream=True):
    """One /completion call; returns (ttft_s or None, final event dict). Raises on HTTP errors."""
    body = dict(body, stream=stream)
    t0 = time.perf_counter()
    conn.request("POST", "/completion", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        return None, json.loads(resp.read())
    ttft, final, pieces = None, None, []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        ev = json.loads(payload)
        if "error" in ev:
            raise RuntimeError(f"server error: {ev['error']}")
        if ttft is None and (ev.get("content") or ev.get("tokens")):
            ttft = time.perf_counter() - t0
        pieces.append(ev.get("content", ""))
        if ev.get("stop"):
            final = ev
    resp.read()
    if final is None:
        raise RuntimeError("stream ended without a final event")
    final.setdefault("content_all", "".join(pieces))
    return ttft, final


def run_load(a):
    zero_adapter_scales(a.host, a.port, a.timeout)
    vocab = vocab_size(a.host, a.port, a.vocab)
    rng = random.Random(a.seed)
    prompts = [[rng.randint(3, vocab - 1) for _ in range(a.prompt)] for _ in range(a.requests)]
    lock = threading.Lock()
    next_index = [0]
    records, errors = [], []

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= a.requests:
                    break
                next_index[0] += 1
            body = {"prompt": prompts[i], "n_predict": a.max_tokens, "ignore_eos": True,
                    "temperature": 0, "cache_prompt": False, "return_tokens": True}
            if a.adapters > 0:
                body["lora"] = [{"id": i % a.adapters, "scale": 1.0}]
            # A connection per request: llama-server closes a kept-alive connection after a
            # streamed response, and a local connect costs well under a millisecond.
            conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
            t0 = time.perf_counter()
            try:
                ttft, final = complete(conn, body)
            except (OSError, RuntimeError, ValueError, http.client.HTTPException) as e:
                with lock:
                    errors.append(f"request {i}: {e}")
                continue
            finally:
                conn.close()
            t1 = time.perf_counter()
            timings = final.get("timings") or {}
            rec = {"start": t0, "end": t1, "ttft_s": ttft,
                   "output_tokens": int(final.get("tokens_predicted",
                                                  timings.get("predicted_n", 0))),
                   "prompt_tokens": int(final.get("tokens_evaluated",
                                                  timings.get("prompt_n", a.prompt))),
                   "server_prompt_ms": timings.get("prompt_ms"),
                   "server_predicted_ms": timings.get("predicted_ms"),
                   "server_predicted_per_s": timings.get("predicted_per_second")}
            with lock:
                records.append(rec)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.concurrency)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = max((r["end"] for r in records), default=time.perf_counter())
    wall = t_end - t_start
    out_tokens = sum(r["output_tokens"] for r in records)
    short = sum(1 for r in records if r["output_tokens"] != a.max_tokens)
    ms = lambda xs: [x * 1e3 for x in xs if x is not None]
    result = {
        "tool": "llamacpp_load", "concurrency": a.concurrency, "requests": a.requests,
        "completed": len(records), "errors": len(errors), "error_examples": errors[:5],
        "adapters": a.adapters, "prompt_tokens_per_request": a.prompt,
        "max_tokens": a.max_tokens, "vocab": vocab,
        "requests_with_other_than_max_tokens": short,
        "duration_s": wall, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall if wall > 0 else 0.0,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "latency_unit": "ms",
        "ttft": summary(ms(r["ttft_s"] for r in records)),
        "e2e": summary(ms(r["end"] - r["start"] for r in records)),
        "server_prompt_ms": summary([r["server_prompt_ms"] for r in records
                                     if r["server_prompt_ms"] is not None]),
        "server_decode_tok_per_s": summary([r["server_predicted_per_s"] for r in records
                                            if r["server_predicted_per_s"] is not None]),
    }
    return result


def check_adapters(a):
    """Output of one fixed prompt with no adapter and with each adapter: llama.cpp applies a LoRA
    only where its tensors match the model's, so a silently ignored adapter would make the adapter
    workload look free. Reports how many adapters changed the output (all should)."""
    vocab = vocab_size(a.host, a.port, a.vocab)
    rng = random.Random(a.seed + 1)
    prompt = [rng.randint(3, vocab - 1) for _ in range(32)]
    listed = zero_adapter_scales(a.host, a.port, a.timeout)

    def output(lora):
        """The greedy tokens and the top-5 log-probabilities at each step: a small random adapter
        may leave the greedy tokens alone, never the probabilities."""
        c = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
        body = {"prompt": prompt, "n_predict": 4, "ignore_eos": True, "temperature": 0,
                "cache_prompt": False, "return_tokens": True, "n_probs": 5}
        if lora is not None:
            body["lora"] = lora
        try:
            _, final = complete(c, body, stream=False)
        finally:
            c.close()
        return json.dumps([final.get("tokens"), final.get("completion_probabilities")])

    base = output(None)
    base_again = output(None)
    outs = [output([{"id": i, "scale": 1.0}]) for i in range(a.check_adapters)]
    return {"adapters": a.check_adapters, "loaded": len(listed),
            "loaded_scales": sorted({x.get("scale") for x in listed}),
            "base_repeatable": base == base_again,
            "changed_output": sum(1 for o in outs if o != base),
            "distinct_outputs": len(set(outs)),
            "ok": len(listed) == a.check_adapters and all(o != base for o in outs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (random ids)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=0, help="request i uses adapter i %% N")
    ap.add_argument("--vocab", type=int, default=49152, help="if the server does not report it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--check-adapters", type=int, default=0, metavar="N")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    result = check_adapters(a) if a.check_adapters else run_load(a)
    text = json.dumps(result, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    if result.get("errors") or result.get("completed", 1) == 0 or result.get("ok") is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
