"""Outputs built in a temporary sibling directory and renamed into place, so a failed run leaves nothing
half-written and an existing output is only replaced on request.

A process killed outright (SIGKILL, power loss) cannot remove its temporary, so each one carries a marker
file naming the host and pid that made it; the next run for the same destination removes those whose
process is gone, and nothing else (a directory without the marker, or of a live process, is left alone).
The output gets the permissions the umask allows, as files written with ``open`` do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from typing import Iterator

MARKER = ".zaya-staging.json"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _make_temporary(parent: str, base: str, kind: str) -> str:
    """A fresh ``.{base}.zaya-{kind}-{pid}-{random}`` directory in ``parent``, with its marker."""
    path = os.path.join(parent, f".{base}.zaya-{kind}-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(dst: str) -> list[str]:
    """The temporaries of earlier runs for ``dst`` whose process (on this host) is gone."""
    parent, base = os.path.split(dst)
    found = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not (name.startswith(f".{base}.zaya-") and os.path.isdir(path)):
            continue
        try:
            with open(os.path.join(path, MARKER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # no readable marker: not provably ours
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            found.append(path)
    return found


def _apply_umask(root: str) -> None:
    """Directories ``0o777`` and files ``0o666`` less the umask (temporary directories start at 0o700,
    and some writers create 0o600 files)."""
    mask = _umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


@contextlib.contextmanager
def staged(dst: str, force: bool) -> Iterator[str]:
    """A temporary directory beside ``dst`` that becomes ``dst`` if the block succeeds, else vanishes.

    An existing ``dst`` is refused (FileExistsError) unless ``force``.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to overwrite it")
    parent, base = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    for path in stale_temporaries(dst):
        shutil.rmtree(path, ignore_errors=True)
    tmp = _make_temporary(parent, base, "tmp")
    try:
        yield tmp
        os.remove(os.path.join(tmp, MARKER))
        _apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        old = _make_temporary(parent, base, "old")
        os.rename(dst, os.path.join(old, "dst"))
        os.rename(tmp, dst)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dst)
