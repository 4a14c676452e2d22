"""The training loop: compiled step, checkpoints, resume, metrics (JSONL + progress bar), final model.

Output directory::

    run.json          the run's settings; a resume must match them exactly

A run holds an exclusive lock on the directory (``zaya_jax.outputs.OutputLock``) from its first check of
it to its end: a second run on the same directory is refused, ``--resume`` and ``--force`` included.
    checkpoints/      orbax CheckpointManager steps (state + data position)
    metrics.jsonl     one line per step
    model/            the trained model, a `zaya convert`-style directory (zaya_jax.load / zaya export)

The host waits on the device only to read the previous step's metrics, after the next step has been
dispatched, so data loading and logging overlap the computation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from zaya_jax import checkpoint, dtypes, quant
from zaya_jax.config import ZayaConfig
from zaya_jax.memory import check_fits
from zaya_jax.model import cast_params
from zaya_jax.outputs import OutputLock

from . import checkpoints
from .data import Batches
from .step import TrainConfig, TrainState, full_params, init_state, make_train_step, state_shardings

_ABSENT = object()  # a setting a run.json section does not hold


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Loop settings beside the optimisation ones."""

    steps: int
    batch_size: int
    seq_len: int
    seed: int = 0
    save_every: int = 100
    keep: int = 3

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Sharded:
    """Shardings of the state, batch and metrics on a mesh (``zaya_jax.sharding``'s training preset)."""

    def __init__(self, mesh, config: ZayaConfig, state: TrainState, tcfg: TrainConfig, batch_size: int):
        from jax.sharding import NamedSharding, PartitionSpec

        from zaya_jax import sharding

        self.mesh = mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        params = sharding.param_shardings(config, mesh, sharding.TRAINING)
        self.state = state_shardings(state, params, replicated, tcfg)
        self.batch = self.batch_for(batch_size)
        self.metrics = replicated

    def batch_for(self, batch_size: int):
        """The sharding of a ``[batch_size, S]`` batch (split over the data axes where it divides)."""
        from zaya_jax import sharding

        return sharding.batch_sharding(self.mesh, 2, sharding.TRAINING, batch_size)


def _metrics_record(step: int, metrics: dict, seconds: float) -> dict:
    m = jax.device_get(metrics)
    record = {"step": step}
    for key, value in m.items():
        if key == "route_counts":
            continue
        record[key] = np.asarray(value, np.float64).round(6).tolist() if np.ndim(value) else float(value)
    record["step_time_s"] = round(seconds, 6)
    record["tokens_per_s"] = round(float(m["tokens"]) / max(seconds, 1e-9), 2)
    return record


OUTPUTS = ("checkpoints", "model", "metrics.jsonl", "run.json")  # what a run writes in its --out


def setting_defaults(**sections) -> dict:
    """``{section: {field: default}}`` of the dataclasses a run.json section records (``prepare_out``'s
    ``defaults``): a field added later defaults to what runs did before it existed."""
    return {name: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            for name, cls in sections.items()}


def changed_settings(saved: dict, settings: dict, defaults: dict | None = None) -> list[str]:
    """The settings that differ between a saved run.json and this run's, as ``section.field`` (or
    ``section``); a field the saved section lacks matches its value in ``defaults[section]``."""
    changed = []
    for section in sorted(set(saved) | set(settings)):
        then, now = saved.get(section, _ABSENT), settings.get(section, _ABSENT)
        if not (isinstance(then, dict) and isinstance(now, dict)):
            changed += [section] if then != now else []
            continue
        known = (defaults or {}).get(section, {})
        changed += [f"{section}.{k}" for k in sorted(set(then) | set(now))
                    if then.get(k, known.get(k, _ABSENT)) != now.get(k, _ABSENT)]
    return changed


