"""What a command writes is never one of its inputs (docs/errors.md).

``check_outputs`` refuses an output path that is an input (the same file or directory, through any
symlink or hard link) or a directory holding one: replacing, truncating or appending to it would lose
the input.
"""

from __future__ import annotations

import os


def check_outputs(outputs: dict[str, str], inputs: dict[str, str | None]) -> None:
    """Raises ValueError when an output is an input or holds one. Both map how the command names a path
    (an option, e.g. ``"--out"``) to the path; outputs need not exist yet, inputs that do not exist (or
    are None) are skipped."""
    for in_name, source in inputs.items():
        if source is None or not os.path.exists(source):
            continue
        real_in = os.path.realpath(source)
        for out_name, out in outputs.items():
            if os.path.exists(out) and os.path.samefile(out, source):
                problem = f"is the same {'directory' if os.path.isdir(out) else 'file'} as {in_name} {source}"
            elif real_in.startswith(os.path.realpath(out).rstrip(os.sep) + os.sep):
                problem = f"holds {in_name} {source}"
            else:
                continue
            raise ValueError(f"{out_name} {out} {problem}: inputs are never outputs; choose another output path")

