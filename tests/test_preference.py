"""Preference optimisation: the known answers of docs/algorithms.md, minimisers, the tabular DPO optimum,
padding invariance, precomputed = live reference, sharded = one device, KTO's z0, bad input."""
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rljax.data.preference_collate import collate_kto, collate_preferences, fixed_mismatch
from rljax.losses import preference as _preference
from rljax.losses.preference import PREFERENCE_METHODS, DPOConfig, KTOConfig, ORPOConfig, SimPOConfig, check_kto_weights
from rljax.models import Model, preset
from rljax.ops.preference_kernels import (hinge_preference, ipo, kto, kto_reference_point, log_odds, odds_ratio,
                                  robust_preference, sequence_logps, sigmoid_preference, simpo)
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
# Jitted once per batch shape and config: run op by op (eagerly), the model's losses and their
# gradients took minutes of the suite.
preference_loss = jax.jit(_preference.preference_loss, static_argnames=("model", "cfg"))
reference_logps = jax.jit(_preference.reference_logps, static_argnames=("model", "chunk_size"))
completion_logps = jax.jit(_preference.completion_logps, static_argnames=("model", "chunk_size"))


@functools.partial(jax.jit, static_argnames=("model", "cfgs"))
def losses(params, batch, *, model, cfgs):
    """[preference_loss(params, batch, cfg) for cfg in cfgs] in one compiled program (the model's
    forward is the same for every cfg): one compile per batch shape and tuple of configs, where
    a call per config compiled the model once per config."""
    return [_preference.preference_loss(params, batch, model=model, cfg=cfg) for cfg in cfgs]


@functools.partial(jax.jit, static_argnames=("model", "cfgs"))
def loss_grad_norms(params, batch, *, model, cfgs):
    """‖∇_θ preference_loss‖ for each cfg, in one compiled program."""
    grad = jax.grad(lambda p, cfg: _preference.preference_loss(p, batch, model=model, cfg=cfg)[0])
    return [optax.tree.norm(grad(params, cfg)) for cfg in cfgs]
PAIRS = [("12+7=", "19", "18"), ("3*4=", "12", "7"), ("9-5=", "4", "14"), ("8+8=", "16", "61"),
         ("2*9=", "18", "81"), ("7-1=", "6", "5"), ("5+5=", "10", "1"), ("6*3=", "18", "9")]


@pytest.fixture(scope="module")
def small():
    model = Model(preset("tiny", n_layers=1))
    return model, jax.jit(model.init)(jax.random.key(0))  # jitted: one compile, not one per initialiser op


def test_worked_example_to_1e6():
    beta, h = 0.1, jnp.array([0.1 * 2.0])  # S_θ(y_w) = −10, S_θ(y_l) = −12, S_ref = −11: Δ = 2
    assert float(sigmoid_preference(h)[0]) == pytest.approx(0.5981389, abs=1e-6)
    assert float(sigmoid_preference(h, 0.1)[0]) == pytest.approx(0.6181389, abs=1e-6)
    assert float(robust_preference(h, 0.1)[0]) == pytest.approx(0.5731389, abs=1e-6)
    assert float(hinge_preference(h)[0]) == pytest.approx(0.8, abs=1e-6)
    assert float(ipo(jnp.array([2.0]), beta)[0]) == pytest.approx(9.0, abs=1e-6)
    # float32 holds 21.855625 to about 2e-6 absolute: 1e-6 relative
    assert float(ipo(jnp.array([1 / 5 - (-1) / 8]), beta)[0]) == pytest.approx(21.855625, rel=1e-6)
    rho = jnp.array([1.0, 1.0])
    out = kto(rho, jnp.float32(0.5), jnp.array([1.0, 0.0]), beta)
    np.testing.assert_allclose(out, [0.4875026, 0.5124974], atol=1e-6)


def test_values_at_reference():
    h = jnp.zeros(3)
    for v in (sigmoid_preference(h), sigmoid_preference(h, 0.2), robust_preference(h, 0.2)):
        np.testing.assert_allclose(v, math.log(2), atol=1e-6)
    beta = 0.3
    np.testing.assert_allclose(ipo(h, beta), 1 / (4 * beta ** 2), rtol=1e-6)
    a = jnp.array([-1.5, -0.2, -3.0])
    np.testing.assert_allclose(simpo(a, a, 2.0, 0.5), jax.nn.softplus(0.5), rtol=1e-6)
    np.testing.assert_allclose(kto(h, jnp.float32(0.0), jnp.array([1.0, 0.0, 1.0]), 0.1, 0.7, 0.7), 0.35, rtol=1e-6)


