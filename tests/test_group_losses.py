"""Group policy losses beyond GRPO's token clip (GSPO, CISPO, the ratio-weighted KL term) against
naive per-row references and their on-policy closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.algorithms import ALGORITHMS, prepare
from rljax.estimators import PrepareInput
from rljax.losses import GSPOConfig, gspo_loss
from rljax.models.logprobs import token_logprobs
from tests.test_pg_losses import _batch, _mask


def _naive_gspo(lp, b, m, eps_low, eps_high):
    """Per row: s_i = exp(mean over its completion tokens of ℓ − ℓ_old), −min(s A, clip(s) A); mean over rows."""
    losses, clipped = [], []
    for i in range(lp.shape[0]):
        idx = np.flatnonzero(m[i])
        s = np.exp(np.mean(lp[i, idx] - b.old_logprobs[i, idx]))
        a = b.advantages[i]
        losses.append(-min(s * a, np.clip(s, 1 - eps_low, 1 + eps_high) * a))
        clipped.append(float(np.clip(s, 1 - eps_low, 1 + eps_high) * a < s * a))
    return np.mean(losses), np.mean(clipped)


def test_gspo_matches_a_naive_per_sequence_reference(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    m = _mask(b)
    cfg = GSPOConfig(eps_low=0.02, eps_high=0.03)  # wide enough that some sequences clip and some do not
    loss, metrics = gspo_loss(params, b, model=model, cfg=cfg)
    naive, frac = _naive_gspo(np.asarray(lp, np.float64), b, m, 0.02, 0.03)
    assert float(loss) == pytest.approx(naive, rel=1e-4)
    assert float(metrics["clip_fraction"]) == pytest.approx(frac) and 0 < frac < 1

    def naive_loss(p):  # the same objective written per row, in jnp, for its gradient
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        total = 0.0
        for i in range(cur.shape[0]):
            idx = np.flatnonzero(m[i])
            s = jnp.exp(jnp.mean(cur[i, idx] - b.old_logprobs[i, idx]))
            a = b.advantages[i]
            total = total - jnp.minimum(s * a, jnp.clip(s, 1 - 0.02, 1 + 0.03) * a)
        return total / cur.shape[0]

    g = jax.grad(lambda p: gspo_loss(p, b, model=model, cfg=cfg)[0])(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, jax.grad(naive_loss)(params))


def test_gspo_on_policy_is_the_length_normalised_policy_gradient(tiny):
    """At π_θ = π_old every s_i = 1: L = −mean_i A_i and ∇L = −mean_i A_i (1/|y_i|) Σ_t ∇ℓ_t."""
    model, params = tiny
    b, lp = _batch(model, params)
    b = b.replace(old_logprobs=lp)
    m = _mask(b)
    loss, metrics = gspo_loss(params, b, model=model, cfg=GSPOConfig())
    assert float(loss) == pytest.approx(-np.mean(b.advantages), abs=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6) and float(metrics["clip_fraction"]) == 0.0

    def pg(p):
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        return -jnp.mean(jnp.asarray(b.advantages) * (cur * m).sum(1) / m.sum(1))

    g = jax.grad(lambda p: gspo_loss(p, b, model=model, cfg=GSPOConfig())[0])(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, jax.grad(pg)(params))
    with pytest.raises(ValueError, match="GSPOConfig"):
        GSPOConfig(eps_low=1.5)


def test_gspo_is_a_registry_entry_on_group_advantages(tiny):
    model, params = tiny
    b, lp = _batch(model, params)
    algo = ALGORITHMS["gspo"]
    assert algo.estimator.name == "group" and not algo.needs().reference  # the paper's β = 0
    rollout = _rollout_of(b)
    batch, keep = prepare(algo, PrepareInput(rollout=rollout, rewards=jnp.asarray(b.rewards)))
    loss, _ = algo.loss.loss(params, batch, model=model, cfg=algo.loss.config)
    assert np.isfinite(float(loss)) and bool(np.all(keep))


def _rollout_of(b):
    from rljax.sampling import Rollout

    R = b.tokens.shape[0]
    return Rollout(tokens=b.tokens, attention_mask=b.attention_mask, loss_mask=b.loss_mask,
                   logprobs=b.old_logprobs, sampling_logprobs=b.old_logprobs,
                   lengths=jnp.asarray(np.asarray(b.loss_mask).sum(1)), stopped_at_eos=jnp.ones(R, bool),
                   group_ids=jnp.asarray(b.group_ids), prompt_length=6)
