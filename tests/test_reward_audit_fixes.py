"""Reward-model audit fixes: Plackett–Luce refuses margins and ties, tied pairs count half in the
training accuracy, the running normaliser without spread, scorers that name an overlong row (or cut
the prompt), collate_scored's kinds, unlabelled PRM steps, the IPW warnings and bounds, and the
implicit PRM's step-end grid. Each is checked against a number computed another way or the exact error."""
import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rljax.data.adapters import Interaction
from rljax.data.reward_collate import collate_feedback, collate_pairs, collate_ranked, collate_scored, collate_steps
from rljax.losses import reward_model as _reward_model
from rljax.losses.reward_model import RankingConfig, TokenLabelConfig
from rljax.models import Model, preset
from rljax.ops.implicit_rewards import implicit_q, implicit_step_rewards, ipw_targets, step_ends_from
from rljax.ops.ranking import plackett_luce, tied_lists
from rljax.rewards.evaluation import reward_model_eval
from rljax.rewards.learned import likelihood_reward, prm_reward, reward_model_reward, running_normaliser, step_scorer
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()
ranking_loss_jit = jax.jit(_reward_model.ranking_loss, static_argnames=("model", "cfg"))


@functools.lru_cache
def _rm(zero_head: bool = False):
    model = Model(preset("tiny", n_layers=1, heads=("lm", "reward")))
    params = model.init(jax.random.key(0))
    head = params["reward_head"]
    head = jax.tree.map(jnp.zeros_like, head) if zero_head else jax.random.normal(jax.random.key(1), head.shape)
    return model, {**params, "reward_head": head}


def _naive_pl(s, order):
    """−log P(order) under Plackett–Luce, order = answer indices best first."""
    return sum(math.log(sum(math.exp(s[j]) for j in order[k:])) - s[order[k]] for k in range(len(order)))


# ----- 1, 2: Plackett–Luce takes strict orders only -----

def test_plackett_luce_refuses_margins_naming_the_field():
    with pytest.raises(ValueError, match=re.escape("RankingConfig.margin: only defined for objective='pairwise' "
                                                   "(Plackett–Luce has no margin term), got margin=5.0")):
        RankingConfig(objective="plackett_luce", margin=5.0)
    RankingConfig(margin=5.0)  # the pairwise objective keeps its margin
    model, params = _rm()
    lists = [("1+1=", ["2", "3", "11"], [0, 1, 2]), ("2*3=", ["6", "5"], [0, 1])]
    with_margins = collate_ranked(TOK, lists, margins=[3.0, 3.0])
    for loss in (_reward_model.ranking_loss, ranking_loss_jit):  # a static check: refused under jit too
        with pytest.raises(ValueError, match=re.escape("ranking_loss: batch.margin is set")):
            loss(params, with_margins, model=model, cfg=RankingConfig(objective="plackett_luce"))
    # without margins the loss is the likelihood of each list's order, by hand
    b = collate_ranked(TOK, lists)
    s = np.asarray(_reward_model.ranking_scores(params, b, model=model))
    loss, _ = _reward_model.ranking_loss(params, b, model=model, cfg=RankingConfig(objective="plackett_luce"))
    np.testing.assert_allclose(loss, np.mean([_naive_pl(s[0], [0, 1, 2]), _naive_pl(s[1], [0, 1])]), rtol=1e-5)


