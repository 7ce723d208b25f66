"""aggregate, SFT loss, optimizer and train step: closed forms, naive references, equivalences."""
import functools

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_with_devices
from rljax.data import SequenceBatch
from rljax.losses import SFTConfig, sft_loss
from rljax.models import Model, preset
from rljax.ops import LOSS_WEIGHT, aggregate, aggregate_count
from rljax.state import (OptimizerConfig, TrainState, accumulate_gradients, apply_gradients, create_state,
                         learning_rate_schedule, make_optimizer, make_train_step, update_if_by_cond,
                         update_if_by_select)

# Jitted once per batch shape and config: run op by op (eagerly), the model's loss, logits and
# gradients took most of this file's time (make_train_step jits the loss itself).
jit_sft_loss = jax.jit(sft_loss, static_argnames=("model", "cfg"))
full_logits = jax.jit(lambda params, tokens, mask, model: model(params, tokens, mask), static_argnames="model")


@pytest.fixture(scope="module")
def one_layer():
    """(model, params): the tiny preset with one layer. The losses, gradients and steps checked with it
    are per token and per parameter, so depth would only add compile time."""
    model = Model(preset("tiny", n_layers=1))
    return model, jax.jit(model.init)(jax.random.key(0))  # eager init compiles op by op


def test_aggregate_known_answers():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert float(aggregate(x, m, "token_mean")) == pytest.approx(16.0 / 4)
    assert float(aggregate(x, m, "seq_mean_token_mean")) == pytest.approx((2.0 + 10.0) / 2)  # empty row skipped
    assert float(aggregate(x, m, "seq_mean_token_sum")) == pytest.approx((6.0 + 10.0 + 0.0) / 3)
    assert float(aggregate(x, m, "constant", constant=8)) == pytest.approx(16.0 / (3 * 8))
    assert float(aggregate(x, jnp.zeros_like(m), "token_mean")) == 0.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(x, m, "mean")
    with pytest.raises(ValueError, match="constant"):
        aggregate(x, m, "constant")


def _batch(seed=0, B=4, T=16, prompt=5, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
    attn = np.ones((B, T), np.int32)
    loss_mask = np.zeros((B, T), np.int32)
    loss_mask[:, prompt:] = 1
    if B > 1:
        loss_mask[1, -3:] = 0  # row 1: 3 masked tokens after its completion
    return SequenceBatch(tokens=tokens, attention_mask=attn, loss_mask=loss_mask)


def _naive_nll(model, params, batch, eps=0.0):
    logits = np.asarray(full_logits(params, batch.tokens, batch.attention_mask, model=model), np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(batch.tokens)[:, 1:, None], -1)[..., 0]
    per = (1 - eps) * nll - eps * logp.mean(-1)
    m = np.asarray(batch.loss_mask)[:, 1:]
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sft_loss_equals_naive_completion_only_nll(one_layer, eps):
    model, params = one_layer
    batch = _batch()
    loss, metrics = jit_sft_loss(params, batch, model=model, cfg=SFTConfig(label_smoothing=eps))
    assert float(loss) == pytest.approx(_naive_nll(model, params, batch, eps), rel=1e-5)
    assert float(metrics["tokens"]) == 4 * 11 - 3


def test_masked_tokens_contribute_nothing(one_layer):
    """Changing tokens whose loss is masked (after the completion) changes neither loss nor gradient,
    and prompt positions carry no loss: the gradient equals that of the completion-only NLL."""
    model, params = one_layer
    batch = _batch()
    grad = jax.jit(jax.grad(lambda p, b: sft_loss(p, b, model=model, cfg=SFTConfig())[0]))
    tokens = np.array(batch.tokens)
    tokens[1, -3:] = (tokens[1, -3:] + 7) % 64
    perturbed = batch.replace(tokens=tokens)
    l0 = jit_sft_loss(params, batch, model=model, cfg=SFTConfig())[0]
    l1 = jit_sft_loss(params, perturbed, model=model, cfg=SFTConfig())[0]
    assert float(l0) == float(l1)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grad(params, batch), grad(params, perturbed))

    def completion_only(p):  # written independently of sft_loss: full logits, explicit completion slice
        logits = model(p, batch.tokens, batch.attention_mask)[:, 4:-1]
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch.tokens[:, 5:, None], -1)[..., 0]
        m = batch.loss_mask[:, 5:]
        return -(lp * m).sum() / m.sum()

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                 grad(params, batch), jax.jit(jax.grad(completion_only))(params))


