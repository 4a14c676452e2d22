"""Reading JSONL files of one object per line, with errors that name the file and line."""

from __future__ import annotations

import json
import os


def read_objects(path: str, *, what: str = "records", error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of ``path`` (lines end at ``\\n``); ``what`` names them in
    the empty-file error. Anything else (invalid UTF-8 or JSON, a non-object, absurd nesting) raises
    ``error`` naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    objects = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{number}: not valid UTF-8: {e}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{number}: not valid JSON: {e}") from None
            except RecursionError:
                raise error(f"{path}:{number}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            objects.append((number, obj))
    if not objects:
        raise error(f"{path} holds no {what}")
    return objects
