"""Group policy losses beyond GRPO's token clip (GSPO, CISPO, the ratio-weighted KL term) against
naive per-row references and their on-policy closed forms."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tests.test_pg_losses
from rljax.algorithms import ALGORITHMS, prepare
from rljax.estimators import PrepareInput
from rljax.losses import GSPOConfig, gspo_loss
from rljax.models import Model, preset
from rljax.models.logprobs import token_logprobs
from tests.test_pg_losses import _mask

# Every model computation here runs compiled (op-by-op execution compiles each primitive on its own,
# which costs far more), on a one-layer model: the checks compare against naive references at the
# same params, which need no depth.


@pytest.fixture(scope="module")
def tiny():
    """(model, params): the tiny preset with one layer (this module's own, not conftest's four-layer one)."""
    model = Model(preset("tiny", n_layers=1))
    return model, jax.jit(model.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def batch(tiny):
    """test_pg_losses' batch (6 rows, completions of different lengths) and its log-probs, with the
    log-probs computed by the compiled token_logprobs."""
    model, params = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tests.test_pg_losses, "token_logprobs", jax.jit(token_logprobs, static_argnames=("model",)))
        return tests.test_pg_losses._batch(model, params)


@functools.partial(jax.jit, static_argnames=("loss", "model", "cfg"))
def _loss_and_grad(params, batch, *, loss, model, cfg):
    """A library loss, its metrics and its gradient, compiled once per loss, config and batch shape."""
    (value, metrics), g = jax.value_and_grad(lambda p: loss(p, batch, model=model, cfg=cfg), has_aux=True)(params)
    return value, metrics, g


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


def test_gspo_matches_a_naive_per_sequence_reference(tiny, batch):
    model, params = tiny
    b, lp = batch
    m = _mask(b)
    cfg = GSPOConfig(eps_low=0.02, eps_high=0.03)  # wide enough that some sequences clip and some do not
    loss, metrics, g = _loss_and_grad(params, b, loss=gspo_loss, model=model, cfg=cfg)
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

    g_naive = jax.jit(jax.grad(naive_loss))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, g_naive)


def test_gspo_on_policy_is_the_length_normalised_policy_gradient(tiny, batch):
    """At π_θ = π_old every s_i = 1: L = −mean_i A_i and ∇L = −mean_i A_i (1/|y_i|) Σ_t ∇ℓ_t."""
    model, params = tiny
    b, lp = batch
    b = b.replace(old_logprobs=lp)
    m = _mask(b)
    loss, metrics, g = _loss_and_grad(params, b, loss=gspo_loss, model=model, cfg=GSPOConfig())
    assert float(loss) == pytest.approx(-np.mean(b.advantages), abs=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6) and float(metrics["clip_fraction"]) == 0.0

    def pg(p):
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        return -jnp.mean(jnp.asarray(b.advantages) * (cur * m).sum(1) / m.sum(1))

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, jax.jit(jax.grad(pg))(params))
    with pytest.raises(ValueError, match="GSPOConfig"):
        GSPOConfig(eps_low=1.5)


def test_gspo_is_a_registry_entry_on_group_advantages(tiny, batch):
    model, params = tiny
    b, lp = batch
    algo = ALGORITHMS["gspo"]
    assert algo.estimator.name == "group" and not algo.needs().reference  # the paper's β = 0
    rollout = _rollout_of(b)
    prepared, keep = prepare(algo, PrepareInput(rollout=rollout, rewards=jnp.asarray(b.rewards)))
    loss = jax.jit(lambda p, b: algo.loss.loss(p, b, model=model, cfg=algo.loss.config)[0])(params, prepared)
    assert np.isfinite(float(loss)) and bool(np.all(keep))


def _rollout_of(b):
    from rljax.sampling import Rollout

    R = b.tokens.shape[0]
    return Rollout(tokens=b.tokens, attention_mask=b.attention_mask, loss_mask=b.loss_mask,
                   logprobs=b.old_logprobs, sampling_logprobs=b.old_logprobs,
                   lengths=jnp.asarray(np.asarray(b.loss_mask).sum(1)), stopped_at_eos=jnp.ones(R, bool),
                   group_ids=jnp.asarray(b.group_ids), prompt_length=6)


def test_cispo_matches_a_naive_reference_and_keeps_clipped_tokens_gradient(tiny, batch):
    """L = −(1/N) Σ_{i,t} sg(min(ρ, 1 + ε_high)) A_i ℓ_t over the batch's N completion tokens; a token whose
    ratio is past the bound still gets gradient w·A·∇ℓ, where GRPO's clipped surrogate gives it none."""
    from rljax.losses import CISPOConfig, GRPOConfig, cispo_loss, grpo_loss

    model, params = tiny
    b, lp = batch
    m = _mask(b)
    eps_high = 0.05
    cfg = CISPOConfig(eps_high=eps_high)
    loss, metrics, g = _loss_and_grad(params, b, loss=cispo_loss, model=model, cfg=cfg)
    ratio = np.exp(np.asarray(lp, np.float64) - b.old_logprobs)
    w = np.minimum(ratio, 1 + eps_high)
    naive = -(w * b.advantages[:, None] * np.asarray(lp) * m).sum() / m.sum()
    assert float(loss) == pytest.approx(naive, rel=1e-4)
    frac = ((ratio > 1 + eps_high) * m).sum() / m.sum()
    assert float(metrics["clip_fraction"]) == pytest.approx(frac) and 0 < frac < 1

    def naive_loss(p):
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        return -(jnp.asarray(w * b.advantages[:, None] * m, jnp.float32) * cur).sum() / m.sum()

    g_naive = jax.jit(jax.grad(naive_loss))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, g_naive)
    # one clipped token with A > 0: CISPO's gradient through it is w·A·∇ℓ ≠ 0; GRPO's clipped term is constant
    i, t = map(int, np.argwhere((ratio > 1 + eps_high) * m * (b.advantages[:, None] > 0))[0])
    only = np.zeros(np.shape(b.loss_mask))
    only[i, t + 1] = 1  # loss_mask is token-aligned: position t of the log-probs scores tokens[t + 1]
    one = b.replace(loss_mask=(only * np.asarray(b.attention_mask)).astype(b.loss_mask.dtype))
    g_cispo = _loss_and_grad(params, one, loss=cispo_loss, model=model, cfg=cfg)[2]  # the program above, same shapes
    g_grpo = _loss_and_grad(params, one, loss=grpo_loss, model=model,
                            cfg=GRPOConfig(eps_low=eps_high, eps_high=eps_high, kl_coef=0.0))[2]
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_cispo)) > 1e-4
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_grpo)) == 0.0


