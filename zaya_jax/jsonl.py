"""Reading JSONL files of one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
import os
from typing import Iterator


def read_objects(path: str, *, what: str = "records", error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of ``path``; ``what`` names them in the empty-file error."""
    objects = []
    for number, obj in iter_objects(path, error=error):
        if isinstance(obj, Exception):
            raise obj
        objects.append((number, obj))
    if not objects:
        raise error(f"{path} holds no {what}")
    return objects


def iter_objects(path: str, *, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict | Exception]]:
    """Lazily, (line number, object) for each non-blank line of ``path``, or (line number, ``error``
    naming file, line and problem) for a line that is not a JSON object: a caller may skip bad lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, error(f"{path}:{number}: not valid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                yield number, error(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield number, obj
