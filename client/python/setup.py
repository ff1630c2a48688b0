"""Builds the loraplex package with loraplex.v1 generated from the repository's protos.

``build_py`` runs ``grpc_tools.protoc`` (grpcio-tools, a build requirement in pyproject.toml) on
``proto/loraplex/v1/{inference,adapters}.proto`` with ``-I <proto root>``, so the generated modules
import each other as ``from loraplex.v1 import ...``; it writes ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` into the build tree (into the source tree for an editable install). Nothing
generated is committed.

The proto root is, first found: ``$LORAPLEX_PROTO_DIR``, ``proto/`` beside this file (an sdist
carries a copy there), ``../../proto`` (this folder inside the repository). The runtime
requirements are the versions the generated code checks for when it is imported (the protobuf
gencode version, ``GRPC_GENERATED_VERSION``), so pip installs a grpcio and protobuf that can load
it.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_FILES = ("loraplex/v1/inference.proto", "loraplex/v1/adapters.proto")
PROTO_DIR_ENV = "LORAPLEX_PROTO_DIR"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def find_proto_dir() -> Path:
    """The first proto root holding every file of PROTO_FILES; exits with the places it tried."""
    env = os.environ.get(PROTO_DIR_ENV)
    candidates = [Path(env)] if env else [HERE / "proto", HERE.parent.parent / "proto"]
    for root in candidates:
        if all((root / f).is_file() for f in PROTO_FILES):
            return root.resolve()
    tried = " or ".join(str(c) for c in candidates)
    raise SystemExit(
        "loraplex: cannot find the protos to generate loraplex.v1 from: "
        f"{' and '.join(PROTO_FILES)} are not under {tried}. Build from the repository "
        "(pip install client/python, with pip >= 21.3, which builds a local folder in place), "
        f"from an sdist made by this setup.py, or set {PROTO_DIR_ENV} to the folder holding "
        "loraplex/v1/*.proto."
    )


def run_protoc(proto_dir: Path, out_dir: Path) -> None:
    """Generates the messages, .pyi stubs and gRPC stubs of PROTO_FILES under out_dir."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit(
            "loraplex: grpcio-tools is needed to generate loraplex.v1 (it is in pyproject.toml's "
            "[build-system] requires; with --no-build-isolation install it first)"
        ) from e
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"loraplex: grpc_tools.protoc failed: {' '.join(args)}")


_stubs_dir: Optional[Path] = None


def generated_stubs() -> Path:
    """A temporary folder holding loraplex/v1/*_pb2*.py[i], generated once per setup.py run."""
    global _stubs_dir
    if _stubs_dir is None:
        out = Path(tempfile.mkdtemp(prefix="loraplex-stubs-"))
        atexit.register(shutil.rmtree, out, True)
        run_protoc(find_proto_dir(), out)
        _stubs_dir = out
    return _stubs_dir


def runtime_requirements() -> List[str]:
    """grpcio, protobuf and grpcio-health-checking at versions that load the generated code."""
    v1 = generated_stubs() / "loraplex" / "v1"
    pb2 = (v1 / "inference_pb2.py").read_text(encoding="utf-8")
    grpc_stub = (v1 / "inference_pb2_grpc.py").read_text(encoding="utf-8")
    # Generated code of grpcio-tools >= 1.63 refuses an older grpcio when imported.
    m = re.search(r"^GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.(\d+)", grpc_stub, re.M)
    grpc_min = ".".join(m.groups()) if m else "1.60.0"
    grpc_minor = ".".join(grpc_min.split(".")[:2])
    # protobuf >= 5.26 gencode needs a runtime of the same major version, at least as new.
    m = re.search(r"^# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", pb2, re.M)
    if m:
        major = int(m.group(1))
        protobuf = f"protobuf>={'.'.join(m.groups())},<{major + 1}"
    else:
        protobuf = "protobuf>=4.21"
    return [
        f"grpcio>={grpc_min}",
        protobuf,
        # Its own generated health_pb2 is of the same release train as grpcio.
        f"grpcio-health-checking>={grpc_minor}",
    ]


class BuildPyWithStubs(build_py):
    """build_py that also writes the generated loraplex.v1 modules into the build."""

    def run(self) -> None:
        super().run()
        # An editable install imports from the source tree, so the stubs go there (gitignored).
        root = HERE if getattr(self, "editable_mode", False) else Path(self.build_lib)
        dest = root / "loraplex" / "v1"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((generated_stubs() / "loraplex" / "v1").iterdir()):
            if f.name.endswith(GENERATED_SUFFIXES):
                shutil.copyfile(f, dest / f.name)


class SdistWithProtos(sdist):
    """sdist that carries the protos in proto/, since ../../proto is not in the archive."""

    def make_release_tree(self, base_dir: str, files: List[str]) -> None:
        super().make_release_tree(base_dir, files)
        proto_dir = find_proto_dir()
        for f in PROTO_FILES:
            dest = Path(base_dir) / "proto" / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto_dir / f, dest)


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos},
)
