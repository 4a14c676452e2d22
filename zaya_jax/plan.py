"""Will it fit, and what will it cost: a model's serving, training and RL programs compiled for a TPU topology.

``plan(config, topology, task=...)`` builds the programs the engine (``serve``), ``zaya train`` (``train``) or
``zaya rl`` (``rl``: the GRPO update beside its recording rollout engine, on the same chips) would compile,
with abstract arguments sharded as those commands shard them, compiles each for the topology's chips
(``zaya_jax.aot``) and reports per chip: HBM against the chip's capacity, FLOPs, bytes accessed, a roofline
estimate, collectives, compile seconds. Nothing is allocated and no weight is read: only the config counts.

Serving also gets ``max_slots``: the most slots at ``max_len`` whose decode program, and whose slot pool
beside the largest prefill program, fit; found from two decode compiles (HBM is affine in slots) and
checked by one compile at the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import aot, backend, dtypes, model, quant
from . import sharding as shd
from .aot import GiB, PlanError, Program
from .cache import init_cache
from .config import ZayaConfig

TASKS = ("serve", "train", "rl")
# HBM the TPU compiler keeps for itself: a v5e chip (16 GiB) offers programs 15.75 GiB.
RESERVED_BYTES = GiB // 4


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What ``zaya serve`` / ``Engine`` take that fixes its programs."""

    slots: int = 64
    max_len: int = 8192
    decode_steps: int = 16
    dtype: str = "bfloat16"
    moe_impl: str = "auto"
    quantize: str | None = None  # weights stored quantized (zaya_jax.quant.SCHEMES), computing in ``dtype``
    prefill_chunk: int = 512
    prefill_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What ``zaya train`` takes that fixes its step's program."""

    batch_size: int = 8
    seq_len: int = 4096
    remat: str = "full"
    grad_accum: int = 1
    compute_dtype: str = "bfloat16"
    moe_impl: str = "auto"


def default_mesh(task: str, devices: int, config: ZayaConfig) -> dict[str, int]:
    """Serving splits experts (as many as divide both), rows over the rest; training shards weights (fsdp)."""
    if task == "serve":
        expert = math.gcd(devices, config.num_experts)
        return {"expert": expert, "data": devices // expert}
    return {"fsdp": devices}


def abstract_params(config: ZayaConfig, mesh, dtype, rules=shd.INFERENCE, quantize: str | None = None):
    """The params' shapes in ``dtype`` (the ``quant.QUANTIZED`` leaves quantized with ``quantize``), sharded."""
    def make():
        params = model.init(config, jax.random.key(0), dtype)
        return quant.quantize_params(params, quantize) if quantize else params

    return aot.with_shardings(jax.eval_shape(make), shd.param_shardings(config, mesh, rules, quantize))


def _replicated(mesh, tree):
    return aot.with_shardings(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def _jit(fn, **kwargs):
    """A fresh jit of ``fn``: its traces are its own, so a cost variant (``backend.unrolled``) never reuses a
    rolled trace of the same shapes, nor leaves one for a real call."""
    return jax.jit(functools.partial(fn), **kwargs)


def active_params(config: ZayaConfig) -> int:
    """Parameters one token's forward uses: all but the experts, plus one expert per layer (top-1), plus the
    LM head (tied to the embedding or not)."""
    shapes = jax.eval_shape(lambda: model.init(config, jax.random.key(0)))
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    experts = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes["layers"]["experts"]))
    head = config.hidden_size * config.vocab_size if config.tie_word_embeddings else 0
    return total - experts + experts // config.num_experts + head


