"""Compiling for a TPU that is not attached (libtpu, ahead of time), and what the compiler says of a program.

``topology("v5e:2x4")`` describes the chips; a program lowered with abstract arguments that carry shardings
on a mesh of those chips compiles with the TPU compiler on this host. Per chip, the compiled program gives
its HBM (``memory_analysis``: arguments, outputs, temporaries), its FLOPs and bytes accessed
(``cost_analysis``) and its collectives (the optimized HLO).

XLA's cost analysis counts a loop's body once, not once per trip, and the layers run in a scan. So costs are
read from two more compiles of the same program, at ``COST_LAYERS`` = 4 and 8 layers with the project's scans
unrolled (``backend.unrolled``): a layer costs a quarter of the difference, and L layers cost
``c8 + (L - 8) * (c8 - c4) / 4``. The TPU compiler fuses and buffers the first few layers differently (on
ZAYA1-8B's decode step, a 2-to-3-layer difference was 30% below the per-layer bytes from 4 layers on for one
MoE path and negative for another), and four layers average out what one layer's difference does not: from
4 and 8 layers, the decode step's bytes came within 4% of a fully unrolled 40-layer compile, for both paths
(docs/tpu.md). A model of up to 8 layers is compiled unrolled whole. Loops
that are not the project's scans stay counted once: the decode loop (its cost is one step's) and the insert
program's copy loop (one row's).

A program names the scans whose unrolled copies would make those compiles too large (``Program.loops``: the
train step's loss chunks, 129 of them at 8 x 4096 tokens of ZAYA1-8B's vocabulary, each a [chunk, vocabulary]
matmul forward and backward). Those stay rolled in the layer compiles, and one more compile at 4 layers
unrolls each by 2: a trip costs the difference, and ``trips - 1`` more are added.

Every time derived from these is an estimate: ``max(flops / peak, bytes / HBM bandwidth)`` per chip, the
roofline of a program whose FLOPs and bytes the compiler counted, on a chip from ``CHIPS``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import time
from typing import Callable

import jax

from . import backend

GiB = 1 << 30


class PlanError(ValueError):
    """A topology, mesh or setting that cannot be planned; the message names it."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth, from its public spec sheet."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    source: str