def test_packed_equals_unpacked(one_layer):
    model, params = one_layer
    a, b = _batch(1, B=1, T=7, prompt=3), _batch(2, B=1, T=9, prompt=4)
    unpacked_tokens = np.zeros((2, 9), np.int32)
    unpacked_tokens[0, :7], unpacked_tokens[1] = a.tokens[0], b.tokens[0]
    attn = np.zeros((2, 9), np.int32)
    attn[0, :7], attn[1] = 1, 1
    lm = np.zeros((2, 9), np.int32)
    lm[0, :7], lm[1] = a.loss_mask[0], b.loss_mask[0]
    unpacked = SequenceBatch(tokens=unpacked_tokens, attention_mask=attn, loss_mask=lm)
    packed = SequenceBatch(
        tokens=np.concatenate([a.tokens, b.tokens], 1), attention_mask=np.ones((1, 16), np.int32),
        loss_mask=np.concatenate([a.loss_mask, b.loss_mask], 1),
        segment_ids=np.array([[1] * 7 + [2] * 9]), positions=np.array([list(range(7)) + list(range(9))]))
    lu = jit_sft_loss(params, unpacked, model=model, cfg=SFTConfig())[0]
    lp = jit_sft_loss(params, packed, model=model, cfg=SFTConfig())[0]
    assert float(lp) == pytest.approx(float(lu), rel=1e-5)
    # per-sequence normalisations would see the packed row as one sequence (4.0726 for 4.0504 once): refused
    for mode in ("seq_mean_token_mean", "seq_mean_token_sum"):
        with pytest.raises(ValueError, match=rf"normalisation='{mode}' is per sequence, but the batch is packed"):
            jit_sft_loss(params, packed, model=model, cfg=SFTConfig(normalisation=mode))
        jit_sft_loss(params, unpacked, model=model, cfg=SFTConfig(normalisation=mode))  # unpacked rows: fine


def test_learning_rate_schedule_values():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", end_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # halfway through the cosine
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)
    lin = learning_rate_schedule(OptimizerConfig(lr=2.0, total_steps=100, schedule="linear", end_lr_ratio=0.0))
    assert float(lin(25)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")


def test_sft_memorises_a_small_batch(tiny):
    model, _ = tiny
    state = create_state(model, OptimizerConfig(lr=3e-3, schedule="constant", clip_norm=1.0), jax.random.key(0))
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), OptimizerConfig(
        lr=3e-3, schedule="constant", clip_norm=1.0))
    batch = _batch(3)
    first = None
    for _ in range(150):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert first > 3.5 and float(m["loss"]) < 0.05
    assert int(state.step) == 150 and int(state.skipped_steps) == 0


def test_non_finite_loss_is_skipped_and_counted(one_layer):
    model, _ = one_layer
    opt = OptimizerConfig(lr=1e-2, schedule="constant")

    def loss_fn(params, batch):
        loss, metrics = sft_loss(params, batch["seq"], model=model, cfg=SFTConfig())
        return loss * batch["scale"], metrics

    state = create_state(model, opt, jax.random.key(0))
    step = make_train_step(loss_fn, opt, donate=False)
    good = {"seq": _batch(4), "scale": jnp.float32(1.0)}
    bad = {"seq": _batch(4), "scale": jnp.float32(jnp.nan)}
    s1, m1 = step(state, bad)
    assert int(m1["skipped"]) == 1 and int(s1.skipped_steps) == 1 and int(s1.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s1.params, state.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s1.opt_state, state.opt_state)
    s2, m2 = step(s1, good)
    assert int(m2["skipped"]) == 0 and int(s2.skipped_steps) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s2.params))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)))


