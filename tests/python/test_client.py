"""The loraplex Python client (client/python) against a real loraplex-server (conftest.py).

References no one here wrote: the golden greedy story of stories260K (golden-greedy.json) and
PEFT's greedy continuations in tests/fixtures/peft/stories260k/*/logits.json (for qv, all_linear,
rank1 and the qv_all mix). Other checks compare one path with another: streamed with unary,
async with sync, concurrent with sequential.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import loraplex
import pytest
from loraplex import (
    ADAPTER_HEADER,
    AdapterState,
    AsyncClient,
    ChatMessage,
    Client,
    Completion,
    GenerateChunk,
    LoraplexError,
)
from loraplex.v1 import inference_pb2

BOS = 1
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[Client]:
    with Client(server.grpc_target, timeout=TIMEOUT_S) as c:
        yield c


def peft_greedy(peft_dir: Path, fixture: str) -> Tuple[List[int], List[int]]:
    """The "story" prompt of a PEFT fixture and PEFT's 40-token greedy continuation of it."""
    data = json.loads((peft_dir / fixture / "logits.json").read_text())
    story = next(p for p in data["prompts"] if p["name"] == "story")
    return story["token_ids"], story["greedy"]["token_ids"]


def joined(chunks: Sequence[GenerateChunk]) -> Tuple[List[int], str]:
    ids: List[int] = []
    for c in chunks:
        ids.extend(c.token_ids)
    return ids, "".join(c.text for c in chunks)


def check_stream_shape(chunks: Sequence[GenerateChunk]) -> GenerateChunk:
    """Only the last chunk carries the summary; returns it."""
    assert chunks, "Generate sent nothing"
    *body, last = chunks
    assert last.is_last and last.usage is not None
    for c in body:
        assert not c.is_last and c.usage is None and c.adapter is None, c
    return last