def test_cispo_on_policy_is_reinforce_with_token_mean(tiny, batch):
    """At π_θ = π_old, w = 1: CISPO's gradient is −(1/N) Σ A ∇ℓ, REINFORCE's with token_mean aggregation."""
    from rljax.losses import CISPOConfig, ReinforceConfig, cispo_loss, reinforce_loss

    model, params = tiny
    b, lp = batch
    b = b.replace(old_logprobs=lp, ref_logprobs=None)
    g = _loss_and_grad(params, b, loss=cispo_loss, model=model, cfg=CISPOConfig())[2]
    g_ref = _loss_and_grad(params, b, loss=reinforce_loss, model=model, cfg=ReinforceConfig(aggregation="token_mean"))[2]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g, g_ref)
    assert ALGORITHMS["cispo"].estimator.name == "group"
    with pytest.raises(ValueError, match="CISPOConfig.eps_high"):
        CISPOConfig(eps_high=-1.0)


def test_ratio_weighted_k3_is_the_exact_kl_of_the_current_policy_under_old_samples():
    """Σ_v π_old(v) ρ_v k3_v = Σ_v π_θ(v) k3_v = KL(π_θ ‖ π_ref) exactly (E_π[π_ref/π − 1] = 0), and its
    gradient is the exact KL's; plain k3 under π_old is neither."""
    from rljax.ops import importance_weighted, kl_k3

    rng = np.random.default_rng(0)
    V = 11
    z_old, z_ref, z = (jnp.asarray(rng.normal(size=V), jnp.float32) for _ in range(3))
    old, ref = jax.nn.log_softmax(z_old), jax.nn.log_softmax(z_ref)

    def weighted(zt):
        lp = jax.nn.log_softmax(zt)
        return jnp.sum(jnp.exp(old) * importance_weighted(kl_k3(lp, ref), lp, old))

    def exact(zt):
        lp = jax.nn.log_softmax(zt)
        return jnp.sum(jnp.exp(lp) * (lp - ref))

    assert float(weighted(z)) == pytest.approx(float(exact(z)), rel=1e-5)
    np.testing.assert_allclose(jax.grad(weighted)(z), jax.grad(exact)(z), atol=1e-6, rtol=1e-4)
    lp = jax.nn.log_softmax(z)
    plain = float(jnp.sum(jnp.exp(old) * kl_k3(lp, ref)))
    assert abs(plain - float(exact(z))) > 1e-2


