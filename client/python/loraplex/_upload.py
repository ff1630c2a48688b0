"""UploadAdapter's client stream, shared by the sync and async clients.

adapters.proto: a header message (name, replace, pin, max_rank and the sha256 of
adapter_model.safetensors), then the chunks of adapter_config.json and adapter_model.safetensors,
then an end message with the bytes sent of each; then the client half-closes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from .v1 import adapters_pb2

CONFIG_FILE = "adapter_config.json"
MODEL_FILE = "adapter_model.safetensors"
DEFAULT_CHUNK_BYTES = 1 << 20  # well under gRPC's default 4 MiB message limit


@dataclass(frozen=True)
class UploadPlan:
    """A PEFT folder checked and hashed, ready to stream."""

    config: Path
    model: Path
    model_sha256: str


def plan_upload(folder: Union[str, "os.PathLike[str]"]) -> UploadPlan:
    """Checks that `folder` holds both PEFT files and hashes the weights (reads them once).

    Raises FileNotFoundError naming what is missing (nothing is sent then).
    """
    root = Path(folder)
    config, model = root / CONFIG_FILE, root / MODEL_FILE
    for f in (config, model):
        if not f.is_file():
            hint = (
                " (only the safetensors format is uploaded; convert adapter_model.bin first)"
                if f is model and (root / "adapter_model.bin").is_file()
                else ""
            )
            raise FileNotFoundError(f"{f}: not found; a PEFT adapter folder needs it{hint}")
    digest = hashlib.sha256()
    with model.open("rb") as fh:
        for block in iter(lambda: fh.read(DEFAULT_CHUNK_BYTES), b""):
            digest.update(block)
    return UploadPlan(config=config, model=model, model_sha256=digest.hexdigest())


def upload_requests(
    plan: UploadPlan, name: str, *, replace: bool, pin: bool, max_rank: int, chunk_bytes: int
) -> Iterator[adapters_pb2.UploadAdapterRequest]:
    """The messages of one upload, read from disk chunk by chunk as the stream asks for them.

    The end message counts the bytes actually sent, so a file changed after plan_upload hashed it
    fails the server's checks instead of registering something else.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    yield adapters_pb2.UploadAdapterRequest(
        header=adapters_pb2.UploadAdapterHeader(
            name=name, replace=replace, pin=pin, max_rank=max_rank, sha256=plan.model_sha256
        )
    )
    sent = {}
    for path in (plan.config, plan.model):
        sent[path.name] = 0
        with path.open("rb") as fh:
            for data in iter(lambda: fh.read(chunk_bytes), b""):
                sent[path.name] += len(data)
                yield adapters_pb2.UploadAdapterRequest(
                    chunk=adapters_pb2.FileChunk(file_name=path.name, data=data)
                )
    yield adapters_pb2.UploadAdapterRequest(
        end=adapters_pb2.UploadAdapterEnd(
            config_bytes=sent[CONFIG_FILE], model_bytes=sent[MODEL_FILE]
        )
    )