def test_plackett_luce_refuses_ties_naming_the_row_and_pairwise_takes_them():
    rank = np.array([[0, 1, 2], [0, 1, 1], [1, 1, 1], [1, 0, 1], [2, 0, -1], [0, -1, 0]], np.int32)
    # a tie with a preference: rows 1 and 3; all present answers tied (rows 2, 5): no preference, not flagged
    np.testing.assert_array_equal(tied_lists(jnp.asarray(rank)), [False, True, False, True, False, False])
    s = np.random.default_rng(0).normal(size=rank.shape).astype(np.float32)
    pl = np.asarray(plackett_luce(jnp.asarray(s), jnp.asarray(rank)))
    assert np.isnan(pl[1]) and np.isnan(pl[3]) and np.isfinite(pl[2])
    np.testing.assert_allclose(pl[[0, 4]], [_naive_pl(s[0], [0, 1, 2]), _naive_pl(s[4], [1, 0])], rtol=1e-5)

    model, params = _rm()
    listed = [[("1+1=", ["2", "3", "11"], [0, 1, 1])], [("1+1=", ["2", "11", "3"], [0, 1, 1])]]
    ok = ("2*3=", ["6", "5"], [0, 1])
    b = collate_ranked(TOK, [ok] + listed[0])
    with pytest.raises(ValueError, match=re.escape("ranking_loss: row 1: ranks [0, 1, 1] tie two answers (of 1 such "
                                                   "rows); objective='plackett_luce' needs a strict order")):
        _reward_model.ranking_loss(params, b, model=model, cfg=RankingConfig(objective="plackett_luce"))
    # inside jit the ranks are traced: the tied list's NaN makes the step non-finite, never an order-dependent value
    loss, _ = ranking_loss_jit(params, b, model=model, cfg=RankingConfig(objective="plackett_luce"))
    assert np.isnan(loss)
    # so the reward-model phase checks each host batch first: the tied list is named before its step (it used to
    # be skipped as non-finite, and a run of such batches stopped on "repeated non-finite losses")
    from rljax.data.collate import BatchIterator
    from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
    from rljax.state import OptimizerConfig, create_state

    opt = OptimizerConfig(lr=1e-3, schedule="constant")
    phase = RewardModelPhaseConfig(loss=RankingConfig(objective="plackett_luce"), optimizer=opt,
                                   loop=LoopConfig(steps=2, progress=False, tensorboard=False))
    with pytest.raises(ValueError, match=re.escape("ranking_loss: row 1: ranks [0, 1, 1] tie two answers")):
        train_reward_model(create_state(model, opt, jax.random.key(0), params=params),
                           BatchIterator([ok] + listed[0], 2, lambda rows: collate_ranked(TOK, rows), shuffle=False),
                           phase, model=model)
    # the pairwise objective reads the tie as no preference: the same loss in either listing order, by hand
    losses = []
    for rows in listed:
        bt = collate_ranked(TOK, rows)
        sc = np.asarray(_reward_model.ranking_scores(params, bt, model=model))[0]
        want = np.mean([np.logaddexp(0, -(sc[0] - sc[1])), np.logaddexp(0, -(sc[0] - sc[2]))])
        losses.append(float(_reward_model.ranking_loss(params, bt, model=model, cfg=RankingConfig())[0]))
        np.testing.assert_allclose(losses[-1], want, rtol=1e-5)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


# ----- 7: a pair scored equal counts half in the training accuracy, as in reward_model_eval -----

def test_training_accuracy_counts_ties_half_like_reward_model_eval():
    model, zero = _rm(zero_head=True)
    b = collate_pairs(TOK, [("1+1=", "2", "3"), ("2+2=", "4", "5")])
    _, met = _reward_model.ranking_loss(zero, b, model=model, cfg=RankingConfig())
    assert float(met["accuracy"]) == 0.5  # the zero head ties every pair
    # scores = the prior at the zero head: pairs (0,1) tied, (0,2) and (1,2) right -> (½ + 1 + 1) / 3
    lists = collate_ranked(TOK, [("1+1=", ["2", "3", "4"], [0, 1, 2])], priors=[[1.0, 1.0, 0.0]])
    _, met = _reward_model.ranking_loss(zero, lists, model=model, cfg=RankingConfig())
    np.testing.assert_allclose(met["accuracy"], 2.5 / 3, rtol=1e-6)
    ev = reward_model_eval(model, [lists], params_of=lambda p: p)(zero)
    np.testing.assert_allclose(met["accuracy"], ev["pairwise_accuracy"], rtol=1e-6)


# ----- 3: the running normaliser without spread -----

