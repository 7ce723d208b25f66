"""Transformer: parameter counts, KV cache = full forward, padding/packing invariances, heads."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import left_padded
from rljax.models import Model, TransformerConfig, preset
from rljax.models import transformer
from rljax.models.transformer import _dense, init_compiler_options, last_token_index, swiglu_down
from rljax.sharding import LOGICAL_RULES, logical_to_spec, make_mesh
from rljax.state import OptimizerConfig, create_state

# Two layers (not tiny's four): every layer runs the same code, and two already check that each
# layer keeps its own cache; an unrolled layer costs compile time.
VARIANTS = {
    "gqa_scan": dict(scan_layers=True, n_layers=2),
    "gqa_loop": dict(scan_layers=False, n_layers=2),
    "qwen_like": dict(qkv_bias=True, tie_embeddings=True, rope_theta=1e6, n_layers=2),
    "qwen3_like_loop": dict(qk_norm=True, scan_layers=False, n_kv_heads=1, n_layers=2),
}


def _init(**overrides):
    model = Model(preset("tiny", **overrides))
    return model, model.init(jax.random.key(1))


# The model run op by op compiles every primitive for every new shape (minutes in all): the
# forwards and gradients below are jitted, one compile per model config and batch shape.
@functools.partial(jax.jit, static_argnames=("model",))
def _logits(params, tokens, mask=None, positions=None, segment_ids=None, *, model):
    return model(params, tokens, mask, positions=positions, segment_ids=segment_ids)


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(params, tokens, mask=None, cache=None, *, model):
    """(hidden, cache, LM logits) of model.forward."""
    hidden, cache = model.forward(params, tokens, mask, cache=cache)
    return hidden, cache, model.logits(params, hidden)


def _decode(params, tokens, mask, *, model, prefill=8):
    """(logits [B, T, V], the cache): the first `prefill` slots in one pass into a cache of T + 4
    slots, then the rest one token at a time; the logits of every slot, in order."""
    B, T = tokens.shape
    _, cache, logits = _forward(params, tokens[:, :prefill], mask[:, :prefill], model.init_cache(B, T + 4),
                                model=model)
    pieces = [logits]
    for t in range(prefill, T):
        _, cache, logits = _forward(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache, model=model)
        pieces.append(logits)
    return jnp.concatenate(pieces, axis=1), cache


def _sq_loss(params, tokens, mask, model):
    return jnp.mean(model(params, tokens, mask) ** 2)


_sq_loss_grad = jax.jit(jax.grad(_sq_loss), static_argnames=("model",))


@pytest.mark.parametrize("name", ["tiny", "small", "llama3_8b", "qwen2_5_0_5b", "qwen2_5_7b", "qwen3_0_6b"])
def test_param_count_closed_form_matches_eval_shape(name):
    model = Model(preset(name))
    shapes = model.param_shapes()
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == model.config.num_params()


def test_published_parameter_counts():
    # Published totals: Llama-3-8B 8,030,261,248; Qwen2.5-0.5B 494,032,768; Qwen2.5-7B 7,615,616,512.
    assert preset("llama3_8b").num_params() == 8_030_261_248
    assert preset("qwen2_5_0_5b").num_params() == 494_032_768
    assert preset("qwen2_5_7b").num_params() == 7_615_616_512
    assert 0.7e6 < preset("tiny").num_params() < 1.2e6
    assert 10e6 < preset("small").num_params() < 20e6


@pytest.mark.parametrize("name", ["llama3_8b", "qwen2_5_0_5b", "qwen3_0_6b"])
def test_every_parameter_has_a_sharding_spec(name):
    model = Model(preset(name, heads=("lm", "value", "reward")))
    axes, shapes = model.logical_axes(), model.param_shapes()
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes))
    assert len(flat_axes) == len(flat_shapes)
    for path, names in flat_axes:
        assert len(names) == len(flat_shapes[path].shape), path
        assert all(n is not None for n in names), path
        spec = logical_to_spec(names, LOGICAL_RULES)  # raises for a name without a rule
        assert len(spec) == len(names)
    # the big matrices are sharded, not replicated
    layer = axes["layers"]
    assert logical_to_spec(layer["mlp"]["gate"]) == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert logical_to_spec(layer["attn"]["o_proj"]) == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decode_matches_full_forward(variant):
    """Prefill part of mixed-length left-padded prompts, then decode one token at a time."""
    model, params = _init(**VARIANTS[variant])
    tokens, mask = left_padded([9, 4, 1, 6], 12, model.config.vocab_size, seed=3)
    full = _logits(params, tokens, mask, model=model)  # [B, T, V]
    cached, cache = _decode(params, tokens, mask, model=model)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-4, rtol=0)
    assert int(cache.index) == 12


def test_kv_cache_decode_bfloat16_stream_matches_full_forward():
    """The pure-bf16 layout (bf16 compute, weights and residual stream): decoding one token at a
    time over the cache gives the full forward's logits up to bf16 rounding (the two programs fuse
    and round differently): within 2e-2 where |logits| ~0.7 (measured on CPU: 0), and the same
    greedy token at every live slot whose top two logits are further apart than that."""
    model, params = _init(n_layers=2)
    bf = Model(preset("tiny", dtype="bfloat16", param_dtype="bfloat16", residual_dtype="bfloat16", n_layers=2))
    params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    tokens, mask = left_padded([9, 4, 1, 6], 12, 64, seed=3)
    full = np.asarray(_logits(params, tokens, mask, model=bf), np.float32)
    cached = np.asarray(_decode(params, tokens, mask, model=bf)[0], np.float32)
    real = mask.astype(bool)
    err = np.abs(cached - full)[real]
    assert err.max() < 2e-2, err.max()
    top2 = np.sort(full, axis=-1)[..., -2:]
    clear = real & (top2[..., 1] - top2[..., 0] > 2 * 2e-2)
    assert clear.sum() > 10
    np.testing.assert_array_equal(cached.argmax(-1)[clear], full.argmax(-1)[clear])


def test_float32_cache_of_a_bf16_model_decodes_as_a_bf16_cache_would(monkeypatch):
    """On CPU a bf16 model's KV cache is float32 (`Model.cache_dtype`): XLA:CPU runs the decode
    step's attention products in float32, and a bf16 cache was converted to float32 whole, every
    step, every layer. The float32 cache holds the bf16-rounded values and the probabilities are
    rounded as a bf16 cache's product would see them (`transformer._stored`), so prefill and four
    decode steps give the bf16 cache's logits bit for bit; the compiled step converts no
    cache-sized array, where the bf16 cache's converts keys and values in every layer."""
    # 128 rows, heads of 64 (the GRPO benchmark's): XLA folds the probabilities' rounding at this
    # size, not with a few rows
    bf = Model(preset("tiny", dtype="bfloat16", n_layers=2, d_model=256, n_kv_heads=4))
    params = bf.init(jax.random.key(1))
    tokens, mask = left_padded([9, 4, 1, 6] * 32, 12, 64, seed=3)
    if jax.default_backend() != "cpu":
        pytest.skip("accelerators keep the compute dtype")
    assert bf.cache_dtype() == jnp.float32 and Model(preset("tiny", n_layers=2)).cache_dtype() == jnp.float32

    def decode(model):
        logits, cache = _decode(params, tokens, mask, model=model)
        step = _forward.lower(params, tokens[:, 11:12], mask[:, 11:12], cache, model=model).compile().as_text()
        cache_shape = ",".join(map(str, cache.k[0].shape))
        instructions = [line.split(" = ", 1) for line in step.splitlines() if " = " in line]
        converts = [name for name, rest in instructions  # named for a convert, with the cache's shape
                    if "convert" in name and rest.split(" ")[0].endswith(f"[{cache_shape}]{{3,2,1,0}}")]
        return np.asarray(logits, np.float32), cache.k[0].dtype, converts

    f32_logits, f32_dtype, f32_converts = decode(bf)
    monkeypatch.setattr(Model, "cache_dtype", lambda self: self.config.compute_dtype)
    bf_model = Model(bf.config.replace(max_seq_len=bf.config.max_seq_len + 1))  # a new jit cache entry
    bf_logits, bf_dtype, bf_converts = decode(bf_model)
    assert (f32_dtype, bf_dtype) == (jnp.float32, jnp.bfloat16)
    np.testing.assert_array_equal(f32_logits, bf_logits)
    assert f32_converts == [] and len(bf_converts) >= 2, (f32_converts, bf_converts)