def expect_error(code: grpc.StatusCode, fn: Any, *args: Any, **kwargs: Any) -> LoraplexError:
    with pytest.raises(LoraplexError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# --- the package ---------------------------------------------------------------------------


def test_package_carries_generated_stubs_and_type_markers() -> None:
    v1 = Path(loraplex.v1.__file__).parent
    for name in ("inference", "adapters"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (v1 / f"{name}{suffix}").is_file(), f"{name}{suffix} was not generated"
    assert (Path(loraplex.__file__).parent / "py.typed").is_file()


# --- Inference -----------------------------------------------------------------------------


def test_greedy_complete_gives_the_golden_story(client: Client, golden: Dict[str, Any]) -> None:
    want = golden["greedy_ids_after_bos"]
    r = client.complete(prompt_token_ids=[BOS], max_tokens=len(want), ignore_eos=True)
    assert r.token_ids == want, "golden: ../shared/models/stories260K/golden-greedy.json"
    assert r.text == golden["text"]
    assert r.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1, len(want))
    assert (r.adapter, r.adapter_version) == ("", 0)
    assert r.logprobs == []
    # "" is BOS alone on this model: the text prompt path gives the same story.
    assert client.complete("", max_tokens=len(want), ignore_eos=True).text == golden["text"]


@pytest.mark.parametrize("adapter", [None, "qv", "all"])
def test_streamed_chunks_join_to_the_completion(client: Client, adapter: Optional[str]) -> None:
    kw: Dict[str, Any] = dict(prompt_token_ids=[BOS], max_tokens=48, ignore_eos=True)
    chunks = list(client.generate(adapter=adapter, **kw))
    whole = client.complete(adapter=adapter, **kw)
    assert len(chunks) > 1, "Generate should stream"
    last = check_stream_shape(chunks)
    assert joined(chunks) == (whole.token_ids, whole.text)
    assert len(whole.token_ids) == 48
    assert (last.finish_reason, last.usage) == (whole.finish_reason, whole.usage)
    assert (last.adapter, last.adapter_version) == (whole.adapter, whole.adapter_version)
    assert (whole.adapter, whole.adapter_version) == ((adapter, 1) if adapter else ("", 0))


@pytest.mark.parametrize("adapter,fixture", [("qv", "qv"), ("all", "all_linear")])
def test_adapters_give_pefts_greedy_continuations(
    client: Client, peft_dir: Path, adapter: str, fixture: str
) -> None:
    prompt, want = peft_greedy(peft_dir, fixture)
    r = client.complete(prompt_token_ids=prompt, adapter=adapter, max_tokens=40, ignore_eos=True)
    assert r.token_ids == want, f"PEFT golden: {fixture}/logits.json"
    base = client.complete(prompt_token_ids=prompt, max_tokens=40, ignore_eos=True)
    assert base.token_ids != r.token_ids, "the adapter changed nothing"
    # name@version names the same adapter.
    at_v1 = client.complete(
        prompt_token_ids=prompt, adapter=f"{adapter}@1", max_tokens=40, ignore_eos=True
    )
    assert (at_v1.token_ids, at_v1.adapter_version) == (want, 1)


def test_weighted_mix(client: Client, peft_dir: Path) -> None:
    prompt, want = peft_greedy(peft_dir, "mixes/qv_all")  # qv * 0.7 + all_linear * -0.4
    kw: Dict[str, Any] = dict(prompt_token_ids=prompt, max_tokens=40, ignore_eos=True)
    mix = [("qv", 0.7), ("all", -0.4)]
    r = client.complete(adapters=mix, **kw)
    assert r.token_ids == want, "PEFT golden: mixes/qv_all/logits.json"
    assert (r.adapter, r.adapter_version) == ("qv@1*0.7+all@1*-0.4", 0)
    chunks = list(client.generate(adapters=mix, **kw))
    assert joined(chunks) == (r.token_ids, r.text)
    assert check_stream_shape(chunks).adapter == r.adapter
    # One part of weight 1 (given, absent or a bare name) is the adapter alone.
    qv = client.complete(adapter="qv", **kw).token_ids
    for one in ([("qv", 1.0)], [("qv", None)], ["qv"]):
        assert client.complete(adapters=one, **kw).token_ids == qv, one


def test_finish_reasons_usage_and_stops(client: Client, golden: Dict[str, Any]) -> None:
    story: List[int] = golden["greedy_ids_after_bos"]
    r = client.complete(prompt_token_ids=[BOS], max_tokens=5)
    assert (r.finish_reason, r.usage.completion_tokens, r.token_ids) == ("length", 5, story[:5])
    # A stop string ends the generation before it; its text is not returned.
    r = client.complete(prompt_token_ids=[BOS], max_tokens=60, stop=" Lily")
    assert r.finish_reason == "stop"
    assert r.text == golden["text"].split(" Lily")[0]
    # A stop token id ends it at that token (which the server returns).
    r = client.complete(prompt_token_ids=[BOS], max_tokens=60, stop_token_ids=[story[5]])
    assert (r.finish_reason, r.token_ids) == ("stop", story[:6])
    assert r.usage == loraplex.Usage(prompt_tokens=1, completion_tokens=6)
    # The prompt counts its tokens.
    r = client.complete(prompt_token_ids=[BOS] + story[:9], max_tokens=3)
    assert (r.usage.prompt_tokens, r.token_ids) == (10, story[9:12])


def test_logprobs(client: Client) -> None:
    r = client.complete(prompt_token_ids=[BOS], max_tokens=8, logprobs=3)
    assert len(r.logprobs) == len(r.token_ids) == 8
    for token, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == token
        assert len(lp.top) == 3
        tops = [t.logprob for t in lp.top]
        assert tops == sorted(tops, reverse=True)
        assert all(t <= 0 for t in tops) and sum(math.exp(t) for t in tops) <= 1 + 1e-5
        # Greedy: the chosen token is the best alternative.
        assert (lp.top[0].token_id, lp.top[0].logprob) == (token, lp.logprob)
    chunks = list(client.generate(prompt_token_ids=[BOS], max_tokens=8, logprobs=3))
    for c in chunks:
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
    assert [lp for c in chunks for lp in c.logprobs] == r.logprobs


def test_sampling_follows_the_seed(client: Client) -> None:
    kw: Dict[str, Any] = dict(
        prompt_token_ids=[BOS], max_tokens=24, temperature=1.0, top_k=40, top_p=0.95
    )
    same = [client.complete(seed=7, **kw).token_ids for _ in range(2)]
    assert same[0] == same[1]
    assert len({tuple(client.complete(seed=s, **kw).token_ids) for s in range(1, 6)}) > 1


def test_chat_messages(client: Client) -> None:
    # stories260K's GGUF has no chat template: the server renders ChatML (no default system).
    chatml = (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    want = client.complete(chatml, max_tokens=8, ignore_eos=True)
    for messages in (
        [ChatMessage("system", "Be kind."), ChatMessage("user", "Hi")],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
    ):
        r = client.complete(messages=messages, max_tokens=8, ignore_eos=True)
        assert (r.token_ids, r.usage) == (want.token_ids, want.usage)
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        client.complete,
        messages=[{"role": "robot", "content": "x"}],
        max_tokens=2,
    )


def test_tokenize_detokenize_round_trip(client: Client, golden: Dict[str, Any]) -> None:
    text = golden["text"].lstrip()  # the story's text begins with the first piece's space
    t = client.tokenize(text)
    assert t.token_ids == golden["greedy_ids_after_bos"]
    assert t.pieces == golden["pieces"]
    assert client.tokenize(text, add_bos=True).token_ids == [BOS] + t.token_ids
    assert client.detokenize(t.token_ids) == golden["text"]
    assert client.tokenize("").token_ids == []


def test_model_info(client: Client) -> None:
    m = client.model_info()
    assert (m.architecture, m.vocab_size, m.bos_token_id, m.eos_token_id) == ("llama", 512, 1, 2)
    assert (m.hidden_size, m.intermediate_size, m.num_layers) == (64, 172, 5)
    assert (m.num_heads, m.num_kv_heads, m.head_dim) == (8, 4, 8)
    assert m.model_path.endswith("stories260K.gguf")
    assert m.dtype == "f32" and m.device in ("cpu", "cuda")
    assert m.max_lora_rank == 64 and m.kv_block_size == 16 and m.kv_blocks_total > 0
    assert m.prefix_cache is True
    assert m.batch_invariant is False
    if m.device == "cpu":
        assert m.cpu_kernels in ("amx", "avx512", "avx2", "scalar")
        assert m.quant_kernels in ("amx", "avx512vnni", "avx2", "scalar")
    else:
        assert (m.cpu_kernels, m.quant_kernels) == ("", "")


def test_engine_stats_count_requests(client: Client) -> None:
    before = client.engine_stats()
    client.complete(prompt_token_ids=[BOS], max_tokens=10, ignore_eos=True)

    # The engine counts a request's tokens and its end before the answer goes out.
    after = client.engine_stats()
    assert after.generated_tokens >= before.generated_tokens + 10, (before, after)
    assert after.finished_requests >= before.finished_requests + 1, (before, after)
    assert after.kv_blocks_total == client.model_info().kv_blocks_total


def wait_for_idle(client: Client, cancelled_at_least: int) -> loraplex.EngineStats:
    deadline = time.monotonic() + 10
    while True:
        s = client.engine_stats()
        done = s.running == 0 and s.kv_blocks_used == 0
        if (done and s.cancelled_requests >= cancelled_at_least) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def test_cancelling_a_stream_cancels_the_request(client: Client) -> None:
    before = client.engine_stats().cancelled_requests
    # 2000 tokens take the engine far longer than reading one chunk and cancelling.
    with client.generate(prompt_token_ids=[BOS], max_tokens=2000, ignore_eos=True) as stream:
        first = next(stream)
        assert first.token_ids and not first.is_last
    # A chunk already received may still come out; then the cancel shows.
    err = expect_error(grpc.StatusCode.CANCELLED, list, stream)
    assert err.method == "Generate"
    s = wait_for_idle(client, before + 1)
    assert s.cancelled_requests >= before + 1 and s.running == 0 and s.kv_blocks_used == 0


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    expect_error(grpc.StatusCode.NOT_FOUND, client.health, "no.such.Service")


def test_bad_requests_raise_loraplex_error(client: Client) -> None:
    e = expect_error(grpc.StatusCode.NOT_FOUND, client.complete, "", adapter="no-such-adapter")
    assert e.method == "Complete" and "no-such-adapter" in e.details
    assert "NOT_FOUND" in str(e)
    stream = client.generate("", adapter="no-such-adapter")
    expect_error(grpc.StatusCode.NOT_FOUND, list, stream)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    expect_error(bad, client.complete)  # no prompt
    expect_error(bad, client.complete, "", prompt_token_ids=[BOS])  # two prompts
    expect_error(bad, client.complete, "", temperature=-1.0)
    expect_error(bad, client.complete, "", adapter="qv", adapters=[("all", 1.0)])
    expect_error(bad, client.complete, "", adapters=["qv", "qv"])
    expect_error(bad, client.complete, prompt_token_ids=[100000])
    expect_error(grpc.StatusCode.NOT_FOUND, client.complete, "", adapters=[("qv", 1), ("nope", 1)])


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as c:
        expect_error(grpc.StatusCode.UNAVAILABLE, c.model_info)


# --- Adapters ------------------------------------------------------------------------------


def test_upload_generate_get_list_unload(client: Client, peft_dir: Path) -> None:
    name = "py-rank1"
    folder = peft_dir / "rank1"
    prompt, want = peft_greedy(peft_dir, "rank1")
    # Small chunks: the weights go in many messages.
    info = client.upload_adapter(name, folder, chunk_bytes=1000)
    assert (folder / "adapter_model.safetensors").stat().st_size > 5000
    sha = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (info.name, info.version, info.rank, info.sha256) == (name, 1, 1, sha)
    assert info.state == AdapterState.READY and not info.merged and info.compression is None
    assert set(info.target_modules) == set(info.ranks) and info.bytes > 0

    r = client.complete(prompt_token_ids=prompt, adapter=name, max_tokens=40, ignore_eos=True)
    assert r.token_ids == want, "PEFT golden: rank1/logits.json"
    assert (r.adapter, r.adapter_version) == (name, 1)
    assert (
        joined(
            list(
                client.generate(
                    prompt_token_ids=prompt, adapter=name, max_tokens=40, ignore_eos=True
                )
            )
        )[0]
        == want
    )

    got = client.get_adapter(name)
    assert (got.name, got.version, got.sha256) == (name, 1, sha)
    assert got.requests_served >= 2
    assert client.get_adapter(f"{name}@1").version == 1
    listed = {a.name: a for a in client.list_adapters()}
    assert {"qv", "all", name} <= set(listed)
    assert listed[name].sha256 == sha

    expect_error(grpc.StatusCode.ALREADY_EXISTS, client.upload_adapter, name, folder)
    assert client.upload_adapter(name, folder, replace=True).version == 2
    assert client.get_adapter(name).version == 2

    gone = client.unload_adapter(name)
    assert gone.name == name
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        client.complete,
        prompt_token_ids=prompt,
        adapter=name,
        max_tokens=4,
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        list,
        client.generate(prompt_token_ids=prompt, adapter=name, max_tokens=4),
    )
    expect_error(grpc.StatusCode.NOT_FOUND, client.get_adapter, name)
    assert name not in {a.name for a in client.list_adapters()}