def prepare_out(out: str, settings: dict, resume: bool, force: bool = False, defaults: dict | None = None) -> None:
    """Checks ``out`` for a run with ``settings``. A resume needs the saved run.json to match (a changed
    data file, by its sha256, is named as such; a field the saved run lacks matches at its ``defaults``
    value, see ``changed_settings``). A fresh run refuses an ``out`` that already holds any of
    ``OUTPUTS`` (they may be another run's, or the user's) unless ``force``, which deletes them; other
    files in ``out`` are left alone."""
    file = os.path.join(out, "run.json")
    if resume:
        if not os.path.exists(file):
            raise FileNotFoundError(f"cannot resume: {file} does not exist")
        try:
            with open(file, encoding="utf-8") as f:
                saved = json.load(f)
        except ValueError as e:  # invalid JSON or UTF-8
            raise ValueError(f"cannot resume: {file} is not a run.json this program wrote ({e})") from None
        if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
            raise ValueError(f"cannot resume: {file} is not a run.json this program wrote (an object of sections)")
        data_then, data_now = saved.get("data", {}), settings.get("data", {})
        if data_then.get("sha256") != data_now.get("sha256"):
            raise ValueError(f"cannot resume: the data file {data_now.get('data')} changed since the run started "
                             f"(sha256 {data_then.get('sha256')} then, {data_now.get('sha256')} now)")
        changed = changed_settings(saved, settings, defaults)
        if changed:
            raise ValueError(f"cannot resume: settings differ from the saved run in {', '.join(changed)}")
        return
    present = [name for name in OUTPUTS if os.path.lexists(os.path.join(out, name))]
    if present and not force:
        raise FileExistsError(f"{out} already holds {', '.join(present)}; pass --resume to continue the run there, "
                              "--force to start afresh (deleting them) or choose a new --out")
    for name in present:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(file, "w") as f:
        json.dump(settings, f, indent=2)


def open_out(out: str, settings: dict, resume: bool, force: bool = False, defaults: dict | None = None
             ) -> OutputLock:
    """``prepare_out`` under an exclusive lock on ``out``, returned held (release it when the run ends):
    one run writes a directory at a time. A missing ``out`` is made first, unless resuming (which needs
    the run's directory, and so is refused by ``prepare_out`` with nothing made)."""
    if resume and not os.path.isdir(out):
        prepare_out(out, settings, resume, force, defaults)
    os.makedirs(out, exist_ok=True)
    lock = OutputLock(out, "--out")
    try:
        prepare_out(out, settings, resume, force, defaults)
    except BaseException:
        lock.close()
        raise
    return lock


def truncate_log(file: str, last_step: int) -> None:
    """Keeps the log lines of steps up to ``last_step`` (those a resumed run does not redo); a line this
    program did not write is refused by file:line, before anything is rewritten."""
    if not os.path.exists(file):
        return
    kept = [line for line, record in _metrics_lines(file) if record["step"] <= last_step]
    with open(file, "w") as f:
        f.writelines(kept)


def _metrics_lines(file: str) -> list[tuple[str, dict]]:
    """(line, record) of each metrics line (NaN allowed: a diverged loss is logged as it was)."""
    lines = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise ValueError(f"{file}:{number} is not a metrics line of this program (a JSON object with an "
                                 "integer \"step\"); not resuming into it")
            lines.append((line, record))
    return lines


def last_metrics(out: str) -> dict:
    """The last record of ``out/metrics.jsonl`` ({} when it holds none: a resumed run with nothing left)."""
    file = os.path.join(out, "metrics.jsonl")
    lines = _metrics_lines(file) if os.path.exists(file) else []
    return lines[-1][1] if lines else {}


def step_memory_floor(config: ZayaConfig, tcfg: TrainConfig, run: RunConfig) -> int:
    """Bytes a train step needs at the least, beside the state: the batch's three int32 arrays and, per
    micro-batch, the hidden states the backward keeps at every layer boundary (even under full remat)."""
    tokens = run.batch_size * run.seq_len
    hidden = tokens // tcfg.grad_accum * config.hidden_size * np.dtype(dtypes.resolve(tcfg.compute_dtype)).itemsize
    return 3 * 4 * tokens + hidden * (config.num_hidden_layers + 1)


