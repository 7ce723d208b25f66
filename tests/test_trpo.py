"""TRPO: conjugate gradient, Fisher-vector products against an explicit Fisher, and the trust region."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rljax.data.batch import PolicyBatch
from rljax.losses.trpo import (TRPOConfig, conjugate_gradient, fisher_vector_product, make_trpo_objectives,
                               trpo_update)
from rljax.models import Model
from rljax.models.config import TransformerConfig
from rljax.models.logprobs import token_logprobs


def _spd(n, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * rng.uniform(1.0, 10.0, n)) @ q.T, rng.normal(size=n)


def test_conjugate_gradient_solves_an_spd_system():
    a, b = _spd(30, 0)
    x, rr = jax.jit(lambda b: conjugate_gradient(lambda v: jnp.asarray(a, jnp.float32) @ v, b, iters=30))(
        jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(a @ np.asarray(x), b, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), atol=1e-5)
    assert float(rr) < 1e-8


def test_conjugate_gradient_on_a_pytree_equals_the_flat_solve():
    a, b = _spd(12, 1)
    A = jnp.asarray(a, jnp.float32)
    split = lambda v: {"w": v[:8].reshape(2, 4), "b": v[8:]}  # noqa: E731
    flat = lambda t: jnp.concatenate([t["w"].ravel(), t["b"]])  # noqa: E731
    x_tree, _ = conjugate_gradient(lambda t: split(A @ flat(t)), split(jnp.asarray(b, jnp.float32)), iters=12)
    x_flat, _ = conjugate_gradient(lambda v: A @ v, jnp.asarray(b, jnp.float32), iters=12)
    np.testing.assert_allclose(flat(x_tree), x_flat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x_flat), np.linalg.solve(a, b), atol=1e-5)


# Every model computation below runs compiled: op-by-op (eager) execution compiles each primitive
# separately, which costs far more than the one program per shape and config compiled here.
_token_logprobs = jax.jit(token_logprobs, static_argnames=("model",))
_trpo_update = jax.jit(trpo_update, static_argnames=("model", "cfg"))
_init = jax.jit(lambda model, key: model.init(key), static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _kl_and_gain(old, new, batch, *, model, cfg):
    """KL(π_old ‖ π_new) and surrogate(new) − surrogate(old), from the objectives built at `old`."""
    surrogate, kl = make_trpo_objectives(old, batch, model=model, cfg=cfg)
    return kl(new), surrogate(new) - surrogate(old)


def _micro_model():
    cfg = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=16,
                            max_seq_len=16)
    return Model(cfg)


def _batch(model, params, seed, B=3, T=6, per_token=False):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, model.config.vocab_size, (B, T)), jnp.int32)
    attn = np.ones((B, T), np.int32)
    attn[1, :2] = 0  # a left-padded row
    attn[2, -1] = 0  # a right-padded row
    loss = attn.copy()
    loss[:, :2] = 0  # a 2-token prompt
    attn, loss = jnp.asarray(attn), jnp.asarray(loss)
    old = _token_logprobs(params, tokens, attn, model=model)
    adv = rng.normal(size=(B, T - 1) if per_token else B).astype(np.float32)
    return PolicyBatch(tokens=tokens, attention_mask=attn, loss_mask=loss, old_logprobs=old,
                       advantages=jnp.asarray(adv), rewards=jnp.zeros(B), group_ids=jnp.arange(B))


def test_fisher_vector_product_equals_an_explicit_fisher():
    """F = mean over counted tokens of Σ_v π(v) ∇log π(v) ∇log π(v)ᵀ, from the full Jacobian."""
    model = _micro_model()
    params = _init(model, jax.random.key(0))
    batch = _batch(model, params, 0)
    flat, unravel = ravel_pytree(params)
    cfg = TRPOConfig()

    def log_probs(theta_flat):  # [B, T-1, V]
        logits = model(unravel(theta_flat), batch.tokens, batch.attention_mask)[:, :-1]
        return jax.nn.log_softmax(logits, -1)

    @jax.jit
    def fvp_and_kl_grad(params, batch, v):  # F v and ∇KL at θ_old, from the library's objectives
        _, kl = make_trpo_objectives(params, batch, model=model, cfg=cfg)
        return fisher_vector_product(kl, params)(v), jax.grad(kl)(params)

    lp, J = jax.jit(lambda f: (log_probs(f), jax.jacobian(log_probs)(f)))(flat)  # J: [B, T-1, V, P]
    live = batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]  # a real target predicted from a real slot
    mask = np.asarray(batch.loss_mask[:, 1:] * live, np.float64)
    p = np.exp(np.asarray(lp, np.float64))
    Jn = np.asarray(J, np.float64)
    fisher = np.einsum("btv,btvi,btvj,bt->ij", p, Jn, Jn, mask) / mask.sum()
    v = np.random.default_rng(1).normal(size=flat.shape)
    fv_tree, kl_grad = fvp_and_kl_grad(params, batch, unravel(jnp.asarray(v, jnp.float32)))
    fv = ravel_pytree(fv_tree)[0]
    np.testing.assert_allclose(np.asarray(fv), fisher @ v, rtol=1e-3, atol=1e-6 * np.abs(fisher @ v).max())
    assert float(ravel_pytree(kl_grad)[0] @ ravel_pytree(kl_grad)[0]) < 1e-12  # KL min


@pytest.mark.parametrize("max_kl,per_token", [(0.01, False), (0.001, True)])
def test_trpo_step_stays_in_the_trust_region_and_improves_the_surrogate(max_kl, per_token):
    model = _micro_model()
    params = _init(model, jax.random.key(2))
    batch = _batch(model, params, 3, B=4, T=7, per_token=per_token)
    cfg = TRPOConfig(max_kl=max_kl)
    new, m = _trpo_update(params, batch, model=model, cfg=cfg)
    measured, gain = map(float, _kl_and_gain(params, new, batch, model=model, cfg=cfg))
    assert float(m["accepted"]) == 1.0 and float(m["sFs"]) > 0
    assert measured <= max_kl * (1 + 1e-3)
    np.testing.assert_allclose(measured, float(m["kl"]), rtol=1e-4, atol=1e-9)
    assert gain > 0
    np.testing.assert_allclose(gain, float(m["surrogate_gain"]), rtol=1e-3, atol=1e-7)
    # the step is the line search's fraction of the full natural-gradient step, 0.5^k
    k = float(m["backtracks"]) - 1
    assert float(m["step_fraction"]) == pytest.approx(0.5 ** k)


def test_trpo_keeps_the_old_params_when_no_step_improves():
    """With zero advantages no step can raise the surrogate: the update is rejected."""
    model = _micro_model()
    params = _init(model, jax.random.key(4))
    batch = _batch(model, params, 5, B=4, T=7)  # the shapes and config of a case above: its compiled update
    batch = batch.replace(advantages=jnp.zeros_like(batch.advantages))
    new, m = _trpo_update(params, batch, model=model, cfg=TRPOConfig(max_kl=0.01))
    assert float(m["accepted"]) == 0.0 and float(m["step_fraction"]) == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, params)


def test_a_stale_token_past_the_log_ratio_bound_adds_no_gradient_and_no_gain():
    """A stale sampler's log-prob 95 nats below the policy's (exp overflows float32 past 88.7) once made
    L, g and the step NaN, and the step was rejected without a word. Capped at e^20 the token weighs a
    constant: the update equals the one where that token has ρ = 1 and A = 0 (no gradient, no gain either)."""
    model = _micro_model()
    params = _init(model, jax.random.key(2))
    batch = _batch(model, params, 3, B=4, T=7, per_token=True)  # the shapes and config of a case above
    cfg = TRPOConfig(max_kl=0.001)
    row, t = 0, 4  # an in-mask position (the prompt is tokens 0-1)
    assert int(batch.loss_mask[row, t + 1]) == 1
    stale = batch.replace(old_logprobs=batch.old_logprobs.at[row, t].add(-95.0))
    neutral = batch.replace(advantages=batch.advantages.at[row, t].set(0.0))
    new, m = _trpo_update(params, stale, model=model, cfg=cfg)
    ref_new, ref_m = _trpo_update(params, neutral, model=model, cfg=cfg)
    assert float(m["accepted"]) == 1.0 and float(m["skipped"]) == 0.0
    for k in ("surrogate_gain", "kl", "step_fraction", "grad_norm"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), new, ref_new)


def test_trpo_skips_a_step_whose_surrogate_is_not_finite():
    """NaN advantages: no candidate can be judged, so θ_old is kept without a line search, and the step
    says skipped = 1 (the loop counts it like an optimizer's non-finite step)."""
    model = _micro_model()
    params = _init(model, jax.random.key(4))
    batch = _batch(model, params, 5, B=4, T=7)
    batch = batch.replace(advantages=batch.advantages.at[1].set(jnp.nan))
    new, m = _trpo_update(params, batch, model=model, cfg=TRPOConfig(max_kl=0.01))
    assert float(m["skipped"]) == 1.0 and float(m["accepted"]) == 0.0 and float(m["backtracks"]) == 0.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, params)