def test_grpo_ratio_weighted_kl_term_matches_naive(tiny, batch):
    from rljax.losses import GRPOConfig, grpo_loss

    model, params = tiny
    b, lp = batch
    m = _mask(b)
    beta = 0.1
    lp64 = np.asarray(lp, np.float64)
    ratio = np.exp(lp64 - b.old_logprobs)
    d = b.ref_logprobs - lp64
    k3 = np.exp(d) - 1 - d
    loss_fn = jax.jit(lambda p, b, cfg: grpo_loss(p, b, model=model, cfg=cfg)[0], static_argnames="cfg")
    base = loss_fn(params, b, GRPOConfig(kl_coef=0.0))
    loss = loss_fn(params, b, GRPOConfig(kl_coef=beta, kl_ratio_weighted=True))
    kl_term = np.mean([(ratio[i] * k3[i] * m[i]).sum() / m[i].sum() for i in range(6)])  # seq-mean of token-means
    assert float(loss) - float(base) == pytest.approx(beta * kl_term, rel=1e-4)


def test_high_entropy_mask_is_the_top_quantile_of_the_masked_tokens_by_numpy():
    from rljax.ops import high_entropy_mask

    rng = np.random.default_rng(0)
    h = rng.gamma(2.0, size=(4, 9)).astype(np.float32)
    h[1, 2:5] = h[0, 3]  # ties at one value
    m = (rng.random((4, 9)) < 0.7).astype(np.float32)
    m[3] = 0  # a row with no token
    for rho in (0.05, 0.2, 0.5, 0.999, 1.0):
        q = np.quantile(h[m > 0], 1 - rho)  # linear interpolation, as torch.quantile
        got = np.asarray(jax.jit(high_entropy_mask, static_argnums=2)(h, m, rho))
        np.testing.assert_array_equal(got, ((h >= q) & (m > 0)).astype(np.float32), err_msg=str(rho))
    np.testing.assert_array_equal(np.asarray(high_entropy_mask(h, m, 1.0)), m)
    assert not np.asarray(high_entropy_mask(h, np.zeros_like(m), 0.2)).any()  # no token: none kept, no NaN


def test_grpo_and_cispo_on_the_high_entropy_tokens_match_a_naive_reference(tiny, batch):
    """top_entropy_quantile ρ_H = 0.3: the surrogate of the tokens below the 0.7 quantile of the completion
    tokens' entropies (π_θ's, computed from the logits here) is 0, the KL term and the denominators keep every
    token (TRL's rule); loss and gradient against the naive per-token sum, the kept fraction ~ρ_H."""
    from rljax.losses import CISPOConfig, GRPOConfig, cispo_loss, grpo_loss

    model, params = tiny
    b, lp = batch
    m = _mask(b)
    hidden, _ = jax.jit(model.forward)(params, b.tokens, b.attention_mask)
    logp = np.asarray(jax.nn.log_softmax(model.logits(params, hidden)[:, :-1], axis=-1), np.float64)
    entropy = -(np.exp(logp) * logp).sum(-1)
    keep = (entropy >= np.quantile(entropy[m > 0], 0.7)) & (m > 0)
    eps, beta = 0.02, 0.1
    ratio = np.exp(np.asarray(lp, np.float64) - b.old_logprobs)
    A = b.advantages[:, None]
    d = b.ref_logprobs - np.asarray(lp, np.float64)
    k3 = np.exp(d) - 1 - d

    cfg = GRPOConfig(eps_low=eps, eps_high=eps, kl_coef=beta, top_entropy_quantile=0.3)
    loss, metrics, g = _loss_and_grad(params, b, loss=grpo_loss, model=model, cfg=cfg)
    surrogate = -np.minimum(ratio * A, np.clip(ratio, 1 - eps, 1 + eps) * A)
    per_token = surrogate * keep + beta * k3
    naive = np.mean([(per_token[i] * m[i]).sum() / m[i].sum() for i in range(6)])
    assert float(loss) == pytest.approx(naive, rel=1e-4)
    assert float(metrics["entropy_kept_fraction"]) == pytest.approx(keep.sum() / m.sum())
    assert 0.25 < keep.sum() / m.sum() < 0.4

    def naive_grpo(p):  # the surrogate's gradient through ρ on the kept tokens, k3's on every token
        cur = token_logprobs(p, b.tokens, b.attention_mask, model=model)
        r = jnp.exp(cur - b.old_logprobs)
        s = -jnp.minimum(r * A, jnp.clip(r, 1 - eps, 1 + eps) * A) * keep
        dd = b.ref_logprobs - cur
        t = (s + beta * (jnp.exp(dd) - 1 - dd)) * m
        return jnp.mean(t.sum(1) / m.sum(1))

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), g,
                 jax.jit(jax.grad(naive_grpo))(params))
    # ρ_H = 1 is the plain loss
    plain = _loss_and_grad(params, b, loss=grpo_loss, model=model, cfg=GRPOConfig(eps_low=eps, eps_high=eps,
                                                                                  kl_coef=beta))
    assert "entropy_kept_fraction" not in plain[1]
    one = _loss_and_grad(params, b, loss=grpo_loss, model=model, cfg=GRPOConfig(eps_low=eps, eps_high=eps,
                                                                                kl_coef=beta, top_entropy_quantile=1.0))
    assert float(one[0]) == float(plain[0])

    cfg = CISPOConfig(eps_high=0.05, top_entropy_quantile=0.3)
    loss, metrics, _ = _loss_and_grad(params, b, loss=cispo_loss, model=model, cfg=cfg)
    w = np.minimum(ratio, 1.05)
    assert float(loss) == pytest.approx(-(w * A * np.asarray(lp) * keep).sum() / m.sum(), rel=1e-4)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_entropy_quantile: must be in \\(0, 1\\]"):
            GRPOConfig(top_entropy_quantile=bad)
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            CISPOConfig(top_entropy_quantile=bad)


