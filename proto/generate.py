"""Regenerate the Python stubs of proto/genius/v1/*.proto (committed; tests check they are current).

    python proto/generate.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "proto" / "genius" / "v1").glob("*.proto"))


def generate(out: Path = ROOT) -> None:
    from grpc_tools import protoc

    # Include root = the repository: generated imports read `from proto.genius.v1 import ...`,
    # which cannot clash with the `genius` library package.
    args = ["protoc", f"-I{ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
            *[str(p.relative_to(ROOT)) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