def test_minimisers_and_robust_unbiasedness():
    for eps in (0.05, 0.1, 0.3):
        h_star = math.log((1 - eps) / eps)
        g = jax.grad(lambda h: sigmoid_preference(h, eps).sum())(jnp.array([h_star]))
        assert abs(float(g[0])) < 1e-6
    beta = 0.25
    g = jax.grad(lambda d: ipo(d, beta).sum())(jnp.array([1 / (2 * beta)]))
    assert float(g[0]) == 0.0 and float(ipo(jnp.array([2.0]), beta)[0]) == 0.0
    h = jnp.asarray(np.random.default_rng(0).normal(size=50) * 3, jnp.float32)
    for eps in (0.1, 0.2, 0.4):  # averaging the robust loss over label flips gives clean DPO exactly
        avg = (1 - eps) * robust_preference(h, eps) + eps * robust_preference(-h, eps)
        np.testing.assert_allclose(avg, jax.nn.softplus(-h), rtol=1e-5, atol=1e-6)
    # ORPO: log odds of p = e^A, and the preference term is L(log odds_w − log odds_l)
    a = jnp.array([-0.1, -1.0, -4.0])
    p = jnp.exp(a)
    np.testing.assert_allclose(log_odds(a), jnp.log(p / (1 - p)), rtol=1e-5)
    np.testing.assert_allclose(odds_ratio(a, a[::-1]), jax.nn.softplus(-(log_odds(a) - log_odds(a[::-1]))),
                               rtol=1e-6)


def test_sequence_logps_sum_mean_and_empty():
    lp = jnp.array([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0], [-5.0, -5.0, -5.0]])
    m = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    s, n = sequence_logps(lp, m, "sum")
    np.testing.assert_allclose(s, [-3.0, -1.0, 0.0])
    np.testing.assert_allclose(n, [2, 1, 0])
    a, _ = sequence_logps(lp, m, "mean")
    np.testing.assert_allclose(a, [-1.5, -1.0, 0.0])  # empty: 0, not NaN


def test_kto_reference_point_has_no_gradient_and_clamps():
    x = jnp.array([-3.0, -1.0, 0.5])
    assert float(kto_reference_point(x)) == 0.0  # mean −1.17 < 0: clamped
    y = jnp.array([1.0, 2.0, 3.0])
    assert float(kto_reference_point(y)) == pytest.approx(2.0)
    g = jax.grad(lambda v: kto_reference_point(v) * 10.0)(y)
    np.testing.assert_array_equal(g, 0.0)
    # through the loss: moving z0's rows (the mismatched rows) changes the loss value but contributes no gradient
    g2 = jax.grad(lambda v: kto(jnp.array([0.3, -0.2, 0.1]), kto_reference_point(v), jnp.array([1.0, 0.0, 1.0]),
                                0.1).sum())(y)
    np.testing.assert_array_equal(g2, 0.0)


def test_bandit_dpo_with_soft_labels_reaches_the_tilted_reference():
    """Tabular policy over K arms, all pairs with soft Bradley–Terry labels p_ij = σ(r_i − r_j):
    the DPO optimum is softmax(log π_ref + r/β) (docs/algorithms.md)."""
    K, beta = 6, 0.5
    rng = np.random.default_rng(0)
    r = jnp.asarray(rng.normal(size=K), jnp.float32)
    log_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=K), jnp.float32))
    i, j = np.triu_indices(K, 1)
    p = jax.nn.sigmoid(r[i] - r[j])

    def loss(theta):
        rho = jax.nn.log_softmax(theta) - log_ref
        return sigmoid_preference(beta * (rho[i] - rho[j]), 1.0 - p).mean()  # soft label p = 1 − ε

    opt = optax.adam(0.05)

    def step(carry, _):
        theta, state = carry
        upd, state = opt.update(jax.grad(loss)(theta), state)
        return (optax.apply_updates(theta, upd), state), None

    (theta, _), _ = jax.lax.scan(step, (log_ref, opt.init(log_ref)), None, length=3000)
    target = jax.nn.softmax(log_ref + r / beta)
    tv = 0.5 * float(jnp.abs(jax.nn.softmax(theta) - target).sum())
    assert tv < 0.05, tv
    # and the loss there is at its minimum: the gradient vanishes
    assert float(optax.tree.norm(jax.grad(loss)(jnp.log(target)))) < 1e-5


def _with_target_rho(model, params, batch, rho):
    """The batch with ref_logps set so that ρ = S_θ − S_ref equals `rho` [B, 2] (sum reduction)."""
    s = reference_logps(params, batch, model=model)
    return batch.replace(ref_logps=np.asarray(s) - np.asarray(rho, np.float32))


