"""Multi-process (multi-host) setup: one Python process per host, all devices in one mesh.

Every process runs the same program. `initialize` connects the processes
(before any other JAX call), after which `jax.devices()` lists the devices of
all processes, `rljax.sharding.make_mesh` builds one global mesh over them, and
jitted steps run as one SPMD program.

Who passes what:

- the phases (`rljax.phases`: sft, reward model, preference, rl, oreo) and the RL
  iteration (`rljax.rl.make_rl_iteration`) take the *global* batch on every process:
  each process's data must give the same batches (e.g. a `BatchIterator` built from the
  same rows with the same seed), and each process keeps its own rows of them
  (`local_rows`), so n processes compute exactly what one process does with the same
  mesh. Only process 0 writes metrics.jsonl / TensorBoard / W&B and prints; every
  process runs the steps, the evaluations and the (collective) checkpoints.
- the decoders (`rljax.sampling.sample`, `beam_search`, `value_guided_beam_search`) and the
  helpers on them (`rljax.eval.complete`, `evaluate_policy`, rejection sampling, trajectory
  collection) also take the *global* prompts on every process; each process decodes its own
  block of rows and the results are global arrays (the helpers return every text everywhere).
- `rljax.sharding.shard_batch`, the low-level call, takes each process's *own* rows
  (`local_rows(global_batch)`, i.e. rows `process_slice(B)`) and assembles one global
  array with `jax.make_array_from_process_local_data`. The mesh must give each process
  its own block of rows (data x fsdp split over the processes); `shard_batch` refuses
  one that does not.
- `share_text` gives every process process 0's text (a run directory process 0 named by its clock,
  `rljax.cli.make_run_dir`); `on_main` runs work process 0 does for all (a file every process then
  reads) and agrees on its outcome, so that a failure there (a full disk) stops every process, not
  process 0 alone with the others waiting for it in the next collective.
- `to_host` brings arrays that span processes (a step's outputs, sampled tokens) back
  to numpy on every process.
- work each process does alone on rows of its own (a learned reward scoring the samples it
  drew: the RL iteration gives its reward function only the process's own rows) runs on the
  process's own devices: `process_local(model, params)` gives the model on `local_mesh` and the
  params' global values placed there. The learned scorers (`rljax.rewards.learned`, the judge,
  the discriminator reward) do this when they are built, so build them on every process at the
  same point.

Launching two processes on one machine (CPU, two simulated devices each)::

    # train.py
    import jax
    from rljax import distributed
    from rljax.sharding import make_mesh, shard_batch

    distributed.initialize()              # reads RLJAX_* / JAX_* variables; no-op on one process
    mesh = make_mesh(data=2, fsdp=2)      # 4 devices over both processes
    ...
    local = distributed.local_rows(global_host_batch)   # rows process_slice(B) of each array
    state, metrics = step(state, shard_batch(local, mesh))
    if distributed.is_main_process():
        print(float(metrics["loss"]))

    $ export XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu
    $ RLJAX_COORDINATOR=127.0.0.1:12345 RLJAX_NUM_PROCESSES=2 RLJAX_PROCESS_ID=0 python train.py &
    $ RLJAX_COORDINATOR=127.0.0.1:12345 RLJAX_NUM_PROCESSES=2 RLJAX_PROCESS_ID=1 python train.py

or explicitly, in each process i: ``distributed.initialize("127.0.0.1:12345", 2, i)``; in a Cloud TPU
pod, a SLURM job or an Open MPI launch, ``RLJAX_DISTRIBUTED=auto`` lets JAX find the three settings.
On several hosts the coordinator address is one reachable by all (process 0's host); every process
uses the same address. The usual JAX variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) are read too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rljax.sharding import make_mesh, param_shardings, placement, replicated

# "auto": with none of the settings below given, let JAX find them (a Cloud TPU pod, SLURM or Open MPI job)
AUTO_ENV_VAR = "RLJAX_DISTRIBUTED"
# setting -> environment variables read when the argument is None (first set one wins)
ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator_address": ("RLJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("RLJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("RLJAX_PROCESS_ID", "JAX_PROCESS_ID"),
}


def _from_env(setting: str) -> tuple[str | None, str | None]:
    """(value, variable name) of the first non-empty variable for `setting`."""
    for var in ENV_VARS[setting]:
        value = os.environ.get(var, "").strip()
        if value:
            return value, var
    return None, None


def _as_int(setting: str, value, source: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"distributed.initialize: {setting} must be an integer, got {value!r} (from {source})")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"distributed.initialize: {setting} must be an integer, got {value!r} "
                         f"(from {source})") from None


def _resolve(coordinator_address, num_processes, process_id):
    """The three settings from arguments, else the environment, with where each came from."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    values, sources = {}, {}
    for setting, value in given.items():
        if value is not None:
            values[setting], sources[setting] = value, "argument"
        else:
            values[setting], sources[setting] = _from_env(setting)
    return values, sources


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: int | Sequence[int] | None = None) -> bool:
    """Connect this process to the others; returns True when running multi-process.

    Each setting comes from its argument, else from the environment:

      coordinator_address  RLJAX_COORDINATOR, else JAX_COORDINATOR_ADDRESS ("host:port")
      num_processes        RLJAX_NUM_PROCESSES, else JAX_NUM_PROCESSES
      process_id           RLJAX_PROCESS_ID, else JAX_PROCESS_ID (0 .. num_processes - 1)

    Nothing set, or num_processes == 1: a no-op returning False (single process), unless
    RLJAX_DISTRIBUTED=auto: then JAX finds the settings itself on a Cloud TPU pod, a SLURM job
    or an Open MPI launch (`jax.distributed.initialize()` without arguments; its coordinator
    port may be set with JAX_COORDINATOR_PORT), and this returns whether there are several
    processes; where JAX finds none, a RuntimeError names the variables to set instead.
    Otherwise calls `jax.distributed.initialize` (which must come before any other
    JAX computation in the process) and returns True. Calling again once
    initialised returns True and does nothing. Raises ValueError when only some
    of the settings are given (the error names the missing ones), or when they
    are out of range. `local_device_ids` restricts this process to some of its
    local devices (e.g. one GPU per process).

        >>> distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # on host 0
        >>> distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=1)  # on host 1
    """
    if jax.distributed.is_initialized():
        return True
    values, sources = _resolve(coordinator_address, num_processes, process_id)
    if all(v is None for v in values.values()):
        return _initialize_auto(local_device_ids)
    n = None
    if values["num_processes"] is not None:
        n = _as_int("num_processes", values["num_processes"], sources["num_processes"])
        if n < 1:
            raise ValueError(f"distributed.initialize: num_processes must be >= 1, got {n} "
                             f"(from {sources['num_processes']})")
    pid = None
    if values["process_id"] is not None:
        pid = _as_int("process_id", values["process_id"], sources["process_id"])
        if pid < 0 or (n is not None and pid >= n):
            raise ValueError(f"distributed.initialize: process_id must be in [0, num_processes), got "
                             f"process_id={pid} with num_processes={n}")
    if n == 1:
        return False  # one process: nothing to connect
    missing = [s for s, v in values.items() if v is None]
    if missing:
        named = ", ".join(f"{s} (argument or {' / '.join(ENV_VARS[s])})" for s in missing)
        given = ", ".join(f"{s}={values[s]!r} (from {sources[s]})" for s in values if values[s] is not None)
        raise ValueError(f"distributed.initialize: a multi-process setup needs coordinator_address, "
                         f"num_processes and process_id; missing {named}; given {given}")
    address = str(values["coordinator_address"])
    if ":" not in address:
        raise ValueError(f"distributed.initialize: coordinator_address must be 'host:port', got {address!r} "
                         f"(from {sources['coordinator_address']})")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid,
                               local_device_ids=local_device_ids)
    return True