# ------------------------------------------------------------------------------------------------ serve
def serve_programs(config: ZayaConfig, mesh, s: ServeSettings, *, all_programs: bool = False, record: bool = False,
                   resident: int = 0, rules=shd.INFERENCE, compiler_options=None):
    """(programs, pool, the pool's per-chip bytes at n slots, the decode build, abstract params) of an engine with settings ``s`` on ``mesh``.

    Without ``all_programs``, the prefill programs that bound the others: the one of most cache rows x
    tokens (the largest prefill cache) and the one of most rows x chunk (the largest activations), each
    with its insert. ``resident``: bytes per chip live beside the engine (the train state, for ``rl``);
    ``rules``: how the params are sharded (``rl``'s engine takes the train state's, TRAINING);
    ``compiler_options``: the inference programs' (default ``model.INFERENCE_COMPILER_OPTIONS``).
    """
    from .infer import decode
    from .infer.engine import PoolShape, state_shardings
    from .infer.sampling import SamplingParams

    dtype = dtypes.resolve(s.dtype)
    if compiler_options is None:
        compiler_options = model.INFERENCE_COMPILER_OPTIONS
    pool = PoolShape.of(config, slots=s.slots, max_len=s.max_len, decode_steps=s.decode_steps,
                        prefill_chunk=s.prefill_chunk, prefill_tokens=s.prefill_tokens, record=record)
    params = abstract_params(config, mesh, dtype, rules, s.quantize)

    def state_of(cfg, slots):
        p = dataclasses.replace(pool, slots=slots)
        with backend.target(mesh.devices.flat[0].platform):  # the cache's storage dtype is the platform's
            state = jax.eval_shape(lambda: p.new_state(cfg, dtype))
        return aot.with_shardings(state, state_shardings(state, cfg, mesh))

    pool_bytes_at = lambda n: aot.per_chip_bytes(state_of(config, n))  # noqa: E731
    pool_bytes = pool_bytes_at(pool.slots)  # resident beside each prefill

    def decode_build(cfg, slots=pool.slots):
        fn = _jit(decode.decode, static_argnames=("config", "steps", "active", "moe_impl"),
                  donate_argnames=("state",), compiler_options=compiler_options)
        state = state_of(cfg, slots)
        cancel = aot.with_shardings(jax.ShapeDtypeStruct((slots,), jnp.bool_), state.token.sharding)
        want_logprobs = _replicated(mesh, jax.ShapeDtypeStruct((), jnp.bool_))  # a flag, as the engine passes it
        return fn, (abstract_params(cfg, mesh, dtype, rules, s.quantize), cfg, state, cancel, None, want_logprobs), dict(
            steps=pool.decode_steps, active=None, moe_impl=s.moe_impl)

    def prefill_build(G, S, cfg):
        fn = _jit(decode.prefill_chunk, static_argnames=("config", "moe_impl", "record"),
                  donate_argnames=("cache", "last"), compiler_options=compiler_options)
        C = pool.chunk(S)
        with backend.target(mesh.devices.flat[0].platform):
            args = jax.eval_shape(lambda: (init_cache(cfg, G, S, dtype), jnp.zeros((G, C), jnp.int32),
                                           jnp.zeros((G,), jnp.int32), jnp.zeros((G, cfg.vocab_size), jnp.float32)))
        return fn, (abstract_params(cfg, mesh, dtype, rules, s.quantize), cfg, *_replicated(mesh, args)), dict(moe_impl=s.moe_impl,
                                                                                         record=record)

    def insert_build(G, S, cfg):
        fn = _jit(decode.insert, donate_argnames=("state",), compiler_options=compiler_options)
        M, K, L = pool.slots, pool.max_stop_ids, cfg.num_hidden_layers
        with backend.target(mesh.devices.flat[0].platform):
            args = jax.eval_shape(lambda: (
                init_cache(cfg, G, S, dtype), jnp.zeros((G, cfg.vocab_size), jnp.float32),
                jnp.zeros((M,), jnp.int32), jnp.zeros((M,), jnp.int32), jnp.int32(0),
                jax.random.split(jax.random.key(0), M), SamplingParams.create(M), jnp.zeros((M,), jnp.int32),
                jnp.zeros((M,), jnp.int32), jnp.zeros((M, K), jnp.int32),
                jnp.zeros((G, S, L), jnp.int32) if record else None, None, None, jnp.zeros((), jnp.bool_)))
        return fn, (state_of(cfg, pool.slots), *_replicated(mesh, args)), {}

    shapes = pool.prefill_programs()
    if not all_programs:
        largest_cache = max(shapes, key=lambda gs: (gs[0] * gs[1], gs[1]))
        largest_chunk = max(shapes, key=lambda gs: (gs[0] * pool.chunk(gs[1]), gs[1]))
        shapes = sorted({largest_cache, largest_chunk}, key=lambda gs: (gs[1], gs[0]))
    programs = [Program(f"decode[slots={pool.slots},cache={pool.cache_len},steps={pool.decode_steps}]", decode_build,
                        resident, note="cost per decode step (every slot running)")]
    for G, S in shapes:
        programs.append(Program(f"prefill[rows={G},bucket={S},chunk={pool.chunk(S)}]",
                                functools.partial(prefill_build, G, S), resident + pool_bytes,
                                note="resident: the slot pool" + (" and the train state" if resident else "")))
        programs.append(Program(f"insert[rows={G},bucket={S}]", functools.partial(insert_build, G, S), resident,
                                note="cost of the copy loop counted for one row"))
    return programs, pool, pool_bytes_at, decode_build, params