def test_bfloat16_stream_scanned_and_unrolled_agree():
    """The bf16 residual stream keeps its dtype through `nn.scan`'s carry: the scanned and the
    unrolled model give the same logits up to bf16 rounding (measured: 3.1e-3, |logits| ~0.7)."""
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", residual_dtype="bfloat16", n_layers=2)
    scan_model, params = _init(scan_layers=True, **kw)
    loop_model = Model(preset("tiny", scan_layers=False, **kw))
    tokens, mask = left_padded([7, 3], 8, 64, seed=1)
    a = np.asarray(_logits(params, tokens, mask, model=scan_model), np.float32)
    b = np.asarray(_logits(params, tokens, mask, model=loop_model), np.float32)
    assert np.abs(a - b)[mask.astype(bool)].max() < 2e-2


def test_scan_and_loop_layers_agree():
    """Same stacked parameters, two ways of running the layers: same values and gradients."""
    scan_model, params = _init(scan_layers=True, n_layers=2)
    loop_model = Model(preset("tiny", scan_layers=False, n_layers=2))
    assert jax.tree.structure(loop_model.param_shapes()) == jax.tree.structure(params)
    tokens, mask = left_padded([7, 3], 8, 64, seed=1)
    np.testing.assert_allclose(_logits(params, tokens, mask, model=scan_model),
                               _logits(params, tokens, mask, model=loop_model), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 _sq_loss_grad(params, tokens, mask, scan_model), _sq_loss_grad(params, tokens, mask, loop_model))