def train(config: ZayaConfig, params: dict, batches: Batches, tcfg: TrainConfig, run: RunConfig, out: str, *,
          resume: bool = False, force: bool = False, mesh=None, data_settings: dict | None = None,
          progress: bool = True, save_model: bool = True, assets_from: str | None = None) -> TrainState:
    """Trains ``params`` for ``run.steps`` steps (from the latest checkpoint when ``resume``).

    ``out`` must not hold another run's outputs unless ``resume`` or ``force`` (see ``prepare_out``).
    ``data_settings`` (e.g. the data file and its sha256) is recorded in run.json and must match on resume.
    Returns the final state; with ``save_model`` the trained params are written to ``out/model`` in the
    dtype ``params`` came in, with the tokenizer files of the model directory ``assets_from``.
    """
    quant.require_float(params, "training")
    settings = {"train": dataclasses.asdict(tcfg), "run": {k: v for k, v in dataclasses.asdict(run).items()
                                                           if k not in ("save_every", "keep")},
                "data": data_settings or {}}
    check_fits(step_memory_floor(config, tcfg, run), jax.devices() if mesh is None else mesh.devices.flat,
               f"a train step of {run.batch_size:,} x {run.seq_len:,} tokens")
    with open_out(out, settings, resume, force, setting_defaults(train=TrainConfig, run=RunConfig)):
        model_dtype = params["embed"].dtype
        state = init_state(params, tcfg)
        del params
        shard = Sharded(mesh, config, state, tcfg, run.batch_size) if mesh is not None else None
        if shard is not None:
            state = jax.device_put(state, shard.state)

        mngr = checkpoints.manager(os.path.join(out, "checkpoints"), save_every=run.save_every, keep=run.keep,
                                   asynchronous=mesh is None or mesh.size == 1)
        start = 0
        log_file = os.path.join(out, "metrics.jsonl")
        if resume:
            state, data_state, start = checkpoints.restore(mngr, state)
            batches.restore(data_state)
            truncate_log(log_file, start)

        step_fn = (make_train_step(config, tcfg) if shard is None else
                   make_train_step(config, tcfg, state_sharding=shard.state, batch_sharding=shard.batch,
                                   metrics_sharding=shard.metrics))
        bar = tqdm(total=run.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
        pending = None  # (step, metrics) dispatched but not yet read
        with open(log_file, "a") as log, (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            last = time.perf_counter()

            def flush():
                nonlocal last
                step_no, metrics = pending
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                record = _metrics_record(step_no, metrics, now - last)
                last = now
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")

            for step_no in range(start + 1, run.steps + 1):
                batch = next(batches)
                if shard is not None:
                    batch = jax.device_put(batch, shard.batch)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    flush()
                pending = (step_no, metrics)
                if shard is not None and mngr.should_save(step_no):
                    jax.block_until_ready(state)  # see checkpoints.manager: no collectives in flight during a save
                checkpoints.save(mngr, step_no, state, batches.state(), force=step_no == run.steps)
            if pending is not None:
                flush()
        bar.close()
        finish(mngr, config, state, model_dtype, out, save_model, assets_from)
        return state


def finish(mngr, config: ZayaConfig, state: TrainState, model_dtype, out: str, save_model: bool,
           assets_from: str | None) -> None:
    """Waits for the last checkpoint; with ``save_model``, writes the trained model to ``out/model`` in
    ``model_dtype`` (see ``save_model_dir``)."""
    mngr.wait_until_finished()
    mngr.close()
    if save_model:
        save_model_dir(config, cast_params(full_params(state), model_dtype), os.path.join(out, "model"), assets_from)



def save_model_dir(config: ZayaConfig, params: dict, directory: str, assets_from: str | None) -> None:
    """``params`` as a converted model directory (``zaya_jax.load``, ``zaya export``), with the tokenizer
    files and chat template of ``assets_from``."""
    from zaya_jax.convert.pipeline import copy_assets

    checkpoint.save(directory, config, jax.device_get(params), force=True)
    copy_assets(assets_from, directory)
