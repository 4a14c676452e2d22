"""How programs are traced: the platform they are for, and whether the project's scans unroll.

The platform: the default backend, or the one ``zaya plan`` compiles for: the default backend, or the one ``zaya plan`` compiles for.

Some choices are made at trace time by platform (the MoE dispatch for ``moe_impl="auto"``, the row-blocked
bf16 reads of ``narrow.py``, the inference compiler options, the cache's storage dtype). On a TPU host the
default backend is ``tpu`` and nothing needs setting; ahead-of-time compilation for a TPU from a CPU host
(``zaya_jax.plan``) traces under ``target("tpu")`` so the TPU program is the one a TPU host would build.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_UNROLL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("zaya_unrolled", default=None)
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("zaya_target_platform", default=None)


def platform() -> str:
    """``"cpu"``, ``"tpu"``, ``"gpu"``...: the platform being traced for."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(name: str):
    """Traces inside this block are for platform ``name`` (e.g. ``"tpu"``), whatever the default backend."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)


def scan_unroll(loop: str = "") -> int | bool:
    """The ``unroll`` of one of the project's own scans (layers, loss chunks, gradient accumulation, MoE tiles):
    1, but under ``unrolled`` all of them, or the factor ``unrolled`` names for ``loop``."""
    factors = _UNROLL.get()
    return 1 if factors is None else factors.get(loop, True)


@contextlib.contextmanager
def unrolled(**factors: int):
    """Traces inside this block unroll the project's scans: whole, or by ``factors[loop]`` for the loops named
    (``unrolled(loss_chunks=1)``). XLA's cost analysis counts a loop's body once, not once per trip; the cost
    of an unrolled program is the whole cost, and a loop unrolled by 1 and by 2 gives its body's cost by
    difference (``zaya_jax.aot``). Compiling unrolled takes longer and computes the same values."""
    token = _UNROLL.set(dict(factors))
    try:
        yield
    finally:
        _UNROLL.reset(token)
