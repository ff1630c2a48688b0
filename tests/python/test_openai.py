"""The OpenAI-compatible HTTP API (--http-listen, server/http_front.h) driven by the official
``openai`` Python package, checked against the gRPC answers of the same server (through the
project's Python client): greedy requests give the same tokens and text over both, streaming and
not, for the base model and for adapters; errors come in OpenAI's shape with the right status."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

import openai
import pytest

import loraplex

BASE = "stories260K"  # the served name: the model file's name without .gguf
PROMPT = "Once upon a time"
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
]


@pytest.fixture(scope="module")
def oai(server: Any) -> openai.OpenAI:
    # No retries: a refusal must show as the first answer, not be retried away.
    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def rpc(server: Any) -> Iterator[loraplex.Client]:
    with loraplex.Client(server.grpc_target) as c:
        yield c


def adapter_of(model: str) -> Optional[str]:
    return None if model == BASE else model


def post(url: str, body: bytes, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    """A raw POST (for bodies the openai client would never send); (status, parsed JSON or
    text)."""
    # JSON unless the caller says otherwise (urllib would send a form's Content-Type).
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def assert_openai_error(body: Any, code: Optional[str] = None) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"], err
    if code is not None:
        assert err["code"] == code, err


def test_models_lists_the_base_and_every_adapter(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert ids[0] == BASE
    assert sorted(ids[1:]) == ["all", "qv"]
    assert oai.models.retrieve("qv").id == "qv"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


@pytest.mark.parametrize("model", [BASE, "qv", "all"])
def test_completion_equals_grpc(oai: openai.OpenAI, rpc: loraplex.Client, model: str) -> None:
    want = rpc.complete(PROMPT, adapter=adapter_of(model), max_tokens=24, temperature=0.0)
    got = oai.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    choice = got.choices[0]
    assert choice.text == want.text
    assert choice.model_extra["token_ids"] == want.token_ids
    assert choice.finish_reason == "length"
    assert got.model == model
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    assert got.usage.completion_tokens == want.usage.completion_tokens == 24
    assert got.usage.total_tokens == want.usage.prompt_tokens + 24
    served = "loraplex:base" if model == BASE else f"loraplex:{model}@{want.adapter_version}"
    assert got.system_fingerprint == served


def test_adapters_change_the_answer(oai: openai.OpenAI) -> None:
    texts = {
        m: oai.completions.create(model=m, prompt=PROMPT, max_tokens=24, temperature=0)
        .choices[0]
        .text
        for m in (BASE, "qv", "all")
    }
    assert len(set(texts.values())) == 3, texts


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_streamed_completion_equals_grpc(
    oai: openai.OpenAI, rpc: loraplex.Client, model: str
) -> None:
    want = rpc.complete(PROMPT, adapter=adapter_of(model), max_tokens=20, temperature=0.0)
    chunks = list(
        oai.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 2, "one event per engine step, not the whole answer at once"
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in c.choices[0].model_extra["token_ids"]]
    assert text == want.text
    assert ids == want.token_ids
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("model", [BASE, "all"])
def test_chat_equals_grpc_streaming_and_not(
    oai: openai.OpenAI, rpc: loraplex.Client, model: str
) -> None:
    want = rpc.complete(
        messages=MESSAGES,
        adapter=adapter_of(model),
        max_tokens=16,
        temperature=0.0,
    )
    got = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].model_extra["token_ids"] == want.token_ids
    assert got.usage.prompt_tokens == want.usage.prompt_tokens

    chunks = list(
        oai.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_logprobs_equal_grpc(oai: openai.OpenAI, rpc: loraplex.Client) -> None:
    want = rpc.complete(PROMPT, adapter="qv", max_tokens=8, temperature=0.0, logprobs=3)
    got = oai.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    # Equal up to float rounding: the second request's prompt may come from the prefix cache,
    # whose blocks were computed in another grouping of the same sums.
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the best alternative.
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob, abs=1e-4)
    assert "".join(lp.tokens) == got.choices[0].text

    chat = oai.chat.completions.create(
        model="qv", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    want_chat = rpc.complete(
        messages=MESSAGES,
        adapter="qv",
        max_tokens=6,
        temperature=0.0,
        logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [t.logprob for t in want_chat.logprobs], abs=1e-4
    )
    for c, t in zip(content, want_chat.logprobs):
        assert bytes(c.bytes).decode(errors="replace") == c.token
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(
            [a.logprob for a in t.top], abs=1e-4
        )


def test_sampling_with_a_seed_equals_grpc(oai: openai.OpenAI, rpc: loraplex.Client) -> None:
    want = rpc.complete(PROMPT, adapter="qv", max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    got = oai.completions.create(
        model="qv", prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=1234
    )
    assert got.choices[0].model_extra["token_ids"] == want.token_ids


def test_stop_strings_and_token_prompts(oai: openai.OpenAI, rpc: loraplex.Client) -> None:
    full = rpc.complete(PROMPT, max_tokens=24, temperature=0.0)
    words = full.text.split()
    assert len(words) > 3
    stop = " " + words[2]
    want = rpc.complete(PROMPT, max_tokens=24, temperature=0.0, stop=[stop])
    got = oai.completions.create(model=BASE, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert got.choices[0].text == want.text
    assert stop not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"

    ids = rpc.tokenize(PROMPT, add_bos=True).token_ids
    by_ids = oai.completions.create(model=BASE, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == full.text


def test_many_concurrent_streams_equal_their_answers_alone(
    oai: openai.OpenAI, rpc: loraplex.Client
) -> None:
    models = [BASE, "qv", "all"] * 4
    alone = {
        m: rpc.complete(PROMPT, adapter=adapter_of(m), max_tokens=16, temperature=0.0).token_ids
        for m in set(models)
    }
    results: List[Tuple[str, List[int]]] = []
    errors: List[BaseException] = []

    def one(model: str) -> None:
        try:
            stream = oai.completions.create(
                model=model, prompt=PROMPT, max_tokens=16, temperature=0, stream=True
            )
            ids = [i for c in stream if c.choices for i in c.choices[0].model_extra["token_ids"]]
            results.append((model, ids))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == len(models)
    for model, ids in results:
        assert ids == alone[model], model


def test_a_client_that_leaves_mid_stream_cancels_its_request(
    oai: openai.OpenAI, rpc: loraplex.Client
) -> None:
    before = rpc.engine_stats().cancelled_requests
    stream = oai.completions.create(
        model="qv",
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    # The next token's write fails and cancels the engine request within a step.
    deadline = time.monotonic() + 30
    while rpc.engine_stats().cancelled_requests == before:
        assert time.monotonic() < deadline, "the abandoned stream was never cancelled"
        time.sleep(0.05)
    # The server still answers.
    assert oai.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, temperature=0).choices


def test_errors_come_in_openai_shape(server: Any, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=BASE, prompt=PROMPT, max_tokens=100000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(
            model=BASE, messages=[{"role": "tool", "content": "x"}], max_tokens=2
        )
    assert "role" in e.value.message
    # A refusal of a streaming request comes as an HTTP status too, not inside a 200 stream.
    with pytest.raises(openai.NotFoundError):
        list(oai.completions.create(model="nope", prompt=PROMPT, max_tokens=2, stream=True))

    url = f"{server.http_base}/v1/completions"
    status, body = post(url, b"{not json")
    assert status == 400
    assert_openai_error(body, "invalid_argument")
    status, body = post(url, json.dumps([1, 2]).encode())
    assert status == 400
    assert_openai_error(body)
    status, body = post(url, b'{"model": "x", "prompt": "' + b"a" * (9 << 20) + b'"}')
    assert status == 413
    assert_openai_error(body)
    assert "--http-max-body-bytes" in body["error"]["message"]
    # curl -d sends JSON as a form without a Content-Type: cpp-httplib caps forms at 8 KiB.
    status, body = post(
        url,
        json.dumps({"model": BASE, "prompt": "a" * 9000}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 413
    assert "application/json" in body["error"]["message"]
    status, body = post(f"{server.http_base}/v1/nothing", b"{}")
    assert status == 404
    assert_openai_error(body)


def test_health(server: Any) -> None:
    with urllib.request.urlopen(f"{server.http_base}/health", timeout=10) as r:
        assert r.status == 200


def test_tokens_and_adapter_management(auth_server: Any, peft_dir: Any) -> None:
    base = f"{auth_server.http_base}/v1"
    wrong = openai.OpenAI(base_url=base, api_key="not-the-token", max_retries=0)
    api = openai.OpenAI(base_url=base, api_key=auth_server.api_token, max_retries=0)
    admin_headers = {
        "Authorization": f"Bearer {auth_server.admin_token}",
        "Content-Type": "application/json",
    }
    # The openai client always sends a key; without one the answer is a 401.
    status, body = post(
        f"{base}/completions", json.dumps({"model": BASE, "prompt": PROMPT}).encode()
    )
    assert status == 401
    assert_openai_error(body, "unauthenticated")
    with pytest.raises(openai.PermissionDeniedError):
        wrong.completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        wrong.models.list()
    assert api.completions.create(model=BASE, prompt=PROMPT, max_tokens=2).choices

    # vLLM's adapter endpoints, with the admin token (an absolute path inside --adapter-dir).
    load = f"{auth_server.http_base}/v1/load_lora_adapter"
    unload = f"{auth_server.http_base}/v1/unload_lora_adapter"
    body = json.dumps({"lora_name": "r1", "lora_path": str(peft_dir / "rank1")})
    status, text = post(load, body.encode(), {"Authorization": f"Bearer {auth_server.api_token}"})
    assert status == 403, text
    assert_openai_error(text)
    status, text = post(load, body.encode(), admin_headers)
    assert status == 200, text
    assert "r1" in [m.id for m in api.models.list()]
    got = api.completions.create(model="r1", prompt=PROMPT, max_tokens=8, temperature=0)
    assert got.system_fingerprint.startswith("loraplex:r1@")
    status, text = post(load, body.encode(), admin_headers)
    assert status == 409, text
    status, text = post(
        load, json.dumps({"lora_name": "x", "lora_path": "/etc"}).encode(), admin_headers
    )
    assert status == 403, text
    status, text = post(unload, json.dumps({"lora_name": "r1"}).encode(), admin_headers)
    assert status == 200, text
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="r1", prompt=PROMPT, max_tokens=2)
    status, text = post(unload, json.dumps({"lora_name": "r1"}).encode(), admin_headers)
    assert status == 404, text
    assert_openai_error(text)


def test_impatient_http_clients_leave_nothing_behind(
    server: Any, oai: openai.OpenAI, rpc: loraplex.Client
) -> None:
    """Clients that hang up at every point of an exchange: before finishing their request,
    half-way through a stream, right after asking, or never saying anything. The server keeps
    answering, and every engine request they started ends (none left running or waiting)."""
    import random
    import socket

    host, port = "127.0.0.1", server.http_port
    stream_body = json.dumps(
        {
            "model": "qv",
            "prompt": PROMPT,
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    plain_body = json.dumps({"model": "all", "prompt": PROMPT, "max_tokens": 60}).encode()

    def request(body: bytes, path: str = "/v1/completions") -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def one(kind: int, rng: random.Random) -> None:
        with socket.create_connection((host, port), timeout=30) as s:
            if kind == 0:  # a body that never arrives whole
                s.sendall(request(stream_body)[: rng.randrange(10, 120)])
            elif kind == 1:  # a stream read for a while, then dropped
                s.sendall(request(stream_body))
                got = 0
                want = rng.randrange(1, 3000)
                while got < want:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    got += len(chunk)
            elif kind == 2:  # ask, then hang up at once
                s.sendall(request(plain_body if rng.random() < 0.5 else stream_body))
            elif kind == 3:  # connect and say nothing
                time.sleep(rng.random() * 0.2)
            # Closing without shutdown: an abrupt end for the server's reads and writes.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    errors: List[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(6):
                one(rng.randrange(4), rng)
        except OSError:
            pass  # the server may reset a connection we abandoned: that is the point
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    # Still serving, and the same answers as before.
    want = rpc.complete(PROMPT, adapter="qv", max_tokens=12, temperature=0.0)
    got = oai.completions.create(model="qv", prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].model_extra["token_ids"] == want.token_ids
    deadline = time.monotonic() + 60
    while True:
        stats = rpc.engine_stats()
        if stats.running == 0 and stats.waiting == 0:
            break
        assert time.monotonic() < deadline, f"requests of departed clients still run: {stats}"
        time.sleep(0.1)
