"""No aliasing: create_state and every phase leave the caller's arrays valid and unchanged, although the
jitted steps donate the state they train (on one device and on a mesh)."""
import functools

import jax
import numpy as np
import pytest

from conftest import run_with_devices
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.data.preference_collate import collate_preferences
from rljax.losses.oreo import OREOConfig
from rljax.losses.preference import DPOConfig
from rljax.models import Model, preset
from rljax.oreo_training import OREOPhaseConfig, collate_trajectories, create_oreo_state, oreo
from rljax.phases import LoopConfig, PreferencePhaseConfig, SFTPhaseConfig, preference, sft
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
OPT = OptimizerConfig(lr=1e-2, schedule="constant")
PAIRS = [(f"{a}+{b}=", str(a + b), str(a + b + 1)) for a in range(2) for b in range(2)]
LOOP = LoopConfig(steps=2, progress=False)


@pytest.fixture(scope="module")
def setup():
    model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))
    return model, model.init(jax.random.key(0))


def _snapshot(params):
    return jax.tree.map(lambda x: np.array(x, copy=True), params)


def _unchanged(params, snapshot):
    """Every leaf still readable (not deleted or donated) and equal to the snapshot."""
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(snapshot), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def _moved(params, snapshot):
    return max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(params),
                                                                      jax.tree.leaves(snapshot)))


def test_create_state_copies_params(setup):
    model, p = setup
    before = _snapshot(p)
    state = create_state(model, OPT, jax.random.key(1), params=p)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(p)):
        assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    jax.jit(lambda s: s, donate_argnums=0)(state)  # donating the state deletes only its own buffers
    _unchanged(p, before)


def test_preference_with_reference_leaves_params_valid(setup):
    model, p = setup
    before = _snapshot(p)
    state = create_state(model, OPT, jax.random.key(1), params=p)
    data = BatchIterator(PAIRS, 4, functools.partial(collate_preferences, TOK), seed=0)
    cfg = PreferencePhaseConfig(loss=DPOConfig(), optimizer=OPT, loop=LOOP)
    out = preference(state, data, cfg, model=model, reference=p)
    _unchanged(p, before)
    _unchanged(state.params, before)  # the state passed in is not donated either
    assert _moved(out.params, before) > 1e-4
    # the reference may even be the trained state's own params
    again = preference(state, data, cfg, model=model, reference=state.params)
    _unchanged(state.params, before)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(out.params)):
        np.testing.assert_array_equal(a, b)


def test_sft_leaves_params_valid(setup):
    model, p = setup
    before = _snapshot(p)
    state = create_state(model, OPT, jax.random.key(1), params=p)
    data = BatchIterator([(q, a) for q, a, _ in PAIRS], 4, functools.partial(collate_prompt_completion, TOK))
    out = sft(state, data, SFTPhaseConfig(optimizer=OPT, loop=LOOP), model=model)
    _unchanged(p, before)
    _unchanged(state.params, before)
    assert _moved(out.params, before) > 1e-4


def test_oreo_state_and_phase_leave_params_valid(setup):
    model, p = setup
    before = _snapshot(p)
    _, state = create_oreo_state(model, p, OPT, jax.random.key(1))
    rows = [dict(prompt=q, completion=a, reward=1.0) for q, a, _ in PAIRS] + \
           [dict(prompt=q, completion=r, reward=0.0) for q, _, r in PAIRS]
    data = BatchIterator(rows, 4, functools.partial(collate_trajectories, TOK), seed=0)
    out = oreo(state, data, OREOPhaseConfig(loss=OREOConfig(), optimizer=OPT, loop=LOOP), model=model)
    _unchanged(p, before)
    _unchanged(state.policy.params, before)
    _unchanged(out.ref_params, before)
    assert _moved(out.policy.params, before) > 1e-5


