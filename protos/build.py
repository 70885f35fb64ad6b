"""Generates the Python gRPC code for protos/**/*.proto into ./rlhf (git-ignored).

Run by scripts/setup.sh and, when a .proto is newer than its generated module, by
tests/conftest.py and the entry points (ensure_generated), so the code is never stale.

    python -m protos.build
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "protos"
OUT = REPO  # rlhf/v1/*.proto -> rlhf/v1/*_pb2.py, importable as rlhf.v1.*


def _protos() -> list[Path]:
    return sorted(SRC.rglob("*.proto"))


def _generated(proto: Path) -> Path:
    rel = proto.relative_to(SRC).with_suffix("")
    return OUT / rel.parent / f"{rel.name}_pb2.py"


def is_stale() -> bool:
    return any(not _generated(p).exists() or _generated(p).stat().st_mtime < p.stat().st_mtime for p in _protos())


def build() -> None:
    from grpc_tools import protoc  # build-time dependency (grpcio-tools)
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    files = [str(p.relative_to(SRC)) for p in _protos()]
    rc = protoc.main(["protoc", f"-I{SRC}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
                      f"--grpc_python_out={OUT}", *files])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    # make every generated folder a package
    for d in {(_generated(p)).parent for p in _protos()}:
        while d != OUT:
            (d / "__init__.py").touch()
            d = d.parent


def ensure_generated() -> None:
    if not is_stale():
        return
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        # a machine that only runs the code (scripts/gpu_check.sh's GPU host): rlhf/ travels with
        # the tree, and a copy need not keep the files' modification times
        if all(_generated(p).exists() for p in _protos()):
            print("protos/ looks newer than rlhf/ but grpcio-tools is not installed: using rlhf/ as it is",
                  file=sys.stderr)
            return
        raise RuntimeError("rlhf/ (generated gRPC code) is missing and grpcio-tools is not installed: "
                           "run `python -m protos.build` where it is and bring rlhf/ along") from None
    build()


if __name__ == "__main__":
    build()
    print(f"generated {len(_protos())} proto file(s) into {OUT / 'rlhf'}", file=sys.stderr)
