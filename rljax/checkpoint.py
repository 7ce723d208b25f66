"""Checkpoints of a full training state (any pytree with a `step`, e.g. TrainState or
RLState: params, optimizer, keys, counters) plus JSON metadata.

A thin wrapper over orbax's CheckpointManager: saves are asynchronous (the
train loop continues while arrays are written), the last `keep` are kept, and
orbax writes each step into a temporary directory that is renamed only when
complete, so a run killed mid-save never leaves a partial checkpoint that
`latest_step` would pick. Restore places every array on the shardings of an
abstract target, i.e. onto the current mesh, whatever mesh wrote it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; when the block finishes, rename it to `path`
    (atomic on one file system), so readers see the old file or the whole new one, never
    a partial write. On an error the temporary file is removed and `path` is untouched."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def digest_params(params, h) -> None:
    """Feed every leaf of `params` (path, dtype, shape, bytes) to the hashlib object `h`: a
    fingerprint that tells whether cached data were made with these exact parameters."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state):
    """Typed PRNG keys (anywhere in the state) are stored as their raw uint32 data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _from_saved(saved, target):
    return jax.tree.map(lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else s,
                        saved, target)


def _abstract(target):
    """ShapeDtypeStructs, with shardings, of the saveable form of a concrete `target`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _to_saveable(target))


class Checkpointer:
    """`Checkpointer(directory, keep=3)`; `save(state, meta)`, `restore(target)`, `latest_step()`."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state, meta: dict[str, Any] | None = None, *, step: int | None = None,
             force: bool = False) -> bool:
        """Start saving `state` (and JSON-able `meta`, e.g. the data position) at `step`
        (default: state.step). Returns at once; `wait()` blocks until written."""
        step = int(jax.device_get(state.step)) if step is None else int(step)
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta or {})), force=force)

    def restore(self, target, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the structure, dtypes and shardings of `target` (a freshly created
        TrainState, RLState, ... on the current mesh). Returns (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
        return _from_saved(out.state, target), dict(out.meta or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_latest(target, directory: str):
    """`target` restored from the latest checkpoint in `directory`, or `target` itself when
    there is none (for multi-phase runs that find out how far a killed run got)."""
    with Checkpointer(directory) as ckpt:
        if ckpt.latest_step() is None:
            return target
        state, _ = ckpt.restore(target)
    return state
