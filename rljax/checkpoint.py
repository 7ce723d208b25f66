"""Checkpoints of a full training state (any pytree with a `step`, e.g. TrainState or
RLState: params, optimizer, keys, counters) plus JSON metadata.

A thin wrapper over orbax's CheckpointManager: saves are asynchronous (the
train loop continues while arrays are written), the last `keep` are kept, and
orbax writes each step into a temporary directory that is renamed only when
complete, so a run killed mid-save never leaves a partial checkpoint that
`latest_step` would pick. Restore places every array on the shardings of an
abstract target, i.e. onto the current mesh, whatever mesh wrote it.

Damaged checkpoints. Orbax renames a step directory only when it is complete, but
nothing stops the files from being damaged later (a truncated or deleted file, a lost
metadata file, bit rot), and orbax either fails with a long traceback or, for bytes
changed inside a data file, restores wrong numbers silently. So every save also records
a digest of the state's values (`state_digest`, computed on the devices) and of the meta
in the JSON meta, and `restore` recomputes both from what it read. A step that cannot be
read, or whose digests differ, is damaged: `restore()` names it in one line and falls back to the previous
step (`on_damaged="fallback"`, the default; the damaged directory is renamed to
`<step>.damaged`, kept for inspection and never picked again) or raises
`DamagedCheckpointError` (`on_damaged="raise"`). It never returns damaged state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rljax import distributed


def _ocp():
    """`orbax.checkpoint`, imported when a Checkpointer is first made rather than with this module:
    it loads tensorstore (about 25 MiB resident and 0.2 s on an AVX2 EPYC), which a process that never
    saves (a benchmark, a notebook computing losses, anything importing `atomic_path` or
    `digest_params`) need not carry."""
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; when the block finishes, rename it to `path`
    (atomic on one file system), so readers see the old file or the whole new one, never
    a partial write. On an error the temporary file is removed and `path` is untouched. The temporary
    name is unique to the call (a random suffix, not the process id alone: processes on several hosts
    writing to a shared file system can have the same id, and would write into one temporary file)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, value, *, indent: int = 2, default=None) -> None:
    """json.dump `value` to `path` atomically (`atomic_path`): a crash leaves the old file or none."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(value, f, indent=indent, default=default)


def digest_params(params, h) -> None:
    """Feed every leaf of `params` (path, dtype, shape, bytes) to the hashlib object `h`: a
    fingerprint that tells whether cached data were made with these exact parameters. Arrays that
    span processes are gathered (`rljax.distributed.to_host`: every process calls this at the same
    point), so every process computes the same digest."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(distributed.to_host(params))[0]:
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())


def _rename_all(moves: list[tuple[str, str]]) -> None:
    for old, new in moves:
        os.rename(old, new)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(state):
    """Typed PRNG keys (anywhere in the state) are stored as their raw uint32 data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _from_saved(saved, target):
    return jax.tree.map(lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if _is_key(t) else s,
                        saved, target)


def _abstract(target, dtypes: dict | None = None):
    """ShapeDtypeStructs, with shardings, of the saveable form of a concrete `target`; dtypes: {leaf name:
    dtype} to read instead of the target's (`_leaf_name`)."""
    dtypes = dtypes or {}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes.get(_leaf_name(p), x.dtype), sharding=x.sharding),
        _to_saveable(target))


def _leaf_name(path) -> str:
    """A leaf's dotted name as orbax records it in a checkpoint's metadata ("params.layers.attn.q_proj",
    "opt_state.1.0.mu.embedding")."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


class CheckpointMismatchError(ValueError):
    """A checkpoint that holds another state than the one given to restore it into (other leaves or
    shapes): the checkpoint is intact, the target is not what was saved (another model, head,
    optimizer or configuration). The message names the leaves."""


def _arrays(target) -> dict[str, tuple]:
    """{leaf name: (shape, dtype)} of the saveable form of `target`, as `Checkpointer._saved_arrays` reads a step's."""
    return {_leaf_name(p): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(_to_saveable(target))[0]}