def _initialize_auto(local_device_ids) -> bool:
    """initialize() with no setting given: a no-op (False), or with RLJAX_DISTRIBUTED=auto JAX's own
    cluster detection."""
    mode = os.environ.get(AUTO_ENV_VAR, "").strip()
    if mode.lower() in ("", "off"):
        return False
    if mode.lower() != "auto":
        raise ValueError(f"distributed.initialize: {AUTO_ENV_VAR}={mode!r}: 'auto' lets JAX find the processes "
                         f"(a Cloud TPU pod, SLURM or Open MPI job); unset or 'off': one process unless "
                         f"{ENV_VARS['coordinator_address'][0]} and the others are set")
    try:
        jax.distributed.initialize(local_device_ids=local_device_ids)
    except (ValueError, RuntimeError) as e:
        named = ", ".join(names[0] for names in ENV_VARS.values())
        raise RuntimeError(f"distributed.initialize: {AUTO_ENV_VAR}=auto, but JAX found no cluster to join ({e}); "
                           f"set {named} instead, or unset {AUTO_ENV_VAR} to run one process") from e
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes checkpoints' metadata, ...)."""
    return jax.process_index() == 0


def say(message: str, *, everywhere: bool = False) -> None:
    """Print a message once: on process 0 of a multi-process run (every process runs the same program
    and would print it n times), on every process with `everywhere` (a message about this process
    alone, e.g. its own failure)."""
    if everywhere or is_main_process():
        print(message, flush=True)


