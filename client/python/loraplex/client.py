"""Client (blocking) and AsyncClient (asyncio, grpc.aio) for loraplex-server.

Both speak ``loraplex.v1.Inference``, ``loraplex.v1.Adapters`` and ``grpc.health.v1.Health``
(proto/loraplex/v1/*.proto, docs/api.md). Every RPC is described once, in ``_ClientBase``, as a
:class:`_Call`: the request, the metadata and how to convert the answer. ``Client`` runs it on a
``grpc`` channel, ``AsyncClient`` awaits it on a ``grpc.aio`` channel; their public methods only
forward their arguments.

Metadata: ``authorization: Bearer <api_token>`` on Inference calls and ``Bearer <admin_token>``
on Adapters calls when the token is given; ``x-loraplex-adapter: <name>`` on every Generate and
Complete that names an adapter (for a mix, its first part), so that a load balancer can route
requests for one adapter to the same server.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Generic,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import _protocol as _p
from ._protocol import AdapterWeights, Messages
from ._upload import DEFAULT_CHUNK_BYTES, UploadPlan, plan_upload, upload_requests
from .types import (
    AdapterInfo,
    AdapterInspection,
    AdapterMode,
    Completion,
    EngineStats,
    GenerateChunk,
    ModelInfo,
    Tokenization,
)
from .v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

__all__ = ["AsyncClient", "AsyncGenerateStream", "Client", "GenerateStream"]

_T = TypeVar("_T")
PathLike = Union[str, "os.PathLike[str]"]
ChannelOptions = Sequence[Tuple[str, Any]]

# Adapter uploads and long generations need more than gRPC's default 4 MiB; the server enforces
# its own limits (--max-adapter-bytes).
_DEFAULT_CHANNEL_OPTIONS: ChannelOptions = (
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
)


@dataclass(frozen=True)
class _Call(Generic[_T]):
    """One call: `service`.`method`(request) with metadata; convert turns the reply (each
    message of a server stream) into _T.

    request is a message, or for a client-streaming method an iterator of messages.
    """

    service: str  # "inference", "adapters" or "health"
    method: str
    request: Any
    metadata: _p.Metadata
    convert: Callable[[Any], _T]


class _ClientBase:
    """Connection settings and the description of every RPC, shared by Client and AsyncClient."""

    def __init__(
        self,
        target: str,
        *,
        api_token: Optional[str],
        admin_token: Optional[str],
        tls: bool,
        root_certificates: Optional[bytes],
        private_key: Optional[bytes],
        certificate_chain: Optional[bytes],
        timeout: Optional[float],
        channel_options: ChannelOptions,
    ) -> None:
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("private_key and certificate_chain go together (mutual TLS)")
        self.target = target
        self.timeout = timeout
        self._api_token = api_token
        self._admin_token = admin_token
        self._credentials: Optional[grpc.ChannelCredentials] = None
        if tls or root_certificates is not None or private_key is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        given = {name for name, _ in channel_options}
        self._channel_options: List[Tuple[str, Any]] = [
            o for o in _DEFAULT_CHANNEL_OPTIONS if o[0] not in given
        ] + list(channel_options)

    # --- Inference ---

    def _generate_call(self, req: inference_pb2.GenerateRequest) -> _Call[GenerateChunk]:
        md = _p.call_metadata(self._api_token, _p.adapter_affinity(req))
        return _Call("inference", "Generate", req, md, _p.chunk)

    def _complete_call(self, req: inference_pb2.GenerateRequest) -> _Call[Completion]:
        md = _p.call_metadata(self._api_token, _p.adapter_affinity(req))
        return _Call("inference", "Complete", req, md, _p.completion)

    def _tokenize_call(self, text: str, add_bos: bool) -> _Call[Tokenization]:
        req = inference_pb2.TokenizeRequest(text=text, add_bos=add_bos)
        return _Call("inference", "Tokenize", req, self._api_md(), _p.tokenization)

    def _detokenize_call(self, token_ids: Sequence[int]) -> _Call[str]:
        req = inference_pb2.DetokenizeRequest(token_ids=list(token_ids))
        return _Call("inference", "Detokenize", req, self._api_md(), lambda r: str(r.text))

    def _model_info_call(self) -> _Call[ModelInfo]:
        req = inference_pb2.GetModelInfoRequest()
        return _Call("inference", "GetModelInfo", req, self._api_md(), _p.model_info)

    def _engine_stats_call(self) -> _Call[EngineStats]:
        req = inference_pb2.GetEngineStatsRequest()
        return _Call("inference", "GetEngineStats", req, self._api_md(), _p.engine_stats)

    # --- Adapters ---

    def _load_adapter_call(
        self, name: str, path: str, replace: bool, pin: bool, max_rank: int
    ) -> _Call[AdapterInfo]:
        req = adapters_pb2.LoadAdapterRequest(
            name=name, path=path, replace=replace, pin=pin, max_rank=max_rank
        )
        return _Call("adapters", "LoadAdapter", req, self._admin_md(), _p.adapter_info)

    def _upload_adapter_call(
        self, plan: UploadPlan, name: str, replace: bool, pin: bool, max_rank: int, chunk_bytes: int
    ) -> _Call[AdapterInfo]:
        requests = upload_requests(
            plan, name, replace=replace, pin=pin, max_rank=max_rank, chunk_bytes=chunk_bytes
        )
        return _Call("adapters", "UploadAdapter", requests, self._admin_md(), _p.adapter_info)

    def _unload_adapter_call(self, name: str) -> _Call[AdapterInfo]:
        req = adapters_pb2.UnloadAdapterRequest(name=name)
        return _Call(
            "adapters", "UnloadAdapter", req, self._admin_md(), lambda r: _p.adapter_info(r.adapter)
        )

    def _get_adapter_call(self, name: str) -> _Call[AdapterInfo]:
        req = adapters_pb2.GetAdapterRequest(name=name)
        return _Call("adapters", "GetAdapter", req, self._admin_md(), _p.adapter_info)

    def _list_adapters_call(self) -> _Call[List[AdapterInfo]]:
        return _Call(
            "adapters",
            "ListAdapters",
            adapters_pb2.ListAdaptersRequest(),
            self._admin_md(),
            lambda r: [_p.adapter_info(a) for a in r.adapters],
        )

    def _set_adapter_mode_call(
        self, name: str, mode: Union[AdapterMode, str]
    ) -> _Call[AdapterInfo]:
        req = adapters_pb2.SetAdapterModeRequest(name=name, mode=_p.adapter_mode(mode))
        return _Call("adapters", "SetAdapterMode", req, self._admin_md(), _p.adapter_info)

    def _inspect_adapter_call(self, name: str, against: Optional[str]) -> _Call[AdapterInspection]:
        req = adapters_pb2.InspectAdapterRequest(name=name, against=against or "")
        return _Call("adapters", "InspectAdapter", req, self._admin_md(), _p.adapter_inspection)

    # --- Health ---

    def _health_call(self, service: str) -> _Call[str]:
        req = health_pb2.HealthCheckRequest(service=service)
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name
        return _Call("health", "Check", req, (), lambda r: str(status_name(r.status)))

    def _api_md(self) -> _p.Metadata:
        return _p.call_metadata(self._api_token)

    def _admin_md(self) -> _p.Metadata:
        return _p.call_metadata(self._admin_token)

    def _stubs(self, channel: Any) -> dict[str, Any]:
        # The generated stubs carry no type hints; calls go through _Call, which is typed.
        return {
            "inference": inference_pb2_grpc.InferenceStub(channel),  # type: ignore[no-untyped-call]
            "adapters": adapters_pb2_grpc.AdaptersStub(channel),  # type: ignore[no-untyped-call]
            "health": health_pb2_grpc.HealthStub(channel),
        }


class GenerateStream(Iterator[GenerateChunk]):
    """The chunks of one ``Client.generate`` call, as the server streams them.

    Iteration ends after the chunk that carries ``finish_reason``; a failed call raises
    :class:`LoraplexError` from ``next``. ``cancel()``, leaving a ``with`` block early or dropping
    the stream cancels the request on the server (its KV memory is freed within one step).
    """

    def __init__(self, call: Any, convert: Callable[[Any], GenerateChunk]) -> None:
        self._call = call
        self._convert = convert

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> GenerateChunk:
        try:
            resp = next(self._call)
        except grpc.RpcError as e:
            raise _p.error_from_rpc(e, "Generate") from e
        return self._convert(resp)

    def cancel(self) -> None:
        """Cancels the call; a no-op once it has finished."""
        self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class AsyncGenerateStream(AsyncIterator[GenerateChunk]):
    """The chunks of one ``AsyncClient.generate`` call, for ``async for``; as
    :class:`GenerateStream` otherwise (``async with`` cancels on exit)."""

    def __init__(self, call: Any, convert: Callable[[Any], GenerateChunk]) -> None:
        self._call = call
        self._convert = convert

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> GenerateChunk:
        try:
            resp = await self._call.read()
        except grpc.RpcError as e:
            raise _p.error_from_rpc(e, "Generate") from e
        if resp is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._convert(resp)

    def cancel(self) -> None:
        """Cancels the call; a no-op once it has finished."""
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class Client(_ClientBase):
    """A blocking client of one loraplex-server. Thread-safe; close it (or use ``with``).

    Args:
        target: ``"host:port"`` (any gRPC target string).
        api_token: sent as ``authorization: Bearer <api_token>`` on Inference calls (the
            server's ``--api-token``).
        admin_token: sent the same way on Adapters calls (``--admin-token``).
        tls: TLS with the system's root certificates (implied by the three below).
        root_certificates: PEM roots to verify the server with.
        private_key, certificate_chain: PEM client key and certificate (mutual TLS).
        timeout: seconds each call may take (a generate: the whole stream); None: no deadline.
        channel_options: extra gRPC channel arguments.

    Every method raises :class:`LoraplexError` (with the gRPC status code) when the call fails.
    """

    def __init__(
        self,
        target: str,
        *,
        api_token: Optional[str] = None,
        admin_token: Optional[str] = None,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        timeout: Optional[float] = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        super().__init__(
            target,
            api_token=api_token,
            admin_token=admin_token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            timeout=timeout,
            channel_options=channel_options,
        )
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._channel_options)
        else:
            self._channel = grpc.secure_channel(
                target, self._credentials, options=self._channel_options
            )
        self._stub = self._stubs(self._channel)

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: _Call[_T]) -> _T:
        rpc = getattr(self._stub[call.service], call.method)
        with _p.translated_errors(call.method):
            reply = rpc(call.request, metadata=call.metadata, timeout=self.timeout)
        return call.convert(reply)

    # --- Inference ---

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        messages: Optional[Messages] = None,
        adapter: Optional[str] = None,
        adapters: Optional[AdapterWeights] = None,
        max_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Union[str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
    ) -> GenerateStream:
        """Starts a generation and returns its chunks as they are generated.

        Give exactly one prompt form (the server answers INVALID_ARGUMENT otherwise):

        Args:
            prompt: text, tokenized by the server (BOS prepended where the model adds one;
                "" means BOS alone).
            prompt_token_ids: token ids, used as given.
            messages: a conversation, ``ChatMessage`` or ``{"role": ..., "content": ...}``
                items, formatted with the model's chat template.
            adapter: an adapter's ``"name"`` or ``"name@version"``; None: the base model.
            adapters: instead of ``adapter``, a weighted mix: ``[("a", 0.7), ("b", -0.4)]``
                (1 to 8 distinct names; a bare name or a weight of None means weight 1).
            max_tokens: tokens to generate; None: up to the context length, at most 256.
            temperature: 0 is greedy.
            top_k: 0 is off.
            top_p: in (0, 1]; None is off.
            seed: the same seed gives the same sample.
            stop: stop strings (at most 16); the matched text is not returned.
            stop_token_ids: token ids that end the generation (at most 16).
            ignore_eos: keep generating past the end-of-sequence token.
            logprobs: alternatives per generated token to report (0 to 20).

        Returns:
            A :class:`GenerateStream` of :class:`GenerateChunk`; the last chunk carries
            ``finish_reason``, ``usage``, ``adapter`` and ``adapter_version``. Errors surface
            as :class:`LoraplexError` while iterating.
        """
        req = _p.generate_request(
            prompt,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            adapter=adapter,
            adapters=adapters,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        call = self._generate_call(req)
        rpc = self._stub[call.service].Generate
        return GenerateStream(
            rpc(call.request, metadata=call.metadata, timeout=self.timeout), call.convert
        )

    def complete(
        self,
        prompt: Optional[str] = None,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        messages: Optional[Messages] = None,
        adapter: Optional[str] = None,
        adapters: Optional[AdapterWeights] = None,
        max_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Union[str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
    ) -> Completion:
        """Generates and returns the whole :class:`Completion` at once; the arguments are
        :meth:`generate`'s."""
        req = _p.generate_request(
            prompt,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            adapter=adapter,
            adapters=adapters,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        return self._run(self._complete_call(req))

    def tokenize(self, text: str, add_bos: bool = False) -> Tokenization:
        """The model tokenizer's ids and pieces of `text` (BOS first when add_bos)."""
        return self._run(self._tokenize_call(text, add_bos))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`."""
        return self._run(self._detokenize_call(token_ids))

    def model_info(self) -> ModelInfo:
        """The served model: architecture, sizes, vocabulary, dtype, device, limits."""
        return self._run(self._model_info_call())

    def engine_stats(self) -> EngineStats:
        """Live engine counters: running and waiting requests, KV blocks, tokens, preemptions."""
        return self._run(self._engine_stats_call())

    # --- Adapters (the admin token) ---

    def load_adapter(
        self, name: str, path: str, replace: bool = False, pin: bool = False, max_rank: int = 0
    ) -> AdapterInfo:
        """Registers the PEFT folder `path` (relative to the server's --adapter-dir) as `name`.

        replace: make a new version of an existing name (else ALREADY_EXISTS); pin: never evict
        it; max_rank > 0: serve it compressed to that rank (truncated SVD).
        """
        return self._run(self._load_adapter_call(name, path, replace, pin, max_rank))

    def upload_adapter(
        self,
        name: str,
        folder: PathLike,
        replace: bool = False,
        pin: bool = False,
        max_rank: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> AdapterInfo:
        """Uploads the local PEFT folder `folder` (adapter_config.json and
        adapter_model.safetensors) as `name`, with the weights' sha256 for the server to check;
        the flags are :meth:`load_adapter`'s. Raises FileNotFoundError, before sending anything,
        when a file is missing."""
        plan = plan_upload(folder)
        return self._run(self._upload_adapter_call(plan, name, replace, pin, max_rank, chunk_bytes))

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Removes `name` (requests in flight finish first); returns what was removed."""
        return self._run(self._unload_adapter_call(name))

    def get_adapter(self, name: str) -> AdapterInfo:
        """The adapter `name` or `name@version`; NOT_FOUND when there is none."""
        return self._run(self._get_adapter_call(name))

    def list_adapters(self) -> List[AdapterInfo]:
        """Every registered adapter."""
        return self._run(self._list_adapters_call())

    def set_adapter_mode(self, name: str, mode: Union[AdapterMode, str]) -> AdapterInfo:
        """Merges `name` into the base weights (``"merged"``) or unmerges it (``"unmerged"``)."""
        return self._run(self._set_adapter_mode_call(name, mode))

    def inspect_adapter(self, name: str, against: Optional[str] = None) -> AdapterInspection:
        """Per module, what the adapter's update does (singular values, norms, effective rank),
        and with `against` the subspace similarity to another adapter."""
        return self._run(self._inspect_adapter_call(name, against))

    # --- Health ---

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of `service` ("" for the server): e.g. "SERVING"."""
        return self._run(self._health_call(service))


class AsyncClient(_ClientBase):
    """The asyncio twin of :class:`Client` on ``grpc.aio``: the same constructor and methods,
    awaited (``generate`` returns an :class:`AsyncGenerateStream` for ``async for``). Create,
    use and close it (``await client.close()`` or ``async with``) in one event loop."""

    def __init__(
        self,
        target: str,
        *,
        api_token: Optional[str] = None,
        admin_token: Optional[str] = None,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        timeout: Optional[float] = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        super().__init__(
            target,
            api_token=api_token,
            admin_token=admin_token,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            timeout=timeout,
            channel_options=channel_options,
        )
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._channel_options)
        else:
            self._channel = grpc.aio.secure_channel(
                target, self._credentials, options=self._channel_options
            )
        self._stub = self._stubs(self._channel)

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, call: _Call[_T]) -> _T:
        rpc = getattr(self._stub[call.service], call.method)
        with _p.translated_errors(call.method):
            reply = await rpc(call.request, metadata=call.metadata, timeout=self.timeout)
        return call.convert(reply)

    # --- Inference ---

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        messages: Optional[Messages] = None,
        adapter: Optional[str] = None,
        adapters: Optional[AdapterWeights] = None,
        max_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Union[str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
    ) -> AsyncGenerateStream:
        """:meth:`Client.generate` for ``async for chunk in client.generate(...)`` (not
        awaited itself)."""
        req = _p.generate_request(
            prompt,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            adapter=adapter,
            adapters=adapters,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        call = self._generate_call(req)
        rpc = self._stub[call.service].Generate
        return AsyncGenerateStream(
            rpc(call.request, metadata=call.metadata, timeout=self.timeout), call.convert
        )

    async def complete(
        self,
        prompt: Optional[str] = None,
        *,
        prompt_token_ids: Optional[Sequence[int]] = None,
        messages: Optional[Messages] = None,
        adapter: Optional[str] = None,
        adapters: Optional[AdapterWeights] = None,
        max_tokens: Optional[int] = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: Optional[float] = None,
        seed: int = 0,
        stop: Union[str, Sequence[str]] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
    ) -> Completion:
        """:meth:`Client.complete`."""
        req = _p.generate_request(
            prompt,
            prompt_token_ids=prompt_token_ids,
            messages=messages,
            adapter=adapter,
            adapters=adapters,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        return await self._run(self._complete_call(req))

    async def tokenize(self, text: str, add_bos: bool = False) -> Tokenization:
        """:meth:`Client.tokenize`."""
        return await self._run(self._tokenize_call(text, add_bos))

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """:meth:`Client.detokenize`."""
        return await self._run(self._detokenize_call(token_ids))

    async def model_info(self) -> ModelInfo:
        """:meth:`Client.model_info`."""
        return await self._run(self._model_info_call())

    async def engine_stats(self) -> EngineStats:
        """:meth:`Client.engine_stats`."""
        return await self._run(self._engine_stats_call())

    # --- Adapters (the admin token) ---

    async def load_adapter(
        self, name: str, path: str, replace: bool = False, pin: bool = False, max_rank: int = 0
    ) -> AdapterInfo:
        """:meth:`Client.load_adapter`."""
        return await self._run(self._load_adapter_call(name, path, replace, pin, max_rank))

    async def upload_adapter(
        self,
        name: str,
        folder: PathLike,
        replace: bool = False,
        pin: bool = False,
        max_rank: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> AdapterInfo:
        """:meth:`Client.upload_adapter` (the weights are hashed on a worker thread)."""
        plan = await asyncio.to_thread(plan_upload, folder)
        return await self._run(
            self._upload_adapter_call(plan, name, replace, pin, max_rank, chunk_bytes)
        )

    async def unload_adapter(self, name: str) -> AdapterInfo:
        """:meth:`Client.unload_adapter`."""
        return await self._run(self._unload_adapter_call(name))

    async def get_adapter(self, name: str) -> AdapterInfo:
        """:meth:`Client.get_adapter`."""
        return await self._run(self._get_adapter_call(name))

    async def list_adapters(self) -> List[AdapterInfo]:
        """:meth:`Client.list_adapters`."""
        return await self._run(self._list_adapters_call())

    async def set_adapter_mode(self, name: str, mode: Union[AdapterMode, str]) -> AdapterInfo:
        """:meth:`Client.set_adapter_mode`."""
        return await self._run(self._set_adapter_mode_call(name, mode))

    async def inspect_adapter(self, name: str, against: Optional[str] = None) -> AdapterInspection:
        """:meth:`Client.inspect_adapter`."""
        return await self._run(self._inspect_adapter_call(name, against))

    # --- Health ---

    async def health(self, service: str = "") -> str:
        """:meth:`Client.health`."""
        return await self._run(self._health_call(service))
