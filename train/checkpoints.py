"""Training checkpoints with an orbax ``CheckpointManager``: the ``TrainState`` (params, optimizer state,
balancing biases, step) and the data position, every ``save_every`` steps, the last ``keep`` kept.

Orbax writes each step into a temporary directory and renames it only once every item is complete, so
a save cut short (a killed process) leaves no step that ``latest_step`` reports; leftovers are removed
when the next manager opens the directory.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from .step import TrainState


def manager(directory: str, *, save_every: int, keep: int, asynchronous: bool = True) -> ocp.CheckpointManager:
    """``asynchronous``: write in the background while training goes on. Turn it off for multi-device
    meshes: orbax finishes a save with a cross-device barrier from its own thread, which can interleave
    with the train step's collectives and deadlock (seen on XLA:CPU with 8 devices)."""
    if save_every < 1 or keep < 1:
        raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """Starts an (asynchronous) save when ``step`` is on the interval or ``force``; True if one started."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state)), force=force)


def restore(mngr: ocp.CheckpointManager, like: TrainState, step: int | None = None) -> tuple[TrainState, dict, int]:
    """(state, data state, step) of ``step`` (default: the latest complete checkpoint).

    ``like`` is a state (or ``jax.eval_shape`` of one) with the shapes, dtypes and shardings to restore into.
    On failure ``mngr`` is closed before the error propagates.
    """
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {mngr.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                         data=ocp.args.JsonRestore()))
    except BaseException:
        mngr.close()  # else its background threads outlive the error and print a traceback at exit
        raise
    return out.state, out.data, step