def test_no_aliasing_on_a_mesh():
    out = run_with_devices("""
        import functools, jax, numpy as np
        from rljax.data.collate import BatchIterator
        from rljax.data.preference_collate import collate_preferences
        from rljax.losses.preference import DPOConfig
        from rljax.models import Model, preset
        from rljax.phases import PreferencePhaseConfig, preference
        from rljax.sharding import make_mesh, param_shardings
        from rljax.state import create_state
        from test_aliasing import LOOP, OPT, PAIRS, TOK, _snapshot, _unchanged

        mesh = make_mesh(data=2, fsdp=2)
        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size), mesh=mesh)
        # params already placed as the state wants them: device_put alone would return the same buffers
        p = jax.device_put(model.init(jax.random.key(0)), param_shardings(model, mesh))
        before = _snapshot(p)
        state = create_state(model, OPT, jax.random.key(1), mesh=mesh, params=p)
        _unchanged(p, before)
        data = BatchIterator(PAIRS, 4, functools.partial(collate_preferences, TOK), seed=0)
        cfg = PreferencePhaseConfig(loss=DPOConfig(), optimizer=OPT, loop=LOOP)
        out = preference(state, data, cfg, model=model, reference=p, mesh=mesh)
        _unchanged(p, before)
        _unchanged(state.params, before)
        assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(p)))
        # without mesh=, the model's own: the same placement (it was left unsharded on device 0)
        default = create_state(model, OPT, jax.random.key(1), params=jax.device_get(p))
        for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(state), strict=True):
            assert a.sharding == b.sharding, (a.sharding, b.sharding)
        print("OK")
    """, n_devices=4)
    assert "OK" in out


def test_owned_copy_and_create_state_keep_no_small_programs():
    """owned_copy copies in the runtime: fresh buffers with the same values, shardings and committedness,
    and no compiled program (jnp.copy compiled one per leaf shape, each kept for the process's life).
    create_state builds the moments and counters in one program: a second state for the same model
    compiles exactly that one (its init program is cached), and equals a state assembled by hand."""
    out = run_with_devices("""
        import jax, jax.monitoring, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from rljax.models import Model, preset
        from rljax.sharding import make_mesh
        from rljax.state import create_state, make_optimizer, owned_copy
        from test_aliasing import OPT, TOK

        compiles = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, seconds, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
        mesh = make_mesh(data=4, fsdp=2)
        tree = {"sharded": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "fsdp"))),
                "committed": jax.device_put(jnp.ones(3, jnp.bfloat16), jax.devices()[3]),
                "uncommitted": jnp.arange(5), "key": jax.random.key(7), "host": np.full((2,), 2.5, np.float32),
                # an RLState's rng: device_put of a typed key put it on one device, and fold_in(rng, step) with
                # the step on the mesh was refused when a phase on a mesh resumed
                "mesh_key": jax.device_put(jax.random.key(8), NamedSharding(mesh, P()))}
        jax.block_until_ready(tree)
        n = len(compiles)
        copy = owned_copy(tree)
        jax.block_until_ready(copy)
        assert len(compiles) == n, compiles[n:]
        for name in ("sharded", "committed", "uncommitted", "key", "mesh_key"):
            a, b = tree[name], copy[name]
            assert a.sharding == b.sharding and a.committed == b.committed and a.dtype == b.dtype, name
            if name.endswith("key"):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}.isdisjoint(
                s.data.unsafe_buffer_pointer() for s in b.addressable_shards), name
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        assert isinstance(copy["host"], jax.Array)
        np.testing.assert_array_equal(np.asarray(copy["host"]), tree["host"])
        jax.jit(lambda t: t * 2, donate_argnums=0)(copy["sharded"])  # donating the copy leaves the original readable
        assert copy["sharded"].is_deleted()
        np.testing.assert_array_equal(np.asarray(tree["sharded"]), np.arange(64.0).reshape(8, 8))

        model = Model(preset("tiny", n_layers=1, vocab_size=TOK.vocab_size))
        create_state(model, OPT, jax.random.key(0))
        n = len(compiles)
        state = create_state(model, OPT, jax.random.key(1))
        jax.block_until_ready(state)
        assert len(compiles) == n + 1, compiles[n:]
        init_key, rng = jax.random.split(jax.random.key(1))
        params = model.init(init_key)
        expected = make_optimizer(OPT).init(params)
        for a, b in zip(jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state),
                        jax.tree.leaves(params) + jax.tree.leaves(expected), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(rng))
        assert int(state.step) == 0 and int(state.skipped_steps) == 0 and state.step.dtype == jnp.int32
        print("OK")
    """)
    assert "OK" in out
