"""What the sync and async clients share: request building, call metadata, error translation and
the conversion of response messages into :mod:`loraplex.types` values."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import grpc

from .types import (
    AdapterInfo,
    AdapterInspection,
    AdapterMode,
    AdapterState,
    ChatMessage,
    Completion,
    Compression,
    EngineStats,
    GenerateChunk,
    Logprob,
    LoraplexError,
    ModelInfo,
    ModuleCompression,
    ModuleInspection,
    Residency,
    Tokenization,
    TokenLogprobs,
    Usage,
)

try:
    from .v1 import adapters_pb2, inference_pb2
except ImportError as e:  # a source checkout that was never built
    raise ImportError(
        "loraplex.v1 has not been generated: install the package (pip install client/python), "
        "which generates it from proto/loraplex/v1 with grpcio-tools"
    ) from e

# The request header naming the adapter of an inference call, for load balancers that route by
# adapter (affinity): the adapter's name without "@version", for a mix its first part's name.
ADAPTER_HEADER = "x-loraplex-adapter"

Metadata = Tuple[Tuple[str, str], ...]
# A weighted mix: (name, weight) pairs (weight None: 1), or bare names (weight 1).
AdapterWeights = Sequence[Union[str, Tuple[str, Optional[float]]]]
Messages = Sequence[Union[ChatMessage, Mapping[str, str]]]

_T = TypeVar("_T")


# --- requests -------------------------------------------------------------------------------


def generate_request(
    prompt: Optional[str],
    *,
    prompt_token_ids: Optional[Sequence[int]],
    messages: Optional[Messages],
    adapter: Optional[str],
    adapters: Optional[AdapterWeights],
    max_tokens: Optional[int],
    temperature: float,
    top_k: int,
    top_p: Optional[float],
    seed: int,
    stop: Union[str, Sequence[str]],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    logprobs: int,
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest of Client.generate's arguments. The server validates the values (one
    prompt form, ranges, adapter names) and answers INVALID_ARGUMENT; nothing is checked twice."""
    req = inference_pb2.GenerateRequest(
        adapter=adapter or "",
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )
    if prompt is not None:
        req.prompt = prompt
    if prompt_token_ids is not None:
        req.prompt_token_ids.extend(prompt_token_ids)
    for m in messages or ():
        role, content = (
            (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
        )
        req.messages.add(role=role, content=content)
    for part in adapters or ():
        name, weight = (part, None) if isinstance(part, str) else part
        entry = req.adapters.add(name=name)
        if weight is not None:
            entry.weight = weight
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if top_p is not None:
        req.top_p = top_p
    return req


def adapter_mode(mode: Union[AdapterMode, str]) -> str:
    """The proto enum name of "merged" / "unmerged" (any case) or an AdapterMode."""
    name = mode.value if isinstance(mode, AdapterMode) else str(mode).upper()
    if name not in (AdapterMode.MERGED.value, AdapterMode.UNMERGED.value):
        raise ValueError(f"adapter mode must be 'merged' or 'unmerged', got {mode!r}")
    return name


# --- metadata and errors --------------------------------------------------------------------


def adapter_affinity(req: inference_pb2.GenerateRequest) -> Optional[str]:
    """The ADAPTER_HEADER value of a request; None for the base model."""
    spec = req.adapter or (req.adapters[0].name if req.adapters else "")
    # Adapter names cannot hold '@' (the registry allows [A-Za-z0-9._-]), so this drops only a
    # version: every version of an adapter routes alike.
    return spec.split("@", 1)[0] or None


def call_metadata(token: Optional[str], adapter: Optional[str] = None) -> Metadata:
    """The metadata of one call: the bearer token and the adapter header, where given."""
    md: Tuple[Tuple[str, str], ...] = ()
    if token:
        md += (("authorization", f"Bearer {token}"),)
    if adapter:
        md += ((ADAPTER_HEADER, adapter),)
    return md


def error_from_rpc(error: grpc.RpcError, method: str) -> LoraplexError:
    """A LoraplexError carrying the status of a failed call."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return LoraplexError(code or grpc.StatusCode.UNKNOWN, details or str(error), method)


@contextlib.contextmanager
def translated_errors(method: str) -> Iterator[None]:
    """Raises grpc.RpcError from the body as LoraplexError (sync and async bodies alike)."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e, method) from e


# --- responses ------------------------------------------------------------------------------


def _same_named(cls: Type[_T], msg: Any, **converted: Any) -> _T:
    """cls built from msg's fields of the same names, those in `converted` taken from there."""
    values = {
        f.name: converted[f.name] if f.name in converted else getattr(msg, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


def _logprobs(resp: inference_pb2.GenerateResponse) -> List[TokenLogprobs]:
    return [
        TokenLogprobs(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[Logprob(token_id=t.token_id, logprob=t.logprob) for t in lp.top],
        )
        for lp in resp.logprobs
    ]


def _usage(resp: inference_pb2.GenerateResponse) -> Usage:
    return Usage(
        prompt_tokens=resp.usage.prompt_tokens, completion_tokens=resp.usage.completion_tokens
    )


def chunk(resp: inference_pb2.GenerateResponse) -> GenerateChunk:
    """One streamed message; the last (the one with a finish_reason) carries the summary."""
    last = bool(resp.finish_reason)
    return GenerateChunk(
        token_ids=list(resp.token_ids),
        text=resp.text,
        logprobs=_logprobs(resp),
        finish_reason=resp.finish_reason if last else None,
        usage=_usage(resp) if last else None,
        adapter=resp.adapter if last else None,
        adapter_version=resp.adapter_version if last else None,
    )


def completion(resp: inference_pb2.GenerateResponse) -> Completion:
    """Complete's answer."""
    return Completion(
        token_ids=list(resp.token_ids),
        text=resp.text,
        logprobs=_logprobs(resp),
        finish_reason=resp.finish_reason,
        usage=_usage(resp),
        adapter=resp.adapter,
        adapter_version=resp.adapter_version,
    )


def tokenization(resp: inference_pb2.TokenizeResponse) -> Tokenization:
    return Tokenization(token_ids=list(resp.token_ids), pieces=list(resp.pieces))


def model_info(msg: inference_pb2.ModelInfo) -> ModelInfo:
    return _same_named(ModelInfo, msg)


def engine_stats(msg: inference_pb2.EngineStats) -> EngineStats:
    return _same_named(EngineStats, msg)


def adapter_info(msg: adapters_pb2.AdapterInfo) -> AdapterInfo:
    compression = None
    if msg.HasField("compression"):
        c = msg.compression
        compression = _same_named(
            Compression, c, modules=[_same_named(ModuleCompression, m) for m in c.modules]
        )
    return _same_named(
        AdapterInfo,
        msg,
        state=AdapterState(adapters_pb2.AdapterState.Name(msg.state)),
        residency=Residency(adapters_pb2.Residency.Name(msg.residency)),
        ranks=dict(msg.ranks),
        target_modules=list(msg.target_modules),
        compression=compression,
    )


def adapter_inspection(msg: adapters_pb2.InspectAdapterResponse) -> AdapterInspection:
    modules = [
        _same_named(
            ModuleInspection,
            m,
            singular_values=list(m.singular_values),
            similarity=m.similarity if m.HasField("similarity") else None,
        )
        for m in msg.modules
    ]
    return _same_named(AdapterInspection, msg, modules=modules)