def _mismatch(saved: dict, mine: dict) -> str | None:
    """What differs between a checkpoint's arrays and a target's (both {name: (shape, dtype)}, `_arrays`), in
    leaves and shapes (dtypes may differ: restore casts), or None."""
    def order(names):  # the parameters first: they say which model it was
        return sorted(names, key=lambda n: (not n.startswith("params."), n))

    missing, extra = order(set(mine) - set(saved)), order(set(saved) - set(mine))
    shapes = [f"{n} {saved[n][0]} saved, {mine[n][0]} given" for n in order(set(mine) & set(saved))
              if saved[n][0] != mine[n][0]]

    def some(names):
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    parts = ([f"not in the checkpoint: {some(missing)}"] if missing else []) + \
        ([f"in the checkpoint only: {some(extra)}"] if extra else []) + \
        ([f"other shapes: {some(shapes)}"] if shapes else [])
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- digest of a state
# Odd multipliers (Knuth's golden-ratio constant and two MurmurHash3 finaliser constants).
_M1, _M2, _M3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _words(x):
    """The bits of array `x` as uint32 words: one per element, two per element of an 8-byte type
    (a trailing axis of 2); bool and sub-byte integers are widened first."""
    dt = x.dtype
    if dt == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(dt, jnp.complexfloating):
        return _words(jnp.stack([x.real, x.imag], axis=-1))
    if jnp.issubdtype(dt, jnp.integer) and jnp.iinfo(dt).bits < 8:  # int4, uint4, ...: exact in int32
        return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)
    if dt.itemsize in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[dt.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x):
    """Two position-weighted sums, mod 2**32, of the words of `x`: [sum w_i * x_i, sum v_i * mix(x_i)].

    Integer sums are exact whatever the order, so the result does not depend on how the array
    is sharded or which mesh holds it, and XLA computes it on the devices (a reduction, with
    collectives across processes when the array spans them). The weights are odd, hence
    invertible mod 2**32, so a change to any one element always changes both sums; the
    position in the weights makes swapped elements count too. Not a cryptographic hash: it
    detects damage, not deliberate forgery."""
    w = _words(x)
    idx = jnp.zeros(w.shape, jnp.uint32)  # row-major flat position, without a reshape (which could reshard)
    for d, n in enumerate(w.shape):
        idx = idx * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d)
    mixed = (w ^ (w >> 16)) * jnp.uint32(_M3)
    mixed = mixed ^ (mixed >> 13)
    s1 = jnp.sum(w * (idx * jnp.uint32((2 * _M1) % 2**32) + 1), dtype=jnp.uint32)
    s2 = jnp.sum(mixed * (idx * jnp.uint32((2 * _M2) % 2**32) + 1), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


# The sums of every leaf spread over several processes, as one program: one small program per leaf,
# launched one after another and waited for together, deadlocked XLA:CPU's gloo collectives (a process
# in one leaf's reduction while the other waited in the next one's, or already in orbax's barrier).
_jit_spread_sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def _host_words(x: np.ndarray) -> np.ndarray:
    """`_words` in numpy, bit for bit (checked by tests/test_checkpoint_damage.py)."""
    dt = x.dtype
    if dt == np.bool_:
        return x.astype(np.uint32)
    if np.issubdtype(dt, np.complexfloating):
        return _host_words(np.stack([x.real, x.imag], axis=-1))
    if jnp.issubdtype(dt, jnp.integer) and jnp.iinfo(dt).bits < 8:
        return x.astype(np.int32).view(np.uint32)
    x = np.ascontiguousarray(x)
    if dt.itemsize == 4:
        return x.view(np.uint32)
    if dt.itemsize == 8:  # little-endian words, low first, as XLA's bitcast to a trailing axis of 2
        return x.view(np.uint32).reshape(x.shape + (2,))
    return x.view({1: np.uint8, 2: np.uint16}[dt.itemsize]).astype(np.uint32)


def _host_leaf_sums(x: np.ndarray) -> np.ndarray:
    """`_leaf_sums` in numpy: the same two sums (uint32 arithmetic wraps mod 2**32 in both)."""
    w = _host_words(x)
    idx = (np.arange(w.size, dtype=np.uint64) % 2**32).astype(np.uint32).reshape(w.shape)
    with np.errstate(over="ignore"):  # the wrap is the point; numpy warns on it for scalars (a 0-d int4 leaf)
        mixed = (w ^ (w >> np.uint32(16))) * np.uint32(_M3)
        mixed = mixed ^ (mixed >> np.uint32(13))
        s1 = np.sum(w * (idx * np.uint32((2 * _M1) % 2**32) + np.uint32(1)), dtype=np.uint32)
        s2 = np.sum(mixed * (idx * np.uint32((2 * _M2) % 2**32) + np.uint32(1)), dtype=np.uint32)
    return np.stack([s1, s2])


def _spread(leaf) -> bool:
    return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def _all_sums(leaves) -> list:
    """Every leaf's two sums: in numpy for a leaf this process holds all of (one process: no
    compile, which would cost about a second per new leaf shape, and the checkpoint's writer
    copies the arrays to the host anyway), on the devices for the leaves spread over several
    processes, where XLA reduces across processes (all of them in one program, `_jit_spread_sums`)."""
    spread = [leaf for leaf in leaves if _spread(leaf)]
    device = iter(jax.device_get(_jit_spread_sums(spread)) if spread else ())
    return [next(device) if _spread(leaf) else _host_leaf_sums(np.asarray(jax.device_get(leaf))) for leaf in leaves]


def json_digest(value) -> str:
    """A short digest of a JSON-able value (sha256 of its sorted JSON, 16 hex digits; objects JSON cannot
    write count by their repr): what a pipeline stage saves of its inputs (problem sets, configs) so a
    rerun with other ones is refused."""
    return hashlib.sha256(json.dumps(value, default=repr, sort_keys=True).encode()).hexdigest()[:16]


def state_digest(state) -> str:
    """A digest of every array of `state`: its path, dtype, shape and two 32-bit position-weighted
    sums of its bits, hashed together with sha256 ("fp1:<hex>").

    Checkpointer.save stores it with each checkpoint and restore compares it with the arrays it
    read. Why sums computed on the devices rather than sha256 over the bytes on the host
    (`digest_params`) or over the checkpoint's files: the sums need no copy of the state to the
    host, on many processes each holding only its own shards they are one XLA reduction whose
    result every process gets, they are the same whatever mesh or sharding holds the arrays
    (a checkpoint restores onto another mesh), and they check the values restore actually
    returns, whatever orbax's file layout; a manifest of file hashes would have to wait for the
    asynchronous write to finish and would tie the check to orbax's files. Cost: one read of
    the state on its devices per save and per restore, plus, for arrays
    spread over several processes, one compile per state structure (shapes, dtypes, shardings)."""
    flat = jax.tree_util.tree_flatten_with_path(_to_saveable(state))[0]
    sums = _all_sums([leaf for _, leaf in flat])
    h = hashlib.sha256()
    for (path, leaf), (s1, s2) in zip(flat, sums):
        h.update(f"{jax.tree_util.keystr(path)}|{np.dtype(leaf.dtype)}|{tuple(leaf.shape)}|{int(s1)}|{int(s2)}\n"
                 .encode())
    return "fp1:" + h.hexdigest()


# ----------------------------------------------------------------------------- damaged checkpoints
# In the JSON meta, removed before restore returns it: {"state": state_digest(state), "meta": sha256
# of the caller's meta as JSON}, so a changed data position is caught as well as changed arrays.
_DIGEST_KEY = "_rljax_digest"


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class DamagedCheckpointError(RuntimeError):
    """A checkpoint step that cannot be read or whose arrays differ from the digest saved with
    them. `.paths` lists the damaged step directories; the message is one line naming them."""

    def __init__(self, message: str, paths=()):
        super().__init__(message)
        self.paths = list(paths)


class DamagedCheckpointWarning(UserWarning):
    """Restore found a damaged checkpoint and fell back to an older one."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line` of the innermost exception that `e` was raised from: orbax wraps the
    reader's own error (e.g. 'Error reading "params.w/0.0" ...: Truncated Zstd-compressed stream')
    in one whose message is a 60-line TensorStore spec."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    root = seen[-1]
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Files orbax (0.12) writes in every step and needs to restore it, relative to the step directory: a
# missing one is named first, because orbax's own error for it can be far from the cause (a lost state/_METADATA
# surfaces as a pytree structure error).
_EXPECTED_FILES = (os.path.join("state", "_METADATA"),
                   os.path.join("state", "manifest.ocdbt"), os.path.join("meta", "metadata"))


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process. A process reads only its own shards, so a damaged
    file may fail the read on some processes only; all must then agree to skip the step."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


class Checkpointer:
    """`Checkpointer(directory, keep=3, on_damaged="fallback")`; `save(state, meta)`,
    `restore(target)`, `latest_step()`.

    on_damaged: what `restore()` (of the latest step) does when that step is damaged (a file
    missing or truncated, orbax's metadata lost, or arrays that differ from the digest saved with
    them). "fallback": warn (DamagedCheckpointWarning) naming the step directory and what was
    wrong, try the previous step, and so on; once a good step is restored the damaged ones are
    renamed `<step>.damaged` (kept for inspection, delete them by hand) so that they are never
    picked again and training can save those step numbers anew. "raise": raise
    DamagedCheckpointError naming it, and change nothing on disk. Either way, when no step can be
    restored, DamagedCheckpointError names them all and nothing is renamed (the target may simply
    not match what was saved).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, on_damaged: str = "fallback"):
        if on_damaged not in ("fallback", "raise"):
            raise ValueError(f"Checkpointer: on_damaged must be 'fallback' or 'raise', got {on_damaged!r}")
        self.directory = os.path.abspath(directory)
        self.on_damaged = on_damaged
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # The name of the barrier that ends orbax's (0.12) restore: its async checkpointer turns a
        # None key prefix into "", the synchronous one keeps None (no prefix).
        prefix = options.multiprocessing_options.barrier_sync_key_prefix
        if async_save and prefix is None:
            prefix = ""
        self._restore_barrier = "Checkpointer:restore" if prefix is None else f"{prefix}_Checkpointer:restore"

    def latest_step(self) -> int | None:
        """The newest step on disk, not yet checked for damage; after `restore()` fell back it is the
        step restored (the damaged newer ones were set aside)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_path(self, step: int) -> str:
        """The directory of `step` (orbax's default naming: the step number)."""
        return os.path.join(self.directory, str(int(step)))

    def save(self, state, meta: dict[str, Any] | None = None, *, step: int | None = None,
             force: bool = False) -> bool:
        """Start saving `state` (and JSON-able `meta`, e.g. the data position) at `step`
        (default: state.step), with digests of both in the meta for restore to check.
        Returns at once; `wait()` blocks until written."""
        meta = dict(meta or {})
        if _DIGEST_KEY in meta:
            raise ValueError(f"Checkpointer.save: meta key {_DIGEST_KEY!r} is reserved for the digests")
        step = int(jax.device_get(state.step)) if step is None else int(step)
        if not force and not self._manager.should_save(step):
            return False  # as orbax would answer, without computing the digest
        meta[_DIGEST_KEY] = {"state": state_digest(state), "meta": _meta_digest(meta)}
        ocp = _ocp()
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_saveable(state)), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, target, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the structure, dtypes and shardings of `target` (a freshly created
        TrainState, RLState, ... on the current mesh). Returns (state, meta).

        Without `step`: the latest good step, as `on_damaged` says (the state's own `step`, or
        the meta, tell which step that was). With `step`: that step, or DamagedCheckpointError
        when it is damaged (no fallback: the caller asked for that one). Checkpoints written
        before digests were saved are read without the digest check."""
        if step is not None:
            if int(step) not in self.all_steps():
                raise FileNotFoundError(f"no checkpoint of step {int(step)} in {self.directory}")
            return self._restore_step(target, int(step))
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged: list[DamagedCheckpointError] = []
        for s in steps:
            try:
                restored = self._restore_step(target, s)
            except DamagedCheckpointError as e:
                if self.on_damaged == "raise":
                    raise
                damaged.append(e)
                warnings.warn(f"{e}; trying the previous checkpoint", DamagedCheckpointWarning, stacklevel=2)
                continue
            if damaged:
                moved = self._set_aside([p for e in damaged for p in e.paths])
                warnings.warn(f"restored {self.step_path(s)} instead; damaged, renamed: "
                              + ", ".join(f"{a} -> {b}" for a, b in moved), DamagedCheckpointWarning, stacklevel=2)
            return restored
        mismatch = all(any(w in str(e).lower() for w in ("structure", "shape", "mismatch")) for e in damaged)
        hint = (" Every step fails on the structure or shapes of the state: the checkpoints are likely intact "
                "and hold another model, optimizer or configuration than the state given to restore them into "
                "(a run directory holds one run)") if mismatch else \
            " (if they all fail alike, the target may not match what was saved)"
        raise DamagedCheckpointError(
            f"no checkpoint in {self.directory} can be restored, every step is damaged or unreadable: "
            + "; ".join(str(e) for e in damaged) + hint,
            paths=[p for e in damaged for p in e.paths]) from damaged[0]

    def _saved_arrays(self, step: int) -> dict[str, tuple] | None:
        """{leaf name: (shape, dtype)} of the arrays checkpoint `step` holds, from its metadata; None when
        that cannot be read (the restore then says what is wrong with the step)."""
        from etils import epath  # orbax's own path type

        try:  # the handler reads the step's state/_METADATA (the manager's item_metadata needs a registered one)
            tree = _ocp().StandardCheckpointHandler().metadata(epath.Path(os.path.join(self.step_path(step), "state")))
            leaves = [leaf for _, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
            saved = {leaf.name: (tuple(leaf.shape), np.dtype(leaf.dtype)) for leaf in leaves}
        except Exception:  # noqa: BLE001 - damaged or older metadata: the restore itself reports it
            return None
        return saved or None

    def _restore_step(self, target, step: int) -> tuple[Any, dict[str, Any]]:
        """Restore `step`, or raise DamagedCheckpointError (one line, the original chained). A target of
        other leaves or shapes than the step's is a CheckpointMismatchError naming them (the step is
        intact); leaves of another dtype are read as saved (so the digest checks what was written) and
        then cast to the target's."""
        path = self.step_path(step)
        ocp = _ocp()
        saved, mine = self._saved_arrays(step), _arrays(target)
        if saved is not None:
            differs = _mismatch(saved, mine)
            if differs:
                raise CheckpointMismatchError(f"checkpoint {path} holds another state than the one given to "
                                              f"restore it into ({differs}): it was saved by another model, "
                                              "head, optimizer or configuration (a run directory holds one run)")
        cast = {} if saved is None else {n: saved[n][1] for n, (_, dtype) in mine.items() if dtype != saved[n][1]}
        error = None
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target, cast)), meta=ocp.args.JsonRestore()))
        except MemoryError:  # not the checkpoint's fault
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read a step means it cannot be used
            error = e
            if jax.process_count() > 1:
                # orbax's restore ends at a barrier where the processes that read their shards now
                # wait; one that failed meets them there, then all take part in the agreement below.
                ocp.multihost.sync_global_processes(self._restore_barrier)
        if not _everywhere(error is None):
            reason = _one_line(error) if error is not None else "unreadable on another process"
            missing = [f for f in _EXPECTED_FILES if not os.path.exists(os.path.join(path, f))]
            if missing:
                reason = f"{', '.join(missing)} missing; {reason}"
            raise DamagedCheckpointError(f"checkpoint {path} is damaged or unreadable ({reason})",
                                         paths=[path]) from error
        meta = dict(out.meta or {})
        expected = meta.pop(_DIGEST_KEY, None)
        if expected is not None:  # None: saved before digests were
            found = state_digest(out.state)
            if found != expected.get("state"):
                raise DamagedCheckpointError(
                    f"checkpoint {path} is damaged: the arrays read differ from the digest saved with them "
                    f"({found[:16]}... != {str(expected.get('state'))[:16]}...)", paths=[path])
            if _meta_digest(meta) != expected.get("meta"):
                raise DamagedCheckpointError(f"checkpoint {path} is damaged: its meta ({meta}) differs from the "
                                             "digest saved with it", paths=[path])
        state = out.state
        if cast:  # read as saved, checked; now in the target's dtypes
            state = jax.tree.map(lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, state,
                                 _abstract(target))
        return _from_saved(state, target), meta

    def _set_aside(self, paths: list[str]) -> list[tuple[str, str]]:
        """Rename each damaged step directory to `<step>.damaged` (`.damaged-2`, ... if taken): orbax
        no longer lists it, a new save of that step does not collide with it, and `keep` counts
        only good steps. One process renames; all wait for it and re-read the step list.
        Returns the (old, new) names."""
        moved = []
        for path in paths:
            new, n = f"{path}.damaged", 1
            while os.path.exists(new):
                n += 1
                new = f"{path}.damaged-{n}"
            moved.append((path, new))
        distributed.sync("rljax.checkpoint: damaged steps named")  # all chose their names before one renames
        distributed.on_main(f"setting aside damaged steps in {self.directory}", _rename_all, moved)
        self._manager.reload()
        return moved

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_latest(target, directory: str, *, on_damaged: str = "fallback"):
    """`target` restored from the latest good checkpoint in `directory` (see Checkpointer's
    on_damaged), or `target` itself when there is none (for multi-phase runs that find out how
    far a killed run got)."""
    with Checkpointer(directory, on_damaged=on_damaged) as ckpt:
        if ckpt.latest_step() is None:
            return target
        state, _ = ckpt.restore(target)
    return state