def test_losses_through_the_model_match_the_worked_numbers(small):
    model, params = small
    batch = collate_preferences(TOK, PAIRS[:4])
    rho = np.tile([[1.0, -1.0]], (4, 1))  # Δ = 2 for every pair
    b = _with_target_rho(model, params, batch, rho)
    # every config in one compiled program (the same program for b and b0 below)
    cfgs = (PREFERENCE_METHODS["dpo"], PREFERENCE_METHODS["cdpo"], PREFERENCE_METHODS["robust_dpo"],
            DPOConfig(objective="hinge"), DPOConfig(objective="ipo"), DPOConfig(), PREFERENCE_METHODS["ipo"])
    out = losses(params, b, model=model, cfgs=cfgs)
    for k, want in enumerate((0.5981389, 0.6181389, 0.5731389)):
        loss, m = out[k]
        assert float(loss) == pytest.approx(want, abs=2e-6), cfgs[k]
        assert float(m["accuracy"]) == 1.0 and float(m["margin"]) == pytest.approx(0.2, abs=1e-5)
    assert float(out[3][0]) == pytest.approx(0.8, abs=2e-6)
    assert float(out[4][0]) == pytest.approx(9.0, abs=1e-4)
    # at π_θ = π_ref (ρ = 0): log 2, and IPO averaged 1/(4β²)
    b0 = _with_target_rho(model, params, batch, np.zeros((4, 2)))
    out0 = losses(params, b0, model=model, cfgs=cfgs)
    assert float(out0[5][0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(out0[6][0]) == pytest.approx(25.0)
    # KTO through the model: r = 1 on the rows, z0 = 0.5 from the mismatched rows
    kb = collate_kto(TOK, [(p, c, d) for (p, c, _), d in zip(PAIRS[:4], (1, 0, 1, 0))])
    kb = _with_target_rho(model, params, kb, np.tile([[1.0, 0.5]], (4, 1)))
    loss, m = preference_loss(params, kb, model=model, cfg=KTOConfig())
    assert float(m["z0"]) == pytest.approx(0.5, abs=1e-5)
    assert float(loss) == pytest.approx((0.4875026 + 0.5124974) / 2, abs=2e-6)
    # reference-free: S_ref = 0, so the implicit reward is β S_θ
    loss, m = preference_loss(params, batch, model=model, cfg=DPOConfig(reference_free=True))
    s = np.asarray(reference_logps(params, batch, model=model))
    assert float(loss) == pytest.approx(float(np.mean(np.logaddexp(0, -0.1 * (s[:, 0] - s[:, 1])))), rel=1e-5)


def _left_pad(batch):
    """Move every row's padding to the left (same tokens, same masks, shifted)."""
    t, a, lm = (np.array(x) for x in (batch.tokens, batch.attention_mask, batch.loss_mask))
    for idx in np.ndindex(*t.shape[:-1]):
        n = int(a[idx].sum())
        for x in (t, a, lm):
            x[idx] = np.roll(x[idx], x.shape[-1] - n)
    return batch.replace(tokens=t, attention_mask=a, loss_mask=lm)


PADDING_METHODS = ("dpo", "ipo", "simpo", "orpo")


@pytest.mark.parametrize("name", PADDING_METHODS)
def test_padding_invariance(small, name):
    model, params = small
    cfg = PREFERENCE_METHODS[name]
    base = collate_preferences(TOK, PAIRS)
    wide = collate_preferences(TOK, PAIRS, length=48)  # extra right padding
    ref = np.asarray(reference_logps(jax.tree.map(lambda x: x * 0.9, params), base, model=model))
    # all four methods in one program per width, shared by the four parametrisations
    k = PADDING_METHODS.index(name)
    got = [float(losses(params, b.replace(ref_logps=ref), model=model,
                        cfgs=tuple(PREFERENCE_METHODS[n] for n in PADDING_METHODS))[k][0])
           for b in (base, wide, _left_pad(base), _left_pad(wide))]
    assert cfg == PREFERENCE_METHODS[PADDING_METHODS[k]]
    np.testing.assert_allclose(got, got[0], rtol=1e-5)


def test_empty_completion_is_masked_not_nan(small):
    model, params = small
    batch = collate_preferences(TOK, PAIRS[:4])
    ref = np.asarray(reference_logps(params, batch, model=model)) + 0.3
    lm = np.array(batch.loss_mask)
    lm[2, 1] = 0  # row 2's rejected completion has no token left
    broken = batch.replace(loss_mask=lm, ref_logps=ref)
    keep = [0, 1, 3]
    clean = batch.replace(tokens=batch.tokens[keep], attention_mask=batch.attention_mask[keep],
                          loss_mask=batch.loss_mask[keep], ref_logps=ref[keep])
    cfgs = (DPOConfig(), PREFERENCE_METHODS["ipo"], SimPOConfig(), ORPOConfig())
    # each of these is one compiled program for all four configs
    got, wants = losses(params, broken, model=model, cfgs=cfgs), losses(params, clean, model=model, cfgs=cfgs)
    grad_norms = loss_grad_norms(params, broken, model=model, cfgs=cfgs)
    for cfg, (loss, m), (want, _), g in zip(cfgs, got, wants, grad_norms):
        assert np.isfinite(float(loss)) and float(m["empty"]) == 1.0, cfg
        assert float(loss) == pytest.approx(float(want), rel=1e-5), cfg
        assert np.isfinite(float(g)), cfg


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="row 1: chosen and rejected are the same text"):
        collate_preferences(TOK, [("1+1=", "2", "3"), ("2+2=", "4", "4")])
    with pytest.raises(ValueError, match="row 1: missing field 'prompt'"):
        collate_preferences(TOK, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"chosen": "4", "rejected": "5"}])
    with pytest.raises(ValueError, match="row 0: the rejected is empty"):
        collate_preferences(TOK, [("1+1=", "2", "")])
    # the prompt alone fills max_length: nothing of the completion would be left
    with pytest.raises(ValueError, match="row 1: the chosen is empty after truncation"):
        collate_preferences(TOK, [("1=", "1", "2"), ("1234567890+1=", "1234567891", "9")], max_length=14)
    # truncation keeps the prompt's last tokens and cuts the completion's end
    b = collate_preferences(TOK, [("1234567890+1=", "1234567891", "9")], max_length=12, max_prompt_length=6)
    assert TOK.decode([int(t) for t in b.tokens[0, 0][b.attention_mask[0, 0] > 0]][1:]) == "890+1=12345"
    # prompt_keep: the prompt's first tokens (a chat template's header) survive the cut, the text after them goes
    b = collate_preferences(TOK, [{"prompt": "1234567890+1=", "chosen": "1234567891", "rejected": "9",
                                   "prompt_keep": 2}], max_length=12, max_prompt_length=6)
    assert TOK.decode([int(t) for t in b.tokens[0, 0][b.attention_mask[0, 0] > 0]][1:]) == "12" + "0+1=" + "12345"
    with pytest.raises(ValueError, match=r"row 0: max_prompt_length=2 leaves no room for the prompt's text after its "
                                         r"2 leading template tokens"):
        collate_preferences(TOK, [{"prompt": "1234", "chosen": "1", "rejected": "2", "prompt_keep": 2}],
                            max_prompt_length=2)
    with pytest.raises(ValueError, match=r"row 0: prompt_keep must be a whole number >= 0, got -1"):
        collate_preferences(TOK, [{"prompt": "1234", "chosen": "1", "rejected": "2", "prompt_keep": -1}])
    with pytest.raises(ValueError, match="batch of 1"):
        collate_kto(TOK, [("1+1=", "2", True)])
    with pytest.raises(ValueError, match="row 1: desirable must be"):
        collate_kto(TOK, [("1+1=", "2", True), ("1+2=", "3", "yes")])
    with pytest.raises(ValueError, match="row 0: ref_logps"):
        collate_preferences(TOK, [("1+1=", "2", "3", (float("nan"), 0.0))])