def test_upload_with_max_rank_compresses(client: Client, peft_dir: Path) -> None:
    info = client.upload_adapter("py-qv-r2", peft_dir / "qv", max_rank=2)
    try:
        assert info.rank == 2 and info.compression is not None
        c = info.compression
        assert (c.max_rank, c.trained_rank) == (2, 8)
        assert 0 < c.relative_error < 1 and c.modules
        assert all(m.rank == 2 and m.trained_rank == 8 for m in c.modules)
    finally:
        client.unload_adapter("py-qv-r2")


def test_upload_of_an_incomplete_folder_sends_nothing(client: Client, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.upload_adapter("py-incomplete", tmp_path)
    expect_error(grpc.StatusCode.NOT_FOUND, client.get_adapter, "py-incomplete")


def test_merge_and_unmerge(client: Client, golden: Dict[str, Any], peft_dir: Path) -> None:
    prompt, want = peft_greedy(peft_dir, "qv")
    merged = client.set_adapter_mode("qv", "merged")
    try:
        assert merged.merged and client.get_adapter("qv").merged
        r = client.complete(prompt_token_ids=prompt, adapter="qv", max_tokens=40, ignore_eos=True)
        assert r.token_ids == want, "merged qv against PEFT's merge_and_unload"
    finally:
        unmerged = client.set_adapter_mode("qv", loraplex.AdapterMode.UNMERGED)
    assert not unmerged.merged
    # The unmerge restores the base weights exactly.
    story = golden["greedy_ids_after_bos"]
    assert (
        client.complete(prompt_token_ids=[BOS], max_tokens=60, ignore_eos=True).token_ids == story
    )
    with pytest.raises(ValueError):
        client.set_adapter_mode("qv", "sideways")


def test_inspect_adapter(client: Client) -> None:
    ins = client.inspect_adapter("qv", against="all")
    assert (ins.name, ins.version, ins.against, ins.against_version) == ("qv", 1, "all", 1)
    assert {m.module.split(".")[-1] for m in ins.modules} == {"q_proj", "v_proj"}
    for m in ins.modules:
        assert len(m.singular_values) == m.rank == 8
        assert m.singular_values == sorted(m.singular_values, reverse=True)
        assert m.fro_norm == pytest.approx(math.sqrt(sum(s * s for s in m.singular_values)))
        assert m.similarity is not None and 0 <= m.similarity <= 1
    assert all(m.similarity is None for m in client.inspect_adapter("qv").modules)


# --- Tokens --------------------------------------------------------------------------------


def test_api_token_guards_inference(auth_server: Any) -> None:
    target = auth_server.grpc_target
    with Client(target, timeout=TIMEOUT_S) as anon:
        expect_error(grpc.StatusCode.UNAUTHENTICATED, anon.complete, "", max_tokens=2)
        expect_error(grpc.StatusCode.UNAUTHENTICATED, anon.tokenize, "hi")
        expect_error(grpc.StatusCode.UNAUTHENTICATED, list, anon.generate("", max_tokens=2))
        assert anon.health() == "SERVING"
    with Client(target, api_token="wrong", timeout=TIMEOUT_S) as wrong:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, wrong.complete, "", max_tokens=2)
        expect_error(grpc.StatusCode.PERMISSION_DENIED, wrong.model_info)
    # Each service has its own token.
    with Client(target, api_token=auth_server.admin_token, timeout=TIMEOUT_S) as swapped:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, swapped.complete, "", max_tokens=2)
    with Client(target, api_token=auth_server.api_token, timeout=TIMEOUT_S) as ok:
        r = ok.complete(prompt_token_ids=[BOS], max_tokens=3, adapter="qv")
        assert len(r.token_ids) == 3 and r.adapter == "qv"
        assert len(list(ok.generate("", max_tokens=3))) >= 1
        expect_error(grpc.StatusCode.UNAUTHENTICATED, ok.list_adapters)


