"""What a command writes: never one of its inputs, and one writer at a time (docs/errors.md).

``check_outputs`` refuses an output path that is an input (the same file or directory, through any
symlink or hard link) or a directory holding one: replacing, truncating or appending to it would lose
the input. ``OutputLock`` is an exclusive ``flock`` on an output, held for a run: a second run on the
same output is refused by name instead of writing its records a second time.
"""

from __future__ import annotations

import fcntl
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



class OutputLock:
    """An exclusive lock on the output ``path`` (a file or a directory; ``create`` makes a missing file)
    until ``close`` or the process's end. ValueError naming ``what`` and ``path`` when another process
    (or another open of it in this one) holds it."""

    def __init__(self, path: str, what: str, *, create: bool = False):
        self.fd: int | None = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ValueError(f"{what} {path} is being written by another run (it holds the lock): one writer per "
                             "output; wait for that run to end, or choose another output path") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