def test_kto_batch_of_one_and_missing_reference_are_errors(small):
    model, params = small
    kb = collate_kto(TOK, [("1+1=", "2", 1), ("1+2=", "4", 0)])
    one = kb.replace(tokens=kb.tokens[:1], attention_mask=kb.attention_mask[:1], loss_mask=kb.loss_mask[:1],
                     desirable=kb.desirable[:1])
    with pytest.raises(ValueError, match="batch of one"):
        preference_loss(params, one, model=model, cfg=KTOConfig())
    with pytest.raises(ValueError, match="no ref_logps"):
        preference_loss(params, collate_preferences(TOK, PAIRS[:2]), model=model, cfg=DPOConfig())
    with pytest.raises(ValueError, match="KTOConfig trains on KTOBatch"):
        preference_loss(params, collate_preferences(TOK, PAIRS[:2]), model=model, cfg=KTOConfig())


def test_kto_mismatched_rows_run_forward_only(small):
    """KTO's mismatched rows feed only z0 (gradient stopped): the loss runs them in a forward of their
    own, so its gradient equals the one through a single [2B, T] forward (computed here by hand from
    completion_logps without `frozen`) while the compiled backward does about 2/3 of the FLOPs."""
    model, params = small
    rows = [(p, c, i % 2 == 0) for i, (p, c, _) in enumerate(PAIRS)]
    kb = collate_kto(TOK, rows)
    kb = kb.replace(ref_logps=np.asarray(reference_logps(params, kb, model=model)) - 0.3)
    cfg = KTOConfig(beta=0.1)

    def one_forward(p):  # the loss as it was: rows and mismatched rows in one forward pass
        lp, mask = _preference.completion_logps(p, kb.tokens, kb.attention_mask, kb.loss_mask, model=model)
        logps, lengths = sequence_logps(lp, mask)
        rho = logps - kb.ref_logps
        z0 = kto_reference_point(rho[:, 1], (lengths[:, 1] > 0).astype(jnp.float32))
        return jnp.mean(kto(rho[:, 0], z0, kb.desirable, cfg.beta, 1.0, 1.0))

    split = lambda p: _preference.kto_loss(p, kb, model=model, cfg=cfg)[0]  # noqa: E731
    (l_ref, g_ref), (l_split, g_split) = (jax.jit(jax.value_and_grad(f))(params) for f in (one_forward, split))
    assert float(l_split) == pytest.approx(float(l_ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
    flops = [jax.jit(jax.grad(f)).lower(params).compile().cost_analysis() for f in (one_forward, split)]
    flops = [(c[0] if isinstance(c, list) else c)["flops"] for c in flops]
    # forward 2B rows + backward (2x forward) over B rows, against the backward over all 2B: 4/6
    assert flops[1] / flops[0] == pytest.approx(2 / 3, abs=0.08)


def test_kto_rotation_and_fixed_mismatch():
    rows = [("a=", "1", 1), ("b=", "2", 0), ("c=", "3", 1)]
    kb = collate_kto(TOK, rows)
    text = lambda k, s: TOK.decode([int(t) for t, m in zip(kb.tokens[k, s], kb.loss_mask[k, s]) if m])  # noqa: E731
    assert [text(k, 1) for k in range(3)] == ["2", "3", "1"]  # (x_i, y_(i+1) mod B), eos is not printed
    fixed = fixed_mismatch(rows, seed=3)
    assert all(f["mismatched"] != f["completion"] for f in fixed)
    assert sorted(f["mismatched"] for f in fixed) == ["1", "2", "3"]
    np.testing.assert_array_equal(collate_kto(TOK, fixed).desirable, [1, 0, 1])


def test_kto_weight_ratio_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_kto_weights([1, 1, 0, 0], KTOConfig()) == 1.0
    with pytest.warns(UserWarning, match="outside the recommended"):
        check_kto_weights([1, 0, 0, 0], KTOConfig())
    with pytest.raises(ValueError, match="desirable and undesirable"):
        check_kto_weights([1, 1], KTOConfig())


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="objective"):
        DPOConfig(objective="square")
    with pytest.raises(ValueError, match="set one"):
        DPOConfig(label_smoothing=0.1, flip_rate=0.1)
    with pytest.raises(ValueError, match="logp_reduction"):
        SimPOConfig(logp_reduction="max")
    with pytest.raises(ValueError, match="only 'mean'"):
        ORPOConfig(logp_reduction="sum")
    assert PREFERENCE_METHODS["ipo"].logp_reduction == "mean" and PREFERENCE_METHODS["dpo"].logp_reduction == "sum"


def test_completion_logps_one_pass_matches_separate_rows(small):
    from rljax.models.logprobs import target_mask, token_logprobs

    token_logprobs = jax.jit(token_logprobs, static_argnames=("model",))
    model, params = small
    batch = collate_preferences(TOK, PAIRS[:3])
    lp, mask = completion_logps(params, batch.tokens, batch.attention_mask, batch.loss_mask, model=model)
    for side in (0, 1):
        want = token_logprobs(params, batch.tokens[:, side], batch.attention_mask[:, side], model=model)
        np.testing.assert_allclose(lp[:, side], want, atol=1e-5)
        np.testing.assert_array_equal(mask[:, side], target_mask(batch.loss_mask[:, side],
                                                                 batch.attention_mask[:, side]))


# ----------------------------------------------------------------------------- per-pair weights and soft labels

WEIGHTS = [0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.5, 1.0]


def _rows(pairs, ref, **per_pair):
    """Dict rows with ref_logps from `ref` [B, 2] and optional per-pair keys (lists)."""
    return [dict(prompt=p, chosen=c, rejected=r, ref_logps=tuple(map(float, ref[i])),
                 **{k: v[i] for k, v in per_pair.items()}) for i, (p, c, r) in enumerate(pairs)]


def _weighted_loss(params, batch, *, model, cfg):
    return _preference.preference_loss(params, batch, model=model, cfg=cfg)[0]


def _naive_weighted_loss(params, pairs, weights, *, model, cfg):
    """Σ_i w_i ℓ(one-pair batch i) / Σ_i w_i: a loop (lax.map, so one compile for every pair) of the
    existing loss over one-pair batches, stacked along a leading axis, as callers had to do before."""
    per_pair = jax.lax.map(lambda one: _preference.preference_loss(params, one, model=model, cfg=cfg)[0], pairs)
    return jnp.sum(weights * per_pair) / jnp.sum(weights)


weighted_value_and_grad = jax.jit(jax.value_and_grad(_weighted_loss), static_argnames=("model", "cfg"))
naive_weighted_value_and_grad = jax.jit(jax.value_and_grad(_naive_weighted_loss), static_argnames=("model", "cfg"))


@functools.partial(jax.jit, static_argnames=("model", "cfgs"))
def naive_weighted_losses(params, pairs, weights, *, model, cfgs):
    return [_naive_weighted_loss(params, pairs, weights, model=model, cfg=cfg) for cfg in cfgs]


WEIGHTED_CFGS = (DPOConfig(), DPOConfig(objective="ipo"), DPOConfig(objective="hinge"), SimPOConfig())


@pytest.mark.parametrize("cfg", WEIGHTED_CFGS, ids=["dpo", "ipo", "hinge", "simpo"])
def test_weighted_loss_equals_naive_per_pair_loop(small, cfg):
    """Σ w_i ℓ_i / Σ w_i (and, for DPO, its gradient) equal a loop of the existing loss over one-pair batches."""
    model, params = small
    ref = np.asarray(reference_logps(params, collate_preferences(TOK, PAIRS), model=model)) - 0.7
    batch = collate_preferences(TOK, _rows(PAIRS, ref, weight=WEIGHTS))
    assert batch.weight.shape == (8,) and batch.label is None
    # one-pair batches, each collated on its own (at the batch's width), stacked for the loop
    singles = [collate_preferences(TOK, _rows(PAIRS[i:i + 1], ref[i:i + 1]), length=batch.tokens.shape[-1])
               for i in range(len(PAIRS))]
    pairs = jax.tree.map(lambda *x: np.stack(x), *singles)
    weights = np.asarray(WEIGHTS, np.float32)

    if isinstance(cfg, DPOConfig) and cfg.objective == "sigmoid":
        lw, gw = weighted_value_and_grad(params, batch, model=model, cfg=cfg)
        ln, gn = naive_weighted_value_and_grad(params, pairs, weights, model=model, cfg=cfg)
        for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gn)):
            np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-8, rtol=1e-4)
    # every config in one program, shared by the four parametrisations
    k = WEIGHTED_CFGS.index(cfg)
    lw, ones_loss = (losses(params, b, model=model, cfgs=WEIGHTED_CFGS)[k][0]
                     for b in (batch, collate_preferences(TOK, _rows(PAIRS, ref, weight=[1.0] * 8))))
    ln = naive_weighted_losses(params, pairs, weights, model=model, cfgs=WEIGHTED_CFGS)[k]
    assert float(lw) == pytest.approx(float(ln), rel=1e-5)
    # unit weights are the unweighted loss
    plain = collate_preferences(TOK, _rows(PAIRS, ref))
    assert float(ones_loss) == pytest.approx(float(losses(params, plain, model=model, cfgs=WEIGHTED_CFGS)[k][0]),
                                             rel=1e-6)