def test_admin_token_guards_adapters(auth_server: Any, peft_dir: Path) -> None:
    target = auth_server.grpc_target
    with Client(target, admin_token="wrong", timeout=TIMEOUT_S) as wrong:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, wrong.list_adapters)
        expect_error(
            grpc.StatusCode.PERMISSION_DENIED, wrong.upload_adapter, "x", peft_dir / "rank1"
        )
    with Client(target, admin_token=auth_server.api_token, timeout=TIMEOUT_S) as swapped:
        expect_error(grpc.StatusCode.PERMISSION_DENIED, swapped.get_adapter, "qv")
    with Client(
        target,
        api_token=auth_server.api_token,
        admin_token=auth_server.admin_token,
        timeout=TIMEOUT_S,
    ) as admin:
        assert {"qv", "all"} <= {a.name for a in admin.list_adapters()}
        # LoadAdapter: a path under the server's --adapter-dir (tests/fixtures/peft/stories260k).
        info = admin.load_adapter("py-loaded", "rank1", pin=True)
        assert (info.name, info.version, info.rank, info.pinned) == ("py-loaded", 1, 1, True)
        prompt, want = peft_greedy(peft_dir, "rank1")
        r = admin.complete(
            prompt_token_ids=prompt, adapter="py-loaded", max_tokens=40, ignore_eos=True
        )
        assert r.token_ids == want
        expect_error(grpc.StatusCode.PERMISSION_DENIED, admin.load_adapter, "py-out", "../../..")
        assert admin.unload_adapter("py-loaded").name == "py-loaded"