def test_the_grpo_recipe_sets_the_entropy_quantile_on_losses_that_have_it_and_the_reference_sync():
    from rljax.algorithms import get_algorithm
    from rljax.recipes import GRPOTaskConfig
    from rljax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    for name in ("grpo", "dapo", "cispo"):
        algo = GRPOTaskConfig(algorithm=name, top_entropy_quantile=0.2).rl_config(tok).algo
        assert algo.loss.config.top_entropy_quantile == 0.2 and algo.name == name
    assert GRPOTaskConfig().rl_config(tok).algo.loss.config.top_entropy_quantile == 1.0
    rl = GRPOTaskConfig(ref_sync_every=3, ref_sync_alpha=0.9).rl_config(tok)
    assert (rl.ref_sync_every, rl.ref_sync_alpha) == (3, 0.9)
    assert (GRPOTaskConfig().rl_config(tok).ref_sync_every, GRPOTaskConfig().rl_config(tok).ref_sync_alpha) == (0, 0.6)
    with pytest.raises(ValueError, match=r"rloo: its loss 'reinforce' \(ReinforceConfig\) has no field\(s\) "
                                         r"\['top_entropy_quantile'\]"):
        GRPOTaskConfig(algorithm="rloo", top_entropy_quantile=0.2).rl_config(tok)
    with pytest.raises(ValueError, match="has no field"):
        get_algorithm("gspo").with_config(top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="GRPOTaskConfig.top_entropy_quantile: must be in \\(0, 1\\]"):
        GRPOTaskConfig(top_entropy_quantile=0.0)
    # TRL's scale_rewards on the group estimator, its other fields kept (dapo's filter)
    for name in ("grpo", "dr_grpo", "dapo", "gspo", "cispo"):
        for scale, by_std, scope in (("group", True, "group"), ("batch", True, "batch"), ("none", False, "group")):
            adv = GRPOTaskConfig(algorithm=name, scale_rewards=scale).rl_config(tok).algo.estimator.config
            assert (adv.scale_by_std, adv.std_scope) == (by_std, scope)
            assert adv.drop_equal_groups == (name == "dapo")
    assert not GRPOTaskConfig(algorithm="dr_grpo").rl_config(tok).algo.estimator.config.scale_by_std  # its own
    with pytest.raises(ValueError, match=r"scale_rewards: rloo's estimator \(baseline\) has no group scale"):
        GRPOTaskConfig(algorithm="rloo", scale_rewards="batch").rl_config(tok)
    with pytest.raises(ValueError, match="GRPOTaskConfig.scale_rewards: 'group', 'batch', 'none' or None"):
        GRPOTaskConfig(scale_rewards="std")