def test_unrolled_blocks_are_traced_once_and_replayed(monkeypatch):
    """Under a trace the unrolled layers trace the block once per distinct input shapes and replay
    its jaxpr for the other layers (`transformer.traced_once`): the block's Python runs once per
    forward pass, not once per layer, and the program computes what tracing every block computes,
    bit for bit (values, gradients, a KV-cache decode step, read_at)."""
    model, params = _init(scan_layers=False, n_layers=2)
    tokens, mask = left_padded([7, 3], 8, 64, seed=1)

    def program(p):
        loss, grads = jax.value_and_grad(lambda q: jnp.sum(jnp.sin(model.forward(q, tokens, mask)[0])))(p)
        _, cache = model.forward(p, tokens, mask, cache=model.init_cache(2, 12))
        step, _ = model.forward(p, tokens[:, :1], mask[:, :1], cache=cache)
        read = model.forward(p, tokens, mask, read_at=jnp.array([3, 5]))[0]
        return loss, grads, step, read

    calls = []
    apply = transformer.Block.apply
    monkeypatch.setattr(transformer.Block, "apply", lambda self, *a, **k: calls.append(1) or apply(self, *a, **k))
    replayed = jax.jit(program)(params)
    # one block trace per forward pass (gradient, prefill, decode step), two with read_at (its
    # last block reads fewer slots)
    assert len(calls) == 5
    calls.clear()
    monkeypatch.setattr(transformer, "traced_once", lambda fn: fn)  # every block traced
    traced = jax.jit(lambda p: program(p))(params)
    assert len(calls) == 8
    jax.tree.map(np.testing.assert_array_equal, replayed, traced)


def test_traced_once_replays_under_a_trace_and_runs_as_written_on_concrete_arrays():
    calls = []

    def f(x, y):
        calls.append(1)
        return jnp.sin(x) * y

    g = transformer.traced_once(f)
    x, y = jnp.arange(3.0), jnp.float32(2.0)
    got = jax.jit(lambda x, y: g(g(x, y), y) + g(x[::-1], y))(x, y)  # three calls of one shape: one trace
    assert len(calls) == 1
    np.testing.assert_allclose(got, np.sin(np.sin(np.arange(3.0)) * 2) * 2 + np.sin(np.arange(3.0)[::-1]) * 2,
                               rtol=1e-6)
    calls.clear()
    np.testing.assert_allclose(g(x, y), np.sin(np.arange(3.0)) * 2, rtol=1e-6)
    g(x, y)
    assert len(calls) == 2  # concrete arguments: f itself on each call, no program of its own


def test_left_padding_does_not_change_logits(tiny):
    """RoPE positions count real tokens, so padding on the left changes nothing."""
    model, params = tiny
    tokens, _ = left_padded([7], 7, 64, seed=2)  # [1, 7] and [1, 12]: test_packed_...'s shapes
    padded = np.concatenate([np.zeros((1, 5), np.int32), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 7), np.int32)], axis=1)
    np.testing.assert_allclose(_logits(params, padded, mask, model=model)[:, 5:], _logits(params, tokens, model=model),
                               atol=1e-5)


def test_packed_segments_equal_separate_sequences(tiny):
    model, params = tiny
    a, _ = left_padded([5], 5, 64, seed=4)
    b, _ = left_padded([7], 7, 64, seed=5)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    out = _logits(params, packed, np.ones_like(packed), positions, segments, model=model)
    np.testing.assert_allclose(out[:, :5], _logits(params, a, model=model), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], _logits(params, b, model=model), atol=1e-5)


