"""Fixtures of the Python tests: real loraplex-server processes on free loopback ports.

The server serves the tests' tiny stories260K model (``$LP_SHARED_DIR/models/stories260K``, the
shared folder beside the repository by default) with the PEFT fixtures ``qv`` and ``all``
registered, as the C++ e2e tests run it (tests/testing/server_process.h).

Environment:
    LP_SERVER_BIN    the loraplex-server binary (required).
    LP_SHARED_DIR    the shared folder (default: <repo>/../shared).

Fixtures: ``server`` (open), ``auth_server`` (--api-token, --admin-token and --adapter-dir set;
tokens in its ``api_token`` / ``admin_token``), ``start_extra_server`` (starts one with more
flags), ``golden`` (the golden greedy story), ``peft_dir`` (tests/fixtures/peft/stories260k).
The servers live for the whole session; each is stopped with SIGTERM at the end, and a server
that exits non-zero fails the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DIR = Path(os.environ.get("LP_SHARED_DIR") or REPO.parent / "shared")
STORIES_DIR = SHARED_DIR / "models" / "stories260K"
MODEL = STORIES_DIR / "stories260K.gguf"
PEFT_DIR = REPO / "tests" / "fixtures" / "peft" / "stories260k"

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
API_TOKEN = "py-api-token"
ADMIN_TOKEN = "py-admin-token"


@dataclass
class ServerProcess:
    """A running loraplex-server: where it listens and its process."""

    process: "subprocess.Popen[bytes]"
    grpc_port: int
    metrics_port: int
    http_port: int
    log_path: Path
    api_token: Optional[str] = None
    admin_token: Optional[str] = None
    args: List[str] = field(default_factory=list)

    @property
    def grpc_target(self) -> str:
        """``"127.0.0.1:PORT"`` for a gRPC channel."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        """``"http://127.0.0.1:PORT"`` of the OpenAI-compatible HTTP listener."""
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        """What the server wrote to stderr and stdout so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _log_tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def client_binary() -> Path:
    """The loraplex CLI beside LP_SERVER_BIN's build (``<build>/client/loraplex``), or
    LP_CLIENT_BIN."""
    value = os.environ.get("LP_CLIENT_BIN")
    binary = Path(value) if value else _server_binary().parent.parent / "client" / "loraplex"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary}: no loraplex CLI there (set LP_CLIENT_BIN)", pytrace=False)
    return binary.resolve()


def _server_binary() -> Path:
    value = os.environ.get("LP_SERVER_BIN")
    if not value:
        pytest.fail(
            "LP_SERVER_BIN is not set: point it at a loraplex-server binary, e.g. "
            "LP_SERVER_BIN=build-release/server/loraplex-server (scripts/test-python.sh sets it)",
            pytrace=False,
        )
    binary = Path(value).resolve()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"LP_SERVER_BIN={value}: not an executable file", pytrace=False)
    if not MODEL.is_file():
        pytest.fail(f"{MODEL}: the stories260K model is missing (LP_SHARED_DIR?)", pytrace=False)
    return binary


def start_server(
    work_dir: Path, extra_args: List[str], *, fixture_adapters: bool = True, **tokens: Any
) -> ServerProcess:
    """Starts loraplex-server on 127.0.0.1:0 with the stories260K model (and qv and all
    registered, unless fixture_adapters is False), and waits (START_TIMEOUT_S at most) until it
    has written its ports to the port file."""
    binary = _server_binary()
    port_file = work_dir / "ports"
    log_path = work_dir / "server.log"
    args = [
        str(binary),
        f"--model={MODEL}",
        # f32 as the golden data was made (the C++ e2e tests do the same).
        "--dtype=f32",
        "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0",
        f"--port-file={port_file}",
        *(
            [f"--adapter=qv={PEFT_DIR / 'qv'},all={PEFT_DIR / 'all_linear'}"]
            if fixture_adapters
            else []
        ),
        "--http-listen=127.0.0.1:0",
        *extra_args,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=work_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    # The server writes the file whole and then renames it, so a file that exists is complete:
    # the gRPC port, the metrics port and the HTTP port, a line each.
    while not port_file.exists():
        if process.poll() is not None:
            pytest.fail(
                f"loraplex-server exited with {process.returncode} before serving:\n"
                f"  {' '.join(args)}\n{_log_tail(log_path)}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(
                f"loraplex-server did not write {port_file} within {START_TIMEOUT_S:.0f} s:\n"
                f"{_log_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.05)
    ports = [int(line) for line in port_file.read_text().split()]
    want = 3
    if len(ports) < want:
        process.kill()
        process.wait()
        pytest.fail(f"{port_file}: expected {want} ports, got {ports}", pytrace=False)
    return ServerProcess(
        process=process,
        grpc_port=ports[0],
        metrics_port=ports[1],
        http_port=ports[2],
        log_path=log_path,
        args=args,
        **tokens,
    )


def stop_server(server: ServerProcess) -> None:
    """SIGTERM, then waits for a graceful exit; fails when the server crashed or exits non-zero."""
    already = server.process.poll()
    if already is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            pytest.fail(
                f"loraplex-server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM:\n"
                f"{_log_tail(server.log_path)}",
                pytrace=False,
            )
    rc = server.process.returncode
    if already is not None or rc != 0:
        when = "during the tests" if already is not None else "after SIGTERM"
        pytest.fail(
            f"loraplex-server exited with {rc} {when}:\n{_log_tail(server.log_path)}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An open server (no tokens) with the adapters qv and all."""
    s = start_server(tmp_path_factory.mktemp("server"), [])
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that wants API_TOKEN on Inference and ADMIN_TOKEN on Adapters calls, with
    --adapter-dir at tests/fixtures/peft/stories260k (for LoadAdapter)."""
    s = start_server(
        tmp_path_factory.mktemp("auth-server"),
        [f"--api-token={API_TOKEN}", f"--admin-token={ADMIN_TOKEN}", f"--adapter-dir={PEFT_DIR}"],
        api_token=API_TOKEN,
        admin_token=ADMIN_TOKEN,
    )
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def start_extra_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """start(extra_args, api_token=..., admin_token=...) starts another server (e.g. with TLS
    flags); all of them are stopped, and checked, at the end of the session."""
    started: List[ServerProcess] = []

    def start(extra_args: List[str], **tokens: Any) -> ServerProcess:
        s = start_server(tmp_path_factory.mktemp("extra-server"), extra_args, **tokens)
        started.append(s)
        return s

    yield start
    failures = []
    for s in started:
        try:
            stop_server(s)
        except pytest.fail.Exception as e:
            failures.append(str(e))
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture(scope="session")
def golden() -> Dict[str, Any]:
    """golden-greedy.json: the 60 tokens greedy decoding from BOS alone gives (and their text)."""
    with (STORIES_DIR / "golden-greedy.json").open() as f:
        data: Dict[str, Any] = json.load(f)
    return data


@pytest.fixture(scope="session")
def peft_dir() -> Path:
    """tests/fixtures/peft/stories260k: the PEFT adapters and their PEFT-made golden data."""
    return PEFT_DIR