def test_running_normaliser_without_spread_leaves_rewards_unscaled():
    norm = running_normaliser(shift_mean=False)
    out, st = norm.update(norm.init(), jnp.ones(4))
    np.testing.assert_array_equal(out, [1, 1, 1, 1])  # was 1 / eps = 1e6
    out, st = norm.update(st, jnp.ones(3))
    np.testing.assert_array_equal(out, [1, 1, 1])
    assert float(st.m2) == 0.0 and float(st.count) == 7.0
    # with shift_mean, equal rewards are 0 exactly, also where r.mean() of 0.7s is off by rounding
    norm = running_normaliser(eps=0.0)
    out, st = norm.update(norm.init(), jnp.full(8, 0.7))
    np.testing.assert_array_equal(out, np.zeros(8))
    out, _ = norm.update(norm.init(), jnp.array([0.3]))
    np.testing.assert_array_equal(out, [0.0])
    # once rewards differ, the statistics of everything seen, by numpy
    r = np.array([0.0, 2.0, 1.0], np.float32)
    out, _ = norm.update(st, r)
    seen = np.concatenate([np.full(8, 0.7, np.float32), r])
    np.testing.assert_allclose(out, (r - seen.mean()) / seen.std(), rtol=1e-5)
    with pytest.raises(ValueError, match="running_normaliser.update: no rewards"):
        norm.update(st, jnp.zeros(0))


# ----- 4, 6: scorers name an overlong row, may cut the prompt, take params as a callable -----

def test_scorers_name_the_overlong_row_its_length_and_the_limit():
    model, params = _rm()
    long = "3" * 30
    n = len(TOK.encode("1=", add_bos=True, add_eos=False)) + len(long) + 1  # [bos] prompt completion [eos]
    with pytest.raises(ValueError, match=re.escape(f"reward_model_reward: row 2: {n} tokens exceed max_length=16; "
                                                   "shorten the row or pass overlong='truncate_prompt'")):
        reward_model_reward(model, params, TOK, max_length=16)(["1="] * 3, ["1", "2", long])
    steps = "3;" * 30  # 30 steps of "3", separators between them
    n = len(TOK.encode("1=", add_bos=True, add_eos=False)) + 30 + 29 + 1
    with pytest.raises(ValueError, match=re.escape(f"step_scorer: row 1: {n} tokens exceed max_length=16")):
        step_scorer(model, params, TOK, separator=";", max_length=16)(["1="] * 2, ["1;2", steps])
    with pytest.raises(ValueError, match=re.escape(f"prm_reward: row 1: {n} tokens exceed max_length=16")):
        prm_reward(model, params, TOK, separator=";", max_length=16)(["1="] * 2, ["1;2", steps])  # its own name
    n = len(TOK.encode("1=", add_bos=True, add_eos=False)) + 600 + 1
    with pytest.raises(ValueError, match=re.escape(f"likelihood_reward: row 1: {n} tokens exceed the model's "
                                                   "max_seq_len=512")):  # max_length None: the model's context
        likelihood_reward(model, params, TOK)(["1="] * 2, ["1", "1" * 600])
    with pytest.raises(ValueError, match=re.escape("reward_model_reward: overlong 'cut' not in")):
        reward_model_reward(model, params, TOK, overlong="cut")


def test_truncate_prompt_scores_the_completion_whole_after_the_prompt_s_last_tokens():
    model, params = _rm()
    prompt, completion = "12+34*5-6=", "answer:164"
    keep = 16 - 1 - len(completion) - 1  # bos, completion, eos
    cut = prompt[-keep:]
    for make in (reward_model_reward, likelihood_reward):
        fitted = make(model, params, TOK, max_length=16, overlong="truncate_prompt")
        np.testing.assert_allclose(fitted([prompt, "1="], [completion, "1"]),
                                   make(model, params, TOK)([cut, "1="], [completion, "1"]), rtol=1e-5, atol=1e-6)
    steps = "2*3=6;answer:7"
    keep = 20 - 1 - len(steps) - 1  # 4 prompt characters
    got = step_scorer(model, params, TOK, separator=";", max_length=20, overlong="truncate_prompt")([prompt], [steps])
    want = step_scorer(model, params, TOK, separator=";")([prompt[-keep:]], [steps])
    assert len(got[0]) == 2
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    with pytest.raises(ValueError, match=re.escape("reward_model_reward: row 0: 22 tokens exceed max_length=16 even "
                                                   "with the whole prompt cut: the completion alone has 20 tokens")):
        reward_model_reward(model, params, TOK, max_length=16, overlong="truncate_prompt")(["1"], ["9" * 19])