def decode_waste(report: aot.ProgramReport, params, pool_bytes: int) -> float | None:
    """Bytes a decode step accesses / the least it must (each weight shard once + the whole slot pool)."""
    if report.bytes_accessed is None:
        return None
    return report.bytes_accessed / (aot.per_chip_bytes(params) + pool_bytes)


def max_slots(split: int, s: ServeSettings, decode_total, pool_bytes_at, prefill_peak: int, first: aot.ProgramReport,
              capacity: int) -> dict:
    """The most slots (a multiple of ``split``, the chips the rows split over) that fit at ``s.max_len``: per-chip
    HBM of the decode program and of the pool beside the largest prefill are affine in slots; fitted on two
    compiles, then checked by compiling at the answer (bisecting down to the largest that fits).

    ``decode_total(n)``: the decode program's total HBM per chip at ``n`` slots, or None when it does not
    compile within HBM; ``pool_bytes_at(n)``: the pool's bytes per chip."""
    points = {}
    if first.hbm_bytes is not None:
        points[s.slots] = first.hbm_bytes["total"]
    probe = max(split, (s.slots // 2) // split * split)
    while len(points) < 2 and probe >= split:
        if probe not in points and (total := decode_total(probe)) is not None:
            points[probe] = total
        probe = probe // 2 // split * split if probe > split else 0
    if len(points) < 2:
        return {"max_slots": 0, "checked": False,
                "reason": f"no decode program of {split} slot(s) per row split compiles at this max_len"}
    (a, ta), (b, tb) = sorted(points.items())
    per_slot = (tb - ta) / (b - a)
    base = ta - per_slot * a
    pool_per_slot = (pool_bytes_at(2 * split) - pool_bytes_at(split)) / split
    pool_base = pool_bytes_at(split) - pool_per_slot * split
    # decode: base + per_slot * n <= capacity; prefill beside the pool: prefill_peak - pool(s.slots) + pool(n).
    room = [(capacity - base) / per_slot if per_slot > 0 else float("inf")]
    if prefill_peak:
        room.append((capacity - (prefill_peak - pool_bytes_at(s.slots)) - pool_base) / pool_per_slot)
    fitted = int(min(min(room), 1 << 24)) // split * split
    # Checked by compiling: the fit's answer, else a bisection between the largest size known to fit and it.
    low, high, n = max((m for m, total in points.items() if total <= capacity), default=0), None, fitted
    for _ in range(6):
        if n <= low or n == high:
            break
        total = decode_total(n)
        if total is not None and total <= capacity:
            low = n
            if high is None:
                break
        else:
            high = n
        n = (low + high) // 2 // split * split if high is not None else n
    return {"max_slots": low, "checked": low > 0, "fitted": fitted,
            **({} if low else {"reason": "no decode program of one slot per row split fits at this max_len"})}


# ------------------------------------------------------------------------------------------------ train
def train_program(config: ZayaConfig, mesh, t: TrainSettings, *, objective=None, name: str = "train_step"):
    """The train step (AdamW, float32 master weights, ``t.compute_dtype`` compute), state and batch sharded by
    the TRAINING rules, the state donated: what ``zaya train`` compiles."""
    from .train import loss
    from .train import step as train_step_mod

    tcfg = train_step_mod.TrainConfig(remat_policy=t.remat, grad_accum=t.grad_accum, compute_dtype=t.compute_dtype,
                                      moe_impl=t.moe_impl)
    objective = objective or train_step_mod.cross_entropy
    rules = shd.TRAINING
    if t.batch_size % t.grad_accum:
        raise PlanError(f"--batch-size {t.batch_size} does not split into --grad-accum {t.grad_accum} micro-batches")

    def build(cfg):
        state = jax.eval_shape(lambda: train_step_mod.init_state(model.init(cfg, jax.random.key(0)), tcfg))
        replicated = NamedSharding(mesh, P())
        shardings = train_step_mod.state_shardings(state, shd.param_shardings(cfg, mesh, rules), replicated, tcfg)
        batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32) for k in ("tokens", "mask", "loss_mask")}
        if objective is not train_step_mod.cross_entropy:
            batch.update(advantages=jax.ShapeDtypeStruct((t.batch_size,), jnp.float32),
                         old_logprobs=jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32),
                         routes=jax.ShapeDtypeStruct((t.batch_size, t.seq_len, cfg.num_hidden_layers), jnp.int32))
        batch = {k: aot.with_shardings(v, shd.batch_sharding(mesh, v.ndim, rules, batch=t.batch_size))
                 for k, v in batch.items()}
        fn = _jit(functools.partial(train_step_mod.train_step, config=cfg, tcfg=tcfg, objective=objective),
                  donate_argnums=0, out_shardings=(shardings, None))
        return fn, (aot.with_shardings(state, shardings), batch), {}

    tokens = t.batch_size * t.seq_len
    micro = tokens // t.grad_accum  # the tokens of one micro-batch's loss, in chunks of the default size
    loss_chunks = -(-micro // loss.default_chunk(micro, config.vocab_size))
    return Program(f"{name}[batch={t.batch_size},seq={t.seq_len},remat={t.remat},accum={t.grad_accum}]", build,
                   note="AdamW, float32 master weights", loops=(("loss_chunks", loss_chunks),)), tokens


# ------------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What to plan: picklable, so a child process can build the same programs (``isolate``)."""

    config: ZayaConfig
    topology: str
    task: str
    mesh_sizes: tuple = ()  # ((axis, size), ...); empty: ``default_mesh``
    serve: ServeSettings = ServeSettings()
    train: TrainSettings = TrainSettings()
    all_programs: bool = False
    cost: bool = True  # False: only the full-size compiles (HBM and fit), no cost compiles


@dataclasses.dataclass
class Setup:
    """A request's mesh and programs, built in one process: (program, with its cost) in the order run."""

    mesh: object
    chip: aot.Chip
    capacity: int
    programs: list
    serve: ServeSettings | None = None
    pool: object = None
    pool_bytes: int = 0
    pool_bytes_at: object = None
    params: object = None
    decode_build: object = None
    train_state_bytes: int = 0
    tokens: int = 0


def setup(req: PlanRequest) -> Setup:
    if req.task not in TASKS:
        raise PlanError(f"unknown task {req.task!r}; choose one of {TASKS}")
    devices = list(aot.topology(req.topology).devices)
    chip = aot.chip_of(devices)
    mesh = shd.make_mesh(**(dict(req.mesh_sizes) or default_mesh(req.task, len(devices), req.config)), devices=devices)
    out = Setup(mesh=mesh, chip=chip, capacity=chip.hbm_bytes - RESERVED_BYTES, programs=[])
    config = req.config
    if req.task in ("train", "rl"):
        from .train import step as train_step_mod
        from .train.grpo import GRPOObjective

        program, out.tokens = train_program(config, mesh, req.train,
                                            objective=GRPOObjective() if req.task == "rl" else None,
                                            name="grpo_step" if req.task == "rl" else "train_step")
        out.programs.append((program, req.cost))
        if req.task == "rl":
            tcfg = train_step_mod.TrainConfig(compute_dtype=req.train.compute_dtype)
            state = jax.eval_shape(lambda: train_step_mod.init_state(model.init(config, jax.random.key(0)), tcfg))
            shardings = train_step_mod.state_shardings(state, shd.param_shardings(config, mesh, shd.TRAINING),
                                                       NamedSharding(mesh, P()), tcfg)
            out.train_state_bytes = aot.per_chip_bytes(aot.with_shardings(state, shardings))
    if req.task in ("serve", "rl"):
        s = req.serve if req.task == "serve" else dataclasses.replace(
            req.serve, max_len=req.train.seq_len, dtype=req.train.compute_dtype, moe_impl=req.train.moe_impl)
        programs, out.pool, out.pool_bytes_at, out.decode_build, out.params = serve_programs(
            config, mesh, s, all_programs=req.all_programs, record=req.task == "rl", resident=out.train_state_bytes,
            rules=shd.INFERENCE if req.task == "serve" else shd.TRAINING)
        out.serve, out.pool_bytes = s, out.pool_bytes_at(out.pool.slots)
        out.programs += [(p, req.cost and (not p.name.startswith("insert") or req.all_programs)) for p in programs]
    return out


def _child(req: PlanRequest, name: str, conn) -> None:
    """In a child process: the report of program ``name`` of ``req`` (``decode@N``: the decode program's total
    HBM at N slots), sent through ``conn``."""
    st = setup(req)
    if name.startswith("decode@"):
        compiled, _, _ = aot.compile_for(functools.partial(st.decode_build, req.config, int(name[7:])), st.mesh)
        conn.send(None if compiled is None else aot.hbm(compiled)["total"])
        return
    program, with_cost = next((p, c) for p, c in st.programs if p.name == name)
    conn.send(aot.plan_program(program, req.config, st.mesh, st.chip, with_cost=with_cost, capacity=st.capacity))


def compile_isolated(req: PlanRequest, name: str, timeout: float = 3600):
    """``_child`` in a spawned process: (its result, None), or (None, why) when the TPU compiler crashed it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(req, name, send), daemon=True)
    child.start()
    send.close()
    result, received = None, False
    try:
        if receive.poll(timeout):
            result, received = receive.recv(), True
    except EOFError:  # the child ended without a word
        pass
    child.join(60)
    if received and child.exitcode == 0:
        return result, None
    if child.exitcode is None:
        child.kill()
        return None, f"the compile took over {timeout:.0f} s"
    signal = -child.exitcode if child.exitcode < 0 else None
    if signal == 9:  # what the kernel's out-of-memory killer sends
        return None, "the compile was killed (signal 9: on Linux, most often this host running out of memory)"
    return None, (f"the TPU compiler crashed (signal {signal}) compiling this program" if signal
                  else f"the compile failed (exit {child.exitcode}); run with --in-process for its traceback")


def plan(config: ZayaConfig, topology_name: str, *, task: str, mesh_sizes: dict | None = None,
         serve: ServeSettings = ServeSettings(), train: TrainSettings = TrainSettings(), all_programs: bool = False,
         cost: bool = True, isolate: bool = True, progress=None) -> dict:
    """The plan of ``task`` for ``config`` on ``topology_name``, as the JSON ``zaya plan --json`` prints.

    ``cost``: False compiles each program at full size only (HBM and fit, no FLOPs or estimates: faster).
    ``isolate``: each compile in a child process, so that a crash of the TPU compiler on one program is that
    program's error in the plan (``fits`` false), not the end of the run."""
    req = PlanRequest(config, topology_name, task, tuple(sorted((mesh_sizes or {}).items())), serve, train,
                      all_programs, cost)
    st = setup(req)
    say = progress or (lambda _: None)
    chips = st.mesh.devices.size
    out = {"topology": topology_name, "chips": chips, "chip": dataclasses.asdict(st.chip),
           "capacity_bytes": st.capacity, "mesh": {a: int(st.mesh.shape[a]) for a in shd.AXES}, "task": task,
           "estimates": "roofline: max(flops / peak, bytes / HBM bandwidth) per chip, from the compiler's counts"}
    if st.train_state_bytes:
        out["train_state_bytes_per_chip"] = st.train_state_bytes
    reports: list[aot.ProgramReport] = []
    for program, with_cost in st.programs:
        say(f"compiling {program.name}")
        if isolate:
            r, crash = compile_isolated(req, program.name)
            if r is None:
                r = aot.ProgramReport(program.name, False, None, program.resident_bytes, None, None, None, None, 0.0,
                                      error=crash, note=program.note)
        else:
            r = aot.plan_program(program, config, st.mesh, st.chip, with_cost=with_cost, capacity=st.capacity)
        say(f"  {'fits' if r.fits else 'does not fit'}; {r.compile_seconds:.0f} s" + (f"; {r.error}" if r.error else ""))
        reports.append(r)
    first = reports[0]
    if task in ("train", "rl") and first.estimate_seconds:
        model_flops = 6 * active_params(config) * st.tokens
        out["train"] = {"tokens_per_step": st.tokens, "step_seconds_estimate": first.estimate_seconds,
                        "mfu_estimate": model_flops / (chips * st.chip.peak_flops * first.estimate_seconds),
                        "model_flops_per_step": model_flops}
    if st.serve is not None:
        decode_report = reports[1] if task == "rl" else reports[0]
        out["pool_bytes_per_chip"] = st.pool_bytes
        if decode_report.estimate_seconds:
            out["decode"] = {"slots": st.pool.slots, "step_seconds_estimate": decode_report.estimate_seconds,
                             "tokens_per_second_estimate": st.pool.slots / decode_report.estimate_seconds,
                             "bytes_over_minimum": decode_waste(decode_report, st.params, st.pool_bytes)}
    if task == "serve":
        say("finding max_slots")
        prefill_peak = max((r.hbm_bytes["total"] + r.resident_bytes for r in reports
                            if r.name.startswith("prefill") and r.hbm_bytes), default=0)

        def decode_total(n):
            say(f"  decode at {n} slots")
            if isolate:
                return compile_isolated(req, f"decode@{n}")[0]
            compiled, _, _ = aot.compile_for(functools.partial(st.decode_build, config, n), st.mesh)
            return None if compiled is None else aot.hbm(compiled)["total"]

        split = math.prod(st.mesh.shape[a] for a in shd.SLOT_POOL["batch"])
        found = max_slots(split, serve, decode_total, st.pool_bytes_at, prefill_peak, reports[0], st.capacity)
        out["max_slots"], out["max_slots_check"] = found.pop("max_slots"), found
    out["programs"] = [r.as_json() for r in reports]
    out["fits"] = all(r.fits for r in reports)
    return out
