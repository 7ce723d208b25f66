"""Device mesh and the one table of logical-axis rules.

Every parameter and activation is named with logical axes (`embed`, `mlp`,
`heads`, ...); `LOGICAL_RULES` maps those names onto the three mesh axes:

  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters sharded along `embed` (ZeRO-3 style),
  tensor  Megatron-style tensor parallelism over heads / mlp / vocab.

A role (policy, reference, critic, sampler) may use its own mesh or rules; the
same code runs on 1 CPU, simulated CPU devices, several processes, GPUs, TPUs.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # activations and batches
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes.

    One size may be -1 and is filled so the product equals the device count.
    Axis types are Auto (sharding propagated by XLA from in/out shardings).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"make_mesh: {n} devices are not divisible by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {n} devices")
    # Keep devices of one process contiguous along the leading (data) axis so
    # process-local batches map onto local devices.
    dev_array = np.asarray(devices, dtype=object).reshape(sizes)
    try:
        from jax.sharding import AxisType

        return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    except (ImportError, TypeError):  # older jax: every mesh is Auto
        return Mesh(dev_array, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide the dimension they shard (replicate instead).

    Small models on big meshes (e.g. 2 kv heads on tensor=4) stay runnable.
    """
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=LOGICAL_RULES) -> NamedSharding:
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = _fit_spec(spec, shape, mesh)
    return NamedSharding(mesh, spec)


def is_axis_names(x) -> bool:
    """A leaf of a logical-axes pytree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def tree_shardings(logical_axes, shapes, mesh: Mesh, rules=LOGICAL_RULES):
    """Map a pytree of logical-name tuples (and matching shapes) to NamedShardings."""
    return jax.tree.map(
        lambda names, s: named_sharding(mesh, names, s.shape, rules),
        logical_axes, shapes, is_leaf=is_axis_names,
    )


def param_shardings(model, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding for every parameter of `model` (a `rljax.models.Model`)."""
    return tree_shardings(model.logical_axes(), model.param_shapes(), mesh, rules)


def shard_params(params, shardings):
    """Place a (host or single-device) params pytree onto its shardings."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def place_params(model, params):
    """`params` of `model` as device arrays where the model computes: on its mesh by its sharding rules
    (`param_shardings`; on several processes every process passes the same values), or for a model
    without a mesh on the default device (`jax.device_put`). A pipeline's stage state is made of these:
    its checkpoints restore onto the template's shardings, and a template of single-device arrays cannot
    be saved on several processes."""
    mesh = getattr(model, "mesh", None)
    if mesh is None:
        return jax.device_put(params)
    return shard_params(params, param_shardings(model, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


@functools.lru_cache(maxsize=256)
def _process_rows_error(sharding: NamedSharding, shape: tuple[int, ...]) -> str | None:
    """Why `sharding` does not give each process its own block of rows of a [shape] batch, or None.

    `shard_batch` takes process i's rows as rows [i·B/n, (i+1)·B/n) of the global batch
    (`rljax.distributed.process_slice`). That is only right when every device of process i
    holds rows of that block alone: when the batch axes (data × fsdp) leave rows replicated
    across processes (e.g. data = fsdp = 1 and tensor spanning the processes), each process
    would put its own, different rows where the sharding says the same rows sit, and the
    "global" array would differ from process to process. Cached: the answer depends on the
    sharding and shape only, and a pod has thousands of devices to look at.
    """
    count, rows = jax.process_count(), shape[0]
    per = rows // count
    for device, index in sharding.devices_indices_map(shape).items():
        start, stop, _ = index[0].indices(rows)
        owner = device.process_index
        if not (owner * per <= start and stop <= (owner + 1) * per):
            mesh = sharding.mesh
            batch_axes = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
            return (f"on the mesh {dict(mesh.shape)} the batch axes data x fsdp = {batch_axes} do not give each of "
                    f"the {count} processes its own rows (device {device.id} of process {owner} would hold rows "
                    f"{start}:{stop} of {rows}, while process {owner} passes rows {owner * per}:{(owner + 1) * per}). "
                    "Each process passes only its own rows (distributed.local_rows), so data x fsdp must split the "
                    "rows so that the devices of different processes hold different rows: make data x fsdp a "
                    f"multiple of the process count and tensor a divisor of each process's device count "
                    f"({jax.local_device_count()}), e.g. make_mesh(data={count}, fsdp=1, "
                    f"tensor={jax.device_count() // count})")
    return None


@functools.lru_cache(maxsize=64)
def placement(shardings: tuple) -> Any:
    """The jitted identity placing arrays (x_1, ..., x_k) on shardings (s_1, ..., s_k) -> the tuple of placed
    arrays. Re-laying out arrays that span processes is a collective program every process runs; several
    arrays go in one program (one small program per array, launched together, deadlocked XLA:CPU's gloo
    collectives at random). One compile per shardings and shapes."""
    return jax.jit(lambda *xs: xs, out_shardings=shardings)


def shard_batch(batch, mesh: Mesh, rules=LOGICAL_RULES):
    """Put every array of a batch pytree on the mesh, split along the batch axis ([B, ...] -> the
    same global shape, rows over data x fsdp, the other axes replicated; 0-d leaves replicated).

    On one process the arrays are the global batch. On several processes each passes its own
    rows, `distributed.local_rows(global_batch)` (rows [i·B/n, (i+1)·B/n) on process i of n),
    and gets one global array of B rows; every process must pass the same number of rows. The
    mesh must give each process its own block of rows (data x fsdp splitting the rows over the
    processes; `make_mesh` keeps each process's devices together): one whose batch axes leave
    rows replicated across processes (e.g. make_mesh(data=1, fsdp=1, tensor=4) on 2 processes
    of 2 devices) is a ValueError naming the mesh. An array that already spans processes (the
    output of a step) is the global batch itself and is only re-laid out.
    """
    n_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    count = jax.process_count()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    out = []
    for path, x in leaves:
        spanning = isinstance(x, jax.Array) and not x.is_fully_addressable
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        name = jax.tree_util.keystr(path) or "batch"
        if x.ndim == 0:
            out.append(placement((replicated(mesh),))(x)[0] if spanning else jax.device_put(x, replicated(mesh)))
            continue
        sharding = batch_sharding(mesh, x.ndim, rules)
        global_rows = x.shape[0] if count == 1 or spanning else x.shape[0] * count
        if global_rows % n_shards:
            per = f" ({x.shape[0]} on each of {count} processes)" if count > 1 and not spanning else ""
            raise ValueError(f"shard_batch: {name} has {global_rows} global rows{per}, not divisible by "
                             f"data*fsdp = {n_shards}")
        if count == 1:
            out.append(jax.device_put(x, sharding))
            continue
        if spanning:  # already global: any layout is right, so no check of who holds which rows
            out.append(x if x.sharding == sharding else placement((sharding,))(x)[0])
        else:
            error = _process_rows_error(sharding, (global_rows,) + tuple(x.shape[1:]))
            if error:
                raise ValueError(f"shard_batch: {name}: {error}")
            out.append(jax.make_array_from_process_local_data(sharding, np.asarray(x)))
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain(x: jax.Array, mesh: Mesh | None, names: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when `mesh` is None."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape, rules))