def test_tls_and_mutual_tls(tmp_path: Path, start_extra_server: Callable[..., Any]) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    # A self-signed certificate for 127.0.0.1 (as LifecycleE2eTest.TlsRoundTripWithATestCertificate
    # makes one); it is also the CA the server checks client certificates against.
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    pem, key_pem = cert.read_bytes(), key.read_bytes()
    s = start_extra_server([f"--tls-cert={cert}", f"--tls-key={key}", f"--tls-client-ca={cert}"])
    mtls: Dict[str, Any] = dict(root_certificates=pem, private_key=key_pem, certificate_chain=pem)
    with Client(s.grpc_target, timeout=TIMEOUT_S, **mtls) as c:
        assert c.model_info().vocab_size == 512
        assert len(c.complete(prompt_token_ids=[BOS], max_tokens=3).token_ids) == 3

    async def run() -> int:
        async with AsyncClient(s.grpc_target, timeout=TIMEOUT_S, **mtls) as a:
            return len([c async for c in a.generate(prompt_token_ids=[BOS], max_tokens=3)])

    assert asyncio.run(run()) >= 1
    # Without the client certificate, or without TLS, the server refuses the connection.
    with Client(s.grpc_target, root_certificates=pem, timeout=5) as anonymous:
        expect_error(grpc.StatusCode.UNAVAILABLE, anonymous.model_info)
    with Client(s.grpc_target, timeout=5) as plain:
        expect_error(grpc.StatusCode.UNAVAILABLE, plain.model_info)
    with pytest.raises(ValueError):
        Client(s.grpc_target, private_key=key_pem)


