"""Atomic file writes: the one helper every writer in qtvit uses (results, checkpoints, plots).

A file is written to a temporary name in the same directory and renamed over the target with
``os.replace``, which is atomic on POSIX and Windows: a reader (or a run interrupted mid-write)
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    For writers that want a file name (``torch.save``, ``savefig``)::

        with atomic_output("run/last.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns the path."""
    with atomic_output(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_json(doc: object, path: str | Path) -> Path:
    """Write ``doc`` as indented JSON (no NaN/Infinity: strict JSON readers reject them) atomically."""
    return write_atomic(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


__all__ = ["atomic_output", "write_atomic", "write_json"]
