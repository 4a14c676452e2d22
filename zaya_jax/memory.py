"""Memory: the process's peak resident memory (as the converter, the loaders' tests and the benchmarks report
it) and the memory free for new buffers, which allocations sized by a user's number are checked against."""

from __future__ import annotations

import resource
import sys


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a /proc file, in bytes; None off Linux or without it."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM, which (unlike ru_maxrss) does not
    inherit the high-water mark of the parent a subprocess was forked from."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def host_available_bytes() -> int | None:
    """The host's MemAvailable (what new allocations can take without swapping); None off Linux."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def available_bytes(devices) -> int | None:
    """Memory free for new buffers on ``devices``: the host's MemAvailable for CPU devices (they share
    it), else the sum of each accelerator's ``bytes_limit - bytes_in_use``; None where unknown."""
    devices = list(devices)
    if all(d.platform == "cpu" for d in devices):
        return host_available_bytes()
    total = 0
    for d in devices:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        total += stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return total


def check_fits(nbytes: int, devices, what: str) -> None:
    """Refuses (``ValueError`` naming ``what`` and both sizes) an allocation of ``nbytes`` that cannot fit
    in what ``devices`` have free, before it is attempted: a clear message instead of an out-of-memory
    abort part way through."""
    free = available_bytes(devices)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:,.2f} GiB, more than the {free / 2**30:,.2f} GiB free on "
                         f"{'the host' if all(d.platform == 'cpu' for d in devices) else 'the devices'}")