def test_weighted_nll_is_the_token_mean_over_weighted_pairs(small):
    model, params = small
    ref = np.zeros((8, 2), np.float32)
    batch = collate_preferences(TOK, _rows(PAIRS, ref, weight=WEIGHTS))
    _, m = preference_loss(params, batch, model=model, cfg=DPOConfig(nll_coef=1.0))
    lp, mask = completion_logps(params, batch.tokens, batch.attention_mask, batch.loss_mask, model=model)
    lp, mask, w = np.asarray(lp[:, 0]), np.asarray(mask[:, 0]), np.asarray(WEIGHTS)[:, None]
    assert float(m["nll"]) == pytest.approx(-(lp * mask * w).sum() / (mask * w).sum(), rel=1e-5)


def test_soft_labels_one_is_dpo_and_one_minus_eps_is_cdpo(small):
    model, params = small
    ref = np.asarray(reference_logps(params, collate_preferences(TOK, PAIRS), model=model)) - 0.3
    plain = collate_preferences(TOK, _rows(PAIRS, ref))
    epss = (0.05, 0.1, 0.3)
    cfgs = (DPOConfig(), DPOConfig(objective="hinge"), DPOConfig(objective="ipo"), DPOConfig(flip_rate=0.2),
            SimPOConfig()) + tuple(DPOConfig(label_smoothing=eps) for eps in epss)

    def all_losses(batch):  # every config in one program: one compile for labelled batches, one for plain ones
        return [float(loss) for loss, _ in losses(params, batch, model=model, cfgs=cfgs)]

    ones, plain_losses = all_losses(collate_preferences(TOK, _rows(PAIRS, ref, label=[1.0] * 8))), all_losses(plain)
    for k in range(5):
        assert ones[k] == pytest.approx(plain_losses[k], rel=1e-6), cfgs[k]
    for k, eps in enumerate(epss):
        soft = all_losses(collate_preferences(TOK, _rows(PAIRS, ref, label=[1.0 - eps] * 8)))
        assert cfgs[5 + k].label_smoothing == eps
        assert soft[0] == pytest.approx(plain_losses[5 + k], rel=1e-5), eps
    # label 0 swaps chosen and rejected
    zero = collate_preferences(TOK, _rows(PAIRS, ref, label=[0.0] * 8))
    swapped = collate_preferences(TOK, _rows([(p, r, c) for p, c, r in PAIRS], ref[:, ::-1]))
    assert swapped.tokens.shape == plain.tokens.shape
    assert all_losses(zero)[0] == pytest.approx(all_losses(swapped)[0], rel=1e-5)