# By jax's ``device_kind``. Figures per chip from Google Cloud's TPU system-architecture pages.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95 * 10**9, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def require_libtpu() -> None:
    """Raises PlanError with the install line when libtpu (the TPU compiler) is missing.

    On a host with no TPU attached, several processes may load libtpu at once (compiling needs no chip; by
    default libtpu's lock file lets one process in, and a second plan, test or benchmark would fail)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError('compiling for a TPU needs libtpu: pip install -e ".[tpu]"') from None
    if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology(name: str):
    """The chips of TPU topology ``name`` (``v5e:2x4``, ``v5p:2x2x2``, ``v6e:2x2``...); PlanError naming it if
    libtpu does not know it. A topology smaller than one host (``v5e:1x1``) is described as a host of its size."""
    require_libtpu()
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError with its own words)
        dims = re.fullmatch(r"[a-z0-9]+:(\d+)x(\d+)(?:x(\d+))?", name)
        if dims and "chips_per_host_bounds" in str(e):
            bounds = tuple(int(d or 1) for d in dims.groups())
            try:
                return topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds)
            except Exception as e2:  # noqa: BLE001
                e = e2
        raise PlanError(f"unknown TPU topology {name!r}: {str(e).splitlines()[0]} "
                        f"(names as v5e:2x4, v5p:2x2x2, v6e:2x2)") from None


def chip_of(devices) -> Chip:
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"no figures for chip {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]


# The layer counts whose unrolled compiles give a program's cost (see the module docstring).
COST_LAYERS = (4, 8)


@dataclasses.dataclass
class Cost:
    """Per-chip cost of one run of a program (loops other than the project's scans counted once)."""

    flops: float
    bytes_accessed: float
    collectives: dict  # kind -> {"count": n, "bytes": b}

    def extrapolate(self, later: Cost, gap: int, layers: int) -> Cost:
        """``self`` at some layer count and ``later`` at ``gap`` more -> the cost at ``layers`` more than
        ``later``'s count (each layer costing ``(later - self) / gap``)."""
        return later.plus(self, later, layers / gap)

    def plus(self, a: Cost, b: Cost, times: float) -> Cost:
        """``self + times * (b - a)``: this cost and ``times`` more of what compile ``b`` has over compile ``a``
        (``times`` layers, or loop trips, each costing ``b - a``)."""
        lin = lambda x, y, z: x + times * (z - y)  # noqa: E731
        kinds = set(self.collectives) | set(a.collectives) | set(b.collectives)
        zero = {"count": 0, "bytes": 0}
        count = lambda c, k, f: c.collectives.get(k, zero)[f]  # noqa: E731
        return Cost(lin(self.flops, a.flops, b.flops), lin(self.bytes_accessed, a.bytes_accessed, b.bytes_accessed),
                    {k: {f: max(0, round(lin(count(self, k, f), count(a, k, f), count(b, k, f))))
                         for f in ("count", "bytes")} for k in sorted(kinds)})



@dataclasses.dataclass
class ProgramReport:
    """What the compiler says of one program on one chip of the topology."""

    name: str
    fits: bool
    hbm_bytes: dict | None  # arguments, outputs, temporaries, total (arguments + outputs - aliased + temporaries)
    resident_bytes: int  # other buffers live on the chip while it runs (the engine's slot pool during a prefill)
    flops: float | None
    bytes_accessed: float | None
    estimate_seconds: float | None
    collectives: dict | None
    compile_seconds: float
    error: str | None = None  # the compiler's refusal (e.g. HLO temporaries exceed HBM)
    note: str = ""

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


# Collective ops of the optimized HLO (async ones appear as NAME-start / NAME-done pairs; counted at -start).
_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+"
                         r"(all-reduce|all-gather|all-to-all|ragged-all-to-all|reduce-scatter|collective-permute)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "bf16": 16, "f16": 16, "s16": 16,
         "u16": 16, "f32": 32, "s32": 32, "u32": 32, "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128}


def collectives(hlo_text: str) -> dict:
    """Collectives in optimized HLO text: kind -> {"count", "bytes"} (bytes of each op's largest result array)."""
    out: dict = {}
    for m in _COLLECTIVE.finditer(hlo_text):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) * _BITS.get(dt, 32) // 8
                 for dt, dims in _SHAPE.findall(m.group(1))]
        entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += max(sizes, default=0)
    return out


def _refusal(error: Exception) -> str:
    text = str(error)
    line = next((ln for ln in text.splitlines() if "exceeds" in ln or "RESOURCE_EXHAUSTED" in ln), text.splitlines()[0])
    return line.strip()[:400]


def compile_for(build: Callable, mesh):
    """``build()`` -> (jitted fn, args, kwargs); lowers and compiles it for ``mesh``'s chips. Returns
    (compiled or None, seconds, the compiler's refusal or None). A refusal is an out-of-memory: other
    errors propagate."""
    t0 = time.perf_counter()
    with backend.target(mesh.devices.flat[0].platform):
        fn, args, kwargs = build()  # outside the mesh: a build may run small eager ops on this host
        with jax.set_mesh(mesh):
            lowered = fn.lower(*args, **kwargs)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
        if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds" not in str(e):
            raise
        return None, time.perf_counter() - t0, _refusal(e)
    return compiled, time.perf_counter() - t0, None


def hbm(compiled) -> dict:
    m = compiled.memory_analysis()
    args, outs, temps = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    return {"arguments": int(args), "outputs": int(outs), "temporaries": int(temps),
            "total": int(args + outs - m.alias_size_in_bytes + temps)}


def cost(compiled) -> Cost:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return Cost(float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0)), collectives(compiled.as_text()))


def estimate_seconds(c: Cost, chip: Chip) -> float:
    """Roofline estimate: the larger of FLOPs at peak and bytes at HBM bandwidth."""
    return max(c.flops / chip.peak_flops, c.bytes_accessed / chip.hbm_bandwidth)


