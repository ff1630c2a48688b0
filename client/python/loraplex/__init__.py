"""Python client for loraplex-server, the gRPC multi-LoRA inference server.

>>> from loraplex import Client
>>> with Client("127.0.0.1:50051") as client:
...     print(client.complete("Once upon a time", adapter="qv", max_tokens=20).text)

:class:`Client` blocks, :class:`AsyncClient` runs on asyncio; both raise :class:`LoraplexError`
with the gRPC status code when a call fails. The generated protos are in :mod:`loraplex.v1`.
"""

from ._protocol import ADAPTER_HEADER
from .client import AsyncClient, AsyncGenerateStream, Client, GenerateStream
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

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_HEADER",
    "AdapterInfo",
    "AdapterInspection",
    "AdapterMode",
    "AdapterState",
    "AsyncClient",
    "AsyncGenerateStream",
    "ChatMessage",
    "Client",
    "Completion",
    "Compression",
    "EngineStats",
    "GenerateChunk",
    "GenerateStream",
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
