"""The values the loraplex client returns, and its error type.

Plain frozen dataclasses mirroring the messages of ``proto/loraplex/v1/*.proto`` (field names as
there), so code using the client does not handle protobuf messages. Enum fields are Python enums
whose values are the proto enum names (``AdapterState.READY == "READY"``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import grpc

__all__ = [
    "AdapterInfo",
    "AdapterInspection",
    "AdapterMode",
    "AdapterState",
    "ChatMessage",
    "Completion",
    "Compression",
    "EngineStats",
    "GenerateChunk",
    "Logprob",
    "LoraplexError",
    "ModelInfo",
    "ModuleCompression",
    "ModuleInspection",
    "Residency",
    "Tokenization",
    "TokenLogprobs",
    "Usage",
]


class LoraplexError(Exception):
    """A call the server (or the channel) failed.

    Attributes:
        code: the gRPC status code, e.g. ``grpc.StatusCode.NOT_FOUND`` for an unknown adapter
            (the codes and when the server returns them: docs/api.md, "Errors").
        details: the server's message.
        method: the RPC, e.g. ``"Complete"``.
    """

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{code.name}: {details}")


class AdapterState(str, enum.Enum):
    """Where an adapter version is in its lifecycle."""

    UNSPECIFIED = "ADAPTER_STATE_UNSPECIFIED"
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"


class AdapterMode(str, enum.Enum):
    """How an adapter is served: merged into the base weights, or applied beside them."""

    UNSPECIFIED = "ADAPTER_MODE_UNSPECIFIED"
    UNMERGED = "UNMERGED"
    MERGED = "MERGED"


class Residency(str, enum.Enum):
    """Where an adapter's weights are: on the device, in host memory, or evicted to disk."""

    UNSPECIFIED = "RESIDENCY_UNSPECIFIED"
    DEVICE = "DEVICE"
    HOST = "HOST"
    DISK = "DISK"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation (``role``: "system", "user" or "assistant")."""

    role: str
    content: str


@dataclass(frozen=True)
class Logprob:
    """One alternative token with its log-probability."""

    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token, its log-probability (log-softmax of the raw logits) and the top
    alternatives, best first (as many as the request's ``logprobs``)."""

    token_id: int
    logprob: float
    top: List[Logprob]


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """One message of a streamed generation: the tokens and text since the previous one.

    ``finish_reason`` ("stop", "length", "eos" or "cancelled"), ``usage``, ``adapter`` (the
    adapter that served the request: its name, a mix as ``"a@1*0.7+b@3*-0.4"``, or "" for the
    base model) and ``adapter_version`` (0 for the base model and for mixes) are set on the last
    chunk only, and None on the others.
    """

    token_ids: List[int]
    text: str
    logprobs: List[TokenLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    adapter: Optional[str] = None
    adapter_version: Optional[int] = None

    @property
    def is_last(self) -> bool:
        """Whether this is the final chunk (it carries finish_reason and usage)."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole generation: what ``complete`` returns (see :class:`GenerateChunk` for fields)."""

    token_ids: List[int]
    text: str
    logprobs: List[TokenLogprobs]
    finish_reason: str
    usage: Usage
    adapter: str
    adapter_version: int


@dataclass(frozen=True)
class Tokenization:
    """Token ids of a text and each token's piece (as the tokenizer spells it)."""

    token_ids: List[int]
    pieces: List[str]


@dataclass(frozen=True)
class ModelInfo:
    """The served base model and the server's limits (``GetModelInfo``)."""

    architecture: str
    model_path: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    dtype: str
    device: str
    max_lora_rank: int
    max_adapters: int
    bos_token_id: int
    eos_token_id: int
    kv_blocks_total: int
    kv_block_size: int
    max_batch_tokens: int
    max_queue: int
    weight_bytes: int
    weight_formats: str
    weight_mapped_bytes: int
    kv_dtype: str
    prefix_cache: bool
    cpu_kernels: str  # "amx", "avx512", "avx2" or "scalar" on the CPU device; "" on CUDA
    quant_kernels: str  # "amx", "avx512vnni", "avx2" or "scalar" on the CPU device; "" on CUDA
    batch_invariant: bool  # --batch-invariant: outputs independent of what shares a step


@dataclass(frozen=True)
class EngineStats:
    """Live engine counters (``GetEngineStats``); see inference.proto for each field."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    steps: int
    generated_tokens: int
    tokens_per_second: float
    finished_requests: int
    cancelled_requests: int
    preemptions: int
    prefix_cache_blocks: int
    prefix_cache_lookup_tokens: int
    prefix_cache_hit_tokens: int


@dataclass(frozen=True)
class ModuleCompression:
    """What rank compression did to one module."""

    module: str
    trained_rank: int
    rank: int
    relative_error: float


@dataclass(frozen=True)
class Compression:
    """Rank compression at registration (``max_rank`` > 0 on load or upload)."""

    max_rank: int
    trained_rank: int
    relative_error: float
    modules: List[ModuleCompression]


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter version (``GetAdapter``, ``ListAdapters`` and the admin calls)."""

    name: str
    version: int
    state: AdapterState
    rank: int
    ranks: Dict[str, int]
    alpha: float
    target_modules: List[str]
    bytes: int
    residency: Residency
    merged: bool
    requests_served: int
    last_used_unix_ms: int
    sha256: str
    pinned: bool
    path: str
    compression: Optional[Compression]
    dora: bool
    auto_merged: bool


@dataclass(frozen=True)
class ModuleInspection:
    """What an adapter's update dW = s*B*A does to one module (adapters.proto, InspectAdapter)."""

    module: str
    rank: int
    singular_values: List[float]
    fro_norm: float
    relative_norm: float
    effective_rank: int
    amplification: float
    similarity: Optional[float]


@dataclass(frozen=True)
class AdapterInspection:
    """``InspectAdapter``'s answer: per module of the adapter, optionally against another."""

    name: str
    version: int
    against: str
    against_version: int
    modules: List[ModuleInspection]