# --- AsyncClient ---------------------------------------------------------------------------


async def collect(stream: loraplex.AsyncGenerateStream) -> List[GenerateChunk]:
    return [c async for c in stream]


def test_async_greedy_and_stream(server: Any, golden: Dict[str, Any]) -> None:
    want = golden["greedy_ids_after_bos"]

    async def run() -> Tuple[Completion, List[GenerateChunk], str, List[int]]:
        async with AsyncClient(server.grpc_target, timeout=TIMEOUT_S) as c:
            whole = await c.complete(prompt_token_ids=[BOS], max_tokens=60, ignore_eos=True)
            chunks = await collect(
                c.generate(prompt_token_ids=[BOS], max_tokens=60, ignore_eos=True)
            )
            return whole, chunks, await c.health(), (await c.tokenize("Once")).token_ids

    whole, chunks, health, once = asyncio.run(run())
    assert whole.token_ids == want and whole.text == golden["text"]
    check_stream_shape(chunks)
    assert joined(chunks) == (want, golden["text"])
    assert health == "SERVING" and once == want[:1]


def test_async_concurrent_generates_equal_their_sequential_answers(
    server: Any, golden: Dict[str, Any]
) -> None:
    story: List[int] = golden["greedy_ids_after_bos"]
    kinds: List[Dict[str, Any]] = [
        {},
        {"adapter": "qv"},
        {"adapter": "all"},
        {"adapters": [("qv", 0.5), ("all", 0.5)]},
    ]
    requests = [
        dict(
            prompt_token_ids=[BOS] + story[: (i * 7) % 40],
            max_tokens=24 + i,
            ignore_eos=True,
            **kinds[i % len(kinds)],
        )
        for i in range(12)
    ]

    async def run() -> Tuple[List[Completion], List[Completion], List[List[GenerateChunk]]]:
        async with AsyncClient(server.grpc_target, timeout=TIMEOUT_S) as c:
            sequential = [await c.complete(**r) for r in requests]
            concurrent = await asyncio.gather(*(c.complete(**r) for r in requests))
            streams = await asyncio.gather(*(collect(c.generate(**r)) for r in requests))
            return sequential, list(concurrent), list(streams)

    sequential, concurrent, streams = asyncio.run(run())
    for req, seq, con, chunks in zip(requests, sequential, concurrent, streams):
        assert len(seq.token_ids) == req["max_tokens"]
        assert (con.token_ids, con.text, con.adapter) == (seq.token_ids, seq.text, seq.adapter), req
        assert joined(chunks) == (seq.token_ids, seq.text), req
    assert len({tuple(s.token_ids) for s in sequential}) > len(kinds)