def test_gradient_accumulation_equals_one_big_batch(one_layer):
    model, _ = one_layer
    loss_fn = functools.partial(sft_loss, model=model, cfg=SFTConfig(normalisation="seq_mean_token_sum"))
    big = _batch(5, B=4)
    halves = [jax.tree.map(lambda x: x[i:i + 2], big) for i in (0, 2)]
    # eps = 1 keeps Adam's update ~linear in the gradient, so equal gradients show as equal parameters
    base = OptimizerConfig(lr=1.0, schedule="constant", clip_norm=None, eps=1.0)
    s_big = create_state(model, base, jax.random.key(0))
    s_big, _ = make_train_step(loss_fn, base)(s_big, big)
    acc = OptimizerConfig(lr=1.0, schedule="constant", clip_norm=None, eps=1.0, grad_accum=2)
    s_acc = create_state(model, acc, jax.random.key(0))
    step = make_train_step(loss_fn, acc)
    for h in halves:
        s_acc, _ = step(s_acc, h)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(), s_big.params, create_state(
        model, base, jax.random.key(0)).params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step did something
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_big.params, s_acc.params)


def _rows(counts, seed, T=20, prompt=2):
    """A SequenceBatch whose row b predicts exactly counts[b] tokens (loss_mask from `prompt` on;
    the first token is never a target, so the shifted mask keeps all of them); 0 = a padding row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (len(counts), T)).astype(np.int32)
    loss_mask = np.zeros((len(counts), T), np.int32)
    for b, c in enumerate(counts):
        loss_mask[b, prompt:prompt + c] = 1
    return SequenceBatch(tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=loss_mask)


def _cat(*batches):
    return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


def test_aggregate_count_is_each_modes_denominator():
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert [float(aggregate_count(m, mode)) for mode in ("token_mean", "seq_mean_token_mean",
                                                          "seq_mean_token_sum", "constant")] == [4.0, 2.0, 3.0, 3.0]
    # Σ_m N_m aggregate_m / Σ_m N_m = aggregate of the concatenation, for every mode
    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(r, 6)), (rng.random((r, 6)) < p).astype(np.float32)) for r, p in ((2, 0.2), (5, 0.9))]
    parts[0][1][1] = 0  # an empty row
    x, mask = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"):
        n = [float(aggregate_count(jnp.asarray(mm), mode)) for _, mm in parts]
        a = [float(aggregate(jnp.asarray(xx), jnp.asarray(mm), mode, constant=7.0)) for xx, mm in parts]
        whole = float(aggregate(jnp.asarray(x), jnp.asarray(mask), mode, constant=7.0))
        assert sum(ni * ai for ni, ai in zip(n, a)) / sum(n) == pytest.approx(whole, rel=1e-5), mode


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def test_accumulation_of_unequal_micro_batches_equals_one_big_batch(one_layer):
    """Micro-batches of 3 and 17 tokens (token_mean, clipped): accumulating them must give the update
    of one step on both, which needs the micro-gradients weighted by their token counts and the clip
    applied once, to the accumulated gradient. A non-finite micro-batch in between is skipped."""
    model, params = one_layer

    def loss_fn(p, batch):
        loss, metrics = sft_loss(p, batch["seq"], model=model, cfg=SFTConfig())
        return loss * batch["scale"], metrics

    one = jnp.float32(1.0)
    # every batch is [2, 20] (a padding row where needed), so the forward and backward compile once
    micro = [{"seq": _rows([3, 0], seed=1), "scale": one}, {"seq": _rows([17, 0], seed=2), "scale": one}]
    whole = {"seq": _cat(*(jax.tree.map(lambda x: x[:1], b["seq"]) for b in micro)), "scale": one}
    bad = {"seq": micro[1]["seq"], "scale": jnp.float32(jnp.nan)}
    # eps = 1 keeps Adam's first update g / (|g| + 1) sensitive to the gradient's size, and a
    # small clip_norm makes a clip per micro-batch (instead of once) visible
    base = OptimizerConfig(lr=10.0, schedule="constant", clip_norm=0.05, eps=1.0)
    acc_cfg = OptimizerConfig(lr=10.0, schedule="constant", clip_norm=0.05, eps=1.0, grad_accum=2)

    step = make_train_step(loss_fn, acc_cfg)
    acc = create_state(model, acc_cfg, jax.random.key(0), params=params)
    counts = []
    for b in (micro[0], bad, micro[1]):
        acc, m = step(acc, b)
        assert LOSS_WEIGHT not in m  # popped: the step's metrics are as before
        counts.append(float(m["tokens"]))
    assert counts == [3.0, 17.0, 17.0] and int(acc.skipped_steps) == 1 and int(acc.opt_state.micro_step) == 0

    # the references share one compiled forward and backward; only the optimizer differs
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def run(optimizer, batches):
        state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params),
                           rng=jax.random.key(0), skipped_steps=jnp.int32(0))
        update = jax.jit(functools.partial(apply_gradients, optimizer=optimizer))
        for b in batches:
            (loss, metrics), grads = grad_fn(state.params, b)
            state, m = update(state, loss=loss, grads=grads, metrics={}, weight=metrics[LOSS_WEIGHT])
        return state.params, float(m["grad_norm"])

    big, grad_norm = run(make_optimizer(base), [whole])
    assert grad_norm > 3 * base.clip_norm  # clipping was active
    old, _ = run(optax.MultiSteps(make_optimizer(base), every_k_schedule=2), micro)  # the old accumulation
    moved = _max_diff(big, params)
    assert moved > 1e-2  # the step did something
    assert _max_diff(big, acc.params) < 1e-4 * moved
    # MultiSteps weights micro-batches equally: its update misses the one-batch update by a
    # margin a thousand times the tolerance above (so this test fails on the old accumulation)
    assert _max_diff(big, old) > 1e-1 * moved


def test_accumulation_with_unit_weights_is_multisteps():
    # weight 1 on every micro-batch (a loss that reports no count): the mean of the micro-gradients,
    # as optax.MultiSteps computes it; a weight of 0 counts nothing
    params = {"w": jnp.zeros(3)}
    ours, ms = accumulate_gradients(optax.sgd(1.0), 2), optax.MultiSteps(optax.sgd(1.0), 2)
    s, t = ours.init(params), ms.init(params)
    for g in (jnp.array([1.0, 2.0, 3.0]), jnp.array([5.0, -2.0, 1.0])):
        (u, s), (v, t) = ours.update({"w": g}, s, params), ms.update({"w": g}, t, params)
    np.testing.assert_allclose(u["w"], v["w"], rtol=1e-6)
    np.testing.assert_allclose(u["w"], [-3.0, 0.0, -2.0])
    (u, s) = ours.update({"w": jnp.array([1.0, 1.0, 1.0])}, s, params, weight=3.0)
    np.testing.assert_allclose(u["w"], 0.0)
    u, s = ours.update({"w": jnp.array([9.0, 9.0, 9.0])}, s, params, weight=0.0)
    np.testing.assert_allclose(u["w"], [-1.0, -1.0, -1.0])  # (3·1 + 0·9) / 3
    with pytest.raises(ValueError, match="every_k"):
        accumulate_gradients(optax.sgd(1.0), 0)


def test_weight_decay_skips_vectors():
    opt = make_optimizer(OptimizerConfig(lr=1.0, schedule="constant", weight_decay=0.5, clip_norm=None))
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    upd, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(upd["scale"], np.zeros(2))
    # a real model: the stacked layers' norm scales [L, D] and q/k/v biases [L, H, hd] are not matrices
    model = Model(preset("tiny", n_layers=2, qkv_bias=True, qk_norm=True, heads=("lm", "value", "reward")))
    params = model.init(jax.random.key(0))
    upd, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    decayed = {jax.tree_util.keystr(p) for p, u in jax.tree_util.tree_flatten_with_path(upd)[0] if np.any(u != 0)}
    assert decayed == {"['embedding']", "['lm_head']", "['layers']['attn']['q_proj']", "['layers']['attn']['k_proj']",
                       "['layers']['attn']['v_proj']", "['layers']['attn']['o_proj']", "['layers']['mlp']['gate']",
                       "['layers']['mlp']['up']", "['layers']['mlp']['down']"}
    for p, u in jax.tree_util.tree_flatten_with_path(upd)[0]:  # each decayed by exactly lr * wd * w
        w = params
        for k in p:
            w = w[k.key]
        np.testing.assert_allclose(u, -0.5 * np.asarray(w) if jax.tree_util.keystr(p) in decayed else 0, rtol=1e-6,
                                   err_msg=jax.tree_util.keystr(p))


def test_optimizer_settings_that_break_adam_are_refused():
    for field, value, why in (("b1", 1.0, "must be in [0, 1), got 1.0"), ("b2", -0.1, "must be in [0, 1), got -0.1"),
                              ("eps", -1.0, "must be >= 0, got -1.0"), ("weight_decay", -0.5, "must be >= 0, got -0.5"),
                              ("end_lr_ratio", -1.0, "must be >= 0, got -1.0")):
        with pytest.raises(ValueError, match=rf"^OptimizerConfig.{field}: {re.escape(why)}$"):
            OptimizerConfig(**{field: value})


def test_head_lr_scales_only_the_scalar_heads():
    # Adam's first update is -lr * g / (|g| + eps') = -lr * sign(g) (bias-corrected), so each
    # parameter moves by exactly its learning rate: head_lr for value/reward heads, lr elsewhere.
    cfg = OptimizerConfig(lr=1e-3, schedule="constant", clip_norm=None, eps=1e-12, head_lr=5e-2)
    opt = make_optimizer(cfg)
    params = {"lm_head": jnp.ones((2, 3)), "value_head": jnp.ones(2), "value_bias": jnp.float32(0.0),
              "layers": {"w": jnp.ones(2)}, "reward_head": jnp.ones(2)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, -2.0), params)
    upd, _ = opt.update(grads, opt.init(params), params)
    for k, v in upd.items():
        want = 5e-2 if k in ("value_head", "value_bias", "reward_head") else 1e-3
        jax.tree.map(lambda u, w=want: np.testing.assert_allclose(u, w, rtol=1e-5), v)
    with pytest.raises(ValueError, match="head_lr"):
        OptimizerConfig(head_lr=0.0)


def test_sharded_training_matches_single_device():
    out = run_with_devices("""
        import functools, jax, numpy as np
        from rljax.models import Model, preset
        from rljax.losses import SFTConfig, sft_loss
        from rljax.sharding import make_mesh, shard_batch
        from rljax.state import OptimizerConfig, create_state, make_train_step
        from test_train import _batch

        opt = OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=10)
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        curves = []
        for m in (None, mesh):
            model = Model(preset("tiny", n_layers=1), mesh=m)
            state = create_state(model, opt, jax.random.key(0), mesh=m)
            if m is not None:
                gate = state.params["layers"]["mlp"]["gate"]
                assert gate.addressable_shards[0].data.size * 4 == gate.size
                mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate"]
                assert mu.sharding == gate.sharding, (mu.sharding, gate.sharding)
            step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), opt, model=model,
                                   mesh=m)
            losses = []
            for i in range(5):
                batch = _batch(10 + i, B=8)
                state, metrics = step(state, batch if m is None else shard_batch(batch, m))
                losses.append(float(metrics["loss"]))
            curves.append(losses)
        np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
        assert curves[0][-1] < curves[0][0]
        print("CURVES", curves)
    """)
    assert "CURVES" in out


def test_train_step_compiles_once_for_batches_of_one_bucket(one_layer):
    from rljax.data.collate import collate_prompt_completion
    from rljax.tokenizer import CharTokenizer

    model, _ = one_layer
    tok = CharTokenizer()
    opt = OptimizerConfig(lr=1e-3)
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), opt)
    state = create_state(model, opt, jax.random.key(0))
    for pairs in ([("1+2=", "3"), ("4*5=", "20")], [("10-3=", "7"), ("8=", "8")], [("9*9=", "81"), ("1=", "1")]):
        state, _ = step(state, collate_prompt_completion(tok, pairs))  # every row fits the 16-token bucket
    assert step._cache_size() == 1


def test_update_if_finite_by_select_and_by_cond_agree_and_cpu_steps_use_the_conditional(one_layer):
    """Both forms of the non-finite guard give update(params, opt_state) where the gradient is
    finite and the inputs unchanged where it is not; a train step lowered for the CPU takes the
    conditional (no select of old against new state, whose copies of the moments it avoids)."""
    opt = optax.adamw(0.1, weight_decay=0.01)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.full((3,), -1.0)}
    opt_state = opt.init(params)
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([1.0, -2.0, 3.0])}

    def update(p, o):
        u, o = opt.update(grads, o, p)
        return optax.apply_updates(p, u), o

    want = jax.jit(update)(params, opt_state)
    for form in (update_if_by_select, update_if_by_cond):
        run = jax.jit(lambda finite, p, o, form=form: form(finite, update, p, o))
        for finite, expected, rtol in ((True, want, 1e-6), (False, (params, opt_state), 0)):  # 1e-6: fusion
            got = run(jnp.bool_(finite), params, opt_state)
            assert jax.tree.structure(got) == jax.tree.structure(expected)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=0),
                         got, expected)

    model, _ = one_layer
    cfg = OptimizerConfig(lr=1e-2, schedule="constant")
    state = create_state(model, cfg, jax.random.key(0))
    step = make_train_step(functools.partial(sft_loss, model=model, cfg=SFTConfig()), cfg, donate=False)
    hlo = step.lower(state, _batch(4)).compile().as_text()
    assert (" conditional(" in hlo) == (jax.default_backend() == "cpu")


def test_apply_gradients_traces_the_optimizer_update_once_for_both_guards():
    """Both forms of the non-finite guard (`lax.platform_dependent` traces each) replay one trace of
    the optimizer's update (`traced_once`); the step is plain SGD's either way."""
    calls = []
    sgd = optax.sgd(0.5)
    counting = optax.GradientTransformation(sgd.init, lambda g, s, p=None: calls.append(1) or sgd.update(g, s, p))
    params = {"w": jnp.arange(3.0)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=counting.init(params), rng=jax.random.key(0),
                       skipped_steps=jnp.int32(0))
    new, m = jax.jit(lambda s, g: apply_gradients(s, counting, jnp.float32(1.0), g, {}))(
        state, {"w": jnp.array([1.0, -2.0, 4.0])})
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(new.params["w"]), [-0.5, 2.0, 0.0])
    assert int(m["skipped"]) == 0 and int(new.step) == 1


def test_apply_gradients_keeps_the_state_dtypes_where_the_optimizer_promotes():
    """optax.inject_hyperparams keeps float32 hyperparameters, which promote bf16 Adam moments to float32
    in the update: the guard casts the new state back to the old one's dtypes (else the conditional's
    branches disagree on CPU and every platform's next step would compile a new program); a
    non-finite gradient leaves the state as it was."""
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
    params = {"w": jnp.ones((3, 2)), "b": jnp.array([0.5, -0.25], jnp.bfloat16)}
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.array([1.0, -1.0], jnp.bfloat16)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(0),
                       skipped_steps=jnp.int32(0))
    step = jax.jit(lambda s, g, loss: apply_gradients(s, tx, loss, g, {}))
    new, m = step(state, grads, jnp.float32(1.0))
    assert int(m["skipped"]) == 0
    assert jax.tree.map(lambda a: a.dtype, new.opt_state) == jax.tree.map(lambda a: a.dtype, state.opt_state)
    # the bf16 moment is the float32 update rounded once: mu = (1 - b1) g
    np.testing.assert_array_equal(np.asarray(new.opt_state.inner_state[0].mu["b"], np.float32),
                                  np.asarray((0.1 * grads["b"].astype(jnp.float32)).astype(jnp.bfloat16), np.float32))
    assert float(new.params["b"][0]) < 0.5 and float(new.params["b"][1]) > -0.25
    kept, m = step(new, grads, jnp.float32(jnp.nan))
    assert int(m["skipped"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
                 (kept.params, kept.opt_state), (new.params, new.opt_state))
