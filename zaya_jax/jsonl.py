"""Reading JSONL files of one object per line, with errors that name the file and line."""

from __future__ import annotations

import codecs
import json
import math
import os
from typing import Iterator


class WrittenFloat(float):
    """A JSON number with a fraction or an exponent: a float whose ``str`` is the number as the line wrote
    it, so a gold answer such as ``11111111111111111112.0`` keeps digits a float cannot hold."""

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        value.text = text
        return value

    def __str__(self) -> str:
        return self.text


def _finite_float(text: str) -> float:
    value = WrittenFloat(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is beyond float range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_objects(path: str, *, what: str = "records", error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of ``path``; ``what`` names them in the empty-file error.
    A line that is not a JSON object (invalid UTF-8 or JSON, a non-object, absurd nesting) raises ``error``
    naming the file and line."""
    objects = []
    for number, obj in iter_objects(path, error=error):
        if isinstance(obj, Exception):
            raise obj
        objects.append((number, obj))
    if not objects:
        raise error(f"{path} holds no {what}")
    return objects


def iter_objects(path: str, *, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict | Exception]]:
    """Lazily, (line number, object) for each non-blank line of ``path`` (lines end at ``\\n``; a UTF-8
    byte order mark opening the file is skipped), or (line number, ``error`` naming file, line and
    problem) for a line that is not a JSON object: a caller may skip bad lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as editors on Windows save UTF-8
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, error(f"{path}:{number}: not valid UTF-8: {e}")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_float=_finite_float, parse_constant=_no_constant)
            except ValueError as e:  # bad JSON, NaN / Infinity / 1e400, an integer past Python's digit limit
                yield number, error(f"{path}:{number}: not valid JSON: {e}")
                continue
            except RecursionError:
                yield number, error(f"{path}:{number}: JSON nested too deeply")
                continue
            if not isinstance(obj, dict):
                yield number, error(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield number, obj