def process_slice(global_batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
    """This process's contiguous rows of a global batch of `global_batch_size` rows.

    Process i of n gets rows [i * B/n, (i + 1) * B/n): the rows `rljax.sharding.shard_batch`
    expects from it. That holds on a mesh whose batch axes (data x fsdp) split the rows over
    the processes, each process's devices holding only rows of its own block (as `make_mesh`
    lays them out when data x fsdp is a multiple of the process count and tensor divides each
    process's device count); on any other mesh `shard_batch` raises a ValueError naming it,
    since processes passing different rows where the sharding keeps the same rows would
    build an array whose contents differ from process to process.

        >>> rows = process_slice(8)            # process 1 of 2: slice(4, 8)
        >>> local = jax.tree.map(lambda x: x[rows], global_batch)   # = local_rows(global_batch)
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_slice: need 0 <= process_index < process_count, got {index} and {count}")
    if global_batch_size < 0 or global_batch_size % count:
        raise ValueError(f"process_slice: global batch size {global_batch_size} is not divisible by the "
                         f"process count {count}")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def local_rows(batch: Any) -> Any:
    """This process's rows of a host batch: every array leaf `x` [B, ...] becomes
    `x[process_slice(B)]` [B/n, ...] (0-d leaves are kept whole). On one process the batch
    itself. Each leaf is cut by its own leading size, so `shard_batch` on the n processes'
    results rebuilds exactly the global arrays. A ValueError names the leaf whose rows do
    not split evenly over the processes."""
    count = jax.process_count()
    if count == 1:
        return batch

    def cut(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return x
        if x.shape[0] % count:
            raise ValueError(f"local_rows: {jax.tree_util.keystr(path) or 'batch'} has {x.shape[0]} rows, not "
                             f"divisible by the process count {count}; make the global batch size a multiple "
                             f"of {count}")
        return x[process_slice(x.shape[0], process_count=count)]

    return jax.tree_util.tree_map_with_path(cut, batch)


def to_host(tree: Any) -> Any:
    """The global value of every array of `tree` as numpy, on every process: arrays that span
    processes (a step's outputs, `rljax.sampling.sample`'s rollout on a multi-process mesh) are
    gathered in one collective program, so every process must call this at the same point with
    arrays of the same shapes; others (local arrays, numpy) are converted as they are. On one
    process: `jax.device_get`."""
    leaves, treedef = jax.tree.flatten(tree)
    spanning = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable
                and not x.is_fully_replicated and isinstance(x.sharding, NamedSharding)]
    if spanning:
        wanted = tuple(NamedSharding(leaves[i].sharding.mesh, P()) for i in spanning)
        for i, x in zip(spanning, placement(wanted)(*(leaves[i] for i in spanning))):
            leaves[i] = x

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every device holds the whole value: read a local copy
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils  # a sharding other than NamedSharding

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.unflatten(treedef, [host(x) for x in leaves])


def sync(name: str) -> None:
    """Barrier: wait until every process reaches `sync(name)` (same name in all); no-op on one process.

        >>> if is_main_process(): write_metadata()
        >>> sync("metadata written")   # others may now read it
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def share_text(text: str | None) -> str:
    """Process 0's `text` on every process (what the others pass is ignored; None there is fine): a
    name one process picks, such as a run directory named by its clock, that all must use. A
    collective: every process calls it at the same point. On one process: `text` itself."""
    if jax.process_count() == 1:
        if text is None:
            raise ValueError("share_text: process 0 passed no text")
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer((text or "").encode("utf-8"), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    # two broadcasts: the length first, since every process must pass an array of the same shape
    n = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    if n == 0:
        raise ValueError("share_text: process 0 passed no text")
    buffer = np.zeros(n, np.uint8)
    buffer[:data.size] = data[:n]
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode("utf-8")


def process_values(values: Sequence[int]) -> np.ndarray:
    """Every process's integer `values` [k], on every process: int32 [process_count, k], row i process
    i's (a signal one received, a failure of work only it did) so that all act on them at the same
    point. A collective: every process calls it at the same point with as many values. On one process:
    the one row."""
    local = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local[0])).reshape(jax.process_count(), -1)