def test_step_scorer_and_prm_reward_read_params_from_a_callable():
    model, params = _rm()
    _, zero = _rm(zero_head=True)
    prompts, completions = ["1+2*3=", "5="], ["2*3=6;1+6=7;answer:7", "answer:5"]
    fixed = step_scorer(model, params, TOK, separator=";")(prompts, completions)
    current = {"params": params}
    live = step_scorer(model, lambda: current["params"], TOK, separator=";")
    for g, w in zip(live(prompts, completions), fixed):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    prm = prm_reward(model, lambda: current["params"], TOK, separator=";", aggregation="min")
    np.testing.assert_allclose(prm(prompts, completions), [f.min() for f in fixed], rtol=1e-6)
    current["params"] = zero  # a refreshed PRM is read at the next call: σ(0) = ½ at every step
    np.testing.assert_allclose(prm(prompts, completions), [0.5, 0.5], rtol=1e-6)


# ----- 5: collate_scored decides the kind from the first score given -----

def test_collate_scored_kinds_from_the_first_given_score():
    b = collate_scored(TOK, [("a", "b", None), ("a", "c", 2.0), ("a", "d", np.array(3.0))])
    np.testing.assert_array_equal(b.scores, [0, 2, 3])
    np.testing.assert_array_equal(b.score_mask, [0, 1, 1])
    b = collate_scored(TOK, [("a", "b", np.array(2.0)), ("a", "c", np.float32(1.5)), ("a", "d", jnp.asarray(4.0))])
    np.testing.assert_array_equal(b.scores, [2, 1.5, 4])
    b = collate_scored(TOK, [("a", "b", None), ("a", "c", [1.0, None]), ("a", "d", (np.array(2.0), 3))])
    np.testing.assert_array_equal(b.scores, [[0, 0], [1, 0], [2, 3]])
    np.testing.assert_array_equal(b.score_mask, [[0, 0], [1, 0], [1, 1]])
    with pytest.raises(ValueError, match=re.escape("row 1: score 1.0 is a single number but row 0's is a sequence "
                                                   "of 2 numbers; give every row one number")):
        collate_scored(TOK, [("a", "b", [1.0, 2.0]), ("a", "c", 1.0)])
    with pytest.raises(ValueError, match=re.escape("row 2: score [1.0, 2.0] is a sequence but row 1's is a single "
                                                   "number")):
        collate_scored(TOK, [("a", "b", None), ("a", "c", 1.0), ("a", "d", [1.0, 2.0])])
    with pytest.raises(ValueError, match=re.escape("row 1: score must be a number or a sequence of numbers (one per "
                                                   "attribute), got '3.5'")):
        collate_scored(TOK, [("a", "b", None), ("a", "c", "3.5")])


# ----- 8: an unlabelled PRM step -----

def test_unlabelled_prm_steps_stay_out_of_the_loss_and_the_evaluation():
    rows = [("1+2*3=", ["2*3=6", "1+6=7", "answer:7"], [None, 1.0, 0.25]), ("5=", ["answer:5"], [None])]
    b = collate_steps(TOK, rows, separator=";")
    full = collate_steps(TOK, [(p, s, [0.0 if v is None else v for v in y]) for p, s, y in rows], separator=";")
    ends = np.flatnonzero(full.label_mask[0])
    np.testing.assert_array_equal(np.flatnonzero(b.label_mask[0]), ends[1:])  # the first step end left out
    assert b.label_mask[1].sum() == 0
    np.testing.assert_array_equal(b.tokens, full.tokens)  # the unlabelled steps are still encoded as context
    model, params = _rm()
    hidden, _ = model.forward(params, b.tokens, b.attention_mask)
    z = np.asarray(model.token_rewards(params, hidden))
    at = [(0, ends[1], 1.0), (0, ends[2], 0.25)]
    want = np.mean([np.logaddexp(0, z[i, t]) - y * z[i, t] for i, t, y in at])
    loss, _ = _reward_model.token_label_loss(params, b, model=model, cfg=TokenLabelConfig())
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    ev = reward_model_eval(model, [b], params_of=lambda p: p)(params)
    p = 1 / (1 + np.exp(-np.array([z[i, t] for i, t, _ in at])))
    np.testing.assert_allclose(ev["label_accuracy"], np.mean((p > 0.5) == (np.array([1.0, 0.25]) > 0.5)))
    with pytest.raises(ValueError, match=re.escape("row 0: label of step 1 is nan, not a finite number")):
        collate_steps(TOK, [("1=", ["1", "2"], [None, float("nan")])], separator=";")