def test_heads_and_last_token_reward():
    model, params = _init(heads=("lm", "value", "reward"), n_layers=1)  # the heads read the last hidden state
    assert float(jnp.abs(params["value_head"]).sum()) == 0.0  # zero-initialised: V = 0 at start
    params = jax.tree.map(lambda x: x, params)
    params["reward_head"] = jax.random.normal(jax.random.key(2), params["reward_head"].shape)
    params["value_head"] = jax.random.normal(jax.random.key(3), params["value_head"].shape)
    tokens, _ = left_padded([6, 6], 6, 64, seed=6)

    @jax.jit
    def heads(p, t, m):
        hidden, _ = model.forward(p, t, m)
        return hidden, model.rewards(p, hidden, m), model.values(p, hidden)

    hidden, r, v = heads(params, tokens, jnp.ones_like(tokens))
    np.testing.assert_allclose(r, hidden[:, -1] @ params["reward_head"] + params["reward_bias"], rtol=1e-6)
    np.testing.assert_allclose(v, hidden @ params["value_head"] + params["value_bias"], rtol=1e-6)
    # Appending pads on the right (pad id = eos id = 2 here) leaves the reward unchanged.
    right = np.concatenate([tokens, np.full((2, 3), 2, np.int32)], axis=1)
    rmask = np.concatenate([np.ones_like(tokens), np.zeros((2, 3), np.int32)], axis=1)
    np.testing.assert_allclose(heads(params, right, rmask)[1], r, atol=1e-5)
    # ... and so does left padding
    left = np.concatenate([np.full((2, 3), 2, np.int32), tokens], axis=1)
    np.testing.assert_allclose(heads(params, left, rmask[:, ::-1])[1], r, atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa_scan", "qwen3_like_loop"])
def test_last_hidden_equals_the_full_forward_at_the_last_token(variant):
    # read_at runs the last layer's queries, attention output and MLP at one slot per row; the
    # reference is the full forward pass read at that slot, values and gradients
    model, params = _init(heads=("lm", "reward"), **VARIANTS[variant])
    params = {**params, "reward_head": jax.random.normal(jax.random.key(2), params["reward_head"].shape)}
    tokens, mask = left_padded([8, 5, 1, 7], 10, 64, seed=9)
    # rows 1 and 3 right-padded instead: one batch, so each program below compiles once
    for row, n in ((1, 5), (3, 7)):
        tokens[row] = np.roll(tokens[row], n - 10)
        mask[row] = np.roll(mask[row], n - 10)
    full = np.asarray(jax.jit(lambda p, t, m: model.forward(p, t, m)[0])(params, tokens, mask))
    read = jax.jit(lambda p, t, m, s: model.forward(p, t, m, read_at=s)[0])
    last = last_token_index(mask)
    np.testing.assert_array_equal(last, [9, 4, 9, 6])
    got = jax.jit(model.last_hidden)(params, tokens, mask)
    assert got.shape == (4, model.config.d_model)
    np.testing.assert_allclose(got, full[np.arange(4), last], atol=2e-6)
    slots = np.array([7, 3, 6, 4])  # any slot, not only the last one
    np.testing.assert_allclose(read(params, tokens, mask, jnp.asarray(slots)), full[np.arange(4), slots], atol=2e-6)
    several = np.array([[7, 9], [3, 1], [6, 0], [4, 6]])  # R = 2 slots a row: hidden [B, 2, D]
    np.testing.assert_allclose(read(params, tokens, mask, jnp.asarray(several)),
                               full[np.arange(4)[:, None], several], atol=2e-6)

    def loss(p, read):
        r = model.token_rewards(p, model.last_hidden(p, tokens, mask)) if read else \
            model.rewards(p, model.forward(p, tokens, mask)[0], mask)
        return jnp.sum(jnp.sin(3.0 * r))

    g_read = jax.jit(jax.grad(functools.partial(loss, read=True)))(params)
    g_full = jax.jit(jax.grad(functools.partial(loss, read=False)))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_read), jax.tree.leaves(g_full)):
        scale = float(np.abs(b).max())  # float32 sums in another order: errors relative to the leaf's scale
        assert float(np.abs(a - b).max()) <= 2e-5 * scale, (jax.tree_util.keystr(path), scale)


def test_last_hidden_of_packed_rows_and_bad_read_at(tiny):
    model, params = tiny
    # two sequences packed in one row: reading at the second one's last token sees only its own segment
    a, b = np.array([5, 9, 11, 4], np.int32), np.array([7, 8, 3], np.int32)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1, 1, 1, 1, 2, 2, 2]], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2]], np.int32)
    h = jax.jit(lambda p: model.forward(p, packed, np.ones_like(packed), segment_ids=seg, positions=pos,
                                        read_at=jnp.array([6]))[0])(params)
    alone = jax.jit(model.last_hidden)(params, b[None])
    np.testing.assert_allclose(h, alone, atol=2e-6)
    with pytest.raises(ValueError, match=r"read_at: slots per row, shape \(1,\) or \(1, R\); got \(2,\)"):
        model.forward(params, packed, read_at=jnp.array([6, 6]))
    with pytest.raises(ValueError, match=r"read_at: slots per row.*got \(1, 1, 1\)"):
        model.forward(params, packed, read_at=jnp.zeros((1, 1, 1), jnp.int32))
    with pytest.raises(ValueError, match="read_at: for full forward passes"):
        model.forward(params, b[None], cache=model.init_cache(1, 8), read_at=jnp.array([2]))