def test_trpo_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="max_kl"):
        TRPOConfig(max_kl=0.0)
    with pytest.raises(ValueError, match="TRPOConfig.max_kl: must be positive and finite, got nan"):
        TRPOConfig(max_kl=float("nan"))  # the line search would never accept a step
    with pytest.raises(ValueError, match="TRPOConfig.damping"):
        TRPOConfig(damping=float("nan"))
    with pytest.raises(ValueError, match="backtrack_ratio"):
        TRPOConfig(backtrack_ratio=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        TRPOConfig(aggregation="constant")


@pytest.mark.slow  # a sharded twin of 20-36 s (others stay in the default suite); .ci/run runs the slow tier
def test_trpo_step_on_sharded_params_equals_one_device():
    """One TRPO update with params sharded over a (2, 2, 2) mesh of 8 simulated devices
    equals the single-device update (the CG and line search are pytree ops under jit)."""
    from conftest import run_with_devices

    out = run_with_devices("""
        import jax, numpy as np
        from rljax.losses.trpo import TRPOConfig, trpo_update
        from rljax.models import Model, preset
        from rljax.sharding import make_mesh, param_shardings, shard_params
        from test_trpo import _batch

        results = []
        for mesh in (None, make_mesh(data=2, fsdp=2, tensor=2)):
            model = Model(preset("tiny", n_layers=1), mesh=mesh)
            params = Model(preset("tiny", n_layers=1)).init(jax.random.key(0))
            batch = _batch(Model(preset("tiny", n_layers=1)), params, 3, B=8, T=7, per_token=True)
            if mesh is not None:
                params = shard_params(params, param_shardings(model, mesh))
            new, m = jax.jit(lambda p, b: trpo_update(p, b, model=model, cfg=TRPOConfig(max_kl=0.01)))(params, batch)
            if mesh is not None:
                w = new["layers"]["mlp"]["gate"]
                assert len({s.device for s in w.addressable_shards}) == 8
            results.append((jax.device_get(new), jax.device_get(m)))
        (p1, m1), (p2, m2) = results
        assert m1["accepted"] == 1.0 and m2["accepted"] == 1.0
        for k in ("kl", "surrogate_gain", "sFs", "step_fraction"):
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-3, err_msg=k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6), p1, p2)
        print("ok")
    """)
    assert "ok" in out


def test_trpo_on_a_bfloat16_model():
    """bf16 compute: the KL term runs without the custom VJPs that forward-over-reverse cannot
    differentiate (recompute_swiglu, low_precision_backward), so F v exists and is within 5% in norm
    of the float32 model's from the same weights (0.35% measured), and a step stays in the trust
    region. (Before, forward mode met `_low_precision_dot`'s custom VJP and raised.)"""
    f32 = _micro_model()
    bf = Model(f32.config.replace(dtype="bfloat16"))
    assert bf.config.recompute_swiglu and bf.config.low_precision_backward
    params = _init(f32, jax.random.key(6))
    batch = _batch(f32, params, 7, B=4, T=7)
    cfg = TRPOConfig(max_kl=0.01)
    v = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(8).normal(size=x.shape), x.dtype), params)

    @functools.partial(jax.jit, static_argnames=("model",))
    def fvp(params, batch, v, *, model):
        return fisher_vector_product(make_trpo_objectives(params, batch, model=model, cfg=cfg)[1], params)(v)

    want, got = (ravel_pytree(fvp(params, batch, v, model=m))[0] for m in (f32, bf))
    assert 0 < np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)
    new, m = _trpo_update(params, batch, model=bf, cfg=cfg)
    measured, gain = map(float, _kl_and_gain(params, new, batch, model=bf, cfg=cfg))
    assert float(m["accepted"]) == 1.0 and measured <= cfg.max_kl * (1 + 1e-3) and gain > 0