# ----- 9, 10: click IPW -----

def test_feedback_warns_once_for_positions_without_propensities():
    rows = [Interaction("q", "a", click=True, position=1, propensity=1.0),
            Interaction("q", "b", click=False, position=3),
            Interaction("q", "c", click=True, position=2), ("q", "d", 1, None)]
    with pytest.warns(UserWarning) as caught:
        b = collate_feedback(TOK, rows)
    assert [str(w.message) for w in caught] == [
        "collate_feedback: row 1 (2 of 4 rows) logs a display position but no propensity; the propensity is taken "
        "as 1, so inverse-propensity weighting (FeedbackConfig(ipw=True)) does not correct their position bias. "
        "Log P(examined | position) as the propensity"]
    np.testing.assert_array_equal(b.propensity, [1, 1, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logged propensities, or no position at all: no warning
        collate_feedback(TOK, [rows[0], Interaction("q", "e", click=True), ("q", "d", 1, None)])
        # nor for batches trained without inverse-propensity weights (FeedbackConfig(ipw=False)): the same batch
        unweighted = collate_feedback(TOK, rows, ipw=False)
    for field in ("tokens", "attention_mask", "signal", "propensity"):
        np.testing.assert_array_equal(getattr(unweighted, field), getattr(b, field))


def test_ipw_targets_need_a_positive_min_propensity():
    y = ipw_targets(jnp.array([1.0, 0.0, 1.0]), jnp.array([0.0, 0.0, 0.5]))  # default p_min 0.05
    np.testing.assert_allclose(y, [1 / 0.05, 0.0, 1 / 0.5], rtol=1e-6)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"ipw_targets: min_propensity must be in (0, 1], got {bad}")):
            ipw_targets(jnp.ones(2), jnp.ones(2), min_propensity=bad)


# ----- 11: the implicit PRM's step ends on the log-prob grid -----

def test_step_ends_from_shifts_the_label_mask_onto_the_log_prob_grid():
    label_mask = jnp.array([[0, 0, 1, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(step_ends_from(label_mask), [[0, 1, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0, 0]])
    # on collate_steps' batch: each step end predicts its step's last character
    b = collate_steps(TOK, [("1=", ["ab", "cd"], [1, 0]), ("2=", ["x"], [1])], separator=";")
    ends = np.asarray(step_ends_from(jnp.asarray(b.label_mask)))
    got = [[TOK.decode([int(b.tokens[i, t + 1])]) for t in np.flatnonzero(ends[i])] for i in range(2)]
    assert got == [["b", "d"], ["x"]]
    # the step rewards sum to r_θ(y) less the eos term, the only completion token after the last step end
    rng = np.random.default_rng(0)
    lp, ref = (rng.normal(size=ends.shape).astype(np.float32) for _ in range(2))
    mask = (b.loss_mask[:, 1:] * b.attention_mask[:, 1:]).astype(np.float32)
    beta = 0.1
    r = np.asarray(implicit_step_rewards(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask), jnp.asarray(ends),
                                         beta))
    d = beta * (lp - ref) * mask
    eos = [int(np.flatnonzero(mask[i])[-1]) for i in range(2)]  # the entry predicting [eos]
    eos_id = TOK.encode("", add_bos=False, add_eos=True)[0]
    assert [int(b.tokens[i, eos[i] + 1]) for i in range(2)] == [eos_id, eos_id]
    np.testing.assert_allclose(r.sum(axis=1), d.sum(axis=1) - d[[0, 1], eos], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(implicit_q(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(mask),
                                                     beta))[:, -1], d.sum(axis=1), rtol=1e-5, atol=1e-6)
    # step 2 of row 0 is ";cd": the separator belongs to the next step's reward
    t1, t2 = np.flatnonzero(ends[0])
    np.testing.assert_allclose(r[0, t2], d[0, t1 + 1:t2 + 1].sum(), rtol=1e-5)