def test_init_compiles_at_o2_on_cpu_with_the_same_parameters(monkeypatch):
    """Model.init's program is compiled at LLVM -O2 on CPU only (a user's level in XLA_FLAGS wins:
    the tests set 0, see conftest), and gives the parameters of XLA:CPU's default level (3) bit
    for bit."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert init_compiler_options("cpu") == {"xla_backend_optimization_level": 2}
    assert init_compiler_options("gpu") is None and init_compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert init_compiler_options("cpu") is None
    if jax.default_backend() != "cpu":
        return
    monkeypatch.setenv("XLA_FLAGS", "")
    level3 = jax.jit(transformer._init_params_fn, static_argnums=0,
                     compiler_options={"xla_backend_optimization_level": 3})
    for cfg in (preset("tiny", vocab_size=64),
                TransformerConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=96,
                                  max_seq_len=64, param_dtype="bfloat16", heads=("lm", "value", "reward"))):
        model = Model(cfg)
        got, want = model.init(jax.random.key(3)), level3(model, jax.random.key(3))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_init_inside_transformations_where_the_init_program_has_compiler_options(monkeypatch):
    """Where Model.init compiles at -O2 (CPU, no level in XLA_FLAGS; the tests set one), it still
    works inside jax.jit / eval_shape / a sharded create_state (jax refuses compiler options on a
    nested jit) and gives the parameters of the top-level call, with a traced key and with a concrete
    one closed over by a jitted caller."""
    if jax.default_backend() != "cpu":
        pytest.skip("the -O2 init program is CPU-only")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert init_compiler_options() is not None
    model, key = Model(preset("tiny", vocab_size=64)), jax.random.key(5)
    want = model.init(key)
    shapes = model.param_shapes()
    assert jax.tree.map(lambda a: (a.shape, a.dtype), want) == jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
    # staged: the plain program, compiled with the caller's options (here -O2, as the top-level call;
    # the tests' own level, 0, rounds differently), for a traced key and for a concrete one closed over
    level2 = init_compiler_options()
    for got in (jax.jit(model.init, compiler_options=level2)(key),
                jax.jit(lambda: model.init(key), compiler_options=level2)()):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    mesh = make_mesh(devices=jax.devices()[:2])
    state = create_state(model, OptimizerConfig(), jax.random.key(0), mesh=mesh)
    unsharded = create_state(model, OptimizerConfig(), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(unsharded.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_last_token_index():
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [1, 3, 3, 1])


def test_bfloat16_compute_close_to_float32(tiny):
    model, params = tiny
    bf = Model(preset("tiny", dtype="bfloat16"))
    tokens, mask = left_padded([8, 5], 8, 64, seed=7)
    lf, lb = _logits(params, tokens, mask, model=model), _logits(params, tokens, mask, model=bf)
    assert lb.dtype == jnp.float32
    real = mask.astype(bool)
    err = np.abs(np.asarray(lf - lb))[real].max()
    assert 0 < err < 2e-2


@pytest.mark.parametrize("remat,scan", [("full", True), ("dots", False), ("full", False)])
def test_remat_gives_same_gradients(remat, scan):
    # two layers, as in test_scan_and_loop_layers_agree: the reference gradient compiles once for all three
    model, params = _init(n_layers=2)
    rm = Model(preset("tiny", remat=remat, scan_layers=scan, n_layers=2))
    tokens, mask = left_padded([8, 5], 8, 64, seed=8)
    g1 = _sq_loss_grad(params, tokens, mask, model)
    g2 = _sq_loss_grad(params, tokens, mask, rm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)


def test_unrolled_remat_recomputes_in_the_backward_pass_and_keeps_less():
    """With layers unrolled in Python, XLA:CPU ran `jax.checkpoint`'s recomputation inside the
    forward pass (the extra products were there, the temporary buffer the same as without remat;
    in a pure-function toy it merged them away). `remat_after_cotangent` ties it to the
    cotangent: the compiled gradient has each layer's forward products once more (except what
    the policy saves) and its temporary buffer shrinks."""
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's compiled programs")
    L = 4
    tokens, mask = left_padded([64] * 8, 64, 64, seed=3)

    def compiled(remat):
        m = Model(preset("tiny", remat=remat, scan_layers=False, n_layers=L, mlp_dim=512))
        params = jax.eval_shape(m.init, jax.random.key(0))
        return jax.jit(jax.grad(_sq_loss), static_argnames=("model",)).lower(params, tokens, mask, m).compile()

    def dots(c):
        return sum(line.count(" dot(") for line in c.as_text().splitlines())

    none, full, saved_dots = compiled("none"), compiled("full"), compiled("dots")
    # a layer's forward has 9 products: q, k, v, o, gate, up, down and the attention's two batched
    # ones. Full remat recomputes all but the down projection (its output, the block's, is not
    # needed) in every layer: 8 a layer here (at least 6, should XLA merge q, k, v); the "dots"
    # policy saves the unbatched products and recomputes the attention's two
    assert dots(full) - dots(none) >= 6 * L
    assert 2 * L <= dots(saved_dots) - dots(none) < dots(full) - dots(none)
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in (("none", none), ("full", full),
                                                                    ("dots", saved_dots))}
    assert temp["full"] < temp["dots"] < temp["none"] and temp["full"] < 0.7 * temp["none"]


def test_remat_after_cotangent_equals_plain_gradients():
    from rljax.models.transformer import remat_after_cotangent

    def layer(x, w):
        return x + jnp.tanh(x @ w[0]) @ w[1]

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (6, 8))
    ws = [(jax.random.normal(k2, (8, 16)) / 4, jax.random.normal(k3, (16, 8)) / 4)] * 3

    def loss(ws, x, f):
        for w in ws:
            x = f(x, w)
        return jnp.sum(x ** 3)

    for policy in (None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
        f = remat_after_cotangent(layer, policy)
        np.testing.assert_allclose(jax.jit(lambda x, ws: f(x, ws[0]))(x, ws), layer(x, ws[0]), rtol=1e-6)
        g_plain = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws, x, layer)
        g_remat = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws, x, f)
        # float32 rounding relative to the gradient's largest entries (~20 here): YNNPACK's AVX-512
        # products put one entry of -0.0257 2.3e-5 off, 1e-6 of the largest
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 + 4e-6 * float(np.abs(a).max())),
                     g_plain, g_remat)
    # a non-finite cotangent is not hidden: the block's gradients come out non-finite
    g_inf = jax.grad(lambda x: jnp.sum(f(x, ws[0]) * jnp.array([jnp.inf] + [1.0] * 5)[:, None]))(x)
    assert not np.isfinite(np.asarray(g_inf)).all()


def test_bad_inputs_raise_clear_errors(tiny):
    model, params = tiny
    tokens = np.ones((2, 4), np.int32)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.forward(params, tokens, np.ones((2, 5), np.int32))
    with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 64 is outside the vocabulary"):
        model.forward(params, np.array([[1, 2, 3, 4], [1, 2, 64, 4]]))
    with pytest.raises(ValueError, match="must be \\[batch, length\\]"):
        model.forward(params, np.ones((4,), np.int32), np.ones((4,), np.int32))
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=4, n_kv_heads=3, mlp_dim=8)
    with pytest.raises(ValueError, match="heads"):
        preset("tiny", heads=("lm", "critic"))
    with pytest.raises(ValueError, match=r"TransformerConfig.residual_dtype: 'bfloat16' must be 'float32' or "
                                         r"the compute dtype 'float32'"):
        preset("tiny", residual_dtype="bfloat16")
    with pytest.raises(ValueError, match="cache length"):
        model.init_cache(1, 10_000)
    with pytest.raises(KeyError, match="unknown preset"):
        preset("gpt5")


@pytest.mark.parametrize("transpose_w", [False, True])
def test_low_precision_dot_vjp_is_the_bf16_rounded_product(transpose_w):
    """Backward matmuls take bf16-rounded inputs: dx = r(g) r(w)^T, dw = r(x)^T r(g) (r = round to bf16)."""
    from rljax.models.transformer import _low_precision_dot

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    w = rng.normal(size=(4, 5) if transpose_w else (5, 4)).astype(np.float32)
    g = rng.normal(size=(6, 4)).astype(np.float32)
    r = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    def run(x, w, g):
        y, vjp = jax.vjp(lambda x, w: _low_precision_dot(x, w, jnp.bfloat16, jnp.float32, transpose_w), x, w)
        return (y, *vjp(g))

    wm = r(w).T if transpose_w else r(w)
    for y, dx, dw in (run(x, w, g), jax.jit(run)(x, w, g)):
        np.testing.assert_allclose(y, r(x) @ wm, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, r(g) @ wm.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw, (r(x).T @ r(g)).T if transpose_w else r(x).T @ r(g), rtol=1e-5, atol=1e-5)
        assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    # compiled, y and dx are bf16 x bf16 products: XLA:CPU turns `jnp.dot(g, w.T)` on bf16 inputs into a
    # float32 x float32 product of the (rounded) values, at about half the speed on CPUs with native bf16.
    # (dw, which contracts over the rows, it computes in float32 either way: a materialised transpose that
    # keeps it bf16 measured no faster.) At a size XLA hands to a matrix-product library; tiny products
    # run a float32 loop whatever is written.
    big = [jnp.zeros(shape, jnp.float32) for shape in ((256, 64), (128, 64) if transpose_w else (64, 128), (256, 128))]
    hlo = jax.jit(run).lower(*big).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    products = {shape: (types[a], types[b]) for shape, a, b in
                re.findall(r"= f32\[(\d+,\d+)\]\{1,0\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)}
    assert products["256,128"] == products["256,64"] == ("bf16", "bf16"), products  # y [M, N], dx [M, K]


def test_transposed_spec_gives_each_operands_cotangent_product():
    from rljax.models.transformer import _transposed_spec

    assert _transposed_spec("bkgth,bksh->bkgts", 0) == "bkgts,bksh->bkgth"
    assert _transposed_spec("bkgth,bksh->bkgts", 1) == "bkgts,bkgth->bksh"
    assert _transposed_spec("bkgts,bksh->bkgth", 0) == "bkgth,bksh->bkgts"
    assert _transposed_spec("bkgts,bksh->bkgth", 1) == "bkgth,bkgts->bksh"


@pytest.mark.parametrize("spec", ["bkgth,bksh->bkgts", "bkgts,bksh->bkgth"])
def test_low_precision_einsum_vjp_is_the_bf16_rounded_product(spec):
    """Attention's two products: y = a·b in float32 from bf16 operands, and the backward products take
    the cotangent rounded to bf16, each result rounded to its operand's dtype, against numpy's
    float64 products of the rounded values (r = round to bf16); compiled, every product, forward and
    backward, is bf16 x bf16 (differentiated as written, both backward products were float32 x
    float32)."""
    from rljax.models.transformer import _low_precision_einsum, _transposed_spec

    dims = dict(b=2, k=2, g=2, t=5, s=5, h=4)
    ins, out = spec.split("->")
    shape = lambda term: tuple(dims[c] for c in term)  # noqa: E731
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.normal(size=shape(t)), jnp.bfloat16) for t in ins.split(","))
    g = rng.normal(size=shape(out)).astype(np.float32)
    r = lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731

    def run(a, b, g):
        y, vjp = jax.vjp(lambda a, b: _low_precision_einsum(a, b, spec), a, b)
        return (y, *vjp(g))

    for y, da, db in (run(a, b, g), jax.jit(run)(a, b, g)):
        assert (y.dtype, da.dtype, db.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
        np.testing.assert_allclose(y, np.einsum(spec, r(a), r(b)), rtol=1e-5, atol=1e-5)
        for got, want in ((da, np.einsum(_transposed_spec(spec, 0), r(g), r(b))),
                          (db, np.einsum(_transposed_spec(spec, 1), r(g), r(a)))):
            np.testing.assert_allclose(np.asarray(got, np.float64), r(want), rtol=2**-7, atol=1e-6)
    dims.update(t=64, s=64, h=32)
    big = [jnp.zeros(shape(t), jnp.bfloat16) for t in ins.split(",")] + [jnp.zeros(shape(out), jnp.float32)]
    hlo = jax.jit(run).lower(*big).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    operands = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    operands += re.findall(r"dot\(\w+\[[\d,]*\]\{[\d,]*\} %([\w.\-]+), \w+\[[\d,]*\]\{[\d,]*\} %([\w.\-]+)\)", hlo)
    assert operands and all(types[x] == types[y] == "bf16" for x, y in operands), operands


def test_attention_softmax_derivatives_match_the_closed_form():
    """The attention softmax's rule dy = y (dx - sum(y dx)), against the Jacobian diag(y) - y y^T in
    float64 (vjp and jvp), and the second derivative TRPO takes (jvp of a gradient) against finite
    differences of the gradient; masked entries (NEG_INF) get zero gradient."""
    from rljax.models.transformer import NEG_INF, softmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    x[1, 3:] = NEG_INF  # a masked row: the last two keys are padding
    c, t = rng.normal(size=(2, 3, 5)).astype(np.float32)
    y64 = np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    jac = np.stack([np.diag(r) - np.outer(r, r) for r in y64.astype(np.float64)])  # [3, 5, 5]
    y, vjp = jax.vjp(softmax, x)
    np.testing.assert_allclose(y, y64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vjp(c)[0], np.einsum("bij,bi->bj", jac, c), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jvp(softmax, (x,), (t,))[1], np.einsum("bij,bj->bi", jac, t), rtol=1e-5,
                               atol=1e-7)
    assert np.all(np.asarray(vjp(c)[0])[1, 3:] == 0)
    # jvp of a gradient, as in TRPO's Fisher-vector products, against a central difference of the gradient
    xs = rng.normal(size=(2, 4))
    f = lambda z: jnp.sum(jnp.asarray(c[:2, :4], jnp.float64) * softmax(z) ** 2)  # noqa: E731
    with jax.enable_x64():
        hvp = jax.jvp(jax.grad(f), (jnp.asarray(xs),), (jnp.asarray(t[:2, :4], jnp.float64),))[1]
        eps = 1e-6
        fd = (jax.grad(f)(xs + eps * t[:2, :4]) - jax.grad(f)(xs - eps * t[:2, :4])) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-5, atol=1e-8)


def _plain_swiglu_down(g, u, w):
    return _dense(jax.nn.silu(g) * u, w, 1, jnp.float32)


def test_swiglu_down_derivatives_match_plain_autodiff():
    # the hand-written backward rule against autodiff of the same expression: values, gradients, and
    # the reverse-over-reverse Hessian-vector products TRPO's Fisher-vector products use
    k = jax.random.split(jax.random.key(0), 5)
    g, u = jax.random.normal(k[0], (2, 5, 16)), jax.random.normal(k[1], (2, 5, 16))
    w, c = jax.random.normal(k[2], (16, 8)), jax.random.normal(k[3], (2, 5, 8))
    v = tuple(jax.random.normal(k[4], x.shape) for x in (g, u, w))

    def loss(mlp):
        return lambda g, u, w: jnp.sum(jnp.sin(mlp(g, u, w)) * c)

    new, ref = loss(lambda g, u, w: swiglu_down(g, u, w, jnp.float32)), loss(_plain_swiglu_down)
    np.testing.assert_allclose(new(g, u, w), ref(g, u, w), rtol=1e-6)
    for a, b in zip(jax.grad(new, (0, 1, 2))(g, u, w), jax.grad(ref, (0, 1, 2))(g, u, w)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def hvp(f):
        return jax.grad(lambda *a: sum(jnp.vdot(x, y) for x, y in zip(jax.grad(f, (0, 1, 2))(*a), v)), (0, 1, 2))(g, u, w)

    for a, b in zip(hvp(new), hvp(ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # a non-finite cotangent row makes only that row's input gradients non-finite
    ct = jnp.zeros((2, 5, 8)).at[1, 2, 0].set(jnp.inf)
    _, pullback = jax.vjp(lambda g, u: swiglu_down(g, u, w, jnp.float32), g, u)
    dg, du = pullback(ct)
    finite = np.isfinite(np.asarray(dg)).all(axis=-1)
    assert not finite[1, 2] and finite.sum() == 9


def test_recompute_swiglu_on_and_off_give_the_same_model_gradients():
    model, params = _init(n_layers=2)
    plain = Model(preset("tiny", n_layers=2, recompute_swiglu=False))
    assert model.config.recompute_swiglu  # the default
    tokens, mask = left_padded([8, 5], 8, 64, seed=8)
    g_new, g_plain = _sq_loss_grad(params, tokens, mask, model), _sq_loss_grad(params, tokens, mask, plain)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g_new, g_plain)
    # forward mode needs the plain derivative (the custom VJP has no JVP)
    tangent = jax.tree.map(jnp.ones_like, params)
    out, _ = jax.jvp(lambda p: _logits(p, tokens, mask, model=plain), (params,), (tangent,))
    np.testing.assert_allclose(out, _logits(params, tokens, mask, model=model), atol=1e-5)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: _logits(p, tokens, mask, model=model), (params,), (tangent,))


def test_swiglu_down_keeps_fewer_arrays_for_the_backward_pass():
    # three residual MLP layers, [M, F] = [512, 256]: XLA's buffer for the gradient program, counted in
    # [M, F] float32 arrays, holds at least 1.5 fewer per layer than plain autodiff's (17 -> 11 here)
    M, D, F, L = 512, 64, 256, 3
    k = jax.random.split(jax.random.key(0), 3 * L + 1)
    ws = [tuple(jax.random.normal(k[3 * i + j], s) * 0.1 for j, s in enumerate([(D, F), (D, F), (F, D)]))
          for i in range(L)]
    x = jax.random.normal(k[-1], (M, D))

    def net(ws, x, mlp):
        for wg, wu, wd in ws:
            x = x + mlp(_dense(x, wg, 1, jnp.float32), _dense(x, wu, 1, jnp.float32), wd)
        return jnp.sum(x ** 2)

    def buffer(mlp):
        compiled = jax.jit(jax.grad(lambda ws, x: net(ws, x, mlp))).lower(ws, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes / (M * F * 4)

    plain, new = buffer(_plain_swiglu_down), buffer(lambda g, u, w: swiglu_down(g, u, w, jnp.float32))
    assert new <= plain - 1.5 * L, (plain, new)


@pytest.mark.parametrize("low_precision_backward", [True, False])
def test_bfloat16_gradients_close_to_float32(low_precision_backward):
    """bf16 compute (float32 weights and stream) within 5% of the float32 gradient in norm, with the
    backward products in bf16 (the default) or differentiated as written (float32 cotangents)."""
    model, params = _init(n_layers=2)  # two layers: each runs the same bfloat16 matmuls
    bf = Model(preset("tiny", dtype="bfloat16", n_layers=2, low_precision_backward=low_precision_backward))
    tokens, mask = left_padded([8, 5], 8, 64, seed=9)

    @functools.partial(jax.jit, static_argnames=("m",))
    @jax.grad
    def grad(p, m):
        return -jnp.mean(jax.nn.log_softmax(m(p, tokens, mask))[..., 3])

    g32, g16 = grad(params, model), grad(params, bf)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.float32
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-7


@pytest.mark.parametrize("residual", ["float32", "bfloat16"])
def test_pure_bfloat16_close_to_float32(residual):
    """Pure bf16 (weights, activations and gradients in bfloat16; with residual "bfloat16" the
    stream, norm and RoPE outputs too, as the GPU anchor trains) against float32 from the same
    weights: logits within 1.5e-2 where the mask is live (|logits| ~0.7), every gradient leaf
    bfloat16 and within 3% of the float32 gradient in norm (bf16 keeps 8 bits of mantissa, a
    rounding error of up to 0.4%; measured here: 4.9e-3 and 0.8% with a float32 stream, 4.4e-3 and
    0.83% with a bf16 one)."""
    model, params = _init(n_layers=2)
    pure = Model(preset("tiny", dtype="bfloat16", param_dtype="bfloat16", residual_dtype=residual, n_layers=2))
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    tokens, mask = left_padded([8, 5], 8, 64, seed=10)
    lf, lb = _logits(params, tokens, mask, model=model), _logits(p16, tokens, mask, model=pure)
    real = mask.astype(bool)
    err = np.abs(np.asarray(lf, np.float32) - np.asarray(lb, np.float32))[real].max()
    assert 0 < err < 1.5e-2

    @functools.partial(jax.jit, static_argnames=("m",))
    @jax.grad
    def grad(p, m):
        logp = jax.nn.log_softmax(m(p, tokens, mask).astype(jnp.float32))
        return -jnp.mean(logp[..., 3])

    g32, g16 = grad(params, model), grad(p16, pure)
    for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        assert b.dtype == jnp.bfloat16
        b = np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 0.03 * np.linalg.norm(a) + 1e-6
