"""Checkpoints: bit-exact round trip, keep-last-N, restore onto another mesh, no partial 'latest'."""
import functools
import os

import jax
import numpy as np
import pytest

from conftest import run_with_devices
from rljax.checkpoint import Checkpointer, atomic_path
from rljax.losses import SFTConfig, sft_loss
from rljax.state import OptimizerConfig, create_state, make_train_step
from test_train import _batch

OPT = OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=20)


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_is_bit_exact_and_training_continues_identically(tiny, tmp_path):
    model, _ = tiny
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), OPT, donate=False)
    state = create_state(model, OPT, jax.random.key(0))
    for i in range(3):
        state, _ = step(state, _batch(i))
    with Checkpointer(str(tmp_path / "ckpt"), keep=2) as ck:
        ck.save(state, {"data_position": 3})
        ck.wait()
        fresh = create_state(model, OPT, jax.random.key(1))
        restored, meta = ck.restore(fresh)
    assert meta == {"data_position": 3}
    _assert_same(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    _assert_same(restored.replace(rng=None), state.replace(rng=None))
    a, _ = step(state, _batch(3))
    b, _ = step(restored, _batch(3))
    _assert_same(a.replace(rng=None), b.replace(rng=None))


def test_keeps_last_n_and_ignores_partial_checkpoints(tiny, tmp_path):
    model, _ = tiny
    state = create_state(model, OPT, jax.random.key(0))
    d = tmp_path / "ckpt"
    with Checkpointer(str(d), keep=2, async_save=False) as ck:
        for s in (1, 2, 3):
            ck.save(state.replace(step=state.step + s), {"s": s})
        assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    # a save that died half-way leaves only a temporary directory, never a step
    os.makedirs(d / "4.orbax-checkpoint-tmp-123" / "state")
    with Checkpointer(str(d), keep=2) as ck:
        assert ck.latest_step() == 3
        _, meta = ck.restore(state)
        assert meta == {"s": 3}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).restore(state)


def test_restore_onto_a_different_mesh(tmp_path):
    out = run_with_devices(f"""
        import jax, numpy as np
        from rljax.checkpoint import Checkpointer
        from rljax.models import Model, preset
        from rljax.sharding import make_mesh
        from rljax.state import OptimizerConfig, create_state
        opt = OptimizerConfig()
        a = make_mesh(data=8)
        b = make_mesh(data=2, fsdp=2, tensor=2)
        state = create_state(Model(preset("tiny"), mesh=a), opt, jax.random.key(0), mesh=a)
        with Checkpointer("{tmp_path}/c") as ck:
            ck.save(state)
            ck.wait()
            target = create_state(Model(preset("tiny"), mesh=b), opt, jax.random.key(5), mesh=b)
            restored, _ = ck.restore(target)
        gate = restored.params["layers"]["mlp"]["gate"]
        assert gate.sharding == target.params["layers"]["mlp"]["gate"].sharding
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                     restored.params, state.params)
        print("MESH_OK")
    """)
    assert "MESH_OK" in out


def test_atomic_path_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["data.json"]  # no temporary left behind
    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["data.json"]


def test_two_writers_with_one_process_id_never_share_a_temporary_file(tmp_path):
    """Two writers of one file whose process ids are equal (processes on two hosts of a shared file system; here
    two nested writes in one process): each writes its own temporary file, each rename lands, the last one
    stays, nothing is left behind. With the process id alone as the suffix both wrote into one temporary
    file, and the second rename found it gone."""
    path = tmp_path / "ref_logps.npy"
    with atomic_path(str(path)) as first, open(first, "w") as f:
        f.write("first")
        with atomic_path(str(path)) as second, open(second, "w") as g:
            assert second != first
            g.write("second")
        assert path.read_text() == "second"
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["ref_logps.npy"]


def test_round_trip_keeps_a_partial_gradient_accumulation(tiny, tmp_path):
    # mid-accumulation (1 of 2 micro-batches taken), the weighted sum and count are state: a resume
    # must finish the same update
    from rljax.state import make_optimizer

    model, params = tiny
    opt = OptimizerConfig(lr=1e-2, grad_accum=2)
    tx = make_optimizer(opt)
    state = create_state(model, opt, jax.random.key(0), params=params)
    grads = jax.tree.map(lambda p: jax.numpy.full(p.shape, 0.5, p.dtype), params)
    _, opt_state = tx.update(grads, state.opt_state, state.params, weight=7.0)
    state = state.replace(opt_state=opt_state)
    assert int(opt_state.micro_step) == 1 and float(opt_state.weight_sum) == 7.0
    with Checkpointer(str(tmp_path / "ckpt"), keep=1) as ck:
        ck.save(state, {})
        ck.wait()
        restored, _ = ck.restore(create_state(model, opt, jax.random.key(1), params=params))
    _assert_same(restored.opt_state, state.opt_state)


def test_orbax_is_imported_by_the_first_checkpointer(tmp_path):
    """orbax (and the tensorstore it loads, ~25 MiB resident) is imported when a Checkpointer is made,
    not by importing rljax's training modules, which a process that never saves should not carry."""
    out = run_with_devices(f"""
        import sys
        import rljax.checkpoint, rljax.phases, rljax.reference, rljax.rl, rljax.state
        print("before", sorted(m for m in sys.modules if m.split(".")[0] in ("orbax", "tensorstore"))[:3])
        rljax.checkpoint.Checkpointer({str(tmp_path)!r}, async_save=False)
        print("after", "orbax.checkpoint" in sys.modules)
    """, n_devices=1)
    assert "before []" in out and "after True" in out
