"""Atomic file writes: readers never see half a file, and a crash leaves no partial output."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], fsync: bool = True) -> None:
    """Call `write(f)` on a temp file in the same folder, fsync it, then rename it to `path`.

    fsync=False for scratch files a crash may lose (they are redone): readers still never
    see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