def test_soft_label_loss_is_the_cross_entropy_with_its_optimum_in_closed_form():
    from rljax.losses.preference import dpo_pair_loss

    beta = 0.5
    y = jnp.array([0.1, 0.3, 0.5, 0.8, 0.97])
    m = jnp.array([-2.0, 0.3, 1.0, 4.0, -0.5])
    h = beta * m
    ce = y * -jax.nn.log_sigmoid(h) + (1 - y) * -jax.nn.log_sigmoid(-h)
    np.testing.assert_allclose(dpo_pair_loss(m, DPOConfig(beta=beta), y), ce, rtol=1e-6)
    # dℓ/dm = β (σ(βm) − y) = 0 at m* = β⁻¹ logit(y)
    m_star = jnp.log(y / (1 - y)) / beta
    grad = jax.grad(lambda d: dpo_pair_loss(d, DPOConfig(beta=beta), y).sum())
    np.testing.assert_allclose(grad(m_star), 0.0, atol=1e-6)
    np.testing.assert_allclose(grad(m), beta * (jax.nn.sigmoid(h) - y), rtol=1e-5, atol=1e-7)
    # label smoothing smooths the label: σ(βm*) = ȳ = (1 − ε) y + ε (1 − y)
    eps = 0.1
    y_bar = (1 - eps) * y + eps * (1 - y)
    g = jax.grad(lambda d: dpo_pair_loss(d, DPOConfig(beta=beta, label_smoothing=eps), y).sum())
    np.testing.assert_allclose(g(jnp.log(y_bar / (1 - y_bar)) / beta), 0.0, atol=1e-6)
    # IPO with a soft label: the expected square loss is minimised at Δ* = (y − ½)/β
    gi = jax.grad(lambda d: dpo_pair_loss(d, DPOConfig(beta=beta, objective="ipo"), y).sum())
    np.testing.assert_allclose(gi((y - 0.5) / beta), 0.0, atol=1e-5)