def test_async_adapters_and_errors(server: Any, peft_dir: Path, golden: Dict[str, Any]) -> None:
    prompt, want = peft_greedy(peft_dir, "rank1")

    async def run() -> None:
        async with AsyncClient(server.grpc_target, timeout=TIMEOUT_S) as c:
            info = await c.upload_adapter("py-async", peft_dir / "rank1")
            assert (info.name, info.version) == ("py-async", 1)
            assert (await c.get_adapter("py-async")).sha256 == info.sha256
            assert "py-async" in {a.name for a in await c.list_adapters()}
            r = await c.complete(
                prompt_token_ids=prompt, adapter="py-async", max_tokens=40, ignore_eos=True
            )
            assert r.token_ids == want
            assert (await c.unload_adapter("py-async")).name == "py-async"
            with pytest.raises(LoraplexError) as e:
                await c.complete(prompt_token_ids=prompt, adapter="py-async", max_tokens=4)
            assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "Complete"
            with pytest.raises(LoraplexError) as e:
                await collect(c.generate(prompt_token_ids=prompt, adapter="py-async", max_tokens=4))
            assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "Generate"
            m = await c.model_info()
            assert m.vocab_size == 512
            assert (await c.engine_stats()).kv_blocks_total == m.kv_blocks_total
            ids = (await c.tokenize(golden["text"].lstrip())).token_ids
            assert ids == golden["greedy_ids_after_bos"]
            assert await c.detokenize(ids) == golden["text"]

    asyncio.run(run())


def test_async_tokens(auth_server: Any) -> None:
    async def run() -> None:
        async with AsyncClient(auth_server.grpc_target, timeout=TIMEOUT_S) as anon:
            with pytest.raises(LoraplexError) as e:
                await anon.complete("", max_tokens=2)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncClient(
            auth_server.grpc_target,
            api_token=auth_server.api_token,
            admin_token="wrong",
            timeout=TIMEOUT_S,
        ) as c:
            assert len((await c.complete("", max_tokens=2)).token_ids) == 2
            with pytest.raises(LoraplexError) as e:
                await c.list_adapters()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(run())


# --- Metadata: a stand-in Inference server records what the client sends --------------------