@dataclasses.dataclass(frozen=True)
class Program:
    """A program to plan. ``build(config)`` -> (jitted fn, args, kwargs) for a model of ``config`` (called
    with the model's config, and with ``COST_LAYERS`` copies of it for the cost); ``resident_bytes``: other
    buffers live on each chip while it runs."""

    name: str
    build: Callable
    resident_bytes: int = 0
    note: str = ""
    loops: tuple = ()  # ((name, trips), ...): scans costed by difference, not unrolled (``loop_copies``)


def loop_copies(trips: int, unroll: int) -> int:
    """Copies of a scan's body in its program, as ``jax.lax.scan`` lowers ``unroll``: a loop over ``unroll``
    copies (counted once by XLA's cost analysis) and the ``trips % unroll`` left over, inline."""
    return (unroll if trips >= unroll else 0) + trips % unroll


def plan_program(program: Program, config, mesh, chip: Chip, *, with_cost: bool = True, full: bool = True,
                 capacity: int | None = None) -> ProgramReport:
    """Compiles ``program`` at the model's size (memory) and at ``COST_LAYERS`` unrolled layers (cost). Without
    ``full``, only the cost compiles run, and the HBM reported is that of the last one (the most layers)."""
    capacity = chip.hbm_bytes if capacity is None else capacity
    report = ProgramReport(name=program.name, fits=False, hbm_bytes=None, resident_bytes=int(program.resident_bytes),
                           flops=None, bytes_accessed=None, estimate_seconds=None, collectives=None,
                           compile_seconds=0.0, note=program.note)
    if full:
        compiled, report.compile_seconds, report.error = compile_for(functools.partial(program.build, config), mesh)
        if compiled is not None:
            report.hbm_bytes = hbm(compiled)
            report.fits = report.hbm_bytes["total"] + program.resident_bytes <= capacity
        del compiled
    if with_cost:
        L = config.num_hidden_layers
        counts = COST_LAYERS if L > COST_LAYERS[-1] else (L,)  # a small model is compiled unrolled whole
        rolled = {name: 1 for name, _ in program.loops}
        # (layers, loop factors): the layer counts with the named loops rolled, then each loop unrolled by 2.
        variants = [(n, rolled) for n in counts] + [(counts[0], {**rolled, name: 2}) for name, _ in program.loops]
        costs = []
        for i, (layers, factors) in enumerate(variants):
            small = dataclasses.replace(config, num_hidden_layers=layers, layer_types=config.layer_types[:layers])
            with backend.unrolled(**factors):
                c, s, err = compile_for(functools.partial(program.build, small), mesh)
            report.compile_seconds += s
            if c is None:
                report.note = (report.note + "; " if report.note else "") + f"cost not measured: {err}"
                return report
            costs.append(cost(c))
            if not full and i == len(counts) - 1:  # the most layers, loops rolled
                report.hbm_bytes = hbm(c)
                report.note = (report.note + "; " if report.note else "") + f"HBM of the {layers}-layer program"
        total = costs[0].extrapolate(costs[1], counts[1] - counts[0], L - counts[1]) if len(counts) == 2 else costs[0]
        for (name, trips), by_two in zip(program.loops, costs[len(counts):]):
            extra = loop_copies(trips, 2) - loop_copies(trips, 1)
            if extra:  # each trip costs the difference per extra copy; the rolled compile counted one
                total = total.plus(costs[0], by_two, (trips - 1) / extra)
        report.flops, report.bytes_accessed = total.flops, total.bytes_accessed
        report.collectives, report.estimate_seconds = total.collectives, estimate_seconds(total, chip)
    return report


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of ``tree`` (abstract arrays with shardings; the largest shard per leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize  # key dtypes too (threefry: 8 bytes)
    return int(total)


def with_shardings(abstract, shardings):
    """Abstract arrays (``jax.ShapeDtypeStruct``) carrying ``shardings`` (same pytree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