def test_bad_weights_and_labels_are_named():
    base = [dict(prompt=p, chosen=c, rejected=r) for p, c, r in PAIRS[:3]]
    for field, value, match in (("label", 1.5, "row 1: label"), ("label", -0.1, "row 1: label"),
                                ("label", float("nan"), "row 1: label"), ("weight", -1.0, "row 1: weight"),
                                ("weight", float("inf"), "row 1: weight"), ("weight", float("nan"), "row 1: weight"),
                                ("weight", "heavy", "row 1: weight")):
        rows = [dict(r) for r in base]
        rows[1][field] = value
        with pytest.raises(ValueError, match=match):
            collate_preferences(TOK, rows)
    # rows without the key count 1; a batch with no row carrying it leaves the field None
    rows = [dict(r) for r in base]
    rows[2]["weight"], rows[0]["label"] = 0.0, 0.25
    b = collate_preferences(TOK, rows)
    np.testing.assert_array_equal(b.weight, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(b.label, [0.25, 1.0, 1.0])
    assert collate_preferences(TOK, base).weight is None


def test_orpo_rejects_soft_labels_by_name(small):
    model, params = small
    batch = collate_preferences(TOK, [dict(prompt=p, chosen=c, rejected=r, label=0.7) for p, c, r in PAIRS[:2]])
    with pytest.raises(ValueError, match="label"):
        preference_loss(params, batch, model=model, cfg=ORPOConfig())


# ----------------------------------------------------------------------------- shared-prompt layout

def test_shared_prompt_layout_by_hand():
    """[bos] prompt chosen [eos] rejected [eos] in one row: ids, masks, positions and segments by hand."""
    b = collate_preferences(TOK, [("1+1=", "2", "34")], share_prompt=True, min_bucket=16)
    ids = lambda s: TOK.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    row = [TOK.bos_id] + ids("1+1=") + ids("2") + [TOK.eos_id] + ids("34") + [TOK.eos_id]
    n = len(row)  # 1 + 4 + 2 + 3 = 10
    assert b.tokens.shape == (1, 16) and b.tokens[0, :n].tolist() == row and (b.tokens[0, n:] == TOK.pad_id).all()
    assert b.attention_mask[0].tolist() == [1] * n + [0] * 6
    assert b.loss_mask[0].tolist() == [0] * 5 + [1] * 5 + [0] * 6
    assert b.segment_ids[0].tolist() == [1] * 5 + [2] * 2 + [3] * 3 + [0] * 6
    assert b.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 6, 7] + [0] * 6
    # no prompt token at all: the rejected completion's first token has no prediction, as the chosen one's
    e = collate_preferences(TOK, [("", "2", "34")], share_prompt=True, add_bos=False)
    assert e.loss_mask[0, :5].tolist() == [1, 1, 0, 1, 1] and e.segment_ids[0, :5].tolist() == [2, 2, 3, 3, 3]
    assert e.positions[0, :5].tolist() == [0, 1, 0, 1, 2]
    # `length` fixes the packed width; a pair that does not fit is named
    assert collate_preferences(TOK, PAIRS, share_prompt=True, length=40).tokens.shape == (8, 40)
    with pytest.raises(ValueError, match=r"row 0 \(prompt, chosen, rejected\): 12 tokens exceed length=8"):
        collate_preferences(TOK, PAIRS[:1], share_prompt=True, length=8)