class RecordingInference:
    """A grpc server answering Generate and Complete with one canned token, recording each call's
    request and metadata."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, inference_pb2.GenerateRequest, Dict[str, str]]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ser = inference_pb2.GenerateResponse.SerializeToString
        de = inference_pb2.GenerateRequest.FromString
        handlers = {
            "Complete": grpc.unary_unary_rpc_method_handler(
                self._complete, request_deserializer=de, response_serializer=ser
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self._generate, request_deserializer=de, response_serializer=ser
            ),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("loraplex.v1.Inference", handlers),)
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _record(self, method: str, req: inference_pb2.GenerateRequest, ctx: Any) -> None:
        self.calls.append((method, req, dict(ctx.invocation_metadata())))

    def _complete(self, req: inference_pb2.GenerateRequest, ctx: Any) -> Any:
        self._record("Complete", req, ctx)
        return inference_pb2.GenerateResponse(token_ids=[7], text="x", finish_reason="length")

    def _generate(self, req: inference_pb2.GenerateRequest, ctx: Any) -> Any:
        self._record("Generate", req, ctx)
        yield inference_pb2.GenerateResponse(token_ids=[7], text="x")
        yield inference_pb2.GenerateResponse(finish_reason="length")

    def stop(self) -> None:
        self._server.stop(None)


@pytest.fixture
def recorder() -> Iterator[RecordingInference]:
    r = RecordingInference()
    yield r
    r.stop()


@pytest.mark.parametrize(
    "kwargs,header",
    [
        ({}, None),
        ({"adapter": "qv"}, "qv"),
        ({"adapter": "qv@3"}, "qv"),
        ({"adapters": [("b.2", 0.5), ("a", -1.0)]}, "b.2"),
        ({"adapters": ["a@2", "b"]}, "a"),
    ],
)
def test_adapter_header_on_every_inference_call(
    recorder: RecordingInference, kwargs: Dict[str, Any], header: Optional[str]
) -> None:
    with Client(recorder.target, api_token="tok", timeout=TIMEOUT_S) as c:
        assert c.complete("p", **kwargs).token_ids == [7]
        assert joined(list(c.generate("p", **kwargs)))[0] == [7]

    async def run() -> None:
        async with AsyncClient(recorder.target, timeout=TIMEOUT_S) as a:
            await a.complete("p", **kwargs)
            await collect(a.generate("p", **kwargs))

    asyncio.run(run())
    assert [m for m, _, _ in recorder.calls] == ["Complete", "Generate"] * 2
    for i, (method, req, md) in enumerate(recorder.calls):
        assert md.get(ADAPTER_HEADER) == header, (method, md)
        assert md.get("authorization") == ("Bearer tok" if i < 2 else None), (method, md)
        # The request names the adapter as given.
        assert req.adapter == kwargs.get("adapter", "")
        parts = [(p, None) if isinstance(p, str) else p for p in kwargs.get("adapters", [])]
        assert [a.name for a in req.adapters] == [name for name, _ in parts]
        for a, (_, weight) in zip(req.adapters, parts):
            assert a.HasField("weight") == (weight is not None)
            if weight is not None:
                assert a.weight == pytest.approx(weight)


def test_request_fields_reach_the_wire(recorder: RecordingInference) -> None:
    with Client(recorder.target) as c:
        c.complete(
            prompt_token_ids=[1, 2, 3],
            max_tokens=9,
            temperature=0.5,
            top_k=4,
            top_p=0.9,
            seed=11,
            stop=["a", "bc"],
            stop_token_ids=[2],
            ignore_eos=True,
            logprobs=2,
        )
        c.complete(messages=[ChatMessage("system", "s"), {"role": "user", "content": "u"}])
    full, chat = recorder.calls[0][1], recorder.calls[1][1]
    assert list(full.prompt_token_ids) == [1, 2, 3] and not full.HasField("prompt")
    assert (full.max_tokens, full.top_k, full.seed, full.logprobs) == (9, 4, 11, 2)
    assert full.temperature == pytest.approx(0.5) and full.top_p == pytest.approx(0.9)
    assert (list(full.stop), list(full.stop_token_ids), full.ignore_eos) == (["a", "bc"], [2], True)
    # Unset optional fields stay absent (the server's defaults apply).
    assert not chat.HasField("max_tokens") and not chat.HasField("top_p")
    assert [(m.role, m.content) for m in chat.messages] == [("system", "s"), ("user", "u")]