def process_objects(value) -> list:
    """Every process's JSON value `value`, on every process: [process 0's, process 1's, ...] (what reward
    functions logged on each, say). A collective: every process calls it at the same point. On one process:
    [value]."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = process_values([data.size])[:, 0]  # every process passes an array of the same shape: the longest
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[:data.size] = data
    table = np.asarray(multihost_utils.process_allgather(buffer)).reshape(jax.process_count(), -1)
    return [json.loads(row[:n].tobytes().decode("utf-8")) for row, n in zip(table, sizes)]


def raise_failed(failed_flags, own: BaseException | None, where: str) -> None:
    """After the processes exchanged whether each failed (`process_values`; `failed_flags` [process_count],
    nonzero where a process failed): when any did, raise on this one too: its own error `own` where it
    failed, else a RuntimeError naming the failed processes, so that all stop at the same point instead
    of some waiting in a collective for the others."""
    failed = np.flatnonzero(np.asarray(failed_flags)).tolist()
    if failed:
        if own is not None:
            raise own
        raise RuntimeError(f"{where}: process(es) {failed} failed (their output has the error); process "
                           f"{jax.process_index()} stops with them")


def agree_on_failure(failure: BaseException | None, where: str) -> None:
    """Every process passes its own failure (None when its part went well) and raises when any process
    failed (`raise_failed`). A collective (also a barrier); on one process it raises `failure` if any."""
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    raise_failed(process_values([failure is not None])[:, 0], failure, where)


def on_main(where: str, fn, *args, **kw):
    """fn(*args, **kw) on process 0 alone, for work one process does for all (a file every process then
    reads), then a barrier at which the processes agree on its outcome: when it raised on process 0,
    every process raises (process 0 its error, the others a RuntimeError naming `where`), where a plain
    `if is_main_process(): ...; sync(...)` left the others waiting at the barrier for a process gone.
    A collective: every process calls it at the same point. Returns fn's value on process 0, None on
    the others; on one process, fn(*args, **kw).

        >>> on_main(f"writing {path}", write_json, path, rows)   # then every process may read it
    """
    if jax.process_count() == 1:
        return fn(*args, **kw)
    result, failure = None, None
    if is_main_process():
        try:
            result = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - raised below, on every process
            failure = e
    agree_on_failure(failure, where)
    return result


def spans_processes(mesh) -> bool:
    """True when `mesh` (a jax Mesh) holds devices of another process than this one."""
    me = jax.process_index()
    return mesh is not None and any(d.process_index != me for d in mesh.devices.flat)


def local_mesh(mesh):
    """This process's devices of `mesh` (a (data, fsdp, tensor) mesh, `rljax.sharding.make_mesh`) as a
    mesh of the same axes: tensor as in `mesh` (its groups lie within a process on make_mesh's
    layouts), fsdp = gcd(mesh's fsdp, the rest), data = what remains; the devices in `mesh`'s order.
    `mesh` itself when all its devices are this process's.

        >>> local_mesh(make_mesh(data=2, fsdp=2))   # 2 processes of 2 devices: {'data': 1, 'fsdp': 2, ...}
    """
    if not spans_processes(mesh):
        return mesh
    me = jax.process_index()
    own = [d for d in mesh.devices.flat if d.process_index == me]
    sizes = dict(mesh.shape)
    tensor = sizes.get("tensor", 1)
    if not own or len(own) % tensor:
        raise ValueError(f"local_mesh: process {me} holds {len(own)} of the mesh's devices {sizes}, not a multiple "
                         f"of its tensor axis ({tensor}); lay the mesh out with rljax.sharding.make_mesh so each "
                         "process holds whole tensor groups")
    fsdp = math.gcd(sizes.get("fsdp", 1), len(own) // tensor)
    return make_mesh(len(own) // (tensor * fsdp), fsdp, tensor, devices=own)


def _spanning(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and not x.is_fully_addressable]


def process_local(model, params=None):
    """(model, params) for work this process does alone, on rows of its own: a learned reward scoring
    the samples the process drew (the RL iteration passes its reward function only the process's own
    rows), where a program over the global mesh would mix the processes' different rows.

    On one process, or for a model without a mesh (or on this process's devices only) and params
    that are this process's, (model, params) come back as they are. Otherwise the model comes back
    on `local_mesh(model.mesh)` and the params' global values (gathered with `to_host`: a
    collective, so every process calls this at the same point, e.g. where a scorer is built)
    placed there by the model's sharding rules (replicated for a model without them). The params
    go one array at a time (gathered, placed, the host copy dropped), so the transient copy on
    each device and on the host is one array, not the whole model. params None: the model alone
    (no collective).

        >>> rm_model, rm_params = process_local(rm_model, rm_state.params)   # on every process
        >>> reward_fn = reward_model_reward(rm_model, rm_params, tokenizer)  # (which does this itself)
    """
    mesh = getattr(model, "mesh", None)
    spans = spans_processes(mesh)
    if jax.process_count() == 1 or not (spans or _spanning(params)):
        return model, params
    local = dataclasses.replace(model, mesh=local_mesh(mesh)) if spans else model
    if params is None:
        return local, None
    leaves, treedef = jax.tree.flatten(params)
    if local.mesh is None:  # on the default device
        targets = [None] * len(leaves)
    else:
        try:  # by the model's sharding rules
            targets = treedef.flatten_up_to(param_shardings(local, local.mesh))
        except (AttributeError, TypeError, ValueError):  # not a Model's parameter tree: a whole copy on each device
            targets = [replicated(local.mesh)] * len(leaves)
    # one at a time: to_host of the whole tree would replicate every array on every device at once
    return local, jax.tree.unflatten(treedef, [jax.device_put(to_host(x), s) for x, s in zip(leaves, targets)])


def check_process_local(params, where: str):
    """params, raising a ValueError naming `where` when any of their arrays spans processes (a scorer
    whose params are read at every call cannot gather them there: the call would be a collective that
    the other processes, scoring rows of their own, do not reach at the same point)."""
    if _spanning(params):
        raise ValueError(f"{where}: the params span several processes, but this runs on each process's own rows; "
                         "pass process-local params (`rljax.distributed.process_local(model, params)`, called on "
                         "every process at the same point, e.g. where the params are refreshed)")
    return params