def test_shared_prompt_equals_two_rows(small):
    """The shared-prompt layout gives every completion token the log-prob it has in its own
    [prompt, completion] row, so reference log-probs, the losses (weights, soft labels) and
    DPO's gradient equal the [B, 2, T] layout's."""
    model, params = small
    two = collate_preferences(TOK, PAIRS)
    one = collate_preferences(TOK, PAIRS, share_prompt=True)
    assert one.tokens.shape == (8, 16) and two.tokens.shape == (8, 2, 16)  # a pair: at most 12 tokens in one row
    lp2, m2 = completion_logps(params, two.tokens, two.attention_mask, two.loss_mask, model=model)
    lp1, m1 = completion_logps(params, one.tokens, one.attention_mask, one.loss_mask, model=model,
                               positions=one.positions, segment_ids=one.segment_ids)
    for i in range(len(PAIRS)):
        for side in (0, 1):  # token by token, in order
            a, b = np.asarray(lp2[i, side])[np.asarray(m2[i, side]) > 0], np.asarray(lp1[i, side])[np.asarray(m1[i, side]) > 0]
            assert a.shape == b.shape and a.size == len(PAIRS[i][1 + side]) + 1  # completion + eos
            np.testing.assert_allclose(b, a, atol=2e-5)
    ref = np.asarray(reference_logps(jax.tree.map(lambda x: x * 0.9, params), two, model=model))
    np.testing.assert_allclose(reference_logps(jax.tree.map(lambda x: x * 0.9, params), one, model=model), ref,
                               atol=1e-4)
    rows = _rows(PAIRS, ref, weight=WEIGHTS, label=[1.0, 0.8, 1.0, 0.5, 1.0, 0.9, 1.0, 0.7])
    two, one = collate_preferences(TOK, rows), collate_preferences(TOK, rows, share_prompt=True)
    cfgs = tuple(PREFERENCE_METHODS[n] for n in PADDING_METHODS[:3])  # orpo rejects soft labels
    for (l2, met2), (l1, met1) in zip(losses(params, two, model=model, cfgs=cfgs),
                                      losses(params, one, model=model, cfgs=cfgs)):
        assert float(l1) == pytest.approx(float(l2), rel=1e-5)
        for k in met2:
            np.testing.assert_allclose(met1[k], met2[k], rtol=1e-4, atol=1e-5, err_msg=k)
    (v2, g2), (v1, g1) = (weighted_value_and_grad(params, b, model=model, cfg=DPOConfig()) for b in (two, one))
    assert float(v1) == pytest.approx(float(v2), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()) + 1e-8, rtol=1e-4)


def test_shared_prompt_bad_use_is_named(small):
    model, params = small
    one = collate_preferences(TOK, PAIRS[:2], share_prompt=True)
    with pytest.raises(ValueError, match="frozen rows need the"):
        _preference.completion_logps(params, one.tokens, one.attention_mask, one.loss_mask, model=model,
                                     positions=one.positions, segment_ids=one.segment_ids, frozen=(1,))
    with pytest.raises(ValueError, match="prefix_segment_ids: needs segment_ids"):
        model.forward(params, one.tokens, one.attention_mask, prefix_segment_ids=one.segment_ids)
    with pytest.raises(ValueError, match=r"prefix_segment_ids: needs segment_ids and the tokens' shape \(2, 16\)"):
        model.forward(params, one.tokens, one.attention_mask, segment_ids=one.segment_ids,
                      prefix_segment_ids=one.segment_ids[:, :4])
